"""Width importance scores (Minitron, arXiv:2407.14679 sec. 2) from reduced statistics. Pure functions.

Every score aggregates an activation statistic over all kept (non-padding) tokens t of the
calibration set, in GLOBAL index space:

  unit            activation per token                         l2               mean             max
  head h          n[t,h] = ||attn_out[t, h, :]||_2 (linear_proj  sqrt(sum_t n^2)  sum_t n / T      max_t n
                  input, before the output projection)
  FFN neuron i    x[t,i] = fc2 input (after the activation/GLU) sqrt(sum_t x^2)  sum_t |x| / T    max_t |x|
  hidden chan. c  x[t,c] = output of a norm layer               sqrt(sum_t x^2)  sum_t |x| / T    max_t |x|

(T = number of kept tokens.) The hidden-channel score is the SUM over all 2L+1 norm layers (every
layer's input_layernorm and pre_mlp_layernorm, and the final layernorm) of that norm's per-channel
aggregate. A query group's score (GQA) is the sum of the scores of its heads; head h belongs to group
h // (H / G), megatron's and HF's order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prune.importance.reduce import WidthStats

AGGREGATIONS = ("l2", "mean", "max")


@dataclass
class WidthScores:
    heads: torch.Tensor  # [L, H] float64
    query_groups: torch.Tensor  # [L, G] float64
    neurons: torch.Tensor  # [L, F] float64
    hidden: torch.Tensor  # [Hd] float64
    num_tokens: int
    aggregation: str

    def as_dict(self) -> dict:
        return {"heads": self.heads, "query_groups": self.query_groups, "neurons": self.neurons,
                "hidden": self.hidden, "num_tokens": self.num_tokens, "aggregation": self.aggregation}


def check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    return aggregation


def aggregate(stats: torch.Tensor, num_tokens: int, aggregation: str, *, heads: bool) -> torch.Tensor:
    """[..., 3, n] statistics -> [..., n] scores. Head rows are (sum n, sum n^2, max n); channel rows
    are (sum x^2, sum |x|, max |x|)."""
    check_aggregation(aggregation)
    t = max(int(num_tokens), 1)
    if heads:
        total, total_sq, top = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    else:
        total_sq, total, top = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    if aggregation == "l2":
        return total_sq.clamp_min(0).sqrt()
    if aggregation == "mean":
        return total / t
    return top.clone()


def query_group_scores(head_scores: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[L, H] -> [L, G]: the sum over each group's H/G consecutive heads."""
    L, H = head_scores.shape
    if H % num_query_groups:
        raise ValueError(f"{H} heads do not split into {num_query_groups} query groups")
    return head_scores.reshape(L, num_query_groups, H // num_query_groups).sum(-1)


def width_scores(stats: WidthStats, num_query_groups: int, aggregation: str = "l2") -> WidthScores:
    heads = aggregate(stats.heads, stats.num_tokens, aggregation, heads=True)  # [L, H]
    return WidthScores(
        heads=heads,
        query_groups=query_group_scores(heads, num_query_groups),
        neurons=aggregate(stats.neurons, stats.num_tokens, aggregation, heads=False),  # [L, F]
        hidden=aggregate(stats.hidden, stats.num_tokens, aggregation, heads=False).sum(0),  # [Hd]
        num_tokens=int(stats.num_tokens), aggregation=aggregation)
