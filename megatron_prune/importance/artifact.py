"""The importance artifact: what `score` writes and `prune` reads. Plain files, no pickle.

    <dir>/importance.safetensors   the scores, float64, GLOBAL index space (names below)
    <dir>/importance.json          metadata: model (config + checkpoint hash), data (split hashes),
                                   samples, tokens, aggregation, depth settings, producing layout
    <dir>/heads.png, neurons.png, layers.png   the pictures (see plots.py)
    <dir>/COMPLETE                 written last; a directory without it is not an artifact

Tensors (L layers, H heads, G query groups, F FFN neurons, Hd hidden channels, k block size):
    width/heads [L, H]  width/query_groups [L, G]  width/neurons [L, F]  width/hidden [Hd]
    stats/heads [L, 6, H]  stats/neurons [L, 6, F]  stats/hidden [2L+1, 6, Hd]
        the raw sample sums (see reduce.CalibrationStats), so any other aggregation can be derived
    depth/block_importance [L]
    depth/lm_loss_layer [L]                 depth/lm_loss_block [L-k+1]            (if depth.loss)
        validation loss without layer i / without layers [j, j+k); metadata depth.loss.base_loss
        is the whole model's, and the increases are these minus it:
    depth/lm_loss_increase_layer [L]        depth/lm_loss_increase_block [L-k+1]   (if depth.loss)
    depth/mc_acc_block [L-k+1]              depth/mc_acc_norm_block [L-k+1]        (if depth.accuracy)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_prune.config import ConfigError

FORMAT = "megatron_prune.importance/1"
TENSORS_FILE = "importance.safetensors"
METADATA_FILE = "importance.json"
COMPLETE = "COMPLETE"


@dataclass
class ImportanceArtifact:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def expected_shapes(model: dict[str, Any], block_size: int) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor the artifact may hold, from the model config (a ModelConfig dict)."""
    L, H, G = model["num_layers"], model["num_attention_heads"], model["num_query_groups"]
    F, Hd = model["ffn_hidden_size"], model["hidden_size"]
    nb = L - block_size + 1
    return {"width/heads": (L, H), "width/query_groups": (L, G), "width/neurons": (L, F),
            "width/hidden": (Hd,), "stats/heads": (L, 6, H), "stats/neurons": (L, 6, F),
            "stats/hidden": (2 * L + 1, 6, Hd), "depth/block_importance": (L,),
            "depth/lm_loss_layer": (L,), "depth/lm_loss_block": (nb,),
            "depth/lm_loss_increase_layer": (L,), "depth/lm_loss_increase_block": (nb,),
            "depth/mc_acc_block": (nb,), "depth/mc_acc_norm_block": (nb,)}


def write_artifact_files(directory: str | Path, artifact: ImportanceArtifact) -> None:
    """Write into `directory` (a fresh temporary directory: the caller renames it when complete)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().to(torch.float64).contiguous().cpu() for k, v in artifact.tensors.items()}
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, **artifact.metadata}
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def mark_complete(directory: str | Path) -> None:
    (Path(directory) / COMPLETE).write_text("")


def read_artifact(path: str | Path, field: str = "importance") -> ImportanceArtifact:
    """Load and check an artifact directory; errors name the field and the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{field}={path} is not a directory; pass the output of `megatron-prune score`")
    for name in (METADATA_FILE, TENSORS_FILE, COMPLETE):
        if not (root / name).is_file():
            raise ConfigError(f"{field}={path} has no {name}; it is not a complete importance artifact "
                              "(rerun `megatron-prune score`)")
    try:
        meta = json.loads((root / METADATA_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{field}: {root / METADATA_FILE} is not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{field}: {root / METADATA_FILE} has format {meta.get('format')!r}, "
                          f"expected {FORMAT!r}")
    try:
        tensors = load_file(str(root / TENSORS_FILE))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{field}: cannot read {root / TENSORS_FILE}: {err}") from None
    shapes = expected_shapes(meta["model"]["config"], int(meta.get("depth", {}).get("block_size", 1)))
    for name, tensor in tensors.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise ConfigError(f"{field}: {root / TENSORS_FILE} holds {name} of shape "
                              f"{tuple(tensor.shape)}, expected {shapes[name]} for the recorded model")
    for name in ("width/heads", "width/query_groups", "width/neurons", "width/hidden"):
        if name not in tensors:
            raise ConfigError(f"{field}: {root / TENSORS_FILE} has no {name}")
    return ImportanceArtifact(tensors=tensors, metadata=meta)
