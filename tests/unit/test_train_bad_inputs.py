"""`correct` and `distill` refuse bad input before start-up: one `megatron-prune <stage>: error:` line
naming the field or file and the fix, exit 2, no output (nor a `.tmp-` sibling), inputs and a previous
run's resumable checkpoints byte-identical afterwards.

Every case runs the real CLI (`python -m megatron_prune`, or torchrun for the DP / layout cases) on
tiny local inputs made once for the module: a tokenizer, prepared data, a teacher (the tiny HF llama
converted), a narrower student, a model of another vocabulary and a student copy carrying another
tokenizer. The refusals happen before megatron is imported; the one real run (two `correct` steps
that leave resumable checkpoints) is shared by the resume cases.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.unit.test_bad_inputs import Refusal, run_cli, tree_digest

TEXT = ("the cat sat on the mat and looked at the hat . a dog ran to the cat and the cat ran "
        "to the mat . ") * 12
OTHER_TEXT = "one two three four five six seven eight nine ten eleven twelve"


def _save_hf(path: Path, tokenizer: Path, **overrides) -> Path:
    """The tiny llama of megatron_prune.convert.tiny with some fields changed, saved as HF with the
    tokenizer's files beside it (convert copies them into the checkpoint's tokenizer/)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_prune.convert.tiny import TINY_HF_CONFIGS

    spec = dict(TINY_HF_CONFIGS["llama"])
    spec.update(overrides)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(path))
    for f in tokenizer.iterdir():
        shutil.copy2(f, path / f.name)  # byte-identical to the data's tokenizer
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("train_bad_inputs")
    cache = root / "cache"
    cache.mkdir()
    d: dict[str, Path] = {"root": root, "cache": cache}
    texts = root / "texts"
    texts.mkdir()
    for i in range(8):
        (texts / f"doc{i}.txt").write_text(TEXT * (i + 1))
    tok = Path(build_tiny_tokenizer(str(root / "tokenizer"), [TEXT], 60))
    other_tok = Path(build_tiny_tokenizer(str(root / "other-tokenizer"), [OTHER_TEXT], 60))
    hf = {"teacher": _save_hf(root / "hf-teacher", tok),  # hidden 32, FFN 48, vocab 96, 64 positions
          "student": _save_hf(root / "hf-student", tok, hidden_size=24, intermediate_size=32),
          "vocab128": _save_hf(root / "hf-vocab128", tok, hidden_size=24, intermediate_size=32,
                               vocab_size=128)}
    d["data"] = root / "data"
    jobs = [["prepare-data", f"data.source={texts}", f"data.tokenizer_dir={tok}",
             f"data.output_dir={d['data']}", "data.task_examples=0"]]
    for name, src in hf.items():
        d[name] = root / name
        jobs.append(["convert", f"source={src}", f"output={d[name]}", "logger=none"])
    with ThreadPoolExecutor(len(jobs)) as pool:  # four subprocesses, mostly importing torch
        for job, proc in zip(jobs, pool.map(lambda a: run_cli(a, root, cache), jobs)):
            assert proc.returncode == 0, f"{job}\n{proc.stderr}"
    for name in hf:
        assert (d[name] / "COMPLETE").is_file() and (d[name] / "tokenizer" / "tokenizer.json").is_file()
    # the student with the same vocabulary size but another tokenizer (other token ids)
    d["student_other_tok"] = root / "student-other-tok"
    shutil.copytree(d["student"], d["student_other_tok"])
    shutil.rmtree(d["student_other_tok"] / "tokenizer")
    shutil.copytree(other_tok, d["student_other_tok"] / "tokenizer")
    return d


@pytest.fixture
def refusal(tmp_path, inputs):
    def make(*paths: Path) -> Refusal:
        return Refusal(tmp_path, inputs["cache"], list(paths))
    return make


# what every run here sets: tiny windows, no W&B run
TRAIN = ["train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.eval_samples=2"]


def _distill(inputs, out: Path, *extra: str, student: str = "student", teacher: str = "teacher") -> list[str]:
    teacher_dir = inputs[teacher] if teacher in inputs else teacher
    return [f"student={inputs[student]}", f"teacher={teacher_dir}", f"data_dir={inputs['data']}",
            f"output={out}", "logger=none", *(f"distill.{t}" for t in TRAIN), *extra]


def _correct(inputs, out: Path, *extra: str) -> list[str]:
    return [f"checkpoint={inputs['teacher']}", f"data_dir={inputs['data']}", f"output={out}", "logger=none",
            *(f"correct.{t}" for t in TRAIN), *extra]


# --------------------------------------------------------------------------------------------------
# distill: the two models must share one vocabulary


def test_distill_teacher_and_student_of_different_vocab_sizes_are_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["vocab128"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    r.run("distill", _distill(inputs, out, student="vocab128"), out,
          f"student={inputs['vocab128']} has vocab_size=128", f"teacher={inputs['teacher']} has 96",
          "distillation needs one vocabulary")


def test_distill_same_vocab_size_but_another_tokenizer_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["student_other_tok"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    r.run("distill", _distill(inputs, out, student="student_other_tok"), out,
          f"student={inputs['student_other_tok']} and teacher={inputs['teacher']} carry different tokenizers",
          "distil between models of one tokenizer")


def test_distill_missing_teacher_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["student"], inputs["data"])
    out = tmp_path / "out"
    missing = tmp_path / "no-teacher"
    r.run("distill", _distill(inputs, out, teacher=str(missing)), out,
          f"teacher={missing} does not exist", "pass the teacher checkpoint directory")


# --------------------------------------------------------------------------------------------------
# the batch arithmetic: global = micro x DP x accumulation


@pytest.mark.parametrize("stage", ["distill", "correct"])
def test_global_batch_not_divisible_by_the_micro_batch_is_refused(refusal, inputs, tmp_path, stage):
    r = refusal(inputs["student"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    make = _distill if stage == "distill" else _correct
    r.run(stage, make(inputs, out, f"{stage}.train.global_batch_size=6", f"{stage}.train.micro_batch_size=4"),
          out, f"{stage}.train.global_batch_size=6 is not divisible by {stage}.train.micro_batch_size=4",
          "choose a multiple of it")


@pytest.mark.parametrize("stage", ["distill", "correct"])
def test_global_batch_not_divisible_by_micro_batch_times_dp_is_refused(refusal, inputs, tmp_path, stage):
    # global 2 = micro 2 is fine in one process; two data-parallel ranks need a multiple of 4
    r = refusal(inputs["student"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    make = _distill if stage == "distill" else _correct
    r.run(stage, make(inputs, out, f"{stage}.train.global_batch_size=2"), out,
          "global_batch_size=2 is not divisible by", "micro_batch_size x data-parallel size = 2 x 2",
          "multiple of 4", nproc=2)


# --------------------------------------------------------------------------------------------------
# unknown fields and impossible values


@pytest.mark.parametrize("override,needles", [
    ("+distill.temperatur=2", ("distill: unknown fields ['temperatur']", "known fields are",
                               "'temperature'")),
    ("+distill.train.stepz=3", ("distill.train: unknown fields ['stepz']", "known fields are", "'steps'")),
    ("distill.train.stepz=3", ("distill.train.stepz", "not in struct")),  # without `+`: Hydra's own check
], ids=["loss", "train", "train-without-plus"])
def test_distill_unknown_field_is_refused(refusal, inputs, tmp_path, override, needles):
    r = refusal(inputs["student"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    r.run("distill", _distill(inputs, out, override), out, *needles)


def test_correct_unknown_train_field_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    r.run("correct", _correct(inputs, out, "+correct.train.lr_max=1"), out,
          "correct.train: unknown fields ['lr_max']", "known fields are")


@pytest.mark.parametrize("stage,override,needles", [
    ("distill", "distill.temperature=0", ("distill.temperature=0", "must be > 0")),
    ("distill", "distill.alpha_ce=-1", ("distill.alpha_ce=-1", "must be >= 0")),
    ("correct", "correct.train.warmup_steps=100", ("correct.train.warmup_steps=100",
                                                   "must be smaller than the decay length 100")),
    ("correct", "correct.train.lr=-1", ("correct.train.lr=-1", "need 0 <= min_lr <= lr, lr > 0")),
    ("correct", "correct.train.seq_length=65", ("seq_length=65", "max_position_embeddings=64")),
    ("distill", "distill.train.seq_length=65", ("seq_length=65", "max_position_embeddings=64")),
], ids=["temperature", "alpha-ce", "warmup", "lr", "correct-seq-length", "distill-seq-length"])
def test_impossible_value_is_refused(refusal, inputs, tmp_path, stage, override, needles):
    r = refusal(inputs["student"], inputs["teacher"], inputs["data"])
    out = tmp_path / "out"
    extra = [override, f"{stage}.train.steps=100"] if "warmup" in override else [override]
    make = _distill if stage == "distill" else _correct
    r.run(stage, make(inputs, out, *extra), out, *needles)


# --------------------------------------------------------------------------------------------------
# outputs never overlap inputs


def test_distill_output_inside_the_teacher_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["student"], inputs["teacher"], inputs["data"])
    out = inputs["teacher"] / "distilled"
    r.run("distill", _distill(inputs, out), out, f"output={out} overlaps teacher={inputs['teacher']}",
          "choose an output path outside it")


def test_correct_output_inside_the_checkpoint_is_refused(refusal, inputs, tmp_path):
    r = refusal(inputs["teacher"], inputs["data"])
    out = inputs["teacher"] / "corrected"
    r.run("correct", _correct(inputs, out), out, f"output={out} overlaps checkpoint={inputs['teacher']}")


# --------------------------------------------------------------------------------------------------
# resume: a previous run's checkpoints are continued only by the same config at the same layout

RUN = ["correct.train.steps=2", "correct.train.warmup_steps=1", "correct.train.save_interval=1",
       "correct.train.eval_interval=0", "correct.train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def resumable(inputs):
    """Two real `correct` steps that leave step_000001 and step_000002 in `<out>.checkpoints`; the
    output itself is then deleted, as if the run had been stopped before its end."""
    root = inputs["root"]
    out = root / "corrected"
    proc = run_cli(["correct", *_correct(inputs, out, *RUN)], root, inputs["cache"])
    assert proc.returncode == 0, proc.stderr
    ckpts = root / "corrected.checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]
    shutil.rmtree(out)
    return out, ckpts


def test_resume_with_a_changed_global_batch_is_refused_and_keeps_the_checkpoints(refusal, inputs, resumable):
    out, ckpts = resumable
    r = refusal(inputs["teacher"], inputs["data"], ckpts)
    line = r.run("correct", _correct(inputs, out, *RUN, "correct.train.global_batch_size=2"), out,
                 f"{ckpts / 'step_000002'} was written by a run that this config cannot continue",
                 "changed: global_batch_size: 4 -> 2", "resume with the same settings",
                 "overwrite=true")
    assert "seq_length" not in line  # only what changed is named


def test_resume_with_a_changed_decay_length_is_refused(refusal, inputs, resumable):
    # more steps with the decay over all steps moves the schedule: refused (decay_steps=2 would not be)
    out, ckpts = resumable
    r = refusal(inputs["teacher"], inputs["data"], ckpts)
    r.run("correct", _correct(inputs, out, *RUN, "correct.train.steps=4"), out,
          "changed: decay_steps: 2 -> 4")


def test_resume_at_another_pipeline_layout_is_refused(refusal, inputs, resumable):
    out, ckpts = resumable
    before = tree_digest(ckpts)
    r = refusal(inputs["teacher"], inputs["data"], ckpts)
    r.run("correct", _correct(inputs, out, *RUN, "parallel.pp=2"), out,
          "was written at tp1-pp1-dp1 and this run is tp1-pp2-dp1", "resume at the same parallel layout",
          nproc=2)
    assert tree_digest(ckpts) == before
