"""The fused distillation step against the number of devices and the mesh layout.

    python benchmarks/scaling.py [--quick] [--devices 1,2,4,8] [--steps N] [--repeats R]
    python benchmarks/scaling.py --sweep batch|model      (on a GPU: one device, larger work)

On a CPU the devices are host-platform devices (`--xla_force_host_platform_device_count`), one
process per device count: they share the same cores, so the table shows what splitting the step
costs (partitioning, collectives, smaller matmuls), not a speed-up. Each device count runs every
layout that divides it, the same for teacher and student:

    data         replicated weights, the batch split over every device
    fsdp         weights split on `embed` over every device (the batch too)
    tensor       heads, MLP and vocabulary split over every device (the batch whole)
    data+tensor  half the devices on each axis (from 4 devices)

The workload is `benchmarks/throughput.py`'s; the step is built as the training loop builds it
(`kd_jax.parallel.mesh` shardings, the state donated, in/out shardings given). `--sweep` times
the fused step on one device for several batch sizes, or several model sizes (the student's and
the teacher's layers scaled together), the usual view on one accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYOUTS = {  # name -> (data, fsdp, tensor) as a function of the device count, and the layout
    "data": (lambda n: (n, 1, 1), "replicated"),
    "fsdp": (lambda n: (1, n, 1), "fsdp"),
    "tensor": (lambda n: (1, 1, n), "tensor"),
    "data+tensor": (lambda n: (n // 2, 1, 2), "tensor"),
}


def layouts_for(devices: int, workload) -> list[str]:
    """The layouts that fit `devices` devices: the batch splits over data x fsdp, and the heads
    (query and key/value) of both models over tensor."""
    w = workload
    heads = (w.teacher_heads, w.teacher_kv_heads, w.student_heads, w.student_kv_heads)
    names = []
    for name, (shape, _) in LAYOUTS.items():
        data, fsdp, tensor = shape(devices)
        if devices == 1 and name != "data":
            continue  # one device: every layout is the same step
        if name == "data+tensor" and devices < 4:
            continue
        if w.batch % (data * fsdp) == 0 and all(n % tensor == 0 for n in heads):
            names.append(name)
    return names


def time_on_mesh(workload, layout_name: str, steps: int, repeats: int) -> dict[str, Any]:
    """Build, compile and time the fused step on every device of this process, laid out as
    `layout_name` says."""
    import jax
    import throughput as tp

    from kd_jax.config import MeshConfig
    from kd_jax.models.pure import abstract_model, init_params, logical_axes
    from kd_jax.parallel import mesh as mesh_lib
    from kd_jax.parallel.hosts import BatchPlacement
    from kd_jax.teacher.online import OnlineTeacher
    from kd_jax.train import step as step_lib

    shape, layout = LAYOUTS[layout_name]
    data, fsdp, tensor = shape(jax.device_count())
    mesh = mesh_lib.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor,
                                         student_layout=layout, teacher_layout=layout))
    rules = mesh_lib.rules_for(layout)
    teacher_cfg, student_cfg, loss_cfg, opt_cfg = tp.build_configs(workload)
    student, student_abstract = abstract_model(student_cfg)
    teacher, teacher_abstract = abstract_model(teacher_cfg)
    student_shardings = mesh_lib.param_shardings(logical_axes(student.template), rules, mesh,
                                                 student_abstract)
    teacher_shardings = mesh_lib.param_shardings(logical_axes(teacher.template), rules, mesh,
                                                 teacher_abstract)
    logits = mesh_lib.logits_sharding(mesh, rules, workload.vocab)
    tx, schedule = step_lib.make_optimizer(opt_cfg, (repeats + 1) * steps + 1)
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), student_abstract)
    state_shardings = mesh_lib.tree_shardings(abstract_state, student_abstract,
                                              student_shardings, mesh)
    state = step_lib.init_state_on(student_cfg, tx, 0, state_shardings)
    teacher_params = jax.jit(lambda: init_params(teacher_cfg),
                             out_shardings=teacher_shardings)()
    placement = BatchPlacement.on(mesh, workload.batch)
    batch = placement.place(placement.share(
        tp.synthetic_batch(workload.batch, workload.seq, workload.vocab)))
    update = jax.jit(
        step_lib.make_update(student, OnlineTeacher(teacher, mesh_lib.logits_sharding(
            mesh, rules, workload.vocab)), tx, schedule, loss_cfg, 1, workload.vocab, logits),
        donate_argnums=(0,),
        in_shardings=(state_shardings, teacher_shardings, placement.sharding),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)))
    compiled = update.lower(state, teacher_params, batch).compile()
    seconds, each, _ = tp.time_step(lambda s: compiled(s, teacher_params, batch), state, steps,
                                    repeats)
    return {"devices": jax.device_count(), "layout": layout_name,
            "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
            "seconds_per_step": seconds, "seconds_per_step_each": each,
            "tokens_per_second": workload.tokens / seconds,
            "plan_bytes_per_device": tp.live_bytes(compiled)}


def child(args: argparse.Namespace) -> None:
    """One device count (the XLA flag is set by the parent): every layout that fits."""
    import throughput as tp

    workload = tp.Workload(**json.loads(args.workload))
    results = []
    for name in json.loads(args.layouts):
        print(f"{args.child_devices} devices, {name}", file=sys.stderr, flush=True)
        results.append(time_on_mesh(workload, name, args.steps, args.repeats))
    Path(args.child_json).write_text(json.dumps(results))


def run_devices(devices: int, workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    layouts = layouts_for(devices, workload)
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        subprocess.run([sys.executable, __file__, "--child-devices", str(devices),
                        "--child-json", str(out), "--workload",
                        json.dumps(dataclasses.asdict(workload)), "--layouts",
                        json.dumps(layouts), "--steps", str(args.steps), "--repeats",
                        str(args.repeats)], env=env, check=True)
        return json.loads(out.read_text())


def sweep(workload, what: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fused step on one device, for several batch sizes or model depths."""
    import throughput as tp

    if what == "batch":
        points = [dataclasses.replace(workload, batch=max(1, workload.batch * f // 4))
                  for f in (1, 2, 4, 8)]
    else:
        points = [dataclasses.replace(workload, teacher_layers=max(1, workload.teacher_layers
                                                                   * f // 4),
                                      student_layers=max(1, workload.student_layers * f // 4))
                  for f in (1, 2, 4)]
    rows = []
    for point in points:
        result = tp.safe_run_kind("fused", point, args.steps, args.repeats)
        rows.append(dict(result, batch=point.batch, teacher_layers=point.teacher_layers,
                         student_layers=point.student_layers))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--devices", default="1,2,4,8", help="device counts (CPU)")
    parser.add_argument("--sweep", choices=("batch", "model"),
                        help="one device, several batch sizes or model depths")
    parser.add_argument("--preset", default="cpu", help="throughput.py's preset")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child-devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_devices:
        child(args)
        return 0

    import throughput as tp

    workload = tp.PRESETS[args.preset]
    if args.quick:  # tiny, but with heads and a batch that every layout can split 8 ways
        workload = dataclasses.replace(tp.shrink(workload), teacher_heads=8, teacher_kv_heads=8,
                                       student_heads=8, student_kv_heads=8, batch=8)
    if args.sweep:
        rows = sweep(workload, args.sweep, args)
        print(f"{'batch':>6s} {'layers t/s':>11s} {'s/step':>8s} {'tokens/s':>10s}")
        for row in rows:
            if "error" in row:
                print(f"{row['batch']:6d} {row['teacher_layers']:5d}/{row['student_layers']:<5d}"
                      f" did not run: {row['error']}")
                continue
            print(f"{row['batch']:6d} {row['teacher_layers']:5d}/{row['student_layers']:<5d} "
                  f"{row['seconds_per_step']:8.4f} {row['tokens_per_second']:10,.0f}")
        report = {"benchmark": "scaling", "sweep": args.sweep, "results": rows}
    else:
        rows = []
        for devices in (int(n) for n in args.devices.split(",")):
            rows += run_devices(devices, workload, args)
        base = rows[0]["seconds_per_step"]
        print(f"host-platform CPU devices on {tp.host_info()['cpus_usable']} cores; "
              f"{workload.batch} x {workload.seq} tokens, fused step, median of {args.repeats} "
              f"x {args.steps} steps")
        print(f"{'devices':>7s} {'layout':12s} {'mesh d/f/t':>10s} {'s/step':>8s} "
              f"{'tokens/s':>10s} {'x 1 device':>10s} {'plan MiB/dev':>12s}")
        for row in rows:
            mesh = "/".join(str(row["mesh"][axis]) for axis in ("data", "fsdp", "tensor"))
            plan = row["plan_bytes_per_device"]
            print(f"{row['devices']:7d} {row['layout']:12s} {mesh:>10s} "
                  f"{row['seconds_per_step']:8.4f} {row['tokens_per_second']:10,.0f} "
                  f"{base / row['seconds_per_step']:10.2f} "
                  f"{plan / 2**20 if plan else float('nan'):12,.1f}")
        report = {"benchmark": "scaling", "host": tp.host_info(), "results": rows}
    report.update(quick=args.quick, versions=tp.versions(),
                  workload=dataclasses.asdict(workload), steps=args.steps,
                  repeats=args.repeats)
    path = args.json or tp.RESULTS / f"scaling{'_' + args.sweep if args.sweep else ''}" \
                                     f"{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
