"""End to end through the CLI: train -> distill -> eval, kill and resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from kd_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_MODEL = """
model:
  vocab_size: 256
  d_model: 32
  n_layers: 2
  n_heads: 4
  n_kv_heads: 2
  d_ff: 64
  max_seq_len: 64
"""


def write_corpus(path: Path) -> Path:
    """Real text that is always there: a few modules of the standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("this.py", "bisect.py", "heapq.py"))
    path.write_text(text)
    return path


def write_config(path: Path, corpus: Path, run_dir: Path, extra: str = "") -> Path:
    path.write_text(TINY_MODEL + f"""
data:
  source: text
  path: {corpus}
  tokenizer: byte
  seq_len: 32
  heldout_fraction: 0.1
train:
  run_dir: {run_dir}
  steps: 6
  batch_size: 8
  microbatches: 2
  log_every: 1
  checkpoint_every: 3
  eval_sequences: 8
  progress: false
optimizer:
  lr: 1e-3
  warmup_steps: 2
""" + extra)
    return path


def teacher_and_distill_config(root: Path, extra: str = "") -> tuple[Path, Path]:
    """Train the tiny teacher in root/teacher; (corpus, a distill config naming it, plus `extra`).

    The distill config has a hard-label term: with it the loss is O(1), so comparisons of
    losses compare the step, not the cancellation noise of a near-zero KL.
    """
    corpus = write_corpus(root / "corpus.txt")
    assert cli.main(["train", str(write_config(root / "teacher.yaml", corpus,
                                               root / "teacher"))]) == 0
    teacher = (f"teacher:\n  source: checkpoint\n  path: {root / 'teacher'}\n"
               "loss:\n  ce_weight: 1.0\n")
    return corpus, write_config(root / "distill.yaml", corpus, root / "unused", teacher + extra)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(root / "corpus.txt")
    config = write_config(root / "teacher.yaml", corpus, root / "teacher")
    assert cli.main(["train", str(config)]) == 0
    return root, corpus


def test_train_distill_eval(teacher_run, capsys):
    root, corpus = teacher_run
    teacher_dir = root / "teacher"
    assert (teacher_dir / "report.json").is_file()
    config = write_config(root / "distill.yaml", corpus, root / "student", f"""
teacher:
  source: checkpoint
  path: {teacher_dir}
loss:
  divergence: jsd
  beta: 0.5
  temperature: 2.0
  ce_weight: 0.5
""")
    # The student's embedding is padded past the tokenizer's 256 ids: those rows are masked.
    # The frozen teacher runs in bfloat16; the loss is still computed in float32.
    assert cli.main(["distill", str(config), "model.d_model=16", "model.n_heads=2",
                     "model.n_kv_heads=1", "model.vocab_size=320", "teacher.dtype=bfloat16"]) == 0
    report = json.loads((root / "student" / "report.json").read_text())
    assert report["mode"] == "distill" and report["steps"] == 6
    assert report["teacher"]["params"] > report["student"]["params"]
    for key in ("bits_per_byte", "accuracy", "agreement", "kl", "ece"):
        assert 0 <= report["student"][key] < 20, key
    capsys.readouterr()
    assert cli.main(["eval", str(root / "student")]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "bits/byte" in printed
    again = json.loads((root / "student" / "report.json").read_text())
    assert again["student"]["bits_per_byte"] == pytest.approx(report["student"]["bits_per_byte"],
                                                              rel=1e-5)


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kd_jax.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


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
    process = _run_cli(["distill", str(killed), *steps])
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        finished = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if (
            checkpoints.is_dir()) else []
        if finished and max(finished) >= 8:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    from kd_jax import checkpoint

    resumed_from = checkpoint.latest_step(tmp_path / "killed")
    assert resumed_from is not None and resumed_from < 40, "the kill must land mid-run"

    result = subprocess.run([sys.executable, "-m", "kd_jax.cli", "distill", str(killed),
                             *steps], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoint {resumed_from}: first step {resumed_from + 1}" in (
        result.stdout + result.stderr)
    got = losses_by_step(tmp_path / "killed")  # later lines win: the resumed run's values
    assert sorted(got) == sorted(expected)
    for step in range(resumed_from + 1, 41):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_sigterm_checkpoints_the_current_step_and_exits_143(teacher_run, tmp_path):
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    process = _run_cli(["train", str(config), "train.steps=400", "train.checkpoint_every=1000"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    line = next(x for x in output.splitlines() if "preempted after step" in x)
    step = int(line.split("preempted after step ")[1].split(":")[0])
    from kd_jax import checkpoint

    assert checkpoint.latest_step(tmp_path / "run") == step < 400


def test_distill_on_an_8_device_mesh_matches_one_device_and_resumes_on_another(teacher_run,
                                                                                tmp_path):
    root, corpus = teacher_run
    # With a hard-label term the loss is O(1): a near-zero KL alone would compare cancellation
    # noise, not the sharding.
    extra = (f"teacher:\n  source: checkpoint\n  path: {root / 'teacher'}\n"
             "loss:\n  ce_weight: 1.0\n")
    config = write_config(tmp_path / "d.yaml", corpus, tmp_path / "one", extra)
    assert cli.main(["distill", str(config)]) == 0
    expected = losses_by_step(tmp_path / "one")

    # 8 host-platform CPU devices, in a subprocess: data=2 x fsdp=2 x tensor=2, the student
    # FSDP- and tensor-sharded, the teacher FSDP-sharded; stop after step 3 (a checkpoint), then
    # finish on this process's one device.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.student_layout=fsdp_tensor",
            "mesh.teacher_layout=fsdp", f"train.run_dir={tmp_path / 'mesh'}"]
    result = subprocess.run([sys.executable, "-m", "kd_jax.cli", "distill", str(config), *mesh,
                             "train.stop_at=3"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert cli.main(["distill", str(config), f"train.run_dir={tmp_path / 'mesh'}"]) == 0
    got = losses_by_step(tmp_path / "mesh")
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*")}


@pytest.mark.parametrize("case", [
    "missing_teacher", "teacher_without_checkpoint", "tokenizer_mismatch", "unknown_key",
    "wrong_type", "empty_dataset", "seq_len_beyond_context", "batch_not_divisible",
])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, teacher_run, tmp_path, capsys):
    root, corpus = teacher_run
    run_dir = tmp_path / "existing_run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("kept as is")
    teacher = f"teacher:\n  source: checkpoint\n  path: {root / 'teacher'}\n"
    overrides = []
    if case == "missing_teacher":
        teacher = f"teacher:\n  source: checkpoint\n  path: {tmp_path / 'nowhere'}\n"
    elif case == "teacher_without_checkpoint":
        teacher = f"teacher:\n  source: checkpoint\n  path: {run_dir}\n"
    elif case == "tokenizer_mismatch":
        tokenizer = write_tokenizer(tmp_path / "tokenizer.json", corpus)
        overrides = [f"data.tokenizer={tokenizer}"]
    elif case == "unknown_key":
        overrides = ["train.setps=3"]
    elif case == "wrong_type":
        overrides = ["optimizer.lr=fast"]
    elif case == "empty_dataset":
        empty = tmp_path / "empty.txt"
        empty.write_text("")
        overrides = [f"data.path={empty}"]
    elif case == "seq_len_beyond_context":
        overrides = ["data.seq_len=128"]
    elif case == "batch_not_divisible":
        overrides = ["train.microbatches=3"]
    config = write_config(tmp_path / "bad.yaml", corpus, run_dir, teacher)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert cli.main(["distill", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-jax: error: ") and err.count("\n") == 1, err
    assert snapshot(run_dir) == before


def write_tokenizer(path: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=200,
                                                       special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


def test_stop_at_then_rerun_finishes(teacher_run, tmp_path):
    root, corpus = teacher_run
    config = write_config(tmp_path / "t.yaml", corpus, tmp_path / "run")
    assert cli.main(["train", str(config), "train.stop_at=3"]) == 0
    assert not (tmp_path / "run" / "report.json").exists()
    assert cli.main(["train", str(config)]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 6


def test_demo_quick_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick"]) == 0
    report = json.loads((tmp_path / "kd_jax_demo" / "report.json").read_text())
    for name in ("teacher", "distilled", "baseline"):
        assert report[name]["params"] > 0 and report[name]["bits_per_byte"] > 0
    assert report["distilled"]["params"] == report["baseline"]["params"]
    assert report["teacher"]["params"] > 5 * report["distilled"]["params"]
    assert "xz -9" in capsys.readouterr().out
