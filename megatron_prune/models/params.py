"""Analytic parameter count of a ModelConfig (what a megatron GPTModel / its HF export holds)."""
from __future__ import annotations

from megatron_prune.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    """Trainable parameters, counting a tied embedding/output matrix once. Matches both
    `sum(p.numel() for p in hf_model.parameters())` and the canonical megatron state dict."""
    H, F, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    nq, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    norm = H if cfg.normalization == "RMSNorm" else 2 * H  # LayerNorm has a bias
    fc1_rows = 2 * F if cfg.gated_linear_unit else F  # SwiGLU fuses [gate; up]
    bias = cfg.add_bias_linear
    qkv_rows = (nq + 2 * ng) * d
    layer = (
        2 * norm  # input_layernorm, pre_mlp_layernorm
        + qkv_rows * H + (qkv_rows if bias or cfg.add_qkv_bias else 0)  # linear_qkv
        + H * nq * d + (H if bias else 0)  # linear_proj
        + fc1_rows * H + (fc1_rows if bias else 0)  # linear_fc1
        + H * F + (H if bias else 0)  # linear_fc2
    )
    embedding = V * H + (cfg.max_position_embeddings * H if cfg.position_embedding_type == "learned_absolute" else 0)
    output = 0 if cfg.tie_embeddings else V * H
    return embedding + cfg.num_layers * layer + norm + output
