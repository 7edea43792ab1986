"""One pass of megatron-core's forward-backward schedule over a step's micro-batches.

`run_schedule` feeds micro-batches to `get_forward_backward_func()` (1F1B with PP, plain
accumulation without) and returns summed metrics that are the same on every rank. What a model
computes is the caller's `Forward`: it runs the model chunk on one micro-batch and returns the
chunk's output and, for the last stage, a loss function over that output giving

    (objective_sum [] , num_tokens [] int, metric_sums [k] float64)

The objective is summed over the micro-batch's real target tokens (not averaged): megatron's
`finalize_model_grads` divides the gradients by the global batch's token count, so the update is the
per-token mean over the whole global batch whatever the micro-batch size, DP or PP layout.
`metric_sums` (the objective first, then e.g. KL and CE sums, and the token count last) leave the
last stage as k numbers per micro-batch: summed over micro-batches, all-reduced over DP and broadcast
over PP.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.models.forward import Batch
from megatron_prune.parallel import Groups

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# forward(model_chunk, batch) -> (output tensor, loss function of that output on the last stage)
Forward = Callable[[torch.nn.Module, Batch], tuple[Any, LossFn]]


def positions(batch: Batch) -> torch.Tensor:
    b, s = batch.shape
    return torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)  # [b, s]


def masked_sums(per_token: Sequence[torch.Tensor], loss_mask: torch.Tensor) -> list[torch.Tensor]:
    """sum(x * mask) of each per-token tensor [b, s], in the tensor's dtype (graph kept)."""
    return [torch.where(loss_mask > 0, x, torch.zeros((), dtype=x.dtype)).mul(loss_mask.to(x.dtype)).sum()
            for x in per_token]


def lm_forward(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, LossFn]:
    """Language-model cross-entropy (teacher correction): megatron's GPTModel computes the per-token
    vocab-parallel cross-entropy [b, s] on the last stage when given labels."""
    output = model(batch.tokens, positions(batch), None, labels=batch.labels)

    def loss(per_token_ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (ce_sum,) = masked_sums([per_token_ce.float()], batch.loss_mask)
        tokens = batch.loss_mask.sum()
        metrics = torch.stack([ce_sum.detach().double(), ce_sum.detach().double(), tokens.double()])
        return ce_sum, tokens.to(torch.int), metrics  # metrics: [loss, ce, tokens]

    return output, loss


LM_METRICS = ("loss", "ce", "tokens")


def run_schedule(model: torch.nn.Module, groups: Groups, batches: Sequence[Batch], forward: Forward,
                 metric_names: Sequence[str], *, forward_only: bool,
                 adjust_tensor_shapes_fn: Optional[Callable] = None) -> dict[str, float]:
    """Forward (and backward unless `forward_only`) over `batches` (equal shapes) through megatron's
    schedule; gradients accumulate into the DDP buffers and are finalised by the schedule. Returns
    the metric sums over the global batch (all DP ranks), identical on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batches[0].shape

    def step(data_iterator, chunk):
        return forward(chunk, next(data_iterator))

    kwargs = {}
    if adjust_tensor_shapes_fn is not None and groups.pp_size > 1:
        kwargs["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn
    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=forward_only,
        **kwargs)
    width = len(metric_names)
    if groups.is_last_stage:
        totals = torch.stack([m.reshape(width) for m in store]).sum(0)  # [k] float64
    else:
        totals = torch.zeros(width, dtype=torch.float64)
    if groups.dp_size > 1:
        dist.all_reduce(totals, group=groups.dp)
    if groups.pp_size > 1:
        dist.broadcast(totals, group_src=groups.pp_size - 1, group=groups.pp)
    return dict(zip(metric_names, totals.tolist()))


def per_token(sums: dict[str, float]) -> dict[str, float]:
    """Metric sums -> means per target token (the token count itself is kept as is)."""
    tokens = max(sums["tokens"], 1.0)
    return {k: (v if k == "tokens" else v / tokens) for k, v in sums.items()}
