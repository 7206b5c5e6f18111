"""A cache's manifest: what it holds and what it was built from.

Layout::

    cache_dir/
      manifest.json       this module (`make_manifest`); sorted-key JSON, no timestamps
      shards/000000.kdc   shard i holds rows [i*R, min((i+1)*R, n_rows)), R = rows_per_shard
                          (`kd_jax.cache.shards`)
      teacher_tokenizer.json   a teacher with another tokenizer: its tokenizer.json, copied
      tokenizer/          the student's tokenizer files (a Hugging Face tokenizer), copied:
                          what `data.tokenizer: auto` reads when distilling from the cache

The manifest names the cache's mode and parameters, its sizes, and four fingerprints (teacher,
tokenizer, data, packing): a cache built from anything else is refused with one line naming the
part that differs. numpy and the standard library only.

A teacher whose tokenizer is not the student's (`kd_jax.align`) is cached on the student's rows
all the same: each student position holds the teacher's targets at its aligned teacher position,
in the teacher's vocabulary, and whether it has one (`kd_jax.cache.codec`'s `aligned`). Such a
manifest has two keys more: the fingerprint `teacher_tokenizer`, and `cross_tokenizer`, where the
teacher's tokenizer is read from (`teacher_tokenizer.json` in the cache, or "byte") and how long
its rows were (`teacher_seq_len`, which decides what aligns). Its `vocab_size` is the teacher
tokenizer's: the vocabulary of the cached ids and log-probabilities.

A cache that `kd-jax cache import` mapped from an API whose tokens are not the student's
(`kd_jax.cache.api_responses`) is in the student's vocabulary, and its manifest has one key more,
`mapped_from_api`: how many of its response positions are aligned with an API position (and so
have a target), of how many, and the share.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.checks import closest
from kd_jax.config import CacheMode, ConfigError, ValueDType, choices

FORMAT_VERSION = 1
MODES = choices(CacheMode)
VALUE_DTYPES = choices(ValueDType)
FINGERPRINT_PARTS = ("teacher", "tokenizer", "data", "packing")

MODE_PARAMS = {  # each mode's parameters and their types
    "topk": {"k": int, "temperature": float},
    # `sampler` names the drawing algorithm: a cache is never finished by another one.
    "sample": {"draws": int, "temperature": float, "seed": int, "sampler": str},
    "full": {"temperature": float},
}

MANIFEST_KEYS = ("format_version", "mode", "params", "vocab_size", "id_bits", "seq_len",
                 "n_rows", "rows_per_shard", "value_dtype", "fingerprints")

# A cache of a teacher with another tokenizer: what its manifest has besides (the module
# docstring). Absent from any other manifest, so that those keep their bytes (and their shards
# the manifest's sha256 in their headers).
CROSS_TOKENIZER = "cross_tokenizer"
TEACHER_TOKENIZER = "teacher_tokenizer"  # the fingerprint's part
TEACHER_TOKENIZER_FILE = "teacher_tokenizer.json"
CROSS_KEYS = {"teacher_tokenizer": str, "teacher_seq_len": int}
# A cache imported from an API whose tokens are not the student's (the module docstring); absent
# from any other manifest, as `cross_tokenizer` is.
MAPPED_FROM_API = "mapped_from_api"
MAPPED_KEYS = {"aligned_positions": int, "response_positions": int, "aligned_share": float}
# The keys a manifest may have besides MANIFEST_KEYS.
OPTIONAL_KEYS = (CROSS_TOKENIZER, MAPPED_FROM_API)


MANIFEST_NAME = "manifest.json"
# The student's tokenizer, copied into a cache (tokenizer.json and, where the tokenizer has them,
# the files beside it that hold its chat template), so a run that reads the cache resolves
# `data.tokenizer: auto` to the tokenizer its rows were made with.
STUDENT_TOKENIZER_DIR = "tokenizer"
STUDENT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class CacheError(ConfigError):
    """A missing, damaged or mismatched cache; the message is one line naming the file or key."""


def make_manifest(mode: str, params: dict[str, Any], *, vocab_size: int, seq_len: int,
                  n_rows: int, rows_per_shard: int, fingerprints: dict[str, str],
                  value_dtype: str = "float16", cross_tokenizer: dict[str, Any] | None = None,
                  mapped_from_api: dict[str, Any] | None = None) -> dict[str, Any]:
    """A validated manifest; `fingerprints` has the parts teacher, tokenizer, data, packing (and
    teacher_tokenizer with `cross_tokenizer`, for a teacher of another tokenizer);
    `mapped_from_api` for an import mapped from an API's tokens."""
    manifest = {
        "format_version": FORMAT_VERSION, "mode": mode, "params": dict(params),
        "vocab_size": vocab_size, "seq_len": seq_len,
        "id_bits": id_bits(vocab_size) if isinstance(vocab_size, (int, np.integer)) else 0,
        "n_rows": n_rows, "rows_per_shard": rows_per_shard, "value_dtype": value_dtype,
        "fingerprints": dict(fingerprints)}
    if cross_tokenizer is not None:
        manifest[CROSS_TOKENIZER] = dict(cross_tokenizer)
    if mapped_from_api is not None:
        manifest[MAPPED_FROM_API] = dict(mapped_from_api)
    return validate_manifest(manifest)


def id_bits(vocab_size: int) -> int:
    """Bits of a token id: ceil(log2(vocab_size)), at least 1."""
    return max(1, (int(vocab_size) - 1).bit_length())


def validate_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A normalized copy (ints as int, floats as float), or CacheError naming the bad key."""
    if not isinstance(manifest, dict):
        raise CacheError(f"a cache manifest must be a mapping, got {type(manifest).__name__}")
    _check_keys(manifest, (*MANIFEST_KEYS, *OPTIONAL_KEYS), "manifest", required=MANIFEST_KEYS)
    out = {
        "format_version": _typed(manifest["format_version"], int, "format_version"),
        "mode": manifest["mode"],
        "value_dtype": manifest["value_dtype"],
    }
    if out["format_version"] != FORMAT_VERSION:
        raise CacheError(f"cache format_version {out['format_version']} is not supported "
                         f"(this code reads version {FORMAT_VERSION})")
    for key, names in (("mode", MODES), ("value_dtype", VALUE_DTYPES)):
        if out[key] not in names:
            raise CacheError(f"manifest {key}: '{out[key]}' is not one of {', '.join(names)}"
                             f"{closest(str(out[key]), names)}")
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
    _check_keys(fingerprints, (*FINGERPRINT_PARTS, TEACHER_TOKENIZER), "fingerprints",
                required=FINGERPRINT_PARTS)
    for part, value in fingerprints.items():
        if not isinstance(value, str):
            raise CacheError(f"fingerprints.{part} must be a string, got {value!r}")
    out["fingerprints"] = {part: fingerprints[part] for part in FINGERPRINT_PARTS}
    if MAPPED_FROM_API in manifest:
        out[MAPPED_FROM_API] = _mapped_from_api(manifest[MAPPED_FROM_API])
    if CROSS_TOKENIZER in manifest or TEACHER_TOKENIZER in fingerprints:
        out["fingerprints"][TEACHER_TOKENIZER] = _cross_fingerprint(fingerprints)
        out[CROSS_TOKENIZER] = _cross_tokenizer(manifest.get(CROSS_TOKENIZER), out["mode"])
    return {key: out[key] for key in (*MANIFEST_KEYS, *OPTIONAL_KEYS) if key in out}


def _cross_fingerprint(fingerprints: dict[str, Any]) -> str:
    if TEACHER_TOKENIZER not in fingerprints:
        raise CacheError(f"manifest {CROSS_TOKENIZER} needs fingerprints.{TEACHER_TOKENIZER}")
    return fingerprints[TEACHER_TOKENIZER]


def _cross_tokenizer(cross: Any, mode: str) -> dict[str, Any]:
    """A manifest's `cross_tokenizer`, checked: where the teacher's tokenizer is read from and
    the length of its rows."""
    if cross is None:
        raise CacheError(f"manifest fingerprints.{TEACHER_TOKENIZER} needs {CROSS_TOKENIZER}")
    if not isinstance(cross, dict):
        raise CacheError(f"manifest {CROSS_TOKENIZER} must be a mapping, got {cross!r}")
    _check_keys(cross, CROSS_KEYS, CROSS_TOKENIZER, required=CROSS_KEYS)
    out = {key: _typed(cross[key], kind, f"{CROSS_TOKENIZER}.{key}")
           for key, kind in CROSS_KEYS.items()}
    if out["teacher_tokenizer"] not in ("byte", TEACHER_TOKENIZER_FILE):
        raise CacheError(f"manifest {CROSS_TOKENIZER}.teacher_tokenizer must be 'byte' or "
                         f"'{TEACHER_TOKENIZER_FILE}', got {out['teacher_tokenizer']!r}")
    if out["teacher_seq_len"] <= 0:
        raise CacheError(f"manifest {CROSS_TOKENIZER}.teacher_seq_len must be > 0, got "
                         f"{out['teacher_seq_len']}")
    if mode == "sample":  # kd_jax.train.precompute refuses to write one
        raise CacheError("a sample cache cannot hold a teacher of another tokenizer")
    return out


def _mapped_from_api(mapped: Any) -> dict[str, Any]:
    """A manifest's `mapped_from_api`, checked: aligned positions of response positions."""
    if not isinstance(mapped, dict):
        raise CacheError(f"manifest {MAPPED_FROM_API} must be a mapping, got {mapped!r}")
    _check_keys(mapped, MAPPED_KEYS, MAPPED_FROM_API, required=MAPPED_KEYS)
    out = {key: _typed(mapped[key], kind, f"{MAPPED_FROM_API}.{key}")
           for key, kind in MAPPED_KEYS.items()}
    if not 0 <= out["aligned_positions"] <= out["response_positions"] \
            or not 0.0 <= out["aligned_share"] <= 1.0:
        raise CacheError(f"manifest {MAPPED_FROM_API}: {out['aligned_positions']} aligned of "
                         f"{out['response_positions']} positions, share "
                         f"{out['aligned_share']}, is not a share")
    return out


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
            raise CacheError(f"unknown key '{key}' in {where}{closest(str(key), valid)}")
    missing = [key for key in required if key not in mapping]
    if missing:
        raise CacheError(f"{where} lacks {', '.join(missing)}")


def canonical(manifest: dict[str, Any]) -> bytes:
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
    stored_value, wanted_value = (flat.get(key) for flat in (flat_stored, flat_wanted))
    return CacheError(f"{where} was built with a different {what} ({key}: cache "
                      f"{'<none>' if stored_value is None else stored_value} != expected "
                      f"{'<none>' if wanted_value is None else wanted_value}){more}")


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
        order = ["fingerprints", CROSS_TOKENIZER, "mode", "params", "vocab_size", "seq_len",
                 "n_rows", "rows_per_shard", "value_dtype", MAPPED_FROM_API, "format_version",
                 "id_bits"]
        keys = sorted(set(_flatten(stored)) | set(_flatten(manifest)),
                      key=lambda key: (order.index(key.split(".")[0]), key))
        error = _mismatch(cache_dir, stored, manifest, keys)
        if error is not None:
            raise error
        return stored
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    try:
        (cache_dir / "shards").mkdir(parents=True, exist_ok=True)
        write_atomically(path, [text.encode("utf-8")], checksum=False)
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
    manifest does not have is an error, so a misspelt key cannot check nothing; the keys of a
    cache of a teacher with another tokenizer are known to every manifest (absent: <none>).
    """
    known = set(_flatten(manifest)) | {f"fingerprints.{TEACHER_TOKENIZER}"} | {
        f"{CROSS_TOKENIZER}.{key}" for key in CROSS_KEYS}
    keys = list(_flatten(expected))
    for key in keys:
        if key not in known:
            raise CacheError(f"unknown cache manifest key '{key}'{closest(key, known)}")
    error = _mismatch(cache_dir, manifest, expected, keys)
    if error is not None:
        raise error


def n_shards(manifest: dict[str, Any]) -> int:
    return -(-manifest["n_rows"] // manifest["rows_per_shard"])


def shard_rows(manifest: dict[str, Any], shard_index: int) -> tuple[int, int]:
    """The rows [first, stop) of a shard."""
    if not 0 <= shard_index < n_shards(manifest):
        raise CacheError(f"shard {shard_index} is not in [0, {n_shards(manifest)})")
    first = shard_index * manifest["rows_per_shard"]
    return first, min(first + manifest["rows_per_shard"], manifest["n_rows"])


def copy_student_tokenizer(cache_dir: str | Path, tokenizer_json: Path) -> None:
    """Copy the student's tokenizer.json, and the files beside it of STUDENT_TOKENIZER_FILES,
    into `cache_dir`'s STUDENT_TOKENIZER_DIR (each file whole or absent)."""
    folder = Path(cache_dir) / STUDENT_TOKENIZER_DIR
    folder.mkdir(exist_ok=True)
    for name in STUDENT_TOKENIZER_FILES:
        source = tokenizer_json if name == "tokenizer.json" else tokenizer_json.parent / name
        if source.is_file():
            write_atomically(folder / name, [source.read_bytes()], checksum=False)


def write_atomically(path: Path, chunks: Iterable, checksum: bool) -> None:
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
