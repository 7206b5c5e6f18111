"""`kd-jax report`: finished runs compared, as one figure and one retention table.

Given run directories (a teacher, distilled students, hard-label baselines, in any order), it
writes two files into one directory:

    report.png  every student's training cross-entropy per logged step and held-out
                cross-entropy at each evaluation, and the teacher's held-out level as a line
    report.md   the retention table (parameters, held-out quality, training throughput, and
                each model's ratios to the teacher), the distillation gain over the hard-label
                baseline, the task results of `kd-jax eval --tasks`, and the figure

A run's role comes from what it recorded. A `distill` run (run.json's `mode`) is a distilled
student. A `train` run that another run names as its teacher (config.yaml's `teacher.path`,
else, for a path relative to another working directory, the teacher size that run's run.json
recorded) is the teacher. Another `train` run is a hard-label baseline when it has a distilled
student's size or names the teacher itself (the demo's does, to report agreement); any other
run is a `model`. The numbers are each run's report.json (its final evaluation) and its
metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from kd_jax import run_dir as run_dir_lib
from kd_jax.config import ConfigError

FIGURE_INCHES, FIGURE_DPI = (8.0, 4.5), 100  # report.png: 800 x 450 pixels


@dataclasses.dataclass
class Run:
    path: Path
    mode: str  # train or distill
    params: int | None
    teacher_path: str  # config.yaml teacher.path of a checkpoint teacher; "" when none
    teacher_params: int | None  # the size of that teacher, as run.json recorded it
    records: list[dict[str, Any]]  # metrics.jsonl
    report: dict[str, Any] | None  # report.json; None for a run not finished
    role: str = "model"

    def heldout(self) -> dict[str, Any]:
        """The run's final held-out metrics: report.json's, else its latest evaluation's."""
        if self.report is not None:
            return self.report["student"]
        evaluations = [r["eval"]["student"] for r in self.records if "eval" in r]
        return dict(evaluations[-1] if evaluations else {}, params=self.params)

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, bits per token): `train` the training cross-entropy of each logged step,
        `heldout` the held-out cross-entropy of each evaluation. Later records win."""
        points = {}
        for record in self.records:
            if metric == "heldout" and "eval" in record:
                value = number(record["eval"]["student"].get("bits_per_token"))
            elif metric == "train" and "eval" not in record:
                value = number(record.get("ce"))
                value = value / math.log(2.0) if value is not None else None  # nats -> bits
            else:
                continue
            if value is not None:
                points[record["step"]] = value
        steps = sorted(points)
        return steps, [points[step] for step in steps]


def number(value: Any) -> float | None:
    """A finite number as a float; None for anything else (None, NaN, a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_run(path: Path) -> Run:
    """A run directory's files; a directory that is not a run, or has no metrics, is an error."""
    import yaml

    if not path.exists():
        raise ConfigError(f"{path}: no such run directory")
    try:
        cfg, info = run_dir_lib.read_run(path)
        report = run_dir_lib.read_report(path)
    except (json.JSONDecodeError, yaml.YAMLError) as err:  # a config error names itself
        raise ConfigError(f"{path}: its run files cannot be read ({type(err).__name__})") from None
    records = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
    if not records:
        raise ConfigError(f"{path} has no metrics yet (metrics.jsonl is missing or empty)")
    return Run(path=path, mode=info.get("mode", "train"), params=info.get("student_params"),
               teacher_path=cfg.teacher.path if cfg.teacher.source == "checkpoint" else "",
               teacher_params=info.get("teacher_params"), records=records, report=report)


def assign_roles(runs: Sequence[Run]) -> None:
    """Set each run's role: teacher, distilled, baseline or model (the module's docstring)."""
    named = {Path(run.teacher_path).expanduser().resolve() for run in runs if run.teacher_path}
    teachers = [run for run in runs if run.mode == "train" and run.path.resolve() in named]
    if not teachers:  # teacher.path relative to another directory: the recorded teacher size
        sizes = {run.teacher_params for run in runs if run.teacher_path}
        teachers = [run for run in runs if run.mode == "train" and run.params in sizes]
    student_sizes = {run.params for run in runs if run.mode == "distill"}
    for run in runs:
        if run.mode == "distill":
            run.role = "distilled"
        elif any(run is teacher for teacher in teachers):
            run.role = "teacher"
        elif run.params in student_sizes or run.teacher_path:
            run.role = "baseline"


def teacher_heldout(runs: Sequence[Run]) -> tuple[dict[str, Any] | None, str]:
    """The teacher's held-out metrics and where they come from: the teacher run's report, else
    the teacher evaluated beside a student (its report.json's `teacher`)."""
    for run in runs:
        if run.role == "teacher":
            return run.heldout(), str(run.path)
    for run in runs:
        if run.report is not None and "teacher" in run.report:
            return run.report["teacher"], f"evaluated with {run.path}"
    return None, ""


def ratio(value: Any, reference: Any) -> float | None:
    value, reference = number(value), number(reference)
    return value / reference if value is not None and reference else None


def bits_key(model: dict[str, Any], teacher: dict[str, Any] | None) -> str:
    """bits_per_byte where both have it (comparable across tokenizers), else bits_per_token."""
    both = [model] + ([teacher] if teacher else [])
    return ("bits_per_byte" if all(number(m.get("bits_per_byte")) is not None for m in both)
            else "bits_per_token")


def cell(value: Any, digits: int = 4) -> str:
    """A table cell: "-" for a missing or non-finite number."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    value = number(value)
    return "-" if value is None else f"{value:,.{digits}f}"


def by_role(runs: Sequence[Run]) -> list[Run]:
    """The teacher, then distilled students, baselines and other models, each in given order."""
    order = ("teacher", "distilled", "baseline", "model")
    return sorted(runs, key=lambda run: order.index(run.role))


def retention_rows(runs: Sequence[Run]) -> list[list[str]]:
    """One row per model, the teacher first: the retention table's cells."""
    teacher, source = teacher_heldout(runs)
    rows = []
    if teacher is not None and not any(run.role == "teacher" for run in runs):
        rows.append(["teacher", source, *_quality_cells(teacher, teacher)])
    for run in by_role(runs):
        rows.append([run.role, f"`{run.path}`", *_quality_cells(run.heldout(), teacher)])
        if run.report is not None and "student_float" in run.report:  # a quantized student
            rows.append([f"{run.role}, float weights", f"`{run.path}`",
                         *_quality_cells(run.report["student_float"], teacher)])
    return rows


def _quality_cells(model: dict[str, Any], teacher: dict[str, Any] | None) -> list[str]:
    teacher = teacher or {}
    bits = bits_key(model, teacher)
    return [cell(model.get("params")), cell(model.get("bits_per_byte")),
            cell(model.get("bits_per_token")), cell(model.get("accuracy")),
            cell(model.get("agreement")), cell(model.get("tokens_per_second"), digits=0),
            cell(ratio(model.get("params"), teacher.get("params"))),
            cell(ratio(model.get("accuracy"), teacher.get("accuracy"))),
            cell(ratio(model.get(bits), teacher.get(bits)))]


def gain_lines(runs: Sequence[Run]) -> list[str]:
    """For each distilled student, its gain over the hard-label baseline of its size."""
    baselines = [run for run in runs if run.role == "baseline"]
    lines = []
    for student in (run for run in runs if run.role == "distilled"):
        same_size = [b for b in baselines if b.params == student.params] or baselines[:1]
        for baseline in same_size[:1]:
            s, b = student.heldout(), baseline.heldout()
            bits = bits_key(s, b)
            lines.append(
                f"Distillation gain over the hard-label baseline: "
                f"{signed(difference(b.get(bits), s.get(bits)))} "
                f"bits/{bits.removeprefix('bits_per_')} (`{student.path}` {cell(s.get(bits))} "
                f"against `{baseline.path}` {cell(b.get(bits))}), next-token accuracy "
                f"{signed(difference(s.get('accuracy'), b.get('accuracy')))}.")
    return lines


def difference(value: Any, other: Any) -> float | None:
    value, other = number(value), number(other)
    return value - other if value is not None and other is not None else None


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


HEADERS = ["model", "run", "params", "bits/byte", "bits/token", "accuracy", "agreement",
           "train tok/s", "params ratio", "accuracy ratio", "bits ratio"]


def markdown(runs: Sequence[Run], image: str) -> str:
    rows = retention_rows(runs)
    table = ["| " + " | ".join(HEADERS) + " |",
             "|---|---|" + "---:|" * (len(HEADERS) - 2),
             *("| " + " | ".join(row) + " |" for row in rows)]
    return "\n".join([
        "# Distillation report", "",
        "Held-out quality is each run's final evaluation (its report.json). The ratios are the "
        "model's over the teacher's: parameters, next-token accuracy, and held-out bits "
        "(bits/byte where both have it, else bits/token; 1 is the teacher's level, higher is "
        "worse). `train tok/s` is training throughput (a distilled student's includes the "
        "teacher's forward pass).", "",
        *table, "",
        *(line for line in gain_lines(runs) for line in (line, "")),
        *task_lines(runs),
        f"![Training and held-out cross-entropy of the students, and the teacher's held-out "
        f"level]({image})", ""])


TASK_HEADERS = ["task", "model", "run", "examples", "acc", "acc stderr", "acc_norm",
                "acc_norm stderr"]


def task_lines(runs: Sequence[Run]) -> list[str]:
    """The task table (`kd-jax eval --tasks`, report.json's `tasks`): a row per task and model
    of each run, the run's student under its role; nothing when no run has task results."""
    rows = []
    for run in by_role(runs):
        for task, entry in ((run.report or {}).get("tasks") or {}).items():
            for model, metrics in entry.items():
                if isinstance(metrics, dict):
                    rows.append([task, run.role if model == "student" else model,
                                 f"`{run.path}`", cell(entry.get("examples")),
                                 *(cell(metrics.get(key)) for key in (
                                     "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"))])
    if not rows:
        return []
    return ["Multiple-choice tasks (docs/tasks.md): accuracy of the most likely choice (acc) "
            "and of the most likely per character (acc_norm), with standard errors.", "",
            "| " + " | ".join(TASK_HEADERS) + " |",
            "|---|---|---|" + "---:|" * (len(TASK_HEADERS) - 3),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def figure(runs: Sequence[Run], path: Path) -> None:
    """report.png: the students' curves and the teacher's held-out level, in bits per token."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg renderer, whatever pyplot's backend is
    ax = fig.add_subplot()
    for index, run in enumerate(run for run in by_role(runs) if run.role != "teacher"):
        color = f"C{index}"
        label = run.role if run.path.name == run.role else f"{run.role} ({run.path.name})"
        steps, values = run.curve("train")
        ax.plot(steps, values, color=color, alpha=0.45, linewidth=1.0,
                label=f"{label}, training")
        steps, values = run.curve("heldout")
        ax.plot(steps, values, color=color, linewidth=2.0, marker="o",
                label=f"{label}, held-out")
    teacher, _ = teacher_heldout(runs)
    level = number((teacher or {}).get("bits_per_token"))
    if level is not None:
        ax.axhline(level, color="black", linestyle="--", linewidth=1.2,
                   label=f"teacher, held-out ({level:.3f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (bits per token)")
    ax.set_title("Distilled and hard-label students against the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=FIGURE_DPI)


def default_out(run_dirs: Sequence[Path]) -> Path:
    """One run: its own directory; several: the first one's parent (the demo's directory)."""
    return run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].absolute().parent


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None
                 ) -> tuple[Path, Path]:
    """Write report.png and report.md for `run_dirs` into `out` (default: `default_out`);
    returns their paths. Every run is read, and `out` checked, before anything is written."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise ConfigError("name at least one run directory")
    runs = [read_run(run_dir) for run_dir in run_dirs]
    out = Path(out) if out is not None else default_out(run_dirs)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a directory to write the report into")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{out} cannot be written")
    assign_roles(runs)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "report.png", out / "report.md"
    figure(runs, png)
    md.write_text(markdown(runs, png.name))
    return png, md
