"""Rank layout and rendezvous from torchrun's and Slurm's environment variables."""
from __future__ import annotations

import pytest

from megatron_prune.config import ConfigError, ParallelConfig
from megatron_prune.runtime.distributed import (check_layout, first_host, read_launch_env,
                                                slurm_rendezvous)


@pytest.mark.parametrize("nodelist,host", [("node01", "node01"), ("gpu[07-09,12]", "gpu07"),
                                           ("a1,b2", "a1"), ("dgx[3]", "dgx3"),
                                           ("x-[002-010],y", "x-002")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_tasks_rendezvous_on_the_first_node_at_a_per_job_port():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "h[10-11]",
           "SLURM_JOB_ID": "123456"}
    assert slurm_rendezvous(env) == {"MASTER_ADDR": "h10", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # torchrun inside an allocation sets RANK and MASTER_*: Slurm's values are not used then
    assert slurm_rendezvous({**env, "RANK": "0", "MASTER_ADDR": "x"}) == {}
    assert slurm_rendezvous({**env, "MASTER_ADDR": "y", "MASTER_PORT": "1"}) == {}


def test_launch_env_prefers_torchrun_then_slurm_then_single(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert (read_launch_env().rank, read_launch_env().world_size) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    env = read_launch_env()
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (read_launch_env().rank, read_launch_env().world_size) == (2, 4)


def test_world_size_must_factor_into_tp_pp_dp():
    assert check_layout(ParallelConfig(tp=2, pp=2), 8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tp"):
        check_layout(ParallelConfig(tp=4, pp=1), 6)
