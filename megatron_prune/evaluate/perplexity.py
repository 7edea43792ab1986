"""Perplexity: the token-weighted mean cross-entropy over every real target of a set of windows.

loss = sum over rows and positions of (-log p(label) * loss_mask) / sum(loss_mask); padding has
loss_mask 0 and never counts. The same number comes out at any TP/PP/DP layout: each DP rank scores
a disjoint shard, the per-row sums are added in float64 and all-reduced over the DP group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows
from megatron_prune.evaluate.batching import check_token_ids, local_row_sums
from megatron_prune.parallel import Groups


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean cross-entropy per target token (nats)
    perplexity: float  # exp(loss)
    tokens: int  # targets counted (sum of loss_mask)
    samples: int  # windows evaluated (filler rows, sample_id -1, excluded)


def perplexity(model: torch.nn.Module, groups: Groups, windows: TokenWindows, micro_batch_size: int,
               show_progress: bool = False, *, microbatches_per_call: int = 4) -> PerplexityResult:
    """Evaluate `windows` (the same on every rank) with this rank's model shard; every rank returns
    the same result. `microbatches_per_call` micro-batches go through one pipeline-schedule call
    (more fills the pipeline better, fewer moves the progress bar more often)."""
    expected_tokens = int(windows.loss_mask.to(torch.float64).sum())  # exact past 2**24, unlike float32
    expected_samples = int((windows.sample_ids >= 0).sum())  # filler rows (sample_id -1) are no samples
    if len(windows) == 0 or expected_tokens == 0:
        raise ConfigError("perplexity: the windows hold no target tokens (empty split, or max_samples=0). "
                          "Fix: evaluate a split with at least one document of two or more tokens.")
    check_token_ids(windows.tokens, model, "perplexity windows")
    ids, sums = local_row_sums(model, groups, windows, micro_batch_size,
                             microbatches_per_call=microbatches_per_call, show_progress=show_progress,
                             desc="perplexity")  # [k, 2]
    totals = torch.tensor([float(sums[:, 0].sum()), float(sums[:, 1].sum()), float((ids >= 0).sum())],
                          dtype=torch.float64)  # [loss_sum, tokens, samples]
    if groups.dp_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=groups.dp)
    loss_sum, tokens, samples = totals.tolist()
    if int(round(tokens)) != expected_tokens or int(round(samples)) != expected_samples:
        raise RuntimeError(f"perplexity counted {tokens:.0f} targets in {samples:.0f} rows, expected "
                           f"{expected_tokens} in {expected_samples} (the DP shards do not cover the windows)")
    loss = loss_sum / tokens
    return PerplexityResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf,
                            tokens=int(round(tokens)), samples=int(round(samples)))
