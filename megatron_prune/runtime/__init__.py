"""torch.distributed + megatron-core start-up, and the CPU adjustments (see `cpu.py`)."""
from megatron_prune.runtime.distributed import DistEnv, init_distributed, init_runtime, shutdown

__all__ = ["DistEnv", "init_distributed", "init_runtime", "shutdown"]
