"""LoRA adapters (`model.lora_rank`): low-rank updates of the layers' projections, trained while
the base weights stay frozen (Hu et al. 2021, "LoRA"); with `model.quantize` the frozen base is
seen fake-quantized, as QLoRA trains adapters on a quantized base (Dettmers et al. 2023).

A projection W [*in, *out] (stacked over the layers: [layers, *in, *out]) gets A [*in, r] and
B [r, *out], and computes

    x W + (alpha / r) (x A) B

A is drawn with the Kaiming-normal scale of its fan-in (std 1 / sqrt(in)) and B is zero, so at
initialization the output is exactly the base's, bit for bit (the added term is 0). The adapters
are applied as two thin products rather than merged into W + (alpha / r) A B: the backward pass
then computes the gradients of A and B only, x^T (dy B^T) and (x A)^T dy, and never the full
[in, out] gradient of a merged weight (tokens x in x out multiply-adds a projection, what full
fine-tuning spends on weight gradients); the forward pass adds tokens x r x (in + out), about
r / min(in, out) of the projection's own product. Dropout (`model.lora_dropout`) applies to the
adapters' input x only, in training steps, as in Hu et al.

The adapters live in the params under one top-level key, `ADAPTERS` ({"lora": {"a_wq":
[layers, d, r], "b_wq": [layers, r, n, head_dim], ...}}); everything else is the frozen base.
A's dimensions share W's input axes and B's its output axes, so the sharding table places them
like W; the rank axis (`lora_rank`) is never split.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.config import ModelConfig
from kd_jax.models.matmul import project
from kd_jax.models.quantize import LAYER_CONTRACT, fake_quantize_weight

ADAPTERS = "lora"  # the params' key of the adapters (kd_jax.checkpoint saves them apart)
# model.lora_targets -> the layer weight each names
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
           "down": "w_down"}


def targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The layer weights `cfg` adapts, in `TARGETS` order (none with LoRA off)."""
    if not cfg.lora_rank:
        return ()
    return tuple(weight for name, weight in TARGETS.items() if name in cfg.lora_targets)


def init_adapters(layers: nnx.Dict, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Dict:
    """A [layers, *in, r] (Kaiming-normal) and B [layers, r, *out] (zeros) for each targeted
    weight of `layers` (the stacked base weights, with their logical axes)."""
    adapters = {}
    for name in targets(cfg):
        weight = layers[name]
        contract, axes = LAYER_CONTRACT[name], weight.get_metadata()["logical_axes"]
        n_layers, inner = weight.shape[0], weight.shape[1:1 + contract]
        outer = weight.shape[1 + contract:]
        std = 1.0 / math.sqrt(math.prod(inner))
        flat = jax.random.normal(rngs.params(), (n_layers * math.prod(inner) * cfg.lora_rank,),
                                 jnp.float32)
        adapters[f"a_{name}"] = nnx.Param(
            (std * flat).reshape(n_layers, *inner, cfg.lora_rank).astype(weight.dtype),
            logical_axes=(*axes[:1 + contract], "lora_rank"))
        adapters[f"b_{name}"] = nnx.Param(
            jnp.zeros((n_layers, cfg.lora_rank, *outer), weight.dtype),
            logical_axes=("layers", "lora_rank", *axes[1 + contract:]))
    return nnx.Dict(adapters)


def adapted(x: jax.Array, w: dict[str, jax.Array], name: str, cfg: ModelConfig,
            dropout_key: jax.Array | None = None, contract: int = 1) -> jax.Array:
    """The projection `name` of `x` (`project`'s layout), with its adapters where `w` (one
    layer's weights) holds them: x W + (alpha / r) (dropout(x) A) B. `dropout_key` (a layer's
    key, training only) drops the adapters' input as `model.lora_dropout` says."""
    out = project(x, w[name], contract)
    if f"a_{name}" not in w:
        return out
    if dropout_key is not None and cfg.lora_dropout > 0:
        keep = 1.0 - cfg.lora_dropout
        kept = jax.random.bernoulli(
            jax.random.fold_in(dropout_key, list(TARGETS.values()).index(name)), keep, x.shape)
        x = jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    # The scale on the r-wide activations: r multiplies a token, not in x out.
    low = project(x, w[f"a_{name}"], contract) * jnp.asarray(
        cfg.lora_alpha / cfg.lora_rank, x.dtype)
    return out + project(low, w[f"b_{name}"])


def stacked_layers(params: dict) -> dict:
    """Every stacked per-layer weight of `params` [layers, ...], the adapters included: what a
    forward pass scans over."""
    return {**params["layers"], **params.get(ADAPTERS, {})}


def adapters(params: dict) -> dict:
    """{ADAPTERS: the adapters} of a LoRA student's params; {} for any other."""
    return {ADAPTERS: params[ADAPTERS]} if ADAPTERS in params else {}


def frozen(params: dict) -> dict:
    """The frozen base of a LoRA student's params (all but the adapters); {} for any other."""
    return {key: value for key, value in params.items() if key != ADAPTERS} if (
        ADAPTERS in params) else {}


def base_of(params: Any) -> Any:
    """A params tree (or its abstract) without the adapters: what a checkpoint of the base
    model holds. The whole tree without LoRA."""
    return {key: value for key, value in params.items() if key != ADAPTERS}


def merged(params: dict, cfg: ModelConfig) -> dict:
    """The base's layers with the adapters' product added: W' = W + (alpha / r) A B, each
    projection as the forward pass sees it (fake-quantized where `model.quantize` says), in the
    parameters' dtype; a plain student's params for the same outputs (up to rounding). Without
    adapters, `params` unchanged."""
    if ADAPTERS not in params:
        return params
    fmt, scale = cfg.weight_format("layers"), cfg.lora_alpha / cfg.lora_rank
    lora, layers = params[ADAPTERS], dict(params["layers"])
    for name in LAYER_CONTRACT:
        weight = layers[name]
        contract = LAYER_CONTRACT[name]
        value = jax.vmap(lambda w: fake_quantize_weight(w, fmt, cfg.quantize_group,
                                                        contract))(weight)
        if f"a_{name}" in lora:
            a, b = lora[f"a_{name}"], lora[f"b_{name}"]
            product = jax.vmap(lambda a, b: project(a.astype(jnp.float32), b.astype(jnp.float32),
                                                    1))(a, b)
            value = value.astype(jnp.float32) + scale * product
        layers[name] = value.astype(weight.dtype)
    return {**base_of(params), "layers": layers}
