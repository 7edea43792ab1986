"""Cost of prune surgery on SmolLM2-135M: peak memory per rank, bytes between ranks, time vs a save.

    python bench/surgery.py [--layouts 1x1,3x1,1x2 --targets width,both --repeats 2]

One torchrun job per layout (`TPxPP`, DP1). Each rank loads the real SmolLM2-135M weights into a
megatron-core GPTModel. For every target it makes the plan from seeded random scores (the shapes, not
the scores, set memory, bytes and time; the kept indices are scattered as activation scores would be),
runs `prune.surgery.apply_plan` once under torch's memory profiler, then --repeats times runs it
plainly, saves the pruned model with `checkpoint.save_checkpoint`, and drops it (after one untimed
warm-up surgery + save per process). Surgery consumes its source (the default, `consume=True`: each
source tensor is freed once its new shard is cut), so every surgery gets a freshly loaded source
model, loaded before the measurement starts. Targets:
  width   conf/prune/smollm2-135m.yaml (the recipe default): hidden 576->384, FFN 1536->1024;
  depth   conf/prune/smollm2-135m-depth.yaml: 30->20 layers (one block of 10; layers change stage at PP2);
  both    the two together.
The FFN target is rounded down to a multiple of every TP size in the run (1024 -> 1023 when TP3 is in
it: megatron splits the FFN evenly and 3 does not divide 1024), so all layouts prune to the same shapes.

Memory, per rank, relative to `model bytes`: the source model's parameters on that rank (numel *
element_size, a tied weight once per rank; the last PP stage's copy of the tied embedding counts).
  peak_over_model   THE GOAL FIGURE (issue 4: "peak memory during surgery as a multiple of the model's
                    own bytes", <= 1.10): the peak TOTAL, (model bytes + peak extra) / model bytes =
                    1 + extra_over_model. Peak extra = the process's resident set: max(VmHWM, VmRSS
                    sampled every --sample-ms) during `apply_plan`, minus VmRSS just before it (taken
                    after gc + glibc malloc_trim, so freed memory is back with the OS and new
                    allocations show up). VmHWM is reset by writing 5 to /proc/self/clear_refs. Torch has
                    no CPU allocator statistics, so RSS is the honest figure: it includes what glibc
                    keeps after frees and gloo's buffers, and it varies a little between repeats (the
                    worst repeat is reported, all in `peak_extra_runs`);
  extra_over_model  peak extra / model bytes (the figure without the model itself);
  tensor_*          the same from the tensors `apply_plan` allocates and frees: torch.profiler
                    (profile_memory: every c10 CPU allocation and free in time order) plus the source
                    tensors surgery releases (counted by wrapping `surgery._release`, because the
                    profiler does not see the free of a block allocated before it started);
                    deterministic, no allocator or gloo internals: what the algorithm itself holds;
  new_over_model    the pruned model's bytes (it replaces the source's as surgery goes);
  build / fill      `apply_plan` split in two by wrapping the `build_model` it calls (instrumentation
                    only): `build` = megatron builds the pruned model empty (meta tensors: no memory,
                    no initialisation, no tied-embedding sync) after the dropped layers are freed;
                    `fill` = the source shards are cut and exchanged into it, layer by layer, each
                    source tensor freed once cut (index_select copies, all_to_all buffers, stage moves).

Bytes (per rank, what it sends to OTHER ranks):
  wire         counted by wrapping torch.distributed during `apply_plan`: all_to_all_single splits for
               other ranks (`wire_tp`), point-to-point sends of layers changing stage (`wire_pp`), and the
               input of any other collective (`wire_build`: 0 now that the pruned model is built empty;
               kept to catch a build that syncs the tied embedding again; the gather ratios leave it
               out);
  comm         `CommStats.tp_bytes + pp_bytes` as surgery counts them; tp_bytes counts the whole
               all_to_all input, INCLUDING the rows a rank keeps (its split to itself, copied locally:
               `kept_local_bytes`), so it is >= wire_tp;
  gather       gather-and-reshard (what TP1-only tools do: all-gather every TP-partitioned weight, prune
               the full tensor, keep the new slice): each rank sends its shard to the tp-1 others,
               (tp-1) * shard bytes summed over the source model's TP-partitioned parameters, plus the
               pruned layers that change pipeline stage (the same bytes surgery moves);
  gather_min   the same, restricted to what must be re-partitioned at all: TP-partitioned tensors of
               KEPT layers only (not the vocab-parallel embedding / output layer, whose sharded
               vocabulary dim is never pruned, nor dropped layers), plus the stage moves.
At TP1/PP1 (a world of one) nothing crosses the wire either way.

Time: `apply_plan` wall time vs `save_checkpoint` wall time of the model it returned (a megatron
distributed checkpoint into a temp dir under --workdir), each the slowest rank's, min over repeats,
surgery and save alternating in one process. `surgery_over_save` = surgery / save (the figure the
issue asks for); `build_s` = the part of the surgery spent in megatron's build. `surgery_over_save_cpu`
is the same on the CPU time of the ranks' main processes summed (a cross-check: the save also waits
on the disk and on helper processes, which it does not count). A result is `noisy` when the 1-minute
load average says other jobs shared the cores (above the cores before the job, or above its ranks +
the cores after it) or its repeats differ by more than 25%.

SmolLM2-135M has 9 heads in 3 query groups: TP must be 1 or 3; PP2 splits its 30 (and 20) layers.
Ranks get max(1, cores // ranks) threads. Needs the model: `python -m megatron_prune assets`.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time

# measure this source tree, not whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import REPO_ROOT, cpu_cores, run_worker_job, smollm2_dir  # noqa: E402

GOAL = 1.10  # peak total memory during surgery / model bytes, per rank
NOISY_SPREAD = 1.25  # slowest / fastest repeat above this: the machine was not quiet
TARGETS = ("width", "depth", "both")
RECIPES = {"width": "smollm2-135m.yaml", "depth": "smollm2-135m-depth.yaml"}
SEED = 0
NOTE = (
    "peak_over_model is the goal figure (peak total RSS during apply_plan / the rank's model bytes); "
    "tensor_peak_over_model is the same from the tensors apply_plan holds (torch profiler + the source "
    "tensors it releases). apply_plan builds the pruned model empty (meta), frees the dropped layers "
    "first, then walks the layers, cutting each new shard and freeing its source tensor at once, and "
    "cuts the embedding and output layer last, when the layers have given back what pruning saves; on "
    "CPU it returns freed heap pages to the OS between layers (malloc_trim), or glibc would serve new "
    "shards from trimmed pages and the resident set would grow although live tensors shrink. What "
    "remains above 1.0 is one tensor's transient (its new shard, and at TP>1 the all_to_all buffers) "
    "and, at PP>1, layers arriving from another stage before the receiving stage's own layers are cut. "
    "Bytes: CommStats.tp_bytes counts each rank's all_to_all split to itself (rows it keeps, copied "
    "locally); wire counts only bytes for other ranks, which is what the gather ratios use. Scores are "
    "seeded random (seed 0); memory, bytes and time depend on shapes and on how many kept rows change "
    "owner.")


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"1x1,3x1,1x2" -> [(tp, pp), ...]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            tp, pp = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (None, None)
        except ValueError:
            tp = pp = None
        if tp is None or tp < 1 or pp < 1:
            raise argparse.ArgumentTypeError(f"--layouts {text!r}: {item!r} is not TPxPP with sizes >= 1, "
                                             "e.g. 1x1,3x1,1x2")
        out.append((tp, pp))
    if not out:
        raise argparse.ArgumentTypeError(f"--layouts {text!r}: give at least one TPxPP, e.g. 1x1")
    return out


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in TARGETS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--targets {text!r}: use a comma-separated subset of {TARGETS}")
    return names


def layout_name(tp: int, pp: int) -> str:
    return f"tp{tp}pp{pp}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", type=parse_layouts, default=[(1, 1), (3, 1), (1, 2)],
                   help="TPxPP layouts, comma-separated (SmolLM2-135M: TP 1 or 3; 3x2 is 6 ranks)")
    p.add_argument("--targets", type=parse_targets, default=["width", "both"],
                   help=f"prune targets, comma-separated subset of {TARGETS}")
    p.add_argument("--repeats", type=int, default=2, help="surgery + save pairs per target")
    p.add_argument("--sample-ms", type=float, default=5.0, help="VmRSS sampling period")
    p.add_argument("--cores", type=int, default=0, help="cores to share among ranks (0: all usable)")
    p.add_argument("--hf-dir", default=None, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--workdir", default=None, help="where checkpoints are saved (default: a temp dir)")
    # internal: one torchrun rank
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ffn-multiple", type=int, default=1, help=argparse.SUPPRESS)
    return p


def prune_target(name: str, ffn_multiple: int = 1):
    """The PruneTarget of a named target, from the SmolLM2 recipes in conf/prune/, its FFN target
    rounded down to a multiple of `ffn_multiple` (megatron splits the FFN evenly over TP)."""
    import yaml

    from megatron_prune.prune.targets import recipe_from_dict

    def recipe(file: str):
        with open(os.path.join(REPO_ROOT, "conf", "prune", file), encoding="utf-8") as f:
            return recipe_from_dict(yaml.safe_load(f), where=file)

    if name in RECIPES:
        target = recipe(RECIPES[name]).target
    else:
        target, depth = recipe(RECIPES["width"]).target, recipe(RECIPES["depth"]).target
        target.num_layers, target.depth_metric = depth.num_layers, depth.depth_metric
    if target.ffn_hidden_size is not None:
        target.ffn_hidden_size -= target.ffn_hidden_size % ffn_multiple
    return target


def ffn_multiple(layouts: list[tuple[int, int]]) -> int:
    """One FFN multiple for all layouts of a run, so every layout prunes to the same shapes."""
    return math.lcm(*(tp for tp, _ in layouts))


# ------------------------------------------------------------------------------------------------
# pure helpers (unit-tested without a model)
# ------------------------------------------------------------------------------------------------
def gather_tp_bytes(shard_bytes: list[int], tp: int) -> int:
    """Bytes one rank sends to all-gather its shards of TP-partitioned tensors: each to tp-1 others."""
    return (tp - 1) * sum(shard_bytes)


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


def moved_layers(keep_layers: list[int], num_old: int, pp: int) -> list[tuple[int, int, int]]:
    """(new layer, source stage, destination stage) of every kept layer that changes stage."""
    num_new = len(keep_layers)
    out = []
    for new, old in enumerate(keep_layers):
        src, dst = stage_of(old, num_old, pp), stage_of(new, num_new, pp)
        if src != dst:
            out.append((new, src, dst))
    return out


def ratio(a: float, b: float):
    return round(a / b, 4) if b else None


# ------------------------------------------------------------------------------------------------
# worker: one rank of a torchrun job
# ------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give freed memory back to the OS so later allocations show up in RSS."""
    from megatron_prune.runtime.cpu import return_freed_host_memory

    gc.collect()
    return_freed_host_memory()


class RssWatch:
    """The highest RSS seen since the last `take()`: VmHWM (when resettable) and a sampling thread."""

    def __init__(self, period_s: float) -> None:
        self.period_s, self.samples = period_s, 0
        self._max, self._stop, self._thread = 0, threading.Event(), None
        self.hwm_ok = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            self.samples += 1
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssWatch":
        self._max = rss_bytes()
        self.hwm_ok = reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def take(self) -> dict:
        """Peak since the last take (or the start); resets both counters."""
        now = rss_bytes()
        sampled = max(self._max, now)
        hwm = hwm_bytes() if self.hwm_ok else 0
        self._max = now
        self.hwm_ok = reset_hwm()
        return {"peak": max(sampled, hwm), "sampled": sampled, "hwm": hwm, "rss": now}

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class WireCounter:
    """Bytes this rank hands to OTHER ranks while active: all_to_all_single splits for other ranks
    (`tp_bytes`; its split to itself, copied locally, in `self_bytes`), point-to-point sends
    (`pp_bytes`), and the input of any other collective over more than one rank (`other_bytes`: e.g.
    megatron's all-reduce that syncs the tied embedding between the first and last stage at build)."""

    # collective -> position of the tensor this rank contributes
    OTHER = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1,
             "reduce_scatter_tensor": 1}

    def __init__(self) -> None:
        self.tp_bytes = self.pp_bytes = self.other_bytes = self.self_bytes = self.calls = 0
        self.other_calls: dict[str, int] = {}

    def __enter__(self) -> "WireCounter":
        import torch.distributed as dist

        self._dist = dist
        self._saved = {n: getattr(dist, n) for n in ("all_to_all_single", "send", *self.OTHER)
                       if hasattr(dist, n)}
        real = dict(self._saved)

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                              group=None, async_op=False):
            me, size = dist.get_rank(group), dist.get_world_size(group)
            rows = input.shape[0] if input.dim() else 1
            splits = input_split_sizes or [rows // size] * size  # in units of input's dim 0
            row = input.numel() // rows if rows else 0  # elements per dim-0 slice
            itemsize = input.element_size()
            self.tp_bytes += sum(s for d, s in enumerate(splits) if d != me) * row * itemsize
            self.self_bytes += splits[me] * row * itemsize
            self.calls += 1
            return real["all_to_all_single"](output, input, output_split_sizes, input_split_sizes,
                                             group=group, async_op=async_op)

        def send(tensor, *args, **kwargs):
            self.pp_bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return real["send"](tensor, *args, **kwargs)

        def other(name: str, pos: int):
            def wrapped(*args, **kwargs):
                tensor = args[pos] if len(args) > pos else None
                if dist.get_world_size(kwargs.get("group")) > 1 and hasattr(tensor, "element_size"):
                    self.other_bytes += tensor.numel() * tensor.element_size()
                    self.other_calls[name] = self.other_calls.get(name, 0) + 1
                    self.calls += 1
                return real[name](*args, **kwargs)
            return wrapped

        dist.all_to_all_single, dist.send = all_to_all_single, send
        for name, pos in self.OTHER.items():
            if name in real:
                setattr(dist, name, other(name, pos))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(self._dist, name, fn)


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def gather_baseline(model, plan, groups) -> dict:
    """This rank's TP bytes under gather-and-reshard (see the module docstring), from the source
    model's shards (before surgery consumes them)."""
    from megatron_prune.models.shard import local_params

    tp = groups.tp_size
    every, kept_only = [], []
    kept = set(plan.keep_layers)
    for name, cname, p in local_params(model):
        if not getattr(p, "tensor_model_parallel", False) or tp == 1:
            continue
        b = p.numel() * p.element_size()
        every.append(b)
        parts = cname.split(".")
        if cname.startswith("decoder.layers.") and int(parts[2]) in kept:
            kept_only.append(b)
    return {"gather_tp": gather_tp_bytes(every, tp), "gather_min_tp": gather_tp_bytes(kept_only, tp)}


def gather_baseline_moves(base: dict, plan, groups, new_layer_bytes: int) -> dict:
    """`gather_baseline` plus the pruned layers this rank sends to another stage (either approach)."""
    moves = [m for m in moved_layers(plan.keep_layers, plan.source.num_layers, groups.pp_size)
             if m[1] == groups.pp_rank]
    return {**base, "stage_moves": len(moves) * new_layer_bytes, "layers_sent": len(moves)}


def tensor_peak(model, plan, groups) -> dict:
    """One `apply_plan` under torch's profiler with profile_memory: the live bytes of the tensors it
    allocates (every c10 CPU allocation and free, in time order), independent of glibc; the peak over
    the whole call, over the build and over the fill, and what is alive when the build returns."""
    from torch.profiler import ProfilerActivity, profile

    import megatron_prune.models.build as build_mod
    import megatron_prune.prune.surgery as surgery_mod

    real_build, real_release, window, released = build_mod.build_model, surgery_mod._release, {}, []

    def counted_release(param):
        # the profiler sees no free of a block allocated before it started (the source model's)
        released.append((time.time_ns(), -param.numel() * param.element_size()))
        real_release(param)

    def timed_build(*args, **kwargs):
        window["start"] = time.time_ns()
        out = real_build(*args, **kwargs)
        window["end"] = time.time_ns()
        return out

    trim_heap()
    build_mod.build_model, surgery_mod._release = timed_build, counted_release
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            new_model = surgery_mod.apply_plan(model, plan, groups)
    finally:
        build_mod.build_model, surgery_mod._release = real_build, real_release
    events = sorted([(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"] + released, key=lambda x: x[0])
    live = peak = build_peak = after_build = fill_peak = 0
    for t, n in events:
        live += n
        peak = max(peak, live)
        if t <= window.get("end", 0):
            build_peak, after_build = max(build_peak, live), live
        else:
            fill_peak = max(fill_peak, live)
    del new_model
    return {"peak": peak, "build_peak": build_peak, "after_build": after_build, "fill_peak": fill_peak,
            "end": live, "events": len(events)}


def surgery_run(model, plan, groups, sample_ms: float) -> tuple:
    """One `apply_plan` under the RSS watch and the wire counter: (pruned model, this rank's record)."""
    import torch.distributed as dist

    import megatron_prune.models.build as build_mod
    from megatron_prune.prune.surgery import CommStats, apply_plan

    real_build = build_mod.build_model
    trim_heap()
    dist.barrier()
    before = rss_bytes()
    phases, comm = {}, CommStats()
    with RssWatch(sample_ms / 1000.0) as watch, WireCounter() as wire:
        def timed_build(*args, **kwargs):
            phases["pre_build"] = watch.take()
            t = time.perf_counter()
            out = real_build(*args, **kwargs)
            phases["build_s"] = time.perf_counter() - t
            phases["build"] = watch.take()
            return out

        build_mod.build_model = timed_build
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            new_model = apply_plan(model, plan, groups, comm)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            build_mod.build_model = real_build
        fill = watch.take()
    if "build" not in phases:
        raise RuntimeError("apply_plan no longer calls megatron_prune.models.build.build_model; update "
                           "the build/fill split in bench/surgery.py")
    build_peak = max(phases["pre_build"]["peak"], phases["build"]["peak"])
    return new_model, {
        "surgery_s_rank": wall, "surgery_cpu_s_rank": cpu, "build_s_rank": phases["build_s"],
        "rss_before": before, "rss_after": rss_bytes(), "peak_extra": max(build_peak, fill["peak"]) - before,
        "build_peak_extra": build_peak - before, "fill_peak_extra": fill["peak"] - before,
        "after_build_extra": phases["build"]["rss"] - before,
        "hwm_used": bool(phases["build"]["hwm"] and fill["hwm"]), "rss_samples": watch.samples,
        "comm_tp": comm.tp_bytes, "comm_pp": comm.pp_bytes, "wire_tp": wire.tp_bytes,
        "wire_pp": wire.pp_bytes, "wire_other": wire.other_bytes, "wire_self": wire.self_bytes,
        "wire_calls": wire.calls, "new_bytes": param_bytes(new_model.parameters()),
        "new_layer_bytes": param_bytes(new_model.decoder.layers[0].parameters())}


def worker(a) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    from megatron_prune.checkpoint import save_checkpoint
    from megatron_prune.config import ParallelConfig
    from megatron_prune.convert.hf_io import read_hf_checkpoint
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.prune.plan import make_plan, random_scores
    from megatron_prune.runtime import init_runtime, shutdown

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    groups = init_runtime(ParallelConfig(tp=a.worker_tp, pp=a.worker_pp))
    try:
        def source_model():
            """A fresh source model: surgery consumes the one it prunes (frees its tensors)."""
            cfg, _, state = read_hf_checkpoint(a.hf_dir)
            model = build_model(cfg, groups)
            load_full_state(model, state.__getitem__, groups)
            return cfg, model

        cfg, model = source_model()
        model_bytes = param_bytes(model.parameters())

        def reduced(value: float, op) -> float:
            t = torch.tensor([value], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            return float(t[0])

        plans, baselines = {}, {}
        for tname in a.targets:
            target = prune_target(tname, a.ffn_multiple)
            drop = cfg.num_layers - (target.num_layers or cfg.num_layers)
            plans[tname] = make_plan(cfg, random_scores(cfg, SEED, block_size=drop or None), target,
                                     tp=groups.tp_size, pp=groups.pp_size)
            baselines[tname] = gather_baseline(model, plans[tname], groups)  # before anything is consumed
        runs = {t: [] for t in a.targets}
        tensors = {}
        # warm-up pair, not recorded: a process's first save also starts megatron's writer machinery
        first = next(iter(plans.values()))
        new_model, _ = surgery_run(model, first, groups, a.sample_ms)
        save_checkpoint(new_model, first.target, os.path.join(a.workdir, f"warmup-{groups.layout}"), groups,
                        provenance={"stage": "bench-surgery-warmup"})
        if groups.is_rank0:
            shutil.rmtree(os.path.join(a.workdir, f"warmup-{groups.layout}"), ignore_errors=True)
        del new_model, model
        for tname, plan in plans.items():
            tensors[tname] = tensor_peak(source_model()[1], plan, groups)  # deterministic: once
            for rep in range(a.repeats):
                new_model, rec = surgery_run(source_model()[1], plan, groups, a.sample_ms)
                rec["surgery_s"] = reduced(rec["surgery_s_rank"], dist.ReduceOp.MAX)
                rec["surgery_cpu_s"] = reduced(rec["surgery_cpu_s_rank"], dist.ReduceOp.SUM)
                rec["build_s"] = reduced(rec["build_s_rank"], dist.ReduceOp.MAX)
                out_dir = os.path.join(a.workdir, f"{layout_name(groups.tp_size, groups.pp_size)}-{tname}-{rep}")
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                save_checkpoint(new_model, plan.target, out_dir, groups,
                                provenance={"stage": "bench-surgery", "target": tname})
                rec["save_s"] = reduced(time.perf_counter() - t0, dist.ReduceOp.MAX)
                # this process only, not megatron's helper processes
                rec["save_cpu_s"] = reduced(time.process_time() - c0, dist.ReduceOp.SUM)
                rec["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, f))
                                              for d, _, fs in os.walk(out_dir) for f in fs) if groups.is_rank0 else 0
                dist.barrier()
                if groups.is_rank0:
                    shutil.rmtree(out_dir, ignore_errors=True)
                del new_model
                runs[tname].append(rec)

        results = {}
        for tname, plan in plans.items():
            base = gather_baseline_moves(baselines[tname], plan, groups, runs[tname][0]["new_layer_bytes"])
            mine = {"rank": groups.rank, "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank,
                    "model_bytes": model_bytes, "runs": runs[tname], "tensors": tensors[tname], **base}
            per_rank = [None] * groups.world_size
            dist.all_gather_object(per_rank, mine)
            results[tname] = {"per_rank": per_rank, "parameters": dict(plan.parameters),
                              "target_config": {k: getattr(plan.target, k) for k in
                                                ("num_layers", "hidden_size", "ffn_hidden_size",
                                                 "num_attention_heads", "num_query_groups")}}
        if groups.is_rank0:
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"tp": groups.tp_size, "pp": groups.pp_size, "world_size": groups.world_size,
                           "threads_per_rank": torch.get_num_threads(),
                           "targets": results}, f)
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------
# parent: one torchrun job per layout, then the table and the JSON line
# ------------------------------------------------------------------------------------------------
def run_layout(a, tp: int, pp: int, cores: int, workdir: str) -> dict:
    name = layout_name(tp, pp)
    return run_worker_job(__file__, tp * pp, [
        f"--worker-tp={tp}", f"--worker-pp={pp}", f"--hf-dir={a.hf_dir}", f"--workdir={workdir}",
        f"--targets={','.join(a.targets)}", f"--repeats={a.repeats}", f"--sample-ms={a.sample_ms}",
        f"--ffn-multiple={a.ffn_multiple}"], os.path.join(workdir, f"{name}.json"), cores, name)


def is_noisy(loadavg: list[float], cores: int, ranks: int, runs_s: list[list[float]]) -> bool:
    """Other jobs shared the cores (1-minute load above the cores before the job, or above its ranks
    + the cores after it), or repeats of one kind differ by more than NOISY_SPREAD."""
    before, after = loadavg
    busy = before > cores + 0.5 or after > max(cores, ranks) + cores
    spread = max((max(v) / min(v) for v in runs_s if v and min(v) > 0), default=1.0)
    return busy or spread > NOISY_SPREAD


def _memory(runs: list[dict], m: int) -> dict:
    """The worst repeat's RSS peak (and its phases) over the model bytes m."""
    worst = max(runs, key=lambda x: x["peak_extra"])
    return {"peak_over_model": ratio(m + worst["peak_extra"], m),
            "extra_over_model": ratio(worst["peak_extra"], m),
            "build_extra_over_model": ratio(worst["build_peak_extra"], m),
            "after_build_extra_over_model": ratio(worst["after_build_extra"], m),
            "fill_extra_over_model": ratio(worst["fill_peak_extra"], m),
            "retained_extra_over_model": ratio(worst["rss_after"] - worst["rss_before"], m),
            "peak_extra_bytes": worst["peak_extra"], "peak_extra_runs": [x["peak_extra"] for x in runs],
            "hwm_used": all(x["hwm_used"] for x in runs), "rss_samples": min(x["rss_samples"] for x in runs)}


def summarize_target(t: dict, loadavg: list[float], cores: int) -> dict:
    """Per-rank figures (RSS: the worst repeat of each rank; tensors: the profiled run), the worst
    rank, and the bytes and times."""
    ranks = []
    for r in t["per_rank"]:
        m, runs, ten = r["model_bytes"], r["runs"], r["tensors"]
        run0 = runs[0]
        gather = r["gather_tp"] + r["stage_moves"]
        ranks.append({
            "rank": r["rank"], "tp_rank": r["tp_rank"], "pp_rank": r["pp_rank"], "model_bytes": m,
            "new_over_model": ratio(run0["new_bytes"], m), **_memory(runs, m),
            "tensor_peak_over_model": ratio(m + ten["peak"], m),
            "tensor_build_extra_over_model": ratio(ten["build_peak"], m),
            "tensor_after_build_over_model": ratio(ten["after_build"], m),
            "tensor_fill_transient_over_model": ratio(max(0, ten["fill_peak"] - ten["after_build"]), m),
            "wire_bytes": run0["wire_tp"] + run0["wire_pp"] + run0["wire_other"],
            "wire_tp_bytes": run0["wire_tp"], "wire_pp_bytes": run0["wire_pp"],
            "wire_build_bytes": run0["wire_other"], "kept_local_bytes": run0["wire_self"],
            "comm_bytes": run0["comm_tp"] + run0["comm_pp"], "comm_tp_bytes": run0["comm_tp"],
            "comm_pp_bytes": run0["comm_pp"],
            "gather_bytes": gather, "gather_min_bytes": r["gather_min_tp"] + r["stage_moves"],
            "stage_move_bytes": r["stage_moves"], "layers_sent": r["layers_sent"],
            "pp_matches_analytic": run0["wire_pp"] == r["stage_moves"] == run0["comm_pp"],
        })
    worst = max(ranks, key=lambda x: x["peak_over_model"])
    worst_tensor = max(ranks, key=lambda x: x["tensor_peak_over_model"])
    runs = t["per_rank"][0]["runs"]
    surgery, save = min(x["surgery_s"] for x in runs), min(x["save_s"] for x in runs)
    surgery_cpu, save_cpu = min(x["surgery_cpu_s"] for x in runs), min(x["save_cpu_s"] for x in runs)
    runs_s = [[x["surgery_s"] for x in runs], [x["save_s"] for x in runs]]
    surgery_wire = max(x["wire_tp_bytes"] + x["wire_pp_bytes"] for x in ranks)
    gather = max(x["gather_bytes"] for x in ranks)
    gather_min = max(x["gather_min_bytes"] for x in ranks)
    return {
        "peak_over_model": worst["peak_over_model"], "goal_met": worst["peak_over_model"] <= GOAL,
        "worst_rank": worst["rank"], "extra_over_model": worst["extra_over_model"],
        "new_over_model": worst["new_over_model"],
        "build_extra_over_model": worst["build_extra_over_model"],
        "fill_extra_over_model": worst["fill_extra_over_model"],
        "tensor_peak_over_model": worst_tensor["tensor_peak_over_model"],
        "tensor_worst_rank": worst_tensor["rank"],
        "tensor_build_extra_over_model": worst_tensor["tensor_build_extra_over_model"],
        "tensor_fill_transient_over_model": worst_tensor["tensor_fill_transient_over_model"],
        "wire_bytes_per_rank": max(x["wire_bytes"] for x in ranks),
        "wire_surgery_bytes_per_rank": surgery_wire,
        "wire_build_bytes_per_rank": max(x["wire_build_bytes"] for x in ranks),
        "comm_bytes_per_rank": max(x["comm_bytes"] for x in ranks),
        "gather_bytes_per_rank": gather, "gather_min_bytes_per_rank": gather_min,
        # against the surgery's own transfers: the build sync (wire_build) is paid by any approach
        # that builds the pruned model through megatron at PP > 1
        "gather_over_wire": ratio(gather, surgery_wire), "gather_min_over_wire": ratio(gather_min, surgery_wire),
        "surgery_s": round(surgery, 3), "save_s": round(save, 3), "surgery_over_save": ratio(surgery, save),
        "build_s": round(min(x["build_s"] for x in runs), 3),
        "noisy": is_noisy(loadavg, cores, len(ranks), runs_s), "loadavg_1min": loadavg,
        "surgery_cpu_s": round(surgery_cpu, 3), "save_cpu_s": round(save_cpu, 3),
        "surgery_over_save_cpu": ratio(surgery_cpu, save_cpu),
        "surgery_runs_s": [round(x["surgery_s"], 3) for x in runs],
        "save_runs_s": [round(x["save_s"], 3) for x in runs],
        "checkpoint_bytes": runs[0]["checkpoint_bytes"],
        "parameters": t["parameters"], "target_config": t["target_config"], "per_rank": ranks,
    }


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    from megatron_prune.convert.hf_io import model_config_from_hf_dir
    from megatron_prune.models.build import check_divisibility
    from megatron_prune.prune.targets import target_config

    a.hf_dir = smollm2_dir(a.hf_dir)
    if a.repeats < 1:
        raise SystemExit(f"--repeats={a.repeats} must be >= 1")
    cfg = model_config_from_hf_dir(a.hf_dir)
    a.ffn_multiple = ffn_multiple(a.layouts)
    for tp, pp in a.layouts:  # clear errors before any job starts
        check_divisibility(cfg, tp, pp)
        for tname in a.targets:
            target_config(cfg, prune_target(tname, a.ffn_multiple), tp=tp, pp=pp)
    adjusted = {}
    for t in a.targets:
        asked, used = prune_target(t).ffn_hidden_size, prune_target(t, a.ffn_multiple).ffn_hidden_size
        if asked != used:
            adjusted[t] = f"ffn_hidden_size {asked} -> {used} (a multiple of TP {a.ffn_multiple})"
    cores = a.cores or cpu_cores()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_surgery_", dir=a.workdir) as workdir:
        for tp, pp in a.layouts:
            results[(tp, pp)] = run_layout(a, tp, pp, cores, workdir)
    summary = {layout_name(tp, pp): {tn: summarize_target(t, r["loadavg_1min"], cores)
                                     for tn, t in r["targets"].items()}
               for (tp, pp), r in results.items()}

    mib = 1 << 20
    print(f"SmolLM2-135M prune surgery (random scores, seed {SEED}), {cores} cores, worst rank; memory: "
          f"worst of {a.repeats} repeats; times: min of {a.repeats} surgery/save pairs after a warm-up pair")
    print(f"  {'layout':8s} {'target':6s} {'ranks':>5s} {'peak/model':>10s} {'tensors':>7s} {'new':>5s} "
          f"{'build+':>6s} {'fill+':>6s} {'wire MiB':>8s} {'+build':>6s} {'gather MiB':>10s} {'min MiB':>8s} "
          f"{'surgery s':>9s} {'build s':>7s} {'save s':>7s} {'surg/save':>9s} {'cpu':>6s}")
    for lname, per_target in summary.items():
        for tn, s in per_target.items():
            ranks = len(s["per_rank"])
            flag = "" if s["goal_met"] else " !"
            print(f"  {lname:8s} {tn:6s} {ranks:5d} {s['peak_over_model']:10.3f}{flag:2s} "
                  f"{s['tensor_peak_over_model']:6.3f} {s['new_over_model']:5.3f} "
                  f"{s['build_extra_over_model']:6.3f} {s['fill_extra_over_model']:6.3f} "
                  f"{s['wire_surgery_bytes_per_rank'] / mib:8.1f} {s['wire_build_bytes_per_rank'] / mib:6.1f} "
                  f"{s['gather_bytes_per_rank'] / mib:10.1f} {s['gather_min_bytes_per_rank'] / mib:8.1f} "
                  f"{s['surgery_s']:9.2f} {s['build_s']:7.2f} {s['save_s']:7.2f} {s['surgery_over_save']:9.3f}"
                  f"{'?' if s['noisy'] else ' '}{s['surgery_over_save_cpu']:6.3f}")
    print(f"  peak/model = (model + peak extra RSS during apply_plan) / model bytes on the rank, goal <= {GOAL} "
          "(! = missed); tensors = the same from the tensors apply_plan allocates and frees (torch profiler + "
          "released source tensors); new = the pruned model's bytes / model bytes; build+ / fill+ = peak "
          "extra RSS while megatron builds the (empty) pruned model / while it is filled, over model bytes")
    print("  wire = bytes a rank sends to other ranks (+build: any collective while building the pruned model; "
          "0 since it is built empty); gather = all-gather every TP-partitioned weight (+ stage moves); min = only the tensors "
          "that need re-partitioning (+ stage moves)")
    print("  surg/save = apply_plan / save_checkpoint wall time (build s: its megatron build; ? = noisy: other "
          "jobs shared the cores or repeats differ > 25%); cpu = the same ratio on the main processes' CPU time")
    worst = max((s["peak_over_model"] for t in summary.values() for s in t.values()))
    worst_tensor = max((s["tensor_peak_over_model"] for t in summary.values() for s in t.values()))
    note = NOTE
    out = {"bench": "surgery", "model": "SmolLM2-135M-Instruct", "goal_peak_over_model": GOAL,
           "peak_over_model_max": worst, "tensor_peak_over_model_max": worst_tensor, "goal_met": worst <= GOAL,
           "repeats": a.repeats, "cores": cores, "targets": a.targets, "target_adjusted": adjusted,
           **summary, "note": note}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
