"""Forward hooks that turn a sharded GPTModel's activations into small per-unit statistics.

For every local transformer layer (global index `layer.layer_number - 1`):
  - `self_attention.linear_proj` input, the attention output [s, b, np_local * hn]: per-head
    statistics of the token-wise l2 norm of each head's hn-vector (`head_stats`);
  - `mlp.linear_fc2` input, the FFN intermediate [s, b, F_local]: per-neuron `channel_stats`;
  - `input_layernorm` and `pre_mlp_layernorm` outputs [s, b, hidden]: per-channel `channel_stats`;
and `decoder.final_layernorm` on the last stage. Heads and neurons are this TP rank's shard (local
index space); `reduce.py` puts them in global order. Hooks are registered on entry and removed on
exit; no module's forward is replaced.

Padding never counts: `TokenMask` holds the current micro-batch's loss mask, set by `run_forward`'s
`before(batch)` callback on every pipeline stage just before that micro-batch's forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_prune.kernels.activation_stats import ChannelStats, HeadStats, channel_stats, head_stats
from megatron_prune.models.forward import Batch

# masks_provider() -> [s, b] token mask of the micro-batch being run (nonzero = count the token)
MasksProvider = Callable[[], torch.Tensor]


class TokenMask:
    """The current micro-batch's token mask, in megatron's [s, b] order; also counts kept tokens."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.num_tokens = 0

    def set(self, batch: Batch) -> None:  # run_forward's `before` callback
        self.mask = batch.loss_mask.t()  # [b, s] -> [s, b]
        self.num_tokens += int((batch.loss_mask != 0).sum())

    def __call__(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("record_activations: no micro-batch mask set; pass TokenMask.set as "
                               "run_forward's `before=` callback")
        return self.mask


@dataclass
class LayerStats:
    heads: Optional[HeadStats] = None  # [np_local] local heads
    neurons: Optional[ChannelStats] = None  # [F_local] local FFN neurons
    pre_attn: Optional[ChannelStats] = None  # [hidden] input_layernorm output
    pre_mlp: Optional[ChannelStats] = None  # [hidden] pre_mlp_layernorm output


@dataclass
class LocalStats:
    """What this rank's hooks saw, in local (TP-shard) index space, keyed by global layer index."""
    layers: dict[int, LayerStats] = field(default_factory=dict)
    final_norm: Optional[ChannelStats] = None  # last stage only
    num_heads_local: int = 0
    head_dim: int = 0


def _add(current, new):
    return new if current is None else current.accumulate(new)


def _check_hookable(module: torch.nn.Module, what: str) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    if module is None or isinstance(module, IdentityOp):
        raise NotImplementedError(
            f"record_activations: the layer has no separate {what} module (the Transformer Engine "
            "spec fuses the norm into the next linear layer); build the model with the local spec")


@contextlib.contextmanager
def record_activations(model: torch.nn.Module, masks_provider: MasksProvider,
                       backend: str = "auto") -> Iterator[LocalStats]:
    """Register the statistics hooks on this rank's layers; yields the `LocalStats` they fill."""
    config = model.config
    tp = int(config.tensor_model_parallel_size)
    np_local = int(config.num_attention_heads) // tp
    hn = int(config.kv_channels)
    stats = LocalStats(num_heads_local=np_local, head_dim=hn)
    handles = []

    def mask_for(x: torch.Tensor) -> torch.Tensor:
        mask = masks_provider()  # [s, b]
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError(f"token mask {tuple(mask.shape)} does not match activation "
                               f"{tuple(x.shape)} (expected megatron's [s, b, ...] layout)")
        return mask

    def first_input(args, kwargs) -> torch.Tensor:
        return args[0] if args else next(iter(kwargs.values()))

    for layer in model.decoder.layers:
        index = int(layer.layer_number) - 1
        entry = stats.layers.setdefault(index, LayerStats())
        _check_hookable(layer.input_layernorm, "input_layernorm")
        _check_hookable(layer.pre_mlp_layernorm, "pre_mlp_layernorm")

        def on_proj(module, args, kwargs, entry=entry):
            x = first_input(args, kwargs)  # [s, b, np_local * hn]
            s, b = x.shape[0], x.shape[1]
            heads = x.reshape(s * b, np_local, hn)  # [s*b, np_local, hn]
            entry.heads = _add(entry.heads, head_stats(heads, mask_for(x).reshape(-1), backend=backend))

        def on_fc2(module, args, kwargs, entry=entry):
            x = first_input(args, kwargs)  # [s, b, F_local]
            entry.neurons = _add(entry.neurons, channel_stats(x, mask_for(x), backend=backend))

        def on_norm(name):
            def hook(module, args, output, entry=entry):
                x = output[0] if isinstance(output, tuple) else output  # [s, b, hidden]
                new = channel_stats(x, mask_for(x), backend=backend)
                setattr(entry, name, _add(getattr(entry, name), new))
            return hook

        proj = layer.self_attention.linear_proj
        handles.append(proj.register_forward_pre_hook(on_proj, with_kwargs=True))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2, with_kwargs=True))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm("pre_attn")))
        handles.append(layer.pre_mlp_layernorm.register_forward_hook(on_norm("pre_mlp")))

    final = getattr(model.decoder, "final_layernorm", None)
    if final is not None:
        def on_final(module, args, output):
            x = output[0] if isinstance(output, tuple) else output  # [s, b, hidden]
            stats.final_norm = _add(stats.final_norm, channel_stats(x, mask_for(x), backend=backend))

        handles.append(final.register_forward_hook(on_final))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
