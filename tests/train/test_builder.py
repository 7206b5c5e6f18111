"""The run builder: `build(cfg, mode)` gives each mode what it needs and nothing more, writes
nothing, and refuses a teacher the mode cannot use.

On the session's tiny teacher (tests/conftest.py) and a top-k cache of it built once here.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from kd_jax import checkpoint, cli
from kd_jax import config as config_lib
from kd_jax.cache.reader import CacheReader
from kd_jax.config import ConfigError
from kd_jax.data.packing import BATCH_KEYS
from kd_jax.losses.soft_targets import TopK
from kd_jax.teacher.cached import SOFT_TARGETS, CachedTeacher
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.train.builder import build
from tests.helpers import distill_config

K = 4  # the cache's top-k


@pytest.fixture(scope="module")
def setup(teacher_run, tmp_path_factory):
    """(root, config, teacher_dir): a distillation config naming the session's teacher, and a
    top-k cache of it in root/cache (cache.dir in the config)."""
    root = tmp_path_factory.mktemp("builder")
    teacher_root, corpus = teacher_run
    config = distill_config(root / "distill.yaml", corpus, teacher_root / "teacher",
                            root / "unused", f"cache:\n  dir: {root / 'cache'}\n  mode: topk\n"
                                             f"  k: {K}\n  batch_size: 4\n")
    assert cli.main(["precompute", str(config)]) == 0
    return root, config, teacher_root / "teacher"


def snapshot(*directories: Path) -> dict[str, tuple[int, int]]:
    """Every path under `directories` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for directory in directories for p in [directory, *directory.rglob("*")]
            if p.exists()}


def build_watched(setup, tmp_path, mode, overrides=()):
    """`build(cfg, mode)` for the config with `overrides`, checking that it writes nothing: not
    the run directory (tmp_path/run), not the tmp tree, the cache or the teacher run."""
    root, config, teacher_dir = setup
    run_dir = tmp_path / "run"
    cfg = config_lib.load(config, [f"train.run_dir={run_dir}", *overrides])
    watched = (tmp_path, root, teacher_dir.parent)
    before = snapshot(*watched)
    built = build(cfg, mode)
    assert snapshot(*watched) == before
    assert not run_dir.exists()
    return built


def assert_student(built, *, trains: bool) -> None:
    """A student, placed; with `trains`, its optimizer, training state and batch rows too."""
    assert built.student is not None
    assert jax.tree.structure(built.param_shardings) == jax.tree.structure(built.abstract_params)
    assert built.logits_sharding is not None and built.eval_placement.rows == 8 // 2
    training = (built.tx, built.schedule, built.abstract_state, built.state_shardings,
                built.batches)
    if trains:
        assert all(part is not None for part in training)
        assert built.placement.rows == 8
        assert jax.tree.structure(built.abstract_state.params) == jax.tree.structure(
            built.abstract_params)
    else:
        assert all(part is None for part in training)


@pytest.mark.parametrize("teacher", ["checkpoint", "none", "cache"])
def test_train_has_no_step_teacher(setup, tmp_path, teacher):
    overrides = {"checkpoint": [], "none": ["teacher.source=none", "teacher.path="],
                 # Training on hard labels does not read a cache: not even one that is not there.
                 "cache": ["teacher.source=cache", "teacher.path=",
                           f"cache.dir={tmp_path / 'nowhere'}"]}[teacher]
    built = build_watched(setup, tmp_path, "train", overrides)
    assert built.mode == "train"
    assert_student(built, trains=True)
    # A teacher named in a train config is loaded to be evaluated beside, never trained against.
    assert built.teacher is None and built.teacher_params is None
    assert (built.loaded_teacher is not None) == (teacher == "checkpoint")
    batch = built.host_batch(0)
    assert sorted(batch) == sorted(BATCH_KEYS)
    assert all(value.shape == (8, 32) for value in batch.values())


def test_distill_with_an_online_teacher(setup, tmp_path):
    _, _, teacher_dir = setup
    built = build_watched(setup, tmp_path, "distill")
    assert_student(built, trains=True)
    assert isinstance(built.teacher, OnlineTeacher)
    loaded = built.loaded_teacher
    assert built.teacher.model is loaded.model and built.teacher_params is loaded.params
    assert loaded.run_dir == str(teacher_dir) and loaded.step == checkpoint.latest_step(
        teacher_dir)
    assert loaded.config.d_model == 32
    assert sorted(built.host_batch(0)) == sorted(BATCH_KEYS)  # the teacher runs in the step


@pytest.mark.parametrize("teacher_named", [True, False])
def test_distill_from_a_cache(setup, tmp_path, teacher_named):
    root, _, _ = setup
    overrides = ["teacher.source=cache"] + ([] if teacher_named else ["teacher.path="])
    built = build_watched(setup, tmp_path, "distill", overrides)
    try:
        assert_student(built, trains=True)
        assert isinstance(built.teacher, CachedTeacher) and built.teacher.mode == "topk"
        assert built.teacher_params is None  # the step runs no teacher
        # A teacher run named beside the cache is evaluated beside the student.
        assert (built.loaded_teacher is not None) == teacher_named
        step = 3
        batch = built.host_batch(step)
        assert sorted(batch) == sorted([*BATCH_KEYS, SOFT_TARGETS])
        soft = batch[SOFT_TARGETS]
        assert sorted(soft) == ["ids", "logprobs", "tail"]
        assert soft["ids"].shape == soft["logprobs"].shape == (8, 32, K)
        assert soft["tail"].shape == (8, 32)
        rows = built.batches.rows(step, built.placement.positions)
        with CacheReader(root / "cache") as reader:
            expected = reader.read(rows)
        for key, value in expected.items():
            np.testing.assert_array_equal(soft[key], value, err_msg=key)
        np.testing.assert_array_equal(batch["tokens"], built.batches.take(rows)["tokens"])
        assert isinstance(built.teacher.soft_targets(None, batch), TopK)
    finally:
        built.close()


def test_eval_has_a_student_and_no_optimizer(setup, tmp_path):
    built = build_watched(setup, tmp_path, "eval")
    assert_student(built, trains=False)
    assert built.teacher is None and built.teacher_params is None  # no step to run
    assert built.loaded_teacher is not None  # evaluated beside the student


def test_precompute_has_a_teacher_and_no_student(setup, tmp_path):
    cache_dir = tmp_path / "new_cache"
    built = build_watched(setup, tmp_path, "precompute", [f"cache.dir={cache_dir}"])
    assert built.loaded_teacher is not None and built.teacher is None
    assert built.student is None and built.abstract_params is None
    assert built.param_shardings is None and built.logits_sharding is None
    assert built.tx is None and built.abstract_state is None and built.batches is None
    assert built.eval_placement is None
    assert built.placement.rows == 4  # a teacher pass: cache.batch_size, not train.batch_size
    assert not cache_dir.exists()


@pytest.mark.parametrize("mode, overrides, message", [
    ("distill", ["teacher.source=none", "teacher.path="],
     "kd-jax distill needs teacher.source: checkpoint or hf (with teacher.path), or cache "
     "(with cache.dir), or a teachers: list"),
    ("precompute", ["cache.dir="], "kd-jax precompute needs cache.dir, where the cache is "
                                   "written"),
    ("precompute", ["teacher.source=cache"],
     "kd-jax precompute needs teacher.source checkpoint or hf, and teacher.path (got "
     "teacher.source=cache)"),
    ("precompute", ["teacher.source=none", "teacher.path="],
     "kd-jax precompute needs teacher.source checkpoint or hf, and teacher.path (got "
     "teacher.source=none)"),
])
def test_a_mode_without_the_teacher_it_needs_is_refused(setup, tmp_path, mode, overrides,
                                                        message):
    root, config, teacher_dir = setup
    cfg = config_lib.load(config, [f"train.run_dir={tmp_path / 'run'}", *overrides])
    watched = (tmp_path, root, teacher_dir.parent)
    before = snapshot(*watched)
    with pytest.raises(ConfigError) as err:
        build(cfg, mode)
    assert str(err.value) == message
    assert snapshot(*watched) == before


def test_an_unknown_mode_is_refused(setup):
    _, config, _ = setup
    with pytest.raises(ValueError, match="mode must be one of train, distill, eval, "
                                         "precompute, got 'serve'"):
        build(config_lib.load(config), "serve")
