"""The device mesh and where every array of the step lies on it.

The mesh has three axes, always in this order:

    data    the batch is split over it; parameters are replicated along it
    fsdp    the batch is split over it too; parameters (and optimizer state) are split over it
            along their `embed` dimension and gathered for use (ZeRO-3 / FSDP)
    tensor  heads, MLP width and vocabulary are split over it (Megatron-style tensor parallelism)

Each model parameter names its logical axes (`kd_jax.models.pure.logical_axes`); `LAYOUTS`, the
one table of this module, maps each logical axis to a mesh axis (or None: not split) for each
named layout (`kd_jax.config.MeshLayout`). The student and the teacher each choose a layout
(`mesh.student_layout`, `mesh.teacher_layout`): a large frozen teacher can be fully sharded
beside a replicated student.

This module imports only jax, numpy and the config.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax.checks import closest
from kd_jax.config import ConfigError, MeshConfig, MeshLayout, choices

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Every logical axis a model parameter may name (see kd_jax.models.transformer).
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
                "lora_rank")

_REPLICATED = dict.fromkeys(LOGICAL_AXES)
_TENSOR = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

# layout -> logical axis -> mesh axis (None: that dimension is not split).
# `layers` is scanned over, `head_dim` is contracted inside one head, `norm` vectors are tiny and
# `lora_rank` (a LoRA adapter's r) is a few dozen: none of them is split in any layout.
LAYOUTS: dict[str, dict[str, str | None]] = {
    "replicated": _REPLICATED,
    "fsdp": {**_REPLICATED, "embed": "fsdp"},
    "tensor": {**_REPLICATED, **_TENSOR},
    "fsdp_tensor": {**_REPLICATED, "embed": "fsdp", **_TENSOR},
}
assert tuple(LAYOUTS) == choices(MeshLayout), "config.MeshLayout must name exactly these layouts"
assert all(tuple(rules) == LOGICAL_AXES for rules in LAYOUTS.values())


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes, with a -1 resolved to the devices the others leave over."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    named = ", ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ConfigError(f"mesh sizes must be >= 1, with at most one -1; got {named}")
    if -1 in sizes:
        known = int(np.prod([size for size in sizes if size != -1]))
        if device_count % known:
            raise ConfigError(
                f"{device_count} devices cannot be split as {named}: {device_count} is not "
                f"divisible by {known}")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ConfigError(
            f"mesh {named} has {int(np.prod(sizes))} devices, but there are {device_count}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Any = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: the step's sharding is given by in/out shardings and propagated by XLA, not
    # carried in the types (this JAX makes Explicit axes the default for jax.make_mesh).
    return Mesh(np.array(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_for(layout: str, changes: dict[str, str | None] | None = None,
              where: str = "mesh.student_rules") -> dict[str, str | None]:
    """The logical-axis -> mesh-axis table of `layout`, with `changes` (from `where`) applied."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown mesh layout '{layout}'; choose from {', '.join(LAYOUTS)}")
    rules = dict(LAYOUTS[layout])
    for logical, mesh_axis in (changes or {}).items():
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"{where}: unknown logical axis '{logical}'"
                              f"{closest(logical, LOGICAL_AXES)}; logical axes are "
                              f"{', '.join(LOGICAL_AXES)}")
        if mesh_axis is not None and mesh_axis not in MESH_AXES:
            raise ConfigError(f"{where}: '{logical}' is mapped to '{mesh_axis}', which is not a "
                              f"mesh axis ({', '.join(MESH_AXES)}, or null)")
        rules[logical] = mesh_axis
    return rules


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], rules: str | dict, mesh: Mesh,
                   name: str = "parameter") -> PartitionSpec:
    """The PartitionSpec of one array whose dimensions are named `axes`, placed by `rules`.

    `rules` is a table from `rules_for` or a layout's name. A mesh axis of size 1 splits nothing
    and is left out; a mesh axis already used by an earlier dimension is not used again (a spec
    may name each mesh axis once).
    """
    if isinstance(rules, str):
        rules = rules_for(rules)
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} logical axes {axes} for shape {shape}")
    used: set[str] = set()
    spec = []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        if logical not in rules:
            raise ValueError(f"{name}: logical axis '{logical}' is not one of {LOGICAL_AXES}")
        mesh_axis = rules[logical]
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        if size % mesh.shape[mesh_axis]:
            raise ConfigError(
                f"{name}: dimension {dim} ('{logical}', size {size}) is not divisible by mesh "
                f"axis '{mesh_axis}' (size {mesh.shape[mesh_axis]})")
        used.add(mesh_axis)
        spec.append(mesh_axis)
    while spec and spec[-1] is None:  # P("fsdp") rather than P("fsdp", None, None)
        spec.pop()
    return PartitionSpec(*spec)


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def param_shardings(logical_axes_tree: Any, rules: str | dict, mesh: Mesh,
                    shapes_tree: Any) -> Any:
    """A NamedSharding for every parameter, shaped like `shapes_tree` (arrays or ShapeDtypeStructs).

    `logical_axes_tree` is `kd_jax.models.pure.logical_axes(state)`: a tuple of names per parameter.
    """
    def one(path, axes, leaf):
        spec = partition_spec(axes, tuple(leaf.shape), rules, mesh, name=_path_name(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, logical_axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def _dict_key_suffix(path) -> tuple:
    """The trailing dictionary keys of a tree path: a parameter's name inside an optimizer state."""
    suffix = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        suffix.append(key.key)
    return tuple(reversed(suffix))


def tree_shardings(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that holds copies of the parameters (a TrainState, an optimizer state).

    A leaf whose path ends in a parameter's name and whose shape is that parameter's is placed
    like it (Adam's moments are split as the weights are); every other leaf (step counters, rng
    keys, factored statistics) is replicated.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(params_shardings)
    by_name = {_dict_key_suffix(path): (tuple(leaf.shape), sharding)
               for (path, leaf), sharding in zip(flat_params, flat_shardings)}
    replicated_sharding = replicated(mesh)

    def one(path, leaf):
        shape, sharding = by_name.get(_dict_key_suffix(path), (None, None))
        return sharding if shape == tuple(np.shape(leaf)) else replicated_sharding

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logits_sharding(mesh: Mesh, rules: str | dict, vocab_size: int) -> NamedSharding:
    """Where [batch, tokens, vocab] logits lie: batch over data x fsdp, vocabulary by `rules`."""
    vocab_spec = partition_spec(("vocab",), (vocab_size,), rules, mesh, name="logits")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, *vocab_spec))


def activation_sharding(logits: NamedSharding | None) -> NamedSharding | None:
    """Where a model's activations [batch, tokens, d] lie: the batch as its logits' batch (split
    over data x fsdp), the rest whole. None for None."""
    if logits is None:
        return None
    return NamedSharding(logits.mesh, PartitionSpec(logits.spec[0]))


def batch_sharding(mesh: Mesh, batch_size: int | None = None,
                   what: str = "train.batch_size") -> NamedSharding:
    """Batch arrays [batch, ...] split on batch over data x fsdp; checks `batch_size` if given."""
    if batch_size is not None:
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % ways:
            raise ConfigError(
                f"{what} ({batch_size}) is not divisible by mesh data x fsdp "
                f"({mesh.shape['data']} x {mesh.shape['fsdp']} = {ways})")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def kv_cache_sharding(mesh: Mesh, rules: str | dict, n_kv_heads: int) -> NamedSharding:
    """The key/value cache [layers, batch, slots, kv_heads, head_dim]: the batch over
    data x fsdp like the activations, the kv heads as the parameters' table splits them."""
    kv_spec = partition_spec(("kv_heads",), (n_kv_heads,), rules, mesh,
                             name="the key/value cache")
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None, *kv_spec))
