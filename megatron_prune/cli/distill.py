"""`megatron-prune distill student=<dir> teacher=<dir> data_dir=<prepared data> output=<dir> [distill.*=..]`"""
import sys

import hydra
from omegaconf import OmegaConf

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _settings(cfg):
    from megatron_prune.config import ConfigError
    from megatron_prune.distill.stage import DistillLoss, DistillSettings
    from megatron_prune.train.settings import train_settings_from
    from megatron_prune.train.stage import DataSettings

    group = OmegaConf.to_container(cfg.distill, resolve=True)
    train = group.pop("train", {})
    known = set(DistillLoss.__dataclass_fields__)
    if set(group) - known:
        raise ConfigError(f"distill: unknown fields {sorted(set(group) - known)}; known fields are "
                          f"{sorted(known | {'train'})}")
    return DistillSettings(
        student=cfg.student, teacher=cfg.teacher, output=cfg.output, checkpoint_dir=cfg.checkpoint_dir,
        overwrite=cfg.overwrite,
        data=DataSettings(data_dir=cfg.data_dir, train_split=cfg.train_split,
                          validation_split=cfg.validation_split),
        loss=DistillLoss(**group).validate(),
        train=train_settings_from(train, where="distill.train"))


def _check(cfg, pcfg) -> None:
    from megatron_prune.distill.stage import validate_distill_settings

    validate_distill_settings(_settings(cfg), pcfg.tp, pcfg.pp)


def _body(cfg, groups, logger):
    from megatron_prune.distill.stage import distill_checkpoint

    result, path = distill_checkpoint(_settings(cfg), groups, logger)
    if path is None:
        sys.exit(3)  # stopped by a signal after checkpointing: rerun to continue
    logger.echo(f"distill {cfg.teacher} -> {cfg.student} at {groups.layout} -> {path}")
    return result


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="distill")
def app(cfg) -> None:
    run_stage("distill", cfg, _body, check=_check)
