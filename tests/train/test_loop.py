"""The training loop through the CLI: kill -9 and resume, SIGTERM, a run moved between meshes,
stop_at then rerun."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax.run_dir import read_run
from tests.helpers import MESH, cli_env, distill_config, losses_by_step, run_cli, write_config


def test_kill_and_resume_matches_an_uninterrupted_run(teacher_run, tmp_path):
    root, corpus = teacher_run
    extra = f"""
teacher:
  source: checkpoint
  path: {root / 'teacher'}
"""
    steps = ["train.steps=40", "train.checkpoint_every=4", "train.keep_checkpoints=3"]
    whole = write_config(tmp_path / "whole.yaml", corpus, tmp_path / "whole", extra)
    assert cli.main(["distill", str(whole), *steps]) == 0
    expected = losses_by_step(tmp_path / "whole")

    killed = write_config(tmp_path / "killed.yaml", corpus, tmp_path / "killed", extra)
    process = run_cli(["distill", str(killed), *steps])
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300  # generous: the machine may be shared
    while time.time() < deadline and process.poll() is None:
        finished = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if (
            checkpoints.is_dir()) else []
        if finished and max(finished) >= 8:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()

    resumed_from = checkpoint.latest_step(tmp_path / "killed")
    assert resumed_from is not None and resumed_from < 40, "the kill must land mid-run"

    result = subprocess.run([sys.executable, "-m", "kd_jax.cli", "distill", str(killed),
                             *steps], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoint {resumed_from}: first step {resumed_from + 1}" in (
        result.stdout + result.stderr)
    got = losses_by_step(tmp_path / "killed")
    assert sorted(got) == sorted(expected)
    for step in range(resumed_from + 1, 41):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    # Each step once (the killed run's records past the checkpoint were dropped), strict JSON.
    records = [json.loads(line, parse_constant=_refuse) for line in
               (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert steps == sorted(set(steps)) == sorted(expected)
    # And the weights it ends with are the uninterrupted run's, bit for bit.
    whole_params, killed_params = (_final_params(tmp_path / name) for name in ("whole", "killed"))
    assert whole_params.keys() == killed_params.keys()
    for key, value in whole_params.items():
        np.testing.assert_array_equal(killed_params[key], value, err_msg=key)


def _final_params(run_dir):
    import jax

    from kd_jax.models.pure import abstract_model
    from kd_jax.run_dir import read_run

    cfg, _ = read_run(run_dir)
    params = checkpoint.restore_params(run_dir, abstract_model(cfg.model)[1])
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _refuse(constant):
    raise AssertionError(f"{constant} is not strict JSON")


def test_sigterm_checkpoints_the_current_step_and_exits_143(teacher_run, tmp_path):
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    process = run_cli(["train", str(config), "train.steps=400", "train.checkpoint_every=1000"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300  # generous: the machine may be shared
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 143, output
    line = next(x for x in output.splitlines() if "preempted after step" in x)
    step = int(line.split("preempted after step ")[1].split(":")[0])

    assert checkpoint.latest_step(tmp_path / "run") == step < 400
    assert "\r" not in output  # stderr is not a terminal: no progress bar redrawn in place


def test_a_signal_during_start_up_stops_before_the_first_step(teacher_run, tmp_path):
    """Ctrl-C while the step compiles: handled, nothing trained or saved, exit 130."""
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    # Without the suite's compilation cache the step takes seconds to compile after run.json is
    # written: the signal lands during start-up, not after a step.
    process = run_cli(["train", str(config)],
                      env={**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"})
    deadline = time.time() + 300
    while not (tmp_path / "run" / "run.json").is_file():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    assert output.strip().splitlines()[-1] == ("kd-jax: stopped before step 1: nothing new to "
                                               "save; rerun to continue")
    assert checkpoint.latest_step(tmp_path / "run") is None


def test_distill_on_an_8_device_mesh_matches_one_device_and_resumes_on_another(
        teacher_run, tmp_path, capsys):
    root, corpus = teacher_run
    # With a hard-label term the loss is O(1): a near-zero KL alone would compare cancellation
    # noise, not the sharding.
    config = distill_config(tmp_path / "d.yaml", corpus, root / "teacher", tmp_path / "one")
    assert cli.main(["distill", str(config)]) == 0
    expected = losses_by_step(tmp_path / "one")

    # 8 host-platform CPU devices, in a subprocess: data=2 x fsdp=2 x tensor=2, the student
    # FSDP- and tensor-sharded, the teacher FSDP-sharded; stop after step 3 (a checkpoint), then
    # finish on this process's one device.
    result = subprocess.run([sys.executable, "-m", "kd_jax.cli", "distill", str(config), *MESH,
                             f"train.run_dir={tmp_path / 'mesh'}", "train.stop_at=3"],
                            env=cli_env(8, fast_compile=True), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # `kd-jax eval` of the 8-device checkpoint here: the run's mesh does not fit one device, so
    # it is evaluated data-parallel over this one.
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "mesh")]) == 0
    assert "needs other devices than the 1 here" in capsys.readouterr().out
    report = json.loads((tmp_path / "mesh" / "report.json").read_text())
    assert report["steps"] == 3 and 0 < report["student"]["bits_per_byte"] < 20
    assert cli.main(["distill", str(config), f"train.run_dir={tmp_path / 'mesh'}"]) == 0
    got = losses_by_step(tmp_path / "mesh")
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def test_stop_at_then_rerun_finishes(teacher_run, tmp_path):
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    assert cli.main(["train", str(config), "train.stop_at=3"]) == 0
    assert not (tmp_path / "run" / "report.json").exists()
    assert cli.main(["train", str(config)]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 6


def test_a_non_finite_step_stops_the_run_or_is_skipped(teacher_run, tmp_path, capsys):
    """A learning rate of 1e30 without clipping: the second step's gradients overflow. `stop`
    names the step and the parameter; `skip` trains on and counts the steps it skipped."""
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "stop")
    diverge = ["optimizer.lr=1e30", "optimizer.clip_norm=0", "optimizer.warmup_steps=0"]
    capsys.readouterr()
    assert cli.main(["train", str(config), *diverge]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "kd-jax: error: non-finite gradient of embedding at step 2: the update was not "
        "applied; stopped, no checkpoint saved (train.on_nonfinite=skip skips such steps "
        "instead)")
    # It saved no checkpoint: the same directory takes the corrected config, from step 1,
    # and keeps none of the stopped attempt's metrics.
    assert cli.main(["train", str(config)]) == 0
    losses = losses_by_step(tmp_path / "stop")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(map(np.isfinite, losses.values()))
    assert read_run(tmp_path / "stop")[0].optimizer.lr == 1e-3
    # One that saved a checkpoint refuses another config, as before.
    capsys.readouterr()
    assert cli.main(["train", str(config), "optimizer.lr=2e-3"]) == 2
    assert "was started with optimizer.lr=0.001" in capsys.readouterr().err
    assert cli.main(["train", str(config), *diverge, "train.on_nonfinite=skip",
                     f"train.run_dir={tmp_path / 'skip'}"]) == 0
    records = [json.loads(line) for line in
               (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in records if "skipped" in r}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}


def test_a_qlora_run_resumed_is_the_uninterrupted_run_bit_for_bit(teacher_run, tmp_path):
    """LoRA on an int4 base with adapter dropout, from the teacher's layers: stopped at step 3
    and rerun, its losses and weights are the uninterrupted run's; its checkpoints hold the
    adapters, the frozen base lies once in base/, and it is the teacher's weights, unchanged."""

    root, corpus = teacher_run
    extra = """
model:
  init: teacher
  quantize: int4
  quantize_group: 16
  lora_rank: 4
  lora_dropout: 0.1
"""
    whole = distill_config(tmp_path / "whole.yaml", corpus, root / "teacher",
                           tmp_path / "whole", extra)
    assert cli.main(["distill", str(whole)]) == 0
    stopped = distill_config(tmp_path / "stopped.yaml", corpus, root / "teacher",
                             tmp_path / "stopped", extra)
    assert cli.main(["distill", str(stopped), "train.stop_at=3"]) == 0
    assert cli.main(["distill", str(stopped)]) == 0
    assert losses_by_step(tmp_path / "stopped") == losses_by_step(tmp_path / "whole")
    whole_params, stopped_params = (_final_params(tmp_path / name)
                                    for name in ("whole", "stopped"))
    assert whole_params.keys() == stopped_params.keys()
    for key, value in whole_params.items():
        np.testing.assert_array_equal(stopped_params[key], value, err_msg=key)

    for step in (3, 6):
        saved = (tmp_path / "stopped" / "checkpoints" / str(step) / "params" / "_METADATA")
        assert "a_wq" in saved.read_text() and "embedding" not in saved.read_text()
    assert "embedding" in (tmp_path / "stopped" / "base" / "0" / "params" / "_METADATA"
                           ).read_text()
    teacher = _final_params(root / "teacher")
    adapters = {key for key in whole_params if key.startswith("['lora']")}
    assert adapters and set(whole_params) - adapters == set(teacher)
    for key, value in teacher.items():
        np.testing.assert_array_equal(whole_params[key], value, err_msg=key)
    assert any(np.any(whole_params[key]) for key in adapters if "'b_" in key)
