"""The same weights give the same logits at every TP/PP layout, and checkpoints reload across
layouts. The reference is a single-process TP1/PP1 forward of the same full weights."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4)]  # (tp, pp, world)


def _logits_at(tp: int, pp: int, cfg_kwargs: dict, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    cfg = tiny_config(**cfg_kwargs)
    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    model = build_model(cfg, groups)
    load_full_state(model, random_full_state(cfg, seed=1).__getitem__, groups)
    return full_logits(model, groups, tokens)


def _reference(cfg_kwargs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """An independent forward: HF transformers on the same weights (converted back to HF names)."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.convert.hf_config import model_config_to_hf_config
    from megatron_prune.convert.hf_weights import megatron_to_hf
    from transformers import AutoConfig

    cfg = tiny_config(**cfg_kwargs)
    hf_cfg = model_config_to_hf_config(cfg)
    config = AutoConfig.for_model(**hf_cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(megatron_to_hf(random_full_state(cfg, seed=1), cfg),
                                                strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    model.tie_weights()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_megatron_logits_match_transformers_at_every_layout(pools, family, tie):
    kwargs = {"tie_embeddings": tie}
    if family == "gpt2":
        kwargs.update(family="gpt2", num_query_groups=4, ffn_hidden_size=256, add_bias_linear=True,
                      add_qkv_bias=True)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = _reference(kwargs, tokens)
    for tp, pp, world in LAYOUTS:
        per_rank = pools.run(world, _logits_at, tp, pp, kwargs, tokens)
        for rank, logits in enumerate(per_rank):
            rel = ((logits - ref).abs().max() / ref.abs().max()).item()
            assert rel <= 1e-5, f"tp{tp} pp{pp} rank {rank}: max rel diff {rel}"


def _save_then_reload(save_tp, save_pp, load_tp, load_pp, path, tokens, phase):
    from megatron_prune import checkpoint
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    cfg = tiny_config(tie_embeddings=False)
    if phase == "save":
        groups = init_runtime(ParallelConfig(tp=save_tp, pp=save_pp))
        model = build_model(cfg, groups)
        load_full_state(model, random_full_state(cfg, seed=2).__getitem__, groups)
        checkpoint.save_checkpoint(model, cfg, path, groups, {"stage": "test"})
    else:
        groups = init_runtime(ParallelConfig(tp=load_tp, pp=load_pp))
        loaded_cfg = checkpoint.read_model_config(path)
        model = build_model(loaded_cfg, groups)
        checkpoint.load_checkpoint(model, path)
    return full_logits(model, groups, tokens)


@pytest.mark.parametrize("save,load", [((2, 1), (1, 1)), ((1, 2), (2, 1)), ((2, 2), (1, 2))],
                         ids=["tp2-to-tp1", "pp2-to-tp2", "tp2pp2-to-pp2"])
def test_checkpoint_written_at_one_layout_loads_at_another(pools, tmp_path, save, load):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    path = str(tmp_path / "ckpt")
    before = pools.run(save[0] * save[1], _save_then_reload, *save, *load, path, tokens, "save")[0]
    after = pools.run(load[0] * load[1], _save_then_reload, *save, *load, path, tokens, "load")
    for logits in after:
        assert torch.equal(logits, before) or (logits - before).abs().max().item() < 1e-6
