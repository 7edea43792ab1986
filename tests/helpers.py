"""Small shared pieces for tests: deterministic random weights for tiny models, tiny configs."""
from __future__ import annotations

import torch

from megatron_prune.config import ModelConfig
from megatron_prune.convert.hf_weights import canonical_shapes


def tiny_config(**overrides) -> ModelConfig:
    base = dict(name="tiny-llama", family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=256,
                max_position_embeddings=256, tie_embeddings=True)
    base.update(overrides)
    return ModelConfig(**base).validate()


def random_full_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical full tensors with a trained-looking spread (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(canonical_shapes(cfg).items()):
        if "layernorm" in name or name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=gen)
    return state
