"""The `score` stage as a library call: checkpoint + prepared data -> importance artifact directory.

Order: validate everything cheap (files, JSON, sizes) -> build and load the model -> one calibration
pass (width statistics and Block Importance together) -> the depth sweeps (LM loss without each
layer / block; multiple-choice accuracy without each block) -> rank 0 writes the artifact and its
pictures into a temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.importance.artifact import (ImportanceArtifact, mark_complete, write_artifact_files)
from megatron_prune.importance.width import BATCH_AGGREGATIONS, SEQUENCE_AGGREGATIONS
from megatron_prune.parallel import Groups

PICTURES = ("heads.png", "neurons.png", "layers.png")


@dataclass
class DepthSettings:
    block_size: int = 1  # k: contiguous layers removed together (set it to the layers you will drop)
    loss: bool = True  # LM loss increase without each layer and each block
    loss_split: str = "validation"
    loss_max_samples: Optional[int] = 16
    accuracy: bool = True  # multiple-choice accuracy without each block
    task: str = "default"  # default (the data dir's task.jsonl) | path | none
    task_seq_length: int = 256
    max_task_examples: Optional[int] = 100


@dataclass
class ScoreSettings:
    checkpoint: str
    data_dir: str
    output: str
    overwrite: bool = False
    split: str = "calibration"
    seq_length: int = 512
    max_samples: Optional[int] = 1024  # the paper's calibration set size
    micro_batch_size: int = 4
    sequence: str = "mean"  # aggregation over a sample's tokens: l2 | mean | max
    batch: str = "l2"  # aggregation over samples: l2 | mean
    backend: str = "auto"  # statistics kernels: auto | torch | triton
    pictures: bool = True
    depth: DepthSettings = field(default_factory=DepthSettings)


@dataclass
class Checked:
    ckpt: Path
    model: ModelConfig
    manifest: Any
    num_samples: int  # calibration windows that will be scored
    task_path: Optional[str]


def _count_windows(split_prefix: str, seq_length: int, max_samples: Optional[int]) -> int:
    """Windows `token_windows` would cut, from the index's sequence lengths (no token is read)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(split_prefix)
    lengths = dataset.sequence_lengths
    bounds = dataset.document_indices
    n = sum(math.ceil(max(int(lengths[bounds[d]:bounds[d + 1]].sum()) - 1, 0) / seq_length)
            for d in range(len(bounds) - 1))
    del dataset
    return n if max_samples is None else min(n, max_samples)


def validate_score_settings(s: ScoreSettings, dp_size: int = 1) -> Checked:
    """Everything `score` can refuse before start-up, each error naming its field."""
    from megatron_prune.data.manifest import load_manifest
    from megatron_prune.evaluate.stage import resolve_task
    from megatron_prune.importance.depth import check_block_size

    ckpt = checkpoint.validate_checkpoint(s.checkpoint)
    cfg = checkpoint.read_model_config(ckpt)
    if not Path(s.data_dir, "manifest.json").is_file():
        raise ConfigError(f"data_dir={s.data_dir} holds no manifest.json; run `megatron-prune "
                          f"prepare-data` (or `megatron-prune assets`) to create it")
    manifest = load_manifest(s.data_dir)
    if manifest.tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"data_dir={s.data_dir} was tokenised with a vocabulary of "
                          f"{manifest.tokenizer.vocab_size} but {ckpt} has vocab_size={cfg.vocab_size}")
    if s.sequence not in SEQUENCE_AGGREGATIONS:
        raise ConfigError(f"sequence={s.sequence!r}: choose one of {', '.join(SEQUENCE_AGGREGATIONS)}")
    if s.batch not in BATCH_AGGREGATIONS:
        raise ConfigError(f"batch={s.batch!r}: choose one of {', '.join(BATCH_AGGREGATIONS)}")
    if s.backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"backend={s.backend!r}: choose auto, torch or triton")
    for name in ("seq_length", "micro_batch_size"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}={getattr(s, name)} must be >= 1")
    if s.seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"seq_length={s.seq_length} is longer than the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}; use at most that")
    if s.max_samples is not None and s.max_samples < 1:
        raise ConfigError(f"max_samples={s.max_samples} must be >= 1 (or null for the whole split)")
    if s.split not in manifest.splits or manifest.splits[s.split].num_tokens < 2:
        have = sorted(k for k, v in manifest.splits.items() if v.num_tokens >= 2)
        raise ConfigError(f"split={s.split!r}: {s.data_dir} has no calibration data in that split "
                          f"(non-empty splits: {have}); prepare data with a calibration fraction > 0")
    num_samples = _count_windows(manifest.split_prefix(s.split), s.seq_length, s.max_samples)
    if num_samples < s.micro_batch_size * dp_size:
        raise ConfigError(f"split={s.split!r} gives {num_samples} calibration samples of {s.seq_length} "
                          f"tokens, fewer than micro_batch_size x data-parallel size = "
                          f"{s.micro_batch_size} x {dp_size}; lower micro_batch_size or the DP size, "
                          "or score more samples")
    d = s.depth
    check_block_size(d.block_size, cfg.num_layers)
    task_path = None
    if d.loss:
        if d.loss_split not in manifest.splits:
            raise ConfigError(f"depth.loss_split={d.loss_split!r} is not in {s.data_dir}; it has "
                              f"{sorted(manifest.splits)}")
        if d.loss_max_samples is not None and d.loss_max_samples < 1:
            raise ConfigError(f"depth.loss_max_samples={d.loss_max_samples} must be >= 1 (or null)")
    if d.accuracy:
        task_path = resolve_task(d.task, manifest, s.data_dir, field="depth.task")
        if task_path is None:
            raise ConfigError("depth.accuracy=true needs a task; set depth.task or depth.accuracy=false")
        if d.task_seq_length < 1:
            raise ConfigError(f"depth.task_seq_length={d.task_seq_length} must be >= 1")
    checkpoint.check_not_overlapping(s.output, "output", checkpoint=s.checkpoint, data_dir=s.data_dir)
    checkpoint.check_output_dir(s.output, s.overwrite, "output")
    return Checked(ckpt=ckpt, model=cfg, manifest=manifest, num_samples=num_samples, task_path=task_path)


@dataclass
class ScoreResult:
    path: Path
    artifact: ImportanceArtifact
    seconds: dict[str, float]


def score_checkpoint(s: ScoreSettings, groups: Groups, *, show_progress: bool = True,
                     logger: Any = None) -> ScoreResult:
    from megatron_prune.convert.stages import tokenizer_dir_of
    from megatron_prune.data.indexed import load_tokenizer
    from megatron_prune.data.loaders import token_windows
    from megatron_prune.data.tasks import load_task
    from megatron_prune.importance.depth import accuracy_sweep, block_importance, loss_sweep
    from megatron_prune.importance.estimate import collect_calibration_stats
    from megatron_prune.importance.reduce import CommCounter
    from megatron_prune.importance.width import width_scores
    from megatron_prune.models.build import build_model

    checked = validate_score_settings(s, groups.dp_size)
    cfg, manifest, d = checked.model, checked.manifest, s.depth
    bar = show_progress and groups.is_rank0
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = build_model(cfg, groups)
    checkpoint.load_checkpoint(model, checked.ckpt)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    windows = token_windows(manifest.split_prefix(s.split), s.seq_length, max_samples=s.max_samples,
                            pad_id=manifest.tokenizer.pad_id)
    comm = CommCounter()
    stats = collect_calibration_stats(model, groups, windows, s.micro_batch_size, comm=comm,
                                      show_progress=bar, backend=s.backend)
    width = width_scores(stats, cfg.num_query_groups, s.sequence, s.batch)
    seconds["calibration"] = time.perf_counter() - t0
    tensors = {"width/heads": width.heads, "width/query_groups": width.query_groups,
               "width/neurons": width.neurons, "width/hidden": width.hidden,
               "stats/heads": stats.heads, "stats/neurons": stats.neurons, "stats/hidden": stats.hidden,
               "depth/block_importance": block_importance(stats)}
    depth_meta: dict[str, Any] = {"block_size": d.block_size}
    if d.loss:
        t0 = time.perf_counter()
        val = token_windows(manifest.split_prefix(d.loss_split), s.seq_length,
                            max_samples=d.loss_max_samples, pad_id=manifest.tokenizer.pad_id)
        sweep = loss_sweep(model, groups, val, s.micro_batch_size, d.block_size, show_progress=bar)
        tensors["depth/lm_loss_layer"] = sweep.layer
        tensors["depth/lm_loss_block"] = sweep.block
        tensors["depth/lm_loss_increase_layer"] = sweep.layer_increase
        tensors["depth/lm_loss_increase_block"] = sweep.block_increase
        depth_meta["loss"] = {"split": d.loss_split, "samples": len(val), "base_loss": sweep.base,
                              "split_sha256": manifest.splits[d.loss_split].bin_sha256}
        seconds["depth_loss"] = time.perf_counter() - t0
    if d.accuracy:
        t0 = time.perf_counter()
        examples = load_task(checked.task_path)
        if d.max_task_examples is not None:
            examples = examples[: d.max_task_examples]
        tokenizer = load_tokenizer(str(tokenizer_dir_of(checked.ckpt) or manifest.tokenizer.dir))
        acc = accuracy_sweep(model, groups, tokenizer, examples, d.task_seq_length, s.micro_batch_size,
                             d.block_size, show_progress=bar)
        tensors["depth/mc_acc_block"] = acc.block_acc
        tensors["depth/mc_acc_norm_block"] = acc.block_acc_norm
        depth_meta["accuracy"] = {"task": checked.task_path, "examples": acc.num_examples,
                                  "base_acc": acc.base_acc, "base_acc_norm": acc.base_acc_norm,
                                  "task_sha256": checkpoint.file_sha256(checked.task_path)}
        seconds["depth_accuracy"] = time.perf_counter() - t0

    metadata = {
        "model": {"checkpoint": str(checked.ckpt.resolve()), "config": cfg.to_dict(),
                  "sha256": checkpoint.model_hash(checked.ckpt) if groups.is_rank0 else ""},
        "data": {"dir": str(Path(s.data_dir).resolve()), "split": s.split,
                 "split_sha256": {"bin": manifest.splits[s.split].bin_sha256,
                                  "idx": manifest.splits[s.split].idx_sha256},
                 "tokenizer_sha256": manifest.tokenizer.sha256,
                 "seq_length": s.seq_length, "max_samples": s.max_samples},
        "samples": stats.num_samples, "tokens": stats.num_tokens,
        "aggregation": {"sequence": s.sequence, "batch": s.batch},
        "layout": groups.layout, "depth": depth_meta,
        "communication": {"bytes_sent_rank0": comm.bytes_sent, "by_group": comm.by_group},
    }
    artifact = ImportanceArtifact(tensors=tensors, metadata=metadata)

    def write(tmp: Path) -> None:
        if groups.is_rank0:
            write_artifact_files(tmp, artifact)
            if s.pictures:
                draw_pictures(artifact, tmp)
            mark_complete(tmp)

    path = checkpoint.atomic_dir(s.output, write, overwrite=s.overwrite)
    return ScoreResult(path=path, artifact=artifact, seconds=seconds)



def draw_pictures(artifact: ImportanceArtifact, directory: Path) -> list[Path]:
    from megatron_prune.importance.plots import (plot_head_heatmap, plot_layer_curves,
                                                 plot_neuron_distributions)

    t, cfg = artifact.tensors, artifact.metadata["model"]["config"]
    heads, neurons, layers = (directory / name for name in PICTURES)
    plot_head_heatmap(t["width/heads"], str(heads), query_groups=cfg["num_query_groups"])
    plot_neuron_distributions(t["width/neurons"], str(neurons))
    curves = {k.split("/", 1)[1]: v for k, v in t.items()
              if k in ("depth/block_importance", "depth/lm_loss_increase_layer",
                       "depth/lm_loss_increase_block", "depth/mc_acc_block")}
    plot_layer_curves(curves, str(layers), block_size=int(artifact.metadata["depth"]["block_size"]))
    return [heads, neurons, layers]
