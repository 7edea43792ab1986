"""A distill run killed with SIGKILL after a checkpoint, then rerun with the same command, ends with
weights bit-identical to an uninterrupted run's. Both run the real CLI under torchrun at DP2 with the
distributed optimizer (its Adam state sharded over the two ranks, the hardest state to bring back), on
tiny local checkpoints: a student and a different teacher of one vocabulary."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.test_bad_inputs import _env, run_cli
from tests.unit.test_cli_stages import TEXT

STEPS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megatron_prune.convert.tiny import tiny_hf_model
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("resume")
    cache = root / "cache"
    texts = root / "texts"
    texts.mkdir(parents=True)
    for i in range(8):
        (texts / f"doc{i}.txt").write_text(TEXT * (i + 1))
    tokenizer = build_tiny_tokenizer(str(root / "tokenizer"), [TEXT], 60)
    proc = run_cli(["prepare-data", f"data.source={texts}", f"data.tokenizer_dir={tokenizer}",
                    f"data.output_dir={root / 'data'}", "data.task_examples=0"], root, cache)
    assert proc.returncode == 0, proc.stderr
    for name, seed in (("student", 0), ("teacher", 1)):
        tiny_hf_model("llama", seed=seed).save_pretrained(str(root / f"hf-{name}"))
        proc = run_cli(["convert", f"source={root / f'hf-{name}'}", f"output={root / name}", "logger=none"],
                       root, cache)
        assert proc.returncode == 0, proc.stderr
    return root, cache


def _args(root: Path, output: Path) -> list[str]:
    return ["distill", f"student={root / 'student'}", f"teacher={root / 'teacher'}", f"data_dir={root / 'data'}",
            f"output={output}", "logger=none", f"distill.train.steps={STEPS}", "distill.train.seq_length=16",
            "distill.train.global_batch_size=4", "distill.train.micro_batch_size=1",
            "distill.train.warmup_steps=2", "distill.train.lr=1e-2", "distill.train.eval_interval=0",
            "distill.train.eval_samples=4", "distill.train.save_interval=2",
            "distill.train.distributed_optimizer=true"]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys(checkpoint_id=str(ckpt / "model"))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}  # not megatron's extra state


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _kill_tree(pid: int) -> None:
    for p in _process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after_first_checkpoint(args: list[str], root: Path, cache: Path, ckpts: Path) -> int:
    """Run the job; SIGKILL it and its workers as soon as a checkpoint is complete."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_prune", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "COMPLETE").is_file() for p in ckpts.glob("step_*")):
                _kill_tree(proc.pid)
                break
            time.sleep(0.02)
        return proc.wait(timeout=60)
    finally:
        _kill_tree(proc.pid)


def test_a_killed_distill_run_resumes_to_the_weights_of_an_uninterrupted_run(inputs, tmp_path):
    root, cache = inputs
    straight = tmp_path / "straight"
    proc = run_cli(_args(root, straight), root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    resumed = tmp_path / "resumed"
    ckpts = Path(f"{resumed}.checkpoints")
    code = _kill_after_first_checkpoint(_args(root, resumed), root, cache, ckpts)
    assert code != 0, "the run finished before it could be killed"
    time.sleep(2)
    assert not resumed.exists()  # no final output from a killed run (no orphaned worker went on)
    reached = sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if (p / "COMPLETE").is_file())
    assert reached and reached[-1] < STEPS, reached

    proc = run_cli(_args(root, resumed), root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {ckpts}/step_{reached[-1]:06d} (step {reached[-1]}" in proc.stdout

    a, b = _weights(straight), _weights(resumed)
    assert set(a) == set(b) and len(a) > 5
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    # and the training moved the student: the check above is not comparing two copies of the input
    initial = _weights(root / "student")
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    shutil.rmtree(ckpts)
