"""Multiple-choice scores equal an independent per-choice log-likelihood from HF transformers on the
same weights; acc_norm normalises by the choice's length; padding never counts; ties go low."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.config import ConfigError
from megatron_prune.data.tasks import MultipleChoiceExample
from tests.helpers import tiny_config
from tests.unit.test_evaluate_perplexity import SEED, build_hf_model, hf_model, megatron_model  # noqa: F401

LONG_WORD = "antidisestablishmentarianism"  # one word-level token, 28 characters
TEXT = ("the cat sat on the mat and the dog ran to the park while a bird sang in the tree "
        "every morning the sun rose over the hill and the river ran down to the sea "
        f"{LONG_WORD} is a word that nobody uses but everybody knows")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_prune.data.indexed import load_tokenizer
    from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

    path = build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), [TEXT], vocab_size=256)
    tok = load_tokenizer(path)
    assert len(tok) <= tiny_config().vocab_size
    return tok


def hf_choice_loglik(hf, tokenizer, context: str, choice: str, seq_length: int) -> tuple[float, int]:
    """Independent oracle: one unpadded row per choice through HF, log-softmax, sum the choice tokens.
    (The word-level tokenizer drops whitespace, so moving the context's trailing spaces is moot.)"""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
    full = (ctx + cont)[-(seq_length + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([full[:-1]])).logits[0].double()  # [m, V]
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(full[1:])  # [m]
    picked = logp[torch.arange(len(targets)), targets]  # [m]
    return float(picked[-len(cont):].sum()), len(cont)


EXAMPLES = [
    MultipleChoiceExample("the cat sat on the", ["mat", "dog", "sea"], 0),
    MultipleChoiceExample("every morning the sun rose over the ", ["hill", "river ran down", "tree"], 1),
    # longer than seq_length: cut from the left
    MultipleChoiceExample("the dog ran to the park while a bird sang in the tree every morning the sun",
                          ["rose", "sang"], 0),
    MultipleChoiceExample("", ["the cat", "a bird"], 1),  # empty context: scored after <eos>
    MultipleChoiceExample("nobody uses", ["a word", LONG_WORD, "the sea and the river"], 2),
]


def test_mc_scores_equal_transformers_per_choice_loglikelihood(megatron_model, hf_model, tokenizer):
    from megatron_prune.evaluate import score_multiple_choice

    model, groups = megatron_model
    seq_length = 12
    result = score_multiple_choice(model, groups, tokenizer, EXAMPLES, seq_length=seq_length,
                                   micro_batch_size=3, microbatches_per_call=2)
    assert result.n == len(EXAMPLES) and [r.index for r in result.per_example] == list(range(len(EXAMPLES)))
    acc = acc_norm = 0
    for ex, got in zip(EXAMPLES, result.per_example):
        oracle = [hf_choice_loglik(hf_model, tokenizer, ex.context, c, seq_length) for c in ex.choices]
        want = [s for s, _ in oracle]
        assert got.num_tokens == [n for _, n in oracle]
        for s_got, s_want in zip(got.scores, want):
            assert abs(s_got - s_want) <= 1e-5 * abs(s_want), (ex.context, got.scores, want)
        assert got.lengths == [len(c) for c in ex.choices]
        assert got.pred == max(range(len(want)), key=lambda i: want[i])
        normed = [s / len(c) for s, c in zip(want, ex.choices)]
        assert got.pred_norm == max(range(len(normed)), key=lambda i: normed[i])
        acc += got.pred == ex.label
        acc_norm += got.pred_norm == ex.label
    assert result.acc == acc / len(EXAMPLES) and result.acc_norm == acc_norm / len(EXAMPLES)
    assert result.per_example[2].truncated and not result.per_example[0].truncated


def test_acc_norm_prefers_the_longer_choice_when_its_per_character_loglik_is_higher(
        megatron_model, hf_model, tokenizer):
    """'a' vs 'a <LONG_WORD>': the longer choice adds one more (negative) log-prob, so acc always picks
    'a'; per character the long choice wins by far, so acc_norm picks it."""
    from megatron_prune.evaluate import score_multiple_choice

    model, groups = megatron_model
    short, long = "a", f"a {LONG_WORD}"
    (s_short, _), (s_long, _) = (hf_choice_loglik(hf_model, tokenizer, "the cat", c, 16) for c in (short, long))
    assert s_long < s_short and s_long / len(long) > s_short / len(short), "precondition on the oracle"

    for label, acc, acc_norm in ((0, 1.0, 0.0), (1, 0.0, 1.0)):
        result = score_multiple_choice(model, groups, tokenizer,
                                       [MultipleChoiceExample("the cat", [short, long], label)],
                                       seq_length=16, micro_batch_size=2)
        (ex,) = result.per_example
        assert (ex.pred, ex.pred_norm) == (0, 1)
        assert (result.acc, result.acc_norm) == (acc, acc_norm)


def test_mc_padding_never_counts(megatron_model, tokenizer):
    """Another pad id and another packing (rows per micro-batch) give the same scores."""
    from megatron_prune.evaluate import score_multiple_choice

    model, groups = megatron_model
    base = score_multiple_choice(model, groups, tokenizer, EXAMPLES, seq_length=12, micro_batch_size=4,
                                 pad_id=0)
    for pad_id, mbs in ((tokenizer.convert_tokens_to_ids("cat"), 4), (tokenizer.eos_token_id, 1), (0, 5)):
        other = score_multiple_choice(model, groups, tokenizer, EXAMPLES, seq_length=12, micro_batch_size=mbs,
                                      pad_id=pad_id)
        for a, b in zip(base.per_example, other.per_example):
            assert a.num_tokens == b.num_tokens
            for x, y in zip(a.scores, b.scores):
                assert abs(x - y) <= 1e-6 * abs(x), (pad_id, mbs, a.scores, b.scores)


def test_ties_go_to_the_lowest_index(megatron_model, tokenizer):
    from megatron_prune.evaluate import argmax_first, score_multiple_choice

    assert argmax_first([-3.0, -1.0, -1.0, -2.0]) == 1
    assert argmax_first([-1.0, -1.0]) == 0
    model, groups = megatron_model
    result = score_multiple_choice(model, groups, tokenizer,
                                   [MultipleChoiceExample("the cat", ["sat", "sat"], 1)],
                                   seq_length=8, micro_batch_size=2)
    (ex,) = result.per_example
    assert ex.scores[0] == ex.scores[1]
    assert (ex.pred, ex.pred_norm, result.acc, result.acc_norm) == (0, 0, 0.0, 0.0)


def test_length_unit_bytes_counts_utf8_bytes():
    from megatron_prune.evaluate.multiple_choice import choice_length, split_pair

    assert choice_length("café", "chars") == 4 and choice_length("café", "bytes") == 5
    assert split_pair("Q: why?\nA: ", "because") == ("Q: why?\nA:", " because")
    assert split_pair("Q", " x") == ("Q", " x")


def test_mc_rejects_choices_longer_than_seq_length_and_foreign_token_ids(megatron_model, tokenizer):
    from megatron_prune.evaluate import score_multiple_choice

    model, groups = megatron_model
    with pytest.raises(ConfigError, match="example 0 choice 1 is 4 tokens long but seq_length=3"):
        score_multiple_choice(model, groups, tokenizer,
                              [MultipleChoiceExample("the", ["cat", "the cat sat on"], 0)],
                              seq_length=3, micro_batch_size=1)

    class Shifted:  # a tokenizer whose ids do not fit the model's vocabulary
        eos_token_id, bos_token_id, pad_token_id = 1, None, 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1000 + len(w) for w in t.split()] for t in texts]}

    with pytest.raises(ConfigError, match="vocab_size is 256"):
        score_multiple_choice(model, groups, Shifted(), [MultipleChoiceExample("a b", ["c", "d"], 0)],
                              seq_length=8, micro_batch_size=1)
