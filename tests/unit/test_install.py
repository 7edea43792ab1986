"""A real (non-editable) install carries the Hydra configs and the kernels inside the package, and
Hydra composes a stage's config from the installed copy, away from the source checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPECTED = ("megatron_prune/conf/convert.yaml", "megatron_prune/conf/model/smollm2-135m.yaml",
            "megatron_prune/kernels/__init__.py", "megatron_prune/cli/main.py")

COMPOSE = r"""
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import megatron_prune, megatron_prune.conf, megatron_prune.kernels
for module in (megatron_prune, megatron_prune.conf, megatron_prune.kernels):
    where = Path(module.__file__).resolve()
    assert site in where.parents, f"{module.__name__} imported from {where}, not the install"

from hydra import compose, initialize_config_module

import megatron_prune.cli.common  # schemas + ${mp_cache:}
from megatron_prune.config import model_config_from, parallel_config_from

with initialize_config_module(config_module="megatron_prune.conf", version_base="1.3"):
    cfg = compose(config_name="convert", overrides=["+model=smollm2-135m", "logger=none"])
print("composed", parallel_config_from(cfg.parallel).tp, model_config_from(cfg.model).name)
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def test_wheel_ships_conf_and_kernels_and_hydra_composes_from_the_installed_copy(tmp_path):
    # Build from a copy so that setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks",
        "tests", "wandb", "runs", "outputs"))
    dist = tmp_path / "dist"
    # --no-build-isolation: use the installed setuptools, no index needed.
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist)])
    (wheel,) = dist.glob("megatron_prune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith(("conf/", "kernels/", "tests/")) for n in names), \
        "conf/, kernels/ or tests/ installed as top-level packages"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "megatron-prune = megatron_prune.cli.main:main" in \
        zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
          "--target", str(site)])
    for name in EXPECTED:
        assert (site / name).is_file(), name

    env = dict(os.environ, PYTHONPATH=str(site), MEGATRON_PRUNE_CACHE=str(tmp_path / "cache"),
               WANDB_MODE="offline")
    work = tmp_path / "work"  # not the checkout: nothing may come from the source tree
    work.mkdir()
    proc = _run([sys.executable, "-c", COMPOSE, str(site)], cwd=work, env=env)
    assert proc.stdout.split()[-3:] == ["composed", "1", "smollm2-135m"], proc.stdout
    # The stage app itself finds its primary config through pkg://megatron_prune.conf.
    proc = _run([sys.executable, "-m", "megatron_prune", "convert", "--cfg", "job"], cwd=work, env=env)
    assert "source:" in proc.stdout and "parallel:" in proc.stdout
    assert os.listdir(work) == []
