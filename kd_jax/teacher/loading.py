"""Loading a teacher: the latest checkpoint of a `kd-jax train` run directory, or a Hugging Face
checkpoint directory (`teacher.source: hf`).

With a mesh, the parameters are read straight into the shardings of `mesh.teacher_layout` (each
process reads only its own shards); without one, onto the default device. A teacher's tokenizer
is compared with the student's before any logit is distilled: a run's by fingerprint, a
checkpoint's tokenizer.json token by token (`tokenizer_difference`). Where they differ, a
teacher that runs online is loaded with its own tokenizer (`LoadedTeacher.tokenizer`: the
student's rows are tokenized again for it, `kd_jax.align`); elsewhere that is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax import checkpoint
from kd_jax.checks import not_a_directory
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer
from kd_jax.models.pretrained import load_params, open_checkpoint, weight_digests
from kd_jax.models.pure import PureModel, abstract_model, logical_axes
from kd_jax.models.quantize import unquantized
from kd_jax.parallel.cpu import bfloat16_matmul_units, cpu_only
from kd_jax.parallel.mesh import param_shardings, rules_for
from kd_jax.run_dir import read_run


def teacher_dtype(cfg: Config, platform: str | None = None) -> str:
    """`teacher.dtype` made concrete for `platform` (`teacher_dtype_choice`)."""
    return teacher_dtype_choice(cfg, platform)[0]


def teacher_dtype_choice(cfg: Config, platform: str | None = None) -> tuple[str, str]:
    """(dtype, why) of the frozen teacher's parameters and forward pass on `platform` ("cpu",
    or an accelerator's name; None: "cpu" when JAX will run on the CPU, told without starting
    it). auto is float32 for a kd-jax run (its training precision); for a Hugging Face
    checkpoint, bfloat16 (what real teachers are published in, multiplied with float32
    accumulation) on an accelerator and on a CPU with bfloat16 matrix instructions, where it is
    about twice as fast as float32 (benchmarks/precompute_speed.py), and float32 on a CPU
    without them, where bfloat16 is emulated and slower."""
    if cfg.teacher.dtype != "auto":
        return cfg.teacher.dtype, "teacher.dtype"
    if not is_hf_checkpoint(cfg):
        return "float32", "auto: a kd-jax run's teacher keeps its training precision"
    platform = platform or ("cpu" if cpu_only() else "accelerator")
    if platform != "cpu":
        return "bfloat16", (f"auto on {platform}: the checkpoint's published precision, on the "
                            "matrix units")
    units = bfloat16_matmul_units()
    if units:
        return "bfloat16", (f"auto on a CPU with bfloat16 matrix instructions ({units}): "
                            "faster than float32, accumulated in float32")
    return "float32", ("auto on a CPU without bfloat16 matrix instructions: float32 is faster "
                       "there, and exact")


def is_hf_checkpoint(cfg: Config) -> bool:
    """Whether `teacher.path` is a Hugging Face checkpoint directory (`teacher.source: hf`, or
    the teacher a cache was built from), rather than a kd-jax run directory."""
    path = Path(cfg.teacher.path)
    return cfg.teacher.source == "hf" or (
        cfg.teacher.source == "cache" and (path / "config.json").is_file()
        and not (path / "config.yaml").is_file())


def latest_checkpoint(cfg: Config) -> int:
    """The latest checkpoint step of the teacher run `teacher.path`."""
    path = Path(cfg.teacher.path)
    if not path.is_dir():
        raise ConfigError(f"teacher.path '{path}' {not_a_directory(path)}")
    step = checkpoint.latest_step(path)
    if step is None or not (path / "run.json").is_file():
        raise ConfigError(f"teacher.path '{path}' has no checkpoint")
    return step


@dataclasses.dataclass
class LoadedTeacher:
    """A teacher's model and parameters (placed by `mesh.teacher_layout`)."""

    model: PureModel
    params: Any
    config: ModelConfig
    run_dir: str  # teacher.path
    step: int | None  # the checkpoint loaded (None: a Hugging Face checkpoint directory)
    # A Hugging Face checkpoint's weights files: name -> SHA-256 (a run records them).
    files: dict[str, str] | None = None
    # The teacher's own tokenizer where it is not the student's (None: the student's).
    tokenizer: Tokenizer | None = None


def load_teacher(cfg: Config, tokenizer: Tokenizer, mesh: Any = None,
                 run_dir: str | None = None, other_tokenizer: bool = False) -> LoadedTeacher:
    """The frozen teacher `teacher.path` names; a Hugging Face checkpoint's files are compared
    with those the run `run_dir` recorded (`check_teacher_files`). `other_tokenizer`: a teacher
    whose tokenizer is not `tokenizer` is loaded with its own, else refused."""
    if is_hf_checkpoint(cfg):
        return _load_hf_teacher(cfg, tokenizer, mesh, run_dir, other_tokenizer)
    path = Path(cfg.teacher.path)
    step = latest_checkpoint(cfg)
    teacher_cfg, info = read_run(path)
    own_tokenizer = None
    if info["tokenizer_fingerprint"] != tokenizer.fingerprint:
        difference = (f"teacher tokenizer ({info['tokenizer']}, {info['tokenizer_vocab_size']} "
                      f"tokens) differs from the student's ({cfg.data.tokenizer}, "
                      f"{tokenizer.vocab_size} tokens)")
        if not other_tokenizer:
            raise ConfigError(difference + OTHER_TOKENIZER_HINT)
        own_tokenizer = _run_tokenizer(path, info)
    # In float whatever model.quantize the run trained with (kd_jax.models.quantize).
    model_cfg = dataclasses.replace(unquantized(teacher_cfg.model), dtype=teacher_dtype(cfg),
                                    remat="none")
    model, abstract, shardings = teacher_model(cfg, model_cfg, mesh, own_tokenizer is not None)
    if shardings is not None:
        abstract = checkpoint.placed(abstract, shardings)
    params = checkpoint.restore_params(path, abstract, step)
    if teacher_dtype(cfg) == "bfloat16":
        params = jax.jit(lambda tree: jax.tree.map(lambda p: p.astype(jnp.bfloat16), tree),
                         out_shardings=shardings)(params)
    return LoadedTeacher(model, params, model_cfg, cfg.teacher.path, step,
                         tokenizer=own_tokenizer)


def teacher_tokenizer(cfg: Config, tokenizer: Tokenizer) -> Tokenizer | None:
    """The tokenizer of the teacher `cfg.teacher` names (checkpoint or hf), where it is not
    `tokenizer` (None where it is): read from its files, no weight loaded."""
    path = Path(cfg.teacher.path)
    if is_hf_checkpoint(cfg):
        if tokenizer_difference(path, "teacher.path", tokenizer) is None:
            return None
        return load_tokenizer(str(path / "tokenizer.json"))
    info = read_run(path)[1]
    if info["tokenizer_fingerprint"] == tokenizer.fingerprint:
        return None
    return _run_tokenizer(path, info)


# Where a teacher of another tokenizer is refused: what does take one.
OTHER_TOKENIZER_HINT = ("; a teacher with another tokenizer is distilled from by kd-jax distill "
                        "(online, or from a topk or full cache), without white-box terms or "
                        "on-policy rows")


def _run_tokenizer(path: Path, info: dict) -> Tokenizer:
    """The tokenizer a teacher run was trained with, as its run.json names it."""
    spec = info["tokenizer"]
    try:
        tokenizer = load_tokenizer(spec)
    except ConfigError as err:
        raise ConfigError(f"teacher.path '{path}': the run's tokenizer cannot be read "
                          f"({err})") from None
    if tokenizer.fingerprint != info["tokenizer_fingerprint"]:
        raise ConfigError(f"teacher.path '{path}': its tokenizer '{spec}' has changed since "
                          "the run was trained (its fingerprint differs from run.json's)")
    return tokenizer


def _load_hf_teacher(cfg: Config, tokenizer: Tokenizer, mesh: Any, run_dir: str | None,
                     other_tokenizer: bool) -> LoadedTeacher:
    ckpt = open_checkpoint(cfg.teacher.path)
    checkpoint_dir = Path(cfg.teacher.path)
    difference = tokenizer_difference(checkpoint_dir, "teacher.path", tokenizer)
    if difference is not None and not other_tokenizer:
        raise ConfigError(difference + OTHER_TOKENIZER_HINT)
    own_tokenizer = (load_tokenizer(str(checkpoint_dir / "tokenizer.json"))
                     if difference is not None else None)
    files = weight_digests(ckpt)
    if run_dir is not None:
        check_teacher_files(run_dir, cfg.teacher.path, files)  # before a weight is read
    dtype = teacher_dtype(cfg)
    model_cfg = ckpt.model_config(ModelConfig(dtype=dtype, param_dtype=dtype))
    model, abstract, shardings = teacher_model(cfg, model_cfg, mesh, own_tokenizer is not None)
    params = load_params(ckpt, model_cfg, abstract, shardings)
    return LoadedTeacher(model, params, model_cfg, cfg.teacher.path, None, ckpt.digests,
                         own_tokenizer)


def check_teacher_files(run_dir: str, teacher_path: str, files: dict[str, str]) -> None:
    """A run records its Hugging Face teacher's weights digests in run.json when it starts; a
    resumed run, or `kd-jax eval`, reads the same files or stops naming the one that changed.

    This is what guards a plain checkpoint directory, which carries no digest of its own: from
    the run's first start on, a flipped byte in the teacher is found before it is used.
    """
    info_path = Path(run_dir) / "run.json"
    if not info_path.is_file():
        return
    try:
        info = json.loads(info_path.read_text())
        recorded = info.get("teacher_files")
        for entry in info.get("teachers") or []:  # several teachers: the one at teacher_path
            if isinstance(entry, dict) and entry.get("path") == teacher_path:
                recorded = entry.get("files")
    except (OSError, ValueError, AttributeError):
        return  # read_run reports an unreadable run.json
    for name, digest in (recorded or {}).items():
        if name not in files:
            raise ConfigError(f"teacher.path '{teacher_path}' no longer has {name}, which "
                              f"this run started with ({info_path})")
        if files[name] != digest:
            raise ConfigError(
                f"teacher.path '{teacher_path}': {name} is not the file this run started "
                f"with (its SHA-256 differs from the one in {info_path}): "
                "damaged or replaced; restore it, or distill into a new train.run_dir")


def teacher_model(cfg: Config, model_cfg: ModelConfig, mesh: Any, own_rows: bool = False
                  ) -> tuple[PureModel, Any, Any]:
    """The teacher described by `model_cfg`, as shapes: (model, abstract params, their
    shardings by `mesh.teacher_layout`, or None without a mesh); checks the student's rows fit,
    unless the teacher reads rows of its own (`own_rows`: another tokenizer, whose row length
    `kd_jax.teacher.cross.teacher_feed` checks)."""
    if not own_rows and cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the teacher's "
                          f"max_seq_len ({model_cfg.max_seq_len})")
    model, abstract = abstract_model(model_cfg)
    shardings = None
    if mesh is not None:
        rules = rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules, "mesh.teacher_rules")
        shardings = param_shardings(logical_axes(model.template), rules, mesh, abstract)
    return model, abstract, shardings


def check_same_tokenizer(checkpoint_dir: Path, key: str, tokenizer: Tokenizer) -> None:
    """A checkpoint's tokenizer.json must map every id to the same text as `tokenizer` does;
    one line naming the first difference otherwise."""
    difference = tokenizer_difference(checkpoint_dir, key, tokenizer)
    if difference is not None:
        raise ConfigError(difference)


def tokenizer_difference(checkpoint_dir: Path, key: str, tokenizer: Tokenizer) -> str | None:
    """How a checkpoint's tokenizer.json differs from `tokenizer` (one line), or None where it
    maps every id to the same text; a checkpoint without one is an error."""
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {checkpoint_dir} has no tokenizer.json to compare with the "
                          f"student's ({tokenizer.description})")
    theirs = load_tokenizer(str(path))
    if theirs.fingerprint == tokenizer.fingerprint:
        return None
    ours_bytes, their_bytes = tokenizer.token_bytes(), theirs.token_bytes()
    if theirs.vocab_size != tokenizer.vocab_size:
        return (f"{key}: the tokenizer of {checkpoint_dir} has {theirs.vocab_size} tokens, the "
                f"student's ({tokenizer.description}) {tokenizer.vocab_size}: logits cannot be "
                "distilled across them token by token")
    for token_id, (mine, other) in enumerate(zip(ours_bytes, their_bytes)):
        if mine != other:
            return (f"{key}: the tokenizer of {checkpoint_dir} differs from the student's "
                    f"({tokenizer.description}) at id {token_id}: {other!r} against {mine!r}")
    return None
