"""The `distill` stage as a library call: student + teacher checkpoints + data -> distilled student.

The teacher (frozen, eval mode, no gradients) is built at the student's TP/PP layout from its own
checkpoint; both run in one job as a DistillPair (distill/pair.py), and the loss is the forward KL on
the vocab-parallel logits (distill/kl.py), plus alpha_ce x cross-entropy if asked. Training,
validation, checkpoints and resume are train/loop.py's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups
from megatron_prune.train.settings import TrainSettings
from megatron_prune.train.stage import (Checked, DataSettings, check_training_io, continuation, data_hash,
                                        launch_layout, save_final, start_fresh, windows)


@dataclass
class DistillLoss:
    temperature: float = 1.0  # τ: both distributions are softmax(logits / τ)
    alpha_ce: float = 0.0  # objective = KL + alpha_ce x CE; 0 is the paper's logit-only distillation
    scale_by_temperature_squared: bool = False  # multiply the KL by τ² (Hinton's gradient scale)
    chunk_tokens: Optional[int] = None  # tokens per KL chunk; null: about 64 MiB of [chunk, V/tp] temporaries
    backend: str = "auto"  # auto (Triton on CUDA logits) | torch | triton

    def validate(self, where: str = "distill") -> "DistillLoss":
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature={self.temperature} must be > 0")
        if self.alpha_ce < 0:
            raise ConfigError(f"{where}.alpha_ce={self.alpha_ce} must be >= 0")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"{where}.chunk_tokens={self.chunk_tokens} must be >= 1 (or null)")
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"{where}.backend={self.backend!r}: choose auto, torch or triton")
        return self


@dataclass
class DistillSettings:
    student: str
    teacher: str
    data: DataSettings
    output: str
    loss: DistillLoss = field(default_factory=DistillLoss)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint_dir: Optional[str] = None  # resumable checkpoints; default <output>.checkpoints
    overwrite: bool = False


def _checkpoint(path: str, name: str) -> Path:
    if not Path(path).exists():
        raise ConfigError(f"{name}={path} does not exist; pass the {name} checkpoint directory "
                          f"(written by convert, correct or prune)")
    return checkpoint.validate_checkpoint(path, field=name)


def check_vocabularies(student: ModelConfig, teacher: ModelConfig, student_dir: Path, teacher_dir: Path) -> None:
    """The KL compares distributions over the same token ids: same vocabulary, same tokenizer."""
    from megatron_prune.convert.stages import tokenizer_dir_of
    from megatron_prune.data.indexed import tokenizer_sha256

    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(f"student={student_dir} has vocab_size={student.vocab_size} but teacher={teacher_dir} "
                          f"has {teacher.vocab_size}; distillation needs one vocabulary (prune or convert "
                          f"the student from the teacher's family)")
    st, tt = tokenizer_dir_of(student_dir), tokenizer_dir_of(teacher_dir)
    if st is not None and tt is not None and tokenizer_sha256(str(st)) != tokenizer_sha256(str(tt)):
        raise ConfigError(f"student={student_dir} and teacher={teacher_dir} carry different tokenizers "
                          f"(same vocab_size, different token ids); distil between models of one tokenizer")


def validate_distill_settings(s: DistillSettings, tp: int, pp: int) -> tuple[Checked, ModelConfig, ModelConfig]:
    """Everything `distill` can refuse before start-up, each error naming its field."""
    from megatron_prune.models.build import check_divisibility

    student_dir, teacher_dir = _checkpoint(s.student, "student"), _checkpoint(s.teacher, "teacher")
    scfg, tcfg = checkpoint.read_model_config(student_dir), checkpoint.read_model_config(teacher_dir)
    check_vocabularies(scfg, tcfg, student_dir, teacher_dir)
    check_divisibility(scfg, tp, pp)
    check_divisibility(tcfg, tp, pp)
    s.loss.validate()
    s.train.validate("distill.train")
    dp, layout = launch_layout(tp, pp)
    checked = check_training_io(
        data=s.data, train=s.train, models={"student": scfg, "teacher": tcfg},
        ckpts={"student": student_dir, "teacher": teacher_dir}, output=s.output,
        checkpoint_dir=s.checkpoint_dir, overwrite=s.overwrite, dp_size=dp,
        continuation_inputs=distill_inputs(student_dir, teacher_dir, s), layout=layout,
        where="distill.train")
    return checked, scfg, tcfg


def distill_inputs(student: Path, teacher: Path, s: DistillSettings) -> dict[str, Any]:
    """The inputs a resumed run must share: both models, the data, the loss (not its chunking or
    backend, which do not change the numbers beyond rounding)."""
    loss = {k: v for k, v in asdict(s.loss).items() if k not in ("chunk_tokens", "backend")}
    return {"student": checkpoint.model_hash(student), "teacher": checkpoint.model_hash(teacher),
            "data": data_hash(s.data), "loss": loss}


def distill_checkpoint(s: DistillSettings, groups: Groups, logger: Any):
    """Distil `s.teacher` into `s.student`; returns (TrainResult, output path or None when the run
    was interrupted and checkpointed)."""
    from megatron_prune.distill.pair import DISTILL_METRICS, DistillPair, distill_forward
    from megatron_prune.models.build import build_model
    from megatron_prune.train.loop import TrainJob, train
    from megatron_prune.train.optim import make_trainable

    checked, scfg, tcfg = validate_distill_settings(s, groups.tp_size, groups.pp_size)
    start_fresh(checked, s.overwrite, groups)
    student_dir, teacher_dir = Path(s.student), Path(s.teacher)
    inputs = distill_inputs(student_dir, teacher_dir, s)
    train_windows, val_windows = windows(checked, s.data, s.train)
    teacher = build_model(tcfg, groups)
    checkpoint.load_checkpoint(teacher, teacher_dir)
    student = build_model(scfg, groups)
    checkpoint.load_checkpoint(student, student_dir)
    ddp, optimizer, scheduler = make_trainable(student, s.train)
    pair = DistillPair(ddp, teacher, groups)
    forward = distill_forward(groups, temperature=s.loss.temperature, alpha_ce=s.loss.alpha_ce,
                              scale_by_temperature_squared=s.loss.scale_by_temperature_squared,
                              chunk_tokens=s.loss.chunk_tokens, kl_backend=s.loss.backend)
    provenance = {"stage": "distill",
                  "inputs": {"student": str(student_dir.resolve()), "teacher": str(teacher_dir.resolve()),
                             "data_dir": str(Path(s.data.data_dir).resolve())},
                  "input_hashes": {k: v for k, v in inputs.items() if k != "loss"},
                  "loss": asdict(s.loss), "train": s.train.to_dict()}
    job = TrainJob(settings=s.train, train=train_windows, validation=val_windows,
                   checkpoint_dir=checked.checkpoint_dir, continuation=continuation(s.train, inputs),
                   provenance=provenance, name="distill")
    result = train(pair, ddp, student, scfg, optimizer, scheduler, forward, DISTILL_METRICS, job, groups,
                   logger, adjust_tensor_shapes_fn=pair.adjust_tensor_shapes)
    if result.interrupted:
        return result, None
    path = save_final(student, scfg, s.output, groups, dict(provenance, result=result.summary), s.overwrite,
                      tokenizer_from=student_dir)
    return result, path
