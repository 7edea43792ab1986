"""Importance estimation: hooks that record activation statistics, reductions over process groups
into global index space, pure score functions, depth scores, and the `score` stage's artifact."""
from megatron_prune.importance.estimate import (NonFiniteActivation, collect_calibration_stats,
                                                estimate_width_importance)
from megatron_prune.importance.hooks import LocalStats, TokenMask, record_activations
from megatron_prune.importance.reduce import CalibrationStats, CommCounter, reduce_calibration_stats
from megatron_prune.importance.width import (BATCH_AGGREGATIONS, SEQUENCE_AGGREGATIONS, WidthScores,
                                             aggregate, query_group_scores, width_scores)

__all__ = ["BATCH_AGGREGATIONS", "CalibrationStats", "CommCounter", "LocalStats", "NonFiniteActivation",
           "SEQUENCE_AGGREGATIONS", "TokenMask", "WidthScores", "aggregate", "collect_calibration_stats",
           "estimate_width_importance", "query_group_scores", "record_activations",
           "reduce_calibration_stats", "width_scores"]
