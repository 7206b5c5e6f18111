"""Distillation losses: per-token divergences between teacher and student, and their aggregation.

Conventions
-----------
* Shapes are in the names: `_btv` is [batch, tokens, vocab], `_bt` is [batch, tokens].
* Everything is computed in float32 whatever the input dtype (bfloat16 logits are upcast before
  any softmax). Labels are integer token ids, never one-hot tensors.
* `valid_vocab` is the tokenizer's vocabulary size. Embedding tables are often padded past it, and
  columns >= valid_vocab are excluded from every softmax (and from the `mse` mean). When the
  teacher and the student are padded differently, both are cut to `valid_vocab` columns.
* Aggregation uses masked (sum, count) pairs. A loss function returns `(loss, metrics)` where

      loss = sum over tokens where mask is set of per_token_loss / num_valid_tokens

  and `num_valid_tokens` is counted by the caller over the WHOLE global batch (every microbatch,
  every device). Dividing once by that global count, never by a per-microbatch count and never by
  a mean over padded positions, makes the losses (and gradients) of k microbatches add up exactly
  to the loss of one big batch. `metrics` holds plain float32 sums ("loss_sum", "kd_sum",
  "ce_sum", "tokens") that are summed across microbatches, devices and steps, and divided once at
  log time (e.g. mean KD divergence = kd_sum / tokens).
* Offline distillation trains on teacher targets cached by `kd_jax.targets` instead of teacher
  logits: `sparse_distillation_loss` is `distillation_loss` for those targets ("full" log-probs,
  "topk" ids + log-probs + tail mass, "sample" ids + counts + entropy), same contract.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.config import LossConfig

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse")

# Cached teacher targets (kd_jax.targets): the keys each mode's dict holds.
TARGET_KEYS = {"full": ("logprobs",), "topk": ("ids", "logprobs", "tail"),
               "sample": ("ids", "counts", "entropy")}
# In a training batch they travel beside the tokens, under these names prefixed.
TARGET_PREFIX = "teacher_"


# ---------------------------------------------------------------------------------------------
# Argument checks (Python values only: they run once, at trace time)
# ---------------------------------------------------------------------------------------------

def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except TypeError:  # includes jax tracers: these hyperparameters must be static
        raise ValueError(f"{name} must be a Python number, got {value!r}") from None


def _validate_divergence_args(kind: str, temperature, beta, skew) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
    if not _as_float("temperature", temperature) > 0.0:  # `not >` also refuses NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, value in (("beta", beta), ("skew", skew)):
        if not 0.0 <= _as_float(name, value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def validate_loss_args(kind, temperature, beta, skew, kd_weight, ce_weight) -> None:
    """Raise ValueError unless every loss hyperparameter is in its valid range."""
    _validate_divergence_args(kind, temperature, beta, skew)
    for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if not _as_float(name, value) >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_valid_vocab(valid_vocab, widths: tuple[int, ...]) -> int | None:
    if valid_vocab is None:
        if len(set(widths)) > 1:
            raise ValueError(
                f"teacher and student vocabulary widths differ {widths}; pass valid_vocab "
                "(the tokenizer's vocabulary size) so both can be cut to it")
        return None
    if isinstance(valid_vocab, bool) or not isinstance(valid_vocab, int):
        raise ValueError(f"valid_vocab must be a Python int or None, got {valid_vocab!r}")
    if not 1 <= valid_vocab <= min(widths):
        raise ValueError(f"valid_vocab must be in [1, {min(widths)}], got {valid_vocab}")
    return valid_vocab


def _check_leading_shapes(**shapes) -> None:
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


# ---------------------------------------------------------------------------------------------
# Vocabulary padding and log-probabilities
# ---------------------------------------------------------------------------------------------

def _align_vocab(student_logits_btv, teacher_logits_btv, valid_vocab):
    """Upcast to float32; cut both to valid_vocab columns when their widths differ.

    Returns (student, teacher, padding_from): columns >= padding_from are still present and must
    be masked (None when there is no padding left).
    """
    widths = (student_logits_btv.shape[-1], teacher_logits_btv.shape[-1])
    valid_vocab = _check_valid_vocab(valid_vocab, widths)
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


def _kl_bt(log_p_btv, log_r_btv):
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


def _distribution_divergence_bt(kind: str, log_p_btv, log_q_btv, beta: float, skew: float):
    """The divergences defined on distributions, from log-probabilities over the last axis.

    Shared by the dense losses (the last axis is the vocabulary) and the top-k loss (the last
    axis is k + 1 buckets), so that both use one definition of each divergence.
    """
    if kind == "forward_kl":
        return _kl_bt(log_p_btv, log_q_btv)
    if kind == "reverse_kl":
        return _kl_bt(log_q_btv, log_p_btv)
    if kind == "jsd":
        if beta == 0.0:
            return _kl_bt(log_p_btv, log_q_btv)
        if beta == 1.0:
            return _kl_bt(log_q_btv, log_p_btv)
        log_m_btv = _log_mixture_btv(log_p_btv, log_q_btv, weight_a=beta)
        return (beta * _kl_bt(log_p_btv, log_m_btv)
                + (1.0 - beta) * _kl_bt(log_q_btv, log_m_btv))
    if kind == "skew_kl":
        return _kl_bt(log_p_btv, _log_mixture_btv(log_p_btv, log_q_btv, weight_a=skew))
    if kind == "skew_reverse_kl":
        return _kl_bt(log_q_btv, _log_mixture_btv(log_q_btv, log_p_btv, weight_a=skew))
    if kind == "tvd":
        return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p_btv) - jnp.exp(log_q_btv)), axis=-1)
    raise ValueError(f"{kind!r} is not a divergence between distributions")


# ---------------------------------------------------------------------------------------------
# Per-token losses
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
    _validate_divergence_args(kind, temperature, beta, skew)
    _check_leading_shapes(student=student_logits_btv.shape[:-1],
                          teacher=teacher_logits_btv.shape[:-1])
    temperature, beta, skew = float(temperature), float(beta), float(skew)
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
    return scale * _distribution_divergence_bt(kind, log_p_btv, log_q_btv, beta, skew)


def cross_entropy_bt(logits_btv, labels_bt, *, valid_vocab=None) -> jax.Array:
    """Hard-label cross-entropy at T = 1, float32 [batch, tokens]: logsumexp - logit[label].

    A label outside [0, vocab) gives NaN; such positions must be masked out by the caller.
    """
    if not jnp.issubdtype(labels_bt.dtype, jnp.integer):
        raise ValueError(f"labels must be integer token ids, got dtype {labels_bt.dtype}")
    _check_leading_shapes(logits=logits_btv.shape[:-1], labels=labels_bt.shape)
    valid_vocab = _check_valid_vocab(valid_vocab, (logits_btv.shape[-1],))
    padding_from = valid_vocab if valid_vocab != logits_btv.shape[-1] else None
    logits_btv = _mask_padding(logits_btv.astype(jnp.float32), padding_from)
    log_normalizer_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    label_logit_bt = jnp.take_along_axis(logits_btv, labels_bt[..., None], axis=-1)[..., 0]
    return log_normalizer_bt - label_logit_bt


# ---------------------------------------------------------------------------------------------
# Per-token losses on cached sparse teacher targets (kd_jax.targets)
# ---------------------------------------------------------------------------------------------

def _check_sparse_divergence(mode: str, kind: str) -> None:
    if mode not in TARGET_KEYS:
        raise ValueError(f"unknown target mode {mode!r}; expected one of {', '.join(TARGET_KEYS)}")
    if mode == "topk" and kind == "mse":
        raise ValueError("divergence 'mse' compares logits over the whole vocabulary and is not "
                         "defined for top-k targets, which keep k log-probabilities and a tail "
                         "mass; use a divergence between distributions or mode 'full'")
    if mode == "sample" and kind != "forward_kl":
        raise ValueError(f"divergence {kind!r} cannot be estimated from sampled targets: samples "
                         "y ~ p give an unbiased forward KL(p || q) = E[-log q(y)] - H(p) only; "
                         "use divergence 'forward_kl', or mode 'topk' or 'full'")


def _check_ids(name: str, ids, leading_shape) -> None:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    _check_leading_shapes(student=tuple(leading_shape), **{name: ids.shape[:-1]})


def _student_log_probs_btv(student_logits_btv, temperature: float, valid_vocab):
    """log softmax(student / T) over the valid vocabulary, float32, full width (padding is -inf)."""
    width = student_logits_btv.shape[-1]
    valid_vocab = _check_valid_vocab(valid_vocab, (width,))
    padding_from = valid_vocab if valid_vocab not in (None, width) else None
    return _log_softmax_btv(student_logits_btv.astype(jnp.float32), temperature, padding_from)


def _log_sum_exp_bt(log_x_btv):
    """logsumexp over the last axis; -inf, with a zero gradient, where every entry is -inf."""
    # jax.nn.logsumexp of an all -inf row is -inf with a NaN gradient: evaluate it on zeros there.
    has_mass_bt = jnp.any(log_x_btv != -jnp.inf, axis=-1)  # NaN counts as mass: NaN stays NaN
    safe_btv = jnp.where(has_mass_bt[..., None], log_x_btv, 0.0)
    return jnp.where(has_mass_bt, jax.nn.logsumexp(safe_btv, axis=-1), -jnp.inf)


def topk_divergence_bt(kind: str, student_logits_btv, ids_btk, logprobs_btk, tail_bt, *,
                       temperature, beta=0.5, skew=0.1, valid_vocab=None) -> jax.Array:
    """Per-token divergence against top-k targets, on k + 1 buckets, float32 [batch, tokens].

    Both distributions are coarsened onto the same k + 1 buckets (suffix `_btc`): the k cached ids,
    and "everything else". The teacher's buckets are `logprobs_btk` and `tail_bt` (log of the
    mass outside the k ids; see `kd_jax.targets`), renormalized over the k + 1 buckets, which is
    a no-op for exact targets and absorbs the rounding of a cache stored in bfloat16. The
    student's last bucket is logsumexp of its log-probabilities with the k ids masked out,
    accurate however small that mass is (never log1p(-sum q_k), which cancels in float32).
    `kind` is then applied to the bucketed distributions exactly as `divergence_bt` applies it
    to the full ones (same definitions, same T^2 factor); `mse` is refused.

    Bias: every divergence here is an f-divergence of (p, q) (JSD and the skew KLs too: coarsening
    commutes with mixing), so by the data-processing inequality its bucketed value is <= the
    full one, with equality when k covers the valid vocabulary (empty tail). The gap is top-k's
    bias; `benchmarks/sparse_bias.py` measures it.

    The targets must have been built at this `temperature` (their normalizer needed the whole
    vocabulary, so it cannot be changed afterwards), and their ids must be < valid_vocab.
    """
    _validate_divergence_args(kind, temperature, beta, skew)
    _check_sparse_divergence("topk", kind)
    leading_shape = student_logits_btv.shape[:-1]
    _check_ids("ids", ids_btk, leading_shape)
    _check_leading_shapes(ids=ids_btk.shape, logprobs=logprobs_btk.shape)
    _check_leading_shapes(student=leading_shape, tail=tail_bt.shape)
    temperature, beta, skew = float(temperature), float(beta), float(skew)

    log_q_btv = _student_log_probs_btv(student_logits_btv, temperature, valid_vocab)
    # A slot whose teacher log-prob is -inf holds no token (padding, e.g. an API that returned
    # fewer than k alternatives): its bucket is empty for both models, and the student's mass
    # on its id stays in "everything else". Otherwise a reverse KL would see the student's mass
    # on a bucket the teacher calls impossible, and be infinite.
    present_btk = logprobs_btk != -jnp.inf
    log_q_btk = jnp.where(present_btk, jnp.take_along_axis(log_q_btv, ids_btk, axis=-1),
                          -jnp.inf)
    rows_b11 = jnp.arange(ids_btk.shape[0])[:, None, None]
    tokens_1t1 = jnp.arange(ids_btk.shape[1])[None, :, None]
    cached_btv = jnp.zeros(log_q_btv.shape, bool).at[rows_b11, tokens_1t1, ids_btk].max(
        present_btk)
    log_q_rest_bt = _log_sum_exp_bt(jnp.where(cached_btv, -jnp.inf, log_q_btv))
    log_q_btc = jnp.concatenate([log_q_btk, log_q_rest_bt[..., None]], axis=-1)
    teacher_btc = jnp.concatenate([logprobs_btk, tail_bt[..., None]], axis=-1)
    log_p_btc = jax.nn.log_softmax(teacher_btc.astype(jnp.float32), axis=-1)
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * _distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)


def sampled_kl_bt(student_logits_btv, ids_btn, counts_btn, entropy_bt, *, temperature,
                  valid_vocab=None) -> jax.Array:
    """Unbiased per-token estimate of T^2 KL(p_T || q_T) from sampled targets, float32 [b, t].

    With n = sum_j counts_j draws y ~ p_T (cached as unique ids and counts, see `kd_jax.targets`):

        sum_j counts_j / n * (-log q_T(id_j)) - H(p_T)

    Its expectation over the draws is E_{y~p}[-log q(y)] - H(p) = KL(p || q), in value and in
    gradient (the gradient is linear in the empirical distribution), so, unlike renormalized
    top-k, it has no bias; it pays in variance instead, and one estimate can be negative.
    Padding slots (count 0) contribute nothing. Random-sampling KD: Anshumann et al. 2025,
    "Sparse Logit Sampling". Scaled by T^2 like `divergence_bt`; the targets must have been drawn
    at this temperature.
    """
    temperature = _as_float("temperature", temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    leading_shape = student_logits_btv.shape[:-1]
    _check_ids("ids", ids_btn, leading_shape)
    _check_ids("counts", counts_btn, leading_shape)
    _check_leading_shapes(ids=ids_btn.shape, counts=counts_btn.shape)
    _check_leading_shapes(student=leading_shape, entropy=entropy_bt.shape)

    log_q_btv = _student_log_probs_btv(student_logits_btv, temperature, valid_vocab)
    log_q_btn = jnp.take_along_axis(log_q_btv, ids_btn, axis=-1)
    counts_btn = counts_btn.astype(jnp.float32)
    drawn_btn = counts_btn > 0
    # where, not multiply: a padding slot's id may have q = 0, and 0 * -inf is NaN.
    weighted_btn = jnp.where(drawn_btn, counts_btn * jnp.where(drawn_btn, log_q_btn, 0.0), 0.0)
    draws_bt = jnp.maximum(jnp.sum(counts_btn, axis=-1), 1.0)
    cross_entropy_bt = -jnp.sum(weighted_btn, axis=-1) / draws_bt
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    return scale * (cross_entropy_bt - entropy_bt.astype(jnp.float32))


def sparse_divergence_bt(mode: str, kind: str, student_logits_btv, targets: dict, *,
                         temperature, beta=0.5, skew=0.1, valid_vocab=None) -> jax.Array:
    """Per-token divergence against cached targets of `mode`, float32 [batch, tokens].

      full    targets["logprobs"] are used as teacher logits: `divergence_bt` exactly, and since
              log-softmax only shifts logits, T = 1 log-probs are re-tempered exactly at any T
              (mse excepted: it sees the shift)
      topk    `topk_divergence_bt` (every divergence but mse)
      sample  `sampled_kl_bt` (forward_kl only)
    """
    _validate_divergence_args(kind, temperature, beta, skew)
    _check_sparse_divergence(mode, kind)
    _check_target_keys(mode, targets)
    if mode == "full":
        return divergence_bt(kind, student_logits_btv, targets["logprobs"],
                             temperature=temperature, beta=beta, skew=skew,
                             valid_vocab=valid_vocab)
    if mode == "topk":
        return topk_divergence_bt(kind, student_logits_btv, targets["ids"], targets["logprobs"],
                                  targets["tail"], temperature=temperature, beta=beta, skew=skew,
                                  valid_vocab=valid_vocab)
    return sampled_kl_bt(student_logits_btv, targets["ids"], targets["counts"],
                         targets["entropy"], temperature=temperature, valid_vocab=valid_vocab)


def _check_target_keys(mode: str, targets) -> None:
    expected = set(TARGET_KEYS[mode])
    if not isinstance(targets, dict) or set(targets) != expected:
        found = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
        raise ValueError(f"{mode} targets must be a dict with keys {sorted(expected)}, "
                         f"got {found}")


# ---------------------------------------------------------------------------------------------
# Aggregated losses: (loss, metrics)
# ---------------------------------------------------------------------------------------------

def _masked_sum(values_bt, mask_bt) -> jax.Array:
    # where, not multiply: 0 * NaN (or inf) from a padded position would poison the sum.
    return jnp.sum(jnp.where(mask_bt, values_bt, 0.0), dtype=jnp.float32)


def _normalize(loss_sum, num_valid_tokens) -> jax.Array:
    return loss_sum / jnp.maximum(jnp.asarray(num_valid_tokens, jnp.float32), 1.0)


def distillation_loss(student_logits_btv, teacher_logits_btv, labels_bt, loss_mask_bt, *,
                      config: LossConfig, num_valid_tokens, valid_vocab=None
                      ) -> tuple[jax.Array, dict]:
    """kd_weight * divergence(teacher, student) + ce_weight * CE(student, labels), normalized.

    Returns (loss_sum / num_valid_tokens, {"loss_sum", "kd_sum", "ce_sum", "tokens"}); see the
    module docstring for why `num_valid_tokens` is the caller's global count. "kd_sum" and
    "ce_sum" are unweighted and always reported; a term whose weight is 0 is left out of the loss
    (so it contributes no gradient, and an infinite metric cannot turn the loss into NaN).
    """
    validate_loss_args(config.divergence, config.temperature, config.beta, config.skew,
                       config.kd_weight, config.ce_weight)
    _check_leading_shapes(student=student_logits_btv.shape[:-1], labels=labels_bt.shape,
                          mask=loss_mask_bt.shape)
    teacher_logits_btv = jax.lax.stop_gradient(teacher_logits_btv)  # the teacher is frozen
    kd_bt = divergence_bt(config.divergence, student_logits_btv, teacher_logits_btv,
                          temperature=config.temperature, beta=config.beta, skew=config.skew,
                          valid_vocab=valid_vocab)
    ce_bt = cross_entropy_bt(student_logits_btv, labels_bt, valid_vocab=valid_vocab)
    return _weighted_loss(kd_bt, ce_bt, loss_mask_bt, config, num_valid_tokens)


def _weighted_loss(kd_bt, ce_bt, loss_mask_bt, config: LossConfig, num_valid_tokens
                   ) -> tuple[jax.Array, dict]:
    mask_bt = loss_mask_bt.astype(bool)
    kd_sum = _masked_sum(kd_bt, mask_bt)
    ce_sum = _masked_sum(ce_bt, mask_bt)

    loss_sum = jnp.zeros((), jnp.float32)
    if config.kd_weight > 0:
        loss_sum = loss_sum + jnp.float32(config.kd_weight) * kd_sum
    if config.ce_weight > 0:
        loss_sum = loss_sum + jnp.float32(config.ce_weight) * ce_sum
    metrics = {"loss_sum": loss_sum, "kd_sum": kd_sum, "ce_sum": ce_sum,
               "tokens": jnp.sum(mask_bt, dtype=jnp.float32)}
    return _normalize(loss_sum, num_valid_tokens), metrics


def sparse_distillation_loss(student_logits_btv, targets: dict, labels_bt, loss_mask_bt, *,
                             mode: str, config: LossConfig, num_valid_tokens, valid_vocab=None
                             ) -> tuple[jax.Array, dict]:
    """`distillation_loss` with cached teacher targets (`kd_jax.targets`) instead of logits.

    Same contract and metrics: kd_weight * divergence + ce_weight * CE(student, labels) at T = 1,
    masked sums divided by the caller's global `num_valid_tokens`. `targets` holds the keys of
    TARGET_KEYS[mode]; the divergence is `sparse_divergence_bt(mode, config.divergence, ...)`.
    With mode "full" the loss is distillation_loss with the stored log-probs as teacher logits;
    for log_softmax(z) that is distillation_loss with teacher logits z at any config.temperature,
    for every divergence but mse (mse compares logits, and log_softmax shifts them). With "topk"
    and "sample", config.temperature must be the temperature the cache was built at.
    """
    validate_loss_args(config.divergence, config.temperature, config.beta, config.skew,
                       config.kd_weight, config.ce_weight)
    _check_sparse_divergence(mode, config.divergence)
    _check_target_keys(mode, targets)
    _check_leading_shapes(student=student_logits_btv.shape[:-1], labels=labels_bt.shape,
                          mask=loss_mask_bt.shape)
    targets = jax.lax.stop_gradient(targets)  # the teacher is frozen
    kd_bt = sparse_divergence_bt(mode, config.divergence, student_logits_btv, targets,
                                 temperature=config.temperature, beta=config.beta,
                                 skew=config.skew, valid_vocab=valid_vocab)
    ce_bt = cross_entropy_bt(student_logits_btv, labels_bt, valid_vocab=valid_vocab)
    return _weighted_loss(kd_bt, ce_bt, loss_mask_bt, config, num_valid_tokens)


def hard_label_loss(logits_btv, labels_bt, loss_mask_bt, *, num_valid_tokens, valid_vocab=None
                    ) -> tuple[jax.Array, dict]:
    """Cross-entropy on the labels only (training without a teacher), same conventions.

    Returns (ce_sum / num_valid_tokens, {"loss_sum", "ce_sum", "tokens"}).
    """
    _check_leading_shapes(logits=logits_btv.shape[:-1], labels=labels_bt.shape,
                          mask=loss_mask_bt.shape)
    mask_bt = loss_mask_bt.astype(bool)
    ce_sum = _masked_sum(cross_entropy_bt(logits_btv, labels_bt, valid_vocab=valid_vocab), mask_bt)
    metrics = {"loss_sum": ce_sum, "ce_sum": ce_sum,
               "tokens": jnp.sum(mask_bt, dtype=jnp.float32)}
    return _normalize(ce_sum, num_valid_tokens), metrics
