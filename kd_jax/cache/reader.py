"""Reading a cache: the decoded targets of any rows, shards memory-mapped on first use.

numpy and the standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import numpy as np

from kd_jax.cache.codec import decode_floats, fields, row_bytes, unpack_padded
from kd_jax.cache.manifest import CacheError, read_manifest
from kd_jax.cache.shards import Shard, open_shard


class CacheReader:
    """Decoded teacher outputs for any rows of a cache; shards are memory-mapped on first use.

    `read(rows)` returns {field: array [len(rows), T, ...]} in the order of `rows`: ids and
    counts int32, values float32. Opening a shard checks that it is present, whole and belongs
    to this manifest; `verify_checksums=True` also checks its sha256 the first time it is opened
    (a full read per shard, once: training reads each shard many times).
    """

    def __init__(self, cache_dir: str | Path, verify_checksums: bool = False,
                 maxopen_shards: int = 64):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        self.fields = fields(self.manifest)
        self.seq_len = self.manifest["seq_len"]
        self.n_rows = self.manifest["n_rows"]
        self._verify_checksums = verify_checksums
        self._maxopen_shards = max(1, maxopen_shards)
        self._open: dict[int, Shard] = {}  # insertion order is the eviction order
        self._verified: set[int] = set()  # shards whose sha256 was checked
        self._lock = threading.Lock()  # a Prefetcher thread may read while another opens

    def _shard(self, shard_index: int) -> Shard:
        with self._lock:
            shard = self._open.pop(shard_index, None)
            if shard is None:
                verify = self._verify_checksums and shard_index not in self._verified
                shard = open_shard(self.cache_dir, self.manifest, shard_index, verify)
                self._verified.add(shard_index)
                if len(self._open) >= self._maxopen_shards:
                    self._open.pop(next(iter(self._open)))  # each map holds a file descriptor
            self._open[shard_index] = shard  # most recently used last
            return shard

    def read(self, rows: np.ndarray | Iterable[int],
             expected_hashes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The fields of `rows` (1-D row indices, any order, repeats allowed).

        `expected_hashes` (uint64 [len(rows)], `row_hashes` of the data rows being trained on)
        are compared with the hashes stored at write time; a difference raises CacheError.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            bad = rows[(rows < 0) | (rows >= self.n_rows)][0]
            raise CacheError(f"row {bad} is not in cache {self.cache_dir}, which holds rows "
                             f"0-{self.n_rows - 1}")
        sizes = {field.name: row_bytes(field, self.seq_len) for field in self.fields}
        # Each field's packed rows, gathered from their shards, 8 zero bytes after each row.
        packed = {name: np.zeros((len(rows), size + 8), dtype=np.uint8)
                  for name, size in sizes.items()}
        stored_hashes = np.empty(len(rows), dtype=np.uint64)
        shard_of_row = rows // self.manifest["rows_per_shard"]
        for shard_index in np.unique(shard_of_row):
            at = np.flatnonzero(shard_of_row == shard_index)
            shard = self._shard(int(shard_index))
            local = rows[at] - shard_index * self.manifest["rows_per_shard"]
            for name, size in sizes.items():
                packed[name][at, :size] = shard.rows_by_field[name][local]
            stored_hashes[at] = shard.hashes[local]
        if expected_hashes is not None:
            expected_hashes = np.asarray(expected_hashes, dtype=np.uint64)
            if expected_hashes.shape != rows.shape:
                raise ValueError(f"expected_hashes has shape {expected_hashes.shape}, rows "
                                 f"{rows.shape}")
            differ = np.flatnonzero(stored_hashes != expected_hashes)
            if differ.size:
                row = rows[differ[0]]
                raise CacheError(f"cache row {row} does not match data row {row}: the cache at "
                                 f"{self.cache_dir} was built from other data")
        out = {}
        for field in self.fields:
            count = self.seq_len * field.per_token
            codes = unpack_padded(packed[field.name], field.bits, count)
            values = (codes.view(np.int32) if field.kind == "uint"
                      else decode_floats(codes, field))
            out[field.name] = values.reshape(len(rows), self.seq_len, *field.shape)
        return out

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
