"""Experiment configuration: typed dataclasses, YAML files, `section.key=value` overrides.

This module imports no JAX, so a bad config is refused before any accelerator work starts.
Every value is coerced to its field's declared type (`yaml.safe_load("1e-3")` is the string
"1e-3"; `optimizer.lr=1e-3` must still be a float), and an unknown key is an error that names
the closest valid one.

Every choice a user makes by name is a `Literal` type below, declared once: validation reads
the names from the type, and the modules that implement a choice (`kd_jax.losses.divergences`,
`kd_jax.parallel.mesh`, `kd_jax.cache.manifest`) read them from here with `choices()`.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from kd_jax.checks import closest

DType = Literal["float32", "bfloat16"]
# none: hard-label training; checkpoint: a `kd-jax train` run directory at `teacher.path`;
# cache: targets precomputed by `kd-jax precompute` into `cache.dir`
TeacherSource = Literal["none", "checkpoint", "cache"]
# cache: the rows of `kd-jax cache import`
DataSource = Literal["stdlib", "text", "json", "parquet", "csv", "hub", "cache"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse"]
Schedule = Literal["cosine", "constant"]
CacheMode = Literal["topk", "sample", "full"]
ValueDType = Literal["float16", "float32"]
# Named logical-axis -> mesh-axis tables (the tables are in `kd_jax.parallel.mesh`).
MeshLayout = Literal["replicated", "fsdp", "tensor", "fsdp_tensor"]


def choices(literal: Any) -> tuple[str, ...]:
    """The names a `Literal` type allows, in declaration order."""
    return typing.get_args(literal)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it on one line, exit code 2."""


@dataclasses.dataclass
class ModelConfig:
    """A decoder-only transformer of the Llama family."""

    vocab_size: int = 256  # embedding rows; may exceed the tokenizer's size (extra rows are masked)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of n_kv_heads
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 512  # SwiGLU hidden width
    max_seq_len: int = 512  # longest context the model accepts (rotary tables are built for it)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head shares the embedding matrix, [vocab, d]
    remat: bool = False  # recompute each layer in the backward pass (jax.checkpoint)
    dtype: DType = "float32"  # activations
    param_dtype: DType = "float32"
    init_std: float = 0.02
    seed: int = 0  # parameter initialization

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass
class TeacherConfig:
    """Where the frozen teacher comes from; named once, here."""

    # With source cache, `path` (if set) names the teacher run the cache came from: it is
    # checked against the cache, and evaluated beside the student.
    source: TeacherSource = "none"
    path: str = ""
    dtype: DType = "float32"  # teacher forward precision


@dataclasses.dataclass
class DataConfig:
    source: DataSource = "stdlib"
    path: str = ""  # data files (comma-separated, globs allowed) or a hub dataset name
    name: str = ""  # hub dataset configuration name
    split: str = "train"
    heldout_split: str = ""  # a split of the source to evaluate on; empty: hold out documents
    heldout_fraction: float = 0.05  # fraction of documents held out when heldout_split is empty
    text_column: str = "text"
    prompt_column: str = ""  # with response_column: chat-style data, loss on the response only
    response_column: str = ""
    tokenizer: str = "byte"  # byte | path to a Hugging Face tokenizer.json
    seq_len: int = 256
    max_documents: int = 0  # 0 means all
    seed: int = 0  # document split and per-epoch shuffling


@dataclasses.dataclass
class LossConfig:
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd interpolation; 0 is forward KL, 1 is reverse KL (as TRL defines them)
    skew: float = 0.1  # skew_kl / skew_reverse_kl mixing weight (DistiLLM)
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # hard-label cross-entropy at T=1


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-3
    schedule: Schedule = "cosine"  # both after a linear warm-up
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    batch_size: int = 16  # global batch, in sequences
    microbatches: int = 1  # gradient accumulation; batch_size must be divisible by it
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_sequences: int = 64  # held-out sequences per evaluation
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    stop_at: int = 0  # stop after this step (a job slot's share); the schedule spans `steps`
    progress: bool = True


@dataclasses.dataclass
class MeshConfig:
    """The device mesh ("data", "fsdp", "tensor") and how each model's parameters lie on it.

    The batch is split over data x fsdp; "fsdp" layouts shard the parameters' `embed` dimension
    over fsdp, "tensor" layouts shard heads, MLP width and vocabulary over tensor.
    """

    data: int = -1  # -1: the devices left over by the other two axes
    fsdp: int = 1
    tensor: int = 1
    student_layout: MeshLayout = "replicated"
    teacher_layout: MeshLayout = "replicated"
    # Per-model changes to the layout's table, logical axis -> mesh axis (or null: not split),
    # e.g. {mlp: tensor, vocab: null}; the logical axes are kd_jax.parallel.mesh.LOGICAL_AXES.
    student_rules: dict = dataclasses.field(default_factory=dict)
    teacher_rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CacheConfig:
    """The teacher-logit cache: written by `kd-jax precompute`, read with `teacher.source: cache`.

    topk keeps the k most likely tokens and the mass of the rest; sample keeps `draws` tokens
    drawn from the teacher (an unbiased estimate of the full loss); full keeps every log-prob.
    """

    dir: str = ""
    mode: CacheMode = "topk"
    k: int = 32  # topk
    draws: int = 12  # sample
    # topk and sample store the teacher at this temperature, and training must use the same
    # loss.temperature; full stores T = 1 and any loss.temperature applies exactly.
    temperature: float = 1.0
    seed: int = 0  # sample: draws are seeded by this and the global row index
    value_dtype: ValueDType = "float16"
    rows_per_shard: int = 256
    batch_size: int = 0  # rows per teacher forward pass in precompute; 0: train.batch_size
    prefetch: int = 2  # batches read ahead while training from a cache


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host runs: one process per host, every process running the same command.

    With `enabled`, `jax.distributed.initialize` runs before anything else touches JAX. Fields
    left empty are detected by JAX where it can (TPU pod slices, SLURM, `JAX_COORDINATOR_ADDRESS`).
    """

    enabled: bool = False
    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: detected
    process_id: int = -1  # -1: detected
    timeout_s: int = 300  # how long to wait for every process to join


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _coerce(value: Any, kind: type, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if typing.get_origin(kind) is Literal:
        names = choices(kind)
        if isinstance(value, str) and value in names:
            return value
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(names)}"
                          f"{closest(str(value), names)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif kind in (int, float):
        number = value
        if isinstance(value, str):
            try:  # "1e-3" is a float, "1_000" an int, "3.0" not an int
                number = float(value) if kind is float else int(value.replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool) and (
                kind is float or float(number).is_integer()):
            return kind(number)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is dict:
        if value is None:
            return {}
        if isinstance(value, dict) and all(
                isinstance(v, (str, type(None))) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{where}: expected a mapping of names to names or null, got {value!r}")
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _section_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(config: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'{closest(section, sections)}")
    target = getattr(config, section)
    types = _section_types(type(target))
    if key not in types:
        valid = [f"{section}.{k}" for k in types]
        raise ConfigError(
            f"unknown config key '{section}.{key}'{closest(f'{section}.{key}', valid)}")
    setattr(target, key, _coerce(value, types[key], f"{section}.{key}"))


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    config = base if base is not None else Config()
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping of sections")
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            _set(config, str(section), str(key), value)
    return config


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply `section.key=value` strings; values are parsed as YAML scalars, then typed."""
    import yaml  # here, not at the top: the core (step, model) imports this module's types

    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set(config, section, key, value)
    return config


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (or start from defaults), apply overrides, and validate."""
    import yaml

    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        from_dict(raw, config)
    apply_overrides(config, overrides)
    validate(config)
    return config


def dump(config: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def validate(config: Config) -> None:
    """Check values that are wrong whatever the data; raises ConfigError naming the key."""
    for section in dataclasses.fields(Config):  # a config built in code is checked too
        values = getattr(config, section.name)
        for key, kind in _section_types(type(values)).items():
            if typing.get_origin(kind) is Literal:
                _coerce(getattr(values, key), kind, f"{section.name}.{key}")
    m, d, t, loss, opt = config.model, config.data, config.train, config.loss, config.optimizer
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model,
        "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff,
        "model.max_seq_len": m.max_seq_len, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.microbatches": t.microbatches, "train.log_every": t.log_every,
        "train.checkpoint_every": t.checkpoint_every, "train.keep_checkpoints": t.keep_checkpoints,
        "loss.temperature": loss.temperature,
        "cache.k": config.cache.k, "cache.draws": config.cache.draws,
        "cache.temperature": config.cache.temperature,
        "cache.rows_per_shard": config.cache.rows_per_shard,
        "cache.prefetch": config.cache.prefetch,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({m.n_kv_heads})")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}) "
            "or model.head_dim set")
    if m.resolved_head_dim % 2:
        raise ConfigError(
            f"head dimension {m.resolved_head_dim} must be even for rotary embeddings")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) is not divisible by "
            f"train.microbatches ({t.microbatches})")
    for name in ("beta", "skew"):
        value = getattr(loss, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"loss.{name} must be in [0, 1], got {value}")
    if loss.kd_weight < 0 or loss.ce_weight < 0:
        raise ConfigError("loss.kd_weight and loss.ce_weight must be >= 0")
    if not 0.0 < d.heldout_fraction < 1.0 and not d.heldout_split:
        raise ConfigError(f"data.heldout_fraction must be in (0, 1), got {d.heldout_fraction}")
    if bool(d.prompt_column) != bool(d.response_column):
        raise ConfigError("data.prompt_column and data.response_column must be set together")
    if opt.lr <= 0 or opt.warmup_steps < 0 or not 0.0 <= opt.min_lr_ratio <= 1.0:
        raise ConfigError(
            "optimizer: lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]")
    mesh_sizes = {name: getattr(config.mesh, name) for name in ("data", "fsdp", "tensor")}
    for name, size in mesh_sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{name} must be >= 1 or -1 (the remaining devices), got {size}")
    if list(mesh_sizes.values()).count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    dist = config.distributed
    if dist.num_processes < 0 or dist.process_id < -1 or (
            dist.num_processes and dist.process_id >= dist.num_processes):
        raise ConfigError(
            f"distributed.process_id ({dist.process_id}) must be in [0, "
            f"distributed.num_processes) ({dist.num_processes}), or -1 to detect it")
    if dist.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {dist.timeout_s}")
    if config.teacher.source == "checkpoint" and not config.teacher.path:
        raise ConfigError("teacher.source is 'checkpoint' but teacher.path is empty")
    if config.teacher.source == "cache" and not config.cache.dir:
        raise ConfigError("teacher.source is 'cache' but cache.dir is empty")
    if config.data.source == "cache" and not config.cache.dir:
        raise ConfigError("data.source is 'cache' but cache.dir is empty")
    if config.cache.batch_size < 0:
        raise ConfigError(f"cache.batch_size must be >= 0, got {config.cache.batch_size}")
