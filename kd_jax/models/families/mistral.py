"""Mistral: Llama's tensors, and sliding-window attention (`sliding_window` in config.json)."""

from __future__ import annotations

from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models.families.llama import TENSORS

ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPE = "mistral"


def flags(hf: dict) -> dict:
    return {"sliding_window": int(hf.get("sliding_window") or 0)}


def to_hf(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias or cfg.o_bias or cfg.qk_norm:
        raise ConfigError("a mistral config.json cannot express attention biases or q/k norms")
    return {"sliding_window": cfg.sliding_window or None}


def tensors(cfg: ModelConfig) -> dict:
    return dict(TENSORS)
