"""The multi-device half of tests/parallel/test_mesh.py, run there in a subprocess.

It needs 8 host-platform CPU devices, and the XLA flag that makes them must be set before JAX
starts and must not reach the other tests, so it runs as its own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel/sharding_worker.py OUT

It trains the tiny student of tests/helpers.py for a few SGD steps on each mesh layout and once
unsharded on device 0, and writes what the test asserts on: OUT/report.json (losses, specs,
shard shapes, collectives in the compiled HLO, errors) and OUT/params.npz (final parameters).
"""

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: `tests` and `kd_jax`
from kd_jax.config import ConfigError, MeshConfig  # noqa: E402
from kd_jax.models.pure import abstract_model, init_model, logical_axes  # noqa: E402
from kd_jax.parallel import mesh as mesh_lib  # noqa: E402
from kd_jax.teacher import sparse  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train.step import init_state, make_update  # noqa: E402
from tests.helpers import LOSS, STUDENT, TEACHER, VALID_VOCAB, make_batch  # noqa: E402

STEPS = 3
BATCH = 8  # divisible by data x fsdp of every mesh below

# name -> (mesh, student layout, teacher layout)
SCENARIOS = {
    "data_parallel": (MeshConfig(data=8), "replicated", "replicated"),
    "fsdp": (MeshConfig(data=1, fsdp=8), "fsdp", "fsdp"),
    "fsdp_tensor": (MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tensor", "fsdp_tensor"),
    # A frozen teacher fully sharded beside a data-parallel student.
    "teacher_fsdp": (MeshConfig(data=2, fsdp=4), "replicated", "fsdp"),
    # Tensor parallelism over 4, the most the teacher allows (4 heads, 4 kv heads).
    "teacher_tensor": (MeshConfig(data=2, tensor=4), "replicated", "tensor"),
}


def flat(tree) -> dict[str, object]:
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def counting(update, traces: list):
    """`update`, appending to `traces` each time it is traced."""
    def counted_update(state, teacher_params, batch):
        traces.append(1)
        return update(state, teacher_params, batch)

    return counted_update


def error_of(fn) -> str:
    try:
        fn()
    except ConfigError as err:
        return str(err)
    return ""


def main(out_dir: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    student, student_params = init_model(STUDENT)
    teacher, teacher_params = init_model(TEACHER)
    student_axes = logical_axes(student.template)
    teacher_axes = logical_axes(teacher.template)
    # Momentum, so there is an optimizer state shaped like the parameters to shard.
    tx = optax.sgd(0.5, momentum=0.9)
    update = make_update(student, OnlineTeacher(teacher), tx, optax.constant_schedule(0.5), LOSS,
                         1, VALID_VOCAB)
    batches = [make_batch(seed, batch=BATCH) for seed in range(STEPS)]
    report: dict = {"devices": jax.device_count(), "scenarios": {}}
    final_params: dict[str, np.ndarray] = {}

    # Reference: one device, no shardings anywhere.
    state = init_state(student_params, tx, seed=0)
    reference_update = jax.jit(update)
    losses = []
    for batch in batches:
        state, metrics = reference_update(state, teacher_params, batch)
        losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
    next_batch = make_batch(STEPS, batch=BATCH)
    _, next_metrics = reference_update(state, teacher_params, next_batch)  # not donated
    report["reference"] = {"losses": losses,
                           "devices": sorted({d.id for d in state.params["head"].devices()}),
                           "next_loss": float(next_metrics["loss_sum"] / next_metrics["tokens"])}
    final_params.update({f"reference/{k}": np.asarray(v) for k, v in flat(state.params).items()})

    for name, (mesh_cfg, student_layout, teacher_layout) in SCENARIOS.items():
        mesh = mesh_lib.make_mesh(mesh_cfg)
        student_shardings = mesh_lib.param_shardings(
            student_axes, student_layout, mesh, student_params)
        teacher_shardings = mesh_lib.param_shardings(
            teacher_axes, teacher_layout, mesh, teacher_params)
        # From host copies: a device_put may alias a buffer it already finds on a device, and the
        # donated state must not take the shared initial parameters with it.
        state = init_state(jax.tree.map(np.asarray, student_params), tx, seed=0)
        state_shardings = mesh_lib.tree_shardings(state, student_params, student_shardings, mesh)
        batch_sharding = mesh_lib.batch_sharding(mesh, BATCH)
        state = jax.device_put(state, state_shardings)
        sharded_teacher = jax.device_put(teacher_params, teacher_shardings)

        # The logits, the step's largest activations, pinned: batch over data x fsdp, the
        # vocabulary as each model's layout says.
        scenario_teacher = OnlineTeacher(teacher, logits_sharding=mesh_lib.logits_sharding(
            mesh, teacher_layout, TEACHER.vocab_size))
        scenario_update = make_update(
            student, scenario_teacher, tx, optax.constant_schedule(0.5), LOSS, 1, VALID_VOCAB,
            logits_sharding=mesh_lib.logits_sharding(mesh, student_layout, STUDENT.vocab_size))

        traces = []
        counted_update = counting(scenario_update, traces)
        # The state is donated: its buffers are reused for the new state, so the parameters and
        # optimizer state are held once, not twice, across the step.
        jitted = jax.jit(counted_update,
                         in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                         out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                         donate_argnums=(0,))
        first_batch = jax.device_put(batches[0], batch_sharding)
        lowered = jitted.lower(state, sharded_teacher, first_batch)
        constraints = sorted({line.split("<@mesh, ", 1)[1].split(">", 1)[0]
                              for line in lowered.as_text().splitlines()
                              if "sharding_constraint" in line and "x64xf32>" in line})
        compiled = lowered.compile()
        hlo = compiled.as_text()
        losses = []
        for batch in batches:
            state, metrics = compiled(state, sharded_teacher, jax.device_put(batch, batch_sharding))
            losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
        momentum = state.opt_state[0].trace
        report["scenarios"][name] = {
            "mesh": dict(mesh.shape),
            "losses": losses,
            "traces": len(traces),
            "student_specs": {k: str(v.sharding.spec) for k, v in flat(state.params).items()},
            "student_shards": {k: list(v.addressable_shards[0].data.shape)
                               for k, v in flat(state.params).items()},
            "momentum_specs": {k: str(v.sharding.spec) for k, v in flat(momentum).items()},
            "teacher_specs": {k: str(v.sharding.spec) for k, v in flat(sharded_teacher).items()},
            "teacher_shards": {k: list(v.addressable_shards[0].data.shape)
                               for k, v in flat(sharded_teacher).items()},
            "step_spec": str(state.step.sharding.spec),
            "logits_constraints": constraints,
            "collectives": {op: op in hlo for op in ("all-gather", "reduce-scatter", "all-reduce")},
        }
        final_params.update({f"{name}/{k}": np.asarray(v) for k, v in flat(state.params).items()})
        if name == "fsdp":
            saved_on_fsdp = state

    report["elastic"] = elastic_restore(out_dir / "checkpoints", saved_on_fsdp, tx, update,
                                        teacher_params, next_batch)

    fsdp_mesh = mesh_lib.make_mesh(MeshConfig(fsdp=8))
    tensor_mesh = mesh_lib.make_mesh(MeshConfig(data=2, tensor=4))
    report["errors"] = {
        "mesh_product": error_of(lambda: mesh_lib.make_mesh(MeshConfig(data=3, fsdp=2))),
        "not_divisible": error_of(lambda: mesh_lib.param_shardings(
            {"w": ("vocab", "embed")}, "fsdp", fsdp_mesh,
            {"w": jax.ShapeDtypeStruct((64, 12), np.float32)})),
        "kv_heads_over_tensor": error_of(lambda: mesh_lib.param_shardings(
            student_axes, "tensor", tensor_mesh, student_params)),
        "batch": error_of(lambda: mesh_lib.batch_sharding(fsdp_mesh, 12)),
    }
    report["sharded_targets"] = sharded_targets(tensor_mesh)
    np.savez(out_dir / "params.npz", **final_params)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


def topk_and_sample(logits, keys, valid_vocab: int):
    return (sparse.topk_targets(logits, 8, temperature=1.0, valid_vocab=valid_vocab),
            sparse.sample_targets(logits, keys, 12, temperature=1.0, valid_vocab=valid_vocab))


def sharded_targets(mesh) -> dict:
    """Cache targets at a large vocabulary (the blocked top-k, the two-level sampler), computed on
    logits split over data (rows) x tensor (vocabulary), against the same on one device."""
    from jax.sharding import NamedSharding, PartitionSpec

    result = {}
    for vocab, valid in ((8192, 8192), (8200, 8197)):  # whole blocks; a short last block
        logits = 3.0 * np.random.default_rng(vocab).standard_normal((4, 6, vocab), np.float32)
        keys = sparse.row_keys(3, np.arange(4))
        both = functools.partial(topk_and_sample, valid_vocab=valid)
        alone = jax.jit(both)(logits, keys)
        split = jax.jit(both, in_shardings=(
            NamedSharding(mesh, PartitionSpec("data", None, "tensor")),
            NamedSharding(mesh, PartitionSpec("data"))))(logits, keys)
        result[str(vocab)] = {
            "topk_ids_equal": bool(np.array_equal(alone[0]["ids"], split[0]["ids"])),
            "sample_equal": all(np.array_equal(alone[1][key], split[1][key])
                                for key in ("ids", "counts")),
            "max_difference": max(float(np.max(np.abs(np.asarray(alone[i][key])
                                                      - np.asarray(split[i][key]))))
                                  for i, key in ((0, "logprobs"), (0, "tail"),
                                                 (1, "entropy"))),
        }
    return result


def elastic_restore(run_dir: Path, saved_state, tx, update, teacher_params, next_batch) -> dict:
    """Save the FSDP-over-8 state; restore it on other meshes and take the next step there."""
    from kd_jax import checkpoint

    checkpointer = checkpoint.Checkpointer(run_dir, keep=1)
    checkpointer.save(STEPS, saved_state, {
        "step": STEPS, "data_position": STEPS * BATCH,
        "rng": np.asarray(jax.device_get(saved_state.rng)).tolist()})
    checkpointer.wait()
    saved = {k: np.asarray(v) for k, v in flat(saved_state.params).items()}
    meshes = {  # name -> (mesh config, devices, student layout)
        "data_parallel_4": (MeshConfig(data=4), jax.devices()[:4], "replicated"),
        "fsdp_tensor_8": (MeshConfig(data=2, fsdp=2, tensor=2), jax.devices(), "fsdp_tensor"),
    }
    student_axes = logical_axes(abstract_model(STUDENT)[0].template)
    results = {}
    for name, (mesh_cfg, devices, layout) in meshes.items():
        mesh = mesh_lib.make_mesh(mesh_cfg, devices)
        abstract = jax.eval_shape(lambda s: s, saved_state)
        params_shardings = mesh_lib.param_shardings(student_axes, layout, mesh, abstract.params)
        shardings = mesh_lib.tree_shardings(abstract, abstract.params, params_shardings, mesh)
        state, meta = checkpointer.restore(STEPS, abstract, shardings)
        restored = {k: np.asarray(v) for k, v in flat(state.params).items()}
        teacher = jax.device_put(teacher_params, mesh_lib.replicated(mesh))
        batch = jax.device_put(next_batch, mesh_lib.batch_sharding(mesh, BATCH))
        _, metrics = jax.jit(update)(state, teacher, batch)
        results[name] = {
            "identical": all(np.array_equal(restored[k], saved[k]) for k in saved),
            "keys": len(saved),
            "devices": len(state.params["head"].sharding.device_set),
            "head_spec": str(state.params["head"].sharding.spec),
            "step": int(state.step), "data_position": meta["data_position"],
            "next_loss": float(metrics["loss_sum"] / metrics["tokens"]),
        }
    checkpointer.close()
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]))
