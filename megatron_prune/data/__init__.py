"""Text -> megatron indexed datasets -> fixed-length, loss-masked samples; multiple-choice tasks.

Modules, one concept each:
    corpus            find and clean documents; the work key that keeps editions of a play together
    splits            deterministic work-level calibration / train / validation / task splits
    indexed           prepare_data: tokenise each split into <split>.bin/.idx, atomically
    manifest          manifest.json: what a prepared directory holds, with hashes
    loaders           windows with loss masks; DP-sharded evaluation micro-batches
    sampler           resumable training order: a pure function of (seed, consumed_samples)
    tasks             MultipleChoiceExample; JSONL and BIG-bench loaders, JSONL writer
    shakespeare_task  the default "which line comes next" task from held-out plays
    tiny_tokenizer    a local word-level tokenizer for tests and toy runs

Heavy imports (megatron.core, transformers) happen inside the functions that need them, so importing
this package stays cheap.
"""
from megatron_prune.data.corpus import Document, clean_text, load_corpus, shakespeare_work_key
from megatron_prune.data.indexed import load_tokenizer, prepare_data
from megatron_prune.data.loaders import (TokenWindows, iter_microbatches, num_microbatches, read_documents,
                                         token_windows, windows_from_documents)
from megatron_prune.data.manifest import Manifest, load_manifest
from megatron_prune.data.sampler import global_batch_indices, sample_indices, training_microbatches
from megatron_prune.data.shakespeare_task import build_shakespeare_task
from megatron_prune.data.splits import SPLIT_NAMES, assign_splits, split_documents
from megatron_prune.data.tasks import (MultipleChoiceExample, load_bigbench_task, load_jsonl_task, load_task,
                                       write_jsonl_task)

__all__ = [
    "Document", "clean_text", "load_corpus", "shakespeare_work_key",
    "load_tokenizer", "prepare_data",
    "TokenWindows", "iter_microbatches", "num_microbatches", "read_documents", "token_windows",
    "windows_from_documents",
    "Manifest", "load_manifest",
    "global_batch_indices", "sample_indices", "training_microbatches",
    "build_shakespeare_task",
    "SPLIT_NAMES", "assign_splits", "split_documents",
    "MultipleChoiceExample", "load_bigbench_task", "load_jsonl_task", "load_task", "write_jsonl_task",
]
