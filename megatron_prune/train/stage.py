"""Training stages as library calls: the checks they share and `correct` (teacher correction).

`correct`: the teacher is fine-tuned with LM cross-entropy on the distillation data before it
teaches (the paper's teacher correction: the original pre-training data is not available, so the
teacher first adapts to the data the student will be distilled on) -> a corrected checkpoint.

Everything that can be refused is refused by `check_training_io` before start-up: checkpoints, data
directory and splits, tokenizers, the batch arithmetic, the output paths, and, when a previous run
left checkpoints, whether this config can continue it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups
from megatron_prune.train.settings import TrainSettings


@dataclass
class DataSettings:
    data_dir: str  # a prepared data directory (prepare-data / assets)
    train_split: str = "train"
    validation_split: str = "validation"


@dataclass
class CorrectSettings:
    checkpoint: str  # the teacher
    data: DataSettings
    output: str  # the corrected teacher
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint_dir: Optional[str] = None  # resumable checkpoints; default <output>.checkpoints
    overwrite: bool = False


@dataclass
class Checked:
    manifest: Any
    checkpoint_dir: Path
    resume_step: Optional[int]  # the step a previous run reached (None: a fresh start)


def checkpoint_dir_for(output: str, given: Optional[str]) -> Path:
    return Path(given) if given else Path(f"{os.fspath(output).rstrip('/')}.checkpoints")


def check_tokenizer(manifest: Any, data_dir: str, **ckpts: Path) -> None:
    """The data and every checkpoint that carries a tokenizer must agree on it."""
    from megatron_prune.convert.stages import tokenizer_dir_of
    from megatron_prune.data.indexed import tokenizer_sha256

    for name, ckpt in ckpts.items():
        tok = tokenizer_dir_of(ckpt)
        if tok is not None and tokenizer_sha256(str(tok)) != manifest.tokenizer.sha256:
            raise ConfigError(f"{name}={ckpt} carries a different tokenizer than the one data_dir={data_dir} "
                              f"was tokenised with ({manifest.tokenizer.dir}); prepare the data with the "
                              f"model's tokenizer")


def check_training_io(*, data: DataSettings, train: TrainSettings, models: dict[str, ModelConfig],
                      ckpts: dict[str, Path], output: str, checkpoint_dir: Optional[str],
                      overwrite: bool, dp_size: int, continuation_inputs: dict[str, Any],
                      layout: str, where: str) -> Checked:
    """Data, batch arithmetic, outputs and resumability; `ckpts` are already validated checkpoints."""
    from megatron_prune.data.loaders import token_windows
    from megatron_prune.data.manifest import load_manifest

    train.check_data_parallel(dp_size, where)
    if not Path(data.data_dir, "manifest.json").is_file():
        raise ConfigError(f"data.data_dir={data.data_dir} holds no manifest.json; run `megatron-prune "
                          f"prepare-data` (or `megatron-prune assets`) to create it")
    manifest = load_manifest(data.data_dir)
    for name, cfg in models.items():
        if manifest.tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"data.data_dir={data.data_dir} was tokenised with a vocabulary of "
                              f"{manifest.tokenizer.vocab_size} but {name}={ckpts[name]} has vocab_size="
                              f"{cfg.vocab_size}")
        if train.seq_length > cfg.max_position_embeddings:
            raise ConfigError(f"{where}.seq_length={train.seq_length} is longer than {name}'s "
                              f"max_position_embeddings={cfg.max_position_embeddings}")
    check_tokenizer(manifest, data.data_dir, **ckpts)
    for field_name in ("train_split", "validation_split"):
        split = getattr(data, field_name)
        if split not in manifest.splits or manifest.splits[split].num_tokens < 2:
            have = sorted(k for k, v in manifest.splits.items() if v.num_tokens >= 2)
            raise ConfigError(f"data.{field_name}={split!r} has no text in {data.data_dir} "
                              f"(non-empty splits: {have})")
    n_train = len(token_windows(manifest.split_prefix(data.train_split), train.seq_length))
    if n_train < 1:
        raise ConfigError(f"data.train_split={data.train_split!r} gives no training windows")
    for name, path in ckpts.items():
        checkpoint.check_not_overlapping(output, "output", **{name: path})
    checkpoint.check_output_dir(output, overwrite, "output")
    ckpt_dir = checkpoint_dir_for(output, checkpoint_dir)
    for name, path in ckpts.items():
        checkpoint.check_not_overlapping(ckpt_dir, "checkpoint_dir", **{name: path})
    resume_step = None
    if not overwrite:
        from megatron_prune.train.state import check_resumable, latest_checkpoint

        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            resume_step = check_resumable(latest, continuation(train, continuation_inputs), layout).step
    return Checked(manifest=manifest, checkpoint_dir=ckpt_dir, resume_step=resume_step)


def continuation(train: TrainSettings, inputs: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run must share with the one that wrote the checkpoint."""
    return {**train.continuation(), **inputs}


def launch_layout(tp: int, pp: int) -> tuple[int, str]:
    """(DP size, layout string) of the launch, known before start-up from the launcher's environment."""
    import torch.distributed as dist

    from megatron_prune.config import ParallelConfig
    from megatron_prune.runtime.distributed import check_layout, read_launch_env

    world = dist.get_world_size() if dist.is_initialized() else read_launch_env().world_size
    dp = check_layout(ParallelConfig(tp=tp, pp=pp), world)
    return dp, f"tp{tp}-pp{pp}-dp{dp}"


def start_fresh(checked: Checked, overwrite: bool, groups: Groups) -> None:
    """overwrite=true: a previous run's checkpoints are deleted (rank 0) before training starts."""
    if overwrite and groups.is_rank0 and checked.checkpoint_dir.exists():
        shutil.rmtree(checked.checkpoint_dir)
    checkpoint.barrier()


def windows(checked: Checked, data: DataSettings, train: TrainSettings):
    """(training windows, validation windows: the first eval_samples of the split)."""
    from megatron_prune.data.loaders import token_windows

    pad = checked.manifest.tokenizer.pad_id
    return (token_windows(checked.manifest.split_prefix(data.train_split), train.seq_length, pad_id=pad),
            token_windows(checked.manifest.split_prefix(data.validation_split), train.seq_length,
                          max_samples=train.eval_samples, pad_id=pad))


def validate_correct_settings(s: CorrectSettings, tp: int, pp: int) -> tuple[Checked, ModelConfig]:
    ckpt = checkpoint.validate_checkpoint(s.checkpoint, field="checkpoint")
    cfg = checkpoint.read_model_config(ckpt)
    from megatron_prune.models.build import check_divisibility

    check_divisibility(cfg, tp, pp)
    s.train.validate("correct.train")
    dp, layout = launch_layout(tp, pp)
    checked = check_training_io(
        data=s.data, train=s.train, models={"checkpoint": cfg}, ckpts={"checkpoint": ckpt},
        output=s.output, checkpoint_dir=s.checkpoint_dir, overwrite=s.overwrite, dp_size=dp,
        continuation_inputs=correct_inputs(ckpt, s.data), layout=layout, where="correct.train")
    return checked, cfg


def correct_inputs(ckpt: Path, data: DataSettings) -> dict[str, Any]:
    return {"checkpoint": checkpoint.model_hash(ckpt), "data": data_hash(data)}


def data_hash(data: DataSettings) -> str:
    from megatron_prune.data.manifest import load_manifest

    manifest = load_manifest(data.data_dir)
    return manifest.splits[data.train_split].bin_sha256


def save_final(model: Any, cfg: ModelConfig, output: str, groups: Groups, provenance: dict[str, Any],
               overwrite: bool, tokenizer_from: Path) -> Path:
    from megatron_prune.convert.stages import copy_tokenizer, tokenizer_dir_of

    def extra(tmp: Path) -> None:
        if groups.is_rank0:
            copy_tokenizer(tokenizer_dir_of(tokenizer_from), tmp)

    return checkpoint.save_checkpoint(model, cfg, output, groups, provenance, overwrite=overwrite,
                                      extra_files=extra)


def correct_checkpoint(s: CorrectSettings, groups: Groups, logger: Any):
    """Teacher correction: train `s.checkpoint` with LM cross-entropy; returns (TrainResult, path or
    None when the run was interrupted and checkpointed)."""
    from megatron_prune.models.build import build_model
    from megatron_prune.train.loop import TrainJob, train
    from megatron_prune.train.optim import make_trainable
    from megatron_prune.train.step import LM_METRICS, lm_forward

    checked, cfg = validate_correct_settings(s, groups.tp_size, groups.pp_size)
    start_fresh(checked, s.overwrite, groups)
    ckpt = Path(s.checkpoint)
    inputs = correct_inputs(ckpt, s.data)
    train_windows, val_windows = windows(checked, s.data, s.train)
    model = build_model(cfg, groups)
    checkpoint.load_checkpoint(model, ckpt)
    ddp, optimizer, scheduler = make_trainable(model, s.train)
    provenance = {"stage": "correct", "inputs": {"checkpoint": str(ckpt.resolve()),
                                                 "data_dir": str(Path(s.data.data_dir).resolve())},
                  "input_hashes": inputs, "train": s.train.to_dict()}
    job = TrainJob(settings=s.train, train=train_windows, validation=val_windows,
                   checkpoint_dir=checked.checkpoint_dir, continuation=continuation(s.train, inputs),
                   provenance=provenance, name="correct")
    result = train(ddp, ddp, model, cfg, optimizer, scheduler, lm_forward, LM_METRICS, job, groups, logger)
    if result.interrupted:
        return result, None
    path = save_final(model, cfg, s.output, groups, dict(provenance, result=result.summary), s.overwrite,
                      tokenizer_from=ckpt)
    return result, path
