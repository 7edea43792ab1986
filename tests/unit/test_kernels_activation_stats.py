"""Per-channel / per-head activation statistics: the Triton kernels (run by the CPU interpreter)
against float64 oracles computed from the same low-precision values, and the PyTorch reference
against the direct definition.

TRITON_INTERPRET=1 is set by a module fixture, not at import: the kernels are decorated at first
use and call only triton builtins, so the interpreter is honoured even when triton was imported
earlier in the session (megatron-core and torch._dynamo import it) and the variable is not leaked
into the test modules that run after this one. test_triton_mode_and_gpu_build_in_a_fresh_process
checks that import order, and that the kernels compile for a real GPU, in a clean process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_prune.kernels import activation_stats as A
from megatron_prune.kernels.activation_stats import (ChannelStats, HeadStats, channel_stats,
                                                     channel_stats_reference, channel_stats_triton,
                                                     head_stats, head_stats_reference,
                                                     head_stats_triton, resolve_backend)

needs_triton = pytest.mark.skipif(not A.triton_available(), reason="triton is not installed")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


# ------------------------------------------------------------------------------- oracles / data
def oracle_channel(x, mask=None):
    """The definition, in float64, from the same (possibly bf16) values."""
    xd = x.reshape(-1, x.shape[-1]).double()  # [T, C]
    if mask is not None:
        xd = xd[mask.reshape(-1) != 0]
    mx = xd.abs().amax(0) if len(xd) else torch.zeros(xd.shape[1], dtype=torch.float64)
    return {"sum_sq": (xd ** 2).sum(0), "sum_abs": xd.abs().sum(0), "max_abs": mx}, len(xd)


def oracle_head(x, mask=None):
    xd = x.reshape(-1, *x.shape[-2:]).double()  # [T, H, D]
    if mask is not None:
        xd = xd[mask.reshape(-1) != 0]
    n = xd.norm(dim=-1)  # [T, H]
    mx = n.amax(0) if len(n) else torch.zeros(xd.shape[1], dtype=torch.float64)
    return {"sum_norm": n.sum(0), "sum_sq_norm": (n ** 2).sum(0), "max_norm": mx}, len(n)


def assert_matches(stats, oracle, *, exact_max: bool, rtol=1e-5):
    want, count = oracle
    assert stats.count == count
    for name, w in want.items():
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == w.shape, name
        if name.startswith("max") and exact_max:  # the max of fp32-exact values is exact
            assert torch.equal(got.double(), w), name
        else:
            torch.testing.assert_close(got.double(), w, rtol=rtol, atol=1e-6, msg=name)


def ragged_batch(shape, dtype, seed=0):
    """x with large values on the ragged edges, and a mask that drops a whole 16-token block
    (tokens 16..31), scattered tokens, and tokens that hold inf / nan / huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.reshape(shape[0], -1)[:, -1] += 50.0  # last channel / last head element: dropping it fails
    x[-1] += 40.0  # last token is kept: dropping it fails
    mask = torch.rand(shape[0], generator=g) > 0.25
    mask[16:32] = False
    mask[-1] = True
    poison = (~mask).nonzero().flatten()
    x[poison[0::3]] = 1e4
    x[poison[1::3]] = float("inf")
    x[poison[2::3]] = float("nan")
    return x.to(dtype), mask


# ---------------------------------------------------------------------------- reference
def test_reference_equals_the_direct_definition_in_float64():
    x, mask = ragged_batch((37, 75), torch.bfloat16)
    got = channel_stats_reference(x, mask)
    assert_matches(got, oracle_channel(x, mask), exact_max=True, rtol=2e-6)
    keep = mask[:, None].double()
    xd = torch.where(mask[:, None], x.double(), 0.0)
    torch.testing.assert_close(got.sum_sq.double(), (xd ** 2 * keep).sum(0), rtol=2e-6, atol=0)
    h, hmask = ragged_batch((37, 5, 24), torch.float16, seed=1)
    assert_matches(head_stats_reference(h, hmask), oracle_head(h, hmask), exact_max=False,
                   rtol=2e-6)


@pytest.mark.parametrize("elems", [64, 375])  # tokens per chunk: 1 and 5 (C=75); 1 and 3 (H*D=120)
def test_reference_over_several_scratch_chunks(monkeypatch, elems):
    monkeypatch.setattr(A, "_REF_CHUNK_ELEMS", elems)  # 37 tokens: a ragged last chunk
    x, mask = ragged_batch((37, 75), torch.bfloat16)
    assert_matches(channel_stats_reference(x, mask), oracle_channel(x, mask), exact_max=True)
    h, hmask = ragged_batch((37, 5, 24), torch.bfloat16)
    assert_matches(head_stats_reference(h, hmask), oracle_head(h, hmask), exact_max=False)


# ---------------------------------------------------------------------------- triton vs oracle
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_channel_stats_on_ragged_blocks_and_masked_tokens(dtype):
    x, mask = ragged_batch((37, 75), dtype)  # 37 = 2*16 + 5 tokens, 75 = 2*32 + 11 channels
    got = channel_stats_triton(x, mask, block_t=16, block_c=32, num_splits=2)
    assert_matches(got, oracle_channel(x, mask), exact_max=True)
    unmasked = x.clone()
    unmasked[~mask] = 1.0
    assert_matches(channel_stats_triton(unmasked, None, block_t=16, block_c=32),
                   oracle_channel(unmasked), exact_max=True)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_head_stats_on_ragged_blocks_and_masked_tokens(dtype):
    x, mask = ragged_batch((37, 5, 24), dtype)  # 5 heads in blocks of 2, D=24 in blocks of 16
    got = head_stats_triton(x, mask, block_t=16, block_h=2, block_d=16, num_splits=2)
    assert_matches(got, oracle_head(x, mask), exact_max=False)
    assert_matches(head_stats(x, mask, backend="torch"), oracle_head(x, mask), exact_max=False)


@needs_triton
def test_triton_reads_strided_and_megatron_shaped_inputs():
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(75, 37, generator=g).bfloat16().t()  # [T, C] with channel stride 37
    assert xt.stride() == (1, 37)
    assert_matches(channel_stats_triton(xt, None, block_t=16, block_c=32), oracle_channel(xt),
                   exact_max=True)
    x = torch.randn(13, 3, 70, generator=g).bfloat16()  # [s, b, C], default (interpreter) blocks
    mask = torch.rand(13, 3, generator=g) > 0.3  # [s, b]
    assert_matches(channel_stats_triton(x, mask), oracle_channel(x, mask), exact_max=True)
    h = torch.randn(13, 3, 6, 20, generator=g).half()  # [s, b, H, D]
    assert_matches(head_stats_triton(h, mask), oracle_head(h, mask), exact_max=False)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_all_tokens_masked_gives_zeros_and_count_zero(backend):
    x = torch.full((20, 3, 40), float("inf")).bfloat16()  # [s, b, C], every value poisoned
    none = torch.zeros(20, 3, dtype=torch.bool)
    c = channel_stats(x, none, backend=backend)
    assert c.count == 0 and c.sum_sq.shape == (40,)
    for t in (c.sum_sq, c.sum_abs, c.max_abs):
        assert torch.equal(t, torch.zeros(40))
    h = head_stats(x.reshape(20, 3, 4, 10), none.float(), backend=backend)
    assert h.count == 0
    for t in (h.sum_norm, h.sum_sq_norm, h.max_norm):
        assert torch.equal(t, torch.zeros(4))
    empty = channel_stats(torch.empty(0, 5), backend=backend)  # no tokens at all
    assert empty.count == 0 and torch.equal(empty.max_abs, torch.zeros(5))
    no_channels = channel_stats(torch.empty(4, 0), backend=backend)
    assert no_channels.count == 4 and no_channels.sum_sq.shape == (0,)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_a_nan_in_a_kept_token_shows_in_every_statistic(backend):
    x = torch.randn(20, 40).bfloat16()
    x[7, 5] = float("nan")
    c = channel_stats(x, None, backend=backend)
    assert c.sum_sq[5].isnan() and c.sum_abs[5].isnan() and c.max_abs[5].isnan()
    assert not c.max_abs[:5].isnan().any() and not c.sum_sq[6:].isnan().any()
    h = head_stats(x.reshape(20, 4, 10), None, backend=backend)
    assert h.max_norm[0].isnan() and h.sum_norm[0].isnan() and not h.max_norm[1:].isnan().any()


# ---------------------------------------------------------------------------- merge
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_merging_two_halves_equals_the_whole(backend):
    x, mask = ragged_batch((37, 4, 16), torch.bfloat16)  # as heads [T, 4, 16]; as channels [T, 64]
    for fn, flat in ((channel_stats, x.reshape(37, 64)), (head_stats, x)):
        whole = fn(flat, mask, backend=backend)
        first = fn(flat[:20], mask[:20], backend=backend)
        second = fn(flat[20:], mask[20:], backend=backend)
        before = first.clone()
        merged = first.merge(second)
        for name in whole._SUMS + whole._MAXES:  # merge leaves its inputs alone
            assert torch.equal(getattr(first, name), getattr(before, name))
        acc = type(whole).zeros(getattr(whole, whole._SUMS[0]).shape[0])
        acc.accumulate(first).accumulate(second)
        for got in (merged, acc):
            assert got.count == whole.count
            for name in whole._SUMS:
                torch.testing.assert_close(getattr(got, name), getattr(whole, name), rtol=1e-6,
                                           atol=1e-6)
            for name in whole._MAXES:
                assert torch.equal(getattr(got, name), getattr(whole, name))


def test_merge_rejects_statistics_of_different_widths_or_kinds():
    with pytest.raises(ValueError, match=r"ChannelStats.sum_sq: shapes \(8,\) and \(4,\)"):
        ChannelStats.zeros(8).accumulate(ChannelStats.zeros(4))
    with pytest.raises(TypeError, match="HeadStats with ChannelStats"):
        HeadStats.zeros(4).merge(ChannelStats.zeros(4))
    assert ChannelStats.REDUCE_OPS["max_abs"] == "max" and HeadStats.REDUCE_OPS["sum_norm"] == "sum"


# ---------------------------------------------------------------------------- layout and inputs
def test_leading_dims_flatten_in_row_major_order_and_a_transposed_mask_is_rejected():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 10, generator=g)  # [s, b, C]
    mask = torch.rand(6, 4, generator=g) > 0.5  # [s, b]
    flat = channel_stats(x.reshape(24, 10), mask.reshape(24))
    for m in (mask, mask.reshape(24), mask.to(torch.float32)):
        got = channel_stats(x, m)
        assert got.count == flat.count and torch.equal(got.sum_sq, flat.sum_sq)
    with pytest.raises(ValueError, match=r"mask shape \(4, 6\).*\(6, 4\).*mask\.t\(\)"):
        channel_stats(x, mask.t())
    with pytest.raises(ValueError, match=r"mask shape \(6,\)"):
        head_stats(x.reshape(6, 4, 2, 5), mask[:, 0])


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        channel_stats(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[\.\.\., H, D\] with at least one token dimension"):
        head_stats(torch.ones(4, 3))
    with pytest.raises(ValueError, match="backend='cuda'"):
        channel_stats(torch.ones(4, 3), backend="cuda")


# ---------------------------------------------------------------------------- dispatch
def test_auto_backend_uses_triton_on_cpu_only_when_both_variables_ask(monkeypatch):
    x = torch.ones(2, 3)
    monkeypatch.delenv("MEGATRON_PRUNE_TRITON", raising=False)
    assert resolve_backend(x) == "torch"
    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    assert resolve_backend(x) == ("triton" if A.triton_available() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(x) == "torch"
    assert resolve_backend(x, "triton") == "triton" and resolve_backend(x, "torch") == "torch"


@needs_triton
def test_forced_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        channel_stats(torch.ones(4, 3), backend="triton")


def test_without_triton_auto_falls_back_and_forced_triton_says_why(monkeypatch):
    monkeypatch.setattr(A, "triton", None)
    monkeypatch.setattr(A, "_TRITON_ERROR", ImportError("No module named 'triton'"))
    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    x = torch.randn(5, 3)
    assert resolve_backend(x) == "torch"
    assert torch.equal(channel_stats(x).sum_sq, channel_stats_reference(x).sum_sq)
    with pytest.raises(RuntimeError, match="needs the triton package.*No module named 'triton'"):
        head_stats(x.reshape(5, 3, 1), backend="triton")


@needs_triton
def test_dispatcher_runs_the_kernel_when_asked(monkeypatch):
    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    calls = []
    real = A.channel_stats_triton
    monkeypatch.setattr(A, "channel_stats_triton", lambda *a: calls.append(1) or real(*a))
    x, mask = ragged_batch((37, 75), torch.bfloat16)
    assert_matches(channel_stats(x, mask), oracle_channel(x, mask), exact_max=True)
    assert calls == [1]


_FRESH_PROCESS = textwrap.dedent("""
    import os, torch
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # imported in compiled mode: tl.sum etc. are compiled-mode functions now
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from megatron_prune.kernels import activation_stats as A

    # 1. the kernels compile to a CUDA binary (the interpreter accepts code the compiler rejects)
    common = {"keep_ptr": "*i8", "T": "i32", "tokens_per_split": "i32", "HAS_MASK": "constexpr",
              "BLOCK_T": "constexpr"}
    sig = dict(common, x_ptr="*bf16", sq_ptr="*fp32", abs_ptr="*fp32", max_ptr="*fp32", C="i32",
               stride_t="i32", stride_c="i32", BLOCK_C="constexpr")
    src = ASTSource(JITFunction(A._channel_stats_kernel), sig,
                    {"HAS_MASK": True, "BLOCK_T": 32, "BLOCK_C": 128})
    ptx = triton.compile(src, target=GPUTarget("cuda", 80, 32)).asm["ptx"]
    assert "max.NaN.f32" in ptx, "the running max should propagate NaN"
    sig = dict(common, x_ptr="*fp16", n_ptr="*fp32", sq_ptr="*fp32", max_ptr="*fp32", H="i32",
               D="i32", stride_t="i32", stride_h="i32", stride_d="i32", BLOCK_H="constexpr",
               BLOCK_D="constexpr")
    src = ASTSource(JITFunction(A._head_stats_kernel), sig,
                    {"HAS_MASK": False, "BLOCK_T": 16, "BLOCK_H": 4, "BLOCK_D": 128})
    assert "sqrt.rn.f32" in triton.compile(src, target=GPUTarget("cuda", 80, 32)).asm["ptx"]

    # 2. TRITON_INTERPRET set after triton was imported still runs the kernels interpreted
    os.environ["TRITON_INTERPRET"] = "1"
    x = torch.randn(37, 75).bfloat16()
    got, want = A.channel_stats_triton(x, block_t=16, block_c=32), A.channel_stats_reference(x)
    torch.testing.assert_close(got.sum_sq, want.sum_sq, rtol=1e-5, atol=1e-5)
    print("FRESH-OK")
""")


@needs_triton
def test_triton_mode_and_gpu_build_in_a_fresh_process(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, leave no cache behind
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True,
                       text=True, timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
    assert r.returncode == 0 and "FRESH-OK" in r.stdout, r.stderr[-3000:]


# --------------------------------------------------------------------------- per-sample variants
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_per_sample_statistics_equal_the_oracle_of_each_sample(backend, dtype, monkeypatch):
    from megatron_prune.kernels.activation_stats import channel_stats_per_sample, head_stats_per_sample

    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    g = torch.Generator().manual_seed(7)
    s, b = 37, 4  # 37 tokens: not a multiple of any block size
    x = torch.randn(s, b, 75, generator=g).to(dtype)  # [s, b, C]
    h = torch.randn(s, b, 5, 24, generator=g).to(dtype)  # [s, b, H, D]
    mask = torch.rand(s, b, generator=g) > 0.3
    mask[:, 2] = False  # an all-padding sample: zeros, no count
    x[~mask] = float("inf")  # masked tokens must never leak, even as inf / nan
    h[~mask] = float("nan")
    if backend == "torch":  # several token chunks in the reference
        monkeypatch.setattr(A, "_REF_CHUNK_ELEMS", 5 * 4 * 75)
    cs = channel_stats_per_sample(x, mask, backend=backend)
    hs = head_stats_per_sample(h, mask, backend=backend)
    assert cs.sum_sq.shape == (b, 75) and hs.sum_norm.shape == (b, 5)
    assert cs.count == hs.count == int(mask.sum())
    for j in range(b):
        want, n = oracle_channel(x[:, j], mask[:, j])
        for name, w in want.items():
            assert torch.allclose(getattr(cs, name)[j].double(), w, rtol=1e-5, atol=1e-6), (j, name)
        want, n = oracle_head(h[:, j], mask[:, j])
        for name, w in want.items():
            assert torch.allclose(getattr(hs, name)[j].double(), w, rtol=1e-5, atol=1e-6), (j, name)
    assert not cs.sum_sq[2].any() and not hs.max_norm[2].any()


def test_per_sample_rejects_a_mask_of_the_wrong_shape():
    from megatron_prune.kernels.activation_stats import channel_stats_per_sample

    with pytest.raises(ValueError, match=r"mask must be \[s, b\] = \(4, 2\)"):
        channel_stats_per_sample(torch.zeros(4, 2, 3), torch.ones(2, 4))


def test_per_sample_fast_path_without_masked_tokens_equals_the_oracle():
    # fp32 and every token kept: the reference skips its scratch copy and fill; same numbers
    from megatron_prune.kernels.activation_stats import channel_stats_per_sample, head_stats_per_sample

    g = torch.Generator().manual_seed(8)
    x, h = torch.randn(29, 3, 40, generator=g), torch.randn(29, 3, 4, 16, generator=g)
    keep = torch.ones(29, 3)
    cs, hs = channel_stats_per_sample(x, keep, "torch"), head_stats_per_sample(h, keep, "torch")
    for j in range(3):
        for name, w in oracle_channel(x[:, j])[0].items():
            assert torch.allclose(getattr(cs, name)[j].double(), w, rtol=1e-5), (j, name)
        for name, w in oracle_head(h[:, j])[0].items():
            assert torch.allclose(getattr(hs, name)[j].double(), w, rtol=1e-5), (j, name)
    assert torch.equal(x, torch.randn(29, 3, 40, generator=torch.Generator().manual_seed(8)))  # untouched
