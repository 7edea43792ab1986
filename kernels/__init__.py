"""Triton kernels, each beside its pure-PyTorch reference (the CPU fallback and the test oracle).

Installed as `megatron_prune.kernels`; in a source checkout `megatron_prune/__init__.py` makes this
directory importable under the same name.
"""
from .activation_stats import (ChannelStats, HeadStats, channel_stats, channel_stats_reference,
                               channel_stats_triton, head_stats, head_stats_reference,
                               head_stats_triton)

__all__ = ["ChannelStats", "HeadStats", "channel_stats", "channel_stats_reference",
           "channel_stats_triton", "head_stats", "head_stats_reference", "head_stats_triton"]
