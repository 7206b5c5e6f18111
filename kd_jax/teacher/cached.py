"""The cached teacher: the targets `kd-jax precompute` (or `kd-jax cache import`) wrote, read
back for each batch's rows instead of running the teacher.

Opening a cache for training checks it against the run before anything is written: its
fingerprints (teacher, tokenizer, data, packing), its sizes, the loss it can serve, and that every
shard is present and whole. Each read then checks every row's hash against the data row it is
trained beside. Seen from the step it is a teacher like `OnlineTeacher`: `soft_targets(params,
batch)` turns the fields that travel in the batch into the loss's soft targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.cache.fingerprints import fingerprints
from kd_jax.cache.manifest import check_fingerprints, read_manifest
from kd_jax.cache.reader import CacheReader
from kd_jax.cache.shards import check_shards
from kd_jax.config import Config, ConfigError, LossConfig
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer
from kd_jax.losses.soft_targets import Dense, Sampled, SoftTargets, TopK

# The loss's soft targets of each cache mode. A full cache holds log-probabilities, which serve
# as logits at any temperature (log-softmax only shifts logits by a constant per token).
_KINDS = {"full": Dense, "topk": TopK, "sample": Sampled}
SOFT_TARGETS = "soft_targets"  # the batch key the cached fields travel under


class CachedTeacher:
    """The targets of `cache_dir` for any training rows; `hashes` are those rows' hashes."""

    def __init__(self, cache_dir: str | Path, mode: str, hashes: np.ndarray):
        self.mode = mode
        self.hashes = hashes
        # Each shard's checksum is checked when it is first read: a damaged shard is named, never
        # trained on (a full read of the shard, once; benchmarks/cache_read.py measures it).
        self.reader = CacheReader(cache_dir, verify_checksums=True)

    def soft_targets(self, params: Any, batch: dict[str, Any]) -> SoftTargets:
        fields = batch[SOFT_TARGETS]
        if self.mode == "full":
            return Dense(fields["logprobs"])
        return _KINDS[self.mode](**fields)

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        rows = np.asarray(rows, dtype=np.int64)
        return {SOFT_TARGETS: self.reader.read(rows, expected_hashes=self.hashes[rows])}

    def close(self) -> None:
        self.reader.close()


def open_cache(cfg: Config, tokenizer: Tokenizer, train: Rows, teacher: str | None
               ) -> CachedTeacher:
    """`cache.dir`, checked against this run; `teacher` is the teacher run's fingerprint (or
    None when the config names no teacher run)."""
    cache_dir = cfg.cache.dir
    manifest = read_manifest(cache_dir)
    expected = {"fingerprints": fingerprints(cfg, tokenizer, train, teacher),
                "seq_len": cfg.data.seq_len, "n_rows": train.n_rows,
                "vocab_size": tokenizer.vocab_size}
    check_fingerprints(manifest, expected, cache_dir)
    check_loss(cfg.loss, manifest, cache_dir)
    check_shards(cache_dir, manifest)
    return CachedTeacher(cache_dir, manifest["mode"], train.row_hashes())


def check_loss(loss: LossConfig, manifest: dict[str, Any], cache_dir: str) -> None:
    """Refuse a loss the cached targets cannot serve, naming the setting."""
    mode = manifest["mode"]
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
