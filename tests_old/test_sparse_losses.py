"""kd_jax.targets and the losses on cached (sparse) teacher targets in kd_jax.losses: the targets
against float64 numpy, full and top-k against the dense losses, the top-k bias bound, the
unbiasedness of the sampled KL (a statistical test, and a check that it can fail), and the
argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses, targets
from kd_jax.config import LossConfig

# The losses compute in float32; tolerances follow from that dtype and are never loosened.
COMPUTE_DTYPE = np.dtype(np.float32)
RTOL, ATOL = {np.dtype(np.float32): (1e-5, 1e-6)}[COMPUTE_DTYPE]

B, T, V = 2, 5, 33  # V is the valid vocabulary; WIDTH the padded embedding width
WIDTH = 40
DISTRIBUTION_KINDS = tuple(kind for kind in losses.DIVERGENCES if kind != "mse")


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def random_logits(seed, shape=(B, T, V), scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(COMPUTE_DTYPE)


def pad_columns(logits, width, fill):
    padding = np.full(logits.shape[:-1] + (width - logits.shape[-1],), fill, COMPUTE_DTYPE)
    return np.concatenate([logits, padding], axis=-1)


def np_log_softmax(logits, temperature=1.0):
    scaled = logits.astype(np.float64) / temperature
    shifted = scaled - scaled.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kl(p, r):
    terms = np.zeros_like(p)
    support = p > 0
    terms[support] = p[support] * (np.log(p[support]) - np.log(r[support]))
    return terms.sum(-1)


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
# Targets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_full_targets_are_log_softmax_over_the_valid_vocabulary(temperature):
    teacher = pad_columns(random_logits(1), WIDTH, 1e4)
    logprobs = targets.full_targets(teacher, temperature=temperature, valid_vocab=V)
    assert logprobs.shape == (B, T, V) and logprobs.dtype == jnp.float32
    assert_close(logprobs, np_log_softmax(teacher[..., :V], temperature))


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_topk_targets_are_the_true_top_k(temperature):
    teacher = random_logits(2)
    k = 5
    padded = pad_columns(teacher, WIDTH, 1e4)  # padding beats every real logit: never selected
    result = jax.jit(lambda x: targets.topk_targets(x, k, temperature=temperature,
                                                    valid_vocab=V))(padded)
    assert set(result) == {"ids", "logprobs", "tail"}
    assert result["ids"].dtype == jnp.int32 and result["ids"].shape == (B, T, k)
    assert result["logprobs"].dtype == jnp.float32 and result["tail"].shape == (B, T)
    expected_ids = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(result["ids"]), expected_ids)
    log_p = np_log_softmax(teacher, temperature)
    assert_close(result["logprobs"], np.take_along_axis(log_p, expected_ids, -1))
    in_top = np.zeros(log_p.shape, bool)
    np.put_along_axis(in_top, expected_ids, True, -1)
    assert_close(result["tail"], np.log(np.where(in_top, 0.0, np.exp(log_p)).sum(-1)))
    total = np.exp(np.asarray(result["tail"])) + np.exp(np.asarray(result["logprobs"])).sum(-1)
    assert_close(total, np.ones((B, T)))


def test_topk_tail_is_exact_when_tiny_and_minus_inf_when_empty():
    # One dominant logit: the tail mass is ~32 e^-30 ~ 3e-12. In float32, 1 - sum(top-k p)
    # rounds to 0 (log1p would give -inf); the logsumexp of the rest keeps full precision.
    teacher = np.full((1, 1, V), -30.0, COMPUTE_DTYPE)
    teacher[..., 7] = 0.0
    result = targets.topk_targets(teacher, 1, temperature=1.0, valid_vocab=V)
    np.testing.assert_array_equal(np.asarray(result["ids"]), [[[7]]])
    log_p = np_log_softmax(teacher)
    expected_tail = np.log(np.exp(np.delete(log_p, 7, axis=-1)).sum(-1))
    assert expected_tail[0, 0] < np.log(1e-11)
    assert_close(result["tail"], expected_tail)

    everything = targets.topk_targets(random_logits(3), V, temperature=1.0, valid_vocab=V)
    assert np.all(np.asarray(everything["tail"]) == -np.inf)
    assert_close(np.exp(np.asarray(everything["logprobs"])).sum(-1), np.ones((B, T)))


@pytest.mark.parametrize("width, k", [(4096, 16), (4099, 16), (8192, 4), (16400, 8)])
def test_two_stage_top_k_equals_a_stable_sort(width, k):
    # Widths >= 256 k take the blocked path (blocks of 16 or 32, 4099 and 16400 with a short
    # last block). Logits rounded to 1/4 tie often, and whole rows of -inf tie everywhere:
    # the ids must be those of a stable descending sort, ties to the lower id, as lax.top_k.
    logits = np.round(4 * random_logits(7, (3, 4, width))) / 4
    logits[0, 0] = -np.inf
    logits[0, 1, : width - k // 2] = -np.inf  # fewer finite values than k
    logits[1, 2] = logits[1, 2, 5]  # one value everywhere
    logits[2, 3, -1] = 1e4  # the winner in the short last block
    values, ids = jax.jit(lambda x: targets.top_k(x, k))(logits)
    expected_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(logits, expected_ids, -1))
    lax_values, lax_ids = jax.lax.top_k(logits, k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(lax_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(lax_values))


def test_topk_targets_at_a_large_vocabulary_against_float64():
    width, k = 8300, 32  # the blocked top-k, with a short last block
    teacher = random_logits(8, (1, 3, width), scale=4.0)
    result = targets.topk_targets(teacher, k, temperature=1.5, valid_vocab=width)
    log_p = np_log_softmax(teacher, 1.5)
    expected_ids = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(result["ids"]), expected_ids)
    assert_close(result["logprobs"], np.take_along_axis(log_p, expected_ids, -1))
    in_top = np.zeros(log_p.shape, bool)
    np.put_along_axis(in_top, expected_ids, True, -1)
    assert_close(result["tail"], np.log(np.where(in_top, 0.0, np.exp(log_p)).sum(-1)))


def test_sample_targets_structure_and_padding():
    n = 12
    teacher = pad_columns(random_logits(4, scale=1.0), WIDTH, 1e4)  # padding would win every draw
    keys = targets.row_keys(0, np.arange(B))
    result = jax.jit(lambda x, key_b: targets.sample_targets(
        x, key_b, n, temperature=2.0, valid_vocab=V))(teacher, keys)
    assert set(result) == {"ids", "counts", "entropy"}
    ids, counts = np.asarray(result["ids"]), np.asarray(result["counts"])
    assert ids.shape == counts.shape == (B, T, n)
    assert ids.dtype == counts.dtype == np.int32
    np.testing.assert_array_equal(counts.sum(-1), n)
    assert np.all((ids >= 0) & (ids < V)) and np.all(counts >= 0)
    for ids_n, counts_n in zip(ids.reshape(-1, n), counts.reshape(-1, n), strict=True):
        drawn = counts_n > 0
        unique = int(drawn.sum())
        assert np.all(drawn[:unique]) and not np.any(drawn[unique:])  # padding at the end
        np.testing.assert_array_equal(ids_n[unique:], 0)
        assert np.all(np.diff(ids_n[:unique]) > 0)  # unique, increasing
    p = np.exp(np_log_softmax(teacher[..., :V], 2.0))
    assert_close(result["entropy"], -(p * np.log(p)).sum(-1))


def test_sample_draws_depend_on_the_global_row_index_only():
    teacher = random_logits(5, (3, T, V), scale=1.0)

    def draw(logits, row_indices, width=V):
        return targets.sample_targets(pad_columns(logits, width, -3.0),
                                      targets.row_keys(7, np.asarray(row_indices)), 8,
                                      temperature=1.0, valid_vocab=V)

    together = draw(teacher, [10, 11, 12])
    alone = draw(teacher[2:], [12])
    wider = draw(teacher[2:], [12], width=64)
    for key in ("ids", "counts"):
        np.testing.assert_array_equal(np.asarray(alone[key])[0], np.asarray(together[key])[2])
        np.testing.assert_array_equal(np.asarray(wider[key]), np.asarray(alone[key]))
    other_seed = targets.sample_targets(teacher[2:], targets.row_keys(8, np.asarray([12])), 8,
                                        temperature=1.0, valid_vocab=V)
    assert not np.array_equal(np.asarray(other_seed["ids"]), np.asarray(alone["ids"]))


@pytest.mark.parametrize("vocab", (4096, 4100))
def test_inverse_cdf_in_two_levels_equals_numpy(vocab):
    # Vocabularies of 16 blocks of 256, without and with a short last block: the two-level
    # search. Zero quanta (never drawn) fill a whole block and more; targets include 0,
    # total - 1 and each block's boundaries, where an off-by-one would land in the neighbouring
    # block.
    rng = np.random.default_rng(11)
    quanta = rng.integers(0, 2**30 // vocab, (2, 3, vocab)).astype(np.int32)
    quanta[0, 0, 200:800] = 0
    quanta[1, 2, -4:] = 0
    cdf = np.cumsum(quanta.astype(np.int64), axis=-1)
    boundaries = cdf[..., 255::256][..., :8]
    targets_btn = np.concatenate([np.zeros((2, 3, 1)), cdf[..., -1:] - 1, boundaries - 1,
                                  boundaries, rng.integers(0, cdf[..., -1:], (2, 3, 6))],
                                 axis=-1).astype(np.int32)
    expected = np.stack([np.searchsorted(row_cdf, row_u, side="right") for row_cdf, row_u in
                         zip(cdf.reshape(-1, vocab), targets_btn.reshape(6, -1))]).reshape(
                             targets_btn.shape)
    two_levels = jax.jit(targets._inverse_cdf_btn)(quanta, targets_btn)
    one_level = jax.jit(lambda q, u: targets._inverse_cdf_btn(q, u, block=vocab))(
        quanta, targets_btn)
    np.testing.assert_array_equal(np.asarray(two_levels), expected)
    np.testing.assert_array_equal(np.asarray(one_level), expected)


def pearson_chi_square(counts, probabilities):
    expected = counts.sum() * probabilities
    assert expected.min() >= 5  # the chi-square approximation needs about 5 per cell
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_frequencies_match_the_tempered_teacher():
    # 4000 rows x 12 i.i.d. draws of one token, vocabulary 20: Pearson's statistic has 19
    # degrees of freedom; scipy.stats.chi2.ppf(1 - 1e-4, 19) = 50.80, so a correct sampler
    # fails this with probability 1e-4 (the seeds are fixed: the test is deterministic).
    vocab, rows, n, temperature = 20, 4000, 12, 2.0
    logits = random_logits(6, (1, 1, vocab), scale=1.0)
    result = targets.sample_targets(np.broadcast_to(logits, (rows, 1, vocab)),
                                    targets.row_keys(0, np.arange(rows)), n,
                                    temperature=temperature, valid_vocab=vocab)
    frequencies = np.bincount(np.asarray(result["ids"]).ravel(),
                              weights=np.asarray(result["counts"]).ravel(), minlength=vocab)
    assert frequencies.sum() == rows * n
    p_tempered = np.exp(np_log_softmax(logits[0, 0], temperature))
    assert pearson_chi_square(frequencies, p_tempered) < 50.80
    # The same check refuses the teacher at the wrong temperature: it can fail.
    p_untempered = np.exp(np_log_softmax(logits[0, 0], 1.0))
    assert pearson_chi_square(frequencies, p_untempered) > 50.80


def test_target_argument_errors():
    teacher = random_logits(0)
    with pytest.raises(ValueError, match="k must be in"):
        targets.topk_targets(teacher, V + 1, temperature=1.0, valid_vocab=V)
    with pytest.raises(ValueError, match="temperature"):
        targets.topk_targets(teacher, 2, temperature=0.0, valid_vocab=V)
    with pytest.raises(ValueError, match="valid_vocab"):
        targets.full_targets(teacher, valid_vocab=V + 1)
    with pytest.raises(ValueError, match="n must be"):
        targets.sample_targets(teacher, targets.row_keys(0, np.arange(B)), 0, temperature=1.0,
                               valid_vocab=V)
    with pytest.raises(ValueError, match="one key per row"):
        targets.sample_targets(teacher, targets.row_keys(0, np.arange(B + 1)), 4,
                               temperature=1.0, valid_vocab=V)


# ---------------------------------------------------------------------------------------------
# Full targets: exactly the dense loss, re-tempered from T = 1
# ---------------------------------------------------------------------------------------------

def loss_and_grad(loss_fn, student):
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student))
    return loss, metrics, grad


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_full_mode_equals_the_dense_loss(kind, temperature):
    student, teacher, labels, mask = batch()
    config = config_for(kind, temperature)
    stored = {"logprobs": targets.full_targets(teacher, temperature=1.0, valid_vocab=V)}
    sparse = loss_and_grad(lambda s: losses.sparse_distillation_loss(
        s, stored, labels, mask, mode="full", config=config, num_valid_tokens=8,
        valid_vocab=V), student)
    # The contract: the dense loss with the stored log-probs as teacher logits ...
    references = [stored["logprobs"]]
    if kind != "mse":  # ... which for distributions is the dense loss on the raw logits at T
        references.append(teacher)  # (mse compares logits, which log_softmax shifts)
    for reference_teacher in references:
        dense = loss_and_grad(lambda s, reference=reference_teacher: losses.distillation_loss(
            s, reference, labels, mask, config=config, num_valid_tokens=8, valid_vocab=V),
            student)
        assert_close(sparse[0], dense[0])
        for key in dense[1]:
            assert_close(sparse[1][key], dense[1][key])
        assert_close(sparse[2], dense[2])


# ---------------------------------------------------------------------------------------------
# Top-k targets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_topk_over_the_whole_vocabulary_equals_the_dense_divergence(kind, temperature):
    student, teacher, _, _ = batch()
    cached = targets.topk_targets(teacher, V, temperature=temperature, valid_vocab=V)

    def topk_sum(s):
        return jnp.sum(losses.topk_divergence_bt(
            kind, s, cached["ids"], cached["logprobs"], cached["tail"], temperature=temperature,
            beta=0.3, skew=0.2, valid_vocab=V))

    def dense_sum(s):
        return jnp.sum(losses.divergence_bt(kind, s, teacher, temperature=temperature, beta=0.3,
                                            skew=0.2, valid_vocab=V))

    per_token = losses.topk_divergence_bt(
        kind, student, cached["ids"], cached["logprobs"], cached["tail"],
        temperature=temperature, beta=0.3, skew=0.2, valid_vocab=V)
    assert per_token.shape == (B, T) and per_token.dtype == jnp.float32
    assert_close(per_token, losses.divergence_bt(kind, student, teacher, temperature=temperature,
                                                 beta=0.3, skew=0.2, valid_vocab=V))
    topk_grad = jax.grad(topk_sum)(jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(topk_grad)))
    assert_close(topk_grad, jax.grad(dense_sum)(jnp.asarray(student)))


@pytest.mark.parametrize("kind", DISTRIBUTION_KINDS)
@pytest.mark.parametrize("k", (1, 4))
def test_topk_bucketed_divergence_matches_float64_and_is_below_the_full_one(kind, k):
    temperature, beta, skew = 2.0, 0.3, 0.2
    student, teacher, _, _ = batch(1)
    cached = targets.topk_targets(teacher, k, temperature=temperature, valid_vocab=V)
    value = np.asarray(losses.topk_divergence_bt(
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
    dense = np.asarray(losses.divergence_bt(kind, student, teacher, temperature=temperature,
                                            beta=beta, skew=skew, valid_vocab=V))
    assert np.all(value <= dense + ATOL + RTOL * np.abs(dense))


def test_topk_scales_with_temperature_squared_and_pads_get_zero_gradient():
    student, teacher, _, _ = batch(2)
    temperature = 2.0
    at_t = targets.topk_targets(teacher, 3, temperature=temperature, valid_vocab=V)
    softened = targets.topk_targets(teacher / temperature, 3, temperature=1.0, valid_vocab=V)

    def divergence(s, cached, t):
        return losses.topk_divergence_bt("jsd", s, cached["ids"], cached["logprobs"],
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
    value = losses.sampled_kl_bt(pad_columns(student, WIDTH, 1e4), ids, counts, entropy,
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
    sampled = targets.sample_targets(np.broadcast_to(teacher, (rows, 1, vocab)),
                                     targets.row_keys(2025, np.arange(rows)), n,
                                     temperature=temperature, valid_vocab=vocab)
    students = jnp.broadcast_to(jnp.asarray(student), (rows, 1, vocab))
    return teacher, student, students, sampled, temperature


def exact_kl_and_grad(teacher, student, temperature):
    def kl(s):
        return jnp.sum(losses.divergence_bt("forward_kl", s, teacher, temperature=temperature))
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
        return losses.sampled_kl_bt(s, sampled["ids"], sampled["counts"], sampled["entropy"],
                                    temperature=temperature)

    assert looks_unbiased(sampled_kl, many_sample_sets)
    assert np.asarray(sampled_kl(students)).std() > 0  # a random estimator, not the exact value


def test_the_unbiasedness_check_catches_biased_estimators(many_sample_sets):
    teacher, _, _, sampled, temperature = many_sample_sets

    def ignoring_counts(s):
        # A plausible bug: averaging over the unique ids, forgetting how often each was drawn
        # (with these seeds its gradient is ~20 standard errors off, its value ~3).
        drawn = (sampled["counts"] > 0).astype(jnp.int32)
        return losses.sampled_kl_bt(s, sampled["ids"], drawn, sampled["entropy"],
                                    temperature=temperature)

    def off_by_entropy(s):
        # The entropy of the untempered teacher: the right gradient, a wrong value.
        entropy = -jnp.sum(jax.nn.softmax(teacher) * jax.nn.log_softmax(teacher), axis=-1)
        return losses.sampled_kl_bt(s, sampled["ids"], sampled["counts"],
                                    jnp.broadcast_to(entropy, sampled["entropy"].shape),
                                    temperature=temperature)

    # Renormalized top-k (the tail dropped, not bucketed): deterministic, and biased.
    cached = targets.topk_targets(teacher, 8, temperature=temperature, valid_vocab=50)
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
        cached = targets.topk_targets(teacher, 4, temperature=temperature, valid_vocab=V)
    else:
        cached = targets.sample_targets(teacher, targets.row_keys(0, np.arange(B)), 8,
                                        temperature=temperature, valid_vocab=V)
    global_tokens = 20
    loss, metrics = losses.sparse_distillation_loss(
        student, cached, labels, mask, mode=mode, config=config,
        num_valid_tokens=global_tokens, valid_vocab=V)
    kd = losses.sparse_divergence_bt(mode, kind, student, cached, temperature=temperature,
                                     beta=config.beta, skew=config.skew, valid_vocab=V)
    ce = losses.cross_entropy_bt(student, labels, valid_vocab=V)
    kd_sum, ce_sum = np.asarray(kd)[mask].sum(), np.asarray(ce)[mask].sum()
    assert set(metrics) == {"loss_sum", "kd_sum", "ce_sum", "tokens"}
    assert_close(metrics["kd_sum"], kd_sum)
    assert_close(metrics["ce_sum"], ce_sum)
    assert float(metrics["tokens"]) == mask.sum()
    assert_close(loss, (config.kd_weight * kd_sum + config.ce_weight * ce_sum) / global_tokens)
    target_grads = jax.grad(lambda c: losses.sparse_distillation_loss(
        student, {**cached, "logprobs" if mode == "topk" else "entropy": c}, labels, mask,
        mode=mode, config=config, num_valid_tokens=global_tokens, valid_vocab=V)[0])(
        cached["logprobs" if mode == "topk" else "entropy"])
    np.testing.assert_array_equal(np.asarray(target_grads), 0.0)  # the teacher is frozen


def test_sparse_argument_errors():
    student, teacher, labels, mask = batch()
    topk = targets.topk_targets(teacher, 4, temperature=1.0, valid_vocab=V)
    sample = targets.sample_targets(teacher, targets.row_keys(0, np.arange(B)), 4,
                                    temperature=1.0, valid_vocab=V)

    def loss(mode, cached, kind):
        return losses.sparse_distillation_loss(student, cached, labels, mask, mode=mode,
                                               config=config_for(kind, 1.0),
                                               num_valid_tokens=8, valid_vocab=V)

    with pytest.raises(ValueError, match="'mse' .* not defined for top-k"):
        loss("topk", topk, "mse")
    with pytest.raises(ValueError, match="'mse' .* not defined for top-k"):
        losses.topk_divergence_bt("mse", student, topk["ids"], topk["logprobs"], topk["tail"],
                                  temperature=1.0, valid_vocab=V)
    for kind in ("reverse_kl", "jsd", "tvd", "mse"):
        with pytest.raises(ValueError, match=f"{kind!r} cannot be estimated from sampled"):
            loss("sample", sample, kind)
    with pytest.raises(ValueError, match="unknown target mode"):
        loss("topp", topk, "forward_kl")
    with pytest.raises(ValueError, match=r"sample targets must be a dict with keys"):
        loss("sample", topk, "forward_kl")
    with pytest.raises(ValueError, match="temperature"):
        losses.sampled_kl_bt(student, sample["ids"], sample["counts"], sample["entropy"],
                             temperature=0.0, valid_vocab=V)
    with pytest.raises(ValueError, match="integer token ids"):
        losses.topk_divergence_bt("forward_kl", student, topk["logprobs"], topk["logprobs"],
                                  topk["tail"], temperature=1.0, valid_vocab=V)


def test_topk_slots_at_minus_infinity_are_absent_not_impossible():
    """Padding slots (id 0, log-prob -inf) leave the student's mass on id 0 in the rest bucket."""
    rng = np.random.default_rng(5)
    student = jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32)
    ids = jnp.asarray([[[3, 5, 0, 0], [0, 2, 0, 0]]], jnp.int32)  # id 0 is real in row 2 only
    logprobs = jnp.asarray([[[-0.5, -1.5, -jnp.inf, -jnp.inf], [-0.7, -1.0, -jnp.inf,
                                                               -jnp.inf]]], jnp.float32)
    tail = jnp.log1p(-jnp.exp(logprobs).sum(-1))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got = losses.topk_divergence_bt(kind, student, ids, logprobs, tail, temperature=1.0)
        # The same targets without the padding slots.
        want = losses.topk_divergence_bt(kind, student, ids[..., :2], logprobs[..., :2], tail,
                                         temperature=1.0)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=kind)
        assert np.isfinite(np.asarray(got)).all(), kind
        grads = jax.grad(lambda s: losses.topk_divergence_bt(
            kind, s, ids, logprobs, tail, temperature=1.0).sum())(student)
        assert np.isfinite(np.asarray(grads)).all(), kind
