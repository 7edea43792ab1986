"""What the bench scripts share: the cores they may use, the real model's location, running one
torchrun job of a script's own `--worker` mode that writes its result as JSON, and the peak of the
tensor memory a call allocates (torch's profiler)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, TypeVar

R = TypeVar("R")

# measure this source tree, not whatever copy of the package is installed
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(nproc: int, cores: int) -> int:
    return max(1, cores // nproc)


def smollm2_dir(hf_dir: str | None) -> str:
    """`hf_dir`, or the cached SmolLM2-135M; exits with the fix when it is missing."""
    if hf_dir is None:
        from megatron_prune.assets import smollm2_cache_dir

        hf_dir = str(smollm2_cache_dir())
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise SystemExit(f"model not found at {hf_dir}. Fix: run `python -m megatron_prune assets`.")
    return hf_dir


def run_worker_job(script: str, nproc: int, worker_args: list[str], out: str, cores: int, name: str) -> dict:
    """`torchrun --nproc-per-node=nproc script --worker ... --out=out` with the cores shared among
    the ranks; returns the JSON the worker wrote, with the job's wall time, the 1-minute load average
    before and after it, and the cores."""
    threads = threads_per_rank(nproc, cores)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(script), "--worker", f"--out={out}", *worker_args]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{name} worker failed (rc={proc.returncode}):\n{tail}")
    with open(out, encoding="utf-8") as f:
        got = json.load(f)
    got["job_s"] = round(time.perf_counter() - t0, 1)
    got["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after the job
    got["cores"] = cores
    return got


def tensor_peak(fn: Callable[[], R]) -> tuple[R, int, int]:
    """(fn(), peak, end): `fn` run under torch's profiler with profile_memory, which records every c10
    CPU allocation (+bytes) and free (-bytes); added up in time order they give the live tensor bytes
    above what existed before the call. `peak` is their maximum, `end` what `fn` left alive.

    Deterministic and blind to glibc's caching (torch has no CPU allocator statistics, and RSS keeps
    freed pages). A free of a block allocated BEFORE the call appears as a lone negative event and
    lowers the count: release such tensors before calling (or count them, as bench/surgery.py does).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak, live
