"""Throughput of the fused distillation step against its parts, in one run.

    python benchmarks/step_throughput.py [--steps N]

Uses the demo's teacher and student. For each step kind it compiles once, runs one warm-up step,
then times N steps (the time between two host syncs). The ratios say what distillation costs:
the distill step runs the teacher's forward pass plus the student's forward and backward, so it
should cost about student step + one third of a teacher training step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from kd_jax import demo
from kd_jax.models.pure import init_model
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.train import step as step_lib


def synthetic_batch(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, 256, (batch, seq), dtype=np.int32),
        "labels": rng.integers(0, 256, (batch, seq), dtype=np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.int32),
    }


def time_steps(student_cfg, teacher_cfg, loss_cfg, opt_cfg, batch, steps: int) -> float:
    """Seconds per step of the jitted update (teacher_cfg None: a hard-label step)."""
    student, params = init_model(student_cfg)
    teacher, teacher_params = None, None
    if teacher_cfg:
        teacher_model, teacher_params = init_model(teacher_cfg)
        teacher = OnlineTeacher(teacher_model)
    tx, schedule = step_lib.make_optimizer(opt_cfg, steps + 1)
    update = jax.jit(step_lib.make_update(student, teacher, tx, schedule, loss_cfg, 1, 256),
                     donate_argnums=(0,))
    state = step_lib.init_state(params, tx, seed=0)
    state, metrics = update(state, teacher_params, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = update(state, teacher_params, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    configs = demo.recipe(Path("unused"))
    teacher, distilled = configs["teacher"], configs["distilled"]
    batch = synthetic_batch(teacher.train.batch_size, teacher.data.seq_len)
    tokens = teacher.train.batch_size * teacher.data.seq_len
    timings = {
        "student, hard labels": time_steps(distilled.model, None, distilled.loss,
                                           distilled.optimizer, batch, args.steps),
        "student, distilled": time_steps(distilled.model, teacher.model, distilled.loss,
                                         distilled.optimizer, batch, args.steps),
        "teacher, hard labels": time_steps(teacher.model, None, teacher.loss, teacher.optimizer,
                                           batch, args.steps),
    }
    base = timings["student, hard labels"]
    print(f"{jax.devices()[0].platform}, {tokens} tokens a step, {args.steps} timed steps")
    print(f"{'step':24s} {'s/step':>8s} {'tokens/s':>10s} {'x student step':>15s}")
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:8.3f} {tokens / seconds:10,.0f} {seconds / base:15.2f}")


if __name__ == "__main__":
    main()
