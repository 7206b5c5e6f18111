"""The cached teacher: the targets `kd-jax precompute` (or `kd-jax cache import`) wrote, read
back for each batch's rows instead of running the teacher.

Opening a cache for training checks it against the run before anything is written: its
fingerprints (teacher, tokenizer, data, packing), its sizes, the loss it can serve, and that every
shard is present and whole. Each read then checks every row's hash against the data row it is
trained beside. Seen from the step it is a teacher like `OnlineTeacher`: `soft_targets(params,
batch)` turns the fields that travel in the batch into the loss's soft targets.

A cache of a teacher with another tokenizer (`kd-jax precompute` of such a teacher) holds, on the
student's rows, the teacher's targets at the teacher's aligned positions, gathered onto the
student's positions, in the teacher's vocabulary (`kd_jax.losses.cross_sparse`). The teacher's
tokenizer travels with it (`kd_jax.cache.manifest`), so the vocabularies' buckets are made here
as the online teacher makes them (`kd_jax.teacher.cross`), without the teacher's checkpoint; a
teacher run named beside (teacher.path) must have the tokenizer the cache was made with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.align.rows import teacher_rows
from kd_jax.cache.fingerprints import fingerprints
from kd_jax.cache.manifest import (
    CROSS_TOKENIZER,
    TEACHER_TOKENIZER,
    CacheError,
    check_fingerprints,
    read_manifest,
)
from kd_jax.cache.reader import CacheReader
from kd_jax.cache.shards import check_shards
from kd_jax.config import Config, ConfigError, LossConfig
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer, load_tokenizer
from kd_jax.losses.cross_sparse import CrossDense, CrossTopK
from kd_jax.losses.cross_vocab import Buckets
from kd_jax.teacher.cross import PROBE_ROWS, check_overlap, vocabulary_of
from kd_jax.losses.soft_targets import Dense, Sampled, SoftTargets, TopK

# The loss's soft targets of each cache mode. A full cache holds log-probabilities, which serve
# as logits at any temperature (log-softmax only shifts logits by a constant per token).
_KINDS = {"full": Dense, "topk": TopK, "sample": Sampled}
# The same from a teacher with another tokenizer (a sampled cache of one is never written).
_CROSS_KINDS = {"full": CrossDense, "topk": CrossTopK}
SOFT_TARGETS = "soft_targets"  # the batch key the cached fields travel under


@dataclasses.dataclass(frozen=True)
class CrossVocabulary:
    """What makes a cache of a teacher with another tokenizer the loss's targets: the buckets
    of the two vocabularies, and loss.cross_vocab."""

    buckets: Buckets
    method: str


class CachedTeacher:
    """The targets of `cache_dir` for any training rows; `hashes` are those rows' hashes;
    `cross` where the cache's teacher has another tokenizer, `note` the start-up line then."""

    cross: CrossVocabulary | None = None
    note: str = ""

    def __init__(self, cache_dir: str | Path, mode: str, hashes: np.ndarray,
                 cross: CrossVocabulary | None = None, note: str = ""):
        self.mode = mode
        self.hashes = hashes
        self.cross, self.note = cross, note
        # Each shard's checksum is checked when it is first read: a damaged shard is named, never
        # trained on (a full read of the shard, once; benchmarks/cache_read.py measures it).
        self.reader = CacheReader(cache_dir, verify_checksums=True)

    def soft_targets(self, params: Any, batch: dict[str, Any]) -> SoftTargets:
        fields = batch[SOFT_TARGETS]
        if self.cross is not None:
            values = {key: value for key, value in fields.items() if key != "aligned"}
            return _CROSS_KINDS[self.mode](**values, aligned=fields["aligned"] > 0,
                                           buckets=self.cross.buckets, method=self.cross.method)
        if self.mode == "full":
            return Dense(fields["logprobs"])
        return _KINDS[self.mode](**fields)

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        rows = np.asarray(rows, dtype=np.int64)
        return {SOFT_TARGETS: self.reader.read(rows, expected_hashes=self.hashes[rows])}

    def close(self) -> None:
        self.reader.close()


def open_cache(cfg: Config, tokenizer: Tokenizer, train: Rows, teacher: str | None,
               teacher_tokenizer: Tokenizer | None = None) -> CachedTeacher:
    """`cache.dir`, checked against this run; `teacher` is the teacher run's fingerprint and
    `teacher_tokenizer` its tokenizer (the student's where they are the same), both None when
    the config names no teacher run."""
    cache_dir = cfg.cache.dir
    manifest = read_manifest(cache_dir)
    expected = {"fingerprints": fingerprints(cfg, tokenizer, train, teacher),
                "seq_len": cfg.data.seq_len, "n_rows": train.n_rows}
    if teacher_tokenizer is not None:  # None where the cache's teacher has the student's
        expected["fingerprints"][TEACHER_TOKENIZER] = (
            teacher_tokenizer.fingerprint
            if teacher_tokenizer.fingerprint != tokenizer.fingerprint else None)
    check_fingerprints(manifest, expected, cache_dir)
    cached_tokenizer = _teacher_tokenizer(cache_dir, manifest)
    vocab = (cached_tokenizer or tokenizer).vocab_size  # the vocabulary of the cached ids
    check_fingerprints(manifest, {"vocab_size": vocab}, cache_dir)
    check_loss(cfg.loss, manifest, cache_dir)
    check_shards(cache_dir, manifest)
    if cached_tokenizer is None:
        return CachedTeacher(cache_dir, manifest["mode"], train.row_hashes())
    # The buckets as the online teacher makes them (kd_jax.teacher.cross), over the cached
    # teacher's vocabulary: its tokenizer's, which is what the cache holds.
    vocabulary, buckets = vocabulary_of(tokenizer, cached_tokenizer,
                                        cached_tokenizer.vocab_size, cfg.model.vocab_size)
    teacher_seq_len = manifest[CROSS_TOKENIZER]["teacher_seq_len"]
    # The first rows written for the teacher again (no teacher run), to say how much the two
    # tokenizers share there, and to refuse `mapped` where it is almost nothing.
    probe = np.arange(min(PROBE_ROWS, train.n_rows))
    probe_batch = train.take(probe)
    fields = teacher_rows(probe_batch, tokenizer, cached_tokenizer, teacher_seq_len,
                          train.document_starts(probe))
    shares = check_overlap(cfg, tokenizer, cached_tokenizer, vocabulary, probe_batch, fields)
    note = (f"cache of a teacher with another tokenizer ({cached_tokenizer.description}, rows "
            f"of {teacher_seq_len} teacher tokens), loss.cross_vocab {cfg.loss.cross_vocab}; "
            f"{vocabulary.describe()}; {shares}")
    return CachedTeacher(cache_dir, manifest["mode"], train.row_hashes(),
                         CrossVocabulary(buckets, cfg.loss.cross_vocab), note)


def _teacher_tokenizer(cache_dir: str, manifest: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer of the cache's teacher where it is not the student's (else None), read
    from the cache and checked against the fingerprint its manifest recorded."""
    cross = manifest.get(CROSS_TOKENIZER)
    if cross is None:
        return None
    spec = cross["teacher_tokenizer"]
    path = Path(cache_dir) / spec
    if spec != "byte" and not path.is_file():
        raise CacheError(f"cache {cache_dir} lacks {spec}, the tokenizer of the teacher it was "
                         "built from")
    problem = f"cache {cache_dir}: {spec} is not the tokenizer of the teacher it was built from"
    try:
        tokenizer = load_tokenizer(spec if spec == "byte" else str(path))
    except ConfigError:
        raise CacheError(f"{problem} (it cannot be read)") from None
    if tokenizer.fingerprint != manifest["fingerprints"][TEACHER_TOKENIZER]:
        raise CacheError(f"{problem} (its fingerprint is not the manifest's "
                         f"fingerprints.{TEACHER_TOKENIZER})")
    return tokenizer


def check_loss(loss: LossConfig, manifest: dict[str, Any], cache_dir: str) -> None:
    """Refuse a loss the cached targets cannot serve, naming the setting."""
    mode = manifest["mode"]
    if CROSS_TOKENIZER in manifest:
        where = f"cache {cache_dir} ({mode}, of a teacher with another tokenizer)"
        reason = _CROSS_KINDS[mode].refusal_of(loss.cross_vocab, loss.divergence)
    else:
        where = f"cache {cache_dir} ({mode})"
        reason = _KINDS[mode].refusal(loss.divergence)
    if reason is not None:
        raise ConfigError(f"{where}: loss.{reason}")
    cached_t = manifest["params"]["temperature"]
    if mode != "full" and loss.temperature != cached_t:
        raise ConfigError(
            f"{where} holds the teacher at temperature {cached_t}; loss.temperature must be "
            f"the same (got {loss.temperature}): rebuild the cache with cache.temperature="
            f"{loss.temperature}")
