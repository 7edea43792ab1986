"""Join torch.distributed from the launcher's environment and set up megatron's parallel state.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; Slurm's srun exports
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; without MASTER_ADDR/PORT a Slurm job rendezvouses on the
first node of SLURM_JOB_NODELIST at a port derived from the job id. A plain
`python` run is a world of one. The backend is NCCL with CUDA and gloo without.
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_prune.config import ConfigError, ParallelConfig
from megatron_prune.runtime import cpu


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None or not head.group(1):
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} cannot be parsed; set MASTER_ADDR")
    prefix, ranges = head.group(1), head.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for processes started by srun (no torchrun in between)."""
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return {}
    found: dict[str, str] = {}
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("a Slurm task without MASTER_ADDR or SLURM_JOB_NODELIST: set "
                              "MASTER_ADDR to the first node's address")
        found["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in environ:
        # one port per job, so two jobs sharing a node do not collide
        found["MASTER_PORT"] = str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return found


def read_launch_env() -> DistEnv:
    """Rank layout from torchrun's or Slurm's variables; a single process when there are none."""
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None:
        rank, world, local = 0, 1, 0
    return DistEnv(rank=rank, world_size=world, local_rank=local or 0, backend="")


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl with CUDA, gloo without; nccl on a machine without CUDA is an error."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; this machine has none (use gloo or auto)")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Join (or reuse) the default process group."""
    env = read_launch_env()
    backend = resolve_backend(backend)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, dist.get_backend())
    os.environ.update(slurm_rendezvous(os.environ))
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(env.rank, env.world_size, env.local_rank, backend)


def check_layout(pc: ParallelConfig, world_size: int) -> int:
    """The data-parallel size implied by the layout; an error if the world does not factor."""
    if world_size % (pc.tp * pc.pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
            f"{pc.tp} * {pc.pp}; launch tp*pp*dp processes (e.g. torchrun --nproc-per-node="
            f"{pc.tp * pc.pp}) or change parallel.tp / parallel.pp")
    return world_size // (pc.tp * pc.pp)


def init_runtime(pc: ParallelConfig):
    """torch.distributed, megatron's model-parallel state and RNG; returns the explicit `Groups`.

    The backend and the layout are checked against the launcher's environment first, so a bad
    launch fails in a second, before megatron is imported or any rank waits for the others."""
    resolve_backend(pc.backend)
    world = dist.get_world_size() if dist.is_initialized() else read_launch_env().world_size
    check_layout(pc, world)

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_prune.parallel import Groups

    cpu.activate()
    init_distributed(pc.backend)
    current = None
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
    if current != (pc.tp, pc.pp):
        if current is not None:
            release_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=pc.tp, pipeline_model_parallel_size=pc.pp,
            create_gloo_process_groups=False)
    groups = Groups.from_megatron()
    torch.manual_seed(pc.seed)
    if cpu.is_active():
        cpu.seed_model_parallel_rng(pc.seed, groups.tp_rank)
    else:
        model_parallel_cuda_manual_seed(pc.seed)
    return groups


def _megatron_groups(parallel_state) -> list:
    found: dict[int, dist.ProcessGroup] = {}

    def visit(value) -> None:
        if isinstance(value, dist.ProcessGroup):
            found[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for name, value in vars(parallel_state).items():
        if name.startswith("_") and "GROUP" in name:
            visit(value)
    world = dist.group.WORLD
    return [g for g in found.values() if g is not world]


def release_model_parallel() -> None:
    """Forget megatron's groups AND destroy them. megatron's `destroy_model_parallel` only drops its
    references; each gloo group keeps its TCP threads, so a long-lived process that changes layout
    (a test worker, a job that prunes then re-shards) would pile up threads that poll the CPU."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not parallel_state.model_parallel_is_initialized():
        return
    groups = _megatron_groups(parallel_state)
    parallel_state.destroy_model_parallel()
    for group in groups:
        dist.destroy_process_group(group)
    del groups
    # modules built for the old layout keep their groups alive through reference cycles
    gc.collect()


def shutdown() -> None:
    # Not imported means never initialised: a run refused before start-up skips megatron's import.
    release_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
