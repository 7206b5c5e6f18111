"""Divergences between a teacher and a student whose vocabularies differ.

Two ways to compare next-token distributions over different vocabularies:

* `mapped_divergence_bt`: both distributions coarsened onto the same buckets, then any of the
  divergences between distributions (`distribution_divergence_bt`, T^2-scaled like the others).
  The buckets are the student's ids that some teacher token maps to (a teacher token maps to the
  student token that spells the same text: `kd_jax.align.vocabulary`), and one bucket for the
  rest: the teacher's tokens that map to nothing and the student's that nothing maps to. It is
  the top-k loss's construction (k buckets and a tail) with the map's buckets; as there, every
  divergence is an f-divergence, so by the data-processing inequality the coarsened value is at
  most the value over the full distributions, and equal to it when the map is one tokenizer's
  identity (then this is `divergence_bt` exactly). What it gives up is the rest bucket's inside:
  a teacher that puts its mass on "12" where the student can only say "1" is matched as mass on
  the rest, not as mass on "1".
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
    """The map as the loss uses it, made once per tokenizer pair (`from_student_ids`).

    `teacher_ids_rs[r, s]`: the r-th teacher id that maps to student id s, or -1 (several
    teacher ids can spell one student token: a byte-fallback piece and the ordinary token for
    the same byte); `image_s`: student ids some teacher id maps to; `mapped_w`: teacher ids that
    map. numpy arrays, constants of the compiled step."""

    teacher_ids_rs: np.ndarray
    image_s: np.ndarray
    mapped_w: np.ndarray

    @classmethod
    def from_student_ids(cls, student_id_w: np.ndarray, student_width: int) -> Buckets:
        """From `student_id_w[t]`, the student id teacher id t maps to or -1 (a map from
        `kd_jax.align.vocabulary`), for student logits `student_width` wide."""
        student_id_w = np.asarray(student_id_w, dtype=np.int64)
        if student_id_w.size and student_id_w.max() >= student_width:
            raise ValueError(f"the vocabulary map names student id {student_id_w.max()}, past "
                             f"the student's {student_width} logits")
        mapped = np.flatnonzero(student_id_w >= 0)
        targets = student_id_w[mapped]
        order = np.argsort(targets, kind="stable")
        mapped, targets = mapped[order], targets[order]
        # The rank of each teacher id among those mapping to its student id.
        first = np.searchsorted(targets, targets, side="left")
        rank = np.arange(len(targets)) - first
        ranks = int(rank.max()) + 1 if len(rank) else 1
        teacher_ids_rs = np.full((ranks, student_width), -1, dtype=np.int32)
        teacher_ids_rs[rank, targets] = mapped
        return cls(teacher_ids_rs, teacher_ids_rs[0] >= 0, student_id_w >= 0)


def _gather_log_probs(log_p_btw, teacher_ids_s):
    """log p at the given teacher ids along the last axis; -inf where the id is -1."""
    present_s = teacher_ids_s >= 0
    taken = jnp.take(log_p_btw, jnp.asarray(np.maximum(teacher_ids_s, 0)), axis=-1)
    return jnp.where(jnp.asarray(present_s), taken, -jnp.inf)


def _teacher_log_probs_btw(teacher_logits_btw, temperature: float, teacher_valid):
    return jax.lax.stop_gradient(
        student_log_probs_btv(teacher_logits_btw, temperature, teacher_valid))


def mapped_divergence_bt(kind: str, student_logits_btv, teacher_logits_btw, buckets: Buckets, *,
                         temperature, beta=0.5, skew=0.1, student_valid=None,
                         teacher_valid=None) -> jax.Array:
    """Per-token divergence between the two distributions coarsened onto the map's buckets
    (the module docstring), T^2-scaled, float32 [batch, tokens]. `kind` as in `divergence_bt`
    (not `mse`, which compares logits column by column)."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    if kind == "mse":
        raise ValueError("divergence 'mse' compares logits column by column and is not defined "
                         "across two vocabularies; use a divergence between distributions")
    check_leading_shapes(student=student_logits_btv.shape[:-1],
                         teacher=teacher_logits_btw.shape[:-1])
    if buckets.teacher_ids_rs.shape[1] != student_logits_btv.shape[-1]:
        raise ValueError(f"the buckets were made for {buckets.teacher_ids_rs.shape[1]} student "
                         f"logits, not {student_logits_btv.shape[-1]}")
    if buckets.mapped_w.shape[0] > teacher_logits_btw.shape[-1]:
        raise ValueError(f"the vocabulary map covers {buckets.mapped_w.shape[0]} teacher ids, "
                         f"more than the teacher's {teacher_logits_btw.shape[-1]} logits")

    log_q_btv = student_log_probs_btv(student_logits_btv, temperature, student_valid)
    log_p_btw = _teacher_log_probs_btw(teacher_logits_btw, temperature, teacher_valid)

    # The teacher's mass on each student id's bucket: one gather a rank, summed in log space.
    log_p_btv = _gather_log_probs(log_p_btw, buckets.teacher_ids_rs[0])
    for teacher_ids_s in buckets.teacher_ids_rs[1:]:
        more_btv = _gather_log_probs(log_p_btw, teacher_ids_s)
        log_p_btv = log_sum_exp_bt(jnp.stack([log_p_btv, more_btv], axis=-1))
    # The rest: teacher ids that map to nothing (padding columns are -inf already) ...
    width_w = teacher_logits_btw.shape[-1]
    mapped_w = np.zeros(width_w, dtype=bool)
    mapped_w[:len(buckets.mapped_w)] = buckets.mapped_w
    log_p_rest_bt = log_sum_exp_bt(jnp.where(jnp.asarray(mapped_w), -jnp.inf, log_p_btw))
    # ... and student ids nothing maps to, whose slots are then empty on both sides.
    image_v = jnp.asarray(buckets.image_s)
    log_q_rest_bt = log_sum_exp_bt(jnp.where(image_v, -jnp.inf, log_q_btv))
    log_q_btv = jnp.where(image_v, log_q_btv, -jnp.inf)

    log_p_btc = jnp.concatenate([log_p_btv, log_p_rest_bt[..., None]], axis=-1)
    log_q_btc = jnp.concatenate([log_q_btv, log_q_rest_bt[..., None]], axis=-1)
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
