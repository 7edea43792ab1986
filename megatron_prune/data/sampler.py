"""Resumable training order: which samples a step uses is a pure function of (seed, consumed_samples).

The sample stream is an endless sequence of epochs; epoch e is a permutation of all sample indices
seeded by (seed, e). Position p of the stream is sample `permutation(seed, p // n)[p % n]`. A run
that stops after `consumed_samples` and restarts with the same seed continues with exactly the
samples it would have used, with no sampler state to checkpoint beyond that one integer.

A global batch is positions [consumed, consumed + global_batch_size); DP rank r takes every
dp_size-th of them starting at r (disjoint, together the whole batch), then splits its share into
micro-batches.
"""
from __future__ import annotations

import numpy as np

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_samples) that depends only on (seed, epoch)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_samples)  # [num_samples]


def sample_indices(num_samples: int, seed: int, consumed_samples: int, count: int) -> np.ndarray:
    """Sample indices at stream positions [consumed_samples, consumed_samples + count)."""
    if num_samples < 1:
        raise ConfigError("the training split has no samples; use a smaller seq_length or more text")
    if consumed_samples < 0 or count < 0:
        raise ConfigError(f"consumed_samples={consumed_samples} and count={count} must be >= 0")
    positions = np.arange(consumed_samples, consumed_samples + count, dtype=np.int64)  # [count]
    epochs, offsets = positions // num_samples, positions % num_samples
    out = np.empty(count, dtype=np.int64)  # [count]
    for epoch in np.unique(epochs):  # at most a few epochs per batch
        where = epochs == epoch
        out[where] = epoch_permutation(num_samples, seed, int(epoch))[offsets[where]]
    return out


def global_batch_indices(num_samples: int, seed: int, consumed_samples: int, global_batch_size: int,
                         *, dp_rank: int = 0, dp_size: int = 1) -> np.ndarray:
    """This DP rank's share of the next global batch: global_batch_size / dp_size sample indices."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size < 1 or global_batch_size % dp_size:
        raise ConfigError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                          f"data-parallel size {dp_size}")
    batch = sample_indices(num_samples, seed, consumed_samples, global_batch_size)  # [gbs]
    return batch[dp_rank::dp_size]  # [gbs / dp_size]


def training_microbatches(windows: TokenWindows, seed: int, consumed_samples: int, global_batch_size: int,
                          micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> list[TokenWindows]:
    """The micro-batches this rank runs for the step that starts at `consumed_samples`.

    After the step the caller adds `global_batch_size` to consumed_samples (and checkpoints it).
    """
    local = global_batch_size // max(dp_size, 1)
    if micro_batch_size < 1 or local % micro_batch_size:
        raise ConfigError(f"micro_batch_size={micro_batch_size} must divide global_batch_size / dp_size "
                          f"= {global_batch_size} / {dp_size}")
    index = global_batch_indices(len(windows), seed, consumed_samples, global_batch_size,
                                 dp_rank=dp_rank, dp_size=dp_size)  # [local]
    return [windows.rows(index[i:i + micro_batch_size]) for i in range(0, local, micro_batch_size)]
