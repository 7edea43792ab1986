"""Evaluation at any TP/PP/DP layout: perplexity on token windows, multiple-choice log-likelihood.

Both run megatron's forward-only pipeline schedule with labels, so the last stage computes the
vocab-parallel cross-entropy itself and only per-row sums cross the wire (see `batching`).
"""
from megatron_prune.evaluate.multiple_choice import (MCExampleResult, MCResult, argmax_first,
                                                     score_multiple_choice)
from megatron_prune.evaluate.perplexity import PerplexityResult, perplexity

__all__ = ["MCExampleResult", "MCResult", "PerplexityResult", "argmax_first", "perplexity",
           "score_multiple_choice"]
