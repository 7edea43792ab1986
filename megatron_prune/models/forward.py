"""Forward passes through megatron-core's own pipeline schedules, at any TP/PP layout.

The last pipeline stage turns each micro-batch's output into a small per-sample tensor (`reduce`),
and those small tensors — never activations or full-vocab logits — are broadcast to the other
stages so every rank returns the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.parallel import Groups


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64 (tokens shifted by one)
    loss_mask: torch.Tensor  # [b, s] float32; 0 for padding and tokens that must not count
    sample_ids: Optional[torch.Tensor] = None  # [b] int64 row index in the source set; -1 for filler

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])


# reduce(output, batch) -> [b, k]; output is the last stage's per-token loss [b, s] (labels given)
# or its vocab-parallel logits [b, s, V/tp] (no labels).
Reduce = Callable[[torch.Tensor, Batch], torch.Tensor]


def _positions(batch: Batch) -> torch.Tensor:
    b, s = batch.shape
    return torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)  # [b, s]


def run_forward(model: torch.nn.Module, groups: Groups, batches: Sequence[Batch], reduce: Reduce,
                width: int, with_labels: bool = True,
                before: Optional[Callable[[Batch], None]] = None) -> torch.Tensor:
    """Forward-only over `batches` (equal shapes); returns the stacked reductions [n*b, width] on
    every rank of the pipeline. `before(batch)`, if given, runs on every stage just before that
    micro-batch's forward (e.g. to tell activation hooks which tokens are padding)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return torch.zeros(0, width)
    b, s = batches[0].shape
    for i, batch in enumerate(batches):
        if batch.shape != (b, s):
            raise ValueError(f"micro-batch {i} has shape {batch.shape}, expected {(b, s)}")

    def step(data_iterator, module):
        batch = next(data_iterator)
        if before is not None:
            before(batch)
        labels = batch.labels if with_labels else None
        output = module(batch.tokens, _positions(batch), None, labels=labels)

        def collect(out: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return reduce(out, batch).detach()

        return output, collect

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            store = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(batches), model=[model],
                num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
                forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    if groups.is_last_stage:
        result = torch.cat([r.reshape(b, width).float() for r in store], dim=0)  # [n*b, width]
    else:
        result = torch.empty(len(batches) * b, width)
    if groups.pp_size > 1:
        dist.broadcast(result, group_src=groups.pp_size - 1, group=groups.pp)
    return result


def gather_vocab(logits_shard: torch.Tensor, groups: Groups) -> torch.Tensor:
    """[b, s, V/tp] -> [b, s, V]. For tests and small debugging only: it moves the vocabulary."""
    if groups.tp_size == 1:
        return logits_shard
    parts = [torch.empty_like(logits_shard) for _ in range(groups.tp_size)]
    dist.all_gather(parts, logits_shard.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1)


def full_logits(model: torch.nn.Module, groups: Groups, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] for `tokens` [b, s], on every rank (tests, export checks)."""
    b, s = tokens.shape
    vocab_size = int(model.vocab_size)  # every stage's GPTModel knows the (unsharded) vocabulary
    batch = Batch(tokens=tokens, labels=torch.zeros_like(tokens), loss_mask=torch.ones(b, s))

    def reduce(logits: torch.Tensor, _batch: Batch) -> torch.Tensor:
        return gather_vocab(logits.float(), groups).reshape(b, s * vocab_size)

    flat = run_forward(model, groups, [batch], reduce, width=s * vocab_size, with_labels=False)
    return flat.reshape(b, s, vocab_size)
