"""The Triton kernels of the vocab-parallel KL (run by the CPU interpreter) against their PyTorch
references (distill/kl.py's per-chunk functions), and `vocab_parallel_kl(backend="triton")` against
the full-vocabulary float64 definition, value and student gradient.

TRITON_INTERPRET=1 is set by a module fixture, as in test_kernels_activation_stats.py: the kernels
are decorated at first use and call only triton builtins, so the interpreter is honoured although
triton was imported earlier in the session. test_kernels_compile_for_a_gpu_in_a_fresh_process
checks that the same kernels also compile for a real GPU (the interpreter accepts code the compiler
rejects).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_prune.distill import reference_kl, vocab_parallel_kl
from megatron_prune.kernels import kl as K

needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _logits(seed: int, shape, kind: str = "normal", dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "huge":  # uniform in [-1e3, 1e3]: exp overflows without the max, most p underflow to 0
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 2e3 - 1e3
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    return x.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------------ each kernel = its reference
# (tokens, vocab, block_t, block_v): vocab a multiple of the block or not, tokens likewise
SHAPES = [(8, 256, 4, 128), (7, 300, 4, 128)]


@needs_triton
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["normal", "huge"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_each_kernel_equals_its_torch_reference(shape, kind, tau):
    c, v, bt, bv = shape
    s, t = _logits(0, (c, v), kind), _logits(1, (c, v), kind)  # [c, Vl] float32
    blocks = dict(block_t=bt, block_v=bv)
    m = K.chunk_max_triton(s, t, tau, torch.float32, **blocks)  # [2, c]
    m_ref = K.chunk_max_reference(s, t, tau, torch.float32)
    assert torch.equal(m, m_ref)  # a max and one rounded division: exact
    se = K.chunk_sumexp_triton(s, t, tau, m_ref, **blocks)  # [2, c]
    se_ref = K.chunk_sumexp_reference(s, t, tau, m_ref)
    assert _rel(se, se_ref) <= 1e-5, _rel(se, se_ref)
    stats = torch.cat([m_ref, se_ref.log()])  # [4, c]
    kl = K.chunk_kl_triton(s, t, tau, stats, **blocks)  # [c]
    kl_ref = K.chunk_kl_reference(s, t, tau, stats)
    assert _rel(kl, kl_ref) <= 1e-5, _rel(kl, kl_ref)
    g = _logits(2, (c,))  # upstream gradient, per token
    grad = K.chunk_grad_triton(s, t, tau, stats, g, **blocks)  # [c, Vl]
    grad_ref = K.chunk_grad_reference(s, t, tau, stats, g)
    assert _rel(grad, grad_ref) <= 1e-5, _rel(grad, grad_ref)
    out = torch.full((c, v), float("nan"), dtype=torch.bfloat16)  # straight into the student dtype
    assert K.chunk_grad_triton(s, t, tau, stats, g, out=out, **blocks) is out
    # to bf16 precision: the interpreter's fp32 -> bf16 store truncates (rounds toward zero) where
    # torch rounds to nearest, so up to one bf16 ulp apart; on GPU the store rounds to nearest
    assert _rel(out.float(), grad_ref) <= 2**-7, _rel(out.float(), grad_ref)


@needs_triton
def test_kernels_read_strided_low_precision_and_float64_shards():
    base = _logits(3, (6, 2 * 150), dtype=torch.bfloat16)
    s = base[:, ::2]  # [6, 150] bf16, vocabulary stride 2
    t = _logits(4, (150, 6), dtype=torch.bfloat16).t()  # [6, 150], token stride 1
    for x, y, dtype in ((s, t, torch.float32), (s.double(), t.double(), torch.float64)):
        m = K.chunk_max_triton(x, y, 2.5, dtype, block_v=64)
        assert m.dtype == dtype and torch.equal(m, K.chunk_max_reference(x, y, 2.5, dtype))
        se = K.chunk_sumexp_reference(x, y, 2.5, m)
        stats = torch.cat([m, se.log()])
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert _rel(K.chunk_sumexp_triton(x, y, 2.5, m, block_v=64), se) <= tol
        assert _rel(K.chunk_kl_triton(x, y, 2.5, stats, block_v=64),
                    K.chunk_kl_reference(x, y, 2.5, stats)) <= tol
        g = torch.ones(6, dtype=dtype)
        assert _rel(K.chunk_grad_triton(x, y, 2.5, stats, g, block_v=64),
                    K.chunk_grad_reference(x, y, 2.5, stats, g)) <= tol


@needs_triton
def test_a_nan_logit_shows_in_the_max_as_with_torch():
    s, t = _logits(5, (4, 40)), _logits(6, (4, 40))
    s[1, 7] = float("nan")
    m = K.chunk_max_triton(s, t, 1.0, torch.float32, block_v=16)
    assert m[0, 1].isnan() and not m[0, [0, 2, 3]].isnan().any() and not m[1].isnan().any()
    assert torch.equal(m.isnan(), K.chunk_max_reference(s, t, 1.0, torch.float32).isnan())


# ------------------------------------------------------------------------ the loss on the kernels
def _oracle(student, teacher, tau, weights):
    s = student.detach().double().requires_grad_()
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(teacher.double() / tau, -1),
                  log_target=True, reduction="none").sum(-1)
    (grad,) = torch.autograd.grad((kl * weights).sum(), s)
    return kl.detach(), grad


def _ours(student, teacher, tau, weights, **kw):
    s = student.detach().clone().requires_grad_()
    kl = vocab_parallel_kl(s, teacher, tp_group=None, temperature=tau, **kw)
    (grad,) = torch.autograd.grad((kl * weights).sum(), s)
    return kl.detach(), grad


@needs_triton
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["normal", "huge"])
def test_triton_backend_equals_the_reference_kl_and_its_gradient(kind, tau):
    student, teacher = _logits(7, (4, 2, 300), kind), _logits(8, (4, 2, 300), kind)  # [s, b, V]
    weights = _logits(9, (4, 2), dtype=torch.float64)
    ref_kl, ref_grad = _oracle(student, teacher, tau, weights)
    assert _rel(reference_kl(student, teacher, tau), ref_kl) <= 1e-12
    kl, grad = _ours(student, teacher, tau, weights, chunk_tokens=3, backend="triton")  # 3 chunks
    assert kl.dtype == grad.dtype == torch.float32 and grad.shape == student.shape
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert _rel(kl, ref_kl.float()) <= 1e-5, _rel(kl, ref_kl.float())
    assert _rel(grad, ref_grad.float()) <= 1e-5, _rel(grad, ref_grad.float())
    kl_t, grad_t = _ours(student, teacher, tau, weights, chunk_tokens=3, backend="torch")
    assert _rel(kl, kl_t) <= 1e-5 and _rel(grad, grad_t) <= 1e-5


@needs_triton
def test_triton_backend_scaling_bf16_float64_and_no_tokens():
    student, teacher = _logits(10, (5, 97)), _logits(11, (5, 97))
    w = torch.ones(5, dtype=torch.float64)
    ref_kl, ref_grad = _oracle(student, teacher, 2.5, w)
    kl, grad = _ours(student, teacher, 2.5, w, scale_by_temperature_squared=True, backend="triton")
    assert _rel(kl, 6.25 * ref_kl.float()) <= 1e-5 and _rel(grad, 6.25 * ref_grad.float()) <= 1e-5
    sb, tb = student.bfloat16(), teacher.bfloat16()
    ref_kl, ref_grad = _oracle(sb, tb, 2.0, w)  # of the same bf16 values
    kl, grad = _ours(sb, tb, 2.0, w, backend="triton")
    assert kl.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert _rel(kl, ref_kl.float()) <= 1e-5 and _rel(grad.float(), ref_grad.float()) <= 1e-2
    kl, grad = _ours(student.double(), teacher.double(), 2.5, w, chunk_tokens=2, backend="triton")
    ref_kl, ref_grad = _oracle(student, teacher, 2.5, w)
    assert kl.dtype == torch.float64 and _rel(kl, ref_kl) <= 1e-12 and _rel(grad, ref_grad) <= 1e-12
    empty = torch.zeros(0, 3, 11, requires_grad=True)
    out = vocab_parallel_kl(empty, torch.zeros(0, 3, 11), tp_group=None, backend="triton")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert empty.grad.shape == (0, 3, 11)


@needs_triton
def test_the_triton_backend_runs_the_kernels(monkeypatch):
    calls = []
    for name in ("chunk_max_triton", "chunk_sumexp_triton", "chunk_kl_triton", "chunk_grad_triton"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    s = _logits(12, (6, 50)).requires_grad_()
    kl = vocab_parallel_kl(s, _logits(13, (6, 50)), tp_group=None, chunk_tokens=4, backend="triton")
    kl.sum().backward()
    assert calls == ["chunk_max_triton", "chunk_sumexp_triton", "chunk_kl_triton"] * 2 + ["chunk_grad_triton"]


# ------------------------------------------------------------------------ backend choice and errors
def test_a_bad_backend_name_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"vocab_parallel_kl: backend='cuda': expected 'auto', "
                                         r"'torch' or 'triton'"):
        vocab_parallel_kl(torch.randn(4, 10), torch.randn(4, 10), tp_group=None, backend="cuda")


@needs_triton
def test_forced_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="vocab_parallel_kl: backend='triton' on a cpu tensor "
                                           "needs TRITON_INTERPRET=1"):
        vocab_parallel_kl(torch.randn(4, 10), torch.randn(4, 10), tp_group=None, backend="triton")


def test_without_triton_auto_falls_back_and_forced_triton_says_why(monkeypatch):
    monkeypatch.setattr(K, "triton", None)
    monkeypatch.setattr(K, "_TRITON_ERROR", ImportError("No module named 'triton'"))
    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert K.resolve_backend(s) == "torch"
    assert _rel(vocab_parallel_kl(s, t, tp_group=None).double(), reference_kl(s, t)) <= 1e-5
    with pytest.raises(RuntimeError, match="needs the triton package.*No module named 'triton'"):
        vocab_parallel_kl(s, t, tp_group=None, backend="triton")


def test_auto_uses_torch_on_cpu_unless_both_variables_ask(monkeypatch):
    x = torch.ones(2, 3)
    monkeypatch.delenv("MEGATRON_PRUNE_TRITON", raising=False)
    assert K.resolve_backend(x) == "torch" and K.resolve_backend(x, "torch") == "torch"
    monkeypatch.setenv("MEGATRON_PRUNE_TRITON", "1")
    assert K.resolve_backend(x) == ("triton" if K.triton_available() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.resolve_backend(x) == "torch"


# ------------------------------------------------------------------------ compiled mode
_FRESH_PROCESS = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from megatron_prune.kernels import kl as K

    def ptx(fn, ptrs, ints, meta):
        sig = dict(ptrs, **{n: "i32" for n in ints}, **{n: "constexpr" for n in meta})
        return triton.compile(ASTSource(JITFunction(fn), sig, meta),
                              target=GPUTarget("cuda", 80, 32)).asm["ptx"]

    st = ["s_st", "s_sv", "t_st", "t_sv"]
    for x, c, fp64 in (("*bf16", "*fp32", False), ("*fp64", "*fp64", True)):
        meta = {"FP64": fp64, "BLOCK_T": 1, "BLOCK_V": 1024}
        io = dict(s_ptr=x, t_ptr=x, tau_ptr=c)
        code = [ptx(K._kl_max_kernel, dict(io, out_ptr=c), ["C", "V"] + st + ["o_sr", "o_st"], meta),
                ptx(K._kl_sumexp_kernel, dict(io, max_ptr=c, out_ptr=c),
                    ["C", "V"] + st + ["m_sr", "m_st", "o_sr", "o_st"], meta),
                ptx(K._kl_kl_kernel, dict(io, st_ptr=c, out_ptr=c), ["C", "V"] + st + ["st_sr", "st_st"],
                    meta),
                ptx(K._kl_grad_kernel, dict(io, st_ptr=c, g_ptr=c, out_ptr=x),
                    ["C", "V"] + st + ["st_sr", "st_st", "o_st", "o_sv"], meta)]
        if not fp64:  # IEEE division by the temperature, NaN-propagating running max
            assert all("div.rn.f32" in p for p in code), "division by tau should be rounded"
            assert "max.NaN.f32" in code[0]
    print("FRESH-OK")
""")


@needs_triton
def test_kernels_compile_for_a_gpu_in_a_fresh_process(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, leave no cache behind
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True,
                       text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0 and "FRESH-OK" in r.stdout, r.stderr[-3000:]
