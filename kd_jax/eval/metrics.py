"""Evaluation statistics: per-batch sums on device, one division on the host at the end.

`token_stats` is pure and jittable. It returns SUMS over the valid (mask-set) tokens, never means,
so the dicts of several eval batches (and devices) are added together key by key and `summarize`
divides once by the total token count. The per-token losses come from `kd_jax.losses`, so the
numbers reported here are the very functions the student is trained on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses.divergences import cross_entropy_bt, divergence_bt, valid_vocab_of

ECE_BINS = 15  # expected calibration error: equal-width confidence bins on [0, 1]


def _valid_columns_btv(logits_btv, valid_vocab) -> jax.Array:
    """float32 logits without the embedding padding past the tokenizer's vocabulary."""
    return logits_btv[..., :valid_vocab].astype(jnp.float32)


def token_stats(logits_btv, labels_bt, mask_bt, *, valid_vocab=None, teacher_logits_btv=None,
                n_bins=ECE_BINS) -> dict[str, jax.Array]:
    """Sums over the valid tokens of one batch (all float32).

    Keys: "tokens", "nll_sum" (natural-log cross-entropy), "correct_sum" (argmax == label), the
    calibration histograms "ece_count", "ece_conf_sum", "ece_correct_sum" (each [n_bins]; a token
    with max-probability c falls in bin min(floor(c * n_bins), n_bins - 1)), and, with a teacher,
    "agree_sum" (student argmax == teacher argmax) and "kl_sum" (KL(teacher || student) at T = 1).
    """
    widths = (logits_btv.shape[-1],) if teacher_logits_btv is None else (
        logits_btv.shape[-1], teacher_logits_btv.shape[-1])
    valid_vocab = valid_vocab_of(valid_vocab, widths)
    mask_bt = mask_bt.astype(bool)
    logits_btv = _valid_columns_btv(logits_btv, valid_vocab)

    nll_bt = cross_entropy_bt(logits_btv, labels_bt)
    prediction_bt = jnp.argmax(logits_btv, axis=-1)
    confidence_bt = jnp.exp(jnp.max(logits_btv, axis=-1) - jax.nn.logsumexp(logits_btv, axis=-1))
    correct_bt = (prediction_bt == labels_bt).astype(jnp.float32)

    def masked_sum(values_bt):
        # where, not multiply: a NaN at a padded position must not reach the sum.
        return jnp.sum(jnp.where(mask_bt, values_bt, 0.0), dtype=jnp.float32)

    # A padded position may hold NaN logits: give it a harmless bin; its weight is 0 anyway.
    safe_confidence_bt = jnp.where(mask_bt, confidence_bt, 0.0)
    bin_bt = jnp.clip(jnp.floor(safe_confidence_bt * n_bins).astype(jnp.int32), 0, n_bins - 1)
    empty_bins = jnp.zeros((n_bins,), jnp.float32)

    def binned_sum(values_bt):
        return empty_bins.at[bin_bt].add(jnp.where(mask_bt, values_bt, 0.0))

    stats = {
        "tokens": jnp.sum(mask_bt, dtype=jnp.float32),
        "nll_sum": masked_sum(nll_bt),
        "correct_sum": masked_sum(correct_bt),
        "ece_count": binned_sum(jnp.ones_like(confidence_bt)),
        "ece_conf_sum": binned_sum(safe_confidence_bt),
        "ece_correct_sum": binned_sum(correct_bt),
    }
    if teacher_logits_btv is not None:
        teacher_btv = _valid_columns_btv(teacher_logits_btv, valid_vocab)
        agree_bt = (prediction_bt == jnp.argmax(teacher_btv, axis=-1)).astype(jnp.float32)
        stats["agree_sum"] = masked_sum(agree_bt)
        stats["kl_sum"] = masked_sum(
            divergence_bt("forward_kl", logits_btv, teacher_btv, temperature=1.0))
    return stats


def summarize(sums: dict[str, np.ndarray], byte_count: float | None = None) -> dict[str, float]:
    """Host-side means from accumulated `token_stats` sums (call after summing all batches)."""
    tokens = float(np.asarray(sums["tokens"]))
    per_token = 1.0 / max(tokens, 1.0)
    nll_sum = float(np.asarray(sums["nll_sum"], np.float64))
    ece_gap = np.abs(np.asarray(sums["ece_conf_sum"], np.float64)
                     - np.asarray(sums["ece_correct_sum"], np.float64))
    summary = {
        "tokens": tokens,
        "nll": nll_sum * per_token,
        "bits_per_token": nll_sum * per_token / math.log(2.0),
        "accuracy": float(np.asarray(sums["correct_sum"], np.float64)) * per_token,
        "ece": float(np.sum(ece_gap)) * per_token,
    }
    if byte_count is not None:
        if not byte_count > 0:
            raise ValueError(f"byte_count must be > 0, got {byte_count}")
        summary["bits_per_byte"] = nll_sum / math.log(2.0) / float(byte_count)
    if "agree_sum" in sums:
        summary["agreement"] = float(np.asarray(sums["agree_sum"], np.float64)) * per_token
    if "kl_sum" in sums:
        summary["kl"] = float(np.asarray(sums["kl_sum"], np.float64)) * per_token
    return summary
