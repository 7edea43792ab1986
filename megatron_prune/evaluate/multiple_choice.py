"""Multiple-choice accuracy by log-likelihood, the way lm-evaluation-harness scores it.

For each (example, choice) the score is the summed log-probability of the choice's tokens following
the context: sum_i log p(cont_i | context, cont_<i).
  - Tokens: the context and the continuation are tokenized separately, without special tokens. As
    lm-eval does, trailing whitespace of the context is moved to the front of the continuation
    ("Q: ...\\nA: " + "Paris" is scored as "Q: ...\\nA:" + " Paris"), so BPE tokenizers see the usual
    " word" token; an empty context becomes the BOS (or EOS) token, so the first choice token has
    something to be predicted from.
  - context + continuation is cut from the LEFT to seq_length + 1 tokens (the continuation always
    fits, or it is an error), and only continuation targets carry loss_mask 1.
  - acc: argmax of the raw score. acc_norm: argmax of score / len(choice) — lm-eval's acc_norm divides
    by the choice's length in characters (`length_unit="bytes"` gives lm-eval's acc_bytes variant).
    Ties go to the lowest choice index (numpy's argmax).

Rows are right-padded into [micro_batch_size, width] micro-batches (longest rows first, so rows of
similar length share a schedule call and the padding that is cut away is most of it), DP-sharded with
the same rule as perplexity, and put back in example order on every rank by an exact all-reduce over
the DP group of an [n_rows, 3] table (each row is written by exactly one DP rank, the others add 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.config import ConfigError
from megatron_prune.data.loaders import TokenWindows
from megatron_prune.data.tasks import MultipleChoiceExample
from megatron_prune.evaluate.batching import check_token_ids, local_row_sums
from megatron_prune.parallel import Groups

LENGTH_UNITS = ("chars", "bytes")


@dataclass(frozen=True)
class MCExampleResult:
    index: int  # position in the input list
    label: int
    scores: list[float]  # summed log-likelihood of each choice's tokens
    num_tokens: list[int]  # continuation tokens scored per choice
    lengths: list[int]  # acc_norm's divisor per choice (characters, or bytes)
    pred: int  # argmax of scores
    pred_norm: int  # argmax of scores / lengths
    truncated: bool = False  # the context was cut from the left to fit seq_length

    @property
    def correct(self) -> bool:
        return self.pred == self.label

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.label


@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    n: int
    per_example: list[MCExampleResult] = field(repr=False)


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; a tie goes to the lowest index."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def choice_length(choice: str, unit: str = "chars") -> int:
    return len(choice.encode("utf-8")) if unit == "bytes" else len(choice)


def split_pair(context: str, choice: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (lm-eval's `_encode_pair`)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + choice
    return context, choice


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prefix_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("multiple choice: an example has an empty context and the tokenizer has neither a bos "
                      "nor an eos token to stand in for it. Fix: give every example a context.")


def encode_examples(tokenizer: Any, examples: Sequence[MultipleChoiceExample]
                    ) -> list[list[tuple[list[int], list[int]]]]:
    """Per example, per choice: (context ids, continuation ids)."""
    pairs = [[split_pair(ex.context, choice) for choice in ex.choices] for ex in examples]
    flat = [p for per_example in pairs for p in per_example]
    contexts = _encode(tokenizer, [c for c, _ in flat])
    continuations = _encode(tokenizer, [k for _, k in flat])
    out, r = [], 0
    for e, ex in enumerate(examples):
        rows = []
        for j, choice in enumerate(ex.choices):
            ctx, cont = contexts[r], continuations[r]
            r += 1
            if not ctx:
                ctx = [_prefix_token(tokenizer)]
            if not cont:
                raise ConfigError(f"multiple choice: example {e} choice {j} ({choice!r}) tokenizes to no tokens, "
                                  f"so it has no likelihood. Fix: drop or rewrite that choice.")
            rows.append((ctx, cont))
        out.append(rows)
    return out


def build_rows(encoded: list[list[tuple[list[int], list[int]]]], seq_length: int, pad_id: int
               ) -> tuple[TokenWindows, list[int], list[bool]]:
    """One row per (example, choice), longest first. sample_ids = flat row index (example-major),
    document_ids = example index. Returns (windows, continuation token counts, truncated flags),
    the last two indexed by flat row."""
    flat, n_cont, truncated = [], [], []
    for e, rows in enumerate(encoded):
        for j, (ctx, cont) in enumerate(rows):
            if len(cont) > seq_length:
                raise ConfigError(f"multiple choice: example {e} choice {j} is {len(cont)} tokens long but "
                                  f"seq_length={seq_length}. Fix: raise seq_length (the model's "
                                  f"max_position_embeddings allowing) or shorten the choice.")
            full = (ctx + cont)[-(seq_length + 1):]  # cut from the left, as lm-eval does
            flat.append((e, full, len(cont)))
            n_cont.append(len(cont))
            truncated.append(len(ctx) + len(cont) > seq_length + 1)
    order = sorted(range(len(flat)), key=lambda r: (-len(flat[r][1]), r))
    width = max(len(full) - 1 for _, full, _ in flat)
    n = len(flat)
    tokens = torch.full((n, width), pad_id, dtype=torch.int64)  # [n, w]
    labels = torch.full((n, width), pad_id, dtype=torch.int64)  # [n, w]
    loss_mask = torch.zeros(n, width, dtype=torch.float32)  # [n, w]
    for slot, r in enumerate(order):
        _, full, k = flat[r]
        m = len(full) - 1  # inputs (and targets) in this row
        tokens[slot, :m] = torch.tensor(full[:-1], dtype=torch.int64)
        labels[slot, :m] = torch.tensor(full[1:], dtype=torch.int64)
        loss_mask[slot, m - k:m] = 1.0  # only the continuation's targets count
    windows = TokenWindows(tokens=tokens, labels=labels, loss_mask=loss_mask,
                           document_ids=torch.tensor([flat[r][0] for r in order], dtype=torch.int64),
                           sample_ids=torch.tensor(order, dtype=torch.int64), pad_id=pad_id)
    return windows, n_cont, truncated


def score_multiple_choice(model: torch.nn.Module, groups: Groups, tokenizer: Any,
                          examples: list[MultipleChoiceExample], seq_length: int, micro_batch_size: int,
                          show_progress: bool = False, *, pad_id: Optional[int] = None,
                          length_unit: str = "chars", microbatches_per_call: int = 4) -> MCResult:
    """Score every choice of every example; every rank returns the same `MCResult`, in input order.

    `tokenizer` is a HF tokenizer (`megatron_prune.data.load_tokenizer(dir)`). `pad_id` only fills
    masked positions (default: the tokenizer's pad, else eos, else 0); it never changes a score.
    """
    if not examples:
        raise ConfigError("multiple choice: no examples to score. Fix: point the task at a non-empty file.")
    if seq_length < 1:
        raise ConfigError(f"multiple choice: seq_length={seq_length} must be >= 1")
    if length_unit not in LENGTH_UNITS:
        raise ConfigError(f"multiple choice: length_unit={length_unit!r}; use one of {LENGTH_UNITS}")
    for e, ex in enumerate(examples):
        if len(ex.choices) < 1 or not 0 <= ex.label < len(ex.choices):
            raise ConfigError(f"multiple choice: example {e} has label {ex.label} for {len(ex.choices)} choices")
    if pad_id is None:
        pad_id = next((int(v) for v in (getattr(tokenizer, "pad_token_id", None),
                                        getattr(tokenizer, "eos_token_id", None)) if v is not None), 0)

    encoded = encode_examples(tokenizer, examples)
    windows, n_cont, truncated = build_rows(encoded, seq_length, pad_id)
    check_token_ids(windows.tokens, model, "multiple choice (tokenized examples)")
    ids, sums = local_row_sums(model, groups, windows, micro_batch_size,
                               microbatches_per_call=microbatches_per_call, show_progress=show_progress,
                               desc="multiple choice")  # [k], [k, 2]
    real = ids >= 0  # drop filler rows
    ids, sums = ids[real], sums[real]

    table = torch.zeros(len(windows), 3, dtype=torch.float64)  # per flat row: [score, tokens, seen]
    table[ids, 0] = -sums[:, 0]
    table[ids, 1] = sums[:, 1]
    table[ids, 2] = 1.0
    if groups.dp_size > 1:
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=groups.dp)
    if not torch.equal(table[:, 2], torch.ones(len(windows), dtype=torch.float64)) or \
            table[:, 1].round().long().tolist() != n_cont:
        raise RuntimeError("multiple choice: the DP shards did not score every (example, choice) exactly once")

    per_example, r = [], 0
    for e, ex in enumerate(examples):
        k = len(ex.choices)
        scores = table[r:r + k, 0].tolist()
        lengths = [choice_length(c, length_unit) for c in ex.choices]
        normed = [s / max(n, 1) for s, n in zip(scores, lengths)]
        per_example.append(MCExampleResult(
            index=e, label=ex.label, scores=scores, num_tokens=n_cont[r:r + k], lengths=lengths,
            pred=argmax_first(scores), pred_norm=argmax_first(normed), truncated=any(truncated[r:r + k])))
        r += k
    n = len(per_example)
    return MCResult(acc=sum(x.correct for x in per_example) / n,
                    acc_norm=sum(x.correct_norm for x in per_example) / n, n=n, per_example=per_example)
