"""The training loop: `kd-jax train` (hard labels) and `kd-jax distill` (a frozen teacher).

`run(config, mode)` builds the run (`kd_jax.train.builder`: everything a user can get wrong is
checked before the run directory is touched), then is a plain `for step in ...:` with periodic
logging, evaluation and checkpoints. A run directory with a checkpoint resumes from it: its first
step is the checkpoint's step + 1. `evaluate_checkpoint` is `kd-jax eval`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from kd_jax import checkpoint
from kd_jax import config as config_lib
from kd_jax import run_dir as run_dir_lib
from kd_jax.config import ConfigError
from kd_jax.data.prefetch import Prefetcher
from kd_jax.align.rows import teacher_rows, teacher_seq_len_for
from kd_jax.eval.evaluate import OTHER_ROWS, OtherTokenizer, evaluate, make_eval_fn
from kd_jax.eval.report import build_report
from kd_jax.models import attention
from kd_jax.models.pure import abstract_model
from kd_jax.models.quantize import unquantized
from kd_jax.parallel.hosts import is_main_process
from kd_jax.parallel.mesh import mesh_shape, replicated
from kd_jax.teacher.cross import vocabulary_of
from kd_jax.train import builder, tensorboard
from kd_jax.train import tasks as tasks_lib
from kd_jax.train import step as step_lib
from kd_jax.train.plan import figures_line, memory_figures
from kd_jax.train.preemption import Preemption
from kd_jax.train.progress import StepClock, describe_compiled, log, log_record, progress_bar


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite; the message names the step."""


def run(cfg: config_lib.Config, mode: str, preemption: Preemption | None = None
        ) -> dict[str, Any]:
    """Train (`mode='train'`) or distill (`mode='distill'`) as `cfg` says; returns the report.

    `preemption` is the caller's, made before it imported JAX; else one is made now: from here
    on a signal during start-up stops the run, not the process."""
    preemption = preemption or Preemption()
    try:
        return _run(cfg, mode, preemption)
    finally:
        preemption.close()


def _run(cfg: config_lib.Config, mode: str, preemption: Preemption) -> dict[str, Any]:
    built = builder.build(cfg, mode)
    cfg = built.cfg  # resolved: the tokenizer a file, the student's architecture spelled out
    run_dir, train = Path(cfg.train.run_dir), cfg.train
    main = is_main_process()
    info = built.info()
    if main:  # everything is checked: from here on the run directory is written
        run_dir_lib.write_run(run_dir, cfg, info)
    checkpointer = checkpoint.Checkpointer(run_dir, train.keep_checkpoints)
    state, start = builder.restore_or_init(built, checkpointer, log)
    if main:
        run_dir_lib.drop_metrics_after(run_dir, start)
    if start:
        log(f"resuming from checkpoint {start}: first step {start + 1}" if start < train.steps
            else f"{run_dir} already finished {start} of {train.steps} steps")
    teacher_params = built.teacher_params
    abstract_batch = built.placement.abstract(built.host_batch(start))
    update = built.update_fn().lower(state, teacher_params, abstract_batch).compile()
    log(attention.describe(cfg.model, cfg.data.seq_len, jax.default_backend()))
    if cfg.teachers:
        log(built.teacher_dtype_why)
    elif built.loaded_teacher is not None:
        log(f"teacher {cfg.teacher.dtype}: {built.teacher_dtype_why}")
    if getattr(built.teacher, "note", ""):
        log(built.teacher.note)
    log(f"compiled {mode} step on {jax.device_count()} devices ({jax.process_count()} "
        f"processes, mesh {dict(built.mesh.shape)}): {describe_compiled(update)}; "
        f"{figures_line(memory_figures(update, state, teacher_params, abstract_batch))}")
    evaluator = _evaluator(built)
    # Scalars for TensorBoard, written by a thread of their own; what an earlier attempt wrote
    # from this attempt's first step on is hidden.
    board = tensorboard.Board(run_dir, start + 1) if main and train.tensorboard else None

    def record_metrics(record: dict) -> None:
        """A line of metrics.jsonl (and scalars for TensorBoard)."""
        if main:
            run_dir_lib.append_metrics(run_dir, record)
            if board is not None:
                board.add(record)

    def evaluate_now(step: int) -> dict[str, dict]:
        result = evaluator(state.params)
        record_metrics({"step": step, "eval": result})
        log(f"eval step {step}: student {result['student']['bits_per_byte']:.4f} bits/byte, "
            f"accuracy {result['student']['accuracy']:.4f}")
        return result

    try:  # the board is closed however the run ends
        last_step = min(train.steps, train.stop_at) if train.stop_at else train.steps
        clock = StepClock(train.batch_size * cfg.data.seq_len)
        pending: list[dict] = []  # metrics still on device
        fetched: list[dict] = []  # metrics on the host, not yet logged
        # Batches (and cached targets) are read on a background thread, a few steps ahead.
        host_batches = Prefetcher(built.host_batch, range(start, last_step),
                                  depth=cfg.cache.prefetch)
        bar = progress_bar(train.steps, start, train.progress, unit="step")
        last_eval = None
        try:
            if preemption.requested:
                raise preemption.stopped(f"stopped before step {start + 1}: nothing new to save; "
                                         "rerun to continue")
            clock.start()
            for step in range(start + 1, last_step + 1):
                batch = built.placement.place(next(host_batches))
                state, metrics = update(state, teacher_params, batch)
                pending.append(metrics)
                bar.update(1)
                preempted = preemption.reached(step)
                log_now = step % train.log_every == 0 or step == last_step
                eval_now = train.eval_every and step % train.eval_every == 0
                save_now = step % train.checkpoint_every == 0 or step == last_step or preempted
                if not (log_now or eval_now or save_now):
                    continue
                fetched.extend(jax.device_get(pending))  # note: a host sync point
                clock.stop(len(pending))
                pending.clear()
                if train.on_nonfinite == "stop":
                    _stop_if_nonfinite(state, checkpointer)
                if log_now:
                    record = log_record(step, fetched, clock.tokens_per_second_since_log())
                    fetched.clear()
                    record_metrics(record)
                    shown = {"loss": record["loss"], "ce": record["ce"]}
                    if "kd" in record:
                        shown[cfg.loss.divergence] = record["kd"]
                    bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}
                                    | {"tok/s": f"{record['tokens_per_second']:,.0f}"})
                if eval_now:
                    last_eval = (step, evaluate_now(step))
                if save_now:
                    checkpointer.save(step, state, {
                        "step": step, "data_position": built.batches.position(step),
                        "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                        "tokenizer_fingerprint": built.data.tokenizer.fingerprint})
                if preempted:
                    checkpointer.wait()
                    raise preemption.stopped(f"preempted after step {step}: checkpoint saved in "
                                             f"{run_dir}; rerun to resume")
                clock.start()
        finally:
            host_batches.close()
            built.close()
            bar.close()
            checkpointer.close()

        if last_step < train.steps:
            log(f"stopped after step {last_step} of {train.steps}; rerun to continue")
            return {"mode": mode, "run_dir": str(run_dir), "steps": last_step}
        final_step = max(start, train.steps)
        result = (last_eval[1] if last_eval and last_eval[0] == final_step
                  else evaluate_now(final_step))
        tokens_per_second = clock.overall_tokens_per_second()
        if tokens_per_second is None:  # nothing left to train: keep what the training run measured
            tokens_per_second = _measured_throughput(run_dir)
        report = build_report(mode, run_dir, final_step, result, info, tokens_per_second)
        if main:
            run_dir_lib.write_report(run_dir, report)
        return report
    finally:
        if board is not None:
            board.close()


def _stop_if_nonfinite(state, checkpointer: checkpoint.Checkpointer) -> None:
    """Raise NonFiniteError naming the first step whose loss or gradient was not finite."""
    bad, term = (int(x) for x in jax.device_get((state.nonfinite_step, state.nonfinite_term)))
    if bad <= 0:
        return
    if term <= 0:
        what = "loss"
    else:
        trained = step_lib.trainable(state.params, state.aux)  # the gradients' tree
        path = jax.tree_util.tree_flatten_with_path(trained)[0][term - 1][0]
        what = "gradient of " + "/".join(str(key.key) for key in path if hasattr(key, "key"))
    checkpointer.wait()
    kept = checkpointer.latest_step()
    raise NonFiniteError(
        f"non-finite {what} at step {bad}: the update was not applied; stopped, "
        f"{f'checkpoint {kept} kept' if kept else 'no checkpoint saved'} "
        "(train.on_nonfinite=skip skips such steps instead)")


def evaluate_checkpoint(run_dir: str | Path, overrides: list[str] = (),
                        task_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """`kd-jax eval`: the latest checkpoint of a run (and its teacher), evaluated and reported;
    with `task_files`, scored on those tasks too (report.json's `tasks`). Task results of this
    checkpoint from an earlier `kd-jax eval --tasks` are kept."""
    run_dir = Path(run_dir)
    tasks = tasks_lib.read_tasks(task_files)
    cfg, info = run_dir_lib.read_run(run_dir)
    config_lib.apply_overrides(cfg, overrides)
    config_lib.validate(cfg)
    if not cfg.distributed.enabled and not any(item.startswith("mesh.") for item in overrides):
        cfg.mesh = _mesh_on_this_host(cfg.mesh)
    step = checkpoint.latest_step(run_dir)
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint to evaluate")
    built = builder.build(cfg, "eval")
    scorers = tasks_lib.run_scorers(built)
    requests = tasks_lib.encode_all(tasks, scorers)  # every task line checked before any run
    params = builder.restore_params(built, run_dir, step)
    result = _evaluator(built)(params)
    report = build_report(info["mode"], run_dir, step, result, info,
                          _measured_throughput(run_dir))
    earlier = run_dir_lib.read_report(run_dir) or {}
    if earlier.get("steps") == step and earlier.get("tasks"):
        report["tasks"] = earlier["tasks"]
    if tasks:
        report["tasks"] = {**report.get("tasks", {}), **tasks_lib.evaluate_run_tasks(
            built, scorers, requests, tasks, params)}
    if is_main_process():
        run_dir_lib.write_report(run_dir, report)
    return report


def _mesh_on_this_host(mesh: config_lib.MeshConfig) -> config_lib.MeshConfig:
    """The run's mesh, or, where it needs other devices than this host has, data parallelism
    over this host's devices (the checkpoint restores onto any mesh)."""
    try:
        mesh_shape(mesh, jax.device_count())
        return mesh
    except ConfigError:
        devices = jax.device_count()
        log(f"the run's mesh (data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor}) needs "
            f"other devices than the {devices} here: evaluating data-parallel over these")
        return dataclasses.replace(mesh, data=-1, fsdp=1, tensor=1)


def _evaluator(built: builder.Run):
    """evaluator(student_params) -> the held-out summary of the student (and its teachers)."""
    named = [(f"teachers[{i}]" if built.cfg.teachers else "teacher", loaded)
             for i, loaded in enumerate(built.loaded_teachers) if loaded is not None]
    models, params, others = {}, {}, {}
    for name, loaded in named:
        params[name] = loaded.params
        if loaded.tokenizer is None:
            models[name] = loaded.model
            continue
        # Another tokenizer: scored on rows of its own, compared where positions align.
        models[name] = OtherTokenizer(
            loaded.model, vocabulary_of(built.data.tokenizer, loaded.tokenizer,
                                        loaded.config.vocab_size, built.cfg.model.vocab_size)[1],
            loaded.tokenizer.byte_lengths(), loaded.tokenizer.vocab_size)
        others[name] = (loaded.tokenizer, _eval_teacher_seq_len(built, loaded))
    if not built.cfg.teachers and "teacher" in models and "teacher" not in others:
        models, params = models["teacher"], params["teacher"]  # one: as the step sees it
    eval_fn = jax.jit(make_eval_fn(built.student, models or None, built.valid_vocab),
                      out_shardings=replicated(built.mesh))
    byte_lengths = built.data.tokenizer.byte_lengths()
    place = builder.eval_place(built)

    def host_fields(batch: dict, starts: np.ndarray) -> dict:
        return {OTHER_ROWS: {name: {key: value for key, value in teacher_rows(
            batch, built.data.tokenizer, tokenizer, length, starts).items()
            if key != "same_next"} for name, (tokenizer, length) in others.items()}}

    # A quantized student (model.quantize) is what is served; its float master weights are
    # scored beside it (`student_float`), so a report says what the rounding costs.
    float_fn = None
    if unquantized(built.cfg.model) != built.cfg.model:
        float_fn = jax.jit(make_eval_fn(abstract_model(unquantized(built.cfg.model))[0], None,
                                        built.valid_vocab), out_shardings=replicated(built.mesh))

    def evaluator(student_params) -> dict[str, dict]:
        result = evaluate(eval_fn, student_params, params or None, built.data.heldout,
                          byte_lengths, built.eval_placement.rows,
                          built.cfg.train.eval_sequences, place=place,
                          host_fields=host_fields if others else None)
        if float_fn is not None:
            result["student_float"] = evaluate(
                float_fn, student_params, None, built.data.heldout, byte_lengths,
                built.eval_placement.rows, built.cfg.train.eval_sequences, place=place)["student"]
        return result

    return evaluator


def _eval_teacher_seq_len(built: builder.Run, loaded) -> int:
    """The row length of a teacher of another tokenizer on the held-out rows: as in training
    (`data.teacher_seq_len`, else sized from the first rows)."""
    if built.cfg.data.teacher_seq_len:
        return built.cfg.data.teacher_seq_len
    heldout = built.data.heldout
    first = np.arange(min(32, heldout.n_rows))
    return teacher_seq_len_for(heldout.take(first), built.data.tokenizer, loaded.tokenizer,
                               heldout.document_starts(first), loaded.config.max_seq_len)


def _measured_throughput(run_dir: Path) -> float | None:
    """The training throughput an earlier report of this run directory recorded."""
    previous = run_dir_lib.read_report(run_dir) or {}
    return previous.get("student", {}).get("tokens_per_second")
