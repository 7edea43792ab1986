"""Every Hydra config composes and validates through the typed schemas, so a broken YAML fails here
and not on a cluster: each stage's primary config (with its default logger and with logger=none)
and every option of every config group (model presets, parallel, logger, data, and any group added
later)."""
from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

import megatron_prune.cli.common  # noqa: F401  registers the schemas and the ${mp_cache:} resolver
from megatron_prune.cli.common import VERSION_BASE
from megatron_prune.cli.main import STAGES
from megatron_prune.config import (ConfigError, LoggerConfig, ModelConfig, ParallelConfig,
                                   logger_config_from, model_config_from, parallel_config_from)
from megatron_prune.data.splits import validate_fractions
from megatron_prune.models.build import _common_tp, check_divisibility
from megatron_prune.models.params import count_parameters

CONF_MODULE = "megatron_prune.conf"
CONF = importlib.resources.files(CONF_MODULE)
PRIMARY = sorted(p.name[: -len(".yaml")] for p in CONF.iterdir() if p.name.endswith(".yaml"))
GROUPS = {d.name: sorted(p.name[: -len(".yaml")] for p in d.iterdir() if p.name.endswith(".yaml"))
          for d in CONF.iterdir() if d.is_dir() and not d.name.startswith("__")}
GROUP_OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]
# The keys of `data` that cli/prepare_data.prepare() reads.
DATA_KEYS = {"source", "tokenizer_dir", "output_dir", "fractions", "seed", "overwrite",
             "task_examples", "task_context_lines", "task_num_choices"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_PRUNE_CACHE", str(tmp_path / "cache"))


def _compose(config_name: str, overrides: list[str] = (), hydra: bool = False) -> DictConfig:
    with initialize_config_module(config_module=CONF_MODULE, version_base=VERSION_BASE):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


def _validate(cfg: DictConfig) -> None:
    """What the stage apps do with a composed config before any work: resolve it and read each
    group through its typed schema."""
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if "logger" in cfg:
        assert set(container["logger"]) == {f.name for f in dataclasses.fields(LoggerConfig)}
        logger_config_from(cfg.logger)
    if "parallel" in cfg:
        parallel_config_from(cfg.parallel)
    if "model" in cfg:
        model_config_from(cfg.model)
    if "data" in cfg:
        assert DATA_KEYS <= set(container["data"]), DATA_KEYS - set(container["data"])
        validate_fractions(dict(container["data"]["fractions"]))


def test_every_stage_has_a_primary_config_and_every_primary_config_a_stage():
    assert {s.replace("-", "_") for s in STAGES} == set(PRIMARY)


@pytest.mark.parametrize("logger", [None, "none"], ids=["default-logger", "logger=none"])
@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes_and_validates(name, logger):
    overrides = [] if logger is None else [f"logger={logger}"]
    cfg = _compose(name, overrides)
    _validate(cfg)
    assert "logger" in cfg, f"{name}.yaml has no logger group (run_stage would log nowhere)"
    if logger == "none":
        assert logger_config_from(cfg.logger).kind == "none"


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_keeps_hydra_from_writing_into_the_working_directory(name):
    # No outputs/<date>/ run dirs, no .hydra/ folders, no chdir: outputs go where the user says.
    hydra = _compose(name, hydra=True).hydra
    assert hydra.run.dir == "."
    assert hydra.output_subdir is None
    assert hydra.job.chdir is False
    assert OmegaConf.select(hydra, "runtime.choices")["hydra/job_logging"] == "none"
    assert OmegaConf.select(hydra, "runtime.choices")["hydra/hydra_logging"] == "none"


def _base_for(group: str) -> tuple[str, str]:
    """A primary config that has `group` (override it), else convert (add it with `+`)."""
    for name in PRIMARY:
        if group in _compose(name):
            return name, ""
    return "convert", "+"


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    base, prefix = _base_for(group)
    cfg = _compose(base, [f"{prefix}{group}={option}"])
    _validate(cfg)


def test_the_expected_group_options_exist():
    assert {"default"} <= set(GROUPS["parallel"])
    assert {"none", "wandb"} <= set(GROUPS["logger"])
    assert {"smollm2-135m", "llama3.1-8b", "mistral-nemo-12b", "tiny-llama",
            "tiny-gpt2"} <= set(GROUPS["model"])


@pytest.mark.parametrize("name", GROUPS["model"])
def test_every_model_preset_is_a_valid_typed_model_config(name):
    cfg = model_config_from(_compose("convert", [f"+model={name}"]).model)
    assert isinstance(cfg, ModelConfig) and cfg.name == name
    assert count_parameters(cfg) > 0
    check_divisibility(cfg, 1, 1)
    assert 1 in _common_tp(cfg)


@pytest.mark.parametrize("name", GROUPS["parallel"])
def test_every_parallel_option_is_a_valid_typed_parallel_config(name):
    pc = parallel_config_from(_compose("convert", [f"parallel={name}"]).parallel)
    assert isinstance(pc, ParallelConfig)


@pytest.mark.parametrize("name", GROUPS["logger"])
def test_every_logger_option_is_a_valid_typed_logger_config(name):
    lc = logger_config_from(_compose("convert", [f"logger={name}"]).logger)
    assert isinstance(lc, LoggerConfig) and lc.kind == name


def test_an_unknown_model_field_is_refused_by_the_schema_and_by_the_typed_reader():
    # The presets extend model_schema: overriding a key the schema lacks fails at compose time.
    with pytest.raises(Exception, match="num_layer"):
        _compose("convert", ["+model=tiny-llama", "model.num_layer=3"])
    # Forcing it in with `+` gets past Hydra; the typed reader still refuses it by name.
    cfg = _compose("convert", ["+model=tiny-llama", "+model.num_layer=3"])
    with pytest.raises(ConfigError, match="num_layer"):
        model_config_from(cfg.model)


def test_mp_cache_resolver_follows_the_environment(tmp_path):
    cfg = _compose("convert")
    assert Path(OmegaConf.to_container(cfg, resolve=True)["source"]).parent == tmp_path / "cache"
