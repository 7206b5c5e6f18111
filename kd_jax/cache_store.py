"""Teacher-logit cache on disk: a manifest, shards of bit-packed rows, verification, prefetch.

The teacher runs once over the packed rows (that code is not here: it hands this module numpy
arrays); training then reads a batch's rows back instead of running the teacher. numpy and the
standard library only, no JAX, so a cache can be written, checked and read on any host.

Layout::

    cache_dir/
      manifest.json       what the cache holds and what it was built from (`make_manifest`);
                          sorted-key JSON, no timestamps
      shards/000000.kdc   shard i holds rows [i*R, min((i+1)*R, n_rows)), R = rows_per_shard
      shards/.000000.kdc.<pid>.tmp
                          a shard being written; never read, removed by the next write of it

A shard file is, in order:

    magic         b"KDCACHE" + format byte
    header size   uint32, little-endian
    header        compact sorted-key JSON: shard index, first row, row count, the manifest's
                  sha256, each field's name, kind, bits, shape, offset and bytes per row, the
                  offset of the row hashes and the data size. It is a function of the manifest
                  and the shard index alone, so a reader rebuilds it and compares bytes.
    data          each field, row after row. A row's values are bit-packed, least significant
                  bit first, and padded to a whole byte: any run of rows is a byte slice.
    row hashes    uint64 little-endian per row (`row_hashes`)
    trailer       sha256 of every byte before it

Fields per mode (T = seq_len, V = vocab_size, id_bits = max(1, ceil(log2 V))):

    topk    ids [T, k] id_bits, logprobs [T, k], tail [T] (log of the mass outside the top k)
    sample  ids [T, n] id_bits, counts [T, n] ceil(log2(n+1)) bits (count 0: a padding slot),
            entropy [T]
    full    logprobs [T, V]

Values are float16, or float32 with value_dtype "float32". A log-probability is never positive
and an entropy never negative, so the sign bit is not stored: 15 bits a float16 value. That bit
keeps top-16 at vocab 131072 under 4.25 bytes an entry: (16 * (17 + 15) + 15) / 8 / 16 = 4.12.

Writing: a shard goes to a temporary name in `shards/`, is fsynced, then renamed, so a file with
a final name is always complete. Process p of P writes the shards i with i % P == p that do not
exist yet (`shards_to_write`), so a rerun resumes. A shard's bytes depend only on the manifest
and its rows: a resumed, reordered or multi-process build is byte-identical to a single one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import numpy as np

from kd_jax.config import ConfigError

FORMAT_VERSION = 1
MODES = ("topk", "sample", "full")
VALUE_DTYPES = ("float16", "float32")
FINGERPRINT_PARTS = ("teacher", "tokenizer", "data", "packing")
MODE_PARAMS = {  # each mode's parameters and their types
    "topk": {"k": int, "temperature": float},
    # `sampler` names the drawing algorithm: a cache is never finished by another one.
    "sample": {"draws": int, "temperature": float, "seed": int, "sampler": str},
    "full": {"temperature": float},
}
MANIFEST_KEYS = ("format_version", "mode", "params", "vocab_size", "id_bits", "seq_len",
                 "n_rows", "rows_per_shard", "value_dtype", "fingerprints")
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".kdc"
_MAGIC = b"KDCACHE" + bytes([FORMAT_VERSION])
_TRAILER_BYTES = 32  # sha256
# A log-softmax computed in low precision can come out a rounding error above 0 (or an entropy
# below 0); within this slack such a value is stored as 0, beyond it it is refused as a bug.
_SIGN_SLACK = 1e-3
_PACK_CHUNK_VALUES = 1 << 20  # values bit-packed at once: bounds the 12-bytes-a-value temporaries


class CacheError(ConfigError):
    """A missing, damaged or mismatched cache; the message is one line naming the file or key."""


# ------------------------------------------------------------------------------ manifest


def make_manifest(mode: str, params: dict[str, Any], *, vocab_size: int, seq_len: int,
                  n_rows: int, rows_per_shard: int, fingerprints: dict[str, str],
                  value_dtype: str = "float16") -> dict[str, Any]:
    """A validated manifest; `fingerprints` has the parts teacher, tokenizer, data, packing."""
    return validate_manifest({
        "format_version": FORMAT_VERSION, "mode": mode, "params": dict(params),
        "vocab_size": vocab_size, "seq_len": seq_len,
        "id_bits": id_bits(vocab_size) if isinstance(vocab_size, (int, np.integer)) else 0,
        "n_rows": n_rows, "rows_per_shard": rows_per_shard, "value_dtype": value_dtype,
        "fingerprints": dict(fingerprints)})


def id_bits(vocab_size: int) -> int:
    """Bits of a token id: ceil(log2(vocab_size)), at least 1."""
    return max(1, (int(vocab_size) - 1).bit_length())


def validate_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A normalized copy (ints as int, floats as float), or CacheError naming the bad key."""
    if not isinstance(manifest, dict):
        raise CacheError(f"a cache manifest must be a mapping, got {type(manifest).__name__}")
    _check_keys(manifest, MANIFEST_KEYS, "manifest", required=MANIFEST_KEYS)
    out = {
        "format_version": _typed(manifest["format_version"], int, "format_version"),
        "mode": manifest["mode"],
        "value_dtype": manifest["value_dtype"],
    }
    if out["format_version"] != FORMAT_VERSION:
        raise CacheError(f"cache format_version {out['format_version']} is not supported "
                         f"(this code reads version {FORMAT_VERSION})")
    for key, choices in (("mode", MODES), ("value_dtype", VALUE_DTYPES)):
        if out[key] not in choices:
            raise CacheError(f"manifest {key}: '{out[key]}' is not one of {', '.join(choices)}"
                             f"{_closest(str(out[key]), choices)}")
    for key in ("vocab_size", "id_bits", "seq_len", "n_rows", "rows_per_shard"):
        out[key] = _typed(manifest[key], int, key)
        if out[key] <= 0:
            raise CacheError(f"manifest {key} must be > 0, got {out[key]}")
    if out["vocab_size"] > 2**31:
        raise CacheError(f"manifest vocab_size {out['vocab_size']} does not fit int32 ids")
    if out["id_bits"] != id_bits(out["vocab_size"]):
        raise CacheError(f"manifest id_bits is {out['id_bits']}, but vocab_size "
                         f"{out['vocab_size']} needs {id_bits(out['vocab_size'])}")

    kinds = MODE_PARAMS[out["mode"]]
    params = manifest["params"]
    if not isinstance(params, dict):
        raise CacheError(f"manifest params must be a mapping, got {params!r}")
    _check_keys(params, kinds, f"{out['mode']} params", required=kinds)
    out["params"] = {key: _typed(params[key], kind, f"params.{key}") for key, kind in kinds.items()}
    if out["params"]["temperature"] <= 0:
        raise CacheError(f"params.temperature must be > 0, got {out['params']['temperature']}")
    if out["mode"] == "topk" and not 1 <= out["params"]["k"] <= out["vocab_size"]:
        raise CacheError(f"params.k must be in [1, vocab_size], got {out['params']['k']}")
    if out["mode"] == "sample" and out["params"]["draws"] < 1:
        raise CacheError(f"params.draws must be >= 1, got {out['params']['draws']}")

    fingerprints = manifest["fingerprints"]
    if not isinstance(fingerprints, dict):
        raise CacheError(f"manifest fingerprints must be a mapping, got {fingerprints!r}")
    _check_keys(fingerprints, FINGERPRINT_PARTS, "fingerprints", required=FINGERPRINT_PARTS)
    for part, value in fingerprints.items():
        if not isinstance(value, str):
            raise CacheError(f"fingerprints.{part} must be a string, got {value!r}")
    out["fingerprints"] = {part: fingerprints[part] for part in FINGERPRINT_PARTS}
    return {key: out[key] for key in MANIFEST_KEYS}


def _typed(value: Any, kind: type, name: str) -> Any:
    """`value` as `kind`: an int must be an integer; a float may be any finite number."""
    if kind is str and isinstance(value, str) and value:
        return value
    if not isinstance(value, bool):
        if kind is int and isinstance(value, (int, np.integer)):
            return int(value)
        if kind is float and isinstance(value, (int, float, np.integer, np.floating)) \
                and math.isfinite(value):
            return float(value)
    raise CacheError(f"manifest {name}: expected {'a finite ' if kind is float else ''}"
                     f"{kind.__name__}, got {value!r}")


def _check_keys(mapping: dict, valid: Iterable[str], where: str, required: Iterable[str]) -> None:
    valid = list(valid)
    for key in mapping:
        if key not in valid:
            raise CacheError(f"unknown key '{key}' in {where}{_closest(str(key), valid)}")
    missing = [key for key in required if key not in mapping]
    if missing:
        raise CacheError(f"{where} lacks {', '.join(missing)}")


def _closest(name: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _mismatch(cache_dir: str | Path | None, stored: dict, wanted: dict, keys: Iterable[str]):
    """CacheError naming the first differing key, or None when `keys` all agree."""
    flat_stored, flat_wanted = _flatten(stored), _flatten(wanted)
    differing = [key for key in keys if flat_stored.get(key) != flat_wanted.get(key)]
    if not differing:
        return None
    key = differing[0]
    what = key.split(".", 1)[1] if key.startswith("fingerprints.") else key
    more = f"; also {', '.join(differing[1:])}" if differing[1:] else ""
    where = f"cache {cache_dir}" if cache_dir is not None else "the cache"
    return CacheError(f"{where} was built with a different {what} ({key}: cache "
                      f"{flat_stored.get(key, '<none>')} != expected "
                      f"{flat_wanted.get(key, '<none>')}){more}")


def create_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `cache_dir/manifest.json` (atomically), or accept an identical existing one.

    An existing manifest that differs raises CacheError naming the differing key: a rerun with
    the same settings resumes, one with another teacher or data must use another directory.
    """
    manifest = validate_manifest(manifest)
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_NAME
    if path.exists():
        stored = read_manifest(cache_dir)
        # The fingerprints explain a difference best; id_bits only follows vocab_size.
        order = ["fingerprints", "mode", "params", "vocab_size", "seq_len", "n_rows",
                 "rows_per_shard", "value_dtype", "format_version", "id_bits"]
        keys = sorted(set(_flatten(stored)) | set(_flatten(manifest)),
                      key=lambda key: (order.index(key.split(".")[0]), key))
        error = _mismatch(cache_dir, stored, manifest, keys)
        if error is not None:
            raise error
        return stored
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    try:
        (cache_dir / "shards").mkdir(parents=True, exist_ok=True)
        _write_atomically(path, [text.encode("utf-8")], checksum=False)
    except OSError as err:
        raise CacheError(f"could not write {path}: {err.strerror or err}") from None
    return manifest


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"no cache at {cache_dir}: {MANIFEST_NAME} is missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is unreadable ({str(err).splitlines()[0]})") from None
    return validate_manifest(raw)


def check_fingerprints(manifest: dict[str, Any], expected: dict[str, Any],
                       cache_dir: str | Path | None = None) -> None:
    """Raise CacheError naming the first part of `manifest` that differs from `expected`.

    `expected` is shaped like a manifest and holds only what the caller knows, for instance
    {"fingerprints": {"teacher": ..., "data": ...}, "seq_len": 256, "mode": "topk"}. A key a
    manifest does not have is an error, so a misspelt key cannot check nothing.
    """
    known = set(_flatten(manifest))
    keys = list(_flatten(expected))
    for key in keys:
        if key not in known:
            raise CacheError(f"unknown cache manifest key '{key}'{_closest(key, known)}")
    error = _mismatch(cache_dir, manifest, expected, keys)
    if error is not None:
        raise error


# -------------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class Field:
    """One array a cache stores per token; on disk it is `bits` bits a value, bit-packed."""

    name: str
    kind: str  # uint | float16 | float32
    bits: int
    shape: tuple[int, ...]  # per token: (k,), (draws,), (vocab_size,) or ()
    limit: int = 0  # uint: values lie in [0, limit)
    sign: int = 0  # floats: -1 values are <= 0, +1 values are >= 0; the sign bit is not stored

    @property
    def per_token(self) -> int:
        return math.prod(self.shape)


def fields(manifest: dict[str, Any]) -> list[Field]:
    """The fields of a cache, in their on-disk order, from its (validated) manifest."""
    mode, params, vocab = manifest["mode"], manifest["params"], manifest["vocab_size"]
    value_kind = manifest["value_dtype"]
    value_bits = 15 if value_kind == "float16" else 31  # the sign bit is implied
    ids_bits = manifest["id_bits"]
    if mode == "topk":
        k = params["k"]
        return [Field("ids", "uint", ids_bits, (k,), limit=vocab),
                Field("logprobs", value_kind, value_bits, (k,), sign=-1),
                Field("tail", value_kind, value_bits, (), sign=-1)]
    if mode == "sample":
        draws = params["draws"]
        return [Field("ids", "uint", ids_bits, (draws,), limit=vocab),
                Field("counts", "uint", draws.bit_length(), (draws,), limit=draws + 1),
                Field("entropy", value_kind, value_bits, (), sign=+1)]
    return [Field("logprobs", value_kind, value_bits, (vocab,), sign=-1)]


def n_shards(manifest: dict[str, Any]) -> int:
    return -(-manifest["n_rows"] // manifest["rows_per_shard"])


def shard_rows(manifest: dict[str, Any], shard_index: int) -> tuple[int, int]:
    """The rows [first, stop) of a shard."""
    if not 0 <= shard_index < n_shards(manifest):
        raise CacheError(f"shard {shard_index} is not in [0, {n_shards(manifest)})")
    first = shard_index * manifest["rows_per_shard"]
    return first, min(first + manifest["rows_per_shard"], manifest["n_rows"])


def shard_path(cache_dir: str | Path, shard_index: int) -> Path:
    return Path(cache_dir) / "shards" / f"{shard_index:06d}{SHARD_SUFFIX}"


def _row_bytes(field: Field, seq_len: int) -> int:
    return -(-seq_len * field.per_token * field.bits // 8)


def _header(manifest: dict[str, Any], shard_index: int) -> dict[str, Any]:
    """A shard's header: a function of the manifest and the shard index only."""
    first, stop = shard_rows(manifest, shard_index)
    n_rows = stop - first
    offset = 0
    layout = []
    for field in fields(manifest):
        row_bytes = _row_bytes(field, manifest["seq_len"])
        layout.append({"name": field.name, "kind": field.kind, "bits": field.bits,
                       "shape": list(field.shape), "offset": offset, "row_bytes": row_bytes})
        offset += n_rows * row_bytes
    return {"format_version": FORMAT_VERSION, "shard": shard_index, "first_row": first,
            "n_rows": n_rows, "manifest_sha256": hashlib.sha256(_canonical(manifest)).hexdigest(),
            "fields": layout, "hashes_offset": offset, "data_bytes": offset + 8 * n_rows}


def _encoded_header(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _MAGIC + len(text).to_bytes(4, "little") + text


# ---------------------------------------------------------------------------- bit packing


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, ceil(count * bits / 8)]: each row's values, `bits` each, LSB first.

    `values` is a non-negative integer array [rows, count] below 2**bits, bits in [1, 32].
    """
    values = np.asarray(values)
    if values.ndim != 2 or not 1 <= bits <= 32:
        raise ValueError(f"pack_bits wants [rows, count] values and bits in [1, 32], got "
                         f"shape {values.shape} and bits {bits}")
    if values.size and (values.min() < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits})")
    rows, count = values.shape
    groups = -(-count // 8)
    out = np.empty((rows, groups * bits), dtype=np.uint8)
    chunk = max(1, _PACK_CHUNK_VALUES // max(groups * 8, 1))
    for start in range(0, rows, chunk):
        out[start: start + chunk] = _pack_groups(values[start: start + chunk], bits, groups)
    return out[:, :-(-count * bits // 8)]


def _pack_groups(values: np.ndarray, bits: int, groups: int) -> np.ndarray:
    """Pack 8 values at a time: 8 x `bits` bits are exactly `bits` bytes.

    The 8 values of a group are shifted into four little-endian 64-bit words (at most 256
    bits), one shift and OR per value and word it touches, and the words' first `bits` bytes
    are the group's bytes: a few passes over the array instead of one a bit.
    """
    rows, count = values.shape
    padded = np.zeros((rows, groups * 8), dtype=np.uint64)
    padded[:, :count] = values
    padded = padded.reshape(rows, groups, 8)
    words = np.zeros((rows, groups, 4), dtype="<u8")
    for i in range(8):
        word, shift = divmod(i * bits, 64)
        words[..., word] |= padded[..., i] << np.uint64(shift)
        if shift + bits > 64:  # the value's high bits spill into the next word
            words[..., word + 1] |= padded[..., i] >> np.uint64(64 - shift)
    return words.view(np.uint8).reshape(rows, groups, 32)[..., :bits].reshape(rows, -1)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_bits`: uint32 [rows, count] from uint8 [rows, row_bytes]."""
    packed = np.asarray(packed, dtype=np.uint8)
    row_bytes = -(-count * bits // 8)
    if packed.ndim != 2 or packed.shape[1] != row_bytes:
        raise ValueError(f"{count} values of {bits} bits take {row_bytes} bytes a row, got "
                         f"shape {packed.shape}")
    padded = np.zeros((packed.shape[0], row_bytes + 8), dtype=np.uint8)
    padded[:, :row_bytes] = packed
    return _unpack_padded(padded, bits, count)


@functools.lru_cache(maxsize=16)
def _bit_positions(bits: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For value j of a row: the byte holding its first bit, and that bit's place in the byte."""
    first_bit = np.arange(count, dtype=np.int64) * bits
    return first_bit >> 3, (first_bit & 7).astype(np.uint8)


def _unpack_padded(padded: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Decode rows of packed bytes, each followed by 8 zero bytes (so wide loads stay inside).

    Value j of a row is read as the little-endian word starting at its first byte, shifted and
    masked: one gather a value instead of one a bit. A value and its offset in the byte (< 8)
    fit 32 bits up to 25 bits a value; wider values load 64 bits.
    """
    rows, stride = padded.shape
    if rows == 0:
        return np.zeros((0, count), dtype=np.uint32)
    byte_index, shift = _bit_positions(bits, count)
    word = np.dtype("<u4") if bits + 7 <= 32 else np.dtype("<u8")
    flat = np.ascontiguousarray(padded).reshape(-1)
    # Every byte offset as the start of an (unaligned) word: a view, nothing is copied.
    windows = np.ndarray(shape=(flat.size - word.itemsize + 1,), dtype=word, buffer=flat,
                         strides=(1,))
    starts = np.arange(0, rows * stride, stride, dtype=np.intp)[:, None] + byte_index
    values = np.take(windows, starts)  # np.take: ~2x faster than windows[starts] here
    values >>= shift.astype(word)
    values &= word.type((1 << bits) - 1)
    return values.astype(np.uint32, copy=False)


def _encode_floats(values: np.ndarray, field: Field) -> np.ndarray:
    """Float values as `field.bits`-bit codes: the IEEE bits without the (known) sign bit."""
    dtype, sign_mask = (np.float16, 0x7FFF) if field.kind == "float16" else (np.float32,
                                                                               0x7FFFFFFF)
    with np.errstate(over="ignore"):  # beyond float16's range is -inf: probability ~0
        rounded = values.astype(dtype)
    codes = rounded.view(np.uint16 if dtype is np.float16 else np.uint32)
    return codes & codes.dtype.type(sign_mask)  # drop the sign bit: |value|


def _decode_floats(codes: np.ndarray, field: Field) -> np.ndarray:
    if field.kind == "float16":
        sign_bit = np.uint16(0x8000 if field.sign < 0 else 0)
        return (codes.astype(np.uint16) | sign_bit).view(np.float16).astype(np.float32)
    sign_bit = np.uint32(0x80000000 if field.sign < 0 else 0)
    return (codes.astype(np.uint32) | sign_bit).view(np.float32)


# ------------------------------------------------------------------------------- writing


def row_hashes(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """uint64 [rows]: blake2b-64 of each row's tokens, segment_ids, loss_mask as int32 LE bytes.

    A cache row and a data row with the same hash were built from the same packed sequence.
    """
    arrays = []
    for name, array in (("tokens", tokens), ("segment_ids", segment_ids),
                        ("loss_mask", loss_mask)):
        array = np.asarray(array)
        if array.ndim != 2 or array.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array [rows, seq_len], got "
                             f"{array.dtype} {array.shape}")
        as_int32 = np.ascontiguousarray(array, dtype="<i4")
        if not np.array_equal(as_int32, array):
            raise ValueError(f"{name} has values outside int32")
        arrays.append(as_int32)
    if len({array.shape for array in arrays}) != 1:
        raise ValueError(f"tokens, segment_ids and loss_mask differ in shape: "
                         f"{[array.shape for array in arrays]}")
    hashes = np.empty(arrays[0].shape[0], dtype=np.uint64)
    for row in range(len(hashes)):
        digest = hashlib.blake2b(digest_size=8)
        for array in arrays:
            digest.update(array[row])
        hashes[row] = int.from_bytes(digest.digest(), "little")
    return hashes


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
            codes = _encode_floats(_checked_floats(values, field, path), field)
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
        _write_atomically(path, chunks, checksum=True)
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


def _write_atomically(path: Path, chunks: Iterable, checksum: bool) -> None:
    """Write to a temporary name, fsync, rename: `path` is either absent or complete.

    With `checksum`, the sha256 of all chunks is appended. OSError propagates after the
    temporary file is removed.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            digest = hashlib.sha256()
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk
                file.write(chunk)
                digest.update(chunk)
            if checksum:
                file.write(digest.digest())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; some filesystems refuse fsync on a directory
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


# ------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class _Shard:
    data: np.ndarray  # the whole file, memory-mapped uint8
    rows_by_field: dict[str, np.ndarray]  # uint8 [rows, row_bytes] views into `data`
    hashes: np.ndarray  # uint64 [rows] view


def _open_shard(cache_dir: Path, manifest: dict[str, Any], shard_index: int,
                verify_checksum: bool) -> _Shard:
    """Memory-map a shard after checking that it is present, whole and this cache's."""
    path = shard_path(cache_dir, shard_index)
    header = _header(manifest, shard_index)
    expected_prefix = _encoded_header(header)
    expected_size = len(expected_prefix) + header["data_bytes"] + _TRAILER_BYTES
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
    if verify_checksum and _file_sha256(data[:-_TRAILER_BYTES]) != bytes(data[-_TRAILER_BYTES:]):
        raise CacheError(f"cache shard {path} is corrupt: its sha256 does not match its trailer")
    body = data.view(np.ndarray)[len(expected_prefix):]  # plain views: memmap slicing is slow
    n_rows = header["n_rows"]
    rows_by_field = {
        layout["name"]: body[layout["offset"]: layout["offset"] + n_rows * layout["row_bytes"]]
        .reshape(n_rows, layout["row_bytes"])
        for layout in header["fields"]}
    hashes = body[header["hashes_offset"]: header["hashes_offset"] + 8 * n_rows].view("<u8")
    return _Shard(data=data, rows_by_field=rows_by_field, hashes=hashes)


def check_shards(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check that every shard is present, whole and this cache's (headers and sizes, no sha256).

    Cheap enough to run before training starts; `verify` also reads every byte.
    """
    for shard_index in range(n_shards(manifest)):
        del _open_shard(Path(cache_dir), manifest, shard_index, verify_checksum=False).data


def _header_problem(path: Path, expected: dict[str, Any]) -> str:
    """Why a shard's header differs from the one its manifest implies, as a predicate."""
    with open(path, "rb") as file:
        magic, size = file.read(len(_MAGIC)), int.from_bytes(file.read(4), "little")
        text = file.read(min(size, 1 << 20))
    # A file whose trailer matches its contents was written whole: then its header is another
    # cache's (or format's), not damage.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    intact = len(data) > _TRAILER_BYTES and \
        _file_sha256(data[:-_TRAILER_BYTES]) == bytes(data[-_TRAILER_BYTES:])
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


class CacheReader:
    """Decoded teacher outputs for any rows of a cache; shards are memory-mapped on first use.

    `read(rows)` returns {field: array [len(rows), T, ...]} in the order of `rows`: ids and
    counts int32, values float32. Opening a shard checks that it is present, whole and belongs
    to this manifest; `verify_checksums=True` also checks its sha256 (a full read per shard).
    """

    def __init__(self, cache_dir: str | Path, verify_checksums: bool = False,
                 max_open_shards: int = 64):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        self.fields = fields(self.manifest)
        self.seq_len = self.manifest["seq_len"]
        self.n_rows = self.manifest["n_rows"]
        self._verify_checksums = verify_checksums
        self._max_open_shards = max(1, max_open_shards)
        self._open: dict[int, _Shard] = {}  # insertion order is the eviction order
        self._lock = threading.Lock()  # a Prefetcher thread may read while another opens

    def _shard(self, shard_index: int) -> _Shard:
        with self._lock:
            shard = self._open.pop(shard_index, None)
            if shard is None:
                shard = _open_shard(self.cache_dir, self.manifest, shard_index,
                                    self._verify_checksums)
                if len(self._open) >= self._max_open_shards:
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
        row_bytes = {field.name: _row_bytes(field, self.seq_len) for field in self.fields}
        # Each field's packed rows, gathered from their shards, 8 zero bytes after each row.
        packed = {name: np.zeros((len(rows), size + 8), dtype=np.uint8)
                  for name, size in row_bytes.items()}
        stored_hashes = np.empty(len(rows), dtype=np.uint64)
        shard_of_row = rows // self.manifest["rows_per_shard"]
        for shard_index in np.unique(shard_of_row):
            at = np.flatnonzero(shard_of_row == shard_index)
            shard = self._shard(int(shard_index))
            local = rows[at] - shard_index * self.manifest["rows_per_shard"]
            for name, size in row_bytes.items():
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
            codes = _unpack_padded(packed[field.name], field.bits, count)
            values = (codes.view(np.int32) if field.kind == "uint"
                      else _decode_floats(codes, field))
            out[field.name] = values.reshape(len(rows), self.seq_len, *field.shape)
        return out

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
            raise CacheError(f"expected_hashes has shape {expected_hashes.shape}, the cache "
                             f"holds {manifest['n_rows']} rows")
    for shard_index in range(n_shards(manifest)):
        shard = _open_shard(cache_dir, manifest, shard_index, verify_checksum=True)
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


# ------------------------------------------------------------------------------ prefetch

_RESULT, _ERROR, _END = "result", "error", "end"


class Prefetcher:
    """`fn(step)` for each of `steps`, computed up to `depth` steps ahead on one thread.

    Iterating yields the results in step order, so host work (reading a batch's cached teacher
    rows) overlaps the device's current step. An exception in `fn` is raised by the `next()`
    that would have returned that step's result, and ends the iteration. `close()` (or leaving
    a `with` block) stops the thread; it waits for a call of `fn` already under way.
    """

    def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._work, args=(fn, iter(steps)),
                                        name="kd_jax-prefetch", daemon=True)
        self._thread.start()

    def _work(self, fn: Callable[[int], Any], steps: Iterable[int]) -> None:
        try:
            for step in steps:
                if self._stop.is_set():
                    return
                self._queue.put((_RESULT, fn(step)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put((_ERROR, err))
            return
        self._queue.put((_END, None))
        # After close() drains the queue each put above has room, so the thread never blocks
        # for good; it returns at the next stop check.

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _RESULT:
            return value
        self._finished = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def next(self) -> Any:
        return next(self)

    def close(self) -> None:
        self._stop.set()
        self._finished = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.01)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
