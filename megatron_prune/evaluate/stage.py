"""The `evaluate` stage as a library call: a checkpoint + a prepared data directory -> metrics.

Everything is validated (checkpoint, data directory, split, task file, tokenizer) before the model
is built, so bad input costs seconds, not a model load.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError
from megatron_prune.parallel import Groups


@dataclass
class EvalSettings:
    checkpoint: str
    data_dir: str
    split: str = "validation"
    seq_length: int = 512
    micro_batch_size: int = 4
    max_samples: Optional[int] = None
    task: str = "default"  # default | none | path to .jsonl / BIG-bench task.json
    task_seq_length: int = 256
    max_task_examples: Optional[int] = None


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    samples: int
    mc_acc: Optional[float] = None
    mc_acc_norm: Optional[float] = None
    mc_examples: int = 0
    task: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_task(task: str, manifest, data_dir: str, field: str = "task") -> Optional[str]:
    """`default` -> the data dir's task.jsonl, `none` -> None, else a task file that must exist."""
    if task == "none":
        return None
    if task == "default":
        path = manifest.task_path()
        if path is None or not os.path.exists(path):
            raise ConfigError(f"{field}=default but {data_dir} has no task.jsonl (prepare it with "
                              f"data.task_examples>0) — or pass {field}=<file> or {field}=none")
        return path
    if not os.path.isfile(task):
        raise ConfigError(f"{field}={task} does not exist; pass a .jsonl ({{context, choices, label}}) "
                          f"or BIG-bench task.json file, {field}=default or {field}=none")
    return task


def validate_settings(s: EvalSettings):
    """Everything `evaluate` can refuse cheaply (files and JSON only), before any start-up."""
    from megatron_prune.data.manifest import load_manifest

    ckpt = checkpoint.validate_checkpoint(s.checkpoint)
    cfg = checkpoint.read_model_config(ckpt)
    if not Path(s.data_dir, "manifest.json").is_file():
        raise ConfigError(f"data_dir={s.data_dir} holds no manifest.json; run `megatron-prune "
                          f"prepare-data` (or `megatron-prune assets`) to create it")
    manifest = load_manifest(s.data_dir)
    if s.split not in manifest.splits:
        raise ConfigError(f"split={s.split!r} is not in {s.data_dir}; it has {sorted(manifest.splits)}")
    if manifest.tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"data_dir={s.data_dir} was tokenised with a vocabulary of "
                          f"{manifest.tokenizer.vocab_size} but {ckpt} has vocab_size={cfg.vocab_size}")
    for name in ("seq_length", "micro_batch_size", "task_seq_length"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}={getattr(s, name)} must be >= 1")
    return ckpt, cfg, manifest, resolve_task(s.task, manifest, s.data_dir)


def evaluate_checkpoint(s: EvalSettings, groups: Groups, show_progress: bool = True) -> EvalResult:
    from megatron_prune.convert.stages import tokenizer_dir_of
    from megatron_prune.data.indexed import load_tokenizer
    from megatron_prune.data.loaders import token_windows
    from megatron_prune.data.tasks import load_task
    from megatron_prune.evaluate.multiple_choice import score_multiple_choice
    from megatron_prune.evaluate.perplexity import perplexity
    from megatron_prune.models.build import build_model

    ckpt, cfg, manifest, task_path = validate_settings(s)
    examples = load_task(task_path) if task_path else []
    if s.max_task_examples is not None:
        examples = examples[: s.max_task_examples]
    tok_dir = tokenizer_dir_of(ckpt) or manifest.tokenizer.dir
    tokenizer = load_tokenizer(str(tok_dir)) if examples else None
    windows = token_windows(manifest.split_prefix(s.split), s.seq_length, max_samples=s.max_samples,
                            pad_id=manifest.tokenizer.pad_id)

    model = build_model(cfg, groups)
    checkpoint.load_checkpoint(model, ckpt)
    ppl = perplexity(model, groups, windows, s.micro_batch_size,
                     show_progress=show_progress and groups.is_rank0)
    result = EvalResult(loss=ppl.loss, perplexity=ppl.perplexity, tokens=ppl.tokens, samples=ppl.samples)
    if examples:
        mc = score_multiple_choice(model, groups, tokenizer, examples, s.task_seq_length,
                                   s.micro_batch_size, show_progress=show_progress and groups.is_rank0)
        result.mc_acc, result.mc_acc_norm, result.mc_examples = mc.acc, mc.acc_norm, mc.n
        result.task = task_path
    return result


def write_result(result: EvalResult, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    os.replace(tmp, path)
