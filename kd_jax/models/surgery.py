"""A student initialized from its teacher's weights, as NVIDIA's Minitron does (Muralidharan et
al. 2024, "Compact Language Models via Pruning and Knowledge Distillation").

The student keeps a subset of the teacher's layers (`model.init_layers`, in the order given),
and optionally narrower MLPs (`model.prune_d_ff`) and fewer key/value heads
(`model.prune_kv_heads`, each kept with its group of query heads). What is kept is chosen per
layer by activation importance measured on a few batches (`importance`): the summed magnitude
of each MLP unit's activation, and the summed output norm of each attention head (a kv head
scores the sum of its query heads). Kept units and heads stay in their original order.

Which dimension of which weight is a layer, a head or an MLP unit is read from the logical axis
names the model declares beside each weight (`kd_jax.models.transformer`), so a new weight is
sliced correctly without being named here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models.pure import Batch, Params, PureModel, abstract_model, bind, logical_axes

# The student's own fields: where its weights come from and how it computes. Every other field
# (the architecture) is the teacher's, narrowed by the pruning.
_STUDENT_FIELDS = frozenset({
    "init", "path", "init_layers", "prune_d_ff", "prune_kv_heads", "prune_batches",
    "remat", "layer_loop", "attention", "attention_block", "dtype", "param_dtype", "init_std",
    "seed", "quantize", "quantize_group", "quantize_embedding", "quantize_head",
    "quantize_activations", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"})


def _teacher_layers(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> list[int]:
    """The teacher layers the student is made of, checked; all of them when none are named."""
    n_layers = teacher_cfg.n_layers
    for index in student_cfg.init_layers:
        if not 0 <= index < n_layers:
            raise ConfigError(f"model.init_layers: layer {index} is out of range, the teacher "
                              f"has {n_layers} layers (0..{n_layers - 1})")
    seen = set()
    for index in student_cfg.init_layers:
        if index in seen:
            raise ConfigError(f"model.init_layers lists teacher layer {index} twice "
                              f"({student_cfg.init_layers}; the teacher has {n_layers} layers)")
        seen.add(index)
    return list(student_cfg.init_layers) or list(range(n_layers))


def student_config(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> ModelConfig:
    """The architecture of a student initialized from `teacher_cfg`'s weights.

    The teacher's, with the layers, MLP width and key/value heads `student_cfg` keeps; the head
    dimension is set explicitly, since d_model // n_heads changes when heads are pruned. The
    student's own fields (dtypes, remat, seed, where its weights come from) are its own.
    """
    layers = _teacher_layers(teacher_cfg, student_cfg)
    if student_cfg.prune_d_ff > teacher_cfg.d_ff:
        raise ConfigError(f"model.prune_d_ff is {student_cfg.prune_d_ff}, more than the "
                          f"teacher's d_ff ({teacher_cfg.d_ff})")
    if student_cfg.prune_kv_heads > teacher_cfg.n_kv_heads:
        raise ConfigError(f"model.prune_kv_heads is {student_cfg.prune_kv_heads}, more than the "
                          f"teacher's n_kv_heads ({teacher_cfg.n_kv_heads})")
    group = teacher_cfg.n_heads // teacher_cfg.n_kv_heads
    n_kv_heads = student_cfg.prune_kv_heads or teacher_cfg.n_kv_heads
    architecture = {field.name: getattr(teacher_cfg, field.name)
                    for field in dataclasses.fields(ModelConfig)
                    if field.name not in _STUDENT_FIELDS}
    architecture.update(
        n_layers=len(layers), d_ff=student_cfg.prune_d_ff or teacher_cfg.d_ff,
        n_kv_heads=n_kv_heads, n_heads=n_kv_heads * group,
        head_dim=teacher_cfg.resolved_head_dim)
    return dataclasses.replace(student_cfg, **architecture)


def importance(model: PureModel, params: Params,
               batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """How strongly each attention head and each MLP unit fires over `batches`, per layer.

    Returns (heads_ln [layers, n_heads], mlp_lf [layers, d_ff]), float32: the summed output L2
    norm of each head and the summed |silu(gate) * up| of each unit, over every token of every
    batch (`Transformer.statistics`). One compiled program serves every batch of one shape.
    """

    @jax.jit
    def batch_statistics(params, tokens, positions, segment_ids):
        module = bind(model.graphdef, model.template, params)
        return module.statistics(tokens, positions, segment_ids)

    totals = None
    for batch in batches:
        stats = batch_statistics(params, batch["tokens"], batch["positions"],
                                 batch["segment_ids"])
        # Summed on the device: no host sync until the end.
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    if totals is None:
        raise ValueError("importance needs at least one batch")
    heads_ln, mlp_lf = totals
    return np.asarray(heads_ln), np.asarray(mlp_lf)


def _top_in_order(scores_lx: np.ndarray, keep: int) -> np.ndarray:
    """Per row, the indices of the `keep` highest scores, ascending: [rows, keep]. Ties go to
    the lower index, so the choice does not depend on the sort's internals."""
    order_lx = np.argsort(-scores_lx, axis=-1, kind="stable")
    return np.sort(order_lx[:, :keep], axis=-1)


def _checked_scores(scores, name: str, shape: tuple[int, int], option: str) -> np.ndarray:
    if scores is None:
        raise ValueError(f"{option} prunes the teacher, so {name} (from importance()) is needed")
    scores = np.asarray(scores, np.float64)
    if scores.shape != shape:
        raise ValueError(f"{name} has shape {scores.shape}, the teacher's is {shape}")
    return scores


def kept_indices(teacher_cfg: ModelConfig, student_cfg: ModelConfig, heads_ln=None,
                 mlp_lf=None) -> dict[str, np.ndarray]:
    """What the student keeps of each pruned dimension, by logical axis name: per student layer,
    the teacher's indices ([student layers, kept], ascending). Unpruned axes are absent.

    `heads_ln` [teacher layers, n_heads] and `mlp_lf` [teacher layers, d_ff] are `importance`'s
    scores; only the ones a pruning needs are read.
    """
    cfg = student_config(teacher_cfg, student_cfg)
    layers = _teacher_layers(teacher_cfg, student_cfg)
    kept = {}
    if cfg.d_ff < teacher_cfg.d_ff:
        mlp_lf = _checked_scores(mlp_lf, "mlp_lf", (teacher_cfg.n_layers, teacher_cfg.d_ff),
                                 "model.prune_d_ff")
        kept["mlp"] = _top_in_order(mlp_lf[layers], cfg.d_ff)
    if cfg.n_kv_heads < teacher_cfg.n_kv_heads:
        heads_ln = _checked_scores(heads_ln, "heads_ln",
                                   (teacher_cfg.n_layers, teacher_cfg.n_heads),
                                   "model.prune_kv_heads")
        # Query head n reads kv head n // group: a kv head scores the sum of its group.
        group = teacher_cfg.n_heads // teacher_cfg.n_kv_heads
        kv_scores_lk = heads_ln[layers].reshape(len(layers), teacher_cfg.n_kv_heads, group)
        kept_kv_lk = _top_in_order(kv_scores_lk.sum(-1), cfg.n_kv_heads)
        kept["kv_heads"] = kept_kv_lk
        kept["heads"] = (kept_kv_lk[:, :, None] * group + np.arange(group)).reshape(
            len(layers), cfg.n_heads)
    return kept


def _select(value: jax.Array, axes: tuple[str, ...], layers: np.ndarray,
            kept: dict[str, np.ndarray]) -> jax.Array:
    """One teacher weight narrowed to the student: its layers, then its kept heads and units."""
    if "layers" not in axes:
        return jnp.asarray(value)
    if axes[0] != "layers":
        raise ValueError(f"a stacked weight's first axis must be 'layers', got {axes}")
    value = jnp.take(jnp.asarray(value), layers, axis=0)
    for axis, name in enumerate(axes):
        if name in kept:
            index_shape = [1] * value.ndim
            index_shape[0], index_shape[axis] = kept[name].shape
            value = jnp.take_along_axis(value, kept[name].reshape(index_shape), axis=axis)
    return value


def init_from_teacher(teacher_params: Params, teacher_cfg: ModelConfig,
                      student_cfg: ModelConfig, heads_ln=None, mlp_lf=None) -> Params:
    """The student's params (a pure dict shaped like `init_model(student_config(...))`'s), taken
    from the teacher's: the layers `student_cfg.init_layers` in that order, each with the MLP
    units and key/value heads its importance ranks highest (see `kept_indices`); norms,
    embedding and head copied. Cast to the student's param_dtype.
    """
    cfg = student_config(teacher_cfg, student_cfg)
    layers = np.asarray(_teacher_layers(teacher_cfg, student_cfg))
    kept = kept_indices(teacher_cfg, student_cfg, heads_ln, mlp_lf)
    axes = logical_axes(abstract_model(teacher_cfg)[0].template)
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda value, names: _select(value, names, layers, kept).astype(dtype),
                        teacher_params, axes)
