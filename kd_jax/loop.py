"""The training loop: data, step, checkpoints and metrics, composed top to bottom.

`run(config, mode)` serves `kd-jax train` (hard labels) and `kd-jax distill` (a frozen teacher).
Everything a user can get wrong is checked before the run directory is touched; then the loop is
a plain `for step in ...:` with periodic logging, evaluation and checkpoints. A run directory
with a checkpoint resumes from it: its first step is the checkpoint's step + 1.

Run directory:
    config.yaml     the resolved config of the run
    run.json        what later commands need to know (mode, tokenizer, parameter counts)
    metrics.jsonl   one JSON object per log interval and per evaluation
    report.json     the final evaluation
    checkpoints/    orbax, the student only
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kd_jax import cache_store
from kd_jax import config as config_lib
from kd_jax import data as data_lib
from kd_jax.config import Config, ConfigError


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite; the message names the step."""


class Preempted(RuntimeError):
    """SIGTERM arrived (a preemptible slot ending): the current step was checkpointed."""


class _PreemptionSignal:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


@dataclasses.dataclass
class RunData:
    tokenizer: Any
    train: data_lib.Packed
    heldout: data_lib.Packed
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# Checks and loading that happen before anything is written.


def prepare_data(cfg: Config) -> RunData:
    tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})")
    if cfg.data.source == "cache":  # the token rows of an imported cache
        from kd_jax import cache_import

        train, heldout = cache_import.load_rows(cfg.cache.dir, tokenizer)
        if train.seq_len != cfg.data.seq_len:
            raise ConfigError(f"cache {cfg.cache.dir} holds rows of {train.seq_len} tokens; "
                              f"set data.seq_len={train.seq_len} (got {cfg.data.seq_len})")
    else:
        train_docs, heldout_docs = data_lib.load_documents(cfg.data)
        train = data_lib.pack(train_docs, tokenizer, cfg.data.seq_len)
        heldout = data_lib.pack(heldout_docs, tokenizer, cfg.data.seq_len)
    if train.n_rows == 0 or not train.loss_mask.any():
        raise ConfigError(f"the training data of data.path '{cfg.data.path}' is empty")
    return RunData(tokenizer, train, heldout, data_lib.fingerprint(cfg.data, tokenizer))


def read_run(run_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The config and run.json of an existing run directory."""
    run_dir = Path(run_dir)
    config_path, info_path = run_dir / "config.yaml", run_dir / "run.json"
    if not config_path.is_file() or not info_path.is_file():
        raise ConfigError(f"{run_dir} is not a kd-jax run directory (no config.yaml/run.json)")
    raw = yaml.safe_load(config_path.read_text())
    return config_lib.from_dict(raw), json.loads(info_path.read_text())


def teacher_step(cfg: Config) -> int:
    """The latest checkpoint step of the teacher run `teacher.path`."""
    from kd_jax import checkpoint

    path = Path(cfg.teacher.path)
    if not path.is_dir():
        raise ConfigError(f"teacher.path '{path}' does not exist")
    step = checkpoint.latest_step(path)
    if step is None or not (path / "run.json").is_file():
        raise ConfigError(f"teacher.path '{path}' has no checkpoint")
    return step


def load_teacher(cfg: Config, tokenizer, mesh: Any = None) -> tuple[Any, Any, Any]:
    """The frozen teacher named by `teacher.source`: (model, params, model config).

    With a `mesh`, the parameters are read straight into the shardings of `mesh.teacher_layout`
    (each process reads only its own shards); without one, onto the default device.
    """
    from kd_jax import checkpoint
    from kd_jax import step as step_lib

    path = Path(cfg.teacher.path)
    step = teacher_step(cfg)
    teacher_cfg, info = read_run(path)
    if info["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise ConfigError(
            f"teacher tokenizer ({info['tokenizer']}, {info['tokenizer_vocab_size']} tokens) "
            f"differs from the student's ({cfg.data.tokenizer}, {tokenizer.vocab_size} tokens)")
    model_cfg = dataclasses.replace(teacher_cfg.model, dtype=cfg.teacher.dtype, remat=False)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the teacher's "
                          f"max_seq_len ({model_cfg.max_seq_len})")
    model, abstract = step_lib.abstract_model(model_cfg)
    shardings = None
    if mesh is not None:
        import jax

        from kd_jax import sharding
        from kd_jax.model import logical_axes

        rules = sharding.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules,
                                   "mesh.teacher_rules")
        shardings = sharding.param_shardings(logical_axes(model.template), rules, mesh, abstract)
        abstract = jax.tree.map(
            lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            abstract, shardings)
    params = checkpoint.restore_params(path, abstract, step)
    if cfg.teacher.dtype == "bfloat16":
        import jax
        import jax.numpy as jnp

        params = jax.jit(lambda tree: jax.tree.map(lambda p: p.astype(jnp.bfloat16), tree),
                         out_shardings=shardings)(params)
    return model, params, model_cfg


def _names_a_teacher_run(cfg: Config) -> bool:
    """A teacher checkpoint to load: the teacher itself, or the one a cache was built from."""
    return cfg.teacher.source == "checkpoint" or (
        cfg.teacher.source == "cache" and bool(cfg.teacher.path))


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Resuming needs the same model, data, loss, optimizer, teacher and batch."""
    if not (run_dir / "config.yaml").is_file():
        return
    saved, _ = read_run(run_dir)
    for section in ("model", "data", "loss", "optimizer", "teacher", "cache"):
        old, new = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(
            getattr(cfg, section))
        for key in new:
            if old[key] != new[key]:
                raise ConfigError(
                    f"{run_dir} was started with {section}.{key}={old[key]!r}, not "
                    f"{new[key]!r}: use a new train.run_dir")
    for key in ("batch_size", "seed"):
        if getattr(saved.train, key) != getattr(cfg.train, key):
            raise ConfigError(f"{run_dir} was started with train.{key}="
                              f"{getattr(saved.train, key)}: use a new train.run_dir")


# ---------------------------------------------------------------------------------------------
# The run.


def _log(message: str) -> None:
    """Print a line above the progress bar; in a multi-host run, on process 0 only."""
    import jax
    from tqdm import tqdm

    if jax.process_index() == 0:
        tqdm.write(message)


def _summarize_memory(compiled) -> str:
    parts = []
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            parts.append(f"{cost['flops'] / 1e9:.2f} GFLOP/step")
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        pass
    memory = compiled.memory_analysis()
    if memory is not None:
        mib = 1 << 20
        parts.append(
            f"arguments {memory.argument_size_in_bytes / mib:.1f} MiB, "
            f"outputs {memory.output_size_in_bytes / mib:.1f} MiB, "
            f"temporaries {memory.temp_size_in_bytes / mib:.1f} MiB per device")
    return "; ".join(parts)


def run(cfg: Config, mode: str) -> dict[str, Any]:
    """Train (`mode='train'`) or distill (`mode='distill'`) as `cfg` says; returns the report."""
    if mode == "distill" and cfg.teacher.source == "none":
        raise ConfigError("kd-jax distill needs teacher.source: checkpoint (with teacher.path) "
                          "or cache (with cache.dir)")
    run_dir = Path(cfg.train.run_dir)
    check_resume(cfg, run_dir)
    run_data = prepare_data(cfg)

    from kd_jax import sharding

    sharding.initialize_distributed(cfg.distributed)  # before anything else touches JAX

    import jax

    from kd_jax import checkpoint, losses
    from kd_jax import evaluate as evaluate_lib
    from kd_jax import step as step_lib
    from kd_jax.model import count_params, logical_axes

    main_process = jax.process_index() == 0
    global_batch = cfg.train.batch_size
    microbatch = global_batch // cfg.train.microbatches

    # Where every array lies: the student's state and the teacher's parameters by their own
    # rules, the batch split over data x fsdp. One device gives a mesh of one.
    student_rules = sharding.rules_for(cfg.mesh.student_layout, cfg.mesh.student_rules,
                                       "mesh.student_rules")
    sharding.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules, "mesh.teacher_rules")
    mesh = sharding.make_mesh(cfg.mesh)
    batch_shardings = sharding.batch_sharding(mesh, global_batch)
    sharding.batch_sharding(mesh, microbatch, what="train.batch_size / train.microbatches")

    # A teacher named in a `train` config is not trained against; evaluations compare with it.
    # From a cache, the step needs no teacher; one named by teacher.path is evaluated beside.
    from_cache = cfg.teacher.source == "cache"
    teacher, teacher_params, teacher_cfg = None, None, None
    if _names_a_teacher_run(cfg):
        teacher, teacher_params, teacher_cfg = load_teacher(cfg, run_data.tokenizer, mesh)
    step_teacher, step_teacher_params = (teacher, teacher_params) if (
        mode == "distill" and not from_cache) else (None, None)
    cache_mode, targets = None, None
    if from_cache:
        from kd_jax import cache as cache_lib

        teacher_fingerprint = cache_lib.teacher_fingerprint(
            cfg.teacher.path, teacher_step(cfg)) if cfg.teacher.path else None
        manifest, hashes = cache_lib.open_for_training(
            cfg, run_data.tokenizer, run_data.train, teacher_fingerprint)
        if mode == "distill":
            cache_mode = manifest["mode"]
            targets = cache_lib.TargetBatches(cfg.cache.dir, hashes)
    student, abstract_params = step_lib.abstract_model(cfg.model)
    tx, schedule = step_lib.make_optimizer(cfg.optimizer, cfg.train.steps)
    param_shardings = sharding.param_shardings(
        logical_axes(student.template), student_rules, mesh, abstract_params)
    abstract_state = jax.eval_shape(
        lambda params: step_lib.init_state(params, tx, cfg.train.seed), abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, abstract_params, param_shardings,
                                              mesh)
    teacher_shardings = jax.tree.map(lambda p: p.sharding, teacher_params)
    logits_shardings = (sharding.logits_sharding(mesh, student_rules, cfg.model.vocab_size),
                        None)
    if step_teacher is not None:
        teacher_rules = sharding.rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules)
        logits_shardings = (logits_shardings[0], sharding.logits_sharding(
            mesh, teacher_rules, teacher_cfg.vocab_size))
    valid_vocab = run_data.tokenizer.vocab_size
    update = step_lib.make_update(
        student, step_teacher, tx, schedule, cfg.loss, cfg.train.microbatches, valid_vocab,
        logits_shardings, cache_mode)
    batches = data_lib.Batches(run_data.train, global_batch, cfg.train.seed)
    # This process loads only the rows of each global batch that its own devices hold.
    train_positions = sharding.batch_positions(batch_shardings, global_batch)
    eval_positions = sharding.batch_positions(batch_shardings, microbatch)

    def place(local: dict[str, np.ndarray], rows: int) -> dict[str, Any]:
        return {key: jax.make_array_from_process_local_data(
            batch_shardings, value, (rows, *value.shape[1:])) for key, value in local.items()}

    def host_batch(step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch (and their cached targets): numpy."""
        local = batches.at(step, train_positions)
        if targets is not None:
            cached = targets.read(batches.rows(step, train_positions))
            local.update({losses.TARGET_PREFIX + key: value for key, value in cached.items()})
        return local

    def place_eval(batch: dict[str, np.ndarray]):
        return place({key: value[eval_positions] for key, value in batch.items()}, microbatch)

    # Everything is checked: from here on the run directory is written.
    info = {
        "mode": mode,
        "tokenizer": cfg.data.tokenizer,
        "tokenizer_fingerprint": run_data.tokenizer.fingerprint,
        "tokenizer_vocab_size": run_data.tokenizer.vocab_size,
        "data_fingerprint": run_data.fingerprint,
        "student_params": count_params(abstract_params),
        "teacher_params": count_params(teacher_params) if teacher_params is not None else None,
    }
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    checkpointer = checkpoint.Checkpointer(run_dir, cfg.train.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state, meta = checkpointer.restore(start, abstract_state, state_shardings)
        if meta["data_position"] != batches.position(start):
            raise ConfigError(f"checkpoint {start} in {run_dir} is at data position "
                              f"{meta['data_position']}, expected {batches.position(start)}")
        if start < cfg.train.steps:
            _log(f"resuming from checkpoint {start}: first step {start + 1}")
        else:
            _log(f"{run_dir} already finished {start} of {cfg.train.steps} steps")
    else:
        state = step_lib.init_state_on(cfg.model, tx, cfg.train.seed, state_shardings)

    # The state is donated: its buffers are reused for the next state (no second copy in memory).
    jitted = jax.jit(
        update, donate_argnums=(0,),
        in_shardings=(state_shardings, teacher_shardings if step_teacher is not None else None,
                      batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)))
    abstract_batch = {key: jax.ShapeDtypeStruct((global_batch, *value.shape[1:]), value.dtype,
                                                sharding=batch_shardings)
                      for key, value in host_batch(start).items()}
    compiled = jitted.lower(state, step_teacher_params, abstract_batch).compile()
    _log(f"compiled {mode} step on {jax.device_count()} devices ({jax.process_count()} "
         f"processes, mesh {dict(mesh.shape)}): {_summarize_memory(compiled)}")
    eval_fn = jax.jit(step_lib.make_eval_fn(student, teacher, valid_vocab),
                      out_shardings=sharding.replicated(mesh))
    byte_lengths = run_data.tokenizer.byte_lengths()

    def evaluate(step: int) -> dict[str, dict]:
        result = evaluate_lib.evaluate(
            eval_fn, state.params, teacher_params, run_data.heldout, byte_lengths,
            microbatch, cfg.train.eval_sequences, place=place_eval)
        if main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "eval": result}) + "\n")
        student_eval = result["student"]
        _log(f"eval step {step}: student {student_eval['bits_per_byte']:.4f} bits/byte, "
             f"accuracy {student_eval['accuracy']:.4f}")
        return result

    last_step = min(cfg.train.steps, cfg.train.stop_at) if cfg.train.stop_at else cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    clock = _StepClock(tokens_per_step)
    pending: list[dict] = []  # metrics still on device
    fetched: list[dict] = []  # metrics on the host, not yet logged

    def sync() -> None:
        """Fetch pending metrics; the time since the previous sync is training time."""
        fetched.extend(jax.device_get(pending))  # note: a host sync point
        clock.stop(len(pending))
        pending.clear()

    from tqdm import tqdm

    # One process: SIGTERM sets a flag. Several: JAX's preemption service (started by
    # jax.distributed) spreads the notice and names one step at which every process saves.
    multi_process = jax.process_count() > 1
    preemption = _PreemptionSignal() if not multi_process else None
    if multi_process:
        from jax.experimental import multihost_utils
    # Batches (and cached targets) are read on a background thread, a few steps ahead.
    host_batches = cache_store.Prefetcher(host_batch, range(start, last_step),
                                          depth=cfg.cache.prefetch)
    bar = tqdm(total=cfg.train.steps, initial=start,
               disable=not (cfg.train.progress and main_process),
               unit="step", dynamic_ncols=True, leave=False)
    last_eval = None
    try:
        clock.start()
        for step in range(start + 1, last_step + 1):
            batch = place(next(host_batches), global_batch)
            state, metrics = compiled(state, step_teacher_params, batch)
            pending.append(metrics)
            bar.update(1)
            if multi_process:
                preempted = multihost_utils.reached_preemption_sync_point(step)
            else:
                preempted = preemption.requested  # read once: the signal may land mid-step
            log_now = step % cfg.train.log_every == 0 or step == last_step
            eval_now = cfg.train.eval_every and step % cfg.train.eval_every == 0
            save_now = step % cfg.train.checkpoint_every == 0 or step == last_step or preempted
            if not (log_now or eval_now or save_now):
                continue
            sync()
            if log_now:
                record = _log_record(step, fetched, clock.tokens_per_second_since_log())
                fetched.clear()
                if not math.isfinite(record["loss"]):
                    bad = int(jax.device_get(state.nonfinite_step))
                    raise NonFiniteError(f"non-finite loss at step {bad if bad > 0 else step}")
                if main_process:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                shown = {"loss": record["loss"], "ce": record["ce"]}
                if "kd" in record:
                    shown[cfg.loss.divergence] = record["kd"]
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}
                                | {"tok/s": f"{record['tokens_per_second']:,.0f}"})
            if eval_now:
                last_eval = (step, evaluate(step))
            if save_now:
                bad = int(jax.device_get(state.nonfinite_step))
                if bad > 0:
                    raise NonFiniteError(f"non-finite loss at step {bad}")
                checkpointer.save(step, state, {
                    "step": step, "data_position": batches.position(step),
                    "rng": np.asarray(jax.device_get(state.rng)).tolist(),
                    "tokenizer_fingerprint": run_data.tokenizer.fingerprint})
            if preempted:
                checkpointer.wait()
                raise Preempted(f"preempted after step {step}: checkpoint saved in {run_dir}; "
                                "rerun to resume")
            clock.start()
    finally:
        if preemption is not None:
            preemption.restore()
        host_batches.close()
        if targets is not None:
            targets.close()
        bar.close()
        checkpointer.close()

    if last_step < cfg.train.steps:
        _log(f"stopped after step {last_step} of {cfg.train.steps}; rerun to continue")
        return {"mode": mode, "run_dir": str(run_dir), "steps": last_step}
    final_step = max(start, cfg.train.steps)
    result = last_eval[1] if last_eval and last_eval[0] == final_step else evaluate(final_step)
    tokens_per_second = clock.overall_tokens_per_second()
    if tokens_per_second is None and (run_dir / "report.json").is_file():
        # Nothing left to train: keep the throughput measured by the run that trained.
        previous = json.loads((run_dir / "report.json").read_text())
        tokens_per_second = previous.get("student", {}).get("tokens_per_second")
    report = {
        "mode": mode,
        "run_dir": str(run_dir),
        "steps": final_step,
        "student": dict(result["student"], params=info["student_params"],
                        tokens_per_second=tokens_per_second),
    }
    if "teacher" in result:
        report["teacher"] = dict(result["teacher"], params=info["teacher_params"])
    if main_process:
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


class _StepClock:
    """Training time between host sync points, excluding evaluation and checkpoint saves."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.seconds, self.steps = 0.0, 0
        self._since_log = (0.0, 0)
        self._started = time.perf_counter()

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, steps: int) -> None:
        elapsed = time.perf_counter() - self._started
        self.seconds += elapsed
        self.steps += steps
        seconds, count = self._since_log
        self._since_log = (seconds + elapsed, count + steps)

    def tokens_per_second_since_log(self) -> float:
        seconds, count = self._since_log
        self._since_log = (0.0, 0)
        return self.tokens_per_step * count / seconds if seconds else float("nan")

    def overall_tokens_per_second(self) -> float | None:
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else None


def _log_record(step: int, fetched: list[dict], tokens_per_second: float) -> dict[str, float]:
    """Average the metric sums fetched since the last log over their valid tokens."""
    totals = {k: float(np.sum([m[k] for m in fetched])) for k in fetched[0]}
    tokens = max(totals["tokens"], 1.0)
    record = {"step": step, "loss": totals["loss_sum"] / tokens}
    for key in ("kd", "ce"):
        if f"{key}_sum" in totals:
            record[key] = totals[f"{key}_sum"] / tokens
    record["grad_norm"] = float(fetched[-1]["grad_norm"])
    record["lr"] = float(fetched[-1]["lr"])
    record["tokens_per_second"] = tokens_per_second
    return record


def evaluate_run(run_dir: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Evaluate the latest checkpoint of a run (and its teacher, for a distillation run)."""
    import jax

    from kd_jax import checkpoint
    from kd_jax import evaluate as evaluate_lib
    from kd_jax import step as step_lib

    run_dir = Path(run_dir)
    cfg, info = read_run(run_dir)
    config_lib.apply_overrides(cfg, overrides)
    config_lib.validate(cfg)
    step = checkpoint.latest_step(run_dir)
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint to evaluate")
    run_data = prepare_data(cfg)
    teacher, teacher_params = None, None
    if _names_a_teacher_run(cfg):
        teacher, teacher_params, _ = load_teacher(cfg, run_data.tokenizer)
    student, abstract = step_lib.abstract_model(cfg.model)
    params = checkpoint.restore_params(run_dir, abstract, step)
    eval_fn = jax.jit(step_lib.make_eval_fn(student, teacher, run_data.tokenizer.vocab_size))
    result = evaluate_lib.evaluate(
        eval_fn, params, teacher_params, run_data.heldout, run_data.tokenizer.byte_lengths(),
        cfg.train.batch_size // cfg.train.microbatches, cfg.train.eval_sequences)
    previous = {}
    if (run_dir / "report.json").is_file():
        previous = json.loads((run_dir / "report.json").read_text())
    report = {"mode": info["mode"], "run_dir": str(run_dir), "steps": step,
              "student": dict(result["student"], params=info["student_params"],
                              tokens_per_second=previous.get("student", {}).get(
                                  "tokens_per_second"))}
    if "teacher" in result:
        report["teacher"] = dict(result["teacher"], params=info["teacher_params"])
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
