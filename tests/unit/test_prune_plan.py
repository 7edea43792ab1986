"""The prune plan: top-k per axis in global index space (ties to the lower index, survivors ascending),
GQA heads chosen inside their group or whole groups removed, each depth metric's choice of layers,
every refusal before any work (naming the field), the plan.json round trip, seeded random scores,
artifact checks, and every recipe in conf/prune/ giving the paper's shapes on its model."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.models.params import count_parameters
from megatron_prune.prune import (ImportanceScores, PrunePlan, PruneTarget, check_artifact_matches,
                                  make_plan, random_scores, recipe_from_dict, scores_from_artifact,
                                  target_from_dict)

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(**overrides) -> ModelConfig:
    base = dict(name="tiny", family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=256,
                max_position_embeddings=256, tie_embeddings=True)
    return ModelConfig(**{**base, **overrides}).validate()


def _scores(cfg: ModelConfig, **overrides) -> ImportanceScores:
    """Neutral scores (all ties) with the config's shapes; tests overwrite what they pin."""
    L, H, G = cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups
    z = dict(heads=torch.zeros(L, H, dtype=torch.float64), query_groups=torch.zeros(L, G, dtype=torch.float64),
             neurons=torch.zeros(L, cfg.ffn_hidden_size, dtype=torch.float64),
             hidden=torch.zeros(cfg.hidden_size, dtype=torch.float64), depth={})
    return ImportanceScores(**{**z, **overrides})


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- width --------------------------------------------------------------------------------------

def test_top_k_keeps_the_highest_scores_and_lists_them_ascending():
    cfg = _cfg(hidden_size=8)
    scores = _scores(cfg, hidden=_t(0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.6))
    plan = make_plan(cfg, scores, PruneTarget(hidden_size=4))
    assert plan.keep_hidden == [1, 3, 5, 7]  # the four largest, in original order (not score order)


def test_ties_go_to_the_lower_index_every_time():
    # 4096 neurons: long enough that torch's default (unstable) sort scrambles equal keys
    cfg = _cfg(hidden_size=8, ffn_hidden_size=4096)
    scores = _scores(cfg, hidden=_t(1, 2, 2, 1, 2, 1, 2, 1))  # four 2s for three places
    plans = [make_plan(cfg, scores, PruneTarget(hidden_size=3, ffn_hidden_size=100)) for _ in range(2)]
    assert all(p.keep_hidden == [1, 2, 4] for p in plans)
    assert plans[0].keep_neurons == [list(range(100))] * 4  # all-equal neuron scores: the first 100


def test_gqa_keeps_the_best_heads_inside_each_group_not_the_best_heads_overall():
    cfg = _cfg(num_attention_heads=6, num_query_groups=2)  # groups {0,1,2}, {3,4,5}
    heads = torch.zeros(4, 6, dtype=torch.float64)
    heads[0] = _t(0.6, 0.9, 0.8, 0.1, 0.2, 0.3)  # global top-4 would be {0,1,2,5}: 3 from group 0
    plan = make_plan(cfg, _scores(cfg, heads=heads), PruneTarget(num_attention_heads=4))
    assert plan.target.num_attention_heads == 4 and plan.target.num_query_groups == 2
    assert plan.keep_groups[0] == [0, 1]
    assert plan.keep_heads[0] == [1, 2, 4, 5]  # two per group: {1, 2} and {5, 4}
    assert plan.keep_heads[1] == [0, 1, 3, 4]  # all-tied layer: the first two of each group


def test_fewer_query_groups_removes_whole_groups_by_group_score():
    cfg = _cfg(num_attention_heads=6, num_query_groups=3, num_layers=2)  # groups {0,1} {2,3} {4,5}
    heads = _t(0.1, 0.1, 0.9, 0.9, 0.2, 0.2).repeat(2, 1)  # group 1 has the best single heads...
    groups = _t(5.0, 1.0, 3.0).repeat(2, 1)  # ...but the lowest group score: it goes
    plan = make_plan(cfg, _scores(cfg, heads=heads, query_groups=groups), PruneTarget(num_query_groups=2))
    assert (plan.target.num_attention_heads, plan.target.num_query_groups) == (4, 2)  # heads per group kept
    assert plan.keep_groups == [[0, 2], [0, 2]]
    assert plan.keep_heads == [[0, 1, 4, 5], [0, 1, 4, 5]]

    both = make_plan(cfg, _scores(cfg, heads=_t(0.1, 0.3, 0.9, 0.9, 0.8, 0.2).repeat(2, 1),
                                  query_groups=groups), PruneTarget(num_attention_heads=2, num_query_groups=2))
    assert both.keep_groups[0] == [0, 2] and both.keep_heads[0] == [1, 4]  # groups first, then heads


def test_mha_ranks_heads_directly_and_moves_groups_with_them():
    cfg = _cfg(family="gpt2", num_attention_heads=4, num_query_groups=4, tie_embeddings=True)
    heads = _t(0.5, 0.1, 0.9, 0.2).repeat(4, 1)
    groups = _t(9.0, 9.0, 0.0, 0.0).repeat(4, 1)  # ignored: for MHA the head scores decide
    plan = make_plan(cfg, _scores(cfg, heads=heads, query_groups=groups), PruneTarget(num_attention_heads=2))
    assert (plan.target.num_attention_heads, plan.target.num_query_groups) == (2, 2)
    assert plan.keep_heads == plan.keep_groups == [[0, 2]] * 4


def test_per_layer_axes_follow_the_original_layer_after_layers_are_dropped():
    cfg = _cfg(ffn_hidden_size=8)
    neurons = torch.zeros(4, 8, dtype=torch.float64)
    for layer in range(4):
        neurons[layer, 2 * layer] = 1.0  # layer l's best neuron is 2l
    plan = make_plan(cfg, _scores(cfg, neurons=neurons), PruneTarget(ffn_hidden_size=1, drop_layers=[1]))
    assert plan.keep_layers == [0, 2, 3]
    assert plan.keep_neurons == [[0], [4], [6]]
    assert plan.depth_metric == "drop_layers"


def test_the_new_architecture_keeps_head_dim_vocab_and_everything_else():
    cfg = _cfg()
    plan = make_plan(cfg, _scores(cfg), PruneTarget(hidden_size=32, num_attention_heads=2))
    assert plan.target == dataclasses.replace(cfg, name="tiny-pruned", hidden_size=32, num_attention_heads=2)
    assert plan.target.kv_channels == 16 and plan.depth_metric is None and plan.keep_layers == [0, 1, 2, 3]


# ---- depth --------------------------------------------------------------------------------------

DEPTH_CASES = {
    # metric: (depth scores on 6 layers, block_size, expected dropped layers)
    "lm_loss_layer": ({"lm_loss_increase_layer": _t(5, 1, 4, 0.5, 3, 2)}, 1, [1, 3]),
    "block_importance_layer": ({"block_importance": _t(0.9, 0.2, 0.8, 0.1, 0.7, 0.6)}, 1, [1, 3]),
    # per-layer BI would drop {3, 5}, the pair with the smallest max [1, 2]; the smallest SUM is [2, 3]
    "block_importance_block": ({"block_importance": _t(0.9, 0.25, 0.25, 0.1, 0.8, 0.05)}, 1, [2, 3]),
    "lm_loss_block": ({"lm_loss_increase_block": _t(3, 0.2, 0.5, 1, 4)}, 2, [1, 2]),  # smallest increase
    "mc_acc_block": ({"mc_acc_block": _t(0.3, 0.5, 0.4, 0.6, 0.2)}, 2, [3, 4]),  # HIGHEST accuracy without it
}


@pytest.mark.parametrize("metric", list(DEPTH_CASES))
def test_each_depth_metric_drops_the_expected_layers(metric):
    depth, k, dropped = DEPTH_CASES[metric]
    cfg = _cfg(num_layers=6)
    plan = make_plan(cfg, _scores(cfg, depth=depth, block_size=k), PruneTarget(num_layers=4, depth_metric=metric))
    assert plan.keep_layers == [i for i in range(6) if i not in dropped]
    assert plan.depth_metric == metric and plan.target.num_layers == 4


def test_a_block_metric_scored_for_another_block_size_says_to_rerun_score():
    cfg = _cfg(num_layers=6)
    scores = _scores(cfg, depth={"lm_loss_increase_block": torch.zeros(5, dtype=torch.float64)}, block_size=2)
    with pytest.raises(ConfigError, match=r"depth\.block_size=3"):
        make_plan(cfg, scores, PruneTarget(num_layers=3, depth_metric="lm_loss_block"))


@pytest.mark.parametrize("metric, option", [("mc_acc_block", "depth.accuracy"), ("lm_loss_layer", "depth.loss")])
def test_a_missing_depth_metric_names_it_and_the_score_option(metric, option):
    cfg = _cfg(num_layers=6)
    with pytest.raises(ConfigError, match=rf"depth_metric={metric}.*{option}"):
        make_plan(cfg, _scores(cfg), PruneTarget(num_layers=5, depth_metric=metric))


# ---- refusals -----------------------------------------------------------------------------------

REFUSALS = [  # (source overrides, target, tp, pp, the message names)
    ({}, dict(hidden_size=128), 1, 1, r"prune\.target\.hidden_size=128 is larger"),
    ({}, dict(ffn_hidden_size=0), 1, 1, r"prune\.target\.ffn_hidden_size=0 would keep nothing"),
    ({}, dict(num_layers=-1), 1, 1, r"prune\.target\.num_layers=-1 would keep nothing"),
    ({}, dict(num_attention_heads=3), 1, 1, r"prune\.target\.num_attention_heads=3 is not divisible"),
    ({}, dict(num_attention_heads=4, num_query_groups=1), 1, 1, r"prune\.target\.num_attention_heads=4 .*cannot gain"),
    (dict(family="gpt2", num_query_groups=4), dict(num_attention_heads=2, num_query_groups=1), 1, 1,
     r"prune\.target\.num_attention_heads=2 != prune\.target\.num_query_groups=1"),
    ({}, dict(ffn_hidden_size=127), 2, 1, r"parallel\.tp=2 does not divide prune\.target\.ffn_hidden_size=127"),
    ({}, dict(num_query_groups=1), 2, 1, r"parallel\.tp=2 does not divide prune\.target\.num_query_groups=1"),
    (dict(vocab_size=257), {}, 2, 1, r"model\.vocab_size=257"),
    ({}, dict(num_layers=3), 1, 2, r"parallel\.pp=2 does not divide prune\.target\.num_layers=3"),
    ({}, dict(num_layers=3, drop_layers=[0]), 1, 1, r"prune\.target\.num_layers and prune\.target\.drop_layers"),
    ({}, dict(drop_layers=[4]), 1, 1, r"prune\.target\.drop_layers contains 4"),
    ({}, dict(drop_layers=[1, 1]), 1, 1, r"prune\.target\.drop_layers lists layers \[1\] more than once"),
    ({}, dict(drop_layers=[0, 1, 2, 3]), 1, 1, r"prune\.target\.drop_layers drops all 4 layers"),
    ({}, dict(num_layers=2, depth_metric="perplexity"), 1, 1, r"prune\.target\.depth_metric='perplexity'"),
]


@pytest.mark.parametrize("source, target, tp, pp, match", REFUSALS, ids=[r[-1][:40] for r in REFUSALS])
def test_bad_targets_are_refused_naming_the_field(source, target, tp, pp, match):
    cfg = _cfg(**source)
    with pytest.raises(ConfigError, match=match):
        make_plan(cfg, _scores(cfg), PruneTarget(**target), tp=tp, pp=pp)


def test_scores_of_another_shape_are_refused_as_another_model():
    cfg = _cfg()
    for bad in (dict(neurons=torch.zeros(4, 96, dtype=torch.float64)),
                dict(depth={"block_importance": torch.zeros(5, dtype=torch.float64)})):
        with pytest.raises(ConfigError, match="importance artifact is for another model"):
            make_plan(cfg, _scores(cfg, **bad), PruneTarget(hidden_size=32))
    nan = _scores(cfg, hidden=torch.full((64,), float("nan"), dtype=torch.float64))
    with pytest.raises(ConfigError, match="hidden holds NaN"):
        make_plan(cfg, nan, PruneTarget(hidden_size=32))


def test_recipe_values_of_the_wrong_kind_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"prune\.target\.hidden_size='big'"):
        target_from_dict({"hidden_size": "big"})
    with pytest.raises(ConfigError, match=r"prune\.target: unknown fields \['hiden_size'\]"):
        target_from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match=r"prune\.importance='taylor'"):
        recipe_from_dict({"importance": "taylor"})


# ---- the plan as data ---------------------------------------------------------------------------

def test_plan_json_round_trip_is_exact_and_one_line_per_layer(tmp_path):
    cfg = _cfg(num_layers=6)
    plan = make_plan(cfg, random_scores(cfg, seed=3), PruneTarget(hidden_size=48, ffn_hidden_size=96,
                                                                  num_attention_heads=2, num_layers=4,
                                                                  depth_metric="lm_loss_layer"))
    assert PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    path = plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(path) == plan
    text = path.read_text()
    assert json.loads(text) == plan.to_dict()
    assert f"    {json.dumps(plan.keep_neurons[0])}," in text.splitlines()  # a whole layer on one line
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def test_a_hand_edited_inconsistent_plan_is_refused_on_load():
    cfg = _cfg()
    data = make_plan(cfg, _scores(cfg), PruneTarget(num_attention_heads=2)).to_dict()
    data["keep_heads"][0] = [0, 1]  # both heads from group 0, none from group 1
    with pytest.raises(ConfigError, match=r"plan\.keep_heads\[0\]"):
        PrunePlan.from_dict(data)


def test_random_scores_are_seeded():
    cfg = _cfg(num_layers=6)
    target = PruneTarget(hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, num_layers=4,
                         depth_metric="block_importance_layer")
    a, b, c = (make_plan(cfg, random_scores(cfg, seed=s), target) for s in (7, 7, 8))
    assert a == b and a.importance == "random"
    assert a.keep_hidden != c.keep_hidden and a.keep_neurons != c.keep_neurons


def test_parameter_count_after_is_the_targets_analytic_count_and_a_hand_count():
    cfg = _cfg(num_layers=3, hidden_size=16, ffn_hidden_size=24, num_attention_heads=4, num_query_groups=2,
               kv_channels=4, vocab_size=32)
    plan = make_plan(cfg, random_scores(cfg, seed=0),
                     PruneTarget(hidden_size=8, ffn_hidden_size=12, num_attention_heads=2, drop_layers=[1]))
    # New model: 2 layers, hidden 8, FFN 12, 2 heads in 2 groups of head_dim 4, vocab 32, tied, RMSNorm.
    layer = (2 * 8  # two RMSNorms
             + (2 + 2 * 2) * 4 * 8  # linear_qkv: (q heads + k + v groups) * head_dim rows, 8 columns
             + 8 * 2 * 4  # linear_proj
             + 2 * 12 * 8  # linear_fc1: [gate; up]
             + 8 * 12)  # linear_fc2
    hand = 32 * 8 + 2 * layer + 8  # tied embedding, layers, final norm
    assert plan.parameters == {"before": count_parameters(cfg), "after": count_parameters(plan.target)}
    assert plan.parameters["after"] == hand == 1384


# ---- the importance artifact --------------------------------------------------------------------

def _artifact(tmp_path, cfg: ModelConfig, sha256: str):
    from megatron_prune.importance.artifact import (ImportanceArtifact, mark_complete, read_artifact,
                                                    write_artifact_files)

    s = random_scores(cfg, seed=1, block_size=2)
    tensors = {"width/heads": s.heads, "width/query_groups": s.query_groups, "width/neurons": s.neurons,
               "width/hidden": s.hidden, **{f"depth/{k}": v for k, v in s.depth.items()}}
    meta = {"model": {"config": cfg.to_dict(), "sha256": sha256}, "depth": {"block_size": 2}}
    write_artifact_files(tmp_path, ImportanceArtifact(tensors, meta))
    mark_complete(tmp_path)
    return read_artifact(tmp_path), s


def test_scores_from_a_real_artifact_make_the_same_plan_as_the_scores_written(tmp_path):
    cfg = _cfg()
    artifact, written = _artifact(tmp_path, cfg, "aa11")
    check_artifact_matches(artifact, cfg, "aa11")
    scores = scores_from_artifact(artifact)
    assert scores.block_size == 2 and scores.source == "activation"
    target = PruneTarget(hidden_size=32, num_layers=2, depth_metric="mc_acc_block")
    assert make_plan(cfg, scores, target).keep_layers == make_plan(cfg, written, target).keep_layers


def test_an_artifact_of_another_model_or_checkpoint_is_refused(tmp_path):
    cfg = _cfg()
    artifact, _ = _artifact(tmp_path, cfg, "aa11")
    with pytest.raises(ConfigError, match=r"another model: ffn_hidden_size=128 \(artifact\) vs 256"):
        check_artifact_matches(artifact, _cfg(ffn_hidden_size=256), None)
    with pytest.raises(ConfigError, match=r"another checkpoint.*'aa11'.*'bb22'"):
        check_artifact_matches(artifact, cfg, "bb22")


# ---- recipes ------------------------------------------------------------------------------------

# recipe: (model preset, expected (num_layers, hidden, ffn, heads, groups), parameters in billions
# rounded as the released models state them)
RECIPES = {
    "llama3.1-minitron-4b-width": ("llama3.1-8b", (32, 3072, 9216, 32, 8), 4.5),
    "llama3.1-minitron-4b-depth": ("llama3.1-8b", (16, 4096, 14336, 32, 8), 4.5),
    "mn-minitron-8b": ("mistral-nemo-12b", (40, 4096, 11520, 32, 8), 8.4),
    "smollm2-135m-width": ("smollm2-135m", (30, 384, 1024, 9, 3), None),
    "smollm2-135m-depth": ("smollm2-135m", (20, 576, 1536, 9, 3), None),
    "smollm2-135m": ("smollm2-135m", (30, 384, 1024, 9, 3), None),
}


def _yaml(path: Path) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    data.pop("defaults", None)  # model presets extend the schema in Hydra; not a model field
    return data


def test_every_recipe_file_is_checked_here():
    assert {p.stem for p in (CONF / "prune").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_applies_to_its_model_with_the_papers_shapes(name):
    model, shape, billions = RECIPES[name]
    path = CONF / "prune" / f"{name}.yaml"
    assert path.read_text().startswith("# "), "first line: where the recipe comes from"
    recipe = recipe_from_dict(_yaml(path))
    cfg = ModelConfig.from_dict(_yaml(CONF / "model" / f"{model}.yaml"))
    drop = cfg.num_layers - (recipe.target.num_layers or cfg.num_layers)
    plan = make_plan(cfg, random_scores(cfg, recipe.seed, block_size=drop or None), recipe.target)
    t = plan.target
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads, t.num_query_groups) == shape
    assert t.kv_channels == cfg.kv_channels and t.vocab_size == cfg.vocab_size
    assert plan.parameters["after"] == count_parameters(t) < count_parameters(cfg)
    if billions is not None:
        assert round(plan.parameters["after"] / 1e9, 1) == billions
