"""`megatron-prune export checkpoint=<our checkpoint> output=<hf dir>`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _body(cfg, groups, logger):
    from megatron_prune.convert.stages import export_hf

    path = export_hf(cfg.checkpoint, cfg.output, groups, overwrite=cfg.overwrite)
    logger.echo(f"exported {cfg.checkpoint} -> {path} (load with transformers.AutoModelForCausalLM)")
    return path


def _check(cfg, pcfg) -> None:
    """What export can refuse before it starts: the checkpoint, the output, the layout vs the model."""
    from megatron_prune import checkpoint
    from megatron_prune.models.build import check_divisibility

    ckpt = checkpoint.validate_checkpoint(cfg.checkpoint)
    checkpoint.check_output_dir(cfg.output, cfg.overwrite, "output")
    checkpoint.check_not_overlapping(cfg.output, "output", checkpoint=cfg.checkpoint)
    check_divisibility(checkpoint.read_model_config(ckpt), pcfg.tp, pcfg.pp)


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="export")
def app(cfg) -> None:
    run_stage("export", cfg, _body, check=_check)
