"""megatron-core's own training machinery for one model chunk: DDP, optimizer, learning-rate schedule.

- `wrap_ddp`: megatron's DistributedDataParallel (contiguous grad buffers, DP all-reduce or, with the
  distributed optimizer, reduce-scatter). The loss is summed per token and megatron's
  `finalize_model_grads` divides the gradients by the global batch's token count (reduced over DP,
  broadcast over PP), so the gradient is the per-token mean of the whole global batch at any layout.
- `build_optimizer`: `get_megatron_optimizer` (Adam; FusedAdam with TE or apex, torch's AdamW
  otherwise, decoupled weight decay either way) with global grad-norm clipping.
- `build_scheduler`: `OptimizerParamScheduler`, linear warmup then cosine/linear decay to `min_lr`.
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_prune.train.settings import TrainSettings


def wrap_ddp(model: torch.nn.Module, *, distributed_optimizer: bool) -> Any:
    """`model` (a GPTModel chunk) in megatron's DDP, with the schedule hooks set on its config:
    per-token loss normalisation, grad sync only after the last micro-batch, then
    `finalize_model_grads` (DP reduction, tied-embedding grads between the first and last stages)."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    config = model.config
    config.calculate_per_token_loss = True  # read by DDP's constructor: sum over DP, no 1/dp scaling
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=distributed_optimizer),
        module=model)
    config.no_sync_func = ddp.no_sync
    # The schedule passes the chunks it ran (a distillation pair wraps this DDP): reduce ours.
    config.finalize_model_grads_func = (
        lambda _chunks, *args, **kwargs: finalize_model_grads([ddp], *args, **kwargs))
    return ddp


def build_optimizer(ddp: Any, s: TrainSettings) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
        clip_grad=s.clip_grad, bf16=False, fp16=False,
        use_distributed_optimizer=s.distributed_optimizer)
    # No side gloo groups: the job's own groups carry everything (gloo on CPU, NCCL on GPUs).
    return get_megatron_optimizer(config, [ddp], use_gloo_process_groups=False)


def build_scheduler(optimizer: Any, s: TrainSettings) -> Any:
    """megatron's scheduler, advanced by one step at creation so that step i (0-based) trains at the
    rate of `num_steps = i + 1`: warmup starts at lr / warmup_steps (not at 0, a wasted step) and the
    last step of the decay runs at min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.total_decay_steps,
        lr_decay_style=s.decay_style,
        start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=s.total_decay_steps,
        wd_incr_style="constant")
    scheduler.step(increment=1)
    return scheduler


def restore_scheduler(scheduler: Any, state: dict) -> None:
    """Load a saved scheduler state. megatron's `load_state_dict` *advances* by the saved step count
    (`step(increment=num_steps)`), so the count taken at creation is cleared first."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def make_trainable(model: torch.nn.Module, s: TrainSettings) -> tuple[Any, Any, Any]:
    """(DDP wrapper, optimizer, scheduler) for a freshly built or loaded GPTModel chunk."""
    ddp = wrap_ddp(model, distributed_optimizer=s.distributed_optimizer)
    optimizer = build_optimizer(ddp, s)
    return ddp, optimizer, build_scheduler(optimizer, s)
