"""LoRA adapters (`kd_jax.models.lora`): the base's output exactly at initialization, the
adapted forward pass against the merged weights (W + (alpha / r) A B, a plain model), the
adapters' logical axes, dropout only where a key is given, and sampling with the adapters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint
from kd_jax.models import lora
from kd_jax.models.generate import make_sampler
from kd_jax.models.pure import init_model, logical_axes
from kd_jax.parallel.mesh import LOGICAL_AXES
from tests.helpers import STUDENT, VALID_VOCAB, assert_trees_close, make_batch
from tests.models.generate_sharded_worker import MAX_NEW, make_prompts
from tests.models.test_generate import generate

LORA = dataclasses.replace(STUDENT, init="hf", lora_rank=4, lora_alpha=8.0)


def with_trained_adapters(params: dict, seed: int = 3) -> dict:
    """`params` with every adapter random (B too): an adapter that changes the output."""
    keys = iter(jax.random.split(jax.random.key(seed), len(params["lora"])))
    adapters = {name: 0.1 * jax.random.normal(next(keys), value.shape, value.dtype)
                for name, value in params["lora"].items()}
    return {**params, "lora": adapters}


@pytest.mark.parametrize("changes", [
    {}, {"lora_targets": ["q", "v"]}, {"quantize": "int4", "quantize_group": 16}])
def test_at_initialization_the_output_is_the_base_models_bit_for_bit(changes):
    base_cfg = dataclasses.replace(STUDENT, **{k: v for k, v in changes.items()
                                               if k.startswith("quantize")})
    base, base_params = init_model(base_cfg)
    model, params = init_model(dataclasses.replace(LORA, **changes))
    batch = make_batch(0)
    for name, value in base_params.items():  # the base is drawn as without LoRA
        assert jax.tree.all(jax.tree.map(np.array_equal, params[name], value)), name
    assert not np.any(jax.tree.leaves(params["lora"])[0] == 0)  # A is drawn
    assert all(not np.any(value) for name, value in params["lora"].items()
               if name.startswith("b_"))
    np.testing.assert_array_equal(model.logits(params, batch), base.logits(base_params, batch))


def test_only_the_targeted_projections_get_adapters():
    _, params = init_model(dataclasses.replace(LORA, lora_targets=["k", "down"]))
    assert set(params["lora"]) == {"a_wk", "b_wk", "a_w_down", "b_w_down"}
    assert params["lora"]["a_wk"].shape == (2, 32, 4)  # [layers, d, r]
    assert params["lora"]["b_wk"].shape == (2, 4, 2, 8)  # [layers, r, kv, head_dim]


def test_adapters_name_the_axes_of_the_weights_they_adapt():
    model, _ = init_model(LORA)
    axes = logical_axes(model.template)
    for name in lora.targets(LORA):
        weight = axes["layers"][name]
        contract = lora.LAYER_CONTRACT[name]
        assert axes["lora"][f"a_{name}"] == (*weight[:1 + contract], "lora_rank")
        assert axes["lora"][f"b_{name}"] == ("layers", "lora_rank", *weight[1 + contract:])
    assert "lora_rank" in LOGICAL_AXES
    assert checkpoint.ADAPTERS == lora.ADAPTERS  # the key a checkpoint saves apart


@pytest.mark.parametrize("changes", [{}, {"quantize": "int8", "quantize_embedding": "none",
                                          "quantize_head": "none"}])
def test_the_adapted_model_is_the_base_with_merged_weights(changes):
    """x W + (alpha / r)(x A) B against a plain model whose weights are W + (alpha / r) A B
    (quantized: q(W) + (alpha / r) A B, the base as the forward pass sees it)."""
    cfg = dataclasses.replace(LORA, **changes)
    model, params = init_model(cfg)
    params = with_trained_adapters(params)
    plain, _ = init_model(STUDENT)
    merged = lora.merged(params, cfg)
    assert set(merged) == set(params) - {"lora"}
    batch = make_batch(1)
    adapted = model.logits(params, batch)
    assert not np.allclose(adapted, init_model(cfg)[0].logits(lora.base_of(params) | {
        "lora": jax.tree.map(jnp.zeros_like, params["lora"])}, batch), atol=1e-3)
    assert_trees_close(adapted, plain.logits(merged, batch))


def test_merged_by_hand_for_one_projection():
    """W' = W + (alpha / r) A B for the attention output, [layers, n, hd, d], from numpy."""
    _, params = init_model(LORA)
    params = with_trained_adapters(params)
    a, b = (np.asarray(params["lora"][name], np.float64) for name in ("a_wo", "b_wo"))
    expected = np.asarray(params["layers"]["wo"], np.float64) + (8.0 / 4) * np.einsum(
        "lnhr,lrd->lnhd", a, b)
    np.testing.assert_allclose(lora.merged(params, LORA)["layers"]["wo"], expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())


def test_dropout_applies_with_a_key_only():
    cfg = dataclasses.replace(LORA, lora_dropout=0.5)
    model, params = init_model(cfg)
    params = with_trained_adapters(params)
    batch = make_batch(2)
    no_dropout, _ = init_model(LORA)
    evaluated = model.logits(params, batch)
    np.testing.assert_array_equal(evaluated, no_dropout.logits(params, batch))

    def trained(key):
        return model.apply(params, batch, dropout_key=key).logits()

    one, again, other = trained(jax.random.key(0)), trained(jax.random.key(0)), trained(
        jax.random.key(1))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, evaluated, atol=1e-3) and not np.allclose(one, other, atol=1e-3)
    # Without dropout a key changes nothing.
    np.testing.assert_array_equal(no_dropout.apply(params, batch, dropout_key=jax.random.key(0))
                                  .logits(), evaluated)


def test_sampling_uses_the_adapters():
    """Greedy tokens of the adapted model are those of the plain model with merged weights."""
    model, params = init_model(LORA)
    params = with_trained_adapters(params)
    prompts = make_prompts()
    out = generate(make_sampler(LORA, MAX_NEW, VALID_VOCAB), params, prompts)
    merged = generate(make_sampler(STUDENT, MAX_NEW, VALID_VOCAB), lora.merged(params, LORA),
                      prompts)
    np.testing.assert_array_equal(out.tokens_bn, merged.tokens_bn)
