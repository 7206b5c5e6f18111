"""How long the demo's three steps take to compile, with the layers scanned and unrolled; and
how an unrolled student's compile time grows with its depth.

    python benchmarks/compile_time.py [--repeats R] [--depths 4,8,16,32] [--json PATH]

The steps are the demo's (`kd_jax.demo.recipe`): the teacher's hard-label step (4 layers, d 128,
`model.remat: full`), the distilled student's step with the teacher online (2 layers, d 48) and
the baseline student's hard-label step, each built with the training loop's `make_update` and
compiled ahead of time from shapes (`jit(...).lower(...).compile()`), with JAX's compilation
cache off. `model.layer_loop: auto` unrolls all three on a CPU (`AUTO_UNROLL_LAYERS`). Then the
student-only step of `throughput.py`'s workload (d 256, vocabulary 8,192, 8 x 256 tokens) at
each of `--depths`, scanned and unrolled: what `AUTO_UNROLL_LAYERS` weighs. Each figure is the
median of `--repeats` compilations in this process. Results in `results/compile_time.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import throughput as tp  # noqa: E402

from kd_jax.demo import recipe  # noqa: E402
from kd_jax.models.pure import abstract_model  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train import step as step_lib  # noqa: E402

STEPS = (("teacher", "teacher", False), ("distilled", "distilled", True),
         ("baseline", "baseline", False))


def compile_seconds(cfg, teacher_cfg, distill: bool, layer_loop: str) -> float:
    """Seconds to lower and compile one step of `cfg` (a fresh closure: nothing is cached)."""
    model_cfg = dataclasses.replace(cfg.model, layer_loop=layer_loop)
    student, abstract = abstract_model(model_cfg)
    tx, schedule = step_lib.make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.eval_shape(lambda params: step_lib.init_state(params, tx, 0), abstract)
    teacher = teacher_params = None
    if distill:
        teacher_model_cfg = dataclasses.replace(teacher_cfg.model, remat="none",
                                                layer_loop=layer_loop)
        model, teacher_params = abstract_model(teacher_model_cfg)
        teacher = OnlineTeacher(model)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tp.synthetic_batch(
        cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size))
    update = jax.jit(step_lib.make_update(student, teacher, tx, schedule, cfg.loss, 1,
                                          cfg.model.vocab_size), donate_argnums=(0,))
    start = time.perf_counter()
    update.lower(state, teacher_params, batch).compile()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    configs = recipe(Path(tempfile.mkdtemp()))
    rows = []
    for name, key, distill in STEPS:
        seconds = {}
        for layer_loop in ("scan", "unroll"):
            each = [compile_seconds(configs[key], configs["teacher"], distill, layer_loop)
                    for _ in range(args.repeats)]
            seconds[layer_loop] = {"median": statistics.median(each), "each": each}
        rows.append({"step": name, **seconds})
    total = {loop: sum(row[loop]["median"] for row in rows) for loop in ("scan", "unroll")}
    print(f"the demo's steps, compile seconds (median of {args.repeats}), {jax.default_backend()}")
    print(f"{'step':12s} {'scan':>7s} {'unroll':>7s}")
    for row in rows:
        print(f"{row['step']:12s} {row['scan']['median']:7.2f} {row['unroll']['median']:7.2f}")
    print(f"{'all three':12s} {total['scan']:7.2f} {total['unroll']:7.2f}")

    workload = tp.Workload()
    _, student_cfg, loss_cfg, opt_cfg = tp.build_configs(workload)
    base = configs["baseline"]
    depths = []
    print(f"\nthe student-only step of throughput.py's workload (d {workload.student_d}), "
          "compile seconds by depth")
    print(f"{'layers':>6s} {'scan':>7s} {'unroll':>7s}")
    for layers in (int(n) for n in args.depths.split(",")):
        cfg = dataclasses.replace(
            base, model=dataclasses.replace(student_cfg, n_layers=layers), loss=loss_cfg,
            optimizer=opt_cfg, data=dataclasses.replace(base.data, seq_len=workload.seq),
            train=dataclasses.replace(base.train, batch_size=workload.batch))
        row = {"layers": layers}
        for layer_loop in ("scan", "unroll"):
            row[layer_loop] = statistics.median(
                compile_seconds(cfg, None, False, layer_loop) for _ in range(args.repeats))
        depths.append(row)
        print(f"{layers:6d} {row['scan']:7.2f} {row['unroll']:7.2f}")
    path = args.json or tp.RESULTS / "compile_time.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "compile_time", "machine": tp.machine_info(),
                                "versions": tp.versions(), "repeats": args.repeats,
                                "results": rows, "total": total, "by_depth": depths},
                               indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
