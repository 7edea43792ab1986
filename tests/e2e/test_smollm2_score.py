"""`score` on the real SmolLM2-135M and Shakespeare calibration text gives the same importance
artifact at TP1, TP3, PP2 and TP3xPP2 (SmolLM2's 9 heads in 3 query groups rule out TP2; TP3 stands in
for it, as in test_smollm2_layouts.py): width scores, Block Importance, LM-loss increase per layer and
per block of 15 layers, multiple-choice accuracy per block. Sizes are small because each of the ~65
depth evaluations is a real 135M-parameter forward (~0.2 s per 100 tokens on 2 cores)."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.config import ParallelConfig

pytestmark = pytest.mark.e2e

LAYOUTS = [(1, 1), (3, 1), (1, 2), (3, 2)]


def _score(tp: int, pp: int, ckpt: str, data_dir: str, output: str) -> dict:
    from megatron_prune.importance.stage import DepthSettings, ScoreSettings, score_checkpoint
    from megatron_prune.runtime import init_runtime

    groups = init_runtime(ParallelConfig(tp=tp, pp=pp))
    settings = ScoreSettings(checkpoint=ckpt, data_dir=data_dir, output=output, seq_length=32, max_samples=4,
                             micro_batch_size=1, pictures=tp * pp == 1,
                             depth=DepthSettings(block_size=15, loss_max_samples=1, max_task_examples=2,
                                                 task_seq_length=48))
    result = score_checkpoint(settings, groups, show_progress=False)
    return {"layout": groups.layout, "tensors": result.artifact.tensors, "meta": result.artifact.metadata}


def test_smollm2_importance_is_layout_independent(pools, smollm2_checkpoint, shakespeare_data, tmp_path):
    runs = [pools.run(tp * pp, _score, tp, pp, smollm2_checkpoint, shakespeare_data,
                      str(tmp_path / f"tp{tp}-pp{pp}")) for tp, pp in LAYOUTS]
    ref = runs[0][0]
    t, meta = ref["tensors"], ref["meta"]
    assert t["width/heads"].shape == (30, 9) and t["width/query_groups"].shape == (30, 3)
    assert t["width/neurons"].shape == (30, 1536) and t["width/hidden"].shape == (576,)
    assert t["depth/lm_loss_increase_block"].shape == (16,) and t["depth/mc_acc_block"].shape == (16,)
    assert meta["samples"] == 4 and meta["tokens"] == 4 * 32
    # a trained model: dropping 15 layers always hurts, dropping the first layer hurts most of all
    base = meta["depth"]["loss"]["base_loss"]
    assert (t["depth/lm_loss_increase_block"] > 0).all()
    assert int(t["depth/lm_loss_increase_layer"].argmax()) == 0
    assert (tmp_path / "tp1-pp1" / "layers.png").is_file()
    for per_rank in runs[1:]:
        for got in per_rank:
            where = got["layout"]
            for name, tensor in t.items():
                other = got["tensors"][name]
                if name.startswith("depth/mc_acc"):
                    assert torch.equal(other, tensor), (where, name)
                elif name.startswith("depth/lm_loss_increase"):
                    assert float((other - tensor).abs().max()) <= 1e-5 * base, (where, name)
                else:
                    rel = float((other - tensor).abs().max() / tensor.abs().max())
                    assert rel <= 1e-5, (where, name, rel)
