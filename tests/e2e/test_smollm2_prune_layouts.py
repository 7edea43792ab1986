"""Surgery on the shards of the real SmolLM2-135M equals pruning its full state dict in one process:
at TP1/PP1, TP3, PP2 and TP3xPP2 (SmolLM2's 9 heads in 3 query groups rule out TP2; TP3 stands in for
it, as in test_smollm2_score.py) the pruned weights, gathered over TP, are bit-identical to
`prune_full_state` of the TP1 checkpoint, for width (hidden 576->384, FFN 1536->1023, 9->6 heads in 3
groups), depth (30->20 layers, a contiguous block picked by Block Importance, so a kept layer moves
from stage 0 to stage 1 at PP2) and both (width + named layers, so kept layers move from stage 1 to
stage 0), and the pruned model's logits on real text equal those of the pruned state loaded at TP1.

One plan per case, made for tp=3, pp=2, is valid at every layout. Scores are seeded random: this is
about layout invariance, not about which units survive. Each layout loads the checkpoint once and
prunes all three cases from a copy of its own shards (surgery may free the source model's tensors).
The workers gather each stage's tensors over TP and compare them where they are, reporting only
mismatches, names, counts and logits: no pruned weight crosses PP or the pipe to pytest.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megatron_prune.config import ParallelConfig

pytestmark = pytest.mark.e2e

LAYOUTS = [(1, 1), (3, 1), (1, 2), (3, 2)]
SEED = 5  # random Block Importance whose weakest 10-block is layers 11..20 (old layer 10 changes stage)
WIDTH = dict(hidden_size=384, ffn_hidden_size=1023, num_attention_heads=6)  # 2 heads in each of 3 groups
CASES = {  # name: PruneTarget fields
    "width": WIDTH,
    "depth": dict(num_layers=20, depth_metric="block_importance_block"),
    # 7 of stage 0's 15 layers dropped: new layers 8, 9 are old 15, 17 (stage 1 -> stage 0 at PP2)
    "both": dict(WIDTH, drop_layers=[1, 3, 5, 7, 9, 11, 13, 16, 22, 28]),
}
SEQ = 16  # tokens of real text for the logits check


def _plans(ckpt: str) -> dict:
    from megatron_prune.checkpoint import read_model_config
    from megatron_prune.prune.plan import make_plan, random_scores
    from megatron_prune.prune.targets import PruneTarget

    cfg = read_model_config(ckpt)
    return {name: make_plan(cfg, random_scores(cfg, seed=SEED), PruneTarget(**target), tp=3, pp=2)
            for name, target in CASES.items()}


def _stage(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


def _oracle(ckpt: str, plans: dict, tokens: torch.Tensor, out: str) -> dict:
    """One process at TP1: the checkpoint's full state, pruned by `prune_full_state` per case (saved to
    `out` for the workers to map), and the logits of a TP1 model loaded with each pruned state."""
    from megatron_prune.checkpoint import load_checkpoint, read_model_config
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import gather_full_state, load_full_state
    from megatron_prune.prune.indices import prune_full_state
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=1, pp=1))
    model = build_model(read_model_config(ckpt), groups)
    load_checkpoint(model, ckpt)
    full = gather_full_state(model, groups)
    del model
    states, logits = {}, {}
    for name, plan in plans.items():
        states[name] = prune_full_state(full, plan)
        pruned = build_model(plan.target, groups)
        load_full_state(pruned, states[name].__getitem__, groups)
        logits[name] = full_logits(pruned, groups, tokens)  # [1, s, V]
    torch.save(states, out)
    return logits


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Every way `got` differs from `ref`, one line per tensor (empty: bit-identical)."""
    lines = [f"missing {k}" for k in sorted(set(ref) - set(got))]
    lines += [f"unexpected {k}" for k in sorted(set(got) - set(ref))]
    for key in sorted(set(ref) & set(got)):
        a, b = got[key], ref[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{key}: {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b):
            bad = a != b
            lines.append(f"{key}: {int(bad.sum())} of {a.numel()} elements differ (first at "
                         f"{tuple(bad.nonzero()[0].tolist())}), max |diff| {float((a - b).abs().max()):.3e}")
    return lines


def _all_gather(obj, groups) -> list:
    """`obj` of every pipeline stage, in stage order."""
    if groups.pp_size == 1:
        return [obj]
    out = [None] * groups.pp_size
    dist.all_gather_object(out, obj, group=groups.pp)
    return out


def _prune_at(tp: int, pp: int, ckpt: str, plans: dict, tokens: torch.Tensor, oracle_file: str) -> dict:
    from megatron_prune.checkpoint import load_checkpoint, read_model_config
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import gather_full_state
    from megatron_prune.prune.surgery import CommStats, apply_plan
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    cfg = read_model_config(ckpt)
    model = build_model(cfg, groups)
    load_checkpoint(model, ckpt)
    # this rank's source shards, kept apart: surgery may free the tensors of the model it prunes
    source = {name: p.detach().clone() for name, p in model.named_parameters()}
    oracle = torch.load(oracle_file, mmap=True)  # shared pages, not a copy per rank
    stage_groups = dataclasses.replace(groups, pp_size=1)  # gather_full_state within this stage
    out = {}
    for n, (name, plan) in enumerate(plans.items()):
        if n:  # a fresh source model from the kept shards; never the one pruned before
            model = build_model(cfg, groups)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    p.copy_(source[pname])
        comm = CommStats()
        pruned = apply_plan(model, plan, groups, comm=comm)
        del model
        # gathered over TP only: each stage checks the tensors it holds (the last stage's copy of the
        # tied embedding included); only names and sizes cross PP (a whole-model all_gather_object of
        # ~100M parameters costs a minute at TP3xPP2 on 2 cores)
        state = gather_full_state(pruned, stage_groups)
        sizes: dict[str, int] = {}
        for stage in _all_gather(sorted((k, v.numel()) for k, v in state.items()), groups):
            sizes.update(stage)
        ref = oracle[name]
        out[name] = {"mismatches": _compare(state, {k: ref[k] for k in state if k in ref}),
                     "keys": {"missing": sorted(set(ref) - set(sizes)),
                              "unexpected": sorted(set(sizes) - set(ref))},
                     "parameters": sum(sizes.values()),
                     "layer_numbers": [int(x.layer_number) for x in pruned.decoder.layers],
                     "logits": full_logits(pruned, groups, tokens),
                     "tp_bytes": comm.tp_bytes, "pp_bytes": comm.pp_bytes}
        del state, pruned
    return {"layout": groups.layout, "pp_rank": groups.pp_rank, "cases": out}


def test_smollm2_surgery_equals_pruning_the_full_model_at_every_layout(pools, smollm2_checkpoint,
                                                                        shakespeare_tokens, tmp_path):
    plans = _plans(smollm2_checkpoint)
    for name, plan in plans.items():  # the cases exercise what they claim to
        moved = {_stage(old, plan.source.num_layers, 2) - _stage(new, plan.target.num_layers, 2)
                 for new, old in enumerate(plan.keep_layers)} - {0}
        assert moved == {"width": set(), "depth": {-1}, "both": {1}}[name], \
            f"case {name}: at PP2 the kept layers {plan.keep_layers} change stage by {moved}"
        assert plan.target.num_query_groups == 3, f"case {name}: {plan.target}"
    tokens = shakespeare_tokens[:, :SEQ]
    oracle_file = str(tmp_path / "oracle.pt")
    ref_logits = pools.run(1, _oracle, smollm2_checkpoint, plans, tokens, oracle_file)[0]

    for tp, pp in LAYOUTS:
        per_rank = pools.run(tp * pp, _prune_at, tp, pp, smollm2_checkpoint, plans, tokens, oracle_file)
        for name in plans:
            if tp > 1 and name != "depth":  # kept rows changed owner across the TP ranks
                assert any(r["cases"][name]["tp_bytes"] > 0 for r in per_rank), \
                    f"case {name} at {per_rank[0]['layout']}: no TP rank sent a row"
        for rank, got in enumerate(per_rank):
            for name, plan in plans.items():
                case, where = got["cases"][name], f"case {name} at {got['layout']} rank {rank}"
                assert not case["mismatches"], f"{where}: pruned weights differ from prune_full_state:\n" + \
                    "\n".join(case["mismatches"][:20])
                assert not any(case["keys"].values()), f"{where}: pruned tensor names differ: {case['keys']}"
                assert case["parameters"] == plan.parameters["after"], \
                    f"{where}: {case['parameters']} parameters, the plan says {plan.parameters['after']}"
                per_stage = plan.target.num_layers // pp
                first = got["pp_rank"] * per_stage
                assert case["layer_numbers"] == list(range(first + 1, first + per_stage + 1)), \
                    f"{where}: layer_number {case['layer_numbers']}"
                ref = ref_logits[name]
                rel = float((case["logits"] - ref).abs().max() / ref.abs().max())
                assert rel <= 1e-4, f"{where}: logits differ from the TP1 pruned model's by {rel:.1e} relative"
                if tp == 1:
                    assert case["tp_bytes"] == 0, f"{where}: sent {case['tp_bytes']} bytes over TP"
                sender = {"depth": 0, "both": 1}.get(name)  # the stage whose kept layers move away
                if pp > 1 and got["pp_rank"] == sender:
                    assert case["pp_bytes"] > 0, f"{where}: the stage whose layer moves sent nothing over PP"
                else:  # no kept layer leaves this stage
                    assert case["pp_bytes"] == 0, f"{where}: sent {case['pp_bytes']} bytes over PP"
