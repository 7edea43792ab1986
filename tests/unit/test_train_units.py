"""train/ pieces in one process: the settings' checks and continuation key, the batch arithmetic, the
learning-rate convention of build_scheduler (against the formula written here), resumable-checkpoint
discovery and the resume checks, the state's JSON and RNG round trips, the stop-signal handler and
the masked sums of the loss. No process group, no model."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time

import pytest
import torch

from megatron_prune.config import ConfigError
from megatron_prune.train import state as ckpt
from megatron_prune.train.settings import CONTINUATION_FIELDS, TrainSettings, train_settings_from

# --------------------------------------------------------------------------------------------------
# TrainSettings


def test_the_defaults_are_valid():
    s = train_settings_from({})
    assert s == TrainSettings() and s.total_decay_steps == s.steps


@pytest.mark.parametrize("fields,needles", [
    ({"steps": 0}, ("where.steps=0", "integer >= 1")),
    ({"global_batch_size": 2.5}, ("where.global_batch_size=2.5", "integer >= 1")),
    ({"micro_batch_size": True}, ("where.micro_batch_size=True", "integer >= 1")),
    ({"seq_length": -1}, ("where.seq_length=-1",)),
    ({"eval_samples": 0}, ("where.eval_samples=0",)),
    ({"keep_checkpoints": 0}, ("where.keep_checkpoints=0",)),
    ({"log_interval": 0}, ("where.log_interval=0",)),
    ({"warmup_steps": -1}, ("where.warmup_steps=-1", "integer >= 0")),
    ({"eval_interval": -1}, ("where.eval_interval=-1", "integer >= 0")),
    ({"save_interval": -2}, ("where.save_interval=-2", "integer >= 0")),
    ({"decay_style": "exp"}, ("where.decay_style='exp'", "cosine, linear, constant")),
    ({"decay_steps": 50}, ("where.decay_steps=50 is shorter than where.steps=100", "or null")),
    ({"warmup_steps": 100}, ("where.warmup_steps=100", "smaller than the decay length 100")),
    ({"warmup_steps": 150, "decay_steps": 150}, ("where.warmup_steps=150", "decay length 150")),
    ({"lr": 0.0, "min_lr": 0.0}, ("where.lr=0.0", "lr > 0")),
    ({"lr": 1e-4, "min_lr": 1e-3}, ("where.min_lr=0.001", "min_lr <= lr")),
    ({"min_lr": -1e-6}, ("where.min_lr=-1e-06", "0 <= min_lr")),
    ({"adam_beta1": 1.0}, ("where.adam_beta1=1.0", "[0, 1)")),
    ({"adam_beta2": -0.1}, ("where.adam_beta2=-0.1", "[0, 1)")),
    ({"adam_eps": -1e-8}, ("where.adam_eps=-1e-08", ">= 0")),
    ({"weight_decay": -0.1}, ("where.weight_decay=-0.1", ">= 0")),
    ({"clip_grad": -1.0}, ("where.clip_grad=-1.0", ">= 0")),
    ({"global_batch_size": 6, "micro_batch_size": 4},
     ("where.global_batch_size=6 is not divisible by where.micro_batch_size=4",)),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_each_bad_field_is_named(fields, needles):
    with pytest.raises(ConfigError) as err:
        train_settings_from(fields, where="where")
    for needle in needles:
        assert needle in str(err.value)


def test_the_edges_that_are_allowed():
    # warmup may be 0, min_lr may equal lr or be 0, decay may outlast the run, clipping may be off
    s = train_settings_from({"warmup_steps": 0, "lr": 1e-4, "min_lr": 1e-4, "clip_grad": 0.0,
                             "decay_steps": 400, "save_interval": 0, "eval_interval": 0})
    assert s.total_decay_steps == 400
    assert train_settings_from({"warmup_steps": 99, "min_lr": 0.0}).warmup_steps == 99


def test_unknown_fields_are_named_with_the_known_ones():
    with pytest.raises(ConfigError) as err:
        train_settings_from({"stepz": 3, "lr": 1e-4, "aaa": 1}, where="distill.train")
    msg = str(err.value)
    assert msg.startswith("distill.train: unknown fields ['aaa', 'stepz']")
    assert "'steps'" in msg and "'lr'" not in msg.split(";")[0]


@pytest.mark.parametrize("field, value", [("lr", "abc"), ("clip_grad", None), ("seed", 1.5),
                                          ("decay_steps", "10"), ("distributed_optimizer", 1)])
def test_a_value_of_the_wrong_type_is_named(field, value):
    with pytest.raises(ConfigError, match=f"correct.train.{field}="):
        train_settings_from({field: value}, where="correct.train")


def test_continuation_uses_the_decay_length_in_effect():
    a = TrainSettings(steps=100)
    assert a.continuation()["decay_steps"] == 100
    assert set(a.continuation()) == {*CONTINUATION_FIELDS, "decay_steps"}
    # the same schedule however it was written down
    assert TrainSettings(steps=100, decay_steps=100).continuation() == a.continuation()
    # more steps with decay over all steps moves the schedule; with a fixed decay length it does not
    assert TrainSettings(steps=200).continuation() != a.continuation()
    assert (TrainSettings(steps=100, decay_steps=300).continuation()
            == TrainSettings(steps=300, decay_steps=300).continuation())
    # what may change between restarts is not part of it
    assert TrainSettings(steps=100, micro_batch_size=4, save_interval=7).continuation() == a.continuation()


# --------------------------------------------------------------------------------------------------
# check_data_parallel


@pytest.mark.parametrize("glob,micro,dp,want", [(16, 2, 4, 2), (8, 2, 1, 4), (8, 8, 1, 1), (12, 2, 3, 2)])
def test_micro_batches_per_rank(glob, micro, dp, want):
    assert TrainSettings(global_batch_size=glob, micro_batch_size=micro).check_data_parallel(dp) == want


def test_a_global_batch_that_dp_does_not_divide_is_refused_with_the_multiple_to_use():
    s = TrainSettings(global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ConfigError) as err:
        s.check_data_parallel(3, where="distill.train")
    assert str(err.value) == ("distill.train.global_batch_size=8 is not divisible by "
                              "distill.train.micro_batch_size x data-parallel size = 2 x 3; "
                              "choose a global batch that is a multiple of 6")


# --------------------------------------------------------------------------------------------------
# build_scheduler: step i (0-based) trains at num_steps = i + 1


def _expected_lr(i: int, *, lr: float, min_lr: float, warmup: int, decay: int, style: str) -> float:
    n = i + 1
    if warmup and n <= warmup:
        return lr * n / warmup
    if style == "constant":
        return lr
    ratio = (n - warmup) / (decay - warmup)
    coeff = 0.5 * (1 + math.cos(math.pi * ratio)) if style == "cosine" else 1 - ratio
    return min_lr + (lr - min_lr) * coeff


def _lrs(s: TrainSettings, steps: int):
    """The rate each step uses, read as the loop does (before the step), and the scheduler."""
    from megatron_prune.train.optim import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)  # only param_groups is used
    scheduler = build_scheduler(opt, s)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out, scheduler


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_scheduler_warms_up_from_lr_over_warmup_and_ends_at_min_lr(style):
    s = TrainSettings(steps=10, lr=1.0, min_lr=0.1, warmup_steps=4, decay_style=style)
    got, _ = _lrs(s, 10)
    want = [_expected_lr(i, lr=1.0, min_lr=0.1, warmup=4, decay=10, style=style) for i in range(10)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # no wasted step at lr 0
    assert got[-1] == pytest.approx(1.0 if style == "constant" else 0.1)


def test_scheduler_decays_over_decay_steps_when_given():
    s = TrainSettings(steps=10, decay_steps=20, lr=1.0, min_lr=0.1, warmup_steps=4)
    got, _ = _lrs(s, 10)
    want = [_expected_lr(i, lr=1.0, min_lr=0.1, warmup=4, decay=20, style="cosine") for i in range(10)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[-1] > 0.5  # half-way through the decay


def test_scheduler_without_warmup_starts_decaying_at_the_first_step():
    got, _ = _lrs(TrainSettings(steps=10, lr=1.0, min_lr=0.0, warmup_steps=0), 10)
    assert got == pytest.approx([_expected_lr(i, lr=1.0, min_lr=0.0, warmup=0, decay=10, style="cosine")
                                 for i in range(10)])
    assert got[-1] == 0.0


def test_scheduler_resumed_as_the_loop_does_continues_the_same_rates():
    from megatron_prune.train.optim import build_scheduler, restore_scheduler

    s = TrainSettings(steps=10, lr=1.0, min_lr=0.1, warmup_steps=4)
    full, _ = _lrs(s, 10)
    _, stopped = _lrs(s, 5)  # five steps done, then checkpointed
    saved = json.loads(json.dumps(stopped.state_dict()))  # through train_state.json
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    resumed = build_scheduler(opt, s)  # make_trainable, then the loop's restore
    restore_scheduler(resumed, saved)
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"])
        resumed.step(increment=1)
    assert got == pytest.approx(full[5:], rel=1e-12)
    assert resumed.num_steps == saved["num_steps"] + 5 == 11


# --------------------------------------------------------------------------------------------------
# train/state.py: finding checkpoints, resume checks, the state's JSON, the RNG encoding


def _step(root, name: str, complete: bool = True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "COMPLETE").write_text("")
    return path


def test_complete_checkpoints_are_found_oldest_first_by_step_number(tmp_path):
    _step(tmp_path, "step_000010")
    _step(tmp_path, "step_1000000")  # 7 digits: after step_999999 by number, before it by name
    _step(tmp_path, "step_999999")
    _step(tmp_path, "step_000002")
    _step(tmp_path, "step_000011", complete=False)  # unfinished: no marker
    _step(tmp_path, ".step_000012.tmp-abc123")  # an atomic write in progress (its marker already in)
    _step(tmp_path, "step_12")  # not a name we write
    _step(tmp_path, "step_000013x")
    (tmp_path / "step_000014").write_text("a file")
    found = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_000002", "step_000010", "step_999999", "step_1000000"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1000000"
    assert ckpt.complete_checkpoints(tmp_path / "missing") == []
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.step_dir(tmp_path, 40) == tmp_path / "step_000040"


def _saved(tmp_path, continuation, layout="tp1-pp1-dp1"):
    path = _step(tmp_path, "step_000003")
    state = ckpt.TrainState(step=3, consumed_samples=24, continuation=continuation, layout=layout)
    (path / ckpt.STATE_FILE).write_text(state.to_json())
    return path, state


def test_check_resumable_returns_the_state_when_nothing_changed(tmp_path):
    cont = {**TrainSettings().continuation(), "checkpoint": "abc"}
    path, state = _saved(tmp_path, cont)
    assert ckpt.check_resumable(path, dict(cont), "tp1-pp1-dp1") == state


def test_check_resumable_names_each_changed_key_and_only_those(tmp_path):
    cont = {**TrainSettings(global_batch_size=8).continuation(), "checkpoint": "abc"}
    path, _ = _saved(tmp_path, cont)
    now = {**cont, "global_batch_size": 16, "checkpoint": "def", "loss": {"temperature": 2.0}}
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(path, now, "tp1-pp1-dp1")
    msg = str(err.value)
    assert msg.startswith(f"{path} was written by a run that this config cannot continue; changed: ")
    assert "checkpoint: 'abc' -> 'def'; global_batch_size: 8 -> 16; loss: None -> {'temperature': 2.0}" in msg
    assert "seq_length" not in msg and f"overwrite=true (deletes {tmp_path})" in msg


def test_check_resumable_names_the_layout_mismatch(tmp_path):
    cont = TrainSettings().continuation()
    path, _ = _saved(tmp_path, cont, layout="tp1-pp1-dp1")
    with pytest.raises(ConfigError) as err:
        ckpt.check_resumable(path, cont, "tp1-pp2-dp1")
    msg = str(err.value)
    assert f"{path} was written at tp1-pp1-dp1 and this run is tp1-pp2-dp1" in msg
    assert "parallel.tp / parallel.pp" in msg and "overwrite=true" in msg


def test_a_damaged_state_file_is_named(tmp_path):
    path = _step(tmp_path, "step_000001")
    (path / ckpt.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"{path / ckpt.STATE_FILE}: cannot read the training")):
        ckpt.check_resumable(path, {}, "tp1-pp1-dp1")
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, "surprise": 2}))
    with pytest.raises(ConfigError, match=re.escape(f"delete {path} to resume from the one before")):
        ckpt.TrainState.from_file(path / ckpt.STATE_FILE)


def test_train_state_json_round_trip(tmp_path):
    state = ckpt.TrainState(step=7, consumed_samples=56, scheduler={"num_steps": 8, "max_lr": 1e-4},
                            continuation={**TrainSettings().continuation(), "loss": {"temperature": 1.5}},
                            layout="tp2-pp1-dp1", history=[{"step": 1, "loss": 2.5, "lr": 1e-5}],
                            validation=[{"step": 0, "ce": 3.25}], wall_seconds=12.5)
    (tmp_path / "s.json").write_text(state.to_json())
    back = ckpt.TrainState.from_file(tmp_path / "s.json")
    assert back == state and back.to_json() == state.to_json()


def test_rng_state_base64_round_trip_is_exact():
    torch.manual_seed(1234)
    torch.rand(5)
    saved = torch.get_rng_state()
    text = ckpt._b64(saved)
    assert isinstance(text, str) and json.loads(json.dumps(text)) == text
    back = ckpt._unb64(text)
    assert back.dtype == torch.uint8 and torch.equal(back, saved)
    want = torch.rand(8)
    torch.set_rng_state(back)
    assert torch.equal(torch.rand(8), want)  # the same stream continues
    # any dtype goes through as its bytes
    x = torch.arange(6, dtype=torch.int64)
    assert torch.equal(ckpt._unb64(ckpt._b64(x)).view(torch.int64), x)


# --------------------------------------------------------------------------------------------------
# StopRequest


def _sentinel(signum, frame):  # pragma: no cover - must never run
    raise AssertionError("the previous handler ran inside StopRequest")


def test_sigterm_inside_stop_request_is_remembered_not_fatal_and_handlers_come_back():
    from megatron_prune.train.loop import StopRequest

    old = {sig: signal.signal(sig, _sentinel) for sig in StopRequest.SIGNALS}
    try:
        with StopRequest() as stop:
            assert not stop.requested and not stop.any_rank()
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)  # the handler runs in the main thread between bytecodes
            assert stop.requested and stop.any_rank()
        for sig in StopRequest.SIGNALS:
            assert signal.getsignal(sig) is _sentinel
        with StopRequest() as again:  # SIGUSR1 too (what Slurm sends before the time limit)
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not again.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert again.requested
        assert signal.getsignal(signal.SIGUSR1) is _sentinel
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_stop_request_outside_the_main_thread_installs_nothing():
    from megatron_prune.train.loop import StopRequest

    errors = []

    def run():
        try:
            with StopRequest() as stop:
                assert not stop.requested
        except Exception as e:  # pragma: no cover - signal.signal raises ValueError off the main thread
            errors.append(e)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------------------------
# masked_sums


def test_masked_sums_keep_nan_and_inf_at_masked_positions_out_of_values_and_gradients():
    from megatron_prune.train.step import masked_sums

    x = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 3.0, -float("inf")]], requires_grad=True)
    y = torch.tensor([[0.5, 0.5, float("nan")], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])  # a weight of 0.5 counts half
    sx, sy = masked_sums([x, y], mask)
    assert sx.dtype == torch.float32 and sy.dtype == torch.float64  # each in its own dtype
    assert sx.item() == 1.0 + 2.0 + 0.5 * 3.0
    assert math.isnan(sy.item())  # a NaN at a counted position is not hidden
    sx.backward()
    assert torch.equal(x.grad, mask)  # finite, zero where masked
    y2 = torch.tensor([[0.5, float("nan")]], requires_grad=True)
    (s,) = masked_sums([y2], torch.tensor([[1, 0]]))  # an integer mask works too
    assert s.item() == 0.5
