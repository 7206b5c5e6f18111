"""The fused training step: frozen teacher forward, student forward/backward, optimizer update.

One function, jitted once per run:

    update(state, teacher_params, batch) -> (state, metrics)

The teacher's parameters enter as an argument and its logits pass through `stop_gradient`: it has
no optimizer state and is never checkpointed. With `microbatches = k`, the batch is split into k
microbatches scanned in order; the teacher runs on each microbatch (never one full-batch teacher
pass), and every microbatch's loss is divided by the number of valid tokens of the *whole* batch,
so the summed gradients equal those of one big batch.

Metrics stay on device as sums (see `losses`); the loop fetches them at log intervals only. The
state records the first step whose loss or gradients were not finite; such an update is skipped,
so the parameters in the state are always finite and safe to checkpoint.

This module imports only jax, flax, optax and numpy (plus the pure kd_jax modules).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from kd_jax import losses
from kd_jax import metrics as metrics_lib
from kd_jax.config import LossConfig, ModelConfig, OptimizerConfig
from kd_jax.model import Transformer, bind, logits_btv, split_params

Batch = dict[str, jax.Array]
Params = Any


@struct.dataclass
class TrainState:
    step: jax.Array  # completed optimizer steps, int32
    params: Params  # the student's parameters, a pure dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw key, advanced every step (stochastic losses and sampling)
    nonfinite_step: jax.Array  # first step (1-based) with a non-finite loss or gradient, or -1


@dataclasses.dataclass(frozen=True)
class PureModel:
    """An nnx module taken apart: a graph definition plus a template state, applied to pure params.

    Any module works as long as `module(tokens, positions, segment_ids)` returns the final hidden
    states [batch, seq, d] and `module.head_vd()` the output head [vocab, d].
    """

    graphdef: nnx.GraphDef
    template: nnx.State

    def logits(self, params: Params, batch: Batch) -> jax.Array:
        module = bind(self.graphdef, self.template, params)
        hidden_btd = module(batch["tokens"], batch["positions"], batch["segment_ids"])
        return logits_btv(hidden_btd, module.head_vd())


def init_model(cfg: ModelConfig) -> tuple[PureModel, Params]:
    """Build the Transformer described by `cfg`, initialized from `cfg.seed`."""
    module = Transformer(cfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, template, params = split_params(module)
    return PureModel(graphdef, template), params


def init_state_on(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
                  shardings: Any) -> TrainState:
    """A fresh TrainState built straight into `shardings` (one jit; no host copy of the model).

    Every process of a multi-host run computes the same values (the RNG does not depend on how
    the arrays are split), each keeping only its own shards.
    """
    def build() -> TrainState:
        module = Transformer(cfg, rngs=nnx.Rngs(cfg.seed))
        return init_state(split_params(module)[2], tx, seed)

    return jax.jit(build, out_shardings=shardings)()


def abstract_model(cfg: ModelConfig) -> tuple[PureModel, Params]:
    """Like `init_model`, but with shape/dtype placeholders instead of arrays (for restoring)."""
    module = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef, template, params = split_params(module)
    return PureModel(graphdef, template), params


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
    # Decay matrices only: norm scales (1-d) are left alone, as is usual for transformers.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def init_state(params: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_step=jnp.full((), -1, jnp.int32))


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def make_loss_fn(student: PureModel, teacher: PureModel | None, loss_cfg: LossConfig,
                 valid_vocab: int, logits_shardings: tuple[Any, Any] = (None, None),
                 cache_mode: str | None = None) -> Callable:
    """loss_fn(params, teacher_params, batch, num_valid_tokens) -> (loss, metric sums).

    `logits_shardings` (student, teacher) pins the [batch, tokens, vocab] logits, the largest
    activations of the step, to a sharding each (None: left to XLA's propagation). With a
    `cache_mode` (topk, sample, full) there is no teacher: the batch carries its cached targets
    under `losses.TARGET_PREFIX` + `losses.TARGET_KEYS[cache_mode]`.
    """
    student_logits_sharding, teacher_logits_sharding = logits_shardings

    def loss_fn(params, teacher_params, batch, num_valid_tokens):
        student_logits_btv = _constrain(student.logits(params, batch), student_logits_sharding)
        if cache_mode is not None:
            targets = {key: batch[losses.TARGET_PREFIX + key]
                       for key in losses.TARGET_KEYS[cache_mode]}
            return losses.sparse_distillation_loss(
                student_logits_btv, targets, batch["targets"], batch["loss_mask"],
                mode=cache_mode, config=loss_cfg, num_valid_tokens=num_valid_tokens,
                valid_vocab=valid_vocab)
        if teacher is None:
            return losses.hard_label_loss(
                student_logits_btv, batch["targets"], batch["loss_mask"],
                num_valid_tokens=num_valid_tokens, valid_vocab=valid_vocab)
        teacher_logits_btv = jax.lax.stop_gradient(
            _constrain(teacher.logits(teacher_params, batch), teacher_logits_sharding))
        return losses.distillation_loss(
            student_logits_btv, teacher_logits_btv, batch["targets"], batch["loss_mask"],
            config=loss_cfg, num_valid_tokens=num_valid_tokens, valid_vocab=valid_vocab)

    return loss_fn


def accumulate_gradients(loss_fn: Callable, params: Params, teacher_params: Params, batch: Batch,
                         microbatches: int) -> tuple[Params, dict[str, jax.Array]]:
    """Sum gradients and metric sums over `microbatches` slices of `batch`, scanned in order."""
    num_valid_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn(params, teacher_params, batch, num_valid_tokens)

    def split(x):
        return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    grads_shape, metrics_shape = jax.eval_shape(
        grad_fn, params, teacher_params, first, num_valid_tokens)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731

    def body(carry, microbatch):
        grads_acc, metrics_acc = carry
        grads, metrics = grad_fn(params, teacher_params, microbatch, num_valid_tokens)
        return (jax.tree.map(jnp.add, grads_acc, grads),
                jax.tree.map(jnp.add, metrics_acc, metrics)), None

    (grads, metrics), _ = jax.lax.scan(body, (zeros(grads_shape), zeros(metrics_shape)), micro)
    return grads, metrics


def make_update(student: PureModel, teacher: PureModel | None, tx: optax.GradientTransformation,
                schedule: optax.Schedule, loss_cfg: LossConfig, microbatches: int,
                valid_vocab: int, logits_shardings: tuple[Any, Any] = (None, None),
                cache_mode: str | None = None) -> Callable:
    """Build `update(state, teacher_params, batch) -> (state, metrics)`; jit it with donation.

    With a `cache_mode`, the teacher's targets come in the batch (see `make_loss_fn`).
    """
    loss_fn = make_loss_fn(student, teacher, loss_cfg, valid_vocab, logits_shardings,
                           cache_mode)

    def update(state: TrainState, teacher_params: Params, batch: Batch):
        grads, metrics = accumulate_gradients(
            loss_fn, state.params, teacher_params, batch, microbatches)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves the state as it was: what gets checkpointed is always finite.
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        step = state.step + 1
        new_state = state.replace(
            step=step,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)),
            nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, step,
                                     state.nonfinite_step))
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step))
        return new_state, metrics

    return update


def make_eval_fn(student: PureModel, teacher: PureModel | None, valid_vocab: int) -> Callable:
    """eval_fn(params, teacher_params, batch) -> metric sums for the student and the teacher."""

    def eval_fn(params, teacher_params, batch):
        logits = student.logits(params, batch)
        out = {}
        if teacher is not None:
            teacher_logits = teacher.logits(teacher_params, batch)
            out["teacher"] = metrics_lib.token_stats(
                teacher_logits, batch["targets"], batch["loss_mask"], valid_vocab=valid_vocab)
        else:
            teacher_logits = None
        out["student"] = metrics_lib.token_stats(
            logits, batch["targets"], batch["loss_mask"], valid_vocab=valid_vocab,
            teacher_logits_btv=teacher_logits)
        return out

    return eval_fn
