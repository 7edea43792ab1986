"""Pruning: the prune plan (kept indices per axis + the new architecture) from importance scores and
a target. Surgery that applies a plan to sharded weights lives beside it."""
from megatron_prune.prune.plan import (DEPTH_METRICS, FORMAT, IMPORTANCE_SOURCES, PLAN_FILE, ImportanceScores,
                                       PrunePlan, PruneRecipe, PruneTarget, check_artifact_matches, make_plan,
                                       random_scores, recipe_from_dict, scores_from_artifact,
                                       select_dropped_layers, select_heads, target_config, target_from_dict,
                                       top_k)

__all__ = ["DEPTH_METRICS", "FORMAT", "IMPORTANCE_SOURCES", "ImportanceScores", "PLAN_FILE", "PrunePlan",
           "PruneRecipe", "PruneTarget", "check_artifact_matches", "make_plan", "random_scores",
           "recipe_from_dict", "scores_from_artifact", "select_dropped_layers", "select_heads",
           "target_config", "target_from_dict", "top_k"]
