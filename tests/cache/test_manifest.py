"""kd_jax.cache.manifest: id bits, deterministic manifests, the refusals that name the differing
part or the misspelt key, and that the cache package imports no JAX.

`make_manifest`, `FINGERPRINTS` and `MODE_PARAMS` here are the manifests of the other cache
tests."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kd_jax.cache
from kd_jax.cache import manifest as manifest_lib
from kd_jax.cache.manifest import CacheError
from kd_jax.config import ConfigError

FINGERPRINTS = {"teacher": "teacher-a", "tokenizer": "tok-a", "data": "data-a", "packing": "pack-a"}
MODE_PARAMS = {"topk": {"k": 5, "temperature": 1.0},
               "sample": {"draws": 12, "temperature": 1.0, "seed": 3, "sampler": "test"},
               "full": {"temperature": 2.0}}


def make_manifest(mode="topk", n_rows=10, seq_len=8, rows_per_shard=4, vocab_size=300,
                  value_dtype="float16", params=None, fingerprints=FINGERPRINTS):
    return manifest_lib.make_manifest(
        mode, params or MODE_PARAMS[mode], vocab_size=vocab_size, seq_len=seq_len,
        n_rows=n_rows, rows_per_shard=rows_per_shard, fingerprints=fingerprints,
        value_dtype=value_dtype)


def test_importing_the_cache_package_pulls_in_no_jax():
    modules = sorted(f"kd_jax.cache.{module.name}"
                     for module in pkgutil.iter_modules(kd_jax.cache.__path__))
    assert {"kd_jax.cache.manifest", "kd_jax.cache.codec", "kd_jax.cache.shards",
            "kd_jax.cache.reader"} <= set(modules)
    code = f"import sys, {', '.join(modules)}; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"


def test_id_bits_is_ceil_log2_of_the_vocabulary():
    cases = {1: 1, 2: 1, 3: 2, 256: 8, 257: 9, 131072: 17, 131073: 18, 151936: 18}
    assert {vocab: manifest_lib.id_bits(vocab) for vocab in cases} == cases


def test_manifest_is_deterministic_json_without_timestamps(tmp_path):
    manifest = make_manifest("topk")
    manifest_lib.create_manifest(tmp_path / "a", manifest)
    manifest_lib.create_manifest(tmp_path / "b", dict(reversed(list(manifest.items()))))
    text = (tmp_path / "a" / manifest_lib.MANIFEST_NAME).read_text()
    assert text == (tmp_path / "b" / "manifest.json").read_text()
    assert manifest_lib.read_manifest(tmp_path / "a") == manifest
    assert "time" not in text and manifest["id_bits"] == 9


def test_differing_manifest_names_the_part(tmp_path):
    manifest = make_manifest("topk")
    manifest_lib.create_manifest(tmp_path, manifest)
    assert manifest_lib.create_manifest(tmp_path, manifest) == manifest  # a rerun resumes
    other_teacher = make_manifest("topk", fingerprints={**FINGERPRINTS, "teacher": "teacher-b"})
    with pytest.raises(CacheError, match="different teacher \\(fingerprints.teacher: cache "
                                         "teacher-a != expected teacher-b\\)"):
        manifest_lib.create_manifest(tmp_path, other_teacher)
    with pytest.raises(CacheError, match="different params.k .*; also vocab_size, id_bits"):
        manifest_lib.create_manifest(tmp_path, make_manifest("topk", params={
            "k": 6, "temperature": 1.0}, vocab_size=1000))
    assert issubclass(CacheError, ConfigError)


def test_check_fingerprints_names_the_part_or_the_misspelt_key(tmp_path):
    manifest = make_manifest("topk")
    manifest_lib.check_fingerprints(manifest, {"fingerprints": FINGERPRINTS, "seq_len": 8,
                                               "mode": "topk"})
    for expected, part in [({"fingerprints": {"tokenizer": "tok-b"}}, "tokenizer"),
                           ({"fingerprints": {"data": "data-b"}}, "data"),
                           ({"fingerprints": {"packing": "pack-b"}}, "packing"),
                           ({"seq_len": 16}, "seq_len"), ({"mode": "sample"}, "mode")]:
        with pytest.raises(CacheError, match=f"cache {tmp_path} was built with a different "
                                             f"{part} "):
            manifest_lib.check_fingerprints(manifest, expected, cache_dir=tmp_path)
    with pytest.raises(CacheError, match="did you mean 'fingerprints.teacher'"):
        manifest_lib.check_fingerprints(manifest, {"fingerprints": {"teachr": "teacher-a"}})


def test_invalid_manifests_are_refused():
    with pytest.raises(CacheError, match="unknown key 'rows_per_shrd'.*'rows_per_shard'"):
        manifest_lib.validate_manifest({**make_manifest(), "rows_per_shrd": 4})
    with pytest.raises(CacheError, match="mode: 'top_k' is not one of"):
        make_manifest("top_k", params=MODE_PARAMS["topk"])
    with pytest.raises(CacheError, match="params.k must be in"):
        make_manifest("topk", params={"k": 301, "temperature": 1.0})
    with pytest.raises(CacheError, match="topk params lacks temperature"):
        make_manifest("topk", params={"k": 3})
    with pytest.raises(CacheError, match="fingerprints lacks packing"):
        make_manifest(fingerprints={k: v for k, v in FINGERPRINTS.items() if k != "packing"})
    with pytest.raises(CacheError, match="id_bits is 8"):
        manifest_lib.validate_manifest({**make_manifest(), "id_bits": 8})
    with pytest.raises(CacheError, match="no cache at"):
        manifest_lib.read_manifest("/nonexistent/cache")
