"""Fake quantization for quantization-aware distillation (`model.quantize`).

The scheme, symmetric with round-to-nearest (llama.cpp's Q8_0 with a group of 32, and Q4_0 but
for the code -8):

    groups    `group` consecutive weights along the contracted (input) dimension share a scale;
              group 0: the whole dimension, one scale per output channel
    scale     max |w| over the group / qmax, qmax = 127 (int8) or 7 (int4), computed as
              max |w| * float32(1 / qmax): XLA turns a division by a constant into that product
              inside jit, so it is written so everywhere (eager, jitted, the tests' reference)
    codes     round(w / scale), ties to even, in [-qmax, qmax]; int4 leaves -8 unused, so the
              grid is symmetric and max |w| lands on +-7 whatever its sign
    value     codes * scale

computed in float32 from the weights as stored. The forward pass sees `value`; the gradient is
the straight-through estimator's, the identity onto the float master weights. Nothing is ever
clipped (max-abs scaling maps every weight inside [-qmax, qmax]), so the identity is the whole
gradient and none is cut where values would have been clipped. Rounding moves a weight by at most
half a step: |w - value| <= scale / 2.

Activations (`model.quantize_activations: int8`) take the same scheme per token, from the token's
own max |x| over the features a projection contracts (dynamic range, nothing calibrated).

Written here in plain jax rather than with qwix (the JAX team's quantization library, 0.1.8),
whose QAT provider does not fit these models: it intercepts `jnp.einsum`/`jax.lax.dot_general`
by patching them process-wide while an nnx module's `__call__` runs, and tells a weight from an
activation by finding it among the `nnx.Param` attributes of the module being called. Here the
per-layer weights are slices of one stacked parameter taken by `jax.lax.scan`, read from pure
dicts bound inside jit; the embedding is a gather, not a product; and the output head's product
is computed in `kd_jax.losses` (chunked, under a custom_vjp), outside any module call. None of
them would be found, and one module holds every projection, so qwix's module-path rules could not
give the embedding and head their own formats either. The scheme takes a few dozen lines of jax,
and the models stay pure (jax, flax, numpy; no process-wide patching, no absl or opt_einsum).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kd_jax.config import ModelConfig

QMAX = {"int8": 127, "int4": 7}

# The layers' projections and how many leading dimensions of each the projection contracts
# (`kd_jax.models.matmul.project`); the norms' scales and the biases stay in float.
LAYER_CONTRACT = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def unquantized(cfg: ModelConfig) -> ModelConfig:
    """`cfg` computing in float: how a teacher runs, whatever model.quantize its run trained
    with (its checkpoint holds float master weights)."""
    return dataclasses.replace(cfg, quantize="none", quantize_group=0, quantize_embedding="auto",
                               quantize_head="auto", quantize_activations="none")


def quantize(x: jax.Array, fmt: str, group: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of `x`, groups of `group` consecutive elements along `axis` (0: the whole
    axis). `axis` is split in place into (groups, group): codes int8 [..., groups, group, ...],
    scales float32 [..., groups, 1, ...]."""
    axis = axis % x.ndim
    size = x.shape[axis]
    group = group or size
    if size % group:
        raise ValueError(f"quantization group {group} does not divide dimension {size}")
    grouped = x.astype(jnp.float32).reshape(
        *x.shape[:axis], size // group, group, *x.shape[axis + 1:])
    qmax = QMAX[fmt]
    scales = jnp.max(jnp.abs(grouped), axis=axis + 1, keepdims=True) * jnp.float32(1 / qmax)
    # An all-zero group has scale 0: dividing by 1 instead gives codes 0 and values 0 exactly,
    # where 0 / 0 would be NaN. (No gradient flows through this division: fake_quantize's is
    # the straight-through identity.)
    divisor = jnp.where(scales > 0, scales, 1.0)
    # The clip never binds with max-abs scales; it keeps the codes in range by construction.
    codes = jnp.clip(jnp.round(grouped / divisor), -qmax, qmax).astype(jnp.int8)
    return codes, scales


def dequantize(codes: jax.Array, scales: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 values [shape] of `quantize`'s codes and scales."""
    return (codes.astype(jnp.float32) * scales).reshape(shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def fake_quantize(x: jax.Array, fmt: str, group: int, axis: int) -> jax.Array:
    """`x` as the quantized format holds it, in x's dtype (computed in float32); format none
    returns x. The derivative is the straight-through estimator's: the identity."""
    if fmt == "none":
        return x
    return dequantize(*quantize(x, fmt, group, axis), x.shape).astype(x.dtype)


@fake_quantize.defjvp
def _straight_through(fmt, group, axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return fake_quantize(x, fmt, group, axis), x_dot


def fake_quantize_weight(w: jax.Array, fmt: str, group: int, contract: int = 1) -> jax.Array:
    """A projection weight [*in, *out] (`project`'s layout, `contract` input dimensions), its
    groups along the flattened input dimensions, a scale per output channel and group."""
    if fmt == "none":
        return w
    w_kn = w.reshape(math.prod(w.shape[:contract]), math.prod(w.shape[contract:]))
    return fake_quantize(w_kn, fmt, group, 0).reshape(w.shape)


def layer_weights(layer: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """One layer's weights with its projections fake-quantized as `model.quantize` says."""
    fmt = cfg.weight_format("layers")
    return {name: fake_quantize_weight(value, fmt, cfg.quantize_group, LAYER_CONTRACT[name])
            if name in LAYER_CONTRACT else value for name, value in layer.items()}


def rows(table_vd: jax.Array, cfg: ModelConfig, part: str) -> jax.Array:
    """Embedding rows or the output head [..., d] (`part`: embedding or head), each row's groups
    along d. A row's scales are its own, so quantizing the rows a batch looks up gives the
    values of the whole table quantized."""
    fmt = cfg.weight_format(part)
    return table_vd if fmt == "none" else fake_quantize(table_vd, fmt, cfg.quantize_group, -1)


def activations(x: jax.Array, cfg: ModelConfig, contract: int = 1) -> jax.Array:
    """A projection's input [..., *in] (`contract` input dimensions) fake-quantized per token
    as `model.quantize_activations` says: one scale for each token's flattened input."""
    if cfg.quantize_activations == "none":
        return x
    lead = x.shape[:x.ndim - contract]
    x_mk = x.reshape(*lead, math.prod(x.shape[x.ndim - contract:]))
    return fake_quantize(x_mk, cfg.quantize_activations, 0, -1).reshape(x.shape)
