"""The CPU twin of megatron's CUDA RNG tracker keeps named streams apart and restores the outer one."""
from __future__ import annotations

import torch

from megatron_prune.runtime.cpu import CpuRNGStatesTracker, _to_cpu_device


def test_fork_draws_from_the_named_stream_and_restores_the_default_one():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    expected_outer = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    assert torch.equal(after, expected_outer)  # the default stream did not advance
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    with tracker.fork():  # the named stream continues where it stopped
        second = torch.rand(3)
    gen = torch.Generator().manual_seed(7)
    torch.rand(3, generator=gen)
    assert torch.equal(second, torch.rand(3, generator=gen))


def test_states_round_trip_for_checkpointing():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    saved = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(2)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(2), first)


def test_cuda_devices_become_cpu_and_others_are_left_alone():
    assert _to_cpu_device("cuda") == torch.device("cpu")
    assert _to_cpu_device(torch.device("cuda", 1)) == torch.device("cpu")
    assert _to_cpu_device(0) == torch.device("cpu")
    assert _to_cpu_device("meta") == "meta"
