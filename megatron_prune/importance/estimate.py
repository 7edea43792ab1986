"""Run calibration windows through a sharded GPTModel with the statistics hooks on; reduce; score."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows
from megatron_prune.importance.hooks import ACTIVATIONS, LocalStats, TokenMask, record_activations
from megatron_prune.importance.reduce import CalibrationStats, CommCounter, reduce_calibration_stats
from megatron_prune.importance.width import (DEFAULT_BATCH, DEFAULT_SEQUENCE, WidthScores,
                                             check_aggregation, width_scores)
from megatron_prune.parallel import Groups


class NonFiniteActivation(RuntimeError):
    """A real token's activation was NaN or Inf during calibration."""


def _nothing(output: torch.Tensor, batch) -> torch.Tensor:
    return torch.zeros(batch.shape[0], 1)  # [b, 1]: the last stage returns nothing that matters


def _raise_if_nonfinite(local: LocalStats, num_layers: int) -> None:
    """Agree over every rank on the first non-finite activation (in forward order), then raise on
    all ranks. Called by every rank after the pass, so no rank is left waiting in a collective."""
    none = float((num_layers + 1) * len(ACTIVATIONS))
    found = local.nonfinite
    # MIN over ranks picks the earliest activation; the sample travels in a second MAX reduction
    order = torch.tensor([float(found.order) if found else none], dtype=torch.float64)
    world = dist.is_initialized() and dist.get_world_size() > 1
    if world:
        dist.all_reduce(order, op=dist.ReduceOp.MIN, group=dist.group.WORLD)
    first = int(order[0])
    if first >= none:
        return
    mine = found is not None and found.order == first
    sample = torch.tensor([float(found.sample) if mine else -2.0], dtype=torch.float64)
    if world:
        dist.all_reduce(sample, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
    layer, where = divmod(first, len(ACTIVATIONS))
    name = "after the last layer" if layer == num_layers else f"in layer {layer}"
    raise NonFiniteActivation(
        f"importance: non-finite (NaN/Inf) activation {name} ({ACTIVATIONS[where]}) of calibration "
        f"sample {int(sample[0])}. Fix: check the checkpoint's weights (evaluate it) and that "
        "sample's tokens; a bf16 model may need fp32 for scoring.")


def collect_calibration_stats(model: torch.nn.Module, groups: Groups, windows: TokenWindows,
                              micro_batch_size: int, *, microbatches_per_call: int = 4,
                              comm: Optional[CommCounter] = None, show_progress: bool = False,
                              backend: str = "auto") -> CalibrationStats:
    """Forward-only over this DP rank's share of `windows` (the same windows on every rank), hooks
    on; returns the reduced global statistics, the same on every rank."""
    from megatron_prune.evaluate.batching import check_token_ids, forward_chunks, trimmed_batches
    from megatron_prune.models.forward import run_forward

    if len(windows) == 0 or windows.num_targets == 0:
        raise ConfigError("importance: the calibration windows hold no tokens (empty split or "
                          "max_samples=0). Fix: score with a split holding at least one document.")
    check_token_ids(windows.tokens, model, "importance windows")
    token_mask = TokenMask()
    with record_activations(model, token_mask, backend=backend, tp_rank=groups.tp_rank) as local:
        for chunk in forward_chunks(windows, micro_batch_size, groups, microbatches_per_call, "importance",
                                    show_progress):
            run_forward(model, groups, trimmed_batches(chunk), _nothing, width=1, with_labels=False,
                        before=token_mask.set)
    c = model.config
    _raise_if_nonfinite(local, int(c.num_layers))
    stats = reduce_calibration_stats(
        local, token_mask.num_tokens, token_mask.num_samples, groups, num_layers=int(c.num_layers),
        num_heads=int(c.num_attention_heads), ffn_hidden_size=int(c.ffn_hidden_size),
        hidden_size=int(c.hidden_size), comm=comm)
    expected = int(windows.loss_mask.ne(0).sum())
    if stats.num_tokens != expected:
        raise RuntimeError(f"importance counted {stats.num_tokens} tokens, expected {expected} "
                           "(the DP shards do not cover the windows)")
    return stats


def estimate_width_importance(model: torch.nn.Module, groups: Groups, windows: TokenWindows,
                              micro_batch_size: int, sequence: str = DEFAULT_SEQUENCE,
                              batch: str = DEFAULT_BATCH, *, microbatches_per_call: int = 4,
                              comm: Optional[CommCounter] = None) -> WidthScores:
    """Head, query-group, neuron and hidden-channel scores in global index space (see width.py)."""
    check_aggregation(sequence, batch)
    stats = collect_calibration_stats(model, groups, windows, micro_batch_size,
                                      microbatches_per_call=microbatches_per_call, comm=comm)
    return width_scores(stats, int(model.config.num_query_groups), sequence, batch)
