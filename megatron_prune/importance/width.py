"""Width importance scores (Minitron, arXiv:2407.14679 sec. 2) from reduced statistics. Pure functions.

Every unit's activation per token, in GLOBAL index space:

  unit            activation v[t] per token
  head h          ||attn_out[t, h, :]||_2  (linear_proj input, before the output projection)
  FFN neuron i    |x[t, i]| of the fc2 input (after the activation / GLU)
  hidden chan. c  |x[t, c]| of the output of a norm layer

is aggregated in two levels: first over the real tokens of each calibration sample s
(`sequence`: l2 = sqrt(sum_t v²), mean = sum_t v / n_s, max = max_t v) giving a_s, then over the
S samples (`batch`: l2 = sqrt(sum_s a_s²), mean = sum_s a_s / S). The paper's choice, and our
default, is mean over the sequence and l2 over the batch. The hidden-channel score is the SUM over
all 2L+1 norm layers (every layer's input_layernorm and pre_mlp_layernorm, and the final layernorm)
of that norm's per-channel score. A query group's score (GQA) is the sum of the scores of its
heads; head h belongs to group h // (H / G), megatron's and HF's order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prune.importance.hooks import SEQUENCE_AGGREGATIONS
from megatron_prune.importance.reduce import CalibrationStats

BATCH_AGGREGATIONS = ("l2", "mean")
DEFAULT_SEQUENCE, DEFAULT_BATCH = "mean", "l2"


@dataclass
class WidthScores:
    heads: torch.Tensor  # [L, H] float64
    query_groups: torch.Tensor  # [L, G] float64
    neurons: torch.Tensor  # [L, F] float64
    hidden: torch.Tensor  # [Hd] float64
    num_tokens: int
    num_samples: int
    sequence: str
    batch: str

    def as_dict(self) -> dict:
        return {"heads": self.heads, "query_groups": self.query_groups, "neurons": self.neurons,
                "hidden": self.hidden, "num_tokens": self.num_tokens, "num_samples": self.num_samples,
                "sequence": self.sequence, "batch": self.batch}


def check_aggregation(sequence: str, batch: str) -> None:
    if sequence not in SEQUENCE_AGGREGATIONS:
        raise ValueError(f"sequence aggregation {sequence!r}: choose one of {', '.join(SEQUENCE_AGGREGATIONS)}")
    if batch not in BATCH_AGGREGATIONS:
        raise ValueError(f"batch aggregation {batch!r}: choose one of {', '.join(BATCH_AGGREGATIONS)}")


def aggregate(sums: torch.Tensor, num_samples: int, sequence: str, batch: str) -> torch.Tensor:
    """[..., 6, n] sample sums (see CalibrationStats) -> [..., n] scores."""
    check_aggregation(sequence, batch)
    k = SEQUENCE_AGGREGATIONS.index(sequence)
    if batch == "mean":
        return sums[..., k, :] / max(int(num_samples), 1)
    return sums[..., 3 + k, :].clamp_min(0).sqrt()


def query_group_scores(head_scores: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[L, H] -> [L, G]: the sum over each group's H/G consecutive heads."""
    L, H = head_scores.shape
    if H % num_query_groups:
        raise ValueError(f"{H} heads do not split into {num_query_groups} query groups")
    return head_scores.reshape(L, num_query_groups, H // num_query_groups).sum(-1)


def width_scores(stats: CalibrationStats, num_query_groups: int, sequence: str = DEFAULT_SEQUENCE,
                 batch: str = DEFAULT_BATCH) -> WidthScores:
    S = stats.num_samples
    heads = aggregate(stats.heads, S, sequence, batch)  # [L, H]
    return WidthScores(
        heads=heads,
        query_groups=query_group_scores(heads, num_query_groups),
        neurons=aggregate(stats.neurons, S, sequence, batch),  # [L, F]
        hidden=aggregate(stats.hidden, S, sequence, batch).sum(0),  # [Hd]
        num_tokens=int(stats.num_tokens), num_samples=int(S), sequence=sequence, batch=batch)

