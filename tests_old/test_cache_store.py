"""Tests for kd_jax/cache_store.py: bit packing, manifests, shard round trips per mode,
determinism, damage detection, interrupted writes, the size goals, and the Prefetcher."""

import errno
import itertools
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from kd_jax import cache_store
from kd_jax.cache_store import CacheError
from kd_jax.config import ConfigError

FINGERPRINTS = {"teacher": "teacher-a", "tokenizer": "tok-a", "data": "data-a", "packing": "pack-a"}
MODE_PARAMS = {"topk": {"k": 5, "temperature": 1.0},
               "sample": {"draws": 12, "temperature": 1.0, "seed": 3, "sampler": "test"},
               "full": {"temperature": 2.0}}


def make_manifest(mode="topk", n_rows=10, seq_len=8, rows_per_shard=4, vocab_size=300,
                  value_dtype="float16", params=None, fingerprints=FINGERPRINTS):
    return cache_store.make_manifest(
        mode, params or MODE_PARAMS[mode], vocab_size=vocab_size, seq_len=seq_len,
        n_rows=n_rows, rows_per_shard=rows_per_shard, fingerprints=fingerprints,
        value_dtype=value_dtype)


def synthetic(manifest, seed=0):
    """(fields for every row, row hashes): what a teacher run would hand the cache."""
    rng = np.random.default_rng(seed)
    rows, seq_len, vocab = manifest["n_rows"], manifest["seq_len"], manifest["vocab_size"]
    params = manifest["params"]
    tokens = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
    segment_ids = np.ones((rows, seq_len), np.int32)
    loss_mask = np.ones((rows, seq_len), np.int32)
    hashes = cache_store.row_hashes(tokens, segment_ids, loss_mask)
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
    cache_store.create_manifest(cache_dir, manifest)
    for index in order if order is not None else range(cache_store.n_shards(manifest)):
        write_one(cache_dir, manifest, index, arrays, hashes)


def write_one(cache_dir, manifest, index, arrays, hashes):
    first, stop = cache_store.shard_rows(manifest, index)
    return cache_store.write_shard(cache_dir, manifest, index,
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


@pytest.fixture
def topk_cache(tmp_path):
    manifest = make_manifest("topk")
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path / "cache", manifest, arrays, hashes)
    return tmp_path / "cache", manifest, arrays, hashes


# ------------------------------------------------------------------------------ packing


def test_importing_cache_store_pulls_in_no_jax():
    code = "import sys, kd_jax.cache_store; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32])
def test_pack_bits_round_trip(bits):
    count = 37  # count * bits is rarely a whole number of bytes: rows are padded
    values = np.random.default_rng(bits).integers(0, 2**bits, (6, count), dtype=np.uint64)
    values[0, :3] = (0, 2**bits - 1, 2**bits - 1)
    values[1] = 2**bits - 1
    values[2] = 0
    packed = cache_store.pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (6, -(-count * bits // 8))
    np.testing.assert_array_equal(cache_store.unpack_bits(packed, bits, count), values)
    # Rows are independent byte strings: one row packed alone is that row's slice.
    np.testing.assert_array_equal(cache_store.pack_bits(values[4:5], bits), packed[4:5])
    np.testing.assert_array_equal(cache_store.unpack_bits(packed[[5, 0]], bits, count),
                                  values[[5, 0]])


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_bits_matches_a_bit_by_bit_reference(bits):
    # The reference spells every value out bit by bit (LSB first) and packs the bit string.
    rng = np.random.default_rng(100 + bits)
    for count in (1, 8, 13, 64):
        values = rng.integers(0, 2**bits, (3, count), dtype=np.uint64)
        values[0] = 2**bits - 1
        value_bits = (values[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
        expected = np.packbits(value_bits.reshape(3, -1).astype(np.uint8), axis=-1,
                               bitorder="little")
        np.testing.assert_array_equal(cache_store.pack_bits(values, bits), expected)


def test_pack_bits_layout_is_least_significant_bit_first():
    # 3-bit values 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001.
    packed = cache_store.pack_bits(np.array([[1, 2, 7]]), 3)
    assert packed.tolist() == [[0b11010001, 0b00000001]]


def test_pack_bits_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\*\\*3"):
        cache_store.pack_bits(np.array([[8]]), 3)
    with pytest.raises(ValueError):
        cache_store.pack_bits(np.array([[-1]]), 3)
    with pytest.raises(ValueError):
        cache_store.pack_bits(np.array([[1]]), 33)


def test_id_bits_is_ceil_log2_of_the_vocabulary():
    cases = {1: 1, 2: 1, 3: 2, 256: 8, 257: 9, 131072: 17, 131073: 18, 151936: 18}
    assert {vocab: cache_store.id_bits(vocab) for vocab in cases} == cases


def test_schema_follows_the_manifest():
    by_name = {field.name: field for field in cache_store.fields(
        make_manifest("sample", vocab_size=131072, value_dtype="float32"))}
    assert (by_name["ids"].bits, by_name["ids"].shape) == (17, (12,))
    assert (by_name["counts"].bits, by_name["counts"].limit) == (4, 13)  # ceil(log2(13))
    assert (by_name["entropy"].kind, by_name["entropy"].bits, by_name["entropy"].shape) == \
        ("float32", 31, ())
    topk = [(f.name, f.bits, f.shape) for f in cache_store.fields(make_manifest("topk"))]
    assert topk == [("ids", 9, (5,)), ("logprobs", 15, (5,)), ("tail", 15, ())]


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("mode,value_dtype", [("topk", "float16"), ("topk", "float32"),
                                              ("sample", "float16"), ("sample", "float32"),
                                              ("full", "float16")])
def test_write_read_round_trip(tmp_path, mode, value_dtype):
    manifest = make_manifest(mode, value_dtype=value_dtype, vocab_size=40 if mode == "full"
                             else 300)
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    with cache_store.CacheReader(tmp_path) as reader:
        got = reader.read(np.arange(manifest["n_rows"]), expected_hashes=hashes)
    want = expected_values(manifest, arrays)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])  # exact: nothing but rounding
    if mode == "topk" and value_dtype == "float16":
        assert got["logprobs"][0, 0, 1] == -np.inf and got["tail"][0, 0] == -np.inf


def test_reads_any_row_order_across_shard_boundaries(topk_cache):
    cache_dir, manifest, arrays, _ = topk_cache
    rows = np.array([9, 0, 5, 4, 3, 9, 8, 7])  # shards 2, 0, 1, 1, 0, 2, 2, 1; a repeat
    got = cache_store.CacheReader(cache_dir, verify_checksums=True).read(rows)
    want = expected_values(manifest, arrays)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name][rows])
    empty = cache_store.CacheReader(cache_dir).read(np.array([], dtype=np.int64))
    assert empty["ids"].shape == (0, 8, 5)


def test_reading_past_the_last_row_is_an_error(topk_cache):
    with pytest.raises(CacheError, match="row 10 is not in cache"):
        cache_store.CacheReader(topk_cache[0]).read([1, 10])


def test_positive_logprobs_within_rounding_are_stored_as_zero(tmp_path):
    manifest = make_manifest("topk", n_rows=1, rows_per_shard=1)
    arrays, hashes = synthetic(manifest)
    arrays["logprobs"][0, 1, 0] = 1e-5  # log(softmax) rounding above 0
    write_cache(tmp_path, manifest, arrays, hashes)
    assert cache_store.CacheReader(tmp_path).read([0])["logprobs"][0, 1, 0] == 0.0


def test_bfloat16_values_are_accepted(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    manifest = make_manifest("topk", n_rows=2, rows_per_shard=2)
    arrays, hashes = synthetic(manifest)
    arrays = {name: values if name == "ids" else values.astype(ml_dtypes.bfloat16)
              for name, values in arrays.items()}
    write_cache(tmp_path, manifest, arrays, hashes)
    got = cache_store.CacheReader(tmp_path).read([0, 1])
    # bfloat16 -> float32 is exact; -70000 fits bfloat16's range but not float16's.
    want = np.minimum(arrays["logprobs"].astype(np.float32), 0)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got["logprobs"],
                                      want.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------- determinism


def test_shards_are_byte_identical_whatever_the_order_or_process_count(tmp_path):
    manifest = make_manifest("sample")
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path / "single", manifest, arrays, hashes)
    write_cache(tmp_path / "reversed", manifest, arrays, hashes, order=[2, 1, 0])
    cache_store.create_manifest(tmp_path / "two", manifest)
    assigned = [cache_store.shards_to_write(tmp_path / "two", manifest, p, 2) for p in (1, 0)]
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
    assert cache_store.shards_to_write(cache_dir, manifest, 0, 1) == []
    cache_store.shard_path(cache_dir, 1).unlink()
    assert cache_store.shards_to_write(cache_dir, manifest, 0, 1) == [1]
    assert cache_store.shards_to_write(cache_dir, manifest, 0, 2) == []
    assert cache_store.shards_to_write(cache_dir, manifest, 1, 2) == [1]
    with pytest.raises(CacheError, match="process index 2"):
        cache_store.shards_to_write(cache_dir, manifest, 2, 2)


def test_manifest_is_deterministic_json_without_timestamps(tmp_path):
    manifest = make_manifest("topk")
    cache_store.create_manifest(tmp_path / "a", manifest)
    cache_store.create_manifest(tmp_path / "b", dict(reversed(list(manifest.items()))))
    text = (tmp_path / "a" / "manifest.json").read_text()
    assert text == (tmp_path / "b" / "manifest.json").read_text()
    assert cache_store.read_manifest(tmp_path / "a") == manifest
    assert "time" not in text and manifest["id_bits"] == 9


# ------------------------------------------------------------------- damage and mismatch


def test_verify_summarizes_a_good_cache(topk_cache):
    cache_dir, _, _, hashes = topk_cache
    summary = cache_store.verify(cache_dir, expected_hashes=hashes)
    assert summary["shards"] == 3 and summary["rows"] == 10 and summary["tokens"] == 80
    assert summary["bytes_per_token"] == cache_store.disk_bytes_per_token(cache_dir)


def test_truncated_shard_is_named_by_verify_and_reader(topk_cache):
    cache_dir = topk_cache[0]
    path = cache_store.shard_path(cache_dir, 1)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        cache_store.verify(cache_dir)
    reader = cache_store.CacheReader(cache_dir)
    assert reader.read([0, 9])["ids"].shape == (2, 8, 5)  # other shards still read
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        reader.read([0, 5])
    path.write_bytes(path.read_bytes()[:20])  # cut inside the header
    with pytest.raises(CacheError, match=f"{path} is truncated"):
        cache_store.CacheReader(cache_dir).read([5])


@pytest.mark.parametrize("where", ["data", "header", "trailer"])
def test_bit_flipped_shard_is_named_corrupt(topk_cache, where):
    cache_dir = topk_cache[0]
    path = cache_store.shard_path(cache_dir, 2)
    raw = bytearray(path.read_bytes())
    hashes_at = len(raw) - 32 - 8 * 2  # shard 2 holds rows 8 and 9
    at = {"data": hashes_at - 10, "header": 40, "trailer": len(raw) - 1}[where]
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=f"{path} is corrupt"):
        cache_store.verify(cache_dir)
    with pytest.raises(CacheError, match=f"{path} is corrupt"):
        cache_store.CacheReader(cache_dir, verify_checksums=True).read([9])


def test_missing_shard_is_named(topk_cache):
    cache_dir = topk_cache[0]
    path = cache_store.shard_path(cache_dir, 0)
    path.unlink()
    with pytest.raises(CacheError, match=f"{path} \\(rows 0-3\\) is missing"):
        cache_store.verify(cache_dir)
    with pytest.raises(CacheError, match=f"{path} \\(rows 0-3\\) is missing"):
        cache_store.CacheReader(cache_dir).read([8, 2])


def test_shard_of_another_cache_is_refused(tmp_path, topk_cache):
    cache_dir, _, arrays, hashes = topk_cache
    other = make_manifest("topk", fingerprints={**FINGERPRINTS, "teacher": "teacher-b"})
    write_cache(tmp_path / "other", other, arrays, hashes)
    path = cache_store.shard_path(cache_dir, 1)
    path.write_bytes(cache_store.shard_path(tmp_path / "other", 1).read_bytes())
    with pytest.raises(CacheError, match=f"{path} belongs to another cache"):
        cache_store.CacheReader(cache_dir).read([4])


def test_row_hash_mismatch_means_other_data(topk_cache):
    cache_dir, _, _, hashes = topk_cache
    rng = np.random.default_rng(99)
    tokens = rng.integers(0, 300, (10, 8), dtype=np.int32)
    ones = np.ones((10, 8), np.int32)
    other = cache_store.row_hashes(tokens, ones, ones)
    mixed = hashes.copy()
    mixed[7] = other[7]
    with pytest.raises(CacheError, match="cache row 7 does not match data row 7"):
        cache_store.CacheReader(cache_dir).read([2, 7, 9], expected_hashes=mixed[[2, 7, 9]])
    with pytest.raises(CacheError, match="cache row 7 .* does not match data row 7"):
        cache_store.verify(cache_dir, expected_hashes=mixed)


def test_row_hashes_cover_tokens_segments_and_mask():
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    ones = np.ones((2, 8), np.int32)
    base = cache_store.row_hashes(tokens, ones, ones)
    assert base.dtype == np.uint64 and base.shape == (2,) and base[0] != base[1]
    np.testing.assert_array_equal(cache_store.row_hashes(tokens.astype(np.int64), ones, ones),
                                  base)
    changed_mask = ones.copy()
    changed_mask[1, 3] = 0
    changed = cache_store.row_hashes(tokens, ones, changed_mask)
    assert changed[0] == base[0] and changed[1] != base[1]
    changed_segments = ones.copy()
    changed_segments[0, 5] = 2
    assert cache_store.row_hashes(tokens, changed_segments, ones)[0] != base[0]


def test_differing_manifest_names_the_part(tmp_path):
    manifest = make_manifest("topk")
    cache_store.create_manifest(tmp_path, manifest)
    assert cache_store.create_manifest(tmp_path, manifest) == manifest  # a rerun resumes
    other_teacher = make_manifest("topk", fingerprints={**FINGERPRINTS, "teacher": "teacher-b"})
    with pytest.raises(CacheError, match="different teacher \\(fingerprints.teacher: cache "
                                         "teacher-a != expected teacher-b\\)"):
        cache_store.create_manifest(tmp_path, other_teacher)
    with pytest.raises(CacheError, match="different params.k .*; also vocab_size, id_bits"):
        cache_store.create_manifest(tmp_path, make_manifest("topk", params={
            "k": 6, "temperature": 1.0}, vocab_size=1000))
    assert issubclass(CacheError, ConfigError)


def test_check_fingerprints_names_the_part_or_the_misspelt_key(tmp_path):
    manifest = make_manifest("topk")
    cache_store.check_fingerprints(manifest, {"fingerprints": FINGERPRINTS, "seq_len": 8,
                                              "mode": "topk"})
    for expected, part in [({"fingerprints": {"tokenizer": "tok-b"}}, "tokenizer"),
                           ({"fingerprints": {"data": "data-b"}}, "data"),
                           ({"fingerprints": {"packing": "pack-b"}}, "packing"),
                           ({"seq_len": 16}, "seq_len"), ({"mode": "sample"}, "mode")]:
        with pytest.raises(CacheError, match=f"cache {tmp_path} was built with a different "
                                             f"{part} "):
            cache_store.check_fingerprints(manifest, expected, cache_dir=tmp_path)
    with pytest.raises(CacheError, match="did you mean 'fingerprints.teacher'"):
        cache_store.check_fingerprints(manifest, {"fingerprints": {"teachr": "teacher-a"}})


def test_invalid_manifests_are_refused():
    with pytest.raises(CacheError, match="unknown key 'rows_per_shrd'.*'rows_per_shard'"):
        cache_store.validate_manifest({**make_manifest(), "rows_per_shrd": 4})
    with pytest.raises(CacheError, match="mode: 'top_k' is not one of"):
        make_manifest("top_k", params=MODE_PARAMS["topk"])
    with pytest.raises(CacheError, match="params.k must be in"):
        make_manifest("topk", params={"k": 301, "temperature": 1.0})
    with pytest.raises(CacheError, match="topk params lacks temperature"):
        make_manifest("topk", params={"k": 3})
    with pytest.raises(CacheError, match="fingerprints lacks packing"):
        make_manifest(fingerprints={k: v for k, v in FINGERPRINTS.items() if k != "packing"})
    with pytest.raises(CacheError, match="id_bits is 8"):
        cache_store.validate_manifest({**make_manifest(), "id_bits": 8})
    with pytest.raises(CacheError, match="no cache at"):
        cache_store.read_manifest("/nonexistent/cache")


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
    cache_store.create_manifest(tmp_path, manifest)
    with pytest.raises(CacheError, match=message):
        cache_store.write_shard(tmp_path, manifest, 0, arrays, hashes[:4])
    assert list((tmp_path / "shards").iterdir()) == []


# ------------------------------------------------------------------------ interrupted writes


def test_no_space_left_leaves_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    manifest = make_manifest("topk")
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path / "reference", manifest, arrays, hashes)
    cache_dir = tmp_path / "cache"
    cache_store.create_manifest(cache_dir, manifest)
    write_one(cache_dir, manifest, 0, arrays, hashes)

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    path = cache_store.shard_path(cache_dir, 1)
    with pytest.raises(CacheError, match=f"could not write cache shard {path} \\(rows 4-7\\): "
                                         "No space left on device"):
        write_one(cache_dir, manifest, 1, arrays, hashes)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in (cache_dir / "shards").iterdir()) == ["000000.kdc"]

    todo = cache_store.shards_to_write(cache_dir, manifest, 0, 1)
    assert todo == [1, 2]
    for index in todo:
        write_one(cache_dir, manifest, index, arrays, hashes)
    assert all_files(cache_dir) == all_files(tmp_path / "reference")


def test_stale_temp_file_is_ignored_then_removed(topk_cache):
    cache_dir, manifest, arrays, hashes = topk_cache
    cache_store.shard_path(cache_dir, 1).unlink()
    stale = cache_dir / "shards" / ".000001.kdc.12345.tmp"
    stale.write_bytes(b"half a shard")
    assert cache_store.shards_to_write(cache_dir, manifest, 0, 1) == [1]
    cache_store.CacheReader(cache_dir).read([0, 9])
    write_one(cache_dir, manifest, 1, arrays, hashes)
    assert not stale.exists()
    cache_store.verify(cache_dir, expected_hashes=hashes)


# ----------------------------------------------------------------------------- size goals


def test_topk_bytes_per_entry_goal(tmp_path):
    # 17-bit ids + 15-bit values (sign implied) + a 15-bit tail: (16*32 + 15) / 8 / 16 = 4.117
    # bytes an entry, before the manifest, headers and row hashes.
    manifest = make_manifest("topk", n_rows=64, seq_len=256, rows_per_shard=16,
                             vocab_size=131072, params={"k": 16, "temperature": 1.0})
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    per_entry = cache_store.disk_bytes_per_token(tmp_path) / 16
    assert 4.117 < per_entry <= 4.25


def test_sample_bytes_per_token_goal(tmp_path):
    # 12 x 17-bit ids + 12 x 4-bit counts + 15-bit entropy = 267 bits = 33.4 bytes a token.
    manifest = make_manifest("sample", n_rows=64, seq_len=256, rows_per_shard=16,
                             vocab_size=131072)
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    assert 33.375 < cache_store.disk_bytes_per_token(tmp_path) <= 40


# ----------------------------------------------------------------------------- prefetcher


def test_prefetcher_yields_results_in_order_and_stays_bounded():
    calls = []

    def work(step):
        calls.append(step)
        return step * step

    prefetcher = cache_store.Prefetcher(work, range(10), depth=2)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(calls) == 3  # two results queued, a third computed and waiting for room
    assert prefetcher.next() == 0
    assert list(prefetcher) == [step * step for step in range(1, 10)]
    with pytest.raises(StopIteration):
        next(prefetcher)
    prefetcher.close()


def test_prefetcher_reraises_the_workers_exception():
    def work(step):
        if step == 3:
            raise KeyError(f"row for step {step}")
        return step

    with cache_store.Prefetcher(work, range(10), depth=3) as prefetcher:
        assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="row for step 3"):
            next(prefetcher)
        with pytest.raises(StopIteration):
            next(prefetcher)


def test_prefetcher_close_stops_an_endless_producer():
    before = threading.active_count()
    prefetcher = cache_store.Prefetcher(lambda step: step, itertools.count(), depth=2)
    assert next(prefetcher) == 0
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(prefetcher)
    with pytest.raises(ValueError, match="depth"):
        cache_store.Prefetcher(lambda step: step, range(3), depth=0)
