"""Students distilled online, from top-k caches and from sampled caches, side by side.

    python benchmarks/cache_students.py --out runs/cache_students

The demo's teacher (trained here unless --teacher names a finished run) and its student recipe
(300 steps of 64 x 128 bytes), on the first 200 files of the standard library so that the caches
hold one pass of the data the students read (about 25k rows). The students differ only in where
the teacher's distribution comes from: the teacher itself (online, full distribution), a top-k
cache (k ids and the tail mass) or a sampled cache (n draws), with k = n (each --budgets value)
so that both caches keep as many entries a token. Every kind of student is trained with
--seeds seeds (initialization and data order; the caches are built once), and the table gives
the mean and standard deviation over seeds of held-out bits per byte, expected calibration
error, agreement with the teacher and KL(teacher || student), with each cache's size, then each
cached student minus the online student of the same seed (speed is measured by
benchmarks/cache_throughput.py). Rerunning with the same --out reuses the finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from kd_jax import demo
from kd_jax.cache.shards import disk_bytes_per_token
from kd_jax.config import CacheConfig
from kd_jax.train import loop
from kd_jax.train.precompute import precompute

METRICS = ("bits_per_byte", "ece", "agreement", "kl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cache_students")
    parser.add_argument("--teacher", help="a finished demo teacher run (default: train one)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 12],
                        help="entries a token: top-k with k = b and sampling with n = b draws")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--documents", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)
    recipe = demo.recipe(out)
    teacher_dir = Path(args.teacher) if args.teacher else out / "teacher"
    if not args.teacher:
        loop.run(recipe["teacher"], "train")

    base = recipe["distilled"]
    base.teacher.path = str(teacher_dir)
    base.data.max_documents = args.documents
    base.train.progress = False

    # The caches, built once: (name, config that trains from it, bytes per token).
    sources = [("online (full)", base, None)]
    for budget in args.budgets:
        for mode in ("topk", "sample"):
            cache = CacheConfig(dir=str(out / f"cache_{mode}{budget}"), mode=mode, k=budget,
                                draws=budget, batch_size=64, rows_per_shard=256)
            cfg = dataclasses.replace(base, cache=cache)
            precompute(cfg)
            cfg.teacher = dataclasses.replace(base.teacher, source="cache")
            name = f"topk k={budget}" if mode == "topk" else f"sample n={budget}"
            sources.append((name, cfg, disk_bytes_per_token(cache.dir)))

    rows: dict[str, dict] = {}
    teacher = None
    for seed in range(args.seeds):
        for name, cfg, size in sources:
            run_dir = out / f"{name.split()[0]}{name.split('=')[-1] if '=' in name else ''}"
            student_cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, seed=cfg.model.seed + seed),
                train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed,
                                          run_dir=str(run_dir / f"seed{seed}")))
            report = loop.run(student_cfg, "distill")
            teacher = report["teacher"]
            row = rows.setdefault(name, {"bytes_per_token": size, "seeds": []})
            row["seeds"].append({key: report["student"][key] for key in METRICS})
            print(f"seed {seed} {name}: " + ", ".join(
                f"{key} {report['student'][key]:.4f}" for key in METRICS), flush=True)

    print(f"\n{args.documents} files, students of {base.train.steps} steps, {args.seeds} seeds "
          "(mean +- sd); held-out bytes")
    header = (f"{'student':<14} {'bits/byte':>16} {'ECE':>16} {'agree':>16} {'KL(T||S)':>16} "
              f"{'cache B/tok':>11}")
    print(header)
    print("-" * len(header))
    print(f"{'(teacher)':<14} {teacher['bits_per_byte']:>16.4f} {teacher['ece']:>16.4f}")
    for name, row in rows.items():
        values = {key: np.array([seed[key] for seed in row["seeds"]]) for key in METRICS}
        row["mean"] = {key: float(v.mean()) for key, v in values.items()}
        row["sd"] = {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                     for key, v in values.items()}
        cells = " ".join(f"{row['mean'][key]:>8.4f} +-{row['sd'][key]:.4f}" for key in METRICS)
        size = f"{row['bytes_per_token']:.2f}" if row["bytes_per_token"] else "-"
        print(f"{name:<14} {cells} {size:>11}")
    # Students of the same seed share their initialization and data order: the differences
    # between them, seed by seed, are much less noisy than their spread across seeds.
    reference = rows["online (full)"]["seeds"]
    print(f"\nminus the online student of the same seed (mean +- sd over {args.seeds} seeds)")
    print(f"{'student':<14} {'bits/byte':>16} {'ECE':>16} {'agree':>16} {'KL(T||S)':>16}")
    for name, row in list(rows.items())[1:]:
        deltas = {key: np.array([seed[key] - ref[key]
                                 for seed, ref in zip(row["seeds"], reference, strict=True)])
                  for key in METRICS}
        row["minus_online"] = {key: float(v.mean()) for key, v in deltas.items()}
        print(f"{name:<14} " + " ".join(
            f"{v.mean():>+8.4f} +-{v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"
            for v in deltas.values()))
    (out / "cache_students.json").write_text(
        json.dumps({"teacher": teacher, "students": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
