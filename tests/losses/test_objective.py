"""kd_jax.losses.objective: the aggregated loss on logits, with the teacher's dense logits
(`Dense`) or without a teacher (None, hard labels). Masking, the global token count,
microbatches, weights, the frozen teacher, teacher/student padding, gradients and NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.config import LossConfig
from kd_jax.losses.divergences import DIVERGENCES, divergence_bt
from kd_jax.losses.objective import objective_on_logits
from kd_jax.losses.soft_targets import Dense
from tests.losses.test_divergences import (
    TEMPERATURES,
    batch,
    config_for,
    np_cross_entropy,
    np_divergence,
)
from tests.references import COMPUTE_DTYPE, B, T, V, assert_close, pad_columns, random_logits


@pytest.fixture
def pair():
    """(student, teacher) float32 logits [B, T, V], as in test_divergences.py."""
    return random_logits(0), random_logits(1)


def distillation_loss(student, teacher, labels, mask, **kwargs):
    """The objective with the teacher's dense logits (the old `losses.distillation_loss`)."""
    return objective_on_logits(student, Dense(teacher), labels, mask, **kwargs)


# ---------------------------------------------------------------------------------------------
# Masking and aggregation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
def test_padded_positions_do_not_change_the_loss(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    clean_loss, clean_metrics = distillation_loss(
        student, teacher, labels, mask, config=config, num_valid_tokens=mask.sum())
    for garbage in (1e30, -1e30, np.inf, np.nan):
        dirty_student = np.where(mask[..., None], student, garbage).astype(COMPUTE_DTYPE)
        dirty_teacher = np.where(mask[..., None], teacher, -garbage).astype(COMPUTE_DTYPE)
        dirty_labels = np.where(mask, labels, -100)
        loss, metrics = distillation_loss(
            dirty_student, dirty_teacher, dirty_labels, mask, config=config,
            num_valid_tokens=mask.sum())
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(clean_loss))
        for key in clean_metrics:
            np.testing.assert_array_equal(np.asarray(metrics[key]), np.asarray(clean_metrics[key]))


def _targets_of_each_kind(teacher, temperature):
    """The teacher as dense logits, top-k and sampled targets (jax arrays)."""
    from kd_jax.losses.soft_targets import Sampled, TopK
    from kd_jax.teacher import sparse

    teacher = jnp.asarray(teacher)
    topk = sparse.topk_targets(teacher, 4, temperature=temperature, valid_vocab=None)
    sampled = sparse.sample_targets(teacher, sparse.row_keys(0, jnp.arange(teacher.shape[0])),
                                    6, temperature=temperature, valid_vocab=None)
    return {"dense": Dense(teacher), "topk": TopK(**topk), "sampled": Sampled(**sampled)}


def _poisoned(targets, mask, value):
    """`targets` with `value` (inf, -inf, NaN, huge) in every float at masked positions, and ids
    and counts out of range there."""
    def poison(leaf):
        where_bt = mask if leaf.ndim == 2 else mask[..., None]
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.where(where_bt, leaf, jnp.asarray(value, leaf.dtype))
        return jnp.where(where_bt, leaf, 10**6)
    return jax.tree.map(poison, targets)


@pytest.mark.parametrize("target_kind", ["dense", "topk", "sampled"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_nothing_at_masked_positions_reaches_the_gradient(kind, target_kind):
    """inf, -inf, NaN and huge values at every masked position, in the student's logits, the
    labels and every field of the targets: the loss and its gradient are the clean ones."""
    from kd_jax.losses.soft_targets import Sampled, TopK

    config = config_for(kind)
    student, teacher, labels, mask = batch()
    targets = _targets_of_each_kind(teacher, config.temperature)[target_kind]
    if type(targets).refusal(kind) is not None:
        pytest.skip(f"{target_kind} targets do not serve {kind}")
    mask_j = jnp.asarray(mask)

    def loss_and_grad(student_logits, soft_targets, labels_bt):
        return jax.value_and_grad(lambda s: objective_on_logits(
            s, soft_targets, labels_bt, mask_j, config=config,
            num_valid_tokens=mask.sum())[0])(student_logits)

    clean_loss, clean_grad = loss_and_grad(jnp.asarray(student), targets, jnp.asarray(labels))
    assert np.isfinite(clean_loss) and np.isfinite(clean_grad).all()
    for value in (np.inf, -np.inf, np.nan, 1e30):
        dirty_student = jnp.where(mask_j[..., None], student, value).astype(COMPUTE_DTYPE)
        loss, grad = loss_and_grad(dirty_student, _poisoned(targets, mask_j, value),
                                   jnp.where(mask_j, labels, -100))
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(clean_loss), err_msg=value)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad), err_msg=value)
    assert isinstance(targets, (Dense, TopK, Sampled))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_loss_is_masked_sum_over_global_token_count(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    global_tokens = 40  # e.g. the whole global batch, of which this is one microbatch
    loss, metrics = distillation_loss(student, teacher, labels, mask, config=config,
                                      num_valid_tokens=global_tokens)
    kd = np_divergence(kind, student, teacher, config.temperature, config.beta, config.skew)
    ce = np_cross_entropy(student, labels)
    kd_sum, ce_sum = kd[mask].sum(), ce[mask].sum()
    loss_sum = config.kd_weight * kd_sum + config.ce_weight * ce_sum
    assert_close(metrics["kd_sum"], kd_sum)
    assert_close(metrics["ce_sum"], ce_sum)
    assert_close(metrics["loss_sum"], loss_sum)
    assert float(metrics["tokens"]) == mask.sum()
    assert_close(loss, loss_sum / global_tokens)
    assert all(value.dtype == jnp.float32 and value.shape == () for value in metrics.values())


@pytest.mark.parametrize("kind", ("forward_kl", "jsd", "mse"))
def test_microbatches_sum_to_the_whole_batch(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    total_tokens = int(mask.sum())

    def loss_and_grad(rows):
        def loss_fn(student_rows):
            return distillation_loss(student_rows, teacher[rows], labels[rows], mask[rows],
                                     config=config, num_valid_tokens=total_tokens)
        return jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student[rows]))

    (whole, whole_metrics), whole_grad = loss_and_grad(slice(0, 4))
    (first, first_metrics), first_grad = loss_and_grad(slice(0, 2))
    (second, second_metrics), second_grad = loss_and_grad(slice(2, 4))
    assert_close(first + second, whole)
    assert_close(np.concatenate([first_grad, second_grad]), whole_grad)
    for key in whole_metrics:
        assert_close(first_metrics[key] + second_metrics[key], whole_metrics[key])


def test_integer_mask_equals_boolean_mask_and_empty_mask_gives_zero():
    student, teacher, labels, mask = batch()
    config = config_for("forward_kl")
    with_bool, _ = distillation_loss(student, teacher, labels, mask, config=config,
                                     num_valid_tokens=mask.sum())
    with_int, _ = distillation_loss(student, teacher, labels, mask.astype(np.int32),
                                    config=config, num_valid_tokens=mask.sum())
    np.testing.assert_array_equal(np.asarray(with_bool), np.asarray(with_int))
    empty = np.zeros_like(mask)
    loss, metrics = distillation_loss(student, teacher, labels, empty, config=config,
                                      num_valid_tokens=0)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0


def test_weights_select_the_terms():
    student, teacher, labels, mask = batch()
    n = mask.sum()
    kd_only, metrics = distillation_loss(
        student, teacher, labels, mask, config=config_for("tvd", ce_weight=0.0),
        num_valid_tokens=n)
    assert_close(kd_only, 0.7 * metrics["kd_sum"] / n)
    ce_only, metrics = distillation_loss(
        student, teacher, labels, mask, config=config_for("tvd", kd_weight=0.0),
        num_valid_tokens=n)
    assert_close(ce_only, 0.4 * metrics["ce_sum"] / n)


def test_teacher_receives_no_gradient():
    student, teacher, labels, mask = batch()
    grad = jax.grad(lambda t: distillation_loss(
        student, t, labels, mask, config=config_for("jsd"), num_valid_tokens=mask.sum())[0])(
        jnp.asarray(teacher))
    np.testing.assert_array_equal(np.asarray(grad), np.zeros_like(teacher))


def test_hard_label_loss():
    # Without soft targets (the old `losses.hard_label_loss`): the cross-entropy alone.
    student, _, labels, mask = batch()
    dirty_student = np.where(mask[..., None], student, np.nan).astype(COMPUTE_DTYPE)
    loss, metrics = objective_on_logits(dirty_student, None, np.where(mask, labels, -100), mask,
                                        config=LossConfig(), num_valid_tokens=20)
    ce_sum = np_cross_entropy(student, labels)[mask].sum()
    assert set(metrics) == {"loss_sum", "ce_sum", "tokens"}
    assert_close(metrics["ce_sum"], ce_sum)
    assert_close(metrics["loss_sum"], ce_sum)
    assert float(metrics["tokens"]) == mask.sum()
    assert_close(loss, ce_sum / 20)


# ---------------------------------------------------------------------------------------------
# Vocabulary padding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
def test_teacher_and_student_with_different_padding(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    expected, expected_metrics = distillation_loss(
        student, teacher, labels, mask, config=config, num_valid_tokens=mask.sum())
    loss, metrics = distillation_loss(
        pad_columns(student, 40, 5e3), pad_columns(teacher, 64, -5e3), labels, mask,
        config=config, num_valid_tokens=mask.sum(), valid_vocab=V)
    assert_close(loss, expected)
    for key in expected_metrics:
        assert_close(metrics[key], expected_metrics[key])
    with pytest.raises(ValueError, match="valid_vocab"):
        divergence_bt(kind, pad_columns(student, 40, 0.0), teacher, temperature=1.0)


# ---------------------------------------------------------------------------------------------
# Gradients and NaN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradients_are_finite_with_infinite_and_very_negative_logits(kind, pair):
    student, teacher = pair
    student, teacher = student.copy(), teacher.copy()
    # Columns 0-3 impossible for both; very negative, but finite, logits elsewhere.
    if kind != "mse":  # (-inf) - (-inf) has no meaning as a squared error
        student[..., :4] = -np.inf
        teacher[..., :4] = -np.inf
    student[..., 4] = -1e9
    teacher[..., 5] = -1e9
    # A one-hot teacher; a squared error of 1e30-sized logits would overflow float32 honestly.
    teacher[0, 0, 7:] = -1e9 if kind == "mse" else -1e30
    if kind in ("forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"):
        # Impossible for the teacher only: still finite for these (not for reverse KL: infinite).
        teacher[..., 6] = -np.inf
    labels = np.random.default_rng(5).integers(6, V, size=(B, T))
    mask = np.ones((B, T), bool)
    for temperature in TEMPERATURES:
        def loss_fn(s, t, temperature=temperature):
            config = config_for(kind, temperature=temperature)
            return distillation_loss(s, t, labels, mask, config=config,
                                     num_valid_tokens=mask.sum())[0]
        loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student), jnp.asarray(teacher))
        assert np.isfinite(float(loss))
        assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("broken", ["teacher", "student"])
def test_nan_logits_at_a_valid_position_make_the_loss_nan(kind, broken, pair):
    # A NaN must surface (the step then records a non-finite step), never be read as p = 0.
    student, teacher = (x.copy() for x in pair)
    (teacher if broken == "teacher" else student)[0, 0, 3] = np.nan
    mask = np.ones((B, T), bool)
    loss, _ = distillation_loss(student, teacher, np.zeros((B, T), np.int32), mask,
                                config=config_for(kind), num_valid_tokens=mask.sum())
    assert np.isnan(float(loss))


def test_distillation_loss_jits(pair):
    student, teacher = pair
    labels = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), bool)
    step = jax.jit(lambda s, t, n: distillation_loss(
        s, t, labels, mask, config=config_for("skew_kl"), num_valid_tokens=n))
    eager = distillation_loss(student, teacher, labels, mask, config=config_for("skew_kl"),
                              num_valid_tokens=B * T)
    assert_close(step(student, teacher, jnp.float32(B * T))[0], eager[0])
