"""The teacher-logit cache seen from a run: what a cache must match, and its batches.

`kd_jax.cache_store` is the format (shards, manifest, verification); this module ties a cache to
the config and data of a run:

- `fingerprints` names what the cached targets depend on, in four parts: the teacher's weights,
  the tokenizer, the data (source and preprocessing) and the packing (sequence length and the
  packed rows themselves). A cache built from anything else is refused, naming the part.
- `open_for_training` checks a cache against a run (fingerprints, and a loss the cached targets
  can serve) and `TargetBatches` reads the targets of any rows, with a per-row hash check that
  catches a cache whose rows do not line up with the data's.

numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax import cache_store
from kd_jax.config import Config

# The algorithm of `kd_jax.targets.sample_targets`; change it whenever the draws change.
SAMPLER = "inverse-cdf-int30"


def teacher_fingerprint(teacher_dir: str | Path, step: int) -> str:
    """A hash of the bytes of a teacher run's parameter files at checkpoint `step`.

    It reads the parameter files once (as loading the teacher does); the model config is
    included, since the same bytes mean nothing under another architecture.
    """
    from kd_jax import checkpoint

    params_dir = checkpoint.checkpoint_dir(teacher_dir) / str(step) / "params"
    digest = hashlib.sha256()
    config_text = (Path(teacher_dir) / "config.yaml").read_text()
    digest.update(json.dumps(_model_section(config_text), sort_keys=True).encode())
    for path in sorted(p for p in params_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(params_dir)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _model_section(config_text: str) -> dict:
    import yaml

    return (yaml.safe_load(config_text) or {}).get("model", {})


def _data_identity(cfg: Config, tokenizer) -> str:
    """The data source and its preprocessing: every data field but the sequence length."""
    from kd_jax import data as data_lib

    return data_lib.fingerprint(dataclasses.replace(cfg.data, seq_len=0), tokenizer)


def packing_fingerprint(seq_len: int, hashes: np.ndarray) -> str:
    """The packed rows themselves: their length, count and every row's hash, in order."""
    digest = hashlib.sha256(f"{seq_len}:{len(hashes)}:".encode())
    digest.update(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    return digest.hexdigest()[:16]


def train_row_hashes(train) -> np.ndarray:
    return cache_store.row_hashes(train.tokens, train.segment_ids, train.loss_mask)


def fingerprints(cfg: Config, tokenizer, train, teacher: str | None) -> dict[str, str]:
    """The four parts a cache depends on; `teacher` is `teacher_fingerprint` (None: unknown)."""
    parts = {"teacher": teacher} if teacher is not None else {}
    parts["tokenizer"] = tokenizer.fingerprint
    if cfg.data.source != "cache":  # an imported cache's rows are its own data
        parts["data"] = _data_identity(cfg, tokenizer)
    parts["packing"] = packing_fingerprint(cfg.data.seq_len, train_row_hashes(train))
    return parts


def manifest_params(cfg: Config) -> dict[str, Any]:
    c = cfg.cache
    if c.mode == "topk":
        return {"k": c.k, "temperature": c.temperature}
    if c.mode == "sample":
        return {"draws": c.draws, "temperature": c.temperature, "seed": c.seed,
                "sampler": SAMPLER}
    return {"temperature": 1.0}  # full: stored at T = 1, re-tempered exactly when training


def check_loss(cfg: Config, manifest: dict[str, Any], cache_dir: str) -> None:
    """Refuse a loss the cached targets cannot serve, naming the setting."""
    from kd_jax.config import ConfigError

    mode, loss = manifest["mode"], cfg.loss
    where = f"cache {cache_dir} ({mode})"
    if mode == "sample" and loss.divergence != "forward_kl":
        raise ConfigError(f"{where}: sampled targets estimate forward KL only, not "
                          f"loss.divergence={loss.divergence}")
    if mode != "full" and loss.divergence == "mse":
        raise ConfigError(f"{where}: loss.divergence=mse needs the teacher's logits (a full "
                          "cache)")
    cached_t = manifest["params"]["temperature"]
    if mode != "full" and loss.temperature != cached_t:
        raise ConfigError(
            f"{where} holds the teacher at temperature {cached_t}; loss.temperature must be "
            f"the same (got {loss.temperature}): rebuild the cache with cache.temperature="
            f"{loss.temperature}")


def open_for_training(cfg: Config, tokenizer, train, teacher: str | None
                      ) -> tuple[dict[str, Any], np.ndarray]:
    """Check `cache.dir` against this run; returns (manifest, the train rows' hashes)."""
    cache_dir = cfg.cache.dir
    manifest = cache_store.read_manifest(cache_dir)
    expected = {"fingerprints": fingerprints(cfg, tokenizer, train, teacher),
                "seq_len": cfg.data.seq_len, "n_rows": train.n_rows,
                "vocab_size": tokenizer.vocab_size}
    cache_store.check_fingerprints(manifest, expected, cache_dir)
    check_loss(cfg, manifest, cache_dir)
    cache_store.check_shards(cache_dir, manifest)
    return manifest, train_row_hashes(train)


class TargetBatches:
    """The cached targets of any rows, checked against the rows' hashes."""

    def __init__(self, cache_dir: str, hashes: np.ndarray):
        self.hashes = hashes
        self.reader = cache_store.CacheReader(cache_dir)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        return self.reader.read(rows, expected_hashes=self.hashes[rows])

    def close(self) -> None:
        self.reader.close()
