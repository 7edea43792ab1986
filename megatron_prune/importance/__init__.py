"""Importance estimation: hooks that record activation statistics, reductions over process groups
into global index space, and pure score functions."""
from megatron_prune.importance.estimate import collect_width_stats, estimate_width_importance
from megatron_prune.importance.hooks import LocalStats, TokenMask, record_activations
from megatron_prune.importance.reduce import CommCounter, WidthStats, reduce_width_stats
from megatron_prune.importance.width import (AGGREGATIONS, WidthScores, aggregate, query_group_scores,
                                             width_scores)

__all__ = ["AGGREGATIONS", "CommCounter", "LocalStats", "TokenMask", "WidthScores", "WidthStats",
           "aggregate", "collect_width_stats", "estimate_width_importance", "query_group_scores",
           "record_activations", "reduce_width_stats", "width_scores"]
