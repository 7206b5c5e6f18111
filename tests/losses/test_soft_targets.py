"""kd_jax.losses.soft_targets: the divergences of the student from the teacher's Dense, TopK and
Sampled targets, and their refusals. Full targets against the dense loss, top-k over the whole
vocabulary against it, the top-k bias bound, the unbiasedness of the sampled KL (a statistical
test, and a check that it can fail), the objective on each kind, and the argument errors. The
targets themselves are computed by kd_jax.teacher.sparse (tests/teacher/test_sparse.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.config import LossConfig
from kd_jax.losses.divergences import DIVERGENCES, cross_entropy_bt, divergence_bt
from kd_jax.losses.objective import objective_on_logits
from kd_jax.losses.soft_targets import (
    Dense,
    Sampled,
    TopK,
    check_supported,
    sampled_kl_bt,
    topk_divergence_bt,
)
from kd_jax.teacher import sparse
from tests.references import (
    ATOL,
    COMPUTE_DTYPE,
    RTOL,
    WIDTH,
    B,
    T,
    V,
    assert_close,
    np_kl,
    np_log_softmax,
    pad_columns,
    random_logits,
)

DISTRIBUTION_KINDS = tuple(kind for kind in DIVERGENCES if kind != "mse")


def np_distribution_divergence(kind, p, q, beta=0.5, skew=0.1):
    """float64 reference over the last axis, unscaled (any finite distributions p, q)."""
    if kind == "forward_kl":
        return np_kl(p, q)
    if kind == "reverse_kl":
        return np_kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if kind == "skew_kl":
        return np_kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return np_kl(q, (1 - skew) * p + skew * q)
    return 0.5 * np.abs(p - q).sum(-1)  # tvd


def np_bucketed(p, q, ids):
    """Coarsen p and q (float64, [..., V]) onto the ids' buckets plus one bucket for the rest."""
    p_ids = np.take_along_axis(p, ids, -1)
    q_ids = np.take_along_axis(q, ids, -1)
    in_ids = np.zeros(p.shape, bool)
    np.put_along_axis(in_ids, ids, True, -1)
    p_rest = np.where(in_ids, 0.0, p).sum(-1, keepdims=True)
    q_rest = np.where(in_ids, 0.0, q).sum(-1, keepdims=True)
    return np.concatenate([p_ids, p_rest], -1), np.concatenate([q_ids, q_rest], -1)


def config_for(kind, temperature, **overrides):
    return dataclasses.replace(LossConfig(divergence=kind, temperature=temperature, beta=0.3,
                                          skew=0.2, kd_weight=0.7, ce_weight=0.4), **overrides)


def batch(seed=0):
    """Padded-width student and teacher logits, labels and a ragged mask."""
    rng = np.random.default_rng(seed)
    student = pad_columns(random_logits(seed + 100), WIDTH, 5e3)
    teacher = pad_columns(random_logits(seed + 200), WIDTH, 7e3)
    labels = rng.integers(0, V, size=(B, T))
    mask = np.arange(T)[None, :] < np.array([T, 3])[:, None]
    return student, teacher, labels, mask


# ---------------------------------------------------------------------------------------------
# Full targets: exactly the dense loss, re-tempered from T = 1
# ---------------------------------------------------------------------------------------------

def loss_and_grad(loss_fn, student):
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student))
    return loss, metrics, grad


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_full_mode_equals_the_dense_loss(kind, temperature):
    # A full cache's targets are Dense over the stored T = 1 log-probabilities
    # (kd_jax.teacher.cached), compared here with Dense over the teacher's logits.
    student, teacher, labels, mask = batch()
    config = config_for(kind, temperature)
    stored = {"logprobs": sparse.full_targets(teacher, temperature=1.0, valid_vocab=V)}
    from_cache = loss_and_grad(lambda s: objective_on_logits(
        s, Dense(stored["logprobs"]), labels, mask, config=config, num_valid_tokens=8,
        valid_vocab=V), student)
    # The contract: the dense loss with the stored log-probs as teacher logits ...
    references = [stored["logprobs"]]
    if kind != "mse":  # ... which for distributions is the dense loss on the raw logits at T
        references.append(teacher)  # (mse compares logits, which log_softmax shifts)
    for reference_teacher in references:
        dense = loss_and_grad(lambda s, reference=reference_teacher: objective_on_logits(
            s, Dense(reference), labels, mask, config=config, num_valid_tokens=8,
            valid_vocab=V), student)
        assert_close(from_cache[0], dense[0])
        for key in dense[1]:
            assert_close(from_cache[1][key], dense[1][key])
        assert_close(from_cache[2], dense[2])


# ---------------------------------------------------------------------------------------------
# Top-k targets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_topk_over_the_whole_vocabulary_equals_the_dense_divergence(kind, temperature):
    student, teacher, _, _ = batch()
    cached = sparse.topk_targets(teacher, V, temperature=temperature, valid_vocab=V)

    def topk_sum(s):
        return jnp.sum(topk_divergence_bt(
            kind, s, cached["ids"], cached["logprobs"], cached["tail"], temperature=temperature,
            beta=0.3, skew=0.2, valid_vocab=V))

    def dense_sum(s):
        return jnp.sum(divergence_bt(kind, s, teacher, temperature=temperature, beta=0.3,
                                     skew=0.2, valid_vocab=V))

    per_token = topk_divergence_bt(
        kind, student, cached["ids"], cached["logprobs"], cached["tail"],
        temperature=temperature, beta=0.3, skew=0.2, valid_vocab=V)
    assert per_token.shape == (B, T) and per_token.dtype == jnp.float32
    assert_close(per_token, divergence_bt(kind, student, teacher, temperature=temperature,
                                          beta=0.3, skew=0.2, valid_vocab=V))
    topk_grad = jax.grad(topk_sum)(jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(topk_grad)))
    assert_close(topk_grad, jax.grad(dense_sum)(jnp.asarray(student)))


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("k", (1, 4))
def test_topk_bucketed_divergence_matches_float64_and_is_below_the_full_one(kind, k):
    temperature, beta, skew = 2.0, 0.3, 0.2
    student, teacher, _, _ = batch(1)
    cached = sparse.topk_targets(teacher, k, temperature=temperature, valid_vocab=V)
    value = np.asarray(topk_divergence_bt(
        kind, student, cached["ids"], cached["logprobs"], cached["tail"],
        temperature=temperature, beta=beta, skew=skew, valid_vocab=V))

    p = np.exp(np_log_softmax(teacher[..., :V], temperature))
    q = np.exp(np_log_softmax(student[..., :V], temperature))
    p_buckets, q_buckets = np_bucketed(p, q, np.asarray(cached["ids"]))
    bucketed = temperature**2 * np_distribution_divergence(kind, p_buckets, q_buckets, beta, skew)
    full = temperature**2 * np_distribution_divergence(kind, p, q, beta, skew)
    assert_close(value, bucketed)
    # Data-processing inequality: coarsening never increases an f-divergence; with k << V the
    # inequality is strict (top-k's bias is real and downward).
    assert np.all(bucketed <= full)
    assert np.all(bucketed < full - ATOL)
    dense = np.asarray(divergence_bt(kind, student, teacher, temperature=temperature,
                                     beta=beta, skew=skew, valid_vocab=V))
    assert np.all(value <= dense + ATOL + RTOL * np.abs(dense))


def test_topk_scales_with_temperature_squared_and_pads_get_zero_gradient():
    student, teacher, _, _ = batch(2)
    temperature = 2.0
    at_t = sparse.topk_targets(teacher, 3, temperature=temperature, valid_vocab=V)
    softened = sparse.topk_targets(teacher / temperature, 3, temperature=1.0, valid_vocab=V)

    def divergence(s, cached, t):
        return topk_divergence_bt("jsd", s, cached["ids"], cached["logprobs"],
                                  cached["tail"], temperature=t, valid_vocab=V)

    assert_close(divergence(student, at_t, temperature),
                 temperature**2 * np.asarray(divergence(student / temperature, softened, 1.0)))
    grad = jax.grad(lambda s: jnp.sum(divergence(s, at_t, temperature)))(jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad[..., V:]), 0.0)


# ---------------------------------------------------------------------------------------------
# Sampled targets
# ---------------------------------------------------------------------------------------------

def test_sampled_kl_matches_float64_numpy():
    rng = np.random.default_rng(9)
    student = random_logits(10)
    n = 6
    ids = np.sort(rng.integers(0, V, size=(B, T, n)), axis=-1).astype(np.int32)
    counts = rng.integers(0, 4, size=(B, T, n)).astype(np.int32)
    counts[..., 0] += 1  # at least one draw per token
    entropy = rng.uniform(0.5, 3.0, size=(B, T)).astype(COMPUTE_DTYPE)
    temperature = 2.0
    value = sampled_kl_bt(pad_columns(student, WIDTH, 1e4), ids, counts, entropy,
                          temperature=temperature, valid_vocab=V)
    log_q = np_log_softmax(student, temperature)
    cross = -(counts * np.take_along_axis(log_q, ids, -1)).sum(-1) / counts.sum(-1)
    assert_close(value, temperature**2 * (cross - entropy))


def standard_errors_off(estimates_r, exact):
    """|mean - exact| in units of the standard error of the mean, per coordinate."""
    estimates_r = np.asarray(estimates_r, np.float64)
    standard_error = estimates_r.std(axis=0, ddof=1) / np.sqrt(estimates_r.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(estimates_r.mean(axis=0) - np.asarray(exact, np.float64)) / standard_error


@pytest.fixture(scope="module")
def many_sample_sets():
    """One teacher/student token pair (vocab 50, T = 2) and 4000 independent 12-draw targets."""
    vocab, rows, n, temperature = 50, 4000, 12, 2.0
    teacher = random_logits(11, (1, 1, vocab), scale=2.0)
    student = random_logits(12, (1, 1, vocab), scale=2.0)
    # Every id must be drawn often enough for its gradient coordinate's standard error to be
    # estimated: 48,000 draws x p_min > 1e-3 gives dozens per id.
    assert np.exp(np_log_softmax(teacher, temperature)).min() > 1e-3
    sampled = sparse.sample_targets(np.broadcast_to(teacher, (rows, 1, vocab)),
                                    sparse.row_keys(2025, np.arange(rows)), n,
                                    temperature=temperature, valid_vocab=vocab)
    students = jnp.broadcast_to(jnp.asarray(student), (rows, 1, vocab))
    return teacher, student, students, sampled, temperature


def exact_kl_and_grad(teacher, student, temperature):
    def kl(s):
        return jnp.sum(divergence_bt("forward_kl", s, teacher, temperature=temperature))
    value, grad = jax.value_and_grad(kl)(jnp.asarray(student))
    return float(value), np.asarray(grad)[0, 0]


def per_row_values_and_grads(estimator_bt, students):
    # Rows are independent, so the gradient of the sum holds each row's own gradient.
    values = estimator_bt(students)
    grads = jax.grad(lambda s: jnp.sum(estimator_bt(s)))(students)
    return np.asarray(values)[:, 0], np.asarray(grads)[:, 0, :]


# A correct estimator passes with probability ~99.99% per quantity under normality (4 standard
# errors, two-sided: 6.3e-5); for the 50 gradient coordinates, a union bound gives >= 99.7%.
# The seeds are fixed, so the outcome is deterministic; the margin is what makes it meaningful.
Z_LIMIT = 4.0


def looks_unbiased(estimator_bt, many_sample_sets) -> bool:
    """The mean value and every mean gradient coordinate within Z_LIMIT standard errors."""
    teacher, student, students, _, temperature = many_sample_sets
    exact_value, exact_grad = exact_kl_and_grad(teacher, student, temperature)
    values, grads = per_row_values_and_grads(estimator_bt, students)
    return bool(standard_errors_off(values, exact_value) < Z_LIMIT
                and np.all(standard_errors_off(grads, exact_grad) < Z_LIMIT))


def test_sampled_kl_is_unbiased_in_value_and_gradient(many_sample_sets):
    _, _, students, sampled, temperature = many_sample_sets

    def sampled_kl(s):
        return sampled_kl_bt(s, sampled["ids"], sampled["counts"], sampled["entropy"],
                             temperature=temperature)

    assert looks_unbiased(sampled_kl, many_sample_sets)
    assert np.asarray(sampled_kl(students)).std() > 0  # a random estimator, not the exact value


def test_the_unbiasedness_check_catches_biased_estimators(many_sample_sets):
    teacher, _, _, sampled, temperature = many_sample_sets

    def ignoring_counts(s):
        # A plausible bug: averaging over the unique ids, forgetting how often each was drawn
        # (with these seeds its gradient is ~20 standard errors off, its value ~3).
        drawn = (sampled["counts"] > 0).astype(jnp.int32)
        return sampled_kl_bt(s, sampled["ids"], drawn, sampled["entropy"],
                             temperature=temperature)

    def off_by_entropy(s):
        # The entropy of the untempered teacher: the right gradient, a wrong value.
        entropy = -jnp.sum(jax.nn.softmax(teacher) * jax.nn.log_softmax(teacher), axis=-1)
        return sampled_kl_bt(s, sampled["ids"], sampled["counts"],
                             jnp.broadcast_to(entropy, sampled["entropy"].shape),
                             temperature=temperature)

    # Renormalized top-k (the tail dropped, not bucketed): deterministic, and biased.
    cached = sparse.topk_targets(teacher, 8, temperature=temperature, valid_vocab=50)
    renormalized = jax.nn.log_softmax(cached["logprobs"], axis=-1)

    def renormalized_topk_kl(s):
        log_q = jnp.take_along_axis(jax.nn.log_softmax(s / temperature), cached["ids"], -1)
        return temperature**2 * jnp.sum(jnp.exp(renormalized) * (renormalized - log_q), -1)

    for biased in (ignoring_counts, off_by_entropy, renormalized_topk_kl):
        assert not looks_unbiased(biased, many_sample_sets), biased.__name__


# ---------------------------------------------------------------------------------------------
# The aggregated loss and the argument errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, kind", (("topk", "jsd"), ("sample", "forward_kl")))
def test_sparse_loss_is_the_masked_weighted_sum_over_the_global_count(mode, kind):
    student, teacher, labels, mask = batch(3)
    temperature = 2.0
    config = config_for(kind, temperature)
    if mode == "topk":
        cached = sparse.topk_targets(teacher, 4, temperature=temperature, valid_vocab=V)
    else:
        cached = sparse.sample_targets(teacher, sparse.row_keys(0, np.arange(B)), 8,
                                       temperature=temperature, valid_vocab=V)
    kind_of_targets = TopK if mode == "topk" else Sampled
    global_tokens = 20
    loss, metrics = objective_on_logits(
        student, kind_of_targets(**cached), labels, mask, config=config,
        num_valid_tokens=global_tokens, valid_vocab=V)
    kd = kind_of_targets(**cached).divergence_bt(kind, student, temperature=temperature,
                                                 beta=config.beta, skew=config.skew,
                                                 valid_vocab=V)
    ce = cross_entropy_bt(student, labels, valid_vocab=V)
    kd_sum, ce_sum = np.asarray(kd)[mask].sum(), np.asarray(ce)[mask].sum()
    assert set(metrics) == {"loss_sum", "kd_sum", "ce_sum", "tokens"}
    assert_close(metrics["kd_sum"], kd_sum)
    assert_close(metrics["ce_sum"], ce_sum)
    assert float(metrics["tokens"]) == mask.sum()
    assert_close(loss, (config.kd_weight * kd_sum + config.ce_weight * ce_sum) / global_tokens)
    target_grads = jax.grad(lambda c: objective_on_logits(
        student, kind_of_targets(**{**cached, "logprobs" if mode == "topk" else "entropy": c}),
        labels, mask, config=config, num_valid_tokens=global_tokens, valid_vocab=V)[0])(
        cached["logprobs" if mode == "topk" else "entropy"])
    np.testing.assert_array_equal(np.asarray(target_grads), 0.0)  # the teacher is frozen


def test_sparse_argument_errors():
    student, teacher, labels, mask = batch()
    topk = sparse.topk_targets(teacher, 4, temperature=1.0, valid_vocab=V)
    sample = sparse.sample_targets(teacher, sparse.row_keys(0, np.arange(B)), 4,
                                   temperature=1.0, valid_vocab=V)

    def loss(soft_targets, kind):
        return objective_on_logits(student, soft_targets, labels, mask,
                                   config=config_for(kind, 1.0), num_valid_tokens=8,
                                   valid_vocab=V)

    with pytest.raises(ValueError, match="'mse' .* not defined for top-k"):
        loss(TopK(**topk), "mse")
    with pytest.raises(ValueError, match="'mse' .* not defined for top-k"):
        topk_divergence_bt("mse", student, topk["ids"], topk["logprobs"], topk["tail"],
                           temperature=1.0, valid_vocab=V)
    for kind in ("reverse_kl", "jsd", "tvd", "mse"):
        with pytest.raises(ValueError, match=f"{kind!r} cannot be estimated from sampled"):
            loss(Sampled(**sample), kind)
    # The old "unknown target mode" and "targets must be a dict with keys" errors are gone: the
    # loss takes no mode, and a kind of targets cannot be built with another kind's fields.
    with pytest.raises(TypeError):
        Sampled(**topk)
    with pytest.raises(ValueError, match="temperature"):
        sampled_kl_bt(student, sample["ids"], sample["counts"], sample["entropy"],
                      temperature=0.0, valid_vocab=V)
    with pytest.raises(ValueError, match="integer token ids"):
        topk_divergence_bt("forward_kl", student, topk["logprobs"], topk["logprobs"],
                           topk["tail"], temperature=1.0, valid_vocab=V)


def test_refusals_name_the_reason_or_return_none():
    for kind in DIVERGENCES:
        assert Dense.refusal(kind) is None
        check_supported(Dense, kind)
        assert (TopK.refusal(kind) is None) == (kind != "mse"), kind
        assert (Sampled.refusal(kind) is None) == (kind == "forward_kl"), kind
    assert "not defined for top-k" in TopK.refusal("mse")
    assert "cannot be estimated from sampled targets" in Sampled.refusal("tvd")
    with pytest.raises(ValueError, match="'jsd' cannot be estimated from sampled"):
        check_supported(Sampled, "jsd")


def test_topk_slots_at_minus_infinity_are_absent_not_impossible():
    """Padding slots (id 0, log-prob -inf) leave the student's mass on id 0 in the rest bucket."""
    rng = np.random.default_rng(5)
    student = jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32)
    ids = jnp.asarray([[[3, 5, 0, 0], [0, 2, 0, 0]]], jnp.int32)  # id 0 is real in row 2 only
    logprobs = jnp.asarray([[[-0.5, -1.5, -jnp.inf, -jnp.inf], [-0.7, -1.0, -jnp.inf,
                                                               -jnp.inf]]], jnp.float32)
    tail = jnp.log1p(-jnp.exp(logprobs).sum(-1))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got = topk_divergence_bt(kind, student, ids, logprobs, tail, temperature=1.0)
        # The same targets without the padding slots.
        want = topk_divergence_bt(kind, student, ids[..., :2], logprobs[..., :2], tail,
                                  temperature=1.0)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=kind)
        assert np.isfinite(np.asarray(got)).all(), kind
        grads = jax.grad(lambda s, kind=kind: topk_divergence_bt(
            kind, s, ids, logprobs, tail, temperature=1.0).sum())(student)
        assert np.isfinite(np.asarray(grads)).all(), kind


def test_a_topk_position_without_entries_has_no_target():
    """Every slot -inf and tail 0 (how `kd-jax cache import` stores a student position inside
    an API token): divergence and gradient exactly 0 there, the other position untouched."""
    rng = np.random.default_rng(6)
    student = jnp.asarray(3 * rng.normal(size=(1, 2, 8)), jnp.float32)
    ids = jnp.asarray([[[3, 5, 0, 0], [0, 0, 0, 0]]], jnp.int32)
    logprobs = jnp.asarray([[[-0.5, -1.5, -jnp.inf, -jnp.inf], [-jnp.inf] * 4]], jnp.float32)
    tail = jnp.asarray([[np.log1p(-np.exp([-0.5, -1.5]).sum()), 0.0]], jnp.float32)
    both = [value[:, [0, 0]] for value in (ids, logprobs, tail)]  # position 0's targets twice
    for kind in ("forward_kl", "jsd"):
        got = topk_divergence_bt(kind, student, ids, logprobs, tail, temperature=2.0)
        want = topk_divergence_bt(kind, student[:, [0, 0]], *both, temperature=2.0)
        assert got[0, 1] == 0.0 and got[0, 0] == want[0, 0], kind
        grads = jax.grad(lambda s, kind=kind: topk_divergence_bt(
            kind, s, ids, logprobs, tail, temperature=2.0).sum())(student)
        assert np.isfinite(np.asarray(grads)).all(), kind
        np.testing.assert_array_equal(np.asarray(grads[0, 1]), 0.0, err_msg=kind)
