"""Megatron's fused layouts (grouped QKV, [gate; up] fc1) against an independent row-by-row build."""
import pytest
import torch

from megatron_prune.convert import layout


@pytest.mark.parametrize("nq,ng,d,H", [(4, 2, 8, 32), (9, 3, 4, 12), (6, 1, 5, 7), (4, 4, 3, 12)])
def test_group_qkv_puts_each_groups_query_heads_then_key_then_value(nq, ng, d, H):
    q, k, v = torch.randn(nq * d, H), torch.randn(ng * d, H), torch.randn(ng * d, H)
    fused = layout.group_qkv(q, k, v, ng, d)
    assert fused.shape == ((nq + 2 * ng) * d, H)
    per = nq // ng
    expected = []
    for g in range(ng):
        for head in range(g * per, (g + 1) * per):
            expected.append(q[head * d:(head + 1) * d])
        expected.append(k[g * d:(g + 1) * d])
        expected.append(v[g * d:(g + 1) * d])
    assert torch.equal(fused, torch.cat(expected))


@pytest.mark.parametrize("nq,ng,d", [(4, 2, 8), (6, 1, 5), (4, 4, 3)])
def test_split_qkv_inverts_group_qkv_for_weights_and_biases(nq, ng, d):
    for rest in [(10,), ()]:
        q, k, v = torch.randn(nq * d, *rest), torch.randn(ng * d, *rest), torch.randn(ng * d, *rest)
        q2, k2, v2 = layout.split_qkv(layout.group_qkv(q, k, v, ng, d), nq, ng, d)
        assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_split_pieces_do_not_alias_the_fused_tensor():
    # With a single group the query block is a contiguous view; safetensors would refuse to save it.
    fused = torch.randn((4 + 2) * 3, 5)
    pieces = [*layout.split_qkv(fused, 4, 1, 3), *layout.split_gate_up(torch.randn(8, 5))]
    for piece in pieces[:3]:
        assert piece.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
    assert all(p.is_contiguous() for p in pieces)


def test_fc1_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = layout.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = layout.split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
