"""Students distilled online, from a top-k cache and from a sampled cache, side by side.

    python benchmarks/cache_students.py --out runs/cache_students

The demo's teacher (trained here unless --teacher names a finished run) and its student recipe
(300 steps of 64 x 128 bytes), on the first 200 files of the standard library so that the caches
hold one pass of the data the students read (about 25k rows). Three students differ only in
where the teacher's distribution comes from: the teacher itself (online, full distribution), a
top-k cache (k ids and the tail mass) and a sampled cache (n draws), with k = n by default so
both caches keep as many entries a token. The table gives held-out bits per byte, expected
calibration error, agreement with the teacher and KL(teacher || student), and each cache's
size (speed is measured by benchmarks/cache_throughput.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from kd_jax import cache_store, demo, loop, precompute
from kd_jax.config import CacheConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cache_students")
    parser.add_argument("--teacher", help="a finished demo teacher run (default: train one)")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--draws", type=int, default=12)
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
    rows = {}

    online = dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                 run_dir=str(out / "online")))
    rows["online (full)"] = {"report": loop.run(online, "distill")}

    for mode in ("topk", "sample"):
        cache = CacheConfig(dir=str(out / f"cache_{mode}"), mode=mode, k=args.k,
                            draws=args.draws, batch_size=64, rows_per_shard=256)
        cfg = dataclasses.replace(base, cache=cache)
        cfg.train = dataclasses.replace(base.train, run_dir=str(out / mode))
        precompute.precompute(cfg)
        cfg.teacher = dataclasses.replace(base.teacher, source="cache")
        name = f"topk k={args.k}" if mode == "topk" else f"sample n={args.draws}"
        rows[name] = {"report": loop.run(cfg, "distill"),
                      "bytes_per_token": cache_store.disk_bytes_per_token(cache.dir)}

    teacher = rows["online (full)"]["report"]["teacher"]
    print(f"\n{args.documents} files, students of {base.train.steps} steps; held-out bytes")
    header = (f"{'student':<16} {'bits/byte':>9} {'ECE':>7} {'agree':>7} {'KL(T||S)':>9} "
              f"{'cache B/tok':>11}")
    print(header)
    print("-" * len(header))
    print(f"{'(teacher)':<16} {teacher['bits_per_byte']:>9.4f} {teacher['ece']:>7.4f}")
    for name, row in rows.items():
        student = row["report"]["student"]
        size = f"{row['bytes_per_token']:.2f}" if "bytes_per_token" in row else "-"
        print(f"{name:<16} {student['bits_per_byte']:>9.4f} {student['ece']:>7.4f} "
              f"{student['agreement']:>7.4f} {student['kl']:>9.4f} {size:>11}")
    (out / "cache_students.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
