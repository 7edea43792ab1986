"""The prune plan: a pure function of importance scores and a target giving the kept indices of every
axis and the new architecture, saved as `plan.json`. Surgery applies it to the sharded weights.

Everything here is in GLOBAL index space (head h of layer l, neuron n, hidden channel c), so the
same scores and target give the same plan at any TP/PP layout. Width axes keep the top-k by score
(ties go to the lower index) and list the survivors ascending, which keeps the weights' original order.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.models.params import count_parameters
from megatron_prune.prune.targets import (DEPTH_METRICS, IMPORTANCE_SOURCES, PruneRecipe, PruneTarget,
                                          recipe_from_dict, target_config, target_from_dict)

FORMAT = "megatron_prune.plan/1"
PLAN_FILE = "plan.json"


@dataclass
class ImportanceScores:
    """Plain score tensors in global index space, float64. Higher = more important, except where a
    depth metric says otherwise (see _DEPTH)."""

    heads: torch.Tensor  # [L, H]
    query_groups: torch.Tensor  # [L, G]
    neurons: torch.Tensor  # [L, F]
    hidden: torch.Tensor  # [Hd]
    # any of: block_importance [L], lm_loss_increase_layer [L], lm_loss_increase_block [L-k+1],
    # mc_acc_block [L-k+1]
    depth: dict[str, torch.Tensor] = field(default_factory=dict)
    block_size: int = 1  # k of the *_block metrics
    source: str = "activation"  # activation | magnitude | random


@dataclass(frozen=True)
class _DepthMetric:
    key: str  # ImportanceScores.depth key
    unit: str  # "block": the artifact scored each k-block; "window": sum per-layer scores over n; "layer"
    drop_highest: bool  # True when a HIGH value means the layers are NOT needed (accuracy without them)
    produced_by: str  # the score option that writes the tensor


_DEPTH = {
    "lm_loss_block": _DepthMetric("lm_loss_increase_block", "block", False, "depth.loss=true"),
    "mc_acc_block": _DepthMetric("mc_acc_block", "block", True, "depth.accuracy=true"),
    "block_importance_block": _DepthMetric("block_importance", "window", False, "the width pass (always on)"),
    "lm_loss_layer": _DepthMetric("lm_loss_increase_layer", "layer", False, "depth.loss=true"),
    "block_importance_layer": _DepthMetric("block_importance", "layer", False, "the width pass (always on)"),
}
assert set(_DEPTH) == set(DEPTH_METRICS)
_BLOCK_KEYS = ("lm_loss_increase_block", "mc_acc_block")
_LAYER_KEYS = ("block_importance", "lm_loss_increase_layer")


def scores_from_artifact(artifact) -> ImportanceScores:
    """ImportanceScores from the `score` stage's ImportanceArtifact (megatron_prune.importance.artifact)."""
    t = artifact.tensors

    def f64(name: str) -> torch.Tensor:
        return t[name].detach().to(torch.float64).cpu()

    return ImportanceScores(
        heads=f64("width/heads"), query_groups=f64("width/query_groups"), neurons=f64("width/neurons"),
        hidden=f64("width/hidden"),
        depth={k: f64(f"depth/{k}") for k in (*_LAYER_KEYS, *_BLOCK_KEYS) if f"depth/{k}" in t},
        block_size=int(artifact.metadata.get("depth", {}).get("block_size", 1)), source="activation")


def check_artifact_matches(artifact, source: ModelConfig, checkpoint_sha256: Optional[str] = None) -> None:
    """Refuse an artifact scored on another model: its recorded config must equal the checkpoint's,
    and its recorded checkpoint hash the given one (when given)."""
    model = artifact.metadata.get("model", {})
    recorded = ModelConfig.from_dict(model.get("config", {}), where="importance metadata model.config")
    if recorded != source:
        diff = [f"{k}={a!r} (artifact) vs {b!r} (checkpoint)"
                for k, (a, b) in ((k, (getattr(recorded, k), getattr(source, k)))
                                  for k in source.to_dict()) if a != b]
        raise ConfigError(f"importance artifact is for another model: {'; '.join(diff)}; rerun "
                          "`megatron-prune score` on this checkpoint, or pass the artifact made from it")
    if checkpoint_sha256 is not None and model.get("sha256") != checkpoint_sha256:
        raise ConfigError(f"importance artifact is for another checkpoint: it records model sha256 "
                          f"{model.get('sha256')!r}, the checkpoint's is {checkpoint_sha256!r}; rerun "
                          "`megatron-prune score` on this checkpoint, or pass the artifact made from it")


def random_scores(cfg: ModelConfig, seed: int, block_size: Optional[int] = None) -> ImportanceScores:
    """Seeded uniform scores with the artifact's shapes, for the random-pruning ablation. Query-group
    scores are the sum of their heads', as in the artifact. With `block_size` (pass the number of
    layers the target drops) the *_block metrics are drawn too, so every depth_metric works."""
    L, H, G = cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups
    gen = torch.Generator().manual_seed(int(seed))

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    heads = rand(L, H)  # [L, H]
    depth = {"block_importance": rand(L), "lm_loss_increase_layer": rand(L)}
    if block_size is not None:
        depth.update({k: rand(L - int(block_size) + 1) for k in _BLOCK_KEYS})
    return ImportanceScores(
        heads=heads, query_groups=heads.reshape(L, G, H // G).sum(-1),  # [L, G]
        neurons=rand(L, cfg.ffn_hidden_size), hidden=rand(cfg.hidden_size), depth=depth,
        block_size=1 if block_size is None else int(block_size), source="random")


def _check_scores(scores: ImportanceScores, cfg: ModelConfig) -> None:
    L, k = cfg.num_layers, scores.block_size
    if scores.source not in IMPORTANCE_SOURCES:
        raise ConfigError(f"importance={scores.source!r}: use one of {IMPORTANCE_SOURCES}")
    if not 1 <= k <= L:
        raise ConfigError(f"importance depth.block_size={k} must be in [1, num_layers={L}]")
    expected = {"heads": (L, cfg.num_attention_heads), "query_groups": (L, cfg.num_query_groups),
                "neurons": (L, cfg.ffn_hidden_size), "hidden": (cfg.hidden_size,),
                **{f"depth/{n}": (L,) for n in _LAYER_KEYS},
                **{f"depth/{n}": (L - k + 1,) for n in _BLOCK_KEYS}}
    unknown = sorted(set(scores.depth) - set(_LAYER_KEYS) - set(_BLOCK_KEYS))
    if unknown:
        raise ConfigError(f"importance: unknown depth scores {unknown}; known: {[*_LAYER_KEYS, *_BLOCK_KEYS]}")
    tensors = {"heads": scores.heads, "query_groups": scores.query_groups, "neurons": scores.neurons,
               "hidden": scores.hidden, **{f"depth/{n}": v for n, v in scores.depth.items()}}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ConfigError(
                f"importance artifact is for another model: {name} has shape {tuple(tensor.shape)}, but "
                f"{cfg.name} needs {expected[name]}; rerun `megatron-prune score` on this checkpoint")
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"importance {name} holds NaN or Inf, so it cannot rank anything; rerun "
                              "`megatron-prune score` (it reports where non-finite activations appear)")


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """[n] -> the k highest-scoring indices, ascending. A stable sort on -score gives ties to the
    lower index, so the plan is deterministic."""
    order = torch.argsort(-scores, stable=True)
    return sorted(order[:k].tolist())


def select_heads(heads: torch.Tensor, groups: torch.Tensor, new_groups: int,
                 new_heads: int) -> tuple[list[int], list[int]]:
    """One layer's kept query groups and heads. heads [H], groups [G]; head h is in group h // (H/G)
    (megatron and HF order). Kept heads come group by group, which is simply ascending order."""
    H, G = heads.numel(), groups.numel()
    r, new_r = H // G, new_heads // new_groups  # heads per group, before and after
    if r == 1:  # MHA: each head is its own group, rank the heads directly
        kept = top_k(heads, new_heads)
        return kept, kept
    kept_groups = top_k(groups, new_groups)
    kept_heads = [g * r + i for g in kept_groups for i in top_k(heads[g * r:(g + 1) * r], new_r)]
    return kept_groups, kept_heads


def select_dropped_layers(scores: ImportanceScores, metric: str, num_drop: int, num_layers: int) -> list[int]:
    """The global indices of the `num_drop` layers to remove, by the named depth metric."""
    m = _DEPTH[metric]
    if m.key not in scores.depth:
        raise ConfigError(f"prune.target.depth_metric={metric} needs the importance score depth/{m.key}, which the "
                          f"artifact lacks; it is written by {m.produced_by} in `megatron-prune score`")
    values = scores.depth[m.key]
    weakness = values if m.drop_highest else -values  # higher = more removable
    if m.unit == "block":
        if num_drop != scores.block_size:
            raise ConfigError(
                f"prune.target.depth_metric={metric} drops one block of {num_drop} layers (num_layers "
                f"{num_layers} -> {num_layers - num_drop}), but the artifact scored blocks of "
                f"depth.block_size={scores.block_size}; rerun `megatron-prune score` with "
                f"depth.block_size={num_drop}, or use depth_metric=block_importance_block")
        start = int(torch.argsort(-weakness, stable=True)[0])
        return list(range(start, start + num_drop))
    if m.unit == "window":  # the contiguous n-block whose layers' BI sum is smallest
        sums = values.unfold(0, num_drop, 1).sum(-1)  # [L - n + 1]
        start = int(torch.argsort(sums, stable=True)[0])
        return list(range(start, start + num_drop))
    return sorted(torch.argsort(-weakness, stable=True)[:num_drop].tolist())


@dataclass
class PrunePlan:
    source: ModelConfig
    target: ModelConfig  # the new architecture; kv_channels and vocab unchanged
    keep_layers: list[int]  # original global layer indices kept, ascending (new layer i = keep_layers[i])
    keep_hidden: list[int]  # [Hd'] ascending original channels
    keep_neurons: list[list[int]]  # per NEW layer: [F'] ascending original neurons of that layer
    keep_groups: list[list[int]]  # per NEW layer: [G'] ascending original query groups
    keep_heads: list[list[int]]  # per NEW layer: [H'] ascending original global heads, H'/G' per kept group
    importance: str  # activation | magnitude | random
    depth_metric: Optional[str]  # None: no layer dropped; "drop_layers": the target named them
    parameters: dict  # {"before": int, "after": int}

    def validate(self) -> "PrunePlan":
        """Every list consistent with the two architectures (a hand-edited plan.json is checked too)."""
        s, t = self.source.validate("plan.source"), self.target.validate("plan.target")
        changed = {"name", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups"}
        for k in s.to_dict():
            if k not in changed and getattr(s, k) != getattr(t, k):
                raise ConfigError(f"plan.target.{k}={getattr(t, k)!r} differs from plan.source.{k}="
                                  f"{getattr(s, k)!r}; pruning never changes {k}")
        _check_indices("plan.keep_layers", self.keep_layers, s.num_layers, t.num_layers)
        _check_indices("plan.keep_hidden", self.keep_hidden, s.hidden_size, t.hidden_size)
        r, new_r = s.num_attention_heads // s.num_query_groups, t.num_attention_heads // t.num_query_groups
        for name in ("keep_neurons", "keep_groups", "keep_heads"):
            if len(getattr(self, name)) != t.num_layers:
                raise ConfigError(f"plan.{name} has {len(getattr(self, name))} layers, the target "
                                  f"{t.num_layers}; it needs one list per new layer")
        for i in range(t.num_layers):
            _check_indices(f"plan.keep_neurons[{i}]", self.keep_neurons[i], s.ffn_hidden_size, t.ffn_hidden_size)
            _check_indices(f"plan.keep_groups[{i}]", self.keep_groups[i], s.num_query_groups, t.num_query_groups)
            _check_indices(f"plan.keep_heads[{i}]", self.keep_heads[i], s.num_attention_heads,
                           t.num_attention_heads)
            per_group = [sum(1 for h in self.keep_heads[i] if h // r == g) for g in self.keep_groups[i]]
            if per_group != [new_r] * t.num_query_groups:
                raise ConfigError(f"plan.keep_heads[{i}] keeps {per_group} heads of query groups "
                                  f"{self.keep_groups[i]}; each kept group needs exactly {new_r}")
        expected = {"before": count_parameters(s), "after": count_parameters(t)}
        if dict(self.parameters) != expected:
            raise ConfigError(f"plan.parameters={self.parameters} differ from the analytic count {expected}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "importance": self.importance, "depth_metric": self.depth_metric,
                "parameters": dict(self.parameters), "source": self.source.to_dict(),
                "target": self.target.to_dict(), "keep_layers": list(self.keep_layers),
                "keep_hidden": list(self.keep_hidden), "keep_neurons": self.keep_neurons,
                "keep_groups": self.keep_groups, "keep_heads": self.keep_heads}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunePlan":
        if data.get("format") != FORMAT:
            raise ConfigError(f"plan: format {data.get('format')!r} is not {FORMAT!r}; write the plan with "
                              "megatron_prune.prune.make_plan")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"plan: missing fields {missing}")
        values = {n: data[n] for n in names}
        values["source"] = ModelConfig.from_dict(data["source"], where="plan.source")
        values["target"] = ModelConfig.from_dict(data["target"], where="plan.target")
        return cls(**values).validate()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temp file + rename): a crash leaves no half-written plan."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_dumps(self.to_dict()) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"plan={path} does not exist; write it with the prune stage") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"plan={path} is not valid JSON ({err})") from None
        return cls.from_dict(data)


def _check_indices(name: str, idx: list[int], size: int, count: int) -> None:
    if len(idx) != count or any(not isinstance(i, int) for i in idx):
        raise ConfigError(f"{name} must hold {count} integer indices, it holds {len(idx)}")
    if any(b <= a for a, b in zip(idx, idx[1:])) or (idx and not 0 <= idx[0] <= idx[-1] < size):
        raise ConfigError(f"{name} must be strictly ascending indices in [0, {size})")


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with indent=2, except that a list of numbers stays on one line (one line per layer),
    so a plan for an 8B model is still readable."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in obj) + "\n" + "  " * indent + "]"
    return json.dumps(obj)


def make_plan(source: ModelConfig, scores: ImportanceScores, target: PruneTarget, *, tp: int = 1,
              pp: int = 1) -> PrunePlan:
    """Kept indices of every axis and the new architecture. All checks run before any ranking."""
    new = target_config(source, target, tp=tp, pp=pp)
    _check_scores(scores, source)
    L = source.num_layers
    depth_metric: Optional[str] = None
    if target.drop_layers is not None:
        dropped = set(target.drop_layers)
        depth_metric = "drop_layers" if dropped else None
    elif new.num_layers < L:
        depth_metric = target.depth_metric
        dropped = set(select_dropped_layers(scores, depth_metric, L - new.num_layers, L))
    else:
        dropped = set()
    keep_layers = [i for i in range(L) if i not in dropped]

    keep_groups, keep_heads = [], []
    for layer in keep_layers:  # per-layer axes follow the ORIGINAL layer's scores
        g, h = select_heads(scores.heads[layer], scores.query_groups[layer], new.num_query_groups,
                            new.num_attention_heads)
        keep_groups.append(g)
        keep_heads.append(h)
    return PrunePlan(
        source=source, target=new, keep_layers=keep_layers,
        keep_hidden=top_k(scores.hidden, new.hidden_size),
        keep_neurons=[top_k(scores.neurons[layer], new.ffn_hidden_size) for layer in keep_layers],
        keep_groups=keep_groups, keep_heads=keep_heads, importance=scores.source,
        depth_metric=depth_metric,
        parameters={"before": count_parameters(source), "after": count_parameters(new)}).validate()


__all__ = ["DEPTH_METRICS", "FORMAT", "IMPORTANCE_SOURCES", "ImportanceScores", "PLAN_FILE", "PrunePlan",
           "PruneRecipe", "PruneTarget", "check_artifact_matches", "make_plan", "random_scores",
           "recipe_from_dict", "scores_from_artifact", "select_dropped_layers", "select_heads",
           "target_config", "target_from_dict", "top_k"]
