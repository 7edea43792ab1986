"""`megatron-prune export checkpoint=<our checkpoint> output=<hf dir>`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _body(cfg, groups, logger):
    from megatron_prune.convert.stages import export_hf

    path = export_hf(cfg.checkpoint, cfg.output, groups, overwrite=cfg.overwrite)
    logger.echo(f"exported {cfg.checkpoint} -> {path} (load with transformers.AutoModelForCausalLM)")
    return path


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="export")
def app(cfg) -> None:
    run_stage("export", cfg, _body)
