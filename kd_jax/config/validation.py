"""Checks of a whole config: values that are wrong whatever the data, each a `ConfigError`."""

from __future__ import annotations

import math
import typing
from typing import Literal

from kd_jax.config import (
    LLAMA_CPP_FORMATS,
    SECTIONS,
    Config,
    ConfigError,
    LoraTarget,
    ModelConfig,
    choices,
    coerce,
    section_types,
)

# Numeric fields that must not be negative (those that must be > 0 are listed in `check`; the
# mesh sizes and distributed.process_id take -1 for "detect"; loss.chunk_tokens -1 for "never").
_NOT_NEGATIVE = ("model.head_dim", "model.init_std", "model.seed", "model.sliding_window",
                 "model.prune_d_ff", "model.prune_kv_heads", "model.prune_batches",
                 "model.quantize_group", "model.lora_rank",
                 "data.max_documents", "data.seed", "optimizer.warmup_steps",
                 "optimizer.weight_decay", "optimizer.clip_norm", "optimizer.eps",
                 "train.seed", "train.eval_every", "train.eval_sequences", "train.stop_at",
                 "cache.seed", "cache.batch_size", "distributed.num_processes",
                 "generate.temperature", "generate.top_k", "generate.seed",
                 "loss.hidden_weight", "loss.attention_weight", "onpolicy.temperature",
                 "onpolicy.top_k")
# Attention transfer builds the chosen layers' [batch, heads, tokens, tokens] probabilities
# densely (kd_jax.losses.whitebox): 2,048 tokens are 16 MiB a head and row in float32.
ATTENTION_TRANSFER_TOKENS = 2048
_AT_LEAST_MINUS_ONE = ("mesh.data", "mesh.fsdp", "mesh.tensor", "distributed.process_id",
                       "loss.chunk_tokens")


def _check_numbers(config: Config) -> None:
    """Every number finite, and of the sign its field allows."""
    for section in SECTIONS:
        values = getattr(config, section)
        for key, kind in section_types(type(values)).items():
            name, value = f"{section}.{key}", getattr(values, key)
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
            if kind in (int, float) and name in _NOT_NEGATIVE and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
            if kind is int and name in _AT_LEAST_MINUS_ONE and value < -1:
                raise ConfigError(f"{name} must be >= -1, got {value}")


def check(config: Config) -> None:
    """Check values that are wrong whatever the data; raises ConfigError naming the key."""
    for section in SECTIONS:  # a config built in code is checked too
        values = getattr(config, section)
        for key, kind in section_types(type(values)).items():
            if typing.get_origin(kind) is Literal:
                coerce(getattr(values, key), kind, f"{section}.{key}")
    _check_numbers(config)
    m, d, t, loss, opt = config.model, config.data, config.train, config.loss, config.optimizer
    positive = {
        "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.microbatches": t.microbatches, "train.log_every": t.log_every,
        "train.checkpoint_every": t.checkpoint_every, "train.keep_checkpoints": t.keep_checkpoints,
        "loss.temperature": loss.temperature, "model.rope_theta": config.model.rope_theta,
        "model.norm_eps": config.model.norm_eps, "optimizer.lr": opt.lr,
        "cache.k": config.cache.k, "cache.draws": config.cache.draws,
        "cache.temperature": config.cache.temperature,
        "cache.rows_per_shard": config.cache.rows_per_shard,
        "cache.prefetch": config.cache.prefetch,
        "generate.max_new_tokens": config.generate.max_new_tokens,
        "generate.batch_size": config.generate.batch_size,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    if d.teacher_seq_len < 0:
        raise ConfigError(f"data.teacher_seq_len must be >= 0 (0: sized from the first rows), got "
                          f"{d.teacher_seq_len}")
    if m.init == "scratch":  # otherwise the architecture is read, then checked (train.resolve)
        check_architecture(m)
    if d.seq_len > m.max_seq_len and m.init == "scratch":  # otherwise checked once resolved
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
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(opt, name) < 1.0:
            raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(opt, name)}")
    if loss.kd_weight < 0 or loss.ce_weight < 0:
        raise ConfigError("loss.kd_weight and loss.ce_weight must be >= 0")
    if d.heldout_path and d.heldout_split:
        raise ConfigError("data.heldout_path and data.heldout_split both name held-out data; "
                          "set one")
    if not 0.0 < d.heldout_fraction < 1.0 and not (d.heldout_split or d.heldout_path):
        raise ConfigError(f"data.heldout_fraction must be in (0, 1), got {d.heldout_fraction}")
    if bool(d.prompt_column) != bool(d.response_column):
        raise ConfigError("data.prompt_column and data.response_column must be set together")
    if d.messages_column and d.prompt_column:
        raise ConfigError("data.messages_column and data.prompt_column are two chat formats; "
                          "set one")
    if d.streaming and not d.store:
        raise ConfigError("data.streaming needs data.store: a streamed dataset is read once, "
                          "into a token store")
    if d.streaming and d.source != "hub":
        raise ConfigError(f"data.streaming applies to source 'hub' (local {d.source} files are "
                          "always read as a stream into the store)")
    if d.store and d.source == "cache":
        raise ConfigError("data.store does not apply to data.source 'cache' (the cache holds "
                          "its rows)")
    if d.mixture and not d.store:
        raise ConfigError("data.mixture needs data.store: each source is prepared into "
                          "<data.store>/<i>")
    if not d.store_shard_mb > 0:
        raise ConfigError(f"data.store_shard_mb must be > 0, got {d.store_shard_mb}")
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
    if config.teacher.source in ("checkpoint", "hf") and not config.teacher.path:
        raise ConfigError(f"teacher.source is '{config.teacher.source}' but teacher.path is empty")
    _check_model(m, config)
    if config.teacher.source == "cache" and not config.cache.dir:
        raise ConfigError("teacher.source is 'cache' but cache.dir is empty")
    if config.data.source == "cache" and not config.cache.dir:
        raise ConfigError("data.source is 'cache' but cache.dir is empty")
    _check_whitebox(config)
    if config.cache.batch_size < 0:
        raise ConfigError(f"cache.batch_size must be >= 0, got {config.cache.batch_size}")
    _check_generate(config)
    _check_onpolicy(config)
    _check_teachers(config)


def check_architecture(m: ModelConfig) -> None:
    """The model's shape: sizes positive, heads grouped evenly, rotary pairs whole."""
    sizes = {"vocab_size": m.vocab_size, "d_model": m.d_model, "n_layers": m.n_layers,
             "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "d_ff": m.d_ff,
             "max_seq_len": m.max_seq_len}
    for name, value in sizes.items():
        if value <= 0:
            raise ConfigError(f"model.{name} must be > 0, got {value}")
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
    if m.attention == "cudnn" and (m.resolved_head_dim % 8 or m.resolved_head_dim > 256):
        raise ConfigError(f"model.attention is cudnn, whose kernel takes head dimensions that "
                          f"are multiples of 8 up to 256, got {m.resolved_head_dim}")
    check_quantize(m)
    check_lora_rank(m)


def check_lora_rank(m: ModelConfig) -> None:
    """A LoRA rank no larger than either dimension of any projection it adapts (a rank beyond
    the smaller one adds parameters and no expressiveness)."""
    if not m.lora_rank:
        return
    d, heads = m.d_model, m.n_heads * m.resolved_head_dim
    kv_heads = m.n_kv_heads * m.resolved_head_dim
    sizes = {"q": (d, heads), "k": (d, kv_heads), "v": (d, kv_heads), "o": (heads, d),
             "gate": (d, m.d_ff), "up": (d, m.d_ff), "down": (m.d_ff, d)}
    for target in m.lora_targets:  # (an unknown name is refused with the other lora fields)
        if target in sizes and m.lora_rank > min(sizes[target]):
            raise ConfigError(f"model.lora_rank ({m.lora_rank}) exceeds the smaller dimension of "
                              f"the {target} projection ({sizes[target][0]} -> "
                              f"{sizes[target][1]})")


def _check_lora(m: ModelConfig) -> None:
    """model.lora_*: known projections, a dropout probability, a base to adapt; no LoRA
    setting without model.lora_rank (it would do nothing)."""
    if not m.lora_rank:
        unused = [name for name in ("lora_alpha", "lora_dropout", "lora_targets")
                  if getattr(m, name) != getattr(ModelConfig(), name)]
        if unused:
            raise ConfigError(f"model.{unused[0]} is set but model.lora_rank is 0: LoRA is off")
        return
    for target in m.lora_targets:
        if target not in choices(LoraTarget):
            raise ConfigError(f"model.lora_targets: unknown projection {target!r}; choose from "
                              f"{', '.join(choices(LoraTarget))}")
    if not m.lora_targets or len(set(m.lora_targets)) != len(m.lora_targets):
        raise ConfigError(f"model.lora_targets must name each adapted projection once, got "
                          f"{m.lora_targets}")
    if not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}")
    if not m.lora_alpha > 0:
        raise ConfigError(f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    if m.init == "scratch":
        raise ConfigError("model.lora_rank adapts frozen pretrained weights, and a student from "
                          "scratch has none: set model.init to hf or teacher")


def check_quantize(m: ModelConfig) -> None:
    """model.quantize*: groups that tile every quantized weight's contracted dimension, one
    format for a tied embedding and head, no setting that would do nothing."""
    formats = {part: m.weight_format(part) for part in ("layers", "embedding", "head")}
    if m.quantize_group and set(formats.values()) == {"none"}:
        raise ConfigError(f"model.quantize_group is {m.quantize_group} but no weight is "
                          "quantized: set model.quantize (or quantize_embedding, quantize_head)")
    if m.tie_embeddings and formats["embedding"] != formats["head"]:
        raise ConfigError(f"model.tie_embeddings shares one matrix, but model.quantize_embedding "
                          f"is {formats['embedding']} and model.quantize_head {formats['head']}: "
                          "set them alike")
    if m.quantize_group and not {"int8", "int4"} & set(formats.values()):
        raise ConfigError(f"model.quantize_group is {m.quantize_group} but no weight is int8 or "
                          "int4: q8_0 and q4_0 always have llama.cpp's blocks of 32")
    # The dimensions each quantized weight's groups run along (kd_jax.models.quantize), and the
    # group of each format (llama.cpp's: its blocks of 32).
    contracted = []
    for part, fmt in formats.items():
        group = 32 if fmt in LLAMA_CPP_FORMATS else m.quantize_group
        if fmt == "none" or not group:
            continue
        contracted.append(("d_model", m.d_model, group, fmt))
        if part == "layers":
            contracted += [("d_ff", m.d_ff, group, fmt),
                           ("n_heads x head_dim", m.n_heads * m.resolved_head_dim, group, fmt)]
    for name, size, group, fmt in contracted:
        if size % group:
            what = f"{fmt}'s block" if fmt in LLAMA_CPP_FORMATS else "model.quantize_group"
            raise ConfigError(f"{what} ({group}) must divide the dimension the weights are "
                              f"grouped along, {name} ({size})")


def _check_model(m: ModelConfig, config: Config) -> None:
    _check_lora(m)
    for name in ("sliding_window", "prune_d_ff", "prune_kv_heads", "prune_batches"):
        if getattr(m, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0, got {getattr(m, name)}")
    for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max"):
        if not getattr(m, name) > 0:
            raise ConfigError(f"model.{name} must be > 0, got {getattr(m, name)}")
    if m.attention_block <= 0:
        raise ConfigError(f"model.attention_block must be > 0, got {m.attention_block}")
    if m.attention == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError(f"model.attention is cudnn, whose kernel takes bfloat16 activations "
                          f"only: set model.dtype=bfloat16 (got {m.dtype})")
    if m.init == "hf" and not m.path:
        raise ConfigError("model.init is 'hf' but model.path is empty")
    if m.init == "teacher" and config.teacher.source not in ("checkpoint", "hf"):
        raise ConfigError("model.init is 'teacher' but there is no teacher model: set "
                          "teacher.source to checkpoint or hf, with teacher.path")
    surgery = m.init_layers or m.prune_d_ff or m.prune_kv_heads
    if surgery and m.init != "teacher":
        raise ConfigError("model.init_layers, model.prune_d_ff and model.prune_kv_heads need "
                          f"model.init: teacher (got {m.init})")
    if any(index < 0 for index in m.init_layers):
        raise ConfigError(f"model.init_layers must be teacher layer indices >= 0, "
                          f"got {m.init_layers}")


def _check_whitebox(config: Config) -> None:
    """The white-box terms' layer pairs (their ranges are checked once the models are known,
    `kd_jax.losses.whitebox.WhiteBox.of`), and what they need."""
    loss = config.loss
    for term in ("hidden", "attention"):
        weight, pairs = getattr(loss, f"{term}_weight"), getattr(loss, f"{term}_layers")
        if any(index < 0 for pair in pairs for index in pair):
            raise ConfigError(f"loss.{term}_layers: layer indices are >= 0, got {pairs}")
        if pairs and weight == 0:
            raise ConfigError(f"loss.{term}_layers is set but loss.{term}_weight is 0: the "
                              "term is off")
        if weight > 0 and config.teacher.source == "cache":
            raise ConfigError(f"loss.{term}_weight needs the teacher's layers, which a cache "
                              "does not hold: use teacher.source checkpoint or hf")
    if loss.attention_weight > 0 and config.data.seq_len > ATTENTION_TRANSFER_TOKENS:
        raise ConfigError(f"loss.attention_weight builds dense [tokens, tokens] attention "
                          f"probabilities: data.seq_len must be <= {ATTENTION_TRANSFER_TOKENS}, "
                          f"got {config.data.seq_len}")


def _check_generate(config: Config) -> None:
    _check_sampling("generate", config.generate.top_p, config.generate.stop)


def _check_sampling(section: str, top_p: float, stop: list) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{section}.top_p must be in (0, 1], got {top_p}")
    for token in stop:
        if isinstance(token, int) and token < 0:
            raise ConfigError(f"{section}.stop: token ids are >= 0, got {token}")
        if token == "":
            raise ConfigError(f"{section}.stop: an empty string is no token")


def _check_onpolicy(config: Config) -> None:
    o = config.onpolicy
    if not 0.0 <= o.fraction <= 1.0:
        raise ConfigError(f"onpolicy.fraction must be in [0, 1], got {o.fraction}")
    for name in ("prompt_tokens", "max_new_tokens"):
        if getattr(o, name) < 1:
            raise ConfigError(f"onpolicy.{name} must be >= 1, got {getattr(o, name)}")
    _check_sampling("onpolicy", o.top_p, o.stop)
    if o.fraction == 0:
        return
    if config.teacher.source not in ("checkpoint", "hf"):
        raise ConfigError("onpolicy.fraction needs a teacher that scores the student's answers "
                          "as they are sampled: teacher.source checkpoint or hf (a cache holds "
                          "the teacher's view of fixed rows only)")
    if o.max_new_tokens >= config.data.seq_len:
        raise ConfigError(f"onpolicy.max_new_tokens ({o.max_new_tokens}) leaves no room for a "
                          f"prompt in a row of data.seq_len ({config.data.seq_len}) tokens")
    answered = round(o.fraction * config.train.batch_size)
    if answered == 0:
        raise ConfigError(f"onpolicy.fraction {o.fraction} of train.batch_size "
                          f"({config.train.batch_size}) rows is no row; raise one of them")


def _check_teachers(config: Config) -> None:
    """`teachers:` (kd_jax.config.teachers): each entry a teacher that could run alone, and
    nothing that needs one teacher's model."""
    if not config.teachers:
        return
    from kd_jax.config.teachers import members

    if config.teacher.source != "none":
        raise ConfigError("name the teachers either in teacher: (one) or in teachers: (a list), "
                          f"not both (teacher.source is {config.teacher.source})")
    for term in ("hidden", "attention"):
        if getattr(config.loss, f"{term}_weight") > 0:
            raise ConfigError(f"loss.{term}_weight matches the student's layers to one "
                              "teacher's: name that teacher in teacher:, not teachers:")
    for i, (_, member) in enumerate(members(config)):
        try:
            check(member)
        except ConfigError as err:
            raise ConfigError(f"teachers[{i}]: {err}") from None
