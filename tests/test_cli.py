"""End to end through the CLI: train -> distill -> eval, and the demo (bad input: test_bad_inputs).

Killing, preempting and resuming runs are in tests/train/test_loop.py.
"""

import json

import pytest

from kd_jax import cli
from tests.helpers import write_config


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

    # Multiple-choice tasks: the student and its teacher scored, recorded, kept by a later eval
    # of the same checkpoint, and shown by kd-jax report; the student scores as its export.
    task = tmp_path / "defs.jsonl"
    task.write_text("".join(json.dumps({"context": context, "choices": choices, "answer": 0})
                            + "\n" for context, choices in (
        ("def insort_left(a, x, lo=0, hi=None", ["):", "]]]]]", "qqq"]),
        ("import ", ["heapq", "zzzzzzzzzzzzzzz"]),
        ("    while lo < hi:\n       ", ["mid = (lo + hi) // 2", "x"]))))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "student"), "--tasks", str(task)]) == 0
    assert "acc_norm" in capsys.readouterr().out
    tasks = json.loads((tmp_path / "student" / "report.json").read_text())["tasks"]
    assert tasks["defs"]["examples"] == 3 and tasks["defs"]["file"] == str(task)
    assert set(tasks["defs"]["student"]) == set(tasks["defs"]["teacher"]) == {
        "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert cli.main(["eval", str(tmp_path / "student")]) == 0
    assert json.loads((tmp_path / "student" / "report.json").read_text())["tasks"] == tasks
    assert cli.main(["report", str(tmp_path / "student"), "--out", str(tmp_path / "rep")]) == 0
    student = tasks["defs"]["student"]
    assert (f"| defs | distilled | `{tmp_path / 'student'}` | 3 | {student['acc']:.4f} | "
            f"{student['acc_stderr']:.4f} | {student['acc_norm']:.4f} |"
            in (tmp_path / "rep" / "report.md").read_text())
    from kd_jax.train.tasks import evaluate_checkpoint_tasks

    assert cli.main(["export", str(tmp_path / "student"), str(tmp_path / "export")]) == 0
    exported = evaluate_checkpoint_tasks(tmp_path / "export", [task], "byte")["tasks"]
    assert exported["defs"]["model"] == pytest.approx(student, rel=1e-12)


def test_demo_quick_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick"]) == 0
    report = json.loads((tmp_path / "kd_jax_demo" / "report.json").read_text())
    for name in ("teacher", "distilled", "baseline"):
        assert report[name]["params"] > 0 and report[name]["bits_per_byte"] > 0
    assert report["distilled"]["params"] == report["baseline"]["params"]
    assert report["teacher"]["params"] > 5 * report["distilled"]["params"]
    assert "xz -9" in capsys.readouterr().out
    # report.png and report.md beside report.json: the students' curves, the retention table.
    import matplotlib.image

    from kd_jax.compare import FIGURE_DPI, FIGURE_INCHES

    demo_dir = tmp_path / "kd_jax_demo"
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    assert matplotlib.image.imread(demo_dir / "report.png").shape == (height, width, 4)
    table = (demo_dir / "report.md").read_text()
    run_dirs = {name: report[name]["run_dir"] for name in ("teacher", "distilled", "baseline")}
    for name in ("teacher", "distilled", "baseline"):
        run = json.loads((demo_dir / name / "report.json").read_text())["student"]
        assert (f"| {name} | `{run_dirs[name]}` | {run['params']:,} | "
                f"{run['bits_per_byte']:.4f} |") in table
    # The students were evaluated halfway too: their held-out curves have two points.
    records = [json.loads(line) for line in
               (demo_dir / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [3, 6]
