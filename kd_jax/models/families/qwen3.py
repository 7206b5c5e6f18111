"""Qwen3: Llama's tensors with an RMSNorm over each head's queries and keys (q_norm, k_norm),
and an explicit head_dim (Qwen3's heads are wider than hidden_size / num_attention_heads)."""

from __future__ import annotations

from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models.families.llama import O_BIAS, QK_NORMS, QKV_BIASES, TENSORS

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"


def flags(hf: dict) -> dict:
    if hf.get("use_sliding_window"):
        raise ConfigError("Qwen3 with use_sliding_window: true is not supported")
    bias = bool(hf.get("attention_bias", False))
    return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias}


def to_hf(cfg: ModelConfig) -> dict:
    if not cfg.qk_norm or cfg.qkv_bias != cfg.o_bias or cfg.sliding_window:
        raise ConfigError("a qwen3 config.json describes q/k norms (model.qk_norm) and one "
                          "attention_bias for q, k, v and o")
    return {"attention_bias": cfg.qkv_bias, "use_sliding_window": False}


def tensors(cfg: ModelConfig) -> dict:
    return {**TENSORS, **QK_NORMS, **(QKV_BIASES | O_BIAS if cfg.qkv_bias else {})}
