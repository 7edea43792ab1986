"""The default multiple-choice task, built from held-out play text: "which line comes next?".

Each example: context = `context_lines` consecutive spoken lines of a play (plus a trailing newline),
choices = the true next line and `num_choices - 1` distractor lines drawn from the same document
(so style and spelling cannot give the answer away), label = where the true line landed after a
seeded shuffle. A model that has learned the text's sense and metre beats chance (1/num_choices);
pruning damage shows up as a drop towards chance.

Only spoken lines are used: stage directions, act/scene headings, speaker names (a line of their own
in the modern edition, a prefix like "  Ham. " in the Folio) and short fragments are dropped first,
so both context and choices are verse or prose a character says.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from megatron_prune.config import ConfigError
from megatron_prune.data.corpus import Document
from megatron_prune.data.tasks import MultipleChoiceExample

MIN_CHARS = 25  # shorter lines ("Who's there?") are too easy to mix up with any distractor
MIN_WORDS = 5
MAX_CHARS = 120

_STAGE = re.compile(
    r"^(enter|exit|exeunt|exeunt omnes|re-enter|flourish|alarum|alarums|sennet|manet|manent|trumpets?|"
    r"music|musicke|hautboys|thunder|retreat|excursions|dies|sound|sounds|they fight|drum)\b",
    re.IGNORECASE)
_HEADING = re.compile(r"^(act|actus|scene|scena|scoena|scaena|prologue|epilogue|finis|the end|"
                      r"dramatis personae|persons represented)\b", re.IGNORECASE)
# Folio speech openings are indented and carry an abbreviated speaker: "  Ham. ", "   Lady M. ", "  1. ".
_FOLIO_SPEAKER = re.compile(r"^\s+(?:[A-Z0-9][A-Za-z0-9']*\.?\s)?[A-Z0-9][A-Za-z0-9']{0,14}\.\s+(?=\S)")


def spoken_lines(text: str) -> list[str]:
    """The lines of `text` that a character speaks, in order, stripped, each long enough to test."""
    out: list[str] = []
    in_bracket = False
    for raw in text.split("\n"):
        line = raw.strip()
        # Modern-edition stage directions are bracketed and may span several lines.
        if in_bracket:
            in_bracket = "]" not in line
            continue
        if line.startswith("["):
            in_bracket = "]" not in line
            continue
        line = _FOLIO_SPEAKER.sub("", raw).strip()
        if not (MIN_CHARS <= len(line) <= MAX_CHARS) or len(line.split()) < MIN_WORDS:
            continue
        if "[" in line or "]" in line or _STAGE.match(line) or _HEADING.match(line):
            continue
        letters = [ch for ch in line if ch.isalpha()]
        if not letters or sum(ch.isupper() for ch in letters) > 0.6 * len(letters):
            continue  # titles and cast lists in capitals
        out.append(line)
    return out


def _distractors(lines: list[str], index: int, context_lines: int, count: int,
                 rng: random.Random) -> list[str]:
    """`count` distinct lines of the same document, away from the example's own passage."""
    excluded = set(lines[max(0, index - context_lines): index + context_lines + 1])
    chosen: list[str] = []
    # Rejection sampling is cheap here: plays have thousands of lines and we need a handful.
    for _ in range(100 * count):
        j = rng.randrange(len(lines))
        if abs(j - index) <= context_lines or lines[j] in excluded or lines[j] in chosen:
            continue
        chosen.append(lines[j])
        if len(chosen) == count:
            return chosen
    raise ConfigError(f"cannot find {count} distinct distractor lines; the document is too short "
                      f"({len(lines)} spoken lines)")


def build_shakespeare_task(documents: Sequence[Document], n_examples: int, seed: int,
                           context_lines: int = 4, num_choices: int = 4) -> list[MultipleChoiceExample]:
    """Deterministic for (documents, n_examples, seed, context_lines, num_choices).

    Example positions are drawn uniformly over all eligible lines of all documents (so longer plays
    give more examples) and emitted in document order.
    """
    if n_examples < 1 or context_lines < 1 or num_choices < 2:
        raise ConfigError(f"task: n_examples={n_examples}, context_lines={context_lines}, "
                          f"num_choices={num_choices} must be >= 1, >= 1 and >= 2")
    ordered = sorted(documents, key=lambda d: d.name)
    per_doc = [spoken_lines(d.text) for d in ordered]
    # A document must leave room for distractors outside the example's own passage.
    min_lines = 4 * (context_lines + num_choices)
    positions = [(k, i) for k, lines in enumerate(per_doc) if len(lines) >= min_lines
                 for i in range(context_lines, len(lines))]
    if len(positions) < n_examples:
        raise ConfigError(
            f"task: asked for {n_examples} examples but the task documents "
            f"{[d.name for d in ordered]} give only {len(positions)} eligible lines. Fix: lower "
            f"task_examples, or give the task split a larger fraction.")
    rng = random.Random(seed)
    examples = []
    for k, i in sorted(rng.sample(positions, n_examples)):
        lines = per_doc[k]
        choices = [lines[i]] + _distractors(lines, i, context_lines, num_choices - 1, rng)
        order = list(range(num_choices))
        rng.shuffle(order)
        context = "\n".join(lines[i - context_lines: i]) + "\n"
        examples.append(MultipleChoiceExample(
            context=context, choices=[choices[o] for o in order], label=order.index(0)))
    return examples
