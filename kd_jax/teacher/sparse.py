"""The teacher's sparse soft targets from its logits: what a cache stores per token.

Three modes, each computed from teacher logits inside `jit` (this module is pure: jax and numpy):

* `full`   all log-probabilities, [batch, tokens, valid_vocab].
* `topk`   the k largest log-probabilities and their token ids, plus `tail`, the log of the mass
           left outside them, log(1 - sum of the top-k probabilities). The loss uses the tail as
           one extra bucket, so the teacher distribution it sees still sums to one instead of
           being silently renormalized onto the k ids.
* `sample` n token ids drawn i.i.d. from the teacher distribution, stored as unique ids with
           counts, plus the teacher entropy at that position. E_{y~p}[-log q(y)] - H(p) is
           KL(p || q), so the sampled loss estimates the forward-KL value (not only its gradient)
           without bias (random-sampling KD: Anshumann et al. 2025, "Sparse Logit Sampling").

Conventions
-----------
* Shapes are in the names: `_btv` [batch, tokens, vocab], `_btk` [batch, tokens, k], `_btn`
  [batch, tokens, n samples], `_bt` [batch, tokens], `_b` [batch]. Targets are float32 (ids and
  counts int32) whatever the logits' dtype. The dict keys are the cache's field names
  (`kd_jax.cache.codec`) and the fields of the loss's soft targets
  (`kd_jax.losses.soft_targets`): topk {"ids", "logprobs", "tail"}, sample {"ids", "counts",
  "entropy"}; full is one array, the cache's "logprobs".
* `valid_vocab` is the tokenizer's vocabulary size (None: every column is valid). Columns >=
  valid_vocab are cut off before anything else, so no padded id is ever selected or drawn, and
  the results do not depend on how far the embedding table is padded.
* Tail convention: `tail` is computed as logsumexp over the log-probabilities outside the top k,
  never as log1p(-sum p_topk): the latter cancels catastrophically in float32 once the tail mass
  falls below ~1e-7, while the logsumexp stays accurate to float32 relative precision however
  small the tail is. When the top k hold all of the mass (k == valid_vocab, or every other
  probability underflows to 0) the tail is exactly -inf: an empty bucket, which the losses treat
  as probability 0 without producing NaN. A cache must therefore be able to store -inf (float32
  and bfloat16 both can).

Temperature
-----------
Every mode computes p_T = softmax(logits / T) over the valid vocabulary.
* `full`: store T = 1. log_softmax only shifts the logits by a constant per token, so
  softmax(log p_1 / T) == softmax(z / T) for any T: stored T = 1 log-probabilities can be fed to
  the losses as if they were teacher logits and re-tempered exactly at training time.
* `topk` and `sample`: the temperature is fixed when the cache is built. Their normalizer needs
  the whole vocabulary (softmax(z / T) restricted to k ids is not a function of the k T = 1
  log-probabilities), so a cache records its T, and training must use that same loss temperature.

A teacher with another tokenizer
--------------------------------
Its targets are computed from its logits at the teacher's aligned positions, gathered onto the
student's positions (`at_aligned_positions`, with `teacher_index` from `kd_jax.align.rows`), in
its own vocabulary (`valid_vocab` is its tokenizer's); a student position with no aligned
teacher position gets zeros and the flag `aligned` 0 (`aligned_only`), so a cache stays
row-aligned with the student's rows. `sample` is not computed for it (`kd_jax.train.precompute`
refuses it): draws from the teacher's vocabulary estimate neither a divergence over the two
vocabularies' buckets nor ULD.

Randomness
----------
`sample_targets` takes one PRNG key per row. `row_keys(seed, row_indices_b)` derives it by folding
the row's GLOBAL index (its place in the whole dataset, not in the batch) into the seed key; each
token uses fold_in(row_key, position) and its j-th draw fold_in(token_key, j). The draws of a row
therefore depend on neither the batch it was built in nor the padding of the vocabulary, and the
first n draws of a larger n are the same draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.checks import static_count, static_number
from kd_jax.losses.divergences import valid_vocab_of

# The algorithm of `sample_targets`, recorded in a sampled cache's manifest: change it whenever
# the draws change, so that a cache is never finished by another sampler.
SAMPLER = "inverse-cdf-int30"
_CDF_SCALE = float(2 ** 30)  # sampling resolution: probabilities in multiples of 2^-30
_CDF_BLOCK = 256  # ids a block in the two-level inverse CDF of large vocabularies


def _valid_scaled_logits_btv(teacher_logits_btv, temperature, valid_vocab):
    """logits / T over the first valid_vocab columns, float32 (padding cut off)."""
    if teacher_logits_btv.ndim != 3:
        raise ValueError(f"teacher logits must be [batch, tokens, vocab], got shape "
                         f"{teacher_logits_btv.shape}")
    temperature = static_number("temperature", temperature, low=0.0, low_open=True)
    width = teacher_logits_btv.shape[-1]
    valid_vocab = valid_vocab_of(valid_vocab, (width,)) or width
    return teacher_logits_btv[..., :valid_vocab].astype(jnp.float32) / temperature


def _valid_log_probs_btv(teacher_logits_btv, temperature, valid_vocab):
    """log softmax(logits / T) over the first valid_vocab columns, float32 (padding cut off)."""
    return jax.nn.log_softmax(
        _valid_scaled_logits_btv(teacher_logits_btv, temperature, valid_vocab), axis=-1)


_BLOCK_REDUCERS = {"max": (jnp.max, jax.lax.max, -np.inf), "sum": (jnp.sum, jax.lax.add, 0)}


def _reduce_blocks(x, block: int, how: str):
    """The max or sum of each run of `block` entries of the last axis (the last run may be
    shorter): [..., ceil(width / block)]."""
    reduce, op, identity = _BLOCK_REDUCERS[how]
    width = x.shape[-1]
    n_blocks = -(-width // block)
    if n_blocks * block == width:
        return reduce(x.reshape(*x.shape[:-1], n_blocks, block), axis=-1)
    # A strided window: no copy of x padded (or cut) to whole blocks.
    window = (1,) * (x.ndim - 1) + (block,)
    return jax.lax.reduce_window(x, jnp.array(identity, x.dtype), op, window, window,
                                 [(0, 0)] * (x.ndim - 1) + [(0, n_blocks * block - width)])


def top_k(x, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis of floating `x`: the same values and ids in the same
    order (ties go to the lower id), computed in two stages when the axis is long.

    The last axis is cut into blocks of b entries. Every entry of the top k lies in a block
    whose maximum is at least the k-th largest value, and at most k blocks have such a
    maximum, so the top k of the whole axis are the top k of the k blocks with the largest
    maxima. Those blocks are taken in increasing order, so ties still go to the lower id. On a
    CPU, one `lax.top_k` of k = 16 to 128 over 32k to 128k columns ran 1.2 to 5 times slower
    than this (the most for small k at large widths); short axes (width < 256 k) use
    `lax.top_k` directly.
    """
    width = x.shape[-1]
    if width < 256 * k:
        return jax.lax.top_k(x, k)
    block = 32 if width >= 1024 * k else 16
    _, chosen = jax.lax.top_k(_reduce_blocks(x, block, "max"), k)
    chosen = jnp.sort(chosen, axis=-1)
    candidate_ids = (chosen[..., None] * block + jnp.arange(block)).reshape(
        *x.shape[:-1], k * block)
    inside = candidate_ids < width  # ids past the end (last block) compete as -inf, after all
    candidates = jnp.where(inside, jnp.take_along_axis(
        x, jnp.minimum(candidate_ids, width - 1), axis=-1), -jnp.inf)
    values, places = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(candidate_ids, places, axis=-1)
    return values, ids


# ---------------------------------------------------------------------------------------------
# The three modes
# ---------------------------------------------------------------------------------------------

def full_targets(teacher_logits_btv, *, temperature=1.0, valid_vocab) -> jax.Array:
    """log softmax(logits / T), float32 [batch, tokens, valid_vocab] (padded columns dropped)."""
    return _valid_log_probs_btv(teacher_logits_btv, temperature, valid_vocab)


def topk_targets(teacher_logits_btv, k, *, temperature, valid_vocab) -> dict[str, jax.Array]:
    """The k most probable ids at temperature T, their log-probabilities and the log tail mass.

    Returns {"ids": int32 [b, t, k] (most probable first), "logprobs": float32 [b, t, k],
    "tail": float32 [b, t]}, with exp(tail) + sum(exp(logprobs)) == 1. `tail` is -inf when the
    k ids hold all the mass (see the module docstring).
    """
    z_btv = _valid_scaled_logits_btv(teacher_logits_btv, temperature, valid_vocab)
    k = static_count("k", k, z_btv.shape[-1])
    # Selected on z and normalized afterwards, as log_softmax does it: log p = (z - max) -
    # log sum exp(z - max). The log-probabilities over the vocabulary are never materialized.
    max_bt1 = jnp.max(z_btv, axis=-1, keepdims=True)
    log_norm_bt1 = jnp.log(jnp.sum(jnp.exp(z_btv - max_bt1), axis=-1, keepdims=True))
    z_btk, ids_btk = top_k(z_btv, k)
    rest_btv = jnp.put_along_axis(z_btv, ids_btk, -jnp.inf, axis=-1, inplace=False)
    # logsumexp of an all -inf row is -inf (its gradient would be NaN, but targets are constants).
    tail_bt = jax.nn.logsumexp(rest_btv, axis=-1) - (max_bt1 + log_norm_bt1)[..., 0]
    return {"ids": ids_btk.astype(jnp.int32), "logprobs": (z_btk - max_bt1) - log_norm_bt1,
            "tail": tail_bt}


def at_aligned_positions(teacher_btx, teacher_index_bt) -> jax.Array:
    """The teacher's values [batch, teacher tokens, ...] at each student position's aligned
    teacher position (`teacher_index_bt` [batch, tokens], -1 where none): [batch, tokens, ...],
    zeros where none."""
    index_bt = jnp.asarray(teacher_index_bt)
    extra = (1,) * (teacher_btx.ndim - 2)
    # -1 reads position 0, then is cleared.
    values = jnp.take_along_axis(teacher_btx, jnp.maximum(index_bt, 0).reshape(
        *index_bt.shape, *extra), axis=1)
    return jnp.where((index_bt >= 0).reshape(*index_bt.shape, *extra), values, 0)


def aligned_only(targets: dict[str, jax.Array], aligned_bt) -> dict[str, jax.Array]:
    """`targets` (a mode's fields, [batch, tokens, ...]) with zeros where `aligned_bt` is False,
    and the field `aligned` (int32 0 or 1, [batch, tokens])."""
    out = {}
    for key, value in targets.items():
        keep = aligned_bt.reshape(*aligned_bt.shape, *(1,) * (value.ndim - 2))
        out[key] = jnp.where(keep, value, jnp.zeros((), value.dtype))
    out["aligned"] = aligned_bt.astype(jnp.int32)
    return out


def row_keys(seed, row_indices_b) -> jax.Array:
    """One PRNG key per row: fold_in(key(seed), global row index).

    `seed` is an int (Python or integer scalar array) or an existing key (typed, or a raw
    uint32[2] key); the result is a key array of the same kind, shape [b].
    """
    is_key = isinstance(seed, jax.Array) and (
        jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
        or (seed.dtype == jnp.uint32 and seed.shape == (2,)))
    base_key = seed if is_key else jax.random.key(seed)
    row_indices_b = jnp.asarray(row_indices_b)
    if row_indices_b.ndim != 1 or not jnp.issubdtype(row_indices_b.dtype, jnp.integer):
        raise ValueError(f"row indices must be a 1-D integer array, got {row_indices_b.dtype} "
                         f"{row_indices_b.shape}")
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, row_indices_b)


def _unique_with_counts_btn(draws_btn, empty_id: int):
    """Sorted unique ids first, then padding (id 0, count 0); n slots, deterministic."""
    sorted_btn = jnp.sort(draws_btn, axis=-1)
    # n is small (tens): an n x n comparison is cheaper than any scatter.
    counts_btn = jnp.sum(sorted_btn[..., :, None] == sorted_btn[..., None, :], axis=-1)
    is_first_btn = jnp.concatenate(
        [jnp.ones_like(sorted_btn[..., :1], dtype=bool),
         sorted_btn[..., 1:] != sorted_btn[..., :-1]], axis=-1)
    # Repeats get the key `empty_id` (> every id), so one sort puts the unique ids first.
    order_key_btn = jnp.where(is_first_btn, sorted_btn, empty_id)
    counts_btn = jnp.where(is_first_btn, counts_btn, 0)
    order_key_btn, counts_btn = jax.lax.sort((order_key_btn, counts_btn), dimension=-1,
                                             num_keys=1)
    ids_btn = jnp.where(counts_btn > 0, order_key_btn, 0)
    return ids_btn.astype(jnp.int32), counts_btn.astype(jnp.int32)


def _search(cdf, uniforms):
    """For each draw u: the first place of its running sum that exceeds u.

    `cdf` is [..., m] and `uniforms` [..., n], with the same leading axes.
    """
    lead = cdf.shape[:-1]
    found = jax.vmap(lambda row, u: jnp.searchsorted(row, u, side="right"))(
        cdf.reshape(-1, cdf.shape[-1]), uniforms.reshape(-1, uniforms.shape[-1]))
    return found.reshape(*lead, uniforms.shape[-1])


def _inverse_cdf_btn(quanta_btv, uniforms_btn, block: int = _CDF_BLOCK):
    """For each draw u in [0, sum of the quanta): the first id whose running sum exceeds u.

    Vocabularies of 16 blocks or more are searched in two levels, with the same result (the
    sums are integers): the running sum of the block sums finds each target's block, and only
    that block's running sum finds the id. The full cumulative sum over the vocabulary, the
    costly part at 32k ids and more, is never formed.
    """
    vocab = quanta_btv.shape[-1]
    if vocab < 16 * block:
        return _search(jnp.cumsum(quanta_btv, axis=-1), uniforms_btn)
    block_cdf_btc = jnp.cumsum(_reduce_blocks(quanta_btv, block, "sum"), axis=-1)
    block_btn = _search(block_cdf_btc, uniforms_btn)
    before_btn = jnp.where(block_btn > 0, jnp.take_along_axis(
        block_cdf_btc, jnp.maximum(block_btn - 1, 0), axis=-1), 0)
    # The drawn block's quanta, gathered by id; ids past the end of the vocabulary weigh 0.
    ids_btnb = block_btn[..., None] * block + jnp.arange(block)
    inner_btnb = jnp.where(ids_btnb < vocab, jnp.take_along_axis(
        quanta_btv, jnp.minimum(ids_btnb, vocab - 1).reshape(*quanta_btv.shape[:2], -1),
        axis=-1).reshape(ids_btnb.shape), 0)
    inner_btn = _search(jnp.cumsum(inner_btnb, axis=-1), (uniforms_btn - before_btn)[..., None])[
        ..., 0]
    return block_btn * block + inner_btn


def sample_targets(teacher_logits_btv, key_b, n, *, temperature, valid_vocab
                   ) -> dict[str, jax.Array]:
    """n i.i.d. draws from p_T per token, deduplicated, and the teacher entropy H(p_T).

    `key_b` holds one key per row (see `row_keys`). Returns {"ids": int32 [b, t, n],
    "counts": int32 [b, t, n], "entropy": float32 [b, t]}: the unique ids drawn, in increasing
    order, each with how many of the n draws it got; the remaining slots are padding (id 0,
    count 0); counts sum to n on every token.
    """
    # (SAMPLER names this algorithm in a cache's manifest: keep them in step.)
    log_p_btv = _valid_log_probs_btv(teacher_logits_btv, temperature, valid_vocab)
    n = static_count("n", n)
    batch, tokens, vocab = log_p_btv.shape
    if key_b.shape[:1] != (batch,):
        raise ValueError(f"need one key per row: {batch} rows, keys of shape {key_b.shape}")

    positions_t = jnp.arange(tokens, dtype=jnp.uint32)
    fold_rows = jax.vmap(jax.random.fold_in, in_axes=(0, None))  # keys [b], one position
    token_keys_bt = jax.vmap(lambda position: fold_rows(key_b, position), out_axes=1)(positions_t)

    # Inverse CDF: the cumulative sum of the probabilities, then n binary searches (n log V),
    # instead of n passes of Gumbel noise over the vocabulary (n V random numbers). The
    # probabilities are rounded to multiples of 2^-30 and summed as integers: the sums are exact
    # whatever order XLA adds in, and as fine near the end of the CDF as at its start (a float32
    # cumsum resolves 6e-8 there). An id of probability below 2^-31 is never drawn, nor one of
    # probability 0 (a flat step of the CDF).
    quanta_btv = jnp.round(jnp.exp(log_p_btv) * _CDF_SCALE).astype(jnp.int32)
    total_bt = jnp.sum(quanta_btv, axis=-1)  # <= 2^30 + V / 2: fits int32

    # Draw j of a token is uniform in [0, total) from fold_in(token key, j): the first n draws
    # are those of any larger n.
    def uniform_ints(key, total, j):
        return jax.random.randint(jax.random.fold_in(key, j), (), 0, total, dtype=jnp.int32)

    per_token = jax.vmap(jax.vmap(uniform_ints, in_axes=(0, 0, None)), in_axes=(0, 0, None))
    uniforms_btn = jnp.moveaxis(jax.vmap(lambda j: per_token(token_keys_bt, total_bt, j))(
        jnp.arange(n, dtype=jnp.uint32)), 0, -1)
    draws_btn = jnp.minimum(_inverse_cdf_btn(quanta_btv, uniforms_btn), vocab - 1)
    ids_btn, counts_btn = _unique_with_counts_btn(draws_btn, vocab)

    p_btv = jnp.exp(log_p_btv)
    entropy_bt = -jnp.sum(jnp.where(p_btv != 0.0, p_btv * log_p_btv, 0.0), axis=-1)
    return {"ids": ids_btn, "counts": counts_btn, "entropy": entropy_bt}
