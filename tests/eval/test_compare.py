"""kd_jax.compare (`kd-jax report`): roles, the retention table's numbers and the figure,
from run directories written the way the loop writes them (run_dir's writers, build_report)."""

import math
from pathlib import Path

import pytest

from kd_jax import config as config_lib
from kd_jax import run_dir as run_dir_lib
from kd_jax.compare import FIGURE_DPI, FIGURE_INCHES, Run, assign_roles, compare_runs
from kd_jax.eval.report import build_report

TEACHER = {"tokens": 900.0, "nll": 1.4, "bits_per_token": 2.0198, "bits_per_byte": 1.9583,
           "accuracy": 0.6336, "ece": 0.01}
DISTILLED = {"tokens": 900.0, "nll": 1.83, "bits_per_token": 2.6401, "bits_per_byte": 2.6369,
             "accuracy": 0.5210, "ece": 0.02, "agreement": 0.6739, "kl": 0.5}
BASELINE = {"tokens": 900.0, "nll": 1.92, "bits_per_token": 2.7702, "bits_per_byte": 2.7670,
            "accuracy": 0.4974, "ece": 0.03}


def write_run(run_dir: Path, mode: str, params: int, teacher: Path | None,
              result: dict[str, dict], tokens_per_second: float | None) -> Path:
    """A finished run as the loop leaves it: config.yaml, run.json, metrics.jsonl (training
    records every 10 steps, an evaluation at 10 and at 20), report.json."""
    cfg = config_lib.Config()
    cfg.train.run_dir, cfg.train.steps = str(run_dir), 20
    if teacher is not None:
        cfg.teacher = config_lib.TeacherConfig(source="checkpoint", path=str(teacher))
    info = {"mode": mode, "tokenizer": "byte", "student_params": params,
            "teacher_params": 853_120 if teacher is not None else None}
    run_dir_lib.write_run(run_dir, cfg, info)
    for step in (10, 20):
        ce = 2.0 + 10.0 / step  # nats per token
        run_dir_lib.append_metrics(run_dir, {
            "step": step, "loss": ce, "ce": ce, "grad_norm": 1.0, "lr": 1e-3,
            "tokens_per_second": float("nan") if step == 10 else 1000.0})
        halfway = {name: dict(m, bits_per_token=m["bits_per_token"] + 1.0)
                   for name, m in result.items()}
        run_dir_lib.append_metrics(run_dir, {"step": step,
                                             "eval": halfway if step == 10 else result})
    run_dir_lib.write_report(run_dir, build_report(mode, run_dir, 20, result, info,
                                                   tokens_per_second))
    return run_dir


@pytest.fixture
def three_runs(tmp_path):
    teacher = write_run(tmp_path / "teacher", "train", 853_120, None, {"student": TEACHER},
                        tokens_per_second=None)  # e.g. a report rewritten by a later eval
    distilled = write_run(tmp_path / "distilled", "distill", 75_504, teacher,
                          {"student": DISTILLED, "teacher": TEACHER}, 19_853.2)
    baseline = write_run(tmp_path / "baseline", "train", 75_504, None, {"student": BASELINE},
                         32_908.7)
    return teacher, distilled, baseline


def table_rows(markdown: str) -> dict[str, list[str]]:
    """role -> the cells of its row of the retention table."""
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in ("teacher", "distilled", "baseline", "model") and cells[1] != "run":
            rows[cells[0]] = cells
    return rows


def test_report_holds_the_runs_numbers_and_ratios_and_a_figure(three_runs):
    teacher, distilled, baseline = three_runs
    png, md = compare_runs([distilled, baseline, teacher])
    assert (png, md) == (teacher.parent / "report.png", teacher.parent / "report.md")

    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    assert pixels.shape == (height, width, 4)
    assert pixels[..., :3].std() > 0.05  # something is drawn

    text = md.read_text()
    rows = table_rows(text)
    assert list(rows) == ["teacher", "distilled", "baseline"]
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    column = {cell.strip(): index for index, cell in enumerate(header.strip("| ").split("|"))}

    def cells(role, *names):
        return [rows[role][column[name]] for name in names]

    assert cells("teacher", "params", "bits/byte", "bits/token", "accuracy", "agreement",
                 "train tok/s") == ["853,120", "1.9583", "2.0198", "0.6336", "-", "-"]
    assert cells("distilled", "params", "bits/byte", "bits/token", "accuracy", "agreement",
                 "train tok/s") == ["75,504", "2.6369", "2.6401", "0.5210", "0.6739", "19,853"]
    assert cells("baseline", "params", "bits/byte", "accuracy", "agreement",
                 "train tok/s") == ["75,504", "2.7670", "0.4974", "-", "32,909"]
    for role, model in (("distilled", DISTILLED), ("baseline", BASELINE)):
        assert cells(role, "params ratio", "accuracy ratio", "bits ratio") == [
            f"{75_504 / 853_120:.4f}", f"{model['accuracy'] / TEACHER['accuracy']:.4f}",
            f"{model['bits_per_byte'] / TEACHER['bits_per_byte']:.4f}"]
    assert cells("teacher", "params ratio", "accuracy ratio", "bits ratio") == ["1.0000"] * 3
    gain = BASELINE["bits_per_byte"] - DISTILLED["bits_per_byte"]
    assert f"gain over the hard-label baseline: {gain:+.4f} bits/byte" in text
    assert f"next-token accuracy {DISTILLED['accuracy'] - BASELINE['accuracy']:+.4f}" in text
    assert "](report.png)" in text and "nan" not in text.lower()


def test_one_run_reports_into_itself_and_a_student_reports_its_teachers_level(three_runs,
                                                                             tmp_path):
    teacher, distilled, _ = three_runs
    png, md = compare_runs([distilled])
    assert png.parent == md.parent == distilled
    rows = table_rows(md.read_text())
    # The teacher's row comes from the student's own report (the teacher evaluated beside it).
    assert rows["teacher"][2:5] == ["853,120", "1.9583", "2.0198"]
    assert rows["distilled"][-1] == f"{DISTILLED['bits_per_byte'] / TEACHER['bits_per_byte']:.4f}"
    out = tmp_path / "elsewhere" / "report"
    assert compare_runs([teacher, distilled], out) == (out / "report.png", out / "report.md")


def _run(name: str, mode: str, params: int, teacher_path: str = "",
         teacher_params: int | None = None) -> Run:
    return Run(path=Path("/runs") / name, mode=mode, params=params, teacher_path=teacher_path,
               teacher_params=teacher_params, records=[], report=None)


def test_roles_from_the_teacher_path_else_its_recorded_size():
    runs = [_run("s", "distill", 10, "/runs/t", 100), _run("t", "train", 100),
            _run("b", "train", 10), _run("other", "train", 50)]
    assign_roles(runs)
    assert [run.role for run in runs] == ["distilled", "teacher", "baseline", "model"]
    # A teacher.path relative to another working directory: the size run.json recorded.
    runs = [_run("s", "distill", 10, "somewhere/else/t", 100), _run("t", "train", 100)]
    assign_roles(runs)
    assert [run.role for run in runs] == ["distilled", "teacher"]


def test_missing_numbers_are_dashes(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_lib.Config()
    run_dir_lib.write_run(run_dir, cfg, {"mode": "train", "student_params": 5})
    run_dir_lib.append_metrics(run_dir, {"step": 1, "loss": math.nan, "ce": None})
    png, md = compare_runs([run_dir])  # not finished: no report.json, no evaluation
    assert png.is_file()
    assert table_rows(md.read_text())["model"][2:] == ["5"] + ["-"] * 8


def test_task_results_are_a_table_of_their_own(three_runs):
    """`kd-jax eval --tasks` results (report.json's `tasks`): a row per task and model, the
    student under its run's role, a teacher evaluated beside it under its own name."""
    teacher, distilled, baseline = three_runs
    assert "Multiple-choice tasks" not in compare_runs([distilled, baseline])[1].read_text()
    report = run_dir_lib.read_report(distilled)
    report["tasks"] = {"arc": {"file": "arc.jsonl", "examples": 40,
                               "student": {"acc": 0.35, "acc_stderr": 0.0764, "acc_norm": 0.175,
                                           "acc_norm_stderr": 0.0608},
                               "teacher": {"acc": 0.5, "acc_stderr": 0.08, "acc_norm": 0.45,
                                           "acc_norm_stderr": None}}}
    run_dir_lib.write_report(distilled, report)
    table = compare_runs([distilled, baseline])[1].read_text()
    assert f"| arc | distilled | `{distilled}` | 40 | 0.3500 | 0.0764 | 0.1750 | 0.0608 |" in table
    assert f"| arc | teacher | `{distilled}` | 40 | 0.5000 | 0.0800 | 0.4500 | - |" in table
    assert table.count("| arc |") == 2
