"""kd_jax.models.pure: what a model returns for a batch (`ModelOutputs`): the final hidden states
and the output head, whose logits are `PureModel.logits`, and on request every layer's states,
the last of which is the final hidden states before the final norm."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models.pure import ModelOutputs, init_model, logits_btv
from kd_jax.models.transformer import rms_norm
from tests.helpers import STUDENT, assert_trees_close, make_batch

BATCH, SEQ = 4, 16


def test_apply_returns_hidden_states_and_head_whose_logits_are_the_model_logits(tiny_models):
    student, params, _, _ = tiny_models
    batch = make_batch(0, batch=BATCH, seq=SEQ)
    outputs = jax.jit(student.apply)(params, batch)  # a pytree: it leaves jit whole
    assert isinstance(outputs, ModelOutputs)
    assert outputs.hidden_btd.shape == (BATCH, SEQ, STUDENT.d_model)
    assert outputs.head_vd.shape == (STUDENT.vocab_size, STUDENT.d_model)
    assert outputs.layers_lbtd is None
    np.testing.assert_array_equal(outputs.head_vd, params["head"])  # untied: the head as stored

    logits = jax.jit(lambda p, b: student.apply(p, b).logits())(params, batch)
    assert logits.shape == (BATCH, SEQ, STUDENT.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, jax.jit(student.logits)(params, batch))
    np.testing.assert_array_equal(outputs.logits(),
                                  logits_btv(outputs.hidden_btd, outputs.head_vd))


def test_a_tied_model_returns_its_embedding_as_the_head():
    tied, params = init_model(dataclasses.replace(STUDENT, tie_embeddings=True))
    assert "head" not in params
    outputs = jax.jit(tied.apply)(params, make_batch(0, batch=BATCH, seq=SEQ))
    np.testing.assert_array_equal(outputs.head_vd, params["embedding"])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_with_layers_returns_every_layer_and_the_same_hidden_states(remat, tiny_models):
    student, params, _, _ = tiny_models
    if remat != "none":
        # The same module with each layer rematerialized: the same parameters apply.
        student, _ = init_model(dataclasses.replace(STUDENT, remat=remat))
    batch = make_batch(1, batch=BATCH, seq=SEQ)
    plain = jax.jit(student.apply)(params, batch)
    layered = jax.jit(functools.partial(student.apply, with_layers=True))(params, batch)

    assert layered.layers_lbtd.shape == (STUDENT.n_layers, BATCH, SEQ, STUDENT.d_model)
    assert not np.allclose(layered.layers_lbtd[0], layered.layers_lbtd[1])  # one per layer
    # Asking for the layers changes nothing else, to the bit.
    np.testing.assert_array_equal(layered.hidden_btd, plain.hidden_btd)
    np.testing.assert_array_equal(layered.head_vd, plain.head_vd)
    # The last layer's output is the residual stream before the model's final norm. (Normed in
    # another program than the model's, so to float32 rounding: eager, it differs by an ulp.)
    final_norm = jax.jit(rms_norm, static_argnums=2)
    assert_trees_close(final_norm(layered.layers_lbtd[-1], params["final_norm"], STUDENT.norm_eps),
                       layered.hidden_btd)
