"""Prune targets: what the user asks for (`cfg.prune` of a recipe in conf/prune/), read into typed
values and checked against the source architecture and the layout, before any score is looked at.

A target names the new size of each axis, or None to keep it. This module turns it into the new
`ModelConfig`; plan.py decides *which* indices survive.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_prune.config import ConfigError, ModelConfig

IMPORTANCE_SOURCES = ("activation", "magnitude", "random")
# How `num_layers` picks the layers to drop (plan.py maps each name to a score tensor):
#   *_block: one contiguous block of L - L' layers;  *_layer: the L - L' individually weakest layers.
DEPTH_METRICS = ("lm_loss_block", "mc_acc_block", "block_importance_block", "lm_loss_layer",
                 "block_importance_layer")
WIDTH_AXES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@dataclass
class PruneTarget:
    """The architecture to prune to. None = keep that axis."""

    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    # GQA: heads are removed inside their query group, groups are removed whole. If only
    # num_query_groups is given, each kept group keeps all its heads; for MHA (one head per group)
    # giving either one sets both.
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[list[int]] = None  # explicit global layer indices (exclusive with num_layers)
    depth_metric: str = "lm_loss_block"


@dataclass
class PruneRecipe:
    """A whole `cfg.prune` mapping: where the scores come from and the target."""

    importance: str = "activation"  # activation | magnitude | random
    seed: int = 0  # for importance=random
    target: PruneTarget = field(default_factory=PruneTarget)


def _int_or_none(value: Any, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer, or null to keep that axis")
    return value


def target_from_dict(data: dict[str, Any], where: str = "prune.target") -> PruneTarget:
    """Read a target mapping (plain dict, e.g. OmegaConf.to_container of cfg.prune.target)."""
    known = {f.name for f in dataclasses.fields(PruneTarget)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known fields are {sorted(known)}")
    values = {k: _int_or_none(data.get(k), f"{where}.{k}") for k in (*WIDTH_AXES, "num_layers")}
    drop = data.get("drop_layers")
    if drop is not None:
        if not isinstance(drop, (list, tuple)):
            raise ConfigError(f"{where}.drop_layers={drop!r} must be a list of layer indices, or null")
        drop = [_int_or_none(i, f"{where}.drop_layers[{n}]") for n, i in enumerate(drop)]
    metric = data.get("depth_metric") or PruneTarget.depth_metric
    if metric not in DEPTH_METRICS:
        raise ConfigError(f"{where}.depth_metric={metric!r} is not known; use one of {DEPTH_METRICS}")
    return PruneTarget(**values, drop_layers=drop, depth_metric=metric)


def recipe_from_dict(data: dict[str, Any], where: str = "prune") -> PruneRecipe:
    known = {f.name for f in dataclasses.fields(PruneRecipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known fields are {sorted(known)}")
    importance = data.get("importance", "activation")
    if importance not in IMPORTANCE_SOURCES:
        raise ConfigError(f"{where}.importance={importance!r}: use one of {IMPORTANCE_SOURCES}")
    seed = _int_or_none(data.get("seed", 0), f"{where}.seed")
    return PruneRecipe(importance=importance, seed=0 if seed is None else seed,
                       target=target_from_dict(dict(data.get("target") or {}), f"{where}.target"))


def _axis(target: PruneTarget, source: ModelConfig, name: str) -> int:
    """The new size of one axis: checked to be in [1, source size]."""
    old = getattr(source, name)
    new = getattr(target, name)
    if new is None:
        return old
    if new > old:
        raise ConfigError(f"prune.target.{name}={new} is larger than {source.name}'s {name}={old}; pruning "
                          f"only removes: use a value <= {old}, or null to keep the axis")
    if new <= 0:
        raise ConfigError(f"prune.target.{name}={new} would keep nothing; use a value in [1, {old}], "
                          "or null to keep the axis")
    return new


def _heads_and_groups(target: PruneTarget, source: ModelConfig) -> tuple[int, int]:
    H, G = source.num_attention_heads, source.num_query_groups
    r = H // G  # heads per query group in the source
    heads, groups = target.num_attention_heads, target.num_query_groups
    if r == 1:  # MHA: a head is its own group, so the two counts move together
        if heads is None:
            heads = groups
        if groups is None:
            groups = heads
    elif heads is None and groups is not None:
        heads = groups * r  # whole groups removed, each kept group keeps all its heads
    t = dataclasses.replace(target, num_attention_heads=heads, num_query_groups=groups)
    new_h, new_g = _axis(t, source, "num_attention_heads"), _axis(t, source, "num_query_groups")
    if r == 1 and new_h != new_g:
        raise ConfigError(
            f"prune.target.num_attention_heads={new_h} != prune.target.num_query_groups={new_g}, but {source.name} "
            "uses multi-head attention (one head per query group), so heads and groups are pruned "
            "together: give both the same value, or only one of them")
    if new_h % new_g:
        raise ConfigError(
            f"prune.target.num_attention_heads={new_h} is not divisible by prune.target.num_query_groups={new_g}; "
            "every query group keeps the same number of heads: choose a multiple of num_query_groups")
    if new_h // new_g > r:
        raise ConfigError(
            f"prune.target.num_attention_heads={new_h} with num_query_groups={new_g} means {new_h // new_g} "
            f"heads per group, but {source.name} has {r} (num_attention_heads={H} / num_query_groups={G}) "
            f"and a group cannot gain heads: use num_attention_heads <= {new_g * r}")
    return new_h, new_g


def _check_drop_layers(drop: list[int], num_layers: int) -> None:
    for i in drop:
        if not 0 <= i < num_layers:
            raise ConfigError(f"prune.target.drop_layers contains {i}, outside the source's layers "
                              f"0..{num_layers - 1}; give global layer indices")
    dupes = sorted({i for i in drop if drop.count(i) > 1})
    if dupes:
        raise ConfigError(f"prune.target.drop_layers lists layers {dupes} more than once; list each layer once")
    if len(drop) >= num_layers:
        raise ConfigError(f"prune.target.drop_layers drops all {num_layers} layers, which keeps nothing; "
                          "keep at least one layer")


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """megatron shards heads, groups, FFN neurons and the vocabulary evenly over TP, layers over PP."""
    for name, size in (("parallel.tp", tp), ("parallel.pp", pp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{name}={size!r} must be an integer >= 1")
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(cfg, name)
        if value % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide prune.target.{name}={value}; choose a target that is a "
                f"multiple of {tp} (e.g. {value - value % tp or tp}) or a parallel.tp that divides {value}")
    if cfg.vocab_size % tp:  # pruning keeps the vocabulary
        raise ConfigError(f"parallel.tp={tp} does not divide model.vocab_size={cfg.vocab_size} (pruning keeps "
                          "the vocabulary); choose a parallel.tp that divides it")
    if cfg.num_layers % pp:
        raise ConfigError(
            f"parallel.pp={pp} does not divide prune.target.num_layers={cfg.num_layers}; choose a target "
            f"num_layers that is a multiple of {pp} or a parallel.pp that divides {cfg.num_layers}")


def target_config(source: ModelConfig, target: PruneTarget, *, tp: int = 1, pp: int = 1) -> ModelConfig:
    """The new architecture, after every check that needs no scores. head_dim (kv_channels) and the
    vocabulary are kept; the name gets a "-pruned" suffix."""
    source.validate("model")
    if target.num_layers is not None and target.drop_layers is not None:
        raise ConfigError("prune.target.num_layers and prune.target.drop_layers are both set; give one: num_layers "
                          "picks the layers by prune.target.depth_metric, drop_layers names them")
    if target.depth_metric not in DEPTH_METRICS:
        raise ConfigError(f"prune.target.depth_metric={target.depth_metric!r} is not known; use one of {DEPTH_METRICS}")
    if target.drop_layers is not None:
        _check_drop_layers(list(target.drop_layers), source.num_layers)
        num_layers = source.num_layers - len(target.drop_layers)
    else:
        num_layers = _axis(target, source, "num_layers")
    heads, groups = _heads_and_groups(target, source)
    new = dataclasses.replace(
        source, name=f"{source.name}-pruned", num_layers=num_layers,
        hidden_size=_axis(target, source, "hidden_size"),
        ffn_hidden_size=_axis(target, source, "ffn_hidden_size"),
        num_attention_heads=heads, num_query_groups=groups).validate("target")
    _check_layout(new, tp, pp)
    return new
