"""Weight-magnitude importance: L2 norms of the weights each width unit owns, computed on the shards of
a live TP/PP-sharded GPTModel (no rank ever holds a full weight), in the prune plan's global index space.

A unit's score is the L2 norm of every weight entry that exists only because of it (biases and norm
weights are left out):
  - head h of layer l: its query rows of linear_qkv and its hn columns of linear_proj;
  - query group g: the sum of its heads' scores (as the activation artifact defines it);
  - neuron i: its fc1 row (with SwiGLU its gate row and its up row) and its fc2 column;
  - hidden channel c: that channel's entries of every matrix reading or writing the residual stream:
    word- and position-embedding column c, linear_qkv / linear_fc1 column c, linear_proj / linear_fc2
    row c, and (untied only) output_layer column c.
Magnitude covers WIDTH only: a weight norm says nothing about what a whole layer adds, so `depth` is
empty and a depth target with importance=magnitude must name `drop_layers` (or use a score artifact).

Reductions (float64 sums of squares, square roots taken last, when every sum is complete):
  - TP: rank r owns heads [r*H/tp, (r+1)*H/tp) (its qkv rows are whole query groups, its linear_proj
    columns the same heads) and neurons [r*F/tp, (r+1)*F/tp) (its fc1 rows [gate_r; up_r], its fc2
    columns), so per-head / per-neuron sums are all-gathered over `groups.tp`. A hidden channel's sum
    is split over TP (vocab rows / head rows / neuron columns), so it is all-reduced with SUM; a
    TP-replicated matrix (position embedding) is added by TP rank 0 only, or it would count tp times;
  - PP: each stage writes its own layers into zero [L, ...] tensors, all-reduced with SUM over
    `groups.pp` (adding zeros is exact); with tied embeddings the last stage's `output_layer.weight`
    is a copy of the first stage's word embedding and is skipped;
  - DP replicas hold identical weights: nothing to reduce.
Only score vectors cross the wire: (L/pp)*(H+F)/tp + Hd float64 values over TP, L*(H+F) + Hd over PP.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.importance.reduce import CommCounter
from megatron_prune.models.shard import local_params
from megatron_prune.parallel import Groups
from megatron_prune.prune.plan import ImportanceScores

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# 2-D weights that touch the residual stream, and the dim of theirs that indexes the hidden channel.
_HIDDEN_DIM = {
    "self_attention.linear_qkv.weight": 1,  # [rows, Hd] reads the stream
    "mlp.linear_fc1.weight": 1,
    "self_attention.linear_proj.weight": 0,  # [Hd, cols] writes it
    "mlp.linear_fc2.weight": 0,
    "embedding.word_embeddings.weight": 1,  # [V, Hd]
    "embedding.position_embeddings.weight": 1,  # [P, Hd]
    "output_layer.weight": 1,  # [V, Hd]
}


def _sq(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.detach().to(torch.float64).square().sum(dim=dims)


def _hidden_dim(cname: str, param: torch.nn.Parameter) -> Optional[int]:
    """The hidden-channel dim of a 2-D weight, None for vectors (biases, norms). An unknown matrix is
    an error: silently leaving it out would make the hidden scores quietly wrong."""
    if param.dim() < 2:
        return None
    m = _LAYER.match(cname)
    key = m.group(2) if m else cname
    if key not in _HIDDEN_DIM:
        raise ValueError(f"magnitude importance does not know which axis of {cname} (shape "
                         f"{tuple(param.shape)}) is the hidden channel; it supports dense GPT layers "
                         f"(linear_qkv, linear_proj, linear_fc1, linear_fc2, embeddings, output_layer)")
    return _HIDDEN_DIM[key]


def _tp_gather(x: torch.Tensor, groups: Groups, comm: CommCounter) -> torch.Tensor:
    """[Ll, n_local] -> [Ll, tp, n_local]: every rank's shard, rank r's at index r."""
    if groups.tp_size == 1:
        return x[:, None]
    x = x.contiguous()
    out = torch.empty((groups.tp_size * x.shape[0], x.shape[1]), dtype=x.dtype)  # [tp * Ll, n_local]
    comm.add("tp", x)
    dist.all_gather_into_tensor(out, x, group=groups.tp)
    return out.reshape(groups.tp_size, *x.shape).transpose(0, 1)


def _all_reduce(x: torch.Tensor, group, name: str, size: int, comm: CommCounter) -> torch.Tensor:
    if size == 1:
        return x
    x = x.contiguous()
    comm.add(name, x)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def magnitude_scores(model: torch.nn.Module, groups: Groups,
                     comm: CommCounter | None = None) -> ImportanceScores:
    """Weight-norm scores of every head, query group, neuron and hidden channel, identical on every
    rank of every layout. `comm` (if given) counts the bytes this rank hands to collectives."""
    comm = comm if comm is not None else CommCounter()
    c = model.config
    L, H, G, hn = c.num_layers, c.num_attention_heads, c.num_query_groups, c.kv_channels
    F, Hd, tp = c.ffn_hidden_size, c.hidden_size, groups.tp_size
    if getattr(c, "num_moe_experts", None):
        raise ValueError("magnitude importance supports dense MLPs only (num_moe_experts is set)")
    h_loc, g_loc, f_loc = H // tp, G // tp, F // tp
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))

    ids = sorted(int(layer.layer_number) - 1 for layer in model.decoder.layers)
    row = {layer: i for i, layer in enumerate(ids)}  # global layer -> row of the local tensors
    heads = torch.zeros(len(ids), h_loc, dtype=torch.float64)  # [Ll, H/tp] sums of squares
    neurons = torch.zeros(len(ids), f_loc, dtype=torch.float64)  # [Ll, F/tp]
    hidden = torch.zeros(Hd, dtype=torch.float64)  # [Hd] this rank's part of each channel's sum

    for name, cname, param in local_params(model):
        if tied and name == "output_layer.weight":
            continue  # the last stage's copy of the word embedding, counted on the first stage
        dim = _hidden_dim(cname, param)
        if dim is None:
            continue
        if getattr(param, "tensor_model_parallel", False) or groups.tp_rank == 0:
            # split over TP: every rank adds its slice; replicated: one rank adds the whole
            hidden += _sq(param, (1 - dim,))
        m = _LAYER.match(cname)
        if not m:
            continue
        i, kind, w = row[int(m.group(1))], m.group(2), param
        if kind == "self_attention.linear_qkv.weight":
            # local rows are whole query groups: [G/tp, H/G query heads + key + value, hn, Hd]
            qkv = w.reshape(g_loc, H // G + 2, hn, Hd)
            heads[i] += _sq(qkv[:, :H // G].reshape(h_loc, hn, Hd), (1, 2))
        elif kind == "self_attention.linear_proj.weight":
            heads[i] += _sq(w.reshape(Hd, h_loc, hn), (0, 2))  # columns are this rank's heads
        elif kind == "mlp.linear_fc1.weight":
            # SwiGLU: [gate_r; up_r] -> [2, F/tp, Hd]; neuron j owns row j of both halves
            fc1 = w.reshape(2 if c.gated_linear_unit else 1, f_loc, Hd)
            neurons[i] += _sq(fc1, (0, 2))
        elif kind == "mlp.linear_fc2.weight":
            neurons[i] += _sq(w.reshape(Hd, f_loc), (0,))

    # one gather for both: [Ll, tp, H/tp + F/tp], then each axis's blocks side by side in rank order
    units = _tp_gather(torch.cat([heads, neurons], dim=1), groups, comm)
    units = torch.cat([units[..., :h_loc].reshape(len(ids), H),
                       units[..., h_loc:].reshape(len(ids), F)], dim=1)  # [Ll, H + F] global order
    hidden = _all_reduce(hidden, groups.tp, "tp", tp, comm)
    full = torch.zeros(L, H + F, dtype=torch.float64)  # [L, H + F]; other stages' rows stay zero
    full[torch.tensor(ids, dtype=torch.long)] = units
    flat = _all_reduce(torch.cat([full.reshape(-1), hidden]), groups.pp, "pp", groups.pp_size, comm)
    full, hidden = flat[:L * (H + F)].reshape(L, H + F), flat[L * (H + F):]

    head_scores = full[:, :H].sqrt()  # [L, H]
    return ImportanceScores(
        heads=head_scores, query_groups=head_scores.reshape(L, G, H // G).sum(-1),  # [L, G]
        neurons=full[:, H:].sqrt(), hidden=hidden.sqrt(), depth={}, block_size=1, source="magnitude")
