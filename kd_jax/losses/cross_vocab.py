"""Divergences between a teacher and a student whose vocabularies differ.

Two ways to compare next-token distributions over different vocabularies:

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

Both take the teacher's logits at the student's positions (the alignment of the two
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

METHODS = ("mapped", "uld")


# eq=False: compared (and hashed) by identity, as a static field of a pytree must be cheaply.
@dataclass(frozen=True, eq=False)
class Buckets:
    """The bucket of each teacher id [teacher width] and of each student id [student width]
    (int32, -1: in none), and how many there are: what `kd_jax.align.vocabulary.buckets`
    computes, fitted to the two models' logits. numpy arrays, constants of the compiled step."""

    teacher_w: np.ndarray
    student_v: np.ndarray
    count: int
    drops: bool  # whether a token of a vocabulary falls in no bucket: then both renormalized

    @classmethod
    def of(cls, teacher_bucket, student_bucket, count: int, teacher_width: int,
           student_width: int) -> Buckets:
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
        return cls(fit(teacher_bucket, teacher_width, "teacher"),
                   fit(student_bucket, student_width, "student"), int(count), drops)

    @classmethod
    def identity(cls, vocab: int, width: int) -> Buckets:
        """One tokenizer on both sides: each token its own bucket."""
        return cls.of(np.arange(vocab), np.arange(vocab), vocab, width, width)


def _bucket_log_probs(log_x_btv, bucket_v: np.ndarray, count: int):
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


def mapped_divergence_bt(kind: str, student_logits_btv, teacher_logits_btw, buckets: Buckets, *,
                         temperature, beta=0.5, skew=0.1, student_valid=None,
                         teacher_valid=None) -> jax.Array:
    """Per-token divergence between the two distributions gathered into the buckets (the
    module docstring), T^2-scaled, float32 [batch, tokens]. `kind` as in `divergence_bt` (not
    `mse`, which compares logits column by column)."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
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

    log_q_btc = _bucket_log_probs(student_log_probs_btv(student_logits_btv, temperature,
                                                        student_valid),
                                  buckets.student_v, buckets.count)
    log_p_btc = _bucket_log_probs(_teacher_log_probs_btw(teacher_logits_btw, temperature,
                                                         teacher_valid),
                                  buckets.teacher_w, buckets.count)
    if buckets.drops:  # what falls in no bucket is left out of both distributions
        log_q_btc = log_q_btc - log_sum_exp_bt(log_q_btc)[..., None]
        log_p_btc = log_p_btc - log_sum_exp_bt(log_p_btc)[..., None]
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)


def uld_bt(student_logits_btv, teacher_logits_btw, *, temperature, student_valid=None,
           teacher_valid=None) -> jax.Array:
    """ULD per token (the module docstring), float32 [batch, tokens]."""
    temperature, _, _ = validate_divergence_args("forward_kl", temperature, 0.5, 0.1)
    check_leading_shapes(student=student_logits_btv.shape[:-1],
                         teacher=teacher_logits_btw.shape[:-1])
    q_btv = jnp.exp(student_log_probs_btv(student_logits_btv, temperature, student_valid))
    p_btw = jnp.exp(_teacher_log_probs_btw(teacher_logits_btw, temperature, teacher_valid))
    width = max(q_btv.shape[-1], p_btw.shape[-1])
    # Sorted in decreasing order (a sort's gradient is its permutation's), zeros appended to
    # the narrower: padding columns are zeros already and sort to the end.
    q_btv = jnp.pad(-jnp.sort(-q_btv, axis=-1), [(0, 0)] * (q_btv.ndim - 1)
                    + [(0, width - q_btv.shape[-1])])
    p_btw = jnp.pad(-jnp.sort(-p_btw, axis=-1), [(0, 0)] * (p_btw.ndim - 1)
                    + [(0, width - p_btw.shape[-1])])
    return jnp.sum(jnp.abs(p_btw - q_btv), axis=-1)


@struct.dataclass
class CrossVocab:
    """Soft targets from a teacher with another vocabulary (`kd_jax.losses.soft_targets` has
    the kinds): its final hidden states taken at each student position's aligned teacher
    position [batch, tokens, d_teacher], its output head [teacher vocab, d_teacher], and where a
    student position is aligned [batch, tokens]. The divergence is `method`'s ("mapped":
    `mapped_divergence_bt` with the loss's divergence; "uld": `uld_bt`), 0 where unaligned: an
    unaligned position is trained on its hard label alone."""

    hidden: jax.Array
    head: jax.Array
    aligned: jax.Array
    buckets: Buckets = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="mapped")
    teacher_valid: int | None = struct.field(pytree_node=False, default=None)

    def refusal(self, divergence: str) -> str | None:
        if divergence == "mse" and self.method == "mapped":
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
            value_bt = mapped_divergence_bt(
                kind, student_logits_btv, teacher_logits_btw, self.buckets,
                temperature=temperature, beta=beta, skew=skew, student_valid=valid_vocab,
                teacher_valid=self.teacher_valid)
        return jnp.where(self.aligned, value_bt, 0.0)
