"""HF `config.json` <-> `ModelConfig`.

Supported: LlamaForCausalLM and MistralForCausalLM (family llama: RMSNorm, SwiGLU, RoPE, GQA) and
GPT2LMHeadModel (family gpt2: LayerNorm, GELU(tanh), learned absolute positions, biases).
Anything that changes the computation but has no ModelConfig field is rejected with a ConfigError
naming the HF field, so a conversion never silently produces a different model.

Export writes LlamaForCausalLM for family llama, or MistralForCausalLM without a sliding window (the
same computation) when hidden % heads != 0, which transformers 5's LlamaConfig refuses even with an
explicit head_dim. `head_dim` is always written: after pruning it is no longer hidden / heads.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from megatron_prune.config import ConfigError, ModelConfig

LLAMA_TYPES = ("llama", "mistral")
# Megatron hard-codes these Llama-3.1 values in RotaryEmbedding._apply_scaling; only `factor` is free.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _need(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{where}: field {key!r} is missing; a HF config.json for this model type has it")
    return hf[key]


def _float32_clean(x: float) -> float:
    """GGUF stores epsilons as float32 (1e-5 comes back as 9.999999747e-06); 7 significant digits
    is float32's precision, so this recovers the value the model was trained with."""
    return float(f"{float(x):.7g}")


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, bool, float]:
    """(rope_theta, rope_scaling, rope_scaling_factor) from either the transformers-5
    `rope_parameters` dict or the 4.x `rope_theta` + `rope_scaling` pair."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported (megatron rotary_percent)")
    if kind in ("default", None):
        return float(theta), False, 8.0
    if kind != "llama3":
        raise ConfigError(
            f"{where}: rope_parameters.rope_type={kind!r} is not supported; megatron GPTModel offers "
            f"only 'default' and Llama-3 'llama3' scaling")
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        if key in scaling and float(scaling[key]) != fixed:
            raise ConfigError(
                f"{where}: rope_parameters.{key}={scaling[key]} is not supported; megatron's llama3 "
                f"rope scaling fixes it at {fixed}")
    return float(theta), True, float(_need(scaling, "factor", f"{where}.rope_parameters"))


def _llama(hf: Mapping[str, Any], name: str, where: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; llama family uses silu")
    window = hf.get("sliding_window")
    max_pos = int(_need(hf, "max_position_embeddings", where))
    if window is not None and hf.get("use_sliding_window", True) and int(window) < max_pos:
        raise ConfigError(
            f"{where}: sliding_window={window} < max_position_embeddings={max_pos} is not supported "
            f"(megatron's local attention here is full causal attention)")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        # megatron has add_bias_linear (all linears) or add_qkv_bias (qkv only); HF Llama's
        # attention_bias also covers o_proj, so only "both" or "neither" map exactly.
        raise ConfigError(
            f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported; "
            f"megatron's add_bias_linear needs both equal")
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    theta, scaling, factor = _rope(hf, where)
    return ModelConfig(
        name=name, family="llama",
        num_layers=int(_need(hf, "num_hidden_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_need(hf, "intermediate_size", where)),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hidden // heads),
        vocab_size=int(_need(hf, "vocab_size", where)),
        max_position_embeddings=max_pos,
        norm_epsilon=_float32_clean(hf.get("rms_norm_eps", 1e-6)),
        rotary_base=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_bias_linear=attention_bias, add_qkv_bias=False,
        rope_scaling=scaling, rope_scaling_factor=factor,
    ).validate(where)


def _gpt2(hf: Mapping[str, Any], name: str, where: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_TANH_GELUS:
        raise ConfigError(f"{where}: activation_function={act!r} is not supported; use one of {_GPT2_TANH_GELUS}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if bool(hf.get(key, ok)) != ok:
            raise ConfigError(f"{where}: {key}={hf[key]} is not supported (needs {ok})")
    hidden = int(_need(hf, "n_embd", where))
    heads = int(_need(hf, "n_head", where))
    return ModelConfig(
        name=name, family="gpt2",
        num_layers=int(_need(hf, "n_layer", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden),
        num_attention_heads=heads, num_query_groups=heads, kv_channels=hidden // heads,
        vocab_size=int(_need(hf, "vocab_size", where)),
        max_position_embeddings=int(_need(hf, "n_positions", where)),
        norm_epsilon=_float32_clean(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        add_bias_linear=True, add_qkv_bias=True,
    ).validate(where)


def hf_config_to_model_config(hf: Mapping[str, Any], name: str = "hf-model",
                              where: str = "config.json") -> ModelConfig:
    """A HF config dict (as in `config.json`) -> ModelConfig. `where` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported; "
                          f"supported: {sorted(_ARCHITECTURES)}")
    archs = hf.get("architectures") or [_ARCHITECTURES[model_type]]
    if list(archs) != [_ARCHITECTURES[model_type]]:
        raise ConfigError(f"{where}: architectures={archs} is not supported; "
                          f"need [{_ARCHITECTURES[model_type]!r}] (a causal LM head)")
    if model_type in LLAMA_TYPES:
        return _llama(hf, name, where)
    return _gpt2(hf, name, where)


def model_config_to_hf_config(cfg: ModelConfig, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """ModelConfig -> HF config dict that `AutoConfig` reads back to the same architecture.

    `extra` adds non-architectural fields (token ids, dtype); it may not override architecture."""
    cfg.validate()
    if cfg.family == "llama":
        if cfg.add_qkv_bias and not cfg.add_bias_linear:
            raise ConfigError("model.add_qkv_bias=true without add_bias_linear has no HF Llama equivalent "
                              "(attention_bias also adds an o_proj bias)")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
        if cfg.rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": float(cfg.rotary_base),
                    "factor": float(cfg.rope_scaling_factor), **LLAMA3_ROPE_FIXED}
        out: dict[str, Any] = {
            "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.kv_channels,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.norm_epsilon, "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope, "attention_dropout": 0.0,
            # transformers 4.x reads these two instead of rope_parameters; 5.x accepts them silently
            "rope_theta": float(cfg.rotary_base),
        }
        if cfg.rope_scaling:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if cfg.hidden_size % cfg.num_attention_heads == 0:
            out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **out, "pretraining_tp": 1,
                   "attention_bias": cfg.add_bias_linear, "mlp_bias": cfg.add_bias_linear}
        elif not cfg.add_bias_linear:
            # transformers 5's LlamaConfig rejects hidden % heads != 0 even with an explicit head_dim
            # (common after pruning); MistralConfig accepts it and, without a sliding window, runs
            # the same computation.
            out = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **out,
                   "sliding_window": None}
        else:
            raise ConfigError(
                f"model: hidden_size={cfg.hidden_size} is not a multiple of num_attention_heads="
                f"{cfg.num_attention_heads} and add_bias_linear=true: HF LlamaConfig refuses the first, "
                f"MistralConfig has no biases; no HF architecture loads this model")
    else:
        if cfg.num_query_groups != cfg.num_attention_heads:
            raise ConfigError(f"model.num_query_groups={cfg.num_query_groups} != num_attention_heads="
                              f"{cfg.num_attention_heads}: HF GPT-2 has no grouped-query attention")
        if cfg.num_attention_heads * cfg.kv_channels != cfg.hidden_size:
            raise ConfigError(f"model: num_attention_heads*kv_channels={cfg.num_attention_heads * cfg.kv_channels}"
                              f" != hidden_size={cfg.hidden_size}; HF GPT-2 cannot express that")
        if not cfg.add_bias_linear:
            raise ConfigError("model.add_bias_linear=false: HF GPT-2 always has linear biases")
        out = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": cfg.num_layers, "n_embd": cfg.hidden_size, "n_inner": cfg.ffn_hidden_size,
            "n_head": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_epsilon,
            "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }
    for key, value in (extra or {}).items():
        if key in out:
            raise ConfigError(f"extra HF config field {key!r} would override the architecture")
        out[key] = value
    return out
