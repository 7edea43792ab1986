"""Perplexity on a tiny model equals an independent computation: HF transformers on the same weights,
cross-entropy by hand over the loss-masked targets. Padding never counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_prune.config import ConfigError, ParallelConfig
from tests.helpers import random_full_state, tiny_config

SEED = 5


@pytest.fixture(scope="module")
def megatron_model():
    """This process as a world of one (TP1/PP1), with the tiny model's deterministic weights."""
    from megatron_prune.models.build import build_model
    from megatron_prune.models.shard import load_full_state
    from megatron_prune.runtime import init_runtime

    cfg = tiny_config()
    groups = init_runtime(ParallelConfig(tp=1, pp=1))
    model = build_model(cfg, groups)
    load_full_state(model, random_full_state(cfg, seed=SEED).__getitem__, groups)
    return model, groups


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(tiny_config(), SEED)


def build_hf_model(cfg, seed: int):
    """HF transformers' own model on the same weights (converted back to HF names): the oracle."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_prune.convert.hf_config import model_config_to_hf_config
    from megatron_prune.convert.hf_weights import megatron_to_hf

    config = AutoConfig.for_model(**model_config_to_hf_config(cfg))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(megatron_to_hf(random_full_state(cfg, seed=seed), cfg),
                                                strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    model.tie_weights()
    return model


def hf_token_nll(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(labels | tokens) per position [b, s] in float64, from HF logits."""
    with torch.no_grad():
        logits = model(tokens).logits.double()  # [b, s, V]
    return -torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [b, s]


def _documents(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # lengths chosen so that several windows end short (padded) and one document is a single token
    return [rng.integers(3, 256, size=n) for n in (40, 17, 5, 33, 1, 2, 60, 16)]


def test_perplexity_equals_transformers_cross_entropy_with_padding_rows(megatron_model, hf_model):
    from megatron_prune.data.loaders import windows_from_documents
    from megatron_prune.evaluate import perplexity

    model, groups = megatron_model
    docs = _documents()
    windows = windows_from_documents(docs, seq_length=16)
    assert (windows.loss_mask == 0).any(), "the fixture must contain padded positions"
    # 5 rows per micro-batch over 14 windows: the last micro-batch carries a fully masked filler row
    result = perplexity(model, groups, windows, micro_batch_size=5, microbatches_per_call=2)

    nll = hf_token_nll(hf_model, windows.tokens, windows.labels)  # [n, s]
    mask = windows.loss_mask.double()
    expected_tokens = sum(max(len(d) - 1, 0) for d in docs)  # every token but a document's first
    expected_loss = float((nll * mask).sum() / mask.sum())
    assert result.tokens == expected_tokens
    assert result.samples == len(windows)
    assert abs(result.loss - expected_loss) / expected_loss <= 1e-5, (result.loss, expected_loss)
    assert result.perplexity == pytest.approx(math.exp(expected_loss), rel=1e-5)


def test_perplexity_ignores_padding_content_pad_id_and_filler_rows(megatron_model):
    from megatron_prune.data.loaders import TokenWindows, windows_from_documents
    from megatron_prune.evaluate import perplexity

    model, groups = megatron_model
    clean = windows_from_documents(_documents(1), seq_length=16, pad_id=0)
    base = perplexity(model, groups, clean, micro_batch_size=4)

    # Garbage in every masked position (inputs and labels), a different pad id, extra filler rows.
    noisy = windows_from_documents(_documents(1), seq_length=16, pad_id=7).padded_to(len(clean) + 3)
    pad = noisy.loss_mask == 0  # [n, s]
    garbage = torch.randint(0, 256, noisy.tokens.shape, generator=torch.Generator().manual_seed(9))
    noisy = TokenWindows(torch.where(pad, garbage, noisy.tokens), torch.where(pad, garbage.flip(1), noisy.labels),
                         noisy.loss_mask, noisy.document_ids, noisy.sample_ids, pad_id=7)
    other = perplexity(model, groups, noisy, micro_batch_size=3)

    assert other.tokens == base.tokens and other.samples == base.samples == len(clean)
    assert abs(other.loss - base.loss) / base.loss <= 1e-6, (other.loss, base.loss)

    # ...while the same garbage does change the loss once it is unmasked: the check can fail
    counted = TokenWindows(noisy.tokens, noisy.labels, torch.ones_like(noisy.loss_mask), noisy.document_ids,
                           noisy.sample_ids, pad_id=7)
    assert abs(perplexity(model, groups, counted, micro_batch_size=3).loss - base.loss) > 1e-3


def test_perplexity_rejects_windows_without_targets_and_foreign_token_ids(megatron_model):
    from megatron_prune.data.loaders import windows_from_documents
    from megatron_prune.evaluate import perplexity

    model, groups = megatron_model
    with pytest.raises(ConfigError, match="no target tokens"):
        perplexity(model, groups, windows_from_documents([np.array([5])], seq_length=8), micro_batch_size=2)
    with pytest.raises(ConfigError, match="vocab_size is 256"):
        perplexity(model, groups, windows_from_documents([np.array([5, 300, 7])], seq_length=8),
                   micro_batch_size=2)
