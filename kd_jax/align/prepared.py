"""The teacher's rows of every training row, made once and kept beside the token store.

`kd_jax.align.rows.teacher_rows` makes a batch's teacher rows from its student rows: each piece
spelled out, tokenized by the teacher's tokenizer, aligned by bytes. On a token store that work
is done once, by `kd-jax prepare` (or the first run that needs it), for every training row, and
written into

    <data.store>/teacher_rows/<key>/
        shard-00000.{tokens,positions,segment_ids,index,back,inside,lo,hi,hashes}.npy
                              SHARD_ROWS rows each
        shard-00000.json      written last: the shard is whole
        manifest.json         written last of all: every shard is whole

so that a step's teacher rows are read (memory-mapped) instead of made. `<key>` names what the
rows depend on: the two tokenizers, the teacher's row length, and the student rows themselves
(the digest of their hashes); another teacher tokenizer or another store gets rows of its own.
Each read compares the student row hashes the shard was made from with the rows it is read for,
so a store prepared again under the same name is never read against stale teacher rows. A
killed prepare keeps its whole shards and goes on from the first missing one. The values are
those `teacher_rows` makes, in the smallest integer types that hold them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from kd_jax.align.rows import teacher_rows
from kd_jax.config import ConfigError
from kd_jax.data.packing import Rows
from kd_jax.data.prepare import write_array, write_json
from kd_jax.data.tokenizers import Tokenizer

VERSION = "kd_jax.teacher_rows/2"
SHARD_ROWS = 4096
MANIFEST = "manifest.json"
# The arrays of a shard, and the batch key each one is read back as.
ARRAYS = {"tokens": "teacher_tokens", "positions": "teacher_positions",
          "segment_ids": "teacher_segment_ids", "index": "teacher_index",
          "back": "teacher_back", "inside": "teacher_inside", "lo": "teacher_lo",
          "hi": "teacher_hi"}


def key(data: Rows, student: Tokenizer, teacher: Tokenizer, teacher_seq_len: int) -> str:
    """What the teacher rows of `data` depend on, as a short name."""
    digest = hashlib.sha256()
    for part in (VERSION, student.fingerprint, teacher.fingerprint, str(teacher_seq_len),
                 str(data.seq_len)):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(data.row_hashes(), dtype=np.uint64).tobytes())
    return digest.hexdigest()[:16]


def is_prepared(root: str | Path, data: Rows, student: Tokenizer, teacher: Tokenizer,
                teacher_seq_len: int) -> bool:
    """Whether the teacher rows of `data` are whole under `root`."""
    return (Path(root) / key(data, student, teacher, teacher_seq_len) / MANIFEST).is_file()


def _dtype(largest: int, signed: bool = False) -> np.dtype:
    for kind in ((np.int16, np.int32) if signed else (np.uint16, np.uint32)):
        if largest <= np.iinfo(kind).max:
            return np.dtype(kind)
    return np.dtype(np.int64)


class PreparedTeacherRows:
    """The prepared teacher rows of a directory, memory-mapped; `fields(rows, batch)` reads
    what `kd_jax.align.rows.teacher_fields` would make for them."""

    def __init__(self, directory: Path, hashes: np.ndarray):
        self.directory = directory
        try:
            self.manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"teacher rows {directory}: cannot read {MANIFEST} "
                              f"({type(err).__name__}); delete the directory to prepare them "
                              "again") from None
        self.hashes = hashes
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            try:
                self._shards[shard] = {
                    name: np.load(self.directory / f"shard-{shard:05d}.{name}.npy",
                                  mmap_mode="r", allow_pickle=False)
                    for name in (*ARRAYS, "hashes")}
            except (OSError, ValueError) as err:
                raise ConfigError(f"teacher rows {self.directory}: shard {shard} cannot be "
                                  f"read ({type(err).__name__}); delete the directory to "
                                  "prepare them again") from None
        return self._shards[shard]

    def fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = {batch_key: None for batch_key in ARRAYS.values()}
        shards, offsets = np.divmod(rows, SHARD_ROWS)
        for shard in np.unique(shards):
            here = shards == shard
            arrays = self._shard(int(shard))
            local = offsets[here]
            if not np.array_equal(arrays["hashes"][local], self.hashes[rows[here]]):
                raise ConfigError(f"teacher rows {self.directory}: shard {shard} was made from "
                                  "other student rows than these; delete the directory to "
                                  "prepare them again")
            for name, batch_key in ARRAYS.items():
                value = np.asarray(arrays[name][local], dtype=np.int32)
                if out[batch_key] is None:
                    out[batch_key] = np.zeros((len(rows), value.shape[1]), np.int32)
                out[batch_key][here] = value
        return out


def prepare_teacher_rows(root: str | Path, data: Rows, student: Tokenizer, teacher: Tokenizer,
                         teacher_seq_len: int,
                         progress: Callable[[int], None] | None = None) -> PreparedTeacherRows:
    """The teacher rows of every row of `data` under `root`/<key>, made where missing (whole
    shards kept from an earlier, stopped start); `progress(rows)` is called as shards finish."""
    directory = Path(root) / key(data, student, teacher, teacher_seq_len)
    hashes = np.asarray(data.row_hashes())
    if (directory / MANIFEST).is_file():
        return PreparedTeacherRows(directory, hashes)
    directory.mkdir(parents=True, exist_ok=True)
    n_rows = data.n_rows
    n_shards = -(-n_rows // SHARD_ROWS)
    max_length = max((len(spelled) for spelled in teacher.token_bytes()), default=0)
    types = {"tokens": _dtype(teacher.vocab_size), "positions": _dtype(teacher_seq_len),
             "segment_ids": _dtype(data.seq_len), "index": _dtype(teacher_seq_len, signed=True),
             "back": _dtype(teacher_seq_len, signed=True), "inside": _dtype(max_length),
             "lo": _dtype(teacher.vocab_size), "hi": _dtype(teacher.vocab_size)}
    for shard in range(n_shards):
        rows = np.arange(shard * SHARD_ROWS, min((shard + 1) * SHARD_ROWS, n_rows))
        done = directory / f"shard-{shard:05d}.json"
        if not done.is_file():
            made = teacher_rows(data.take(rows), student, teacher, teacher_seq_len,
                                data.document_starts(rows), backoff=True)
            for name, batch_key in ARRAYS.items():
                write_array(directory / f"shard-{shard:05d}.{name}.npy",
                            made[batch_key].astype(types[name]))
            write_array(directory / f"shard-{shard:05d}.hashes.npy", hashes[rows])
            aligned = int((made["teacher_index"] >= 0).sum())
            write_json(done, {"rows": len(rows), "aligned": aligned})
        if progress is not None:
            progress(len(rows))
    aligned = sum(json.loads((directory / f"shard-{shard:05d}.json").read_text())["aligned"]
                  for shard in range(n_shards))
    write_json(directory / MANIFEST, {
        "version": VERSION, "rows": n_rows, "shard_rows": SHARD_ROWS,
        "teacher_seq_len": teacher_seq_len, "student_tokenizer": student.description,
        "teacher_tokenizer": teacher.description, "aligned_positions": aligned})
    return PreparedTeacherRows(directory, hashes)
