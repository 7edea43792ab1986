"""Tiny random HF models built locally from configs (never downloaded), for tests.

Every parameter is perturbed away from its init so that zero biases and unit norms, which would
hide a mis-mapped tensor, do not occur.
"""
from __future__ import annotations

from typing import Any

import torch

TINY_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # GQA, tied, head_dim == hidden / heads
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    # untied, biases on every linear, head_dim != hidden / heads
    "llama-bias": dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                       max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=50000.0,
                       tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    # Mistral-NeMo-like head_dim (16) != hidden / heads; 40 % 6 != 0 as after pruning (LlamaConfig
    # of transformers 5 rejects that, MistralConfig accepts it); untied
    "mistral": dict(model_type="mistral", vocab_size=96, hidden_size=40, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                    tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_inner=80, n_positions=64,
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "gpt2-untied": dict(model_type="gpt2", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
}


def tiny_hf_model(kind: str, seed: int = 0) -> Any:
    """A `*ForCausalLM` in eval mode, fp32, with perturbed random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_HF_CONFIGS[kind])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _llama_cpp_permute(w: Any, n_head: int) -> Any:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows per head (rotate-half -> interleaved rope);
    transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: Any, path: Any) -> None:
    """Write a llama-family `tiny_hf_model` as an F32 GGUF file (with a toy byte-level BPE tokenizer)
    the way llama.cpp would, so the GGUF path is testable in a second instead of 30."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens = [chr(33 + i) for i in range(c.vocab_size - 1)] + ['!"']  # the one merge's result
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(['! "'])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, array: Any) -> None:
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf_name, gguf_name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            add(f"blk.{i}.{gguf_name}.weight", sd[p + f"mlp.{hf_name}.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
