"""The spread of the demo's students between two seeds, against the distillation gain.

    kd-jax demo --out DIR            # first: the teacher and the seed-0 students
    python benchmarks/demo_seeds.py --out DIR

Seed 1 changes the student's initialization and the order of the training data; the teacher is
the demo's. The demo's claim holds when the distilled student's gain over the hard-label student
is larger than the spread between seeds of either.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from kd_jax import demo
from kd_jax.train import loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("kd_jax_demo"))
    args = parser.parse_args()
    configs = demo.recipe(args.out)
    results = {}
    for seed in (0, 1):
        for name, mode in (("distilled", "distill"), ("baseline", "train")):
            cfg = copy.deepcopy(configs[name])
            if seed:
                cfg.train.seed, cfg.model.seed = seed, cfg.model.seed + seed
                cfg.train.run_dir = str(args.out / f"seed{seed}" / name)
            cfg.train.progress = False
            results[name, seed] = loop.run(cfg, mode)["student"]["bits_per_byte"]
    print(f"{'student':10s} {'seed 0':>8s} {'seed 1':>8s} {'spread':>8s}   (held-out bits/byte)")
    for name in ("distilled", "baseline"):
        a, b = results[name, 0], results[name, 1]
        print(f"{name:10s} {a:8.4f} {b:8.4f} {abs(a - b):8.4f}")
    for seed in (0, 1):
        gain = results["baseline", seed] - results["distilled", seed]
        print(f"seed {seed}: distillation gain {gain:+.4f} bits/byte")


if __name__ == "__main__":
    main()
