"""Surgery on the shards equals pruning the full model: at TP1/PP1, TP2, PP2 and TP2xPP2 the pruned
model's weights, gathered (in the test only), equal the reference `prune_full_state` applied to the
full state dict, and the pruned model's logits equal those of a TP1 model loaded with that state.
Width (hidden, FFN, heads within query groups, whole query groups), depth (layers moving between
pipeline stages) and both together, for the llama (SwiGLU, GQA) and gpt2 (MHA, biases) families."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4)]
GPT2 = dict(family="gpt2", num_query_groups=4, add_bias_linear=True, add_qkv_bias=True, tie_embeddings=False)
CASES = {  # name: (model overrides, target)
    "llama-width": ({}, dict(hidden_size=48, ffn_hidden_size=96, num_attention_heads=2)),
    "llama-depth": ({}, dict(drop_layers=[0, 1])),  # old layers 2, 3 -> new 0 (moves to stage 0), 1
    "llama-both": ({}, dict(hidden_size=40, ffn_hidden_size=64, num_layers=2,
                            depth_metric="block_importance_layer")),
    "gpt2-groups": (GPT2, dict(num_attention_heads=2, num_query_groups=2, hidden_size=56, ffn_hidden_size=64)),
}


def _plan(name: str):
    from megatron_prune.prune.plan import make_plan, random_scores
    from megatron_prune.prune.targets import PruneTarget

    overrides, target = CASES[name]
    cfg = tiny_config(**overrides)
    return cfg, make_plan(cfg, random_scores(cfg, seed=4), PruneTarget(**target), tp=2, pp=2)


def _train_step(model, groups) -> tuple[float, bool]:
    """One forward-backward through megatron's schedule (1F1B with PP) and one Adam step: the pruned
    model is an ordinary megatron model. Returns (loss on the last stage or nan, weights changed)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    labels, position = tokens.roll(-1, 1), torch.arange(9).expand(2, 9)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()

    def step(data_iterator, module):
        next(data_iterator)
        out = module(tokens, position, None, labels=labels)  # [b, s] per-token loss on the last stage
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=[model],
                                         num_microbatches=1, seq_length=9, micro_batch_size=2,
                                         forward_only=False)
    optimizer.step()
    changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    loss = float(losses[0]["loss"]) if losses else float("nan")
    return loss, changed


def _prune_at(tp: int, pp: int) -> dict:
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import gather_full_state, load_full_state
    from megatron_prune.prune.surgery import CommStats, apply_plan
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    out = {}
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    for name in CASES:
        cfg, plan = _plan(name)
        model = build_model(cfg, groups)
        load_full_state(model, random_full_state(cfg, seed=2).__getitem__, groups)
        before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        kept = apply_plan(model, plan, groups, consume=False)
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
        comm = CommStats()
        pruned = apply_plan(model, plan, groups, comm)  # the default: consumes the source as it goes
        state = gather_full_state(pruned, groups)
        out[name] = {"state": state, "logits": full_logits(pruned, groups, tokens),
                     "source_unchanged": unchanged, "kept_state": gather_full_state(kept, groups),
                     "source_freed": all(p.numel() == 0 for p in model.parameters()),
                     "meta_left": [n for n, p in pruned.named_parameters() if p.is_meta],
                     "tp_bytes": comm.tp_bytes, "pp_bytes": comm.pp_bytes,
                     "layer_numbers": [int(x.layer_number) for x in pruned.decoder.layers],
                     "train": _train_step(pruned, groups)}
    return {"layout": groups.layout, "cases": out}


def _reference_logits(cfg, state, tokens):
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=1, pp=1))
    model = build_model(cfg, groups)
    load_full_state(model, state.__getitem__, groups)
    return full_logits(model, groups, tokens)


def _references(pools):
    from megatron_prune.prune.indices import prune_full_state

    refs = {}
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    for name in CASES:
        cfg, plan = _plan(name)
        state = prune_full_state(random_full_state(cfg, seed=2), plan)
        refs[name] = (plan, state, pools.run(1, _reference_logits, plan.target, state, tokens)[0])
    return refs


def test_surgery_equals_pruning_the_full_model_at_every_layout(pools):
    refs = _references(pools)
    for tp, pp, world in LAYOUTS:
        per_rank = pools.run(world, _prune_at, tp, pp)
        if tp > 1:  # some kept rows changed owner across the TP ranks and were exchanged
            assert any(got["cases"][n]["tp_bytes"] > 0 for got in per_rank for n in CASES), (tp, pp)
        for rank, got in enumerate(per_rank):
            for name, (plan, state, logits) in refs.items():
                case, where = got["cases"][name], f"{name} {got['layout']} rank {rank}"
                assert set(case["state"]) == set(state), where
                for key, ref in state.items():
                    assert torch.equal(case["state"][key], ref), (where, key)
                assert torch.allclose(case["logits"], logits, rtol=1e-5, atol=1e-5), where
                assert case["source_unchanged"], where  # consume=False copies, frees nothing
                assert all(torch.equal(case["kept_state"][k], v) for k, v in case["state"].items()), where
                assert case["source_freed"], where  # consume=True gave every source tensor back
                assert case["meta_left"] == [], where
                assert sum(t.numel() for t in case["state"].values()) == plan.parameters["after"], where
                loss, changed = case["train"]
                assert changed, where  # every rank's shard took an optimizer step
                if rank // tp % pp == pp - 1:
                    assert 0 < loss < 20, (where, loss)  # the last stage computed a real LM loss
                stage_layers = plan.target.num_layers // pp
                first = (rank // tp) % pp * stage_layers if world > 1 else 0
                assert case["layer_numbers"] == list(range(first + 1, first + stage_layers + 1)), where
                if tp == 1:
                    assert case["tp_bytes"] == 0, where  # nothing crosses a wire within one rank
                if pp > 1 and name == "llama-depth" and rank // tp % pp == 1:
                    assert case["pp_bytes"] > 0, where  # old layer 2 moved from stage 1 to stage 0
