"""Reduce per-rank calibration statistics into global-index-space statistics, identical on every rank.

Only statistics vectors cross ranks (invariant 2 of DESIGN.md), never activations:
  - DP: every statistic is a sum over samples (or tokens), so one all-reduce SUM over `groups.dp`;
  - TP: per-head / per-neuron statistics all-gathered over `groups.tp`. megatron gives rank r the
    heads [r*np_local, (r+1)*np_local) (the input of the row-parallel linear_proj) and the neurons
    [r*F_local, (r+1)*F_local) (the input of the row-parallel linear_fc2; with SwiGLU, rank r's
    fc1 holds [gate_r; up_r], so its product is again neuron block r). Norm outputs and hidden
    states are replicated over TP, so the hooks split that work: rank r scores hidden-channel block
    r (all-gathered like the heads) and every tp-th token for Block Importance (summed);
  - PP: every stage writes its own layers into zero-filled [num_layers, ...] tensors, all-reduced
    with SUM over `groups.pp` (adding zeros is exact).
Reductions run in float64. Each collective takes `group=` and is skipped for a group of one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_prune.importance.hooks import LocalStats, SampleSums
from megatron_prune.parallel import Groups


@dataclass
class CommCounter:
    """Bytes this rank handed to collectives (the size of its send buffer), per group kind."""
    bytes_sent: int = 0
    collectives: int = 0
    by_group: dict[str, int] = field(default_factory=dict)

    def add(self, group_name: str, tensor: torch.Tensor) -> None:
        n = int(tensor.numel() * tensor.element_size())
        self.bytes_sent += n
        self.collectives += 1
        self.by_group[group_name] = self.by_group.get(group_name, 0) + n

    def merge(self, other: "CommCounter") -> "CommCounter":
        self.bytes_sent += other.bytes_sent
        self.collectives += other.collectives
        for k, v in other.by_group.items():
            self.by_group[k] = self.by_group.get(k, 0) + v
        return self


@dataclass
class CalibrationStats:
    """Statistics over every sample of every DP shard, in GLOBAL index space (float64).

    Each [..., 6, n] block holds, per unit, sum_s a_s (rows 0-2) and sum_s a_s² (rows 3-5) where a_s
    is sample s's (l2, mean, max) aggregate over its tokens (see hooks.py):
      heads   [L, 6, H]       of n[t, h] = ||attention output of head h at token t||_2
      neurons [L, 6, F]       of |x| for the fc2 input (FFN intermediate)
      hidden  [2L+1, 6, Hd]   of |x| for norm outputs: row 2l = layer l's input_layernorm,
                              2l+1 = its pre_mlp_layernorm, 2L = the final layernorm
      bi_sum  [L]             sum over tokens of 1 - cos(input, output) of layer l
    """
    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    bi_sum: torch.Tensor
    num_tokens: int
    num_samples: int


def _sums(s: SampleSums | None, n: int) -> torch.Tensor:
    return SampleSums.zeros(n).sums if s is None else s.sums  # [6, n]


def local_tensors(local: LocalStats, num_heads_local: int, ffn_local: int, hidden: int):
    """(global layer ids [Ll], heads [Ll, 6, np_local], neurons [Ll, 6, F_local],
    norms [Ll, 2, 6, Hd], bi [Ll], final [6, Hd] or None) from the hooks' statistics."""
    ids = sorted(local.layers)
    layers = [local.layers[i] for i in ids]
    heads = torch.stack([_sums(x.heads, num_heads_local) for x in layers]) if ids else \
        torch.zeros(0, 6, num_heads_local, dtype=torch.float64)
    neurons = torch.stack([_sums(x.neurons, ffn_local) for x in layers]) if ids else \
        torch.zeros(0, 6, ffn_local, dtype=torch.float64)
    norms = torch.stack([torch.stack([_sums(x.pre_attn, hidden), _sums(x.pre_mlp, hidden)])
                         for x in layers]) if ids else torch.zeros(0, 2, 6, hidden, dtype=torch.float64)
    bi = torch.tensor([x.bi_sum for x in layers], dtype=torch.float64)  # [Ll]
    final = None if local.final_norm is None else local.final_norm.sums
    return ids, heads, neurons, norms, bi, final


def _tp_gather(x: torch.Tensor, groups: Groups, comm: CommCounter) -> torch.Tensor:
    """[Ll, 6, n_local] shards -> [Ll, 6, tp * n_local] in global order (rank r's block r)."""
    if groups.tp_size == 1:
        return x
    x = x.contiguous()
    # gloo wants the output as the inputs concatenated along dim 0: [tp * Ll, 6, n_local]
    out = torch.empty((groups.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
    comm.add("tp", x)
    dist.all_gather_into_tensor(out, x, group=groups.tp)
    out = out.reshape(groups.tp_size, *x.shape)  # [tp, Ll, 6, n_local]
    return out.permute(1, 2, 0, 3).reshape(x.shape[0], x.shape[1], -1)


def _all_reduce_sum(parts: list[torch.Tensor], group, name: str, comm: CommCounter) -> list[torch.Tensor]:
    """SUM-all-reduce a list of float64 tensors as one flat buffer; returns them reshaped."""
    flat = torch.cat([p.reshape(-1) for p in parts])
    comm.add(name, flat)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, i = [], 0
    for p in parts:
        out.append(flat[i:i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out


def reduce_calibration_stats(local: LocalStats, num_tokens: int, num_samples: int, groups: Groups, *,
                             num_layers: int, num_heads: int, ffn_hidden_size: int, hidden_size: int,
                             comm: CommCounter | None = None) -> CalibrationStats:
    """Global statistics from this rank's hooks (every rank of every layout returns the same)."""
    comm = comm if comm is not None else CommCounter()
    np_local, f_local = num_heads // groups.tp_size, ffn_hidden_size // groups.tp_size
    lo, hi = local.hidden_slice if local.hidden_slice != (0, 0) else (0, hidden_size)
    chunk = -(-hidden_size // groups.tp_size)  # every rank's block padded to this width
    ids, heads, neurons, norms, bi, final = local_tensors(local, np_local, f_local, hi - lo)
    if final is None:
        final = torch.zeros(6, hi - lo, dtype=torch.float64)  # only the last stage has one
    counts = torch.tensor([float(num_tokens), float(num_samples)], dtype=torch.float64)
    if groups.dp_size > 1:
        heads, neurons, norms, bi, final, counts = _all_reduce_sum(
            [heads, neurons, norms, bi, final, counts], groups.dp, "dp", comm)
    heads = _tp_gather(heads, groups, comm)  # [Ll, 6, H]
    neurons = _tp_gather(neurons, groups, comm)  # [Ll, 6, F]
    # hidden blocks: [Ll*2 + 1, 6, hi - lo] padded to chunk, gathered, cut back to hidden_size
    hidden = torch.cat([norms.reshape(-1, 6, hi - lo), final[None]])
    hidden = torch.nn.functional.pad(hidden, (0, chunk - (hi - lo)))
    hidden = _tp_gather(hidden, groups, comm)[..., :hidden_size]  # [Ll*2 + 1, 6, Hd]
    norms, final = hidden[:-1].reshape(len(ids), 2, 6, hidden_size), hidden[-1]
    if groups.tp_size > 1:
        (bi,) = _all_reduce_sum([bi], groups.tp, "tp", comm)

    L = num_layers
    g_heads = torch.zeros(L, 6, num_heads, dtype=torch.float64)
    g_neurons = torch.zeros(L, 6, ffn_hidden_size, dtype=torch.float64)
    g_hidden = torch.zeros(2 * L + 1, 6, hidden_size, dtype=torch.float64)
    g_bi = torch.zeros(L, dtype=torch.float64)
    index = torch.tensor(ids, dtype=torch.long)
    g_heads[index] = heads
    g_neurons[index] = neurons
    g_hidden[2 * index] = norms[:, 0]
    g_hidden[2 * index + 1] = norms[:, 1]
    g_hidden[2 * L] = final
    g_bi[index] = bi
    if groups.pp_size > 1:
        g_heads, g_neurons, g_hidden, g_bi = _all_reduce_sum([g_heads, g_neurons, g_hidden, g_bi],
                                                             groups.pp, "pp", comm)
    return CalibrationStats(heads=g_heads, neurons=g_neurons, hidden=g_hidden, bi_sum=g_bi,
                            num_tokens=int(round(float(counts[0]))),
                            num_samples=int(round(float(counts[1]))))
