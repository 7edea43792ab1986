"""`megatron-prune --help` / `python -m megatron_prune --help` list every stage; bad stages exit 2."""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from megatron_prune.cli.main import STAGES


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _console_script() -> str:
    script = shutil.which("megatron-prune")
    assert script, "the megatron-prune console script is not on PATH (pip install -e .)"
    return script


def _assert_lists_every_stage(text: str) -> None:
    lines = text.splitlines()
    for name, (_, description) in STAGES.items():
        rows = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(rows) == 1, f"stage {name!r} is not listed once:\n{text}"
        assert rows[0].split(None, 1)[1] == description, rows[0]


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_stage_with_its_description(launcher, flag, tmp_path):
    cmd = [_console_script()] if launcher == "console-script" else [sys.executable, "-m", "megatron_prune"]
    proc = _run([*cmd, flag], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: megatron-prune <stage>")
    _assert_lists_every_stage(proc.stdout)
    assert "torchrun --nproc-per-node=N -m megatron_prune" in proc.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("launcher", ["console-script", "python-m"])
def test_unknown_stage_exits_2_and_shows_the_stages_on_stderr(launcher, tmp_path):
    cmd = [_console_script()] if launcher == "console-script" else [sys.executable, "-m", "megatron_prune"]
    proc = _run([*cmd, "no-such-stage", "a=b"], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_lists_every_stage(proc.stderr)
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        "megatron-prune: error: unknown stage 'no-such-stage'")


def test_every_stage_names_an_importable_module_with_an_app():
    for name, (module, _) in STAGES.items():
        assert importlib.util.find_spec(module) is not None, f"stage {name}: no module {module}"
        assert callable(getattr(importlib.import_module(module), "app", None)), module


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_cfg_job_prints_the_composed_config(stage, tmp_path):
    # `megatron-prune <stage> --cfg job` is what the usage text offers to see a stage's config.
    proc = _run([_console_script(), stage, "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "logger:" in proc.stdout
    assert os.listdir(tmp_path) == []
