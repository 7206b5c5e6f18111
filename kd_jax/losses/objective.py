"""The training objective: (student outputs, teacher's soft targets, labels, mask) -> loss.

    loss = (kd_weight * sum divergence + ce_weight * sum CE(labels)) / num_valid_tokens

with both sums over the tokens whose mask is set; without soft targets (training on hard labels)
the loss is the cross-entropy alone. The divergence is the soft targets' own
(`kd_jax.losses.soft_targets`); the cross-entropy is at T = 1.

Aggregation uses masked (sum, count) pairs. `num_valid_tokens` is counted by the caller over the
WHOLE global batch (every microbatch, every device). Dividing once by that global count, never
by a per-microbatch count and never by a mean over padded positions, makes the losses (and
gradients) of k microbatches add up exactly to the loss of one big batch. The metrics are plain
float32 sums ("loss_sum", "kd_sum", "ce_sum", "tokens") that are summed across microbatches,
devices and steps, and divided once at log time (mean divergence = kd_sum / tokens).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax.config import LossConfig
from kd_jax.losses.chunked import chunk_positions, chunked_objective
from kd_jax.losses.divergences import check_leading_shapes, cross_entropy_bt, validate_loss_args
from kd_jax.losses.soft_targets import SoftTargets, check_supported, vocabulary_logits


def objective(student, soft_targets: SoftTargets | None, labels_bt, loss_mask_bt, *,
              config: LossConfig, num_valid_tokens, valid_vocab=None,
              logits_sharding: Any = None) -> tuple[jax.Array, dict]:
    """The loss of `student` (model outputs: `student.logits()` gives [batch, tokens, vocab]).

    `logits_sharding` pins the student's logits, the largest activations of the step, to a
    sharding (None: left to XLA's propagation). With a large vocabulary (`loss.chunk_tokens`) the
    head and the loss run fused, chunk by chunk (`kd_jax.losses.chunked`): the same loss and
    gradients without the whole batch's logits.
    """
    b, t = labels_bt.shape
    check_leading_shapes(student=student.hidden_btd.shape[:-1], labels=labels_bt.shape,
                         mask=loss_mask_bt.shape)
    mask_bt = loss_mask_bt.astype(bool)
    # Masked positions are cleared before the vocabulary projection, where it is cheapest: a
    # zero hidden state gives exactly zero (uniform, finite) logits, what `objective_on_logits`
    # would otherwise write over the [tokens, vocab] logits in a pass of their own. An online
    # teacher's targets are cleared the same way (`Projected.where`).
    hidden_btd = jnp.where(mask_bt[..., None], student.hidden_btd, 0)
    if soft_targets is not None:
        soft_targets = soft_targets.where(mask_bt)
    on_logits = functools.partial(objective_on_logits, inputs_masked=True)
    # A teacher of another vocabulary may hold wider [tokens, width] arrays than the student's.
    width = max(student.head_vd.shape[0], getattr(soft_targets, "width", 0))
    positions = chunk_positions(config.chunk_tokens, b, t, width)
    if positions:
        return chunked_objective(on_logits, hidden_btd, student.head_vd, soft_targets, labels_bt,
                                 loss_mask_bt, positions=positions, config=config,
                                 num_valid_tokens=num_valid_tokens, valid_vocab=valid_vocab,
                                 logits_sharding=logits_sharding)
    student_logits_btv = vocabulary_logits(hidden_btd, student.head_vd)
    if logits_sharding is not None:
        student_logits_btv = jax.lax.with_sharding_constraint(student_logits_btv,
                                                              logits_sharding)
    return on_logits(student_logits_btv, soft_targets, labels_bt, loss_mask_bt, config=config,
                     num_valid_tokens=num_valid_tokens, valid_vocab=valid_vocab)


def objective_on_logits(student_logits_btv, soft_targets: SoftTargets | None, labels_bt,
                        loss_mask_bt, *, config: LossConfig, num_valid_tokens, valid_vocab=None,
                        inputs_masked: bool = False) -> tuple[jax.Array, dict]:
    """`objective` on the student's logits, computed for the whole batch at once.

    Returns (loss_sum / num_valid_tokens, metric sums). With soft targets the metrics are
    {"loss_sum", "kd_sum", "ce_sum", "tokens"}: "kd_sum" and "ce_sum" are unweighted and always
    reported, and a term whose weight is 0 is left out of the loss (so it contributes no
    gradient, and an infinite metric cannot turn the loss into NaN). Without, they are
    {"loss_sum", "ce_sum", "tokens"} and the loss is the cross-entropy whatever the weights.

    `inputs_masked`: the caller has already made the student's logits and the soft targets
    uniform where the mask is off (as `objective` does, on the hidden states), so they are not
    cleared again here.
    """
    check_leading_shapes(student=student_logits_btv.shape[:-1], labels=labels_bt.shape,
                         mask=loss_mask_bt.shape)
    mask_bt = loss_mask_bt.astype(bool)
    tokens = jnp.sum(mask_bt, dtype=jnp.float32)
    # The inputs at masked positions are replaced before any arithmetic, not only the values
    # after it: the backward pass of where(mask, f(x), 0) still multiplies 0 by f'(x), and an
    # infinite f'(x) there (a cache's filler targets at prompt positions, a label out of range)
    # would make every gradient NaN. Uniform logits and targets are finite for every divergence.
    if not inputs_masked:
        student_logits_btv = jnp.where(mask_bt[..., None], student_logits_btv, 0.0)
        if soft_targets is not None:
            soft_targets = soft_targets.where(mask_bt)
    labels_bt = jnp.where(mask_bt, labels_bt, 0)
    if soft_targets is None:
        ce_sum = _masked_sum(
            cross_entropy_bt(student_logits_btv, labels_bt, valid_vocab=valid_vocab), mask_bt)
        return _normalize(ce_sum, num_valid_tokens), {
            "loss_sum": ce_sum, "ce_sum": ce_sum, "tokens": tokens}

    validate_loss_args(config.divergence, config.temperature, config.beta, config.skew,
                       config.kd_weight, config.ce_weight)
    check_supported(soft_targets, config.divergence)
    soft_targets = jax.lax.stop_gradient(soft_targets)  # the teacher is frozen
    kd_bt = soft_targets.divergence_bt(
        config.divergence, student_logits_btv, temperature=config.temperature, beta=config.beta,
        skew=config.skew, valid_vocab=valid_vocab)
    ce_bt = cross_entropy_bt(student_logits_btv, labels_bt, valid_vocab=valid_vocab)
    kd_sum = _masked_sum(kd_bt, mask_bt)
    ce_sum = _masked_sum(ce_bt, mask_bt)
    loss_sum = jnp.zeros((), jnp.float32)
    if config.kd_weight > 0:
        loss_sum = loss_sum + jnp.float32(config.kd_weight) * kd_sum
    if config.ce_weight > 0:
        loss_sum = loss_sum + jnp.float32(config.ce_weight) * ce_sum
    metrics = {"loss_sum": loss_sum, "kd_sum": kd_sum, "ce_sum": ce_sum, "tokens": tokens}
    return _normalize(loss_sum, num_valid_tokens), metrics


def _masked_sum(values_bt, mask_bt) -> jax.Array:
    # where, not multiply: 0 * NaN (or inf) from a padded position would poison the sum.
    return jnp.sum(jnp.where(mask_bt, values_bt, 0.0), dtype=jnp.float32)


def _normalize(loss_sum, num_valid_tokens) -> jax.Array:
    return loss_sum / jnp.maximum(jnp.asarray(num_valid_tokens, jnp.float32), 1.0)
