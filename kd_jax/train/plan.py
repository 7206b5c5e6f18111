"""`kd-jax plan CONFIG`: will the run fit? The step compiled ahead of time, from shapes only.

The step of the configured run is compiled for the configured mesh on this host's CPU, with N
placeholder devices (`--devices`): nothing is allocated, no weight and no data are read (a
Hugging Face checkpoint's config.json, or a teacher run's config.yaml, gives the shapes). Per
device it reports the bytes of the student's parameters, its optimizer state, the teacher's
parameters (every teacher's, with `teachers:`), the batch and XLA's temporaries, whether their sum fits `--device-memory`, and the
largest temporaries by name (from XLA's buffer assignment). A real run prints the same figures
when its step compiles (`memory_figures`).

The CPU compiler's plan is close to, not equal to, an accelerator's: fusion and scheduling
differ, so temporaries may differ by tens of percent; parameters, optimizer state and batch are
exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kd_jax.checkpoint import placed
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.config.teachers import members
from kd_jax.losses.whitebox import WhiteBox
from kd_jax.models.pure import abstract_model, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from kd_jax.parallel.hosts import BatchPlacement
from kd_jax.teacher.loading import teacher_model
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.several import MEMBERS_KEY, SeveralTeachers
from kd_jax.train import step as step_lib
from kd_jax.train.resolve import resolve_model, teacher_model_config

GIB = 1024**3
BATCH_FIELDS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")


def use_placeholder_devices(devices: int) -> None:
    """N CPU devices for the compiler; before anything initializes JAX's backends."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)


def plan(cfg: Config, device_memory_gb: float | None = None, top: int = 5) -> dict[str, Any]:
    """The per-device memory of `cfg`'s step on the devices JAX has (use_placeholder_devices)."""
    planned = [member for _, member in members(cfg)] if cfg.teachers else [cfg]
    for i, member in enumerate(planned):
        if member.teacher.source == "cache":
            where = f"teachers[{i}] is a cache" if cfg.teachers else "teacher.source is cache"
            raise ConfigError(f"kd-jax plan compiles online distillation and hard-label "
                              f"training; {where}: plan without it (the cached targets add "
                              "their fields to the batch)")
    cfg = resolve_model(cfg, platform="accelerator")  # what is planned: a run on accelerators
    mesh = mesh_lib.make_mesh(cfg.mesh)
    student_rules = mesh_lib.rules_for(cfg.mesh.student_layout, cfg.mesh.student_rules,
                                       "mesh.student_rules")
    student, abstract = abstract_model(cfg.model)
    param_shardings = mesh_lib.param_shardings(logical_axes(student.template), student_rules,
                                               mesh, abstract)
    teacher, teacher_params, whitebox = None, None, None
    if cfg.teachers:  # every teacher's parameters and forward pass, in one step
        online = [_online_teacher(resolve_model(member, platform="accelerator"), mesh)
                  for member in planned]
        teacher = SeveralTeachers(tuple(t for t, _, _ in online),
                                  tuple(share for share, _ in members(cfg)))
        teacher_params = tuple(params for _, params, _ in online)
    elif cfg.teacher.source in ("checkpoint", "hf"):
        teacher, teacher_params, teacher_cfg = _online_teacher(cfg, mesh)
        whitebox = WhiteBox.of(cfg.loss, cfg.model, teacher_cfg)
    tx, schedule = step_lib.make_optimizer(cfg.optimizer, cfg.train.steps)
    aux = whitebox.init_aux if whitebox is not None else dict  # white-box projections
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0, aux()), abstract)
    state_shardings = mesh_lib.tree_shardings(abstract_state, abstract, param_shardings, mesh)
    placement = BatchPlacement.on(mesh, cfg.train.batch_size)
    local = {key: np.zeros((len(placement.positions), cfg.data.seq_len), np.int32)
             for key in BATCH_FIELDS}
    if cfg.teachers:
        local[MEMBERS_KEY] = tuple({} for _ in planned)  # online teachers read the batch itself
    batch = placement.abstract(local)
    update = step_lib.make_update(
        student, teacher, tx, schedule, cfg.loss, cfg.train.microbatches, cfg.model.vocab_size,
        mesh_lib.logits_sharding(mesh, student_rules, cfg.model.vocab_size), whitebox)
    jitted = jax.jit(update, donate_argnums=(0,), in_shardings=(
        state_shardings, jax.tree.map(lambda p: p.sharding, teacher_params),
        placement.sharding), out_shardings=(state_shardings, mesh_lib.replicated(mesh)))
    with tempfile.TemporaryDirectory() as dump:
        compiled = jitted.lower(placed(abstract_state, state_shardings), teacher_params,
                                batch).compile(compiler_options={"xla_dump_to": dump})
        largest = largest_temporaries(Path(dump), top)
    figures = memory_figures(compiled, placed(abstract_state, state_shardings),
                             teacher_params, batch)
    figures.update(devices=jax.device_count(), mesh=dict(mesh.shape), largest=largest,
                   device_memory=device_memory_gb * GIB if device_memory_gb else None,
                   student=cfg.model.family, seq_len=cfg.data.seq_len,
                   batch_size=cfg.train.batch_size, microbatches=cfg.train.microbatches)
    return figures


def _online_teacher(cfg: Config, mesh: Any) -> tuple[OnlineTeacher, Any, ModelConfig]:
    """The teacher of `cfg` as the planned step runs it: its model, placeholder parameters laid
    out by `mesh.teacher_layout`, and its architecture. A teacher of another tokenizer is
    planned on the student's rows."""
    teacher_cfg = dataclasses.replace(teacher_model_config(cfg), dtype=cfg.teacher.dtype,
                                      param_dtype=cfg.teacher.dtype)
    model, teacher_abstract, teacher_shardings = teacher_model(cfg, teacher_cfg, mesh)
    rules = mesh_lib.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules,
                               "mesh.teacher_rules")
    teacher = OnlineTeacher(model, mesh_lib.logits_sharding(mesh, rules,
                                                            teacher_cfg.vocab_size))
    return teacher, placed(teacher_abstract, teacher_shardings), teacher_cfg


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of placed arrays or placeholders."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def memory_figures(compiled, state, teacher_params, batch) -> dict[str, int]:
    """Per device: the state's parts, the teacher, the batch, XLA's temporaries, and the total."""
    memory = compiled.memory_analysis()
    figures = {
        "student_params": _device_bytes(state.params),
        "optimizer_state": _device_bytes(state) - _device_bytes(state.params),
        "teacher_params": _device_bytes(teacher_params) if teacher_params is not None else 0,
        "batch": _device_bytes(batch),
        "temporaries": int(memory.temp_size_in_bytes) if memory is not None else 0,
    }
    figures["total"] = sum(figures.values())
    return figures


_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")


def largest_temporaries(dump_dir: Path, top: int) -> list[dict[str, Any]]:
    """The `top` largest values in the step's temporary allocations, by XLA's buffer assignment
    (name, bytes, shape, and the JAX operation that made them where the HLO says)."""
    files = sorted(dump_dir.glob("*update*buffer-assignment.txt")) or sorted(
        dump_dir.glob("*buffer-assignment.txt"))
    if not files:
        return []
    values, in_temp = [], False
    for line in max(files, key=lambda path: path.stat().st_size).read_text().splitlines():
        allocation = _ALLOCATION.match(line)
        if allocation:
            in_temp = "temp" in allocation.group(2)
            continue
        value = _VALUE.match(line)
        if in_temp and value:
            values.append({"name": value.group(1), "bytes": int(value.group(2)),
                           "shape": value.group(3).split("{")[0]})
    values.sort(key=lambda value: -value["bytes"])
    chosen, seen = [], set()
    for value in values:
        if value["name"] not in seen:
            seen.add(value["name"])
            chosen.append(value)
        if len(chosen) == top:
            break
    ops = _op_names(dump_dir, {value["name"] for value in chosen})
    for value in chosen:
        value["op"] = ops.get(value["name"], "")
    return chosen


def _op_names(dump_dir: Path, names: set[str]) -> dict[str, str]:
    """instruction name -> the op_name metadata of the optimized HLO (the JAX operation)."""
    found: dict[str, str] = {}
    for path in dump_dir.glob("*after_optimizations.txt"):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if match and match.group(1) in names and match.group(1) not in found:
                op = re.search(r'op_name="([^"]*)"', line)
                found[match.group(1)] = op.group(1) if op else ""
    return found


def plan_table(figures: dict[str, Any]) -> str:
    """The plan, printed: one line per part, per device, in GiB."""
    rows = [("student parameters", "student_params"), ("optimizer state", "optimizer_state"),
            ("teacher parameters", "teacher_params"), ("batch", "batch"),
            ("temporaries", "temporaries"), ("total", "total")]
    lines = [f"per device, {figures['devices']} devices, mesh {figures['mesh']}; batch "
             f"{figures['batch_size']} x {figures['seq_len']} tokens in "
             f"{figures['microbatches']} "
             "microbatches"]
    lines += [f"  {label:20s} {_size(figures[key]):>12s}" for label, key in rows]
    if figures.get("device_memory"):
        fits = figures["total"] <= figures["device_memory"]
        lines.append(f"  {'device memory':20s} {_size(figures['device_memory']):>12s}: "
                     + ("fits" if fits else "does NOT fit"))
    if figures.get("largest"):
        lines.append("  largest temporaries:")
        lines += [f"    {_size(value['bytes']):>12s}  {value['shape']:28s} "
                  f"{value['op'] or value['name']}" for value in figures["largest"]]
    return "\n".join(lines)


def figures_line(figures: dict[str, Any]) -> str:
    """The plan's per-device figures on one line, for the log of a run that compiled its step."""
    parts = [("student parameters", "student_params"), ("optimizer state", "optimizer_state"),
             ("teacher", "teacher_params"), ("batch", "batch"), ("temporaries", "temporaries")]
    return ("per device: " + ", ".join(f"{label} {_size(figures[key])}" for label, key in parts)
            + f"; total {_size(figures['total'])}")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.2f} MiB"
