"""kd_jax.losses.cross_vocab: the divergence over a vocabulary map's buckets and ULD, against
float64 numpy references (values and gradients); one tokenizer's identity map gives
`divergence_bt` exactly; padding columns get no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses.cross_vocab import Buckets, mapped_divergence_bt, uld_bt
from kd_jax.losses.divergences import divergence_bt
from tests.losses.test_soft_targets import np_distribution_divergence
from tests.references import assert_close, np_log_softmax, pad_columns, random_logits

B, T = 2, 5
V_S, V_T = 29, 37  # the student's and the teacher's valid vocabularies
KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


C = 17  # buckets


def bucket_maps(seed=0):
    """(teacher buckets [V_T], student buckets [V_S]): every bucket with members on both sides,
    several members in some, and tokens of no bucket on both sides."""
    rng = np.random.default_rng(seed)
    teacher = np.concatenate([np.arange(C), rng.integers(0, C, V_T - C)])
    student = np.concatenate([np.arange(C), rng.integers(0, C, V_S - C)])
    teacher[rng.permutation(V_T)[C:C + 4]] = -1  # never the first member of a bucket
    teacher[:C] = np.arange(C)
    student[C + 1:C + 4] = -1
    return rng.permutation(teacher).astype(np.int32), rng.permutation(student).astype(np.int32)


def buckets_of(teacher, student, teacher_width=V_T, student_width=V_S):
    return Buckets.of(teacher, student, C, teacher_width, student_width)


def np_buckets(p_w, q_v, teacher, student):
    """Both distributions gathered into the C buckets and renormalized there, float64."""
    p = np.stack([p_w[..., teacher == c].sum(-1) for c in range(C)], -1)
    q = np.stack([q_v[..., student == c].sum(-1) for c in range(C)], -1)
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_divergence_matches_the_float64_buckets(kind, temperature):
    maps = bucket_maps()
    student, teacher = random_logits(1, (B, T, V_S)), random_logits(2, (B, T, V_T))
    got = mapped_divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher),
                               buckets_of(*maps), temperature=temperature)
    p_w = np.exp(np_log_softmax(teacher, temperature))
    q_v = np.exp(np_log_softmax(student, temperature))
    p, q = np_buckets(p_w, q_v, *maps)
    assert_close(got, temperature ** 2 * np_distribution_divergence(kind, p, q))


def test_mapped_forward_kl_gradient_matches_the_closed_form():
    """With Q_c the student's mass in bucket c and Z its mass in all buckets, d/dz_s of
    T^2 KL(P || Q / Z) is T q_s (1 / Z - P_c / Q_c) for s in bucket c, 0 for s in none."""
    maps, temperature = bucket_maps(1), 2.0
    student, teacher = random_logits(3, (B, T, V_S)), random_logits(4, (B, T, V_T))
    grad = jax.grad(lambda s: jnp.sum(mapped_divergence_bt(
        "forward_kl", s, jnp.asarray(teacher), buckets_of(*maps), temperature=temperature)))(
        jnp.asarray(student))
    p_w = np.exp(np_log_softmax(teacher, temperature))
    q_v = np.exp(np_log_softmax(student, temperature))
    p, _ = np_buckets(p_w, q_v, *maps)
    student_buckets = maps[1]
    q = np.stack([q_v[..., student_buckets == c].sum(-1) for c in range(C)], -1)
    z = q.sum(-1, keepdims=True)
    c = np.maximum(student_buckets, 0)
    expected = np.where(student_buckets >= 0,
                        temperature * q_v * (1 / z - p[..., c] / q[..., c]), 0.0)
    assert_close(grad, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_one_tokenizer_s_identity_map_gives_the_dense_divergence_exactly(kind):
    student, teacher = random_logits(5, (B, T, V_S)), random_logits(6, (B, T, V_S))
    identity = Buckets.identity(V_S, V_S)
    got = mapped_divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher), identity,
                               temperature=2.0)
    want = divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher), temperature=2.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_padding_columns_get_no_mass_and_no_gradient():
    maps = bucket_maps(2)
    student = pad_columns(random_logits(7, (B, T, V_S)), 32, 1e4)  # garbage past the vocabulary
    teacher = pad_columns(random_logits(8, (B, T, V_T)), 40, 1e4)
    buckets = buckets_of(*maps, 40, 32)
    for loss in (lambda s: mapped_divergence_bt(
            "forward_kl", s, jnp.asarray(teacher), buckets, temperature=1.0, student_valid=V_S,
            teacher_valid=V_T),
            lambda s: uld_bt(s, jnp.asarray(teacher), temperature=1.0, student_valid=V_S,
                             teacher_valid=V_T)):
        value, grad = jax.value_and_grad(lambda s, f=loss: jnp.sum(f(s)))(jnp.asarray(student))
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_array_equal(np.asarray(grad)[..., V_S:], 0.0)
    unpadded = mapped_divergence_bt("forward_kl", jnp.asarray(student[..., :V_S]),
                                    jnp.asarray(teacher[..., :V_T]),
                                    buckets_of(*maps), temperature=1.0)
    assert_close(mapped_divergence_bt("forward_kl", jnp.asarray(student), jnp.asarray(teacher),
                                      buckets, temperature=1.0, student_valid=V_S,
                                      teacher_valid=V_T), unpadded)


def np_uld(p, q):
    width = max(p.shape[-1], q.shape[-1])
    sort = lambda x: np.pad(-np.sort(-x, axis=-1),  # noqa: E731
                            [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    return np.abs(sort(p) - sort(q)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_uld_value_and_gradient_match_float64(temperature):
    student, teacher = random_logits(9, (B, T, V_S)), random_logits(10, (B, T, V_T))
    value, grad = jax.value_and_grad(lambda s: jnp.sum(uld_bt(
        s, jnp.asarray(teacher), temperature=temperature)))(jnp.asarray(student))
    p = np.exp(np_log_softmax(teacher, temperature))
    q = np.exp(np_log_softmax(student, temperature))
    assert_close(uld_bt(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature),
                 np_uld(p, q))
    # d|P_(i) - Q_(i)|/dQ_(i) = sign(Q_(i) - P_(i)), sorted positions back to ids, through the
    # softmax at T: dL/dz = q (g - sum q g) / T.
    width = max(V_S, V_T)
    p_sorted = np.pad(-np.sort(-p, axis=-1), [(0, 0), (0, 0), (0, width - V_T)])
    order = np.argsort(-q, axis=-1)
    g_sorted = np.sign(np.take_along_axis(q, order, -1) - p_sorted[..., :V_S])
    g = np.zeros_like(q)
    np.put_along_axis(g, order, g_sorted, -1)
    expected = q * (g - (q * g).sum(-1, keepdims=True)) / temperature
    assert_close(grad, expected)
    assert float(value) > 0


def test_uld_is_zero_for_the_same_shape_and_blind_to_which_token():
    logits = random_logits(11, (B, T, V_S))
    shuffled = logits[..., np.random.default_rng(0).permutation(V_S)]
    widened = pad_columns(shuffled, V_S + 8, -1e4)  # a wider vocabulary holding the same mass
    got = uld_bt(jnp.asarray(logits), jnp.asarray(widened), temperature=1.0)
    np.testing.assert_allclose(np.asarray(got), 0.0, atol=1e-6)


def test_bad_arguments_are_refused():
    maps = bucket_maps()
    student, teacher = jnp.zeros((B, T, V_S)), jnp.zeros((B, T, V_T))
    with pytest.raises(ValueError, match="mse"):
        mapped_divergence_bt("mse", student, teacher, buckets_of(*maps), temperature=1.0)
    with pytest.raises(ValueError, match="made for 40 student logits"):
        mapped_divergence_bt("forward_kl", student, teacher, buckets_of(*maps, V_T, 40),
                             temperature=1.0)
    with pytest.raises(ValueError, match="more than the student's 10 logits"):
        buckets_of(*maps, V_T, 10)
    with pytest.raises(ValueError, match="past the 5 buckets"):
        Buckets.of(*maps, 5, V_T, V_S)
    with pytest.raises(ValueError, match="temperature"):
        uld_bt(student, teacher, temperature=0.0)
