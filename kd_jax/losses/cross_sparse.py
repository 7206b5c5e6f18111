"""Cached targets of a teacher with another vocabulary, against the student's distribution.

A cache of such a teacher (`kd_jax.teacher.cached`) holds the teacher's targets at the teacher's
aligned positions, gathered onto the student's positions: for each student position, what the
teacher predicted at the teacher position that has read exactly the same text
(`kd_jax.align.positions`), in the teacher's vocabulary, and whether there is one (`aligned`).
An unaligned position is trained on its hard label alone. Two kinds, compared with the student
as `loss.cross_vocab` says (`kd_jax.losses.cross_vocab`):

* `CrossDense`  the teacher's log-probabilities over its whole vocabulary (a full cache). They
                serve as its logits (log-softmax only shifts logits by a constant per token), so
                `mapped`, `uld` and `hybrid` are the online teacher's loss
                (`mapped_divergence_bt`, `uld_bt`, `hybrid_divergence_bt`) exactly, up to
                float32 rounding, at any temperature.
* `CrossTopK`   the teacher's k most probable ids, their log-probabilities and `tail`, the log
                of the mass outside them (a top-k cache), at the temperature it was built at;
                `mapped` and `uld`, approximated as below (`hybrid` is refused: its ULD term
                sorts the teacher's tokens of unmatched buckets, which the tail pools).

The top-k approximation. `mapped`: the teacher's k probabilities are gathered into their
buckets, and the tail is one more bucket, "rest"; the student's buckets that hold one of the k
ids are compared with them, and its mass in every other bucket is its "rest". Both are
renormalized over these (at most k + 1) entries; a cached id of no bucket (a special token) is
left out, as the whole-vocabulary loss leaves it out. What it gives up: a bucket of the k holds,
on the teacher's side, only its top-k members' mass (its members in the tail are in "rest"), on
the student's its whole mass, so the teacher's entries are moved from the bucketed distribution
by at most the tail mass exp(tail) in total variation; and with the rest pooled, the divergence
is that of a coarsening (at most the whole-vocabulary value, by data processing, as for
same-vocabulary top-k targets, `kd_jax.losses.soft_targets.topk_divergence_bt`). With one
vocabulary on both sides (each token its own bucket) this is `topk_divergence_bt` exactly; with
k covering the teacher's vocabulary it is `mapped_divergence_bt` exactly. `uld`: the teacher's k
probabilities, sorted, against the student's k largest, and the two rests (the teacher's tail,
the student's mass outside its k largest) as one more pair: |P_rest - Q_rest| is at most the
sum of |p_(i) - q_(i)| over the ranks past k, so this is at most ULD, and ULD exactly when k
covers the teacher's vocabulary.

Every array is per token, so `kd_jax.losses.chunked` cuts these targets as a pytree (the buckets
are static). Pure: jax, flax, numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kd_jax.losses.cross_vocab import (
    Buckets,
    bucket_log_probs,
    hybrid_divergence_bt,
    mapped_divergence_bt,
    uld_bt,
)
from kd_jax.losses.divergences import (
    check_ids,
    check_leading_shapes,
    distribution_divergence_bt,
    log_sum_exp_bt,
    student_log_probs_btv,
    validate_divergence_args,
)
from kd_jax.losses.soft_targets import Dense, TopK


def _refusal(method: str, divergence: str, methods: tuple[str, ...], targets: str
             ) -> str | None:
    """Why `targets` compared by `method` (loss.cross_vocab) cannot serve `divergence` (or
    None), worded to follow "loss."."""
    if method not in methods:
        return (f"cross_vocab {method!r} is not available from {targets} of a teacher with "
                f"another tokenizer; use {' or '.join(methods)}, or the teacher online")
    if divergence == "mse" and method != "uld":
        return ("divergence 'mse' compares logits column by column and is not defined across "
                "two vocabularies; use a divergence between distributions")
    return None


@struct.dataclass
class CrossDense:
    """The teacher's log-probabilities over its vocabulary [b, t, teacher vocab] at each student
    position, and whether the position is aligned [b, t]."""

    logprobs: jax.Array
    aligned: jax.Array
    buckets: Buckets = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="mapped")

    METHODS = ("mapped", "uld", "hybrid")  # the values of loss.cross_vocab these serve

    @classmethod
    def refusal_of(cls, method: str, divergence: str) -> str | None:
        return _refusal(method, divergence, cls.METHODS, "full targets")

    def refusal(self, divergence: str) -> str | None:
        return self.refusal_of(self.method, divergence)

    def where(self, mask_bt) -> CrossDense:
        """These targets where `mask_bt`; elsewhere unaligned, with uniform log-probabilities."""
        return self.replace(logprobs=Dense(self.logprobs).where(mask_bt).logits,
                            aligned=self.aligned & mask_bt)

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        # An unaligned position's stored zeros are replaced before any arithmetic (uniform):
        # its value is dropped below, and its gradient must be finite to be dropped.
        teacher_btw = Dense(self.logprobs).where(self.aligned).logits
        if self.method == "uld":
            value_bt = uld_bt(student_logits_btv, teacher_btw, temperature=temperature,
                              student_valid=valid_vocab)
        else:
            divergence = (hybrid_divergence_bt if self.method == "hybrid"
                          else mapped_divergence_bt)
            value_bt = divergence(kind, student_logits_btv, teacher_btw, self.buckets,
                                  temperature=temperature, beta=beta, skew=skew,
                                  student_valid=valid_vocab)
        return jnp.where(self.aligned, value_bt, 0.0)


@struct.dataclass
class CrossTopK:
    """The teacher's k most probable ids of its vocabulary [b, t, k], their log-probabilities
    [b, t, k] and the log of the mass outside them [b, t] at each student position, and whether
    the position is aligned [b, t]; at the temperature the cache was built at."""

    ids: jax.Array
    logprobs: jax.Array
    tail: jax.Array
    aligned: jax.Array
    buckets: Buckets = struct.field(pytree_node=False)
    method: str = struct.field(pytree_node=False, default="mapped")

    METHODS = ("mapped", "uld")  # the values of loss.cross_vocab these serve

    @classmethod
    def refusal_of(cls, method: str, divergence: str) -> str | None:
        return _refusal(method, divergence, cls.METHODS, "top-k targets")

    def refusal(self, divergence: str) -> str | None:
        return self.refusal_of(self.method, divergence)

    def where(self, mask_bt) -> CrossTopK:
        """These targets where `mask_bt`; elsewhere unaligned, k distinct ids and k + 1 equal
        entries (`TopK.where`)."""
        kept = self._topk().where(mask_bt)
        return self.replace(ids=kept.ids, logprobs=kept.logprobs, tail=kept.tail,
                            aligned=self.aligned & mask_bt)

    def _topk(self) -> TopK:
        return TopK(self.ids, self.logprobs, self.tail)

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        filled = self._topk().where(self.aligned)  # as CrossDense: finite where unaligned
        if self.method == "uld":
            value_bt = uld_topk_bt(student_logits_btv, filled.logprobs, filled.tail,
                                   temperature=temperature, student_valid=valid_vocab)
        else:
            value_bt = mapped_topk_divergence_bt(
                kind, student_logits_btv, filled.ids, filled.logprobs, filled.tail,
                self.buckets, temperature=temperature, beta=beta, skew=skew,
                student_valid=valid_vocab)
        return jnp.where(self.aligned, value_bt, 0.0)


def _normalized_btc(log_x_btc):
    """log-probabilities renormalized over the last axis (entries of -inf stay -inf)."""
    return log_x_btc - log_sum_exp_bt(log_x_btc)[..., None]


def mapped_topk_divergence_bt(kind: str, student_logits_btv, ids_btk, logprobs_btk, tail_bt,
                              buckets: Buckets, *, temperature, beta=0.5, skew=0.1,
                              student_valid=None) -> jax.Array:
    """Per-token divergence between the teacher's top-k targets gathered into the buckets, with
    the tail as one more bucket, and the student's buckets (the module docstring), T^2-scaled,
    float32 [batch, tokens]. `ids_btk` are teacher ids, below the buckets' teacher width."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    reason = CrossTopK.refusal_of("mapped", kind)
    if reason is not None:
        raise ValueError(reason)
    leading_shape = student_logits_btv.shape[:-1]
    check_ids("ids", ids_btk, leading_shape)
    check_leading_shapes(ids=ids_btk.shape, logprobs=logprobs_btk.shape)
    check_leading_shapes(student=leading_shape, tail=tail_bt.shape)
    if len(buckets.student_v) != student_logits_btv.shape[-1]:
        raise ValueError(f"the buckets were made for {len(buckets.student_v)} student logits, "
                         f"not {student_logits_btv.shape[-1]}")

    # The teacher's slots: a slot of no bucket, or padding (-inf), is empty; slots of one bucket
    # are pooled into the first of them (k x k comparisons: k is small).
    bucket_btk = jnp.asarray(buckets.teacher_w)[ids_btk]
    logprobs_btk = logprobs_btk.astype(jnp.float32)
    held_btk = (bucket_btk >= 0) & (logprobs_btk != -jnp.inf)
    same_btkk = ((bucket_btk[..., :, None] == bucket_btk[..., None, :])
                 & held_btk[..., :, None] & held_btk[..., None, :])
    k = ids_btk.shape[-1]
    earlier_kk = jnp.tril(jnp.ones((k, k), bool), -1)  # [j, j']: j' comes before j
    first_btk = held_btk & ~jnp.any(same_btkk & earlier_kk, axis=-1)
    pooled_btk = log_sum_exp_bt(jnp.where(same_btkk, logprobs_btk[..., None, :], -jnp.inf))
    teacher_btc = jnp.concatenate([jnp.where(first_btk, pooled_btk, -jnp.inf),
                                   tail_bt.astype(jnp.float32)[..., None]], axis=-1)
    log_p_btc = jax.lax.stop_gradient(_normalized_btc(teacher_btc))

    # The student's: the buckets of the first slots, and the mass of every other bucket.
    log_q_btn = bucket_log_probs(student_log_probs_btv(student_logits_btv, temperature,
                                                       student_valid),
                                 buckets.student_v, buckets.count)
    slot_btk = jnp.maximum(bucket_btk, 0)
    log_q_btk = jnp.where(first_btk, jnp.take_along_axis(log_q_btn, slot_btk, axis=-1),
                          -jnp.inf)
    rows_b11 = jnp.arange(ids_btk.shape[0])[:, None, None]
    tokens_1t1 = jnp.arange(ids_btk.shape[1])[None, :, None]
    taken_btn = jnp.zeros(log_q_btn.shape, bool).at[rows_b11, tokens_1t1, slot_btk].max(
        first_btk)
    log_q_rest_bt = log_sum_exp_bt(jnp.where(taken_btn, -jnp.inf, log_q_btn))
    # Renormalized over the entries: the student's mass of no bucket is left out.
    log_q_btc = _normalized_btc(jnp.concatenate([log_q_btk, log_q_rest_bt[..., None]], axis=-1))
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)


def uld_topk_bt(student_logits_btv, logprobs_btk, tail_bt, *, temperature,
                student_valid=None) -> jax.Array:
    """ULD from top-k targets (the module docstring): the teacher's k probabilities sorted
    against the student's k largest, and its tail against the student's mass past them, float32
    [batch, tokens]; like `uld_bt`, not scaled by T^2."""
    temperature, _, _ = validate_divergence_args("forward_kl", temperature, 0.5, 0.1)
    check_leading_shapes(student=student_logits_btv.shape[:-1], logprobs=logprobs_btk.shape[:-1],
                         tail=tail_bt.shape)
    k = logprobs_btk.shape[-1]
    teacher_btc = jnp.concatenate([logprobs_btk.astype(jnp.float32),
                                   tail_bt.astype(jnp.float32)[..., None]], axis=-1)
    p_btc = jax.lax.stop_gradient(jnp.exp(_normalized_btc(teacher_btc)))
    p_btk = -jnp.sort(-p_btc[..., :k], axis=-1)  # a cache's are sorted; padding (0) goes last

    q_btv = jnp.exp(student_log_probs_btv(student_logits_btv, temperature, student_valid))
    width = q_btv.shape[-1]
    top = min(k, width)
    q_top_btk, top_ids_btk = jax.lax.top_k(q_btv, top)  # its gradient reaches the k chosen
    # The mass past the k largest, summed directly: 1 minus theirs would cancel in float32.
    rows_b11 = jnp.arange(q_btv.shape[0])[:, None, None]
    tokens_1t1 = jnp.arange(q_btv.shape[1])[None, :, None]
    chosen_btv = jnp.zeros(q_btv.shape, bool).at[rows_b11, tokens_1t1, top_ids_btk].set(True)
    q_rest_bt = jnp.sum(jnp.where(chosen_btv, 0.0, q_btv), axis=-1)
    if top < k:  # a student vocabulary narrower than k: its ranks past it are zeros
        q_top_btk = jnp.pad(q_top_btk, [(0, 0)] * (q_top_btk.ndim - 1) + [(0, k - top)])
    return (jnp.sum(jnp.abs(p_btk - q_top_btk), axis=-1)
            + jnp.abs(p_btc[..., k] - q_rest_bt))
