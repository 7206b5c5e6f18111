"""kd_jax.cache.reader: every mode and value dtype reads back exactly what was written, in any
row order, and rows of other data are refused."""

import numpy as np
import pytest

from kd_jax.cache import shards
from kd_jax.cache.manifest import CacheError
from kd_jax.cache.reader import CacheReader
from kd_jax.data.packing import row_hashes
from tests.cache.test_manifest import cross_manifest, make_manifest
from tests.cache.test_shards import expected_values, synthetic, write_cache, write_topk_cache


@pytest.fixture
def topk_cache(tmp_path):
    return write_topk_cache(tmp_path / "cache")


@pytest.mark.parametrize("mode,value_dtype", [("topk", "float16"), ("topk", "float32"),
                                              ("sample", "float16"), ("sample", "float32"),
                                              ("full", "float16")])
def test_write_read_round_trip(tmp_path, mode, value_dtype):
    manifest = make_manifest(mode, value_dtype=value_dtype, vocab_size=40 if mode == "full"
                             else 300)
    arrays, hashes = synthetic(manifest)
    write_cache(tmp_path, manifest, arrays, hashes)
    with CacheReader(tmp_path) as reader:
        got = reader.read(np.arange(manifest["n_rows"]), expected_hashes=hashes)
    want = expected_values(manifest, arrays)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])  # exact: nothing but rounding
    if mode == "topk" and value_dtype == "float16":
        assert got["logprobs"][0, 0, 1] == -np.inf and got["tail"][0, 0] == -np.inf


@pytest.mark.parametrize("mode", ["topk", "full"])
def test_a_cache_of_another_tokenizer_reads_back_its_aligned_flags(tmp_path, mode):
    """The teacher's targets in its vocabulary, and one bit a position: zeros where unaligned."""
    manifest = cross_manifest(mode)
    arrays, hashes = synthetic(manifest)
    aligned = np.random.default_rng(5).random((manifest["n_rows"], manifest["seq_len"])) < 0.7
    arrays = {name: np.where(aligned.reshape(*aligned.shape, *(1,) * (values.ndim - 2)),
                             values, 0).astype(values.dtype) for name, values in arrays.items()}
    arrays["aligned"] = aligned.astype(np.int32)
    write_cache(tmp_path, manifest, arrays, hashes)
    with CacheReader(tmp_path) as reader:
        got = reader.read(np.arange(manifest["n_rows"])[::-1], expected_hashes=hashes[::-1])
    want = expected_values(manifest, arrays)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name][::-1])
    np.testing.assert_array_equal(got["aligned"], aligned[::-1])
    with pytest.raises(CacheError, match=f"a {mode} cache has .*'aligned'\\]"):
        shards.write_shard(tmp_path, manifest, 0, {name: values[:4] for name, values in
                                                   arrays.items() if name != "aligned"},
                           hashes[:4])


def test_reads_any_row_order_across_shard_boundaries(topk_cache):
    cache_dir, manifest, arrays, _ = topk_cache
    rows = np.array([9, 0, 5, 4, 3, 9, 8, 7])  # shards 2, 0, 1, 1, 0, 2, 2, 1; a repeat
    got = CacheReader(cache_dir, verify_checksums=True).read(rows)
    want = expected_values(manifest, arrays)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name][rows])
    empty = CacheReader(cache_dir).read(np.array([], dtype=np.int64))
    assert empty["ids"].shape == (0, 8, 5)


def test_reading_past_the_last_row_is_an_error(topk_cache):
    with pytest.raises(CacheError, match="row 10 is not in cache"):
        CacheReader(topk_cache[0]).read([1, 10])


def test_row_hash_mismatch_means_other_data(topk_cache):
    cache_dir, _, _, hashes = topk_cache
    rng = np.random.default_rng(99)
    tokens = rng.integers(0, 300, (10, 8), dtype=np.int32)
    ones = np.ones((10, 8), np.int32)
    other = row_hashes(tokens, ones, ones)
    mixed = hashes.copy()
    mixed[7] = other[7]
    with pytest.raises(CacheError, match="cache row 7 does not match data row 7"):
        CacheReader(cache_dir).read([2, 7, 9], expected_hashes=mixed[[2, 7, 9]])
    with pytest.raises(CacheError, match="cache row 7 .* does not match data row 7"):
        shards.verify(cache_dir, expected_hashes=mixed)
