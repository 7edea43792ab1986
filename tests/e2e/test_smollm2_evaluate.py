"""`evaluate` on the real SmolLM2-135M and held-out Shakespeare plays gives the same perplexity and
multiple-choice scores at TP1 and TP3 (the checkpoint is written once, at TP1)."""
from __future__ import annotations

import math

import pytest

from megatron_prune.config import ParallelConfig

pytestmark = pytest.mark.e2e


def _evaluate(tp: int, ckpt: str, data_dir: str):
    from megatron_prune.evaluate.stage import EvalSettings, evaluate_checkpoint
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=1))
    settings = EvalSettings(checkpoint=ckpt, data_dir=data_dir, max_samples=6, max_task_examples=6,
                            micro_batch_size=2)
    return evaluate_checkpoint(settings, groups, show_progress=False)


def test_perplexity_and_accuracy_are_layout_independent(pools, smollm2_checkpoint, shakespeare_data):
    ckpt = smollm2_checkpoint
    tp1 = pools.run(1, _evaluate, 1, ckpt, shakespeare_data)[0]
    tp3 = pools.run(3, _evaluate, 3, ckpt, shakespeare_data)
    assert tp1.tokens == 6 * 512 and tp1.samples == 6
    # a trained model on held-out English verse: far from uniform (ln 49152 = 10.8 nats)
    assert 2.0 < tp1.loss < 5.0 and math.isclose(tp1.perplexity, math.exp(tp1.loss))
    for rank_result in tp3:
        assert rank_result.tokens == tp1.tokens
        assert abs(rank_result.perplexity - tp1.perplexity) / tp1.perplexity <= 1e-4
        assert (rank_result.mc_acc, rank_result.mc_acc_norm) == (tp1.mc_acc, tp1.mc_acc_norm)
    assert tp1.mc_examples == 6
