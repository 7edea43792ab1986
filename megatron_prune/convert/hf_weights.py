"""HF state dict <-> canonical full megatron state dict (TP1/PP1 GPTModel names, global layer ids).

One table (`conversion_pairs`) lists, for every tensor group, the HF names and shapes, the megatron
names and shapes, and the two functions between them. Both directions and the lazy reader are
driven by that one table, so they cannot drift apart and `megatron_to_hf(hf_to_megatron(x)) == x`
bit for bit. Tensors keep their dtype; nothing is cast here.

Tied embeddings: the canonical dict has no `output_layer.weight`; HF's `lm_head.weight`, when a
tied checkpoint carries it, is ignored on the way in and not written on the way out (exactly what
`save_pretrained` does, and safetensors cannot store the shared tensor twice anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.convert import layout
from megatron_prune.convert.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_prune.convert.safetensors_source import SafetensorsSource, read_config_json

Shape = tuple[int, ...]
# HF names that carry no weights (recomputed buffers) and are safe to ignore.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class Pair:
    """`to_megatron(*hf tensors) -> megatron tensors` and `to_hf` its exact inverse."""

    hf: tuple[tuple[str, Shape], ...]
    megatron: tuple[tuple[str, Shape], ...]
    to_megatron: Callable[..., tuple[Tensor, ...]]
    to_hf: Callable[..., tuple[Tensor, ...]]


def _same(*ts: Tensor) -> tuple[Tensor, ...]:
    return ts


def _t(w: Tensor) -> tuple[Tensor, ...]:
    return (layout.transpose(w),)


def _copy(hf_name: str, mg_name: str, shape: Shape) -> Pair:
    return Pair(((hf_name, shape),), ((mg_name, shape),), _same, _same)


def _llama_pairs(cfg: ModelConfig, prefix: str = "model.") -> list[Pair]:
    H, F, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    qkv_rows = (nq + 2 * ng) * d
    bias_linear, bias_qkv = cfg.add_bias_linear, cfg.add_bias_linear or cfg.add_qkv_bias

    def group(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        return (layout.group_qkv(q, k, v, ng, d),)

    def split(qkv: Tensor) -> tuple[Tensor, ...]:
        return layout.split_qkv(qkv, nq, ng, d)

    def fuse(gate: Tensor, up: Tensor) -> tuple[Tensor, ...]:
        return (layout.fuse_gate_up(gate, up),)

    pairs = [_copy(f"{prefix}embed_tokens.weight", "embedding.word_embeddings.weight", (V, H))]
    for i in range(cfg.num_layers):
        h, m = f"{prefix}layers.{i}.", f"decoder.layers.{i}."
        a, ma = h + "self_attn.", m + "self_attention."
        pairs.append(_copy(h + "input_layernorm.weight", m + "input_layernorm.weight", (H,)))
        pairs.append(Pair(((a + "q_proj.weight", (nq * d, H)), (a + "k_proj.weight", (ng * d, H)),
                           (a + "v_proj.weight", (ng * d, H))),
                          ((ma + "linear_qkv.weight", (qkv_rows, H)),), group, split))
        if bias_qkv:
            pairs.append(Pair(((a + "q_proj.bias", (nq * d,)), (a + "k_proj.bias", (ng * d,)),
                               (a + "v_proj.bias", (ng * d,))),
                              ((ma + "linear_qkv.bias", (qkv_rows,)),), group, split))
        pairs.append(_copy(a + "o_proj.weight", ma + "linear_proj.weight", (H, nq * d)))
        if bias_linear:
            pairs.append(_copy(a + "o_proj.bias", ma + "linear_proj.bias", (H,)))
        pairs.append(_copy(h + "post_attention_layernorm.weight", m + "pre_mlp_layernorm.weight", (H,)))
        for kind, shape in (("weight", (F, H)), ("bias", (F,))):
            if kind == "bias" and not bias_linear:
                continue
            pairs.append(Pair(((h + f"mlp.gate_proj.{kind}", shape), (h + f"mlp.up_proj.{kind}", shape)),
                              ((m + f"mlp.linear_fc1.{kind}", (2 * F, *shape[1:])),),
                              fuse, layout.split_gate_up))
        pairs.append(_copy(h + "mlp.down_proj.weight", m + "mlp.linear_fc2.weight", (H, F)))
        if bias_linear:
            pairs.append(_copy(h + "mlp.down_proj.bias", m + "mlp.linear_fc2.bias", (H,)))
    pairs.append(_copy(f"{prefix}norm.weight", "decoder.final_layernorm.weight", (H,)))
    if not cfg.tie_embeddings:
        pairs.append(_copy("lm_head.weight", "output_layer.weight", (V, H)))
    return pairs


def _gpt2_pairs(cfg: ModelConfig, prefix: str = "transformer.") -> list[Pair]:
    H, F, V, P = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.max_position_embeddings
    # HF GPT-2 is MHA with nq * d == H (megatron_to_hf refuses anything else); the megatron-side
    # shapes are written generally so canonical_shapes also describes pruned GPT-2 models.
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    qkv_rows = (nq + 2 * ng) * d

    def group(c_attn: Tensor) -> tuple[Tensor, ...]:
        # Conv1D weight [H, 3H] (bias [3H]): columns are [q | k | v], each head-major.
        rows = c_attn.t() if c_attn.dim() == 2 else c_attn  # [3H, H] or [3H]
        q, k, v = rows.split(nq * d, dim=0)
        return (layout.group_qkv(q, k, v, nq, d),)

    def ungroup(qkv: Tensor) -> tuple[Tensor, ...]:
        q, k, v = layout.split_qkv(qkv, nq, nq, d)
        rows = torch.cat([q, k, v], dim=0)  # [3H, H] or [3H]
        return (rows.t().contiguous() if rows.dim() == 2 else rows,)

    pairs = [_copy(f"{prefix}wte.weight", "embedding.word_embeddings.weight", (V, H)),
             _copy(f"{prefix}wpe.weight", "embedding.position_embeddings.weight", (P, H))]
    for i in range(cfg.num_layers):
        h, m = f"{prefix}h.{i}.", f"decoder.layers.{i}."
        for hf_ln, mg_ln in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            for kind in ("weight", "bias"):
                pairs.append(_copy(h + f"{hf_ln}.{kind}", m + f"{mg_ln}.{kind}", (H,)))
        pairs.append(Pair(((h + "attn.c_attn.weight", (H, 3 * H)),),
                          ((m + "self_attention.linear_qkv.weight", (qkv_rows, H)),), group, ungroup))
        pairs.append(Pair(((h + "attn.c_attn.bias", (3 * H,)),),
                          ((m + "self_attention.linear_qkv.bias", (qkv_rows,)),), group, ungroup))
        pairs.append(Pair(((h + "attn.c_proj.weight", (H, H)),),
                          ((m + "self_attention.linear_proj.weight", (H, nq * d)),), _t, _t))
        pairs.append(_copy(h + "attn.c_proj.bias", m + "self_attention.linear_proj.bias", (H,)))
        pairs.append(Pair(((h + "mlp.c_fc.weight", (H, F)),), ((m + "mlp.linear_fc1.weight", (F, H)),), _t, _t))
        pairs.append(_copy(h + "mlp.c_fc.bias", m + "mlp.linear_fc1.bias", (F,)))
        pairs.append(Pair(((h + "mlp.c_proj.weight", (F, H)),), ((m + "mlp.linear_fc2.weight", (H, F)),), _t, _t))
        pairs.append(_copy(h + "mlp.c_proj.bias", m + "mlp.linear_fc2.bias", (H,)))
    for kind in ("weight", "bias"):
        pairs.append(_copy(f"{prefix}ln_f.{kind}", f"decoder.final_layernorm.{kind}", (H,)))
    if not cfg.tie_embeddings:
        pairs.append(_copy("lm_head.weight", "output_layer.weight", (V, H)))
    return pairs


def conversion_pairs(cfg: ModelConfig, hf_names: Optional[Iterable[str]] = None) -> list[Pair]:
    """The table for `cfg`. `hf_names` (the checkpoint's tensor names) picks the GPT-2 prefix:
    the original hub `gpt2` files omit `transformer.`, `save_pretrained` writes it."""
    if cfg.family == "llama":
        return _llama_pairs(cfg)
    bare = hf_names is not None and "wte.weight" in set(hf_names)
    return _gpt2_pairs(cfg, prefix="" if bare else "transformer.")


class TensorSource(Protocol):
    """Named tensors whose names and shapes are known before any tensor is read."""

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> Shape: ...
    def get(self, name: str) -> Tensor: ...
    def where(self, name: str) -> str: ...  # the file (or object) that holds / should hold `name`


class MappingSource:
    """A `TensorSource` over an in-memory state dict; the lazy twin is `SafetensorsSource`."""

    def __init__(self, state: Mapping[str, Tensor], where: str = "the given state dict") -> None:
        self.state, self.description = state, where

    def names(self) -> set[str]:
        return {k for k in self.state if not k.endswith("_extra_state")}

    def shape(self, name: str) -> Shape:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> Tensor:
        return self.state[name]

    def where(self, name: str) -> str:
        return self.description


def _check(source: TensorSource, needed: Sequence[tuple[str, Shape]], allowed_extra: Callable[[str], bool],
           cfg: ModelConfig) -> None:
    """All tensors present with the shapes `cfg` implies, nothing unexplained left over; checked
    from names/headers only, before any tensor is read."""
    names = source.names()
    for name, shape in needed:
        if name not in names:
            raise ConfigError(f"tensor {name!r} is missing from {source.where(name)} "
                              f"(model {cfg.name!r}, family {cfg.family}, {cfg.num_layers} layers)")
        if source.shape(name) != shape:
            raise ConfigError(f"tensor {name!r} in {source.where(name)} has shape {list(source.shape(name))}, "
                              f"but the model config implies {list(shape)}; check config.json / the model preset")
    extra = sorted(n for n in names - {n for n, _ in needed} if not allowed_extra(n))
    if extra:
        raise ConfigError(f"{len(extra)} tensors in {source.where(extra[0])} are not part of model {cfg.name!r} "
                          f"as configured (e.g. {extra[:4]}); does num_layers / tie_embeddings match?")


def _hf_ignorable(cfg: ModelConfig) -> Callable[[str], bool]:
    return lambda n: n.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")


def iter_hf_to_megatron(source: TensorSource, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Canonical (name, tensor) one pair at a time: at most one layer-matrix group in memory."""
    pairs = conversion_pairs(cfg, source.names())
    _check(source, [x for p in pairs for x in p.hf], _hf_ignorable(cfg), cfg)
    for pair in pairs:
        outs = pair.to_megatron(*(source.get(name) for name, _ in pair.hf))
        for (name, _), tensor in zip(pair.megatron, outs):
            yield name, tensor


def hf_to_megatron(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF state dict -> canonical full megatron state dict."""
    return dict(iter_hf_to_megatron(MappingSource(state), cfg))


def megatron_to_hf(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Canonical full megatron state dict -> HF state dict as `save_pretrained` would write it.
    `_extra_state` keys are ignored; so is `output_layer.weight` of a tied model. Architectures HF
    cannot express (GQA GPT-2, qkv-only bias llama, ...) raise ConfigError before any work."""
    model_config_to_hf_config(cfg)  # raises ConfigError for architectures HF cannot express
    source = MappingSource(state, "the canonical megatron state dict")
    pairs = conversion_pairs(cfg)
    _check(source, [x for p in pairs for x in p.megatron],
           lambda n: cfg.tie_embeddings and n == "output_layer.weight", cfg)
    out: dict[str, Tensor] = {}
    for pair in pairs:
        outs = pair.to_hf(*(source.get(name) for name, _ in pair.megatron))
        out.update({name: t for (name, _), t in zip(pair.hf, outs)})
    return out


def canonical_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Name -> full shape of every canonical tensor (what a TP1/PP1 GPTModel's state_dict holds)."""
    return {name: shape for p in conversion_pairs(cfg) for name, shape in p.megatron}


class CanonicalState(Mapping[str, Tensor]):
    """Lazy canonical megatron state: `state[name]` reads only the HF tensors that name needs.
    Presence and shapes of everything are checked up front."""

    def __init__(self, source: TensorSource, cfg: ModelConfig) -> None:
        self.source, self.cfg = source, cfg
        pairs = conversion_pairs(cfg, source.names())
        _check(source, [x for p in pairs for x in p.hf], _hf_ignorable(cfg), cfg)
        self._pair_of = {name: p for p in pairs for name, _ in p.megatron}

    def __getitem__(self, name: str) -> Tensor:
        pair = self._pair_of[name]
        outs = pair.to_megatron(*(self.source.get(n) for n, _ in pair.hf))
        return dict(zip((n for n, _ in pair.megatron), outs))[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pair_of)

    def __len__(self) -> int:
        return len(self._pair_of)


def iter_canonical(hf_dir: str | Path, cfg: Optional[ModelConfig] = None) -> Iterator[tuple[str, Tensor]]:
    """Canonical tensors of a safetensors checkpoint directory, read one group at a time through
    `safe_open`, so converting an 8B model never holds two copies. `cfg` defaults to config.json's."""
    source = SafetensorsSource(hf_dir)
    if cfg is None:
        cfg = hf_config_to_model_config(read_config_json(hf_dir), name=Path(hf_dir).name,
                                        where=str(Path(hf_dir) / "config.json"))
    yield from iter_hf_to_megatron(source, cfg)
