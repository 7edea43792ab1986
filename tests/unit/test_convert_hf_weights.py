"""HF state dict <-> canonical megatron state dict: exact inverses, independent layout checks, errors."""
import pytest
import torch

from megatron_prune.config import ConfigError
from megatron_prune.convert.hf_config import hf_config_to_model_config
from megatron_prune.convert.hf_weights import canonical_shapes, hf_to_megatron, megatron_to_hf
from megatron_prune.convert.tiny import TINY_HF_CONFIGS, tiny_hf_model


def _model_and_cfg(kind):
    model = tiny_hf_model(kind)
    return model, hf_config_to_model_config(model.config.to_dict(), name=kind)


@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_hf_to_megatron_to_hf_is_exact(kind):
    model, cfg = _model_and_cfg(kind)
    hf = model.state_dict()
    canonical = hf_to_megatron(hf, cfg)
    assert {k: tuple(v.shape) for k, v in canonical.items()} == canonical_shapes(cfg)
    back = megatron_to_hf(canonical, cfg)
    expected = {k: v for k, v in hf.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "mistral"])
def test_llama_qkv_rows_are_the_hf_projection_rows_grouped(kind):
    model, cfg = _model_and_cfg(kind)
    hf, canonical = model.state_dict(), hf_to_megatron(model.state_dict(), cfg)
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per = nq // ng
    for kind_ in ["weight", "bias"] if cfg.add_bias_linear else ["weight"]:
        qkv = canonical[f"decoder.layers.1.self_attention.linear_qkv.{kind_}"]
        q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.{kind_}"] for p in "qkv")
        for g in range(ng):
            block = qkv[g * (per + 2) * d:(g + 1) * (per + 2) * d]  # this group's rows
            assert torch.equal(block[:per * d], q[g * per * d:(g + 1) * per * d])
            assert torch.equal(block[per * d:(per + 1) * d], k[g * d:(g + 1) * d])
            assert torch.equal(block[(per + 1) * d:], v[g * d:(g + 1) * d])
    mlp = "model.layers.0.mlp."
    fc1 = canonical["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]]))


def test_gpt2_conv1d_is_transposed_and_c_attn_is_regrouped_per_head():
    model, cfg = _model_and_cfg("gpt2")
    hf, canonical = model.state_dict(), hf_to_megatron(model.state_dict(), cfg)
    H, d = cfg.hidden_size, cfg.kv_channels
    c_attn = hf["transformer.h.0.attn.c_attn.weight"]  # [in=H, out=3H]: columns q | k | v
    qkv = canonical["decoder.layers.0.self_attention.linear_qkv.weight"]  # [3H, H]
    for head in range(cfg.num_attention_heads):
        for j, offset in enumerate((0, H, 2 * H)):  # q, k, v
            rows = qkv[(3 * head + j) * d:(3 * head + j + 1) * d]
            assert torch.equal(rows, c_attn[:, offset + head * d:offset + (head + 1) * d].t())
    assert torch.equal(canonical["decoder.layers.0.mlp.linear_fc1.weight"], hf["transformer.h.0.mlp.c_fc.weight"].t())
    assert torch.equal(canonical["embedding.position_embeddings.weight"], hf["transformer.wpe.weight"])


def test_gpt2_hub_names_without_transformer_prefix_are_read():
    model, cfg = _model_and_cfg("gpt2")
    hf = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    hf["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # old checkpoints carry the causal-mask buffer
    canonical = hf_to_megatron(hf, cfg)
    assert torch.equal(canonical["decoder.final_layernorm.bias"], hf["ln_f.bias"])


def test_tied_checkpoint_with_or_without_lm_head_gives_the_same_canonical_state():
    model, cfg = _model_and_cfg("llama")
    with_head = model.state_dict()
    without = {k: v for k, v in with_head.items() if k != "lm_head.weight"}
    a, b = hf_to_megatron(with_head, cfg), hf_to_megatron(without, cfg)
    assert "output_layer.weight" not in a and a.keys() == b.keys()


def test_untied_output_layer_is_lm_head():
    model, cfg = _model_and_cfg("mistral")
    assert torch.equal(hf_to_megatron(model.state_dict(), cfg)["output_layer.weight"], model.lm_head.weight)


def test_missing_tensor_is_named():
    model, cfg = _model_and_cfg("llama")
    hf = dict(model.state_dict())
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf_to_megatron(hf, cfg)


def test_shape_mismatch_names_tensor_and_both_shapes():
    model, cfg = _model_and_cfg("llama")
    cfg.ffn_hidden_size = 40
    with pytest.raises(ConfigError, match=r"gate_proj\.weight.*\[48, 32\].*\[40, 32\]"):
        hf_to_megatron(model.state_dict(), cfg)


def test_leftover_tensors_mean_the_config_does_not_match():
    model, cfg = _model_and_cfg("llama")
    cfg.num_layers = 1
    with pytest.raises(ConfigError, match=r"model\.layers\.1\..*num_layers"):
        hf_to_megatron(model.state_dict(), cfg)


def test_megatron_to_hf_ignores_extra_state_and_names_missing_canonical_tensor():
    model, cfg = _model_and_cfg("gpt2")
    canonical = hf_to_megatron(model.state_dict(), cfg)
    canonical["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    megatron_to_hf(canonical, cfg)
    del canonical["decoder.layers.0.mlp.linear_fc1.bias"]
    with pytest.raises(ConfigError, match=r"linear_fc1\.bias.*missing from the canonical"):
        megatron_to_hf(canonical, cfg)


def test_megatron_to_hf_refuses_what_hf_cannot_express_before_converting():
    from megatron_prune.config import ModelConfig

    gqa_gpt2 = ModelConfig(family="gpt2", num_attention_heads=4, num_query_groups=2, add_bias_linear=True)
    assert canonical_shapes(gqa_gpt2)["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 4) * 16, 64)
    with pytest.raises(ConfigError, match="grouped-query"):
        megatron_to_hf({}, gqa_gpt2)
