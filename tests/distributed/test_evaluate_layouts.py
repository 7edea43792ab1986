"""Perplexity and multiple-choice scores of the same weights are the same at every TP/PP/DP layout,
on every rank. The reference is the TP1/PP1 single-process run (itself pinned to HF transformers by
tests/unit/test_evaluate_*.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_prune.config import ParallelConfig
from megatron_prune.data.tasks import MultipleChoiceExample
from tests.helpers import random_full_state, tiny_config

LAYOUTS = [(1, 1, 2), (2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 2, 4)]  # (tp, pp, world); grouped by world
TEXT = ("the cat sat on the mat and the dog ran to the park while a bird sang in the tree "
        "every morning the sun rose over the hill and the river ran down to the sea")
EXAMPLES = [
    MultipleChoiceExample("the cat sat on the", ["mat", "dog", "sea"], 0),
    MultipleChoiceExample("every morning the sun rose over the", ["hill", "river ran down", "tree"], 1),
    MultipleChoiceExample("the dog ran to the park while a bird sang in the tree every morning the sun",
                          ["rose", "sang"], 0),
    MultipleChoiceExample("the bird", ["sang in the tree", "sat"], 1),
    MultipleChoiceExample("and the river ran", ["down", "to the sea", "on the mat", "over"], 3),
]


def _documents() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(3, 256, size=n) for n in (40, 17, 5, 33, 2, 60, 9)]


def _evaluate_at(tp: int, pp: int, tokenizer_dir: str):
    """One rank: both evaluations at layout (tp, pp, dp = world / (tp * pp))."""
    from megatron_prune.data.indexed import load_tokenizer
    from megatron_prune.data.loaders import windows_from_documents
    from megatron_prune.evaluate import perplexity, score_multiple_choice
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    cfg = tiny_config()
    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    model = build_model(cfg, groups)
    load_full_state(model, random_full_state(cfg, seed=3).__getitem__, groups)
    # 17 windows at mbs 2: DP shards of unequal size, filler rows in the last micro-batches
    windows = windows_from_documents(_documents(), seq_length=12)
    ppl = perplexity(model, groups, windows, micro_batch_size=2, microbatches_per_call=2)
    mc = score_multiple_choice(model, groups, load_tokenizer(tokenizer_dir), EXAMPLES, seq_length=10,
                               micro_batch_size=2, microbatches_per_call=2)
    return ppl, mc


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), [TEXT], vocab_size=256)


@pytest.fixture(scope="module")
def reference(pools, tokenizer_dir):
    (result,) = pools.run(1, _evaluate_at, 1, 1, tokenizer_dir)
    ppl, mc = result
    docs = _documents()
    assert ppl.tokens == sum(len(d) - 1 for d in docs)
    assert ppl.samples == sum(math.ceil((len(d) - 1) / 12) for d in docs)
    return result


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("tp,pp,world", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{w // (t * p)}" for t, p, w in LAYOUTS])
def test_perplexity_and_mc_scores_are_identical_at_every_layout(pools, tokenizer_dir, reference, tp, pp, world):
    ref_ppl, ref_mc = reference
    per_rank = pools.run(world, _evaluate_at, tp, pp, tokenizer_dir)
    ppl0, mc0 = per_rank[0]
    for rank, (ppl, mc) in enumerate(per_rank):  # every rank returns the very same result
        assert ppl == ppl0, f"rank {rank}: {ppl} != rank 0's {ppl0}"
        assert [e.scores for e in mc.per_example] == [e.scores for e in mc0.per_example], f"rank {rank}"

    assert (ppl0.tokens, ppl0.samples) == (ref_ppl.tokens, ref_ppl.samples)
    assert _rel(ppl0.loss, ref_ppl.loss) <= 1e-5, (ppl0.loss, ref_ppl.loss)

    assert mc0.n == ref_mc.n == len(EXAMPLES)
    for got, want in zip(mc0.per_example, ref_mc.per_example):
        assert got.index == want.index and got.num_tokens == want.num_tokens
        for a, b in zip(got.scores, want.scores):
            assert _rel(a, b) <= 1e-5, (got.index, got.scores, want.scores)
        assert (got.pred, got.pred_norm) == (want.pred, want.pred_norm)
    assert (mc0.acc, mc0.acc_norm) == (ref_mc.acc, ref_mc.acc_norm)
