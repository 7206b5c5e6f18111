"""Loading a teacher: the latest checkpoint of a `kd-jax train` run directory.

With a mesh, the parameters are read straight into the shardings of `mesh.teacher_layout` (each
process reads only its own shards); without one, onto the default device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax import checkpoint
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.data.tokenizers import Tokenizer
from kd_jax.models.pure import PureModel, abstract_model, logical_axes
from kd_jax.parallel.mesh import param_shardings, rules_for
from kd_jax.run_dir import read_run


def latest_checkpoint(cfg: Config) -> int:
    """The latest checkpoint step of the teacher run `teacher.path`."""
    path = Path(cfg.teacher.path)
    if not path.is_dir():
        raise ConfigError(f"teacher.path '{path}' does not exist")
    step = checkpoint.latest_step(path)
    if step is None or not (path / "run.json").is_file():
        raise ConfigError(f"teacher.path '{path}' has no checkpoint")
    return step


def load_teacher(cfg: Config, tokenizer: Tokenizer, mesh: Any = None
                 ) -> tuple[PureModel, Any, ModelConfig]:
    """The frozen teacher `teacher.path` names: (model, params, model config)."""
    path = Path(cfg.teacher.path)
    step = latest_checkpoint(cfg)
    teacher_cfg, info = read_run(path)
    if info["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise ConfigError(
            f"teacher tokenizer ({info['tokenizer']}, {info['tokenizer_vocab_size']} tokens) "
            f"differs from the student's ({cfg.data.tokenizer}, {tokenizer.vocab_size} tokens)")
    model_cfg = dataclasses.replace(teacher_cfg.model, dtype=cfg.teacher.dtype, remat=False)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the teacher's "
                          f"max_seq_len ({model_cfg.max_seq_len})")
    model, abstract = abstract_model(model_cfg)
    shardings = None
    if mesh is not None:
        rules = rules_for(cfg.mesh.teacher_layout, cfg.mesh.teacher_rules, "mesh.teacher_rules")
        shardings = param_shardings(logical_axes(model.template), rules, mesh, abstract)
        abstract = checkpoint.placed(abstract, shardings)
    params = checkpoint.restore_params(path, abstract, step)
    if cfg.teacher.dtype == "bfloat16":
        params = jax.jit(lambda tree: jax.tree.map(lambda p: p.astype(jnp.bfloat16), tree),
                         out_shardings=shardings)(params)
    return model, params, model_cfg
