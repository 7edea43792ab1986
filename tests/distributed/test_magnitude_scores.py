"""Weight-magnitude scores computed on the shards equal the norms taken on the full canonical state dict
at TP1/PP1, TP2, PP2, TP2xPP2 and DP2, on every rank, for llama (SwiGLU, GQA, tied) and gpt2 (MHA,
biases, position embeddings, untied); only score vectors cross the wire (bytes fixed by the shapes, 0
without TP/PP); and the plan built from them keeps the units whose weights were scaled up."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2)]  # (tp, pp, world); DP = world/(tp*pp)
FAMILIES = {"llama": {}, "gpt2": dict(family="gpt2", num_query_groups=4, add_bias_linear=True,
                                      add_qkv_bias=True, tie_embeddings=False)}
TARGET = dict(hidden_size=48, ffn_hidden_size=96, num_attention_heads=2)
SCALED = dict(layer=1, scale=100.0)  # the layer whose weakest neuron / head gets its weights scaled


def _reference(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The definitions, written out on the full tensors."""
    L, H, G, hn = cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    F, Hd = cfg.ffn_hidden_size, cfg.hidden_size
    s = {k: v.to(torch.float64) for k, v in state.items()}
    heads, neurons = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, F, dtype=torch.float64)
    hidden = s["embedding.word_embeddings.weight"].square().sum(0)  # [Hd]
    if "embedding.position_embeddings.weight" in s:
        hidden += s["embedding.position_embeddings.weight"].square().sum(0)
    if not cfg.tie_embeddings:
        hidden += s["output_layer.weight"].square().sum(0)
    for layer in range(L):
        p = f"decoder.layers.{layer}."
        qkv, proj = s[p + "self_attention.linear_qkv.weight"], s[p + "self_attention.linear_proj.weight"]
        fc1, fc2 = s[p + "mlp.linear_fc1.weight"], s[p + "mlp.linear_fc2.weight"]
        q = qkv.reshape(G, H // G + 2, hn, Hd)[:, :H // G].reshape(H, hn, Hd)
        heads[layer] = q.square().sum((1, 2)) + proj.reshape(Hd, H, hn).square().sum((0, 2))
        if cfg.gated_linear_unit:  # [gate; up]
            fc1_sq = fc1[:F].square().sum(1) + fc1[F:].square().sum(1)
        else:
            fc1_sq = fc1.square().sum(1)
        neurons[layer] = fc1_sq + fc2.square().sum(0)
        hidden += qkv.square().sum(0) + fc1.square().sum(0) + proj.square().sum(1) + fc2.square().sum(1)
    heads = heads.sqrt()
    return {"heads": heads, "query_groups": heads.reshape(L, G, H // G).sum(-1), "neurons": neurons.sqrt(),
            "hidden": hidden.sqrt()}


def _weakest(cfg) -> dict[str, int]:
    """The lowest-scoring neuron and head of SCALED['layer'] and hidden channel at seed 0."""
    ref = _reference(cfg, random_full_state(cfg, seed=0))
    layer = SCALED["layer"]
    return {"neuron": int(ref["neurons"][layer].argmin()), "head": int(ref["heads"][layer].argmin()),
            "channel": int(ref["hidden"].argmin())}


def _scaled_state(cfg, weakest: dict[str, int]) -> dict[str, torch.Tensor]:
    """Seed-0 state with the weakest neuron's fc2 column, the weakest head's linear_proj columns and
    the weakest channel's word-embedding column multiplied by SCALED['scale']."""
    state = random_full_state(cfg, seed=0)
    p, k, hn = f"decoder.layers.{SCALED['layer']}.", SCALED["scale"], cfg.kv_channels
    state[p + "mlp.linear_fc2.weight"][:, weakest["neuron"]] *= k
    h = weakest["head"]
    state[p + "self_attention.linear_proj.weight"][:, h * hn:(h + 1) * hn] *= k
    state["embedding.word_embeddings.weight"][:, weakest["channel"]] *= k
    return state


def _scores_at(tp: int, pp: int, weakest: dict[str, dict[str, int]]) -> dict:
    from megatron_prune.importance.magnitude import magnitude_scores
    from megatron_prune.importance.reduce import CommCounter
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    out = {"layout": groups.layout}
    for family, overrides in FAMILIES.items():
        cfg = tiny_config(**overrides)
        model = build_model(cfg, groups)
        runs = {}
        for name, state in (("seed0", random_full_state(cfg, seed=0)), ("seed1", random_full_state(cfg, seed=1)),
                            ("scaled", _scaled_state(cfg, weakest[family]))):
            load_full_state(model, state.__getitem__, groups)
            comm = CommCounter()
            runs[name] = (magnitude_scores(model, groups, comm), comm)
        out[family] = runs
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.dtype == torch.float64 and a.shape == b.shape
    return float((a - b).abs().max()) / float(b.abs().max())


@pytest.fixture(scope="module")
def runs(pools):
    weakest = {family: _weakest(tiny_config(**o)) for family, o in FAMILIES.items()}
    return weakest, {layout: pools.run(layout[2], _scores_at, layout[0], layout[1], weakest) for layout in LAYOUTS}


def test_scores_on_the_shards_equal_the_full_weight_norms_at_every_layout(runs):
    _, results = runs
    for family, overrides in FAMILIES.items():
        cfg = tiny_config(**overrides)
        refs = {"seed0": _reference(cfg, random_full_state(cfg, seed=0)),
                "seed1": _reference(cfg, random_full_state(cfg, seed=1))}
        for layout, per_rank in results.items():
            for rank, got in enumerate(per_rank):
                for seed, ref in refs.items():
                    scores = got[family][seed][0]
                    where = (family, layout, got["layout"], rank, seed)
                    assert scores.source == "magnitude" and scores.depth == {}, where
                    for field, tensor in ref.items():
                        assert _rel(getattr(scores, field), tensor) <= 1e-10, (where, field)


def test_only_score_vectors_cross_the_wire(runs):
    _, results = runs
    for (tp, pp, world), per_rank in results.items():
        for family, overrides in FAMILIES.items():
            cfg = tiny_config(**overrides)
            L, H, F, Hd = cfg.num_layers, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.hidden_size
            # TP: the stage's [L/pp, (H+F)/tp] unit sums gathered + [Hd] hidden sums reduced; PP: [L*(H+F)+Hd]
            expected = {}
            if tp > 1:
                expected["tp"] = 8 * ((L // pp) * (H + F) // tp + Hd)
            if pp > 1:
                expected["pp"] = 8 * (L * (H + F) + Hd)
            for rank, got in enumerate(per_rank):
                seed0, seed1 = got[family]["seed0"][1], got[family]["seed1"][1]
                assert seed0.by_group == seed1.by_group == expected, (family, tp, pp, world, rank)
                assert seed0.bytes_sent == sum(expected.values())
                if tp == pp == 1:
                    assert seed0.bytes_sent == 0 and seed0.collectives == 0


def test_plan_keeps_the_units_with_the_largest_weights(runs):
    from megatron_prune.prune.plan import make_plan
    from megatron_prune.prune.targets import PruneTarget

    weakest, results = runs
    for family, overrides in FAMILIES.items():
        cfg = tiny_config(**overrides)
        w = weakest[family]
        before = results[(1, 1, 1)][0][family]["seed0"][0]
        plan = make_plan(cfg, before, PruneTarget(**TARGET))
        layer = SCALED["layer"]
        # unscaled, the weakest units go, and the plan keeps the top-k norms
        assert w["neuron"] not in plan.keep_neurons[layer] and w["channel"] not in plan.keep_hidden
        assert w["head"] not in plan.keep_heads[layer]
        assert min(before.neurons[layer][plan.keep_neurons[layer]]) >= max(
            before.neurons[layer][[i for i in range(cfg.ffn_hidden_size) if i not in plan.keep_neurons[layer]]])
        for layout, per_rank in results.items():
            for rank, got in enumerate(per_rank):
                plan = make_plan(cfg, got[family]["scaled"][0], PruneTarget(**TARGET))
                where = (family, layout, rank)
                assert plan.importance == "magnitude", where
                assert w["neuron"] in plan.keep_neurons[layer], where
                assert w["head"] in plan.keep_heads[layer], where
                assert w["channel"] in plan.keep_hidden, where
