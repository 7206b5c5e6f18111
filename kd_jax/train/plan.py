"""`kd-jax plan CONFIG`: will the run fit? The step compiled ahead of time, from shapes only.

The step of the configured run is compiled for the configured mesh on this host's CPU, with N
placeholder devices (`--devices`): nothing is allocated, no weight and no data are read (a
Hugging Face checkpoint's config.json, or a teacher run's config.yaml, gives the shapes). Per
device it reports the bytes of the student's parameters, its optimizer state, the teacher's
parameters (every teacher's, with `teachers:`), the batch and XLA's temporaries, whether their
sum fits `--device-memory`, and the largest temporaries by name (from XLA's buffer assignment).
A real run prints the same figures when its step compiles (`memory_figures`).

A teacher of another tokenizer is planned as a run compiles it (`kd_jax.teacher.cross`): on
rows of its own of `data.teacher_seq_len` tokens, carried in the batch beside the student's with
`teacher_index`, and the cross-vocabulary loss over the buckets of the two vocabularies (both
tokenizers are read, no data). `data.teacher_seq_len` must be set: 0 sizes the rows from the
first rows of the data, which plan does not read.

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

from kd_jax.align.rows import BACKOFF_KEYS, TEACHER_KEYS
from kd_jax.checkpoint import placed
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.config.teachers import members
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer
from kd_jax.losses.cross_bytes import ByteTables
from kd_jax.losses.whitebox import WhiteBox
from kd_jax.models.pure import PureModel, abstract_model, count_params, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from kd_jax.parallel.hosts import BatchPlacement
from kd_jax.teacher.cross import CrossTokenizerTeacher, vocabulary_of
from kd_jax.teacher.loading import is_hf_checkpoint, teacher_model, teacher_tokenizer
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.several import SeveralTeachers
from kd_jax.train import step as step_lib
from kd_jax.train.resolve import resolve_model, teacher_model_config, tokenizer_spec

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
        if isinstance(teacher, OnlineTeacher):  # white-box terms: the student's tokenizer
            whitebox = WhiteBox.of(cfg.loss, cfg.model, teacher_cfg)
    tx, schedule = step_lib.make_optimizer(cfg.optimizer, cfg.train.steps)
    aux = whitebox.init_aux if whitebox is not None else dict  # white-box projections
    abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0, aux()), abstract)
    state_shardings = mesh_lib.tree_shardings(abstract_state, abstract, param_shardings, mesh)
    placement = BatchPlacement.on(mesh, cfg.train.batch_size)
    local = {key: np.zeros((len(placement.positions), cfg.data.seq_len), np.int32)
             for key in BATCH_FIELDS}
    if teacher is not None:  # what each teacher reads beside the rows, as `Run.host_batch` adds
        local.update(teacher.host_fields(placement.positions, local))
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
                   teacher_seq_len=cfg.data.teacher_seq_len if _reads_own_rows(teacher) else None,
                   batch_size=cfg.train.batch_size, microbatches=cfg.train.microbatches,
                   # a LoRA student trains its adapters alone (the optimizer state is theirs)
                   params=count_params(abstract),
                   trainable_params=count_params(step_lib.trainable(abstract, {})))
    return figures


def _online_teacher(cfg: Config, mesh: Any) -> tuple[OnlineTeacher | CrossTokenizerTeacher,
                                                     Any, ModelConfig]:
    """The teacher of `cfg` as the planned step runs it: its model, placeholder parameters laid
    out by `mesh.teacher_layout`, and its architecture. A teacher of another tokenizer reads rows
    of its own (`_cross_tokenizer_teacher`)."""
    teacher_cfg = dataclasses.replace(teacher_model_config(cfg), dtype=cfg.teacher.dtype,
                                      param_dtype=cfg.teacher.dtype)
    tokenizers = _other_tokenizer(cfg)
    model, teacher_abstract, teacher_shardings = teacher_model(cfg, teacher_cfg, mesh,
                                                               tokenizers is not None)
    rules = mesh_lib.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules,
                               "mesh.teacher_rules")
    logits_sharding = mesh_lib.logits_sharding(mesh, rules, teacher_cfg.vocab_size)
    params = placed(teacher_abstract, teacher_shardings)
    if tokenizers is None:
        return OnlineTeacher(model, logits_sharding), params, teacher_cfg
    return (_cross_tokenizer_teacher(cfg, model, teacher_cfg, *tokenizers, logits_sharding),
            params, teacher_cfg)


def _reads_own_rows(teacher: Any) -> bool:
    """Whether the planned teacher (or one of several) has another tokenizer, and its rows."""
    planned = teacher.members if isinstance(teacher, SeveralTeachers) else (teacher,)
    return any(isinstance(member, CrossTokenizerTeacher) for member in planned)


def _other_tokenizer(cfg: Config) -> tuple[Tokenizer, Tokenizer] | None:
    """(the student's tokenizer, the teacher's) where the teacher of `cfg` has another one; None
    where it has the student's, or where its Hugging Face folder holds no tokenizer.json to tell
    (shapes alone: a config.json)."""
    if is_hf_checkpoint(cfg) and not (Path(cfg.teacher.path) / "tokenizer.json").is_file():
        return None
    student = load_tokenizer(tokenizer_spec(cfg))
    teacher = teacher_tokenizer(cfg, student)
    return None if teacher is None else (student, teacher)


def _cross_tokenizer_teacher(cfg: Config, model: PureModel, teacher_cfg: ModelConfig,
                             student: Tokenizer, teacher: Tokenizer,
                             logits_sharding: Any) -> CrossTokenizerTeacher:
    """The teacher of another tokenizer as `kd_jax.teacher.cross.cross_tokenizer_teacher` makes
    it for a run, from the two tokenizers alone: what the loss reads of the two vocabularies,
    and zeros for the fields the batch carries (`kd_jax.align.rows.teacher_fields`): its rows of
    `data.teacher_seq_len` tokens, and per student position `teacher_index` (and, for
    `loss.cross_vocab bytes`, the back-off fields)."""
    for term, on in (("loss.hidden_weight", cfg.loss.hidden_weight > 0),
                     ("loss.attention_weight", cfg.loss.attention_weight > 0)):
        if on:
            raise ConfigError(f"{term} needs a teacher with the student's tokenizer; this "
                              f"teacher's ({teacher.description}) is another")
    teacher_seq_len = cfg.data.teacher_seq_len
    if not teacher_seq_len:
        raise ConfigError(
            f"kd-jax plan needs data.teacher_seq_len for a teacher of another tokenizer "
            f"({teacher.description}): 0 sizes its rows from the first rows of the data, which "
            "plan does not read (a run's start-up line says the length it takes: rows of N "
            "teacher tokens)")
    if teacher_seq_len > teacher_cfg.max_seq_len:
        raise ConfigError(f"data.teacher_seq_len ({teacher_seq_len}) exceeds the teacher's "
                          f"max_seq_len ({teacher_cfg.max_seq_len})")
    _, buckets = vocabulary_of(student, teacher, teacher_cfg.vocab_size, cfg.model.vocab_size)
    backoff = cfg.loss.cross_vocab == "bytes"
    byte_tables = (ByteTables.of(teacher.token_bytes(), student.token_bytes(),
                                 teacher_cfg.vocab_size, cfg.model.vocab_size)
                   if backoff else None)
    per_position = ("teacher_index", *(BACKOFF_KEYS if backoff else ()))

    def placeholder_fields(rows: np.ndarray, batch: dict) -> dict[str, np.ndarray]:
        teacher_rows = {key: np.zeros((len(rows), teacher_seq_len), np.int32)
                        for key in TEACHER_KEYS}
        return {**teacher_rows, **{key: np.zeros(batch["tokens"].shape, np.int32)
                                   for key in per_position}}

    return CrossTokenizerTeacher(model, buckets, cfg.loss.cross_vocab, teacher.vocab_size,
                                 logits_sharding, placeholder_fields, byte_tables=byte_tables)


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
    teacher_rows = (f" (and the teacher's rows of {figures['teacher_seq_len']} tokens)"
                    if figures.get("teacher_seq_len") else "")
    lines = [f"per device, {figures['devices']} devices, mesh {figures['mesh']}; batch "
             f"{figures['batch_size']} x {figures['seq_len']} tokens{teacher_rows} in "
             f"{figures['microbatches']} microbatches"]
    lines += [f"  {label:20s} {_size(figures[key]):>12s}" for label, key in rows]
    if figures.get("trainable_params", figures.get("params")) != figures.get("params"):
        lines.append(f"  trained: {figures['trainable_params']:,} of the student's "
                     f"{figures['params']:,} parameters (LoRA adapters; the base frozen)")
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
