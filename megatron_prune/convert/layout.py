"""Megatron's fused tensor layouts, as pure functions on full (unsharded) tensors.

`linear_qkv` interleaves by query group: for each group g, its nq/ng query heads, then the group's
key head, then its value head (each head `kv_channels` rows). Megatron splits it back with
`view(..., ng, (nq/ng + 2) * d)` in `SelfAttention.get_query_key_value_tensors`, so this grouping
is what makes a TP shard own whole groups. `linear_fc1` of a gated MLP is `[gate; up]`: megatron's
SwiGLU applies the activation to the first half (`torch.chunk(x, 2, -1)[0]`).

Every function works for weights `[rows, H]` and biases `[rows]` alike (trailing dims ride along).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _owned(t: Tensor, base: Tensor) -> Tensor:
    """`t` as a tensor with its own storage: pieces of a fused tensor must not alias it, because
    safetensors refuses to save tensors that share memory and callers may free the fused one."""
    if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
        return t.clone()
    return t.contiguous()


def group_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int, kv_channels: int) -> Tensor:
    """[nq*d, ...], [ng*d, ...], [ng*d, ...] -> megatron's grouped [(nq + 2*ng) * d, ...]."""
    ng, d = num_query_groups, kv_channels
    rest = q.shape[1:]
    q = q.reshape(ng, -1, d, *rest)  # [ng, nq/ng, d, ...]
    k = k.reshape(ng, 1, d, *rest)  # [ng, 1, d, ...]
    v = v.reshape(ng, 1, d, *rest)  # [ng, 1, d, ...]
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [ng * (nq/ng + 2) * d, ...]


def split_qkv(qkv: Tensor, num_attention_heads: int, num_query_groups: int,
              kv_channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `group_qkv`: grouped [(nq + 2*ng) * d, ...] -> q [nq*d, ...], k, v [ng*d, ...]."""
    nq, ng, d = num_attention_heads, num_query_groups, kv_channels
    per = nq // ng
    rest = qkv.shape[1:]
    x = qkv.reshape(ng, per + 2, d, *rest)  # [ng, nq/ng + 2, d, ...]
    q = x[:, :per].reshape(nq * d, *rest)
    k = x[:, per].reshape(ng * d, *rest)
    v = x[:, per + 1].reshape(ng * d, *rest)
    return _owned(q, qkv), _owned(k, qkv), _owned(v, qkv)


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """[F, ...], [F, ...] -> megatron's gated linear_fc1 [2F, ...]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """[2F, ...] -> gate [F, ...], up [F, ...]."""
    gate, up = fc1.chunk(2, dim=0)
    return _owned(gate, fc1), _owned(up, fc1)


def transpose(w: Tensor) -> Tensor:
    """HF GPT-2 `Conv1D` keeps weights as [in, out]; megatron's linears are [out, in]."""
    return w.t().contiguous()
