"""bench/kl.py pieces in one process at a tiny size: the naive and our KL agree (values and student
gradients) with each other and with the float64 definition, the naive gather's TP2 path (a faked
all_gather) gives the full-vocabulary KL and this rank's gradient slice, the inputs are shards of one
seeded tensor, the profiler peak sees a freed allocation, and the summary / JSON line carry the
ratios and the keys. No torchrun job is started."""
from __future__ import annotations

import argparse
import importlib
import json

import pytest
import torch

from megatron_prune.distill import reference_kl

T, V = 17, 96  # 17 tokens: chunks of 4 leave a partial one; seed 0 pads 5 of them


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.kl")  # the script, imported from the repository root


def _oracle_grad(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient of the masked mean of the float64 reference KL w.r.t. the (full) student: [T, V]."""
    s = student.detach().double().requires_grad_()
    kl = reference_kl(s, teacher.detach())  # [T]
    (grad,) = torch.autograd.grad((kl * mask.double()).sum() / mask.sum(), s)
    return grad


def test_defaults_and_options(bench):
    a = bench.build_parser().parse_args([])
    assert (a.vocab, a.tokens, a.repeats, a.layouts, a.chunk_tokens) == (49152, 2048, 3, [1, 2], None)
    assert not a.worker
    a = bench.build_parser().parse_args(["--layouts", "2", "--chunk-tokens", "64", "--tokens", "8"])
    assert (a.layouts, a.chunk_tokens, a.tokens) == ([2], 64, 8)


@pytest.mark.parametrize("text", ["", "1,x", "0", "1,-2"])
def test_bad_layout_list_is_refused(bench, text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_layouts(text)


def test_a_vocabulary_the_tp_size_does_not_divide_is_refused(bench):
    a = bench.build_parser().parse_args(["--vocab", "97", "--layouts", "1,2"])
    with pytest.raises(SystemExit, match="divisible by TP 2"):
        bench.check_args(a)


def test_inputs_are_contiguous_shards_of_the_same_seeded_logits(bench):
    s1, t1, m1 = bench.make_inputs(T, V, 1, 0)
    shards = [bench.make_inputs(T, V, 2, r) for r in range(2)]
    assert s1.requires_grad and not t1.requires_grad and s1.shape == (T, V)
    assert torch.equal(torch.cat([s.detach() for s, _, _ in shards], -1), s1.detach())
    assert torch.equal(torch.cat([t for _, t, _ in shards], -1), t1)
    assert all(torch.equal(m, m1) for _, _, m in shards)
    assert not torch.equal(s1.detach(), t1)  # student and teacher are different draws
    assert m1[0] == 1 and set(m1.tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("chunk", [None, 4])
def test_naive_and_ours_agree_with_each_other_and_the_definition_at_tp1(bench, chunk):
    student, teacher, mask = bench.make_inputs(T, V, 1, 0)
    got = {impl: bench.forward_backward(impl, student, teacher, mask, tp_group=None, chunk_tokens=chunk)
           for impl in bench.IMPLS}
    assert bench.max_rel_diff(got["ours"][0], got["naive"][0]) < 1e-5
    assert bench.max_rel_diff(got["ours"][1], got["naive"][1]) < 1e-5
    want_kl, want_grad = reference_kl(student.detach(), teacher), _oracle_grad(student, teacher, mask)
    for kl, grad in got.values():
        assert kl.shape == (T,) and grad.shape == (T, V) and not kl.requires_grad
        assert bench.max_rel_diff(kl, want_kl) < 1e-5
        assert bench.max_rel_diff(grad, want_grad) < 1e-5
        assert grad[mask == 0].abs().max() == 0  # padded tokens get no gradient
    assert student.grad is None  # the gradient is returned, not accumulated


def test_naive_gathers_the_vocabulary_and_keeps_its_gradient_slice_at_tp2(bench, monkeypatch):
    """Rank 1 of 2 with a faked all_gather that supplies rank 0's shard: the full-vocabulary KL, the
    gradient of its own columns only, and its two shards counted as sent."""
    from megatron_prune.importance import CommCounter

    student, teacher, mask = bench.make_inputs(T, V, 1, 0)
    vl = V // 2
    s0, s1 = student.detach()[:, :vl].clone(), student.detach()[:, vl:].clone().requires_grad_()
    t0, t1 = teacher[:, :vl].clone(), teacher[:, vl:].clone()
    peer = {s1.data_ptr(): s0, t1.data_ptr(): t0}  # this rank's shard -> rank 0's

    def all_gather_into_tensor(out, x, group=None):
        out.view(2, *x.shape)[0].copy_(peer[x.data_ptr()])
        out.view(2, *x.shape)[1].copy_(x)

    dist = bench.dist
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather_into_tensor", all_gather_into_tensor)
    comm = CommCounter()
    kl, grad = bench.forward_backward("naive", s1, t1, mask, tp_group=object(), comm=comm)
    assert bench.max_rel_diff(kl, reference_kl(student.detach(), teacher)) < 1e-5
    assert grad.shape == (T, vl)
    assert bench.max_rel_diff(grad, _oracle_grad(student, teacher, mask)[:, vl:]) < 1e-5
    assert comm.bytes_sent == 2 * T * vl * 4 and comm.collectives == 2


def test_tensor_peak_sees_an_allocation_that_is_freed_again():
    from bench._common import tensor_peak

    def fn():
        big = torch.ones(8 << 20, dtype=torch.uint8)  # 8 MiB, freed before returning
        del big
        return torch.ones(1 << 20, dtype=torch.uint8)  # 1 MiB, kept

    kept, peak, end = tensor_peak(fn)
    assert kept.numel() == 1 << 20
    assert peak >= 8 << 20 and end == 1 << 20


def _fake_worker(naive_peaks, ours_peaks, naive_runs, ours_runs, tp=2):
    per_rank = [{"rank": r, "peak_bytes": {"naive": n, "ours": o},
                 "comm_bytes": {"naive": 2 * 4 * 48 * 10 * (tp > 1), "ours": 20 * 10 * (tp > 1)},
                 "collectives": {"naive": 2, "ours": 3}, "max_rel_diff_kl": 1e-7 * (r + 1),
                 "max_rel_diff_grad": 3e-7 - 1e-7 * r}
                for r, (n, o) in enumerate(zip(naive_peaks, ours_peaks))]
    return {"tp": tp, "threads_per_rank": 1, "tokens": 10, "vocab": 96, "vocab_local": 96 // tp,
            "kept_tokens": 9, "chunk_tokens": 5, "shard_bytes": 10 * 96 // tp * 4,
            "runs_s": {"naive": naive_runs, "ours": ours_runs}, "per_rank": per_rank,
            "job_s": 1.0, "loadavg_1min": [0.1, 0.2], "cores": 2}


def test_layout_summary_takes_the_worst_rank_the_median_and_the_ratios(bench):
    s = bench.summarize_layout(_fake_worker([4000, 4200], [900, 1050], [3.0, 1.0, 2.0], [1.0, 9.0, 0.5]))
    assert s["naive"]["peak_bytes"] == 4200 and s["ours"]["peak_bytes"] == 1050
    assert s["peak_ratio"] == 0.25 and s["naive"]["peak_over_shard"] == round(4200 / 1920, 4)
    assert s["naive"]["time_s"] == 2.0 and s["ours"]["time_s"] == 1.0 and s["time_ratio"] == 0.5
    assert s["naive"]["comm_bytes_per_token"] == 2 * 4 * 48 and s["ours"]["comm_bytes_per_token"] == 20
    assert s["max_rel_diff_kl"] == 2e-7 and s["max_rel_diff_grad"] == 3e-7 and s["ranks"] == 2


def _fake_step_worker():
    teacher = {"name": "t", "hidden_size": 8, "ffn_hidden_size": 16, "num_layers": 2}
    student = {"name": "s", "hidden_size": 4, "ffn_hidden_size": 8, "num_layers": 2}
    return {"threads": 2, "warmup_s": {"distill": 9.0, "ce": 9.0},
            "runs_s": {"distill": [3.0, 9.0, 2.0], "ce": [1.0, 2.0, 1.5]},
            "cpu_s": {"distill": [5.0, 6.0, 4.0], "ce": [4.0, 4.0, 3.0]}, "teacher": teacher,
            "student": student, "job_s": 1.0, "loadavg_1min": [0.1, 0.2]}


def test_main_prints_a_table_then_one_json_line_with_every_key(bench, monkeypatch, capsys):
    peaks = {1: ([1000], [600]), 2: ([4000, 4000], [900, 800])}  # TP1 misses the goal (0.6)

    def fake_run_layout(a, tp, cores, workdir):
        return _fake_worker(*peaks[tp], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], tp=tp)

    monkeypatch.setattr(bench, "run_layout", fake_run_layout)
    monkeypatch.setattr(bench, "run_step_job", lambda a, cores, workdir: _fake_step_worker())
    out = bench.main(["--vocab", "96", "--tokens", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out and len(lines) > 4
    assert any(line.split()[:2] == ["tp2", "ours/naive"] for line in lines)
    assert out["goal_peak_ratio"] == 0.5 and out["meets_goal"] is False
    step = out["distill_step_over_ce_step"]  # medians 3.0 / 1.5
    assert (step["distill_s"], step["ce_s"], step["ratio"]) == (3.0, 1.5, 2.0)
    assert (step["cpu_distill_s"], step["cpu_ce_s"], step["cpu_ratio"]) == (5.0, 4.0, 1.25)
    assert any("distill 3.00 s / CE 1.50 s = 2.00 (CPU time: 1.25" in line for line in lines)
    assert out["tp1"]["peak_ratio"] == 0.6 and out["tp2"]["peak_ratio"] == 0.225
    for key in ("naive", "ours"):
        assert {"peak_bytes", "peak_mib", "time_s", "comm_bytes_per_token"} <= set(out["tp2"][key])
    assert {"time_ratio", "max_rel_diff_kl", "max_rel_diff_grad"} <= set(out["tp1"])

    peaks[1] = ([1000], [500])  # at the goal: met
    assert bench.main(["--vocab", "96", "--tokens", "10"])["meets_goal"] is True
    assert bench.main(["--vocab", "96", "--step-repeats", "0"])["distill_step_over_ce_step"] is None


def test_the_step_comparison_uses_smollm2_and_its_default_pruned_student(bench):
    teacher, student = bench.step_models()
    assert (teacher.hidden_size, teacher.ffn_hidden_size) == (576, 1536)
    assert (student.hidden_size, student.ffn_hidden_size) == (384, 1024)
    for name in ("num_attention_heads", "num_query_groups", "kv_channels", "num_layers", "vocab_size"):
        assert getattr(student, name) == getattr(teacher, name)
    batches = bench.step_batches(96)
    assert len(batches) == bench.STEP_MICRO_BATCHES
    assert batches[0].shape == (bench.STEP_MICRO_BATCH, bench.STEP_SEQ_LENGTH)
    assert torch.equal(batches[0].labels[:, :-1], batches[0].tokens[:, 1:])  # next-token targets


def test_goal_needs_a_measured_layout(bench):
    assert bench.meets_goal({"distill_step_over_ce_step": None}) is False
    assert bench.meets_goal({"tp1": {"peak_ratio": 0.5}, "note": "x"}) is True
