"""HF <-> megatron conversion, independent of the TP/PP layout.

The canonical form is the full state dict of a TP1/PP1 megatron-core GPTModel built with the local
layer spec, with global layer indices; the runtime slices it into shards.
"""
from megatron_prune.convert.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_prune.convert.hf_weights import (
    CanonicalState, canonical_shapes, hf_to_megatron, iter_canonical, megatron_to_hf)

__all__ = ["CanonicalState", "canonical_shapes", "hf_config_to_model_config", "hf_to_megatron",
           "iter_canonical", "megatron_to_hf", "model_config_to_hf_config"]
