"""Depth importance on a tiny 4-layer TP1 model: skipping layers is exactly the forward of a model
built without them (weights renumbered), copies nothing, and restores the model; the loss sweep is
the perplexity of those smaller models; a NaN in an activation names the layer and the sample."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

SEED = 5


@pytest.fixture(scope="module")
def runtime():
    from megatron_prune.runtime import init_runtime

    return init_runtime(ParallelConfig(tp=1, pp=1))


def _build(groups, cfg, state):
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state

    model = build_model(cfg, groups)
    load_full_state(model, state.__getitem__, groups)
    return model


@pytest.fixture(scope="module")
def four(runtime):
    cfg = tiny_config()  # 4 layers
    state = random_full_state(cfg, seed=SEED)
    return cfg, state, _build(runtime, cfg, state)


def _without(cfg, state, drop: set[int]):
    """The canonical state and config of the model with layers `drop` removed, renumbered."""
    import dataclasses

    kept = [i for i in range(cfg.num_layers) if i not in drop]
    new = {}
    for name, tensor in state.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m is None:
            new[name] = tensor
        elif int(m.group(1)) in kept:
            new[f"decoder.layers.{kept.index(int(m.group(1)))}.{m.group(2)}"] = tensor
    return dataclasses.replace(cfg, num_layers=len(kept)), new


def _windows():
    from megatron_prune.data.loaders import windows_from_documents

    rng = np.random.default_rng(2)
    return windows_from_documents([rng.integers(3, 256, size=n) for n in (30, 12, 45, 7)], seq_length=16)


def test_skipping_layers_is_the_smaller_model_and_copies_nothing(runtime, four):
    from megatron_prune.importance.depth import skip_layers
    from megatron_prune.models.forward import full_logits

    cfg, state, model = four
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    full = full_logits(model, runtime, tokens)
    for drop in ({1}, {0, 1}, {2, 3}, {3}):
        small_cfg, small_state = _without(cfg, state, drop)
        expected = full_logits(_build(runtime, small_cfg, small_state), runtime, tokens)
        with skip_layers(model, drop):
            assert len(model.decoder.layers) == cfg.num_layers - len(drop)
            got = full_logits(model, runtime, tokens)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), drop
        assert not torch.allclose(got, full, atol=1e-3), drop  # removing a layer does change the model
    # restored, and no parameter was copied or changed
    assert [int(layer.layer_number) for layer in model.decoder.layers] == [1, 2, 3, 4]
    assert torch.equal(full_logits(model, runtime, tokens), full)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


def test_loss_sweep_equals_the_perplexity_of_the_smaller_models(runtime, four):
    from megatron_prune.evaluate.perplexity import perplexity
    from megatron_prune.importance.depth import loss_sweep

    cfg, state, model = four
    windows = _windows()
    sweep = loss_sweep(model, runtime, windows, micro_batch_size=3, block_size=2)
    assert sweep.layer.shape == (4,) and sweep.block.shape == (3,)
    assert sweep.base == pytest.approx(perplexity(model, runtime, windows, 3).loss, rel=1e-6)
    for drop, got in (({2}, sweep.layer[2]), ({1, 2}, sweep.block[1]), ({0, 1}, sweep.block[0])):
        small = _build(runtime, *_without(cfg, state, drop))
        assert float(got) == pytest.approx(perplexity(small, runtime, windows, 3).loss, rel=1e-5), drop
    assert torch.allclose(sweep.layer_increase, sweep.layer - sweep.base)


def test_nan_in_an_activation_names_the_layer_and_the_sample(runtime):
    from megatron_prune.importance import NonFiniteActivation, collect_calibration_stats

    cfg = tiny_config()
    state = random_full_state(cfg, seed=SEED)
    state["decoder.layers.2.mlp.linear_fc1.weight"][7, :] = float("nan")  # neuron 7's gate row
    model = _build(runtime, cfg, state)
    windows = _windows()
    with pytest.raises(NonFiniteActivation, match=r"in layer 2 \(MLP intermediate \(linear_fc2 input\)\) "
                                                  r"of calibration sample 0"):
        collect_calibration_stats(model, runtime, windows, micro_batch_size=2)

    # a poisoned token only in sample 3: the error names that sample and the first activation
    state = random_full_state(cfg, seed=SEED)
    state["embedding.word_embeddings.weight"][2, :] = float("inf")
    model = _build(runtime, cfg, state)
    windows.tokens[3, 5] = 2
    with pytest.raises(NonFiniteActivation, match=r"in layer 0 \(input_layernorm output\) of calibration "
                                                  r"sample 3"):
        collect_calibration_stats(model, runtime, windows, micro_batch_size=2)
