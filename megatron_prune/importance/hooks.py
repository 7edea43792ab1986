"""Forward hooks that turn a sharded GPTModel's activations into small per-unit statistics.

For every local transformer layer (global index `layer.layer_number - 1`):
  - `self_attention.linear_proj` input, the attention output [s, b, np_local * hn]: per head, the
    token-wise l2 norm of the head's hn-vector (`head_stats_per_sample`);
  - `mlp.linear_fc2` input, the FFN intermediate [s, b, F_local]: per neuron |x| (`channel_stats_per_sample`);
  - `input_layernorm` and `pre_mlp_layernorm` outputs [s, b, hidden]: per channel |x|, for this TP
    rank's block of channels (`hidden_slice`; the outputs are replicated over TP);
  - the layer's own input and output hidden states [s, b, hidden]: 1 - cos(input, output) per token,
    for Block Importance (ShortGPT / Minitron's depth metric), on every tp-th token;
and `decoder.final_layernorm` on the last stage. Heads and neurons are this TP rank's shard (local
index space); `reduce.py` puts them in global order. Hooks are registered on entry and removed on
exit; no module's forward is replaced.

Two-level aggregation (Minitron sec. 2.2): for every calibration sample (a row of the micro-batch)
each unit's activations are first aggregated over that sample's real tokens — l2 = sqrt(sum x²),
mean = sum|x| / n, max = max|x| — and `SampleSums` then keeps, per unit, the sum over samples of
each of those three numbers and of their squares, enough for a `mean` or an `l2` across samples.
Padding never counts: `TokenMask` holds the current micro-batch's mask, set by `run_forward`'s
`before(batch)` callback on every pipeline stage just before that micro-batch's forward.

A NaN or Inf in a real token's activation is recorded (first layer and sample seen), not raised
inside the hook: raising on one pipeline stage would leave the others waiting in a collective.
`estimate.py` agrees on it across ranks after the pass and raises everywhere.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_prune.kernels.activation_stats import channel_stats_per_sample, head_stats_per_sample
from megatron_prune.models.forward import Batch

# masks_provider() -> [s, b] token mask of the micro-batch being run (nonzero = count the token)
MasksProvider = Callable[[], torch.Tensor]

SEQUENCE_AGGREGATIONS = ("l2", "mean", "max")  # within a sample, over its tokens (row order of SampleSums)
# the activations the hooks read, in a layer's forward order (a NaN is reported at the first one)
ACTIVATIONS = ("input_layernorm output", "attention output (linear_proj input)",
               "pre_mlp_layernorm output", "MLP intermediate (linear_fc2 input)", "final layernorm output")


class TokenMask:
    """The current micro-batch's token mask in megatron's [s, b] order, the rows' sample ids, and
    counts of kept tokens and of samples (rows with at least one kept token)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.sample_ids: Optional[torch.Tensor] = None
        self.num_tokens = 0
        self.num_samples = 0

    def set(self, batch: Batch) -> None:  # run_forward's `before` callback
        self.mask = batch.loss_mask.t()  # [b, s] -> [s, b]
        b = batch.shape[0]
        self.sample_ids = batch.sample_ids if batch.sample_ids is not None else torch.full((b,), -1)
        self.num_tokens += int((batch.loss_mask != 0).sum())
        self.num_samples += int((batch.loss_mask != 0).any(dim=1).sum())

    def __call__(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("record_activations: no micro-batch mask set; pass TokenMask.set as "
                               "run_forward's `before=` callback")
        return self.mask


@dataclass
class SampleSums:
    """Per unit, over samples s: rows 0-2 = sum_s a_s, rows 3-5 = sum_s a_s², where a_s is the
    sample's (l2, mean, max) sequence aggregate. float64 [6, n]."""
    sums: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> "SampleSums":
        return cls(torch.zeros(6, n, dtype=torch.float64))

    def add(self, per_sample: torch.Tensor) -> None:  # per_sample: [r, 3, n], r samples' aggregates
        a = per_sample.to(torch.float64).cpu()
        self.sums[:3] += a.sum(0)
        self.sums[3:] += (a * a).sum(0)


@dataclass
class LayerStats:
    heads: Optional[SampleSums] = None  # [6, np_local] local heads
    neurons: Optional[SampleSums] = None  # [6, F_local] local FFN neurons
    pre_attn: Optional[SampleSums] = None  # [6, hidden slice] input_layernorm output
    pre_mlp: Optional[SampleSums] = None  # [6, hidden slice] pre_mlp_layernorm output
    bi_sum: float = 0.0  # sum over this rank's share of tokens of 1 - cos(layer input, output)


@dataclass
class NonFinite:
    layer: int  # global layer index (num_layers for the final layernorm)
    where: int  # index into ACTIVATIONS
    sample: int  # sample id of the row (-1 if unknown)

    @property
    def order(self) -> int:  # forward order over the whole model
        return self.layer * len(ACTIVATIONS) + self.where


@dataclass
class LocalStats:
    """What this rank's hooks saw, in local (TP-shard) index space, keyed by global layer index."""
    layers: dict[int, LayerStats] = field(default_factory=dict)
    final_norm: Optional[SampleSums] = None  # last stage only
    num_heads_local: int = 0
    head_dim: int = 0
    hidden_slice: tuple[int, int] = (0, 0)  # [lo, hi): the hidden channels this TP rank scores
    nonfinite: Optional[NonFinite] = None  # the first non-finite activation (lowest layer)


def hidden_slice(hidden_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Channels [lo, hi) of TP rank r: blocks of ceil(hidden / tp), the last one possibly shorter.

    Norm outputs and hidden states are replicated over TP, so scoring all channels on every TP rank
    would repeat the same work tp times; each rank scores one block and reduce.py gathers them."""
    chunk = -(-hidden_size // tp_size)
    lo = min(tp_rank * chunk, hidden_size)
    return lo, min(lo + chunk, hidden_size)


def fused_norm_output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the norm a Transformer Engine LayerNormLinear fuses in front of its GEMM.

    TE computes it inside its kernel and does not return it, so the hook recomputes it from the
    module's input with the module's own norm parameters (`layer_norm_weight`, `layer_norm_bias`,
    `eps`, `normalization`, `zero_centered_gamma`). fp32; [..., hidden] -> [..., hidden]."""
    xf = x.float()
    weight = module.layer_norm_weight.float()
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1.0  # TE stores gamma - 1
    eps = float(module.eps)
    if module.normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = torch.nn.functional.layer_norm(xf, (x.shape[-1],), eps=eps)
    y = y * weight
    bias = getattr(module, "layer_norm_bias", None)
    return y + bias.float() if bias is not None and module.normalization != "RMSNorm" else y


def _norm_site(norm: torch.nn.Module, fused_into: torch.nn.Module, what: str):
    """(module, True) to hook a norm's output, or (linear, False) to hook a TE linear's input and
    recompute the norm it fuses; refuses a layer where neither exists."""
    from megatron.core.transformer.identity_op import IdentityOp

    if norm is not None and not isinstance(norm, IdentityOp):
        return norm, True
    if hasattr(fused_into, "layer_norm_weight") and hasattr(fused_into, "normalization"):
        return fused_into, False
    raise NotImplementedError(f"record_activations: the layer has no {what} module and its next linear "
                              "layer fuses no norm that can be read; use the local or the Transformer "
                              "Engine layer spec")


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def record_activations(model: torch.nn.Module, token_mask: TokenMask, backend: str = "auto", *,
                       tp_rank: int = 0) -> Iterator[LocalStats]:
    """Register the statistics hooks on this rank's layers; yields the `LocalStats` they fill.

    `tp_rank` (of `config.tensor_model_parallel_size`) picks this rank's share of the replicated
    work: a block of hidden channels for the norm outputs, every tp-th token for Block Importance."""
    config = model.config
    if getattr(config, "sequence_parallel", False):
        raise NotImplementedError("record_activations: sequence_parallel splits the hidden states "
                                  "over the TP ranks; score with sequence_parallel=false")
    tp = int(config.tensor_model_parallel_size)
    np_local = int(config.num_attention_heads) // tp
    hn = int(config.kv_channels)
    lo, hi = hidden_slice(int(config.hidden_size), tp_rank, tp)
    stats = LocalStats(num_heads_local=np_local, head_dim=hn, hidden_slice=(lo, hi))
    handles = []

    def mask_for(x: torch.Tensor) -> torch.Tensor:
        mask = token_mask()  # [s, b]
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise RuntimeError(f"token mask {tuple(mask.shape)} does not match activation "
                               f"{tuple(x.shape)} (expected megatron's [s, b, ...] layout)")
        return mask

    def note_nonfinite(layer: int, where: int, row: int) -> None:
        sample = int(token_mask.sample_ids[row]) if token_mask.sample_ids is not None else -1
        new = NonFinite(layer, where, sample)
        if stats.nonfinite is None or new.order < stats.nonfinite.order:
            stats.nonfinite = new

    def per_sample(x: torch.Tensor, heads: bool, layer: int, where: int, current: Optional[SampleSums]):
        """Aggregate each sample (column b) of x [s, b, n] (or [s, b, np, hn]) over its kept tokens."""
        mask = mask_for(x)  # [s, b]
        counts = (mask != 0).sum(0).to(torch.float32)  # [b]
        if heads:
            st = head_stats_per_sample(x, mask, backend=backend)  # fields [b, np]
            a = torch.stack([st.sum_sq_norm.sqrt(), st.sum_norm / counts.clamp_min(1)[:, None],
                             st.max_norm], dim=1)  # [b, 3, np]
        else:
            st = channel_stats_per_sample(x, mask, backend=backend)  # fields [b, n]
            a = torch.stack([st.sum_sq.sqrt(), st.sum_abs / counts.clamp_min(1)[:, None],
                             st.max_abs], dim=1)  # [b, 3, n]
        rows = (counts > 0).nonzero().flatten()  # filler rows and all-padding samples are no samples
        a = a[rows]  # [r, 3, n]
        finite = torch.isfinite(a).flatten(1).all(1)  # [r]
        if not bool(finite.all()):
            note_nonfinite(layer, where, int(rows[int((~finite).nonzero()[0])]))
        out = current if current is not None else SampleSums.zeros(x.shape[2])
        out.add(a)
        return out

    for layer in model.decoder.layers:
        index = int(layer.layer_number) - 1
        entry = stats.layers.setdefault(index, LayerStats())
        attn_norm = _norm_site(layer.input_layernorm, layer.self_attention.linear_qkv, "input_layernorm")
        mlp_norm = _norm_site(layer.pre_mlp_layernorm, layer.mlp.linear_fc1, "pre_mlp_layernorm")

        def on_proj(module, args, kwargs, entry=entry, index=index):
            x = _first_input(args, kwargs)  # [s, b, np_local * hn]
            x = x.reshape(x.shape[0], x.shape[1], np_local, hn)  # [s, b, np_local, hn]
            entry.heads = per_sample(x, True, index, 1, entry.heads)

        def on_fc2(module, args, kwargs, entry=entry, index=index):
            x = _first_input(args, kwargs)  # [s, b, F_local]
            entry.neurons = per_sample(x, False, index, 3, entry.neurons)

        def on_norm(name: str, where: int, index=index, entry=entry):
            def hook(module, args, output):
                x = _hidden_of(output)[..., lo:hi]  # [s, b, hidden slice]
                setattr(entry, name, per_sample(x, False, index, where, getattr(entry, name)))
            return hook

        def on_fused_norm(name: str, where: int, index=index, entry=entry):
            def hook(module, args, kwargs):
                x = fused_norm_output(module, _first_input(args, kwargs))[..., lo:hi]  # [s, b, slice]
                setattr(entry, name, per_sample(x, False, index, where, getattr(entry, name)))
            return hook

        def on_layer(module, args, kwargs, output, entry=entry, index=index):
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [s, b, h]
            x_out = _hidden_of(output)  # [s, b, h]
            keep = mask_for(x_out) != 0  # [s, b]
            if tp > 1:  # this rank's share: every tp-th token (flat [s, b] order); reduce.py sums
                share = torch.arange(keep.numel(), device=keep.device).reshape(keep.shape) % tp == tp_rank
                keep = keep & share
            if bool(keep.all()):  # no copy of the hidden states when every token counts
                xi, xo = x_in.reshape(-1, x_in.shape[-1]), x_out.reshape(-1, x_out.shape[-1])  # [t, h]
            else:
                xi, xo = x_in[keep], x_out[keep]  # [t, h] the kept tokens only
            xi, xo = xi.float(), xo.float()
            # dot / (|a| |b|): several times faster on CPU than F.cosine_similarity, same value
            cos = torch.linalg.vecdot(xi, xo) / (torch.linalg.vector_norm(xi, dim=-1) *
                                                  torch.linalg.vector_norm(xo, dim=-1)).clamp_min(1e-8)  # [t]
            entry.bi_sum += float((1.0 - cos.double()).sum())

        proj = layer.self_attention.linear_proj
        handles.append(proj.register_forward_pre_hook(on_proj, with_kwargs=True))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2, with_kwargs=True))
        for (module, separate), name, where in ((attn_norm, "pre_attn", 0), (mlp_norm, "pre_mlp", 2)):
            if separate:  # the local spec: the norm is a module of its own
                handles.append(module.register_forward_hook(on_norm(name, where)))
            else:  # the TE spec: the norm is fused into linear_qkv / linear_fc1
                handles.append(module.register_forward_pre_hook(on_fused_norm(name, where), with_kwargs=True))
        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))

    final = getattr(model.decoder, "final_layernorm", None)
    if final is not None:
        num_layers = int(config.num_layers)

        def on_final(module, args, output):
            x = _hidden_of(output)[..., lo:hi]  # [s, b, hidden slice]
            stats.final_norm = per_sample(x, False, num_layers, 4, stats.final_norm)

        handles.append(final.register_forward_hook(on_final))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
