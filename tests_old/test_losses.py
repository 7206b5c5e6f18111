"""kd_jax.losses: invariants of the math, golden values (float64 numpy, PyTorch), masking,
vocabulary padding, gradients, dtypes and argument checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kd_jax import losses
from kd_jax.config import LossConfig

# The losses compute in float32; tolerances follow from that dtype and are never loosened.
COMPUTE_DTYPE = np.dtype(np.float32)
RTOL, ATOL = {np.dtype(np.float32): (1e-5, 1e-6)}[COMPUTE_DTYPE]

B, T, V = 2, 5, 33
TEMPERATURES = (1.0, 2.0, 0.5)
PROBABILITY_KINDS = tuple(kind for kind in losses.DIVERGENCES if kind != "mse")


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def random_logits(seed, shape=(B, T, V), scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(COMPUTE_DTYPE)


@pytest.fixture
def pair():
    """(student, teacher) float32 logits [B, T, V]."""
    return random_logits(0), random_logits(1)


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------

def np_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def np_kl(p, r):
    terms = np.zeros_like(p)
    support = p > 0
    terms[support] = p[support] * (np.log(p[support]) - np.log(r[support]))
    return terms.sum(-1)


def np_divergence(kind, student, teacher, temperature, beta=0.5, skew=0.1):
    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    p, q = np_softmax(teacher / temperature), np_softmax(student / temperature)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        value = np_kl(p, q)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        value = np_kl(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        value = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    elif kind == "skew_kl":
        value = np_kl(p, skew * p + (1 - skew) * q)
    elif kind == "skew_reverse_kl":
        value = np_kl(q, (1 - skew) * p + skew * q)
    elif kind == "tvd":
        value = 0.5 * np.abs(p - q).sum(-1)
    else:  # mse
        value = ((student / temperature - teacher / temperature) ** 2).mean(-1)
    return temperature**2 * value


def np_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_of_identical_distributions_is_zero(kind, temperature, pair):
    student, _ = pair
    value = losses.divergence_bt(kind, student, student, temperature=temperature, beta=0.3)
    assert value.shape == (B, T) and value.dtype == jnp.float32
    assert_close(value, np.zeros((B, T)))


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_divergences_are_nonnegative(kind):
    for seed in range(3):
        value = losses.divergence_bt(kind, random_logits(10 + seed), random_logits(20 + seed),
                                     temperature=1.5, beta=0.7, skew=0.3)
        assert np.all(np.asarray(value) >= -ATOL)
        assert np.all(np.asarray(value) > ATOL)  # random distributions differ


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_squared_scaling(kind, temperature, pair):
    # Hinton et al. 2015: the loss at T is T^2 times the divergence of the softened logits.
    student, teacher = pair
    at_t = losses.divergence_bt(kind, student, teacher, temperature=temperature)
    softened = losses.divergence_bt(kind, student / temperature, teacher / temperature,
                                    temperature=1.0)
    assert_close(at_t, temperature**2 * np.asarray(softened))


def test_forward_kl_at_temperature_is_t_squared_times_float64_softened_kl(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        p = np_softmax(teacher.astype(np.float64) / temperature)
        q = np_softmax(student.astype(np.float64) / temperature)
        value = losses.divergence_bt("forward_kl", student, teacher, temperature=temperature)
        assert_close(value, temperature**2 * np_kl(p, q))


def test_forward_and_reverse_kl_are_the_same_function_with_roles_swapped(pair):
    student, teacher = pair
    forward = losses.divergence_bt("forward_kl", student, teacher, temperature=2.0)
    reverse_swapped = losses.divergence_bt("reverse_kl", teacher, student, temperature=2.0)
    reverse = losses.divergence_bt("reverse_kl", student, teacher, temperature=2.0)
    np.testing.assert_array_equal(np.asarray(forward), np.asarray(reverse_swapped))
    assert not np.allclose(np.asarray(forward), np.asarray(reverse), rtol=RTOL, atol=ATOL)


def test_jsd_endpoints_are_forward_and_reverse_kl(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        def divergence(kind, **kwargs):
            return np.asarray(losses.divergence_bt(kind, student, teacher,
                                                   temperature=temperature, **kwargs))
        np.testing.assert_array_equal(divergence("jsd", beta=0.0), divergence("forward_kl"))
        np.testing.assert_array_equal(divergence("jsd", beta=1.0), divergence("reverse_kl"))


def test_jsd_is_symmetric_at_half(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        one_way = losses.divergence_bt("jsd", student, teacher, temperature=temperature, beta=0.5)
        swapped = losses.divergence_bt("jsd", teacher, student, temperature=temperature, beta=0.5)
        assert_close(one_way, swapped)


def test_jsd_is_bounded_by_log_two_before_scaling(pair):
    student, teacher = pair
    value = losses.divergence_bt("jsd", student, teacher, temperature=1.0, beta=0.5)
    assert np.all(np.asarray(value) <= np.log(2.0) + ATOL)


def test_skew_zero_is_plain_kl_and_skew_one_is_zero(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        def divergence(kind, **kwargs):
            return losses.divergence_bt(kind, student, teacher, temperature=temperature, **kwargs)
        assert_close(divergence("skew_kl", skew=0.0), divergence("forward_kl"))
        assert_close(divergence("skew_reverse_kl", skew=0.0), divergence("reverse_kl"))
        assert_close(divergence("skew_kl", skew=1.0), np.zeros((B, T)))
        assert_close(divergence("skew_reverse_kl", skew=1.0), np.zeros((B, T)))


def test_mse_does_not_depend_on_temperature(pair):
    student, teacher = pair
    values = [losses.divergence_bt("mse", student, teacher, temperature=temperature)
              for temperature in TEMPERATURES]
    for value in values[1:]:
        assert_close(value, values[0])


# ---------------------------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_matches_float64_numpy(kind, temperature, pair):
    student, teacher = pair
    for beta, skew in ((0.5, 0.1), (0.2, 0.4), (0.9, 0.9)):
        value = losses.divergence_bt(kind, student, teacher, temperature=temperature,
                                     beta=beta, skew=skew)
        assert value.dtype == jnp.float32
        assert_close(value, np_divergence(kind, student, teacher, temperature, beta, skew))


def test_cross_entropy_matches_float64_numpy(pair):
    student, _ = pair
    labels = np.random.default_rng(2).integers(0, V, size=(B, T))
    value = losses.cross_entropy_bt(student, jnp.asarray(labels))
    assert value.dtype == jnp.float32
    assert_close(value, np_cross_entropy(student, labels))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_and_reverse_kl_match_torch(temperature, pair):
    student, teacher = pair
    log_q = torch.log_softmax(torch.from_numpy(student).double() / temperature, dim=-1)
    log_p = torch.log_softmax(torch.from_numpy(teacher).double() / temperature, dim=-1)
    kl_div = torch.nn.functional.kl_div
    forward = kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * temperature**2
    reverse = kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1) * temperature**2
    assert_close(losses.divergence_bt("forward_kl", student, teacher, temperature=temperature),
                 forward.numpy())
    assert_close(losses.divergence_bt("reverse_kl", student, teacher, temperature=temperature),
                 reverse.numpy())


def test_cross_entropy_matches_torch(pair):
    student, _ = pair
    labels = np.random.default_rng(3).integers(0, V, size=(B, T))
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(student).double().reshape(-1, V), torch.from_numpy(labels).reshape(-1),
        reduction="none").reshape(B, T)
    assert_close(losses.cross_entropy_bt(student, jnp.asarray(labels)), expected.numpy())


# ---------------------------------------------------------------------------------------------
# Masking and aggregation
# ---------------------------------------------------------------------------------------------

def batch(seed=0, batch_size=4):
    """A batch whose mask leaves ragged padding at the end of each row."""
    rng = np.random.default_rng(seed)
    student = random_logits(seed + 100, (batch_size, T, V))
    teacher = random_logits(seed + 200, (batch_size, T, V))
    labels = rng.integers(0, V, size=(batch_size, T))
    lengths = np.array([T, 3, 1, 4, 2, 5][:batch_size])
    mask = np.arange(T)[None, :] < lengths[:, None]
    return student, teacher, labels, mask


def config_for(kind, **overrides):
    return dataclasses.replace(LossConfig(divergence=kind, temperature=2.0, beta=0.3, skew=0.2,
                                          kd_weight=0.7, ce_weight=0.4), **overrides)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_padded_positions_do_not_change_the_loss(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    clean_loss, clean_metrics = losses.distillation_loss(
        student, teacher, labels, mask, config=config, num_valid_tokens=mask.sum())
    for garbage in (1e30, -1e30, np.inf, np.nan):
        dirty_student = np.where(mask[..., None], student, garbage).astype(COMPUTE_DTYPE)
        dirty_teacher = np.where(mask[..., None], teacher, -garbage).astype(COMPUTE_DTYPE)
        dirty_labels = np.where(mask, labels, -100)
        loss, metrics = losses.distillation_loss(
            dirty_student, dirty_teacher, dirty_labels, mask, config=config,
            num_valid_tokens=mask.sum())
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(clean_loss))
        for key in clean_metrics:
            np.testing.assert_array_equal(np.asarray(metrics[key]), np.asarray(clean_metrics[key]))


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_loss_is_masked_sum_over_global_token_count(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    global_tokens = 40  # e.g. the whole global batch, of which this is one microbatch
    loss, metrics = losses.distillation_loss(student, teacher, labels, mask, config=config,
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
            return losses.distillation_loss(student_rows, teacher[rows], labels[rows], mask[rows],
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
    with_bool, _ = losses.distillation_loss(student, teacher, labels, mask, config=config,
                                            num_valid_tokens=mask.sum())
    with_int, _ = losses.distillation_loss(student, teacher, labels, mask.astype(np.int32),
                                           config=config, num_valid_tokens=mask.sum())
    np.testing.assert_array_equal(np.asarray(with_bool), np.asarray(with_int))
    empty = np.zeros_like(mask)
    loss, metrics = losses.distillation_loss(student, teacher, labels, empty, config=config,
                                             num_valid_tokens=0)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0


def test_weights_select_the_terms():
    student, teacher, labels, mask = batch()
    n = mask.sum()
    kd_only, metrics = losses.distillation_loss(
        student, teacher, labels, mask, config=config_for("tvd", ce_weight=0.0),
        num_valid_tokens=n)
    assert_close(kd_only, 0.7 * metrics["kd_sum"] / n)
    ce_only, metrics = losses.distillation_loss(
        student, teacher, labels, mask, config=config_for("tvd", kd_weight=0.0),
        num_valid_tokens=n)
    assert_close(ce_only, 0.4 * metrics["ce_sum"] / n)


def test_teacher_receives_no_gradient():
    student, teacher, labels, mask = batch()
    grad = jax.grad(lambda t: losses.distillation_loss(
        student, t, labels, mask, config=config_for("jsd"), num_valid_tokens=mask.sum())[0])(
        jnp.asarray(teacher))
    np.testing.assert_array_equal(np.asarray(grad), np.zeros_like(teacher))


def test_hard_label_loss():
    student, _, labels, mask = batch()
    dirty_student = np.where(mask[..., None], student, np.nan).astype(COMPUTE_DTYPE)
    loss, metrics = losses.hard_label_loss(dirty_student, np.where(mask, labels, -100), mask,
                                           num_valid_tokens=20)
    ce_sum = np_cross_entropy(student, labels)[mask].sum()
    assert set(metrics) == {"loss_sum", "ce_sum", "tokens"}
    assert_close(metrics["ce_sum"], ce_sum)
    assert_close(metrics["loss_sum"], ce_sum)
    assert float(metrics["tokens"]) == mask.sum()
    assert_close(loss, ce_sum / 20)


# ---------------------------------------------------------------------------------------------
# Vocabulary padding
# ---------------------------------------------------------------------------------------------

def pad_columns(logits, width, fill):
    padding = np.full(logits.shape[:-1] + (width - logits.shape[-1],), fill, COMPUTE_DTYPE)
    return np.concatenate([logits, padding], axis=-1)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_padding_columns_make_no_difference(kind, pair):
    student, teacher = pair
    expected = losses.divergence_bt(kind, student, teacher, temperature=2.0, beta=0.3)
    for fill in (1e4, -1e4, np.nan):
        padded = losses.divergence_bt(kind, pad_columns(student, 48, fill),
                                      pad_columns(teacher, 48, -fill), temperature=2.0,
                                      beta=0.3, valid_vocab=V)
        assert_close(padded, expected)  # a wider row may be summed in a different order


def test_padding_columns_make_no_difference_to_cross_entropy(pair):
    student, _ = pair
    labels = jnp.asarray(np.random.default_rng(4).integers(0, V, size=(B, T)))
    expected = losses.cross_entropy_bt(student, labels)
    padded = losses.cross_entropy_bt(pad_columns(student, 40, 1e4), labels, valid_vocab=V)
    assert_close(padded, expected)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_teacher_and_student_with_different_padding(kind):
    student, teacher, labels, mask = batch()
    config = config_for(kind)
    expected, expected_metrics = losses.distillation_loss(
        student, teacher, labels, mask, config=config, num_valid_tokens=mask.sum())
    loss, metrics = losses.distillation_loss(
        pad_columns(student, 40, 5e3), pad_columns(teacher, 64, -5e3), labels, mask,
        config=config, num_valid_tokens=mask.sum(), valid_vocab=V)
    assert_close(loss, expected)
    for key in expected_metrics:
        assert_close(metrics[key], expected_metrics[key])
    with pytest.raises(ValueError, match="valid_vocab"):
        losses.divergence_bt(kind, pad_columns(student, 40, 0.0), teacher, temperature=1.0)


def test_padding_columns_get_zero_gradient(pair):
    student, teacher = pair
    for kind in losses.DIVERGENCES:
        grad = jax.grad(lambda s: jnp.sum(losses.divergence_bt(
            kind, s, pad_columns(teacher, 40, 7.0), temperature=2.0, valid_vocab=V)))(
            jnp.asarray(pad_columns(student, 40, 9.0)))
        assert np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_array_equal(np.asarray(grad[..., V:]), 0.0)


def test_bad_valid_vocab_is_refused(pair):
    student, teacher = pair
    for bad in (0, V + 1, 3.0):
        with pytest.raises(ValueError, match="valid_vocab"):
            losses.divergence_bt("forward_kl", student, teacher, temperature=1.0,
                                 valid_vocab=bad)


# ---------------------------------------------------------------------------------------------
# Gradients and dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", losses.DIVERGENCES)
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
        def loss_fn(s, t):
            config = config_for(kind, temperature=temperature)
            return losses.distillation_loss(s, t, labels, mask, config=config,
                                            num_valid_tokens=mask.sum())[0]
        loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student), jnp.asarray(teacher))
        assert np.isfinite(float(loss))
        assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
@pytest.mark.parametrize("broken", ["teacher", "student"])
def test_nan_logits_at_a_valid_position_make_the_loss_nan(kind, broken, pair):
    # A NaN must surface (the step then records a non-finite step), never be read as p = 0.
    student, teacher = (x.copy() for x in pair)
    (teacher if broken == "teacher" else student)[0, 0, 3] = np.nan
    mask = np.ones((B, T), bool)
    loss, _ = losses.distillation_loss(student, teacher, np.zeros((B, T), np.int32), mask,
                                       config=config_for(kind), num_valid_tokens=mask.sum())
    assert np.isnan(float(loss))


def test_bfloat16_inputs_give_float32_outputs(pair):
    student, teacher = pair
    student_bf16, teacher_bf16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher,
                                                                                 jnp.bfloat16)
    labels = jnp.zeros((B, T), jnp.int32)
    for kind in losses.DIVERGENCES:
        value = losses.divergence_bt(kind, student_bf16, teacher_bf16, temperature=2.0)
        assert value.dtype == jnp.float32
        # Upcast first, compute in float32: the same as float32 inputs holding the bf16 values.
        expected = losses.divergence_bt(kind, student_bf16.astype(jnp.float32),
                                        teacher_bf16.astype(jnp.float32), temperature=2.0)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected))
    assert losses.cross_entropy_bt(student_bf16, labels).dtype == jnp.float32
    loss, metrics = losses.distillation_loss(
        student_bf16, teacher_bf16, labels, jnp.ones((B, T), bool), config=config_for("jsd"),
        num_valid_tokens=B * T)
    assert loss.dtype == jnp.float32
    assert all(value.dtype == jnp.float32 for value in metrics.values())


def test_distillation_loss_jits(pair):
    student, teacher = pair
    labels = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), bool)
    step = jax.jit(lambda s, t, n: losses.distillation_loss(
        s, t, labels, mask, config=config_for("skew_kl"), num_valid_tokens=n))
    eager = losses.distillation_loss(student, teacher, labels, mask,
                                     config=config_for("skew_kl"), num_valid_tokens=B * T)
    assert_close(step(student, teacher, jnp.float32(B * T))[0], eager[0])


# ---------------------------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("temperature", 0.0, "temperature"),
    ("temperature", -1.0, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("beta", -0.1, "beta"),
    ("beta", 1.5, "beta"),
    ("skew", -0.01, "skew"),
    ("skew", 1.01, "skew"),
    ("divergence", "forward_kll", "unknown divergence"),
    ("kd_weight", -1.0, "kd_weight"),
    ("ce_weight", -0.5, "ce_weight"),
])
def test_invalid_arguments_raise(field, value, message):
    config = dataclasses.replace(LossConfig(), **{field: value})
    args = (config.divergence, config.temperature, config.beta, config.skew, config.kd_weight,
            config.ce_weight)
    with pytest.raises(ValueError, match=message):
        losses.validate_loss_args(*args)
    student, teacher, labels, mask = batch()
    with pytest.raises(ValueError, match=message):
        losses.distillation_loss(student, teacher, labels, mask, config=config,
                                 num_valid_tokens=1)


def test_valid_arguments_pass_and_float_labels_are_refused(pair):
    losses.validate_loss_args("jsd", 1.0, 0.0, 1.0, 0.0, 2.0)
    student, _ = pair
    with pytest.raises(ValueError, match="integer"):
        losses.cross_entropy_bt(student, jnp.zeros((B, T), jnp.float32))
