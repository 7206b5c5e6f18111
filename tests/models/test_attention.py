"""kd_jax.models.attention: blockwise attention against the dense reference (packed documents,
padding, GQA, sliding windows, ragged blocks, gradients, bfloat16), its memory at 8,192 tokens,
the choice of implementation, and the remat policies of kd_jax.models.transformer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config as config_lib
from kd_jax import run_dir
from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models import attention
from kd_jax.models.pure import init_model
from kd_jax.models.transformer import REMAT_POLICIES
from tests.helpers import assert_trees_close, make_batch

# float32 on CPU: the blocks sum in another order than the dense softmax, a few ulps apart.
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def packed_segments(batch: int, length: int) -> np.ndarray:
    """Several documents a row of uneven lengths, then padding (segment 0) at the end."""
    segment_ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        bounds = [0, 5 + row, length // 2, length // 2 + 3, length - 4 - 2 * row]
        for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[row, start:stop] = segment
    return segment_ids


def random_qkv(seed: int, batch: int, length: int, n_heads: int = 8, n_kv: int = 2,
               head_dim: int = 16):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, n_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, n_kv, head_dim))
    v = jax.random.normal(keys[2], (batch, length, n_kv, head_dim))
    return q, k, v


def real_rows_loss(attend, segment_ids):
    """A loss of q, k, v over the real (non-padding) query rows only, as training uses them."""
    real = jnp.asarray(segment_ids != 0)[..., None, None]
    return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)) * real)


# ---------------------------------------------------------------- blockwise against dense


# Blocks that divide the 40 tokens, do not, and are longer than the sequence; with and without
# a sliding window.
@pytest.mark.parametrize("window, block", [(0, 7), (6, 8), (6, 64)])
def test_blockwise_matches_dense_outputs_and_gradients(window, block):
    segment_ids = packed_segments(batch=2, length=40)
    q, k, v = random_qkv(0, 2, 40)
    mask = attention.attention_mask(jnp.asarray(segment_ids), window)

    def dense(q, k, v):
        return attention.dense(q, k, v, mask)

    def blockwise(q, k, v):
        return attention.blockwise(q, k, v, jnp.asarray(segment_ids), window, block)

    real = segment_ids != 0
    assert real.sum() < real.size and len(np.unique(segment_ids)) == 5  # packed, padded
    expected, actual = np.asarray(dense(q, k, v)), np.asarray(jax.jit(blockwise)(q, k, v))
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual[real], expected[real], **F32_TOL)

    grads = jax.jit(jax.grad(real_rows_loss(blockwise, segment_ids), argnums=(0, 1, 2)))(q, k, v)
    expected_grads = jax.grad(real_rows_loss(dense, segment_ids), argnums=(0, 1, 2))(q, k, v)
    for actual_grad, expected_grad in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(actual_grad, expected_grad, **F32_TOL)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=64,
                max_seq_len=64, init_std=0.1, seed=3)
    return ModelConfig(**{**base, **overrides})


def loss_and_grads(cfg: ModelConfig, batch):
    """Mean squared logits over the real tokens, and its gradient w.r.t. every parameter."""
    model, params = init_model(cfg)
    real = jnp.asarray(batch["segment_ids"] != 0)[..., None]

    def loss(params):
        logits = model.apply(params, batch).logits()
        return jnp.sum(jnp.square(logits) * real) / jnp.sum(real)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_blockwise_transformer_matches_dense():
    """Through the model, with a sliding window (window 0 is the attention test's case)."""
    batch = make_batch(4, batch=2, seq=21)  # two documents a row, then padding
    cfg = tiny_config(sliding_window=5, attention_block=8)
    loss_dense, grads_dense = loss_and_grads(dataclasses.replace(cfg, attention="dense"), batch)
    loss_blocks, grads_blocks = loss_and_grads(
        dataclasses.replace(cfg, attention="blockwise"), batch)
    np.testing.assert_allclose(loss_blocks, loss_dense, **F32_TOL)
    assert_trees_close(grads_blocks, grads_dense)


def test_blockwise_bfloat16_is_as_accurate_as_dense_bfloat16():
    segment_ids = jnp.asarray(packed_segments(batch=2, length=256))
    real = np.asarray(segment_ids != 0)
    q, k, v = random_qkv(1, 2, 256, head_dim=32)
    reference = np.asarray(attention.dense(q, k, v, attention.attention_mask(segment_ids)))
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    dense16 = attention.dense(q16, k16, v16, attention.attention_mask(segment_ids))
    blocks16 = jax.jit(attention.blockwise, static_argnums=(4, 5))(
        q16, k16, v16, segment_ids, 0, 64)
    assert blocks16.dtype == jnp.bfloat16

    def rms_error(x):
        return np.sqrt(np.mean(np.square(np.asarray(x, np.float32) - reference)[real]))

    # Both round q, k, v and the probabilities to bfloat16; the blocks keep their running sums
    # in float32, so they may not add error of their own.
    assert rms_error(blocks16) <= 1.5 * rms_error(dense16)
    assert rms_error(dense16) > 1e-4  # bfloat16 did round: the comparison is not vacuous


def test_padding_rows_are_finite_with_finite_gradients():
    segment_ids = packed_segments(batch=2, length=24)
    segment_ids[1] = 0  # a row of padding only: every query attends to nothing
    q, k, v = random_qkv(2, 2, 24)

    def everything(q, k, v):  # padding rows included: their gradients must be finite too
        return jnp.sum(jnp.sin(attention.blockwise(q, k, v, jnp.asarray(segment_ids), 0, 8)))

    out = jax.jit(attention.blockwise, static_argnums=(4, 5))(
        q, k, v, jnp.asarray(segment_ids), 0, 8)
    grads = jax.jit(jax.grad(everything, argnums=(0, 1, 2)))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(grad)).all() for grad in grads)
    # As in the dense path, a masked score is a constant: no gradient reaches a padding query.
    np.testing.assert_array_equal(np.asarray(grads[0])[1], 0.0)

    batch = make_batch(5, batch=2, seq=16)
    batch["segment_ids"][1] = 0
    loss, params_grads = loss_and_grads(tiny_config(attention="blockwise", attention_block=8),
                                        batch)
    assert np.isfinite(loss)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params_grads))


# ---------------------------------------------------------------- long context


def long_context_step(attention_kind: str, length: int):
    """A jitted next-token loss and gradient of a d_model 32 model on one sequence of `length`
    tokens holding two documents, and its parameters."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=length, attention=attention_kind, attention_block=512)
    model, params = init_model(cfg)
    tokens = jax.random.randint(jax.random.key(0), (1, length), 0, cfg.vocab_size)
    half = length // 2
    batch = {"tokens": tokens,
             "positions": jnp.concatenate([jnp.arange(half), jnp.arange(length - half)])[None],
             "segment_ids": jnp.where(jnp.arange(length) < half, 1, 2)[None]}

    def loss(params):
        logprobs = jax.nn.log_softmax(model.apply(params, batch).logits())
        labels = jnp.roll(tokens, -1, axis=1)
        return -jnp.mean(jnp.take_along_axis(logprobs, labels[..., None], axis=-1))

    return jax.jit(jax.value_and_grad(loss)), params


def test_blockwise_memory_is_linear_at_8k_tokens_and_a_step_runs():
    temp_bytes, compiled = {}, {}
    for kind in ("dense", "blockwise"):
        step, params = long_context_step(kind, 8192)
        compiled[kind] = step.lower(params).compile()
        temp_bytes[kind] = compiled[kind].memory_analysis().temp_size_in_bytes
    # Dense holds 4 heads x 8192^2 float32 scores a layer (1 GiB) and more for the backward;
    # blockwise holds [512, 512] blocks and arrays linear in the tokens (measured: ~7.5 GB
    # against ~80 MB on CPU).
    assert temp_bytes["dense"] >= 8 * temp_bytes["blockwise"], temp_bytes

    loss, grads = compiled["blockwise"](params)  # dense would need its ~7.5 GB: not run
    assert np.isfinite(loss) and 3.0 < loss < 5.5  # about log(64) = 4.16 at initialization
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))


# ---------------------------------------------------------------- which implementation


def test_the_implementation_chosen_for_a_platform_and_length():
    auto, bf16 = ModelConfig(), ModelConfig(dtype="bfloat16")
    assert attention.implementation(auto, 256, "cpu") == "dense"
    assert attention.implementation(auto, 1024, "cpu") == "blockwise"
    assert attention.implementation(bf16, 8192, "tpu") == "blockwise"
    assert attention.implementation(bf16, 4096, "gpu") == "blockwise"  # cuDNN is opt-in
    assert attention.implementation(ModelConfig(attention="cudnn"), 4096, "gpu") == "cudnn"
    assert attention.implementation(ModelConfig(attention="dense"), 8192, "gpu") == "dense"
    line = attention.describe(ModelConfig(attention_block=512), 8192, "cpu")
    assert line.startswith("attention blockwise") and "512-token" in line and "auto" in line
    assert "\n" not in line


def test_cudnn_is_refused_where_it_cannot_run():
    cfg = ModelConfig(attention="cudnn", dtype="bfloat16")
    with pytest.raises(ValueError, match="needs a GPU"):
        attention.for_batch(cfg, jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ConfigError, match="bfloat16") as err:
        config_lib.load(None, ["model.attention=cudnn"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="multiples of 8"):
        config_lib.load(None, ["model.attention=cudnn", "model.dtype=bfloat16",
                               "model.head_dim=12"])
    with pytest.raises(ConfigError, match="model.attention_block must be > 0"):
        config_lib.load(None, ["model.attention_block=0"])


# ---------------------------------------------------------------- remat policies


def test_remat_policies_are_the_configs_choices():
    assert tuple(REMAT_POLICIES) == config_lib.choices(config_lib.RematPolicy)


@pytest.mark.parametrize("attention_kind", ["blockwise"])  # its custom_vjp under each policy
def test_remat_policies_give_the_same_loss_and_gradients(attention_kind):
    batch = make_batch(6, batch=2, seq=16)
    cfg = tiny_config(attention=attention_kind, attention_block=8)
    loss_none, grads_none = loss_and_grads(dataclasses.replace(cfg, remat="none"), batch)
    for policy in ("full", "dots"):
        loss, grads = loss_and_grads(dataclasses.replace(cfg, remat=policy), batch)
        np.testing.assert_allclose(loss, loss_none, rtol=1e-5)
        assert_trees_close(grads, grads_none)


def test_boolean_remat_of_older_configs_still_loads_and_resumes(tmp_path):
    for old, policy in (("true", "full"), ("false", "none"), ("True", "full")):
        path = tmp_path / f"{old}.yaml"
        path.write_text(f"model:\n  remat: {old}\n")
        assert config_lib.load(path).model.remat == policy
        assert config_lib.load(None, [f"model.remat={old}"]).model.remat == policy
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, ["model.remat=sometimes"])
    assert str(err.value).startswith("model.remat: 'sometimes' is not one of none, full, dots")
    assert "\n" not in str(err.value)

    # A run directory written when remat was a boolean resumes under the policy's name.
    cfg = config_lib.load(None, [f"train.run_dir={tmp_path / 'run'}", "model.remat=full"])
    (tmp_path / "run").mkdir()
    config_lib.dump(cfg, tmp_path / "run" / "config.yaml")
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("remat: full", "remat: true"))
    (tmp_path / "run" / "run.json").write_text(json.dumps({}))
    run_dir.check_resume(cfg)
    with pytest.raises(ConfigError, match="model.remat='full', not 'none'"):
        run_dir.check_resume(dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, remat="none")))
