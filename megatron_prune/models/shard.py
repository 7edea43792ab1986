"""Map between a *canonical full* state dict and this rank's shards of a live GPTModel.

Canonical = the names and full shapes a TP1/PP1 local-spec GPTModel holds, with global layer
indices (see convert/). A rank owns a slice of some canonical tensors:
  - column-parallel weights / vocab-parallel embedding: a contiguous block of rows (dim 0);
    the fused QKV rows are grouped per query group, so a row block is a block of whole groups;
  - SwiGLU fc1 is [gate; up]: each rank holds [gate_r; up_r], not a contiguous block of rows;
  - row-parallel weights: a block of columns (dim 1); norms and row-parallel biases: everything;
  - with PP, only its own layers (megatron numbers them globally in `layer_number`), and with tied
    embeddings the last stage holds a copy of the word embedding as `output_layer.weight`.
Loading slices the full tensor per rank; gathering (tests, export) is the inverse.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_prune.parallel import Groups

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _global_layer_map(model: torch.nn.Module) -> dict[int, int]:
    layers = model.decoder.layers
    return {i: int(layer.layer_number) - 1 for i, layer in enumerate(layers)}


# The Transformer Engine spec fuses each pre-norm into the linear layer that follows it.
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_name(local_name: str, layer_map: Mapping[int, int], tied: bool) -> str:
    m = _LAYER.match(local_name)
    if m:
        rest = _TE_FUSED_NORMS.get(m.group(2), m.group(2))
        return f"decoder.layers.{layer_map[int(m.group(1))]}.{rest}"
    if tied and local_name == "output_layer.weight":
        # The last stage's copy of the shared embedding (PP > 1).
        return "embedding.word_embeddings.weight"
    return local_name


def is_swiglu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def local_params(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical name, parameter) for every parameter this rank holds."""
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    layer_map = _global_layer_map(model)
    for name, param in model.named_parameters():
        yield name, canonical_name(name, layer_map, tied), param


def _gated(model: torch.nn.Module) -> bool:
    return bool(model.config.gated_linear_unit)


def shard_of(full: torch.Tensor, param: torch.nn.Parameter, swiglu: bool, tp_rank: int,
             tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor, shaped like `param`."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = int(param.partition_dim)
    if swiglu:
        # [2F, ...] -> [2, F, ...]; rank r holds [gate_r; up_r].
        halves = full.reshape(2, full.shape[0] // 2, *full.shape[1:])
        return halves.chunk(tp_size, dim=1)[tp_rank].reshape(-1, *full.shape[1:])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state(model: torch.nn.Module, get_full: Callable[[str], torch.Tensor],
                    groups: Groups) -> None:
    """Fill this rank's parameters from full canonical tensors (`get_full(canonical_name)`), which
    may be read lazily so that only the needed tensors are touched."""
    gated = _gated(model)
    with torch.no_grad():
        for name, cname, param in local_params(model):
            full = get_full(cname)
            piece = shard_of(full, param, gated and is_swiglu_fc1(name), groups.tp_rank,
                             groups.tp_size)
            if tuple(piece.shape) != tuple(param.shape):
                raise ValueError(
                    f"{cname}: the source tensor gives a shard of shape {tuple(piece.shape)} but "
                    f"the model expects {tuple(param.shape)} at {groups.layout}; the checkpoint "
                    f"and the model config disagree")
            param.copy_(piece.to(param.dtype))


def _gather_tp(param: torch.Tensor, swiglu: bool, groups: Groups) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or groups.tp_size == 1:
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(groups.tp_size)]
    dist.all_gather(parts, param.detach().contiguous(), group=groups.tp)
    if swiglu:
        # each part is [gate_r; up_r] -> [gate; up]
        gates = [p.chunk(2, dim=0)[0] for p in parts]
        ups = [p.chunk(2, dim=0)[1] for p in parts]
        return torch.cat(gates + ups, dim=0)
    return torch.cat(parts, dim=int(param.partition_dim))


def gather_full_state(model: torch.nn.Module, groups: Groups) -> dict[str, torch.Tensor]:
    """The canonical full state dict, assembled on every rank (tests and export only: it holds the
    whole model)."""
    gated = _gated(model)
    local: dict[str, torch.Tensor] = {}
    for name, cname, param in local_params(model):
        full = _gather_tp(param, gated and is_swiglu_fc1(name), groups)
        local.setdefault(cname, full)
    if groups.pp_size == 1:
        return local
    per_stage: list[dict[str, torch.Tensor] | None] = [None] * groups.pp_size
    dist.all_gather_object(per_stage, local, group=groups.pp)
    merged: dict[str, torch.Tensor] = {}
    for stage in per_stage:
        for key, value in (stage or {}).items():
            merged.setdefault(key, value)
    return merged
