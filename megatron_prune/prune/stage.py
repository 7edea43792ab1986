"""The `prune` stage as a library call: checkpoint + importance + target -> pruned checkpoint.

Order: every check that needs no model (checkpoint, recipe, target vs layout, artifact vs checkpoint
hash, output) -> build and load the model -> scores (artifact, weight magnitudes or seeded random)
-> the plan (pure) -> surgery on the shards -> save with plan.json and provenance. `prune_model` is
the same on a live model, for a job that goes straight on to distillation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups
from megatron_prune.prune.plan import (PLAN_FILE, ImportanceScores, PrunePlan, PruneRecipe, check_artifact_matches,
                                       make_plan, random_scores, scores_from_artifact)
from megatron_prune.prune.targets import target_config


@dataclass
class PruneSettings:
    checkpoint: str
    output: str
    recipe: PruneRecipe
    importance: Optional[str] = None  # the score artifact directory (importance=activation)
    overwrite: bool = False


@dataclass
class Checked:
    ckpt: Path
    model: ModelConfig
    target: ModelConfig
    artifact: Any  # ImportanceArtifact or None


def validate_prune_settings(s: PruneSettings, tp: int, pp: int) -> Checked:
    """Everything `prune` can refuse before start-up, each error naming its field."""
    from megatron_prune.importance.artifact import read_artifact
    from megatron_prune.checkpoint import model_hash

    ckpt = checkpoint.validate_checkpoint(s.checkpoint)
    cfg = checkpoint.read_model_config(ckpt)
    target = target_config(cfg, s.recipe.target, tp=tp, pp=pp)
    if (s.recipe.importance == "magnitude" and s.recipe.target.drop_layers is None
            and target.num_layers < cfg.num_layers):
        # weight norms rank width units only; layers need a loss, accuracy or BI measured by `score`
        raise ConfigError(f"prune.importance=magnitude has no depth scores, so prune.target.num_layers="
                          f"{target.num_layers} cannot choose which of {cfg.num_layers} layers to drop; name "
                          "them with prune.target.drop_layers=[...], or use prune.importance=activation with "
                          "a `megatron-prune score` artifact")
    artifact = None
    if s.recipe.importance == "activation":
        if not s.importance:
            raise ConfigError("prune.importance=activation needs importance=<the output of `megatron-prune "
                              "score`>; or set prune.importance=magnitude / random")
        artifact = read_artifact(s.importance)
        check_artifact_matches(artifact, cfg, model_hash(ckpt))
    for name, value in (("checkpoint", s.checkpoint), ("importance", s.importance)):
        if value:
            checkpoint.check_not_overlapping(s.output, "output", **{name: value})
    checkpoint.check_output_dir(s.output, s.overwrite, "output")
    return Checked(ckpt=ckpt, model=cfg, target=target, artifact=artifact)


def importance_scores(model: torch.nn.Module, cfg: ModelConfig, recipe: PruneRecipe, groups: Groups,
                      artifact: Any = None) -> ImportanceScores:
    """The scores the plan ranks by, the same on every rank."""
    if recipe.importance == "activation":
        return scores_from_artifact(artifact)
    if recipe.importance == "magnitude":
        from megatron_prune.importance.magnitude import magnitude_scores

        return magnitude_scores(model, groups)
    drop = cfg.num_layers - (recipe.target.num_layers or cfg.num_layers)
    return random_scores(cfg, recipe.seed, block_size=drop if drop > 0 else None)


def prune_model(model: torch.nn.Module, plan: PrunePlan, groups: Groups, consume: bool = True) -> torch.nn.Module:
    """The library call on a live model: the pruned model at the same layout (see surgery.py). By
    default `model` is consumed (its tensors are freed as surgery goes, so memory stays near one
    model); consume=False keeps it intact, at the cost of holding both."""
    from megatron_prune.prune.surgery import apply_plan

    return apply_plan(model, plan, groups, consume=consume)


@dataclass
class PruneResult:
    path: Path
    plan: PrunePlan


def prune_checkpoint(s: PruneSettings, groups: Groups) -> PruneResult:
    from megatron_prune.convert.stages import copy_tokenizer, tokenizer_dir_of
    from megatron_prune.checkpoint import model_hash
    from megatron_prune.models.build import build_model

    checked = validate_prune_settings(s, groups.tp_size, groups.pp_size)
    cfg = checked.model
    model = build_model(cfg, groups)
    checkpoint.load_checkpoint(model, checked.ckpt)
    scores = importance_scores(model, cfg, s.recipe, groups, checked.artifact)
    plan = make_plan(cfg, scores, s.recipe.target, tp=groups.tp_size, pp=groups.pp_size)
    pruned = prune_model(model, plan, groups)  # consumes `model`
    del model
    provenance = {"stage": "prune",
                  "inputs": {"checkpoint": str(checked.ckpt.resolve()),
                             "importance": str(Path(s.importance).resolve()) if s.importance else None},
                  "input_hashes": {"checkpoint": model_hash(checked.ckpt) if groups.is_rank0 else ""},
                  "recipe": {"importance": s.recipe.importance, "seed": s.recipe.seed,
                             "target": vars(s.recipe.target)},
                  "parameters": plan.parameters}

    def extra(tmp: Path) -> None:
        if groups.is_rank0:
            plan.save(tmp / PLAN_FILE)
            copy_tokenizer(tokenizer_dir_of(checked.ckpt), tmp)

    path = checkpoint.save_checkpoint(pruned, plan.target, s.output, groups, provenance,
                                      overwrite=s.overwrite, extra_files=extra)
    return PruneResult(path=path, plan=plan)
