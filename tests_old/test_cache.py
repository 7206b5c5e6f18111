"""Offline distillation: `kd-jax precompute`, `kd-jax cache verify`, distill from a cache.

The step-level check compares the cached step with the online one on the same batch; the rest
runs the CLI on the tiny models of tests/test_cli.py: kill -9 and rerun, a full disk, two
processes, fingerprints that differ, a corrupt shard.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import (  # noqa: E402
    losses_by_step,
    teacher_and_distill_config,
    write_config,
    write_tokenizer,
)
from test_multiprocess import MESH, cli_env, start_two_processes  # noqa: E402
from test_step import LOSS, STUDENT, TEACHER, VALID_VOCAB, make_batch  # noqa: E402

from kd_jax import cache_store, cli, losses, targets  # noqa: E402
from kd_jax import step as step_lib  # noqa: E402

RTOL, ATOL_FRACTION = 1e-5, 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_cache_step_equals_the_online_step(temperature):
    """Loss and gradients of the cached step (full log-probs) are the online step's."""
    student, student_params = step_lib.init_model(STUDENT)
    teacher, teacher_params = step_lib.init_model(TEACHER)
    loss_cfg = LOSS.__class__(**{**LOSS.__dict__, "temperature": temperature})
    batch = make_batch(0)
    teacher_logits = teacher.logits(teacher_params, batch)
    cached = dict(batch)
    cached[losses.TARGET_PREFIX + "logprobs"] = targets.full_targets(
        teacher_logits, temperature=1.0, valid_vocab=VALID_VOCAB)
    n_valid = np.float32(batch["loss_mask"].sum())
    online = step_lib.make_loss_fn(student, teacher, loss_cfg, VALID_VOCAB)
    offline = step_lib.make_loss_fn(student, None, loss_cfg, VALID_VOCAB, cache_mode="full")
    (loss_a, _), grads_a = jax.value_and_grad(online, has_aux=True)(
        student_params, teacher_params, batch, n_valid)
    (loss_b, _), grads_b = jax.value_and_grad(offline, has_aux=True)(
        student_params, None, cached, n_valid)
    np.testing.assert_allclose(loss_b, loss_a, rtol=RTOL)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL_FRACTION * np.abs(a).max())


def test_topk_of_the_whole_vocabulary_equals_the_online_step():
    student, student_params = step_lib.init_model(STUDENT)
    teacher, teacher_params = step_lib.init_model(TEACHER)
    batch = make_batch(1)
    topk = targets.topk_targets(teacher.logits(teacher_params, batch), VALID_VOCAB,
                                temperature=LOSS.temperature, valid_vocab=VALID_VOCAB)
    cached = dict(batch, **{losses.TARGET_PREFIX + k: v for k, v in topk.items()})
    tx = optax.sgd(0.1)
    online = step_lib.make_update(student, teacher, tx, optax.constant_schedule(0.1), LOSS, 2,
                                  VALID_VOCAB)
    offline = step_lib.make_update(student, None, tx, optax.constant_schedule(0.1), LOSS, 2,
                                   VALID_VOCAB, cache_mode="topk")
    state = step_lib.init_state(student_params, tx, 0)
    state_a, metrics_a = jax.jit(online)(state, teacher_params, batch)
    state_b, metrics_b = jax.jit(offline)(state, None, cached)
    np.testing.assert_allclose(metrics_b["loss_sum"], metrics_a["loss_sum"], rtol=RTOL)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL_FRACTION * np.abs(a).max())


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained tiny teacher, a distillation config, and an uninterrupted reference cache."""
    root = tmp_path_factory.mktemp("cache")
    corpus, config = teacher_and_distill_config(
        root, f"cache:\n  dir: {root / 'reference'}\n  mode: sample\n  rows_per_shard: 8\n"
              "  batch_size: 8\n")
    assert cli.main(["precompute", str(config)]) == 0
    return root, corpus, config


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache_dir)): p.read_bytes()
            for p in sorted(cache_dir.rglob("*")) if p.is_file()}


def n_shards(cache_dir: Path) -> int:
    return len(list((cache_dir / "shards").glob("*.kdc")))


def test_precompute_writes_a_cache_that_verifies(setup, capsys):
    root, _, config = setup
    manifest = json.loads((root / "reference" / "manifest.json").read_text())
    assert manifest["mode"] == "sample" and manifest["params"]["draws"] == 12
    assert set(manifest["fingerprints"]) == {"teacher", "tokenizer", "data", "packing"}
    assert n_shards(root / "reference") == -(-manifest["n_rows"] // 8)
    capsys.readouterr()
    assert cli.main(["cache", "verify", str(root / "reference"), "--config", str(config)]) == 0
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
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (cache_dir / "shards").is_dir() and n_shards(cache_dir) >= target:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    total = n_shards(root / "reference")
    assert 0 < n_shards(cache_dir) < total, "the kill must land mid-precompute"
    with pytest.raises(cache_store.CacheError, match="missing"):
        cache_store.verify(cache_dir)
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}",
                     "cache.batch_size=4"]) == 0
    cache_store.verify(cache_dir)
    assert cache_bytes(cache_dir) == cache_bytes(root / "reference")


def test_a_full_disk_fails_cleanly_and_the_rerun_resumes(setup, tmp_path, monkeypatch, capsys):
    root, _, config = setup
    cache_dir = tmp_path / "full"
    real_write = cache_store._write_atomically
    calls = []

    def fill_up(path, chunks, checksum):
        calls.append(path)
        if len(calls) == 4:  # the manifest, two shards, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, chunks, checksum)

    monkeypatch.setattr(cache_store, "_write_atomically", fill_up)
    capsys.readouterr()
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-jax: error: could not write cache shard") and err.count("\n") == 1
    assert "No space left on device" in err
    assert n_shards(cache_dir) == 2
    assert not list((cache_dir / "shards").glob(".*.tmp"))
    monkeypatch.setattr(cache_store, "_write_atomically", real_write)
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 0
    assert cache_bytes(cache_dir) == cache_bytes(root / "reference")


def test_two_processes_precompute_the_same_cache(setup, tmp_path):
    """2 processes x 4 devices write the cache that 1 process x 8 devices (same mesh) writes.

    (On another mesh the teacher's logits differ in their last bits, and a draw that lands on a
    step of the CDF can move: caches are byte-identical for one mesh, not across meshes.)
    """
    root, _, config = setup
    one = subprocess.run(
        [sys.executable, "-m", "kd_jax.cli", "precompute", str(config), *MESH,
         f"cache.dir={tmp_path / 'one'}"],
        env=cli_env(8), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    processes = start_two_processes("precompute", config, [f"cache.dir={tmp_path / 'two'}"])
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]
    cache_store.verify(tmp_path / "two")
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
    # Against the one-device cache: entropies within a float16 step, all but a few draws.
    ours = cache_store.CacheReader(tmp_path / "two").read(np.arange(50))
    reference = cache_store.CacheReader(root / "reference").read(np.arange(50))
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


@pytest.mark.parametrize("case, message", [
    ("teacher", "was built with a different teacher (fingerprints.teacher"),
    ("tokenizer", "was built with a different tokenizer (fingerprints.tokenizer"),
    ("data", "was built with a different data (fingerprints.data"),
    ("packing", "was built with a different packing (fingerprints.packing"),
    ("divergence", "sampled targets estimate forward KL only, not loss.divergence=reverse_kl"),
    ("temperature", "holds the teacher at temperature 1.0; loss.temperature must be the same"),
])
def test_a_cache_that_does_not_fit_is_refused(setup, tmp_path, capsys, case, message):
    root, corpus, config = setup
    overrides = ["teacher.source=cache", f"train.run_dir={tmp_path / 'run'}"]
    if case == "teacher":  # same architecture, other weights
        other = write_config(tmp_path / "other.yaml", corpus, tmp_path / "other_teacher")
        assert cli.main(["train", str(other), "model.seed=7"]) == 0
        overrides.append(f"teacher.path={tmp_path / 'other_teacher'}")
    elif case == "tokenizer":
        tokenizer = write_tokenizer(tmp_path / "tokenizer.json", corpus)
        overrides += [f"data.tokenizer={tokenizer}", "teacher.path="]
    elif case == "data":
        overrides.append("data.heldout_fraction=0.2")
    elif case == "packing":
        overrides.append("data.seq_len=24")
    elif case == "divergence":
        overrides.append("loss.divergence=reverse_kl")
    elif case == "temperature":
        overrides.append("loss.temperature=2.0")
    capsys.readouterr()
    assert cli.main(["distill", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-jax: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_a_corrupt_or_truncated_shard_is_named(setup, tmp_path, capsys):
    root, _, config = setup
    cache_dir = tmp_path / "damaged"
    cache_dir.mkdir()
    for name, content in cache_bytes(root / "reference").items():
        (cache_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (cache_dir / name).write_bytes(content)
    corrupt, truncated = sorted((cache_dir / "shards").glob("*.kdc"))[2:4]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x10
    corrupt.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["cache", "verify", str(cache_dir)]) == 2
    assert corrupt.name in capsys.readouterr().err
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert cli.main(["distill", str(config), "teacher.source=cache",
                     f"cache.dir={cache_dir}", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert truncated.name in err and err.count("\n") == 1


def test_imported_api_logprobs_distill_a_student(tmp_path, capsys):
    """`kd-jax cache import` then distill on its rows: the loss covers response tokens only."""
    from test_cache_import import _responses, _write_jsonl

    from kd_jax import data

    records, expected = _responses(data.ByteTokenizer(), n_lines=40, seed=3)
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
    from kd_jax import cache_import

    train, heldout = cache_import.load_rows(tmp_path / "api_cache", data.ByteTokenizer())
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
    before = cache_bytes(root / "reference")
    capsys.readouterr()
    assert cli.main(["precompute", str(config), "cache.draws=6"]) == 2
    err = capsys.readouterr().err
    assert "was built with a different params.draws (params.draws: cache 12 != expected 6)" in err
    assert cache_bytes(root / "reference") == before


def test_a_cache_begun_by_another_sampler_is_not_finished_by_this_one(setup, tmp_path, capsys):
    root, _, config = setup
    cache_dir = tmp_path / "older"
    for name, content in cache_bytes(root / "reference").items():
        (cache_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (cache_dir / name).write_bytes(content)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["params"]["sampler"] = "gumbel-max"
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["precompute", str(config), f"cache.dir={cache_dir}"]) == 2
    assert "was built with a different params.sampler" in capsys.readouterr().err
