"""The cached teacher: the checks a cache gets before training (`open_cache`, `check_loss`), the
rows it reads with their hashes checked (`host_fields`), and its soft targets in the step.

A sampled cache of the session's tiny teacher is built once for the module; writing caches
(`kd-jax precompute`) is tested in tests/train/test_precompute.py.
"""

import shutil

import jax
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, cli
from kd_jax import config as config_lib
from kd_jax.cache.fingerprints import teacher_fingerprint
from kd_jax.cache.manifest import CacheError
from kd_jax.cache.reader import CacheReader
from kd_jax.config import ConfigError, LossConfig
from kd_jax.losses.soft_targets import Sampled
from kd_jax.teacher.cached import SOFT_TARGETS, CachedTeacher, check_loss, open_cache
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.teacher.sparse import topk_targets
from kd_jax.train.builder import load_data
from kd_jax.train.step import init_state, make_update
from tests.helpers import (
    ATOL_FRACTION,
    LOSS,
    RTOL,
    VALID_VOCAB,
    make_batch,
    write_tokenizer,
)


class _CachedTopK(CachedTeacher):
    """A cached teacher's step side (`CachedTeacher.soft_targets`), without a cache on disk:
    the top-k targets travel in the batch."""

    def __init__(self):  # no reader: nothing is read from disk
        self.mode = "topk"


def test_topk_of_the_whole_vocabulary_equals_the_online_step(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = make_batch(1)
    topk = topk_targets(teacher.logits(teacher_params, batch), VALID_VOCAB,
                        temperature=LOSS.temperature, valid_vocab=VALID_VOCAB)
    cached = {**batch, SOFT_TARGETS: topk}
    tx = optax.sgd(0.1)
    online = make_update(student, OnlineTeacher(teacher), tx, optax.constant_schedule(0.1), LOSS,
                         2, VALID_VOCAB)
    offline = make_update(student, _CachedTopK(), tx, optax.constant_schedule(0.1), LOSS, 2,
                          VALID_VOCAB)
    state = init_state(student_params, tx, 0)
    state_a, metrics_a = jax.jit(online)(state, teacher_params, batch)
    state_b, metrics_b = jax.jit(offline)(state, None, cached)
    np.testing.assert_allclose(metrics_b["loss_sum"], metrics_a["loss_sum"], rtol=RTOL)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL_FRACTION * np.abs(a).max())


# ------------------------------------------------------------------------- a cache on disk


@pytest.fixture
def setup(sampled_cache):
    """(root, corpus, config): the session's sampled cache, in root/cache (tests/conftest.py)."""
    return sampled_cache


def opened(config, overrides=()) -> tuple[CachedTeacher, object]:
    """open_cache as `kd-jax distill` calls it: (the cached teacher, the training rows)."""
    cfg = config_lib.load(config, ["teacher.source=cache", *overrides])
    data = load_data(cfg)
    fingerprint = None
    if cfg.teacher.path:
        step = checkpoint.latest_step(cfg.teacher.path)
        fingerprint = teacher_fingerprint(cfg.teacher.path, step)
    return open_cache(cfg, data.tokenizer, data.train, fingerprint), data.train


@pytest.mark.parametrize("case, message", [
    ("teacher", "was built with a different teacher (fingerprints.teacher"),
    ("tokenizer", "was built with a different tokenizer (fingerprints.tokenizer"),
    ("data", "was built with a different data (fingerprints.data"),
    ("packing", "was built with a different packing (fingerprints.packing"),
    ("divergence", "(sample): loss.divergence 'reverse_kl' cannot be estimated from sampled "
                   "targets"),
    ("temperature", "holds the teacher at temperature 1.0; loss.temperature must be the same"),
])
def test_a_cache_that_does_not_fit_is_refused(setup, tmp_path, capsys, case, message):
    root, corpus, config = setup
    overrides = ["teacher.source=cache", f"train.run_dir={tmp_path / 'run'}"]
    if case == "teacher":  # same architecture, other weights: the run without its last checkpoint
        teacher = config_lib.load(config).teacher.path
        other = shutil.copytree(teacher, tmp_path / "other_teacher")
        latest = checkpoint.latest_step(other)
        shutil.rmtree(checkpoint.checkpoint_dir(other) / str(latest))
        assert 0 < checkpoint.latest_step(other) < latest
        overrides.append(f"teacher.path={other}")
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


def test_open_cache_gives_a_cached_teacher_of_the_training_rows(setup):
    root, _, config = setup
    teacher, train = opened(config)
    try:
        assert teacher.mode == "sample"
        np.testing.assert_array_equal(teacher.hashes, train.row_hashes())
        rows = np.array([5, 0, 17, 5])  # any order, repeats allowed
        fields = teacher.host_fields(rows)
        assert list(fields) == [SOFT_TARGETS]
        with CacheReader(root / "cache") as reader:
            expected = reader.read(rows)
        assert sorted(fields[SOFT_TARGETS]) == sorted(expected) == ["counts", "entropy", "ids"]
        for key, value in expected.items():
            np.testing.assert_array_equal(fields[SOFT_TARGETS][key], value, err_msg=key)
        targets = teacher.soft_targets(None, fields)
        assert isinstance(targets, Sampled)
        np.testing.assert_array_equal(targets.counts, expected["counts"])
    finally:
        teacher.close()


def test_open_cache_without_a_teacher_run_checks_the_rest(setup):
    _, _, config = setup
    teacher, _ = opened(config, ["teacher.path="])
    teacher.close()
    with pytest.raises(CacheError, match=r"was built with a different packing"):
        opened(config, ["teacher.path=", "data.seq_len=24"])


def test_host_fields_checks_every_row_against_its_data_row(setup):
    root, _, config = setup
    teacher, _ = opened(config)
    try:
        teacher.hashes = teacher.hashes.copy()
        teacher.hashes[9] ^= np.uint64(1)  # as if data row 9 were another row
        teacher.host_fields(np.array([3, 8, 10]))  # the others still read
        with pytest.raises(CacheError, match=r"cache row 9 does not match data row 9: the "
                                             r"cache at .* was built from other data"):
            teacher.host_fields(np.array([3, 9, 10]))
    finally:
        teacher.close()


def test_open_cache_refuses_a_missing_shard(setup, tmp_path):
    root, _, config = setup
    cache_dir = shutil.copytree(root / "cache", tmp_path / "cache")
    (cache_dir / "shards" / "000004.kdc").unlink()
    with pytest.raises(CacheError, match=r"000004.kdc \(rows 32-39\) is missing"):
        opened(config, [f"cache.dir={cache_dir}"])


def _manifest(mode: str, temperature: float) -> dict:
    return {"mode": mode, "params": {"temperature": temperature}}


@pytest.mark.parametrize("mode, loss, message", [
    ("topk", LossConfig(divergence="mse"),
     "cache /c (topk): loss.divergence 'mse' compares logits over the whole vocabulary and is "
     "not defined for top-k targets"),
    ("sample", LossConfig(divergence="jsd"),
     "cache /c (sample): loss.divergence 'jsd' cannot be estimated from sampled targets"),
    ("topk", LossConfig(temperature=1.0),
     "cache /c (topk) holds the teacher at temperature 2.0; loss.temperature must be the same "
     "(got 1.0): rebuild the cache with cache.temperature=1.0"),
    ("sample", LossConfig(temperature=3.0),
     "cache /c (sample) holds the teacher at temperature 2.0; loss.temperature must be the "
     "same (got 3.0)"),
])
def test_check_loss_refuses_what_the_targets_cannot_serve(mode, loss, message):
    with pytest.raises(ConfigError) as err:
        check_loss(loss, _manifest(mode, 2.0), "/c")
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("mode, loss", [
    ("topk", LossConfig(divergence="reverse_kl", temperature=2.0)),
    ("topk", LossConfig(divergence="tvd", temperature=2.0)),
    ("sample", LossConfig(divergence="forward_kl", temperature=2.0)),
    # Full log-probabilities serve every divergence at any temperature (re-tempered exactly).
    ("full", LossConfig(divergence="mse", temperature=4.0)),
    ("full", LossConfig(divergence="jsd", temperature=0.5)),
])
def test_check_loss_accepts_what_the_targets_serve(mode, loss):
    check_loss(loss, _manifest(mode, 1.0 if mode == "full" else 2.0), "/c")
