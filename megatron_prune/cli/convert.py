"""`megatron-prune convert source=<hf dir or .gguf> output=<dir> parallel.tp=.. parallel.pp=..`"""
import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage
from megatron_prune.log import format_table


def _body(cfg, groups, logger):
    from megatron_prune.convert.stages import convert_hf
    from megatron_prune.models.params import count_parameters

    path, mcfg = convert_hf(cfg.source, cfg.output, groups, overwrite=cfg.overwrite)
    params = count_parameters(mcfg)
    logger.summary({"parameters": params, "layout": groups.layout})
    logger.echo(format_table(["checkpoint", "model", "layout", "parameters"],
                             [[str(path), mcfg.name, groups.layout, params]]))
    return path


def _check(cfg, pcfg) -> None:
    from megatron_prune.convert.stages import check_convert_inputs

    check_convert_inputs(cfg.source, cfg.output, cfg.overwrite, pcfg.tp, pcfg.pp)


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="convert")
def app(cfg) -> None:
    run_stage("convert", cfg, _body, check=_check)
