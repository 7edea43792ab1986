"""The `convert` and `export` stages as library calls (the CLI apps are thin wrappers).

convert: HF checkpoint (safetensors dir or .gguf) -> our checkpoint, each rank reading only the
         tensors it needs and slicing its own shard (no rank builds the full model).
export:  our checkpoint (written at any layout, loaded at the current one) -> HF safetensors dir.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups

TOKENIZER_DIR = "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                    "generation_config.json")


def copy_tokenizer(src: Optional[Path], dst_root: Path) -> None:
    if src is None:
        return
    out = dst_root / TOKENIZER_DIR
    out.mkdir(exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def tokenizer_dir_of(ckpt: str | Path) -> Optional[Path]:
    path = Path(ckpt) / TOKENIZER_DIR
    return path if path.is_dir() else None


def check_convert_inputs(source: str | Path, output: str | Path, overwrite: bool, tp: int,
                         pp: int) -> Path:
    """What convert can refuse before it starts (files and headers only): the source, the output,
    the layout against the model. The CLI runs it before start-up; `convert_hf` runs it too."""
    from megatron_prune.convert.hf_io import validate_hf_dir
    from megatron_prune.models.build import check_divisibility

    src = Path(source)
    if not src.exists():
        raise ConfigError(f"source={src} does not exist; pass an HF safetensors directory or a "
                          f".gguf file (the embedded default: `megatron-prune assets`)")
    if src.is_file() and src.suffix != ".gguf":
        raise ConfigError(f"source={src} is neither a HF checkpoint directory nor a .gguf file")
    checkpoint.check_output_dir(output, overwrite, "output")
    checkpoint.check_not_overlapping(output, "output", source=source)
    if src.is_dir():  # config.json + tensor headers; a .gguf's config is known once it is dequantised
        check_divisibility(validate_hf_dir(src), tp, pp)
    return src


def check_export_inputs(ckpt: str | Path, output: str | Path, overwrite: bool, tp: int,
                        pp: int) -> tuple[Path, ModelConfig]:
    """What export can refuse before it starts: the checkpoint, the output, the layout vs the model."""
    from megatron_prune.models.build import check_divisibility

    path = checkpoint.validate_checkpoint(ckpt)
    checkpoint.check_output_dir(output, overwrite, "output")
    checkpoint.check_not_overlapping(output, "output", checkpoint=ckpt)
    cfg = checkpoint.read_model_config(path)
    check_divisibility(cfg, tp, pp)
    return path, cfg


def convert_hf(source: str | Path, output: str | Path, groups: Groups, overwrite: bool = False,
               extra_provenance: Optional[dict[str, Any]] = None) -> tuple[Path, ModelConfig]:
    from megatron_prune.convert.hf_io import read_hf_checkpoint
    from megatron_prune.models.build import build_model, check_divisibility
    from megatron_prune.models.shard import load_full_state

    src = check_convert_inputs(source, output, overwrite, groups.tp_size, groups.pp_size)
    cfg, tok_dir, state = read_hf_checkpoint(src)
    check_divisibility(cfg, groups.tp_size, groups.pp_size)
    model = build_model(cfg, groups)
    load_full_state(model, state.__getitem__, groups)
    provenance = {"stage": "convert", "inputs": {"source": str(src.resolve())},
                  # weights and config only: the hash names the model, not files beside it
                  "input_hashes": {"source": checkpoint.tree_sha256(src, (".safetensors", ".json",
                                                                          ".gguf"))},
                  **(extra_provenance or {})}

    def add_tokenizer(tmp: Path) -> None:
        if groups.is_rank0:
            copy_tokenizer(tok_dir, tmp)

    path = checkpoint.save_checkpoint(model, cfg, output, groups, provenance, overwrite=overwrite,
                                      extra_files=add_tokenizer)
    return path, cfg


def export_hf(ckpt: str | Path, output: str | Path, groups: Groups, overwrite: bool = False) -> Path:
    from megatron_prune.convert.hf_io import write_hf_checkpoint
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import gather_full_state

    ckpt, cfg = check_export_inputs(ckpt, output, overwrite, groups.tp_size, groups.pp_size)
    model = build_model(cfg, groups)
    checkpoint.load_checkpoint(model, ckpt)
    state = gather_full_state(model, groups)
    if groups.is_rank0:
        write_hf_checkpoint(state, cfg, output, tokenizer_dir=tokenizer_dir_of(ckpt),
                            overwrite=overwrite)
    checkpoint.barrier()
    return Path(output)
