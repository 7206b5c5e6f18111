"""kd_jax.train.step: the fused step against a loss computed separately; microbatching; compile
once; the non-finite skip; hard labels; the schedule. Then the step with a cache's targets (a
stand-in teacher reading them from the batch, as `kd_jax.teacher.cached.CachedTeacher` does)
against the online teacher, and the targets' refusals, raised when the step is traced."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax.config import LossConfig, OptimizerConfig
from kd_jax.losses.objective import objective_on_logits
from kd_jax.losses.soft_targets import Dense, Sampled, TopK
from kd_jax.models.pure import logits_btv
from kd_jax.models.transformer import Transformer
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.sparse import full_targets, row_keys, sample_targets, topk_targets
from kd_jax.train.step import init_state, make_loss_fn, make_optimizer, make_update
from tests.helpers import (
    LOSS,
    RTOL,
    STUDENT,
    TEACHER,
    VALID_VOCAB,
    assert_trees_close,
    make_batch,
)


def with_params(module, params):
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    return module


def reference_loss(student_params, teacher_params, batch):
    """The distillation loss written out directly on the nnx modules, no step machinery."""
    student_module = with_params(Transformer(STUDENT, rngs=nnx.Rngs(0)), student_params)
    teacher_module = with_params(Transformer(TEACHER, rngs=nnx.Rngs(0)), teacher_params)
    args = batch["tokens"], batch["positions"], batch["segment_ids"]
    student_logits = logits_btv(student_module(*args), student_module.head_vd())
    teacher_logits = logits_btv(teacher_module(*args), teacher_module.head_vd())
    num_valid = jnp.sum(batch["loss_mask"])
    loss, _ = objective_on_logits(
        student_logits, Dense(teacher_logits), batch["labels"], batch["loss_mask"], config=LOSS,
        num_valid_tokens=num_valid, valid_vocab=VALID_VOCAB)
    return loss


def capture_gradients():
    """An optimizer whose state is the last gradient: the update's gradients, read exactly."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.negative, grads), grads))


def sgd_update(models, microbatches, tx=None):
    student, _, teacher, _ = models
    tx = tx or optax.sgd(1.0)
    return jax.jit(make_update(student, OnlineTeacher(teacher), tx, optax.constant_schedule(1.0),
                               LOSS, microbatches, VALID_VOCAB))


def grads_from_update(models, microbatches, student_params, teacher_params, batch):
    """Run the fused update; return (loss, gradients, new state, metrics)."""
    tx = capture_gradients()
    state = init_state(student_params, tx, seed=0)
    new_state, metrics = sgd_update(models, microbatches, tx)(state, teacher_params, batch)
    loss = float(metrics["loss_sum"]) / float(metrics["tokens"])
    return loss, new_state.opt_state, new_state, metrics


def test_fused_step_matches_the_reference_loss_and_gradients(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(0)
    expected_loss, expected_grads = jax.value_and_grad(reference_loss)(
        student_params, teacher_params, batch)
    loss, grads, new_state, metrics = grads_from_update(
        tiny_models, 1, student_params, teacher_params, batch)
    np.testing.assert_allclose(loss, float(expected_loss), rtol=RTOL)
    assert_trees_close(grads, expected_grads)
    assert int(new_state.step) == 1 and int(new_state.nonfinite_step) == -1
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()


def test_microbatches_equal_one_big_batch(tiny_models):
    _, student_params, _, teacher_params = tiny_models
    batch = make_batch(1)
    one = grads_from_update(tiny_models, 1, student_params, teacher_params, batch)
    four = grads_from_update(tiny_models, 4, student_params, teacher_params, batch)
    np.testing.assert_allclose(four[0], one[0], rtol=RTOL)
    assert_trees_close(four[1], one[1])
    for key in one[3]:
        np.testing.assert_allclose(np.asarray(four[3][key]), np.asarray(one[3][key]), rtol=RTOL)


def test_teacher_receives_no_gradient(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    loss_fn = make_loss_fn(student, OnlineTeacher(teacher), LOSS, VALID_VOCAB)
    batch = make_batch(2)
    teacher_grads = jax.grad(lambda t: loss_fn(student_params, t, batch, 10.0)[0])(teacher_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))


def test_no_compilation_after_the_first_step(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=2), total_steps=10)
    # The state is donated: it starts from a copy of the session's parameters.
    update = jax.jit(make_update(student, OnlineTeacher(teacher), tx, schedule, LOSS, 2,
                                 VALID_VOCAB), donate_argnums=(0,))
    state = init_state(jax.tree.map(jnp.copy, student_params), tx, seed=0)
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    # The suite's compilation cache would serve the first compilation from disk, unseen.
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        state, _ = update(state, teacher_params, make_batch(10))
        first = compiles.count("/jax/core/compile/backend_compile_duration")
        for seed in range(11, 15):
            state, metrics = update(state, teacher_params, make_batch(seed))
        jax.block_until_ready(metrics)
        later = compiles.count("/jax/core/compile/backend_compile_duration") - first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", cache_was)
    assert first >= 1, "the listener must see the first compilation"
    assert later == 0, f"{later} compilations after the first step"
    assert int(state.step) == 5


def test_non_finite_step_is_recorded_and_skipped(tiny_models):
    _, student_params, _, teacher_params = tiny_models
    broken_teacher = jax.tree.map(lambda p: p * jnp.nan, teacher_params)
    state = init_state(student_params, optax.sgd(1.0), seed=0)
    update = sgd_update(tiny_models, 1)
    state, _ = update(state, teacher_params, make_batch(3))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = update(state, broken_teacher, make_batch(4))
    assert not np.isfinite(float(metrics["loss_sum"]))
    assert int(state.nonfinite_step) == 2 and int(state.nonfinite_term) == 0  # the loss
    assert float(metrics["skipped"]) == 1.0
    assert_trees_close(state.params, before)
    state, metrics = update(state, teacher_params, make_batch(5))
    assert int(state.nonfinite_step) == 2, "the first non-finite step is kept"
    assert float(metrics["skipped"]) == 0.0


def test_a_non_finite_gradient_is_named_by_its_parameter(tiny_models):
    """The loop's stop message names the parameter whose gradient went non-finite first."""
    from kd_jax.train.loop import NonFiniteError, _stop_if_nonfinite

    _, student_params, _, _ = tiny_models
    state = init_state(student_params, optax.sgd(1.0), seed=0)
    names = ["/".join(str(key.key) for key in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]

    class Saved:
        def wait(self):
            pass

        def latest_step(self):
            return 6

    for index in (0, len(names) - 1):
        bad = state.replace(nonfinite_step=jnp.int32(7), nonfinite_term=jnp.int32(index + 1))
        with pytest.raises(NonFiniteError) as caught:
            _stop_if_nonfinite(bad, Saved())
        assert str(caught.value) == (
            f"non-finite gradient of {names[index]} at step 7: the update was not applied; "
            "stopped, checkpoint 6 kept (train.on_nonfinite=skip skips such steps instead)")
    _stop_if_nonfinite(state, Saved())  # all finite: nothing to say


def test_hard_label_step_has_no_teacher(tiny_models):
    student, student_params, _, _ = tiny_models
    update = jax.jit(make_update(student, None, optax.sgd(1.0), optax.constant_schedule(1.0),
                                 LOSS, 1, VALID_VOCAB))
    state = init_state(student_params, optax.sgd(1.0), seed=0)
    state, metrics = update(state, None, make_batch(6))
    assert "kd_sum" not in metrics and np.isfinite(float(metrics["loss_sum"]))


@pytest.mark.parametrize("kd_weight, ce_weight", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0), (2.0, 5.0)])
def test_without_soft_targets_the_loss_is_the_mean_cross_entropy(kd_weight, ce_weight,
                                                                 tiny_models):
    """Hard labels: the mean cross-entropy over the valid tokens, whatever the weights say."""
    student, student_params, _, _ = tiny_models
    config = LossConfig(divergence="jsd", temperature=2.0, kd_weight=kd_weight,
                        ce_weight=ce_weight)
    batch = make_batch(8)
    num_valid = np.float32(batch["loss_mask"].sum())
    loss, metrics = jax.jit(make_loss_fn(student, None, config, VALID_VOCAB))(
        student_params, None, batch, num_valid)

    # float64 reference on the student's logits, over the valid vocabulary.
    logits = np.asarray(student.logits(student_params, batch), np.float64)[..., :VALID_VOCAB]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    cross_entropy = -np.take_along_axis(log_probs, batch["labels"][..., None], -1)[..., 0]
    valid = batch["loss_mask"].astype(bool)
    np.testing.assert_allclose(float(loss), cross_entropy[valid].mean(), rtol=RTOL)
    assert set(metrics) == {"loss_sum", "ce_sum", "tokens"}
    np.testing.assert_array_equal(np.asarray(metrics["loss_sum"]), np.asarray(metrics["ce_sum"]))
    assert float(metrics["tokens"]) == valid.sum()

    # The objective itself, on the same logits: the same value.
    on_logits, _ = objective_on_logits(student.logits(student_params, batch), None,
                                       batch["labels"], batch["loss_mask"], config=config,
                                       num_valid_tokens=num_valid, valid_vocab=VALID_VOCAB)
    np.testing.assert_allclose(float(on_logits), float(loss), rtol=RTOL)


def test_schedule_warms_up_then_decays():
    _, schedule = make_optimizer(
        OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1)
    _, constant = make_optimizer(
        OptimizerConfig(lr=1.0, warmup_steps=10, schedule="constant"), total_steps=100)
    assert float(constant(5)) == pytest.approx(0.5) and float(constant(90)) == pytest.approx(1.0)


def test_weight_decay_spares_the_norms_and_biases_only():
    """With a zero gradient, AdamW's update is the decay alone: -lr * weight_decay * p."""
    cfg = dataclasses.replace(STUDENT, qkv_bias=True, o_bias=True, qk_norm=True)
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    params = jax.tree.map(lambda p: p + 1.0, params)  # biases start at zero: make them show
    tx, _ = make_optimizer(OptimizerConfig(lr=1.0, warmup_steps=0, schedule="constant",
                                           weight_decay=0.5, clip_norm=0), total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    spared = {"attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "bq", "bk", "bv", "bo"}
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = path[-1].key
        param = params["layers"][name] if name in params["layers"] else params[name]
        expected = 0.0 if name in spared else -0.5 * np.asarray(param)
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Cached targets: a stand-in teacher reads them from the batch
# ---------------------------------------------------------------------------------------------

class FromBatch:
    """A cached teacher's step side without a cache on disk: the batch's "soft_targets" fields
    as targets of one kind (a full cache's log-probabilities serve as Dense logits, as in
    `kd_jax.teacher.cached`)."""

    def __init__(self, kind):
        self.kind = kind

    def soft_targets(self, params, batch):
        fields = batch["soft_targets"]
        return Dense(fields["logprobs"]) if self.kind is Dense else self.kind(**fields)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_cache_step_equals_the_online_step(temperature, tiny_models):
    """Loss and gradients of the cached step (full log-probs) are the online step's."""
    student, student_params, teacher, teacher_params = tiny_models
    loss_cfg = dataclasses.replace(LOSS, temperature=temperature)
    batch = make_batch(0)
    teacher_logits = teacher.logits(teacher_params, batch)
    cached = dict(batch, soft_targets={"logprobs": full_targets(
        teacher_logits, temperature=1.0, valid_vocab=VALID_VOCAB)})
    n_valid = np.float32(batch["loss_mask"].sum())
    online = make_loss_fn(student, OnlineTeacher(teacher), loss_cfg, VALID_VOCAB)
    offline = make_loss_fn(student, FromBatch(Dense), loss_cfg, VALID_VOCAB)
    (loss_a, _), grads_a = jax.value_and_grad(online, has_aux=True)(
        student_params, teacher_params, batch, n_valid)
    (loss_b, _), grads_b = jax.value_and_grad(offline, has_aux=True)(
        student_params, None, cached, n_valid)
    np.testing.assert_allclose(loss_b, loss_a, rtol=RTOL)
    assert_trees_close(grads_b, grads_a)


@pytest.mark.parametrize("kind, divergence, supported, reason", [
    (TopK, "mse", "jsd", "'mse' .* not defined for top-k"),
    (Sampled, "reverse_kl", "forward_kl", "'reverse_kl' cannot be estimated from sampled"),
])
def test_an_unsupported_divergence_is_refused_when_the_step_is_traced(
        kind, divergence, supported, reason, tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(7)
    teacher_logits = teacher.logits(teacher_params, batch)
    if kind is TopK:
        fields = topk_targets(teacher_logits, 8, temperature=LOSS.temperature,
                              valid_vocab=VALID_VOCAB)
    else:
        fields = sample_targets(teacher_logits, row_keys(0, np.arange(len(teacher_logits))), 8,
                                temperature=LOSS.temperature, valid_vocab=VALID_VOCAB)
    batch = dict(batch, soft_targets=fields)
    tx = optax.sgd(1.0)
    state = init_state(student_params, tx, seed=0)

    def update_for(name):
        return jax.jit(make_update(student, FromBatch(kind), tx, optax.constant_schedule(1.0),
                                   dataclasses.replace(LOSS, divergence=name), 2, VALID_VOCAB))

    update_for(supported).trace(state, None, batch)  # the same step traces with a divergence
    with pytest.raises(ValueError, match=reason):  # it supports; tracing runs nothing
        update_for(divergence).trace(state, None, batch)


def test_a_lora_step_updates_the_adapters_alone(tiny_models):
    """The optimizer state holds the adapters' moments only; after steps the base is the same
    bits and every adapter has moved (B from zero, A once B is no longer zero)."""
    from kd_jax.models import lora
    from kd_jax.models.pure import count_params, init_model

    _, _, teacher, teacher_params = tiny_models
    cfg = dataclasses.replace(STUDENT, init="hf", lora_rank=4, lora_alpha=8.0)
    student, params = init_model(cfg)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), 10)
    state = init_state(params, tx, seed=0)
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf) > 0]
    assert count_params(moments) == 2 * count_params(params["lora"])  # AdamW's m and v
    update = jax.jit(make_update(student, OnlineTeacher(teacher), tx, schedule, LOSS, 2,
                                 VALID_VOCAB))
    base = jax.tree.map(np.array, lora.base_of(params))
    for step in range(3):
        state, metrics = update(state, teacher_params, make_batch(step))
    assert float(metrics["skipped"]) == 0
    for got, want in zip(jax.tree.leaves(lora.base_of(state.params)), jax.tree.leaves(base),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    for name, value in state.params["lora"].items():
        assert not np.array_equal(value, params["lora"][name]), name


def test_lora_gradients_are_those_of_the_merged_weights(tiny_models):
    """The step's adapter gradients against the plain model's loss with merged weights
    W + (alpha / r) A B, differentiated through the merge."""
    from kd_jax.models import lora
    from kd_jax.models.pure import init_model

    _, _, teacher, teacher_params = tiny_models
    cfg = dataclasses.replace(STUDENT, init="hf", lora_rank=4, lora_alpha=8.0,
                              lora_targets=["q", "o", "down"])
    student, params = init_model(cfg)
    keys = iter(jax.random.split(jax.random.key(4), len(params["lora"])))
    params["lora"] = {name: 0.1 * jax.random.normal(next(keys), value.shape)
                      for name, value in params["lora"].items()}
    plain, _ = init_model(STUDENT)
    batch = make_batch(5)
    plain_loss = make_loss_fn(plain, OnlineTeacher(teacher), LOSS, VALID_VOCAB)
    num_valid = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    expected = jax.grad(lambda adapters: plain_loss(
        lora.merged({**params, "lora": adapters}, cfg), teacher_params, batch, num_valid)[0])(
        params["lora"])
    tx = capture_gradients()
    update = jax.jit(make_update(student, OnlineTeacher(teacher), tx,
                                 optax.constant_schedule(1.0), LOSS, 1, VALID_VOCAB))
    state, _ = update(init_state(params, tx, seed=0), teacher_params, batch)
    assert set(state.opt_state) == {"lora"}
    assert_trees_close(state.opt_state["lora"], expected)
