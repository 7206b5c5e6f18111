"""`kd-jax eval --tasks FILE.jsonl`: a run's student and teachers, or a Hugging Face checkpoint
directory (an export), scored on multiple-choice task files (`kd_jax.eval.tasks`).

A run's models are scored on its evaluation mesh, batch by batch as held-out evaluation places
them (`train.batch_size / train.microbatches` rows); a checkpoint directory data-parallel over
every device, in float32. Each model reads the task with its own tokenizer. Every request is
tokenized and checked before any model runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from kd_jax.config import ConfigError, MeshConfig, ModelConfig
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer
from kd_jax.eval.tasks import (
    Request,
    Task,
    choice_metrics,
    encode_requests,
    make_score_fn,
    read_task_file,
    score_requests,
)
from kd_jax.models.pretrained import load_params, open_checkpoint
from kd_jax.models.pure import PureModel, abstract_model, logical_axes
from kd_jax.parallel import mesh as mesh_lib
from kd_jax.parallel.hosts import BatchPlacement
from kd_jax.train import builder

ROWS_PER_DEVICE = 8  # a checkpoint directory's batch: this many rows per device


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A model as task evaluation scores it: with its tokenizer and its context length."""

    name: str  # student, teacher, teachers[i]; a checkpoint directory's: model
    model: PureModel
    tokenizer: Tokenizer
    max_seq_len: int
    params: Any = None  # placed; None until loaded


def read_tasks(paths: Sequence[str | Path]) -> list[Task]:
    """Every task file, read and checked; two files of one name are refused (the name is the
    key of the results)."""
    tasks, seen = [], {}
    for path in paths:
        task = read_task_file(path)
        if task.name in seen:
            raise ConfigError(f"--tasks: {seen[task.name]} and {task.path} are both task "
                              f"'{task.name}': a task is named by its file")
        seen[task.name] = task.path
        tasks.append(task)
    return tasks


def run_scorers(built: builder.Run) -> list[Scorer]:
    """The student (parameters to come) and every teacher the run loaded, as evaluated."""
    scorers = [Scorer("student", built.student, built.data.tokenizer,
                      built.cfg.model.max_seq_len)]
    for index, loaded in enumerate(built.loaded_teachers):
        if loaded is not None:
            name = f"teachers[{index}]" if built.cfg.teachers else "teacher"
            scorers.append(Scorer(name, loaded.model, loaded.tokenizer or built.data.tokenizer,
                                  loaded.config.max_seq_len, loaded.params))
    return scorers


def encode_all(tasks: Sequence[Task], scorers: Sequence[Scorer]
               ) -> dict[tuple[str, str], list[Request]]:
    """(task, model) -> its requests, each model's tokenizer's; checked before anything runs."""
    return {(task.name, scorer.name): encode_requests(task, scorer.tokenizer, scorer.max_seq_len)
            for scorer in scorers for task in tasks}


def score_tasks(tasks: Sequence[Task], scorers: Sequence[Scorer],
                requests: dict[tuple[str, str], list[Request]], rows: int,
                place: Callable | None, out_sharding: Any) -> dict[str, dict]:
    """task name -> {"file", "examples", and per model name its acc, acc_norm and their
    standard errors}."""
    results = {task.name: {"file": str(task.path), "examples": len(task.examples)}
               for task in tasks}
    for scorer in scorers:
        score_fn = jax.jit(make_score_fn(scorer.model), out_shardings=out_sharding)
        for task in tasks:
            loglik = score_requests(score_fn, scorer.params, requests[task.name, scorer.name],
                                    rows, scorer.max_seq_len, place)
            results[task.name][scorer.name] = choice_metrics(task, loglik)
    return results


def evaluate_run_tasks(built: builder.Run, scorers: list[Scorer], requests: dict,
                       tasks: Sequence[Task], student_params: Any) -> dict[str, dict]:
    """The run's models on `tasks` (the student with `student_params`), on its evaluation mesh."""
    scorers = [dataclasses.replace(scorer, params=student_params)
               if scorer.name == "student" else scorer for scorer in scorers]
    return score_tasks(tasks, scorers, requests, built.eval_placement.rows,
                       builder.eval_place(built), mesh_lib.replicated(built.mesh))


def evaluate_checkpoint_tasks(path: str | Path, task_files: Sequence[str | Path],
                              tokenizer: str | None = None) -> dict[str, Any]:
    """A Hugging Face checkpoint directory scored on `task_files` with its tokenizer.json (or
    `tokenizer`: "byte" or a tokenizer.json); {"checkpoint", "tasks"}."""
    path = Path(path)
    tasks = read_tasks(task_files)
    ckpt = open_checkpoint(path)
    cfg = ckpt.model_config(ModelConfig(dtype="float32", param_dtype="float32"))
    if tokenizer is None:
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path} has no tokenizer.json: name its tokenizer with "
                              "--tokenizer (byte, or a tokenizer.json)")
        tokenizer = str(path / "tokenizer.json")
    loaded_tokenizer = load_tokenizer(tokenizer)
    if loaded_tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{loaded_tokenizer.description} has {loaded_tokenizer.vocab_size} "
                          f"ids, more than the {cfg.vocab_size} rows of {path}'s embedding")
    model, abstract = abstract_model(cfg)
    scorer = Scorer("model", model, loaded_tokenizer, cfg.max_seq_len)
    requests = encode_all(tasks, [scorer])
    mesh = mesh_lib.make_mesh(MeshConfig())  # data-parallel over every device
    shardings = mesh_lib.param_shardings(logical_axes(model.template),
                                         mesh_lib.rules_for("replicated"), mesh, abstract)
    scorer = dataclasses.replace(scorer, params=load_params(ckpt, cfg, abstract, shardings))
    placement = BatchPlacement.on(mesh, ROWS_PER_DEVICE * jax.device_count())
    results = score_tasks(tasks, [scorer], requests, placement.rows,
                          lambda batch: placement.place(placement.share(batch)),
                          mesh_lib.replicated(mesh))
    return {"checkpoint": str(path), "tasks": results}
