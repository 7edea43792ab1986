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


def test_score_at_pp2_writes_the_artifact_pictures_and_a_wandb_run(made, tmp_path):
    from megatron_prune.importance.artifact import read_artifact

    root, cache = made["root"], made["cache"]
    data = tmp_path / "data"
    assert run_cli(["prepare-data", f"data.source={made['texts']}", f"data.tokenizer_dir={made['tokenizer']}",
                    f"data.output_dir={data}", "data.task_examples=0"], root, cache).returncode == 0
    ckpt = tmp_path / "ckpt"
    assert run_cli(["convert", f"source={made['hf']}", f"output={ckpt}", "logger=none"], root, cache).returncode == 0
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "the cat sat on the", "choices": ["mat", "dog"], "label": 0}) + "\n" +
                    json.dumps({"context": "a dog ran to the", "choices": ["hat", "cat"], "label": 1}) + "\n")
    out = tmp_path / "importance"
    proc = run_cli(["score", f"checkpoint={ckpt}", f"data_dir={data}", f"output={out}", "parallel.pp=2",
                    "seq_length=16", "micro_batch_size=2", "max_samples=8", "depth.block_size=2",
                    f"depth.task={task}", "depth.task_seq_length=16", f"logger.dir={tmp_path}",
                    "logger.group=cli-test"], root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr
    artifact = read_artifact(out)
    meta = artifact.metadata
    assert meta["layout"] == "tp1-pp2-dp1" and meta["samples"] == 8 and meta["tokens"] > 8
    assert meta["aggregation"] == {"sequence": "mean", "batch": "l2"}
    assert meta["model"]["config"]["num_layers"] == 2 and len(meta["model"]["sha256"]) == 64
    assert meta["data"]["split"] == "calibration" and meta["depth"]["accuracy"]["examples"] == 2
    assert artifact["depth/mc_acc_block"].shape == (1,) and artifact["width/heads"].shape == (2, 4)
    for name in ("heads.png", "neurons.png", "layers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cheapest block of 2 (LM loss)" in proc.stdout and "loss increase" in proc.stdout
    (run_file,) = find_runs(str(tmp_path))
    run = read_run(run_file)
    assert run.job_type == "score" and run.group == "cli-test"
    images = [row for row in run.history if row.get("score/heads/_type") or row.get("score/layers/_type")]
    assert {"score/heads/_type", "score/neurons/_type", "score/layers/_type",
            "score/layer_table/_type"} <= run.history_keys()
    assert images and all(row.get(k) in (None, "image-file") for row in images
                          for k in ("score/heads/_type", "score/layers/_type"))
    for name in ("heads", "neurons", "layers"):
        assert any(f.startswith(f"files/media/images/score/{name}_") and f.endswith(".png") for f in run.files)
    assert run.summary["score/samples"] == 8


def _megatron_logits(ckpt, tokens):
    from megatron_prune import checkpoint
    from megatron_prune.config import ParallelConfig
    from megatron_prune.models.build import build_model
    from megatron_prune.models.forward import full_logits
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=1, pp=1))
    model = build_model(checkpoint.read_model_config(ckpt), groups)
    checkpoint.load_checkpoint(model, ckpt)
    return full_logits(model, groups, tokens)


def test_score_prune_at_tp2_then_reload_and_export(made, tmp_path):
    """score -> prune at TP2 (activation importance) -> the checkpoint reloads at TP1 and PP2 and
    exports to transformers with the same logits; the plan and the parameter count are recorded."""
    from transformers import AutoModelForCausalLM

    from megatron_prune.models.params import count_parameters
    from megatron_prune.prune.plan import PrunePlan

    root, cache = made["root"], made["cache"]
    data, ckpt, imp, pruned = (tmp_path / n for n in ("data", "ckpt", "imp", "pruned"))
    assert run_cli(["prepare-data", f"data.source={made['texts']}", f"data.tokenizer_dir={made['tokenizer']}",
                    f"data.output_dir={data}", "data.task_examples=0"], root, cache).returncode == 0
    assert run_cli(["convert", f"source={made['hf']}", f"output={ckpt}", "logger=none"], root, cache).returncode == 0
    proc = run_cli(["score", f"checkpoint={ckpt}", f"data_dir={data}", f"output={imp}", "seq_length=16",
                    "max_samples=8", "micro_batch_size=2", "depth.accuracy=false", "logger=none"], root, cache)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(["prune", f"checkpoint={ckpt}", f"importance={imp}", f"output={pruned}", "parallel.tp=2",
                    "prune.target.hidden_size=24", "prune.target.ffn_hidden_size=32",
                    "prune.target.num_attention_heads=2", f"logger.dir={tmp_path}"], root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size" in proc.stdout and "18,592" in proc.stdout  # the architecture table
    plan = PrunePlan.load(pruned / "plan.json")
    assert (plan.target.hidden_size, plan.target.ffn_hidden_size, plan.target.num_attention_heads) == (24, 32, 2)
    assert plan.importance == "activation" and plan.parameters["after"] == count_parameters(plan.target)
    provenance = json.loads((pruned / "provenance.json").read_text())
    assert provenance["stage"] == "prune" and provenance["written_at_layout"] == "tp2-pp1-dp1"
    (run_file,) = find_runs(str(tmp_path))
    assert read_run(run_file).summary["prune/parameters_after"] == plan.parameters["after"]

    result = tmp_path / "eval.json"
    proc = run_cli(["evaluate", f"checkpoint={pruned}", f"data_dir={data}", "parallel.pp=2", "seq_length=16",
                    "task=none", f"output={result}", "logger=none"], root, cache, nproc=2)
    assert proc.returncode == 0, proc.stderr
    hf_out = tmp_path / "pruned-hf"
    assert run_cli(["export", f"checkpoint={pruned}", f"output={hf_out}"], root, cache).returncode == 0
    exported = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    assert json.loads((hf_out / "config.json").read_text())["head_dim"] == 8  # 24 / 2 heads would be 12
    assert sum(p.numel() for p in exported.parameters()) == plan.parameters["after"]
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = _megatron_logits(pruned, tokens)
    with torch.no_grad():
        theirs = exported(tokens).logits
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
