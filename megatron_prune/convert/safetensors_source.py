"""Lazy access to a HF safetensors checkpoint directory (one file, or shards + index).

Only headers are read up front (names, shapes); each tensor is read from its file on request via
`safetensors.safe_open`, so large checkpoints are converted one tensor group at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from megatron_prune.config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _existing_dir(hf_dir: str | Path) -> Path:
    path = Path(hf_dir)
    if not path.is_dir():
        raise ConfigError(f"HF checkpoint directory {str(path)!r} does not exist (or is not a directory)")
    return path


def read_config_json(hf_dir: str | Path) -> dict[str, Any]:
    path = _existing_dir(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: a HF checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err


class SafetensorsSource:
    """A `TensorSource` over a safetensors directory. Keeps one open handle per file."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = _existing_dir(hf_dir)
        self._handles: dict[Path, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index.is_file():
            self.index_path = index
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConfigError(f"{index} is not a safetensors index (needs a 'weight_map'): {err}") from err
            self.file_of = {name: self.dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            self.index_path = None
            self.file_of = {name: single for name in self._handle(single).keys()}
        else:
            found = sorted(p.name for p in self.dir.iterdir())[:8]
            raise ConfigError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found}); "
                              f"only safetensors checkpoints are read (re-save with save_pretrained)")

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            if not path.is_file():
                raise ConfigError(f"shard {path} listed in {self.index_path} is missing")
            # safe_open reads only the header (and checks it against the file size); data is mmapped
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as err:  # a truncated or corrupt file: name it
                raise ConfigError(f"{path} is not a readable safetensors file: {err}") from err
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.file_of)

    def where(self, name: str) -> str:
        if name in self.file_of:
            return str(self.file_of[name])
        return str(self.index_path or self.dir / SINGLE_FILE)

    def _present(self, name: str) -> Any:
        handle = self._handle(self.file_of[name])
        if name not in handle.keys():
            raise ConfigError(f"tensor {name!r} is missing from {self.file_of[name]} "
                              f"(the index {self.index_path} says it is there)")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self._present(name).get_slice(name).get_shape())
        return self._shapes[name]

    def get(self, name: str) -> Tensor:
        return self._present(name).get_tensor(name)
