"""Reading safetensors checkpoints lazily, writing HF checkpoints that transformers loads, atomically."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from megatron_prune.config import ConfigError
from megatron_prune.convert import hf_io
from megatron_prune.convert.hf_config import hf_config_to_model_config
from megatron_prune.convert.hf_io import read_hf_checkpoint, write_hf_checkpoint
from megatron_prune.convert.hf_weights import hf_to_megatron, iter_canonical
from megatron_prune.convert.tiny import tiny_hf_model


def _canonical(kind):
    model = tiny_hf_model(kind)
    cfg = hf_config_to_model_config(model.config.to_dict(), name=kind)
    return model, cfg, hf_to_megatron(model.state_dict(), cfg)


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "mistral", "gpt2", "gpt2-untied"])
def test_written_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, kind):
    model, cfg, canonical = _canonical(kind)
    out = write_hf_checkpoint(canonical, cfg, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(loaded).__name__ == type(model).__name__
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    # and reading it back gives the same canonical tensors
    cfg2, tok, state = read_hf_checkpoint(out)
    assert cfg2 == cfg.__class__(**{**cfg.to_dict(), "name": "out"}) and tok is None
    assert state.keys() == canonical.keys()
    assert all(torch.equal(state[k], canonical[k]) for k in canonical)


def test_tokenizer_files_and_token_ids_are_carried_over(tmp_path):
    _, cfg, canonical = _canonical("llama")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "generation_config.json").write_text('{"eos_token_id": 5}')
    (tok / "config.json").write_text(json.dumps({"bos_token_id": 4, "eos_token_id": 5, "hidden_size": 999}))
    out = write_hf_checkpoint(canonical, cfg, tmp_path / "out", tokenizer_dir=tok)
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "generation_config.json").is_file()
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["hidden_size"]) == (4, 5, 32)
    assert read_hf_checkpoint(out)[1] == out


def test_existing_output_is_refused_then_replaced_only_on_request(tmp_path):
    _, cfg, canonical = _canonical("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(ConfigError, match="already exists"):
        write_hf_checkpoint(canonical, cfg, out)
    assert (out / "keep").read_text() == "old"
    write_hf_checkpoint(canonical, cfg, out, overwrite=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_a_failed_write_leaves_the_previous_output_and_no_temp_dir(tmp_path, monkeypatch):
    _, cfg, canonical = _canonical("llama")
    out = write_hf_checkpoint(canonical, cfg, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_hf_checkpoint(canonical, cfg, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sharded_checkpoint_is_read_one_tensor_at_a_time(tmp_path):
    model, cfg, canonical = _canonical("llama-bias")
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    lazy = dict(iter_canonical(tmp_path / "hf"))  # cfg from config.json
    assert lazy.keys() == canonical.keys() and all(torch.equal(lazy[k], canonical[k]) for k in canonical)


def test_missing_directory_config_and_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/config\.json is missing"):
        read_hf_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_hf_model("llama").config.to_dict()))
    with pytest.raises(ConfigError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        read_hf_checkpoint(tmp_path / "empty")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ConfigError, match="neither a HF checkpoint directory nor a .gguf"):
        read_hf_checkpoint(tmp_path / "file.bin")


def test_missing_tensor_names_the_file(tmp_path):
    model, cfg, _ = _canonical("llama")
    model.save_pretrained(str(tmp_path / "hf"))
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in ("lm_head.weight",
                                                                             "model.layers.1.mlp.down_proj.weight")}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*hf/model\.safetensors"):
        read_hf_checkpoint(tmp_path / "hf")


def test_missing_shard_and_stale_index_entries_name_the_file(tmp_path):
    model, _, _ = _canonical("llama")
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = index["weight_map"][name]
    other = next(f for f in index["weight_map"].values() if f != shard)
    index["weight_map"][name] = other  # the index claims the tensor is in a shard that lacks it
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"{name}.*missing from .*{other}"):
        read_hf_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / other).unlink()
    with pytest.raises(ConfigError, match=rf"shard .*{other} .*is missing"):
        read_hf_checkpoint(tmp_path / "hf")


def test_truncated_safetensors_file_is_named(tmp_path):
    model, _, _ = _canonical("gpt2")
    model.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Exception, match="model.safetensors"):
        read_hf_checkpoint(tmp_path / "hf")
