"""Cost of the sharded KL (distill/kl.py) against the naive one: peak tensor memory, time, bytes.

    python bench/kl.py [--vocab 49152 --tokens 2048 --repeats 3 --layouts 1,2 --chunk-tokens N]

Per TP layout (one torchrun job of --layouts ranks, gloo, the world as the TP group; ranks get
max(1, cores // ranks) threads) it runs side by side, in one process, the distillation loss's forward
and backward to the student logits, masked mean over tokens, on T x V float32 logits:
  naive  all_gather the student and teacher shards to the full vocabulary [T, V] (megatron's
         gather along the last dimension; differentiable: backward keeps this rank's slice; no
         gather at TP1), F.log_softmax both, F.kl_div(log_target=True, reduction='none').sum(-1);
  ours   vocab_parallel_kl(student_shard, teacher_shard, tp_group=..., backend="torch"): chunked
         over tokens, only per-token scalars cross the group.
Inputs: every rank holds the contiguous shard [T, V/tp] of the same seeded full logits (student and
teacher independent, N(0, LOGIT_STD^2)); the student requires grad, the teacher does not; a seeded
token mask drops about PAD_FRACTION of the tokens (the padding a loss mask removes).

Per implementation and layout:
  peak    tensor bytes live above the inputs during one forward+backward, the gradient included
          (it is returned, as any trainer keeps it): torch.profiler(profile_memory=True), every c10
          allocation and free in time order (bench/_common.tensor_peak); the worst rank; also over
          one shard's bytes ([T, V/tp] fp32: the gradient alone is one shard, the floor of any
          implementation that materialises the gradient);
  time    median of --repeats forward+backward runs (the slowest rank's wall time each), naive and
          ours interleaved, after one warm-up run of each (the run that checks correctness);
  bytes   what one rank hands to collectives per token (CommCounter, `comm=`: ours counts its three
          all-reduces, the naive gather its two shards); 0 at TP1, a world of one;
  diff    max |ours - naive| / max |naive| of the per-token KL and of the student gradient (the
          worst rank): both are float32, so ~1e-6 is agreement.
Ratios ours / naive of peak memory (the goal: <= GOAL_PEAK_RATIO at every layout) and of time.

distill_step_over_ce_step: one more torchrun job (TP1, one rank) times whole training steps of the
library (train.optim.make_trainable, train.step.run_schedule, the optimizer and scheduler steps, as
train/loop.py runs them) on the real shapes with random weights: the SmolLM2-135M teacher
(conf/model/smollm2-135m.yaml) and its default width-pruned student (conf/prune/smollm2-135m.yaml:
hidden 384, FFN 1024), STEP_MICRO_BATCHES micro-batches of STEP_MICRO_BATCH x STEP_SEQ_LENGTH random
tokens. distill = a DistillPair step (student forward+backward, teacher forward, the KL of
distill_forward); ce = the same student's LM cross-entropy step (lm_forward). Median of
--step-repeats steps each, interleaved, after one warm-up step of each; ratio = distill / ce of the
wall times, cpu_ratio the same of the process's CPU time (all its threads), which other jobs sharing
the cores disturb less than the wall time.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

# measure this source tree, not whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import REPO_ROOT, cpu_cores, run_worker_job, tensor_peak, threads_per_rank  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed import ProcessGroup  # noqa: E402

from megatron_prune.distill.kl import CHUNK_TEMP_BYTES, vocab_parallel_kl  # noqa: E402

GOAL_PEAK_RATIO = 0.5  # ours / naive peak tensor memory, at every layout
IMPLS = ("naive", "ours")
SEED = 0
LOGIT_STD = 2.0  # about the spread of a small LM's logits; memory and time do not depend on it
PAD_FRACTION = 0.125
MIB = 1 << 20
# naive's live [T, V] fp32 tensors at its peak (log-softmaxes, exp, difference, product, the full
# gradient), plus the gather buffer at TP > 1: an upper bound used only to refuse sizes that would not
# fit in memory before a job starts
NAIVE_FULL_TENSORS = 8
# the training-step comparison (distill_step_over_ce_step)
STEP_SEQ_LENGTH = 128
STEP_MICRO_BATCH = 2
STEP_MICRO_BATCHES = 2


def parse_layouts(text: str) -> list[int]:
    """"1,2" -> [1, 2]: TP sizes, each a torchrun job of that many ranks."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(tp < 1 for tp in out):
        raise argparse.ArgumentTypeError(f"--layouts {text!r}: give TP sizes >= 1, comma-separated, e.g. 1,2")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary V (SmolLM2's: 49152)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens T (e.g. s * b)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median)")
    p.add_argument("--layouts", type=parse_layouts, default=[1, 2], help="TP sizes, comma-separated")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="ours' tokens per chunk (default: the library's, ~64 MiB per [chunk, V/tp])")
    p.add_argument("--cores", type=int, default=0, help="cores to share among ranks (0: all usable)")
    p.add_argument("--step-repeats", type=int, default=3,
                   help="timed training steps of distillation and of cross-entropy (median; 0: skip)")
    # internal: one torchrun rank
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def check_args(a: argparse.Namespace) -> None:
    """Clear errors before any job starts."""
    for name in ("vocab", "tokens", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name}={getattr(a, name)} must be >= 1")
    if a.chunk_tokens is not None and a.chunk_tokens < 1:
        raise SystemExit(f"--chunk-tokens={a.chunk_tokens} must be >= 1 (or left out)")
    if a.step_repeats < 0:
        raise SystemExit(f"--step-repeats={a.step_repeats} must be >= 0 (0 skips the training-step timing)")
    for tp in a.layouts:
        if a.vocab % tp:
            raise SystemExit(f"--vocab={a.vocab} is not divisible by TP {tp}: each rank holds V/tp. "
                             "Fix: pick a vocabulary that every TP in --layouts divides.")


# ------------------------------------------------------------------------------------------------
# pure pieces (unit-tested in one process)
# ------------------------------------------------------------------------------------------------
def _group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _GatherVocab(torch.autograd.Function):
    """[T, V/tp] shard -> [T, V] on every rank: all_gather, then the shards side by side (what
    megatron's gather_from_tensor_model_parallel_region does along the last dimension).

    Backward keeps this rank's slice of the gradient and sends nothing: the loss after the gather is
    computed identically on every rank, so each rank already holds the whole gradient of the full
    logits (a reduce-scatter, as torch.distributed.nn.all_gather does, would count it tp times)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        tp, vl = dist.get_world_size(group), x.shape[-1]
        buf = torch.empty((tp * x.shape[0], vl), dtype=x.dtype, device=x.device)  # [tp * T, V/tp]
        dist.all_gather_into_tensor(buf, x.contiguous(), group=group)
        ctx.lo, ctx.vl = dist.get_rank(group) * vl, vl
        return torch.cat(buf.view(tp, *x.shape).unbind(0), dim=-1)  # [T, V]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.lo:ctx.lo + ctx.vl].contiguous(), None  # [T, V/tp]


def gather_vocab(x: torch.Tensor, group: Optional[ProcessGroup], comm=None) -> torch.Tensor:
    """[T, V/tp] -> [T, V]; `x` itself for a group of one. `comm` counts the shard this rank sends."""
    if _group_size(group) == 1:
        return x
    if comm is not None:
        comm.add("tp", x)
    return _GatherVocab.apply(x, group)


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, *, tp_group: Optional[ProcessGroup],
             chunk_tokens: Optional[int] = None, comm=None) -> torch.Tensor:
    """Per-token KL(p_T || p_S) [T] on the gathered full vocabulary, the textbook way. `chunk_tokens`
    is ignored (the naive version has no chunks); it is here so both implementations take the same
    arguments."""
    t = gather_vocab(teacher.detach(), tp_group, comm)  # [T, V]
    s = gather_vocab(student, tp_group, comm)  # [T, V]
    log_p_t = F.log_softmax(t, dim=-1)  # [T, V]
    log_p_s = F.log_softmax(s, dim=-1)  # [T, V], saved for backward
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)  # [T]


def ours_kl(student: torch.Tensor, teacher: torch.Tensor, *, tp_group: Optional[ProcessGroup],
            chunk_tokens: Optional[int] = None, comm=None) -> torch.Tensor:
    """Per-token KL(p_T || p_S) [T] from the shards, megatron_prune.distill.kl's PyTorch path."""
    return vocab_parallel_kl(student, teacher, tp_group=tp_group, chunk_tokens=chunk_tokens, comm=comm,
                             backend="torch")


KL_FNS = {"naive": naive_kl, "ours": ours_kl}


def make_inputs(tokens: int, vocab: int, tp: int, rank: int,
                seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (student [T, V/tp] requiring grad, teacher [T, V/tp], token mask [T] float): the
    contiguous vocabulary shards of the same seeded full logits on every rank, and the same mask."""
    g = torch.Generator().manual_seed(seed)
    vl = vocab // tp
    shards = []
    for _ in range(2):  # student, then teacher: one full tensor alive at a time
        full = torch.randn(tokens, vocab, generator=g).mul_(LOGIT_STD)  # [T, V]
        shards.append(full[:, rank * vl:(rank + 1) * vl].clone())  # [T, V/tp]
        del full
    mask = torch.rand(tokens, generator=g) >= PAD_FRACTION  # [T]
    mask[0] = True  # never an all-padding batch (the mean would divide by 0)
    return shards[0].requires_grad_(), shards[1], mask.float()


def masked_mean(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the per-token KL [T] over the kept tokens (mask [T] of 0/1) -> []."""
    return (kl * mask).sum() / mask.sum()


def forward_backward(impl: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                     tp_group: Optional[ProcessGroup], chunk_tokens: Optional[int] = None,
                     comm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL [T], gradient of the masked mean w.r.t. the student shard [T, V/tp]) of `impl`.
    The gradient is returned rather than accumulated into .grad so that repeated runs start alike."""
    kl = KL_FNS[impl](student, teacher, tp_group=tp_group, chunk_tokens=chunk_tokens, comm=comm)  # [T]
    (grad,) = torch.autograd.grad(masked_mean(kl, mask), student)  # [T, V/tp]
    return kl.detach(), grad


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (relative to the scale of b, so near-zero entries of a
    gradient do not blow it up); 0 when both are all zero."""
    scale = float(b.double().abs().max())
    err = float((a.double() - b.double()).abs().max())
    return err / scale if scale else err


def default_chunk_tokens(vocab_local: int) -> int:
    """The chunk vocab_parallel_kl picks for float32 shards of `vocab_local` when not given one."""
    return max(1, CHUNK_TEMP_BYTES // (4 * vocab_local))


def ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 4) if b else None


def naive_job_bytes(tokens: int, vocab: int, tp: int) -> int:
    """An upper bound of a job's tensor memory, all ranks: inputs (two shards per rank, both
    together the full logits twice) and naive's full-vocabulary temporaries on every rank."""
    return 4 * tokens * vocab * (2 + NAIVE_FULL_TENSORS * tp)


# ------------------------------------------------------------------------------------------------
# worker: one rank of a torchrun job
# ------------------------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    from megatron_prune.importance import CommCounter

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    try:
        tp, rank = dist.get_world_size(), dist.get_rank()
        group = dist.group.WORLD
        student, teacher, mask = make_inputs(a.tokens, a.vocab, tp, rank)
        kw = {"tp_group": group, "chunk_tokens": a.chunk_tokens}

        # warm-up, correctness and bytes: one counted, untimed run of each
        comm, kl, grad = {}, {}, {}
        for impl in IMPLS:
            comm[impl] = CommCounter()
            kl[impl], grad[impl] = forward_backward(impl, student, teacher, mask, comm=comm[impl], **kw)
        diff_kl, diff_grad = max_rel_diff(kl["ours"], kl["naive"]), max_rel_diff(grad["ours"], grad["naive"])
        del kl, grad

        peak = {}
        for impl in IMPLS:
            gc.collect()
            dist.barrier()
            out, peak[impl], _ = tensor_peak(lambda: forward_backward(impl, student, teacher, mask, **kw))
            del out

        def timed(impl: str) -> float:
            """The slowest rank's wall time of one forward+backward."""
            dist.barrier()
            t0 = time.perf_counter()
            out = forward_backward(impl, student, teacher, mask, **kw)
            wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            del out
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            return float(wall[0])

        runs = {impl: [] for impl in IMPLS}
        for _ in range(a.repeats):
            for impl in IMPLS:  # interleaved: a drift in machine load hits both alike
                runs[impl].append(timed(impl))

        mine = {"rank": rank, "peak_bytes": peak,
                "comm_bytes": {k: c.bytes_sent for k, c in comm.items()},
                "collectives": {k: c.collectives for k, c in comm.items()},
                "max_rel_diff_kl": diff_kl, "max_rel_diff_grad": diff_grad}
        per_rank = [None] * tp
        dist.all_gather_object(per_rank, mine)
        if rank == 0:
            vl = a.vocab // tp
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"tp": tp, "threads_per_rank": torch.get_num_threads(), "tokens": a.tokens,
                           "vocab": a.vocab, "vocab_local": vl, "kept_tokens": int(mask.sum()),
                           "chunk_tokens": a.chunk_tokens or default_chunk_tokens(vl),
                           "shard_bytes": student.numel() * student.element_size(),
                           "runs_s": runs, "per_rank": per_rank}, f)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# step worker: a distillation training step vs a cross-entropy one (TP1, one rank)
# ------------------------------------------------------------------------------------------------
def _conf_yaml(name: str) -> dict:
    import yaml

    with open(os.path.join(REPO_ROOT, "conf", name), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data.pop("defaults", None)
    return data


def step_models():
    """(teacher, student) ModelConfigs: SmolLM2-135M and the prune group's default target."""
    import dataclasses

    from megatron_prune.config import ModelConfig

    teacher = ModelConfig.from_dict(_conf_yaml("model/smollm2-135m.yaml"))
    target = {k: v for k, v in _conf_yaml("prune/smollm2-135m.yaml")["target"].items()
              if k in {f.name for f in dataclasses.fields(ModelConfig)} and v is not None}
    return teacher, dataclasses.replace(teacher, name=f"{teacher.name}-pruned", **target).validate()


def step_batches(vocab: int, seed: int = SEED) -> list:
    """STEP_MICRO_BATCHES micro-batches of random tokens [STEP_MICRO_BATCH, STEP_SEQ_LENGTH]."""
    from megatron_prune.models.forward import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEP_MICRO_BATCHES):
        ids = torch.randint(0, vocab, (STEP_MICRO_BATCH, STEP_SEQ_LENGTH + 1), generator=g)  # [b, s + 1]
        out.append(Batch(tokens=ids[:, :-1].contiguous(), labels=ids[:, 1:].contiguous(),
                         loss_mask=torch.ones(STEP_MICRO_BATCH, STEP_SEQ_LENGTH)))
    return out


def step_worker(a: argparse.Namespace) -> None:
    from megatron_prune.config import ParallelConfig
    from megatron_prune.distill.pair import DISTILL_METRICS, DistillPair, distill_forward
    from megatron_prune.models.build import build_model
    from megatron_prune.runtime import init_runtime, shutdown
    from megatron_prune.train.optim import make_trainable
    from megatron_prune.train.settings import TrainSettings
    from megatron_prune.train.step import LM_METRICS, lm_forward, run_schedule

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    groups = init_runtime(ParallelConfig(tp=1, pp=1))
    try:
        tcfg, scfg = step_models()
        settings = TrainSettings(steps=1000, global_batch_size=STEP_MICRO_BATCH * STEP_MICRO_BATCHES,
                                 micro_batch_size=STEP_MICRO_BATCH, seq_length=STEP_SEQ_LENGTH)
        teacher = build_model(tcfg, groups)
        student = build_model(scfg, groups)
        # one student, optimizer and scheduler for both kinds of step: the same weights and state sizes
        ddp, optimizer, scheduler = make_trainable(student, settings)
        pair = DistillPair(ddp, teacher, groups)
        kinds = {"distill": (pair, distill_forward(groups), DISTILL_METRICS),
                 "ce": (ddp, lm_forward, LM_METRICS)}
        batches = step_batches(scfg.vocab_size)

        def timed(kind: str) -> tuple[float, float]:
            """(wall time, CPU time) of one training step, as train/loop.py runs it."""
            chunk, forward, names = kinds[kind]
            chunk.train()
            t0, c0 = time.perf_counter(), time.process_time()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            sums = run_schedule(chunk, groups, batches, forward, names, forward_only=False)
            optimizer.step()
            scheduler.step(increment=1)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert sums["tokens"] == STEP_MICRO_BATCHES * STEP_MICRO_BATCH * STEP_SEQ_LENGTH, sums
            return wall, cpu

        warm = {kind: timed(kind)[0] for kind in kinds}
        runs, cpu = {kind: [] for kind in kinds}, {kind: [] for kind in kinds}
        for _ in range(a.step_repeats):
            for kind in kinds:  # interleaved: a drift in machine load hits both alike
                w, c = timed(kind)
                runs[kind].append(w)
                cpu[kind].append(c)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"threads": torch.get_num_threads(), "warmup_s": warm, "runs_s": runs,
                       "cpu_s": cpu, "teacher": tcfg.to_dict(), "student": scfg.to_dict()}, f)
    finally:
        shutdown()


def run_step_job(a: argparse.Namespace, cores: int, workdir: str) -> dict:
    return run_worker_job(__file__, 1, ["--step-worker", f"--step-repeats={a.step_repeats}"],
                          os.path.join(workdir, "step.json"), cores, "training step")


def summarize_steps(r: dict) -> dict:
    """A step worker's result -> median seconds per distillation / cross-entropy step and their ratio
    (wall time), and the same of the CPU time."""
    med = {key: {k: statistics.median(v) for k, v in r[key].items()} for key in ("runs_s", "cpu_s")}
    distill_s, ce_s = med["runs_s"]["distill"], med["runs_s"]["ce"]
    t, s = r["teacher"], r["student"]
    return {"distill_s": round(distill_s, 3), "ce_s": round(ce_s, 3), "ratio": ratio(distill_s, ce_s),
            "cpu_distill_s": round(med["cpu_s"]["distill"], 3), "cpu_ce_s": round(med["cpu_s"]["ce"], 3),
            "cpu_ratio": ratio(med["cpu_s"]["distill"], med["cpu_s"]["ce"]),
            "runs_s": {k: [round(x, 3) for x in v] for k, v in r["runs_s"].items()},
            "tokens_per_step": STEP_MICRO_BATCHES * STEP_MICRO_BATCH * STEP_SEQ_LENGTH,
            "micro_batches": STEP_MICRO_BATCHES, "micro_batch_size": STEP_MICRO_BATCH,
            "seq_length": STEP_SEQ_LENGTH, "threads": r["threads"],
            "teacher": f"{t['name']} h{t['hidden_size']} ffn{t['ffn_hidden_size']} L{t['num_layers']}",
            "student": f"h{s['hidden_size']} ffn{s['ffn_hidden_size']} L{s['num_layers']}",
            "job_s": r.get("job_s"), "loadavg_1min": r.get("loadavg_1min")}


# ------------------------------------------------------------------------------------------------
# parent: one torchrun job per layout, then the table and the JSON line
# ------------------------------------------------------------------------------------------------
def run_layout(a: argparse.Namespace, tp: int, cores: int, workdir: str) -> dict:
    args = [f"--vocab={a.vocab}", f"--tokens={a.tokens}", f"--repeats={a.repeats}"]
    if a.chunk_tokens is not None:
        args.append(f"--chunk-tokens={a.chunk_tokens}")
    return run_worker_job(__file__, tp, args, os.path.join(workdir, f"tp{tp}.json"), cores, f"TP{tp}")


def summarize_layout(r: dict) -> dict:
    """A worker's result -> the layout's figures: per implementation the worst rank's peak, the
    median time, bytes per token; ours / naive ratios; the worst rank's correctness check."""
    per_rank, shard, tokens = r["per_rank"], r["shard_bytes"], r["tokens"]
    impls = {}
    for impl in IMPLS:
        peak = max(p["peak_bytes"][impl] for p in per_rank)
        sent = max(p["comm_bytes"][impl] for p in per_rank)
        runs = r["runs_s"][impl]
        impls[impl] = {"peak_bytes": peak, "peak_mib": round(peak / MIB, 1),
                       "peak_over_shard": ratio(peak, shard), "time_s": round(statistics.median(runs), 3),
                       "runs_s": [round(x, 3) for x in runs],
                       "comm_bytes_per_token": round(sent / tokens, 2),
                       "collectives": max(p["collectives"][impl] for p in per_rank)}
    n, o = impls["naive"], impls["ours"]
    return {"ranks": len(per_rank), "threads_per_rank": r["threads_per_rank"],
            "vocab_local": r["vocab_local"], "chunk_tokens": r["chunk_tokens"],
            "kept_tokens": r["kept_tokens"], "shard_bytes": shard, "naive": n, "ours": o,
            "peak_ratio": ratio(o["peak_bytes"], n["peak_bytes"]),
            "time_ratio": ratio(o["time_s"], n["time_s"]),
            "max_rel_diff_kl": max(p["max_rel_diff_kl"] for p in per_rank),
            "max_rel_diff_grad": max(p["max_rel_diff_grad"] for p in per_rank),
            "job_s": r.get("job_s"), "loadavg_1min": r.get("loadavg_1min")}


def meets_goal(out: dict) -> bool:
    """Every measured layout (an entry with a peak_ratio) at or below GOAL_PEAK_RATIO; False if none."""
    ratios = [v["peak_ratio"] for v in out.values() if isinstance(v, dict) and "peak_ratio" in v]
    return bool(ratios) and all(x is not None and x <= GOAL_PEAK_RATIO for x in ratios)


def table_lines(out: dict, layouts: list[str]) -> list[str]:
    lines = [f"KL(teacher || student) forward+backward on T={out['tokens']} tokens x V={out['vocab']} fp32 "
             "logits, naive vs ours",
             f"  {out['cores']} cores; time = median of {out['repeats']} runs after a warm-up, "
             "the slowest rank",
             f"  {'layout':6s} {'impl':10s} {'ranks':>5s} {'thr':>3s} {'chunk':>5s} {'peak MiB':>9s} "
             f"{'/shard':>7s} {'time s':>7s} {'B/token':>9s} {'KL diff':>8s} {'grad diff':>9s}"]
    for name in layouts:
        s = out[name]
        for impl in IMPLS:
            x = s[impl]
            chunk = f"{s['chunk_tokens']:5d}" if impl == "ours" else f"{'-':>5s}"
            diffs = (f" {s['max_rel_diff_kl']:8.1e} {s['max_rel_diff_grad']:9.1e}" if impl == "ours" else "")
            lines.append(f"  {name:6s} {impl:10s} {s['ranks']:5d} {s['threads_per_rank']:3d} {chunk} "
                         f"{x['peak_mib']:9.1f} {x['peak_over_shard']:7.2f} {x['time_s']:7.2f} "
                         f"{x['comm_bytes_per_token']:9.1f}{diffs}")
        flag = "" if s["peak_ratio"] is not None and s["peak_ratio"] <= GOAL_PEAK_RATIO else " !"
        lines.append(f"  {name:6s} {'ours/naive':10s} {'':5s} {'':3s} {'':5s} {s['peak_ratio']:9.3f}{flag:2s}"
                     f"{'':6s} {s['time_ratio']:7.3f}")
    step = out.get("distill_step_over_ce_step")
    if step:
        lines.append(f"  training step, TP1, {step['micro_batches']} x {step['micro_batch_size']} x "
                     f"{step['seq_length']} tokens, median of {len(step['runs_s']['ce'])}: distill "
                     f"{step['distill_s']:.2f} s / CE {step['ce_s']:.2f} s = {step['ratio']:.2f} "
                     f"(CPU time: {step['cpu_ratio']:.2f}; {step['teacher']} teacher, "
                     f"{step['student']} student)")
    lines += ["  peak = tensor bytes live above the inputs during forward+backward, the gradient included",
              "         (torch profiler, worst rank); /shard = over one [T, V/tp] fp32 tensor",
              f"  goal: ours/naive peak <= {GOAL_PEAK_RATIO} (! = missed); "
              "B/token = bytes one rank hands to collectives per token",
              "  diff = max|ours - naive| / max|naive| of the per-token KL and the gradient (worst rank)"]
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        if a.step_worker:
            step_worker(a)
        else:
            worker(a)
        return {}
    check_args(a)
    cores = a.cores or cpu_cores()
    with open("/proc/meminfo", encoding="ascii") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    for tp in a.layouts:
        need = naive_job_bytes(a.tokens, a.vocab, tp)
        if need > 0.8 * avail:
            raise SystemExit(f"TP{tp} at T={a.tokens}, V={a.vocab} may need up to {need / 2**30:.1f} GiB of "
                             f"{avail / 2**30:.1f} GiB available. Fix: lower --tokens.")

    out = {"bench": "kl", "vocab": a.vocab, "tokens": a.tokens, "repeats": a.repeats,
           "chunk_tokens": a.chunk_tokens, "cores": cores,
           "threads_per_rank": {f"tp{tp}": threads_per_rank(tp, cores) for tp in a.layouts},
           "goal_peak_ratio": GOAL_PEAK_RATIO, "meets_goal": None}
    layouts = [f"tp{tp}" for tp in a.layouts]
    with tempfile.TemporaryDirectory(prefix="bench_kl_") as workdir:
        for tp, name in zip(a.layouts, layouts):
            out[name] = summarize_layout(run_layout(a, tp, cores, workdir))
        # a distillation training step's time over a plain cross-entropy step's (None: skipped)
        out["distill_step_over_ce_step"] = (summarize_steps(run_step_job(a, cores, workdir))
                                            if a.step_repeats else None)
    out["meets_goal"] = meets_goal(out)

    for line in table_lines(out, layouts):
        print(line)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
