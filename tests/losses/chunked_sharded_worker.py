"""The multi-device half of tests/losses/test_chunked.py, run there in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/losses/chunked_sharded_worker.py OUT

With the vocabulary of both models split over the `tensor` mesh axis (2 and 4 of 8 devices, the
rest data-parallel), the chunked loss's value and gradients must equal the unchunked path's on
the same mesh and on one device. Writes OUT/report.json: per tensor size, where the student's
head and the logits lie, and the largest relative differences.
"""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: `tests` and `kd_jax`
from kd_jax.config import MeshConfig  # noqa: E402
from kd_jax.models.pure import init_model, logical_axes  # noqa: E402
from kd_jax.parallel import mesh as mesh_lib  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train.step import make_loss_fn  # noqa: E402
from tests.helpers import (  # noqa: E402
    LOSS,
    RTOL,
    STUDENT,
    TEACHER,
    VALID_VOCAB,
    assert_trees_close,
    make_batch,
)

RULES = {"vocab": "tensor"}  # only the vocabulary is split: what the chunked softmax must handle


def grads(loss_cfg, student, teacher_model, student_params, teacher_params, batch,
          mesh=None):
    student_sharding = teacher_sharding = None
    if mesh is not None:
        rules = mesh_lib.rules_for("replicated", RULES)
        student_sharding = mesh_lib.logits_sharding(mesh, rules, STUDENT.vocab_size)
        teacher_sharding = mesh_lib.logits_sharding(mesh, rules, TEACHER.vocab_size)
    loss_fn = make_loss_fn(student, OnlineTeacher(teacher_model, teacher_sharding), loss_cfg,
                           VALID_VOCAB, student_sharding)
    n_valid = np.float32(batch["loss_mask"].sum())
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        student_params, teacher_params, batch, n_valid)


def place(tree, model, mesh):
    rules = mesh_lib.rules_for("replicated", RULES)
    shardings = mesh_lib.param_shardings(logical_axes(model.template), rules, mesh, tree)
    return jax.tree.map(jax.device_put, tree, shardings)


def main(out_dir: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    student, student_params = init_model(STUDENT)
    teacher, teacher_params = init_model(TEACHER)
    batch = make_batch(5)
    chunked_cfg = dataclasses.replace(LOSS, chunk_tokens=8 * 3)
    unchunked_cfg = dataclasses.replace(LOSS, chunk_tokens=-1)
    (one_loss, _), one_grads = grads(unchunked_cfg, student, teacher, student_params,
                                     teacher_params, batch)
    report = {}
    for tensor in (2, 4):
        mesh = mesh_lib.make_mesh(MeshConfig(data=8 // tensor, tensor=tensor))
        placed_student = place(student_params, student, mesh)
        placed_teacher = place(teacher_params, teacher, mesh)
        placed_batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
        results = {name: grads(cfg, student, teacher, placed_student, placed_teacher,
                               placed_batch, mesh)
                   for name, cfg in (("chunked", chunked_cfg), ("unchunked", unchunked_cfg))}
        for name, ((loss, _), gradients) in results.items():
            np.testing.assert_allclose(loss, one_loss, rtol=RTOL, err_msg=name)
            assert_trees_close(gradients, one_grads, atol_fraction=RTOL)
        head_grad = results["chunked"][1]["head"]
        report[str(tensor)] = {
            "head_spec": [str(axis) for axis in placed_student["head"].sharding.spec],
            "head_grad_spec": [str(axis) for axis in head_grad.sharding.spec],
            "loss": float(results["chunked"][0][0]),
            "max_relative_difference": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))
                for a, b in zip(jax.tree.leaves(results["chunked"][1]),
                                jax.tree.leaves(one_grads))),
        }
    report["one_device_loss"] = float(one_loss)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
