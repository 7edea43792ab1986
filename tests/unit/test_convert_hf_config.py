"""HF config.json <-> ModelConfig, both ways, and the clear refusals."""
import copy

import pytest
from transformers import AutoConfig

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.convert.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_prune.convert.tiny import TINY_HF_CONFIGS

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json (transformers 4.x format)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}
NEMO_12B = {  # mistralai/Mistral-Nemo-Base-2407 config.json
    "architectures": ["MistralForCausalLM"], "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 131072,
}


def _hf_dict(kind: str) -> dict:
    spec = dict(TINY_HF_CONFIGS[kind])
    return AutoConfig.for_model(spec.pop("model_type"), **spec).to_dict()


def test_llama_gqa_maps_every_field():
    cfg = hf_config_to_model_config(_hf_dict("llama"), name="t")
    assert cfg == ModelConfig(name="t", family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=48,
                              num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=96,
                              max_position_embeddings=64, norm_epsilon=1e-5, rotary_base=10000.0,
                              tie_embeddings=True)


def test_mistral_keeps_head_dim_that_differs_from_hidden_over_heads():
    cfg = hf_config_to_model_config(_hf_dict("mistral"))
    assert (cfg.kv_channels, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (16, 40, 6, 2)
    assert cfg.tie_embeddings is False and cfg.rotary_base == 1e6
    nemo = hf_config_to_model_config(NEMO_12B)
    assert (nemo.kv_channels, nemo.hidden_size // nemo.num_attention_heads) == (128, 160)


def test_gpt2_maps_to_mha_with_biases():
    cfg = hf_config_to_model_config(_hf_dict("gpt2"))
    assert (cfg.family, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == ("gpt2", 4, 8, 80)
    assert cfg.add_bias_linear and cfg.tie_embeddings and cfg.max_position_embeddings == 64
    assert hf_config_to_model_config(_hf_dict("gpt2-untied")).ffn_hidden_size == 4 * 32  # n_inner=None


def test_llama31_rope_scaling_maps_to_megatrons_llama3_scaling():
    cfg = hf_config_to_model_config(LLAMA31_8B)
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 8.0 and cfg.rotary_base == 500000.0
    # transformers-5 style carries the same thing in rope_parameters
    hf5 = AutoConfig.for_model(**{k: v for k, v in LLAMA31_8B.items() if k != "architectures"}).to_dict()
    assert "rope_parameters" in hf5 and hf_config_to_model_config(hf5) == cfg


def test_gguf_float32_epsilon_is_recovered():
    hf = _hf_dict("llama") | {"rms_norm_eps": 9.999999747378752e-06}
    assert hf_config_to_model_config(hf).norm_epsilon == 1e-5


@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_model_config_round_trips_through_hf_config(kind):
    cfg = hf_config_to_model_config(_hf_dict(kind), name=kind)
    hf = model_config_to_hf_config(cfg)
    # what transformers itself makes of the exported dict maps back to the same ModelConfig
    spec = dict(hf)
    again = AutoConfig.for_model(spec.pop("model_type"), **spec).to_dict()
    assert hf_config_to_model_config(again, name=kind) == cfg
    assert hf_config_to_model_config(hf, name=kind) == cfg


@pytest.mark.parametrize("src", [LLAMA31_8B, NEMO_12B])
def test_real_presets_round_trip_and_always_write_head_dim(src):
    cfg = hf_config_to_model_config(src)
    hf = model_config_to_hf_config(cfg)
    assert hf["head_dim"] == 128 and hf_config_to_model_config(hf) == cfg
    spec = dict(hf)
    assert hf_config_to_model_config(AutoConfig.for_model(spec.pop("model_type"), **spec).to_dict()) == cfg


def test_pruned_hidden_not_divisible_by_heads_exports_as_mistral():
    cfg = ModelConfig(hidden_size=40, num_attention_heads=6, num_query_groups=2, kv_channels=16)
    hf = model_config_to_hf_config(cfg)
    assert hf["architectures"] == ["MistralForCausalLM"] and hf["sliding_window"] is None
    spec = dict(hf)
    AutoConfig.for_model(spec.pop("model_type"), **spec)  # transformers accepts it


@pytest.mark.parametrize("change,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_llama_features_name_the_field(change, field):
    hf = copy.deepcopy(LLAMA31_8B) | change
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config(hf)


def test_mistral_sliding_window_is_refused_unless_it_covers_the_context():
    with pytest.raises(ConfigError, match="sliding_window"):
        hf_config_to_model_config(NEMO_12B | {"sliding_window": 4096})
    hf_config_to_model_config(NEMO_12B | {"sliding_window": 1024000})


@pytest.mark.parametrize("change,field", [({"activation_function": "relu"}, "activation_function"),
                                          ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse")])
def test_unsupported_gpt2_features_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        hf_config_to_model_config(_hf_dict("gpt2") | change)


@pytest.mark.parametrize("cfg,field", [
    (ModelConfig(family="gpt2", num_attention_heads=4, num_query_groups=2, add_bias_linear=True), "num_query_groups"),
    (ModelConfig(family="gpt2", hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=8,
                 add_bias_linear=True), "hidden_size"),
    (ModelConfig(family="gpt2", num_attention_heads=4, num_query_groups=4), "add_bias_linear"),
    (ModelConfig(add_qkv_bias=True), "add_qkv_bias"),
    (ModelConfig(hidden_size=40, num_attention_heads=6, num_query_groups=2, add_bias_linear=True), "hidden_size"),
])
def test_export_refuses_what_hf_cannot_express(cfg, field):
    with pytest.raises(ConfigError, match=field):
        model_config_to_hf_config(cfg)


def test_extra_fields_cannot_override_architecture():
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config_to_hf_config(ModelConfig(), extra={"hidden_size": 1})
    assert model_config_to_hf_config(ModelConfig(), extra={"eos_token_id": 2})["eos_token_id"] == 2
