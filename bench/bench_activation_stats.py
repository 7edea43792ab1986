"""Per-channel activation statistics: the fused-style reference vs a naive three-pass baseline.

    python bench/bench_activation_stats.py [--s 1024 --b 4 --c 2048 --dtype bf16 --repeats 9]

Times, side by side in one run (interleaved, best of --repeats):
  ref    kernels.activation_stats.channel_stats_reference (the CPU path): each 8 MiB token chunk
         is copied to fp32 into one reused buffer and reduced in place there;
  naive  three separate masked reductions, each converting the whole input to fp32 and
         multiplying by the mask (what one writes without thinking: 3 passes, 5 full fp32 copies);
  triton the fused kernel, on CUDA only. Under TRITON_INTERPRET=1 on CPU the kernel runs in a
         Python/numpy interpreter, so its timing says nothing about the kernel: it is not timed.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# measure this source tree, not whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_prune.kernels.activation_stats import (  # noqa: E402
    channel_stats_reference, channel_stats_triton, triton_available)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def naive(x: torch.Tensor, mask: torch.Tensor):
    x2 = x.reshape(-1, x.shape[-1])  # [T, C]
    m = mask.reshape(-1, 1).to(torch.float32)  # [T, 1]
    sum_sq = (x2.float() ** 2 * m).sum(0)
    sum_abs = (x2.float().abs() * m).sum(0)
    max_abs = (x2.float().abs() * m).amax(0)
    return sum_sq, sum_abs, max_abs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fns: dict, repeats: int, device) -> dict:
    """Best-of-`repeats` milliseconds per fn, interleaved so that load changes hit all alike."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up (allocator, kernel compile)
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--s", type=int, default=1024)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--c", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--masked", type=float, default=0.1, help="fraction of tokens masked out")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.s, a.b, a.c, generator=g).to(DTYPES[a.dtype]).to(device)  # [s, b, C]
    mask = (torch.rand(a.s, a.b, generator=g) >= a.masked).to(device)  # [s, b]

    ref = channel_stats_reference(x, mask)
    nv = naive(x, mask)
    for name, want in zip(("sum_sq", "sum_abs", "max_abs"), nv):  # same numbers, or no contest
        torch.testing.assert_close(getattr(ref, name), want, rtol=1e-4, atol=1e-3,
                                   msg=f"ref vs naive {name}")

    fns = {"ref": lambda: channel_stats_reference(x, mask), "naive": lambda: naive(x, mask)}
    note = "triton not timed: CPU (TRITON_INTERPRET timings are meaningless)"
    if device.type == "cuda" and triton_available():
        fns["triton"] = lambda: channel_stats_triton(x, mask)
        note = "cuda"
    ms = bench(fns, a.repeats, device)
    print(f"shape [s={a.s}, b={a.b}, C={a.c}] {a.dtype}, {a.masked:.0%} tokens masked, "
          f"device={device}, threads={torch.get_num_threads()}, best of {a.repeats}")
    for k, v in ms.items():
        print(f"  {k:7s} {v:9.2f} ms")
    print(f"  naive / ref = {ms['naive'] / ms['ref']:.2f}x   ({note})")
    out = {"bench": "activation_stats", "shape": [a.s, a.b, a.c], "dtype": a.dtype,
           "device": str(device), "threads": torch.get_num_threads(),
           "ref_ms": round(ms["ref"], 3), "naive_ms": round(ms["naive"], 3),
           "ratio": round(ms["naive"] / ms["ref"], 3),
           "triton_ms": round(ms["triton"], 3) if "triton" in ms else None}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
