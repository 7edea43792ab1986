"""A tiny word-level tokenizer built locally, for tests and toy runs (never a hub download).

It is saved with `save_pretrained`, so it goes through the same `AutoTokenizer.from_pretrained(dir)`
path as a real tokenizer. Ids: 0 = <pad>, 1 = <eos>, 2 = <unk>, then the training words.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tiny_tokenizer(output_dir: str, texts: Iterable[str], vocab_size: int = 1000) -> str:
    """Train a WordLevel tokenizer on `texts` and save it to `output_dir`; returns `output_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK])
    backend.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
