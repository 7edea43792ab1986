"""Read and write HF checkpoints: safetensors directories and GGUF files.

`read_hf_checkpoint` returns the architecture, the tokenizer directory and a *lazy* canonical
megatron state (tensors are read on access), so loading an 8B model reads each tensor once.
A GGUF file is dequantised through transformers into an fp32 safetensors directory once and cached.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.checkpoint import atomic_directory, check_output_dir
from megatron_prune.convert.cache import cache_root, cached_dir
from megatron_prune.convert.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_prune.convert.hf_weights import CanonicalState, megatron_to_hf
from megatron_prune.convert.safetensors_source import SINGLE_FILE, SafetensorsSource, read_config_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
# Non-architectural config.json fields carried over from the tokenizer's (source) directory.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_config_from_hf_dir(hf_dir: str | Path, name: Optional[str] = None) -> ModelConfig:
    path = Path(hf_dir)
    return hf_config_to_model_config(read_config_json(path), name=name or path.name,
                                     where=str(path / "config.json"))


def _tokenizer_dir(hf_dir: Path) -> Optional[Path]:
    return hf_dir if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                          "vocab.json")) else None


def validate_hf_dir(hf_dir: Path, need_tokenizer: bool = False) -> ModelConfig:
    """Config parses, every tensor the config needs is present with the right shape (headers only)."""
    cfg = model_config_from_hf_dir(hf_dir)
    CanonicalState(SafetensorsSource(hf_dir), cfg)
    if need_tokenizer and _tokenizer_dir(hf_dir) is None:
        raise ConfigError(f"{hf_dir} has no tokenizer files (tokenizer.json)")
    return cfg


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF model + tokenizer into an fp32 HF safetensors directory, once (~30 s for
    SmolLM2-135M); later calls return the cached `out_dir` immediately."""
    gguf = Path(gguf_path)
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {gguf} does not exist")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model quantised; its weights are already dequantised fp32, and
        # save_pretrained refuses (or writes a bogus quantization_config) unless this is cleared.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))

    stat = gguf.stat()
    payload = {"source": str(gguf.resolve()), "source_bytes": stat.st_size}
    return cached_dir(out_dir, build, lambda d: validate_hf_dir(d, need_tokenizer=True), payload)


def default_gguf_cache_dir(gguf_path: str | Path) -> Path:
    """Where a GGUF's converted directory is cached: named by file, disambiguated by path + size."""
    gguf = Path(gguf_path).resolve()
    from megatron_prune import assets  # local import: assets imports this module

    known = assets.smollm2_gguf_path(required=False)
    if known is not None and known.resolve() == gguf:
        return assets.smollm2_cache_dir()
    digest = hashlib.sha1(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    return cache_root() / f"{gguf.stem.lower()}-{digest}-hf"


def read_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, Optional[Path], CanonicalState]:
    """A HF safetensors directory or a `.gguf` file -> (architecture, tokenizer dir or None,
    lazy canonical megatron state). Missing/unsupported inputs raise ConfigError up front."""
    src = Path(path)
    if src.is_file() and src.suffix == ".gguf":
        hf_dir = gguf_to_hf_dir(src, default_gguf_cache_dir(src))
        name = src.stem
    elif src.is_dir():
        hf_dir, name = src, src.name
    elif src.exists():
        raise ConfigError(f"{src} is neither a HF checkpoint directory nor a .gguf file")
    else:
        raise ConfigError(f"HF checkpoint {src} does not exist")
    cfg = model_config_from_hf_dir(hf_dir, name=name)
    return cfg, _tokenizer_dir(hf_dir), CanonicalState(SafetensorsSource(hf_dir), cfg)


def _extra_config(tokenizer_dir: Optional[Path], dtype: torch.dtype) -> dict[str, Any]:
    extra: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    source_cfg = tokenizer_dir / "config.json" if tokenizer_dir else None
    if source_cfg is not None and source_cfg.is_file():
        data = json.loads(source_cfg.read_text())
        extra.update({k: data[k] for k in _TOKEN_ID_FIELDS if data.get(k) is not None})
    return extra


def write_hf_checkpoint(state_canonical: Mapping[str, Tensor], cfg: ModelConfig, out_dir: str | Path,
                        tokenizer_dir: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """Canonical megatron state -> `out_dir` with config.json + model.safetensors (+ tokenizer files
    and token ids copied from `tokenizer_dir`), loadable by `AutoModelForCausalLM.from_pretrained`.
    Written to a temp dir and renamed into place."""
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None and not tok.is_dir():
        raise ConfigError(f"tokenizer_dir {tok} does not exist")
    dtype = state_canonical["embedding.word_embeddings.weight"].dtype
    hf_config = model_config_to_hf_config(cfg, extra=_extra_config(tok, dtype))  # errors before work
    hf_state = megatron_to_hf(state_canonical, cfg)
    check_output_dir(out_dir, overwrite, "output")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / SINGLE_FILE),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        for fname in TOKENIZER_FILES if tok is not None else ():
            if (tok / fname).is_file():
                shutil.copy2(tok / fname, tmp / fname)
    return Path(out_dir)
