"""kd_jax.losses.cross_sparse: cached targets of a teacher with another vocabulary. The top-k
approximation of its module docstring against float64 numpy (values, and gradients by central
differences of the reference), its two exact ends (one vocabulary's identity buckets give the
top-k loss, k covering the teacher's vocabulary gives the whole-vocabulary loss), unaligned
positions that count for nothing, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses.cross_sparse import (
    CrossDense,
    CrossTopK,
    mapped_topk_divergence_bt,
    uld_topk_bt,
)
from kd_jax.losses.cross_vocab import Buckets, mapped_divergence_bt, uld_bt
from kd_jax.losses.soft_targets import topk_divergence_bt
from tests.losses.test_cross_vocab import C, V_S, V_T, bucket_maps, buckets_of
from tests.losses.test_soft_targets import np_distribution_divergence
from tests.references import B, T, assert_close, np_log_softmax, random_logits

KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
K = 6


def np_topk(teacher_logits, k, temperature):
    """Top-k targets in float64, cast to what a cache returns: (int32 ids [.., k], float32
    log-probabilities [.., k], float32 tail [..]); one slot of padding (-inf) at [0, 0]."""
    log_p = np_log_softmax(teacher_logits, temperature)
    ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    logprobs = np.take_along_axis(log_p, ids, -1)
    rest = log_p.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(rest).sum(-1))
    logprobs[0, 0, -1] = -np.inf
    return ids.astype(np.int32), logprobs.astype(np.float32), tail.astype(np.float32)


def np_mapped_topk(kind, student_logits, ids, logprobs, tail, teacher_bucket, student_bucket,
                   temperature, beta=0.5, skew=0.1):
    """The module docstring's `mapped` from top-k targets, float64, token by token: the
    teacher's slots pooled by bucket (slots of no bucket and padding left out) and its tail as
    "rest"; the student's buckets renormalized over the buckets, those of the slots, and the
    mass of every other bucket as its "rest"; both renormalized over these entries."""
    q_v = np.exp(np_log_softmax(student_logits, temperature))
    out = np.zeros(student_logits.shape[:-1])
    for b, t in np.ndindex(*out.shape):
        pooled = {}
        for token_id, logprob in zip(ids[b, t], logprobs[b, t].astype(np.float64)):
            bucket = teacher_bucket[token_id]
            if bucket >= 0 and logprob != -np.inf:
                pooled[bucket] = pooled.get(bucket, 0.0) + np.exp(logprob)
        held = list(pooled)
        p = np.array([pooled[c] for c in held] + [np.exp(np.float64(tail[b, t]))])
        q_c = np.array([q_v[b, t, student_bucket == c].sum() for c in range(C)])
        others = [c for c in range(C) if c not in pooled]
        q = np.array([q_c[c] for c in held] + [q_c[others].sum()])
        out[b, t] = temperature ** 2 * np_distribution_divergence(
            kind, p / p.sum(), q / q.sum(), beta, skew)
    return out


def np_uld_topk(student_logits, logprobs, tail, temperature):
    """The module docstring's `uld` from top-k targets, float64."""
    p = np.exp(np.concatenate([logprobs, tail[..., None]], -1).astype(np.float64))
    p = p / p.sum(-1, keepdims=True)
    p_top = -np.sort(-p[..., :-1], axis=-1)
    q = -np.sort(-np.exp(np_log_softmax(student_logits, temperature)), axis=-1)
    k = logprobs.shape[-1]
    return np.abs(p_top - q[..., :k]).sum(-1) + np.abs(p[..., -1] - q[..., k:].sum(-1))


def topk_inputs(seed, temperature, k=K):
    teacher_bucket, student_bucket = bucket_maps(seed)
    student = random_logits(seed + 1, (B, T, V_S))
    ids, logprobs, tail = np_topk(random_logits(seed + 2, (B, T, V_T)), k, temperature)
    # The cases the pooling is for: two cached ids in one bucket, an id of no bucket.
    buckets_of_ids = teacher_bucket[ids]
    assert any(len(set(row)) < k for row in buckets_of_ids.reshape(-1, k))
    assert (buckets_of_ids < 0).any()
    return student, ids, logprobs, tail, teacher_bucket, student_bucket


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_topk_matches_the_float64_approximation(kind, temperature):
    student, ids, logprobs, tail, teacher_bucket, student_bucket = topk_inputs(0, temperature)
    got = mapped_topk_divergence_bt(
        kind, jnp.asarray(student), jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail),
        buckets_of(teacher_bucket, student_bucket), temperature=temperature, beta=0.3,
        skew=0.2)
    assert_close(got, np_mapped_topk(kind, student, ids, logprobs, tail, teacher_bucket,
                                     student_bucket, temperature, beta=0.3, skew=0.2))


def central_differences(f, x, step=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (f(up) - f(down)) / (2 * step)
    return grad


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_mapped_topk_gradient_matches_the_float64_approximation(kind):
    student, ids, logprobs, tail, teacher_bucket, student_bucket = topk_inputs(3, 2.0)
    buckets = buckets_of(teacher_bucket, student_bucket)
    grad = jax.grad(lambda s: jnp.sum(mapped_topk_divergence_bt(
        kind, s, jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail), buckets,
        temperature=2.0)))(jnp.asarray(student))
    expected = central_differences(lambda s: np_mapped_topk(
        kind, s, ids, logprobs, tail, teacher_bucket, student_bucket, 2.0).sum(),
        student.astype(np.float64))
    assert_close(grad, expected)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_uld_topk_value_and_gradient_match_float64(temperature):
    student, ids, logprobs, tail, _, _ = topk_inputs(4, temperature)
    value_bt = uld_topk_bt(jnp.asarray(student), jnp.asarray(logprobs), jnp.asarray(tail),
                           temperature=temperature)
    assert_close(value_bt, np_uld_topk(student, logprobs, tail, temperature))
    grad = jax.grad(lambda s: jnp.sum(uld_topk_bt(s, jnp.asarray(logprobs), jnp.asarray(tail),
                                                  temperature=temperature)))(
        jnp.asarray(student))
    expected = central_differences(
        lambda s: np_uld_topk(s, logprobs, tail, temperature).sum(), student.astype(np.float64))
    assert_close(grad, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_one_vocabulary_s_identity_buckets_give_the_topk_divergence(kind):
    student = random_logits(5, (B, T, V_S))
    ids, logprobs, tail = np_topk(random_logits(6, (B, T, V_S)), K, 2.0)
    args = jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail)
    got = mapped_topk_divergence_bt(kind, jnp.asarray(student), *args,
                                    Buckets.identity(V_S, V_S), temperature=2.0)
    assert_close(got, topk_divergence_bt(kind, jnp.asarray(student), *args, temperature=2.0))


@pytest.mark.parametrize("kind", KINDS)
def test_k_covering_the_teacher_s_vocabulary_gives_the_whole_vocabulary_loss(kind):
    teacher_bucket, student_bucket = bucket_maps(7)
    buckets = buckets_of(teacher_bucket, student_bucket)
    student, teacher = random_logits(8, (B, T, V_S)), random_logits(9, (B, T, V_T))
    ids, logprobs, tail = np_topk(teacher, V_T, 2.0)
    logprobs[0, 0, -1] = np_log_softmax(teacher, 2.0)[0, 0, ids[0, 0, -1]]  # no padding here
    assert np.all(tail == -np.inf)
    args = jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail)
    assert_close(mapped_topk_divergence_bt(kind, jnp.asarray(student), *args, buckets,
                                           temperature=2.0),
                 mapped_divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher), buckets,
                                      temperature=2.0))
    assert_close(uld_topk_bt(jnp.asarray(student), jnp.asarray(logprobs), jnp.asarray(tail),
                             temperature=2.0),
                 uld_bt(jnp.asarray(student), jnp.asarray(teacher), temperature=2.0))


@pytest.mark.parametrize("method", ["mapped", "uld"])
def test_unaligned_positions_count_for_nothing_and_stay_finite(method):
    """A cache stores zeros where a position is unaligned: the targets give 0 there, with
    finite gradients, and the aligned positions their own value."""
    teacher_bucket, student_bucket = bucket_maps(10)
    buckets = buckets_of(teacher_bucket, student_bucket)
    student = jnp.asarray(random_logits(11, (B, T, V_S)))
    teacher = random_logits(12, (B, T, V_T))
    ids, logprobs, tail = np_topk(teacher, K, 1.0)
    aligned = np.random.default_rng(13).random((B, T)) < 0.6
    aligned[0, 0] = True
    zero = ~aligned
    ids[zero], logprobs[zero], tail[zero] = 0, 0.0, 0.0
    log_p = np_log_softmax(teacher, 1.0).astype(np.float32)
    log_p[zero] = 0.0
    for targets, whole in (
            (CrossTopK(jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail),
                       jnp.asarray(aligned), buckets, method),
             CrossTopK(jnp.asarray(ids), jnp.asarray(logprobs), jnp.asarray(tail),
                       jnp.ones((B, T), bool), buckets, method)),
            (CrossDense(jnp.asarray(log_p), jnp.asarray(aligned), buckets, method),
             CrossDense(jnp.asarray(log_p), jnp.ones((B, T), bool), buckets, method))):
        value, grad = jax.value_and_grad(lambda s, t=targets: jnp.sum(t.divergence_bt(
            "reverse_kl", s, temperature=1.0)))(student)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        got = targets.divergence_bt("reverse_kl", student, temperature=1.0)
        np.testing.assert_array_equal(np.asarray(got)[zero], 0.0)
        np.testing.assert_array_equal(
            np.asarray(got)[aligned],
            np.asarray(whole.divergence_bt("reverse_kl", student, temperature=1.0))[aligned])
        masked = targets.where(jnp.asarray(~aligned | aligned & (np.arange(T) % 2 == 0)))
        assert not np.asarray(masked.aligned)[aligned & (np.arange(T) % 2 == 1)].any()


def test_the_full_targets_are_the_online_loss_of_their_log_probabilities():
    """log-softmax at T = 1, re-tempered by the loss: the teacher's logits' loss, at T = 2."""
    teacher_bucket, student_bucket = bucket_maps(14)
    buckets = buckets_of(teacher_bucket, student_bucket)
    student, teacher = random_logits(15, (B, T, V_S)), random_logits(16, (B, T, V_T))
    log_p = jnp.asarray(np_log_softmax(teacher, 1.0).astype(np.float32))
    aligned = jnp.ones((B, T), bool)
    for method, online in (
            ("mapped", mapped_divergence_bt("jsd", jnp.asarray(student), jnp.asarray(teacher),
                                            buckets, temperature=2.0)),
            ("uld", uld_bt(jnp.asarray(student), jnp.asarray(teacher), temperature=2.0))):
        assert_close(CrossDense(log_p, aligned, buckets, method).divergence_bt(
            "jsd", jnp.asarray(student), temperature=2.0), online)


def test_refusals():
    assert "'hybrid' is not available from top-k targets" in CrossTopK.refusal_of(
        "hybrid", "forward_kl")
    assert CrossDense.refusal_of("hybrid", "forward_kl") is None
    for kind in (CrossDense, CrossTopK):
        assert "'mse' compares logits column by column" in kind.refusal_of("mapped", "mse")
        assert kind.refusal_of("uld", "mse") is None
    buckets = buckets_of(*bucket_maps())
    zeros = jnp.zeros((B, T, K), jnp.int32)
    with pytest.raises(ValueError, match="mse"):
        mapped_topk_divergence_bt("mse", jnp.zeros((B, T, V_S)), zeros, zeros * 0.0,
                                  jnp.zeros((B, T)), buckets, temperature=1.0)
    with pytest.raises(ValueError, match="made for 29 student logits, not 40"):
        mapped_topk_divergence_bt("forward_kl", jnp.zeros((B, T, 40)), zeros, zeros * 0.0,
                                  jnp.zeros((B, T)), buckets, temperature=1.0)
    with pytest.raises(ValueError, match="integer token ids"):
        mapped_topk_divergence_bt("forward_kl", jnp.zeros((B, T, V_S)), zeros * 0.0,
                                  zeros * 0.0, jnp.zeros((B, T)), buckets, temperature=1.0)
