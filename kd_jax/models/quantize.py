"""Fake quantization for quantization-aware distillation (`model.quantize`).

The scheme of `int8` and `int4`, symmetric with round-to-nearest (near llama.cpp's Q8_0 with a
group of 32, which rounds halves away from zero and stores its scales in float16, and its Q4_0
but for the code -8; those two formats are below):

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

llama.cpp's own formats (`q8_0`, `q4_0`; ggml-quants.c's reference quantizers, which gguf-py's
quants.py repeats in numpy) are computed as llama.cpp computes them, so that a GGUF export
(`kd_jax.export_gguf`) serves exactly the weights the loss saw:

    blocks    32 consecutive weights along the contracted dimension (`quantize_group` unused)
    q8_0      d = max |w| / 127 (a float32 division), codes = roundf(w * (1 / d)), halves away
              from zero, in [-127, 127]
    q4_0      d = m / -8, m the block's weight of largest magnitude with its sign (the first, on
              a tie), codes = min(15, floor(float32(w * (1 / d) + 8.5))) - 8, in [-8, 7]: m lands
              on -8, and a weight of the other sign and the same magnitude on 7 (clipped from 8)
    value     codes * float16(d): the file stores d in float16, the codes were computed from the
              float32 d before that rounding

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

from kd_jax.config import LLAMA_CPP_FORMATS, ModelConfig

QMAX = {"int8": 127, "int4": 7}
LLAMA_CPP_BLOCK = 32  # ggml's QK8_0 and QK4_0
FORMATS = (*QMAX, *LLAMA_CPP_FORMATS)

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
    axis; llama.cpp's formats: always their blocks of 32). `axis` is split in place into
    (groups, group): codes int8 [..., groups, group, ...],
    scales float32 [..., groups, 1, ...]."""
    axis = axis % x.ndim
    size = x.shape[axis]
    group = group_size(fmt, group) or size
    if size % group:
        raise ValueError(f"quantization group {group} does not divide dimension {size}")
    grouped = x.astype(jnp.float32).reshape(
        *x.shape[:axis], size // group, group, *x.shape[axis + 1:])
    if fmt == "q8_0":
        return _q8_0(grouped, axis + 1)
    if fmt == "q4_0":
        return _q4_0(grouped, axis + 1)
    qmax = QMAX[fmt]
    scales = jnp.max(jnp.abs(grouped), axis=axis + 1, keepdims=True) * jnp.float32(1 / qmax)
    # An all-zero group has scale 0: dividing by 1 instead gives codes 0 and values 0 exactly,
    # where 0 / 0 would be NaN. (No gradient flows through this division: fake_quantize's is
    # the straight-through identity.)
    divisor = jnp.where(scales > 0, scales, 1.0)
    # The clip never binds with max-abs scales; it keeps the codes in range by construction.
    codes = jnp.clip(jnp.round(grouped / divisor), -qmax, qmax).astype(jnp.int8)
    return codes, scales


def group_size(fmt: str, group: int) -> int:
    """The weights sharing a scale in format `fmt`: llama.cpp's blocks for its formats, else
    `model.quantize_group` (0: the whole contracted dimension)."""
    return LLAMA_CPP_BLOCK if fmt in LLAMA_CPP_FORMATS else group


# Both llama.cpp formats are written so that XLA computes exactly ggml's float32 operations:
# - XLA rewrites a division by a constant (or by a broadcast scalar) into a product with its
#   reciprocal, which differs from the quotient in the last bit for some inputs; dividing by an
#   array the optimization barrier keeps opaque is a true division.
# - LLVM contracts a product followed by a sum into one fused multiply-add, which skips the
#   product's rounding; every sum below takes |w * (1 / d)|, never the product itself.


def _q8_0(grouped: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(grouped), axis=axis, keepdims=True)
    d = amax / jax.lax.optimization_barrier(jnp.full_like(amax, 127.0))
    y = grouped * _inverse(d)
    # C's roundf (halves away from zero) from |y|: floor(|y|) + 1 where its fraction is >= 0.5
    # (the fraction and its double are exact; floor(|y| + 0.5) would round 0.49999997 up).
    magnitude = jnp.abs(y)
    whole = jnp.floor(magnitude)
    codes = jnp.sign(y) * (whole + jnp.floor(2 * (magnitude - whole)))
    return codes.astype(jnp.int8), _float16(d)


def _q4_0(grouped: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    largest = jnp.argmax(jnp.abs(grouped), axis=axis, keepdims=True)  # the first, as ggml's
    d = jnp.take_along_axis(grouped, largest, axis=axis) * jnp.float32(-1 / 8)  # exact: m / -8
    y = grouped * _inverse(d)
    magnitude = jnp.abs(y)
    shifted = jnp.where(y >= 0, magnitude + 8.5, 8.5 - magnitude)  # float32(y + 8.5), unfused
    codes = jnp.minimum(jnp.floor(shifted), 15) - 8
    return codes.astype(jnp.int8), _float16(d)


def _inverse(d: jax.Array) -> jax.Array:
    """ggml's `id = d ? 1.0f/d : 0.0f`: an all-zero block gets codes 0, never a division by 0."""
    return jnp.where(d != 0, 1 / jnp.where(d != 0, d, 1), 0)


def _float16(d: jax.Array) -> jax.Array:
    """The scale as the file holds it: float16, round to nearest even (GGML_FP32_TO_FP16)."""
    return d.astype(jnp.float16).astype(jnp.float32)


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
