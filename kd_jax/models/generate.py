"""Sampling from a model with a key/value cache: prompts in, new tokens out, one jitted program.

Layout. A batch of prompts is left-padded to a common width P (`left_pad`): row b's prompt fills
slots [P - length_b, P) and the i-th new token of every row goes to slot P + i, so each step
writes one column of the cache for the whole batch. A token's position (its rotary angle) is its
slot minus its row's padding, so every prompt starts at position 0, as it does when encoded
alone. A query sees a key that is not padding, not after it and, with a sliding window, at most
window - 1 slots back: within a row slot differences are position differences, so this is the
model's own mask (`kd_jax.models.attention` counts the window in token indices).

The cache holds keys and values, each [layers, batch, P + max_new_tokens, kv_heads, head_dim],
allocated once. The prompts are prefilled in one pass, then `jax.lax.while_loop` decodes one
token a step until every row has stopped or max_new_tokens are out. No shape changes inside the
loop, so nothing is compiled between steps, and a later call of the same shapes (other prompts,
seeds, temperature, top-k, top-p or stop ids: all arrays) runs the same executable.

The math is the model's: the projections, norms, rotary angles and MLP of
`kd_jax.models.transformer` and `attention.dense` over the cache, so greedy decoding picks, at
every step, the argmax of a full forward pass over the sequence so far
(tests/models/test_generate.py checks it token for token).

Drawing a token: float32 logits (embedding rows past the tokenizer's vocabulary never drawn)
divided by the temperature; the k most likely kept; of those, renormalized, the nucleus: the
most likely tokens until their probability reaches top_p (the first always kept); one token
drawn from what is left, renormalized, by the inverse of its cumulative distribution: in the
order of the ranking when top-k or top-p cut it, in id order (no sort) when neither does. This
is transformers' order (temperature, then TopK, then TopP). Temperature 0 is greedy. Ties in
rank are broken by the lower id. Each row draws with its own key (`row_keys`), so a prompt's
response does not depend on what it was batched with.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kd_jax.config import ModelConfig
from kd_jax.models import attention, lora
from kd_jax.models.pure import logits_btv
from kd_jax.models.transformer import (
    embed,
    finish_layer,
    layer_weights,
    output_head,
    project_qkv,
    rms_norm,
    rope_inv_freq,
    rotary_angles,
)

Params = Any


@struct.dataclass
class Sampling:
    """How each new token is drawn. Arrays (or numbers) inside the program: changing one
    compiles nothing."""

    temperature: Any = 0.0  # 0: greedy, the argmax
    top_k: Any = 0  # keep the k most likely tokens; 0: all
    top_p: Any = 1.0  # then the nucleus of this probability; 1: all


@struct.dataclass
class Generated:
    """What a batch of prompts produced."""

    tokens_bn: jax.Array  # int32 [batch, max_new_tokens]: new tokens; pad_id after a stop token
    lengths_b: jax.Array  # int32 [batch]: new tokens before the stop token (all, if none came)
    stopped_b: jax.Array  # bool [batch]: the row drew a stop token (kept in tokens_bn)


def left_pad(prompts: Sequence[Sequence[int]], width: int | None = None, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as the sampler takes them: int32 [batch, width] with each prompt at the right
    end, and int32 [batch] lengths. `width` defaults to the longest prompt."""
    lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int32)
    width = int(lengths.max(initial=0)) if width is None else width
    if lengths.min(initial=1) < 1 or lengths.max(initial=0) > width:
        raise ValueError(f"every prompt needs 1 to {width} tokens, got lengths "
                         f"{lengths.min()}..{lengths.max()}")
    tokens = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = np.asarray(prompt, dtype=np.int32)
    return tokens, lengths


def row_keys(seed: int, rows: np.ndarray) -> jax.Array:
    """One PRNG key per row [batch, 2], from the seed and the row's number in the prompt set."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.asarray(rows, jnp.uint32))


def draw(logits_bv: jax.Array, keys_b: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row, int32 [batch], from float32 logits as `Sampling` says."""

    def greedy():
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def inverse_cdf(kept_bv):
        # One uniform a row against the cumulative mass (compiles far faster than a Gumbel draw
        # over the vocabulary). A token of mass 0 is never chosen: where its cumulative mass is
        # <= u, so is its predecessor's, and u * total may round up to the total only at the
        # end, where the choice is held to the last token of positive mass.
        cdf_bv = jnp.cumsum(kept_bv, axis=-1)
        uniform_b = jax.vmap(jax.random.uniform)(keys_b) * cdf_bv[:, -1]
        choice_b = (cdf_bv <= uniform_b[:, None]).sum(-1)
        last_b = kept_bv.shape[-1] - 1 - jnp.argmax((kept_bv > 0)[:, ::-1], axis=-1)
        return jnp.minimum(choice_b, last_b)

    def sample_all():  # no top-k, no nucleus: every token in id order, no sort
        probs_bv = jax.nn.softmax(logits_bv / sampling.temperature, axis=-1)
        return inverse_cdf(probs_bv).astype(jnp.int32)

    def sample_ranked():
        scaled_bv = logits_bv / sampling.temperature
        order_bv = jnp.argsort(-scaled_bv, axis=-1, stable=True)  # most likely first
        sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
        rank_v = jnp.arange(sorted_bv.shape[-1])
        sorted_bv = jnp.where((sampling.top_k <= 0) | (rank_v < sampling.top_k), sorted_bv,
                              -jnp.inf)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        more_likely_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass ranked before each
        # top_p = 1 keeps every token outright: float32 sums may reach 1 before the last one.
        in_nucleus = (sampling.top_p >= 1.0) | (more_likely_bv < sampling.top_p)
        choice_b = inverse_cdf(jnp.where(in_nucleus, probs_bv, 0.0))
        return jnp.take_along_axis(order_bv, choice_b[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def sample():
        # Sorting the vocabulary is most of a decoding step's time: only a cut needs the ranking.
        return jax.lax.cond((sampling.top_k <= 0) & (sampling.top_p >= 1.0), sample_all,
                            sample_ranked)

    return jax.lax.cond(sampling.temperature > 0, sample, greedy)


def _forward(cfg: ModelConfig, params: Params, tokens_bt, start, pad_b, cache, pin):
    """Run `tokens_bt` (at slots start .. start + t) through the model, writing their keys and
    values into the cache; the float32 logits of each row's last token [b, vocab] and the cache.
    """
    cache_k, cache_v = cache
    t, max_len = tokens_bt.shape[1], cache_k.shape[2]
    slots_t = start + jnp.arange(t)
    positions_bt = jnp.maximum(slots_t[None, :] - pad_b[:, None], 0)  # padding: any angle
    key_slots_s = jnp.arange(max_len)
    seen_bts = ((key_slots_s[None, None, :] <= slots_t[None, :, None])
                & (key_slots_s[None, None, :] >= pad_b[:, None, None]))
    if cfg.sliding_window:
        seen_bts &= (slots_t[:, None] - key_slots_s[None, :] < cfg.sliding_window)[None]
    x_btd = embed(params["embedding"], tokens_bt, cfg)
    cos_btf, sin_btf = rotary_angles(positions_bt, rope_inv_freq(cfg))

    def layer_step(carry, layer_and_index):
        x_btd, cache_k, cache_v = carry
        layer, index = layer_and_index
        w = layer_weights(layer, x_btd.dtype, cfg)
        h_btd = rms_norm(x_btd, layer["attn_norm"], cfg.norm_eps)
        q_btnh, k_btkh, v_btkh = project_qkv(h_btd, w, cos_btf, sin_btf, cfg)
        # In place: the cache is the loop's carry, only t columns of one layer are written.
        cache_k = jax.lax.dynamic_update_slice(cache_k, k_btkh[None].astype(cache_k.dtype),
                                               (index, 0, start, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v_btkh[None].astype(cache_v.dtype),
                                               (index, 0, start, 0, 0))
        attended_btnh = attention.dense(q_btnh, cache_k[index], cache_v[index], seen_bts)
        x_btd, _ = finish_layer(x_btd, attended_btnh, layer, w, cfg)
        return (pin(x_btd), cache_k, cache_v), None

    n_layers = cache_k.shape[0]
    (x_btd, cache_k, cache_v), _ = jax.lax.scan(
        layer_step, (pin(x_btd), cache_k, cache_v),
        (lora.stacked_layers(params), jnp.arange(n_layers)))
    hidden_b1d = rms_norm(x_btd[:, -1:], params["final_norm"], cfg.norm_eps)
    head_vd = output_head(params["embedding"], params.get("head"), cfg)
    return logits_btv(hidden_b1d, head_vd)[:, 0], (cache_k, cache_v)


def make_sampler(cfg: ModelConfig, max_new_tokens: int, valid_vocab: int | None = None,
                 pad_id: int = 0, cache_sharding: Any = None, activation_sharding: Any = None
                 ) -> Callable[..., Generated]:
    """`sample(params, prompt_bp, lengths_b, keys_b, sampling, stop_ids_s) -> Generated`, jitted.

    `prompt_bp` and `lengths_b` are `left_pad`'s; `keys_b` `row_keys`'; `stop_ids_s` int32 ids
    that end a row (-1 for none; any length, fixed per compilation). `valid_vocab` is the
    tokenizer's vocabulary (rows past it are never drawn; default: all). On a mesh,
    `cache_sharding` places the cache [layers, batch, slots, kv_heads, head_dim] (batch over
    data x fsdp, kv heads over tensor when the parameters split heads) and
    `activation_sharding` the residual stream [batch, tokens, d], as in training.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n_kv, head_dim = cfg.n_kv_heads, cfg.resolved_head_dim

    def pin(x, sharding=activation_sharding):
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def sample(params, prompt_bp, lengths_b, keys_b, sampling: Sampling, stop_ids_s):
        batch, width = prompt_bp.shape
        pad_b = width - lengths_b
        shape = (cfg.n_layers, batch, width + max_new_tokens, n_kv, head_dim)
        cache = tuple(pin(jnp.zeros(shape, jnp.dtype(cfg.dtype)), cache_sharding)
                      for _ in range(2))
        vocab_v = jnp.arange(cfg.vocab_size)

        def masked(logits_bv):
            if valid_vocab is None or valid_vocab >= cfg.vocab_size:
                return logits_bv
            return jnp.where(vocab_v < valid_vocab, logits_bv, -jnp.inf)

        logits_bv, cache = _forward(cfg, params, prompt_bp, 0, pad_b, cache, pin)

        def not_finished(carry):
            step, _, _, _, stopped_b, _ = carry
            return (step < max_new_tokens) & ~jnp.all(stopped_b)

        def decode_step(carry):
            step, cache, logits_bv, tokens_bn, stopped_b, lengths_b = carry
            step_keys_b = jax.vmap(jax.random.fold_in, (0, None))(keys_b, step)
            token_b = jnp.where(stopped_b, pad_id, draw(masked(logits_bv), step_keys_b,
                                                        sampling))
            tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
            stops_b = ~stopped_b & (token_b[:, None] == stop_ids_s[None, :]).any(-1)
            lengths_b = lengths_b + (~stopped_b & ~stops_b)
            # The last step's forward pass feeds nothing; it writes the cache's last column.
            logits_bv, cache = _forward(cfg, params, token_b[:, None], width + step, pad_b,
                                        cache, pin)
            return step + 1, cache, logits_bv, tokens_bn, stopped_b | stops_b, lengths_b

        start = (jnp.int32(0), cache, logits_bv,
                 jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                 jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
        _, _, _, tokens_bn, stopped_b, lengths_b = jax.lax.while_loop(
            not_finished, decode_step, start)
        return Generated(tokens_bn, lengths_b, stopped_b)

    compiled = jax.jit(sample)

    def call(params, prompt_bp, lengths_b, keys_b, sampling: Sampling, stop_ids_s) -> Generated:
        # Fixed dtypes: a Python float and a float32 array would otherwise compile twice.
        sampling = Sampling(np.float32(sampling.temperature), np.int32(sampling.top_k),
                            np.float32(sampling.top_p))
        stop_ids_s = np.asarray(stop_ids_s, dtype=np.int32).reshape(-1)
        return compiled(params, prompt_bp, lengths_b, keys_b, sampling, stop_ids_s)

    call.compiled = compiled  # the jitted function: its `_cache_size()` counts compilations
    return call
