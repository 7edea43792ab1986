"""GGUF -> cached HF safetensors directory, through transformers (a tiny GGUF written locally)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_prune.config import ConfigError
from megatron_prune.convert import cache
from megatron_prune.convert.hf_config import hf_config_to_model_config
from megatron_prune.convert.hf_io import gguf_to_hf_dir, read_hf_checkpoint
from megatron_prune.convert.hf_weights import hf_to_megatron
from megatron_prune.convert.tiny import tiny_hf_model, write_tiny_gguf


@pytest.fixture()
def tiny_gguf(tmp_path):
    model = tiny_hf_model("llama")
    path = tmp_path / "Tiny-Llama.F32.gguf"
    write_tiny_gguf(model, path)
    return model, path


def test_gguf_converts_once_to_a_loadable_marked_directory_with_tokenizer(tiny_gguf, tmp_path):
    model, gguf = tiny_gguf
    out = gguf_to_hf_dir(gguf, tmp_path / "hf")
    assert cache.is_complete(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer was cleared before saving
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(str(out)).convert_ids_to_tokens([1, 2]) == ['"', "#"]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_hf_dir(gguf, tmp_path / "hf") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not rebuilt


def test_read_hf_checkpoint_accepts_a_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    model, gguf = tiny_gguf
    monkeypatch.setenv("MEGATRON_PRUNE_CACHE", str(tmp_path / "cache"))
    cfg, tokenizer_dir, state = read_hf_checkpoint(gguf)
    assert tokenizer_dir is not None and tokenizer_dir.parent == tmp_path / "cache"
    assert cfg == hf_config_to_model_config(model.config.to_dict(), name=gguf.stem)
    expected = hf_to_megatron(model.state_dict(), cfg)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_missing_gguf_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.gguf does not exist"):
        gguf_to_hf_dir(tmp_path / "nope.gguf", tmp_path / "out")
