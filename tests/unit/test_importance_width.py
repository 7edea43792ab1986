"""Width importance on a tiny TP1/PP1 model equals a direct computation from the full activations,
captured by plain torch hooks of the test's own (not the estimator's) and aggregated by hand in
float64 over the real (loss-masked) tokens. Padding content never changes a score."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prune.config import ParallelConfig
from tests.helpers import random_full_state, tiny_config

SEED = 11


@pytest.fixture(scope="module")
def runtime():
    from megatron_prune.runtime import init_runtime

    return init_runtime(ParallelConfig(tp=1, pp=1))


def _model(groups, **cfg_kwargs):
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state

    cfg = tiny_config(**cfg_kwargs)
    model = build_model(cfg, groups)
    load_full_state(model, random_full_state(cfg, seed=SEED).__getitem__, groups)
    return cfg, model


@pytest.fixture(scope="module")
def llama(runtime):
    return (*_model(runtime), runtime)


def _windows(seed: int = 0, pad_id: int = 0):
    from megatron_prune.data.loaders import windows_from_documents

    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 256, size=n) for n in (40, 17, 5, 33, 2, 60, 16)]
    return windows_from_documents(docs, seq_length=16, pad_id=pad_id)


def _raw_activations(model, tokens: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Full activations of a plain forward: linear_proj / fc2 inputs and norm outputs, [s, b, ...]."""
    saved: dict[str, list[torch.Tensor]] = {"proj": [], "fc2": [], "norms": [], "layer_in": [],
                                            "layer_out": []}
    handles = []
    for layer in model.decoder.layers:
        def on_layer(module, args, kwargs, output):  # returns None: the output stays unchanged
            saved["layer_in"].append(kwargs["hidden_states"].detach().clone())
            saved["layer_out"].append(output[0].detach().clone())

        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
            lambda m, a: saved["proj"].append(a[0].detach().clone())))
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
            lambda m, a: saved["fc2"].append(a[0].detach().clone())))
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            handles.append(norm.register_forward_hook(
                lambda m, a, o: saved["norms"].append(o.detach().clone())))
    handles.append(model.decoder.final_layernorm.register_forward_hook(
        lambda m, a, o: saved["norms"].append(o.detach().clone())))
    b, s = tokens.shape
    model.eval()
    try:
        with torch.no_grad():
            model(tokens, torch.arange(s).unsqueeze(0).expand(b, s), None)
    finally:
        for h in handles:
            h.remove()
    return saved


def _direct_scores(cfg, model, windows, sequence: str, batch: str) -> dict[str, torch.Tensor]:
    """The paper's definition by hand: per sample (row) aggregate over its real tokens, then over
    the samples; in float64, from activations captured by this test's own hooks."""
    acts = _raw_activations(model, windows.tokens)
    mask = windows.loss_mask.t() != 0  # [s, b], megatron's order
    rows = [j for j in range(mask.shape[1]) if mask[:, j].any()]
    T = int(mask.sum())

    def agg(v: torch.Tensor) -> torch.Tensor:  # v: [s, b, C] nonnegative magnitudes -> [C]
        per_sample = []
        for j in rows:
            x = v[:, j][mask[:, j]].double()  # [n_j, C] the sample's real tokens
            per_sample.append({"l2": x.pow(2).sum(0).sqrt(), "mean": x.mean(0),
                               "max": x.max(0).values}[sequence])
        a = torch.stack(per_sample)  # [S, C]
        return a.pow(2).sum(0).sqrt() if batch == "l2" else a.mean(0)

    H, hn = cfg.num_attention_heads, cfg.kv_channels

    def head_norms(x: torch.Tensor) -> torch.Tensor:  # [s, b, H*hn] -> [s, b, H]
        return x.double().reshape(*x.shape[:2], H, hn).norm(dim=-1)

    heads = torch.stack([agg(head_norms(x)) for x in acts["proj"]])  # [L, H]
    neurons = torch.stack([agg(x.abs()) for x in acts["fc2"]])  # [L, F]
    assert len(acts["norms"]) == 2 * cfg.num_layers + 1
    hidden = torch.stack([agg(x.abs()) for x in acts["norms"]]).sum(0)  # [Hd]
    G = cfg.num_query_groups
    groups = heads.reshape(cfg.num_layers, G, H // G).sum(-1)
    bi = torch.stack([(1 - torch.nn.functional.cosine_similarity(i.double(), o.double(), dim=-1))[mask].mean()
                      for i, o in zip(acts["layer_in"], acts["layer_out"])])  # [L]
    return {"heads": heads, "neurons": neurons, "hidden": hidden, "query_groups": groups, "T": T,
            "S": len(rows), "block_importance": bi}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("sequence,batch", [("mean", "l2"), ("l2", "l2"), ("max", "mean"), ("mean", "mean")])
def test_scores_equal_direct_computation_from_full_activations(llama, sequence, batch):
    from megatron_prune.importance import collect_calibration_stats, width_scores
    from megatron_prune.importance.depth import block_importance

    cfg, model, groups = llama
    windows = _windows()
    assert (windows.loss_mask == 0).any(), "the fixture must contain padded positions"
    # 3 rows per micro-batch: the last micro-batch carries filler rows
    stats = collect_calibration_stats(model, groups, windows, micro_batch_size=3, microbatches_per_call=2)
    scores = width_scores(stats, cfg.num_query_groups, sequence, batch)
    ref = _direct_scores(cfg, model, windows, sequence, batch)
    L, H, F, G = cfg.num_layers, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.num_query_groups
    assert scores.heads.shape == (L, H) and scores.neurons.shape == (L, F)
    assert scores.query_groups.shape == (L, G) and scores.hidden.shape == (cfg.hidden_size,)
    assert scores.num_tokens == ref["T"] == windows.num_targets
    assert scores.num_samples == ref["S"] == len(windows) and (scores.sequence, scores.batch) == (sequence, batch)
    for name in ("heads", "neurons", "hidden", "query_groups"):
        assert _rel(getattr(scores, name), ref[name]) <= 1e-5, (name, _rel(getattr(scores, name), ref[name]))
    assert _rel(block_importance(stats), ref["block_importance"]) <= 1e-5
    # the hooks are gone afterwards
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_two_levels_differ_from_one_level_over_all_tokens(llama):
    # mean-over-sequence then l2-over-samples is not the l2 over all tokens: the levels are real
    from megatron_prune.importance import estimate_width_importance

    cfg, model, groups = llama
    windows = _windows()
    two = estimate_width_importance(model, groups, windows, micro_batch_size=4)  # mean, l2
    acts = _raw_activations(model, windows.tokens)
    keep = windows.loss_mask.t() != 0
    flat = torch.stack([x.double().abs()[keep].pow(2).sum(0).sqrt() for x in acts["fc2"]])  # [L, F]
    assert _rel(two.neurons, flat) > 0.1


def test_gpt2_family_scores_equal_direct_computation(runtime):
    from megatron_prune.importance import estimate_width_importance

    cfg, model = _model(runtime, family="gpt2", num_query_groups=4, ffn_hidden_size=256,
                        add_bias_linear=True, add_qkv_bias=True)
    windows = _windows(3)
    scores = estimate_width_importance(model, runtime, windows, micro_batch_size=4)
    ref = _direct_scores(cfg, model, windows, "mean", "l2")
    for name in ("heads", "neurons", "hidden", "query_groups"):
        assert _rel(getattr(scores, name), ref[name]) <= 1e-5, name


def test_padding_content_pad_id_and_filler_rows_do_not_change_scores(llama):
    from megatron_prune.data.loaders import TokenWindows
    from megatron_prune.importance import estimate_width_importance

    cfg, model, groups = llama
    clean = _windows(1, pad_id=0)
    noisy = _windows(1, pad_id=7).padded_to(len(clean) + 3)
    pad = noisy.loss_mask == 0
    garbage = torch.randint(0, 256, noisy.tokens.shape, generator=torch.Generator().manual_seed(9))
    noisy = TokenWindows(torch.where(pad, garbage, noisy.tokens), noisy.labels, noisy.loss_mask,
                         noisy.document_ids, noisy.sample_ids, pad_id=7)
    for sequence, batch in (("mean", "l2"), ("max", "mean"), ("l2", "mean")):
        # micro-batch 1 vs 4 (and 3 with filler rows): the samples, hence the scores, are the same
        base = estimate_width_importance(model, groups, clean, 4, sequence, batch)
        one = estimate_width_importance(model, groups, clean, 1, sequence, batch)
        other = estimate_width_importance(model, groups, noisy, 3, sequence, batch)
        assert other.num_tokens == one.num_tokens == base.num_tokens
        assert other.num_samples == one.num_samples == base.num_samples == len(clean)
        for name in ("heads", "neurons", "hidden"):
            assert _rel(getattr(other, name), getattr(base, name)) <= 1e-6, (sequence, batch, name)
            assert _rel(getattr(one, name), getattr(base, name)) <= 1e-6, (sequence, batch, name)
    # ...while the same garbage does change the scores once it counts: the check can fail
    counted = TokenWindows(noisy.tokens, noisy.labels, torch.ones_like(noisy.loss_mask), noisy.document_ids,
                           noisy.sample_ids, pad_id=7)
    moved = estimate_width_importance(model, groups, counted, micro_batch_size=3)
    assert _rel(moved.neurons, base.neurons) > 1e-3


def test_record_activations_needs_the_micro_batch_mask(llama):
    from megatron_prune.importance import TokenMask, record_activations

    cfg, model, _ = llama
    tokens = torch.randint(0, 256, (2, 8))
    with pytest.raises(RuntimeError, match="before="):
        with record_activations(model, TokenMask()):
            with torch.no_grad():
                model(tokens, torch.arange(8).expand(2, 8), None)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_rejects_empty_windows_and_unknown_aggregation(llama):
    from megatron_prune.config import ConfigError
    from megatron_prune.data.loaders import windows_from_documents
    from megatron_prune.importance import estimate_width_importance

    _, model, groups = llama
    with pytest.raises(ConfigError, match="no tokens"):
        estimate_width_importance(model, groups, windows_from_documents([np.array([5])], seq_length=8), 2)
    with pytest.raises(ValueError, match="l2, mean, max"):
        estimate_width_importance(model, groups, _windows(), 2, sequence="median")
    with pytest.raises(ValueError, match="batch aggregation 'max'"):
        estimate_width_importance(model, groups, _windows(), 2, batch="max")


class _FusedNormLinear(torch.nn.Module):
    """Transformer Engine's LayerNormLinear, rebuilt from megatron's own norm and linear (TE needs a
    GPU): the norm runs inside the module and its output is never returned, only the GEMM's. Its
    attributes are TE's: layer_norm_weight / layer_norm_bias / eps / normalization / zero_centered_gamma."""

    def __init__(self, norm: torch.nn.Module, linear: torch.nn.Module, normalization: str, eps: float,
                 zero_centered: bool):
        super().__init__()
        self.norm, self.linear = norm, linear
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered
        # TE keeps gamma - 1 when zero_centered_gamma is on
        self.layer_norm_weight = torch.nn.Parameter(norm.weight.detach() - (1.0 if zero_centered else 0.0))
        bias = getattr(norm, "bias", None)
        self.layer_norm_bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())

    def forward(self, x, *args, **kwargs):
        return self.linear(self.norm(x), *args, **kwargs)


@pytest.mark.parametrize("family,zero_centered", [("llama", False), ("llama", True), ("gpt2", False)])
def test_norms_fused_into_the_next_linear_are_scored_like_separate_norms(runtime, family, zero_centered):
    # the Transformer Engine spec fuses input_layernorm into linear_qkv and pre_mlp_layernorm into
    # linear_fc1: the hooks recompute the norm from the linear's input, with the same scores
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_prune.importance import collect_calibration_stats

    kwargs = {} if family == "llama" else dict(family="gpt2", num_query_groups=4, add_bias_linear=True)
    cfg, model = _model(runtime, **kwargs)
    windows = _windows(4)
    separate = collect_calibration_stats(model, runtime, windows, micro_batch_size=3)
    normalization = "RMSNorm" if family == "llama" else "LayerNorm"
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = _FusedNormLinear(layer.input_layernorm, attn.linear_qkv, normalization,
                                           cfg.norm_epsilon, zero_centered)
        mlp.linear_fc1 = _FusedNormLinear(layer.pre_mlp_layernorm, mlp.linear_fc1, normalization,
                                          cfg.norm_epsilon, zero_centered)
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()
    fused = collect_calibration_stats(model, runtime, windows, micro_batch_size=3)
    assert _rel(fused.hidden, separate.hidden) <= 1e-5
    assert _rel(fused.heads, separate.heads) <= 1e-5 and _rel(fused.bi_sum, separate.bi_sum) <= 1e-5
