"""kd_jax.teacher.sparse: the teacher's full, top-k and sampled targets computed from its logits,
against float64 numpy and a stable sort; the two-stage top-k and the two-level inverse CDF; the
sampler's frequencies (a statistical test, and a check that it can fail); argument errors. The
losses on these targets are tested in tests/losses/test_soft_targets.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.teacher import sparse
from tests.references import (
    COMPUTE_DTYPE,
    WIDTH,
    B,
    T,
    V,
    assert_close,
    np_log_softmax,
    pad_columns,
    random_logits,
)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_full_targets_are_log_softmax_over_the_valid_vocabulary(temperature):
    teacher = pad_columns(random_logits(1), WIDTH, 1e4)
    logprobs = sparse.full_targets(teacher, temperature=temperature, valid_vocab=V)
    assert logprobs.shape == (B, T, V) and logprobs.dtype == jnp.float32
    assert_close(logprobs, np_log_softmax(teacher[..., :V], temperature))


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_topk_targets_are_the_true_top_k(temperature):
    teacher = random_logits(2)
    k = 5
    padded = pad_columns(teacher, WIDTH, 1e4)  # padding beats every real logit: never selected
    result = jax.jit(lambda x: sparse.topk_targets(x, k, temperature=temperature,
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
    result = sparse.topk_targets(teacher, 1, temperature=1.0, valid_vocab=V)
    np.testing.assert_array_equal(np.asarray(result["ids"]), [[[7]]])
    log_p = np_log_softmax(teacher)
    expected_tail = np.log(np.exp(np.delete(log_p, 7, axis=-1)).sum(-1))
    assert expected_tail[0, 0] < np.log(1e-11)
    assert_close(result["tail"], expected_tail)

    everything = sparse.topk_targets(random_logits(3), V, temperature=1.0, valid_vocab=V)
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
    values, ids = jax.jit(lambda x: sparse.top_k(x, k))(logits)
    expected_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(logits, expected_ids, -1))
    lax_values, lax_ids = jax.lax.top_k(logits, k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(lax_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(lax_values))


def test_topk_targets_at_a_large_vocabulary_against_float64():
    width, k = 8300, 32  # the blocked top-k, with a short last block
    teacher = random_logits(8, (1, 3, width), scale=4.0)
    result = sparse.topk_targets(teacher, k, temperature=1.5, valid_vocab=width)
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
    keys = sparse.row_keys(0, np.arange(B))
    result = jax.jit(lambda x, key_b: sparse.sample_targets(
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
        return sparse.sample_targets(pad_columns(logits, width, -3.0),
                                     sparse.row_keys(7, np.asarray(row_indices)), 8,
                                     temperature=1.0, valid_vocab=V)

    together = draw(teacher, [10, 11, 12])
    alone = draw(teacher[2:], [12])
    wider = draw(teacher[2:], [12], width=64)
    for key in ("ids", "counts"):
        np.testing.assert_array_equal(np.asarray(alone[key])[0], np.asarray(together[key])[2])
        np.testing.assert_array_equal(np.asarray(wider[key]), np.asarray(alone[key]))
    other_seed = sparse.sample_targets(teacher[2:], sparse.row_keys(8, np.asarray([12])), 8,
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
    rows = zip(cdf.reshape(-1, vocab), targets_btn.reshape(6, -1), strict=True)
    expected = np.stack([np.searchsorted(row_cdf, row_u, side="right")
                         for row_cdf, row_u in rows]).reshape(targets_btn.shape)
    two_levels = jax.jit(sparse._inverse_cdf_btn)(quanta, targets_btn)
    one_level = jax.jit(lambda q, u: sparse._inverse_cdf_btn(q, u, block=vocab))(
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
    result = sparse.sample_targets(np.broadcast_to(logits, (rows, 1, vocab)),
                                   sparse.row_keys(0, np.arange(rows)), n,
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
        sparse.topk_targets(teacher, V + 1, temperature=1.0, valid_vocab=V)
    with pytest.raises(ValueError, match="temperature"):
        sparse.topk_targets(teacher, 2, temperature=0.0, valid_vocab=V)
    with pytest.raises(ValueError, match="valid_vocab"):
        sparse.full_targets(teacher, valid_vocab=V + 1)
    with pytest.raises(ValueError, match="n must be"):
        sparse.sample_targets(teacher, sparse.row_keys(0, np.arange(B)), 0, temperature=1.0,
                              valid_vocab=V)
    with pytest.raises(ValueError, match="one key per row"):
        sparse.sample_targets(teacher, sparse.row_keys(0, np.arange(B + 1)), 4,
                              temperature=1.0, valid_vocab=V)
