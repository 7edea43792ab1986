"""Fused per-channel and per-head activation statistics, each beside its PyTorch reference.

What is computed (fp32 accumulation whatever the input dtype; bf16/fp16/fp32 inputs are read as
they are and converted to fp32 element by element; masked tokens contribute nothing, to the sums or
to the max, even when they hold inf or nan):

* ``channel_stats(x[..., C], mask)`` -> ``ChannelStats`` over the kept tokens t:
    ``sum_sq[c] = sum_t x[t, c]**2``, ``sum_abs[c] = sum_t |x[t, c]|``,
    ``max_abs[c] = max_t |x[t, c]|`` (0 when no token is kept), ``count`` = number of kept tokens.
* ``head_stats(x[..., H, D], mask)`` -> ``HeadStats``; with ``n[t, h] = ||x[t, h, :]||_2`` (the l2
  norm of head h's D-vector for token t, e.g. the attention output before linear_proj, heads local
  to the TP rank; Minitron scores a head by aggregating this norm over batch and sequence):
    ``sum_norm[h] = sum_t n[t, h]``, ``sum_sq_norm[h] = sum_t n[t, h]**2`` (= sum_{t,d} x**2),
    ``max_norm[h] = max_t n[t, h]`` (0 when no token is kept), ``count`` = number of kept tokens.
A NaN in a kept token makes every statistic of its channel / head NaN, on both backends.

Token layout: every leading dimension is a token dimension and is flattened in row-major order
(``x.reshape(-1, C)``). The mask must have exactly those leading dimensions (``x.shape[:-1]``, or
``x.shape[:-2]`` for heads) or be 1-D of length T already flattened in the same order. For megatron
activations ``[s, b, C]`` the mask is ``[s, b]``; a ``[b, s]`` loss mask must be passed as
``loss_mask.t()`` (a transposed mask is rejected rather than guessed, since s == b is ambiguous).
A mask may be bool, int or float; it is binarised (nonzero = keep), it is not a weight.

Statistics from micro-batches combine with ``accumulate`` (in place) or ``merge`` (new object);
across data-parallel ranks they combine by all-reduce with the ops in ``REDUCE_OPS``
(SUM for the sums and the count, MAX for the max). The statistics are deterministic: the Triton
kernel splits tokens into a fixed number of ranges per channel block (no atomics) and the partial
results are reduced in a fixed order.

Backends: ``backend="torch"`` is the reference (the CPU path and the test oracle), ``"triton"`` the
fused kernel, ``"auto"`` picks Triton for CUDA tensors, or on CPU when ``TRITON_INTERPRET=1`` and
``MEGATRON_PRUNE_TRITON=1`` are both set (the interpreter is for tests only: it is slow).
The Triton kernels are decorated lazily, at first use, and call only triton builtins, so
``TRITON_INTERPRET`` is honoured even when it is set after triton was imported (triton reads it when
``triton.jit`` runs, and its own @jit library functions such as tl.sum are fixed at import).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar, Optional

import torch

try:  # triton is optional: the CUDA images carry it, CPU installs may not.
    import triton
    import triton.language as tl
    _TRITON_ERROR: Optional[BaseException] = None
except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
    triton = tl = None
    _TRITON_ERROR = e

__all__ = ["ChannelStats", "HeadStats", "channel_stats", "channel_stats_per_sample",
           "channel_stats_reference", "channel_stats_triton", "head_stats", "head_stats_per_sample",
           "head_stats_reference", "head_stats_triton", "resolve_backend", "triton_available"]


# ----------------------------------------------------------------------------------------------
# Statistics values
# ----------------------------------------------------------------------------------------------
class _Stats:
    _SUMS: ClassVar[tuple] = ()
    _MAXES: ClassVar[tuple] = ()

    def _check_compatible(self, other) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot combine {type(self).__name__} with {type(other).__name__}")
        for f in self._SUMS + self._MAXES:
            a, b = getattr(self, f), getattr(other, f)
            if a.shape != b.shape:
                raise ValueError(f"{type(self).__name__}.{f}: shapes {tuple(a.shape)} and "
                                 f"{tuple(b.shape)} differ; statistics of different layers or TP "
                                 "shards cannot be combined")

    def accumulate(self, other):
        """Add ``other`` into ``self`` in place (sums add, max takes the max); returns ``self``."""
        self._check_compatible(other)
        for f in self._SUMS:
            getattr(self, f).add_(getattr(other, f).to(getattr(self, f).device))
        for f in self._MAXES:
            mine = getattr(self, f)
            torch.maximum(mine, getattr(other, f).to(mine.device), out=mine)
        self.count += int(other.count)
        return self

    def merge(self, other):
        """A new statistics object combining ``self`` and ``other`` (neither is modified)."""
        return self.clone().accumulate(other)

    def clone(self):
        return dataclasses.replace(self, **{f: getattr(self, f).clone()
                                            for f in self._SUMS + self._MAXES})

    @classmethod
    def zeros(cls, n: int, device=None):
        return cls(**{f: torch.zeros(n, dtype=torch.float32, device=device)
                      for f in cls._SUMS + cls._MAXES}, count=0)


@dataclasses.dataclass
class ChannelStats(_Stats):
    """Per-channel statistics (fp32 ``[C]`` tensors) over ``count`` kept tokens."""
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    max_abs: torch.Tensor
    count: int = 0
    _SUMS: ClassVar[tuple] = ("sum_sq", "sum_abs")
    _MAXES: ClassVar[tuple] = ("max_abs",)
    REDUCE_OPS: ClassVar[dict] = {"sum_sq": "sum", "sum_abs": "sum", "max_abs": "max",
                                  "count": "sum"}

    def l2(self) -> torch.Tensor:
        """``||x[:, c]||_2`` over the kept tokens (the Wanda input-norm)."""
        return self.sum_sq.sqrt()

    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.count, 1)

    def rms(self) -> torch.Tensor:
        return (self.sum_sq / max(self.count, 1)).sqrt()


@dataclasses.dataclass
class HeadStats(_Stats):
    """Per-head statistics of the per-token l2 norm of each head's vector (fp32 ``[H]``)."""
    sum_norm: torch.Tensor
    sum_sq_norm: torch.Tensor
    max_norm: torch.Tensor
    count: int = 0
    _SUMS: ClassVar[tuple] = ("sum_norm", "sum_sq_norm")
    _MAXES: ClassVar[tuple] = ("max_norm",)
    REDUCE_OPS: ClassVar[dict] = {"sum_norm": "sum", "sum_sq_norm": "sum", "max_norm": "max",
                                  "count": "sum"}

    def mean_norm(self) -> torch.Tensor:
        return self.sum_norm / max(self.count, 1)


# ----------------------------------------------------------------------------------------------
# Input checks and flattening (shared by every backend)
# ----------------------------------------------------------------------------------------------
def _flatten(x: torch.Tensor, mask, trailing: int, what: str):
    """-> (x viewed as [T, *trailing dims], keep [T] bool or None, T)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what}: x must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    names = "[..., C]" if trailing == 1 else "[..., H, D]"
    if x.dim() < trailing + 1:
        raise ValueError(f"{what}: x must be {names} with at least one token dimension, "
                         f"got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-trailing])
    T = math.prod(lead)
    x2 = x.detach().reshape(T, *x.shape[-trailing:])
    if mask is None:
        return x2, None, T
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: mask must be a tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != lead and not (mask.dim() == 1 and mask.numel() == T):
        hint = ""
        if len(lead) == 2 and tuple(mask.shape) == lead[::-1]:
            hint = (" (it looks transposed: for megatron [s, b, ...] activations pass a [b, s] "
                    "loss mask as mask.t())")
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} must equal the token dimensions "
                         f"of x {lead} (or be 1-D of length {T} in the same flattened order){hint}")
    keep = mask.detach().reshape(T).to(x.device) != 0
    return x2, keep, T


# ----------------------------------------------------------------------------------------------
# PyTorch references (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------
# 8 MiB of fp32 per chunk (measured on 2 cores): smaller chunks keep the passes in cache but each op
# is an OpenMP barrier, which costs ~10x when the cores are oversubscribed (several ranks per core)
_REF_CHUNK_ELEMS = 1 << 21


def _chunks(x: torch.Tensor, keep: Optional[torch.Tensor]):
    """Yield (fp32 copy of a chunk of tokens of x [T, ...], its dropped-token mask [t] or None).

    The copies go to one reused scratch buffer that the callers then modify in place: no full-size
    fp32 copy of a bf16 activation is ever made."""
    per_token = max(1, math.prod(x.shape[1:]))
    step = max(1, _REF_CHUNK_ELEMS // per_token)
    buf = torch.empty((min(step, x.shape[0]), *x.shape[1:]), dtype=torch.float32,
                      device=x.device)
    for t0 in range(0, x.shape[0], step):
        xc = x[t0:t0 + step]
        b = buf[:xc.shape[0]]
        b.copy_(xc)
        yield b, (None if keep is None else ~keep[t0:t0 + step])


@torch.no_grad()
def channel_stats_reference(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> ChannelStats:
    x2, keep, T = _flatten(x, mask, 1, "channel_stats")  # [T, C]
    out = ChannelStats.zeros(x2.shape[1], device=x.device)
    out.count = T if keep is None else int(keep.sum())
    for a, drop in _chunks(x2, keep):  # a: [t, C] fp32 scratch
        a.abs_()
        if drop is not None:  # fill, never multiply by 0: a masked inf or nan must stay out
            a.masked_fill_(drop[:, None], 0.0)
        out.sum_abs += a.sum(0)
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
        out.sum_sq += a.mul_(a).sum(0)
    return out


@torch.no_grad()
def head_stats_reference(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> HeadStats:
    x3, keep, T = _flatten(x, mask, 2, "head_stats")  # [T, H, D]
    out = HeadStats.zeros(x3.shape[1], device=x.device)
    out.count = T if keep is None else int(keep.sum())
    for v, drop in _chunks(x3, keep):  # v: [t, H, D] fp32 scratch
        ss = v.mul_(v).sum(-1)  # [t, H] squared norm of each head's vector
        if drop is not None:
            ss.masked_fill_(drop[:, None], 0.0)
        n = ss.sqrt()
        out.sum_norm += n.sum(0)
        out.sum_sq_norm += ss.sum(0)
        torch.maximum(out.max_norm, n.amax(0), out=out.max_norm)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels. Grid = (feature blocks, token splits). Each program loops over a contiguous range
# of tokens, keeping [BLOCK_T, BLOCK_*] fp32 accumulators, and writes one partial row per split;
# the wrapper reduces the splits in a fixed order. No atomics: the result is deterministic
# (invariant 1 of DESIGN.md), and a float max needs none of the sign tricks of float atomic_max.
# They are plain functions, decorated with triton.jit at first use (see _kernels), and they call
# only triton *builtins*: tl.sum / tl.max / tl.zeros are themselves @triton.jit functions decorated
# when triton is imported, so they are compiled-mode objects inside an interpreted kernel whenever
# triton was imported before TRITON_INTERPRET=1 was set (megatron-core and torch._dynamo import
# it). tl.reduce with triton's own combine functions is what tl.sum / tl.max expand to, and the
# interpreter recognises those combine functions and reduces with numpy.
# ----------------------------------------------------------------------------------------------
def _channel_stats_kernel(x_ptr, keep_ptr, sq_ptr, abs_ptr, max_ptr, T, C, stride_t, stride_c,
                          tokens_per_split, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc_sq = tl.full((BLOCK_T, BLOCK_C), 0.0, tl.float32)
    acc_abs = tl.full((BLOCK_T, BLOCK_C), 0.0, tl.float32)
    acc_max = tl.full((BLOCK_T, BLOCK_C), 0.0, tl.float32)
    t_begin = pid_s * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        if HAS_MASK:
            t_ok = t_ok & (tl.load(keep_ptr + offs_t, mask=t_ok, other=0) != 0)
        ok = t_ok[:, None] & c_ok[None, :]
        ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_c[None, :] * stride_c
        v = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)  # masked/ragged: 0, never read
        a = tl.abs(v)
        acc_sq += v * v
        acc_abs += a
        acc_max = tl.maximum(acc_max, a, propagate_nan=tl.PropagateNan.ALL)  # like torch.amax
    out = pid_s * C + offs_c
    tl.store(sq_ptr + out, tl.reduce(acc_sq, 0, tl.standard._sum_combine), mask=c_ok)
    tl.store(abs_ptr + out, tl.reduce(acc_abs, 0, tl.standard._sum_combine), mask=c_ok)
    # the max reduction drops NaN on GPU; keep a NaN visible, as torch.amax does
    n_nan = tl.reduce((acc_max != acc_max).to(tl.int32), 0, tl.standard._sum_combine)
    mx = tl.reduce(acc_max, 0, tl.standard._elementwise_max)
    tl.store(max_ptr + out, tl.where(n_nan > 0, float("nan"), mx), mask=c_ok)


def _head_stats_kernel(x_ptr, keep_ptr, n_ptr, sq_ptr, max_ptr, T, H, D, stride_t, stride_h,
                       stride_d, tokens_per_split, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    acc_n = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    acc_sq = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    acc_max = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    t_begin = pid_s * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        if HAS_MASK:
            t_ok = t_ok & (tl.load(keep_ptr + offs_t, mask=t_ok, other=0) != 0)
        th_ok = t_ok[:, None] & h_ok[None, :]  # [BLOCK_T, BLOCK_H]
        base = offs_t.to(tl.int64)[:, None, None] * stride_t + offs_h[None, :, None] * stride_h
        ss = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)  # squared norm of each head's vector
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok = th_ok[:, :, None] & (offs_d < D)[None, None, :]
            v = tl.load(x_ptr + base + offs_d[None, None, :] * stride_d, mask=ok, other=0.0)
            v = v.to(tl.float32)  # [BLOCK_T, BLOCK_H, BLOCK_D]
            ss += tl.reduce(v * v, 2, tl.standard._sum_combine)
        n = tl.sqrt_rn(ss)  # IEEE-rounded like torch.sqrt (tl.sqrt may be approximate on GPU)
        acc_n += n
        acc_sq += ss
        acc_max = tl.maximum(acc_max, n, propagate_nan=tl.PropagateNan.ALL)
    out = pid_s * H + offs_h
    tl.store(n_ptr + out, tl.reduce(acc_n, 0, tl.standard._sum_combine), mask=h_ok)
    tl.store(sq_ptr + out, tl.reduce(acc_sq, 0, tl.standard._sum_combine), mask=h_ok)
    n_nan = tl.reduce((acc_max != acc_max).to(tl.int32), 0, tl.standard._sum_combine)
    mx = tl.reduce(acc_max, 0, tl.standard._elementwise_max)
    tl.store(max_ptr + out, tl.where(n_nan > 0, float("nan"), mx), mask=h_ok)


_JITTED: dict = {}


def _kernels(interpret: bool):
    """The jitted kernels for the current TRITON_INTERPRET mode (decorated once per mode)."""
    if interpret not in _JITTED:
        _JITTED[interpret] = (triton.jit(_channel_stats_kernel), triton.jit(_head_stats_kernel))
    return _JITTED[interpret]


def triton_available() -> bool:
    return triton is not None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


def _interpret_mode() -> bool:
    """What triton.jit would do now (it reads TRITON_INTERPRET when it decorates)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    return bool(knobs.runtime.interpret) if knobs is not None else _truthy("TRITON_INTERPRET")


def _check_triton(x: torch.Tensor, what: str) -> bool:
    if triton is None:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package, which failed to "
                           f"import ({_TRITON_ERROR!r}); install it (pip install triton) or use "
                           "backend='torch'")
    interpret = _interpret_mode()
    if not x.is_cuda and not interpret:
        raise RuntimeError(f"{what}: backend='triton' on a {x.device} tensor needs "
                           "TRITON_INTERPRET=1 (the slow CPU interpreter, meant for tests); "
                           "use backend='torch' on CPU")
    return interpret


def _splits(n_blocks: int, n_tblocks: int, device: torch.device, interpret: bool,
            num_splits: Optional[int]) -> int:
    if num_splits is None:  # enough programs to fill the GPU; one per feature block otherwise
        num_splits = 1 if interpret or device.type != "cuda" else max(
            1, 4 * torch.cuda.get_device_properties(device).multi_processor_count // n_blocks)
    return max(1, min(int(num_splits), n_tblocks))


def _keep_arg(keep, x):
    # bool pointers are loaded as int8: portable across triton versions and the interpreter
    return (keep.to(torch.int8), True) if keep is not None else (x, False)


@torch.no_grad()
def channel_stats_triton(x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                         block_t: Optional[int] = None, block_c: Optional[int] = None,
                         num_splits: Optional[int] = None) -> ChannelStats:
    interpret = _check_triton(x, "channel_stats")
    x2, keep, T = _flatten(x, mask, 1, "channel_stats")  # [T, C]
    C = x2.shape[1]
    count = T if keep is None else int(keep.sum())
    if T == 0 or C == 0:
        return dataclasses.replace(ChannelStats.zeros(C, device=x.device), count=count)
    # interpreter: few large tiles (its cost is per tile op); GPU: register-sized tiles
    bt = block_t or (min(256, triton.next_power_of_2(T)) if interpret else 32)
    bc = block_c or (min(256, triton.next_power_of_2(C)) if interpret else 128)
    n_c, n_t = triton.cdiv(C, bc), triton.cdiv(T, bt)
    ns = _splits(n_c, n_t, x.device, interpret, num_splits)
    tokens_per_split = triton.cdiv(n_t, ns) * bt  # a multiple of the token block
    part = torch.empty(3, ns, C, dtype=torch.float32, device=x.device)  # [stat, split, C]
    keep_arg, has_mask = _keep_arg(keep, x2)
    _kernels(interpret)[0][(n_c, ns)](
        x2, keep_arg, part[0], part[1], part[2], T, C, x2.stride(0), x2.stride(1),
        tokens_per_split, HAS_MASK=has_mask, BLOCK_T=bt, BLOCK_C=bc)
    return ChannelStats(sum_sq=part[0].sum(0), sum_abs=part[1].sum(0),
                        max_abs=part[2].amax(0), count=count)


@torch.no_grad()
def head_stats_triton(x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                      block_t: Optional[int] = None, block_h: Optional[int] = None,
                      block_d: Optional[int] = None,
                      num_splits: Optional[int] = None) -> HeadStats:
    interpret = _check_triton(x, "head_stats")
    x3, keep, T = _flatten(x, mask, 2, "head_stats")  # [T, H, D]
    H, D = x3.shape[1], x3.shape[2]
    count = T if keep is None else int(keep.sum())
    if T == 0 or H == 0:
        return dataclasses.replace(HeadStats.zeros(H, device=x.device), count=count)
    bd = block_d or min(128, triton.next_power_of_2(max(D, 1)))
    bh = block_h or (min(32, triton.next_power_of_2(H)) if interpret else 4)
    bt = block_t or (min(128, triton.next_power_of_2(T)) if interpret else 16)
    n_h, n_t = triton.cdiv(H, bh), triton.cdiv(T, bt)
    ns = _splits(n_h, n_t, x.device, interpret, num_splits)
    tokens_per_split = triton.cdiv(n_t, ns) * bt
    part = torch.empty(3, ns, H, dtype=torch.float32, device=x.device)  # [stat, split, H]
    keep_arg, has_mask = _keep_arg(keep, x3)
    _kernels(interpret)[1][(n_h, ns)](
        x3, keep_arg, part[0], part[1], part[2], T, H, D, x3.stride(0), x3.stride(1),
        x3.stride(2), tokens_per_split, HAS_MASK=has_mask, BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd)
    return HeadStats(sum_norm=part[0].sum(0), sum_sq_norm=part[1].sum(0),
                     max_norm=part[2].amax(0), count=count)


# ----------------------------------------------------------------------------------------------
# Per-sample statistics: megatron activations [s, b, ...] with a [s, b] mask give one statistics
# row per sample (column b), e.g. for Minitron's aggregation over each sample's sequence first.
# The reference is vectorised over the samples (one pass per token chunk for all b rows); the
# Triton path runs the fused kernel on each sample's strided [s, C] view (b launches).
# ----------------------------------------------------------------------------------------------
def _check_per_sample(x: torch.Tensor, mask: torch.Tensor, trailing: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 + trailing:
        raise ValueError(f"{what}: x must be a floating-point [s, b, {'C' if trailing == 1 else 'H, D'}] "
                         f"tensor, got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{what}: mask must be [s, b] = {tuple(x.shape[:2])}, got "
                         f"{tuple(getattr(mask, 'shape', ()))}")


def _token_chunks(x: torch.Tensor, drop: torch.Tensor):
    """Yield (fp32 scratch copy of x[t0:t1] [t, b, ...], drop[t0:t1] [t, b]) over token chunks."""
    per_token = max(1, math.prod(x.shape[1:]))
    step = max(1, _REF_CHUNK_ELEMS // per_token)
    buf = torch.empty((min(step, x.shape[0]), *x.shape[1:]), dtype=torch.float32, device=x.device)
    for t0 in range(0, x.shape[0], step):
        b = buf[:min(step, x.shape[0] - t0)]
        b.copy_(x[t0:t0 + step])
        yield b, drop[t0:t0 + step]


@torch.no_grad()
def channel_stats_per_sample_reference(x: torch.Tensor, mask: torch.Tensor) -> ChannelStats:
    _check_per_sample(x, mask, 1, "channel_stats_per_sample")
    s, b, C = x.shape
    drop = mask.to(x.device) == 0  # [s, b]
    out = ChannelStats(sum_sq=torch.zeros(b, C, device=x.device), sum_abs=torch.zeros(b, C, device=x.device),
                       max_abs=torch.zeros(b, C, device=x.device), count=int((~drop).sum()))
    if x.dtype == torch.float32 and not bool(drop.any()):
        # nothing masked (full calibration windows, the common case): no scratch buffer, no fill
        a = x.detach().abs()  # [s, b, C] the only temporary
        out.sum_abs = a.sum(0)
        out.max_abs = a.amax(0)
        out.sum_sq = a.mul_(a).sum(0)
        return out
    for a, d in _token_chunks(x.detach(), drop):  # a: [t, b, C] fp32 scratch
        a.abs_().masked_fill_(d[..., None], 0.0)  # fill, never multiply: masked inf/nan stay out
        out.sum_abs += a.sum(0)
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
        out.sum_sq += a.mul_(a).sum(0)
    return out


@torch.no_grad()
def head_stats_per_sample_reference(x: torch.Tensor, mask: torch.Tensor) -> HeadStats:
    _check_per_sample(x, mask, 2, "head_stats_per_sample")
    s, b, H, _ = x.shape
    drop = mask.to(x.device) == 0  # [s, b]
    out = HeadStats(sum_norm=torch.zeros(b, H, device=x.device), sum_sq_norm=torch.zeros(b, H, device=x.device),
                    max_norm=torch.zeros(b, H, device=x.device), count=int((~drop).sum()))
    if x.dtype == torch.float32 and not bool(drop.any()):  # nothing masked: no scratch copy
        ss = torch.linalg.vecdot(x.detach(), x.detach())  # [s, b, H] squared head norms
        n = ss.sqrt()
        out.sum_norm, out.sum_sq_norm, out.max_norm = n.sum(0), ss.sum(0), n.amax(0)
        return out
    for v, d in _token_chunks(x.detach(), drop):  # v: [t, b, H, D] fp32 scratch
        ss = v.mul_(v).sum(-1).masked_fill_(d[..., None], 0.0)  # [t, b, H] squared head norms
        n = ss.sqrt()
        out.sum_norm += n.sum(0)
        out.sum_sq_norm += ss.sum(0)
        torch.maximum(out.max_norm, n.amax(0), out=out.max_norm)
    return out


def _stack_rows(rows: list, cls):
    fields = cls._SUMS + cls._MAXES
    return cls(**{f: torch.stack([getattr(r, f) for r in rows]) for f in fields},
               count=sum(int(r.count) for r in rows))


def channel_stats_per_sample(x: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> ChannelStats:
    """``x[s, b, C]``, ``mask[s, b]`` -> ChannelStats whose fields are ``[b, C]``: sample j's
    sum x², sum |x| and max |x| over its kept tokens (zeros for a sample with none)."""
    if resolve_backend(x, backend) == "triton":
        _check_per_sample(x, mask, 1, "channel_stats_per_sample")
        return _stack_rows([channel_stats_triton(x[:, j], mask[:, j]) for j in range(x.shape[1])],
                           ChannelStats)
    return channel_stats_per_sample_reference(x, mask)


def head_stats_per_sample(x: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> HeadStats:
    """``x[s, b, H, D]``, ``mask[s, b]`` -> HeadStats whose fields are ``[b, H]`` (per sample)."""
    if resolve_backend(x, backend) == "triton":
        _check_per_sample(x, mask, 2, "head_stats_per_sample")
        return _stack_rows([head_stats_triton(x[:, j], mask[:, j]) for j in range(x.shape[1])], HeadStats)
    return head_stats_per_sample_reference(x, mask)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------
def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """'torch' or 'triton' for ``x``; see the module docstring for what 'auto' picks."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'torch' or 'triton'")
    if backend != "auto":
        return backend
    if triton is None:
        return "torch"
    if x.is_cuda:
        return "triton"
    return "triton" if _truthy("MEGATRON_PRUNE_TRITON") and _interpret_mode() else "torch"


def channel_stats(x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> ChannelStats:
    """Per-channel sum(x²), sum(|x|), max(|x|) of ``x[..., C]`` over the kept tokens."""
    if resolve_backend(x, backend) == "triton":
        return channel_stats_triton(x, mask)
    return channel_stats_reference(x, mask)


def head_stats(x: torch.Tensor, mask: Optional[torch.Tensor] = None,
               backend: str = "auto") -> HeadStats:
    """Per-head sum, sum of squares and max of the token-wise l2 norm of ``x[..., H, D]``."""
    if resolve_backend(x, backend) == "triton":
        return head_stats_triton(x, mask)
    return head_stats_reference(x, mask)
