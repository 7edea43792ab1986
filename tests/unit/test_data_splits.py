"""Work-level splits: disjoint, stable, editions together, never empty, fractions validated."""
from __future__ import annotations

from collections import Counter

import pytest

from megatron_prune.config import ConfigError
from megatron_prune.data.corpus import load_corpus
from megatron_prune.data.splits import assign_splits, split_documents, validate_fractions, work_hash

FOUR = {"calibration": 0.1, "train": 0.7, "validation": 0.1, "task": 0.1}
THREE = {"calibration": 0.1, "train": 0.8, "validation": 0.1}


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


@pytest.mark.parametrize("seed", [0, 1, 2, 42, 1234])
def test_splits_are_disjoint_at_work_level_and_nonempty(shakespeare, seed):
    _, grouped = split_documents(shakespeare, FOUR, seed)
    assert list(grouped) == ["calibration", "train", "validation", "task"]
    works = {name: {d.work for d in docs} for name, docs in grouped.items()}
    for a in works:
        assert works[a], f"split {a} is empty for seed {seed}"
        for b in works:
            if a < b:
                assert not works[a] & works[b], f"{a} and {b} share works {works[a] & works[b]}"
    # Every document is in exactly one split.
    names = Counter(d.name for docs in grouped.values() for d in docs)
    assert set(names) == {d.name for d in shakespeare} and set(names.values()) == {1}


def test_both_editions_of_a_play_land_in_the_same_split(shakespeare):
    _, grouped = split_documents(shakespeare, FOUR, 1234)
    split_of = {d.name: name for name, docs in grouped.items() for d in docs}
    assert split_of["hamlet_gut.txt"] == split_of["hamlet_gut_f.txt"]
    assert split_of["twelfth_night_gut.txt"] == split_of["twelfe-night_gut_f.txt"]
    assert split_of["comedy_of_errors_gut.txt"] == split_of["comedy_of_errours_gut_f.txt"]


def test_assignment_is_stable_across_calls_and_input_order(shakespeare):
    works = [d.work for d in shakespeare]
    first = assign_splits(works, FOUR, 7)
    again = assign_splits(list(reversed(works)), dict(reversed(list(FOUR.items()))), 7)
    assert first == again
    other_seed = assign_splits(works, FOUR, 8)
    assert other_seed.work_to_split != first.work_to_split


def test_hash_method_does_not_move_works_when_the_corpus_grows():
    works = [f"work_{i:03d}" for i in range(200)]
    base = assign_splits(works, THREE, 3)
    grown = assign_splits(works + ["new_a", "new_b"], THREE, 3)
    assert base.method == grown.method == "hash"
    assert all(grown.work_to_split[w] == s for w, s in base.work_to_split.items())


def test_quota_fallback_fills_every_split_when_hashing_leaves_one_empty():
    # With 1% calibration and validation fractions, hashing puts all 4 works in train for most seeds;
    # pick the first such seed so the premise is checked, not assumed.
    works = ["w0", "w1", "w2", "w3"]
    fractions = {"calibration": 0.01, "train": 0.98, "validation": 0.01}
    seed = next(s for s in range(100) if all(0.01 <= work_hash(w, s) < 0.99 for w in works))
    result = assign_splits(works, fractions, seed)
    assert result.method == "quota"
    assert Counter(result.work_to_split.values()) == {"calibration": 1, "train": 2, "validation": 1}


def test_too_few_works_is_a_config_error():
    with pytest.raises(ConfigError, match="only 3 work"):
        assign_splits(["a", "b", "c"], FOUR, 0)


@pytest.mark.parametrize("fractions, message", [
    ({"calibration": 0.2, "train": 0.7, "validation": 0.2}, "sum to 1.1"),
    ({"calibration": 0.3, "train": 0.7}, "missing split.*validation"),
    ({"calibration": 0.1, "train": 0.7, "validation": 0.1, "test": 0.1}, "unknown split.*test"),
    ({"calibration": 0.0, "train": 0.9, "validation": 0.1}, r"calibration=0\.0 must be a number > 0"),
])
def test_bad_fractions_are_config_errors_naming_the_field(fractions, message):
    with pytest.raises(ConfigError, match=message):
        validate_fractions(fractions)
