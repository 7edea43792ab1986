"""Build a megatron-core GPTModel (this rank's pipeline stage and TP shard) from a ModelConfig."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_prune.config import ConfigError, ModelConfig
from megatron_prune.parallel import Groups
from megatron_prune.runtime import cpu


def gpt2_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF GPT-2's `gelu_new` (tanh approximation); megatron's default gelu is the erf form."""
    return F.gelu(x, approximate="tanh")


def check_divisibility(cfg: ModelConfig, tp: int, pp: int) -> None:
    """megatron shards heads, query groups, FFN neurons and the vocabulary evenly over TP and the
    layers over PP. Refuse a layout that does not divide, before building anything."""
    for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        value = getattr(cfg, field)
        if value % tp:
            options = [t for t in range(1, value + 1) if value % t == 0 and t <= 16]
            raise ConfigError(
                f"parallel.tp={tp} does not divide model.{field}={value} ({cfg.name}); "
                f"choose parallel.tp from the common divisors, e.g. {_common_tp(cfg) or options}")
    if cfg.num_layers % pp:
        raise ConfigError(
            f"parallel.pp={pp} does not divide model.num_layers={cfg.num_layers} ({cfg.name}); "
            f"choose parallel.pp dividing {cfg.num_layers}")


def _common_tp(cfg: ModelConfig) -> list[int]:
    sizes = (cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size, cfg.vocab_size)
    return [t for t in range(1, 17) if all(s % t == 0 for s in sizes)]


def transformer_config(cfg: ModelConfig, tp: int, pp: int, **overrides: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=F.silu if cfg.family == "llama" else gpt2_gelu,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
    )
    kwargs.update(cpu.transformer_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layer_spec(cfg: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if not cpu.cuda_available() or not _te_importable():
        return specs.get_gpt_layer_local_spec(normalization=cfg.normalization)
    return specs.get_gpt_layer_with_transformer_engine_spec()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def build_model(cfg: ModelConfig, groups: Groups, *, empty: bool = False, **config_overrides: Any):
    """This rank's GPTModel chunk: the first stage holds the embedding, the last the output layer.

    `empty=True`: every parameter is a meta tensor (no memory, no initialisation) and the first and
    last pipeline stages do not all-reduce their copies of a tied embedding; for a caller that then
    provides every parameter itself (prune surgery). Buffers megatron creates on an explicit device
    (RoPE's inv_freq) are real as usual. The config's init flags are restored afterwards."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    cfg.validate()
    check_divisibility(cfg, groups.tp_size, groups.pp_size)
    tconfig = transformer_config(cfg, groups.tp_size, groups.pp_size, **config_overrides)
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if not empty:
        return _gpt_model(cfg, tconfig, groups, pg_collection)
    init_flags = (tconfig.use_cpu_initialization, tconfig.perform_initialization)
    # megatron allocates with a bare torch.empty(...) (so on the meta device) only under CPU init
    tconfig.use_cpu_initialization, tconfig.perform_initialization = True, False
    embd_group, pg_collection.embd = pg_collection.embd, None  # no build-time sync of tied copies
    with torch.device("meta"):
        model = _gpt_model(cfg, tconfig, groups, pg_collection)
    pg_collection.embd = model.embd_group = embd_group  # later gradient syncs need the real group
    tconfig.use_cpu_initialization, tconfig.perform_initialization = init_flags
    return model


def _gpt_model(cfg: ModelConfig, tconfig: Any, groups: Groups, pg_collection: Any):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=tconfig,
        pg_collection=pg_collection,
        transformer_layer_spec=_layer_spec(cfg),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=int(cfg.rotary_base),
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
    )
