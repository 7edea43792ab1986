"""Fused Triton kernels for the per-chunk math of the vocab-parallel KL, beside its PyTorch reference.

`megatron_prune.distill.kl` computes KL(p_T || p_S) on one rank's vocabulary shard in chunks of c
tokens, with per-token reductions over the TP group between three passes over the shard. Each pass
is a pure function of one [c, Vl] shard pair there (`_chunk_max`, `_chunk_sumexp`, `_chunk_kl`,
`_chunk_grad`: the PyTorch reference, the CPU path and the test oracle). This module has one kernel
per pass, with the same signature and the same arithmetic (a = s/τ, b = t/τ, stats rows m_s, m_t,
l_s, l_t as in distill/kl.py):

* ``chunk_max_triton``    -> [2, c]  max_v s/τ, max_v t/τ                     (before all_reduce MAX)
* ``chunk_sumexp_triton`` -> [2, c]  sum_v exp(s/τ - m_s), sum_v exp(t/τ - m_t)  (before all_reduce SUM)
* ``chunk_kl_triton``     -> [c]     sum_v p_T (log p_T - log p_S)            (before all_reduce SUM)
* ``chunk_grad_triton``   -> [c, Vl] g (p_S - p_T) / τ, written straight into ``out`` (the student's
                                     dtype) when given: the backward needs no temporaries at all

Each reads both shards once, in [BLOCK_T, BLOCK_V] tiles along the vocabulary with fp32 (fp64 for
fp64 logits) accumulators, and writes only per-token values (or the gradient): where the torch
reference makes a few [c, Vl] temporaries per pass, the kernels make none. Elementwise the math is
the reference's, operation for operation (division by τ rounded to nearest, the max subtracted
before the small log-sum-exp); only the order of the vocabulary sums differs. On GPU ``tl.exp`` of
fp32 is the fast hardware exponential (a few ulp), so expect ~1e-6 relative differences there.

Temperature: τ is passed as a one-element tensor of the compute dtype (a Python float kernel
argument would be rounded to fp32, which fp64 logits must not be).

Backends (`resolve_backend`): "torch" the reference, "triton" these kernels, "auto" the kernels for
CUDA logits and the reference otherwise (also on CPU when TRITON_INTERPRET=1 and
MEGATRON_PRUNE_TRITON=1 are both set, as for activation_stats). Forcing "triton" on CPU without
TRITON_INTERPRET=1, or without triton installed, is an error that says so. As in activation_stats,
the kernels are decorated at first use and call only triton builtins, so TRITON_INTERPRET is
honoured even when it was set after triton was imported.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # triton is optional: the CUDA images carry it, CPU installs may not.
    import triton
    import triton.language as tl
    _TRITON_ERROR: Optional[BaseException] = None
except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
    triton = tl = None
    _TRITON_ERROR = e

from megatron_prune.distill.kl import _chunk_grad, _chunk_kl, _chunk_max, _chunk_sumexp

__all__ = ["chunk_grad_reference", "chunk_grad_triton", "chunk_kl_reference", "chunk_kl_triton",
           "chunk_max_reference", "chunk_max_triton", "chunk_sumexp_reference",
           "chunk_sumexp_triton", "resolve_backend", "triton_available"]

# The references are distill/kl.py's own functions (one definition of the math).
chunk_max_reference = _chunk_max
chunk_sumexp_reference = _chunk_sumexp
chunk_kl_reference = _chunk_kl
chunk_grad_reference = _chunk_grad


# ----------------------------------------------------------------------------------------------
# Triton kernels. Grid = (token blocks,). Each program owns BLOCK_T tokens and loops over the whole
# vocabulary shard in BLOCK_V-wide tiles, keeping [BLOCK_T, BLOCK_V] accumulators that it reduces
# along the vocabulary once, at the end. No atomics, so results are deterministic. Plain functions
# decorated with triton.jit at first use (see _kernels); only triton builtins inside (tl.reduce with
# triton's own combine functions is what tl.sum / tl.max expand to; see activation_stats.py).
# FP64 selects IEEE division for fp64 stats; fp32 uses div_rn, since fp32 `/` is approximate on GPU.
# ----------------------------------------------------------------------------------------------
def _kl_max_kernel(s_ptr, t_ptr, tau_ptr, out_ptr, C, V, s_st, s_sv, t_st, t_sv, o_sr, o_st,
                   FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    cdt = out_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < C
    row_s = s_ptr + offs_t.to(tl.int64)[:, None] * s_st
    row_t = t_ptr + offs_t.to(tl.int64)[:, None] * t_st
    acc_s = tl.full((BLOCK_T, BLOCK_V), float("-inf"), cdt)
    acc_t = tl.full((BLOCK_T, BLOCK_V), float("-inf"), cdt)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = t_ok[:, None] & (offs_v < V)[None, :]
        a = tl.load(row_s + offs_v[None, :] * s_sv, mask=ok, other=float("-inf")).to(cdt)
        b = tl.load(row_t + offs_v[None, :] * t_sv, mask=ok, other=float("-inf")).to(cdt)
        acc_s = tl.maximum(acc_s, a, propagate_nan=tl.PropagateNan.ALL)  # like torch.amax
        acc_t = tl.maximum(acc_t, b, propagate_nan=tl.PropagateNan.ALL)
    # the max reduction drops NaN on GPU; keep a NaN logit visible, as torch.amax does
    nan_s = tl.reduce((acc_s != acc_s).to(tl.int32), 1, tl.standard._sum_combine)
    nan_t = tl.reduce((acc_t != acc_t).to(tl.int32), 1, tl.standard._sum_combine)
    m_s = tl.where(nan_s > 0, float("nan"), tl.reduce(acc_s, 1, tl.standard._elementwise_max))
    m_t = tl.where(nan_t > 0, float("nan"), tl.reduce(acc_t, 1, tl.standard._elementwise_max))
    tau = tl.load(tau_ptr)
    if FP64:  # max first, then divide: rounded division by τ > 0 is monotonic (as the reference)
        m_s = m_s / tau
        m_t = m_t / tau
    else:
        m_s = tl.div_rn(m_s, tau)
        m_t = tl.div_rn(m_t, tau)
    tl.store(out_ptr + offs_t * o_st, m_s, mask=t_ok)
    tl.store(out_ptr + o_sr + offs_t * o_st, m_t, mask=t_ok)


def _kl_sumexp_kernel(s_ptr, t_ptr, tau_ptr, max_ptr, out_ptr, C, V, s_st, s_sv, t_st, t_sv,
                      m_sr, m_st, o_sr, o_st, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    cdt = out_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < C
    row_s = s_ptr + offs_t.to(tl.int64)[:, None] * s_st
    row_t = t_ptr + offs_t.to(tl.int64)[:, None] * t_st
    m_s = tl.load(max_ptr + offs_t * m_st, mask=t_ok, other=0.0)[:, None]  # [BLOCK_T, 1]
    m_t = tl.load(max_ptr + m_sr + offs_t * m_st, mask=t_ok, other=0.0)[:, None]
    tau = tl.load(tau_ptr)
    acc_s = tl.full((BLOCK_T, BLOCK_V), 0.0, cdt)
    acc_t = tl.full((BLOCK_T, BLOCK_V), 0.0, cdt)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = t_ok[:, None] & (offs_v < V)[None, :]
        a = tl.load(row_s + offs_v[None, :] * s_sv, mask=ok, other=0.0).to(cdt)
        b = tl.load(row_t + offs_v[None, :] * t_sv, mask=ok, other=0.0).to(cdt)
        if FP64:
            a = a / tau
            b = b / tau
        else:
            a = tl.div_rn(a, tau)
            b = tl.div_rn(b, tau)
        acc_s += tl.where(ok, tl.exp(a - m_s), 0.0)  # fill, never multiply: keeps ragged tiles out
        acc_t += tl.where(ok, tl.exp(b - m_t), 0.0)
    tl.store(out_ptr + offs_t * o_st, tl.reduce(acc_s, 1, tl.standard._sum_combine), mask=t_ok)
    tl.store(out_ptr + o_sr + offs_t * o_st, tl.reduce(acc_t, 1, tl.standard._sum_combine),
             mask=t_ok)


def _kl_kl_kernel(s_ptr, t_ptr, tau_ptr, st_ptr, out_ptr, C, V, s_st, s_sv, t_st, t_sv, st_sr,
                  st_st, FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    cdt = out_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < C
    row_s = s_ptr + offs_t.to(tl.int64)[:, None] * s_st
    row_t = t_ptr + offs_t.to(tl.int64)[:, None] * t_st
    m_s = tl.load(st_ptr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]  # [BLOCK_T, 1]
    m_t = tl.load(st_ptr + st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    l_s = tl.load(st_ptr + 2 * st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    l_t = tl.load(st_ptr + 3 * st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    tau = tl.load(tau_ptr)
    acc = tl.full((BLOCK_T, BLOCK_V), 0.0, cdt)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = t_ok[:, None] & (offs_v < V)[None, :]
        a = tl.load(row_s + offs_v[None, :] * s_sv, mask=ok, other=0.0).to(cdt)
        b = tl.load(row_t + offs_v[None, :] * t_sv, mask=ok, other=0.0).to(cdt)
        if FP64:
            a = a / tau
            b = b / tau
        else:
            a = tl.div_rn(a, tau)
            b = tl.div_rn(b, tau)
        log_p_s = (a - m_s) - l_s  # max first, then the small log-sum-exp (see distill/kl.py)
        log_p_t = (b - m_t) - l_t
        p_t = tl.exp(log_p_t)
        # p_T == 0 contributes 0 (x log x -> 0), also where both logits are -inf and diff is nan
        acc += tl.where(ok & (p_t > 0), p_t * (log_p_t - log_p_s), 0.0)
    tl.store(out_ptr + offs_t, tl.reduce(acc, 1, tl.standard._sum_combine), mask=t_ok)


def _kl_grad_kernel(s_ptr, t_ptr, tau_ptr, st_ptr, g_ptr, out_ptr, C, V, s_st, s_sv, t_st, t_sv,
                    st_sr, st_st, o_st, o_sv, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    cdt = st_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < C
    row_s = s_ptr + offs_t.to(tl.int64)[:, None] * s_st
    row_t = t_ptr + offs_t.to(tl.int64)[:, None] * t_st
    row_o = out_ptr + offs_t.to(tl.int64)[:, None] * o_st
    m_s = tl.load(st_ptr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]  # [BLOCK_T, 1]
    m_t = tl.load(st_ptr + st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    l_s = tl.load(st_ptr + 2 * st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    l_t = tl.load(st_ptr + 3 * st_sr + offs_t * st_st, mask=t_ok, other=0.0)[:, None]
    tau = tl.load(tau_ptr)
    g = tl.load(g_ptr + offs_t, mask=t_ok, other=0.0).to(cdt)
    if FP64:
        g = g / tau
    else:
        g = tl.div_rn(g, tau)
    g = g[:, None]  # [BLOCK_T, 1] grad_kl / τ
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = t_ok[:, None] & (offs_v < V)[None, :]
        a = tl.load(row_s + offs_v[None, :] * s_sv, mask=ok, other=0.0).to(cdt)
        b = tl.load(row_t + offs_v[None, :] * t_sv, mask=ok, other=0.0).to(cdt)
        if FP64:
            a = a / tau
            b = b / tau
        else:
            a = tl.div_rn(a, tau)
            b = tl.div_rn(b, tau)
        p_s = tl.exp((a - m_s) - l_s)
        p_t = tl.exp((b - m_t) - l_t)
        tl.store(row_o + offs_v[None, :] * o_sv, (p_s - p_t) * g, mask=ok)  # cast to out's dtype


_JITTED: dict = {}


def _kernels(interpret: bool):
    """The jitted kernels for the current TRITON_INTERPRET mode (decorated once per mode)."""
    if interpret not in _JITTED:
        _JITTED[interpret] = tuple(triton.jit(k) for k in (_kl_max_kernel, _kl_sumexp_kernel,
                                                           _kl_kl_kernel, _kl_grad_kernel))
    return _JITTED[interpret]


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------
def triton_available() -> bool:
    return triton is not None


def _interpret_mode() -> bool:
    """What triton.jit would do now (it reads TRITON_INTERPRET when it decorates)."""
    from .activation_stats import _interpret_mode as mode
    return mode()


def _check_triton(x: torch.Tensor, what: str) -> bool:
    """Raise if the kernels cannot run on x's device; -> whether they run interpreted."""
    if triton is None:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package, which failed to "
                           f"import ({_TRITON_ERROR!r}); install it (pip install triton) or use "
                           "backend='torch'")
    interpret = _interpret_mode()
    if not x.is_cuda and not interpret:
        raise RuntimeError(f"{what}: backend='triton' on a {x.device} tensor needs "
                           "TRITON_INTERPRET=1 (the slow CPU interpreter, meant for tests); "
                           "use backend='torch' (or 'auto') on CPU")
    return interpret


def resolve_backend(x: torch.Tensor, backend: str = "auto", what: str = "vocab_parallel_kl") -> str:
    """'torch' or 'triton' for logits ``x``, checked before any work: a bad name or a forced
    'triton' that cannot run here raises (ValueError / RuntimeError naming the fix)."""
    from .activation_stats import _truthy

    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{what}: backend={backend!r}: expected 'auto', 'torch' or 'triton'")
    if backend == "triton":
        _check_triton(x, what)
        return "triton"
    if backend == "torch" or triton is None:
        return "torch"
    if x.is_cuda:
        return "triton"
    return "triton" if _truthy("MEGATRON_PRUNE_TRITON") and _interpret_mode() else "torch"


# ----------------------------------------------------------------------------------------------
# Launchers: the reference's signatures, plus optional block sizes
# ----------------------------------------------------------------------------------------------
def _launch(s: torch.Tensor, stats_dtype: torch.dtype, temperature: float,
            block_t: Optional[int], block_v: Optional[int]):
    """-> (kernels, grid, tau tensor, constexprs) for a [c, Vl] chunk."""
    interpret = _check_triton(s, "vocab_parallel_kl")
    c, v = s.shape
    # interpreter: few large tiles (its cost is per tile op); GPU: one token per program, a
    # register-sized vocabulary tile (not tuned on hardware yet)
    bt = block_t or (min(16, triton.next_power_of_2(max(c, 1))) if interpret else 1)
    bv = block_v or (min(1024, triton.next_power_of_2(v)) if interpret else 1024)
    tau = torch.full((1,), temperature, dtype=stats_dtype, device=s.device)
    meta = dict(FP64=stats_dtype == torch.float64, BLOCK_T=bt, BLOCK_V=bv)
    return _kernels(interpret), (triton.cdiv(c, bt),), tau, meta


def _check_chunk(s: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> None:
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(f"a chunk is a pair of [c, Vl] shards, got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compute dtype must be float32 or float64, got {dtype}")


@torch.no_grad()
def chunk_max_triton(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype, *,
                     block_t: Optional[int] = None, block_v: Optional[int] = None) -> torch.Tensor:
    """Local per-token max of s/τ and t/τ: [c, Vl] x2 -> [2, c] in ``dtype`` (= `_chunk_max`)."""
    _check_chunk(s, t, dtype)
    out = torch.empty(2, s.shape[0], dtype=dtype, device=s.device)  # [2, c]
    if s.shape[0] == 0:
        return out
    k, grid, tau, meta = _launch(s, dtype, temperature, block_t, block_v)
    k[0][grid](s, t, tau, out, s.shape[0], s.shape[1], s.stride(0), s.stride(1), t.stride(0),
               t.stride(1), out.stride(0), out.stride(1), **meta)
    return out


@torch.no_grad()
def chunk_sumexp_triton(s: torch.Tensor, t: torch.Tensor, temperature: float, maxes: torch.Tensor, *,
                        block_t: Optional[int] = None, block_v: Optional[int] = None) -> torch.Tensor:
    """Local per-token sum of exp(x/τ - max) for x = s, t: maxes [2, c] -> [2, c] (= `_chunk_sumexp`)."""
    _check_chunk(s, t, maxes.dtype)
    out = torch.empty_like(maxes, memory_format=torch.contiguous_format)  # [2, c]
    if s.shape[0] == 0:
        return out
    k, grid, tau, meta = _launch(s, maxes.dtype, temperature, block_t, block_v)
    k[1][grid](s, t, tau, maxes, out, s.shape[0], s.shape[1], s.stride(0), s.stride(1),
               t.stride(0), t.stride(1), maxes.stride(0), maxes.stride(1), out.stride(0),
               out.stride(1), **meta)
    return out


@torch.no_grad()
def chunk_kl_triton(s: torch.Tensor, t: torch.Tensor, temperature: float, stats: torch.Tensor, *,
                    block_t: Optional[int] = None, block_v: Optional[int] = None) -> torch.Tensor:
    """Local per-token sum of p_T (log p_T - log p_S): stats [4, c] -> [c] (= `_chunk_kl`)."""
    _check_chunk(s, t, stats.dtype)
    out = torch.empty(s.shape[0], dtype=stats.dtype, device=s.device)  # [c]
    if s.shape[0] == 0:
        return out
    k, grid, tau, meta = _launch(s, stats.dtype, temperature, block_t, block_v)
    k[2][grid](s, t, tau, stats, out, s.shape[0], s.shape[1], s.stride(0), s.stride(1),
               t.stride(0), t.stride(1), stats.stride(0), stats.stride(1), **meta)
    return out


@torch.no_grad()
def chunk_grad_triton(s: torch.Tensor, t: torch.Tensor, temperature: float, stats: torch.Tensor,
                      grad_kl: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                      block_t: Optional[int] = None, block_v: Optional[int] = None) -> torch.Tensor:
    """grad_kl * (p_S - p_T) / τ: stats [4, c], grad_kl [c] (already times any τ² scale) -> [c, Vl]
    (= `_chunk_grad`). Written into ``out`` ([c, Vl], any float dtype: the student's, so the
    backward makes no temporaries) when given, else into a new tensor of the compute dtype."""
    _check_chunk(s, t, stats.dtype)
    if out is None:
        out = torch.empty(s.shape, dtype=stats.dtype, device=s.device)  # [c, Vl]
    elif out.shape != s.shape:
        raise ValueError(f"out {tuple(out.shape)} must have the chunk's shape {tuple(s.shape)}")
    if s.shape[0] == 0:
        return out
    grad_kl = grad_kl.to(stats.dtype).contiguous()  # [c]
    k, grid, tau, meta = _launch(s, stats.dtype, temperature, block_t, block_v)
    k[3][grid](s, t, tau, stats, grad_kl, out, s.shape[0], s.shape[1], s.stride(0), s.stride(1),
               t.stride(0), t.stride(1), stats.stride(0), stats.stride(1), out.stride(0),
               out.stride(1), **meta)
    return out
