"""bench/surgery.py helpers: argument parsing, the named targets, the gather-and-reshard byte count,
the pipeline moves, the RSS / wire counters and the summary of a (fake) worker result. No model is run."""
from __future__ import annotations

import argparse
import importlib

import pytest
import torch

@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.surgery")  # the script, imported from the repository root


def test_defaults_measure_tp1_tp3_pp2_width_and_both(bench):
    a = bench.build_parser().parse_args([])
    assert a.layouts == [(1, 1), (3, 1), (1, 2)] and a.targets == ["width", "both"] and not a.worker
    assert bench.build_parser().parse_args(["--layouts", "3x2"]).layouts == [(3, 2)]


@pytest.mark.parametrize("text", ["", "1", "1x", "x2", "0x1", "1x0", "axb"])
def test_bad_layout_list_is_refused(bench, text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_layouts(text)


@pytest.mark.parametrize("text", ["", "width,shallow"])
def test_bad_target_list_is_refused(bench, text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_targets(text)


def test_targets_come_from_the_smollm2_recipes(bench):
    width, depth, both = (bench.prune_target(n) for n in ("width", "depth", "both"))
    assert (width.hidden_size, width.ffn_hidden_size, width.num_layers) == (384, 1024, None)
    assert (depth.hidden_size, depth.num_layers) == (None, 20)
    assert (both.hidden_size, both.ffn_hidden_size, both.num_layers) == (384, 1024, 20)
    assert both.depth_metric == depth.depth_metric


def test_ffn_target_is_rounded_to_a_multiple_of_every_tp_in_the_run(bench):
    assert bench.ffn_multiple([(1, 1), (3, 1), (1, 2)]) == 3
    assert bench.ffn_multiple([(1, 1), (1, 2)]) == 1
    assert bench.prune_target("width", 3).ffn_hidden_size == 1023
    assert bench.prune_target("both", 1).ffn_hidden_size == 1024
    assert bench.prune_target("depth", 3).ffn_hidden_size is None


def test_gather_sends_each_shard_to_the_other_tp_ranks(bench):
    assert bench.gather_tp_bytes([100, 20], 3) == 2 * 120
    assert bench.gather_tp_bytes([100, 20], 1) == 0


def test_moved_layers_follow_the_rebalanced_pipeline(bench):
    # 30 -> 20 layers at PP2, dropping old 10..19: old stage 0 keeps 0..9 (new 0..9, stage 0);
    # old 20..29 (stage 1) become new 10..19 (stage 1): nothing moves
    assert bench.moved_layers([*range(10), *range(20, 30)], 30, 2) == []
    # dropping old 0..9: old 10..14 (stage 0) become new 0..4 (stage 0); old 15..19 (stage 1) become
    # new 5..9 (stage 0): five layers move from stage 1 to stage 0
    assert bench.moved_layers(list(range(10, 30)), 30, 2) == [(n, 1, 0) for n in range(5, 10)]
    assert bench.moved_layers(list(range(30)), 30, 1) == []


def test_rss_watch_sees_an_allocation_that_is_freed_again(bench):
    bench.trim_heap()
    before = bench.rss_bytes()
    with bench.RssWatch(0.001) as watch:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        del x
        got = watch.take()
    assert got["peak"] - before >= 48 << 20
    assert got["rss"] < got["peak"]


def test_wire_counter_counts_only_other_ranks_splits(bench, monkeypatch):
    import torch.distributed as dist

    calls = []
    a2a, send = (lambda *a, **k: calls.append("a2a")), (lambda *a, **k: calls.append("send"))
    monkeypatch.setattr(dist, "all_to_all_single", a2a)
    monkeypatch.setattr(dist, "send", send)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    with bench.WireCounter() as wire:
        dist.all_to_all_single(torch.empty(9), torch.empty(9), [3, 3, 3], [2, 4, 3])  # flat fp32
        dist.all_to_all_single(torch.empty(6, 5), torch.empty(6, 5))  # even split of 6 rows of 5
        dist.send(torch.empty(7, dtype=torch.float64), group_dst=0)
    assert calls == ["a2a", "a2a", "send"]
    assert wire.self_bytes == 4 * 4 + 2 * 5 * 4
    assert wire.tp_bytes == (2 + 3) * 4 + 4 * 5 * 4
    assert wire.pp_bytes == 7 * 8 and wire.calls == 3
    assert dist.all_to_all_single is a2a and dist.send is send  # restored after the block


def _fake_rank(rank, model, peaks, wire_tp, comm_tp, gather_tp, gather_min_tp, surgery, save, tensor_peak):
    runs = [{"surgery_s": s, "save_s": v, "surgery_cpu_s": s, "save_cpu_s": v, "build_s": s / 2,
             "checkpoint_bytes": 10, "rss_before": 1000, "rss_after": 1000 + model // 2, "peak_extra": p,
             "build_peak_extra": p // 2, "fill_peak_extra": p, "after_build_extra": p // 2,
             "hwm_used": True, "rss_samples": 50, "comm_tp": comm_tp, "comm_pp": 0, "wire_tp": wire_tp,
             "wire_pp": 0, "wire_other": 30, "wire_self": comm_tp - wire_tp, "wire_calls": 4,
             "new_bytes": model // 2, "new_layer_bytes": 7} for p, s, v in zip(peaks, surgery, save)]
    return {"rank": rank, "tp_rank": rank, "pp_rank": 0, "model_bytes": model, "runs": runs,
            "tensors": {"peak": tensor_peak, "build_peak": 500, "after_build": 500, "fill_peak": tensor_peak,
                        "end": 500, "events": 9},
            "gather_tp": gather_tp, "gather_min_tp": gather_min_tp, "stage_moves": 0, "layers_sent": 0}


def test_summary_reports_the_worst_rank_and_the_ratios(bench):
    t = {"per_rank": [_fake_rank(0, 1000, [600, 700], 100, 150, 800, 400, [2.0, 1.0], [4.0, 5.0], 650),
                      _fake_rank(1, 1000, [500, 550], 120, 160, 800, 400, [2.0, 1.0], [4.0, 5.0], 690)],
         "parameters": {"before": 10, "after": 5}, "target_config": {}}
    s = bench.summarize_target(t, [0.5, 1.0], 2)
    assert s["peak_over_model"] == 1.7 and s["extra_over_model"] == 0.7 and s["worst_rank"] == 0
    assert s["tensor_peak_over_model"] == 1.69 and s["tensor_worst_rank"] == 1
    assert s["tensor_fill_transient_over_model"] == 0.19
    assert not s["goal_met"] and s["new_over_model"] == 0.5
    assert s["wire_surgery_bytes_per_rank"] == 120 and s["wire_bytes_per_rank"] == 150
    assert s["wire_build_bytes_per_rank"] == 30 and s["comm_bytes_per_rank"] == 160
    assert s["gather_bytes_per_rank"] == 800 and s["gather_over_wire"] == round(800 / 120, 4)
    assert s["gather_min_over_wire"] == round(400 / 120, 4)
    assert (s["surgery_s"], s["save_s"], s["surgery_over_save"]) == (1.0, 4.0, 0.25)
    assert s["noisy"]  # surgery repeats 2.0 vs 1.0: spread above 25%


def test_noisy_when_the_machine_was_busy(bench):
    assert not bench.is_noisy([0.5, 2.5], 2, 1, [[1.0, 1.1]])
    assert bench.is_noisy([5.0, 2.5], 2, 1, [[1.0, 1.1]])
    assert bench.is_noisy([0.5, 9.0], 2, 3, [[1.0, 1.1]])


def test_ratio_is_none_without_a_denominator(bench):
    assert bench.ratio(1, 0) is None and bench.ratio(1, 4) == 0.25
