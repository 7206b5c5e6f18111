"""A distill run with white-box losses (kd_jax.losses.whitebox) end to end: it trains, its
checkpoints hold the projections and a resumed run restores them, and export writes the student
alone; a run without them checkpoints what it always did."""

import json

import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file

from kd_jax import checkpoint, cli
from kd_jax import config as config_lib
from kd_jax.train import builder
from tests.helpers import distill_config

# A narrower student than the teacher (32 wide, 4 heads): a random projection, 2 head groups.
WHITEBOX = ["loss.hidden_weight=0.5", "loss.hidden_kind=cosine", "loss.attention_weight=0.5",
            "model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=32",
            "train.steps=4", "train.checkpoint_every=2", "train.microbatches=1"]


def test_a_whitebox_run_trains_resumes_with_its_projection_and_exports_the_student(
        teacher_run, tmp_path):
    root, corpus = teacher_run
    run_dir = tmp_path / "run"
    config = distill_config(tmp_path / "d.yaml", corpus, root / "teacher", run_dir)
    assert cli.main(["distill", str(config), *WHITEBOX, "train.stop_at=2"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite([r["loss"], r["hidden"], r["attention"]]).all() for r in records)

    # The checkpoint holds the projections; resuming restores exactly what was saved (and
    # trained: not the initial map).
    saved = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "2" / "aux")
    built = builder.build(config_lib.load(config, WHITEBOX), "distill")
    checkpointer = checkpoint.Checkpointer(run_dir, 2)
    try:
        state, start = builder.restore_or_init(built, checkpointer)
    finally:
        checkpointer.close()
    assert start == 2 and state.aux["projection"].shape == (2, 16, 32)
    np.testing.assert_array_equal(np.asarray(state.aux["projection"]), saved["projection"])
    assert not np.array_equal(saved["projection"], np.asarray(built.init_aux()["projection"]))

    # The run resumed by the loop trains on from it (step 3, checkpointed with its projection).
    assert cli.main(["distill", str(config), *WHITEBOX, "train.stop_at=3"]) == 0
    assert checkpoint.latest_step(run_dir) == 3
    assert (run_dir / "checkpoints" / "3" / "aux").is_dir()
    assert cli.main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    exported = [load_file(path) for path in (tmp_path / "out").glob("*.safetensors")]
    student_params = json.loads((run_dir / "run.json").read_text())["student_params"]
    assert sum(t.size for tensors in exported for t in tensors.values()) == student_params
    # A run without white-box losses: the checkpoint items it always had.
    assert sorted(p.name for p in (root / "teacher" / "checkpoints" / "6").iterdir()
                  if p.is_dir()) == ["meta", "opt_state", "params"]
