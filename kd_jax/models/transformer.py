"""A decoder-only language model of the Llama family, in Flax NNX.

RMSNorm, rotary position embeddings (the Hugging Face `rotate_half` convention), grouped-query
attention, a SwiGLU MLP, optionally tied embeddings. Family flags in the config cover the
Hugging Face architectures this one definition reproduces (`kd_jax.models.families`): biases on
the attention projections (Qwen2, Llama `attention_bias`), RMSNorm of queries and keys (Qwen3),
sliding-window attention (Mistral), and Llama 3 / linear rotary scaling. Sequences may be
packed: each token carries its position (restarting at 0 in every document) and a segment id
(0 = padding), and attention never crosses a segment boundary.

Layers are stacked: every per-layer weight is a single parameter with a leading `layers` axis and
the forward pass is one `jax.lax.scan`, so tracing and compile time do not grow with depth.
`model.attention` chooses how attention is computed (`kd_jax.models.attention`), `model.remat`
what each layer keeps for the backward pass (`REMAT_POLICIES`), `model.quantize` the format the
forward pass sees the weights in (`kd_jax.models.quantize`: fake-quantized, the stored weights
float).

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
import numpy as np
from flax import nnx

from kd_jax.config import ModelConfig, RematPolicy, coerce
from kd_jax.models import attention, lora, quantize

# model.remat -> the jax.checkpoint policy of a layer (None: no checkpoint, keep everything).
# dots saves only matmuls without batch dimensions (the projections and the MLP): the attention
# scores are batched over (batch, kv head), so they are recomputed rather than stored.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# The parameters weight decay leaves alone: the norms' scales (decay would pull them toward 0,
# away from their identity at 1) and the biases. Named here, beside the parameters, because with
# stacked layers a norm's scale is 2-D [layers, d] and no rank rule tells it from a matrix.
NOT_DECAYED = frozenset({"attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm",
                         "bq", "bk", "bv", "bo"})


# model.layer_loop auto unrolls the layers on a CPU up to this depth and scans them otherwise.
# Unrolled, XLA:CPU lays out each layer's backward pass on its own (no stacked residuals to
# slice): the student step of benchmarks/vs_pytorch.py (4 layers) ran 0.66 s against 0.72 s
# scanned. Compile time grows with depth where the scan's does not: that step compiled in 3.0 s
# unrolled against 3.3 s scanned at 4 layers, 3.6 against 2.9 at 8, 4.3 against 2.6 at 16 and
# 8.4 against 3.0 at 32 (benchmarks/compile_time.py).
AUTO_UNROLL_LAYERS = 8


def layer_loop(cfg: ModelConfig, platform: str) -> str:
    """How `cfg`'s forward pass runs over its layers on `platform`: scan or unroll."""
    if cfg.layer_loop != "auto":
        return cfg.layer_loop
    return "unroll" if platform == "cpu" and cfg.n_layers <= AUTO_UNROLL_LAYERS else "scan"


def _param(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any,
           axes: tuple[str, ...]) -> nnx.Param:
    # Drawn flat, then reshaped: eager init compiles one draw per shape, and XLA compiles a 1-D
    # threefry draw several times faster than an n-D one (about 0.2 s against 1 s on CPU).
    flat = jax.random.normal(key, (math.prod(shape),), jnp.float32)
    value = (std * flat).reshape(shape).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _ones(shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def _zeros(shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


def rms_norm(x_btd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square norm, computed in float32 whatever the activation dtype, then cast back."""
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale_d.astype(jnp.float32)).astype(x_btd.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary frequencies [head_dim / 2] (float32), scaled as `cfg.rope_scaling` says.

    linear divides every frequency by the factor. llama3 (Llama 3.1) leaves the high
    frequencies (wavelength under original_max / high_freq_factor) alone, divides the low ones
    (wavelength over original_max / low_freq_factor) by the factor, and blends in between.
    Computed in numpy at trace time: it depends on the config only.
    """
    head_dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = cfg.rope_original_max / cfg.rope_low_freq_factor
        high_freq_wavelength = cfg.rope_original_max / cfg.rope_high_freq_factor
        smooth = ((cfg.rope_original_max / wavelength - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        inv_freq = np.where(wavelength < high_freq_wavelength, inv_freq,
                            np.where(wavelength > low_freq_wavelength,
                                     inv_freq / cfg.rope_factor, blended))
    return inv_freq.astype(np.float32)


def rotary_angles(positions_bt: jax.Array, inv_freq_f: np.ndarray):
    """cos and sin of the rotary angles, [b, t, head_dim / 2] in float32.

    Built from each token's explicit position, so a packed document starts again at angle 0.
    Half the head dimension: the two halves of a head share their angles, and on a CPU XLA
    recomputes the cosine and sine inside every fusion that uses them.
    """
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_f)
    return jnp.cos(angles_btf), jnp.sin(angles_btf)


def apply_rotary(x_btnh: jax.Array, cos_btf: jax.Array, sin_btf: jax.Array) -> jax.Array:
    """Rotate (x1, x2) halves of each head, non-interleaved, as Hugging Face LlamaModel does:
    x * cos + rotate_half(x) * sin with the angles repeated over both halves, written per half
    (the same products and sums)."""
    x32 = x_btnh.astype(jnp.float32)
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = cos_btf[:, :, None, :], sin_btf[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_btnh.dtype)


def project_qkv(h_btd, w, cos_btf, sin_btf, cfg: ModelConfig, dropout_key=None):
    """Queries [b, t, n, head_dim], keys and values [b, t, kv, head_dim] of normed inputs:
    biased, normed and rotated as the family flags say. `w` holds the layer's weights in the
    activation dtype (`layer_weights`), and its LoRA adapters if any (`dropout_key`: the
    layer's, in training)."""
    h_btd = quantize.activations(h_btd, cfg)
    q_btnh = lora.adapted(h_btd, w, "wq", cfg, dropout_key)
    k_btkh = lora.adapted(h_btd, w, "wk", cfg, dropout_key)
    v_btkh = lora.adapted(h_btd, w, "wv", cfg, dropout_key)
    if cfg.qkv_bias:
        q_btnh, k_btkh, v_btkh = q_btnh + w["bq"], k_btkh + w["bk"], v_btkh + w["bv"]
    if cfg.qk_norm:
        q_btnh = rms_norm(q_btnh, w["q_norm"], cfg.norm_eps)
        k_btkh = rms_norm(k_btkh, w["k_norm"], cfg.norm_eps)
    q_btnh = apply_rotary(q_btnh, cos_btf, sin_btf)
    k_btkh = apply_rotary(k_btkh, cos_btf, sin_btf)
    return q_btnh, k_btkh, v_btkh


def finish_layer(x_btd, attended_btnh, layer, w, cfg: ModelConfig, dropout_key=None):
    """The rest of a layer once its attention has run: the output projection added to the
    residual stream, then the MLP's. Returns the layer's output [b, t, d] and the MLP's
    activations [b, t, f]."""
    x_btd = x_btd + lora.adapted(quantize.activations(attended_btnh, cfg, contract=2), w, "wo",
                                 cfg, dropout_key, contract=2)
    if cfg.o_bias:
        x_btd = x_btd + w["bo"]

    h_btd = quantize.activations(rms_norm(x_btd, layer["mlp_norm"], cfg.norm_eps), cfg)
    gate_btf = lora.adapted(h_btd, w, "w_gate", cfg, dropout_key)
    up_btf = lora.adapted(h_btd, w, "w_up", cfg, dropout_key)
    # The gate in float32 whatever the activations' dtype: as exact as the matmuls' own
    # accumulation, and on a CPU 2.4x faster than bfloat16's emulated arithmetic.
    act_btf = (jax.nn.silu(gate_btf.astype(jnp.float32)) * up_btf.astype(jnp.float32)).astype(
        gate_btf.dtype)
    return x_btd + lora.adapted(quantize.activations(act_btf, cfg), w, "w_down", cfg,
                                dropout_key), act_btf


def layer_weights(layer, dtype, cfg: ModelConfig) -> dict[str, jax.Array]:
    """A layer's weights in the activation dtype (the norms' scales are cast where used), its
    projections fake-quantized first, from the weights as stored (`model.quantize`)."""
    return {name: value.astype(dtype)
            for name, value in quantize.layer_weights(layer, cfg).items()}


def embed(embedding_vd: jax.Array, tokens_bt: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The tokens' embedding rows [b, t, d] in the activation dtype, fake-quantized as
    `model.quantize_embedding` says."""
    rows_btd = quantize.rows(jnp.take(embedding_vd, tokens_bt, axis=0), cfg, "embedding")
    return rows_btd.astype(jnp.dtype(cfg.dtype))


def output_head(embedding_vd: jax.Array, head_vd: jax.Array | None,
                cfg: ModelConfig) -> jax.Array:
    """The output head [vocab, d] (the embedding when tied), fake-quantized as
    `model.quantize_head` says."""
    return quantize.rows(embedding_vd if cfg.tie_embeddings else head_vd, cfg, "head")


def _decoder_layer(x_btd, layer, cos_btf, sin_btf, attend: attention.Attend, cfg: ModelConfig,
                   with_stats: bool = False, dropout_key=None):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); `layer` holds its weights
    (and its LoRA adapters; `dropout_key`, the layer's, drops their inputs in training).

    With `with_stats`, also how strongly each head and each MLP unit fired: the summed L2 norm
    of each head's output [n] and the summed magnitude of each MLP activation [f], over the
    tokens (the importance scores of `kd_jax.models.surgery`).
    """
    w = layer_weights(layer, x_btd.dtype, cfg)
    h_btd = rms_norm(x_btd, layer["attn_norm"], cfg.norm_eps)
    # Grouped-query attention; the heads' outputs [b, t, n, head_dim], before the projection.
    attended_btnh = attend(*project_qkv(h_btd, w, cos_btf, sin_btf, cfg, dropout_key))
    x_btd, act_btf = finish_layer(x_btd, attended_btnh, layer, w, cfg, dropout_key)
    if not with_stats:
        return x_btd
    head_norms_n = jnp.linalg.norm(attended_btnh.astype(jnp.float32), axis=-1).sum((0, 1))
    return x_btd, (head_norms_n, jnp.abs(act_btf.astype(jnp.float32)).sum((0, 1)))


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
        self._config_items = tuple(
            (key, tuple(value) if isinstance(value, list) else value)
            for key, value in dataclasses.asdict(cfg).items())
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
        if cfg.qkv_bias:
            self.layers["bq"] = _zeros((n_layers, n, hd), pdt, ("layers", "heads", "head_dim"))
            self.layers["bk"] = _zeros((n_layers, kv, hd), pdt, ("layers", "kv_heads", "head_dim"))
            self.layers["bv"] = _zeros((n_layers, kv, hd), pdt, ("layers", "kv_heads", "head_dim"))
        if cfg.o_bias:
            self.layers["bo"] = _zeros((n_layers, d), pdt, ("layers", "norm"))
        if cfg.qk_norm:
            self.layers["q_norm"] = _ones((n_layers, hd), pdt, ("layers", "head_dim"))
            self.layers["k_norm"] = _ones((n_layers, hd), pdt, ("layers", "head_dim"))
        self.final_norm = _ones((d,), pdt, ("norm",))
        if not cfg.tie_embeddings:
            self.head = _param(rngs.params(), (vocab, d), std, pdt, ("vocab", "embed"))
        if cfg.lora_rank:  # drawn after the base, which is then what it is without LoRA
            self.lora = lora.init_adapters(self.layers, cfg, rngs)

    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig(**dict(self._config_items))

    def head_vd(self) -> jax.Array:
        """Output head weight [vocab, d] (the embedding when tied), as the forward pass sees it:
        fake-quantized where `model.quantize_head` says so."""
        cfg = self.cfg
        return output_head(self.embedding[...], None if cfg.tie_embeddings else self.head[...],
                           cfg)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                 segment_ids_bt: jax.Array, with_layers: bool = False,
                 activation_sharding: Any = None, dropout_key: jax.Array | None = None):
        """Final-normed hidden states [b, t, d]; with `with_layers`, also each layer's output
        (the residual stream after it, before the final norm), stacked [layers, b, t, d].
        `dropout_key` (a training step's) drops the LoRA adapters' inputs (`model.lora_dropout`).

        `activation_sharding` pins the residual stream [b, t, d] between layers (the batch split
        over the devices): without it, XLA may keep fsdp-sharded weights in place and gather
        the activations instead, every device then computing the whole batch.
        """
        cfg = self.cfg

        def pin(x_btd):
            if activation_sharding is None:
                return x_btd
            return jax.lax.with_sharding_constraint(x_btd, activation_sharding)

        # Padding (segment 0) is cleared in the residual stream, at the input and after every
        # layer. Nothing reads it (no query attends to a padding key, the loss masks it), but
        # attention multiplies every key's value by its probability, 0 for a masked key, and
        # 0 x NaN is NaN: a non-finite value at a padding position (an untrained embedding row,
        # an overflow) would otherwise reach every real position, and every gradient.
        real_bt1 = (segment_ids_bt > 0)[..., None]

        def layer_step(x_btd, layer_and_key):
            layer, key = layer_and_key
            x_btd = _decoder_layer(x_btd, layer, cos_btf, sin_btf, attend, cfg, dropout_key=key)
            x_btd = pin(jnp.where(real_bt1, x_btd, 0))
            return x_btd, (x_btd if with_layers else None)

        # A config built in code may still say remat=True: coerce reads it as it reads YAML.
        policy = REMAT_POLICIES[coerce(cfg.remat, RematPolicy, "model.remat")]
        if policy is not None:
            layer_step = jax.checkpoint(layer_step, policy=policy)
        x_btd, cos_btf, sin_btf, attend = self._inputs(tokens_bt, positions_bt, segment_ids_bt)
        keys = None  # a key a layer where the adapters' inputs are dropped
        if dropout_key is not None and cfg.lora_rank and cfg.lora_dropout > 0:
            keys = jax.random.split(dropout_key, cfg.n_layers)
        x_btd, layers_lbtd = jax.lax.scan(
            layer_step, pin(jnp.where(real_bt1, x_btd, 0)), (self._stacked(), keys),
            unroll=layer_loop(cfg, jax.default_backend()) == "unroll")
        hidden_btd = rms_norm(x_btd, self.final_norm[...], cfg.norm_eps)
        return (hidden_btd, layers_lbtd) if with_layers else hidden_btd

    def statistics(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                   segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per layer, the summed output norm of each attention head [layers, n_heads] and the
        summed magnitude of each MLP unit [layers, d_ff], over the tokens (padding included)."""
        cfg = self.cfg
        x_btd, cos_btf, sin_btf, attend = self._inputs(tokens_bt, positions_bt, segment_ids_bt)
        _, (heads_ln, mlp_lf) = jax.lax.scan(
            lambda x, layer: _decoder_layer(x, layer, cos_btf, sin_btf, attend, cfg, True),
            x_btd, self._stacked())
        return heads_ln, mlp_lf

    def attention_logprobs(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                           segment_ids_bt: jax.Array, layers_lbtd: jax.Array,
                           indices: tuple[int, ...]) -> jax.Array:
        """The attention distributions of layers `indices` as log-probabilities [k, b, n, t, t],
        float32, -inf where a key is masked (`attention.log_probs`).

        Recomputed from each layer's input (the embeddings, or the output of the layer before in
        `layers_lbtd`, which `__call__(..., with_layers=True)` returned): the same queries, keys
        and mask as the forward pass, densely, for these layers only, whatever `model.attention`.
        """
        cfg = self.cfg
        embedded_btd, cos_btf, sin_btf = self._embedded(tokens_bt, positions_bt)
        embedded_btd = jnp.where((segment_ids_bt > 0)[..., None], embedded_btd, 0)  # as __call__
        mask_bts = attention.attention_mask(segment_ids_bt, cfg.sliding_window)
        inputs_kbtd = jnp.stack([embedded_btd if index == 0 else layers_lbtd[index - 1]
                                 for index in indices])
        chosen = jnp.asarray(indices)
        weights_k = {name: value[chosen] for name, value in self._stacked().items()}

        def one(inputs):
            x_btd, layer = inputs
            h_btd = rms_norm(x_btd, layer["attn_norm"], cfg.norm_eps)
            q_btnh, k_btkh, _ = project_qkv(h_btd, layer_weights(layer, x_btd.dtype, cfg),
                                            cos_btf, sin_btf, cfg)
            return attention.log_probs(q_btnh, k_btkh, mask_bts)

        return jax.lax.map(one, (inputs_kbtd, weights_k))

    def _embedded(self, tokens_bt, positions_bt):
        cfg = self.cfg
        x_btd = embed(self.embedding[...], tokens_bt, cfg)
        cos_btf, sin_btf = rotary_angles(positions_bt, rope_inv_freq(cfg))
        return x_btd, cos_btf, sin_btf

    def _inputs(self, tokens_bt, positions_bt, segment_ids_bt):
        x_btd, cos_btf, sin_btf = self._embedded(tokens_bt, positions_bt)
        return x_btd, cos_btf, sin_btf, attention.for_batch(self.cfg, segment_ids_bt)

    def _stacked(self) -> dict[str, jax.Array]:
        """Every stacked per-layer weight [layers, ...], the LoRA adapters included."""
        adapters = self.lora.items() if hasattr(self, "lora") else ()
        return {name: value[...] for name, value in (*self.layers.items(), *adapters)}
