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
    """What convert can refuse before it starts: the source, the output, the layout vs the model."""
    from pathlib import Path

    from megatron_prune import checkpoint
    from megatron_prune.config import ConfigError
    from megatron_prune.convert.hf_io import validate_hf_dir
    from megatron_prune.models.build import check_divisibility

    src = Path(cfg.source)
    if not src.exists():
        raise ConfigError(f"source={src} does not exist; pass an HF safetensors directory or a "
                          f".gguf file (the embedded default: `megatron-prune assets`)")
    if src.is_file() and src.suffix != ".gguf":
        raise ConfigError(f"source={src} is neither a HF checkpoint directory nor a .gguf file")
    checkpoint.check_output_dir(cfg.output, cfg.overwrite, "output")
    checkpoint.check_not_overlapping(cfg.output, "output", source=cfg.source)
    if src.is_dir():  # config.json + tensor headers; a .gguf's config is known once it is dequantised
        check_divisibility(validate_hf_dir(src), pcfg.tp, pcfg.pp)


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="convert")
def app(cfg) -> None:
    run_stage("convert", cfg, _body, check=_check)
