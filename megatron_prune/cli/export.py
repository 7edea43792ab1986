"""`megatron-prune export checkpoint=<our checkpoint> output=<hf dir>`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage


def _body(cfg, groups, logger):
    from megatron_prune.convert.stages import export_hf

    path = export_hf(cfg.checkpoint, cfg.output, groups, overwrite=cfg.overwrite)
    logger.echo(f"exported {cfg.checkpoint} -> {path} (load with transformers.AutoModelForCausalLM)")
    return path


def _check(cfg, pcfg) -> None:
    from megatron_prune.convert.stages import check_export_inputs

    check_export_inputs(cfg.checkpoint, cfg.output, cfg.overwrite, pcfg.tp, pcfg.pp)


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="export")
def app(cfg) -> None:
    run_stage("export", cfg, _body, check=_check)
