"""A cache's shards: written whole or not at all, opened and checked, verified.

A shard file is, in order:

    magic         b"KDCACHE" + format byte
    header size   uint32, little-endian
    header        compact sorted-key JSON: shard index, first row, row count, the manifest's
                  sha256, each field's name, kind, bits, shape, offset and bytes per row, the
                  offset of the row hashes and the data size. It is a function of the manifest
                  and the shard index alone, so a reader rebuilds it and compares bytes.
    data          each field, row after row, bit-packed (`kd_jax.cache.codec`)
    row hashes    uint64 little-endian per row (`kd_jax.data.packing.row_hashes`)
    trailer       sha256 of every byte before it

Writing: a shard goes to a temporary name in `shards/`
(`shards/.000000.kdc.<pid>.tmp`, never read, removed by the next write of it), is fsynced, then
renamed, so a file with a final name is always complete. Process p of P writes the shards i with
i % P == p that do not exist yet (`shards_to_write`), so a rerun resumes. A shard's bytes depend
only on the manifest and its rows: a resumed, reordered or multi-process build is
byte-identical to a single one. numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.cache.codec import Field, encode_floats, fields, pack_bits, row_bytes
from kd_jax.cache.manifest import (
    FORMAT_VERSION,
    CacheError,
    canonical,
    n_shards,
    read_manifest,
    shard_rows,
    validate_manifest,
    write_atomically,
)

SHARD_SUFFIX = ".kdc"
_MAGIC = b"KDCACHE" + bytes([FORMAT_VERSION])
TRAILER_BYTES = 32  # sha256

# A log-softmax computed in low precision can come out a rounding error above 0 (or an entropy
# below 0); within this slack such a value is stored as 0, beyond it it is refused as a bug.
_SIGN_SLACK = 1e-3


def shard_path(cache_dir: str | Path, shard_index: int) -> Path:
    return Path(cache_dir) / "shards" / f"{shard_index:06d}{SHARD_SUFFIX}"


def _header(manifest: dict[str, Any], shard_index: int) -> dict[str, Any]:
    """A shard's header: a function of the manifest and the shard index only."""
    first, stop = shard_rows(manifest, shard_index)
    n_rows = stop - first
    offset = 0
    layout = []
    for field in fields(manifest):
        field_row_bytes = row_bytes(field, manifest["seq_len"])
        layout.append({"name": field.name, "kind": field.kind, "bits": field.bits,
                       "shape": list(field.shape), "offset": offset,
                       "row_bytes": field_row_bytes})
        offset += n_rows * field_row_bytes
    return {"format_version": FORMAT_VERSION, "shard": shard_index, "first_row": first,
            "n_rows": n_rows, "manifest_sha256": hashlib.sha256(canonical(manifest)).hexdigest(),
            "fields": layout, "hashes_offset": offset, "data_bytes": offset + 8 * n_rows}


def _encoded_header(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _MAGIC + len(text).to_bytes(4, "little") + text


def shards_to_write(cache_dir: str | Path, manifest: dict[str, Any], process_index: int,
                    process_count: int) -> list[int]:
    """This process's shards (i % process_count == process_index) that are not written yet."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise CacheError(f"process index {process_index} is not in [0, {process_count})")
    return [index for index in range(process_index, n_shards(manifest), process_count)
            if not shard_path(cache_dir, index).exists()]


def write_shard(cache_dir: str | Path, manifest: dict[str, Any], shard_index: int,
                arrays: dict[str, np.ndarray], hashes: np.ndarray) -> Path:
    """Check, pack and atomically write one shard; returns its path.

    `arrays` maps each field name to its unpacked values for the shard's rows, [rows, T, ...]
    (ids and counts integers, values floats); `hashes` is `row_hashes` of the same rows.
    """
    manifest = validate_manifest(manifest)
    path = shard_path(cache_dir, shard_index)
    header = _header(manifest, shard_index)
    n_rows, seq_len = header["n_rows"], manifest["seq_len"]
    schema = fields(manifest)
    names = [field.name for field in schema]
    if sorted(arrays) != sorted(names):
        raise CacheError(f"cache shard {path}: got fields {sorted(arrays)}, a "
                         f"{manifest['mode']} cache has {names}")

    chunks = [_encoded_header(header)]
    for field in schema:
        values = np.asarray(arrays[field.name])
        expected_shape = (n_rows, seq_len, *field.shape)
        if values.shape != expected_shape:
            raise CacheError(f"cache shard {path}: {field.name} has shape {values.shape}, "
                             f"expected {expected_shape}")
        if field.kind == "uint":
            codes = _checked_uints(values, field, path)
        else:
            codes = encode_floats(_checked_floats(values, field, path), field)
        chunks.append(pack_bits(codes.reshape(n_rows, -1), field.bits))
    if manifest["mode"] == "sample":
        totals = np.asarray(arrays["counts"]).sum(axis=-1, dtype=np.int64)
        if totals.max(initial=0) > manifest["params"]["draws"]:
            raise CacheError(f"cache shard {path}: a token's counts add up to "
                             f"{int(totals.max())}, more than draws "
                             f"({manifest['params']['draws']})")
    hashes = np.asarray(hashes)
    if hashes.shape != (n_rows,) or hashes.dtype != np.uint64:
        raise CacheError(f"cache shard {path}: hashes must be uint64 [{n_rows}] (row_hashes), "
                         f"got {hashes.dtype} {hashes.shape}")
    chunks.append(hashes.astype("<u8"))

    try:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by an interrupted write of this shard
        write_atomically(path, chunks, checksum=True)
    except OSError as err:
        raise CacheError(f"could not write cache shard {path} (rows {header['first_row']}-"
                         f"{header['first_row'] + n_rows - 1}): {err.strerror or err}; "
                         "nothing was left behind, rerun to resume") from None
    return path


def _checked_uints(values: np.ndarray, field: Field, path: Path) -> np.ndarray:
    if values.dtype.kind not in "iu":
        raise CacheError(f"cache shard {path}: {field.name} must be integers, got {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= field.limit):
        bad = values[(values < 0) | (values >= field.limit)].flat[0]
        raise CacheError(f"cache shard {path}: {field.name} value {bad} is outside "
                         f"[0, {field.limit})")
    return values


def _checked_floats(values: np.ndarray, field: Field, path: Path) -> np.ndarray:
    if values.dtype.name == "bfloat16":  # a teacher's bfloat16 output, via ml_dtypes
        values = values.astype(np.float32)
    if values.dtype.kind != "f":
        raise CacheError(f"cache shard {path}: {field.name} must be floats, got {values.dtype}")
    if not values.size:
        return values
    # One reduction answers both questions: the extreme on the wrong side is NaN if any is.
    extreme = values.max() if field.sign < 0 else values.min()
    if np.isnan(extreme):
        raise CacheError(f"cache shard {path}: {field.name} holds NaN")
    beyond = -field.sign * extreme  # how far the extreme lies on the wrong side of 0
    if beyond > _SIGN_SLACK:
        sign = "positive" if field.sign < 0 else "negative"
        raise CacheError(f"cache shard {path}: {field.name} value {extreme} is {sign}")
    if beyond <= 0:  # nothing on the wrong side: nothing to clip
        return values
    return np.minimum(values, 0) if field.sign < 0 else np.maximum(values, 0)


@dataclasses.dataclass
class Shard:
    data: np.ndarray  # the whole file, memory-mapped uint8
    rows_by_field: dict[str, np.ndarray]  # uint8 [rows, row_bytes] views into `data`
    hashes: np.ndarray  # uint64 [rows] view


def open_shard(cache_dir: Path, manifest: dict[str, Any], shard_index: int,
               verify_checksum: bool) -> Shard:
    """Memory-map a shard after checking that it is present, whole and this cache's."""
    path = shard_path(cache_dir, shard_index)
    header = _header(manifest, shard_index)
    expected_prefix = _encoded_header(header)
    expected_size = len(expected_prefix) + header["data_bytes"] + TRAILER_BYTES
    first, stop = header["first_row"], header["first_row"] + header["n_rows"]
    rows = f"rows {first}-{stop - 1}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheError(f"cache shard {path} ({rows}) is missing: rerun the cache build to "
                         "write it") from None
    with open(path, "rb") as file:
        prefix = file.read(len(expected_prefix))
    if prefix != expected_prefix:
        if expected_prefix.startswith(prefix):
            raise CacheError(f"cache shard {path} is truncated ({size} of {expected_size} "
                             "bytes)")
        raise CacheError(f"cache shard {path} {_header_problem(path, header)}")
    if size != expected_size:
        state = "truncated" if size < expected_size else "corrupt"
        raise CacheError(f"cache shard {path} is {state} ({size} bytes, expected "
                         f"{expected_size})")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if verify_checksum and _file_sha256(data[:-TRAILER_BYTES]) != bytes(data[-TRAILER_BYTES:]):
        raise CacheError(f"cache shard {path} is corrupt: its sha256 does not match its trailer")
    body = data.view(np.ndarray)[len(expected_prefix):]  # plain views: memmap slicing is slow
    n_rows = header["n_rows"]
    rows_by_field = {
        layout["name"]: body[layout["offset"]: layout["offset"] + n_rows * layout["row_bytes"]]
        .reshape(n_rows, layout["row_bytes"])
        for layout in header["fields"]}
    hashes = body[header["hashes_offset"]: header["hashes_offset"] + 8 * n_rows].view("<u8")
    return Shard(data=data, rows_by_field=rows_by_field, hashes=hashes)


def check_shards(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check that every shard is present, whole and this cache's (headers and sizes, no sha256).

    Cheap enough to run before training starts; `verify` also reads every byte.
    """
    for shard_index in range(n_shards(manifest)):
        del open_shard(Path(cache_dir), manifest, shard_index, verify_checksum=False).data


def _header_problem(path: Path, expected: dict[str, Any]) -> str:
    """Why a shard's header differs from the one its manifest implies, as a predicate."""
    with open(path, "rb") as file:
        magic, size = file.read(len(_MAGIC)), int.from_bytes(file.read(4), "little")
        text = file.read(min(size, 1 << 20))
    # A file whose trailer matches its contents was written whole: then its header is another
    # cache's (or format's), not damage.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    intact = len(data) > TRAILER_BYTES and \
        _file_sha256(data[:-TRAILER_BYTES]) == bytes(data[-TRAILER_BYTES:])
    del data
    if not intact:
        return "is corrupt: its header does not match the manifest and its sha256 is wrong"
    if magic != _MAGIC:
        return "is not a kd_jax cache shard of this format (its first bytes differ)"
    try:
        stored = json.loads(text)
    except ValueError:
        stored = None
    if isinstance(stored, dict) and stored.get("manifest_sha256") != expected["manifest_sha256"]:
        return "belongs to another cache: it was written for a different manifest.json"
    return "does not match its manifest (written by another version of kd_jax?)"


def _file_sha256(data: np.ndarray) -> bytes:
    digest = hashlib.sha256()
    step = 1 << 24
    for start in range(0, len(data), step):
        digest.update(data[start: start + step])
    return digest.digest()


def verify(cache_dir: str | Path, expected_hashes: np.ndarray | None = None) -> dict[str, Any]:
    """Check every shard fully; raise CacheError naming the first bad one, else a summary.

    A shard can be missing, truncated, corrupt (sha256 or header mismatch), or built from
    other data (its row hashes differ from `expected_hashes`, uint64 [n_rows], if given).
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if expected_hashes is not None:
        expected_hashes = np.asarray(expected_hashes, dtype=np.uint64)
        if expected_hashes.shape != (manifest["n_rows"],):
            raise CacheError(f"the data packs into {len(expected_hashes)} rows and cache "
                             f"{cache_dir} holds {manifest['n_rows']}: it was built from "
                             "other data")
    for shard_index in range(n_shards(manifest)):
        shard = open_shard(cache_dir, manifest, shard_index, verify_checksum=True)
        if expected_hashes is not None:
            first, stop = shard_rows(manifest, shard_index)
            differ = np.flatnonzero(shard.hashes != expected_hashes[first:stop])
            if differ.size:
                row = first + int(differ[0])
                raise CacheError(f"cache row {row} (shard {shard_path(cache_dir, shard_index)}) "
                                 f"does not match data row {row}: the cache was built from "
                                 "other data")
        del shard  # release the map before the next one
    tokens = manifest["n_rows"] * manifest["seq_len"]
    total = _directory_bytes(cache_dir)
    return {"shards": n_shards(manifest), "rows": manifest["n_rows"], "tokens": tokens,
            "bytes": total, "bytes_per_token": total / tokens}


def _directory_bytes(cache_dir: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(cache_dir) for name in names)


def disk_bytes_per_token(cache_dir: str | Path) -> float:
    """Every byte under `cache_dir` (manifest, shards, anything else) per token covered."""
    manifest = read_manifest(cache_dir)
    return _directory_bytes(Path(cache_dir)) / (manifest["n_rows"] * manifest["seq_len"])
