"""A cache of a teacher with another tokenizer: `kd-jax precompute` of the session's byte-level
teacher for a student with a byte-level BPE of its own, and distillation from it.

A full cache gives the online cross-tokenizer teacher's loss and gradients (mapped, uld and
hybrid; whole and chunked), and the same losses through the CLI; a top-k cache holds the top k
of the teacher's logits at the student's aligned positions, zeros where unaligned; a cache is
refused, in one line, for another student tokenizer, another teacher tokenizer, a loss it cannot
serve, a sampled mode or other teacher rows; a cache with shards missing is finished
byte-identical; a teacher with a tokenizer.json of its own travels with its cache.
"""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from kd_jax import cli
from kd_jax import config as config_lib
from kd_jax.cache import shards as shards_lib
from kd_jax.models.pure import init_params
from kd_jax.teacher.cached import SOFT_TARGETS, CachedTeacher
from kd_jax.teacher.cross import CrossTokenizerTeacher
from kd_jax.teacher.sparse import topk_targets
from kd_jax.train import builder
from kd_jax.train.step import make_loss_fn
from tests.data.test_tokenizers import write_byte_level_bpe
from tests.helpers import (
    RTOL,
    assert_trees_close,
    distill_config,
    fast_jit,
    losses_by_step,
    write_config,
)

K = 8


@pytest.fixture(scope="module")
def cross(teacher_run, tmp_path_factory):
    """(root, config, overrides): a distillation config of the session's byte-level teacher
    into a student of a 300-id byte-level BPE (`overrides`), and its full (float32) and top-k
    caches, precomputed once into root/full and root/topk."""
    root = tmp_path_factory.mktemp("cross_cached")
    teacher_root, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(root / "tokenizer.json", vocab_size=300, corpus=lines)
    config = distill_config(root / "distill.yaml", corpus, teacher_root / "teacher",
                            root / "unused", "cache:\n  rows_per_shard: 8\n")
    # Teacher rows of 48 bytes: a row's last positions find no teacher position.
    overrides = [f"data.tokenizer={tokenizer}", "model.vocab_size=320", "data.teacher_seq_len=48"]
    assert cli.main(["precompute", str(config), *overrides, f"cache.dir={root / 'full'}",
                     "cache.mode=full", "cache.value_dtype=float32"]) == 0
    assert cli.main(["precompute", str(config), *overrides, f"cache.dir={root / 'topk'}",
                     "cache.mode=topk", f"cache.k={K}", "cache.value_dtype=float32"]) == 0
    return root, config, overrides


def built(config, overrides, *more):
    return builder.build(config_lib.load(config, [*overrides, *more]), "distill")


@pytest.fixture(scope="module")
def online_and_full(cross):
    """(online run, run from the full cache): the same rows, the same student."""
    root, config, overrides = cross
    online = built(config, overrides, f"train.run_dir={root / 'online_run'}",
                   "loss.temperature=2.0")
    cached = built(config, overrides, f"train.run_dir={root / 'cached_run'}",
                   "loss.temperature=2.0", "teacher.source=cache", f"cache.dir={root / 'full'}")
    yield online, cached
    cached.close()


def with_method(teacher, method):
    if isinstance(teacher, CrossTokenizerTeacher):
        return dataclasses.replace(teacher, method=method)
    other = copy.copy(teacher)
    other.cross = dataclasses.replace(teacher.cross, method=method)
    return other


def loss_and_grads(run, teacher, loss_cfg, params, batch):
    loss_fn = make_loss_fn(run.student, teacher, loss_cfg, run.valid_vocab)
    num_valid = float(np.sum(batch["loss_mask"]))
    (loss, _), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, run.teacher_params, batch, num_valid)
    return float(loss), grads


# The chunked head cuts the cached targets as a pytree of per-token arrays (64 tokens: 4 chunks).
@pytest.mark.parametrize("method, chunk_tokens", [("mapped", -1), ("uld", -1), ("hybrid", -1),
                                                  ("mapped", 64)],
                         ids=["mapped", "uld", "hybrid", "mapped-chunked"])
def test_a_full_cache_gives_the_online_teacher_s_loss_and_gradients(online_and_full, method,
                                                                    chunk_tokens):
    online, cached = online_and_full
    assert isinstance(cached.teacher, CachedTeacher) and cached.teacher.cross is not None
    loss_cfg = dataclasses.replace(online.cfg.loss, chunk_tokens=chunk_tokens,
                                   cross_vocab=method)
    params = init_params(online.cfg.model)
    batch = online.host_batch(0)
    cached_batch = cached.host_batch(0)
    np.testing.assert_array_equal(cached_batch["tokens"], batch["tokens"])
    aligned = cached_batch[SOFT_TARGETS]["aligned"] > 0
    np.testing.assert_array_equal(aligned, batch["teacher_index"] >= 0)
    assert 0.3 < aligned[batch["loss_mask"] > 0].mean() < 1.0  # rows cut: some are unaligned
    got = loss_and_grads(cached, with_method(cached.teacher, method), loss_cfg, params,
                         cached_batch)
    want = loss_and_grads(online, with_method(online.teacher, method), loss_cfg, params, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    assert_trees_close(got[1], want[1])


def test_a_topk_cache_holds_the_teacher_s_top_k_at_the_aligned_positions(online_and_full,
                                                                         cross):
    online, _ = online_and_full
    root, config, overrides = cross
    topk = built(config, overrides, f"train.run_dir={root / 'topk_run'}",
                 "teacher.source=cache", f"cache.dir={root / 'topk'}")
    try:
        batch = online.host_batch(0)
        fields = topk.host_batch(0)[SOFT_TARGETS]
    finally:
        topk.close()
    targets = online.teacher.soft_targets(online.teacher_params, batch)
    logits = np.asarray(jax.numpy.einsum("btd,vd->btv", targets.hidden, targets.head))
    want = topk_targets(logits, K, temperature=1.0, valid_vocab=256)
    aligned = batch["teacher_index"] >= 0
    np.testing.assert_array_equal(fields["aligned"] > 0, aligned)
    np.testing.assert_array_equal(fields["ids"][aligned], np.asarray(want["ids"])[aligned])
    for name in ("logprobs", "tail"):
        np.testing.assert_allclose(fields[name][aligned], np.asarray(want[name])[aligned],
                                   rtol=RTOL, atol=1e-6)
        assert not fields[name][~aligned].any()  # zeros where unaligned
    assert not fields["ids"][~aligned].any()


def test_distillation_from_a_full_cache_follows_the_online_run_through_the_cli(cross):
    root, config, overrides = cross
    steps = ["train.steps=3", "train.checkpoint_every=3"]
    assert cli.main(["distill", str(config), *overrides, *steps, "teacher.source=cache",
                     f"cache.dir={root / 'full'}", f"train.run_dir={root / 'offline'}"]) == 0
    assert cli.main(["distill", str(config), *overrides, *steps,
                     f"train.run_dir={root / 'online'}"]) == 0
    online, offline = losses_by_step(root / "online"), losses_by_step(root / "offline")
    assert sorted(offline) == sorted(online) == [1, 2, 3]
    for step, loss in online.items():
        assert offline[step] == pytest.approx(loss, rel=RTOL), step
    # A top-k cache trains too.
    assert cli.main(["distill", str(config), *overrides, *steps, "teacher.source=cache",
                     f"cache.dir={root / 'topk'}", f"train.run_dir={root / 'topk_cli'}"]) == 0
    assert all(np.isfinite(list(losses_by_step(root / "topk_cli").values())))


def refused(argv, capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-jax: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case, message", [
    ("student tokenizer", "was built with a different tokenizer (fingerprints.tokenizer: "),
    ("mse", "(full, of a teacher with another tokenizer): loss.divergence 'mse' compares "
            "logits column by column"),
    ("hybrid from top-k", "(topk, of a teacher with another tokenizer): loss.cross_vocab "
                          "'hybrid' is not available from top-k targets"),
    ("temperature", "(topk, of a teacher with another tokenizer) holds the teacher at "
                    "temperature 1.0; loss.temperature must be the same"),
])
def test_a_cache_that_does_not_fit_is_refused(cross, tmp_path, capsys, case, message):
    root, config, overrides = cross
    argv = ["distill", str(config), *overrides, "teacher.source=cache",
            f"cache.dir={root / 'full'}", f"train.run_dir={tmp_path / 'run'}"]
    if case == "student tokenizer":
        lines = [line for line in Path(config_lib.load(config).data.path).read_text()
                 .splitlines() if line.strip()]
        other = write_byte_level_bpe(tmp_path / "other.json", vocab_size=280, corpus=lines)
        argv.append(f"data.tokenizer={other}")
    elif case == "mse":
        argv.append("loss.divergence=mse")
    elif case == "hybrid from top-k":
        argv += [f"cache.dir={root / 'topk'}", "loss.cross_vocab=hybrid"]
    else:
        argv += [f"cache.dir={root / 'topk'}", "loss.temperature=2.0"]
    assert message in refused(argv, capsys)
    assert not (tmp_path / "run").exists()


def test_a_cache_of_another_teacher_tokenizer_is_refused(cross, tmp_path, capsys):
    """The manifest records the teacher's tokenizer: a run whose teacher has another, or a
    cache whose teacher's tokenizer is not the one its manifest recorded, is refused."""
    root, config, overrides = cross
    cache_dir = shutil.copytree(root / "full", tmp_path / "cache")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["fingerprints"]["teacher_tokenizer"] == "byte-v1"
    assert manifest["cross_tokenizer"] == {"teacher_tokenizer": "byte", "teacher_seq_len": 48}
    assert manifest["vocab_size"] == 256  # the teacher's: its ids and log-probabilities
    manifest["fingerprints"]["teacher_tokenizer"] = "sha256:0123"
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    argv = ["distill", str(config), *overrides, "teacher.source=cache", f"cache.dir={cache_dir}",
            f"train.run_dir={tmp_path / 'run'}"]
    assert ("was built with a different teacher_tokenizer (fingerprints.teacher_tokenizer: "
            "cache sha256:0123 != expected byte-v1)") in refused(argv, capsys)
    # No teacher named: the cache's own record of its teacher's tokenizer is checked.
    assert ("byte is not the tokenizer of the teacher it was built from (its fingerprint is "
            "not the manifest's fingerprints.teacher_tokenizer)") in refused(
        [*argv, "teacher.path="], capsys)
    assert not (tmp_path / "run").exists()


def test_precompute_refuses_samples_and_other_teacher_rows(cross, tmp_path, capsys):
    root, config, overrides = cross
    err = refused(["precompute", str(config), *overrides, "cache.mode=sample",
                   f"cache.dir={tmp_path / 'sampled'}"], capsys)
    assert ("cache.mode sample is not available for a teacher with another tokenizer (the byte "
            "tokenizer)") in err
    assert not (tmp_path / "sampled").exists()
    before = {path: path.read_bytes() for path in (root / "full").rglob("*") if path.is_file()}
    err = refused(["precompute", str(config), *overrides, f"cache.dir={root / 'full'}",
                   "cache.mode=full", "cache.value_dtype=float32", "data.teacher_seq_len=40"],
                  capsys)
    assert ("was built with a different cross_tokenizer.teacher_seq_len (cross_tokenizer."
            "teacher_seq_len: cache 48 != expected 40)") in err
    assert before == {path: path.read_bytes() for path in (root / "full").rglob("*")
                      if path.is_file()}


def test_a_cache_with_shards_missing_is_finished_byte_identical(cross, tmp_path):
    root, config, overrides = cross
    cache_dir = shutil.copytree(root / "topk", tmp_path / "resumed")
    shards = sorted((cache_dir / "shards").glob("*.kdc"))
    for shard in shards[1::3]:
        shard.unlink()
    assert cli.main(["precompute", str(config), *overrides, f"cache.dir={cache_dir}",
                     "cache.mode=topk", f"cache.k={K}", "cache.value_dtype=float32",
                     "cache.batch_size=4"]) == 0
    assert {p.name: p.read_bytes() for p in (cache_dir / "shards").glob("*.kdc")} == {
        p.name: p.read_bytes() for p in (root / "topk" / "shards").glob("*.kdc")}
    assert cli.main(["cache", "verify", str(cache_dir), "--config", str(config),
                     *overrides]) == 0


def test_a_teacher_s_tokenizer_json_travels_with_its_cache(teacher_run, tmp_path, capsys):
    """A teacher trained with a BPE of its own, cached for a byte-level student: the cache holds
    its tokenizer.json, and distillation reads it there, with no teacher named."""
    _, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(tmp_path / "teacher_tokenizer.json", vocab_size=300,
                                     corpus=lines)
    teacher_config = write_config(tmp_path / "teacher.yaml", corpus, tmp_path / "teacher")
    assert cli.main(["train", str(teacher_config), f"data.tokenizer={tokenizer}",
                     "model.vocab_size=320", "train.steps=2", "train.checkpoint_every=2"]) == 0
    config = distill_config(tmp_path / "distill.yaml", corpus, tmp_path / "teacher",
                            tmp_path / "run", f"cache:\n  dir: {tmp_path / 'cache'}\n"
                            "  rows_per_shard: 16\n  k: 4\n")
    assert cli.main(["precompute", str(config)]) == 0
    copied = tmp_path / "cache" / "teacher_tokenizer.json"
    assert copied.read_bytes() == tokenizer.read_bytes()
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["vocab_size"] == 300
    capsys.readouterr()
    assert cli.main(["distill", str(config), "teacher.source=cache", "teacher.path=",
                     "train.steps=2", "train.checkpoint_every=2"]) == 0
    assert "cache of a teacher with another tokenizer" in capsys.readouterr().out
    assert all(np.isfinite(list(losses_by_step(tmp_path / "run").values())))
    copied.write_bytes(copied.read_bytes().replace(b"<eos>", b"<end>"))
    err = refused(["distill", str(config), "teacher.source=cache", "teacher.path=",
                   f"train.run_dir={tmp_path / 'run2'}"], capsys)
    assert ("teacher_tokenizer.json is not the tokenizer of the teacher it was built from (its "
            "fingerprint is not the manifest's fingerprints.teacher_tokenizer)") in err
    shards_lib.verify(tmp_path / "cache")


def test_a_cache_of_a_teacher_with_almost_nothing_in_common_is_refused_for_mapped(
        cross, tmp_path, capsys):
    """As for the online teacher: a student tokenizer that shares next to nothing with the
    cached teacher's (a word-level one against bytes) takes uld, and mapped is refused."""
    from tests.teacher.test_cross import word_level

    _, config, _ = cross
    lines = [line for line in Path(config_lib.load(config).data.path).read_text().splitlines()
             if line.strip()]
    word_level(tmp_path / "words.json", lines)
    overrides = [f"data.tokenizer={tmp_path / 'words.json'}", "model.vocab_size=256",
                 "data.teacher_seq_len=64"]
    cache = tmp_path / "cache"
    assert cli.main(["precompute", str(config), *overrides, f"cache.dir={cache}",
                     "cache.mode=topk", f"cache.k={K}"]) == 0
    argv = ["distill", str(config), *overrides, "teacher.source=cache", f"cache.dir={cache}",
            f"train.run_dir={tmp_path / 'run'}"]
    assert "have almost nothing in common" in refused([*argv, "loss.cross_vocab=mapped"], capsys)
    assert not (tmp_path / "run").exists()
    run = built(config, overrides, "teacher.source=cache", f"cache.dir={cache}",
                "loss.cross_vocab=uld")
    try:
        assert "of the student's spell a token of the other" in run.teacher.note
    finally:
        run.close()
