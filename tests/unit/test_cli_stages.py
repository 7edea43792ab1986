"""The stage apps end to end on tiny local inputs, as a user runs them: prepare-data, convert under
torchrun at TP2, evaluate at PP2 with a W&B offline run, export back to transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.unit.test_bad_inputs import run_cli
from tests.wandb_offline import find_runs, read_run

TEXT = ("the cat sat on the mat and looked at the hat . a dog ran to the cat and the cat ran "
        "to the mat . ") * 12


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from megatron_prune.convert.tiny import tiny_hf_model
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("stages")
    cache = root / "cache"
    cache.mkdir()
    texts = root / "texts"
    texts.mkdir()
    for i in range(8):
        (texts / f"doc{i}.txt").write_text(TEXT * (i + 1))
    tokenizer = build_tiny_tokenizer(str(root / "tokenizer"), [TEXT], 60)
    hf = root / "hf"
    model = tiny_hf_model("llama")  # vocab 96 >= the tokenizer's
    model.save_pretrained(str(hf))
    return {"root": root, "cache": cache, "texts": texts, "tokenizer": tokenizer, "hf": hf,
            "hf_model": model}


def test_prepare_convert_evaluate_export(made, tmp_path):
    root, cache = made["root"], made["cache"]
    data = tmp_path / "data"
    proc = run_cli(["prepare-data", f"data.source={made['texts']}", f"data.tokenizer_dir={made['tokenizer']}",
                    f"data.output_dir={data}", "data.task_examples=0"], root, cache)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    assert set(manifest["splits"]) >= {"calibration", "train", "validation"}

    ckpt = tmp_path / "ckpt"
    proc = run_cli(["convert", f"source={made['hf']}", f"output={ckpt}", "parallel.tp=2",
                    "logger=none"], root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((ckpt / "provenance.json").read_text())["written_at_layout"] == "tp2-pp1-dp1"

    result = tmp_path / "eval.json"
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", f"data_dir={data}", "parallel.pp=2",
                    "seq_length=16", "micro_batch_size=2", "task=none", f"output={result}",
                    f"logger.dir={tmp_path}", "logger.group=cli-test"], root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(result.read_text())
    assert evaluated["tokens"] > 0 and evaluated["perplexity"] > 1.0
    assert "validation perplexity" in proc.stdout  # the summary table
    (run_file,) = find_runs(str(tmp_path))
    run = read_run(run_file)
    assert run.job_type == "evaluate" and run.group == "cli-test"
    assert run.config["checkpoint"] == str(ckpt) and run.config["parallel"]["pp"] == 2
    assert {"eval/validation_perplexity", "eval/validation_loss"} <= run.history_keys()
    assert run.summary["eval/validation_perplexity"] == pytest.approx(evaluated["perplexity"])

    hf_out = tmp_path / "hf-out"
    proc = run_cli(["export", f"checkpoint={ckpt}", f"output={hf_out}"], root, cache)
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, made["hf_model"].eval()(tokens).logits)
