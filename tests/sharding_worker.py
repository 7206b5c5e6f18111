"""The multi-device half of tests/test_sharding.py, run there in a subprocess.

It needs 8 host-platform CPU devices, and the XLA flag that makes them must be set before JAX
starts and must not reach the other tests, so it runs as its own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR

It trains the tiny student of tests/test_step.py for a few SGD steps on each mesh layout and once
unsharded on device 0, and writes what the test asserts on: OUT_DIR/report.json (losses, specs,
shard shapes, collectives in the compiled HLO, errors) and OUT_DIR/params.npz (final parameters).
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
from test_step import LOSS, STUDENT, TEACHER, VALID_VOCAB, make_batch  # noqa: E402

from kd_jax import model, sharding  # noqa: E402
from kd_jax import step as step_lib  # noqa: E402
from kd_jax.config import ConfigError, MeshConfig  # noqa: E402

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


def error_of(fn) -> str:
    try:
        fn()
    except ConfigError as err:
        return str(err)
    return ""


def main(out_dir: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    student, student_params = step_lib.init_model(STUDENT)
    teacher, teacher_params = step_lib.init_model(TEACHER)
    student_axes = model.logical_axes(student.template)
    teacher_axes = model.logical_axes(teacher.template)
    # Momentum, so there is an optimizer state shaped like the parameters to shard.
    tx = optax.sgd(0.5, momentum=0.9)
    update = step_lib.make_update(student, teacher, tx, optax.constant_schedule(0.5), LOSS, 1,
                                  VALID_VOCAB)
    batches = [make_batch(seed, batch=BATCH) for seed in range(STEPS)]
    report: dict = {"devices": jax.device_count(), "scenarios": {}}
    final_params: dict[str, np.ndarray] = {}

    # Reference: one device, no shardings anywhere.
    state = step_lib.init_state(student_params, tx, seed=0)
    reference_update = jax.jit(update)
    losses = []
    for batch in batches:
        state, metrics = reference_update(state, teacher_params, batch)
        losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
    report["reference"] = {"losses": losses,
                           "devices": sorted({d.id for d in state.params["head"].devices()})}
    final_params.update({f"reference/{k}": np.asarray(v) for k, v in flat(state.params).items()})

    for name, (mesh_cfg, student_layout, teacher_layout) in SCENARIOS.items():
        mesh = sharding.make_mesh(mesh_cfg)
        student_shardings = sharding.param_shardings(
            student_axes, student_layout, mesh, student_params)
        teacher_shardings = sharding.param_shardings(
            teacher_axes, teacher_layout, mesh, teacher_params)
        # From host copies: a device_put may alias a buffer it already finds on a device, and the
        # donated state must not take the shared initial parameters with it.
        state = step_lib.init_state(jax.tree.map(np.asarray, student_params), tx, seed=0)
        state_shardings = sharding.tree_shardings(state, student_params, student_shardings, mesh)
        batch_sharding = sharding.batch_sharding(mesh, BATCH)
        state = jax.device_put(state, state_shardings)
        sharded_teacher = jax.device_put(teacher_params, teacher_shardings)

        traces = []

        def counted_update(state, teacher_params, batch):
            traces.append(1)
            return update(state, teacher_params, batch)

        # The state is donated: its buffers are reused for the new state, so the parameters and
        # optimizer state are held once, not twice, across the step.
        jitted = jax.jit(counted_update,
                         in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,))
        first_batch = jax.device_put(batches[0], batch_sharding)
        compiled = jitted.lower(state, sharded_teacher, first_batch).compile()
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
            "collectives": {op: op in hlo for op in ("all-gather", "reduce-scatter", "all-reduce")},
        }
        final_params.update({f"{name}/{k}": np.asarray(v) for k, v in flat(state.params).items()})

    fsdp_mesh = sharding.make_mesh(MeshConfig(fsdp=8))
    tensor_mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    report["errors"] = {
        "mesh_product": error_of(lambda: sharding.make_mesh(MeshConfig(data=3, fsdp=2))),
        "not_divisible": error_of(lambda: sharding.param_shardings(
            {"w": ("vocab", "embed")}, "fsdp", fsdp_mesh,
            {"w": jax.ShapeDtypeStruct((64, 12), np.float32)})),
        "kv_heads_over_tensor": error_of(lambda: sharding.param_shardings(
            student_axes, "tensor", tensor_mesh, student_params)),
        "batch": error_of(lambda: sharding.batch_sharding(fsdp_mesh, 12)),
    }
    np.savez(out_dir / "params.npz", **final_params)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
