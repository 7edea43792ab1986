"""Deterministic document-level splits: whole works go to exactly one split.

Splits and what reads them:
- `calibration`: text the importance scores (and Wanda / N:M masks) are computed on;
- `train`: distillation and teacher-correction text;
- `validation`: perplexity during and after training (may be used to pick checkpoints);
- `task` (optional): the text the default multiple-choice task is built from. It is a split of its
  own so the task stays unseen even by checkpoint selection on validation. Leave it out of
  `fractions` and the task is built from `validation` instead.

How a work is assigned (pure function of the work keys, the fractions and the seed):
1. `hash` method: u = sha256(f"{seed}\\0{work}") mapped to [0, 1); the work goes to the split whose
   cumulative-fraction interval holds u. A work's split depends only on its own key, so adding a
   file to the corpus never moves the others.
2. With few works (Shakespeare has 42) a small fraction can leave a split empty by chance. Then the
   `quota` method is used instead: works sorted by u, each split gets round(fraction * n_works) works
   (largest remainder, at least one each) as consecutive runs in that order.
Fractions count works, not tokens.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from megatron_prune.config import ConfigError
from megatron_prune.data.corpus import Document

# Canonical order: assignment walks the unit interval in this order, whatever order the dict has.
SPLIT_NAMES = ("calibration", "train", "validation", "task")
REQUIRED_SPLITS = ("calibration", "train", "validation")


@dataclass(frozen=True)
class SplitAssignment:
    work_to_split: dict[str, str]
    method: str  # "hash" | "quota"

    def works_in(self, split: str) -> list[str]:
        return sorted(w for w, s in self.work_to_split.items() if s == split)


def validate_fractions(fractions: Mapping[str, float], where: str = "data.fractions") -> dict[str, float]:
    """Check names and values; return the fractions in canonical split order."""
    unknown = sorted(set(fractions) - set(SPLIT_NAMES))
    if unknown:
        raise ConfigError(f"{where}: unknown split(s) {unknown}; use {list(SPLIT_NAMES)}")
    missing = [name for name in REQUIRED_SPLITS if name not in fractions]
    if missing:
        raise ConfigError(f"{where}: missing split(s) {missing}; every pipeline needs {list(REQUIRED_SPLITS)}")
    out = {}
    for name in SPLIT_NAMES:
        if name not in fractions:
            continue
        value = fractions[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{where}.{name}={value!r} must be a number > 0 (drop the key to omit "
                              f"an optional split)")
        out[name] = float(value)
    total = sum(out.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"{where}: fractions sum to {total:.6f}; they must sum to 1")
    return out


def work_hash(work: str, seed: int) -> float:
    """A stable position of `work` in [0, 1) (sha256, so it never depends on PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}\0{work}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _quota_counts(fractions: dict[str, float], n_works: int) -> dict[str, int]:
    """Largest-remainder apportionment of n_works with at least one work per split."""
    names = list(fractions)
    raw = {name: fractions[name] * n_works for name in names}
    counts = {name: max(1, int(math.floor(raw[name]))) for name in names}
    # Hand out (or take back) works by remainder; ties broken by canonical order.
    by_remainder = sorted(names, key=lambda name: (-(raw[name] - math.floor(raw[name])), names.index(name)))
    while sum(counts.values()) < n_works:
        for name in by_remainder:
            if sum(counts.values()) == n_works:
                break
            counts[name] += 1
    while sum(counts.values()) > n_works:
        # Only possible because of the max(1, .) floor: take from the largest split.
        largest = max(names, key=lambda name: (counts[name], -names.index(name)))
        counts[largest] -= 1
    return counts


def assign_splits(works: Iterable[str], fractions: Mapping[str, float], seed: int) -> SplitAssignment:
    """Map every work key to one split; every split in `fractions` gets at least one work."""
    fractions = validate_fractions(fractions)
    keys = sorted(set(works))
    if len(keys) < len(fractions):
        raise ConfigError(
            f"data.fractions asks for {len(fractions)} splits {list(fractions)} but the corpus has only "
            f"{len(keys)} work(s). Fix: add documents, or drop the optional 'task' split.")
    position = {w: work_hash(w, seed) for w in keys}

    bounds, acc = [], 0.0
    for name, value in fractions.items():
        acc += value
        bounds.append((acc, name))
    bounds[-1] = (math.inf, bounds[-1][1])  # guard against sum(fractions) = 0.9999999

    def by_interval(u: float) -> str:
        return next(name for bound, name in bounds if u < bound)

    hashed = {w: by_interval(position[w]) for w in keys}
    if set(hashed.values()) == set(fractions):
        return SplitAssignment(hashed, "hash")

    ordered = sorted(keys, key=lambda w: (position[w], w))
    counts = _quota_counts(dict(fractions), len(keys))
    quota, start = {}, 0
    for name in fractions:
        for w in ordered[start:start + counts[name]]:
            quota[w] = name
        start += counts[name]
    return SplitAssignment(quota, "quota")


def split_documents(documents: Sequence[Document], fractions: Mapping[str, float],
                    seed: int) -> tuple[SplitAssignment, dict[str, list[Document]]]:
    """Group documents by split, keeping their order; splits come in canonical order."""
    assignment = assign_splits((d.work for d in documents), fractions, seed)
    grouped: dict[str, list[Document]] = {name: [] for name in validate_fractions(fractions)}
    for doc in documents:
        grouped[assignment.work_to_split[doc.work]].append(doc)
    return assignment, grouped
