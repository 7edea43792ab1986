"""Everything real megatron-core needs to run on a machine without CUDA — in one place.

megatron-core is written for GPUs: it asks `torch.cuda.current_device()` on every forward, creates a
few tensors with a literal `device="cuda"` (pipeline schedules, checkpoint verification), moves the
pipeline-shared embedding with `.cuda()`, and keeps its dropout RNG streams in CUDA generators.
`activate()` adjusts exactly those points, and only when CUDA is absent, so that on a GPU machine
megatron-core runs untouched. Measured facts behind each adjustment: shared/notes/cpu-megatron.md.

Nothing here changes numerics: the same seed gives the same weights and the same losses as the
single-process reference at every TP/PP layout (tests/distributed pin that).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import sys
import types
from typing import Any, Iterator

import torch

_ACTIVE = False

# Modules that create tensors with a literal device="cuda" on the paths we use.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",  # get_default_causal_mask
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.optimizer.optimizer",  # the FP32 optimizer's loss scale of one
    "megatron.core.optimizer.clip_grads",  # the grad-norm accumulator
    "megatron.core.optimizer.grad_scaler",  # fp16 loss scaling
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad norm without apex)
)
_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like",
     "full_like", "rand", "randn", "randint"})


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` name inside one megatron module: factory calls asked for a CUDA
    device get the CPU instead; every other attribute is torch's own. Scoped to the module's global
    name so the rest of the program pays nothing (a global TorchFunctionMode cost ~15% per step)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker contract (add / fork / get_states / set_states / reset), kept
    on the CPU generator. Named streams make dropout inside TP regions differ per TP rank and agree
    across DP ranks, as on GPUs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """CPU twin of megatron's `model_parallel_cuda_manual_seed`: same stream names, same offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


# megatron's optimizers classify (and assert) parameters by `param.type()`, e.g.
# 'torch.cuda.FloatTensor'; inside these modules a CPU tensor answers with its CUDA twin's name.
_CUDA_TYPE_NAME_MODULES = ("megatron.core.optimizer.",)


def _cuda_named_type(original: Any) -> Any:
    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu":
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(_CUDA_TYPE_NAME_MODULES):
                return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def activate() -> bool:
    """Apply the CPU adjustments once. Returns whether they are active (False where CUDA exists)."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if cuda_available():
        return False

    # Every `device=torch.cuda.current_device()` in megatron becomes the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # The first/last pipeline stages share the word embedding and megatron moves it with `.cuda()`
    # before all-reducing it; on a CPU-only build that call can never succeed, so it stays put.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment,method-assign]
    # Checkpoint writes "synchronize" before copying tensors out; without a device there is no
    # pending work to wait for.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        module.torch = _CpuTorch()  # type: ignore[attr-defined]

    # Activation recompute saves and restores the "CUDA" RNG state around the recomputed forward.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    torch.Tensor.type = _cuda_named_type(torch.Tensor.type)  # type: ignore[method-assign]
    _ACTIVE = True
    return True


def transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields that must differ on CPU (the CUDA-only fusions stay off)."""
    if cuda_available():
        return {}
    return {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        # batch_p2p_comm=True ends each exchange with torch.cuda.synchronize().
        "batch_p2p_comm": False,
    }


_LIBC: Any = None


def return_freed_host_memory() -> None:
    """Hand host memory that tensors have freed back to the OS (glibc `malloc_trim`; elsewhere a no-op).

    glibc keeps freed heap chunks resident and serves new allocations from pages it trimmed before,
    so a loop that frees one tensor and allocates a smaller one can still grow the resident set;
    prune surgery calls this between layers to keep its footprint at the live tensors."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)
