"""What perplexity and multiple-choice scoring share: summed per-row log-likelihoods of masked targets.

Rows come as a `TokenWindows` (right-padded, loss-masked). Each DP rank takes its shard with
`iter_microbatches` (every rank runs the same number of micro-batches; short ones carry fully masked
filler rows), hands a few micro-batches at a time to megatron's pipeline schedule (`run_forward`) so a
progress bar can advance, and gets back per row [sum(-log p * mask), sum(mask)]. The last stage
computes megatron's own per-token vocab-parallel cross-entropy (labels are passed to GPTModel), so no
full-vocabulary logits are ever gathered: only two numbers per row leave the last stage.

Columns after the last target of every row in a schedule call are dropped before the forward. This
changes no number that counts: under the causal mask a position never sees a later one, so right
padding cannot change the loss of a real target (it only saves compute when rows are short).
"""
from __future__ import annotations

import sys
from typing import Iterator, Optional

import torch

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows, iter_microbatches, num_microbatches
from megatron_prune.models.forward import Batch, run_forward
from megatron_prune.parallel import Groups


def check_token_ids(tokens: torch.Tensor, model: torch.nn.Module, what: str) -> None:
    """Every input id must be a row of the model's embedding: a clear error, before any forward."""
    vocab_size = int(model.vocab_size)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ConfigError(
            f"{what}: token ids span [{int(tokens.min())}, {int(tokens.max())}] but the model's vocab_size "
            f"is {vocab_size}. Fix: evaluate with the tokenizer the model was trained/converted with.")


def masked_loss_sums(loss: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`reduce` for run_forward: per-token loss [b, s] -> per row [sum(loss * mask), sum(mask)] [b, 2]."""
    if loss.shape != batch.loss_mask.shape:
        raise RuntimeError(f"expected megatron's per-token loss of shape {tuple(batch.loss_mask.shape)}, "
                           f"got {tuple(loss.shape)} (was the forward run without labels?)")
    mask = batch.loss_mask.to(torch.float64)  # [b, s]
    # where(), not loss * mask: a masked position must not leak a nan/inf into the row's sum
    loss = torch.where(mask > 0, loss.to(torch.float64), torch.zeros((), dtype=torch.float64))  # [b, s]
    return torch.stack([(loss * mask).sum(dim=-1), mask.sum(dim=-1)], dim=-1)  # [b, 2]


def trimmed_batches(chunk: list[TokenWindows]) -> list[Batch]:
    """Micro-batches of one schedule call, cut to a common width: the last target of any row, + 1."""
    used = [int(mb.loss_mask.nonzero()[:, 1].max()) + 1 if mb.num_targets else 0 for mb in chunk]
    width = max(1, *used)  # an all-filler call still runs (the pipeline's ranks stay in step)
    return [Batch(tokens=mb.tokens[:, :width].contiguous(), labels=mb.labels[:, :width].contiguous(),
                  loss_mask=mb.loss_mask[:, :width].contiguous(), sample_ids=mb.sample_ids)
            for mb in chunk]


def local_row_sums(model: torch.nn.Module, groups: Groups, windows: TokenWindows, micro_batch_size: int, *,
                   microbatches_per_call: int = 4, show_progress: bool = False,
                   desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """This DP rank's rows: (sample_ids [k] int64, sums [k, 2] float64 = [-sum log p, n targets]).

    Filler rows are included with sample_id -1 (they have no targets, so they add nothing to a sum).
    Identical on every TP/PP rank of a model replica; the caller reduces over `groups.dp`.
    """
    ids, sums = [], []
    for chunk in forward_chunks(windows, micro_batch_size, groups, microbatches_per_call, desc, show_progress):
        out = run_forward(model, groups, trimmed_batches(chunk), masked_loss_sums, width=2,
                          with_labels=True)  # [len(chunk) * b, 2]
        ids.append(torch.cat([c.sample_ids for c in chunk]))
        sums.append(out.to(torch.float64))
    if not ids:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.float64)
    return torch.cat(ids), torch.cat(sums)


def forward_chunks(windows: TokenWindows, micro_batch_size: int, groups: Groups, microbatches_per_call: int,
                   desc: str, show_progress: bool) -> Iterator[list[TokenWindows]]:
    """This DP rank's micro-batches, `microbatches_per_call` at a time (the last call may hold fewer):
    what one `run_forward` (one pass of megatron's schedule) takes. Every rank gets the same number of
    calls. A rank-0 progress bar advances by micro-batches as each chunk comes back."""
    if microbatches_per_call < 1:
        raise ConfigError(f"microbatches_per_call={microbatches_per_call} must be >= 1")
    total = num_microbatches(len(windows), micro_batch_size, groups.dp_size)
    bar = progress_bar(total, desc, enabled=show_progress and groups.is_rank0)
    chunk: list[TokenWindows] = []
    try:
        for i, mb in enumerate(iter_microbatches(windows, micro_batch_size, dp_rank=groups.dp_rank,
                                                 dp_size=groups.dp_size)):
            chunk.append(mb)
            if len(chunk) == microbatches_per_call or i == total - 1:
                yield chunk
                if bar is not None:
                    bar.update(len(chunk))
                chunk = []
    finally:
        if bar is not None:
            bar.close()


def progress_bar(total: int, desc: str, enabled: bool) -> Optional["tqdm"]:  # noqa: F821
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="mb", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
