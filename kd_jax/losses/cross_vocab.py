"""Divergences between a teacher and a student whose vocabularies differ.

Three ways to compare next-token distributions over different vocabularies:

* `mapped_divergence_bt`: both distributions gathered into the same buckets, then any of the
  divergences between distributions (`distribution_divergence_bt`, T^2-scaled like the others).
  A bucket is a student token that some teacher token maps to, and holds every token of either
  vocabulary whose text starts with it and with no longer bucket (`kd_jax.align.vocabulary`):
  the teacher's mass on "2024" and the student's on "2" meet in the bucket "2" where the
  student splits digits. Tokens of no bucket (special tokens) are left out and both sides
  renormalized over the buckets. As for top-k targets, every divergence here is an
  f-divergence, so by the data-processing inequality the bucketed value is at most the value
  the two distributions would have over one vocabulary; with one tokenizer on both sides the
  buckets are the tokens and this is `divergence_bt` exactly. What it gives up is what a bucket
  holds inside: "2024" and "2" are one event for it.
* `uld_bt`: ULD, Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030), the sum of
  |p_(i) - q_(i)| over the two distributions' probabilities sorted in decreasing order (the
  shorter padded with zeros): the Wasserstein-1 distance between them with every pair of
  tokens one apart, which needs no map at all. It compares shapes, not tokens: a student
  certain of the wrong token is as close as one certain of the right one. It is a distance
  between probabilities, between 0 and 2, and not scaled by T^2.
* `hybrid_divergence_bt`: the divergence where the two vocabularies agree and ULD where they do
  not, in the spirit of the GOLD trainer of Hugging Face TRL. A bucket is matched when it has
  members on both sides and every one of them spells the bucket's own text (the teacher's
  " the" and the student's " the", and no longer token of either side:
  `kd_jax.align.vocabulary.matched_buckets`): there both tokenizers predict one event. The value
  is

      T^2 D(p_M, p_rest || q_M, q_rest)  +  sum_i |p~_(i) - q~_(i)|

  The first term is `mapped`'s with the unmatched buckets merged into one: p and q gathered into
  the buckets as there (tokens of no bucket left out, both renormalized over the buckets), p_M
  the matched buckets' probabilities, p_rest the mass of all the others, D `loss.divergence`.
  The second is ULD between p~ and q~, the probabilities of each side's tokens outside the
  matched buckets (in unmatched buckets, and in none: special tokens, tokens whose first byte
  the other side lacks), as they are, neither renormalized nor mapped, sorted in decreasing
  order (the shorter padded with zeros); it is at most the two sides' mass outside the matched
  buckets. Every token in a matched bucket (one tokenizer on both sides) leaves nothing outside:
  the value is `mapped`'s exactly. No bucket matched leaves one rest bucket, a divergence of 0,
  and ULD between the whole distributions: `uld_bt`'s. What it gives up: inside the rest, which
  token carries which probability (ULD's blindness, confined to the mass outside the matched
  buckets), where `mapped` still compares prefixes ("2024" with "2"); the special tokens are
  compared by shape, not as events; the value is not bounded by the divergence over one
  vocabulary as `mapped`'s is, and its ULD term is not scaled by T^2, so the balance of the two
  terms moves with T.

All take the teacher's logits at the student's positions (the alignment of the two
tokenizations picks them, `kd_jax.align.positions`) and compute in float32 from logits of any
dtype; widths past the valid vocabularies (padded embedding rows) have probability 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kd_jax.losses.divergences import (
    check_leading_shapes,
    distribution_divergence_bt,
    log_sum_exp_bt,
    student_log_probs_btv,
    validate_divergence_args,
)
from kd_jax.losses.soft_targets import vocabulary_logits

METHODS = ("mapped", "uld", "hybrid")


# eq=False: compared (and hashed) by identity, as a static field of a pytree must be cheaply.
@dataclass(frozen=True, eq=False)
class Buckets:
    """The bucket of each teacher id [teacher width] and of each student id [student width]
    (int32, -1: in none), and how many there are: what `kd_jax.align.vocabulary.buckets`
    computes, fitted to the two models' logits; and which buckets are matched (bool [count],
    `kd_jax.align.vocabulary.matched_buckets`; None: not known, and `hybrid` refused). numpy
    arrays, constants of the compiled step."""

    teacher_w: np.ndarray
    student_v: np.ndarray
    count: int
    drops: bool  # whether a token of a vocabulary falls in no bucket: then both renormalized
    matched: np.ndarray | None = None

    @classmethod
    def of(cls, teacher_bucket, student_bucket, count: int, teacher_width: int,
           student_width: int, matched=None) -> Buckets:
        """From the tokenizers' buckets, extended with -1 over padded logit columns."""
        def fit(bucket, width, side):
            bucket = np.asarray(bucket, dtype=np.int32)
            if len(bucket) > width:
                raise ValueError(f"the buckets cover {len(bucket)} {side} ids, more than the "
                                 f"{side}'s {width} logits")
            if bucket.size and bucket.max() >= count:
                raise ValueError(f"a {side} bucket is {bucket.max()}, past the {count} buckets")
            return np.concatenate([bucket, np.full(width - len(bucket), -1, np.int32)])
        drops = bool((np.asarray(teacher_bucket) < 0).any()
                     or (np.asarray(student_bucket) < 0).any())
        if matched is not None:
            matched = np.asarray(matched, dtype=bool)
            if matched.shape != (count,):
                raise ValueError(f"matched has shape {matched.shape}, not one flag for each of "
                                 f"the {count} buckets")
        return cls(fit(teacher_bucket, teacher_width, "teacher"),
                   fit(student_bucket, student_width, "student"), int(count), drops, matched)

    @classmethod
    def identity(cls, vocab: int, width: int) -> Buckets:
        """One tokenizer on both sides: each token its own bucket, every bucket matched."""
        return cls.of(np.arange(vocab), np.arange(vocab), vocab, width, width,
                      matched=np.ones(vocab, bool))


def bucket_log_probs(log_x_btv, bucket_v: np.ndarray, count: int):
    """log of the probability in each bucket [b, t, count], a logsumexp over its members
    (computed shifted by their largest, which is held constant for the gradient)."""
    lead = log_x_btv.shape[:-1]
    segments = jnp.asarray(np.where(bucket_v >= 0, bucket_v, count))  # count: the left out
    flat_vn = log_x_btv.reshape(-1, log_x_btv.shape[-1]).T
    top_cn = jax.ops.segment_max(flat_vn, segments, num_segments=count + 1)
    top_cn = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top_cn), top_cn, 0.0))
    total_cn = jax.ops.segment_sum(jnp.exp(flat_vn - top_cn[segments]), segments,
                                   num_segments=count + 1)
    # A bucket whose members all have probability 0: -inf, with a zero gradient (log(1) there).
    has_cn = total_cn > 0
    log_cn = jnp.where(has_cn, jnp.log(jnp.where(has_cn, total_cn, 1.0)) + top_cn, -jnp.inf)
    return log_cn[:count].T.reshape(*lead, count)


def _teacher_log_probs_btw(teacher_logits_btw, temperature: float, teacher_valid):
    return jax.lax.stop_gradient(
        student_log_probs_btv(teacher_logits_btw, temperature, teacher_valid))


def _gathered(log_x_btv, bucket_v: np.ndarray, count: int, drops: bool):
    """log of the probability in each bucket [b, t, count], renormalized over the buckets where
    some token falls in none (what falls in no bucket is left out of the distribution)."""
    log_btc = bucket_log_probs(log_x_btv, bucket_v, count)
    return log_btc - log_sum_exp_bt(log_btc)[..., None] if drops else log_btc


def _check_bucket_args(kind, student_logits_btv, teacher_logits_btw, buckets: Buckets):
    if kind == "mse":
        raise ValueError("divergence 'mse' compares logits column by column and is not defined "
                         "across two vocabularies; use a divergence between distributions")
    check_leading_shapes(student=student_logits_btv.shape[:-1],
                         teacher=teacher_logits_btw.shape[:-1])
    for side, bucket, logits in (("student", buckets.student_v, student_logits_btv),
                                 ("teacher", buckets.teacher_w, teacher_logits_btw)):
        if len(bucket) != logits.shape[-1]:
            raise ValueError(f"the buckets were made for {len(bucket)} {side} logits, not "
                             f"{logits.shape[-1]}")


def mapped_divergence_bt(kind: str, student_logits_btv, teacher_logits_btw, buckets: Buckets, *,
                         temperature, beta=0.5, skew=0.1, student_valid=None,
                         teacher_valid=None) -> jax.Array:
    """Per-token divergence between the two distributions gathered into the buckets (the
    module docstring), T^2-scaled, float32 [batch, tokens]. `kind` as in `divergence_bt` (not
    `mse`, which compares logits column by column)."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    _check_bucket_args(kind, student_logits_btv, teacher_logits_btw, buckets)
    log_q_btc = _gathered(student_log_probs_btv(student_logits_btv, temperature, student_valid),
                          buckets.student_v, buckets.count, buckets.drops)
    log_p_btc = _gathered(_teacher_log_probs_btw(teacher_logits_btw, temperature, teacher_valid),
                          buckets.teacher_w, buckets.count, buckets.drops)
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)


def _sorted_distance_bt(p_btn, q_btm):
    """sum_i |p_(i) - q_(i)| over the last axes sorted in decreasing order, the narrower with
    zeros appended (a sort's gradient is its permutation's)."""
    width = max(p_btn.shape[-1], q_btm.shape[-1])

    def sorted_padded(x):
        return jnp.pad(-jnp.sort(-x, axis=-1),
                       [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    return jnp.sum(jnp.abs(sorted_padded(p_btn) - sorted_padded(q_btm)), axis=-1)


def uld_bt(student_logits_btv, teacher_logits_btw, *, temperature, student_valid=None,
           teacher_valid=None) -> jax.Array:
    """ULD per token (the module docstring), float32 [batch, tokens]."""
    temperature, _, _ = validate_divergence_args("forward_kl", temperature, 0.5, 0.1)
    check_leading_shapes(student=student_logits_btv.shape[:-1],
                         teacher=teacher_logits_btw.shape[:-1])
    q_btv = jnp.exp(student_log_probs_btv(student_logits_btv, temperature, student_valid))
    p_btw = jnp.exp(_teacher_log_probs_btw(teacher_logits_btw, temperature, teacher_valid))
    # Padding columns are zeros already, and sort to the end.
    return _sorted_distance_bt(p_btw, q_btv)


def _hybrid_parts(buckets: Buckets, teacher_columns: int, student_columns: int):
    """The coarse buckets of `hybrid` (the matched buckets, then one rest bucket if any is
    unmatched): (the teacher's [width], the student's [width], how many), and the ids below
    each side's `columns` outside the matched buckets (the teacher's, the student's). numpy,
    read when the step is traced."""
    matched = buckets.matched
    n_matched = int(matched.sum())
    coarse = np.where(matched, np.cumsum(matched) - 1, n_matched).astype(np.int32)
    # Index -1 (a token of no bucket) reads the value appended last.
    coarse, outside = np.append(coarse, -1), np.append(~matched, True)
    return (coarse[buckets.teacher_w], coarse[buckets.student_v],
            n_matched + int(not matched.all()),
            np.flatnonzero(outside[buckets.teacher_w][:teacher_columns]),
            np.flatnonzero(outside[buckets.student_v][:student_columns]))


def hybrid_divergence_bt(kind: str, student_logits_btv, teacher_logits_btw, buckets: Buckets,
                         *, temperature, beta=0.5, skew=0.1, student_valid=None,
                         teacher_valid=None) -> jax.Array:
    """Per-token divergence over the matched buckets and a rest bucket, T^2-scaled, plus ULD
    over the tokens outside the matched buckets (the module docstring), float32 [batch,
    tokens]."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    _check_bucket_args(kind, student_logits_btv, teacher_logits_btw, buckets)
    if buckets.matched is None:
        raise ValueError("the hybrid divergence needs to know which buckets are matched: "
                         "Buckets.of(..., matched=kd_jax.align.vocabulary.matched_buckets(...))")
    teacher_coarse_w, student_coarse_v, count, teacher_outside, student_outside = (
        _hybrid_parts(buckets, teacher_valid or len(buckets.teacher_w),
                      student_valid or len(buckets.student_v)))
    log_q_btv = student_log_probs_btv(student_logits_btv, temperature, student_valid)
    log_p_btw = _teacher_log_probs_btw(teacher_logits_btw, temperature, teacher_valid)
    log_q_btk = _gathered(log_q_btv, student_coarse_v, count, buckets.drops)
    log_p_btk = _gathered(log_p_btw, teacher_coarse_w, count, buckets.drops)
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    value_bt = scale * distribution_divergence_bt(kind, log_p_btk, log_q_btk, beta, skew)
    if len(teacher_outside) == len(student_outside) == 0:
        return value_bt  # every token in a matched bucket: nothing for ULD
    return value_bt + _sorted_distance_bt(jnp.exp(log_p_btw[..., teacher_outside]),
                                          jnp.exp(log_q_btv[..., student_outside]))


@struct.dataclass
class CrossVocab:
    """Soft targets from a teacher with another vocabulary (`kd_jax.losses.soft_targets` has
    the kinds): its final hidden states taken at each student position's aligned teacher
    position [batch, tokens, d_teacher], its output head [teacher vocab, d_teacher], and where a
    student position is aligned [batch, tokens]. The divergence is `method`'s ("mapped":
    `mapped_divergence_bt` with the loss's divergence; "uld": `uld_bt`; "hybrid":
    `hybrid_divergence_bt` with the loss's divergence), 0 where unaligned: an unaligned
    position is trained on its hard label alone."""

    hidden: jax.Array
    head: jax.Array
    aligned: jax.Array
    buckets: Buckets = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="mapped")
    teacher_valid: int | None = struct.field(pytree_node=False, default=None)

    @property
    def width(self) -> int:
        """The widest [tokens, width] arrays per position, for the chunk's size."""
        return self.head.shape[0]

    def refusal(self, divergence: str) -> str | None:
        if divergence == "mse" and self.method != "uld":
            return ("divergence 'mse' compares logits column by column and is not defined "
                    "across two vocabularies; use a divergence between distributions")
        return None

    def where(self, mask_bt) -> CrossVocab:
        """These targets where `mask_bt`; elsewhere unaligned, with zero hidden states."""
        return self.replace(hidden=jnp.where(mask_bt[..., None], self.hidden, 0),
                            aligned=self.aligned & mask_bt)

    def per_token(self):
        """What `kd_jax.losses.chunked` cuts into chunks; the head is shared by all."""
        return self.hidden, self.aligned

    def with_per_token(self, per_token) -> CrossVocab:
        hidden, aligned = per_token
        return self.replace(hidden=hidden, aligned=aligned)

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        teacher_logits_btw = vocabulary_logits(self.hidden, self.head)
        if self.method == "uld":
            value_bt = uld_bt(student_logits_btv, teacher_logits_btw, temperature=temperature,
                              student_valid=valid_vocab, teacher_valid=self.teacher_valid)
        else:
            divergence = (hybrid_divergence_bt if self.method == "hybrid"
                          else mapped_divergence_bt)
            value_bt = divergence(kind, student_logits_btv, teacher_logits_btw, self.buckets,
                                  temperature=temperature, beta=beta, skew=skew,
                                  student_valid=valid_vocab, teacher_valid=self.teacher_valid)
        return jnp.where(self.aligned, value_bt, 0.0)
