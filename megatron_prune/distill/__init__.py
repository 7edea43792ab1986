"""Distillation losses.

kl.py   forward KL(p_teacher || p_student) on vocab-parallel logits: per-token scalars reduced over
        the TP group, chunked along tokens, explicit backward; `reference_kl` is its oracle.
"""
from megatron_prune.distill.kl import reference_kl, vocab_parallel_kl

__all__ = ["reference_kl", "vocab_parallel_kl"]
