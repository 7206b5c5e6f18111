"""Shared test material: tiny models and batches, a real corpus, configs, subprocess runners.

Plain functions and constants, importable from tests and from the scripts tests run in
subprocesses (`tests/parallel/sharding_worker.py`); fixtures built from them are in conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from kd_jax.config import LossConfig, ModelConfig

# float32 throughout: tolerances set once from the dtype.
RTOL, ATOL_FRACTION = 1e-5, 1e-6
VALID_VOCAB = 50  # the tiny models have 64 embedding rows; rows 50..63 are padding
# XLA's backend (LLVM) optimizations off: a third to a half of the compile time of the tiny
# models' steps, float32 all the same (results may differ from an optimized build's in the last
# bits); for results compared with results computed the same way, or with references at the
# tolerances above (`fast_jit`, `cli_env`).
FAST_COMPILE = {"xla_backend_optimization_level": 0}

STUDENT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=32, seed=1)
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96,
                      max_seq_len=32, seed=2)
LOSS = LossConfig(divergence="forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.3)


def make_batch(seed: int, batch: int = 8, seq: int = 16) -> dict[str, np.ndarray]:
    """Random tokens and labels below VALID_VOCAB; two packed documents a row, then padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VALID_VOCAB, (batch, seq), dtype=np.int32)
    labels = rng.integers(0, VALID_VOCAB, (batch, seq), dtype=np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[:, seq // 2:] = 2
    positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(
        batch, 0).astype(np.int32)
    for row in range(batch):
        pad = rng.integers(0, seq // 2)
        if pad:
            segment_ids[row, -pad:] = 0
            positions[row, -pad:] = 0
    loss_mask = (segment_ids > 0).astype(np.int32)
    return {"tokens": tokens, "labels": labels, "positions": positions,
            "segment_ids": segment_ids, "loss_mask": loss_mask}


def fast_jit(fn):
    """`fn` jitted with FAST_COMPILE: the tiny models' loss and gradients compiled in a third of
    the default time, and then run in a fraction of what dispatching them op by op takes."""
    import jax

    return jax.jit(fn, compiler_options=FAST_COMPILE)


def assert_trees_close(actual, expected, rtol: float = RTOL, atol_fraction: float = ATOL_FRACTION):
    """Leaf by leaf: relative `rtol`, absolute `atol_fraction` of the expected leaf's largest."""
    import jax

    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_fraction * np.abs(e).max())


# --------------------------------------------------------------------------- CLI runs

TINY_MODEL = """
model:
  vocab_size: 256
  d_model: 32
  n_layers: 2
  n_heads: 4
  n_kv_heads: 2
  d_ff: 64
  max_seq_len: 64
"""


def write_corpus(path: Path) -> Path:
    """Real text that is always there: a few modules of the standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("this.py", "bisect.py", "heapq.py"))
    path.write_text(text)
    return path


def write_config(path: Path, corpus: Path, run_dir: Path, extra: str = "") -> Path:
    """A tiny byte-level experiment on `corpus`: 6 steps of 8 x 32 tokens, 2 microbatches."""
    path.write_text(TINY_MODEL + f"""
data:
  source: text
  path: {corpus}
  tokenizer: byte
  seq_len: 32
  heldout_fraction: 0.1
train:
  run_dir: {run_dir}
  steps: 6
  batch_size: 8
  microbatches: 2
  log_every: 1
  checkpoint_every: 3
  eval_sequences: 8
  progress: false
optimizer:
  lr: 1e-3
  warmup_steps: 2
""" + extra)
    return path


def distill_config(path: Path, corpus: Path, teacher_dir: Path, run_dir: Path,
                   extra: str = "") -> Path:
    """A distill config naming `teacher_dir`, with a hard-label term: the loss is then O(1), so
    comparisons of losses compare the step, not the cancellation noise of a near-zero KL."""
    teacher = (f"teacher:\n  source: checkpoint\n  path: {teacher_dir}\n"
               "loss:\n  ce_weight: 1.0\n")
    return write_config(path, corpus, run_dir, teacher + extra)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; later lines win (a resumed run's values)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def write_tokenizer(path: Path, corpus: Path) -> Path:
    """A word-piece BPE tokenizer.json of 200 ids trained on `corpus` (not the byte tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=200,
                                                       special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


def run_cli(args: list[str], **options) -> subprocess.Popen:
    """`kd-jax ARGS` in a subprocess, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "kd_jax.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **options)


# ------------------------------------------------------------------ several devices, processes

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.student_layout=fsdp_tensor",
        "mesh.teacher_layout=fsdp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(devices: int, fast_compile: bool = False) -> dict[str, str]:
    """The environment of a subprocess with `devices` host-platform CPU devices; with
    `fast_compile`, XLA's backend optimizations off (about half the compile time), for runs
    compared only with runs made the same way."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    if fast_compile:
        flags += "".join(f" --{name}={value}" for name, value in FAST_COMPILE.items())
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def start_two_processes(command: str, config: Path, overrides: list[str],
                        fast_compile: bool = False) -> list[subprocess.Popen]:
    """`kd-jax COMMAND CONFIG` as one job of 2 processes with 4 CPU devices each, on MESH."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "kd_jax.cli", command, str(config), *MESH, *overrides,
             "distributed.enabled=true", f"distributed.coordinator=127.0.0.1:{port}",
             "distributed.num_processes=2", f"distributed.process_id={index}",
             "distributed.timeout_s=120"],
            env=cli_env(4, fast_compile), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        for index in range(2)]
