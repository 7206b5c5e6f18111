"""The fused training step: frozen teacher forward, student forward/backward, optimizer update.

One function, jitted once per run:

    update(state, teacher_params, batch) -> (state, metrics)

It composes three things and branches on none of them: the student (a `PureModel`, returning its
outputs), the teacher (any object with `soft_targets(teacher_params, batch)`: an online model,
a cache's targets travelling in the batch, or None for hard labels) and the objective
(`kd_jax.losses.objective`). The teacher's parameters enter as an argument and its targets pass
through `stop_gradient`: it has no optimizer state and is never checkpointed. With
`microbatches = k`, the batch is split into k microbatches scanned in order; the teacher runs on
each microbatch (never one full-batch teacher pass), and every microbatch's loss is divided by
the number of valid tokens of the *whole* batch, so the summed gradients equal those of one big
batch.

With on-policy distillation (`kd_jax.train.onpolicy`) some rows of the batch are first replaced
by the student's own answers to their prompts, sampled with the state's parameters and key;
everything after sees the mixed batch.

With white-box losses (`kd_jax.losses.whitebox`) the teacher's layers come from the same teacher
pass as its targets, and the state's `aux` holds their projections: the optimizer updates them
with the student's parameters (`trainable`), one clipping norm over both; without, `aux` is
empty and everything is as it was (the same optimizer state, the same checkpoints).

A LoRA student (`kd_jax.models.lora`) is differentiated and updated in its adapters only: they
are what `trainable` gives the optimizer (whose state is then theirs alone), the frozen base
enters the loss as a constant and leaves the step as it came, bit for bit. With
`model.lora_dropout`, every step draws its dropout from the state's key.

Metrics stay on device as sums (see `losses`); the loop fetches them at log intervals only. The
state records the first step whose loss or gradients were not finite; such an update is skipped,
so the parameters in the state are always finite and safe to checkpoint.

This module imports only jax, flax, optax and numpy (plus the pure kd_jax modules).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import struct

from kd_jax.config import LossConfig, ModelConfig, OptimizerConfig
from kd_jax.losses.objective import objective
from kd_jax.losses.soft_targets import SoftTargets
from kd_jax.losses.whitebox import WhiteBox
from kd_jax.models import lora
from kd_jax.models.pure import Batch, Params, PureModel, init_params
from kd_jax.models.transformer import NOT_DECAYED
from kd_jax.parallel.mesh import activation_sharding
from kd_jax.train.onpolicy import OnPolicy


DROPOUT_STREAM = 0x10EA  # folded into the step's key for LoRA dropout (onpolicy has its own)


class Teacher(Protocol):
    """The teacher as the step sees it (`kd_jax.teacher.online`, `kd_jax.teacher.cached`)."""

    def soft_targets(self, params: Params, batch: Batch) -> SoftTargets: ...


@struct.dataclass
class TrainState:
    step: jax.Array  # completed optimizer steps, int32
    params: Params  # the student's parameters, a pure dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw key, advanced every step (stochastic losses and sampling)
    # first step (1-based) with a non-finite loss or gradient (one whose sum of squares is not
    # finite), or -1
    nonfinite_step: jax.Array
    # what went non-finite at that step: 0 the loss, i + 1 the gradient of parameter i (in
    # `jax.tree.leaves` order), -1 nothing
    nonfinite_term: jax.Array
    # the white-box losses' parameters (their projections), trained with the student and
    # checkpointed, never exported; {} without white-box losses
    aux: Params = struct.field(default_factory=dict)


def trainable(params: Params, aux: Params) -> Params:
    """What the optimizer updates: the student's parameters (a LoRA student's adapters only,
    `lora.adapters`), or with white-box projections, (those, aux)."""
    own = lora.adapters(params) or params
    return (own, aux) if aux else own


def split_trainable(tree: Params, with_aux: bool) -> tuple[Params, Params]:
    """(student's parameters, aux) of a `trainable` tree."""
    return tree if with_aux else (tree, {})


def init_state_on(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                  shardings: Any, init_aux: Callable[[], Params] = dict) -> TrainState:
    """A fresh TrainState built straight into `shardings` (one jit; no host copy of the model).

    Every process of a multi-host run computes the same values (the RNG does not depend on how
    the arrays are split), each keeping only its own shards.
    """
    def build() -> TrainState:
        return init_state(init_params(cfg), tx, seed, init_aux())

    return jax.jit(build, out_shardings=shardings)()


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
    """AdamW with linear warm-up, then cosine decay or a constant rate; global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup])
    # Decay the weights only, not the norms' scales and the biases (`NOT_DECAYED`).
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) not in NOT_DECAYED, params)

    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def init_state(params: Params, tx: optax.GradientTransformation, seed: int,
               aux: Params | None = None) -> TrainState:
    aux = aux or {}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable(params, aux)),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_step=jnp.full((), -1, jnp.int32), nonfinite_term=jnp.full((), -1, jnp.int32),
        aux=aux)


def make_loss_fn(student: PureModel, teacher: Teacher | None, loss_cfg: LossConfig,
                 valid_vocab: int, logits_sharding: Any = None,
                 whitebox: WhiteBox | None = None) -> Callable:
    """loss_fn(params, teacher_params, batch, num_valid_tokens, frozen={}, dropout_key=None)
    -> (loss, metric sums).

    `params` is the `trainable` tree; `frozen` what the student's parameters hold beside it (a
    LoRA student's base, `lora.frozen`); `dropout_key` drops the LoRA adapters' inputs.
    `logits_sharding` pins the student's [batch, tokens, vocab] logits to a sharding (None: left
    to XLA's propagation); the teacher pins its own. `whitebox` adds its terms, the teacher
    (online) giving its layers from the same pass.
    """

    activations = activation_sharding(logits_sharding)
    with_aux = whitebox is not None and bool(whitebox.hidden_pairs)

    def loss_fn(params, teacher_params, batch, num_valid_tokens, frozen=None, dropout_key=None):
        params, aux = split_trainable(params, with_aux)
        params = {**(frozen or {}), **params}
        if whitebox is None:
            outputs = student.apply(params, batch, activation_sharding=activations,
                                    dropout_key=dropout_key)
            soft_targets = None if teacher is None else teacher.soft_targets(teacher_params,
                                                                             batch)
        else:
            outputs = student.apply(params, batch, activation_sharding=activations,
                                    dropout_key=dropout_key, **whitebox.request(0))
            soft_targets, teacher_outputs = teacher.soft_targets_and_outputs(
                teacher_params, batch, whitebox.request(1))
        loss, metrics = objective(outputs, soft_targets, batch["labels"], batch["loss_mask"],
                                  config=loss_cfg, num_valid_tokens=num_valid_tokens,
                                  valid_vocab=valid_vocab, logits_sharding=logits_sharding)
        if whitebox is None:
            return loss, metrics
        extra_loss, extra = whitebox.loss(aux, outputs, teacher_outputs, batch["loss_mask"],
                                          num_valid_tokens)
        return loss + extra_loss, {**metrics, **extra,
                                   "loss_sum": metrics["loss_sum"] + extra["loss_sum"]}

    return loss_fn


def accumulate_gradients(loss_fn: Callable, params: Params, teacher_params: Params, batch: Batch,
                         microbatches: int, frozen: Params | None = None,
                         dropout_key: jax.Array | None = None
                         ) -> tuple[Params, dict[str, jax.Array]]:
    """Sum gradients and metric sums over `microbatches` slices of `batch`, scanned in order;
    `frozen` and `dropout_key` are `make_loss_fn`'s (microbatch m drops with the key folded
    with m)."""
    num_valid_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    loss_grad = jax.grad(loss_fn, has_aux=True)

    def grad_fn(params, teacher_params, batch, num_valid_tokens, index=0):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        if frozen is None and key is None:  # the loss functions of the tests take four
            return loss_grad(params, teacher_params, batch, num_valid_tokens)
        return loss_grad(params, teacher_params, batch, num_valid_tokens, frozen, key)

    if microbatches == 1:
        return grad_fn(params, teacher_params, batch, num_valid_tokens)

    def split(x):
        # Microbatch m is rows m, m + k, m + 2k, ...: with the batch split over devices in
        # contiguous blocks, every microbatch then has rows on every device (a contiguous split
        # would put whole microbatches on single devices, and the others would idle or gather).
        return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]),
                            0, 1)

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    grads_shape, metrics_shape = jax.eval_shape(
        grad_fn, params, teacher_params, first, num_valid_tokens)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

    def body(carry, microbatch_and_index):
        grads_acc, metrics_acc = carry
        grads, metrics = grad_fn(params, teacher_params, *microbatch_and_index[:1],
                                 num_valid_tokens, microbatch_and_index[1])
        return (jax.tree.map(jnp.add, grads_acc, grads),
                jax.tree.map(jnp.add, metrics_acc, metrics)), None

    (grads, metrics), _ = jax.lax.scan(body, (zeros(grads_shape), zeros(metrics_shape)),
                                       (micro, jnp.arange(microbatches)))
    return grads, metrics


def make_update(student: PureModel, teacher: Teacher | None, tx: optax.GradientTransformation,
                schedule: optax.Schedule, loss_cfg: LossConfig, microbatches: int,
                valid_vocab: int, logits_sharding: Any = None,
                whitebox: WhiteBox | None = None, onpolicy: OnPolicy | None = None) -> Callable:
    """Build `update(state, teacher_params, batch) -> (state, metrics)`; jit it with donation.

    `teacher` None trains on the labels alone; `whitebox` adds its terms (the state's `aux`
    then holds their projections); `onpolicy` has the student answer some of the batch's rows
    first, with the state's parameters and key (`kd_jax.train.onpolicy`).
    """
    loss_fn = make_loss_fn(student, teacher, loss_cfg, valid_vocab, logits_sharding, whitebox)
    with_aux = whitebox is not None and bool(whitebox.hidden_pairs)

    def update(state: TrainState, teacher_params: Params, batch: Batch):
        answers = {}
        if onpolicy is not None:
            batch, answers = onpolicy.answer(state.params, batch, state.rng)
        current = trainable(state.params, state.aux)
        frozen = lora.frozen(state.params)  # a LoRA student's base: a constant of the loss
        # A LoRA student's dropout draws (used where model.lora_dropout > 0): from the step's key,
        # a stream of its own.
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                         DROPOUT_STREAM) if frozen else None
        grads, metrics = accumulate_gradients(
            loss_fn, current, teacher_params, batch, microbatches, frozen or None, dropout_key)
        # One reduction a parameter serves the norm and the check: a NaN or an infinity in a
        # gradient makes its sum of squares non-finite (so does a gradient whose square
        # overflows float32, which is counted as non-finite too).
        squares = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)])
        grad_norm = jnp.sqrt(jnp.sum(squares))
        loss_finite = jnp.isfinite(metrics["loss_sum"])
        grads_finite = jnp.isfinite(squares)
        finite = loss_finite & jnp.all(grads_finite)
        # The loss first (a non-finite loss makes every gradient so), else the first gradient.
        term = jnp.where(loss_finite, jnp.argmin(grads_finite) + 1, 0).astype(jnp.int32)
        first_bad = (state.nonfinite_step < 0) & ~finite
        updates, opt_state = tx.update(grads, state.opt_state, current)
        params, aux = split_trainable(optax.apply_updates(current, updates), with_aux)
        params = {**state.params, **params}  # a LoRA student's base, as it came
        # A non-finite step leaves the state as it was: what gets checkpointed is always finite.
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        step = state.step + 1
        new_state = state.replace(
            step=step,
            params=keep(params, state.params),
            aux=keep(aux, state.aux),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)),
            nonfinite_step=jnp.where(first_bad, step, state.nonfinite_step),
            nonfinite_term=jnp.where(first_bad, term, state.nonfinite_term))
        metrics = dict(metrics, **answers, grad_norm=grad_norm, lr=schedule(state.step),
                       skipped=(~finite).astype(jnp.float32))
        return new_state, metrics

    return update
