"""The multi-device half of tests/models/test_generate.py, run there in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/models/generate_sharded_worker.py OUT

The tiny student of tests/helpers.py with the test's random weights decodes the test's prompts
on a mesh of data 2 x fsdp 2 x tensor 2: its parameters in the fsdp_tensor layout, the prompts
split over data x fsdp, the key/value cache placed as `kd-jax generate` places it (batch over
data x fsdp, kv heads over tensor). OUT/report.json holds the new tokens, greedy and sampled,
which the test compares with one device's, and the cache's shape on each device in the
compiled program. The weights and prompts are made here, with numpy, for both processes.

Then an on-policy training step (`kd_jax.train.onpolicy`: half of 8 rows answered by the
student, sampled, scored by the tiny teacher) on that mesh, placed as `kd-jax distill` places
it, and on one device: OUT/report.json holds both steps' metrics.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: `tests` and `kd_jax`
from kd_jax.config import LossConfig, MeshConfig, OnPolicyConfig  # noqa: E402
from kd_jax.models.generate import Sampling, left_pad, make_sampler, row_keys  # noqa: E402
from kd_jax.models.pure import abstract_model, logical_axes  # noqa: E402
from kd_jax.parallel import mesh as mesh_lib  # noqa: E402
from kd_jax.parallel.mesh import kv_cache_sharding  # noqa: E402
from tests.helpers import STUDENT, TEACHER, VALID_VOCAB, make_batch  # noqa: E402

MAX_NEW = 12
PROMPT_LENGTHS = (5, 2, 7, 1)  # 4 rows: one per data x fsdp device
NO_STOP = np.array([-1, -1], np.int32)
SAMPLINGS = {"greedy": Sampling(), "sampled": Sampling(1.0, 0, 1.0)}


def random_params(cfg, seed: int):
    """Every weight N(0, 0.3^2), every norm scale 1 + N(0, 0.2^2): numpy, no compilation."""
    model, abstract = abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def leaf(path, shape_dtype):
        noise = rng.standard_normal(shape_dtype.shape).astype(np.float32)
        return 1 + 0.2 * noise if str(path[-1].key).endswith("norm") else 0.3 * noise

    return model, jax.tree_util.tree_map_with_path(leaf, abstract)


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, VALID_VOCAB, n)) for n in PROMPT_LENGTHS]


def main(out: Path) -> None:
    model, params = random_params(STUDENT, seed=7)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = mesh_lib.rules_for("fsdp_tensor")
    shardings = mesh_lib.param_shardings(logical_axes(model.template), rules, mesh, params)
    batch = mesh_lib.batch_sharding(mesh, len(PROMPT_LENGTHS))
    placed_cache = kv_cache_sharding(mesh, rules, STUDENT.n_kv_heads)
    sample = make_sampler(STUDENT, MAX_NEW, VALID_VOCAB, cache_sharding=placed_cache,
                          activation_sharding=NamedSharding(mesh, PartitionSpec(
                              mesh_lib.BATCH_AXES)))
    tokens, lengths = left_pad(make_prompts())
    args = [jax.device_put(params, shardings), jax.device_put(tokens, batch),
            jax.device_put(lengths, batch),
            jax.device_put(row_keys(0, np.arange(len(tokens))), batch)]
    report = {"devices": jax.device_count(), "cache_spec": str(placed_cache.spec)}
    for name, sampling in SAMPLINGS.items():
        report[name] = np.asarray(sample(*args, sampling, NO_STOP).tokens_bn).tolist()
    report["compilations"] = sample.compiled._cache_size()
    # One device's share of the cache [layers, batch, slots, kv_heads, head_dim]: a row of the
    # batch (split 4 ways) and one kv head (split 2 ways).
    compiled = sample.compiled.lower(*args, Sampling(np.float32(0), np.int32(0), np.float32(1)),
                                     NO_STOP).compile().as_text()
    slots = tokens.shape[1] + MAX_NEW
    per_device = f"f32[{STUDENT.n_layers},1,{slots},1,{STUDENT.resolved_head_dim}]"
    report["cache_per_device"] = per_device if per_device in compiled else None
    report["onpolicy_mesh"] = onpolicy_step(mesh, rules)
    report["onpolicy_one"] = onpolicy_step(None, rules)
    (out / "report.json").write_text(json.dumps(report))


def onpolicy_step(mesh, rules) -> dict[str, float]:
    """The metrics of one on-policy step with JSD, on `mesh` (None: one device)."""
    import optax

    from kd_jax.teacher.online import OnlineTeacher
    from kd_jax.train.onpolicy import OnPolicy
    from kd_jax.train.step import init_state, make_update

    student, student_params = random_params(STUDENT, seed=7)
    teacher, teacher_params = random_params(TEACHER, seed=8)
    batch = make_batch(9, seq=24)
    placed = {}
    if mesh is not None:
        placed = {"cache_sharding": kv_cache_sharding(mesh, rules, STUDENT.n_kv_heads),
                  "activation_sharding": NamedSharding(mesh, PartitionSpec(
                      mesh_lib.BATCH_AXES))}
    policy = OnPolicy.of(OnPolicyConfig(fraction=0.5, prompt_tokens=5, max_new_tokens=10),
                         STUDENT, 8, 24, VALID_VOCAB, np.array([-1], np.int32), **placed)
    loss = LossConfig(divergence="jsd", beta=0.5, temperature=1.0)
    update = jax.jit(make_update(student, OnlineTeacher(teacher), optax.adamw(1e-2),
                                 optax.constant_schedule(1e-2), loss, 1, VALID_VOCAB,
                                 onpolicy=policy))
    state = init_state(student_params, optax.adamw(1e-2), seed=5)
    if mesh is not None:
        state = state.replace(params=jax.device_put(state.params, mesh_lib.param_shardings(
            logical_axes(student.template), rules, mesh, student_params)))
        teacher_params = jax.device_put(teacher_params, mesh_lib.param_shardings(
            logical_axes(teacher.template), rules, mesh, teacher_params))
        batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh, 8))
    _, metrics = update(state, teacher_params, batch)
    return {key: float(value) for key, value in metrics.items()}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
