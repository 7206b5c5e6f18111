"""Qwen2 and Qwen2.5: Llama's tensors with biases on the query, key and value projections.

Qwen2's optional sliding window (`use_sliding_window`, applied from `max_window_layers` on) is
off in every published checkpoint; a config that turns it on is refused.
"""

from __future__ import annotations

from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models.families.llama import QKV_BIASES, TENSORS

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"


def flags(hf: dict) -> dict:
    if hf.get("use_sliding_window"):
        raise ConfigError("Qwen2 with use_sliding_window: true is not supported")
    return {"qkv_bias": True}


def to_hf(cfg: ModelConfig) -> dict:
    if not cfg.qkv_bias or cfg.o_bias or cfg.qk_norm or cfg.sliding_window:
        raise ConfigError("a qwen2 config.json describes q/k/v biases only (model.qkv_bias)")
    return {"use_sliding_window": False}


def tensors(cfg: ModelConfig) -> dict:
    return {**TENSORS, **QKV_BIASES}
