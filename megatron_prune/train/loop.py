"""The training loop shared by `correct` (LM cross-entropy) and `distill` (KL to a teacher).

Per step: this DP rank's micro-batches of the next global batch (data/sampler.py: a pure function of
seed and consumed samples), one pass of megatron's schedule (train/step.py), the optimizer step
(clipping inside), the scheduler step. Validation every `eval_interval` steps and at both ends;
a resumable checkpoint every `save_interval` steps, at the end, and when the job is asked to stop
(SIGTERM / SIGUSR1, what Slurm sends before a preemption or the time limit): the run then saves at
the end of the current step and returns `interrupted`; rerunning the same command continues it.

Resume is exact: the model, Adam's moments and step counts, the scheduler, the RNG streams and the
sample position come back from the newest complete checkpoint, so the weights after step N are
bit-identical on CPU to an uninterrupted run's (tests/unit/test_train_resume.py kills one).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.config import ModelConfig
from megatron_prune.data.loaders import TokenWindows, iter_microbatches
from megatron_prune.data.sampler import training_microbatches
from megatron_prune.log import RunLogger, format_table
from megatron_prune.models.forward import Batch
from megatron_prune.parallel import Groups
from megatron_prune.train import state as ckpt
from megatron_prune.train.optim import current_lr, restore_scheduler
from megatron_prune.train.settings import TrainSettings
from megatron_prune.train.step import Forward, per_token, run_schedule


@dataclass
class TrainJob:
    """What to train on and where the run's files go (plain data; built by a stage)."""

    settings: TrainSettings
    train: TokenWindows  # the training split's windows (sampled by seed and position)
    validation: TokenWindows  # the windows validation runs over (the first eval_samples of the split)
    checkpoint_dir: Path  # resumable checkpoints: <dir>/step_NNNNNN
    continuation: dict[str, Any]  # what a resume must match (settings, inputs' hashes, loss options)
    provenance: dict[str, Any]  # written into every checkpoint
    name: str = "train"  # the stage (W&B key prefix stays train/ and val/)


@dataclass
class TrainResult:
    state: ckpt.TrainState
    interrupted: bool  # stopped by a signal before the last step (a checkpoint was written)
    resumed_from: Optional[int] = None  # the step a previous run had reached, if resumed
    summary: dict[str, Any] = field(default_factory=dict)


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 instead of dying, so the loop can checkpoint first. Installed only
    in the main thread (Python allows handlers nowhere else); restores the old handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_rank(self) -> bool:
        """Whether any rank was asked to stop: every rank must stop after the same step."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _batches(windows: Sequence[TokenWindows]) -> list[Batch]:
    return [Batch(tokens=w.tokens, labels=w.labels, loss_mask=w.loss_mask, sample_ids=w.sample_ids)
            for w in windows]


def validate(chunk: torch.nn.Module, groups: Groups, windows: TokenWindows, micro_batch_size: int,
             forward: Forward, metric_names: Sequence[str],
             adjust_tensor_shapes_fn: Optional[Callable] = None) -> dict[str, float]:
    """Per-token validation metrics over `windows` (every DP rank a disjoint shard; filler rows
    padding the last micro-batch carry no tokens)."""
    batches = _batches(list(iter_microbatches(windows, micro_batch_size, dp_rank=groups.dp_rank,
                                              dp_size=groups.dp_size)))
    was_training = chunk.training
    chunk.eval()
    try:
        with torch.no_grad():
            sums = run_schedule(chunk, groups, batches, forward, metric_names, forward_only=True,
                                adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
    finally:
        chunk.train(was_training)
    return per_token(sums)


def train(chunk: torch.nn.Module, ddp: Any, model: torch.nn.Module, cfg: ModelConfig, optimizer: Any,
          scheduler: Any, forward: Forward, metric_names: Sequence[str], job: TrainJob, groups: Groups,
          logger: RunLogger, adjust_tensor_shapes_fn: Optional[Callable] = None) -> TrainResult:
    """Train `model` (a GPTModel chunk; `ddp` its megatron DDP wrapper; `chunk` what the schedule
    runs: `ddp` itself, or a distillation pair around it) for `job.settings.steps` steps, resuming
    from the newest complete checkpoint in `job.checkpoint_dir` if there is one."""
    s = job.settings
    s.check_data_parallel(groups.dp_size)
    state = ckpt.TrainState(continuation=job.continuation, layout=groups.layout)
    resumed_from = None
    latest = ckpt.latest_checkpoint(job.checkpoint_dir)
    if latest is not None:
        ckpt.check_resumable(latest, job.continuation, groups.layout)
        state = ckpt.load_train_checkpoint(latest, model, optimizer, groups)
        restore_scheduler(scheduler, state.scheduler)
        resumed_from = state.step
        logger.echo(f"{job.name}: resuming {latest} (step {state.step}, {state.consumed_samples} samples)")

    def run_validation(step: int) -> None:
        val = validate(chunk, groups, job.validation, s.micro_batch_size, forward, metric_names,
                       adjust_tensor_shapes_fn)
        row = {"step": step, **{k: v for k, v in val.items() if k != "tokens"}}
        state.validation.append(row)
        logger.log({f"val/{k}": v for k, v in row.items() if k != "step"}, step=step)

    def save() -> None:
        state.scheduler = scheduler.state_dict()
        ckpt.save_train_checkpoint(job.checkpoint_dir, model, cfg, optimizer, state, groups,
                                   dict(job.provenance, step=state.step), keep=s.keep_checkpoints)

    if state.step == 0 and not state.validation:
        run_validation(0)
    interrupted = False
    chunk.train()
    bar = _bar(s.steps, state.step, job.name, groups.is_rank0)
    try:
        with StopRequest() as stop:
            while state.step < s.steps:
                started = time.perf_counter()
                windows = training_microbatches(job.train, s.seed, state.consumed_samples,
                                                s.global_batch_size, s.micro_batch_size,
                                                dp_rank=groups.dp_rank, dp_size=groups.dp_size)
                lr = current_lr(optimizer)  # the rate this step uses
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
                sums = run_schedule(chunk, groups, _batches(windows), forward, metric_names,
                                    forward_only=False, adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                state.step += 1
                state.consumed_samples += s.global_batch_size
                seconds = time.perf_counter() - started
                state.wall_seconds += seconds
                row = {"step": state.step, **per_token(sums), "lr": lr,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "tokens_per_s": sums["tokens"] / max(seconds, 1e-9)}
                row.pop("tokens")
                state.history.append(row)
                if state.step % s.log_interval == 0 or state.step == s.steps:
                    logger.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=state.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                last = state.step == s.steps
                if last or (s.eval_interval and state.step % s.eval_interval == 0):
                    run_validation(state.step)
                interrupted = stop.any_rank() and not last
                if last or interrupted or (s.save_interval and state.step % s.save_interval == 0):
                    save()
                if interrupted:
                    logger.echo(f"{job.name}: stopped by a signal after step {state.step}; checkpoint "
                                f"{ckpt.step_dir(job.checkpoint_dir, state.step)}. Rerun the same command "
                                f"to continue.")
                    break
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(state=state, interrupted=interrupted, resumed_from=resumed_from,
                       summary=summarize(state, job.name, logger))


def _bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def summarize(state: ckpt.TrainState, name: str, logger: RunLogger) -> dict[str, Any]:
    """First and last values of every curve, as a table on rank 0 and in the W&B summary."""
    rows, summary = [], {"steps": state.step, "samples": state.consumed_samples,
                         "train_seconds": round(state.wall_seconds, 1)}
    for prefix, series in (("train", state.history), ("val", state.validation)):
        if not series:
            continue
        for key in series[0]:
            if key in ("step", "lr", "grad_norm", "tokens_per_s"):
                continue
            first, last = series[0][key], series[-1][key]
            rows.append([f"{prefix}/{key}", series[0]["step"], first, series[-1]["step"], last])
            summary[f"{prefix}/{key}_first"], summary[f"{prefix}/{key}_last"] = first, last
    if state.history:
        speeds = [r["tokens_per_s"] for r in state.history]
        summary["tokens_per_s_median"] = sorted(speeds)[len(speeds) // 2]
    logger.echo(format_table(["metric", "from step", "value", "to step", "value"], rows))
    logger.echo(f"{name}: {state.step} steps, {state.consumed_samples} samples, "
                f"{state.wall_seconds:.0f} s of training")
    logger.summary({f"{name}/{k}": v for k, v in summary.items()})
    return summary
