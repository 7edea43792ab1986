"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

The YAML under `conf/` fills these in; library functions receive the small typed pieces they need
(a `ModelConfig`, a `ParallelConfig`, paths), never the whole Hydra config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad input found before any work started. The message names the field or file and the fix."""


FAMILIES = ("llama", "gpt2")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer, in the terms megatron-core uses.

    This is plain data: it is saved inside every checkpoint (`model_config.json`) so a checkpoint
    describes itself, and it is what pruning rewrites.
    """

    name: str = "tiny-llama"
    family: str = "llama"  # llama | gpt2
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2  # == num_attention_heads for MHA (GPT-2)
    kv_channels: int = 16  # head_dim; kept explicit because pruning heads/hidden must not change it
    vocab_size: int = 256
    max_position_embeddings: int = 256
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    # Llama-3.x RoPE frequency scaling, exactly megatron's GPTModel(rope_scaling=, rope_scaling_factor=):
    # megatron fixes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192
    # (Llama 3.1's values); convert/hf_config.py rejects HF configs that differ.
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0

    @property
    def normalization(self) -> str:
        return "RMSNorm" if self.family == "llama" else "LayerNorm"

    @property
    def gated_linear_unit(self) -> bool:
        return self.family == "llama"

    @property
    def position_embedding_type(self) -> str:
        return "rope" if self.family == "llama" else "learned_absolute"

    def validate(self, where: str = "model") -> "ModelConfig":
        if self.family not in FAMILIES:
            raise ConfigError(f"{where}.family={self.family!r} is not supported; use one of {FAMILIES}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}.{name}={value!r} must be a positive integer")
        if self.rope_scaling and self.family != "llama":
            raise ConfigError(f"{where}.rope_scaling=true needs rotary embeddings (family llama), "
                              f"not family {self.family!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{where}.num_query_groups={self.num_query_groups} must divide "
                f"{where}.num_attention_heads={self.num_attention_heads}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown model fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data)).validate(where)


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size is derived: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, gloo without) | gloo | nccl
    seed: int = 1234


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "megatron_prune"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    dir: str = "."
    tags: list[str] = field(default_factory=list)


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def model_config_from(cfg: DictConfig | dict) -> ModelConfig:
    return ModelConfig.from_dict(to_container(cfg), where="model")


def parallel_config_from(cfg: DictConfig | dict) -> ParallelConfig:
    data = to_container(cfg)
    known = {f.name for f in dataclasses.fields(ParallelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"parallel: unknown fields {unknown}; known fields are {sorted(known)}")
    pc = ParallelConfig(**data)
    for name in ("tp", "pp"):
        if not isinstance(getattr(pc, name), int) or getattr(pc, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(pc, name)!r} must be an integer >= 1")
    if pc.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"parallel.backend={pc.backend!r}: use auto, gloo or nccl")
    return pc


def logger_config_from(cfg: DictConfig | dict | None) -> LoggerConfig:
    if cfg is None:
        return LoggerConfig(kind="none")
    data = to_container(cfg)
    lc = LoggerConfig(**data)
    if lc.kind not in ("wandb", "none"):
        raise ConfigError(f"logger.kind={lc.kind!r}: use wandb or none (logger=none disables logging)")
    if lc.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode={lc.mode!r}: use offline, online or disabled")
    return lc


def register_configs() -> None:
    """Schemas for the groups whose YAML files extend them (`defaults: [<schema>, _self_]`)."""
    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
