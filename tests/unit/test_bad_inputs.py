"""Bad input fails early: one `megatron-prune <stage>: error:` line naming the field or file, a
non-zero exit, no output (nor a `.tmp-` sibling, nor a W&B run in the working directory), and
inputs byte-identical afterwards.

Every case runs the real CLI in a subprocess (`python -m megatron_prune`, the `megatron-prune`
console script, or torchrun for the world-size cases) on tiny local inputs. The stage apps refuse
these inputs before importing megatron, so a refused run costs about as much as importing torch.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from megatron_prune.cli.main import STAGES

# --------------------------------------------------------------------------------------------------
# Running the CLI and checking a refusal


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", MEGATRON_PRUNE_CACHE=str(cache),
               HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(name, None)  # a plain run is a world of one, whatever launched pytest
    return env


def run_cli(args: list[str], cwd: Path, cache: Path, nproc: Optional[int] = None,
            console_script: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc is not None:
        torchrun = shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--standalone", f"--nproc-per-node={nproc}", "-m", "megatron_prune", *args]
    elif console_script:
        script = shutil.which("megatron-prune")
        assert script, "the megatron-prune console script is not on PATH (pip install -e .)"
        cmd = [script, *args]
    else:
        cmd = [sys.executable, "-m", "megatron_prune", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(cache), capture_output=True, text=True,
                          timeout=timeout)


def tree_digest(path: Path) -> dict[str, str]:
    """Relative name -> sha256 for every file (and '<dir>' for every directory) under `path`."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Refusal:
    """Snapshot the inputs and the working directory, run the CLI, check the refusal."""

    def __init__(self, tmp_path: Path, cache: Path, inputs: list[Path]) -> None:
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        self.cache = cache
        self.inputs = inputs
        self.before = {str(p): tree_digest(p) for p in inputs}

    def run(self, stage: str, args: list[str], output: Optional[Path], *needles: str,
            nproc: Optional[int] = None, console_script: bool = False) -> str:
        proc = run_cli([stage, *args], self.cwd, self.cache, nproc=nproc,
                       console_script=console_script)
        report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        assert proc.returncode != 0, report
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"megatron-prune {stage}: error:")]
        assert len(lines) == 1, report  # one line, from rank 0 only under torchrun
        assert len([ln for ln in proc.stderr.splitlines() if "error:" in ln]) == 1, report
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        if nproc is None:
            assert "Traceback" not in proc.stderr, report
        else:  # torchrun's own agent reports the failed children with a traceback; ranks must not
            assert "[rank" not in proc.stderr, report
        if output is not None and str(output) not in self.before:
            assert not output.exists(), f"{output} was created\n{report}"
        if output is not None:
            leftovers = [p.name for p in output.parent.iterdir()
                         if p.name.startswith(f".{output.name}.")]
            assert not leftovers, f"temporary outputs left behind: {leftovers}"
        for p in self.inputs:
            assert tree_digest(p) == self.before[str(p)], f"input {p} changed"
        assert sorted(os.listdir(self.cwd)) == [], f"the run wrote into its working directory\n{report}"
        return lines[0]


# --------------------------------------------------------------------------------------------------
# Tiny inputs (written once per module)


def _save_llama(path: Path, **overrides) -> Path:
    """The tiny llama of megatron_prune.convert.tiny with some fields changed, saved as HF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_prune.convert.tiny import TINY_HF_CONFIGS

    spec = dict(TINY_HF_CONFIGS["llama"])
    spec.update(overrides)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """HF dirs whose shapes do not divide TP=2 / PP=2, a good tiny checkpoint, text + tokenizer."""
    from megatron_prune.convert.tiny import tiny_hf_model
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    cache = root / "cache"
    cache.mkdir()
    d: dict[str, Path] = {"root": root, "cache": cache}
    d["hf"] = root / "hf-llama"  # 4 heads, 2 groups, ffn 48, vocab 96, 2 layers: fine at tp=2, pp=2
    tiny_hf_model("llama").save_pretrained(str(d["hf"]))
    d["hf_tp4"] = root / "hf-gpt2"  # 4 heads = 4 groups, ffn 80, vocab 96: fine at tp=4
    tiny_hf_model("gpt2").save_pretrained(str(d["hf_tp4"]))
    d["heads3"] = _save_llama(root / "hf-heads3", num_attention_heads=3, num_key_value_heads=1,
                              hidden_size=24)
    d["groups3"] = _save_llama(root / "hf-groups3", num_attention_heads=6, num_key_value_heads=3,
                               hidden_size=48)
    d["ffn51"] = _save_llama(root / "hf-ffn51", intermediate_size=51)
    d["vocab97"] = _save_llama(root / "hf-vocab97", vocab_size=97)
    d["layers3"] = _save_llama(root / "hf-layers3", num_hidden_layers=3)
    d["no_config"] = root / "hf-no-config"
    shutil.copytree(d["hf"], d["no_config"])
    (d["no_config"] / "config.json").unlink()

    d["texts"] = root / "texts"
    d["texts"].mkdir()
    for i in range(6):
        (d["texts"] / f"doc{i}.txt").write_text("the cat sat on the mat and looked at the hat\n" * 20)
    d["empty_texts"] = root / "empty-texts"
    d["empty_texts"].mkdir()
    d["tokenizer"] = Path(build_tiny_tokenizer(str(root / "tokenizer"),
                                               ["the cat sat on the mat and looked at the hat"], 50))

    d["data"] = root / "data"
    proc = run_cli(["prepare-data", *_prepare_args(d["texts"], d["tokenizer"], d["data"])], root, cache)
    assert proc.returncode == 0, proc.stderr

    d["ckpt"] = root / "ckpt"
    proc = run_cli(["convert", f"source={d['hf']}", f"output={d['ckpt']}", "logger=none"], root, cache)
    assert proc.returncode == 0, proc.stderr
    assert (d["ckpt"] / "COMPLETE").is_file()
    shards = sorted((d["ckpt"] / "model").glob("*.distcp"))

    d["importance"] = root / "importance"
    proc = run_cli(["score", *_score_args(d, d["importance"]), "max_samples=4", "logger=none"], root, cache)
    assert proc.returncode == 0, proc.stderr

    d["ckpt_truncated"] = root / "ckpt-truncated"
    shutil.copytree(d["ckpt"], d["ckpt_truncated"])
    cut = d["ckpt_truncated"] / "model" / shards[0].name
    os.truncate(cut, cut.stat().st_size // 2)
    d["ckpt_corrupt"] = root / "ckpt-corrupt"  # full length, first half zeroed
    shutil.copytree(d["ckpt"], d["ckpt_corrupt"])
    bad = d["ckpt_corrupt"] / "model" / shards[0].name
    data = bytearray(bad.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    bad.write_bytes(bytes(data))
    d["ckpt_no_marker"] = root / "ckpt-no-marker"
    shutil.copytree(d["ckpt"], d["ckpt_no_marker"])
    (d["ckpt_no_marker"] / "COMPLETE").unlink()
    d["ckpt_no_config"] = root / "ckpt-no-config"
    shutil.copytree(d["ckpt"], d["ckpt_no_config"])
    (d["ckpt_no_config"] / "model_config.json").unlink()
    return d


@pytest.fixture
def refusal(tmp_path, inputs):
    def make(*paths: Path) -> Refusal:
        return Refusal(tmp_path, inputs["cache"], list(paths))
    return make


# --------------------------------------------------------------------------------------------------
# convert: the source


def test_convert_missing_source_fails_before_the_wandb_run_starts(refusal, inputs, tmp_path):
    # The default logger (W&B offline, dir=.) would leave ./wandb/ behind if it started first.
    r = refusal()
    out = tmp_path / "out"
    r.run("convert", [f"source={tmp_path / 'nope'}", f"output={out}"], out,
          f"source={tmp_path / 'nope'} does not exist", console_script=True)


def test_convert_source_without_config_json_names_the_file(refusal, inputs, tmp_path):
    r = refusal(inputs["no_config"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['no_config']}", f"output={out}", "logger=none"], out,
          str(inputs["no_config"] / "config.json"), "missing")


# --------------------------------------------------------------------------------------------------
# convert: the layout against the model


@pytest.mark.parametrize("key, override, needle", [
    ("heads3", "parallel.tp=2", "parallel.tp=2 does not divide model.num_attention_heads=3"),
    ("groups3", "parallel.tp=2", "parallel.tp=2 does not divide model.num_query_groups=3"),
    ("ffn51", "parallel.tp=2", "parallel.tp=2 does not divide model.ffn_hidden_size=51"),
    ("vocab97", "parallel.tp=2", "parallel.tp=2 does not divide model.vocab_size=97"),
    ("layers3", "parallel.pp=2", "parallel.pp=2 does not divide model.num_layers=3"),
], ids=["tp-heads", "tp-query-groups", "tp-ffn", "tp-vocab", "pp-layers"])
def test_convert_refuses_a_layout_that_does_not_divide_the_model(refusal, inputs, tmp_path, key,
                                                                 override, needle):
    # One process with tp=2 is also a world-size error; the model's own limit is reported first
    # because no launch can fix it.
    r = refusal(inputs[key])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs[key]}", f"output={out}", override, "logger=none"], out, needle)


def test_world_size_one_with_tp2_says_to_launch_with_torchrun(refusal, inputs, tmp_path):
    r = refusal(inputs["hf"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['hf']}", f"output={out}", "parallel.tp=2", "logger=none"], out,
          "world size 1 is not divisible by parallel.tp * parallel.pp = 2 * 1",
          "torchrun --nproc-per-node=2")


def test_world_size_two_with_tp4_fails_on_every_rank_with_one_message(refusal, inputs, tmp_path):
    r = refusal(inputs["hf_tp4"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['hf_tp4']}", f"output={out}", "parallel.tp=4", "logger=none"],
          out, "world size 2 is not divisible by parallel.tp * parallel.pp = 4 * 1", nproc=2)


def test_world_size_three_with_tp2_fails_on_every_rank_with_one_message(refusal, inputs, tmp_path):
    r = refusal(inputs["hf"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['hf']}", f"output={out}", "parallel.tp=2", "logger=none"],
          out, "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1", nproc=3)


def test_nccl_backend_without_cuda_is_refused(refusal, inputs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = refusal(inputs["hf"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['hf']}", f"output={out}", "parallel.backend=nccl",
                      "logger=none"], out, "parallel.backend=nccl needs CUDA")


def test_unknown_logger_kind_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["hf"])
    out = tmp_path / "out"
    r.run("convert", [f"source={inputs['hf']}", f"output={out}", "logger.kind=tensorboard"], out,
          "logger.kind='tensorboard'")


def test_convert_output_inside_the_source_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["hf"])
    out = inputs["hf"] / "megatron"
    r.run("convert", [f"source={inputs['hf']}", f"output={out}", "logger=none"], out,
          f"output={out} overlaps source={inputs['hf']}")


# --------------------------------------------------------------------------------------------------
# export: damaged checkpoints and occupied outputs


def test_export_truncated_shard_names_the_file(refusal, inputs, tmp_path):
    ckpt = inputs["ckpt_truncated"]
    r = refusal(ckpt)
    out = tmp_path / "hf"
    line = r.run("export", [f"checkpoint={ckpt}", f"output={out}"], out, "truncated")
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    assert str(shard) in line


def test_export_corrupt_shard_of_full_length_fails_at_load_with_one_line(refusal, inputs, tmp_path):
    # Passes the cheap checks; torch's CheckpointException (a BaseException) is turned into one line.
    ckpt = inputs["ckpt_corrupt"]
    r = refusal(ckpt)
    out = tmp_path / "hf"
    r.run("export", [f"checkpoint={ckpt}", f"output={out}"], out,
          f"checkpoint={ckpt}: loading the weights failed", "damaged")


def test_export_checkpoint_without_complete_marker_is_refused(refusal, inputs, tmp_path):
    ckpt = inputs["ckpt_no_marker"]
    r = refusal(ckpt)
    out = tmp_path / "hf"
    r.run("export", [f"checkpoint={ckpt}", f"output={out}"], out,
          f"checkpoint={ckpt} is incomplete (no COMPLETE marker)")


def test_export_checkpoint_without_model_config_names_the_file(refusal, inputs, tmp_path):
    ckpt = inputs["ckpt_no_config"]
    r = refusal(ckpt)
    out = tmp_path / "hf"
    r.run("export", [f"checkpoint={ckpt}", f"output={out}"], out,
          f"checkpoint={ckpt} is missing model_config.json")


def test_export_missing_checkpoint_is_refused(refusal, inputs, tmp_path):
    r = refusal()
    out = tmp_path / "hf"
    r.run("export", [f"checkpoint={tmp_path / 'nope'}", f"output={out}"], out,
          f"checkpoint={tmp_path / 'nope'} does not exist")


def test_export_into_an_existing_non_empty_directory_is_refused_and_leaves_it(refusal, inputs,
                                                                              tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    r = refusal(inputs["ckpt"], out)
    r.run("export", [f"checkpoint={inputs['ckpt']}", f"output={out}"], out,
          f"output={out} already exists and is not empty", "overwrite=true")


def test_export_output_that_is_a_file_is_refused(refusal, inputs, tmp_path):
    out = tmp_path / "hf"
    out.write_text("not a directory\n")
    r = refusal(inputs["ckpt"], out)
    r.run("export", [f"checkpoint={inputs['ckpt']}", f"output={out}"], out, f"output={out} is a file")


def test_export_output_inside_the_checkpoint_is_refused(refusal, inputs, tmp_path):
    ckpt = inputs["ckpt"]
    r = refusal(ckpt)
    out = ckpt / "hf"
    r.run("export", [f"checkpoint={ckpt}", f"output={out}"], out, f"output={out} overlaps checkpoint={ckpt}")


def test_export_layout_that_does_not_divide_the_checkpoint_model_is_refused(refusal, inputs, tmp_path):
    ckpt = inputs["ckpt"]  # 2 query groups
    r = refusal(ckpt)
    out = tmp_path / "hf"
    r.run("export", [f"checkpoint={ckpt}", f"output={out}", "parallel.tp=4"], out,
          "parallel.tp=4 does not divide model.num_query_groups=2")


# --------------------------------------------------------------------------------------------------
# prepare-data


def _prepare_args(source: Path, tokenizer: Path, out: Path) -> list[str]:
    return [f"data.source={source}", f"data.tokenizer_dir={tokenizer}", f"data.output_dir={out}",
            "data.task_examples=0"]


def test_prepare_data_empty_directory_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["empty_texts"], inputs["tokenizer"])
    out = tmp_path / "data"
    r.run("prepare-data", _prepare_args(inputs["empty_texts"], inputs["tokenizer"], out), out,
          f"data.source='{inputs['empty_texts']}'", "no .txt files")


def test_prepare_data_missing_directory_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["tokenizer"])
    out = tmp_path / "data"
    r.run("prepare-data", _prepare_args(tmp_path / "nope", inputs["tokenizer"], out), out,
          f"data.source='{tmp_path / 'nope'}'", "no such directory")


def test_prepare_data_missing_tokenizer_dir_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["texts"])
    out = tmp_path / "data"
    r.run("prepare-data", _prepare_args(inputs["texts"], tmp_path / "no-tok", out), out,
          f"tokenizer_dir='{tmp_path / 'no-tok'}' does not exist")


# --------------------------------------------------------------------------------------------------
# score


def _score_args(inputs, out: Path, *extra: str) -> list[str]:
    return [f"checkpoint={inputs['ckpt']}", f"data_dir={inputs['data']}", f"output={out}", "seq_length=16",
            "micro_batch_size=2", "depth.accuracy=false", *extra]


def test_score_without_calibration_data_names_the_split(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = tmp_path / "imp"
    r.run("score", _score_args(inputs, out, "split=calib"), out, "split='calib'", "no calibration data")
    r.run("score", _score_args(inputs, out, "max_samples=0"), out, "max_samples=0 must be >= 1")


def test_score_with_fewer_samples_than_micro_batch_times_dp_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = tmp_path / "imp"
    r.run("score", _score_args(inputs, out, "max_samples=3"), out,
          "gives 3 calibration samples", "micro_batch_size x data-parallel size = 2 x 2", nproc=2)


def test_score_sequence_longer_than_the_model_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = tmp_path / "imp"
    r.run("score", _score_args(inputs, out, "seq_length=65"), out,
          "seq_length=65", "max_position_embeddings=64")


def test_score_block_larger_than_the_model_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = tmp_path / "imp"
    r.run("score", _score_args(inputs, out, "depth.block_size=3"), out,
          "depth.block_size=3 must be in [1, num_layers=2]")


def test_score_unknown_aggregation_and_missing_task_are_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = tmp_path / "imp"
    r.run("score", _score_args(inputs, out, "sequence=median"), out, "sequence='median'", "l2, mean, max")
    r.run("score", _score_args(inputs, out, "batch=max"), out, "batch='max'")
    r.run("score", [*_score_args(inputs, out)[:-1], "depth.accuracy=true"], out,
          "depth.task=default", "has no task.jsonl")


def test_score_into_its_checkpoint_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"], inputs["data"])
    out = inputs["ckpt"] / "importance"
    r.run("score", _score_args(inputs, out), out, "overlaps checkpoint=")


# --------------------------------------------------------------------------------------------------
# prune


def _prune_args(inputs, out: Path, *extra: str, importance: str = "random") -> list[str]:
    return [f"checkpoint={inputs['ckpt']}", f"importance={inputs['importance']}", f"output={out}",
            f"prune.importance={importance}", "prune.target.hidden_size=null", "prune.target.ffn_hidden_size=null",
            *extra]


@pytest.mark.parametrize("override,needles", [
    ("prune.target.hidden_size=64", ("prune.target.hidden_size=64", "32")),  # larger than the model
    ("prune.target.ffn_hidden_size=0", ("prune.target.ffn_hidden_size=0",)),  # an empty keep-set
    ("prune.target.num_attention_heads=3", ("num_attention_heads=3", "num_query_groups")),
    ("prune.target.num_layers=3", ("num_layers=3",)),
], ids=["larger", "empty", "heads-per-group", "more-layers"])
def test_prune_bad_target_is_refused(refusal, inputs, tmp_path, override, needles):
    r = refusal(inputs["ckpt"], inputs["importance"])
    out = tmp_path / "pruned"
    r.run("prune", _prune_args(inputs, out, override), out, *needles)


def test_prune_magnitude_depth_without_named_layers_is_refused(refusal, inputs, tmp_path):
    # weight norms give no layer scores: the refusal must say how to name the layers instead
    r = refusal(inputs["ckpt"], inputs["importance"])
    out = tmp_path / "pruned"
    r.run("prune", _prune_args(inputs, out, "prune.target.num_layers=1", importance="magnitude"), out,
          "prune.importance=magnitude", "prune.target.drop_layers")


def test_prune_target_the_tp_size_does_not_divide_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"])
    out = tmp_path / "pruned"
    r.run("prune", _prune_args(inputs, out, "prune.target.ffn_hidden_size=31", "parallel.tp=2"), out,
          "parallel.tp=2", "ffn_hidden_size=31", nproc=2)


def test_prune_with_an_artifact_of_another_checkpoint_is_refused(refusal, inputs, tmp_path):
    # same architecture, other weights: the artifact's recorded checkpoint hash does not match
    r = refusal(inputs["ckpt_corrupt"], inputs["importance"])
    out = tmp_path / "pruned"
    args = _prune_args(inputs, out, "prune.target.hidden_size=24", importance="activation")
    args[0] = f"checkpoint={inputs['ckpt_corrupt']}"
    r.run("prune", args, out, "another checkpoint", "sha256")


def test_prune_activation_without_an_artifact_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["ckpt"])
    out = tmp_path / "pruned"
    small = ["prune.target.hidden_size=24", "prune.target.ffn_hidden_size=null"]
    r.run("prune", [f"checkpoint={inputs['ckpt']}", "importance=null", f"output={out}", *small], out,
          "needs importance=")
    r.run("prune", [f"checkpoint={inputs['ckpt']}", f"importance={tmp_path / 'nope'}", f"output={out}", *small],
          out, f"importance={tmp_path / 'nope'} is not a directory")


# --------------------------------------------------------------------------------------------------
# dispatch


def test_unknown_stage_exits_2_with_one_error_line(tmp_path, inputs):
    proc = run_cli(["prnue", "source=x"], tmp_path, inputs["cache"])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert errors == [f"megatron-prune: error: unknown stage 'prnue'; choose one of: {', '.join(STAGES)}"]
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Hydra overrides: refused in one line with exit 2 (Hydra itself prints a report and exits 1)


@pytest.mark.parametrize("override,needles", [
    ("prune.target.hiden_size=384", ("prune.target.hiden_size", "Key 'hiden_size' is not in struct")),
    ("parallel.tp=abc", ("parallel.tp=abc", "could not be converted to Integer")),
    ("prune=nope", ("prune/nope", "choose one of:", "smollm2-135m-width")),
    ("prune.seed=[1", ("'[1'",)),
], ids=["unknown-key", "bad-type", "no-such-recipe", "unparsable"])
def test_bad_hydra_override_is_refused_in_one_line(refusal, inputs, tmp_path, override, needles):
    r = refusal(inputs["ckpt"], inputs["importance"])
    out = tmp_path / "pruned"
    r.run("prune", _prune_args(inputs, out, override), out, *needles)
