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


# ------------------------------------------------------- a teacher with another tokenizer

CROSS = {"teacher_tokenizer": "teacher_tokenizer.json", "teacher_seq_len": 24}


def cross_manifest(mode="topk", cross=CROSS, teacher_tokenizer="teacher-tok-a", **options):
    return manifest_lib.make_manifest(
        mode, MODE_PARAMS[mode], vocab_size=300, seq_len=8, n_rows=10, rows_per_shard=4,
        fingerprints={**FINGERPRINTS, "teacher_tokenizer": teacher_tokenizer},
        cross_tokenizer=cross, **options)


def test_a_cache_of_another_tokenizer_records_the_teacher_s_and_its_rows(tmp_path):
    manifest = cross_manifest()
    assert manifest["cross_tokenizer"] == CROSS
    assert manifest["fingerprints"]["teacher_tokenizer"] == "teacher-tok-a"
    manifest_lib.create_manifest(tmp_path, manifest)
    assert manifest_lib.read_manifest(tmp_path) == manifest
    # Another teacher tokenizer, or teacher rows of another length, is another cache.
    with pytest.raises(CacheError, match="different teacher_tokenizer \\(fingerprints."
                                         "teacher_tokenizer: cache teacher-tok-a != expected "
                                         "teacher-tok-b\\)"):
        manifest_lib.create_manifest(tmp_path, cross_manifest(teacher_tokenizer="teacher-tok-b"))
    with pytest.raises(CacheError, match="different cross_tokenizer.teacher_seq_len \\("
                                         "cross_tokenizer.teacher_seq_len: cache 24 != "
                                         "expected 32\\)"):
        manifest_lib.create_manifest(tmp_path, cross_manifest(cross={**CROSS,
                                                                     "teacher_seq_len": 32}))
    # A manifest without them keeps its keys (and bytes): older caches read as before.
    assert "cross_tokenizer" not in make_manifest()


def test_the_teacher_tokenizer_is_checked_against_any_manifest(tmp_path):
    """The run's teacher tokenizer is a known key of every manifest: a cache of the student's
    tokenizer says <none> where the run's teacher has another, and the other way round."""
    same, cross = make_manifest(), cross_manifest()
    manifest_lib.check_fingerprints(same, {"fingerprints": {"teacher_tokenizer": None}})
    manifest_lib.check_fingerprints(cross, {"fingerprints": {
        "teacher_tokenizer": "teacher-tok-a"}})
    with pytest.raises(CacheError, match="different teacher_tokenizer \\(fingerprints."
                                         "teacher_tokenizer: cache <none> != expected "
                                         "teacher-tok-a\\)"):
        manifest_lib.check_fingerprints(same, {"fingerprints": {
            "teacher_tokenizer": "teacher-tok-a"}}, cache_dir=tmp_path)
    with pytest.raises(CacheError, match="cache teacher-tok-a != expected <none>"):
        manifest_lib.check_fingerprints(cross, {"fingerprints": {"teacher_tokenizer": None}})


def test_invalid_caches_of_another_tokenizer_are_refused():
    with pytest.raises(CacheError, match="a sample cache cannot hold a teacher of another"):
        cross_manifest("sample")
    with pytest.raises(CacheError, match="cross_tokenizer needs fingerprints.teacher_tokenizer"):
        manifest_lib.validate_manifest({**make_manifest(), "cross_tokenizer": CROSS})
    with pytest.raises(CacheError, match="fingerprints.teacher_tokenizer needs cross_tokenizer"):
        cross_manifest(cross=None)
    with pytest.raises(CacheError, match="teacher_tokenizer must be 'byte' or "
                                         "'teacher_tokenizer.json', got '../tokenizer.json'"):
        cross_manifest(cross={**CROSS, "teacher_tokenizer": "../tokenizer.json"})
    with pytest.raises(CacheError, match="teacher_seq_len must be > 0"):
        cross_manifest(cross={**CROSS, "teacher_seq_len": 0})
    with pytest.raises(CacheError, match="unknown key 'teacher_seq'"):
        cross_manifest(cross={"teacher_tokenizer": "byte", "teacher_seq": 3})
