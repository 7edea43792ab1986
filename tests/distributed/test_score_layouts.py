"""The `score` stage's artifact (width scores, raw sample sums, Block Importance, LM-loss increase
per layer and per block, multiple-choice accuracy per block) is the same at TP1/PP1, TP2, PP2, DP2 and
TP2xPP2 for the same checkpoint and data, on every rank; it does not depend on the micro-batch size;
and a NaN on one pipeline stage is reported by every rank with the same layer and sample."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.unit.test_bad_inputs import run_cli

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2), (2, 2, 4)]  # (tp, pp, world); DP = world/(tp*pp)
TEXT = ("the cat sat on the mat and looked at the hat . a dog ran to the cat and the cat ran to the "
        "mat . the bird sang in the tree while the sun rose over the hill . ")
TASK = [("the cat sat on the", ["mat", "dog", "hat"], 0), ("a dog ran to the", ["cat", "mat"], 0),
        ("the bird sang in the", ["tree", "hat", "sun"], 0), ("the sun rose over the", ["hill", "dog"], 0),
        ("the cat looked at the", ["hat", "tree"], 0), ("the cat ran to", ["the mat", "a bird"], 0)]


def _hf_model(path: Path, nan: bool = False) -> Path:
    """The tiny llama with 4 layers (2 per PP stage); `nan` poisons one gate row of layer 3."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_prune.convert.tiny import TINY_HF_CONFIGS

    spec = dict(TINY_HF_CONFIGS["llama"], num_hidden_layers=4)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if nan:
        with torch.no_grad():
            model.model.layers[3].mlp.gate_proj.weight[5, :] = float("nan")
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("score")
    cache = root / "cache"
    cache.mkdir()
    texts = root / "texts"
    texts.mkdir()
    for i in range(8):
        (texts / f"doc{i}.txt").write_text(TEXT * (i + 2))
    tokenizer = build_tiny_tokenizer(str(root / "tokenizer"), [TEXT], 60)
    data = root / "data"
    proc = run_cli(["prepare-data", f"data.source={texts}", f"data.tokenizer_dir={tokenizer}",
                    f"data.output_dir={data}", "data.task_examples=0"], root, cache)
    assert proc.returncode == 0, proc.stderr
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in TASK))
    out = {"root": root, "data": str(data), "task": str(task)}
    for name, nan in (("ckpt", False), ("ckpt_nan", True)):
        hf = _hf_model(root / f"hf-{name}", nan=nan)
        out[name] = str(root / name)
        proc = run_cli(["convert", f"source={hf}", f"output={out[name]}", "logger=none"], root, cache)
        assert proc.returncode == 0, proc.stderr
    return out


def _settings(inputs: dict, output: str, micro_batch_size: int = 2, checkpoint: str = ""):
    from megatron_prune.importance.stage import DepthSettings, ScoreSettings

    return ScoreSettings(
        checkpoint=checkpoint or inputs["ckpt"], data_dir=inputs["data"], output=output, seq_length=16,
        max_samples=None, micro_batch_size=micro_batch_size,
        depth=DepthSettings(block_size=2, loss_max_samples=6, task=inputs["task"], task_seq_length=24))


def _score_at(tp: int, pp: int, inputs: dict, output: str, micro_batch_size: int = 2) -> dict:
    from megatron_prune.importance.stage import score_checkpoint
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    result = score_checkpoint(_settings(inputs, output, micro_batch_size), groups, show_progress=False)
    return {"layout": groups.layout, "tensors": result.artifact.tensors, "meta": result.artifact.metadata}


def _nan_at(tp: int, pp: int, inputs: dict, output: str) -> str:
    from megatron_prune.importance import NonFiniteActivation
    from megatron_prune.importance.stage import score_checkpoint
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    try:
        score_checkpoint(_settings(inputs, output, checkpoint=inputs["ckpt_nan"]), groups,
                         show_progress=False)
    except NonFiniteActivation as err:
        return str(err)
    return "no error"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def test_artifact_identical_at_every_layout_and_micro_batch_size(pools, inputs, tmp_path):
    from megatron_prune.importance.artifact import read_artifact

    runs = {}
    for tp, pp, world in LAYOUTS:
        runs[(tp, pp, world)] = pools.run(world, _score_at, tp, pp, inputs, str(tmp_path / f"tp{tp}-pp{pp}-w{world}"))
    runs["mbs1"] = pools.run(1, _score_at, 1, 1, inputs, str(tmp_path / "mbs1"), 1)
    reference = read_artifact(tmp_path / "tp1-pp1-w1")  # what rank 0 wrote at TP1/PP1
    ref = reference.tensors
    assert set(ref) >= {"width/heads", "width/query_groups", "width/neurons", "width/hidden", "stats/heads",
                        "depth/block_importance", "depth/lm_loss_layer", "depth/lm_loss_increase_layer",
                        "depth/lm_loss_increase_block", "depth/mc_acc_block", "depth/mc_acc_norm_block"}
    assert ref["depth/lm_loss_increase_block"].shape == (3,) and ref["depth/mc_acc_block"].shape == (3,)
    for key, per_rank in runs.items():
        for rank, got in enumerate(per_rank):
            where = f"{key} {got['layout']} rank {rank}"
            assert set(got["tensors"]) == set(ref), where
            for name, tensor in ref.items():
                if name.startswith("depth/mc_acc"):
                    assert torch.equal(got["tensors"][name], tensor), (where, name)
                elif name.startswith("depth/lm_loss_increase"):
                    # a difference of two losses: its error is relative to the loss, not to itself
                    base = reference.metadata["depth"]["loss"]["base_loss"]
                    assert float((got["tensors"][name] - tensor).abs().max()) <= 1e-5 * base, (where, name)
                else:
                    assert _rel(got["tensors"][name], tensor) <= 1e-5, (where, name)
            assert got["meta"]["samples"] == reference.metadata["samples"]
            assert got["meta"]["tokens"] == reference.metadata["tokens"]
            assert got["meta"]["layout"] == got["layout"]
    # the files that other layouts wrote say which layout produced them
    assert read_artifact(tmp_path / "tp2-pp2-w4").metadata["layout"] == "tp2-pp2-dp1"
    assert read_artifact(tmp_path / "tp1-pp1-w2").metadata["layout"] == "tp1-pp1-dp2"
    assert reference.metadata["model"]["sha256"] == read_artifact(tmp_path / "tp1-pp2-w2").metadata["model"]["sha256"]


def test_nan_on_the_last_stage_is_reported_by_every_rank(pools, inputs, tmp_path):
    out = tmp_path / "nan"
    messages = pools.run(2, _nan_at, 1, 2, inputs, str(out))
    for message in messages:  # rank 0 holds layers 0-1 and prints the CLI error: it must know
        assert "in layer 3 (MLP intermediate (linear_fc2 input)) of calibration sample 0" in message, message
    assert not out.exists()
