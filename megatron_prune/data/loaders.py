"""Read a split back and cut it into fixed-length, loss-masked samples.

Windows: each document (EOS included) is cut on its own, never across documents. With
`s = seq_length`, window k of a document covers tokens [k*s, k*s + s] (s + 1 tokens): the input is
the first s, the labels the same span shifted by one. Consecutive windows share one boundary token,
so the inputs do not overlap and every token of a document except its first is a target exactly
once: sum(loss_mask) over a document == n_tokens - 1. The last window of a document is right-padded
with `pad_id` and loss_mask 0.

Attention needs no padding mask: padding only ever sits at the end of a row, and under the causal
mask a real position never attends to a later one, so padded positions cannot change real logits
(their own outputs are discarded by loss_mask). Position ids restart at 0 in every window.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_prune.config import ConfigError


@dataclass
class TokenWindows:
    tokens: torch.Tensor  # [n, s] int64 input ids
    labels: torch.Tensor  # [n, s] int64 next-token targets (pad_id where loss_mask == 0)
    loss_mask: torch.Tensor  # [n, s] float32: 1 for a real target, 0 for padding
    document_ids: torch.Tensor  # [n] int64: index of the source document in the split; -1 for filler
    sample_ids: torch.Tensor  # [n] int64: row index in the whole split; -1 for filler rows
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum().item())

    def rows(self, index: torch.Tensor | np.ndarray | list[int]) -> "TokenWindows":
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))  # [k]
        return TokenWindows(self.tokens[index], self.labels[index], self.loss_mask[index],
                            self.document_ids[index], self.sample_ids[index], self.pad_id)

    def padded_to(self, n_rows: int) -> "TokenWindows":
        """Append fully masked filler rows up to `n_rows` (they carry no loss and no sample id)."""
        extra = n_rows - len(self)
        if extra <= 0:
            return self
        s = self.seq_length
        fill = torch.full((extra, s), self.pad_id, dtype=torch.int64)  # [extra, s]
        none = torch.full((extra,), -1, dtype=torch.int64)  # [extra]
        return TokenWindows(torch.cat([self.tokens, fill]), torch.cat([self.labels, fill]),
                            torch.cat([self.loss_mask, torch.zeros(extra, s, dtype=torch.float32)]),
                            torch.cat([self.document_ids, none]), torch.cat([self.sample_ids, none]),
                            self.pad_id)


def read_documents(split_prefix: str) -> list[np.ndarray]:
    """Every document of an indexed dataset as one int64 array (sequences of a document joined)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(split_prefix):
        raise ConfigError(f"{split_prefix}.bin/.idx not found. Fix: run the prepare-data stage, and "
                          f"open splits through `load_manifest(dir).split_prefix(name)`.")
    dataset = IndexedDataset(split_prefix)
    bounds = dataset.document_indices  # [n_docs + 1] sequence index where each document starts
    docs = []
    for d in range(len(bounds) - 1):
        # Copy: items are views of the dataset's mmap, which its __del__ closes (reading a view
        # after that segfaults).
        parts = [np.array(dataset[i], dtype=np.int64, copy=True) for i in range(bounds[d], bounds[d + 1])]
        docs.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    del dataset  # release the mmap now, not at interpreter exit
    return docs


def windows_from_documents(documents: list[np.ndarray], seq_length: int, max_samples: Optional[int] = None,
                           pad_id: int = 0) -> TokenWindows:
    """Cut documents (already in memory) into windows; see the module docstring for the layout."""
    if seq_length < 1:
        raise ConfigError(f"seq_length={seq_length} must be >= 1")
    if max_samples is not None and max_samples < 0:
        raise ConfigError(f"max_samples={max_samples} must be >= 0 (or null for all windows)")
    s = seq_length
    # A document of L tokens has L - 1 targets, hence ceil((L - 1) / s) windows.
    starts = [(d, k * s) for d, doc in enumerate(documents) for k in range(math.ceil(max(len(doc) - 1, 0) / s))]
    if max_samples is not None:
        starts = starts[:max_samples]
    n = len(starts)
    tokens = np.full((n, s), pad_id, dtype=np.int64)  # [n, s]
    labels = np.full((n, s), pad_id, dtype=np.int64)  # [n, s]
    loss_mask = np.zeros((n, s), dtype=np.float32)  # [n, s]
    for r, (d, start) in enumerate(starts):
        chunk = documents[d][start:start + s + 1]  # [m + 1], m <= s real targets
        m = len(chunk) - 1
        tokens[r, :m] = chunk[:-1]
        labels[r, :m] = chunk[1:]
        loss_mask[r, :m] = 1.0
    return TokenWindows(
        tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        document_ids=torch.tensor([d for d, _ in starts], dtype=torch.int64),
        sample_ids=torch.arange(n, dtype=torch.int64), pad_id=pad_id)


def token_windows(split_prefix: str, seq_length: int, max_samples: Optional[int] = None,
                  pad_id: int = 0) -> TokenWindows:
    """All windows of a split in a fixed order (document order, then position in the document).

    `max_samples` keeps the first windows in that order. `pad_id` only has to be a valid token id:
    padded positions are masked out of the loss and invisible to real positions.
    """
    return windows_from_documents(read_documents(split_prefix), seq_length, max_samples, pad_id)


def num_microbatches(num_samples: int, micro_batch_size: int, dp_size: int) -> int:
    """Steps every DP rank takes over `num_samples` rows: the largest shard, in micro-batches."""
    return math.ceil(math.ceil(num_samples / dp_size) / micro_batch_size)


def iter_microbatches(windows: TokenWindows, micro_batch_size: int, *, dp_rank: int = 0,
                      dp_size: int = 1) -> Iterator[TokenWindows]:
    """This DP rank's micro-batches for evaluation/scoring, each exactly `micro_batch_size` rows.

    Rank r takes rows r, r + dp_size, r + 2*dp_size, ... (disjoint across ranks, covering all rows,
    deterministic). Shards differ in size by at most one row, so every rank runs the same number of
    steps, `num_microbatches(len(windows), micro_batch_size, dp_size)`, and short batches are padded
    with fully masked filler rows (sample_ids == -1). Collectives inside a step therefore always line
    up, and sums weighted by loss_mask are exact: filler rows add nothing.
    """
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    shard = torch.arange(dp_rank, len(windows), dp_size, dtype=torch.int64)  # [n_local]
    for step in range(num_microbatches(len(windows), micro_batch_size, dp_size)):
        index = shard[step * micro_batch_size:(step + 1) * micro_batch_size]  # [<= mbs]
        yield windows.rows(index).padded_to(micro_batch_size)
