"""Offline distillation through the CLI: `kd-jax precompute`, `kd-jax cache verify`, distill from
a cache.

On the tiny teacher of the session (tests/conftest.py): a cache that verifies, kill -9 and rerun,
a full disk, two processes, distillation from a full, a sampled and an imported cache, a corrupt
shard, and caches begun otherwise. The checks a cache gets before training are in
tests/teacher/test_cached.py.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kd_jax import cli
from kd_jax.cache import manifest as manifest_lib
from kd_jax.cache import shards as shards_lib
from kd_jax.cache.api_import import load_rows
from kd_jax.cache.manifest import CacheError
from kd_jax.cache.reader import CacheReader
from kd_jax.data.tokenizers import ByteTokenizer
from tests.cache.test_api_import import _responses, _write_jsonl
from tests.helpers import MESH, cli_env, losses_by_step, start_two_processes

TIMEOUT_S = 600  # generous: subprocesses compile and run on a machine that may be shared


@pytest.fixture
def setup(sampled_cache):
    """(root, corpus, config): the session's sampled cache, in root/cache (tests/conftest.py)."""
    return sampled_cache


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache_dir)): p.read_bytes()
            for p in sorted(cache_dir.rglob("*")) if p.is_file()}


def n_shards(cache_dir: Path) -> int:
    return len(list((cache_dir / "shards").glob("*.kdc")))


def test_precompute_writes_a_cache_that_verifies(setup, capsys):
    root, _, config = setup
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["mode"] == "sample" and manifest["params"]["draws"] == 12
    assert set(manifest["fingerprints"]) == {"teacher", "tokenizer", "data", "packing"}
    assert n_shards(root / "cache") == -(-manifest["n_rows"] // 8)
    capsys.readouterr()
    assert cli.main(["cache", "verify", str(root / "cache"), "--config", str(config)]) == 0
    assert "checksums pass, rows match the data" in capsys.readouterr().out


def test_kill_9_then_rerun_is_byte_identical(setup, tmp_path):
    root, _, config = setup
    cache_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "kd_jax.cli", "precompute", str(config),
               f"cache.dir={cache_dir}", "cache.batch_size=4"]  # smaller steps: more to kill
    process = subprocess.Popen(command, env=cli_env(1), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    rng = np.random.default_rng()
    target = int(rng.integers(1, 20))  # a random point: after this many of the 91 shards
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and process.poll() is None:
        if (cache_dir / "shards").is_dir() and n_shards(cache_dir) >= target:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    total = n_shards(root / "cache")
    assert 0 < n_shards(cache_dir) < total, "the kill must land mid-precompute"
    with pytest.raises(CacheError, match="missing"):
        shards_lib.verify(cache_dir)
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}",
                     "cache.batch_size=4"]) == 0
    shards_lib.verify(cache_dir)
    assert cache_bytes(cache_dir) == cache_bytes(root / "cache")


def test_a_full_disk_fails_cleanly_and_the_rerun_resumes(setup, tmp_path, monkeypatch, capsys):
    root, _, config = setup
    cache_dir = tmp_path / "full"
    real_write = manifest_lib.write_atomically
    calls = []

    def fill_up(path, chunks, checksum):
        calls.append(path)
        if len(calls) == 4:  # the manifest, two shards, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, chunks, checksum)

    # The manifest and the shards are written through the same function, imported by both.
    monkeypatch.setattr(manifest_lib, "write_atomically", fill_up)
    monkeypatch.setattr(shards_lib, "write_atomically", fill_up)
    capsys.readouterr()
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-jax: error: could not write cache shard") and err.count("\n") == 1
    assert "No space left on device" in err
    assert n_shards(cache_dir) == 2
    assert not list((cache_dir / "shards").glob(".*.tmp"))
    monkeypatch.setattr(manifest_lib, "write_atomically", real_write)
    monkeypatch.setattr(shards_lib, "write_atomically", real_write)
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 0
    assert cache_bytes(cache_dir) == cache_bytes(root / "cache")


def test_two_processes_precompute_the_same_cache(setup, tmp_path):
    """2 processes x 4 devices write the cache that 1 process x 8 devices (same mesh) writes.

    (On another mesh the teacher's logits differ in their last bits, and a draw that lands on a
    step of the CDF can move: caches are byte-identical for one mesh, not across meshes.)
    """
    root, _, config = setup
    one = subprocess.run(
        [sys.executable, "-m", "kd_jax.cli", "precompute", str(config), *MESH,
         f"cache.dir={tmp_path / 'one'}"],
        env=cli_env(8, fast_compile=True), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-4000:]
    processes = start_two_processes("precompute", config, [f"cache.dir={tmp_path / 'two'}"],
                                    fast_compile=True)
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    shards_lib.verify(tmp_path / "two")
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
    # Against the one-device cache: entropies within a float16 step, all but a few draws.
    ours = CacheReader(tmp_path / "two").read(np.arange(50))
    reference = CacheReader(root / "cache").read(np.arange(50))
    np.testing.assert_allclose(ours["entropy"], reference["entropy"], rtol=2e-3)
    assert (ours["ids"] != reference["ids"]).mean() < 1e-3


def test_distill_from_a_full_cache_matches_online_distillation(setup, tmp_path):
    root, _, config = setup
    cache = [f"cache.dir={tmp_path / 'full'}", "cache.mode=full", "cache.value_dtype=float32"]
    assert cli.main(["precompute", str(config), *cache]) == 0
    assert cli.main(["distill", str(config), *cache, "teacher.source=cache",
                     f"train.run_dir={tmp_path / 'offline'}"]) == 0
    assert cli.main(["distill", str(config), f"train.run_dir={tmp_path / 'online'}"]) == 0
    online, offline = losses_by_step(tmp_path / "online"), losses_by_step(tmp_path / "offline")
    assert sorted(offline) == sorted(online) == list(range(1, 7))
    for step, loss in online.items():
        assert offline[step] == pytest.approx(loss, rel=1e-5), step
    report = json.loads((tmp_path / "offline" / "report.json").read_text())
    assert "teacher" in report  # teacher.path named: evaluated beside the student


def test_distill_from_a_sample_cache_trains(setup, tmp_path):
    root, _, config = setup
    run_dir = tmp_path / "sampled"
    assert cli.main(["distill", str(config), "teacher.source=cache", "teacher.path=",
                     f"train.run_dir={run_dir}"]) == 0
    losses_seen = losses_by_step(run_dir)
    assert sorted(losses_seen) == list(range(1, 7))
    assert all(np.isfinite(list(losses_seen.values())))
    report = json.loads((run_dir / "report.json").read_text())
    assert "teacher" not in report and report["student"]["bits_per_byte"] > 0
    assert cli.main(["eval", str(run_dir)]) == 0  # no teacher to load for it either
    again = json.loads((run_dir / "report.json").read_text())
    assert again["student"]["bits_per_byte"] == pytest.approx(report["student"]["bits_per_byte"],
                                                              rel=1e-6)


def test_a_corrupt_or_truncated_shard_is_named(setup, tmp_path, capsys):
    root, _, config = setup
    cache_dir = shutil.copytree(root / "cache", tmp_path / "damaged")
    corrupt, truncated = sorted((cache_dir / "shards").glob("*.kdc"))[2:4]
    pristine = corrupt.read_bytes()
    for offset in (0, len(pristine) // 5, len(pristine) // 2, len(pristine) - 40,
                   len(pristine) - 1):  # header, rows, hashes, the checksum itself
        data = bytearray(pristine)
        data[offset] ^= 0x10
        corrupt.write_bytes(bytes(data))
        capsys.readouterr()
        assert cli.main(["cache", "verify", str(cache_dir)]) == 2, offset
        assert corrupt.name in capsys.readouterr().err, offset
    # Training checks each shard's checksum the first time it reads it: named, not trained on.
    every = shutil.copytree(root / "cache", tmp_path / "every")
    for shard in (every / "shards").glob("*.kdc"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    assert cli.main(["distill", str(config), "teacher.source=cache", "train.progress=false",
                     f"cache.dir={every}", f"train.run_dir={tmp_path / 'run0'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kd-jax: error: cache shard {every / 'shards'}/0")
    assert err[-1].endswith("is corrupt: its sha256 does not match its trailer")
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert cli.main(["distill", str(config), "teacher.source=cache",
                     f"cache.dir={cache_dir}", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert truncated.name in err and err.count("\n") == 1


def test_imported_api_logprobs_distill_a_student(tmp_path, capsys):
    """`kd-jax cache import` then distill on its rows: the loss covers response tokens only."""
    records, expected = _responses(ByteTokenizer(), n_lines=40, seed=3)
    jsonl = _write_jsonl(tmp_path / "responses.jsonl", records)
    config = tmp_path / "api.yaml"
    config.write_text(f"""
model: {{vocab_size: 256, d_model: 32, n_layers: 1, n_heads: 4, n_kv_heads: 2, d_ff: 64,
        max_seq_len: 256}}
data: {{source: cache, tokenizer: byte, seq_len: 256, heldout_fraction: 0.1}}
teacher: {{source: cache}}
cache: {{dir: {tmp_path / 'api_cache'}}}
train: {{run_dir: {tmp_path / 'run'}, steps: 4, batch_size: 4, log_every: 1, progress: false}}
""")
    assert cli.main(["cache", "import", str(jsonl), str(tmp_path / "api_cache"),
                     "--config", str(config)]) == 0
    assert cli.main(["cache", "verify", str(tmp_path / "api_cache")]) == 0
    assert cli.main(["distill", str(config)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 4 and np.isfinite(report["student"]["bits_per_token"])

    train, heldout = load_rows(tmp_path / "api_cache", ByteTokenizer())
    assert train.n_rows + heldout.n_rows == 40
    # Every loss position is a response token: as many as the responses have, minus none.
    response_tokens = sum(len(e["response_ids"]) for e in expected)
    assert train.loss_mask.sum() + heldout.loss_mask.sum() == response_tokens
    # A config whose rows are not the cache's is refused: another sequence length.
    capsys.readouterr()
    assert cli.main(["distill", str(config), "data.seq_len=128",
                     f"train.run_dir={tmp_path / 'other'}"]) == 2
    assert "holds rows of 256 tokens" in capsys.readouterr().err


def test_precompute_into_a_cache_built_otherwise_is_refused(setup, capsys):
    root, _, config = setup
    before = cache_bytes(root / "cache")
    capsys.readouterr()
    assert cli.main(["precompute", str(config), "cache.draws=6"]) == 2
    err = capsys.readouterr().err
    assert "was built with a different params.draws (params.draws: cache 12 != expected 6)" in err
    assert cache_bytes(root / "cache") == before


def test_a_cache_begun_by_another_sampler_is_not_finished_by_this_one(setup, tmp_path, capsys):
    root, _, config = setup
    cache_dir = shutil.copytree(root / "cache", tmp_path / "older")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["params"]["sampler"] = "gumbel-max"
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 2
    assert "was built with a different params.sampler" in capsys.readouterr().err
