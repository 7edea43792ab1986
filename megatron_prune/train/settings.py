"""The training hyper-parameters shared by `correct` and `distill`, as one typed value.

The YAML under `conf/correct/` and `conf/distill/` fills `TrainSettings` (their `train:` block);
`train_settings_from` refuses unknown fields and impossible values, naming `train.<field>`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megatron_prune.config import ConfigError

DECAY_STYLES = ("cosine", "linear", "constant")

# Fields a resumed run must share with the run that wrote its checkpoint: they decide which samples a
# step sees and what the optimizer does with them. The others (steps, intervals, micro-batch size)
# may change between restarts.
CONTINUATION_FIELDS = ("global_batch_size", "seq_length", "seed", "lr", "min_lr", "warmup_steps",
                       "decay_style", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                       "clip_grad", "distributed_optimizer")


@dataclass
class TrainSettings:
    steps: int = 100  # optimizer steps; each consumes one global batch
    global_batch_size: int = 8  # samples per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # samples per forward/backward; gradients accumulate over the rest
    seq_length: int = 256  # tokens per sample (documents are cut into windows of this length)
    lr: float = 1e-4  # peak learning rate, reached after warmup
    min_lr: float = 1e-5  # where the decay ends, at step `decay_steps`
    warmup_steps: int = 10  # linear warmup: step i (0-based) uses lr * (i + 1) / warmup_steps
    decay_style: str = "cosine"  # cosine | linear | constant
    decay_steps: Optional[int] = None  # null: decay over all `steps`; set it to extend a run later
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 turns clipping off
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks (ZeRO-1)
    seed: int = 1234  # the sample order (see data/sampler.py)
    eval_interval: int = 50  # validation every N steps (and before the first and after the last); 0: only those
    eval_samples: int = 64  # validation windows (the first ones of the split)
    save_interval: int = 100  # a resumable checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # the newest N resumable checkpoints are kept
    log_interval: int = 1  # W&B / progress-bar metrics every N steps

    @property
    def total_decay_steps(self) -> int:
        return self.steps if self.decay_steps is None else self.decay_steps

    def validate(self, where: str = "train") -> "TrainSettings":
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{where}.{name}={value!r} must be a number")
        for name, kinds in (("seed", int), ("decay_steps", (int, type(None))), ("distributed_optimizer", bool)):
            value = getattr(self, name)
            if not isinstance(value, kinds) or (name != "distributed_optimizer" and isinstance(value, bool)):
                raise ConfigError(f"{where}.{name}={value!r} has the wrong type; see conf/correct/*.yaml")
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "eval_samples",
                     "keep_checkpoints", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}.{name}={value!r} must be an integer >= 1")
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}.{name}={value!r} must be an integer >= 0")
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"{where}.decay_style={self.decay_style!r}: choose one of {', '.join(DECAY_STYLES)}")
        if self.decay_steps is not None and self.decay_steps < self.steps:
            raise ConfigError(f"{where}.decay_steps={self.decay_steps} is shorter than {where}.steps={self.steps}; "
                              f"set it >= steps (or null to decay over all steps)")
        if self.warmup_steps >= self.total_decay_steps:
            raise ConfigError(f"{where}.warmup_steps={self.warmup_steps} must be smaller than the decay length "
                              f"{self.total_decay_steps} ({where}.decay_steps, or {where}.steps)")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{where}.lr={self.lr} and {where}.min_lr={self.min_lr} need 0 <= min_lr <= lr, lr > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("adam_eps", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"{where}.global_batch_size={self.global_batch_size} is not divisible by "
                              f"{where}.micro_batch_size={self.micro_batch_size}; choose a multiple of it")
        return self

    def check_data_parallel(self, dp_size: int, where: str = "train") -> int:
        """Micro-batches per step on each DP rank; an error unless global = micro x DP x accumulation."""
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise ConfigError(
                f"{where}.global_batch_size={self.global_batch_size} is not divisible by "
                f"{where}.micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp_size}; "
                f"choose a global batch that is a multiple of {self.micro_batch_size * dp_size}")
        return self.global_batch_size // (self.micro_batch_size * dp_size)

    def continuation(self) -> dict[str, Any]:
        """What a resumed run must match (the decay length in effect, not the field that set it)."""
        out = {name: getattr(self, name) for name in CONTINUATION_FIELDS}
        out["decay_steps"] = self.total_decay_steps
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_settings_from(data: dict[str, Any], where: str = "train") -> TrainSettings:
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known fields are {sorted(known)}")
    return TrainSettings(**data).validate(where)
