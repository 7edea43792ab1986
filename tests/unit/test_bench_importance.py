"""bench/importance.py helpers: argument parsing, the all-gather byte formula, micro-batch widths as
collect_calibration_stats runs them, and the summary of a (fake) worker result. No model is run."""
from __future__ import annotations

import argparse
import importlib

import numpy as np
import pytest

from megatron_prune.data.loaders import windows_from_documents

@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.importance")  # the script, imported from the repository root


def test_defaults_measure_tp1_and_tp3(bench):
    a = bench.build_parser().parse_args([])
    assert a.tp == [1, 3] and not a.worker
    assert (a.samples, a.seq_length, a.micro_batch_size) == (8, 256, 2)
    assert bench.build_parser().parse_args(["--tp", "3"]).tp == [3]


@pytest.mark.parametrize("text", ["", "1,x", "0", "1,-3"])
def test_bad_layout_list_is_refused(bench, text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_layouts(text)


def test_threads_share_the_cores_and_never_drop_below_one(bench):
    assert [bench.threads_per_rank(n, 2) for n in (1, 2, 3)] == [2, 1, 1]


def test_allgather_bytes_formula(bench):
    # SmolLM2-135M at TP3: 30 layers, 3 of 9 heads of 64, 512 of 1536 neurons, hidden 576
    got = bench.allgather_bytes([256, 100], 2, local_layers=30, heads_local=3, head_dim=64,
                                ffn_local=512, hidden=576, last_stage=True)
    assert got == 4 * 2 * (256 + 100) * (30 * (3 * 64 + 512 + 2 * 576) + 576)
    not_last = bench.allgather_bytes([256], 1, local_layers=15, heads_local=9, head_dim=64,
                                     ffn_local=1536, hidden=576, last_stage=False)
    assert not_last == 4 * 256 * 15 * (576 + 1536 + 2 * 576)


def test_widths_are_the_trimmed_widths_of_each_schedule_call(bench):
    docs = [np.arange(1, n + 1, dtype=np.int64) for n in (17, 17, 4, 6, 3, 5)]
    w = windows_from_documents(docs, 16)  # one window each, with 16 16 3 5 2 4 targets
    # calls of 2 micro-batches of 2 rows: [16 16][3 5] share width 16; [2 4] alone is cut to 4
    assert bench.trimmed_widths(w, micro_batch_size=2, microbatches_per_call=2) == [16, 16, 4]
    assert bench.trimmed_widths(w, micro_batch_size=2, microbatches_per_call=1) == [16, 5, 4]


def test_summary_takes_the_min_and_divides_bytes_by_microbatches(bench):
    per_rank = [{"rank": r, "bytes_sent": 1200, "collectives": 2, "by_group": {"tp": 1200},
                 "allgather_bytes": 48000} for r in range(3)]
    raw = {"runs_s": {"plain": [3.0, 2.0], "scored": [2.5, 2.2]},
           "cpu_s": {"plain": [6.0, 4.0], "scored": [4.4, 5.0]},
           "world_size": 3, "threads_per_rank": 1, "num_microbatches": 4,
           "microbatch_widths": [256] * 4, "tokens": 2048, "samples": 8, "per_rank": per_rank}
    s = bench.summarize(raw)
    assert s["ratio"] == pytest.approx(1.1) and not s["goal_met"]
    assert s["cpu_ratio"] == pytest.approx(1.1)
    assert s["bytes_sent_per_rank_per_microbatch"] == 300
    assert s["bytes_sent_per_rank_per_microbatch_by_group"] == {"tp": 300}
    assert s["allgather_bytes_per_rank_per_microbatch"] == 12000
    assert s["allgather_over_sent"] == 40
    assert s["noisy"]  # plain runs 3.0 and 2.0 are 50% apart
    quiet = dict(raw, runs_s={"plain": [2.0, 2.1], "scored": [2.2, 2.3]}, loadavg_1min=[1.0, 1.9],
                 cores=2)
    assert not bench.summarize(quiet)["noisy"]
    assert not bench.summarize(dict(quiet, loadavg_1min=[1.0, 4.0]))["noisy"]  # its own 3 ranks
    assert bench.summarize(dict(quiet, loadavg_1min=[1.0, 6.0]))["noisy"]  # other jobs running
    assert bench.summarize(dict(quiet, loadavg_1min=[3.0, 3.0]))["noisy"]  # busy before it started
