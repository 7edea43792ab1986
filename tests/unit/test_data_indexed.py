"""prepare_data: indexed-dataset round trip, manifest, atomic output, errors before work."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset  # heavy import: pay it at collection

from megatron_prune.config import ConfigError
from megatron_prune.data import indexed
from megatron_prune.data.indexed import load_tokenizer, prepare_data
from megatron_prune.data.manifest import load_manifest
from megatron_prune.data.tasks import load_jsonl_task
from megatron_prune.data.tiny_tokenizer import build_tiny_tokenizer

SMOLLM2_DIR = os.path.expanduser("~/.cache/megatron_prune/smollm2-135m-instruct-hf")
FRACTIONS = {"calibration": 0.25, "train": 0.5, "validation": 0.25}
WORDS = "the king queen fool speaks sleeps dies loves hates a crown sword night day".split()


def _corpus(root: Path, n_docs: int = 8) -> Path:
    """Deterministic fake corpus: document i has 5 + 3*i lines of words."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, size=6)) for _ in range(5 + 3 * i)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> str:
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), [" ".join(WORDS)])


@pytest.fixture
def corpus(tmp_path) -> str:
    return str(_corpus(tmp_path / "corpus"))


def test_round_trip_tokens_read_back_equal_tokens_written(corpus, tiny_tok, tmp_path):
    out = tmp_path / "data"
    manifest = prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, show_progress=False)
    tokenizer = load_tokenizer(tiny_tok)
    texts = {p.name: p.read_text() for p in Path(corpus).glob("*.txt")}
    seen = []
    for split, record in manifest.splits.items():
        dataset = IndexedDataset(manifest.split_prefix(split))
        assert len(dataset.document_indices) - 1 == record.num_documents == len(record.documents)
        for k, doc in enumerate(record.documents):
            expected = tokenizer(texts[doc.name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            got = dataset[k].tolist()
            assert got == expected, f"{split}/{doc.name}"
            assert doc.num_tokens == len(expected)
            seen.append(doc.name)
        assert dataset[0].dtype == np.uint16  # vocab of ~17 fits uint16
    assert sorted(seen) == sorted(texts)


def test_manifest_records_splits_hashes_and_tokenizer(corpus, tiny_tok, tmp_path):
    out = tmp_path / "data"
    written = prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, show_progress=False)
    assert sorted(os.listdir(out)) == sorted(["manifest.json"] + [f"{s}.{e}" for s in FRACTIONS
                                                                  for e in ("bin", "idx")])
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "megatron_prune.data/1" and raw["tokenizer"]["eos_id"] == 1
    assert raw["tokenizer"]["vocab_size"] == len(load_tokenizer(tiny_tok)) and raw["dtype"] == "uint16"
    assert "root" not in raw  # paths are relative so the directory can move
    loaded = load_manifest(str(out))
    assert loaded.to_dict() == written.to_dict()
    for split, record in loaded.splits.items():
        assert record.num_tokens == sum(d.num_tokens for d in record.documents)
        assert record.bin_sha256 == indexed.file_sha256(loaded.split_prefix(split) + ".bin")
    # Same inputs, same seed: byte-identical data.
    again = prepare_data(corpus, tiny_tok, str(tmp_path / "again"), FRACTIONS, seed=5, show_progress=False)
    assert {s: r.bin_sha256 for s, r in again.splits.items()} == {s: r.bin_sha256 for s, r in written.splits.items()}


class _FailingTokenizer:
    """Wraps a real tokenizer and raises on the n-th document, after some files were written."""

    def __init__(self, inner, fail_on: int):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.eos_token_id, self.pad_token_id = inner.eos_token_id, inner.pad_token_id

    def __len__(self):
        return len(self.inner)

    def __call__(self, text, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("tokenizer exploded")
        return self.inner(text, **kwargs)


def test_failure_mid_way_leaves_no_output_dir(corpus, tiny_tok, tmp_path, monkeypatch):
    failing = _FailingTokenizer(load_tokenizer(tiny_tok), fail_on=5)
    monkeypatch.setattr(indexed, "load_tokenizer", lambda path: failing)
    out = tmp_path / "parent" / "data"
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, show_progress=False)
    assert failing.calls == 5  # it really failed mid-way, after the first split was written
    assert not out.exists()
    assert os.listdir(out.parent) == []  # no temp directory left behind either


def test_failure_with_overwrite_keeps_the_previous_output(corpus, tiny_tok, tmp_path, monkeypatch):
    out = tmp_path / "data"
    first = prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(indexed, "load_tokenizer",
                        lambda path: _FailingTokenizer(load_tokenizer(tiny_tok), fail_on=2))
    with pytest.raises(RuntimeError):
        prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=6, overwrite=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]
    assert load_manifest(str(out)).seed == first.seed


def test_existing_nonempty_output_is_refused_unless_overwrite(corpus, tiny_tok, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not empty.*overwrite"):
        prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, show_progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    manifest = prepare_data(corpus, tiny_tok, str(out), FRACTIONS, seed=5, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and manifest.root == str(out)
    # An existing *empty* directory is fine without overwrite.
    (tmp_path / "empty").mkdir()
    prepare_data(corpus, tiny_tok, str(tmp_path / "empty"), FRACTIONS, seed=5, show_progress=False)
    assert (tmp_path / "empty" / "manifest.json").exists()


def test_missing_tokenizer_dir_is_named_before_any_output(corpus, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ConfigError, match=r"tokenizer_dir=.*no_tok.*does not exist.*Fix"):
        prepare_data(corpus, str(tmp_path / "no_tok"), str(out), FRACTIONS, seed=5, show_progress=False)
    (tmp_path / "not_a_tok").mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        prepare_data(corpus, str(tmp_path / "not_a_tok"), str(out), FRACTIONS, seed=5, show_progress=False)
    assert not out.exists()


def test_empty_corpus_is_a_config_error_before_any_output(tiny_tok, tmp_path):
    (tmp_path / "empty_corpus").mkdir()
    with pytest.raises(ConfigError, match="empty_corpus.*no .txt files"):
        prepare_data(str(tmp_path / "empty_corpus"), tiny_tok, str(tmp_path / "data"), FRACTIONS, seed=5,
                     show_progress=False)
    assert not (tmp_path / "data").exists()


def test_task_file_is_written_from_the_validation_split_when_there_is_no_task_split(tiny_tok, tmp_path):
    corpus = _corpus(tmp_path / "corpus", n_docs=8)
    # Give every document enough distinct lines for a next-line task.
    for i, path in enumerate(sorted(corpus.glob("*.txt"))):
        path.write_text("".join(f"the king speaks line {j} of doc {i} at night\n" for j in range(60)))
    manifest = prepare_data(str(corpus), tiny_tok, str(tmp_path / "data"), FRACTIONS, seed=5,
                            show_progress=False, task_examples=10)
    assert manifest.task is not None and manifest.task.split == "validation"
    examples = load_jsonl_task(manifest.task_path())
    assert len(examples) == 10
    validation_text = "".join((corpus / d.name).read_text() for d in manifest.splits["validation"].documents)
    assert all(ex.choices[ex.label] + "\n" in validation_text for ex in examples)


@pytest.mark.skipif(not os.path.isdir(SMOLLM2_DIR), reason="SmolLM2 tokenizer not cached")
def test_real_smollm2_tokenizer_round_trip(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a.txt": "To be, or not to be, that is the question:\n",
             "b.txt": "Whether 'tis nobler in the mind to suffer\n", "c.txt": "The slings and arrows\n"}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    manifest = prepare_data(str(corpus), SMOLLM2_DIR, str(tmp_path / "data"),
                            {"calibration": 0.3, "train": 0.4, "validation": 0.3}, seed=0, show_progress=False)
    assert manifest.tokenizer.vocab_size == 49152 and manifest.tokenizer.eos_id == 2
    assert manifest.dtype == "uint16"
    tokenizer = load_tokenizer(SMOLLM2_DIR)
    for split, record in manifest.splits.items():
        (doc,) = record.documents
        dataset = IndexedDataset(manifest.split_prefix(split))  # keep alive: items are views of its mmap
        got = dataset[0].tolist()
        assert got[-1] == 2 and got[:-1] == tokenizer(texts[doc.name], add_special_tokens=False)["input_ids"]
        assert len(got) > 3  # real BPE pieces, not characters or a single unk
