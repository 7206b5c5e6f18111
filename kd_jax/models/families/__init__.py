"""Hugging Face architectures as one model definition with family flags.

`model_config(hf)` turns a checkpoint's config.json (already parsed) into a `ModelConfig`;
`hf_config(cfg)` does the reverse for export; `tensor_map(cfg)` says which Hugging Face tensor
fills each parameter. Both config.json layouts found in the wild are read: transformers 4's
(`rope_theta` and `rope_scaling` at the top level), which most published checkpoints carry, and
transformers 5's (`rope_parameters`), which `save_pretrained` writes today. Export writes the
transformers 4 layout, which both versions (and vLLM) read.

Pure: no file I/O (`kd_jax.models.pretrained` reads and writes the files).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kd_jax.checks import closest
from kd_jax.config import ConfigError, ModelConfig, choices
from kd_jax.config import ModelFamily as _ModelFamily
from kd_jax.models.families import llama, mistral, qwen2, qwen3
from kd_jax.models.families.llama import Tensor

FAMILIES = {module.MODEL_TYPE: module for module in (llama, mistral, qwen2, qwen3)}
assert tuple(FAMILIES) == choices(_ModelFamily), "config.ModelFamily must name these families"
ARCHITECTURES = {module.ARCHITECTURE: name for name, module in FAMILIES.items()}
ROPE_TYPES = ("default", "linear", "llama3")

__all__ = ["ARCHITECTURES", "FAMILIES", "Tensor", "family_of", "hf_config", "model_config",
           "tensor_map"]


def family_of(hf: dict) -> str:
    """The family a config.json describes, by its `architectures` (else `model_type`)."""
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    if not architectures and hf.get("model_type") in FAMILIES:
        return hf["model_type"]
    named = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"unsupported architecture {named}; supported: "
                      f"{', '.join(ARCHITECTURES)}{closest(named, ARCHITECTURES)}")


def _rope(hf: dict) -> dict:
    """Rotary settings from either layout: rope_parameters (5) or rope_theta + rope_scaling (4)."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope = parameters if parameters.get("rope_type", "default") != "default" else scaling
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope type '{kind}' is not supported; supported: "
                          f"{', '.join(ROPE_TYPES)}")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor other than 1 is not supported")
    fields: dict[str, Any] = {"rope_theta": float(theta),
                              "rope_scaling": "none" if kind == "default" else kind}
    if kind != "default":
        fields["rope_factor"] = float(rope["factor"])
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max=int(rope["original_max_position_embeddings"]))
    return fields


def model_config(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a config.json; `base` supplies what it does not say (dtype, remat,
    where the weights come from)."""
    family = family_of(hf)
    try:
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} with mlp_bias "
                              f"{hf.get('mlp_bias')!r}: only a silu MLP without biases is "
                              "supported")
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        fields = dict(
            family=family, vocab_size=int(hf["vocab_size"]), d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or d_model // n_heads),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=0,
            rope_scaling="none", rope_factor=1.0)
        fields.update(_rope(hf))
        fields.update(FAMILIES[family].flags(hf))
    except KeyError as err:
        raise ConfigError(f"config.json has no {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.json: {err}") from None
    return dataclasses.replace(base or ModelConfig(), **fields)


def hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A config.json (transformers 4 layout) for `cfg`; `base`, the checkpoint it came from,
    keeps what kd_jax does not model (token ids, generation defaults)."""
    family = FAMILIES[cfg.family]
    # Dropped from the base: what is written below in another layout, and what is per layer
    # (transformers 5's layer_types), since the student may have fewer layers than its source.
    dropped = ("rope_parameters", "rope_scaling", "dtype", "torch_dtype", "layer_types",
               "max_window_layers")
    hf = {key: value for key, value in (base or {}).items() if key not in dropped}
    rope_scaling = None
    if cfg.rope_scaling != "none":
        rope_scaling = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        rope_scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                            high_freq_factor=cfg.rope_high_freq_factor,
                            original_max_position_embeddings=cfg.rope_original_max)
    hf.update(
        architectures=[family.ARCHITECTURE], model_type=family.MODEL_TYPE,
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        torch_dtype=cfg.param_dtype)
    hf.update(family.to_hf(cfg))
    return hf


def tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], Tensor]:
    """Parameter path -> the Hugging Face tensor that fills it, for this model's flags."""
    tensors = FAMILIES[cfg.family].tensors(cfg)
    if cfg.tie_embeddings:
        tensors.pop(("head",))
    return tensors
