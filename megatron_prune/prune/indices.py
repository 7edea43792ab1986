"""Where every element of a pruned canonical tensor comes from: per dimension, the OLD canonical
index of each NEW index. Shared by the reference (`reference.py`, full tensors) and the surgery
(`surgery.py`, TP/PP shards), so both apply exactly the same selection.

Canonical layouts (models/shard.py): the fused QKV rows are [G, H/G + 2, hn] (a group's query heads,
then its key and its value); SwiGLU fc1 rows are [gate (F); up (F)]; proj columns are [H, hn].
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from megatron_prune.prune.plan import PrunePlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")

# canonical name suffix (inside a layer) -> what each dim is: "hidden", "qkv", "heads" (proj input),
# "ffn_in" (fc1 rows), "ffn" (fc2 input), None (untouched)
_LAYER_DIMS: dict[str, tuple[Optional[str], ...]] = {
    "input_layernorm.weight": ("hidden",), "input_layernorm.bias": ("hidden",),
    "pre_mlp_layernorm.weight": ("hidden",), "pre_mlp_layernorm.bias": ("hidden",),
    "self_attention.linear_qkv.weight": ("qkv", "hidden"), "self_attention.linear_qkv.bias": ("qkv",),
    "self_attention.linear_proj.weight": ("hidden", "heads"), "self_attention.linear_proj.bias": ("hidden",),
    "mlp.linear_fc1.weight": ("ffn_in", "hidden"), "mlp.linear_fc1.bias": ("ffn_in",),
    "mlp.linear_fc2.weight": ("hidden", "ffn"), "mlp.linear_fc2.bias": ("hidden",),
}
_TOP_DIMS: dict[str, tuple[Optional[str], ...]] = {
    "embedding.word_embeddings.weight": (None, "hidden"),
    "embedding.position_embeddings.weight": (None, "hidden"),
    "decoder.final_layernorm.weight": ("hidden",), "decoder.final_layernorm.bias": ("hidden",),
    "output_layer.weight": (None, "hidden"),
}


def source_name(new_name: str, plan: PrunePlan) -> str:
    """The OLD canonical name a NEW canonical tensor is cut from (layers are renumbered)."""
    m = _LAYER.match(new_name)
    if m is None:
        return new_name
    return f"decoder.layers.{plan.keep_layers[int(m.group(1))]}.{m.group(2)}"


def dim_kinds(new_name: str) -> tuple[Optional[str], ...]:
    m = _LAYER.match(new_name)
    table, key = (_LAYER_DIMS, m.group(2)) if m else (_TOP_DIMS, new_name)
    if key not in table:
        raise KeyError(f"pruning does not know the canonical tensor {new_name!r}")
    return table[key]


def _qkv_rows(plan: PrunePlan, layer: int) -> torch.Tensor:
    s, t = plan.source, plan.target
    hn, per_old = s.kv_channels, s.num_attention_heads // s.num_query_groups
    per_new = t.num_attention_heads // t.num_query_groups
    heads = plan.keep_heads[layer]
    rows = []
    for n, g in enumerate(plan.keep_groups[layer]):
        kept = heads[n * per_new:(n + 1) * per_new]  # ascending heads of group g
        slots = [h - g * per_old for h in kept] + [per_old, per_old + 1]  # queries, then key, value
        for slot in slots:
            start = (g * (per_old + 2) + slot) * hn
            rows.append(torch.arange(start, start + hn))
    return torch.cat(rows)  # [(H' + 2G') * hn]


def keep_index(plan: PrunePlan, new_name: str, dim: int) -> Optional[torch.Tensor]:
    """[n_new] int64 old index of every new index along `dim`, or None (dim kept whole)."""
    kind = dim_kinds(new_name)[dim]
    m = _LAYER.match(new_name)
    layer = int(m.group(1)) if m else -1
    if kind is None:
        return None
    if kind == "hidden":
        return torch.tensor(plan.keep_hidden, dtype=torch.long)
    if kind == "qkv":
        return _qkv_rows(plan, layer)
    if kind == "heads":
        hn = plan.source.kv_channels
        return (torch.tensor(plan.keep_heads[layer])[:, None] * hn + torch.arange(hn)).reshape(-1)
    neurons = torch.tensor(plan.keep_neurons[layer], dtype=torch.long)
    if kind == "ffn_in" and plan.source.gated_linear_unit:
        return torch.cat([neurons, plan.source.ffn_hidden_size + neurons])  # [gate; up]
    return neurons


def prune_tensor(full: torch.Tensor, plan: PrunePlan, new_name: str) -> torch.Tensor:
    """The new canonical tensor from the old full one (the reference; tests and single-process)."""
    out = full
    for dim in range(full.dim()):
        index = keep_index(plan, new_name, dim)
        if index is not None:
            out = out.index_select(dim, index)
    return out.contiguous()


def prune_full_state(state: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Every canonical tensor of the pruned model, from the full source state (the test oracle)."""
    from megatron_prune.convert.hf_weights import canonical_shapes

    out = {}
    for name, shape in canonical_shapes(plan.target).items():
        out[name] = prune_tensor(state[source_name(name, plan)], plan, name)
        if tuple(out[name].shape) != tuple(shape):
            raise RuntimeError(f"pruned {name} has shape {tuple(out[name].shape)}, expected {tuple(shape)}")
    return out
