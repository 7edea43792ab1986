"""Reduce per-rank activation statistics into global-index-space statistics, identical on every rank.

Only statistics vectors cross ranks (invariant 2 of DESIGN.md), never activations:
  - DP: sums and the token count all-reduced with SUM over `groups.dp`, maxima with MAX;
  - TP: per-head / per-neuron statistics all-gathered over `groups.tp`. megatron gives rank r the
    heads [r*np_local, (r+1)*np_local) (the input of the row-parallel linear_proj) and the neurons
    [r*F_local, (r+1)*F_local) (the input of the row-parallel linear_fc2; with SwiGLU, rank r's
    fc1 holds [gate_r; up_r], so its product is again neuron block r). Hidden-channel statistics
    are replicated over TP (norm outputs before any TP split), so each rank keeps its own;
  - PP: every stage writes its own layers into zero-filled [num_layers, ...] tensors, all-reduced
    with SUM over `groups.pp` (adding zeros is exact, so maxima survive a SUM as well).
Reductions run in float64. Each collective takes `group=` and is skipped for a group of one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_prune.importance.hooks import LocalStats
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
class WidthStats:
    """Statistics over every kept token of every DP shard, in GLOBAL index space (float64).

    heads   [L, 3, H]:  sum_t n, sum_t n^2, max_t n with n[t, h] = ||attention output of head h||_2
    neurons [L, 3, F]:  sum_t x^2, sum_t |x|, max_t |x| of the fc2 input (FFN intermediate)
    hidden  [2L+1, 3, Hd]: the same for norm outputs: row 2l = layer l's input_layernorm,
                        2l+1 = its pre_mlp_layernorm, 2L = the final layernorm
    """
    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    num_tokens: int


HEAD_FIELDS = ("sum_norm", "sum_sq_norm", "max_norm")
CHANNEL_FIELDS = ("sum_sq", "sum_abs", "max_abs")


def _stack(stats, fields, n: int) -> torch.Tensor:
    if stats is None:
        return torch.zeros(3, n, dtype=torch.float64)
    return torch.stack([getattr(stats, f).detach().to(torch.float64).cpu() for f in fields])  # [3, n]


def local_tensors(local: LocalStats, num_heads_local: int, ffn_local: int, hidden: int):
    """(global layer ids [Ll], heads [Ll, 3, np_local], neurons [Ll, 3, F_local],
    norms [Ll, 2, 3, Hd], final [3, Hd] or None) from the hooks' statistics."""
    ids = sorted(local.layers)
    heads = torch.stack([_stack(local.layers[i].heads, HEAD_FIELDS, num_heads_local) for i in ids])
    neurons = torch.stack([_stack(local.layers[i].neurons, CHANNEL_FIELDS, ffn_local) for i in ids])
    norms = torch.stack([torch.stack([_stack(local.layers[i].pre_attn, CHANNEL_FIELDS, hidden),
                                      _stack(local.layers[i].pre_mlp, CHANNEL_FIELDS, hidden)])
                         for i in ids])
    final = None if local.final_norm is None else _stack(local.final_norm, CHANNEL_FIELDS, hidden)
    return ids, heads, neurons, norms, final


def _dp_reduce(parts: list[torch.Tensor], count: int, groups: Groups, comm: CommCounter):
    """SUM rows 0-1 (sums), MAX row 2 (max) of every [..., 3, n] part, and the count, over DP."""
    if groups.dp_size == 1:
        return parts, count
    count_t = torch.tensor([float(count)], dtype=torch.float64)  # 1-D: gloo rejects 0-d tensors
    sums = torch.cat([p[..., :2, :].reshape(-1) for p in parts] + [count_t])
    maxes = torch.cat([p[..., 2, :].reshape(-1) for p in parts])
    comm.add("dp", sums)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=groups.dp)
    comm.add("dp", maxes)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=groups.dp)
    out, i, j = [], 0, 0
    for p in parts:
        q = p.clone()
        n_sum, n_max = p[..., :2, :].numel(), p[..., 2, :].numel()
        q[..., :2, :] = sums[i:i + n_sum].reshape(p[..., :2, :].shape)
        q[..., 2, :] = maxes[j:j + n_max].reshape(p[..., 2, :].shape)
        i, j = i + n_sum, j + n_max
        out.append(q)
    return out, int(round(float(sums[-1])))


def _tp_gather(x: torch.Tensor, groups: Groups, comm: CommCounter) -> torch.Tensor:
    """[Ll, 3, n_local] shards -> [Ll, 3, tp * n_local] in global order (rank r's block r)."""
    if groups.tp_size == 1:
        return x
    x = x.contiguous()
    # gloo wants the output as the inputs concatenated along dim 0: [tp * Ll, 3, n_local]
    out = torch.empty((groups.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype)
    comm.add("tp", x)
    dist.all_gather_into_tensor(out, x, group=groups.tp)
    out = out.reshape(groups.tp_size, *x.shape)  # [tp, Ll, 3, n_local]
    return out.permute(1, 2, 0, 3).reshape(x.shape[0], x.shape[1], -1)


def reduce_width_stats(local: LocalStats, num_tokens: int, groups: Groups, *, num_layers: int,
                       num_heads: int, ffn_hidden_size: int, hidden_size: int,
                       comm: CommCounter | None = None) -> WidthStats:
    """Global statistics from this rank's hooks (every rank of every layout returns the same)."""
    comm = comm if comm is not None else CommCounter()
    np_local, f_local = num_heads // groups.tp_size, ffn_hidden_size // groups.tp_size
    ids, heads, neurons, norms, final = local_tensors(local, np_local, f_local, hidden_size)
    has_final = final is not None
    parts = [heads, neurons, norms] + ([final] if has_final else [])
    parts, count = _dp_reduce(parts, num_tokens, groups, comm)
    heads, neurons, norms = parts[:3]
    final = parts[3] if has_final else None
    heads = _tp_gather(heads, groups, comm)  # [Ll, 3, H]
    neurons = _tp_gather(neurons, groups, comm)  # [Ll, 3, F]

    L = num_layers
    g_heads = torch.zeros(L, 3, num_heads, dtype=torch.float64)
    g_neurons = torch.zeros(L, 3, ffn_hidden_size, dtype=torch.float64)
    g_hidden = torch.zeros(2 * L + 1, 3, hidden_size, dtype=torch.float64)
    index = torch.tensor(ids, dtype=torch.long)
    g_heads[index] = heads
    g_neurons[index] = neurons
    g_hidden[2 * index] = norms[:, 0]
    g_hidden[2 * index + 1] = norms[:, 1]
    if final is not None:
        g_hidden[2 * L] = final
    if groups.pp_size > 1:
        flat = torch.cat([g_heads.reshape(-1), g_neurons.reshape(-1), g_hidden.reshape(-1)])
        comm.add("pp", flat)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=groups.pp)
        a, b = g_heads.numel(), g_neurons.numel()
        g_heads = flat[:a].reshape(g_heads.shape)
        g_neurons = flat[a:a + b].reshape(g_neurons.shape)
        g_hidden = flat[a + b:].reshape(g_hidden.shape)
    return WidthStats(heads=g_heads, neurons=g_neurons, hidden=g_hidden, num_tokens=count)
