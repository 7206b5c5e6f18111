"""kd_jax.losses.cross_vocab: the divergence over a vocabulary map's buckets, ULD, and the hybrid
of the two (the divergence over matched buckets and a rest, ULD inside the rest), against float64
numpy references (values and gradients); one tokenizer's identity map gives `divergence_bt`
exactly; padding columns get no gradient; the hybrid chunked as unchunked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses.cross_vocab import (
    Buckets,
    CrossVocab,
    hybrid_divergence_bt,
    mapped_divergence_bt,
    uld_bt,
)
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


def buckets_of(teacher, student, teacher_width=V_T, student_width=V_S, matched=None):
    return Buckets.of(teacher, student, C, teacher_width, student_width, matched=matched)


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
    with pytest.raises(ValueError, match="needs to know which buckets are matched"):
        hybrid_divergence_bt("forward_kl", student, teacher, buckets_of(*maps), temperature=1.0)
    with pytest.raises(ValueError, match="mse"):
        hybrid_divergence_bt("mse", student, teacher, buckets_of(*maps, matched=matched_of(0)),
                             temperature=1.0)
    with pytest.raises(ValueError, match="one flag for each of the 17 buckets"):
        buckets_of(*maps, matched=np.ones(C - 1, bool))
    hidden, head = jnp.zeros((B, T, 4)), jnp.zeros((V_T, 4))
    for method, refused in (("mapped", True), ("hybrid", True), ("uld", False)):
        targets = CrossVocab(hidden, head, jnp.ones((B, T), bool), buckets_of(*maps), method)
        assert (targets.refusal("mse") is not None) == refused
        assert targets.refusal("forward_kl") is None


# ---------------------------------------------------------------------------------- hybrid

def matched_of(seed):
    """Matched flags for the C buckets: some of each."""
    matched = np.zeros(C, bool)
    matched[np.random.default_rng(seed).permutation(C)[:C // 2]] = True
    return matched


def np_hybrid(kind, p_w, q_v, teacher, student, matched, temperature, beta=0.5, skew=0.1):
    """The module docstring's hybrid in float64: the divergence over the matched buckets plus
    one rest bucket (when some bucket is unmatched), both sides restricted to their bucketed
    tokens and renormalized, T^2-scaled; plus ULD between the probabilities, as they are, of
    the tokens outside the matched buckets (of unmatched buckets or of none)."""
    p_in = np.where(teacher >= 0, p_w, 0.0)
    q_in = np.where(student >= 0, q_v, 0.0)
    p_in, q_in = p_in / p_in.sum(-1, keepdims=True), q_in / q_in.sum(-1, keepdims=True)
    in_matched_w = (teacher >= 0) & matched[np.maximum(teacher, 0)]
    in_matched_v = (student >= 0) & matched[np.maximum(student, 0)]
    coarse_p = [p_in[..., teacher == c].sum(-1) for c in np.flatnonzero(matched)]
    coarse_q = [q_in[..., student == c].sum(-1) for c in np.flatnonzero(matched)]
    if not matched.all():
        coarse_p.append(p_in[..., (teacher >= 0) & ~in_matched_w].sum(-1))
        coarse_q.append(q_in[..., (student >= 0) & ~in_matched_v].sum(-1))
    kd = temperature ** 2 * np_distribution_divergence(kind, np.stack(coarse_p, -1),
                                                       np.stack(coarse_q, -1), beta, skew)
    return kd + np_uld(p_w[..., ~in_matched_w], q_v[..., ~in_matched_v])


MATCHED = {"some": matched_of(0), "none": np.zeros(C, bool), "all": np.ones(C, bool)}


@pytest.mark.parametrize("matched", list(MATCHED))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_matches_the_float64_reference(kind, temperature, matched):
    maps, flags = bucket_maps(3), MATCHED[matched]
    student, teacher = random_logits(12, (B, T, V_S)), random_logits(13, (B, T, V_T))
    got = hybrid_divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher),
                               buckets_of(*maps, matched=flags), temperature=temperature,
                               beta=0.3, skew=0.2)
    p_w = np.exp(np_log_softmax(teacher, temperature))
    q_v = np.exp(np_log_softmax(student, temperature))
    assert_close(got, np_hybrid(kind, p_w, q_v, *maps, flags, temperature, beta=0.3, skew=0.2))


def test_hybrid_ends_are_mapped_and_uld():
    """Every bucket matched: the mapped divergence, plus ULD between the probabilities of the
    tokens of no bucket. None: ULD, the divergence over the one rest bucket being 0."""
    maps = bucket_maps(4)
    student, teacher = jnp.asarray(random_logits(14, (B, T, V_S))), jnp.asarray(
        random_logits(15, (B, T, V_T)))
    got = hybrid_divergence_bt("jsd", student, teacher, buckets_of(*maps, matched=MATCHED["all"]),
                               temperature=2.0)
    p_w = np.exp(np_log_softmax(np.asarray(teacher), 2.0))
    q_v = np.exp(np_log_softmax(np.asarray(student), 2.0))
    mapped = mapped_divergence_bt("jsd", student, teacher, buckets_of(*maps), temperature=2.0)
    assert_close(got, np.asarray(mapped) + np_uld(p_w[..., maps[0] < 0], q_v[..., maps[1] < 0]))
    uld = uld_bt(student, teacher, temperature=2.0)
    got = hybrid_divergence_bt("jsd", student, teacher,
                               buckets_of(*maps, matched=MATCHED["none"]), temperature=2.0)
    assert_close(got, uld)
    # No bucket at all (two vocabularies with nothing in common): ULD as well.
    nothing = Buckets.of(np.full(V_T, -1), np.full(V_S, -1), 0, V_T, V_S,
                         matched=np.zeros(0, bool))
    assert_close(hybrid_divergence_bt("jsd", student, teacher, nothing, temperature=2.0), uld)


@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_with_one_tokenizer_s_identity_map_gives_the_dense_divergence_exactly(kind):
    student, teacher = random_logits(16, (B, T, V_S)), random_logits(17, (B, T, V_S))
    got = hybrid_divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher),
                               Buckets.identity(V_S, V_S), temperature=2.0)
    want = divergence_bt(kind, jnp.asarray(student), jnp.asarray(teacher), temperature=2.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_hybrid_gradient_matches_float64_finite_differences(kind):
    """Central differences of the float64 reference, one student logit column at a time (each
    position's value depends on its own logits only, so a column moves every position at
    once); padded columns get no gradient."""
    maps, flags, temperature, step = bucket_maps(5), matched_of(5), 2.0, 1e-6
    student = pad_columns(random_logits(18, (B, T, V_S)), 32, 1e4)
    teacher = random_logits(19, (B, T, V_T))
    buckets = buckets_of(*maps, student_width=32, matched=flags)
    grad = jax.grad(lambda s: jnp.sum(hybrid_divergence_bt(
        kind, s, jnp.asarray(teacher), buckets, temperature=temperature, student_valid=V_S)))(
        jnp.asarray(student))
    p_w = np.exp(np_log_softmax(teacher, temperature))

    def reference(logits):
        q_v = np.exp(np_log_softmax(logits, temperature))
        return np_hybrid(kind, p_w, q_v, *maps, flags, temperature)

    logits = student[..., :V_S].astype(np.float64)
    expected = np.zeros((B, T, V_S))
    for column in range(V_S):
        up, down = logits.copy(), logits.copy()
        up[..., column] += step
        down[..., column] -= step
        expected[..., column] = (reference(up) - reference(down)) / (2 * step)
    assert_close(np.asarray(grad)[..., :V_S], expected)
    np.testing.assert_array_equal(np.asarray(grad)[..., V_S:], 0.0)


def test_hybrid_through_the_chunked_head_is_unchunked():
    """CrossVocab targets of the hybrid method, a third of the positions unaligned, through the
    objective with the fused head in chunks of 3 positions and whole."""
    import dataclasses

    from tests.helpers import LOSS, VALID_VOCAB, make_batch
    from tests.losses.test_chunked import BATCH, SEQ, objective_grads, with_chunks
    from tests.losses.test_chunked import assert_close as assert_paths_close

    rng = np.random.default_rng(20)
    teacher_bucket = np.concatenate([np.arange(C), rng.integers(-1, C, VALID_VOCAB - C)])
    student_bucket = np.concatenate([np.arange(C), rng.integers(-1, C, VALID_VOCAB - C)])
    buckets = Buckets.of(rng.permutation(teacher_bucket), rng.permutation(student_bucket), C,
                         64, 64, matched=matched_of(6))
    hidden = rng.normal(size=(BATCH, SEQ, 32)).astype(np.float32)
    head = (0.3 * rng.normal(size=(64, 32))).astype(np.float32)
    targets = CrossVocab(rng.normal(size=(BATCH, SEQ, 48)).astype(np.float32),
                         (0.3 * rng.normal(size=(64, 48))).astype(np.float32),
                         rng.random((BATCH, SEQ)) > 1 / 3, buckets, "hybrid", VALID_VOCAB)
    batch = make_batch(3)
    loss_cfg = dataclasses.replace(LOSS, divergence="jsd", ce_weight=0.3)
    chunked = objective_grads(with_chunks(loss_cfg, 3), hidden, head, targets, batch)
    assert_paths_close(chunked, objective_grads(dataclasses.replace(loss_cfg, chunk_tokens=-1),
                                                hidden, head, targets, batch))
    assert float(chunked[0][1]["kd_sum"]) > 0
