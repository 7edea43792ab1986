"""Resumable training checkpoints: the model, the optimizer and everything else a run needs to
continue exactly as if it had never stopped.

    <checkpoint_dir>/step_000040/
        model/              megatron dist checkpoint of the trained model (a normal checkpoint of
        model_config.json   ours: evaluate / export / prune read it as is)
        provenance.json
        optimizer/          megatron dist checkpoint of the optimizer (Adam moments, steps; sharded
                            like the model, or over DP with the distributed optimizer)
        train_state.json    step, consumed samples, the scheduler, what the run must keep to continue,
                            the metric history so far
        rng/rank_00000.json each rank's torch RNG state and megatron's named RNG streams (base64)
        COMPLETE

Each is written atomically (checkpoint.atomic_dir), so a kill during a save leaves the previous one
as the newest complete checkpoint. The sample order is a function of (seed, consumed_samples)
(data/sampler.py), so no data-loader state is needed. Nothing here is unpickled: the JSON files are
plain data and the tensors come back through megatron's dist-checkpoint loader.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_prune import checkpoint
from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "train_state.json"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
# The distributed optimizer's fully parallel format (each rank writes its own DP shard of the state,
# no gathering); a checkpoint in it resumes at the same TP/PP and any DP. The plain optimizer ignores it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # samples of the training stream used so far
    scheduler: dict[str, Any] = field(default_factory=dict)  # OptimizerParamScheduler.state_dict()
    continuation: dict[str, Any] = field(default_factory=dict)  # what a resume must match
    layout: str = ""  # tp/pp/dp the state was written at
    history: list[dict[str, float]] = field(default_factory=list)  # training metrics, step by step
    validation: list[dict[str, float]] = field(default_factory=list)  # validation metrics by step
    wall_seconds: float = 0.0  # training time before this checkpoint (summed over restarts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> "TrainState":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}: cannot read the training state ({err}); the checkpoint is "
                              f"damaged, delete {path.parent} to resume from the one before") from err


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete resumable checkpoints under `root`, oldest first (unfinished writes are hidden
    `.step_*.tmp-*` siblings and never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / checkpoint.MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def check_resumable(path: Path, continuation: dict[str, Any], layout: str) -> TrainState:
    """The saved state, if this run can continue it; otherwise an error naming what changed."""
    state = TrainState.from_file(path / STATE_FILE)
    changed = [f"{k}: {state.continuation.get(k)!r} -> {v!r}" for k, v in sorted(continuation.items())
               if state.continuation.get(k) != v]
    if changed:
        raise ConfigError(
            f"{path} was written by a run that this config cannot continue; changed: "
            f"{'; '.join(changed)}. Fix: resume with the same settings, or start over with "
            f"overwrite=true (deletes {path.parent})")
    if state.layout != layout:
        raise ConfigError(
            f"{path} was written at {state.layout} and this run is {layout}; resume at the same "
            f"parallel layout (parallel.tp / parallel.pp and the number of processes), or start over "
            f"with overwrite=true")
    return state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().view(torch.uint8).numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    out: dict[str, Any] = {"torch": _b64(torch.get_rng_state()),
                           "streams": {k: _b64(v) for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        out["cuda"] = _b64(torch.cuda.get_rng_state())
    return out


def _set_rng_states(data: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(_unb64(data["torch"]))
    get_cuda_rng_tracker().set_states({k: _unb64(v) for k, v in data["streams"].items()})
    if "cuda" in data and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(data["cuda"]))


def save_train_checkpoint(root: str | Path, model: torch.nn.Module, cfg: ModelConfig, optimizer: Any,
                          state: TrainState, groups: Groups, provenance: dict[str, Any],
                          keep: int) -> Path:
    """Write `<root>/step_<state.step>` (all ranks), then delete all but the newest `keep`."""
    from megatron.core import dist_checkpointing

    root = Path(root)

    def extra(tmp: Path) -> None:
        if groups.is_rank0:
            (tmp / OPTIMIZER_DIR).mkdir()
            (tmp / RNG_DIR).mkdir()
        checkpoint.barrier()
        sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(sharded, str(tmp / OPTIMIZER_DIR))
        (tmp / RNG_DIR / f"rank_{groups.rank:05d}.json").write_text(json.dumps(_rng_states()))
        if groups.is_rank0:
            (tmp / STATE_FILE).write_text(state.to_json())

    path = checkpoint.save_checkpoint(model, cfg, step_dir(root, state.step), groups, provenance,
                                      overwrite=True, extra_files=extra)
    if groups.is_rank0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    checkpoint.barrier()
    return path


def _init_torch_adam_state(optimizer: Any) -> None:
    """Give a torch Adam/AdamW that has not stepped yet the state it would have after step one (zeros,
    step 0), for the checkpoint to overwrite. megatron's distributed optimizer reads each parameter's
    'step' while it prepares a load, but its own state initialiser only makes the moments; with TE's
    or apex's FusedAdam (the GPU images) the step lives elsewhere and nothing is needed."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _torch_adams(optimizer: Any) -> list:
    inner = [getattr(c, "optimizer", None) for c in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def _restore_torch_adam_steps(optimizer: Any) -> None:
    """megatron's distributed optimizer saves torch Adam's step count once per param group and loads
    it back there, but torch's Adam reads it from each parameter's state: without this, a resumed
    run's bias correction restarts from the placeholder step and the weights drift from an
    uninterrupted run's."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if group.get("step") is None:
                continue  # the plain optimizer keeps its steps per parameter already
            for p in group["params"]:
                if inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]))


def load_train_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, groups: Groups) -> TrainState:
    """Model weights, optimizer state and this rank's RNG from `path` (a complete step directory)."""
    from megatron.core import dist_checkpointing

    checkpoint.load_checkpoint(model, path)
    _init_torch_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                         metadata=OPTIMIZER_METADATA)
    with torch.no_grad():  # the distributed optimizer copies into views of the parameters
        optimizer.load_state_dict(dist_checkpointing.load(sharded, str(path / OPTIMIZER_DIR)))
    _restore_torch_adam_steps(optimizer)
    rng = path / RNG_DIR / f"rank_{groups.rank:05d}.json"
    if not rng.is_file():
        raise ConfigError(f"{rng} is missing: {path} was written by a different number of processes")
    _set_rng_states(json.loads(rng.read_text()))
    return TrainState.from_file(path / STATE_FILE)
