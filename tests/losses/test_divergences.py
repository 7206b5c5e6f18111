"""kd_jax.losses.divergences: per-token divergences and cross-entropy. Invariants of the math,
golden values (float64 numpy, PyTorch), vocabulary padding, gradients, dtypes and argument
checks. The aggregated objective is tested in test_objective.py, which shares the float64
references below."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kd_jax.config import LossConfig
from kd_jax.losses.divergences import (
    DIVERGENCES,
    cross_entropy_bt,
    divergence_bt,
    validate_loss_args,
)
from kd_jax.losses.objective import objective_on_logits
from kd_jax.losses.soft_targets import Dense
from tests.references import (
    ATOL,
    RTOL,
    B,
    T,
    V,
    assert_close,
    np_kl,
    np_softmax,
    pad_columns,
    random_logits,
)

TEMPERATURES = (1.0, 2.0, 0.5)


@pytest.fixture
def pair():
    """(student, teacher) float32 logits [B, T, V]."""
    return random_logits(0), random_logits(1)


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_of_identical_distributions_is_zero(kind, temperature, pair):
    student, _ = pair
    value = divergence_bt(kind, student, student, temperature=temperature, beta=0.3)
    assert value.shape == (B, T) and value.dtype == jnp.float32
    assert_close(value, np.zeros((B, T)))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_are_nonnegative(kind):
    for seed in range(3):
        value = divergence_bt(kind, random_logits(10 + seed), random_logits(20 + seed),
                              temperature=1.5, beta=0.7, skew=0.3)
        assert np.all(np.asarray(value) >= -ATOL)
        assert np.all(np.asarray(value) > ATOL)  # random distributions differ


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_squared_scaling(kind, temperature, pair):
    # Hinton et al. 2015: the loss at T is T^2 times the divergence of the softened logits.
    student, teacher = pair
    at_t = divergence_bt(kind, student, teacher, temperature=temperature)
    softened = divergence_bt(kind, student / temperature, teacher / temperature, temperature=1.0)
    assert_close(at_t, temperature**2 * np.asarray(softened))


def test_forward_kl_at_temperature_is_t_squared_times_float64_softened_kl(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        p = np_softmax(teacher.astype(np.float64) / temperature)
        q = np_softmax(student.astype(np.float64) / temperature)
        value = divergence_bt("forward_kl", student, teacher, temperature=temperature)
        assert_close(value, temperature**2 * np_kl(p, q))


def test_forward_and_reverse_kl_are_the_same_function_with_roles_swapped(pair):
    student, teacher = pair
    forward = divergence_bt("forward_kl", student, teacher, temperature=2.0)
    reverse_swapped = divergence_bt("reverse_kl", teacher, student, temperature=2.0)
    reverse = divergence_bt("reverse_kl", student, teacher, temperature=2.0)
    np.testing.assert_array_equal(np.asarray(forward), np.asarray(reverse_swapped))
    assert not np.allclose(np.asarray(forward), np.asarray(reverse), rtol=RTOL, atol=ATOL)


def test_jsd_endpoints_are_forward_and_reverse_kl(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        def divergence(kind, temperature=temperature, **kwargs):
            return np.asarray(divergence_bt(kind, student, teacher, temperature=temperature,
                                            **kwargs))
        np.testing.assert_array_equal(divergence("jsd", beta=0.0), divergence("forward_kl"))
        np.testing.assert_array_equal(divergence("jsd", beta=1.0), divergence("reverse_kl"))


def test_jsd_is_symmetric_at_half(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        one_way = divergence_bt("jsd", student, teacher, temperature=temperature, beta=0.5)
        swapped = divergence_bt("jsd", teacher, student, temperature=temperature, beta=0.5)
        assert_close(one_way, swapped)


def test_jsd_is_bounded_by_log_two_before_scaling(pair):
    student, teacher = pair
    value = divergence_bt("jsd", student, teacher, temperature=1.0, beta=0.5)
    assert np.all(np.asarray(value) <= np.log(2.0) + ATOL)


def test_skew_zero_is_plain_kl_and_skew_one_is_zero(pair):
    student, teacher = pair
    for temperature in TEMPERATURES:
        def divergence(kind, temperature=temperature, **kwargs):
            return divergence_bt(kind, student, teacher, temperature=temperature, **kwargs)
        assert_close(divergence("skew_kl", skew=0.0), divergence("forward_kl"))
        assert_close(divergence("skew_reverse_kl", skew=0.0), divergence("reverse_kl"))
        assert_close(divergence("skew_kl", skew=1.0), np.zeros((B, T)))
        assert_close(divergence("skew_reverse_kl", skew=1.0), np.zeros((B, T)))


def test_mse_does_not_depend_on_temperature(pair):
    student, teacher = pair
    values = [divergence_bt("mse", student, teacher, temperature=temperature)
              for temperature in TEMPERATURES]
    for value in values[1:]:
        assert_close(value, values[0])


# ---------------------------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_matches_float64_numpy(kind, temperature, pair):
    student, teacher = pair
    for beta, skew in ((0.5, 0.1), (0.2, 0.4), (0.9, 0.9)):
        value = divergence_bt(kind, student, teacher, temperature=temperature, beta=beta,
                              skew=skew)
        assert value.dtype == jnp.float32
        assert_close(value, np_divergence(kind, student, teacher, temperature, beta, skew))


def test_cross_entropy_matches_float64_numpy(pair):
    student, _ = pair
    labels = np.random.default_rng(2).integers(0, V, size=(B, T))
    value = cross_entropy_bt(student, jnp.asarray(labels))
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
    assert_close(divergence_bt("forward_kl", student, teacher, temperature=temperature),
                 forward.numpy())
    assert_close(divergence_bt("reverse_kl", student, teacher, temperature=temperature),
                 reverse.numpy())


def test_cross_entropy_matches_torch(pair):
    student, _ = pair
    labels = np.random.default_rng(3).integers(0, V, size=(B, T))
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(student).double().reshape(-1, V), torch.from_numpy(labels).reshape(-1),
        reduction="none").reshape(B, T)
    assert_close(cross_entropy_bt(student, jnp.asarray(labels)), expected.numpy())


# ---------------------------------------------------------------------------------------------
# Vocabulary padding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
def test_padding_columns_make_no_difference(kind, pair):
    student, teacher = pair
    expected = divergence_bt(kind, student, teacher, temperature=2.0, beta=0.3)
    for fill in (1e4, -1e4, np.nan):
        padded = divergence_bt(kind, pad_columns(student, 48, fill),
                               pad_columns(teacher, 48, -fill), temperature=2.0, beta=0.3,
                               valid_vocab=V)
        assert_close(padded, expected)  # a wider row may be summed in a different order


def test_padding_columns_make_no_difference_to_cross_entropy(pair):
    student, _ = pair
    labels = jnp.asarray(np.random.default_rng(4).integers(0, V, size=(B, T)))
    expected = cross_entropy_bt(student, labels)
    padded = cross_entropy_bt(pad_columns(student, 40, 1e4), labels, valid_vocab=V)
    assert_close(padded, expected)


def test_padding_columns_get_zero_gradient(pair):
    student, teacher = pair
    for kind in DIVERGENCES:
        grad = jax.grad(lambda s, kind=kind: jnp.sum(divergence_bt(
            kind, s, pad_columns(teacher, 40, 7.0), temperature=2.0, valid_vocab=V)))(
            jnp.asarray(pad_columns(student, 40, 9.0)))
        assert np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_array_equal(np.asarray(grad[..., V:]), 0.0)


def test_bad_valid_vocab_is_refused(pair):
    student, teacher = pair
    for bad in (0, V + 1, 3.0):
        with pytest.raises(ValueError, match="valid_vocab"):
            divergence_bt("forward_kl", student, teacher, temperature=1.0, valid_vocab=bad)


# ---------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------

def test_bfloat16_inputs_give_float32_outputs(pair):
    student, teacher = pair
    student_bf16, teacher_bf16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher,
                                                                                 jnp.bfloat16)
    labels = jnp.zeros((B, T), jnp.int32)
    for kind in DIVERGENCES:
        value = divergence_bt(kind, student_bf16, teacher_bf16, temperature=2.0)
        assert value.dtype == jnp.float32
        # Upcast first, compute in float32: the same as float32 inputs holding the bf16 values.
        expected = divergence_bt(kind, student_bf16.astype(jnp.float32),
                                 teacher_bf16.astype(jnp.float32), temperature=2.0)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected))
    assert cross_entropy_bt(student_bf16, labels).dtype == jnp.float32
    loss, metrics = objective_on_logits(
        student_bf16, Dense(teacher_bf16), labels, jnp.ones((B, T), bool),
        config=config_for("jsd"), num_valid_tokens=B * T)
    assert loss.dtype == jnp.float32
    assert all(value.dtype == jnp.float32 for value in metrics.values())


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
        validate_loss_args(*args)
    student, teacher, labels, mask = batch()
    with pytest.raises(ValueError, match=message):
        objective_on_logits(student, Dense(teacher), labels, mask, config=config,
                            num_valid_tokens=1)


def test_valid_arguments_pass_and_float_labels_are_refused(pair):
    validate_loss_args("jsd", 1.0, 0.0, 1.0, 0.0, 2.0)
    student, _ = pair
    with pytest.raises(ValueError, match="integer"):
        cross_entropy_bt(student, jnp.zeros((B, T), jnp.float32))
