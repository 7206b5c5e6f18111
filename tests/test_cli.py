"""End to end through the CLI: train -> distill -> eval, bad input, and the demo.

Killing, preempting and resuming runs are in tests/train/test_loop.py.
"""

import json
from pathlib import Path

import pytest

from kd_jax import cli
from tests.helpers import write_config, write_tokenizer


def test_train_distill_eval(teacher_run, tmp_path, capsys):
    root, corpus = teacher_run
    teacher_dir = root / "teacher"
    assert (teacher_dir / "report.json").is_file()
    config = write_config(tmp_path / "distill.yaml", corpus, tmp_path / "student", f"""
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
    report = json.loads((tmp_path / "student" / "report.json").read_text())
    assert report["mode"] == "distill" and report["steps"] == 6
    assert report["teacher"]["params"] > report["student"]["params"]
    for key in ("bits_per_byte", "accuracy", "agreement", "kl", "ece"):
        assert 0 <= report["student"][key] < 20, key
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "student")]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "bits/byte" in printed
    again = json.loads((tmp_path / "student" / "report.json").read_text())
    assert again["student"]["bits_per_byte"] == pytest.approx(report["student"]["bits_per_byte"],
                                                              rel=1e-5)


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


def test_demo_quick_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick"]) == 0
    report = json.loads((tmp_path / "kd_jax_demo" / "report.json").read_text())
    for name in ("teacher", "distilled", "baseline"):
        assert report[name]["params"] > 0 and report[name]["bits_per_byte"] > 0
    assert report["distilled"]["params"] == report["baseline"]["params"]
    assert report["teacher"]["params"] > 5 * report["distilled"]["params"]
    assert "xz -9" in capsys.readouterr().out
