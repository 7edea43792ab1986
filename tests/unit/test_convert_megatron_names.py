"""The canonical names/shapes are exactly a real TP1/PP1 megatron-core GPTModel's state_dict, and
megatron itself splits the converted linear_qkv / linear_fc1 back into HF's q, k, v / gate, up."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_prune.config import ModelConfig
from megatron_prune.convert.hf_config import hf_config_to_model_config
from megatron_prune.convert.hf_weights import canonical_shapes, hf_to_megatron
from megatron_prune.convert.tiny import tiny_hf_model

parallel_state = pytest.importorskip("megatron.core.parallel_state")


@pytest.fixture(scope="module")
def tp1():
    """A one-rank gloo group and megatron TP1/PP1 state, torn down only if this module made them."""
    made_pg = made_mp = False
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        made_pg = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        made_mp = True
    yield
    if made_mp:
        parallel_state.destroy_model_parallel()
    if made_pg:
        dist.destroy_process_group()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def build_gpt(cfg: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    tc = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, normalization=cfg.normalization, layernorm_epsilon=cfg.norm_epsilon,
        # HF GPT-2's gelu_new is the tanh approximation
        gated_linear_unit=cfg.gated_linear_unit, activation_func=F.silu if cfg.gated_linear_unit else _gelu_tanh,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias, bias_activation_fusion=False,
        use_cpu_initialization=True, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(tc, get_gpt_layer_local_spec(normalization=cfg.normalization), vocab_size=cfg.vocab_size,
                    max_sequence_length=cfg.max_position_embeddings,
                    position_embedding_type=cfg.position_embedding_type, rotary_base=int(cfg.rotary_base),
                    share_embeddings_and_output_weights=cfg.tie_embeddings).eval()


CASES = {
    "llama-gqa-tied": ModelConfig(),
    "llama-untied-bias-headdim": ModelConfig(num_attention_heads=6, num_query_groups=3, kv_channels=12,
                                             tie_embeddings=False, add_bias_linear=True),
    "llama-qkv-bias-only": ModelConfig(add_qkv_bias=True),
    "gpt2-tied": ModelConfig(family="gpt2", num_attention_heads=4, num_query_groups=4, add_bias_linear=True,
                             add_qkv_bias=True),
    # as after pruning: megatron allows what HF GPT-2 cannot express; canonical_shapes still describes it
    "gpt2-gqa-pruned": ModelConfig(family="gpt2", num_attention_heads=4, num_query_groups=2, kv_channels=12,
                                   add_bias_linear=True),
    "gpt2-untied": ModelConfig(family="gpt2", num_layers=2, num_attention_heads=4, num_query_groups=4,
                               add_bias_linear=True, tie_embeddings=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_canonical_names_and_shapes_are_a_tp1_gptmodel_state_dict(tp1, case):
    cfg = CASES[case]
    model = build_gpt(cfg)
    real = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert real == canonical_shapes(cfg)


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "mistral", "gpt2"])
def test_megatron_splits_converted_weights_back_into_hf_projections(tp1, kind):
    hf_model = tiny_hf_model(kind)
    cfg = hf_config_to_model_config(hf_model.config.to_dict(), name=kind)
    model = build_gpt(cfg)
    result = model.load_state_dict(hf_to_megatron(hf_model.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)

    x = torch.randn(5, 1, cfg.hidden_size)  # [s, b, H]
    layer = model.decoder.layers[1]
    with torch.no_grad():
        q, k, v = layer.self_attention.get_query_key_value_tensors(x)[:3]  # [s, b, heads, d]
        if cfg.family == "llama":
            attn = hf_model.model.layers[1].self_attn
            hf_q, hf_k, hf_v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            hf_mlp = hf_model.model.layers[1].mlp(x)
        else:
            hf_q, hf_k, hf_v = hf_model.transformer.h[1].attn.c_attn(x).split(cfg.hidden_size, dim=-1)
            hf_mlp = hf_model.transformer.h[1].mlp(x)
        mlp_out, mlp_bias = layer.mlp(x)
    torch.testing.assert_close(q.flatten(2), hf_q)
    torch.testing.assert_close(k.flatten(2), hf_k)
    torch.testing.assert_close(v.flatten(2), hf_v)
    # megatron's fc2 skips its bias add and returns the bias beside the output
    torch.testing.assert_close(mlp_out + (mlp_bias if mlp_bias is not None else 0), hf_mlp)


def test_llama3_rope_scaling_matches_hf_inverse_frequencies(tp1):
    """ModelConfig.rope_scaling maps to GPTModel(rope_scaling=True, rope_scaling_factor=...); its
    frequencies equal HF's llama3 rope for Llama 3.1's parameters."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama31 = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128, max_position_embeddings=131072,
                   rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    cfg = hf_config_to_model_config(llama31)
    hf_config = AutoConfig.for_model(**llama31)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    rope = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0, rotary_base=int(cfg.rotary_base),
                           rope_scaling=cfg.rope_scaling, rope_scaling_factor=cfg.rope_scaling_factor,
                           use_cpu_initialization=True)
    torch.testing.assert_close(rope.inv_freq, hf_inv_freq.float())
