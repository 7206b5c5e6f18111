"""kd_jax.models.transformer: a golden comparison against Hugging Face LlamaForCausalLM, then the
invariants that packing, padding, remat, scanning and the pure-dict API (kd_jax.models.pure) must
keep. The reference model is built from a config: no downloads (tests/conftest.py keeps the
Hugging Face libraries offline)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kd_jax.config import ModelConfig
from kd_jax.models.pure import bind, count_params, logical_axes, logits_btv, split_params
from kd_jax.models.matmul import project
from kd_jax.models.transformer import AUTO_UNROLL_LAYERS, Transformer, layer_loop

# float32 on CPU: both implementations do the same arithmetic in a different order, so the
# differences are a few ulps of values of order 1 accumulated over a few layers.
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                max_seq_len=64, rope_theta=500.0, norm_eps=1e-5, init_std=0.1)
    base.update(overrides)
    return ModelConfig(**base)


_MODELS: dict = {}


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Models are shared between tests (none mutates one): eager init compiles per shape."""
    key = (repr(cfg), seed)
    if key not in _MODELS:
        _MODELS[key] = Transformer(cfg, rngs=nnx.Rngs(seed))
    return _MODELS[key]


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, tokens, positions, segments):
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, positions, segments)
    return hidden, logits_btv(hidden, model.head_vd())


def forward(model: Transformer, tokens, positions, segments):
    """(hidden, logits), jitted: eager NNX dispatch op by op is slower than compiling tiny
    models."""
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _jitted_forward(graphdef, state, tokens, positions, segments))


def randomize_norms(model: Transformer, seed: int = 1) -> Transformer:
    """Norm scales start at ones; make them random so a transposed or missing norm is caught."""
    graphdef, state, params = split_params(model)
    keys = iter(jax.random.split(jax.random.key(seed), 3))
    for group, name in (("layers", "attn_norm"), ("layers", "mlp_norm"), (None, "final_norm")):
        holder = params[group] if group else params
        holder[name] = 1.0 + 0.2 * jax.random.normal(next(keys), holder[name].shape)
    return bind(graphdef, state, params)


def single_segment(batch: int, length: int):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return positions, jnp.ones((batch, length), jnp.int32)


def random_tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


# ---------------------------------------------------------------- golden: Hugging Face Llama


def hf_llama_from(model: Transformer):
    cfg = model.cfg
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(hf_config).float().eval()

    _, _, params = split_params(model)
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    layers = p["layers"]
    d = cfg.d_model

    def to_torch(array):
        return torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy

    weights = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm"],
               "lm_head.weight": p["embedding"] if cfg.tie_embeddings else p["head"]}
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        # torch Linear weights are [out, in]; ours are [in, ...heads, head_dim] (einsum layout).
        weights[prefix + "self_attn.q_proj.weight"] = layers["wq"][i].reshape(d, -1).T
        weights[prefix + "self_attn.k_proj.weight"] = layers["wk"][i].reshape(d, -1).T
        weights[prefix + "self_attn.v_proj.weight"] = layers["wv"][i].reshape(d, -1).T
        weights[prefix + "self_attn.o_proj.weight"] = layers["wo"][i].reshape(-1, d).T
        weights[prefix + "mlp.gate_proj.weight"] = layers["w_gate"][i].T
        weights[prefix + "mlp.up_proj.weight"] = layers["w_up"][i].T
        weights[prefix + "mlp.down_proj.weight"] = layers["w_down"][i].T
        weights[prefix + "input_layernorm.weight"] = layers["attn_norm"][i]
        weights[prefix + "post_attention_layernorm.weight"] = layers["mlp_norm"][i]

    hf_state = hf_model.state_dict()
    assert set(hf_state) <= set(weights), sorted(set(hf_state) - set(weights))
    with torch.no_grad():
        for name, tensor in hf_state.items():
            assert tuple(tensor.shape) == weights[name].shape, name
            tensor.copy_(to_torch(weights[name]))
    return hf_model


@pytest.mark.parametrize("tie, n_kv_heads, head_dim", [
    (False, 2, 0),  # grouped-query attention, 2 query heads per kv head
    (True, 2, 0),  # tied embeddings
    (False, 4, 12),  # plain multi-head attention, head_dim != d_model / n_heads
])
def test_matches_hugging_face_llama(tie, n_kv_heads, head_dim):
    cfg = tiny_config(tie_embeddings=tie, n_kv_heads=n_kv_heads, head_dim=head_dim)
    model = randomize_norms(build(cfg, seed=3))
    hf_model = hf_llama_from(model)

    tokens = random_tokens(cfg, batch=2, length=11)
    positions, segments = single_segment(2, 11)
    _, ours = forward(model, tokens, positions, segments)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    assert ours.shape == theirs.shape == (2, 11, cfg.vocab_size)
    assert np.abs(theirs).max() > 0.1  # a non-trivial comparison, not two near-zero tensors
    np.testing.assert_allclose(ours, theirs, **F32_TOL)


# ---------------------------------------------------------------- packing and padding


def test_packed_documents_match_separate_runs():
    cfg = tiny_config()
    model = build(cfg)
    doc_a = jnp.array([[5, 9, 17]])
    doc_b = jnp.array([[33, 2]])
    packed_tokens = jnp.concatenate([doc_a, doc_b], axis=1)
    packed_positions = jnp.array([[0, 1, 2, 0, 1]])
    packed_segments = jnp.array([[1, 1, 1, 2, 2]])

    packed, _ = forward(model, packed_tokens, packed_positions, packed_segments)
    alone_a, _ = forward(model, doc_a, *single_segment(1, 3))
    alone_b, _ = forward(model, doc_b, *single_segment(1, 2))
    np.testing.assert_allclose(packed[:, :3], alone_a, **F32_TOL)
    np.testing.assert_allclose(packed[:, 3:], alone_b, **F32_TOL)


def test_padding_is_finite_and_invisible():
    cfg = tiny_config()
    model = build(cfg)
    tokens = random_tokens(cfg, batch=1, length=4)
    real, _ = forward(model, tokens, *single_segment(1, 4))

    # Padding in front and behind, with arbitrary token ids and positions that must not matter.
    padded_tokens = jnp.concatenate([jnp.array([[7, 7]]), tokens, jnp.array([[3, 0, 1]])], axis=1)
    padded_positions = jnp.array([[0, 0, 0, 1, 2, 3, 9, 9, 9]])
    padded_segments = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0, 0]])
    hidden, logits = forward(model, padded_tokens, padded_positions, padded_segments)
    assert np.isfinite(hidden).all() and np.isfinite(logits).all()
    np.testing.assert_allclose(hidden[:, 2:6], real, **F32_TOL)

    # Gradients through a loss over real tokens only stay finite too.
    graphdef, state, params = split_params(model)

    def real_token_loss(params):
        hidden = bind(graphdef, state, params)(padded_tokens, padded_positions, padded_segments)
        return jnp.sum(jnp.square(hidden) * (padded_segments != 0)[..., None])

    grads = jax.jit(jax.grad(real_token_loss))(params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("attention_kind", ["dense", "blockwise"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_padding_state_reaches_no_real_position_and_no_gradient(attention_kind,
                                                                           value):
    """A padding position whose embedding row is NaN or inf (an untrained row, say): the real
    positions' hidden states, every layer's output there, and the gradient of every weight
    (that row's included) are those of the clean model, bit for bit. Attention weighs a masked
    key's value by 0, and 0 x NaN would be NaN: the padding is cleared in the residual stream."""
    cfg = tiny_config(attention=attention_kind, attention_block=4)
    model = build(cfg)
    graphdef, state, params = split_params(model)
    pad_id = cfg.vocab_size - 1
    tokens = random_tokens(cfg, batch=2, length=12) % pad_id
    segments = jnp.array([[1] * 12, [1] * 7 + [0] * 5])
    tokens = jnp.where(segments > 0, tokens, pad_id)
    positions = jnp.where(segments > 0, jnp.arange(12)[None], 0)
    real = (segments > 0)[..., None]
    poisoned = dict(params, embedding=params["embedding"].at[pad_id].set(value))

    def outputs(params):
        return bind(graphdef, state, params)(tokens, positions, segments, with_layers=True)

    def real_token_loss(params):
        hidden = outputs(params)[0]
        logits = logits_btv(hidden, params["head"])[..., :pad_id]
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0))

    clean_hidden, clean_layers = outputs(params)
    hidden, layers = outputs(poisoned)
    np.testing.assert_array_equal(np.asarray(hidden)[np.asarray(segments) > 0],
                                  np.asarray(clean_hidden)[np.asarray(segments) > 0])
    assert np.isfinite(np.asarray(layers)).all()
    np.testing.assert_array_equal(np.asarray(layers), np.asarray(clean_layers))
    clean, dirty = (jax.grad(real_token_loss)(p) for p in (params, poisoned))
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(clean),
                                 jax.tree.leaves(dirty)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                      err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- remat, scan, dtypes


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_matches_plain_outputs_and_gradients(policy):
    cfg = tiny_config()
    plain = build(cfg)
    remat = build(dataclasses.replace(cfg, remat=policy))
    tokens = random_tokens(cfg, batch=2, length=6)
    positions, segments = single_segment(2, 6)

    def loss_and_grads(model):
        graphdef, state, params = split_params(model)

        def loss(params):
            m = bind(graphdef, state, params)
            return jnp.mean(logits_btv(m(tokens, positions, segments), m.head_vd()) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_plain, grads_plain), (loss_remat, grads_remat) = map(loss_and_grads, (plain, remat))
    np.testing.assert_allclose(loss_remat, loss_plain, **F32_TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_TOL),
                 grads_remat, grads_plain)


def test_scanned_layers_keep_program_size_independent_of_depth():
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions, segments = single_segment(1, 8)

    def program(n_layers):
        graphdef, state, params = split_params(
            build(tiny_config(n_layers=n_layers, layer_loop="scan")))

        def apply(params):
            return bind(graphdef, state, params)(tokens, positions, segments)

        jaxpr = jax.make_jaxpr(apply)(params)
        hlo = jax.jit(apply).lower(params).as_text()
        return len(jaxpr.jaxpr.eqns), len(hlo)

    eqns_2, hlo_2 = program(2)
    eqns_8, hlo_8 = program(8)
    assert eqns_2 == eqns_8
    assert abs(hlo_8 - hlo_2) <= 0.1 * hlo_2


@pytest.mark.parametrize("x_shape, w_shape, contract", [
    ((2, 5, 8), (8, 12), 1),  # the MLP's btd,df->btf
    ((2, 5, 8), (8, 3, 4), 1),  # the queries' btd,dnh->btnh
    ((2, 5, 3, 4), (3, 4, 8), 2),  # the attention output's btnh,nhd->btd
])
def test_projections_are_the_einsum_in_value_and_gradient(x_shape, w_shape, contract):
    """Against float64 numpy: y = x W over the flattened tokens, dx = dy W^T, dW = x^T dy."""
    keys = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    dy = jax.random.normal(keys[2], x_shape[:len(x_shape) - contract] + w_shape[contract:])
    y, vjp = jax.vjp(jax.jit(functools.partial(project, contract=contract)), x, w)
    dx, dw = vjp(dy)
    x2 = np.asarray(x, np.float64).reshape(-1, int(np.prod(w_shape[:contract])))
    w2 = np.asarray(w, np.float64).reshape(x2.shape[1], -1)
    dy2 = np.asarray(dy, np.float64).reshape(x2.shape[0], -1)
    np.testing.assert_allclose(y, (x2 @ w2).reshape(dy.shape), **F32_TOL)
    np.testing.assert_allclose(dx, (dy2 @ w2.T).reshape(x.shape), **F32_TOL)
    np.testing.assert_allclose(dw, (x2.T @ dy2).reshape(w.shape), **F32_TOL)


def test_unrolled_layers_give_the_scanned_outputs_and_gradients():
    cfg = tiny_config(n_layers=3)
    tokens = random_tokens(cfg, batch=2, length=6)
    positions, segments = single_segment(2, 6)

    def loss_and_grads(layer_loop):
        # The same weights (the same seed), two programs.
        graphdef, state, params = split_params(
            build(dataclasses.replace(cfg, layer_loop=layer_loop)))

        def loss(params):
            m = bind(graphdef, state, params)
            return jnp.mean(logits_btv(m(tokens, positions, segments), m.head_vd()) ** 2)

        program = jax.jit(jax.value_and_grad(loss))
        return program(params), program.lower(params).as_text()

    (scanned, scanned_hlo), (unrolled, unrolled_hlo) = map(loss_and_grads, ("scan", "unroll"))
    assert "while" in scanned_hlo and "while" not in unrolled_hlo
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_TOL), unrolled, scanned)


def test_auto_unrolls_few_layers_on_a_cpu_only():
    assert layer_loop(tiny_config(n_layers=AUTO_UNROLL_LAYERS), "cpu") == "unroll"
    assert layer_loop(tiny_config(n_layers=AUTO_UNROLL_LAYERS + 1), "cpu") == "scan"
    assert layer_loop(tiny_config(n_layers=2), "gpu") == "scan"
    assert layer_loop(tiny_config(n_layers=2), "tpu") == "scan"
    assert layer_loop(tiny_config(n_layers=2, layer_loop="scan"), "cpu") == "scan"
    assert layer_loop(tiny_config(n_layers=32, layer_loop="unroll"), "gpu") == "unroll"


def test_bfloat16_activations():
    cfg = tiny_config(dtype="bfloat16")
    model = build(cfg)
    tokens = random_tokens(cfg, batch=2, length=5)
    hidden, logits = _jitted_forward(*nnx.split(model), tokens, *single_segment(2, 5))
    assert hidden.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # Parameters stay in param_dtype; only activations are bfloat16.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(split_params(model)[2]))

    reference = build(dataclasses.replace(cfg, dtype="float32"))
    _, expected = forward(reference, tokens, *single_segment(2, 5))
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%) and rounds at every matmul.
    np.testing.assert_allclose(logits, expected, rtol=0.05, atol=0.05)


def test_bfloat16_params():
    cfg = tiny_config(dtype="bfloat16", param_dtype="bfloat16")
    model = build(cfg)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(split_params(model)[2]))
    hidden, _ = _jitted_forward(*nnx.split(model), random_tokens(cfg, 1, 4), *single_segment(1, 4))
    assert hidden.dtype == jnp.bfloat16


# ---------------------------------------------------------------- parameters and the pure-dict API


@pytest.mark.parametrize("tie", [False, True])
def test_logical_axes_name_every_dimension(tie):
    cfg = tiny_config(tie_embeddings=tie)
    _, state, params = split_params(build(cfg))
    axes = logical_axes(state)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = jax.tree_util.tree_flatten_with_path(
        axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    assert [path for path, _ in flat_axes] == [path for path, _ in flat_params]
    known = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}
    for (path, names), (_, value) in zip(flat_axes, flat_params, strict=True):
        assert isinstance(names, tuple) and len(names) == value.ndim, path
        assert set(names) <= known, path
    assert axes["layers"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embedding"] == ("vocab", "embed")
    assert ("head" in axes) == (not tie)


def test_count_params():
    cfg = tiny_config()
    d, ff, v, hd, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.resolved_head_dim, cfg.n_layers
    per_layer = 2 * d + d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2) + 3 * d * ff
    untied = build(cfg)
    tied = build(dataclasses.replace(cfg, tie_embeddings=True))
    assert count_params(split_params(untied)[2]) == 2 * v * d + d + L * per_layer
    assert count_params(split_params(tied)[2]) == v * d + d + L * per_layer
    assert count_params(split_params(tied)[1]) == count_params(split_params(tied)[2])


def test_bind_split_roundtrip_under_jit_and_grad():
    cfg = tiny_config()
    model = build(cfg)
    tokens = random_tokens(cfg, batch=2, length=6)
    positions, segments = single_segment(2, 6)
    graphdef, state, params = split_params(model)
    template_before = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    traces = []

    def loss(params):
        traces.append(1)
        m = bind(graphdef, state, params)
        return jnp.mean(logits_btv(m(tokens, positions, segments), m.head_vd()) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(params)
    shifted = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    value_after, _ = step(shifted)
    assert len(traces) == 1  # same structure, same graphdef: no retrace
    assert value_after < value

    # The gradient equals the one NNX computes on the module itself.
    def module_loss(m):
        return jnp.mean(logits_btv(m(tokens, positions, segments), m.head_vd()) ** 2)

    np.testing.assert_allclose(value, nnx.jit(module_loss)(model), **F32_TOL)
    expected = nnx.to_pure_dict(nnx.jit(nnx.grad(module_loss))(model))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_TOL), grads, expected)

    # bind never mutates the template, and the bound module carries the new weights.
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state), template_before)
    rebound = bind(graphdef, state, shifted)
    np.testing.assert_array_equal(rebound.head_vd(), shifted["head"])
    np.testing.assert_allclose(module_loss(rebound), value_after, **F32_TOL)  # eager, unjitted


def test_invalid_head_counts_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Transformer(tiny_config(n_heads=4, n_kv_heads=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even"):
        Transformer(tiny_config(head_dim=7), rngs=nnx.Rngs(0))
