"""Fake quantization (`kd_jax.models.quantize`): values against a numpy reference written from
the scheme's definition, the straight-through gradient, the bound |w - q(w)| <= scale / 2 on
every weight a model's forward pass sees, and the forward pass of a quantized model: its logits
against the float model's, sampling with it, a distillation run through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax.eval.report import eval_table
from kd_jax.models import quantize
from kd_jax.models.generate import make_sampler
from kd_jax.models.pure import abstract_model, init_model
from kd_jax.run_dir import read_run
from tests.helpers import STUDENT, VALID_VOCAB, make_batch, write_config
from tests.models.generate_sharded_worker import MAX_NEW, make_prompts, random_params
from tests.models.test_generate import full_forward_logits, generate

QMAX = {"int8": 127, "int4": 7}
# float32's unit roundoff: every float32 operation is exact to within a relative 2^-24.
UNIT_ROUNDOFF = 2.0**-24


def reference(w: np.ndarray, fmt: str, group: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, scales) from the definition, in float64, rounded to float32 where the scheme
    computes in float32: scale = max |w| * float32(1 / qmax) over `group` consecutive elements
    along `axis` (0: all of it), codes = round(w / scale) ties to even, value = codes * scale.
    A float64 quotient or product of float32 numbers rounded to float32 is the float32
    operation's correctly rounded result, so the values must match bit for bit."""
    qmax = QMAX[fmt]
    moved = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    group = group or moved.shape[-1]
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)
    reciprocal = float(np.float32(1 / qmax))
    scales = (np.abs(blocks).max(-1, keepdims=True) * reciprocal).astype(np.float32).astype(
        np.float64)
    quotients = np.divide(blocks, scales, out=np.zeros_like(blocks), where=scales > 0)
    codes = np.round(quotients.astype(np.float32).astype(np.float64))
    values = (codes * scales).astype(np.float32).reshape(moved.shape)
    return np.moveaxis(values, -1, axis), scales


def weights_with_zero_groups(shape, seed: int) -> np.ndarray:
    """Normal weights with a few heavy outliers, and all-zero groups along either axis: the
    first 8 rows of column 1 and all of column 2, and all of row 3."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.integers(0, shape[0], 3), rng.integers(0, shape[1], 3)] *= 20
    w[:8, 1] = 0
    w[:, 2] = 0
    w[3] = 0
    return w


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("group", [0, 4, 8])
@pytest.mark.parametrize("axis", [0, -1])
def test_fake_quantization_is_the_reference(fmt, group, axis):
    w = weights_with_zero_groups((32, 24), seed=group + 5 * (axis == 0))
    fake = np.asarray(jax.jit(quantize.fake_quantize, static_argnums=(1, 2, 3))(
        jnp.asarray(w), fmt, group, axis))
    expected, scales = reference(w, fmt, group, axis)
    assert np.isfinite(fake).all()  # the all-zero groups' scale is 0
    np.testing.assert_array_equal(fake, expected)
    codes, stored = quantize.quantize(jnp.asarray(w), fmt, group, axis)
    split = axis % 2 + 1  # the axis of the positions within a group
    np.testing.assert_array_equal(np.moveaxis(np.squeeze(np.asarray(stored), split), split - 1,
                                              -1), scales[..., 0].astype(np.float32))
    # Max-abs scales clip nothing: every group but the all-zero ones reaches +-qmax exactly,
    # and int4 never uses -8.
    reach = np.abs(np.asarray(codes)).max(axis=split)
    assert set(np.unique(reach)) == {0, QMAX[fmt]}
    assert np.asarray(codes).min() >= -QMAX[fmt]


def test_per_token_activations_are_the_reference():
    """model.quantize_activations: one scale for each token's flattened input (the output
    projection's input, [b, t, heads, head_dim], contracts two dimensions)."""
    cfg = dataclasses.replace(STUDENT, quantize_activations="int8")
    rng = np.random.default_rng(0)
    x_btnh = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    x_btnh[1, 3] = 0  # a token with no activation at all
    fake = np.asarray(quantize.activations(jnp.asarray(x_btnh), cfg, contract=2))
    expected, _ = reference(x_btnh.reshape(2, 5, 32), "int8", 0, -1)
    np.testing.assert_array_equal(fake, expected.reshape(x_btnh.shape))
    unquantized = quantize.activations(jnp.asarray(x_btnh), STUDENT, contract=2)
    np.testing.assert_array_equal(np.asarray(unquantized), x_btnh)


def llama_cpp_reference(w: np.ndarray, fmt: str) -> np.ndarray:
    """The values of llama.cpp's q8_0 or q4_0 from ggml's definition, blocks of 32 along the
    last axis, each float32 operation done by numpy alone (which never fuses or reorders):
    q8_0: d = amax / 127, codes = roundf(w * (1 / d)) (halves away from zero, taken exactly in
    float64); q4_0: d = m / -8 (m the first weight of largest magnitude, signed), codes =
    min(15, floor(w * (1 / d) + 8.5)) - 8; values = codes * float16(d)."""
    blocks = np.asarray(w, np.float32).reshape(*w.shape[:-1], -1, 32)
    if fmt == "q8_0":
        d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    else:
        largest = np.abs(blocks).argmax(-1)[..., None]
        d = np.take_along_axis(blocks, largest, -1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    y = blocks * inverse
    if fmt == "q8_0":
        codes = np.sign(y) * np.floor(np.abs(y).astype(np.float64) + 0.5)
    else:
        codes = np.minimum(np.floor(y + np.float32(8.5)), 15) - 8
    scales = d.astype(np.float16).astype(np.float32)
    return (codes.astype(np.float32) * scales).reshape(w.shape)


def llama_cpp_hazards(fmt: str) -> np.ndarray:
    """Blocks [n, 32] on which a computation that is not ggml's float32 sequence, operation by
    operation, gives other values: for q8_0, weights whose codes change when d = amax / 127 is
    taken as amax times the reciprocal of 127 (what XLA makes of a division by a constant); for
    q4_0, weights whose codes change when w * (1 / d) + 8.5 is one fused multiply-add (what
    LLVM makes of it), all found by search."""
    blocks = []
    for amax in np.linspace(1, 3, 400, dtype=np.float32):
        if fmt == "q8_0":
            exact, product = amax / np.float32(127), amax * np.float32(1 / 127)
            if exact == product:
                continue
            inverses = np.float32(1) / np.array([exact, product], np.float32)
            halves = (np.arange(-126, 127, dtype=np.float64) + 0.5) * np.float64(exact)
        else:
            inverses = np.float32(1) / (np.array([-amax], np.float32) / np.float32(-8))
            halves = (np.arange(-8, 8, dtype=np.float64) + 0.5) / np.float64(inverses[0])
        # float32 weights within a few steps of each boundary between two codes
        near = (halves[:, None] * (1 + np.arange(-4, 5) * 2.0**-23)).astype(np.float32).ravel()
        near = near[np.abs(near) < amax]
        if fmt == "q8_0":
            rounded = [np.floor(np.abs(near * inverse).astype(np.float64) + 0.5)
                       for inverse in inverses]
            differ = near[rounded[0] != rounded[1]]
        else:
            fused = np.floor(near.astype(np.float64) * np.float64(inverses[0]) + 8.5)
            differ = near[np.floor(near * inverses[0] + np.float32(8.5)) != fused]
        for start in range(0, len(differ), 31):
            block = np.zeros(32, np.float32)
            block[0] = -amax  # the block's largest magnitude (q4_0: its signed maximum)
            block[1:1 + len(differ[start:start + 31])] = differ[start:start + 31]
            blocks.append(block)
    return np.stack(blocks)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_llama_cpp_formats_are_ggml_reference(fmt):
    """q8_0 and q4_0 give ggml's values bit for bit, jitted and eagerly: on normal weights of
    four magnitudes (scales from float16 subnormals to large), all-zero blocks, weights on the
    codes' half-way points, and the blocks where XLA's or LLVM's rewriting of the float32
    operations would change a code."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 96)) * rng.choice([1e-4, 0.02, 1, 30], (256, 1))).astype(
        np.float32)
    w[:4] = np.round(w[:4] * 2) / 2  # halves: roundf and floor(+ 8.5) differ from ties to even
    w[4, :32] = 0
    hazards = llama_cpp_hazards(fmt)
    assert len(hazards) >= 2
    w = np.concatenate([w, np.pad(hazards, ((0, 0), (0, 64)))])
    expected = llama_cpp_reference(w, fmt)
    jitted = jax.jit(quantize.fake_quantize, static_argnums=(1, 2, 3))
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(w), fmt, 0, -1)), expected)
    np.testing.assert_array_equal(np.asarray(quantize.fake_quantize(jnp.asarray(w), fmt, 0, -1)),
                                  expected)
    # The blocks along the input of a [in, out] weight: the same values, transposed.
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(w.T), fmt, 0, 0)), expected.T)
    codes, scales = quantize.quantize(jnp.asarray(w), fmt, 16, -1)  # the group is always 32
    assert codes.shape == (len(w), 3, 32) and scales.shape == (len(w), 3, 1)
    low, high = (-127, 127) if fmt == "q8_0" else (-8, 7)
    assert np.asarray(codes).min() == low and np.asarray(codes).max() == high
    assert np.all(np.asarray(scales) == np.asarray(scales).astype(np.float16))


@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_0"])
def test_the_gradient_is_straight_through(fmt):
    """The vector-Jacobian product of fake quantization returns the upstream gradient as it is,
    all-zero groups included, through the weight, row and activation paths alike."""
    columns = 32 if fmt in quantize.LLAMA_CPP_FORMATS else 24  # rows hold whole blocks of 32
    w = jnp.asarray(weights_with_zero_groups((32, columns), seed=1))
    upstream = jnp.asarray(np.random.default_rng(2).standard_normal((32, columns)), jnp.float32)
    cfg = dataclasses.replace(STUDENT, quantize=fmt, quantize_group=8, quantize_activations="int8")
    paths = {
        "per channel": lambda w: quantize.fake_quantize(w, fmt, 0, 0),
        "groups": lambda w: quantize.fake_quantize(w, fmt, 8, 0),
        "two contracted dimensions": lambda w: quantize.fake_quantize_weight(
            w.reshape(4, 8, columns), fmt, 8, contract=2).reshape(32, columns),
        "rows": lambda w: quantize.rows(w, cfg, "embedding"),
        "activations": lambda w: quantize.activations(w, cfg),
    }
    for name, path in paths.items():
        fake, pullback = jax.vjp(path, w)
        assert not np.array_equal(np.asarray(fake), np.asarray(w)), name  # it quantized
        np.testing.assert_array_equal(np.asarray(pullback(upstream)[0]), np.asarray(upstream),
                                      err_msg=name)
        grad = jax.grad(lambda w: jnp.sum(upstream * path(w)))(w)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(upstream), err_msg=name)


def quantized_views(params, cfg):
    """(name, the weight as stored, as the forward pass sees it, its contracted axis in a
    [in, out] or [rows, d] layout) for every weight `cfg` quantizes, through the functions the
    forward pass calls."""
    views = []
    for index in range(cfg.n_layers):
        layer = {name: value[index] for name, value in params["layers"].items()}
        seen = quantize.layer_weights(layer, cfg)
        for name, contract in quantize.LAYER_CONTRACT.items():
            stored = np.asarray(layer[name])
            inputs = math.prod(stored.shape[:contract])
            views.append((f"{name}[{index}]", stored.reshape(inputs, -1),
                          np.asarray(seen[name]).reshape(inputs, -1), 0))
        for name in set(layer) - set(quantize.LAYER_CONTRACT):  # norms: never quantized
            np.testing.assert_array_equal(np.asarray(seen[name]), np.asarray(layer[name]))
    views.append(("embedding", np.asarray(params["embedding"]),
                  np.asarray(quantize.rows(params["embedding"], cfg, "embedding")), 1))
    views.append(("head", np.asarray(params["head"]),
                  np.asarray(quantize.rows(params["head"], cfg, "head")), 1))
    return views


@pytest.mark.parametrize("group", [0, 16])
def test_every_int8_weight_moves_at_most_half_a_step(group):
    """|w - q(w)| <= scale / 2 for every element of every weight the forward pass sees, up to
    float32's own rounding: with u = 2^-24, w / scale is computed within u |w / scale| and the
    product codes * scale within u |codes * scale| <= u (|w| + scale / 2), so the computed
    value is within scale / 2 + u (2 |w| + scale / 2) of w."""
    cfg = dataclasses.replace(STUDENT, quantize="int8", quantize_group=group)
    _, params = init_model(cfg)
    views = quantized_views(params, cfg)
    assert len(views) == 7 * cfg.n_layers + 2
    for name, stored, seen, axis in views:
        moved, seen_moved = np.moveaxis(stored, axis, -1), np.moveaxis(seen, axis, -1)
        width = group or moved.shape[-1]
        blocks = moved.reshape(*moved.shape[:-1], -1, width).astype(np.float64)
        scale = np.abs(blocks).max(-1, keepdims=True) / 127
        error = np.abs(blocks - seen_moved.reshape(blocks.shape))
        bound = scale / 2 + UNIT_ROUNDOFF * (2 * np.abs(blocks) + scale / 2)
        assert (error <= bound).all(), name
        assert (error > 0).any(), name  # the forward pass does see quantized values


def test_a_quantized_head_moves_each_logit_within_its_bound(tiny_models):
    """With only the head quantized (int8, groups of 16), each logit moves from the float
    head's (hidden @ head^T in float64) by at most sum_d |h_d| scale / 2, the rounding bound
    through the one product the head takes part in, plus float32's accumulation error over the
    d = 32 terms of the quantized product (d u sum_d |h_d| (|w_vd| + scale / 2))."""
    params = tiny_models[1]
    cfg = dataclasses.replace(STUDENT, quantize_head="int8", quantize_group=16)
    model = init_model(cfg)[0]
    batch = {key: jnp.asarray(value) for key, value in make_batch(0).items()}
    outputs = jax.jit(model.apply)(params, batch)
    hidden_btd = np.asarray(outputs.hidden_btd, np.float64)
    head_vd = np.asarray(params["head"], np.float64)
    scale_vg = np.abs(head_vd.reshape(64, 2, 16)).max(-1) / 127
    logits = np.asarray(outputs.logits(), np.float64)
    float_logits = np.einsum("btd,vd->btv", hidden_btd, head_vd)
    rounding = np.einsum("btgd,vg->btv", np.abs(hidden_btd).reshape(8, 16, 2, 16),
                         scale_vg) / 2
    accumulation = 32 * UNIT_ROUNDOFF * np.einsum(
        "btd,vd->btv", np.abs(hidden_btd), np.abs(head_vd) + scale_vg.repeat(16, 1) / 2)
    moved = np.abs(logits - float_logits)
    assert (moved <= rounding + accumulation).all()
    # Padding positions hold a zero hidden state (the residual stream is cleared there): their
    # logits and bound are 0, and the ratio is taken over the real positions.
    real = np.asarray(batch["segment_ids"]) > 0
    assert not real.all() and (moved[~real] == 0).all()
    ratio = moved[real] / (rounding + accumulation)[real]
    assert ratio.max() > 0.25  # measured 0.51: a bound that bites


def test_int8_logits_are_the_float_logits_moved_to_first_order(tiny_models):
    """A model whose every weight is int8 (groups of 16): its logits minus the float model's
    are, to first order, the float model's Jacobian times the weights' rounding (one jvp), the
    remainder second order in a step of max |w| / 127; the same with int4's 18x larger steps
    leaves a remainder that much larger relative to the first-order term (the remainder of a
    first-order expansion, relative to its first-order term, grows with the step)."""
    float_model, params = tiny_models[0], tiny_models[1]
    batch = {key: jnp.asarray(value) for key, value in make_batch(1).items()}
    mask = np.asarray(batch["segment_ids"] > 0)[..., None]
    remainders = {}
    for fmt in ("int8", "int4"):
        cfg = dataclasses.replace(STUDENT, quantize=fmt, quantize_embedding=fmt,
                                  quantize_head=fmt, quantize_group=16)
        model = init_model(cfg)[0]
        seen = {name: np.asarray(view) for name, view in _seen_params(params, cfg).items()}
        rounding = jax.tree.map(lambda s, p: jnp.asarray(s - np.asarray(p)),
                                _nest(seen, params), params)
        moved = np.asarray(jax.jit(model.logits)(params, batch) - jax.jit(float_model.logits)(
            params, batch)) * mask
        _, first_order = jax.jit(lambda p, d: jax.jvp(
            lambda q: float_model.logits(q, batch), (p,), (d,)))(params, rounding)
        first_order = np.asarray(first_order) * mask
        assert np.abs(first_order).max() > 0
        remainders[fmt] = np.linalg.norm(moved - first_order) / np.linalg.norm(first_order)
    # Measured: 0.0043 for int8, 0.081 for int4, the 18x of their steps (127 / 7).
    assert remainders["int8"] < 0.02
    assert remainders["int8"] < remainders["int4"] / 8


def _seen_params(params, cfg) -> dict:
    """Every parameter as the forward pass sees it, flat by name ('layers/wq', 'embedding')."""
    layers = jax.vmap(lambda layer: quantize.layer_weights(layer, cfg))(params["layers"])
    flat = {f"layers/{name}": value for name, value in layers.items()}
    for name in set(params) - {"layers"}:
        flat[name] = (quantize.rows(params[name], cfg, name)
                      if name in ("embedding", "head") else params[name])
    return flat


def _nest(flat: dict, like: dict) -> dict:
    return {name: ({key: flat[f"layers/{key}"] for key in value} if name == "layers"
                   else flat[name]) for name, value in like.items()}


def test_greedy_sampling_sees_the_quantized_model():
    """The sampler's forward pass (kd_jax.models.generate) quantizes as the model's does: its
    greedy tokens are the argmax of the fake-quantized model's full forward pass, and not all
    of them the float model's."""
    cfg = dataclasses.replace(STUDENT, quantize="int4", quantize_group=8,
                              quantize_activations="int8", tie_embeddings=True,
                              quantize_embedding="int4", quantize_head="int4")
    model, params = random_params(cfg, seed=7)
    prompts = make_prompts()
    out = generate(make_sampler(cfg, MAX_NEW, VALID_VOCAB), params, prompts)
    sequences = [prompt + list(new) for prompt, new in zip(prompts, out.tokens_bn)]
    logits = full_forward_logits(model, params, sequences)
    float_logits = full_forward_logits(abstract_model(quantize.unquantized(cfg))[0], params,
                                       sequences)
    for row, prompt in enumerate(prompts):
        steps = slice(len(prompt) - 1, len(prompt) - 1 + MAX_NEW)
        np.testing.assert_array_equal(out.tokens_bn[row], logits[row, steps].argmax(-1))
    assert any((out.tokens_bn[row] != float_logits[row, slice(
        len(prompt) - 1, len(prompt) - 1 + MAX_NEW)].argmax(-1)).any()
        for row, prompt in enumerate(prompts))


def test_a_quantized_distillation_keeps_float_master_weights(teacher_run, tmp_path):
    """kd-jax distill with model.quantize int4 in groups of 8 and int8 activations runs end to
    end; the checkpoint holds the float master weights (not on any int4 grid: a group of 8
    int4 weights has at most 15 distinct values), and the run records its quantization."""
    root, corpus = teacher_run
    config = write_config(tmp_path / "distill.yaml", corpus, tmp_path / "student", f"""
teacher:
  source: checkpoint
  path: {root / "teacher"}
""")
    assert cli.main(["distill", str(config), "model.quantize=int4", "model.quantize_group=8",
                     "model.quantize_activations=int8"]) == 0
    run_cfg, _ = read_run(tmp_path / "student")
    assert (run_cfg.model.quantize, run_cfg.model.quantize_group) == ("int4", 8)
    assert run_cfg.model.weight_format("embedding") == "int8"
    _, abstract = abstract_model(run_cfg.model)
    params = checkpoint.restore_params(tmp_path / "student", abstract)
    assert params["layers"]["wq"].dtype == np.float32
    wq = np.asarray(params["layers"]["wq"][0]).reshape(4, 8, 32)  # [d / 8, 8, n x head_dim]
    distinct = [len(np.unique(wq[g, :, column])) for g in range(4) for column in range(32)]
    assert min(distinct) == 8  # float: 8 distinct values in every group of 8
    seen = np.asarray(quantize.layer_weights({"wq": params["layers"]["wq"][0]},
                                             run_cfg.model)["wq"]).reshape(4, 8, 32)
    assert not np.array_equal(seen, wq)

    # What is served, and beside it the float master weights: report.json, kd-jax eval's table
    # and kd-jax report's table. The float row is the run evaluated without quantization.
    report = json.loads((tmp_path / "student" / "report.json").read_text())
    served, master = report["student"], report["student_float"]
    # int4 moves the score by far more than float32 noise (7e-7 between two programs, below)
    assert abs(served["bits_per_byte"] - master["bits_per_byte"]) > 1e-5
    assert master["params"] == served["params"] and "agreement" not in master
    assert "student, float weights" in eval_table(report)
    assert cli.main(["report", str(tmp_path / "student"), "--out", str(tmp_path / "cmp")]) == 0
    assert ", float weights | `" in (tmp_path / "cmp" / "report.md").read_text()
    assert cli.main(["eval", str(tmp_path / "student"), "model.quantize=none",
                     "model.quantize_group=0", "model.quantize_activations=none"]) == 0
    unrounded = json.loads((tmp_path / "student" / "report.json").read_text())
    assert "student_float" not in unrounded
    # The same sums in float32, from another compiled program (with the teacher in it).
    assert unrounded["student"]["bits_per_byte"] == pytest.approx(master["bits_per_byte"],
                                                                 rel=1e-6)
