"""kd_jax.cache.shards: byte-identical shards whatever the order or process count, damage and
mismatch named by file, refused arrays, interrupted writes, and the size goals.

`synthetic`, `write_cache`, `write_one`, `expected_values` and `write_topk_cache` here are the
caches of the reader tests too."""

import errno
import os

import numpy as np
import pytest

from kd_jax.cache import shards
from kd_jax.cache.manifest import CacheError, create_manifest, n_shards, shard_rows
from kd_jax.cache.reader import CacheReader
from kd_jax.data.packing import row_hashes
from tests.cache.test_manifest import FINGERPRINTS, make_manifest


def synthetic(manifest, seed=0):
    """(fields for every row, row hashes): what a teacher run would hand the cache."""
    rng = np.random.default_rng(seed)
    rows, seq_len, vocab = manifest["n_rows"], manifest["seq_len"], manifest["vocab_size"]
    params = manifest["params"]
    tokens = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
    segment_ids = np.ones((rows, seq_len), np.int32)
    loss_mask = np.ones((rows, seq_len), np.int32)
    hashes = row_hashes(tokens, segment_ids, loss_mask)
    if manifest["mode"] == "topk":
        k = params["k"]
        ids = np.stack([rng.choice(vocab, (rows, seq_len), replace=True) for _ in range(k)], -1)
        arrays = {"ids": ids.astype(np.int64),
                  "logprobs": -rng.exponential(3.0, (rows, seq_len, k)).astype(np.float32),
                  "tail": -rng.exponential(3.0, (rows, seq_len)).astype(np.float32)}
        ids[0, 0, :2] = (0, vocab - 1)  # the extreme ids
        arrays["logprobs"][0, 0, :2] = (0.0, -70000.0)  # certain; beyond float16 (-inf)
        arrays["tail"][0, :2] = (-np.inf, 0.0)
    elif manifest["mode"] == "sample":
        draws = params["draws"]
        counts = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=(rows, seq_len))
        counts[0, 0] = 0
        counts[0, 0, 0] = draws  # one id drawn every time, the other slots padding
        arrays = {"ids": rng.integers(0, vocab, (rows, seq_len, draws), dtype=np.int32),
                  "counts": counts.astype(np.int32),
                  "entropy": rng.exponential(2.0, (rows, seq_len)).astype(np.float32)}
        arrays["entropy"][0, 0] = 0.0
    else:
        logits = 4.0 * rng.standard_normal((rows, seq_len, vocab))
        shifted = logits - logits.max(-1, keepdims=True)
        arrays = {"logprobs": shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))}
    return arrays, hashes


def write_cache(cache_dir, manifest, arrays, hashes, order=None):
    create_manifest(cache_dir, manifest)
    for index in order if order is not None else range(n_shards(manifest)):
        write_one(cache_dir, manifest, index, arrays, hashes)


def write_one(cache_dir, manifest, index, arrays, hashes):
    first, stop = shard_rows(manifest, index)
    return shards.write_shard(cache_dir, manifest, index,
                              {name: values[first:stop] for name, values in arrays.items()},
                              hashes[first:stop])


def expected_values(manifest, arrays):
    """What a reader must return: ids/counts exact, values rounded to the value dtype."""
    out = {}
    for name, values in arrays.items():
        if values.dtype.kind == "f":
            clamped = np.minimum(values, 0) if name in ("logprobs", "tail") else values
            with np.errstate(over="ignore"):  # -70000 is -inf in float16
                out[name] = clamped.astype(manifest["value_dtype"]).astype(np.float32)
        else:
            out[name] = values.astype(np.int32)
    return out


def all_files(cache_dir):
    return {path.relative_to(cache_dir).as_posix(): path.read_bytes()
            for path in sorted(cache_dir.rglob("*")) if path.is_file()}


def write_topk_cache(cache_dir):
    """A topk cache of 10 rows in 3 shards: (cache_dir, manifest, arrays, hashes)."""
    manifest = make_manifest("topk")
    arrays, hashes = synthetic(manifest)
    write_cache(cache_dir, manifest, arrays, hashes)
    return cache_dir, manifest, arrays, hashes


@pytest.fixture
def topk_cache(tmp_path):
    return write_topk_cache(tmp_path / "cache")


# --------------------------------------------------------------------------------- writing


def test_positive_logprobs_within_rounding_are_stored_as_zero(tmp_path):
    manifest = make_manifest("topk", n_rows=1, rows_per_shard=1)
    arrays, hashes = synthetic(manifest)
    arrays["logprobs"][0, 1, 0] = 1e-5  # log(softmax) rounding above 0
    write_cache(tmp_path, manifest, arrays, hashes)
    assert CacheReader(tmp_path).read([0])["logprobs"][0, 1, 0] == 0.0


def test_bfloat16_values_are_accepted(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    manifest = make_manifest("topk", n_rows=2, rows_per_shard=2)
    arrays, hashes = synthetic(manifest)
    arrays = {name: values if name == "ids" else values.astype(ml_dtypes.bfloat16)
              for name, values in arrays.items()}
    write_cache(tmp_path, manifest, arrays, hashes)
    got = CacheReader(tmp_path).read([0, 1])
    # bfloat16 -> float32 is exact; -70000 fits bfloat16's range but not float16's.
    want = np.minimum(arrays["logprobs"].astype(np.float32), 0)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got["logprobs"],
                                      want.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("mode,change,message", [
    ("topk", lambda a: a["ids"].__setitem__((1, 2, 3), 300), "ids value 300 is outside"),
    ("topk", lambda a: a["logprobs"].__setitem__((0, 1, 1), 0.5), "logprobs value 0.5 is pos"),
    ("topk", lambda a: a["tail"].__setitem__((0, 3), np.nan), "tail holds NaN"),
    ("topk", lambda a: a.update(ids=a["ids"][..., :4]), "ids has shape"),
    ("topk", lambda a: a.update(ids=a["ids"].astype(np.float32)), "ids must be integers"),
    ("topk", lambda a: a.pop("tail"), "got fields"),
    ("sample", lambda a: a["counts"].__setitem__((0, 0, 0), 13), "counts value 13 is outside"),
    ("sample", lambda a: a["counts"].__setitem__((0, 0, 1), 1), "add up to 13"),
    ("sample", lambda a: a["entropy"].__setitem__((0, 0), -0.5), "entropy value -0.5 is neg"),
])
def test_write_shard_refuses_bad_arrays(tmp_path, mode, change, message):
    manifest = make_manifest(mode)
    arrays, hashes = synthetic(manifest)
    arrays = {name: values[:4].copy() for name, values in arrays.items()}
    change(arrays)
    create_manifest(tmp_path, manifest)
    with pytest.raises(CacheError, match=message):
        shards.write_shard(tmp_path, manifest, 0, arrays, hashes[:4])
    assert list((tmp_path / "shards").iterdir()) == []


# --------------------------------------------------------------------------- determinism


def test_shards_are_byte_identical_whatever_the_order_or_process_count(tmp_path):
    manifest = make_manifest("sample")
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path / "single", manifest, arrays, hashes)
    write_cache(tmp_path / "reversed", manifest, arrays, hashes, order=[2, 1, 0])
    create_manifest(tmp_path / "two", manifest)
    assigned = [shards.shards_to_write(tmp_path / "two", manifest, p, 2) for p in (1, 0)]
    assert assigned == [[1], [0, 2]]
    for shard_indices in assigned:  # process 1 first, then process 0
        for index in shard_indices:
            write_one(tmp_path / "two", manifest, index, arrays, hashes)
    reference = all_files(tmp_path / "single")
    assert sorted(reference) == ["manifest.json", "shards/000000.kdc", "shards/000001.kdc",
                                 "shards/000002.kdc"]
    assert all_files(tmp_path / "reversed") == reference
    assert all_files(tmp_path / "two") == reference
    write_one(tmp_path / "single", manifest, 1, arrays, hashes)  # written twice
    assert all_files(tmp_path / "single") == reference


def test_shards_to_write_lists_only_missing_shards(topk_cache):
    cache_dir, manifest, _, _ = topk_cache
    assert shards.shards_to_write(cache_dir, manifest, 0, 1) == []
    shards.shard_path(cache_dir, 1).unlink()
    assert shards.shards_to_write(cache_dir, manifest, 0, 1) == [1]
    assert shards.shards_to_write(cache_dir, manifest, 0, 2) == []
    assert shards.shards_to_write(cache_dir, manifest, 1, 2) == [1]
    with pytest.raises(CacheError, match="process index 2"):
        shards.shards_to_write(cache_dir, manifest, 2, 2)


# ------------------------------------------------------------------- damage and mismatch


def test_verify_summarizes_a_good_cache(topk_cache):
    cache_dir, _, _, hashes = topk_cache
    summary = shards.verify(cache_dir, expected_hashes=hashes)
    assert summary["shards"] == 3 and summary["rows"] == 10 and summary["tokens"] == 80
    assert summary["bytes_per_token"] == shards.disk_bytes_per_token(cache_dir)


def test_truncated_shard_is_named_by_verify_and_reader(topk_cache):
    cache_dir = topk_cache[0]
    path = shards.shard_path(cache_dir, 1)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        shards.verify(cache_dir)
    reader = CacheReader(cache_dir)
    assert reader.read([0, 9])["ids"].shape == (2, 8, 5)  # other shards still read
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        reader.read([0, 5])
    path.write_bytes(path.read_bytes()[:20])  # cut inside the header
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        CacheReader(cache_dir).read([5])


@pytest.mark.parametrize("where", ["data", "header", "trailer"])
def test_bit_flipped_shard_is_named_corrupt(topk_cache, where):
    cache_dir = topk_cache[0]
    path = shards.shard_path(cache_dir, 2)
    raw = bytearray(path.read_bytes())
    hashes_at = len(raw) - 32 - 8 * 2  # shard 2 holds rows 8 and 9
    at = {"data": hashes_at - 10, "header": 40, "trailer": len(raw) - 1}[where]
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=f"{path} is corrupt"):
        shards.verify(cache_dir)
    with pytest.raises(CacheError, match=f"{path} is corrupt"):
        CacheReader(cache_dir, verify_checksums=True).read([9])


def test_missing_shard_is_named(topk_cache):
    cache_dir = topk_cache[0]
    path = shards.shard_path(cache_dir, 0)
    path.unlink()
    with pytest.raises(CacheError, match=f"{path} \\(rows 0-3\\) is missing"):
        shards.verify(cache_dir)
    with pytest.raises(CacheError, match=f"{path} \\(rows 0-3\\) is missing"):
        CacheReader(cache_dir).read([8, 2])


def test_shard_of_another_cache_is_refused(tmp_path, topk_cache):
    cache_dir, _, arrays, hashes = topk_cache
    other = make_manifest("topk", fingerprints={**FINGERPRINTS, "teacher": "teacher-b"})
    write_cache(tmp_path / "other", other, arrays, hashes)
    path = shards.shard_path(cache_dir, 1)
    path.write_bytes(shards.shard_path(tmp_path / "other", 1).read_bytes())
    with pytest.raises(CacheError, match=f"{path} belongs to another cache"):
        CacheReader(cache_dir).read([4])


# ------------------------------------------------------------------------ interrupted writes


def test_no_space_left_leaves_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    manifest = make_manifest("topk")
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path / "reference", manifest, arrays, hashes)
    cache_dir = tmp_path / "cache"
    create_manifest(cache_dir, manifest)
    write_one(cache_dir, manifest, 0, arrays, hashes)

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    path = shards.shard_path(cache_dir, 1)
    with pytest.raises(CacheError, match=f"could not write cache shard {path} \\(rows 4-7\\): "
                                         "No space left on device"):
        write_one(cache_dir, manifest, 1, arrays, hashes)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in (cache_dir / "shards").iterdir()) == ["000000.kdc"]

    todo = shards.shards_to_write(cache_dir, manifest, 0, 1)
    assert todo == [1, 2]
    for index in todo:
        write_one(cache_dir, manifest, index, arrays, hashes)
    assert all_files(cache_dir) == all_files(tmp_path / "reference")


def test_stale_temp_file_is_ignored_then_removed(topk_cache):
    cache_dir, manifest, arrays, hashes = topk_cache
    shards.shard_path(cache_dir, 1).unlink()
    stale = cache_dir / "shards" / ".000001.kdc.12345.tmp"
    stale.write_bytes(b"half a shard")
    assert shards.shards_to_write(cache_dir, manifest, 0, 1) == [1]
    CacheReader(cache_dir).read([0, 9])
    write_one(cache_dir, manifest, 1, arrays, hashes)
    assert not stale.exists()
    shards.verify(cache_dir, expected_hashes=hashes)


# ----------------------------------------------------------------------------- size goals


def test_topk_bytes_per_entry_goal(tmp_path):
    # 17-bit ids + 15-bit values (sign implied) + a 15-bit tail: (16*32 + 15) / 8 / 16 = 4.117
    # bytes an entry, before the manifest, headers and row hashes.
    manifest = make_manifest("topk", n_rows=64, seq_len=256, rows_per_shard=16,
                             vocab_size=131072, params={"k": 16, "temperature": 1.0})
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    per_entry = shards.disk_bytes_per_token(tmp_path) / 16
    assert 4.117 < per_entry <= 4.25


def test_sample_bytes_per_token_goal(tmp_path):
    # 12 x 17-bit ids + 12 x 4-bit counts + 15-bit entropy = 267 bits = 33.4 bytes a token.
    manifest = make_manifest("sample", n_rows=64, seq_len=256, rows_per_shard=16,
                             vocab_size=131072)
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    assert 33.375 < shards.disk_bytes_per_token(tmp_path) <= 40
