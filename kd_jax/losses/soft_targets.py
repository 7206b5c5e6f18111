"""The teacher's soft targets, one class per kind, each with its divergence from the student.

What a teacher gives the loss for a batch is one of:

* `Dense`   logits over the whole vocabulary: an online teacher's, or a full cache's
            log-probabilities (log-softmax only shifts logits by a constant per token, so they
            serve as logits at any temperature; `mse` alone sees the shift).
* `TopK`    the k most probable ids, their log-probabilities and `tail`, the log of the mass
            outside them (`kd_jax.teacher.sparse.topk_targets`).
* `Sampled` n ids drawn from the teacher, as unique ids with counts, and the teacher's entropy
            (`kd_jax.teacher.sparse.sample_targets`).
* `Projected` an online teacher's final hidden states and output head: `Dense` logits computed
            where they are needed, for the whole batch or a chunk of tokens at a time
            (`kd_jax.losses.chunked`), so the teacher's [tokens, vocab] logits need never exist
            whole.
* `CrossVocab` the same from a teacher with another vocabulary, at the student's aligned
            positions (`kd_jax.losses.cross_vocab`).
* `Weighted` several teachers' targets (any of the above each) and their weights: the
            weighted sum of their divergences.

Each kind is a pytree with `divergence_bt(kind, student_logits_btv, ...)`, the per-token
divergence of the student from it, float32 [batch, tokens] and scaled by T^2 like
`kd_jax.losses.divergences.divergence_bt`, and `refusal(divergence)`, why it cannot serve a
divergence (or None). Adding a kind of target is one more class here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kd_jax.checks import static_number
from kd_jax.losses.divergences import (
    check_ids,
    check_leading_shapes,
    distribution_divergence_bt,
    divergence_bt,
    log_sum_exp_bt,
    student_log_probs_btv,
    validate_divergence_args,
)


def vocabulary_logits(hidden_bxd: jax.Array, head_vd: jax.Array) -> jax.Array:
    """Logits [..., vocab] of hidden states [..., d] through an output head [vocab, d], float32
    (accumulated in float32 whatever the dtype)."""
    return jnp.einsum("...d,vd->...v", hidden_bxd, head_vd.astype(hidden_bxd.dtype),
                      preferred_element_type=jnp.float32)


@struct.dataclass
class Dense:
    """The teacher's logits (or log-probabilities) over the vocabulary [batch, tokens, vocab]."""

    logits: jax.Array

    @staticmethod
    def refusal(divergence: str) -> str | None:
        return None

    def where(self, mask_bt) -> Dense:
        """These targets where `mask_bt`, uniform elsewhere (finite for every divergence)."""
        return Dense(jnp.where(mask_bt[..., None], self.logits, 0.0))

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        return divergence_bt(kind, student_logits_btv, self.logits, temperature=temperature,
                             beta=beta, skew=skew, valid_vocab=valid_vocab)


@struct.dataclass
class Projected:
    """A teacher's final-normed hidden states [batch, tokens, d] and output head [vocab, d]."""

    hidden: jax.Array
    head: jax.Array
    # Pins the teacher's logits [batch, tokens, vocab] to a sharding (None: XLA's choice).
    logits_sharding: Any = struct.field(pytree_node=False, default=None)

    @staticmethod
    def refusal(divergence: str) -> str | None:
        return None

    def where(self, mask_bt) -> Projected:
        """These targets where `mask_bt`; zero hidden states (uniform logits) elsewhere."""
        return self.replace(hidden=jnp.where(mask_bt[..., None], self.hidden, 0))

    def per_token(self):
        """What `kd_jax.losses.chunked` cuts into chunks; the head is shared by all."""
        return self.hidden

    def with_per_token(self, hidden) -> Dense:
        """A chunk's targets from its hidden states: its logits, computed in the chunk."""
        return self.replace(hidden=hidden).dense()

    def dense(self) -> Dense:
        """The teacher's logits, float32 (accumulated in float32 whatever the dtype)."""
        logits_btv = vocabulary_logits(self.hidden, self.head)
        if self.logits_sharding is not None:
            logits_btv = jax.lax.with_sharding_constraint(logits_btv, self.logits_sharding)
        return Dense(logits_btv)

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        return self.dense().divergence_bt(kind, student_logits_btv, temperature=temperature,
                                          beta=beta, skew=skew, valid_vocab=valid_vocab)


@struct.dataclass
class TopK:
    """The teacher's k most probable ids [b, t, k], their log-probabilities [b, t, k] and the log
    of the mass outside them [b, t], at the temperature the targets were built at."""

    ids: jax.Array
    logprobs: jax.Array
    tail: jax.Array

    @staticmethod
    def refusal(divergence: str) -> str | None:
        if divergence == "mse":
            return ("divergence 'mse' compares logits over the whole vocabulary and is not "
                    "defined for top-k targets, which keep k log-probabilities and a tail mass; "
                    "use a divergence between distributions or full targets")
        return None

    def where(self, mask_bt) -> TopK:
        """These targets where `mask_bt`; elsewhere k distinct ids and k + 1 equal buckets."""
        k = self.ids.shape[-1]
        keep_btk = mask_bt[..., None]
        uniform = -jnp.log(jnp.float32(k + 1))
        return TopK(ids=jnp.where(keep_btk, self.ids, jnp.arange(k, dtype=self.ids.dtype)),
                    logprobs=jnp.where(keep_btk, self.logprobs, uniform.astype(
                        self.logprobs.dtype)),
                    tail=jnp.where(mask_bt, self.tail, uniform.astype(self.tail.dtype)))

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        return topk_divergence_bt(kind, student_logits_btv, self.ids, self.logprobs, self.tail,
                                  temperature=temperature, beta=beta, skew=skew,
                                  valid_vocab=valid_vocab)


@struct.dataclass
class Sampled:
    """Unique ids drawn from the teacher [b, t, n], how many of the n draws each got [b, t, n]
    (0: a padding slot), and the teacher's entropy [b, t], at the temperature of the draws."""

    ids: jax.Array
    counts: jax.Array
    entropy: jax.Array

    @staticmethod
    def refusal(divergence: str) -> str | None:
        if divergence != "forward_kl":
            return (f"divergence {divergence!r} cannot be estimated from sampled targets: "
                    "samples y ~ p give an unbiased forward KL(p || q) = E[-log q(y)] - H(p) "
                    "only; use divergence 'forward_kl', or top-k or full targets")
        return None

    def where(self, mask_bt) -> Sampled:
        """These targets where `mask_bt`; elsewhere no draws (padding slots) and zero entropy."""
        keep_btn = mask_bt[..., None]
        return Sampled(ids=jnp.where(keep_btn, self.ids, 0),
                       counts=jnp.where(keep_btn, self.counts, 0),
                       entropy=jnp.where(mask_bt, self.entropy, 0))

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        return sampled_kl_bt(student_logits_btv, self.ids, self.counts, self.entropy,
                             temperature=temperature, valid_vocab=valid_vocab)


@struct.dataclass
class Weighted:
    """Several teachers' targets, each of any kind, and the share of each in the divergence:
    sum over i of weights[i] * members[i]'s divergence (`kd_jax.teacher.several`)."""

    members: tuple
    weights: tuple[float, ...] = struct.field(pytree_node=False)

    @property
    def width(self) -> int:
        """The widest [tokens, width] arrays a member holds per position (a teacher of another
        vocabulary's), 0 if none says: for the chunk's size."""
        return max((getattr(member, "width", 0) for member in self.members), default=0)

    def refusal(self, divergence: str) -> str | None:
        for i, member in enumerate(self.members):
            reason = member.refusal(divergence)
            if reason is not None:
                return f"{reason} (teachers[{i}])"
        return None

    def where(self, mask_bt) -> Weighted:
        return self.replace(members=tuple(member.where(mask_bt) for member in self.members))

    def per_token(self):
        """What `kd_jax.losses.chunked` cuts into chunks: each member's own per-token part."""
        return tuple(member.per_token() if hasattr(member, "per_token") else member
                     for member in self.members)

    def with_per_token(self, per_token) -> Weighted:
        return self.replace(members=tuple(
            member.with_per_token(part) if hasattr(member, "with_per_token") else part
            for member, part in zip(self.members, per_token)))

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        total_bt = None
        for member, weight in zip(self.members, self.weights):
            value_bt = jnp.float32(weight) * member.divergence_bt(
                kind, student_logits_btv, temperature=temperature, beta=beta, skew=skew,
                valid_vocab=valid_vocab)
            total_bt = value_bt if total_bt is None else total_bt + value_bt
        return total_bt


SoftTargets = Dense | TopK | Sampled


def check_supported(targets: Any, divergence: str) -> None:
    """ValueError when `targets` (a kind of targets, or targets whose refusal depends on their
    settings, as `CrossVocab`'s does) cannot serve `divergence`."""
    reason = targets.refusal(divergence)
    if reason is not None:
        raise ValueError(reason)


def topk_divergence_bt(kind: str, student_logits_btv, ids_btk, logprobs_btk, tail_bt, *,
                       temperature, beta=0.5, skew=0.1, valid_vocab=None) -> jax.Array:
    """Per-token divergence against top-k targets, on k + 1 buckets, float32 [batch, tokens].

    Both distributions are coarsened onto the same k + 1 buckets (suffix `_btc`): the k cached ids,
    and "everything else". The teacher's buckets are `logprobs_btk` and `tail_bt` (log of the
    mass outside the k ids; see `kd_jax.teacher.sparse`), renormalized over the k + 1 buckets,
    which is a no-op for exact targets and absorbs the rounding of a cache stored in 16 bits.
    The student's last bucket is logsumexp of its log-probabilities with the k ids masked out,
    accurate however small that mass is (never log1p(-sum q_k), which cancels in float32).
    `kind` is then applied to the bucketed distributions exactly as `divergence_bt` applies it
    to the full ones (same definitions, same T^2 factor); `mse` is refused.

    Bias: every divergence here is an f-divergence of (p, q) (JSD and the skew KLs too: coarsening
    commutes with mixing), so by the data-processing inequality its bucketed value is <= the
    full one, with equality when k covers the valid vocabulary (empty tail). The gap is top-k's
    bias; `benchmarks/sparse_bias.py` measures it.

    A position with no entry (every slot -inf) and a finite tail has no target: both sides are
    one bucket, "everything", so every divergence is 0; it is returned as exactly 0, without the
    rounding of the student's total mass (`kd-jax cache import` stores one, tail 0, where the
    student's position falls inside an API token: `kd_jax.cache.api_responses`).

    The targets must have been built at this `temperature` (their normalizer needed the whole
    vocabulary, so it cannot be changed afterwards), and their ids must be < valid_vocab.
    """
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    check_supported(TopK, kind)
    leading_shape = student_logits_btv.shape[:-1]
    check_ids("ids", ids_btk, leading_shape)
    check_leading_shapes(ids=ids_btk.shape, logprobs=logprobs_btk.shape)
    check_leading_shapes(student=leading_shape, tail=tail_bt.shape)

    log_q_btv = student_log_probs_btv(student_logits_btv, temperature, valid_vocab)
    # A slot whose teacher log-prob is -inf holds no token (padding, e.g. an API that returned
    # fewer than k alternatives): its bucket is empty for both models, and the student's mass
    # on its id stays in "everything else". Otherwise a reverse KL would see the student's mass
    # on a bucket the teacher calls impossible, and be infinite.
    present_btk = logprobs_btk != -jnp.inf
    log_q_btk = jnp.where(present_btk, jnp.take_along_axis(log_q_btv, ids_btk, axis=-1),
                          -jnp.inf)
    rows_b11 = jnp.arange(ids_btk.shape[0])[:, None, None]
    tokens_1t1 = jnp.arange(ids_btk.shape[1])[None, :, None]
    cached_btv = jnp.zeros(log_q_btv.shape, bool).at[rows_b11, tokens_1t1, ids_btk].max(
        present_btk)
    log_q_rest_bt = log_sum_exp_bt(jnp.where(cached_btv, -jnp.inf, log_q_btv))
    log_q_btc = jnp.concatenate([log_q_btk, log_q_rest_bt[..., None]], axis=-1)
    teacher_btc = jnp.concatenate([logprobs_btk, tail_bt[..., None]], axis=-1)
    log_p_btc = jax.nn.log_softmax(teacher_btc.astype(jnp.float32), axis=-1)
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    value_bt = scale * distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)
    # where, after finite arithmetic (the tail is finite): no gradient reaches a position
    # without a target.
    return jnp.where(jnp.any(present_btk, axis=-1), value_bt, 0.0)


def sampled_kl_bt(student_logits_btv, ids_btn, counts_btn, entropy_bt, *, temperature,
                  valid_vocab=None) -> jax.Array:
    """Unbiased per-token estimate of T^2 KL(p_T || q_T) from sampled targets, float32 [b, t].

    With n = sum_j counts_j draws y ~ p_T (cached as unique ids and counts, see
    `kd_jax.teacher.sparse`):

        sum_j counts_j / n * (-log q_T(id_j)) - H(p_T)

    Its expectation over the draws is E_{y~p}[-log q(y)] - H(p) = KL(p || q), in value and in
    gradient (the gradient is linear in the empirical distribution), so, unlike renormalized
    top-k, it has no bias; it pays in variance instead, and one estimate can be negative.
    Padding slots (count 0) contribute nothing. Random-sampling KD: Anshumann et al. 2025,
    "Sparse Logit Sampling". Scaled by T^2 like `divergence_bt`; the targets must have been drawn
    at this temperature.
    """
    temperature = static_number("temperature", temperature, low=0.0, low_open=True)
    leading_shape = student_logits_btv.shape[:-1]
    check_ids("ids", ids_btn, leading_shape)
    check_ids("counts", counts_btn, leading_shape)
    check_leading_shapes(ids=ids_btn.shape, counts=counts_btn.shape)
    check_leading_shapes(student=leading_shape, entropy=entropy_bt.shape)

    log_q_btv = student_log_probs_btv(student_logits_btv, temperature, valid_vocab)
    log_q_btn = jnp.take_along_axis(log_q_btv, ids_btn, axis=-1)
    counts_btn = counts_btn.astype(jnp.float32)
    drawn_btn = counts_btn > 0
    # where, not multiply: a padding slot's id may have q = 0, and 0 * -inf is NaN.
    weighted_btn = jnp.where(drawn_btn, counts_btn * jnp.where(drawn_btn, log_q_btn, 0.0), 0.0)
    draws_bt = jnp.maximum(jnp.sum(counts_btn, axis=-1), 1.0)
    cross_entropy_bt = -jnp.sum(weighted_btn, axis=-1) / draws_bt
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * (cross_entropy_bt - entropy_bt.astype(jnp.float32))
