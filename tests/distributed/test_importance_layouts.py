"""Width importance and Block Importance are the same at every TP/PP/DP layout: the same weights and
the same calibration windows give the same global-index scores (heads, query groups, neurons, hidden
channels, per-layer BI) whether the model is sharded over TP, split over PP, or the windows over DP.
Only statistics vectors cross ranks: the bytes each rank sends do not grow with the number of tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2), (2, 2, 4)]  # (tp, pp, world); (1, 1, 2) is DP2
FAMILIES = {"llama": {},  # SwiGLU, GQA (4 heads in 2 groups), RMSNorm, tied embeddings
            "gpt2": dict(family="gpt2", num_query_groups=4, ffn_hidden_size=256, add_bias_linear=True,
                         add_qkv_bias=True, tie_embeddings=False)}
SEQ = 16
AGGREGATIONS = [("mean", "l2"), ("l2", "mean"), ("max", "l2")]  # (over the sequence, over samples)


def _windows(repeat: int = 1):
    from megatron_prune.data.loaders import windows_from_documents

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 256, size=n) for n in (40, 17, 5, 33, 2, 60, 16)] * repeat
    return windows_from_documents(docs, seq_length=SEQ)


def _scores_at(tp: int, pp: int) -> dict:
    return {family: _family_scores_at(tp, pp, kwargs) for family, kwargs in FAMILIES.items()}


def _family_scores_at(tp: int, pp: int, cfg_kwargs: dict) -> dict:
    from megatron_prune.importance import CommCounter, collect_calibration_stats, width_scores
    from megatron_prune.importance.depth import block_importance
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    cfg = tiny_config(**cfg_kwargs)
    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    model = build_model(cfg, groups)
    load_full_state(model, random_full_state(cfg, seed=1).__getitem__, groups)
    out = {"layout": groups.layout}
    comm = CommCounter()
    stats = collect_calibration_stats(model, groups, _windows(), micro_batch_size=2, comm=comm)
    out["bytes"] = comm.bytes_sent
    out["bi"] = block_importance(stats)
    for pair in AGGREGATIONS:
        out[pair] = width_scores(stats, cfg.num_query_groups, *pair).as_dict()
    comm3 = CommCounter()
    collect_calibration_stats(model, groups, _windows(repeat=3), micro_batch_size=2, comm=comm3)
    out["bytes_3x"] = comm3.bytes_sent
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_width_scores_identical_at_every_layout(pools):
    # one pool call per layout scores both families; the order keeps each world's pool alive
    results = {layout: pools.run(layout[2], _scores_at, *layout[:2]) for layout in LAYOUTS}
    for family in FAMILIES:
        _check_family(family, [(layout, [r[family] for r in results[layout]]) for layout in LAYOUTS])


def _check_family(family: str, runs: list) -> None:
    cfg = tiny_config(**FAMILIES[family])
    L, H, F, Hd = cfg.num_layers, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.hidden_size
    # all statistics of the model (6 per unit, BI per layer, 2 counts), float64: what a rank may
    # send, at most twice over
    stats_bytes = 8 * (6 * L * (H + F) + 6 * (2 * L + 1) * Hd + L + 2)
    activation_bytes = SEQ * 2 * Hd * 4  # one micro-batch's hidden states [s, b, hidden] in fp32
    reference = None
    for (tp, pp, world), per_rank in runs:
        if reference is None:
            reference = per_rank[0]
            assert reference["bytes"] == 0  # a world of one sends nothing
            assert reference[AGGREGATIONS[0]]["num_tokens"] == _windows().num_targets
            assert reference[AGGREGATIONS[0]]["num_samples"] == len(_windows())
        for rank, got in enumerate(per_rank):
            where = f"{family} {got['layout']} rank {rank}"
            for pair in AGGREGATIONS:
                for name in ("heads", "query_groups", "neurons", "hidden"):
                    a, b = got[pair][name], reference[pair][name]
                    assert a.shape == b.shape, (where, name)
                    assert _rel(a, b) <= 1e-5, (where, pair, name, _rel(a, b))
                assert got[pair]["num_tokens"] == reference[pair]["num_tokens"]
                assert got[pair]["num_samples"] == reference[pair]["num_samples"]
            assert _rel(got["bi"], reference["bi"]) <= 1e-5, (where, got["bi"], reference["bi"])
            # score vectors, not activations: the bytes sent do not grow with 3x the tokens
            assert got["bytes"] == got["bytes_3x"], where
            assert got["bytes"] <= 2 * stats_bytes, (where, got["bytes"], stats_bytes)
            if world > 1:
                assert 0 < got["bytes"]
            # the 3x run: gathering one hidden-state activation per micro-batch would already send more
            n_microbatches = -(-len(_windows(repeat=3)) // 2)
            assert got["bytes_3x"] < n_microbatches * activation_bytes, where
