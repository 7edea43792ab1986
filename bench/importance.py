"""Cost of importance scoring on SmolLM2-135M: time over a plain forward, and bytes on the wire.

    python bench/importance.py [--tp 1,3 --samples 8 --seq-length 256 --micro-batch-size 2 --repeats 5]

For each tensor-parallel layout (one torchrun job per layout, `--tp` ranks, PP1, DP1) it times, side by
side in one process (a warm-up pair first, then plain/scored interleaved --repeats times, the
minimum of each taken, each run the slowest rank's wall time):
  plain   the forward `collect_calibration_stats` runs, over the same calibration micro-batches and
          schedule calls, with no hooks (the last stage's reduce returns zeros [b, 1]);
  scored  `collect_calibration_stats` itself: the same forward with the statistics hooks on, the
          NaN check across ranks, and the reduction of the statistics into global index space.
The goal is scored / plain <= 1.05 (`ratio`, on wall time). `cpu_ratio` is the same ratio on the CPU
time of all ranks summed (min over repeats): steadier than wall time when other jobs share the cores,
but it also counts spinning threads, so it is a cross-check, not the goal. A layout is marked
`noisy` when its repeats of one kind differ by more than 25% or the 1-minute load average says other
jobs shared the cores (above the core count before the job, or above its ranks + the cores after
it): rerun on a quiet machine before trusting its ratio.

Bytes (what this rank hands to collectives, `CommCounter`), reported per rank in total and per
calibration micro-batch: the statistics are reduced ONCE after the pass, so the per-micro-batch
figure is that total divided by the number of micro-batches (it shrinks as calibration grows).
Against it: the bytes the rank would send if, instead of statistics, it all-gathered every
activation the hooks read, per micro-batch [s, b] (s = the micro-batch's trimmed width):
    4 * s * b * (L_local * (np_local * hn + F_local + 2 * hidden) + [last stage] * hidden)
(fp32 activations: the linear_proj input [s, b, np_local*hn], the linear_fc2 input [s, b, F_local],
the input_layernorm and pre_mlp_layernorm outputs [s, b, hidden] of each local layer, and the final
layernorm output on the last stage). At TP1 (a world of one) nothing crosses the wire either way; the
formula still gives the size of the rank's share that a multi-rank layout would have to move.

SmolLM2-135M has 9 attention heads in 3 query groups: megatron cannot split it over TP=2 (the
layout is refused before anything is built), so the layouts measured are TP1 and TP3 (3 ranks
on this machine's cores; each rank gets max(1, cores // ranks) threads, the same for both runs).

Needs the real assets: `python -m megatron_prune assets` (model + prepared Shakespeare data).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# measure this source tree, not whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import cpu_cores, run_worker_job, smollm2_dir, threads_per_rank  # noqa: E402

GOAL = 1.05
NOISY_SPREAD = 1.25  # slowest / fastest repeat above this: the machine was not quiet
ACT_BYTES = 4  # fp32 activations (params_dtype=float32 in models/build.py)


def allgather_bytes(widths: list[int], micro_batch_size: int, *, local_layers: int, heads_local: int,
                    head_dim: int, ffn_local: int, hidden: int, last_stage: bool,
                    act_bytes: int = ACT_BYTES) -> int:
    """Bytes one rank would send to all-gather the hooked activations of micro-batches of trimmed
    widths `widths` (each [s_i, b]); see the module docstring for the formula."""
    per_token = local_layers * (heads_local * head_dim + ffn_local + 2 * hidden)
    per_token += hidden if last_stage else 0
    return act_bytes * micro_batch_size * per_token * sum(widths)


def trimmed_widths(windows, micro_batch_size: int, microbatches_per_call: int, dp_rank: int = 0,
                   dp_size: int = 1) -> list[int]:
    """The width s of every micro-batch as `collect_calibration_stats` runs it (a schedule call's
    micro-batches are trimmed to one common width: see evaluate/batching.trimmed_batches)."""
    from megatron_prune.data.loaders import iter_microbatches, num_microbatches
    from megatron_prune.evaluate.batching import trimmed_batches

    total = num_microbatches(len(windows), micro_batch_size, dp_size)
    widths, chunk = [], []
    for i, mb in enumerate(iter_microbatches(windows, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)):
        chunk.append(mb)
        if len(chunk) == microbatches_per_call or i == total - 1:
            widths += [b.shape[1] for b in trimmed_batches(chunk)]
            chunk = []
    return widths


def parse_layouts(text: str) -> list[int]:
    try:
        tps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp {text!r}: expected comma-separated integers, e.g. 1,3")
    if not tps or any(t < 1 for t in tps):
        raise argparse.ArgumentTypeError(f"--tp {text!r}: every TP size must be >= 1")
    return tps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=parse_layouts, default=[1, 3],
                   help="TP sizes to measure, comma-separated (SmolLM2-135M allows 1 and 3)")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--microbatches-per-call", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cores", type=int, default=0, help="cores to share among ranks (0: all usable)")
    p.add_argument("--hf-dir", default=None, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--data-dir", default=None,
                   help="prepared data dir (default: the cached shakespeare-smollm2)")
    # internal: one torchrun rank
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------
# worker: one rank of a torchrun job
# ------------------------------------------------------------------------------------------------
def _nothing(output, batch):
    import torch

    return torch.zeros(batch.shape[0], 1)  # [b, 1], as collect_calibration_stats' reduce


def plain_pass(model, groups, windows, micro_batch_size: int, microbatches_per_call: int) -> None:
    """What collect_calibration_stats runs, minus the hooks, the NaN check and the reduction."""
    from megatron_prune.data.loaders import iter_microbatches, num_microbatches
    from megatron_prune.evaluate.batching import check_token_ids, trimmed_batches
    from megatron_prune.models.forward import run_forward

    check_token_ids(windows.tokens, model, "importance windows")
    total = num_microbatches(len(windows), micro_batch_size, groups.dp_size)
    chunk = []
    for i, mb in enumerate(iter_microbatches(windows, micro_batch_size, dp_rank=groups.dp_rank,
                                             dp_size=groups.dp_size)):
        chunk.append(mb)
        if len(chunk) == microbatches_per_call or i == total - 1:
            run_forward(model, groups, trimmed_batches(chunk), _nothing, width=1, with_labels=False)
            chunk = []


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from megatron_prune.config import ParallelConfig
    from megatron_prune.convert.hf_io import read_hf_checkpoint
    from megatron_prune.data.loaders import token_windows
    from megatron_prune.data.manifest import load_manifest
    from megatron_prune.importance import CommCounter, collect_calibration_stats
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime, shutdown

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    groups = init_runtime(ParallelConfig(tp=a.worker_tp, pp=1))
    try:
        cfg, _, state = read_hf_checkpoint(a.hf_dir)
        model = build_model(cfg, groups)
        load_full_state(model, state.__getitem__, groups)
        m = load_manifest(a.data_dir)
        windows = token_windows(m.split_prefix("calibration"), a.seq_length, max_samples=a.samples,
                                pad_id=m.tokenizer.pad_id)
        mbs, per_call = a.micro_batch_size, a.microbatches_per_call
        comm = CommCounter()

        def plain():
            plain_pass(model, groups, windows, mbs, per_call)

        def scored():
            nonlocal comm
            comm = CommCounter()
            collect_calibration_stats(model, groups, windows, mbs, microbatches_per_call=per_call,
                                      comm=comm)

        def timed(fn) -> tuple[float, float]:
            """(the slowest rank's wall time, the CPU time of all ranks summed), in seconds."""
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
            return float(wall[0]), float(cpu[0])

        fns = {"plain": plain, "scored": scored}
        warm = {k: timed(f)[0] for k, f in fns.items()}
        runs = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, f in fns.items():
                w, c_s = timed(f)
                runs[k].append(w)
                cpu[k].append(c_s)

        widths = trimmed_widths(windows, mbs, per_call, groups.dp_rank, groups.dp_size)
        c = model.config
        tp = groups.tp_size
        local_layers = len(model.decoder.layers)
        gather = allgather_bytes(widths, mbs, local_layers=local_layers,
                                 heads_local=int(c.num_attention_heads) // tp, head_dim=int(c.kv_channels),
                                 ffn_local=int(c.ffn_hidden_size) // tp, hidden=int(c.hidden_size),
                                 last_stage=groups.is_last_stage)
        mine = {"rank": groups.rank, "bytes_sent": comm.bytes_sent, "collectives": comm.collectives,
                "by_group": dict(comm.by_group), "allgather_bytes": gather}
        per_rank = [None] * groups.world_size
        dist.all_gather_object(per_rank, mine)
        if groups.is_rank0:
            out = {"tp": tp, "pp": groups.pp_size, "dp": groups.dp_size, "world_size": groups.world_size,
                   "threads_per_rank": torch.get_num_threads(), "num_microbatches": len(widths),
                   "microbatch_widths": widths, "samples": len(windows),
                   "tokens": int(windows.loss_mask.ne(0).sum()),
                   "warmup_s": warm, "runs_s": runs, "cpu_s": cpu, "per_rank": per_rank,
                   "model": {"num_layers": int(c.num_layers), "hidden": int(c.hidden_size),
                             "heads": int(c.num_attention_heads), "query_groups": int(c.num_query_groups),
                             "head_dim": int(c.kv_channels), "ffn": int(c.ffn_hidden_size)}}
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump(out, f)
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------
# parent: one torchrun job per layout, then the table and the JSON line
# ------------------------------------------------------------------------------------------------
def run_layout(a, tp: int, cores: int, workdir: str) -> dict:
    return run_worker_job(__file__, tp, [
        f"--worker-tp={tp}", f"--hf-dir={a.hf_dir}", f"--data-dir={a.data_dir}", f"--samples={a.samples}",
        f"--seq-length={a.seq_length}", f"--micro-batch-size={a.micro_batch_size}",
        f"--microbatches-per-call={a.microbatches_per_call}", f"--repeats={a.repeats}"],
        os.path.join(workdir, f"tp{tp}.json"), cores, f"TP{tp}")


def summarize(r: dict) -> dict:
    plain, scored = min(r["runs_s"]["plain"]), min(r["runs_s"]["scored"])
    cpu_plain, cpu_scored = min(r["cpu_s"]["plain"]), min(r["cpu_s"]["scored"])
    n_mb = r["num_microbatches"]
    sent = max(p["bytes_sent"] for p in r["per_rank"])
    gather = max(p["allgather_bytes"] for p in r["per_rank"])
    groups = {}
    for p in r["per_rank"]:
        for k, v in p["by_group"].items():
            groups[k] = max(groups.get(k, 0), v)
    sent_mb, gather_mb = sent / n_mb, gather / n_mb
    spread = max(max(v) / min(v) for v in r["runs_s"].values())  # slowest / fastest run of a kind
    # load before the job, or after it beyond this job's own ranks: more runnable processes than cores
    before, after = r.get("loadavg_1min", [0.0, 0.0])
    cores = r.get("cores", 1)
    busy = before > cores + 0.5 or after > max(cores, r["world_size"]) + cores
    return {
        "ratio": round(scored / plain, 4), "goal_met": scored / plain <= GOAL,
        # runs of one kind far apart, or a busy machine: other jobs were running
        "noisy": spread > NOISY_SPREAD or busy, "run_spread": round(spread, 3),
        "loadavg_1min": r.get("loadavg_1min"),
        "plain_s": round(plain, 3), "scored_s": round(scored, 3),
        "plain_runs_s": [round(x, 3) for x in r["runs_s"]["plain"]],
        "scored_runs_s": [round(x, 3) for x in r["runs_s"]["scored"]],
        "cpu_ratio": round(cpu_scored / cpu_plain, 4),
        "plain_cpu_s": round(cpu_plain, 3), "scored_cpu_s": round(cpu_scored, 3),
        "ranks": r["world_size"], "threads_per_rank": r["threads_per_rank"],
        "num_microbatches": n_mb, "microbatch_widths": sorted(set(r["microbatch_widths"])),
        "tokens": r["tokens"],
        "bytes_sent_per_rank": sent, "collectives_per_rank": max(p["collectives"] for p in r["per_rank"]),
        "bytes_sent_per_rank_by_group": groups,
        "bytes_sent_per_rank_per_microbatch": round(sent_mb, 1),
        "bytes_sent_per_rank_per_microbatch_by_group": {k: round(v / n_mb, 1) for k, v in groups.items()},
        "allgather_bytes_per_rank_per_microbatch": round(gather_mb, 1),
        "allgather_over_sent": round(gather_mb / sent_mb, 1) if sent_mb else None,
    }


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    from megatron_prune.config import ConfigError
    from megatron_prune.convert.cache import cache_root
    from megatron_prune.convert.hf_io import model_config_from_hf_dir
    from megatron_prune.models.build import check_divisibility

    a.hf_dir = smollm2_dir(a.hf_dir)
    if a.data_dir is None:
        a.data_dir = str(cache_root() / "data" / "shakespeare-smollm2")
    if not os.path.isfile(os.path.join(a.data_dir, "manifest.json")):
        raise SystemExit(f"data not found at {a.data_dir}. Fix: run `python -m megatron_prune assets`.")
    cfg = model_config_from_hf_dir(a.hf_dir)
    try:  # the layout the issue asked for, TP2, and why it is not measured
        check_divisibility(cfg, 2, 1)
        tp2 = "allowed"
    except ConfigError as e:
        tp2 = f"refused: {e}"
    for tp in a.tp:
        check_divisibility(cfg, tp, 1)  # a clear error before any job starts
    cores = a.cores or cpu_cores()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_importance_") as workdir:
        for tp in a.tp:
            results[f"tp{tp}"] = run_layout(a, tp, cores, workdir)
    summary = {k: summarize(r) for k, r in results.items()}

    print(f"SmolLM2-135M importance scoring: {a.samples} windows x {a.seq_length} tokens, "
          f"micro-batch {a.micro_batch_size}, {a.microbatches_per_call} micro-batches per call, "
          f"{cores} cores, min of {a.repeats} (after one warm-up pair)")
    print(f"  {'layout':7s} {'ranks':>5s} {'thr':>3s} {'mbs':>4s} {'plain s':>8s} {'scored s':>9s} "
          f"{'ratio':>6s}   {'cpu':>6s} {'sent B/rank':>11s} {'sent B/mb':>10s} {'gather B/mb':>12s} "
          f"{'gather/sent':>11s}")
    for k, s in summary.items():
        flag = ("" if s["goal_met"] else " !") + ("?" if s["noisy"] else "")
        ags = "-" if s["allgather_over_sent"] is None else f"{s['allgather_over_sent']:.0f}x"
        print(f"  {k:7s} {s['ranks']:5d} {s['threads_per_rank']:3d} {s['num_microbatches']:4d} "
              f"{s['plain_s']:8.2f} {s['scored_s']:9.2f} {s['ratio']:6.3f}{flag:3s}{s['cpu_ratio']:6.3f} "
              f"{s['bytes_sent_per_rank']:11d} {s['bytes_sent_per_rank_per_microbatch']:10.0f} "
              f"{s['allgather_bytes_per_rank_per_microbatch']:12.0f} {ags:>11s}")
    print(f"  ratio = scored / plain wall time, goal <= {GOAL} (! = missed, ? = noisy); "
          "cpu = the same on the CPU time of all ranks summed")
    print("  sent = statistics one rank hands to collectives (reduced once, after the pass); "
          "gather = all-gathering the hooked fp32 activations instead, per micro-batch")
    measured = " and ".join(f"TP{t}" for t in a.tp)
    note = (f"SmolLM2-135M has 9 attention heads in 3 query groups, so TP2 is impossible (megatron "
            f"refuses it, see 'tp2'); measured {measured} (PP1, DP1) instead of TP1 and TP2. Times: the "
            "slowest rank's wall time, min over repeats, plain and scored interleaved in one process. "
            "Statistics are reduced once per calibration pass, so bytes per micro-batch = total / "
            "micro-batches. At TP1 (one rank) nothing crosses the wire; the all-gather figure is the "
            "rank's share by the formula 4*s*b*(L_local*(np_local*hn + F_local + 2*hidden) + hidden on "
            "the last stage). Not in CommCounter: one 8-byte MIN all-reduce over the world for the NaN "
            "check when world > 1.")
    out = {"bench": "importance", "model": "SmolLM2-135M-Instruct", "goal_ratio": GOAL,
           "samples": a.samples, "seq_length": a.seq_length, "micro_batch_size": a.micro_batch_size,
           "microbatches_per_call": a.microbatches_per_call, "repeats": a.repeats, "cores": cores,
           **summary, "tp2": tp2, "note": note}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
