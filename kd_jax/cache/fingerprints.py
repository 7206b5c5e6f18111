"""What a cache is checked against: fingerprints of the teacher, tokenizer, data and packing.

A cache built from one teacher, tokenizer, corpus or packing is never read for another: its
manifest records these four fingerprints (`kd_jax.cache.manifest`), and the teacher's
tokenizer's where it is not the student's; each of its rows carries the hash of the data row it
was computed on. numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from kd_jax.config import Config
from kd_jax.data.batches import fingerprint as data_fingerprint
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer


def teacher_fingerprint(teacher_dir: str | Path, step: int | None) -> str:
    """A hash of the bytes of a teacher run's parameter files at checkpoint `step`, or (step
    None) of a Hugging Face checkpoint's config.json and safetensors files.

    It reads the parameter files once (as loading the teacher does); the model config is
    included, since the same bytes mean nothing under another architecture.
    """
    from kd_jax import checkpoint  # orbax, imported only when a teacher is fingerprinted

    digest = hashlib.sha256()
    if step is None:
        params_dir = Path(teacher_dir)
        files = [params_dir / "config.json", *sorted(params_dir.glob("*.safetensors"))]
    else:
        params_dir = checkpoint.checkpoint_dir(teacher_dir) / str(step) / "params"
        config_text = (Path(teacher_dir) / "config.yaml").read_text()
        digest.update(json.dumps(_model_section(config_text), sort_keys=True).encode())
        files = sorted(p for p in params_dir.rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(params_dir)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _model_section(config_text: str) -> dict:
    import yaml

    return (yaml.safe_load(config_text) or {}).get("model", {})


def _data_identity(cfg: Config, tokenizer: Tokenizer) -> str:
    """The data source and its preprocessing: every data field but the sequence length."""
    return data_fingerprint(dataclasses.replace(cfg.data, seq_len=0), tokenizer)


def packing_fingerprint(seq_len: int, hashes: np.ndarray) -> str:
    """The packed rows themselves: their length, count and every row's hash, in order."""
    digest = hashlib.sha256(f"{seq_len}:{len(hashes)}:".encode())
    digest.update(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    return digest.hexdigest()[:16]


def fingerprints(cfg: Config, tokenizer: Tokenizer, train: Rows, teacher: str | None,
                 teacher_tokenizer: Tokenizer | None = None) -> dict[str, str]:
    """The four parts a cache depends on; `teacher` is `teacher_fingerprint` (None: unknown).
    A teacher with another tokenizer (`teacher_tokenizer`, the student's being `tokenizer`,
    whose rows the cache follows) adds a fifth, its fingerprint."""
    parts = {"teacher": teacher} if teacher is not None else {}
    parts["tokenizer"] = tokenizer.fingerprint
    if teacher_tokenizer is not None:
        parts["teacher_tokenizer"] = teacher_tokenizer.fingerprint
    if cfg.data.source != "cache":  # an imported cache's rows are its own data
        parts["data"] = _data_identity(cfg, tokenizer)
    parts["packing"] = packing_fingerprint(cfg.data.seq_len, train.row_hashes())
    return parts
