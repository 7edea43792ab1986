"""`megatron-prune correct checkpoint=<teacher> data_dir=<prepared data> output=<dir> [correct.train.*=..]`"""
import sys

import hydra
from omegaconf import OmegaConf

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _settings(cfg):
    from megatron_prune.train.settings import train_settings_from
    from megatron_prune.train.stage import CorrectSettings, DataSettings

    group = OmegaConf.to_container(cfg.correct, resolve=True)
    return CorrectSettings(
        checkpoint=cfg.checkpoint, output=cfg.output, checkpoint_dir=cfg.checkpoint_dir,
        overwrite=cfg.overwrite,
        data=DataSettings(data_dir=cfg.data_dir, train_split=cfg.train_split,
                          validation_split=cfg.validation_split),
        train=train_settings_from(group.get("train", {}), where="correct.train"))


def _check(cfg, pcfg) -> None:
    from megatron_prune.train.stage import validate_correct_settings

    validate_correct_settings(_settings(cfg), pcfg.tp, pcfg.pp)


def _body(cfg, groups, logger):
    from megatron_prune.train.stage import correct_checkpoint

    result, path = correct_checkpoint(_settings(cfg), groups, logger)
    if path is None:
        sys.exit(3)  # stopped by a signal after checkpointing: rerun to continue
    logger.echo(f"correct {cfg.checkpoint} at {groups.layout} -> {path}")
    return result


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="correct")
def app(cfg) -> None:
    run_stage("correct", cfg, _body, check=_check)
