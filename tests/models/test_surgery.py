"""kd_jax.models.surgery: a student made of the teacher's layers, narrowed by importance.

Each student's params are compared with a reference sliced by hand, one layer at a time, from
the parameter shapes the model documents; its logits with the teacher's (or with a model of the
hand-picked layers). Pruning is checked on teachers built so that the pruned units or heads
never fire: removing them must leave the logits as they were.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models.pure import abstract_model, init_model
from kd_jax.models.surgery import importance, init_from_teacher, kept_indices, student_config
from tests.helpers import assert_trees_close, make_batch

# Three layers so that a subset can be reordered; three kv heads of two query heads each, so
# that pruning one keeps two in an order that matters; head_dim explicit, as d_model // n_heads
# would be odd.
TEACHER = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=6, n_kv_heads=3, head_dim=8,
                      d_ff=48, max_seq_len=32, init_std=0.1, seed=3)
GROUP = TEACHER.n_heads // TEACHER.n_kv_heads
FAMILY_FLAGS = dict(qkv_bias=True, o_bias=True, qk_norm=True)
BATCHES = [make_batch(seed, batch=4, seq=16) for seed in (0, 1)]


_TEACHERS: dict = {}


def teacher(**flags):
    """(config, model, numpy params) of TEACHER with `flags`; every weight perturbed, so biases
    are not zero and norms not one, and a weight taken from the wrong place shows. The params
    are a fresh copy each call: tests edit them."""
    key = tuple(sorted(flags.items()))
    if key not in _TEACHERS:
        cfg = dataclasses.replace(TEACHER, **flags)
        model, params = init_model(cfg)
        rng = np.random.default_rng(7)
        params = jax.tree.map(
            lambda value: (np.asarray(value) + 0.05 * rng.standard_normal(value.shape)).astype(
                np.float32), params)
        _TEACHERS[key] = cfg, model, params
    cfg, model, params = _TEACHERS[key]
    return cfg, model, jax.tree.map(np.copy, params)


def student(**fields) -> ModelConfig:
    return ModelConfig(init="teacher", **fields)


def logits(model, params, batch) -> np.ndarray:
    return np.asarray(jax.jit(model.logits)(params, batch))


def layer_states(model, params, batch) -> np.ndarray:
    """Each layer's output [layers, b, t, d]."""
    return np.asarray(jax.jit(
        lambda p, b: model.apply(p, b, with_layers=True).layers_lbtd)(params, batch))


def student_logits(teacher_cfg, student_cfg, params, batch) -> np.ndarray:
    model, _ = abstract_model(student_config(teacher_cfg, student_cfg))
    return logits(model, params, batch)


def sliced_by_hand(params, layers, kept_units=None, kept_kv=None):
    """The reference student: teacher layer `layers[i]` becomes layer i; in it, the MLP units
    `kept_units[i]` and the kv heads `kept_kv[i]` (with their query heads) are kept."""
    stacked = {name: [] for name in params["layers"]}
    for row, layer in enumerate(layers):
        for name, value in params["layers"].items():
            weight = value[layer]
            if kept_units is not None:
                units = list(kept_units[row])
                if name in ("w_gate", "w_up"):  # [d, ff]
                    weight = weight[:, units]
                elif name == "w_down":  # [ff, d]
                    weight = weight[units]
            if kept_kv is not None:
                kv = list(kept_kv[row])
                heads = [head * GROUP + member for head in kv for member in range(GROUP)]
                if name in ("wk", "wv"):  # [d, kv, hd]
                    weight = weight[:, kv]
                elif name in ("bk", "bv"):  # [kv, hd]
                    weight = weight[kv]
                elif name == "wq":  # [d, n, hd]
                    weight = weight[:, heads]
                elif name in ("wo", "bq"):  # [n, hd, d], [n, hd]
                    weight = weight[heads]
            stacked[name].append(weight)
    expected = {name: value for name, value in params.items() if name != "layers"}
    expected["layers"] = {name: np.stack(weights) for name, weights in stacked.items()}
    return expected


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


def assert_shaped_like_init(params, cfg: ModelConfig):
    """Exactly the structure, shapes and dtypes `init_model(cfg)` gives."""
    _, abstract = abstract_model(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), strict=True):
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype)


def complement(chosen_lx, size: int) -> np.ndarray:
    """Per row, the indices in range(size) not chosen, ascending."""
    return np.stack([np.setdiff1d(np.arange(size), row) for row in chosen_lx])


# ------------------------------------------------------------------------------ the config


def test_student_config_is_the_teachers_architecture_narrowed_with_the_students_own_fields():
    teacher_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                              d_ff=48, qk_norm=True, sliding_window=8, family="qwen3", seed=3)
    student_cfg = student(init_layers=[2, 0], prune_d_ff=16, prune_kv_heads=1, prune_batches=2,
                          dtype="bfloat16", param_dtype="bfloat16", remat="full", seed=9)
    cfg = student_config(teacher_cfg, student_cfg)
    # Two heads of the teacher's width 8, not d_model // n_heads = 16.
    assert cfg == dataclasses.replace(
        teacher_cfg, n_layers=2, d_ff=16, n_kv_heads=1, n_heads=2, head_dim=8,
        init="teacher", init_layers=[2, 0], prune_d_ff=16, prune_kv_heads=1, prune_batches=2,
        dtype="bfloat16", param_dtype="bfloat16", remat="full", seed=9)
    assert cfg.resolved_head_dim == 8

    unpruned = student_config(teacher_cfg, student())
    assert unpruned == dataclasses.replace(teacher_cfg, head_dim=8, init="teacher", seed=0)


@pytest.mark.parametrize("key, fields, teacher_value", [
    ("init_layers", dict(init_layers=[0, 3]), "3 layers"),
    ("init_layers", dict(init_layers=[-1]), "3 layers"),
    ("init_layers", dict(init_layers=[1, 0, 1]), "3 layers"),
    ("prune_d_ff", dict(prune_d_ff=49), "d_ff (48)"),
    ("prune_kv_heads", dict(prune_kv_heads=4), "n_kv_heads (3)"),
])
def test_a_student_the_teacher_cannot_give_is_refused_in_one_line(key, fields, teacher_value):
    for build in (lambda: student_config(TEACHER, student(**fields)),
                  lambda: init_from_teacher({}, TEACHER, student(**fields))):
        with pytest.raises(ConfigError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message
        assert f"model.{key}" in message and teacher_value in message


# ------------------------------------------------------------------------- layers, unpruned


def test_all_layers_unpruned_is_the_teacher_to_the_bit():
    teacher_cfg, model, params = teacher()
    student_params = init_from_teacher(params, teacher_cfg, student())
    assert_shaped_like_init(student_params, student_config(teacher_cfg, student()))
    assert_trees_equal(jax.tree.map(np.asarray, student_params), params)
    np.testing.assert_array_equal(student_logits(teacher_cfg, student(), student_params,
                                                 BATCHES[0]),
                                  logits(model, params, BATCHES[0]))


def test_a_layer_subset_is_those_teacher_layers_in_the_order_given():
    teacher_cfg, model, params = teacher()
    student_cfg = student(init_layers=[2, 0])
    student_params = init_from_teacher(params, teacher_cfg, student_cfg)
    assert_shaped_like_init(student_params, student_config(teacher_cfg, student_cfg))
    expected = sliced_by_hand(params, [2, 0])
    assert_trees_equal(jax.tree.map(np.asarray, student_params), expected)
    # The same numbers as a teacher whose layer list was edited by hand.
    edited, _ = abstract_model(dataclasses.replace(teacher_cfg, n_layers=2))
    np.testing.assert_array_equal(
        student_logits(teacher_cfg, student_cfg, student_params, BATCHES[0]),
        logits(edited, expected, BATCHES[0]))

    # A prefix of the teacher's layers computes what the teacher's first layers compute.
    prefix_cfg = student(init_layers=[0, 1])
    prefix, _ = abstract_model(student_config(teacher_cfg, prefix_cfg))
    prefix_params = init_from_teacher(params, teacher_cfg, prefix_cfg)
    assert_trees_close(layer_states(prefix, prefix_params, BATCHES[0]),
                       layer_states(model, params, BATCHES[0])[:2])


def test_params_are_cast_to_the_students_param_dtype():
    teacher_cfg, _, params = teacher()
    student_cfg = student(init_layers=[1], param_dtype="bfloat16")
    student_params = init_from_teacher(params, teacher_cfg, student_cfg)
    assert_shaped_like_init(student_params, student_config(teacher_cfg, student_cfg))
    np.testing.assert_array_equal(np.asarray(student_params["layers"]["wq"][0], np.float32),
                                  np.asarray(params["layers"]["wq"][1].astype(jnp.bfloat16),
                                             np.float32))


# ------------------------------------------------------------------------------ importance


def test_importance_ranks_first_the_units_and_heads_scaled_up():
    teacher_cfg, model, params = teacher()
    rng = np.random.default_rng(0)
    loud_units = np.sort(np.stack([rng.choice(teacher_cfg.d_ff, 16, replace=False)
                                   for _ in range(teacher_cfg.n_layers)]), axis=-1)
    loud_kv = np.array([[1], [2], [0]])  # one kv head per layer, a different one each time
    for layer in range(teacher_cfg.n_layers):
        # 20 times the up projection: 20 times the unit's activation; 20 times the values: 20
        # times the outputs of the kv head's query heads.
        params["layers"]["w_up"][layer][:, loud_units[layer]] *= 20
        params["layers"]["wv"][layer][:, loud_kv[layer]] *= 20

    heads_ln, mlp_lf = importance(model, params, iter(BATCHES))
    assert isinstance(heads_ln, np.ndarray) and isinstance(mlp_lf, np.ndarray)
    assert heads_ln.shape == (teacher_cfg.n_layers, teacher_cfg.n_heads)
    assert mlp_lf.shape == (teacher_cfg.n_layers, teacher_cfg.d_ff)
    # The sum over batches.
    one_by_one = [importance(model, params, [batch]) for batch in BATCHES]
    assert_trees_close((heads_ln, mlp_lf), jax.tree.map(np.add, *one_by_one))

    kept = kept_indices(teacher_cfg, student(prune_d_ff=16, prune_kv_heads=1), heads_ln, mlp_lf)
    np.testing.assert_array_equal(kept["mlp"], loud_units)
    np.testing.assert_array_equal(kept["kv_heads"], loud_kv)
    np.testing.assert_array_equal(kept["heads"], loud_kv * GROUP + np.arange(GROUP))


def test_importance_of_the_first_mlp_against_numpy():
    """With the first layer's values zero, its attention adds nothing: the first MLP sees the
    normed embeddings, and its importance can be computed in numpy."""
    teacher_cfg, model, params = teacher()
    params["layers"]["wv"][0] = 0
    heads_ln, mlp_lf = importance(model, params, BATCHES)

    eps = teacher_cfg.norm_eps
    np.testing.assert_array_equal(heads_ln[0], 0)
    assert (heads_ln[1:] > 0).all()
    expected_f = 0
    for batch in BATCHES:
        x_btd = params["embedding"][batch["tokens"]].astype(np.float64)
        h_btd = x_btd / np.sqrt(np.mean(x_btd ** 2, -1, keepdims=True) + eps)
        h_btd = h_btd * params["layers"]["mlp_norm"][0]
        gate_btf = h_btd @ params["layers"]["w_gate"][0]
        up_btf = h_btd @ params["layers"]["w_up"][0]
        act_btf = gate_btf / (1 + np.exp(-gate_btf)) * up_btf
        expected_f = expected_f + np.abs(act_btf).sum((0, 1))  # padding included
    assert_trees_close(mlp_lf[0], expected_f)


# --------------------------------------------------------------------------------- pruning


def test_pruning_mlp_units_that_never_fire_changes_nothing():
    teacher_cfg, model, params = teacher()
    rng = np.random.default_rng(1)
    silent_units = np.sort(np.stack([rng.choice(teacher_cfg.d_ff, 16, replace=False)
                                     for _ in range(teacher_cfg.n_layers)]), axis=-1)
    for layer in range(teacher_cfg.n_layers):
        # silu(0) * 0 = 0 whatever the input; their w_down rows stay, multiplied by zero.
        params["layers"]["w_gate"][layer][:, silent_units[layer]] = 0
        params["layers"]["w_up"][layer][:, silent_units[layer]] = 0
    heads_ln, mlp_lf = importance(model, params, BATCHES)
    firing = complement(silent_units, teacher_cfg.d_ff)
    assert (np.take_along_axis(mlp_lf, silent_units, -1) == 0).all()
    assert (np.take_along_axis(mlp_lf, firing, -1) > 0).all()

    student_cfg = student(prune_d_ff=32)
    student_params = init_from_teacher(params, teacher_cfg, student_cfg, mlp_lf=mlp_lf)
    assert_shaped_like_init(student_params, student_config(teacher_cfg, student_cfg))
    assert_trees_equal(jax.tree.map(np.asarray, student_params),
                       sliced_by_hand(params, [0, 1, 2], kept_units=firing))
    assert_trees_close(student_logits(teacher_cfg, student_cfg, student_params, BATCHES[0]),
                       logits(model, params, BATCHES[0]))

    # With a layer subset, each student layer is pruned by its teacher layer's importance.
    subset_cfg = student(init_layers=[2, 0], prune_d_ff=32)
    subset_params = init_from_teacher(params, teacher_cfg, subset_cfg, heads_ln, mlp_lf)
    assert_trees_equal(jax.tree.map(np.asarray, subset_params),
                       sliced_by_hand(params, [2, 0], kept_units=firing[[2, 0]]))


@pytest.mark.parametrize("flags", [{}, FAMILY_FLAGS], ids=["llama", "bias_qk_norm"])
def test_pruning_kv_heads_that_output_nothing_changes_nothing(flags):
    teacher_cfg, model, params = teacher(**flags)
    silent_kv = np.array([[0], [2], [1]])  # one kv head per layer
    for layer in range(teacher_cfg.n_layers):
        # Zero values: the group's query heads attend to zeros and output zeros.
        params["layers"]["wv"][layer][:, silent_kv[layer]] = 0
        if teacher_cfg.qkv_bias:
            params["layers"]["bv"][layer][silent_kv[layer]] = 0
    heads_ln, _ = importance(model, params, BATCHES)
    silent_heads = silent_kv * GROUP + np.arange(GROUP)
    assert (np.take_along_axis(heads_ln, silent_heads, -1) == 0).all()
    assert (np.take_along_axis(heads_ln, complement(silent_heads, teacher_cfg.n_heads), -1)
            > 0).all()

    student_cfg = student(prune_kv_heads=2)
    student_params = init_from_teacher(params, teacher_cfg, student_cfg, heads_ln=heads_ln)
    assert_shaped_like_init(student_params, student_config(teacher_cfg, student_cfg))
    kept_kv = complement(silent_kv, teacher_cfg.n_kv_heads)
    assert_trees_equal(jax.tree.map(np.asarray, student_params),
                       sliced_by_hand(params, [0, 1, 2], kept_kv=kept_kv))
    assert_trees_close(student_logits(teacher_cfg, student_cfg, student_params, BATCHES[0]),
                       logits(model, params, BATCHES[0]))


def test_pruning_without_its_importance_is_refused():
    teacher_cfg, _, params = teacher()
    with pytest.raises(ValueError, match="mlp_lf"):
        init_from_teacher(params, teacher_cfg, student(prune_d_ff=8))
    with pytest.raises(ValueError, match="heads_ln"):
        init_from_teacher(params, teacher_cfg, student(prune_kv_heads=1), mlp_lf=np.ones((3, 48)))
    with pytest.raises(ValueError, match="shape"):
        init_from_teacher(params, teacher_cfg, student(prune_d_ff=8), mlp_lf=np.ones((2, 48)))
