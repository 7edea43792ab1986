"""Training gives the same numbers at every layout: two optimizer steps of distillation (KL at τ=2 plus
0.5 x CE, a teacher wider and deeper than the student) and of LM cross-entropy, through the real loop
(train/loop.py: megatron's schedule, DDP, optimizer, scheduler, validation and the final resumable
checkpoint), at TP2, PP2, TP2xPP2 and DP2 with the distributed optimizer, against TP1/PP1 in one
process: per-step loss, KL, CE and grad norm, the validation metrics, and the student's weights
after the last step (gathered to full tensors in the test only).

Adam's first steps divide each gradient by its own magnitude, so a weight whose gradient is ~0 moves
by up to lr in a direction set by float rounding; the test uses adam_eps=1e-4 so that such weights
move by ~0 instead, and compares weights to a tolerance far below lr."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 1, False), (2, 1, 2, False), (1, 2, 2, False), (2, 2, 4, False), (1, 1, 2, True)]
LR = 1e-3


def _windows(n: int, s: int, vocab: int):
    from megatron_prune.data.loaders import TokenWindows

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (n, s + 1), generator=g)  # [n, s + 1]
    mask = torch.ones(n, s)
    mask[::3, s // 2:] = 0  # some rows end early, like the last window of a document
    return TokenWindows(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                        loss_mask=mask, document_ids=torch.arange(n), sample_ids=torch.arange(n))


def _train_at(tp: int, pp: int, distributed_optimizer: bool, kind: str, root: str) -> dict:
    from megatron_prune.distill.pair import DISTILL_METRICS, DistillPair, distill_forward
    from megatron_prune.log import RunLogger
    from megatron_prune.config import LoggerConfig
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import gather_full_state, load_full_state
    from megatron_prune.runtime import init_runtime
    from megatron_prune.train.loop import TrainJob, train
    from megatron_prune.train.optim import make_trainable
    from megatron_prune.train.settings import TrainSettings
    from megatron_prune.train.step import LM_METRICS, lm_forward

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    scfg = tiny_config(hidden_size=48, ffn_hidden_size=96, num_layers=2)
    student = build_model(scfg, groups)
    load_full_state(student, random_full_state(scfg, 1).__getitem__, groups)
    s = TrainSettings(steps=2, global_batch_size=4, micro_batch_size=1, seq_length=16, lr=LR, min_lr=LR / 10,
                      warmup_steps=1, adam_eps=1e-4, eval_interval=0, eval_samples=6, save_interval=0,
                      distributed_optimizer=distributed_optimizer)
    ddp, optimizer, scheduler = make_trainable(student, s)
    layout = f"{groups.layout}-{'distopt' if distributed_optimizer else 'adam'}"
    job = TrainJob(settings=s, train=_windows(12, 16, scfg.vocab_size), validation=_windows(6, 16, scfg.vocab_size),
                   checkpoint_dir=Path(root) / f"{kind}-{layout}", continuation={}, provenance={}, name=kind)
    logger = RunLogger(LoggerConfig(kind="none"), kind, {}, groups.is_rank0)
    if kind == "distill":
        tcfg = tiny_config(num_layers=4)
        teacher = build_model(tcfg, groups)
        load_full_state(teacher, random_full_state(tcfg, 2).__getitem__, groups)
        pair = DistillPair(ddp, teacher, groups)
        forward = distill_forward(groups, temperature=2.0, alpha_ce=0.5)
        result = train(pair, ddp, student, scfg, optimizer, scheduler, forward, DISTILL_METRICS, job, groups,
                       logger, adjust_tensor_shapes_fn=pair.adjust_tensor_shapes)
    else:
        result = train(ddp, ddp, student, scfg, optimizer, scheduler, lm_forward, LM_METRICS, job, groups, logger)
    full = gather_full_state(student, groups)
    return {"layout": layout, "history": result.state.history, "validation": result.state.validation,
            "weights": full if groups.is_rank0 else None}


@pytest.fixture(scope="module")
def results(pools, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train-layouts"))
    return {(kind, layout): pools.run(layout[2], _train_at, layout[0], layout[1], layout[3], kind, root)
            for kind in ("distill", "lm") for layout in LAYOUTS}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("kind", ["distill", "lm"])
def test_each_step_has_the_same_losses_and_grad_norm_at_every_layout(results, kind):
    reference = results[(kind, LAYOUTS[0])][0]
    keys = ("loss", "kl", "ce", "grad_norm") if kind == "distill" else ("loss", "ce", "grad_norm")
    assert len(reference["history"]) == 2 and len(reference["validation"]) == 2
    assert reference["history"][0]["lr"] == pytest.approx(LR)  # warmup 1: the first step at the peak
    for layout in LAYOUTS[1:]:
        for rank, got in enumerate(results[(kind, layout)]):
            for step, (row, ref) in enumerate(zip(got["history"], reference["history"])):
                for key in keys:
                    assert _rel(row[key], ref[key]) <= 2e-5, (got["layout"], rank, step, key, row[key], ref[key])
                assert row["lr"] == ref["lr"]
            for row, ref in zip(got["validation"], reference["validation"]):
                for key in keys[:-1]:
                    assert _rel(row[key], ref[key]) <= 2e-5, (got["layout"], rank, "validation", key)


@pytest.mark.parametrize("kind", ["distill", "lm"])
def test_the_updated_weights_are_the_same_at_every_layout(results, kind):
    reference = results[(kind, LAYOUTS[0])][0]["weights"]
    initial = random_full_state(tiny_config(hidden_size=48, ffn_hidden_size=96, num_layers=2), 1)
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    assert moved > LR / 2  # the steps did move the weights
    for layout in LAYOUTS[1:]:
        got = results[(kind, layout)][0]["weights"]
        assert set(got) == set(reference)
        worst = max(float((got[k] - reference[k]).abs().max()) for k in reference)
        assert worst <= LR * 1e-2, (layout, worst)


def _resume_at(tp: int, pp: int, root: str) -> dict:
    """Weights after 4 steps straight, and after 2 steps, a checkpoint, fresh objects and 2 more."""
    from megatron_prune.config import LoggerConfig
    from megatron_prune.log import RunLogger
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import gather_full_state, load_full_state
    from megatron_prune.runtime import init_runtime
    from megatron_prune.train.loop import TrainJob, train
    from megatron_prune.train.optim import make_trainable
    from megatron_prune.train.settings import TrainSettings
    from megatron_prune.train.step import LM_METRICS, lm_forward

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    cfg = tiny_config(num_layers=2)

    def run(steps: int, where: str):
        model = build_model(cfg, groups)
        load_full_state(model, random_full_state(cfg, 1).__getitem__, groups)
        s = TrainSettings(steps=steps, decay_steps=4, global_batch_size=4, micro_batch_size=1, seq_length=16,
                          lr=LR * 10, warmup_steps=1, eval_interval=0, eval_samples=2, save_interval=2)
        ddp, optimizer, scheduler = make_trainable(model, s)
        job = TrainJob(settings=s, train=_windows(12, 16, cfg.vocab_size), validation=_windows(2, 16, cfg.vocab_size),
                       checkpoint_dir=Path(root) / f"resume-{groups.layout}-{where}", continuation={}, provenance={})
        result = train(ddp, ddp, model, cfg, optimizer, scheduler, lm_forward, LM_METRICS, job, groups,
                       RunLogger(LoggerConfig(kind="none"), "lm", {}, groups.is_rank0))
        return gather_full_state(model, groups), result

    straight, _ = run(4, "straight")
    run(2, "stopped")
    resumed, result = run(4, "stopped")
    return {"resumed_from": result.resumed_from, "lrs": [r["lr"] for r in result.state.history],
            "different": sorted(k for k in straight if not torch.equal(straight[k], resumed[k]))}


def test_a_resumed_run_continues_bit_exactly_at_tp2xpp2(pools, tmp_path):
    for got in pools.run(4, _resume_at, 2, 2, str(tmp_path)):
        assert got["resumed_from"] == 2
        assert got["different"] == [], got["different"]
        # the scheduler continued where it stopped: warmup 1, then cosine over 4 steps
        lrs = got["lrs"]  # the resumed run's history includes the two steps before the checkpoint
        assert lrs[0] == pytest.approx(LR * 10) and lrs[1] > lrs[2] > lrs[3] == pytest.approx(1e-5)
