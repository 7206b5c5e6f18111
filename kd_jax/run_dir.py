"""The run directory: what a run writes besides its checkpoints, and reading it back.

    config.yaml     the resolved config of the run
    run.json        what later commands need to know (mode, tokenizer, parameter counts)
    metrics.jsonl   one JSON object per log interval and per evaluation
    report.json     the final evaluation (`kd_jax.eval.report`)
    checkpoints/    orbax, the student only (`kd_jax.checkpoint`)

A finished run is read back as a teacher (`kd_jax.teacher.loading`), by `kd-jax eval` and when a
run resumes, which is why this module sits below every stage. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from kd_jax import config as config_lib
from kd_jax.config import Config, ConfigError

# The sections a resumed run must share with the run that wrote the directory.
_RESUME_SECTIONS = ("model", "data", "loss", "optimizer", "teacher", "cache")
# Keys of those sections that change where the same rows come from, not what they are.
_MAY_CHANGE = {"data.store", "data.store_shard_mb"}


def read_run(run_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The config and run.json of an existing run directory."""
    import yaml

    run_dir = Path(run_dir)
    config_path, info_path = run_dir / "config.yaml", run_dir / "run.json"
    if not config_path.is_file() or not info_path.is_file():
        raise ConfigError(f"{run_dir} is not a kd-jax run directory (no config.yaml/run.json)")
    raw = yaml.safe_load(config_path.read_text())
    return config_lib.from_dict(raw), json.loads(info_path.read_text())


def check_writable(run_dir: Path) -> None:
    """A run directory that exists is a writable directory; one that does not can be made."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir '{run_dir}' is a file, not a directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir '{run_dir}' cannot be written ({existing} is not a "
                          "writable directory)")


def check_resume(cfg: Config, saved_a_checkpoint: bool = True) -> None:
    """Resuming needs the same model, data, loss, optimizer, teacher and batch. A run that
    never saved a checkpoint (`saved_a_checkpoint` False: it stopped on its first steps, a
    non-finite loss say) has nothing to resume: it starts again, with whatever config."""
    run_dir = Path(cfg.train.run_dir)
    check_writable(run_dir.absolute())
    if not (run_dir / "config.yaml").is_file() or not saved_a_checkpoint:
        return
    saved, _ = read_run(run_dir)
    for section in _RESUME_SECTIONS:
        old, new = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(
            getattr(cfg, section))
        for key in new:
            if old[key] != new[key] and f"{section}.{key}" not in _MAY_CHANGE:
                raise ConfigError(
                    f"{run_dir} was started with {section}.{key}={old[key]!r}, not "
                    f"{new[key]!r}: use a new train.run_dir")
    for key in ("batch_size", "seed"):
        if getattr(saved.train, key) != getattr(cfg.train, key):
            raise ConfigError(f"{run_dir} was started with train.{key}="
                              f"{getattr(saved.train, key)}: use a new train.run_dir")


def write_run(run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
    """config.yaml and run.json: the first files of a run, written once everything is checked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")
    (run_dir / "run.json").write_text(dumps(info, indent=2) + "\n")


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def dumps(value: Any, **options) -> str:
    """Strict JSON: non-finite numbers are written as null."""
    return json.dumps(json_safe(value), allow_nan=False, **options)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(dumps(record) + "\n")


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Forget the records of steps after `step`: a run resumed from checkpoint `step` logs them
    again, and metrics.jsonl holds each step once. Rewritten whole, then renamed."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) != len(lines):
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:  # a line cut short by a kill: dropped
        return math.inf


def read_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / "report.json").write_text(dumps(report, indent=2) + "\n")
