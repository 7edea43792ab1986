"""Forward KL(p_teacher || p_student) on vocab-parallel logits, without gathering the vocabulary.

Per token, with a = student / τ and b = teacher / τ over the full vocabulary V:

    KL = sum_v p_T[v] * (log p_T[v] - log p_S[v]),   p = softmax(·),  log p = x - logsumexp(x)
    d KL / d student = (p_S - p_T) / τ

Each tensor-parallel rank holds a contiguous vocabulary shard [..., V/tp] of both logits (what
megatron's output layer returns with parallel_output=True). Only per-token scalars cross the TP
group (invariant 2 of DESIGN.md), per chunk of c tokens:
  1. all_reduce MAX  [2, c]  per-token max of a and b (so every exp below is <= 1: no overflow);
  2. all_reduce SUM  [2, c]  per-token sum of exp(x - max)  ->  log-sum-exp of a and b;
then, once for all chunks,
  3. all_reduce SUM  [T]     per-token partial sums of p_T * (log p_T - log p_S).
That is 5 floats per token of the compute dtype, independent of the vocabulary, in 2 * chunks + 1
collectives. The backward pass
sends nothing: it recomputes both softmaxes on the shard from the saved per-token max and
log-sum-exp of each side ([4, T] in all).

Memory: tokens are processed in chunks, so beyond the inputs (and, in backward, the gradient,
which has the student's shape) at most a few [chunk, V/tp] temporaries of the compute dtype exist
at a time. Leading dimensions are flattened with `reshape`, a view for contiguous logits (megatron's
[s, b, V/tp] and [b, s, V/tp] both are); a non-contiguous input is copied once.

Dtypes: the math runs in float32 for bf16/fp16/fp32 inputs (as megatron's vocab-parallel cross
entropy does) and in float64 for float64 inputs; the per-token KL is returned in that compute dtype,
the student gradient in the student's dtype.

Temperature scaling: `scale_by_temperature_squared=True` multiplies the KL (and so its gradient) by
τ², Hinton's convention that keeps gradient magnitudes comparable across temperatures. It is off by
default: the plain KL of the tempered distributions, which is what `reference_kl` computes.

Padding: every token gets a value; masking padded tokens (a loss mask) is the caller's business.
So are megatron's padded vocabulary entries: they are part of the softmax here, as in megatron's
own vocab-parallel cross entropy.

The per-chunk math lives in the pure functions `_chunk_max`, `_chunk_sumexp`, `_chunk_kl` and
`_chunk_grad` (one chunk, one shard, no communication), so a fused kernel can replace them without
touching the reductions: `backend="triton"` runs megatron_prune.kernels.kl's Triton kernels in
their place (one pass over both shards each, no [chunk, V/tp] temporaries; the backward writes the
gradient in one launch for all tokens), `"torch"` these functions, `"auto"` (the default) the
kernels for CUDA logits and these functions otherwise (see `megatron_prune.kernels.kl`).
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

__all__ = ["CHUNK_TEMP_BYTES", "reference_kl", "vocab_parallel_kl"]

# Default chunk size: as many tokens as make one [chunk, V/tp] float32 temporary about this large.
CHUNK_TEMP_BYTES = 64 * 2**20


class CommCounterLike(Protocol):
    """What `comm=` needs: megatron_prune.importance.CommCounter fits (a Protocol, so that the loss
    does not import the importance package)."""

    def add(self, group_name: str, tensor: torch.Tensor) -> None: ...


# ----------------------------------------------------------------------------------------------
# The oracle


def reference_kl(student_full: torch.Tensor, teacher_full: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(p_T || p_S) on full-vocabulary logits [..., V] in one process, in float64.

    The definition written with torch's own log_softmax and kl_div: the CPU semantics and the test
    oracle of `vocab_parallel_kl`. Differentiable with respect to both inputs. Returns [...].
    """
    _check_temperature(temperature)
    log_p_s = F.log_softmax(student_full.to(torch.float64) / temperature, dim=-1)  # [..., V]
    log_p_t = F.log_softmax(teacher_full.to(torch.float64) / temperature, dim=-1)  # [..., V]
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)  # [...]


# ----------------------------------------------------------------------------------------------
# Per-chunk math on one shard (pure; a fused kernel replaces these)


def _chunk_max(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Local per-token max of s/τ and t/τ: [c, Vl] x2 -> [2, c].

    Taken on the raw logits, then divided: rounded division by τ > 0 is monotonic, so this equals
    the max of the divided logits exactly, without a [c, Vl] temporary.
    """
    return torch.stack([s.amax(-1), t.amax(-1)]).to(dtype) / temperature  # [2, c]


def _chunk_sumexp(s: torch.Tensor, t: torch.Tensor, temperature: float, maxes: torch.Tensor) -> torch.Tensor:
    """Local per-token sum of exp(x/τ - max) for x = s, t: [c, Vl] x2, maxes [2, c] -> [2, c]."""
    out = torch.empty_like(maxes)  # [2, c]
    for i, x in enumerate((s, t)):  # one [c, Vl] temporary at a time
        z = x.to(maxes.dtype) / temperature  # [c, Vl]
        z.sub_(maxes[i].unsqueeze(-1)).exp_()
        out[i] = z.sum(-1)
    return out


def _log_softmax_shard(x: torch.Tensor, temperature: float, maxes: torch.Tensor,
                       log_sums: torch.Tensor) -> torch.Tensor:
    """log p = (x/τ - max) - log sum exp(x/τ - max) on the shard: [c, Vl], maxes/log_sums [c] -> [c, Vl].

    Subtracting the max first and the small log-sum second keeps log p exact to the compute
    dtype's relative precision: x/τ - max is exact near the max (Sterbenz), whereas a rounded
    logsumexp of ~1e3 would carry an absolute error of ~1e-4 into every probability.
    """
    z = x.to(maxes.dtype) / temperature  # [c, Vl]
    return z.sub_(maxes.unsqueeze(-1)).sub_(log_sums.unsqueeze(-1))


def _chunk_kl(s: torch.Tensor, t: torch.Tensor, temperature: float, stats: torch.Tensor) -> torch.Tensor:
    """Local per-token sum of p_T (log p_T - log p_S): [c, Vl] x2, stats [4, c] -> [c].

    stats rows: max of s/τ, max of t/τ, log sum exp of s/τ - max, log sum exp of t/τ - max (global).
    """
    log_p_t = _log_softmax_shard(t, temperature, stats[1], stats[3])  # [c, Vl]
    log_p_s = _log_softmax_shard(s, temperature, stats[0], stats[2])  # [c, Vl]
    diff = log_p_s.neg_().add_(log_p_t)  # [c, Vl] log p_T - log p_S
    p_t = log_p_t.exp_()  # [c, Vl], reuses log_p_t's storage
    # p_T == 0 contributes 0 (x log x -> 0), also where both logits are -inf and diff is nan.
    return torch.where(p_t > 0, p_t * diff, 0.0).sum(-1)  # [c]


def _chunk_grad(s: torch.Tensor, t: torch.Tensor, temperature: float, stats: torch.Tensor,
                grad_kl: torch.Tensor) -> torch.Tensor:
    """d(grad_kl · KL) / d s = grad_kl * (p_S - p_T) / τ on the shard: [c, Vl] x2, stats [4, c],
    grad_kl [c] (already times any τ² scale) -> [c, Vl] in the compute dtype."""
    p_s = _log_softmax_shard(s, temperature, stats[0], stats[2]).exp_()  # [c, Vl]
    p_t = _log_softmax_shard(t, temperature, stats[1], stats[3]).exp_()  # [c, Vl]
    return p_s.sub_(p_t).mul_((grad_kl / temperature).unsqueeze(-1))  # [c, Vl]


# ----------------------------------------------------------------------------------------------
# Reductions over the tensor-parallel group


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: Optional[ProcessGroup],
                comm: Optional[CommCounterLike]) -> torch.Tensor:
    """In place over `group`; a no-op without a group or for a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if comm is not None:
        comm.add("tp", x)
    dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_ops(backend: str) -> tuple:
    """(max, sumexp, kl, grad) per-chunk functions of a resolved backend, 'torch' or 'triton'."""
    if backend == "torch":
        return _chunk_max, _chunk_sumexp, _chunk_kl, _chunk_grad
    from megatron_prune.kernels import kl as kernels  # lazily: it imports this module's references
    return (kernels.chunk_max_triton, kernels.chunk_sumexp_triton, kernels.chunk_kl_triton,
            kernels.chunk_grad_triton)


def _chunk_stats(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype,
                 group: Optional[ProcessGroup], comm: Optional[CommCounterLike],
                 ops: tuple) -> torch.Tensor:
    """Global per-token softmax statistics over the whole vocabulary: -> [4, c], rows (max of s/τ,
    max of t/τ, log sum exp(s/τ - max), log sum exp(t/τ - max)); kept apart, not added into one
    logsumexp, for precision (see `_log_softmax_shard`)."""
    chunk_max, chunk_sumexp = ops[:2]
    maxes = _all_reduce(chunk_max(s, t, temperature, dtype), dist.ReduceOp.MAX, group, comm)  # [2, c]
    sums = _all_reduce(chunk_sumexp(s, t, temperature, maxes), dist.ReduceOp.SUM, group, comm)  # [2, c]
    return torch.cat([maxes, sums.log_()])  # [4, c]; sums >= 1 (the max's own term): log is finite


class _VocabParallelKL(torch.autograd.Function):
    """[T, Vl] student, [T, Vl] teacher -> [T] KL; saves only [4, T] softmax statistics beside the inputs."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, group: Optional[ProcessGroup],
                temperature: float, scale: float, chunk: int, comm: Optional[CommCounterLike],
                backend: str) -> torch.Tensor:
        ops = _chunk_ops(backend)
        dtype = torch.promote_types(student.dtype, torch.float32)
        tokens = student.shape[0]
        stats = torch.empty(4, tokens, dtype=dtype, device=student.device)  # [4, T], see _chunk_stats
        kl = torch.empty(tokens, dtype=dtype, device=student.device)  # [T]
        for lo in range(0, tokens, chunk):
            s, t = student[lo:lo + chunk], teacher[lo:lo + chunk]  # [c, Vl] views
            stats[:, lo:lo + chunk] = _chunk_stats(s, t, temperature, dtype, group, comm, ops)
            kl[lo:lo + chunk] = ops[2](s, t, temperature, stats[:, lo:lo + chunk])
        _all_reduce(kl, dist.ReduceOp.SUM, group, comm)  # one collective for all chunks' partial sums
        ctx.save_for_backward(student, teacher, stats)
        ctx.temperature, ctx.scale, ctx.chunk, ctx.backend = temperature, scale, chunk, backend
        return kl.mul_(scale) if scale != 1.0 else kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):
        student, teacher, stats = ctx.saved_tensors
        grad_kl = grad_kl.reshape(-1).to(stats.dtype) * ctx.scale  # [T]
        grad = torch.empty_like(student)  # [T, Vl]
        if ctx.backend == "triton":  # no temporaries: one launch writes the whole gradient
            _chunk_ops("triton")[3](student, teacher, ctx.temperature, stats, grad_kl, out=grad)
            return grad, None, None, None, None, None, None, None
        for lo in range(0, student.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            grad[lo:hi] = _chunk_grad(student[lo:hi], teacher[lo:hi], ctx.temperature, stats[:, lo:hi],
                                      grad_kl[lo:hi])
        # the teacher gets no gradient; group, temperature, scale, chunk, comm, backend: not tensors
        return grad, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public entry point


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      tp_group: Optional[ProcessGroup], temperature: float = 1.0,
                      scale_by_temperature_squared: bool = False, chunk_tokens: Optional[int] = None,
                      comm: Optional[CommCounterLike] = None, backend: str = "auto") -> torch.Tensor:
    """Per-token forward KL(p_T || p_S) of tempered softmaxes over the full (sharded) vocabulary.

    student_logits, teacher_logits: [..., V/tp], this rank's contiguous vocabulary shard, same
      shape; every leading dimension is a token dimension (megatron's [s, b, V/tp] or [b, s, V/tp]).
    tp_group: the tensor-parallel group the vocabulary is split over; None (or a group of one) when
      the logits hold the whole vocabulary. Every rank of the group must call with the same leading
      shape and arguments (the reductions are collectives).
    temperature: τ > 0, applied to both logits.
    scale_by_temperature_squared: multiply the KL by τ² (Hinton's convention); off by default.
    chunk_tokens: tokens per chunk; None picks about CHUNK_TEMP_BYTES per [chunk, V/tp] temporary.
    comm: counts the bytes this rank hands to collectives, if given.
    backend: "auto" (Triton kernels for CUDA logits, PyTorch otherwise), "torch" or "triton" (on CPU
      only under TRITON_INTERPRET=1, for tests); see megatron_prune.kernels.kl.

    Returns the KL [...] (the leading dimensions) in float32 (float64 for float64 logits),
    identical on every rank of the group. Differentiable with respect to the student only: the
    teacher is treated as a constant whether or not it requires grad.
    """
    _check_inputs(student_logits, teacher_logits, temperature, chunk_tokens)
    from megatron_prune.kernels.kl import resolve_backend  # lazily: it imports this module

    backend = resolve_backend(student_logits, backend)  # a bad or unusable backend fails here
    lead, vocab_local = student_logits.shape[:-1], student_logits.shape[-1]
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_TEMP_BYTES // (4 * vocab_local))
    scale = float(temperature) ** 2 if scale_by_temperature_squared else 1.0
    kl = _VocabParallelKL.apply(student_logits.reshape(-1, vocab_local),  # [T, Vl]
                                teacher_logits.detach().reshape(-1, vocab_local),  # [T, Vl]
                                tp_group, float(temperature), scale, int(chunk_tokens), comm, backend)
    return kl.reshape(lead)  # [...]


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                  chunk_tokens: Optional[int]) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (logits), got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name} must be [..., V/tp] with a non-empty vocabulary shard, "
                             f"got shape {tuple(x.shape)}")
    if student.shape != teacher.shape:
        hint = (" (different vocabulary shards: teacher and student must share the vocabulary, "
                "its padding and the TP size)" if student.shape[:-1] == teacher.shape[:-1] else "")
        raise ValueError(f"student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape{hint}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits on {student.device} and teacher_logits on {teacher.device} "
                         "must be on the same device")
    _check_temperature(temperature)
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
