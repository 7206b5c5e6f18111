"""What on-policy distillation costs: the on-policy step's time as a ratio to the off-policy step.

    python benchmarks/onpolicy_speed.py [--quick] [--rounds R] [--steps S]

The workload is the throughput benchmark's (`benchmarks/throughput.py` `Workload`: a teacher of
6 layers x 512 and a student of 4 layers x 256, vocabulary 8,192, 8 rows of 256 tokens,
float32, 0.5 CE + 0.5 forward KL at T = 2), every step built with the engine's own
`make_update`, the state donated:

- off-policy: the fused online step (lambda = 0);
- on-policy at lambda = 0.25, 0.5 and 1: that share of the rows keeps its first 128 tokens as
  the prompt, the student answers with 128 sampled tokens (temperature 1, no stop token, so every
  answer is full length) inside the step, then the same fused step runs on the mixed batch;
- the sampling alone, at lambda = 0.5: `OnPolicy.answer` in a jit of its own.

All are compiled first; then each round times every variant (S steps between two syncs, after
one warm-up step), in turn, and the figure is the median over R rounds. Writes
benchmarks/results/onpolicy_speed.json (onpolicy_speed_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

from kd_jax.config import OnPolicyConfig  # noqa: E402
from kd_jax.models.pure import abstract_model, init_params  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train import step as step_lib  # noqa: E402
from kd_jax.train.onpolicy import OnPolicy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.0, 0.25, 0.5, 1.0)


def build(workload: tp.Workload, fraction: float, answer_share: float):
    """(step(state) -> (state, metrics), a fresh state, the policy) of one variant."""
    teacher_cfg, student_cfg, loss_cfg, opt_cfg = tp.build_configs(workload)
    student, _ = abstract_model(student_cfg)
    teacher, _ = abstract_model(teacher_cfg)
    teacher_params = jax.jit(lambda: init_params(teacher_cfg))()
    tx, schedule = step_lib.make_optimizer(opt_cfg, 1000)
    new_tokens = int(workload.seq * answer_share)
    policy = OnPolicy.of(
        OnPolicyConfig(fraction=fraction, prompt_tokens=workload.seq - new_tokens,
                       max_new_tokens=new_tokens, temperature=1.0),
        student_cfg, workload.batch, workload.seq, workload.vocab, np.array([-1], np.int32))
    update = jax.jit(step_lib.make_update(student, OnlineTeacher(teacher), tx, schedule, loss_cfg,
                                          1, workload.vocab, onpolicy=policy),
                     donate_argnums=(0,))
    batch = jax.device_put(tp.synthetic_batch(workload.batch, workload.seq, workload.vocab))
    fresh = lambda: step_lib.init_state_on(student_cfg, tx, 0, None)  # noqa: E731
    compiled = update.lower(fresh(), teacher_params, batch).compile()
    return (lambda state: compiled(state, teacher_params, batch)), fresh, policy, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    workload = tp.shrink(tp.Workload()) if args.quick else tp.Workload()

    variants, states, compile_s = {}, {}, {}
    for fraction in FRACTIONS:
        start = time.perf_counter()
        step, fresh, policy, batch = build(workload, fraction, 0.5)
        answered = len(policy.rows) if policy else 0
        name = ("off-policy" if fraction == 0 else
                f"on-policy lambda={fraction:g} ({answered} of {workload.batch} rows)")
        variants[name], states[name] = step, fresh()
        compile_s[name] = time.perf_counter() - start
        if fraction == 0.5 and policy:  # the sampling alone, same parameters and key
            answer = jax.jit(policy.answer)
            state = fresh()
            start = time.perf_counter()
            compiled = answer.lower(state.params, batch, state.rng).compile()
            compile_s["sampling alone lambda=0.5"] = time.perf_counter() - start
            variants["sampling alone lambda=0.5"] = (
                lambda s, c=compiled, b=batch: (s, c(s.params, b, s.rng)[1]))
            states["sampling alone lambda=0.5"] = state
        print(f"{name}: compiled in {compile_s[name]:.1f} s", file=sys.stderr, flush=True)

    each = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            seconds, _, (states[name], _) = tp.time_step(step, states[name], args.steps, 1)
            each[name].append(seconds)
    off = statistics.median(each["off-policy"])
    rows = []
    for name, times in each.items():
        seconds = statistics.median(times)
        rows.append({"variant": name, "seconds_per_step": seconds, "ratio_to_off_policy":
                     seconds / off, "each": times, "compile_seconds": compile_s[name]})
    result = {"machine": tp.machine_info(), "versions": tp.versions(), "quick": args.quick,
              "workload": {"batch": workload.batch, "seq": workload.seq,
                           "prompt_tokens": workload.seq // 2, "new_tokens": workload.seq // 2,
                           "vocab": workload.vocab, "dtype": workload.dtype},
              "rounds": args.rounds, "steps": args.steps, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("onpolicy_speed_quick.json" if args.quick else "onpolicy_speed.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'variant':<40} {'s/step':>8} {'x off-policy':>13}")
    for row in rows:
        print(f"{row['variant']:<40} {row['seconds_per_step']:>8.3f} "
              f"{row['ratio_to_off_policy']:>13.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
