"""Mesh construction, the layout tables, and the fused step sharded over 8 CPU devices.

The multi-device checks run once, in a subprocess (tests/parallel/sharding_worker.py) that starts
JAX with 8 host-platform devices; the flag never reaches this process or the other tests.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from kd_jax import config as config_lib
from kd_jax.config import ConfigError, MeshConfig, MeshLayout, ModelConfig, choices
from kd_jax.models.pure import abstract_model, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from tests.helpers import ATOL_FRACTION, RTOL, cli_env

SCENARIOS = ("data_parallel", "fsdp", "fsdp_tensor", "teacher_fsdp", "teacher_tensor")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "sharding_worker.py"), str(out)],
        # It compares sharded steps with one device's, both compiled in it.
        env=cli_env(8, fast_compile=True), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    with np.load(out / "params.npz") as params:
        return report, {key: params[key] for key in params.files}


def test_mesh_sizes_resolve_the_remaining_devices():
    assert mesh_lib.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_lib.mesh_shape(MeshConfig(fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"8 is not divisible by 3"):
        mesh_lib.mesh_shape(MeshConfig(fsdp=3), 8)


def test_mesh_product_must_be_the_device_count():
    with pytest.raises(ConfigError, match=r"mesh.data=2, mesh.fsdp=1, mesh.tensor=1 has 2 "
                                          r"devices, but there are 1"):
        mesh_lib.make_mesh(MeshConfig(data=2), devices=jax.devices()[:1])
    mesh = mesh_lib.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("override, message", [
    ("mesh.student_layout=fsdp_tensr", "mesh.student_layout: 'fsdp_tensr' is not one of"),
    ("mesh.teacher_layout=sharded", "mesh.teacher_layout: 'sharded' is not one of"),
    ("mesh.fsdp=0", "mesh.fsdp must be >= 1 or -1"),
    ("mesh.tensor=-1", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
])
def test_bad_mesh_config_is_refused(override, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, [override])
    assert message in str(err.value)


def test_layout_names_match_the_config():
    assert tuple(mesh_lib.LAYOUTS) == choices(MeshLayout)
    cfg = config_lib.load(None, ["mesh.fsdp=4", "mesh.teacher_layout=fsdp"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.teacher_layout) == (-1, 4, "fsdp")


def test_every_model_axis_has_a_rule():
    student, _ = abstract_model(ModelConfig(tie_embeddings=False))
    axes = logical_axes(student.template)
    names = {name for leaf in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
             for name in leaf}
    assert names <= set(mesh_lib.LOGICAL_AXES)


def test_a_spec_names_each_mesh_axis_once():
    mesh = mesh_lib.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    # On one device every axis has size 1, so nothing is split: every spec is empty.
    assert mesh_lib.partition_spec(("vocab", "embed"), (64, 32), "fsdp_tensor", mesh) == (
        jax.sharding.PartitionSpec())
    with pytest.raises(ConfigError, match="unknown mesh layout 'zero3'"):
        mesh_lib.partition_spec(("embed",), (32,), "zero3", mesh)


def test_multi_device_errors_name_the_numbers(worker):
    report, _ = worker
    errors = report["errors"]
    assert errors["mesh_product"] == (
        "mesh mesh.data=3, mesh.fsdp=2, mesh.tensor=1 has 6 devices, but there are 8")
    assert errors["not_divisible"] == (
        "w: dimension 1 ('embed', size 12) is not divisible by mesh axis 'fsdp' (size 8)")
    assert "layers/wk: dimension 2 ('kv_heads', size 2)" in errors["kv_heads_over_tensor"]
    assert "'tensor' (size 4)" in errors["kv_heads_over_tensor"]
    assert errors["batch"] == (
        "train.batch_size (12) is not divisible by mesh data x fsdp (1 x 8 = 8)")


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_step_matches_one_device(worker, name):
    report, params = worker
    assert report["devices"] == 8 and report["reference"]["devices"] == [0]
    scenario = report["scenarios"][name]
    np.testing.assert_allclose(scenario["losses"], report["reference"]["losses"], rtol=RTOL)
    assert scenario["traces"] == 1, "three steps, one trace"
    keys = [k.split("/", 1)[1] for k in params if k.startswith("reference/")]
    assert len(keys) == 12
    for key in keys:
        expected, actual = params[f"reference/{key}"], params[f"{name}/{key}"]
        np.testing.assert_allclose(actual, expected, rtol=RTOL,
                                   atol=ATOL_FRACTION * np.abs(expected).max(), err_msg=key)


def test_logits_carry_sharding_constraints(worker):
    scenarios = worker[0]["scenarios"]
    batch_only = '[{"data", "fsdp"}, {}, {}]'
    vocab_over_tensor = '[{"data", "fsdp"}, {}, {"tensor"}]'
    assert scenarios["data_parallel"]["logits_constraints"] == [batch_only]
    # A replicated student beside a tensor-parallel teacher: each model's logits as it lies.
    assert scenarios["teacher_tensor"]["logits_constraints"] == sorted(
        [batch_only, vocab_over_tensor])
    assert scenarios["fsdp_tensor"]["logits_constraints"] == [vocab_over_tensor]


def test_a_checkpoint_from_one_mesh_restores_on_another_and_trains_on(worker):
    report = worker[0]
    elastic = report["elastic"]
    assert set(elastic) == {"data_parallel_4", "fsdp_tensor_8"}
    for name, result in elastic.items():
        assert result["identical"] and result["keys"] == 12, name
        assert result["step"] == 3 and result["data_position"] == 24
        # The next step on the new mesh continues the one-device run.
        assert result["next_loss"] == pytest.approx(report["reference"]["next_loss"], rel=RTOL)
    assert elastic["data_parallel_4"]["devices"] == 4
    assert elastic["data_parallel_4"]["head_spec"] == "P()"
    assert elastic["fsdp_tensor_8"]["head_spec"] == "P('tensor', 'fsdp')"


def test_cache_targets_on_a_vocabulary_split_over_devices(worker):
    # The blocked top-k and the two-level sampler on logits split over 2 x 4 devices (rows x
    # vocabulary) select and draw what one device does.
    results = worker[0]["sharded_targets"]
    assert set(results) == {"8192", "8200"}
    for result in results.values():
        assert result["topk_ids_equal"] and result["sample_equal"]
        assert result["max_difference"] <= 1e-5


def test_rules_change_a_layout_and_refuse_unknown_names():
    rules = mesh_lib.rules_for("fsdp", {"vocab": "tensor", "embed": None})
    assert rules["vocab"] == "tensor" and rules["embed"] is None and rules["mlp"] is None
    assert mesh_lib.LAYOUTS["fsdp"]["embed"] == "fsdp"  # the table itself is untouched
    with pytest.raises(ConfigError, match=r"mesh.teacher_rules: unknown logical axis 'mpl' "
                                          r"\(did you mean 'mlp'\?\)"):
        mesh_lib.rules_for("fsdp", {"mpl": "tensor"}, "mesh.teacher_rules")
    with pytest.raises(ConfigError, match="'embed' is mapped to 'model', which is not a mesh"):
        mesh_lib.rules_for("replicated", {"embed": "model"})


def test_data_parallel_replicates_and_all_reduces(worker):
    scenario = worker[0]["scenarios"]["data_parallel"]
    assert scenario["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert set(scenario["student_specs"].values()) == {"P()"}
    assert scenario["student_shards"]["layers/wq"] == [2, 32, 4, 8]  # the whole array
    assert scenario["collectives"]["all-reduce"]


def test_fsdp_splits_embed_and_gathers(worker):
    scenario = worker[0]["scenarios"]["fsdp"]
    assert scenario["student_specs"]["layers/wq"] == "P(None, 'fsdp')"
    assert scenario["student_shards"]["layers/wq"] == [2, 32 // 8, 4, 8]
    assert scenario["student_specs"]["embedding"] == "P(None, 'fsdp')"
    assert scenario["student_shards"]["embedding"] == [64, 32 // 8]
    assert scenario["student_specs"]["layers/w_down"] == "P(None, None, 'fsdp')"
    assert scenario["student_specs"]["final_norm"] == "P()"
    # The optimizer state lies like the weights; counters and scalars are replicated.
    assert scenario["momentum_specs"] == scenario["student_specs"]
    assert scenario["step_spec"] == "P()"
    assert scenario["teacher_shards"]["embedding"] == [64, 48 // 8]
    collectives = scenario["collectives"]
    assert collectives["all-gather"] or collectives["reduce-scatter"]


def test_fsdp_tensor_splits_two_ways(worker):
    scenario = worker[0]["scenarios"]["fsdp_tensor"]
    specs, shards = scenario["student_specs"], scenario["student_shards"]
    assert specs["layers/wq"] == "P(None, 'fsdp', 'tensor')"
    assert shards["layers/wq"] == [2, 32 // 2, 4 // 2, 8]
    assert specs["layers/wo"] == "P(None, 'tensor', None, 'fsdp')"
    assert specs["head"] == "P('tensor', 'fsdp')"
    assert shards["head"] == [64 // 2, 32 // 2]
    assert specs["layers/w_up"] == "P(None, 'fsdp', 'tensor')"
    assert scenario["momentum_specs"] == specs
    assert scenario["collectives"]["all-gather"] or scenario["collectives"]["reduce-scatter"]


def test_fsdp_teacher_beside_a_replicated_student(worker):
    scenario = worker[0]["scenarios"]["teacher_fsdp"]
    assert scenario["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert set(scenario["student_specs"].values()) == {"P()"}
    assert scenario["teacher_specs"]["embedding"] == "P(None, 'fsdp')"
    assert scenario["teacher_shards"]["embedding"] == [64, 48 // 4]
    assert scenario["teacher_shards"]["layers/w_gate"] == [2, 48 // 4, 96]
    assert scenario["collectives"]["all-gather"]  # the teacher's weights, gathered for use
    assert scenario["collectives"]["all-reduce"]  # the student's gradients


def test_tensor_parallel_teacher_over_four_devices(worker):
    scenario = worker[0]["scenarios"]["teacher_tensor"]
    assert scenario["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    specs, shards = scenario["teacher_specs"], scenario["teacher_shards"]
    assert specs["layers/wq"] == "P(None, None, 'tensor')"
    assert shards["layers/wq"] == [2, 48, 4 // 4, 12]
    assert specs["layers/w_down"] == "P(None, 'tensor')"
    assert shards["layers/w_down"] == [2, 96 // 4, 48]
    assert specs["embedding"] == "P('tensor',)"
    assert shards["embedding"] == [64 // 4, 48]
    assert set(scenario["student_specs"].values()) == {"P()"}
