"""The data of a run: the tokenizer and the packed training and held-out rows its config
describes, from memory, a token store (prepared first where missing), a mixture of stores, or an
imported cache's rows; and `kd-jax prepare`: the store, then the rows a teacher of another
tokenizer reads (`kd_jax.align.prepared`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from kd_jax.cache.api_import import load_rows
from kd_jax.config import Config, ConfigError, DataConfig
from kd_jax.config.teachers import members
from kd_jax.data import mixture
from kd_jax.data.batches import fingerprint as data_fingerprint
from kd_jax.data.packing import Rows, pack
from kd_jax.data.prepare import prepare
from kd_jax.data.sources import load_documents
from kd_jax.data.store import is_prepared, open_store
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer
from kd_jax.teacher.cross import teacher_feed
from kd_jax.teacher.loading import teacher_tokenizer
from kd_jax.train.resolve import resolve, teacher_model_config, tokenizer_spec


@dataclasses.dataclass
class RunData:
    tokenizer: Tokenizer
    train: Rows  # in memory, or read from a token store
    heldout: Rows
    fingerprint: str



def load_data(cfg: Config) -> RunData:
    """The tokenizer and the packed training and held-out rows `cfg.data` describes."""
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})")
    if cfg.data.source == "cache":  # the token rows of an imported cache
        train, heldout = load_rows(cfg.cache.dir, tokenizer)
        if train.seq_len != cfg.data.seq_len:
            raise ConfigError(f"cache {cfg.cache.dir} holds rows of {train.seq_len} tokens; "
                              f"set data.seq_len={train.seq_len} (got {cfg.data.seq_len})")
    elif cfg.data.mixture:
        sources = mixture.components(cfg.data)
        opened = [_store_rows(cfg, source, tokenizer) for _, source in sources]
        train = mixture.MixedRows([rows for rows, _ in opened], [w for w, _ in sources])
        heldout = mixture.InterleavedRows([rows for _, rows in opened])
    elif cfg.data.store:
        train, heldout = _store_rows(cfg, cfg.data, tokenizer)
    else:
        train_docs, heldout_docs = load_documents(cfg.data)
        train = pack(train_docs, tokenizer, cfg.data.seq_len, cfg.data.add_bos)
        heldout = pack(heldout_docs, tokenizer, cfg.data.seq_len, cfg.data.add_bos)
    if train.n_rows == 0 or not train.trained_tokens:
        raise ConfigError(f"the training data of data.path '{cfg.data.path}' is empty")
    return RunData(tokenizer, train, heldout, data_fingerprint(cfg.data, tokenizer))


def _store_rows(cfg: Config, data: DataConfig, tokenizer: Tokenizer) -> tuple[Rows, Rows]:
    """The rows of the token store `data.store`, prepared first when it is missing."""
    if not is_prepared(data.store):
        if cfg.distributed.enabled:  # every process would prepare the same store at once
            raise ConfigError(f"data.store '{data.store}' is not prepared; a multi-process run "
                              "reads a prepared store: run kd-jax prepare with this config "
                              "first")
        prepare(data, tokenizer, cfg.train.progress)
    return open_store(data, tokenizer)


def prepare_data(cfg: Config) -> list[dict[str, Any]]:
    """`kd-jax prepare`: the token store `data.store` of `cfg` (a store per source of a
    mixture), prepared or found prepared; a summary of each."""
    if not cfg.data.store:
        raise ConfigError("kd-jax prepare needs data.store, the directory of the token store")
    cfg = resolve(cfg)
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    sources = ([source for _, source in mixture.components(cfg.data)] if cfg.data.mixture
               else [cfg.data])
    return [prepare(source, tokenizer, cfg.train.progress, verify=True) for source in sources]


def prepare_teacher_data(cfg: Config) -> list[str]:
    """`kd-jax prepare`, after the store: the teacher rows of every training row for each
    teacher of another tokenizer the config names online (`kd_jax.teacher.cross.teacher_feed`),
    made once beside the store; a line for each."""
    cfg = resolve(cfg)
    named = [member for _, member in members(cfg)] if cfg.teachers else [cfg]
    online = [member for member in named if member.teacher.source in ("checkpoint", "hf")]
    if not online:
        return []
    data = load_data(cfg)
    lines = []
    for member in online:
        other = teacher_tokenizer(member, data.tokenizer)
        if other is None:  # the student's tokenizer: the teacher reads the student's rows
            continue
        start = time.perf_counter()
        length, _ = teacher_feed(member, data.tokenizer, other, data.train,
                                 teacher_model_config(member).max_seq_len)
        lines.append(f"teacher rows of {member.teacher.path} ({other.description}): "
                     f"{data.train.n_rows:,} rows of {length} teacher tokens, ready in "
                     f"{time.perf_counter() - start:.1f} s")
    return lines

