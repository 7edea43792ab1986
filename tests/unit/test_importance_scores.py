"""The pure score functions: which sample sum each (sequence, batch) aggregation reads, GQA group sums,
hidden sums over every norm, Block Importance from its token sum."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.importance.depth import block_importance, contiguous_blocks
from megatron_prune.importance.reduce import CalibrationStats
from megatron_prune.importance.width import aggregate, query_group_scores, width_scores


def _sample_sums(per_sample: torch.Tensor) -> torch.Tensor:
    """[S, 3, n] per-sample (l2, mean, max) aggregates -> the [6, n] sums the hooks keep."""
    return torch.cat([per_sample.sum(0), per_sample.pow(2).sum(0)])


def test_each_aggregation_pair_reads_its_sums():
    a = torch.tensor([[[3.0, 4.0], [1.0, 2.0], [5.0, 6.0]],
                      [[4.0, 3.0], [3.0, 2.0], [7.0, 1.0]]], dtype=torch.float64)  # [S=2, 3, n=2]
    sums = _sample_sums(a)
    for k, sequence in enumerate(("l2", "mean", "max")):
        assert torch.allclose(aggregate(sums, 2, sequence, "mean"), a[:, k].mean(0))
        assert torch.allclose(aggregate(sums, 2, sequence, "l2"), a[:, k].pow(2).sum(0).sqrt())
    assert torch.allclose(aggregate(sums, 2, "l2", "l2"), torch.tensor([5.0, 5.0]).double())
    with pytest.raises(ValueError, match="sequence aggregation 'median'"):
        aggregate(sums, 2, "median", "l2")
    with pytest.raises(ValueError, match="batch aggregation 'max'"):
        aggregate(sums, 2, "mean", "max")


def test_query_group_score_is_the_sum_of_its_consecutive_heads():
    heads = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    assert torch.equal(query_group_scores(heads, 3), torch.tensor([[1.0, 5, 9], [13, 17, 21]]).double())
    with pytest.raises(ValueError, match="query groups"):
        query_group_scores(heads, 4)


def _stats(L=2, H=4, F=6, Hd=3, S=5, T=40):
    g = torch.Generator().manual_seed(0)
    return CalibrationStats(
        heads=torch.rand(L, 6, H, generator=g, dtype=torch.float64),
        neurons=torch.rand(L, 6, F, generator=g, dtype=torch.float64),
        hidden=torch.rand(2 * L + 1, 6, Hd, generator=g, dtype=torch.float64),
        bi_sum=torch.tensor([4.0, 2.0], dtype=torch.float64), num_tokens=T, num_samples=S)


def test_hidden_score_sums_every_norm_layer_and_counts_samples():
    stats = _stats()
    scores = width_scores(stats, num_query_groups=2, sequence="mean", batch="mean")
    assert torch.allclose(scores.hidden, (stats.hidden[:, 1] / 5).sum(0))  # row 1: sum of seq means
    assert torch.allclose(scores.neurons, stats.neurons[:, 1] / 5)
    default = width_scores(stats, num_query_groups=2)  # the paper's: mean over sequence, l2 over batch
    assert (default.sequence, default.batch) == ("mean", "l2")
    assert torch.allclose(default.heads, stats.heads[:, 4].sqrt())  # row 4: sum of squared seq means
    assert scores.query_groups.shape == (2, 2) and scores.num_tokens == 40 and scores.num_samples == 5


def test_block_importance_is_the_token_mean_and_blocks_are_contiguous():
    assert torch.equal(block_importance(_stats()), torch.tensor([0.1, 0.05], dtype=torch.float64))
    assert contiguous_blocks(4, 2) == [(0, 1), (1, 2), (2, 3)]
    assert contiguous_blocks(3, 3) == [(0, 1, 2)]
    with pytest.raises(Exception, match="block_size=5 must be in"):
        contiguous_blocks(4, 5)
