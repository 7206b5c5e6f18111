"""Fixtures shared by the whole suite; the plain helpers they use are in tests/helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# XLA compiles the same small programs many times over in one run of the suite (a run and its
# resumption, each process of a multi-process job, each test's own jit): a compilation cache
# for this session only (subprocesses inherit it) turns the repeats into reads. Set before JAX
# is imported, so that every process reads it from the environment. The process that made it
# removes it when it exits; one that inherited it (a worker, a subprocess) leaves it be.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# Kept from 20 ms on: the single operations JAX compiles when code runs op by op (a test's
# eager gradients, a run's start-up) take 20-50 ms each, hundreds of them, and every worker and
# subprocess compiled them again; read back they take a fraction of that (tests/losses/
# test_soft_targets.py alone: 42 s of CPU in a second process at 0.2 s, 15 s at 0.02 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.02")

# What kd_jax caches per machine (vocabulary maps) goes to the session's own directory, not the
# user's ~/.cache.
if "KD_JAX_CACHE" not in os.environ:
    os.environ["KD_JAX_CACHE"] = tempfile.mkdtemp(prefix="kd_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["KD_JAX_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

from kd_jax.parallel.cpu import keep_cpu_step_memory  # noqa: E402

# As the CLI does, before JAX starts: the suite's steps keep their memory mapped between steps.
keep_cpu_step_memory()

from tests.helpers import STUDENT, TEACHER, distill_config, write_config, write_corpus  # noqa: E402

# No test may reach the network: Hugging Face libraries read only what is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models():
    """(student, student params, teacher, teacher params): the tiny models of tests/helpers.py."""
    from kd_jax.models.pure import init_model

    student, student_params = init_model(STUDENT)
    teacher, teacher_params = init_model(TEACHER)
    return student, student_params, teacher, teacher_params


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """(root, corpus): a tiny byte-level teacher trained through the CLI in root/teacher, once
    for the whole session. Tests read it; none may write into it."""
    from kd_jax import cli

    root = tmp_path_factory.mktemp("teacher_run")
    corpus = write_corpus(root / "corpus.txt")
    config = write_config(root / "teacher.yaml", corpus, root / "teacher")
    assert cli.main(["train", str(config)]) == 0
    return root, corpus


@pytest.fixture(scope="session")
def sampled_cache(teacher_run, tmp_path_factory):
    """(root, corpus, config): a distillation config naming the session's teacher, and a sampled
    cache of it (12 draws, shards of 8 rows) precomputed once into root/cache, its cache.dir.
    Tests read it; one that damages or extends a cache copies it first."""
    from kd_jax import cli

    root = tmp_path_factory.mktemp("sampled_cache")
    teacher_root, corpus = teacher_run
    config = distill_config(
        root / "distill.yaml", corpus, teacher_root / "teacher", root / "unused",
        f"cache:\n  dir: {root / 'cache'}\n  mode: sample\n  rows_per_shard: 8\n"
        "  batch_size: 8\n")
    assert cli.main(["precompute", str(config)]) == 0
    return root, corpus, config


@pytest.fixture(scope="session")
def hf_pair(tmp_path_factory):
    """(root, corpus, teacher, student): Hugging Face checkpoints made by transformers, read
    only. A qwen2 teacher with 224 embedding rows and a smaller qwen2 student with 208, sharing
    one tokenizer of 200 ids (the rows past it are padding on both sides, as Qwen2.5-7B's
    152,064 against 0.5B's 151,936)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.helpers import write_tokenizer
    from tests.hf_checkpoints import make_checkpoint, with_tokenizer

    root = tmp_path_factory.mktemp("hf_pair")
    corpus = write_corpus(root / "corpus.txt")
    tokenizer = write_tokenizer(root / "tokenizer.json", corpus)
    teacher = with_tokenizer(make_checkpoint(root / "teacher", "qwen2", vocab_size=224,
                                             hidden_size=48, num_attention_heads=4), tokenizer)
    student = with_tokenizer(make_checkpoint(root / "student", "qwen2", seed=1, vocab_size=208,
                                             num_hidden_layers=1), tokenizer)
    return root, corpus, teacher, student
