"""Attention, softmax(q k^T / sqrt(head_dim)) v, computed three ways with one mask.

A query attends to a key when the key is not after it, lies in the same segment (a packed
document; segment id 0 is padding) and is not padding; with a sliding window, also when it is
at most `window - 1` tokens back. Causality and the window count token indices in the row, not
positions (which restart in each document). Query head n uses key/value head n // group (GQA).

- `dense`: every [t, s] score of every head, then the softmax: the reference, and the fastest
  for short sequences; its memory is quadratic in the sequence.
- `blockwise`: an online (flash-style) softmax over blocks of `model.attention_block` queries
  and keys, in pure JAX for every platform. The mask is computed per block from segment ids and
  token indices, the running max and sum are float32 whatever the activation dtype, and blocks
  wholly above the causal diagonal (or beyond the window) are skipped. The backward pass is a
  `custom_vjp` that recomputes each block's probabilities from the saved row max and sum
  (FlashAttention-2, Dao 2023), so training memory is linear in the sequence too.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU and bfloat16 only.

Which kernels honour packed segment ids (read from jax 0.10.2):
`jax.nn.dot_product_attention` (xla and cudnn) has no segment ids: it takes a dense boolean
`mask` or additive `bias` broadcastable to [b, n, t, s], `query_seq_lengths` and
`key_value_seq_lengths` (one document per row, padding at its end), `is_causal` and
`local_window_size`. Packed rows are therefore passed to cuDNN as a [b, 1, t, s] mask: exact,
but the mask (and the bias gradient cuDNN always returns) is quadratic again, though per row
rather than per head and in bfloat16. cuDNN's own packed layout (per-segment offsets, Hopper
and later) exists only in the private `jax._src.cudnn` module, which is not used here. The
Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) takes `SegmentIds`
with causal and local masks, TPU only; it is not wired in, since it cannot be checked off TPU.
tokamax is not installed; its public `dot_product_attention` mirrors jax.nn's signature (a dense
mask or bias, per-row lengths) and has no segment ids argument either.

Hence `auto`: blockwise from 1,024 tokens, dense below that, on every platform. cudnn is opt-in
(`model.attention: cudnn`) until it has been checked against the dense reference on a GPU; it
would suit bfloat16 runs while its [t, t] mask stays small (up to 16,384 tokens: 0.5 GiB a
sequence).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kd_jax.config import ModelConfig
from kd_jax.models.matmul import matmul

# Masked scores are set to this before the softmax rather than -inf, so a query that may attend
# to nothing (a padding token) gets a uniform, finite distribution instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)

# auto: blockwise from this many tokens (below it dense's [t, t] scores are small and faster).
AUTO_BLOCKWISE_TOKENS = 1024
_GPU_PLATFORMS = ("gpu", "cuda")

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def implementation(cfg: ModelConfig, seq_len: int, platform: str) -> str:
    """The implementation `cfg.attention` names for `seq_len` tokens on `platform`
    ("cpu", "gpu", "tpu"): dense, blockwise or cudnn."""
    if cfg.attention != "auto":
        return cfg.attention
    # auto does not choose cudnn yet: that path has not been run on a GPU against the dense
    # reference (opt in with model.attention=cudnn).
    return "blockwise" if seq_len >= AUTO_BLOCKWISE_TOKENS else "dense"


def describe(cfg: ModelConfig, seq_len: int, platform: str) -> str:
    """One line naming the attention a run uses and why, for the start-up log."""
    kind = implementation(cfg, seq_len, platform)
    what = {"dense": "[t, s] scores per head",
            "blockwise": f"online softmax over {min(cfg.attention_block, seq_len)}-token blocks",
            "cudnn": "jax.nn.dot_product_attention on cuDNN, segments as a [t, s] mask"}[kind]
    why = ("model.attention" if cfg.attention != "auto"
           else f"auto: {seq_len} tokens on {platform}")
    return f"attention {kind}: {what} ({why})"


def attention_mask(segment_ids_bt: jax.Array, sliding_window: int = 0) -> jax.Array:
    """[b, t(query), s(key)] booleans: causal, same segment, and the key is not padding; with a
    sliding window, also at most `sliding_window - 1` tokens back (the query itself counts)."""
    t = segment_ids_bt.shape[1]
    return _allowed(segment_ids_bt, segment_ids_bt, jnp.arange(t), jnp.arange(t), sliding_window)


def _allowed(segment_q_bt, segment_k_bs, index_t, index_s, sliding_window: int) -> jax.Array:
    """The mask [b, t, s] of queries at token indices `index_t` and keys at `index_s`."""
    query_t, key_s = index_t[:, None], index_s[None, :]
    allowed_ts = query_t >= key_s
    if sliding_window:
        allowed_ts &= query_t - key_s < sliding_window
    same_segment_bts = segment_q_bt[:, :, None] == segment_k_bs[:, None, :]
    real_key_bs = (segment_k_bs != 0)[:, None, :]
    return allowed_ts[None] & same_segment_bts & real_key_bs


def for_batch(cfg: ModelConfig, segment_ids_bt: jax.Array) -> Attend:
    """`attend(q_btnh, k_btkh, v_btkh) -> [b, t, n, head_dim]` for one batch's segments, with
    whatever it needs (the dense mask, cuDNN's) built once for every layer."""
    platform = jax.default_backend()
    kind = implementation(cfg, segment_ids_bt.shape[1], platform)
    window = cfg.sliding_window
    if kind == "dense":
        mask_bts = attention_mask(segment_ids_bt, window)
        return lambda q, k, v: dense(q, k, v, mask_bts)
    if kind == "blockwise":
        return functools.partial(blockwise, segment_ids_bt=segment_ids_bt,
                                 sliding_window=window, block=cfg.attention_block)
    if platform not in _GPU_PLATFORMS:
        raise ValueError(f"model.attention is cudnn, which needs a GPU; this platform is "
                         f"{platform}: use auto, dense or blockwise")
    mask_b1ts = attention_mask(segment_ids_bt, window)[:, None]
    return functools.partial(cudnn, mask_b1ts=mask_b1ts)


def _heads_major(q_btnh, k_btkh, v_btkh=None):
    """Queries [b, kv, group * t, head_dim] and keys (and values) [b, kv, s, head_dim]: every
    matmul of attention then has its batch dimensions (b, kv) leading and contracts over a
    row-major dimension, as XLA:CPU's matmuls take them (with the [b, t, heads, head_dim]
    layout XLA transposes the scores and the probabilities instead: 1.6x slower forward)."""
    b, t, n, head_dim = q_btnh.shape
    n_kv = k_btkh.shape[2]
    # Query head n uses kv head n // group (Hugging Face `repeat_kv`), so split n as (kv, group),
    # and stack a kv head's group of queries along the sequence: one matmul per kv head.
    q_bkqh = q_btnh.reshape(b, t, n_kv, n // n_kv, head_dim).transpose(0, 2, 3, 1, 4).reshape(
        b, n_kv, n // n_kv * t, head_dim)
    rest = tuple(x.transpose(0, 2, 1, 3) for x in (k_btkh, v_btkh) if x is not None)
    return (q_bkqh, *rest)


def _dense_scores(q_bkqh, k_bksh, mask_bts) -> jax.Array:
    """Every score [b, kv, group, t, s], float32, scaled and masked."""
    b, n_kv, _, head_dim = q_bkqh.shape
    t, s = mask_bts.shape[1:]
    scores_bkqs = jnp.einsum("bkqh,bksh->bkqs", q_bkqh, k_bksh,
                             preferred_element_type=jnp.float32)
    scores_bkgts = scores_bkqs.reshape(b, n_kv, -1, t, s) / math.sqrt(head_dim)
    return jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED_SCORE)


def dense(q_btnh, k_btkh, v_btkh, mask_bts) -> jax.Array:
    """Every score, float32, masked, softmaxed; the probabilities in the activation dtype."""
    b, t, n, head_dim = q_btnh.shape
    q_bkqh, k_bksh, v_bksh = _heads_major(q_btnh, k_btkh, v_btkh)
    scores_bkgts = _dense_scores(q_bkqh, k_bksh, mask_bts)
    probs_bkqs = jax.nn.softmax(scores_bkgts, axis=-1).astype(q_btnh.dtype).reshape(
        b, k_bksh.shape[1], -1, k_bksh.shape[2])
    attended_bkqh = matmul("bkqs,bksh->bkqh", probs_bkqs, v_bksh)
    return attended_bkqh.reshape(b, k_bksh.shape[1], -1, t, head_dim).transpose(
        0, 3, 1, 2, 4).reshape(b, t, n, head_dim)


def log_probs(q_btnh, k_btkh, mask_bts) -> jax.Array:
    """The attention distributions `dense` applies, as log-probabilities [b, n, t, s], float32:
    -inf exactly where a key is masked (its probability is 0). A query that sees no key (a
    padding token) gets -inf everywhere. Quadratic in the sequence, like `dense`."""
    b, t, n, _ = q_btnh.shape
    scores_bnts = _dense_scores(*_heads_major(q_btnh, k_btkh), mask_bts).reshape(b, n, t, t)
    return jnp.where(mask_bts[:, None], jax.nn.log_softmax(scores_bnts, axis=-1), -jnp.inf)


def cudnn(q_btnh, k_btkh, v_btkh, mask_b1ts) -> jax.Array:
    """cuDNN's fused attention; `is_causal` lets it skip the blocks above the diagonal, the
    mask carries the segments and the window."""
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1ts, is_causal=True,
                                        implementation="cudnn")


def blockwise(q_btnh, k_btkh, v_btkh, segment_ids_bt, sliding_window: int = 0,
              block: int = 512) -> jax.Array:
    """The same attention as `dense`, an online softmax over blocks of `block` tokens: no array
    of [t, s] scores, forward or backward. The sequence is padded to whole blocks internally."""
    b, t, n, head_dim = q_btnh.shape
    n_kv = k_btkh.shape[2]
    block = min(block, t)
    padded = -(-t // block) * block
    if padded != t:  # padding keys have segment 0, so no real query sees them
        widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, widths) for x in (q_btnh, k_btkh, v_btkh))
        segment_ids_bt = jnp.pad(segment_ids_bt, ((0, 0), (0, padded - t)))
    q_btkgh = q_btnh.reshape(b, padded, n_kv, n // n_kv, head_dim)
    attended_btkgh = _flash(q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block)
    return attended_btkgh[:, :t].reshape(b, t, n, head_dim)


def _reach(n_blocks: int, sliding_window: int, block: int) -> int:
    """How many key blocks before its own a query block still sees: all of them, or with a
    window, ceil((window - 1) / block) (the nearest query of block i is i*block, the farthest
    key of block i - r is (i - r + 1)*block - 1)."""
    return n_blocks if not sliding_window else -(-(sliding_window - 1) // block)


def _slice(x, index, block: int):
    """Block `index` of `x` along its token axis (axis 1)."""
    return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=1)


def _block_scores(q_bqkgh, k_bskh, segment_q_bq, segment_k_bs, qi, kj, sliding_window, block):
    """Scaled scores [b, kv, g, q, s] of query block qi against key block kj, masked, and the
    mask [b, q, s]."""
    scores = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh,
                        preferred_element_type=jnp.float32) / math.sqrt(q_bqkgh.shape[-1])
    index = jnp.arange(block)
    allowed_bqs = _allowed(segment_q_bq, segment_k_bs, qi * block + index, kj * block + index,
                           sliding_window)
    return jnp.where(allowed_bqs[:, None, None], scores, _MASKED_SCORE), allowed_bqs


def _forward(q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block):
    """Outputs [b, t, kv, g, h] and, per query block, each row's max score and 1 / sum of
    exponentials [blocks, b, kv, g, q] (float32): what the backward pass recomputes from."""
    b, t, n_kv, group, head_dim = q_btkgh.shape
    n_blocks = t // block
    reach = _reach(n_blocks, sliding_window, block)

    def query_block(_, qi):
        q_bqkgh, segment_q_bq = _slice(q_btkgh, qi, block), _slice(segment_ids_bt, qi, block)

        def key_block(kj, carry):
            max_bkgq, sum_bkgq, acc_bkgqh = carry
            k_bskh, v_bskh = _slice(k_btkh, kj, block), _slice(v_btkh, kj, block)
            scores, _ = _block_scores(q_bqkgh, k_bskh, segment_q_bq,
                                      _slice(segment_ids_bt, kj, block), qi, kj,
                                      sliding_window, block)
            new_max = jnp.maximum(max_bkgq, scores.max(-1))
            # A row masked so far has max _MASKED_SCORE: its first real score rescales it by
            # exp(_MASKED_SCORE - real) = 0, dropping what the masked keys added.
            rescale = jnp.exp(max_bkgq - new_max)
            probs = jnp.exp(scores - new_max[..., None])
            attended = jnp.einsum("bkgqs,bskh->bkgqh", probs.astype(v_bskh.dtype), v_bskh,
                                  preferred_element_type=jnp.float32)
            return (new_max, sum_bkgq * rescale + probs.sum(-1),
                    acc_bkgqh * rescale[..., None] + attended)

        init = (jnp.full((b, n_kv, group, block), _MASKED_SCORE, jnp.float32),
                jnp.zeros((b, n_kv, group, block), jnp.float32),
                jnp.zeros((b, n_kv, group, block, head_dim), jnp.float32))
        # Only the key blocks a query block can see: none after it, none beyond the window.
        max_bkgq, sum_bkgq, acc_bkgqh = jax.lax.fori_loop(
            jnp.maximum(qi - reach, 0), qi + 1, key_block, init)
        inv_sum_bkgq = 1.0 / sum_bkgq  # >= 1 term: the row's max contributes exp(0)
        out_bqkgh = jnp.einsum("bkgqh,bkgq->bqkgh", acc_bkgqh, inv_sum_bkgq)
        return None, (out_bqkgh.astype(q_btkgh.dtype), max_bkgq, inv_sum_bkgq)

    _, (out_nbqkgh, max_nbkgq, inv_sum_nbkgq) = jax.lax.scan(
        query_block, None, jnp.arange(n_blocks))
    out_btkgh = jnp.moveaxis(out_nbqkgh, 0, 1).reshape(q_btkgh.shape)
    return out_btkgh, max_nbkgq, inv_sum_nbkgq


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block):
    return _forward(q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block)[0]


def _flash_forward(q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block):
    out_btkgh, max_nbkgq, inv_sum_nbkgq = _forward(
        q_btkgh, k_btkh, v_btkh, segment_ids_bt, sliding_window, block)
    return out_btkgh, (q_btkgh, k_btkh, v_btkh, segment_ids_bt, out_btkgh, max_nbkgq,
                       inv_sum_nbkgq)


def _flash_backward(sliding_window, block, residuals, d_out_btkgh):
    """FlashAttention-2's backward: for each key block, the query blocks that see it; each
    block's probabilities recomputed from the saved row max and sum. dq accumulates in place."""
    q_btkgh, k_btkh, v_btkh, segment_ids_bt, out_btkgh, max_nbkgq, inv_sum_nbkgq = residuals
    t, head_dim = q_btkgh.shape[1], q_btkgh.shape[-1]
    n_blocks = t // block
    reach = _reach(n_blocks, sliding_window, block)
    # d(softmax) needs sum_s p * dp = sum_h dout * out per query row.
    delta_btkg = jnp.einsum("btkgh,btkgh->btkg", d_out_btkgh.astype(jnp.float32),
                            out_btkgh.astype(jnp.float32))
    dtype = q_btkgh.dtype

    def key_block(dq_btkgh, kj):
        k_bskh, v_bskh = _slice(k_btkh, kj, block), _slice(v_btkh, kj, block)
        segment_k_bs = _slice(segment_ids_bt, kj, block)

        def query_block(qi, carry):
            dq_btkgh, dk_bskh, dv_bskh = carry
            q_bqkgh, d_out_bqkgh = _slice(q_btkgh, qi, block), _slice(d_out_btkgh, qi, block)
            scores, allowed_bqs = _block_scores(
                q_bqkgh, k_bskh, _slice(segment_ids_bt, qi, block), segment_k_bs, qi, kj,
                sliding_window, block)
            probs = (jnp.exp(scores - max_nbkgq[qi][..., None])
                     * inv_sum_nbkgq[qi][..., None])
            dv_bskh += jnp.einsum("bkgqs,bqkgh->bskh", probs.astype(dtype), d_out_bqkgh,
                                  preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("bqkgh,bskh->bkgqs", d_out_bqkgh, v_bskh,
                                 preferred_element_type=jnp.float32)
            delta_bkgq = jnp.moveaxis(_slice(delta_btkg, qi, block), 1, -1)
            d_scores = probs * (d_probs - delta_bkgq[..., None]) / math.sqrt(head_dim)
            # Masked scores are constants, as in `dense`: no gradient reaches q or k through
            # them (a padding row's uniform weights would otherwise give one).
            d_scores = jnp.where(allowed_bqs[:, None, None], d_scores, 0.0).astype(dtype)
            dk_bskh += jnp.einsum("bkgqs,bqkgh->bskh", d_scores, q_bqkgh,
                                  preferred_element_type=jnp.float32)
            dq_bqkgh = _slice(dq_btkgh, qi, block) + jnp.einsum(
                "bkgqs,bskh->bqkgh", d_scores, k_bskh, preferred_element_type=jnp.float32)
            dq_btkgh = jax.lax.dynamic_update_slice_in_dim(dq_btkgh, dq_bqkgh, qi * block, 1)
            return dq_btkgh, dk_bskh, dv_bskh

        zeros = jnp.zeros(k_bskh.shape, jnp.float32)
        dq_btkgh, dk_bskh, dv_bskh = jax.lax.fori_loop(
            kj, jnp.minimum(kj + reach + 1, n_blocks), query_block, (dq_btkgh, zeros, zeros))
        return dq_btkgh, (dk_bskh, dv_bskh)

    dq_btkgh, (dk_nbskh, dv_nbskh) = jax.lax.scan(
        key_block, jnp.zeros(q_btkgh.shape, jnp.float32), jnp.arange(n_blocks))
    dk_btkh = jnp.moveaxis(dk_nbskh, 0, 1).reshape(k_btkh.shape)
    dv_btkh = jnp.moveaxis(dv_nbskh, 0, 1).reshape(v_btkh.shape)
    return (dq_btkgh.astype(dtype), dk_btkh.astype(k_btkh.dtype), dv_btkh.astype(v_btkh.dtype),
            None)


_flash.defvjp(_flash_forward, _flash_backward)
