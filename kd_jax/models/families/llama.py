"""Llama (2, 3, 3.x with rope scaling; SmolLM, SmolLM2 and TinyLlama share it): the tensor
names every supported family uses, and Llama's own config keys.

A tensor is mapped by where its values go: `Tensor(name, groups, transpose)` reads the Hugging
Face tensor `name` (per layer, `{}` is the layer index), transposes a 2-d one when torch stores
it as [out, in], and splits each of its dimensions into `groups` of the parameter's dimensions:
q_proj.weight [heads * head_dim, d] becomes wq [d, heads, head_dim] (transposed, groups (1, 2)).
"""

from __future__ import annotations

import dataclasses

from kd_jax.config import ConfigError, ModelConfig

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # the Hugging Face name; `{}` is the layer index for stacked parameters
    groups: tuple[int, ...]  # parameter dimensions (after the layer axis) per tensor dimension
    transpose: bool = False  # torch's Linear stores [out, in]; ours are [in, ..., out]


_ATTN, _MLP = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
# Parameter path -> tensor; paths are those of `kd_jax.models.pure` params.
TENSORS = {
    ("embedding",): Tensor("model.embed_tokens.weight", (1, 1)),
    ("final_norm",): Tensor("model.norm.weight", (1,)),
    ("head",): Tensor("lm_head.weight", (1, 1)),
    ("layers", "attn_norm"): Tensor("model.layers.{}.input_layernorm.weight", (1,)),
    ("layers", "wq"): Tensor(_ATTN + "q_proj.weight", (1, 2), transpose=True),
    ("layers", "wk"): Tensor(_ATTN + "k_proj.weight", (1, 2), transpose=True),
    ("layers", "wv"): Tensor(_ATTN + "v_proj.weight", (1, 2), transpose=True),
    ("layers", "wo"): Tensor(_ATTN + "o_proj.weight", (2, 1), transpose=True),
    ("layers", "mlp_norm"): Tensor("model.layers.{}.post_attention_layernorm.weight", (1,)),
    ("layers", "w_gate"): Tensor(_MLP + "gate_proj.weight", (1, 1), transpose=True),
    ("layers", "w_up"): Tensor(_MLP + "up_proj.weight", (1, 1), transpose=True),
    ("layers", "w_down"): Tensor(_MLP + "down_proj.weight", (1, 1), transpose=True),
}
QKV_BIASES = {
    ("layers", "bq"): Tensor(_ATTN + "q_proj.bias", (2,)),
    ("layers", "bk"): Tensor(_ATTN + "k_proj.bias", (2,)),
    ("layers", "bv"): Tensor(_ATTN + "v_proj.bias", (2,)),
}
O_BIAS = {("layers", "bo"): Tensor(_ATTN + "o_proj.bias", (1,))}
QK_NORMS = {
    ("layers", "q_norm"): Tensor(_ATTN + "q_norm.weight", (1,)),
    ("layers", "k_norm"): Tensor(_ATTN + "k_norm.weight", (1,)),
}


def flags(hf: dict) -> dict:
    """The ModelConfig fields Llama's config.json sets beyond the common ones."""
    bias = bool(hf.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias}


def to_hf(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias or cfg.qk_norm or cfg.sliding_window:
        raise ConfigError(
            "a llama config.json cannot express this model: attention_bias covers the q, k, v "
            "and o projections together, and it has no q/k norms or sliding window")
    return {"attention_bias": cfg.qkv_bias, "mlp_bias": False}


def tensors(cfg: ModelConfig) -> dict:
    return {**TENSORS, **(QKV_BIASES | O_BIAS if cfg.qkv_bias else {})}
