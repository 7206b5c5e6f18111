"""Fault injection: kill -9 and SIGTERM at random moments of a tiny `distill` and `precompute`,
resume each to the end, and compare with an uninterrupted run, bit for bit.

    python benchmarks/faults.py [--points 10] [--seed 0] [--work DIR]

A tiny byte-level teacher is trained once; then, for each fault kind, an uninterrupted run is
timed, and runs are stopped at moments drawn uniformly from 90% of that run's wall time
(start-up included: a kill before the first checkpoint means starting over), then rerun until
they finish (a SIGTERM run resumes from the checkpoint it saved). A run that ended before its
signal landed is not a fault point and is drawn again, until `--points` signals have landed.
A distill point is identical when every final student parameter equals the uninterrupted run's
exactly; a precompute point when every file of the cache has the same bytes. Prints a table
and writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = """
model: {vocab_size: 256, d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, d_ff: 64,
        max_seq_len: 64}
"""


def config(path: Path, corpus: Path, run_dir: Path, extra: str = "") -> Path:
    path.write_text(MODEL + f"""
data: {{source: text, path: {corpus}, tokenizer: byte, seq_len: 32, heldout_fraction: 0.1}}
train: {{run_dir: {run_dir}, steps: 30, batch_size: 8, microbatches: 2, log_every: 1,
        checkpoint_every: 3, keep_checkpoints: 2, eval_sequences: 8, progress: false}}
optimizer: {{lr: 1e-3, warmup_steps: 2}}
""" + extra)
    return path


def kd_jax(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kd_jax.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, **options)


def finish(*args: str) -> None:
    process = kd_jax(*args)
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"kd-jax {' '.join(args)} failed: {err[-2000:]}")


def interrupted(args: list[str], at_s: float, signum: int) -> int:
    """Run `kd-jax ARGS`, send `signum` after `at_s` seconds (if still running); its code."""
    process = kd_jax(*args)
    try:
        process.wait(timeout=at_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    process.communicate()
    return process.returncode


def params_of(run_dir: Path) -> dict[str, np.ndarray]:
    import jax

    from kd_jax import checkpoint
    from kd_jax.models.pure import abstract_model
    from kd_jax.run_dir import read_run

    cfg, _ = read_run(run_dir)
    params = checkpoint.restore_params(run_dir, abstract_model(cfg.model)[1])
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="kd_jax_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus.write_text("".join((stdlib / name).read_text() for name in ("bisect.py", "heapq.py")))
    teacher = work / "teacher"
    if not (teacher / "report.json").is_file():
        finish("train", str(config(work / "teacher.yaml", corpus, teacher)), "train.steps=12")
    distill = config(work / "distill.yaml", corpus, work / "unused",
                     f"teacher: {{source: checkpoint, path: {teacher}}}\n"
                     "loss: {ce_weight: 0.5}\n")

    rows = []
    for kind, signum in (("distill, kill -9", signal.SIGKILL),
                         ("distill, SIGTERM", signal.SIGTERM),
                         ("precompute, kill -9", signal.SIGKILL),
                         ("precompute, SIGTERM", signal.SIGTERM)):
        command = "precompute" if kind.startswith("precompute") else "distill"
        target = "cache.dir" if command == "precompute" else "train.run_dir"
        extra = ["cache.mode=topk", "cache.k=8", "cache.rows_per_shard=4",
                 "cache.batch_size=8"] if command == "precompute" else []
        reference = work / f"{command}_reference"
        shutil.rmtree(reference, ignore_errors=True)
        started = time.perf_counter()
        finish(command, str(distill), f"{target}={reference}", *extra)
        wall_s = time.perf_counter() - started
        expected = files_of(reference) if command == "precompute" else params_of(reference)
        tried = landed = resumed = identical = 0
        moments = []
        while landed < args.points and tried < 3 * args.points:
            point = tried
            out = work / f"{command}_{signum}_{point}"
            shutil.rmtree(out, ignore_errors=True)
            at_s = float(rng.uniform(0.2, 0.9 * wall_s))
            code = interrupted([command, str(distill), f"{target}={out}", *extra], at_s,
                               signum)
            tried += 1
            if code == 0:  # it finished first: no fault happened
                print(f"{kind}: attempt {point} at {at_s:.2f} s ended before the signal")
                continue
            landed += 1
            moments.append(round(at_s, 2))
            finish(command, str(distill), f"{target}={out}", *extra)  # resume to the end
            resumed += 1
            if command == "precompute":
                same = files_of(out) == expected
            else:
                got = params_of(out)
                same = got.keys() == expected.keys() and all(
                    np.array_equal(got[key], expected[key]) for key in expected)
            identical += same
            print(f"{kind}: point {point} at {at_s:.2f} s of {wall_s:.1f} s (exit {code}): "
                  f"{'identical' if same else 'DIFFERS'}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"fault": kind, "uninterrupted_s": round(wall_s, 1), "tried": landed,
                     "resumed": resumed, "identical": identical, "moments_s": moments})
    print()
    print(f"{'fault':22s} {'run s':>6s} {'tried':>6s} {'resumed':>8s} {'identical':>10s}")
    for row in rows:
        print(f"{row['fault']:22s} {row['uninterrupted_s']:6.1f} {row['tried']:6d} "
              f"{row['resumed']:8d} {row['identical']:10d}")
    print("(tried: runs stopped by the signal mid-run; resumed: rerun to the end; identical: "
          "final weights, or every cache file, equal to the uninterrupted run's)")
    result = {"machine": platform.platform(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "points": args.points, "seed": args.seed,
              "rows": rows}
    out = ROOT / "benchmarks" / "results" / "faults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
