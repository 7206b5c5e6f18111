"""Reports: the one place a run's report is built, and the tables printed from it.

A report (`report.json` in the run directory) holds `mode`, `run_dir`, `steps`, and `student`
(and `teacher` when the config names one), each the evaluation's summary plus `params`, and for
the student `tokens_per_second`; with several teachers (`teachers:`), `teachers` maps each name
(`teachers[i]`) to its summary, `params`, `path`, and the student's `student_agreement` and
`student_kl` with it (the student's own `agreement` and `kl` are with the first). A teacher of
another tokenizer is scored on its own tokens (its bits per byte over the bytes they spell), and
compared with the student where positions align (`compared_tokens`, or the student's
`aligned_tokens`): agreement is both most probable tokens in one bucket, KL over the buckets.
After `kd-jax eval --tasks`, `tasks` maps each task's name to its `file`, `examples`, and per
model (`student`, `teacher`, ...) `acc`, `acc_norm` and their standard errors (docs/tasks.md).
"""

from __future__ import annotations

from typing import Any, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def eval_table(report: dict[str, Any]) -> str:
    """The table `kd-jax eval` prints: one row per model in the report."""
    headers = ["model", "params", "bits/byte", "bits/token", "accuracy", "ECE",
               "agreement", "KL(T||S)"]
    rows = []
    for name, label in (("teacher", "teacher"), ("student", "student"),
                        ("student_float", "student, float weights")):
        if name in report:
            m = report[name]
            rows.append([label, m.get("params"), m.get("bits_per_byte"), m.get("bits_per_token"),
                         m.get("accuracy"), m.get("ece"), m.get("agreement"), m.get("kl")])
    # Several teachers: a row each, before the student's, its agreement and KL the student's
    # with it.
    at = next((i for i, row in enumerate(rows) if row[0] == "student"), len(rows))
    for name, m in (report.get("teachers") or {}).items():
        rows.insert(at, [name, m.get("params"), m.get("bits_per_byte"), m.get("bits_per_token"),
                         m.get("accuracy"), m.get("ece"), m.get("student_agreement"),
                         m.get("student_kl")])
        at += 1
    return format_table(headers, rows)


TASK_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def tasks_table(tasks: dict[str, dict[str, Any]]) -> str:
    """The table of task results (report.json's `tasks`): a row per task and model."""
    headers = ["task", "model", "examples", "acc", "± stderr", "acc_norm", "± stderr"]
    rows = []
    for task, entry in tasks.items():
        for model, metrics in entry.items():
            if isinstance(metrics, dict):
                rows.append([task, model, entry.get("examples"),
                             *(metrics.get(key) for key in TASK_METRICS)])
    return format_table(headers, rows)


def build_report(mode: str, run_dir: str, steps: int, result: dict[str, dict],
                 info: dict[str, Any], tokens_per_second: float | None) -> dict[str, Any]:
    """The report of a run from its evaluation `result` and its run.json `info`."""
    report = {
        "mode": mode,
        "run_dir": str(run_dir),
        "steps": steps,
        "student": dict(result["student"], params=info["student_params"],
                        tokens_per_second=tokens_per_second),
    }
    if "teacher" in result:
        report["teacher"] = dict(result["teacher"], params=info["teacher_params"])
    if "student_float" in result:  # a quantized student's float master weights
        report["student_float"] = dict(result["student_float"], params=info["student_params"])
    if "student~teacher" in result:  # a teacher of another tokenizer: where positions align
        versus = result["student~teacher"]
        report["student"].update(agreement=versus.get("agreement"), kl=versus.get("kl"),
                                 aligned_tokens=versus.get("tokens"))
    # Several teachers: each one's statistics, and the student's agreement and KL with it.
    several = {name: stats for name, stats in result.items() if name.startswith("teachers[")}
    if several:
        recorded = info.get("teachers") or []
        report["teachers"] = {}
        for name, stats in several.items():
            index = int(name[len("teachers["):-1])
            entry = recorded[index] if index < len(recorded) and recorded[index] else {}
            versus = result[f"student~{name}"]
            report["teachers"][name] = dict(
                stats, params=entry.get("params"), path=entry.get("path"),
                student_agreement=versus.get("agreement"), student_kl=versus.get("kl"),
                compared_tokens=versus.get("tokens"))
    return report
