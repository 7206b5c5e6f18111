"""A config made concrete: the tokenizer a file, the student's architecture spelled out.

`data.tokenizer: auto` becomes the tokenizer.json of the checkpoint involved (the student's
`model.path`, else a Hugging Face teacher's `teacher.path`, else the first Hugging Face teacher of
`teachers:`), else, reading a cache (`teacher.source: cache`), the tokenizer its rows were made
with (`_cache_tokenizer`), or `byte`. A student initialized from
a checkpoint (`model.init: hf`) or from the teacher (`model.init: teacher`) takes its
architecture from there. The run directory records the resolved config, so evaluating, resuming
and exporting a run never read the source checkpoint's config again.
"""

from __future__ import annotations

import copy
from pathlib import Path

from kd_jax.cache.manifest import STUDENT_TOKENIZER_DIR, CacheError, read_manifest
from kd_jax.checks import not_a_directory
from kd_jax.config import Config, ConfigError, ModelConfig
from kd_jax.config.validation import check_architecture
from kd_jax.data.tokenizers import ByteTokenizer, file_fingerprint
from kd_jax.models import surgery
from kd_jax.models.families import model_config
from kd_jax.models.pretrained import read_config
from kd_jax.models.quantize import unquantized
from kd_jax.run_dir import read_run
from kd_jax.teacher.loading import teacher_dtype


def resolve(cfg: Config) -> Config:
    """A resolved copy of `cfg`; raises ConfigError for what cannot be resolved."""
    cfg = resolve_model(cfg)
    cfg.data.tokenizer = tokenizer_spec(cfg)
    return cfg


def resolve_model(cfg: Config, platform: str | None = None) -> Config:
    """A copy of `cfg` with the student's architecture and the teacher's dtype (for `platform`,
    `teacher_dtype_choice`) spelled out (no tokenizer, no data)."""
    cfg = copy.deepcopy(cfg)
    cfg.teacher.dtype = teacher_dtype(cfg, platform)
    if cfg.model.init == "hf":
        cfg.model = model_config(read_config(cfg.model.path), cfg.model)
    elif cfg.model.init == "teacher":
        cfg.model = surgery.student_config(teacher_model_config(cfg), cfg.model)
    check_architecture(cfg.model)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the student's "
                          f"max_seq_len ({cfg.model.max_seq_len})")
    return cfg


def tokenizer_spec(cfg: Config) -> str:
    """`byte`, or the path of a tokenizer.json file."""
    spec = cfg.data.tokenizer
    if spec == "auto":
        hf_teachers = [entry.get("path", "") for entry in cfg.teachers
                       if isinstance(entry, dict) and entry.get("source") == "hf"]
        source = (cfg.model.path if cfg.model.init == "hf" else
                  cfg.teacher.path if cfg.teacher.source == "hf" else
                  hf_teachers[0] if hf_teachers else "")
        if not source and cfg.teacher.source == "cache":
            return _cache_tokenizer(cfg)
        if not source:
            return "byte"
        if not (Path(source) / "tokenizer.json").is_file():
            raise ConfigError(f"data.tokenizer is auto but {source} has no tokenizer.json: "
                              "set data.tokenizer to the tokenizer.json to use")
        spec = source
    if spec == "byte":
        return spec
    path = Path(spec).expanduser()
    return str(path / "tokenizer.json" if path.is_dir() else path)


def _cache_tokenizer(cfg: Config) -> str:
    """The tokenizer `cache.dir`'s rows were made with, as its manifest's fingerprint names it:
    `byte`, its copy in the cache (`copy_student_tokenizer`), or `teacher.path`'s where that is
    the checkpoint the cache came from (a cache written before the copy). A missing or damaged
    cache resolves to `byte` here and is refused, in one line, where it is read."""
    try:
        wanted = read_manifest(cfg.cache.dir)["fingerprints"]["tokenizer"]
    except CacheError:
        return "byte"
    if wanted == ByteTokenizer.fingerprint:
        return "byte"
    candidates = [Path(cfg.cache.dir) / STUDENT_TOKENIZER_DIR / "tokenizer.json"]
    if cfg.teacher.path:
        candidates.append(Path(cfg.teacher.path).expanduser() / "tokenizer.json")
    for candidate in candidates:
        if candidate.is_file() and file_fingerprint(candidate) == wanted:
            return str(candidate)
    raise ConfigError(f"data.tokenizer is auto but the cache {cfg.cache.dir} was made with a "
                      f"tokenizer ({wanted[:19]}...) that neither it nor teacher.path holds: set "
                      "data.tokenizer to the tokenizer.json its rows were made with")


def teacher_model_config(cfg: Config) -> ModelConfig:
    """The teacher's architecture, as `teacher.path` describes it (checkpoint or hf), computing
    in float (a kd-jax run trained with model.quantize runs unquantized as a teacher)."""
    if cfg.teacher.source == "hf":
        return model_config(read_config(cfg.teacher.path))
    if not Path(cfg.teacher.path).is_dir():
        raise ConfigError(f"teacher.path '{cfg.teacher.path}' "
                          f"{not_a_directory(cfg.teacher.path)}")
    return unquantized(read_run(cfg.teacher.path)[0].model)
