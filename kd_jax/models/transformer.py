"""A decoder-only language model of the Llama family, in Flax NNX.

RMSNorm, rotary position embeddings (the Hugging Face `rotate_half` convention), grouped-query
attention, a SwiGLU MLP, no biases, optionally tied embeddings. Sequences may be packed: each
token carries its position (restarting at 0 in every document) and a segment id (0 = padding),
and attention never crosses a segment boundary.

Layers are stacked: every per-layer weight is a single parameter with a leading `layers` axis and
the forward pass is one `jax.lax.scan`, so tracing and compile time do not grow with depth.

Every parameter carries its logical axis names in the `logical_axes` metadata; the sharding table
(`kd_jax.parallel.mesh`) maps them to mesh axes. Downstream code works on pure dicts of arrays
through `kd_jax.models.pure`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax.config import ModelConfig

# Masked attention scores are set to this before the softmax rather than -inf, so a query that
# may attend to nothing (a padding token) gets a uniform, finite distribution instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)

# Names of the stacked per-layer weights, in the order a layer uses them.
LAYER_PARAM_NAMES = (
    "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def _param(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any,
           axes: tuple[str, ...]) -> nnx.Param:
    # Drawn flat, then reshaped: eager init compiles one draw per shape, and XLA compiles a 1-D
    # threefry draw several times faster than an n-D one (about 0.2 s against 1 s on CPU).
    flat = jax.random.normal(key, (math.prod(shape),), jnp.float32)
    value = (std * flat).reshape(shape).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _ones(shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def rms_norm(x_btd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square norm, computed in float32 whatever the activation dtype, then cast back."""
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale_d.astype(jnp.float32)).astype(x_btd.dtype)


def rotary_angles(positions_bt: jax.Array, head_dim: int, theta: float):
    """cos and sin of the rotary angles, [b, t, head_dim] in float32, halves repeated.

    Built from each token's explicit position, so a packed document starts again at angle 0.
    """
    inv_freq_f = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq_f
    angles_bth = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rotary(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate (x1, x2) halves of each head, non-interleaved, as Hugging Face LlamaModel does."""
    x32 = x_btnh.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated_half = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x32 * cos + rotated_half * sin).astype(x_btnh.dtype)


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[b, t(query), s(key)] booleans: causal, same segment, and the key is not padding."""
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    real_key_bs = (segment_ids_bt != 0)[:, None, :]
    return causal_ts[None] & same_segment_bts & real_key_bs


def _decoder_layer(x_btd, layer, cos_bth, sin_bth, mask_bts, cfg: ModelConfig):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); `layer` holds its weights."""
    dtype = x_btd.dtype
    w = {name: value.astype(dtype) for name, value in layer.items()}
    n_kv = cfg.n_kv_heads
    group = cfg.n_heads // n_kv
    head_dim = cfg.resolved_head_dim

    h_btd = rms_norm(x_btd, layer["attn_norm"], cfg.norm_eps)
    q_btnh = jnp.einsum("btd,dnh->btnh", h_btd, w["wq"])
    k_btkh = jnp.einsum("btd,dkh->btkh", h_btd, w["wk"])
    v_btkh = jnp.einsum("btd,dkh->btkh", h_btd, w["wv"])
    q_btnh = apply_rotary(q_btnh, cos_bth, sin_bth)
    k_btkh = apply_rotary(k_btkh, cos_bth, sin_bth)

    # Query head n uses kv head n // group (Hugging Face `repeat_kv`), so split n as (kv, group).
    b, t = q_btnh.shape[:2]
    q_btkgh = q_btnh.reshape(b, t, n_kv, group, head_dim)
    scores_bkgts = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh, k_btkh, preferred_element_type=jnp.float32)
    scores_bkgts = scores_bkgts / math.sqrt(head_dim)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED_SCORE)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(dtype)
    attended_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_btkh)
    attended_btnh = attended_btkgh.reshape(b, t, cfg.n_heads, head_dim)
    x_btd = x_btd + jnp.einsum("btnh,nhd->btd", attended_btnh, w["wo"])

    h_btd = rms_norm(x_btd, layer["mlp_norm"], cfg.norm_eps)
    gate_btf = jnp.einsum("btd,df->btf", h_btd, w["w_gate"])
    up_btf = jnp.einsum("btd,df->btf", h_btd, w["w_up"])
    return x_btd + jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, w["w_down"])


class Transformer(nnx.Module):
    """Llama-style decoder: `__call__` returns the final-normed hidden states (and, on request,
    every layer's output); `head_vd` the output head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads})")
        if cfg.resolved_head_dim % 2:
            raise ValueError(f"head dimension {cfg.resolved_head_dim} must be even for rotary")
        # The config is kept as a tuple of items: a graph's static attributes must be hashable
        # (ModelConfig, a mutable dataclass, is not), so the GraphDef can be a jit static argument.
        self._config_items = tuple(dataclasses.asdict(cfg).items())
        n_layers, d, ff, vocab = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
        n, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        std = cfg.init_std
        # Residual-stream output projections are scaled down so the stream's variance at init
        # does not grow with depth (GPT-2 / nanoGPT: 1/sqrt(2 * n_layers)).
        out_std = std / math.sqrt(2 * n_layers)

        self.embedding = _param(rngs.params(), (vocab, d), std, pdt, ("vocab", "embed"))
        self.layers = nnx.Dict(
            attn_norm=_ones((n_layers, d), pdt, ("layers", "norm")),
            wq=_param(rngs.params(), (n_layers, d, n, hd), std, pdt,
                      ("layers", "embed", "heads", "head_dim")),
            wk=_param(rngs.params(), (n_layers, d, kv, hd), std, pdt,
                      ("layers", "embed", "kv_heads", "head_dim")),
            wv=_param(rngs.params(), (n_layers, d, kv, hd), std, pdt,
                      ("layers", "embed", "kv_heads", "head_dim")),
            wo=_param(rngs.params(), (n_layers, n, hd, d), out_std, pdt,
                      ("layers", "heads", "head_dim", "embed")),
            mlp_norm=_ones((n_layers, d), pdt, ("layers", "norm")),
            w_gate=_param(rngs.params(), (n_layers, d, ff), std, pdt, ("layers", "embed", "mlp")),
            w_up=_param(rngs.params(), (n_layers, d, ff), std, pdt, ("layers", "embed", "mlp")),
            w_down=_param(rngs.params(), (n_layers, ff, d), out_std, pdt,
                          ("layers", "mlp", "embed")),
        )
        self.final_norm = _ones((d,), pdt, ("norm",))
        if not cfg.tie_embeddings:
            self.head = _param(rngs.params(), (vocab, d), std, pdt, ("vocab", "embed"))

    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig(**dict(self._config_items))

    def head_vd(self) -> jax.Array:
        """Output head weight [vocab, d] as stored (the embedding when tied)."""
        cfg = self.cfg
        return self.embedding[...] if cfg.tie_embeddings else self.head[...]

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                 segment_ids_bt: jax.Array, with_layers: bool = False):
        """Final-normed hidden states [b, t, d]; with `with_layers`, also each layer's output
        (the residual stream after it, before the final norm), stacked [layers, b, t, d]."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x_btd = jnp.take(self.embedding[...], tokens_bt, axis=0).astype(dtype)
        cos_bth, sin_bth = rotary_angles(positions_bt, cfg.resolved_head_dim, cfg.rope_theta)
        mask_bts = attention_mask(segment_ids_bt)

        def layer_step(x_btd, layer):
            x_btd = _decoder_layer(x_btd, layer, cos_bth, sin_bth, mask_bts, cfg)
            return x_btd, (x_btd if with_layers else None)

        if cfg.remat:
            # Keep only each layer's input; everything inside is recomputed in the backward pass.
            layer_step = jax.checkpoint(
                layer_step, policy=jax.checkpoint_policies.nothing_saveable)
        stacked = {name: self.layers[name][...] for name in LAYER_PARAM_NAMES}
        x_btd, layers_lbtd = jax.lax.scan(layer_step, x_btd, stacked)
        hidden_btd = rms_norm(x_btd, self.final_norm[...], cfg.norm_eps)
        return (hidden_btd, layers_lbtd) if with_layers else hidden_btd
