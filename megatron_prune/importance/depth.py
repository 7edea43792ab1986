"""Depth importance (Minitron sec. 2.2, "layer importance"): how much the model needs each layer.

Three metrics, all in global layer index space and identical at every TP/PP/DP layout:
  - Block Importance (BI, ShortGPT): 1 - cos(input, output hidden state) of each layer, averaged
    over the calibration tokens; collected by the width pass's hooks (`CalibrationStats.bi_sum`);
  - LM loss increase: validation loss with layer i removed (and with each contiguous block
    [j, j + k) removed) minus the full model's loss;
  - downstream accuracy: multiple-choice accuracy with each contiguous block of k layers removed.

Removing layers for scoring copies nothing: `skip_layers` swaps each stage's `decoder.layers`
ModuleList for one holding only the kept layers (the same module objects) and puts the original
back on exit. megatron's TransformerBlock runs whatever `self.layers` holds (an empty stage passes its
hidden states through), so the forward is exactly the forward of the model without those layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows
from megatron_prune.importance.reduce import CalibrationStats
from megatron_prune.log import progress
from megatron_prune.parallel import Groups


def block_importance(stats: CalibrationStats) -> torch.Tensor:
    """[L] token-averaged 1 - cos(layer input, layer output): low = the layer barely changes its input."""
    return stats.bi_sum / max(int(stats.num_tokens), 1)


def check_block_size(block_size: int, num_layers: int) -> int:
    if not 1 <= int(block_size) <= int(num_layers):
        raise ConfigError(f"depth.block_size={block_size} must be in [1, num_layers={num_layers}]: a block "
                          "is k contiguous layers of the model")
    return int(block_size)


def contiguous_blocks(num_layers: int, block_size: int) -> list[tuple[int, ...]]:
    """Every [j, j + k) for j = 0 .. L - k, as tuples of layer indices."""
    check_block_size(block_size, num_layers)
    return [tuple(range(j, j + block_size)) for j in range(num_layers - block_size + 1)]


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, drop: Iterable[int]) -> Iterator[None]:
    """Run `model` without the global layers in `drop` (on this stage) until exit; no weight is copied."""
    drop = set(int(i) for i in drop)
    decoder = model.decoder
    original = decoder.layers
    kept = [layer for layer in original if int(layer.layer_number) - 1 not in drop]
    if len(kept) == len(original):
        yield
        return
    decoder.layers = torch.nn.ModuleList(kept)  # same modules: a list swap, not a copy
    try:
        yield
    finally:
        decoder.layers = original


@dataclass
class LossSweep:
    base: float  # validation loss of the whole model
    layer: torch.Tensor  # [L] loss with layer i removed
    block: torch.Tensor  # [L - k + 1] loss with layers [j, j + k) removed
    block_size: int

    @property
    def layer_increase(self) -> torch.Tensor:
        return self.layer - self.base

    @property
    def block_increase(self) -> torch.Tensor:
        return self.block - self.base


def loss_sweep(model: torch.nn.Module, groups: Groups, windows: TokenWindows, micro_batch_size: int,
               block_size: int, *, show_progress: bool = False) -> LossSweep:
    """LM loss on `windows` without each single layer and without each contiguous block of k."""
    from megatron_prune.evaluate.perplexity import perplexity

    L = int(model.config.num_layers)
    blocks = contiguous_blocks(L, block_size)
    singles = [(i,) for i in range(L)]
    # k == 1: the blocks are the single layers; run them once
    variants = [()] + singles + ([] if block_size == 1 else blocks)
    losses: dict[tuple[int, ...], float] = {}
    for drop in progress(variants, total=len(variants), desc="depth: loss without layers",
                         enabled=show_progress and groups.is_rank0):
        with skip_layers(model, drop):
            losses[drop] = perplexity(model, groups, windows, micro_batch_size).loss
    return LossSweep(base=losses[()],
                     layer=torch.tensor([losses[d] for d in singles], dtype=torch.float64),
                     block=torch.tensor([losses[d] for d in blocks], dtype=torch.float64),
                     block_size=block_size)


@dataclass
class AccuracySweep:
    base_acc: float
    base_acc_norm: float
    block_acc: torch.Tensor  # [L - k + 1] accuracy with layers [j, j + k) removed
    block_acc_norm: torch.Tensor  # [L - k + 1]
    block_size: int
    num_examples: int


def accuracy_sweep(model: torch.nn.Module, groups: Groups, tokenizer: Any, examples: list,
                   seq_length: int, micro_batch_size: int, block_size: int, *,
                   show_progress: bool = False) -> AccuracySweep:
    """Zero-shot multiple-choice accuracy (the `evaluate` stage's scorer) without each block of k."""
    from megatron_prune.evaluate.multiple_choice import score_multiple_choice

    L = int(model.config.num_layers)
    variants = [()] + contiguous_blocks(L, block_size)
    results = {}
    for drop in progress(variants, total=len(variants), desc="depth: accuracy without blocks",
                         enabled=show_progress and groups.is_rank0):
        with skip_layers(model, drop):
            results[drop] = score_multiple_choice(model, groups, tokenizer, examples, seq_length,
                                                  micro_batch_size)
    blocks = variants[1:]
    return AccuracySweep(
        base_acc=results[()].acc, base_acc_norm=results[()].acc_norm,
        block_acc=torch.tensor([results[d].acc for d in blocks], dtype=torch.float64),
        block_acc_norm=torch.tensor([results[d].acc_norm for d in blocks], dtype=torch.float64),
        block_size=block_size, num_examples=results[()].n)


def best_block(scores: torch.Tensor, higher_is_better_to_drop: bool) -> Optional[int]:
    """The first layer of the block that is cheapest to drop (None for an empty sweep)."""
    if scores.numel() == 0:
        return None
    return int(scores.argmax() if higher_is_better_to_drop else scores.argmin())
