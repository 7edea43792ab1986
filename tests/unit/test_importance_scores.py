"""The pure score functions: which statistic each aggregation reads, GQA group sums, hidden sums."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.importance.reduce import WidthStats
from megatron_prune.importance.width import aggregate, query_group_scores, width_scores


def test_each_aggregation_reads_its_statistic():
    # rows: sum n, sum n^2, max n
    head_rows = torch.tensor([[4.0, 6.0], [8.0, 18.0], [3.0, 5.0]], dtype=torch.float64)
    # rows: sum x^2, sum |x|, max |x|
    chan_rows = torch.tensor([[9.0, 16.0], [4.0, 2.0], [2.5, 1.5]], dtype=torch.float64)
    assert torch.allclose(aggregate(head_rows, 2, "l2", heads=True),
                          torch.tensor([8.0, 18.0]).double().sqrt())
    assert torch.allclose(aggregate(head_rows, 2, "mean", heads=True), torch.tensor([2.0, 3.0]).double())
    assert torch.allclose(aggregate(head_rows, 2, "max", heads=True), torch.tensor([3.0, 5.0]).double())
    assert torch.allclose(aggregate(chan_rows, 2, "l2", heads=False), torch.tensor([3.0, 4.0]).double())
    assert torch.allclose(aggregate(chan_rows, 2, "mean", heads=False), torch.tensor([2.0, 1.0]).double())
    assert torch.allclose(aggregate(chan_rows, 2, "max", heads=False), torch.tensor([2.5, 1.5]).double())
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(chan_rows, 2, "median", heads=False)


def test_query_group_score_is_the_sum_of_its_consecutive_heads():
    heads = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    assert torch.equal(query_group_scores(heads, 3), torch.tensor([[1.0, 5, 9], [13, 17, 21]]).double())
    with pytest.raises(ValueError, match="query groups"):
        query_group_scores(heads, 4)


def test_hidden_score_sums_every_norm_layer():
    L, H, F, Hd = 2, 4, 6, 3
    hidden = torch.rand(2 * L + 1, 3, Hd, dtype=torch.float64)
    stats = WidthStats(heads=torch.rand(L, 3, H, dtype=torch.float64),
                       neurons=torch.rand(L, 3, F, dtype=torch.float64), hidden=hidden, num_tokens=7)
    scores = width_scores(stats, num_query_groups=2, aggregation="mean")
    assert torch.allclose(scores.hidden, (hidden[:, 1] / 7).sum(0))
    assert scores.query_groups.shape == (L, 2) and scores.num_tokens == 7
