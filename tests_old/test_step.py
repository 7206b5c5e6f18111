"""The fused step against a loss computed separately; microbatching; compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import losses
from kd_jax import step as step_lib
from kd_jax.config import LossConfig, ModelConfig, OptimizerConfig
from kd_jax.model import Transformer, logits_btv

# float32 throughout: tolerances set once from the dtype.
RTOL, ATOL_FRACTION = 1e-5, 1e-6
VALID_VOCAB = 50  # the models have 64 embedding rows; rows 50..63 are padding

STUDENT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=32, seed=1)
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96,
                      max_seq_len=32, seed=2)
LOSS = LossConfig(divergence="forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.3)


def make_batch(seed, batch=8, seq=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VALID_VOCAB, (batch, seq), dtype=np.int32)
    targets = rng.integers(0, VALID_VOCAB, (batch, seq), dtype=np.int32)
    # Two packed documents per row, then padding of varying length.
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[:, seq // 2:] = 2
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(
        batch, 0).astype(np.int32)
    for row in range(batch):
        pad = rng.integers(0, seq // 2)
        if pad:
            segment_ids[row, -pad:] = 0
            positions[row, -pad:] = 0
    loss_mask = (segment_ids > 0).astype(np.int32)
    return {"tokens": tokens, "targets": targets, "positions": positions,
            "segment_ids": segment_ids, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def models():
    student, student_params = step_lib.init_model(STUDENT)
    teacher, teacher_params = step_lib.init_model(TEACHER)
    return student, student_params, teacher, teacher_params


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
    loss, _ = losses.distillation_loss(
        student_logits, teacher_logits, batch["targets"], batch["loss_mask"], config=LOSS,
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
    return jax.jit(step_lib.make_update(student, teacher, tx, optax.constant_schedule(1.0), LOSS,
                                        microbatches, VALID_VOCAB))


def grads_from_update(models, microbatches, student_params, teacher_params, batch):
    """Run the fused update; return (loss, gradients, new state, metrics)."""
    tx = capture_gradients()
    state = step_lib.init_state(student_params, tx, seed=0)
    new_state, metrics = sgd_update(models, microbatches, tx)(state, teacher_params, batch)
    loss = float(metrics["loss_sum"]) / float(metrics["tokens"])
    return loss, new_state.opt_state, new_state, metrics


def assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL_FRACTION * np.abs(e).max())


def test_fused_step_matches_the_reference_loss_and_gradients(models):
    student, student_params, teacher, teacher_params = models
    batch = make_batch(0)
    expected_loss, expected_grads = jax.value_and_grad(reference_loss)(
        student_params, teacher_params, batch)
    loss, grads, new_state, metrics = grads_from_update(
        models, 1, student_params, teacher_params, batch)
    np.testing.assert_allclose(loss, float(expected_loss), rtol=RTOL)
    assert_trees_close(grads, expected_grads)
    assert int(new_state.step) == 1 and int(new_state.nonfinite_step) == -1
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()


def test_microbatches_equal_one_big_batch(models):
    _, student_params, _, teacher_params = models
    batch = make_batch(1)
    one = grads_from_update(models, 1, student_params, teacher_params, batch)
    four = grads_from_update(models, 4, student_params, teacher_params, batch)
    np.testing.assert_allclose(four[0], one[0], rtol=RTOL)
    assert_trees_close(four[1], one[1])
    for key in one[3]:
        np.testing.assert_allclose(np.asarray(four[3][key]), np.asarray(one[3][key]), rtol=RTOL)


def test_teacher_receives_no_gradient(models):
    student, student_params, teacher, teacher_params = models
    loss_fn = step_lib.make_loss_fn(student, teacher, LOSS, VALID_VOCAB)
    batch = make_batch(2)
    teacher_grads = jax.grad(lambda t: loss_fn(student_params, t, batch, 10.0)[0])(teacher_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))


def test_no_compilation_after_the_first_step(models):
    student, student_params, teacher, teacher_params = models
    tx, schedule = step_lib.make_optimizer(OptimizerConfig(warmup_steps=2), total_steps=10)
    update = jax.jit(step_lib.make_update(student, teacher, tx, schedule, LOSS, 2, VALID_VOCAB),
                     donate_argnums=(0,))
    state = step_lib.init_state(jax.tree.map(jnp.copy, student_params), tx, seed=0)
    compiles = []
    listener = lambda name, *_, **__: compiles.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, _ = update(state, teacher_params, make_batch(10))
        first = compiles.count("/jax/core/compile/backend_compile_duration")
        for seed in range(11, 15):
            state, metrics = update(state, teacher_params, make_batch(seed))
        jax.block_until_ready(metrics)
        later = compiles.count("/jax/core/compile/backend_compile_duration") - first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1, "the listener must see the first compilation"
    assert later == 0, f"{later} compilations after the first step"
    assert int(state.step) == 5


def test_non_finite_step_is_recorded_and_skipped(models):
    _, student_params, _, teacher_params = models
    broken_teacher = jax.tree.map(lambda p: p * jnp.nan, teacher_params)
    state = step_lib.init_state(student_params, optax.sgd(1.0), seed=0)
    update = sgd_update(models, 1)
    state, _ = update(state, teacher_params, make_batch(3))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = update(state, broken_teacher, make_batch(4))
    assert not np.isfinite(float(metrics["loss_sum"]))
    assert int(state.nonfinite_step) == 2
    assert_trees_close(state.params, before)
    state, _ = update(state, teacher_params, make_batch(5))
    assert int(state.nonfinite_step) == 2, "the first non-finite step is kept"


def test_hard_label_step_has_no_teacher(models):
    student, student_params, _, _ = models
    update = jax.jit(step_lib.make_update(student, None, optax.sgd(1.0),
                                          optax.constant_schedule(1.0), LOSS, 1, VALID_VOCAB))
    state = step_lib.init_state(student_params, optax.sgd(1.0), seed=0)
    state, metrics = update(state, None, make_batch(6))
    assert "kd_sum" not in metrics and np.isfinite(float(metrics["loss_sum"]))


def test_schedule_warms_up_then_decays():
    _, schedule = step_lib.make_optimizer(
        OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1)
    _, constant = step_lib.make_optimizer(
        OptimizerConfig(lr=1.0, warmup_steps=10, schedule="constant"), total_steps=100)
    assert float(constant(5)) == pytest.approx(0.5) and float(constant(90)) == pytest.approx(1.0)
