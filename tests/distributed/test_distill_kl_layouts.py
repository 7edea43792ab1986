"""The forward KL on vocab-parallel shards equals the single-process full-vocabulary reference (torch's
log_softmax + kl_div in float64) at TP2, for τ = 1 and τ != 1, with its student gradient gathered in
the test only; every rank of the TP group gets the same per-token KL; only per-token scalars cross the
wire (5 floats per token, the same for twice the vocabulary, nothing in backward, nothing at TP1).
Each rank cuts its shard from the same full logits, as megatron's output layer with
parallel_output=True splits the (padded) vocabulary into contiguous blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_prune.config import ParallelConfig

LAYOUTS = [(2, 1, 2), (1, 1, 2)]  # (tp, pp, world); (1, 1, 2) is DP2: a TP group of one
# name: (shape [s, b, V], temperature, chunk_tokens, scale_by_temperature_squared, magnitude, dtype)
CASES = {
    "tau1": ((8, 2, 96), 1.0, 5, False, 3.0, torch.float32),
    "tau2.5": ((8, 2, 96), 2.5, 4, False, 3.0, torch.float32),
    "tau2.5-scaled": ((8, 2, 96), 2.5, None, True, 3.0, torch.float32),
    "large": ((8, 2, 96), 1.0, 3, False, 1e3, torch.float32),  # most probabilities underflow to 0
    "large-tau0.5": ((8, 2, 96), 0.5, 7, False, 1e3, torch.float32),
    "float64": ((8, 2, 96), 2.0, 5, False, 3.0, torch.float64),
    "vocab2x": ((8, 2, 192), 1.0, 5, False, 3.0, torch.float32),  # same tokens, twice the vocabulary
}


def _full(name: str):
    """The full-vocabulary student, teacher and per-token loss weights of a case (float64 weights)."""
    shape, _, _, _, magnitude, dtype = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    student = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    teacher = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)
    if magnitude > 100:  # put each token's teacher max on the last rank's shard, far above rank 0's
        teacher[..., -1] = teacher.amax(-1) + 5.0
    weights = torch.randn(shape[:2], generator=g, dtype=torch.float64)
    return student, teacher, weights


def _kl_at(tp: int, pp: int) -> dict:
    from megatron_prune.distill import vocab_parallel_kl
    from megatron_prune.importance import CommCounter
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    out = {"layout": groups.layout, "tp_rank": groups.tp_rank, "tp_size": groups.tp_size}
    for name, (shape, tau, chunk, scaled, _, _) in CASES.items():
        student, teacher, weights = _full(name)
        width = shape[-1] // groups.tp_size
        lo = groups.tp_rank * width
        s = student[..., lo:lo + width].clone().requires_grad_()  # [s, b, V/tp]
        t = teacher[..., lo:lo + width].clone().requires_grad_()  # the teacher must stay gradient-free
        fwd, bwd = CommCounter(), CommCounter()
        kl = vocab_parallel_kl(s, t, tp_group=groups.tp, temperature=tau, chunk_tokens=chunk,
                               scale_by_temperature_squared=scaled, comm=fwd)  # [s, b]
        (kl * weights.to(kl.dtype)).sum().backward()
        out[name] = {"kl": kl.detach(), "grad": s.grad, "teacher_grad": t.grad, "fwd": fwd,
                     "bwd_bytes": bwd.bytes_sent}
    return out


def _reference(name: str):
    student, teacher, weights = _full(name)
    _, tau, _, scaled, _, _ = CASES[name]
    s = student.to(torch.float64).requires_grad_()
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(teacher.to(torch.float64) / tau, -1),
                  log_target=True, reduction="none").sum(-1)  # [s, b]
    if scaled:
        kl = kl * tau**2
    (grad,) = torch.autograd.grad((kl * weights).sum(), s)
    return kl.detach(), grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def results(pools):
    return {layout: pools.run(layout[2], _kl_at, layout[0], layout[1]) for layout in LAYOUTS}


def test_sharded_kl_and_gradient_equal_the_full_vocabulary_reference(results):
    worst = {}
    for name in CASES:
        ref_kl, ref_grad = _reference(name)
        for (tp, pp, world), per_rank in results.items():
            by_tp_rank = {}
            for rank, got in enumerate(per_rank):
                where = (name, got["layout"], rank)
                case = got[name]
                assert got["tp_size"] == tp, where
                assert case["teacher_grad"] is None, where
                assert _rel(case["kl"], ref_kl) <= 1e-5, (where, _rel(case["kl"], ref_kl))
                assert torch.equal(case["kl"], per_rank[0][name]["kl"]), where  # the same on every rank
                by_tp_rank.setdefault(got["tp_rank"], case["grad"])
                worst[name] = max(worst.get(name, 0.0), _rel(case["kl"], ref_kl))
            grad = torch.cat([by_tp_rank[r] for r in range(tp)], dim=-1)  # gathered here, in the test only
            assert _rel(grad, ref_grad) <= 1e-5, (name, tp, _rel(grad, ref_grad))
            worst[name + " grad"] = max(worst.get(name + " grad", 0.0), _rel(grad, ref_grad))
    print("max relative differences:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_only_per_token_scalars_cross_the_wire(results):
    for (tp, pp, world), per_rank in results.items():
        for got in per_rank:
            for name, (shape, _, chunk, _, _, dtype) in CASES.items():
                tokens, fwd = shape[0] * shape[1], got[name]["fwd"]
                assert got[name]["bwd_bytes"] == 0
                if tp == 1:
                    assert fwd.bytes_sent == 0 and fwd.collectives == 0, (name, got["layout"])
                    continue
                itemsize = torch.finfo(torch.promote_types(dtype, torch.float32)).bits // 8
                chunks = -(-tokens // (chunk or tokens))
                # per chunk: MAX of 2 maxes, SUM of 2 sums; then one SUM of the KL partials
                assert fwd.by_group == {"tp": 5 * tokens * itemsize}, (name, fwd.by_group)
                assert fwd.collectives == 2 * chunks + 1, (name, fwd.collectives)
            # O(1) in the vocabulary: twice the vocabulary sends the same bytes
            assert got["vocab2x"]["fwd"].bytes_sent == got["tau1"]["fwd"].bytes_sent
