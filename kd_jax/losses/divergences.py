"""Divergences between the teacher's and the student's distributions, per token, and the
hard-label cross-entropy.

Conventions
-----------
* Shapes are in the names: `_btv` is [batch, tokens, vocab], `_bt` is [batch, tokens].
* Everything is computed in float32 whatever the input dtype (bfloat16 logits are upcast before
  any softmax). Labels are integer token ids, never one-hot tensors.
* `valid_vocab` is the tokenizer's vocabulary size. Embedding tables are often padded past it, and
  columns >= valid_vocab are excluded from every softmax (and from the `mse` mean). When the
  teacher and the student are padded differently, both are cut to `valid_vocab` columns.
* The divergences on distributions (`distribution_divergence_bt`) are written once, on
  log-probabilities over the last axis: the dense loss applies them over the vocabulary, the
  top-k loss over k + 1 buckets (`kd_jax.losses.soft_targets`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.checks import closest, static_count, static_number
from kd_jax.config import Divergence, choices

DIVERGENCES = choices(Divergence)


# ---------------------------------------------------------------------------------------------
# Argument checks (Python values only: they run once, at trace time)
# ---------------------------------------------------------------------------------------------

def validate_divergence_args(kind: str, temperature, beta, skew) -> tuple[float, float, float]:
    """(temperature, beta, skew) as floats, or ValueError naming the bad argument."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}"
                         f"{closest(kind, DIVERGENCES)}")
    return (static_number("temperature", temperature, low=0.0, low_open=True),
            static_number("beta", beta, low=0.0, high=1.0),
            static_number("skew", skew, low=0.0, high=1.0))


def validate_loss_args(kind, temperature, beta, skew, kd_weight, ce_weight) -> None:
    """Raise ValueError unless every loss hyperparameter is in its valid range."""
    validate_divergence_args(kind, temperature, beta, skew)
    static_number("kd_weight", kd_weight, low=0.0)
    static_number("ce_weight", ce_weight, low=0.0)


def valid_vocab_of(valid_vocab, widths: tuple[int, ...]) -> int | None:
    """`valid_vocab` checked against the vocabulary widths of the logits it will cut.

    None is allowed only when every width is the same (nothing needs cutting).
    """
    if valid_vocab is None:
        if len(set(widths)) > 1:
            raise ValueError(
                f"teacher and student vocabulary widths differ {widths}; pass valid_vocab "
                "(the tokenizer's vocabulary size) so both can be cut to it")
        return None
    return static_count("valid_vocab", valid_vocab, min(widths))


def check_leading_shapes(**shapes) -> None:
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


def check_ids(name: str, ids, leading_shape) -> None:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    check_leading_shapes(student=tuple(leading_shape), **{name: ids.shape[:-1]})


# ---------------------------------------------------------------------------------------------
# Vocabulary padding and log-probabilities
# ---------------------------------------------------------------------------------------------

def _align_vocab(student_logits_btv, teacher_logits_btv, valid_vocab):
    """Upcast to float32; cut both to valid_vocab columns when their widths differ.

    Returns (student, teacher, padding_from): columns >= padding_from are still present and must
    be masked (None when there is no padding left).
    """
    widths = (student_logits_btv.shape[-1], teacher_logits_btv.shape[-1])
    valid_vocab = valid_vocab_of(valid_vocab, widths)
    student_btv = student_logits_btv.astype(jnp.float32)
    teacher_btv = teacher_logits_btv.astype(jnp.float32)
    if widths[0] != widths[1]:
        return student_btv[..., :valid_vocab], teacher_btv[..., :valid_vocab], None
    if valid_vocab is None or valid_vocab == widths[0]:
        return student_btv, teacher_btv, None
    return student_btv, teacher_btv, valid_vocab


def _column_is_valid_v(width: int, padding_from: int) -> jax.Array:
    return jnp.arange(width) < padding_from


def _mask_padding(logits_btv, padding_from):
    # Masking keeps the array's shape (and so its sharding); -inf makes a padded column's
    # probability exactly 0, and the guards below keep its gradient exactly 0.
    if padding_from is None:
        return logits_btv
    valid_v = _column_is_valid_v(logits_btv.shape[-1], padding_from)
    return jnp.where(valid_v, logits_btv, -jnp.inf)


def _log_softmax_btv(logits_btv, temperature: float, padding_from):
    return jax.nn.log_softmax(_mask_padding(logits_btv, padding_from) / temperature, axis=-1)


def student_log_probs_btv(student_logits_btv, temperature: float, valid_vocab):
    """log softmax(student / T) over the valid vocabulary, float32, full width (padding is -inf)."""
    width = student_logits_btv.shape[-1]
    valid_vocab = valid_vocab_of(valid_vocab, (width,))
    padding_from = valid_vocab if valid_vocab not in (None, width) else None
    return _log_softmax_btv(student_logits_btv.astype(jnp.float32), temperature, padding_from)


def kl_bt(log_p_btv, log_r_btv):
    """KL(p || r) = sum_v p (log p - log r) over the last axis.

    Entries with p == 0 contribute 0 (the p log p -> 0 limit). Both logs are replaced by 0 there
    before subtracting, so -inf - -inf never produces a NaN, in the value or in the gradient.
    """
    p_btv = jnp.exp(log_p_btv)
    # `!= 0`, not `> 0`: a NaN probability must poison the loss, never vanish from it.
    support_btv = p_btv != 0.0
    safe_log_p_btv = jnp.where(support_btv, log_p_btv, 0.0)
    safe_log_r_btv = jnp.where(support_btv, log_r_btv, 0.0)
    return jnp.sum(jnp.where(support_btv, p_btv * (safe_log_p_btv - safe_log_r_btv), 0.0), axis=-1)


def _log_mixture_btv(log_a_btv, log_b_btv, weight_a: float):
    """log(weight_a * a + (1 - weight_a) * b), by logsumexp of the shifted log-probabilities."""
    if weight_a == 1.0:
        return log_a_btv
    if weight_a == 0.0:
        return log_b_btv
    # logaddexp(-inf, -inf) has a NaN gradient: evaluate it on zeros there, then put -inf back.
    either_btv = ~((log_a_btv == -jnp.inf) & (log_b_btv == -jnp.inf))  # NaN stays NaN
    safe_a_btv = jnp.where(either_btv, log_a_btv, 0.0)
    safe_b_btv = jnp.where(either_btv, log_b_btv, 0.0)
    mixed_btv = jnp.logaddexp(safe_a_btv + math.log(weight_a), safe_b_btv + math.log1p(-weight_a))
    return jnp.where(either_btv, mixed_btv, -jnp.inf)


def log_sum_exp_bt(log_x_btv):
    """logsumexp over the last axis; -inf, with a zero gradient, where every entry is -inf."""
    # jax.nn.logsumexp of an all -inf row is -inf with a NaN gradient: evaluate it on zeros there.
    has_mass_bt = jnp.any(log_x_btv != -jnp.inf, axis=-1)  # NaN counts as mass: NaN stays NaN
    safe_btv = jnp.where(has_mass_bt[..., None], log_x_btv, 0.0)
    return jnp.where(has_mass_bt, jax.nn.logsumexp(safe_btv, axis=-1), -jnp.inf)


def distribution_divergence_bt(kind: str, log_p_btv, log_q_btv, beta: float, skew: float):
    """The divergences defined on distributions, from log-probabilities over the last axis.

    Shared by the dense losses (the last axis is the vocabulary) and the top-k loss (the last
    axis is k + 1 buckets), so that both use one definition of each divergence.
    """
    if kind == "forward_kl":
        return kl_bt(log_p_btv, log_q_btv)
    if kind == "reverse_kl":
        return kl_bt(log_q_btv, log_p_btv)
    if kind == "jsd":
        if beta == 0.0:
            return kl_bt(log_p_btv, log_q_btv)
        if beta == 1.0:
            return kl_bt(log_q_btv, log_p_btv)
        log_m_btv = _log_mixture_btv(log_p_btv, log_q_btv, weight_a=beta)
        return (beta * kl_bt(log_p_btv, log_m_btv)
                + (1.0 - beta) * kl_bt(log_q_btv, log_m_btv))
    if kind == "skew_kl":
        return kl_bt(log_p_btv, _log_mixture_btv(log_p_btv, log_q_btv, weight_a=skew))
    if kind == "skew_reverse_kl":
        return kl_bt(log_q_btv, _log_mixture_btv(log_q_btv, log_p_btv, weight_a=skew))
    if kind == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p_btv) - jnp.exp(log_q_btv)), axis=-1)
    raise ValueError(f"{kind!r} is not a divergence between distributions")


# ---------------------------------------------------------------------------------------------
# Per-token losses on logits
# ---------------------------------------------------------------------------------------------

def divergence_bt(kind: str, student_logits_btv, teacher_logits_btv, *, temperature,
                  beta=0.5, skew=0.1, valid_vocab=None) -> jax.Array:
    """Per-token divergence, float32 [batch, tokens].

    p = softmax(teacher / T) and q = softmax(student / T) over the valid vocabulary, and
      forward_kl        KL(p || q)
      reverse_kl        KL(q || p)
      jsd               beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                        (generalized JSD of GKD, Agarwal et al. 2024). The formula is 0 at both
                        beta = 0 and beta = 1, so, as TRL does, beta = 0 is DEFINED as forward KL
                        and beta = 1 as reverse KL (the value jumps at the two endpoints).
      skew_kl           KL(p || a p + (1 - a) q),  a = skew  (DistiLLM, Ko et al. 2024)
      skew_reverse_kl   KL(q || (1 - a) p + a q)
      tvd               0.5 sum_v |p - q|
      mse               mean over the valid vocabulary of (student / T - teacher / T)^2
    Every value is multiplied by T^2: softening by T shrinks the gradients by 1/T^2, and the
    factor keeps their scale independent of T (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network", section 2). For mse the T's cancel, so mse does not depend on T.
    """
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    check_leading_shapes(student=student_logits_btv.shape[:-1],
                         teacher=teacher_logits_btv.shape[:-1])
    student_btv, teacher_btv, padding_from = _align_vocab(
        student_logits_btv, teacher_logits_btv, valid_vocab)
    scale = temperature * temperature  # Hinton et al. 2015

    if kind == "mse":
        difference_btv = student_btv / temperature - teacher_btv / temperature
        columns = student_btv.shape[-1]
        if padding_from is not None:
            # where before squaring: garbage (inf, NaN) in padded columns never reaches the sum.
            valid_v = _column_is_valid_v(columns, padding_from)
            difference_btv = jnp.where(valid_v, difference_btv, 0.0)
            columns = padding_from
        return scale * jnp.sum(jnp.square(difference_btv), axis=-1) / columns

    log_q_btv = _log_softmax_btv(student_btv, temperature, padding_from)
    log_p_btv = _log_softmax_btv(teacher_btv, temperature, padding_from)
    return scale * distribution_divergence_bt(kind, log_p_btv, log_q_btv, beta, skew)


def cross_entropy_bt(logits_btv, labels_bt, *, valid_vocab=None) -> jax.Array:
    """Hard-label cross-entropy at T = 1, float32 [batch, tokens]: logsumexp - logit[label].

    A label outside [0, vocab) gives NaN; such positions must be masked out by the caller.
    """
    if not jnp.issubdtype(labels_bt.dtype, jnp.integer):
        raise ValueError(f"labels must be integer token ids, got dtype {labels_bt.dtype}")
    check_leading_shapes(logits=logits_btv.shape[:-1], labels=labels_bt.shape)
    valid_vocab = valid_vocab_of(valid_vocab, (logits_btv.shape[-1],))
    padding_from = valid_vocab if valid_vocab != logits_btv.shape[-1] else None
    logits_btv = _mask_padding(logits_btv.astype(jnp.float32), padding_from)
    log_normalizer_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    label_logit_bt = jnp.take_along_axis(logits_btv, labels_bt[..., None], axis=-1)[..., 0]
    return log_normalizer_bt - label_logit_bt
