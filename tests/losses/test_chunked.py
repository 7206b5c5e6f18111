"""kd_jax.losses.chunked: the fused, chunked LM head and loss against the unchunked objective,
for every divergence, every kind of target, padding, with and without a hard-label term; and
its memory: no [tokens, vocab] array for the whole batch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from kd_jax.config import Divergence as DivergenceName
from kd_jax.config import ModelConfig, choices
from kd_jax.losses.chunked import CHUNK_BYTES, CPU_CHUNK_BYTES, chunk_positions
from kd_jax.losses.objective import objective
from kd_jax.losses.soft_targets import Dense, Projected, Sampled, TopK
from kd_jax.models.pure import ModelOutputs, init_model
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.sparse import full_targets, row_keys, sample_targets, topk_targets
from kd_jax.train.step import make_loss_fn
from tests.helpers import (
    LOSS,
    RTOL,
    STUDENT,
    VALID_VOCAB,
    assert_trees_close,
    make_batch,
)

DIVERGENCES = choices(DivergenceName)
BATCH, SEQ = 8, 16  # make_batch's rows: two documents each, then padding


def assert_close(chunked, unchunked):
    """Loss, metric sums and gradients of the two paths."""
    (loss_b, metrics_b), grads_b = chunked
    (loss_a, metrics_a), grads_a = unchunked
    assert np.isfinite(loss_a)
    np.testing.assert_allclose(loss_b, loss_a, rtol=RTOL)
    # A metric sum adds per-token terms that may cancel (a sampled KL is an entropy minus a
    # cross-entropy): summed in another order, it agrees to rtol per token.
    for key in metrics_a:
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=RTOL,
                                   atol=RTOL * float(metrics_a["tokens"]), err_msg=key)
    # The head's gradient is summed chunk by chunk, in another order than one matmul over all
    # tokens: an element that nearly cancels differs by the rounding of its larger terms, so the
    # absolute tolerance is rtol at the leaf's scale.
    assert_trees_close(grads_b, grads_a, atol_fraction=RTOL)


def with_chunks(loss_cfg, positions):
    return dataclasses.replace(loss_cfg, chunk_tokens=BATCH * positions)


# --------------------------------------------------------------------- the objective, directly

def outputs_and_targets(kind, seed=0):
    """Random student outputs (hidden states, an untied head with padded rows) and a teacher's
    targets of `kind` for make_batch's rows."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(BATCH, SEQ, 32)).astype(np.float32)
    head = (0.3 * rng.normal(size=(64, 32))).astype(np.float32)
    teacher = Projected(rng.normal(size=(BATCH, SEQ, 48)).astype(np.float32),
                        (0.3 * rng.normal(size=(64, 48))).astype(np.float32))
    if kind is Projected:
        return hidden, head, teacher
    logits = teacher.dense().logits
    if kind is TopK:
        return hidden, head, TopK(**topk_targets(logits, 8, temperature=LOSS.temperature,
                                                 valid_vocab=VALID_VOCAB))
    if kind is Sampled:
        return hidden, head, Sampled(**sample_targets(
            logits, row_keys(0, np.arange(BATCH)), 8, temperature=LOSS.temperature,
            valid_vocab=VALID_VOCAB))
    return hidden, head, Dense(full_targets(logits, temperature=1.0, valid_vocab=VALID_VOCAB))


def objective_grads(loss_cfg, hidden, head, targets, batch):
    def loss(hidden, head):
        return objective(ModelOutputs(hidden, head), targets, batch["labels"],
                         batch["loss_mask"], config=loss_cfg,
                         num_valid_tokens=batch["loss_mask"].sum(), valid_vocab=VALID_VOCAB)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, head)


@pytest.mark.parametrize("kind, divergence, ce_weight", [
    *[(Projected, name, 0.3) for name in DIVERGENCES],  # every divergence, online
    (Projected, "forward_kl", 0.0),
    (TopK, "forward_kl", 0.3), (TopK, "jsd", 0.3), (TopK, "tvd", 0.3), (TopK, "reverse_kl", 0.0),
    (Sampled, "forward_kl", 0.3), (Sampled, "forward_kl", 0.0),
    (Dense, "skew_reverse_kl", 0.3), (Dense, "mse", 0.0),
    (None, "forward_kl", 1.0),
])
def test_every_divergence_and_kind_of_target(kind, divergence, ce_weight):
    """Online (Projected), top-k, sampled and full (Dense) targets, and hard labels alone (None);
    chunks of 3 positions: 16 = 5 x 3 + 1, the last chunk mostly filler past the padding."""
    hidden, head, targets = outputs_and_targets(kind or Projected)
    targets = None if kind is None else targets
    batch = make_batch(0)
    loss_cfg = dataclasses.replace(LOSS, divergence=divergence, ce_weight=ce_weight)
    assert_close(objective_grads(with_chunks(loss_cfg, 3), hidden, head, targets, batch),
                 objective_grads(dataclasses.replace(loss_cfg, chunk_tokens=-1), hidden, head,
                                 targets, batch))


@pytest.mark.parametrize("positions", [1, 8])
def test_chunk_sizes_that_do_and_do_not_divide_the_sequence(positions):
    hidden, head, targets = outputs_and_targets(Projected, seed=1)
    batch = make_batch(1)
    assert_close(objective_grads(with_chunks(LOSS, positions), hidden, head, targets, batch),
                 objective_grads(dataclasses.replace(LOSS, chunk_tokens=-1), hidden, head,
                                 targets, batch))


# ------------------------------------------------------------------------- through the models

def model_grads(student, teacher, loss_cfg, student_params, teacher_params, batch):
    loss_fn = make_loss_fn(student, teacher, loss_cfg, VALID_VOCAB)
    n_valid = np.float32(batch["loss_mask"].sum())
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        student_params, teacher_params, batch, n_valid)


@pytest.mark.parametrize("tied", [True])  # untied heads: the objective tests above
def test_the_step_s_gradients_for_every_student_parameter(tiny_models, tied):
    """Through the models: the online teacher's hidden states and head, the student's every
    parameter (a tied head is the embedding: its gradient sums the lookup's and the head's)."""
    _, _, teacher, teacher_params = tiny_models
    student, student_params = init_model(dataclasses.replace(STUDENT, tie_embeddings=tied))
    batch = make_batch(4)
    args = OnlineTeacher(teacher), student_params, teacher_params, batch
    assert_close(model_grads(student, args[0], with_chunks(LOSS, 3), *args[1:]),
                 model_grads(student, args[0], dataclasses.replace(LOSS, chunk_tokens=-1),
                             *args[1:]))


def test_the_automatic_chunk_follows_the_logits_size():
    for platform in ("cpu", "gpu"):
        assert chunk_positions(0, 8, 512, 256, platform) == 0  # 4 MB of logits: one piece
        assert chunk_positions(-1, 8, 8192, 128256, platform) == 0  # never
    positions = chunk_positions(0, 2, 4096, 128256, "gpu")
    assert 0 < positions < 4096 and 2 * positions * 128256 * 4 <= CHUNK_BYTES
    # 64 MiB of logits: one piece on an accelerator, 16 MiB chunks (512 tokens) on a CPU
    assert chunk_positions(0, 8, 256, 8192, "gpu") == 0
    assert chunk_positions(0, 8, 256, 8192, "cpu") == 64
    assert CPU_CHUNK_BYTES == 8 * 64 * 8192 * 4
    assert chunk_positions(64, 8, 16, 100) == 8  # 64 tokens over 8 rows
    assert chunk_positions(1024, 8, 16, 100) == 0  # a chunk as long as the sequence: unchunked


def test_no_whole_batch_logits_are_allocated():
    """Compiled loss and gradients at a vocabulary of 32,768: the chunked path's temporaries
    are a fraction of the unchunked path's, which holds several arrays the size of the whole
    batch's logits (4 x 512 x 32768 x 4 B = 256 MiB); chunks of 128 tokens, 16 of them."""
    import jax.numpy as jnp

    cfg = ModelConfig(vocab_size=32768, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      d_ff=128, max_seq_len=512)
    student, params = init_model(cfg)
    teacher, teacher_params = init_model(dataclasses.replace(cfg, seed=1))
    batch = {key: jnp.zeros((4, 512), jnp.int32) for key in
             ("tokens", "labels", "positions", "segment_ids")}
    batch["loss_mask"] = jnp.ones((4, 512), jnp.int32)

    def temp_bytes(chunk_tokens):
        loss_fn = make_loss_fn(student, OnlineTeacher(teacher),
                               dataclasses.replace(LOSS, chunk_tokens=chunk_tokens), 32768)
        grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
        compiled = grad_fn.lower(params, teacher_params, batch, 2048.0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 512 * 32768 * 4
    unchunked, chunked = temp_bytes(-1), temp_bytes(128)
    assert unchunked >= 4 * logits_bytes
    assert chunked < logits_bytes and chunked * 8 < unchunked


def test_a_vocabulary_split_over_tensor_2_and_4_of_8_devices(tmp_path):
    """The worker asserts chunked = unchunked = one device (loss and every gradient); here, that
    the head really was split over `tensor` and the figures came back."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import cli_env

    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "chunked_sharded_worker.py"), str(tmp_path)],
        env=cli_env(8, fast_compile=True), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for tensor in ("2", "4"):
        assert report[tensor]["head_spec"][0] == "tensor"  # [vocab, d]: vocab split
        assert report[tensor]["max_relative_difference"] < 1e-5
        assert report[tensor]["loss"] == pytest.approx(report["one_device_loss"], rel=RTOL)
