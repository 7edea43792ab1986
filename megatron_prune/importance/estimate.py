"""Run calibration windows through a sharded GPTModel with the statistics hooks on; reduce; score."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows, iter_microbatches, num_microbatches
from megatron_prune.importance.hooks import TokenMask, record_activations
from megatron_prune.importance.reduce import CommCounter, WidthStats, reduce_width_stats
from megatron_prune.importance.width import WidthScores, check_aggregation, width_scores
from megatron_prune.parallel import Groups


def _nothing(output: torch.Tensor, batch) -> torch.Tensor:
    return torch.zeros(batch.shape[0], 1)  # [b, 1]: the last stage returns nothing that matters


def collect_width_stats(model: torch.nn.Module, groups: Groups, windows: TokenWindows,
                        micro_batch_size: int, *, microbatches_per_call: int = 4,
                        comm: Optional[CommCounter] = None) -> WidthStats:
    """Forward-only over this DP rank's share of `windows` (the same windows on every rank), hooks
    on; returns the reduced global statistics, the same on every rank."""
    from megatron_prune.evaluate.batching import check_token_ids, trimmed_batches
    from megatron_prune.models.forward import run_forward

    if microbatches_per_call < 1:
        raise ConfigError(f"microbatches_per_call={microbatches_per_call} must be >= 1")
    if len(windows) == 0 or windows.num_targets == 0:
        raise ConfigError("importance: the calibration windows hold no tokens (empty split or "
                          "max_samples=0). Fix: score with a split holding at least one document.")
    check_token_ids(windows.tokens, model, "importance windows")
    total = num_microbatches(len(windows), micro_batch_size, groups.dp_size)
    token_mask = TokenMask()
    chunk = []
    with record_activations(model, token_mask) as local:
        for i, mb in enumerate(iter_microbatches(windows, micro_batch_size, dp_rank=groups.dp_rank,
                                                 dp_size=groups.dp_size)):
            chunk.append(mb)
            if len(chunk) == microbatches_per_call or i == total - 1:
                run_forward(model, groups, trimmed_batches(chunk), _nothing, width=1,
                            with_labels=False, before=token_mask.set)
                chunk = []
    c = model.config
    stats = reduce_width_stats(local, token_mask.num_tokens, groups, num_layers=int(c.num_layers),
                               num_heads=int(c.num_attention_heads), ffn_hidden_size=int(c.ffn_hidden_size),
                               hidden_size=int(c.hidden_size), comm=comm)
    expected = int(windows.loss_mask.ne(0).sum())
    if stats.num_tokens != expected:
        raise RuntimeError(f"importance counted {stats.num_tokens} tokens, expected {expected} "
                           "(the DP shards do not cover the windows)")
    return stats


def estimate_width_importance(model: torch.nn.Module, groups: Groups, windows: TokenWindows,
                              micro_batch_size: int, aggregation: str = "l2", *,
                              microbatches_per_call: int = 4,
                              comm: Optional[CommCounter] = None) -> WidthScores:
    """Head, query-group, neuron and hidden-channel scores in global index space (see width.py)."""
    check_aggregation(aggregation)
    stats = collect_width_stats(model, groups, windows, micro_batch_size,
                                microbatches_per_call=microbatches_per_call, comm=comm)
    return width_scores(stats, int(model.config.num_query_groups), aggregation)
