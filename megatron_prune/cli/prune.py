"""`megatron-prune prune checkpoint=<dir> importance=<artifact> output=<dir> prune=<recipe> [prune.target.*=..]`"""
import hydra
from omegaconf import OmegaConf

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage
from megatron_prune.log import format_table

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def _settings(cfg):
    from megatron_prune.prune.stage import PruneSettings
    from megatron_prune.prune.targets import recipe_from_dict

    recipe = recipe_from_dict(OmegaConf.to_container(cfg.prune, resolve=True))
    return PruneSettings(checkpoint=cfg.checkpoint, output=cfg.output, recipe=recipe,
                         importance=cfg.importance, overwrite=cfg.overwrite)


def _check(cfg, pcfg) -> None:
    from megatron_prune.prune.stage import validate_prune_settings

    validate_prune_settings(_settings(cfg), pcfg.tp, pcfg.pp)


def _body(cfg, groups, logger):
    from megatron_prune.prune.stage import prune_checkpoint

    result = prune_checkpoint(_settings(cfg), groups)
    plan = result.plan
    rows = [[axis, getattr(plan.source, axis), getattr(plan.target, axis)] for axis in AXES]
    rows.append(["parameters", plan.parameters["before"], plan.parameters["after"]])
    logger.echo(f"prune {cfg.checkpoint} ({plan.importance} importance) at {groups.layout} -> {result.path}")
    logger.table("prune/architecture", ["axis", "before", "after"], rows)
    logger.summary({"prune/parameters_before": plan.parameters["before"],
                    "prune/parameters_after": plan.parameters["after"],
                    "prune/importance": plan.importance})
    return result


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="prune")
def app(cfg) -> None:
    run_stage("prune", cfg, _body, check=_check)
