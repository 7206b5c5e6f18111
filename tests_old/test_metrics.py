"""kd_jax.metrics: token_stats and summarize against direct float64 numpy, exact ECE on a
hand-made example, and additivity over batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import metrics

# token_stats computes in float32; tolerances follow from that dtype and are never loosened.
COMPUTE_DTYPE = np.dtype(np.float32)
RTOL, ATOL = {np.dtype(np.float32): (1e-5, 1e-6)}[COMPUTE_DTYPE]

B, T, V, PADDED_V = 4, 6, 17, 24


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def eval_batch(seed=0):
    """Student and teacher logits with padded vocab columns, labels, and a ragged mask."""
    rng = np.random.default_rng(seed)
    student = (2.0 * rng.standard_normal((B, T, PADDED_V))).astype(COMPUTE_DTYPE)
    # The teacher often agrees with the student, so agreement is neither 0 nor 1.
    teacher = (student + 1.5 * rng.standard_normal((B, T, PADDED_V))).astype(COMPUTE_DTYPE)
    student[..., V:] = 1e4  # embedding padding: must be ignored
    teacher[..., V:] = np.nan
    labels = rng.integers(0, V, size=(B, T))
    labels[:, 0] = np.argmax(student[:, 0, :V], axis=-1)  # some certainly correct predictions
    mask = np.arange(T)[None, :] < np.array([6, 4, 2, 5])[:, None]
    student[~mask] = np.nan  # padded positions hold garbage
    labels[~mask] = -100
    return student, teacher, labels, mask


def numpy_stats(student, teacher, labels, mask, n_bins=metrics.ECE_BINS):
    """The same sums, computed directly in float64 over the valid tokens only."""
    logits = student[mask][:, :V].astype(np.float64)
    teacher_logits = teacher[mask][:, :V].astype(np.float64)
    token_labels = labels[mask]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    teacher_log_probs = teacher_logits - teacher_logits.max(-1, keepdims=True)
    teacher_log_probs -= np.log(np.exp(teacher_log_probs).sum(-1, keepdims=True))
    confidence = np.exp(log_probs.max(-1))
    # Guard the comparison itself: a confidence on a bin edge could fall either way in float32.
    edge_distance = np.abs(confidence * n_bins - np.round(confidence * n_bins))
    assert np.all(edge_distance > 1e-4), "test inputs put a confidence on a bin edge"
    bins = np.minimum(np.floor(confidence * n_bins).astype(int), n_bins - 1)
    correct = (log_probs.argmax(-1) == token_labels).astype(np.float64)
    return {
        "tokens": float(mask.sum()),
        "nll_sum": -np.take_along_axis(log_probs, token_labels[:, None], -1).sum(),
        "correct_sum": correct.sum(),
        "ece_count": np.bincount(bins, minlength=n_bins).astype(np.float64),
        "ece_conf_sum": np.bincount(bins, weights=confidence, minlength=n_bins),
        "ece_correct_sum": np.bincount(bins, weights=correct, minlength=n_bins),
        "agree_sum": float((log_probs.argmax(-1) == teacher_log_probs.argmax(-1)).sum()),
        "kl_sum": (np.exp(teacher_log_probs) * (teacher_log_probs - log_probs)).sum(),
    }


def test_token_stats_match_numpy():
    student, teacher, labels, mask = eval_batch()
    stats = metrics.token_stats(student, labels, mask, valid_vocab=V, teacher_logits_btv=teacher)
    expected = numpy_stats(student, teacher, labels, mask)
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].dtype == jnp.float32, key
        assert_close(stats[key], value)
    assert 0 < float(stats["correct_sum"]) < float(stats["tokens"])
    assert 0 < float(stats["agree_sum"]) < float(stats["tokens"])


def test_token_stats_without_teacher_has_no_teacher_keys():
    student, _, labels, mask = eval_batch()
    stats = metrics.token_stats(student, labels, mask, valid_vocab=V)
    assert "agree_sum" not in stats and "kl_sum" not in stats
    summary = metrics.summarize(jax.device_get(stats))
    assert "agreement" not in summary and "kl" not in summary


def test_token_stats_jits():
    student, teacher, labels, mask = eval_batch()
    stats_fn = jax.jit(lambda s, t, y, m: metrics.token_stats(s, y, m, valid_vocab=V,
                                                               teacher_logits_btv=t))
    jitted = stats_fn(student, teacher, labels, mask)
    eager = metrics.token_stats(student, labels, mask, valid_vocab=V, teacher_logits_btv=teacher)
    for key in eager:
        assert_close(jitted[key], eager[key])


def test_summarize_matches_numpy():
    student, teacher, labels, mask = eval_batch()
    sums = jax.device_get(metrics.token_stats(student, labels, mask, valid_vocab=V,
                                              teacher_logits_btv=teacher))
    expected = numpy_stats(student, teacher, labels, mask)
    tokens = expected["tokens"]
    summary = metrics.summarize(sums, byte_count=123.0)
    nll = expected["nll_sum"] / tokens
    assert summary["tokens"] == tokens
    assert_close(summary["nll"], nll)
    assert_close(summary["bits_per_token"], nll / math.log(2))
    assert_close(summary["bits_per_byte"], expected["nll_sum"] / math.log(2) / 123.0)
    assert_close(summary["accuracy"], expected["correct_sum"] / tokens)
    ece = np.abs(expected["ece_conf_sum"] - expected["ece_correct_sum"]).sum() / tokens
    assert_close(summary["ece"], ece)
    assert_close(summary["agreement"], expected["agree_sum"] / tokens)
    assert_close(summary["kl"], expected["kl_sum"] / tokens)
    assert "bits_per_byte" not in metrics.summarize(sums)
    with pytest.raises(ValueError, match="byte_count"):
        metrics.summarize(sums, byte_count=0)


def logits_with_confidence(confidence, predicted, vocab=3):
    """One row of logits whose softmax puts `confidence` on `predicted`, the rest spread evenly."""
    probs = np.full(vocab, (1.0 - confidence) / (vocab - 1))
    probs[predicted] = confidence
    return np.log(probs).astype(COMPUTE_DTYPE)


def test_ece_on_a_hand_made_example():
    # Bin of 0.9 (bin 13 of 15): two tokens, one right   -> |1.8 - 1| = 0.8
    # Bin of 0.7 (bin 10):       three tokens, all right -> |2.1 - 3| = 0.9
    # Confidence 1.0 goes to the last bin (14), right    -> |1.0 - 1| = 0.0
    # ECE = (0.8 + 0.9 + 0.0) / 6 tokens.
    rows = [(0.9, 0, 0), (0.9, 1, 2), (0.7, 2, 2), (0.7, 0, 0), (0.7, 1, 1)]
    logits = [logits_with_confidence(c, predicted) for c, predicted, _ in rows]
    logits.append(np.array([0.0, 200.0, 0.0], COMPUTE_DTYPE))  # softmax is exactly 1.0 in float32
    labels = [label for _, _, label in rows] + [1]
    logits_btv = np.stack(logits)[None]
    labels_bt = np.array(labels)[None]
    stats = metrics.token_stats(logits_btv, labels_bt, np.ones((1, 6), bool))
    expected_count = np.zeros(metrics.ECE_BINS)
    expected_count[[13, 10, 14]] = [2, 3, 1]
    np.testing.assert_array_equal(np.asarray(stats["ece_count"]), expected_count)
    expected_correct = np.zeros(metrics.ECE_BINS)
    expected_correct[[13, 10, 14]] = [1, 3, 1]
    np.testing.assert_array_equal(np.asarray(stats["ece_correct_sum"]), expected_correct)
    expected_conf = np.zeros(metrics.ECE_BINS)
    expected_conf[[13, 10, 14]] = [1.8, 2.1, 1.0]
    assert_close(stats["ece_conf_sum"], expected_conf)
    summary = metrics.summarize(jax.device_get(stats))
    assert_close(summary["ece"], (0.8 + 0.9) / 6)
    assert_close(summary["accuracy"], 5 / 6)


def test_sums_over_two_halves_equal_the_whole():
    student, teacher, labels, mask = eval_batch()

    def stats(rows):
        return jax.device_get(metrics.token_stats(student[rows], labels[rows], mask[rows],
                                                  valid_vocab=V, teacher_logits_btv=teacher[rows]))

    whole, first, second = stats(slice(0, B)), stats(slice(0, 1)), stats(slice(1, B))
    for key in whole:
        assert_close(first[key] + second[key], whole[key])
    combined = metrics.summarize({key: first[key] + second[key] for key in whole}, byte_count=50)
    for key, value in metrics.summarize(whole, byte_count=50).items():
        assert_close(combined[key], value)
