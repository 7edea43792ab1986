"""Tokenise a corpus into one megatron-core indexed dataset (`<split>.bin` / `<split>.idx`) per split.

`prepare_data` is the library function behind the prepare-data stage. It runs on one process (rank 0
in a distributed job; the others wait on a barrier) and writes the output directory atomically:
everything is built in a temporary sibling directory and renamed into place at the end.

Layout of the output directory:
    manifest.json                     see `manifest.py`
    <split>.bin, <split>.idx          one document per corpus file; each document is one sequence
                                      (megatron's `document_indices` == sequence indices), EOS appended
    task.jsonl                        optional default multiple-choice task (see `shakespeare_task.py`)
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from megatron_prune.config import ConfigError
from megatron_prune.checkpoint import atomic_directory, check_output_dir
from megatron_prune.data.corpus import Document, corpus_sha256, load_corpus
from megatron_prune.data.manifest import (DocumentRecord, Manifest, SplitRecord, TaskRecord,
                                          TokenizerRecord, file_sha256)
from megatron_prune.data.shakespeare_task import build_shakespeare_task
from megatron_prune.data.splits import split_documents, validate_fractions
from megatron_prune.data.tasks import write_jsonl_task

# Files that define a HF tokenizer; their hashes pin the tokenisation in the manifest.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")
TASK_FILE = "task.jsonl"


def load_tokenizer(tokenizer_dir: str, field: str = "data.tokenizer_dir") -> Any:
    """`AutoTokenizer.from_pretrained(tokenizer_dir)`, offline, with errors that say what to do."""
    path = os.path.expanduser(tokenizer_dir)
    if not os.path.isdir(path):
        raise ConfigError(
            f"{field}={tokenizer_dir!r} does not exist. Fix: point {field} at a directory written by "
            f"`save_pretrained` (the convert stage caches SmolLM2 at "
            f"~/.cache/megatron_prune/smollm2-135m-instruct-hf).")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise ConfigError(f"{field}={tokenizer_dir!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}"
                          f", ...). Fix: save the tokenizer there with `tokenizer.save_pretrained(dir)`.")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; all mean "this dir is not usable"
        raise ConfigError(f"{field}={tokenizer_dir!r}: transformers could not load a tokenizer "
                          f"({type(exc).__name__}: {exc})") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{field}={tokenizer_dir!r}: the tokenizer has no eos token; documents are "
                          f"separated by EOS. Fix: set eos_token in tokenizer_config.json.")
    return tokenizer


def tokenizer_sha256(tokenizer_dir: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = os.path.join(os.path.expanduser(tokenizer_dir), name)
        if os.path.isfile(path):
            digest.update(f"{name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest dtype megatron's reader accepts for ids below `vocab_size` (uint16 below 65500)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def encode_document(tokenizer: Any, text: str, vocab_size: int) -> np.ndarray:
    """Token ids of `text` followed by EOS, as int64. No BOS: megatron pretraining data has none."""
    # verbose=False: whole documents exceed model_max_length; windows are cut later, not here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    out = np.asarray(list(ids) + [tokenizer.eos_token_id], dtype=np.int64)  # [n_tokens]
    if out.size and (out.min() < 0 or out.max() >= vocab_size):
        raise ValueError(f"tokenizer produced id {int(out.max())} outside [0, {vocab_size})")
    return out


def write_split(prefix: str, documents: list[Document], encode: Callable[[str], np.ndarray],
                dtype: type[np.number], progress: Optional[Any] = None) -> SplitRecord:
    """Tokenise `documents` into `<prefix>.bin/.idx`, one megatron document (= one sequence) each."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    records = []
    try:
        for doc in documents:
            tokens = encode(doc.text)  # [n_tokens]
            builder.add_document(tokens, [int(tokens.size)])
            records.append(DocumentRecord(name=doc.name, work=doc.work, num_tokens=int(tokens.size),
                                          sha256=doc.sha256))
            if progress is not None:
                progress.update(1)
    except BaseException:
        builder.data_file.close()  # the caller removes the half-written directory
        raise
    builder.finalize(prefix + ".idx")  # closes the .bin and writes the index
    return SplitRecord(prefix=os.path.basename(prefix), num_documents=len(records),
                       num_tokens=sum(r.num_tokens for r in records),
                       bin_sha256=file_sha256(prefix + ".bin"), idx_sha256=file_sha256(prefix + ".idx"),
                       documents=records)


def prepare_data(source: str, tokenizer_dir: str, output_dir: str, fractions: Mapping[str, float],
                 seed: int, *, overwrite: bool = False, show_progress: bool = True,
                 task_examples: int = 0, task_context_lines: int = 4,
                 task_num_choices: int = 4) -> Manifest:
    """Split `source` by work, tokenise each split into an indexed dataset, write `manifest.json`.

    All input checks (output dir, fractions, corpus, tokenizer, task size) run before any file is
    written. With `task_examples > 0` a default multiple-choice task is built from the `task` split
    (or `validation` when `fractions` has no `task`) and written as `task.jsonl`.
    """
    final_dir = str(check_output_dir(output_dir, overwrite, "data.output_dir").absolute())
    fractions = validate_fractions(fractions)
    documents = load_corpus(source)
    assignment, grouped = split_documents(documents, fractions, seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = len(tokenizer)  # includes added special tokens, unlike tokenizer.vocab_size
    dtype = token_dtype(vocab_size)

    examples, task_split = [], "task" if "task" in grouped else "validation"
    if task_examples > 0:
        examples = build_shakespeare_task(grouped[task_split], task_examples, seed,
                                          context_lines=task_context_lines, num_choices=task_num_choices)

    from tqdm.auto import tqdm

    def encode(text: str) -> np.ndarray:
        return encode_document(tokenizer, text, vocab_size)

    splits: dict[str, SplitRecord] = {}
    task_record = None
    with atomic_directory(final_dir, overwrite=overwrite) as tmp:
        with tqdm(total=len(documents), desc="tokenize", unit="doc", disable=not show_progress) as bar:
            for name, docs in grouped.items():
                bar.set_postfix_str(name)
                splits[name] = write_split(os.path.join(tmp, name), docs, encode, dtype, bar)
        if examples:
            write_jsonl_task(examples, os.path.join(tmp, TASK_FILE))
            task_record = TaskRecord(file=TASK_FILE, split=task_split, num_examples=len(examples),
                                     seed=seed, context_lines=task_context_lines,
                                     num_choices=task_num_choices,
                                     sha256=file_sha256(os.path.join(tmp, TASK_FILE)))
        manifest = Manifest(
            source=source,
            source_dir=os.path.commonpath([os.path.dirname(os.path.abspath(d.path)) for d in documents]),
            seed=seed, fractions=dict(fractions), split_method=assignment.method,
            corpus_sha256=corpus_sha256(documents),
            tokenizer=TokenizerRecord(dir=os.path.abspath(os.path.expanduser(tokenizer_dir)),
                                      cls=type(tokenizer).__name__, vocab_size=vocab_size,
                                      eos_id=int(tokenizer.eos_token_id),
                                      pad_id=int(tokenizer.pad_token_id
                                                 if tokenizer.pad_token_id is not None
                                                 else tokenizer.eos_token_id),
                                      sha256=tokenizer_sha256(tokenizer_dir)),
            dtype=np.dtype(dtype).name, splits=splits, task=task_record)
        manifest.save(tmp)
    manifest.root = final_dir
    return manifest
