"""Windows and loss masks, DP-sharded evaluation batches, the resumable training sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # heavy import at collection

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import (iter_microbatches, num_microbatches, token_windows,
                                         windows_from_documents)
from megatron_prune.data.sampler import global_batch_indices, sample_indices, training_microbatches

PAD = 0


def _docs(lengths: list[int]) -> list[np.ndarray]:
    """Document d holds ids 1000*d + 1, 1000*d + 2, ... so every token says where it came from."""
    return [np.arange(1, n + 1, dtype=np.int64) + 1000 * d for d, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths, s", [([1, 2, 9, 10, 11, 25], 5), ([7], 3), ([33, 4], 8)])
def test_loss_mask_counts_every_real_target_exactly_once(lengths, s):
    docs = _docs(lengths)
    w = windows_from_documents(docs, s, pad_id=PAD)
    assert w.tokens.shape == w.labels.shape == w.loss_mask.shape == (len(w), s)
    assert w.tokens.dtype == torch.int64 and w.loss_mask.dtype == torch.float32
    for d, doc in enumerate(docs):
        rows = w.document_ids == d
        assert int(rows.sum()) == -(-(len(doc) - 1) // s)  # ceil((L - 1) / s) windows
        assert w.loss_mask[rows].sum().item() == len(doc) - 1  # each target once, padding never
        # The masked-in labels, in order, are the document minus its first token.
        assert w.labels[rows][w.loss_mask[rows].bool()].tolist() == doc[1:].tolist()
    assert w.num_targets == sum(n - 1 for n in lengths)
    # Labels are inputs shifted by one wherever both are real.
    both = w.loss_mask[:, 1:].bool()
    assert torch.equal(w.labels[:, :-1][both], w.tokens[:, 1:][both])
    # Padding: pad id and zero mask together, and only at the end of a row.
    assert torch.all(w.tokens[w.loss_mask == 0] == PAD) and torch.all(w.labels[w.loss_mask == 0] == PAD)
    assert torch.all(w.loss_mask[:, :-1] >= w.loss_mask[:, 1:])


def test_max_samples_keeps_the_first_windows_in_order():
    docs = _docs([12, 12])
    full = windows_from_documents(docs, 4)
    head = windows_from_documents(docs, 4, max_samples=4)
    assert len(full) == 6 and len(head) == 4
    assert torch.equal(head.tokens, full.tokens[:4]) and head.document_ids.tolist() == [0, 0, 0, 1]


def test_token_windows_reads_an_indexed_dataset(tmp_path):
    docs = _docs([6, 15, 3])
    prefix = str(tmp_path / "split")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    w = token_windows(prefix, seq_length=4)
    expected = windows_from_documents(docs, 4)
    assert torch.equal(w.tokens, expected.tokens) and torch.equal(w.loss_mask, expected.loss_mask)
    assert w.num_targets == 5 + 14 + 2
    with pytest.raises(ConfigError, match="not found"):
        token_windows(str(tmp_path / "missing"), 4)


@pytest.mark.parametrize("n_rows, mbs, dp", [(23, 2, 3), (7, 4, 2), (8, 2, 4), (3, 2, 4), (1, 1, 1)])
def test_dp_shards_are_disjoint_cover_all_rows_and_take_equal_steps(n_rows, mbs, dp):
    w = windows_from_documents(_docs([4 * n_rows + 1]), 4)
    assert len(w) == n_rows
    seen, steps = [], set()
    for rank in range(dp):
        batches = list(iter_microbatches(w, mbs, dp_rank=rank, dp_size=dp))
        steps.add(len(batches))
        for b in batches:
            assert len(b) == mbs  # fixed shape on every rank and step
            real = b.sample_ids >= 0
            assert torch.all(b.loss_mask[~real] == 0)  # filler rows never count
            seen += b.sample_ids[real].tolist()
    assert steps == {num_microbatches(n_rows, mbs, dp)}
    assert sorted(seen) == list(range(n_rows)) and len(seen) == len(set(seen))


def test_sharding_is_strided_and_deterministic():
    w = windows_from_documents(_docs([41]), 4)  # 10 rows
    ids = [b.sample_ids.tolist() for b in iter_microbatches(w, 2, dp_rank=1, dp_size=3)]
    assert ids == [[1, 4], [7, -1]]
    assert ids == [b.sample_ids.tolist() for b in iter_microbatches(w, 2, dp_rank=1, dp_size=3)]
    with pytest.raises(ConfigError, match="dp_rank=3"):
        next(iter_microbatches(w, 2, dp_rank=3, dp_size=3))


def test_sampler_is_a_pure_function_of_seed_and_consumed_samples():
    n = 10
    stream = sample_indices(n, seed=3, consumed_samples=0, count=35)
    for epoch in range(3):  # each epoch is a permutation of all samples
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert stream[:n].tolist() != stream[n:2 * n].tolist()  # epochs are shuffled differently
    # Resuming at any point continues the same stream.
    for consumed in (0, 4, 10, 17):
        assert sample_indices(n, 3, consumed, 35 - consumed).tolist() == stream[consumed:].tolist()
    assert sample_indices(n, 4, 0, n).tolist() != stream[:n].tolist()


def test_global_batch_is_split_disjointly_across_dp_ranks():
    batch = sample_indices(50, seed=1, consumed_samples=8, count=8)
    shares = [global_batch_indices(50, 1, 8, 8, dp_rank=r, dp_size=4) for r in range(4)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(batch.tolist())
    with pytest.raises(ConfigError, match="multiple of the data-parallel size"):
        global_batch_indices(50, 1, 0, 6, dp_rank=0, dp_size=4)


def test_training_microbatches_follow_the_sampler():
    w = windows_from_documents(_docs([4 * 12 + 1]), 4)  # 12 rows
    mbs = training_microbatches(w, seed=2, consumed_samples=6, global_batch_size=8, micro_batch_size=2,
                                dp_rank=1, dp_size=2)
    assert [len(b) for b in mbs] == [2, 2]
    expected = global_batch_indices(12, 2, 6, 8, dp_rank=1, dp_size=2).tolist()
    assert torch.cat([b.sample_ids for b in mbs]).tolist() == expected
    with pytest.raises(ConfigError, match="must divide"):
        training_microbatches(w, 2, 0, 8, 3, dp_rank=0, dp_size=2)
