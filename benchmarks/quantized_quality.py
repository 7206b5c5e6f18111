"""Quantization-aware distillation on the demo's data: an int4 student distilled with the
rounding in its forward pass, against the demo's float distilled student rounded to int4 after
training, and against an int4 student trained on hard labels with the rounding in the loop.

    python benchmarks/quantized_quality.py --out DIR [--group 16]

The teacher is the demo's (trained into DIR/teacher first if it is not there). Each student is
the demo's (0.075M parameters, 300 steps) at seeds 0 and 1 (initialization and data order).
int4 is kd_jax's `model.quantize: int4` in groups of `--group` weights along the input
dimension (the embedding and head int8: `quantize_embedding/head: auto`). Rounded after training
is the float student's checkpoint evaluated with the same settings. Printed: held-out bits per
byte of each, and the float student's as the ceiling.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from kd_jax import demo
from kd_jax.train import loop


def quantized(cfg, group: int):
    cfg = copy.deepcopy(cfg)
    cfg.model.quantize, cfg.model.quantize_group = "int4", group
    return cfg


def seeded(cfg, seed: int, run_dir: Path):
    cfg = copy.deepcopy(cfg)
    cfg.train.seed, cfg.model.seed = seed, cfg.model.seed + seed
    cfg.train.run_dir, cfg.train.progress = str(run_dir), False
    return cfg


def bits(report: dict) -> float:
    return report["student"]["bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("kd_jax_quantized"))
    parser.add_argument("--group", type=int, default=16)
    args = parser.parse_args()
    configs = demo.recipe(args.out)
    started = time.perf_counter()
    teacher = copy.deepcopy(configs["teacher"])
    teacher.train.progress = False
    loop.run(teacher, "train")  # resumes, or reports a finished teacher

    results: dict[tuple[str, int], float] = {}
    for seed in (0, 1):
        root = args.out / f"seed{seed}"
        float_run = seeded(configs["distilled"], seed, root / "distilled_float")
        results["float distilled", seed] = bits(loop.run(float_run, "distill"))
        # The float student's weights, rounded as the int4 students' are: evaluated, then the
        # float report put back.
        kept = (root / "distilled_float" / "report.json").read_text()
        rounded = loop.evaluate_checkpoint(root / "distilled_float", [
            "model.quantize=int4", f"model.quantize_group={args.group}"])
        (root / "distilled_float" / "report.json").write_text(kept)
        results["float distilled, rounded to int4", seed] = bits(rounded)
        results["int4 distilled (in the loop)", seed] = bits(loop.run(
            quantized(seeded(configs["distilled"], seed, root / "distilled_int4"), args.group),
            "distill"))
        results["int4 hard labels (in the loop)", seed] = bits(loop.run(
            quantized(seeded(configs["baseline"], seed, root / "baseline_int4"), args.group),
            "train"))

    names = ["float distilled", "float distilled, rounded to int4",
             "int4 distilled (in the loop)", "int4 hard labels (in the loop)"]
    print(f"int4 in groups of {args.group} (embedding and head int8); held-out bits/byte; "
          f"{time.perf_counter() - started:.0f} s")
    print("| student | seed 0 | seed 1 | mean |\n|---|---|---|---|")
    for name in names:
        a, b = results[name, 0], results[name, 1]
        print(f"| {name} | {a:.4f} | {b:.4f} | {(a + b) / 2:.4f} |")
    qad = "int4 distilled (in the loop)"
    for other in ("float distilled, rounded to int4", "int4 hard labels (in the loop)"):
        gains = [results[other, seed] - results[qad, seed] for seed in (0, 1)]
        print(f"{qad} against {other}: {gains[0]:+.4f} / {gains[1]:+.4f} bits/byte")
    (args.out / "quantized_quality.json").write_text(json.dumps(
        {f"{name} seed {seed}": value for (name, seed), value in results.items()}, indent=1))


if __name__ == "__main__":
    main()
