"""Process groups as one explicit, frozen value.

This is the ONLY module that reads megatron's global `parallel_state`; everything else receives a
`Groups` and passes `group=` to each collective, so a function's communication is visible in its
signature (the torchtitan habit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Groups:
    tp: ProcessGroup
    pp: ProcessGroup
    dp: ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    rank: int
    world_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> str:
        return f"tp{self.tp_size}-pp{self.pp_size}-dp{self.dp_size}"

    @classmethod
    def from_megatron(cls) -> "Groups":
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_group()
        pp = ps.get_pipeline_model_parallel_group()
        dp = ps.get_data_parallel_group()
        return cls(
            tp=tp, pp=pp, dp=dp,
            tp_rank=dist.get_rank(tp), tp_size=dist.get_world_size(tp),
            pp_rank=dist.get_rank(pp), pp_size=dist.get_world_size(pp),
            dp_rank=dist.get_rank(dp), dp_size=dist.get_world_size(dp),
            rank=dist.get_rank(), world_size=dist.get_world_size())

    def megatron_collection(self):
        """megatron-core's ProcessGroupCollection for modules that take `pg_collection=`."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection.use_mpu_process_groups()
