"""`kd-jax precompute`: run the teacher once over the training rows and cache its targets.

It is the teacher's half of a distillation run, built by the same builder
(`kd_jax.train.builder`), writing the cache format of `kd_jax.cache`. The teacher is sharded as
in training (`mesh.teacher_layout`), across all devices and processes. Every process owns the
shards i with i % P == p that are not written yet; each step it feeds one chunk of one of its
shards as its share of the global batch, so every row is computed at the same place of the same
kind of batch whatever else runs beside it, and a shard's bytes depend only on the data and the
teacher. A background thread packs and writes each shard
once all its rows are back (write, then rename): a killed precompute restarts where it stopped.

A teacher with another tokenizer (`kd_jax.align`) reads rows of its own, made from each chunk's
student rows as the online teacher's are (`kd_jax.align.rows.teacher_fields`, rows of
`data.teacher_seq_len` tokens), and the cache holds, for every student position, the teacher's
targets at the teacher's aligned position, gathered onto the student's positions, in the
teacher's vocabulary, and whether the position is aligned (`kd_jax.teacher.sparse`). The cache
stays row-aligned with the student's rows (row hashes, shards and resumption as above); its
manifest records the teacher's tokenizer, which is copied into it (`kd_jax.cache.manifest`).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from kd_jax.cache import shards as shards_lib
from kd_jax.cache.fingerprints import (
    fingerprints,
    teacher_fingerprint,
)
from kd_jax.cache.manifest import (
    MANIFEST_NAME,
    TEACHER_TOKENIZER_FILE,
    copy_student_tokenizer,
    create_manifest,
    make_manifest,
    n_shards,
    shard_rows,
    write_atomically,
)
from kd_jax.config import Config, ConfigError
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import HFTokenizer, Tokenizer
from kd_jax.losses.soft_targets import vocabulary_logits
from kd_jax.parallel.hosts import (
    barrier,
    is_main_process,
    max_over_processes,
    process_local_rows,
)
from kd_jax.teacher import sparse
from kd_jax.teacher.cross import TEACHER_ROW_KEYS, teacher_feed
from kd_jax.teacher.loading import LoadedTeacher
from kd_jax.train import builder
from kd_jax.train.preemption import Preemption
from kd_jax.train.progress import log, progress_bar


def _chunks(manifest: dict[str, Any], shards: list[int], rows_per_step: int
            ) -> list[tuple[int, np.ndarray]]:
    """(shard, rows) chunks of at most `rows_per_step` rows; a chunk never spans two shards."""
    chunks = []
    for shard in shards:
        first, stop = shard_rows(manifest, shard)
        for start in range(first, stop, rows_per_step):
            chunks.append((shard, np.arange(start, min(start + rows_per_step, stop))))
    return chunks


class _ShardWriter:
    """Collects each shard's rows as they come back and writes complete shards on a thread."""

    def __init__(self, cache_dir: str, manifest: dict[str, Any], hashes: np.ndarray):
        self.cache_dir, self.manifest, self.hashes = cache_dir, manifest, hashes
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()
        self.written = 0

    def add(self, shard: int, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self._parts.setdefault(shard, []).append(values)
        first, stop = shard_rows(self.manifest, shard)
        if rows[-1] == stop - 1:  # the shard's last chunk: all of it is here
            parts = self._parts.pop(shard)
            arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
            self._queue.put((shard, arrays, self.hashes[first:stop]))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    shards_lib.write_shard(self.cache_dir, self.manifest, *item)
                    self.written += 1
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()


def manifest_params(cfg: Config) -> dict[str, Any]:
    """The cache's mode parameters, as its manifest records them."""
    c = cfg.cache
    if c.mode == "topk":
        return {"k": c.k, "temperature": c.temperature}
    if c.mode == "sample":
        return {"draws": c.draws, "temperature": c.temperature, "seed": c.seed,
                "sampler": sparse.SAMPLER}
    return {"temperature": 1.0}  # full: stored at T = 1, re-tempered exactly when training


def teacher_row_feed(cfg: Config, student: Tokenizer, train: Rows, loaded: LoadedTeacher
                     ) -> tuple[Callable[[np.ndarray, dict], dict], int]:
    """For a teacher with another tokenizer: (the function that makes a chunk's teacher rows
    and `teacher_index`, the teacher's row length), sized and tried on the first rows as the
    online teacher's are (`kd_jax.teacher.cross`), so that a teacher tokenizer that cannot
    read the text is refused before anything is written."""
    teacher = loaded.tokenizer
    if cfg.cache.mode == "sample":
        raise ConfigError(f"cache.mode sample is not available for a teacher with another "
                          f"tokenizer ({teacher.description}): its draws estimate no divergence "
                          "across two vocabularies; use cache.mode topk or full")
    teacher_seq_len, feed = teacher_feed(cfg, student, teacher, train,
                                         loaded.config.max_seq_len)
    return feed, teacher_seq_len


def precompute(cfg: Config, preemption: Preemption | None = None) -> dict[str, Any]:
    """Build (or finish) the cache `cfg.cache.dir` from the teacher `cfg.teacher.path`
    (`preemption`: as `kd_jax.train.loop.run` takes it)."""
    preemption = preemption or Preemption()
    try:
        return _precompute(cfg, preemption)
    finally:
        preemption.close()


def _precompute(cfg: Config, preemption: Preemption) -> dict[str, Any]:
    run = builder.build(cfg, "precompute")
    log(f"teacher {run.cfg.teacher.dtype}: {run.teacher_dtype_why}")
    tokenizer, train = run.data.tokenizer, run.data.train
    teacher = run.loaded_teacher
    placement = run.placement
    rows_per_step, positions = placement.rows, placement.positions

    # A teacher with another tokenizer (None: the student's) reads rows of its own.
    other = teacher.tokenizer
    feed, cross_tokenizer = None, None
    if other is not None:
        if cfg.loss.cross_vocab == "bytes":
            raise ConfigError("loss.cross_vocab bytes reads the teacher at two positions per "
                              "student position, which a cache of its targets at the aligned "
                              "one does not hold: distill from this teacher online, or cache "
                              "it for mapped, uld or hybrid")
        feed, teacher_seq_len = teacher_row_feed(cfg, tokenizer, train, teacher)
        copied = isinstance(other, HFTokenizer)  # else the byte tokenizer, which has no file
        cross_tokenizer = {"teacher_tokenizer": TEACHER_TOKENIZER_FILE if copied else "byte",
                           "teacher_seq_len": teacher_seq_len}
        log(f"teacher tokenizer {other.description}, not the student's: rows of "
            f"{teacher_seq_len} teacher tokens; cached are its targets at the student's aligned "
            "positions, in its vocabulary")

    hashes = train.row_hashes()
    manifest = make_manifest(
        cfg.cache.mode, manifest_params(cfg), vocab_size=(other or tokenizer).vocab_size,
        seq_len=cfg.data.seq_len, n_rows=train.n_rows, rows_per_shard=cfg.cache.rows_per_shard,
        fingerprints=fingerprints(cfg, tokenizer, train,
                                  teacher_fingerprint(teacher.run_dir, teacher.step), other),
        value_dtype=cfg.cache.value_dtype, cross_tokenizer=cross_tokenizer)
    cache_dir = cfg.cache.dir
    if (Path(cache_dir) / MANIFEST_NAME).is_file():
        # Every process refuses a cache built from something else (none waits for another).
        create_manifest(cache_dir, manifest)
    if is_main_process():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        create_manifest(cache_dir, manifest)  # or accept the identical one there
        if isinstance(other, HFTokenizer):  # distillation reads the teacher's tokenizer here
            write_atomically(Path(cache_dir) / TEACHER_TOKENIZER_FILE, [other.path.read_bytes()],
                             checksum=False)
        if isinstance(tokenizer, HFTokenizer):  # and `data.tokenizer: auto` the student's
            copy_student_tokenizer(cache_dir, tokenizer.path)
    barrier("precompute manifest")

    shards = shards_lib.shards_to_write(cache_dir, manifest, jax.process_index(),
                                        jax.process_count())
    chunks = _chunks(manifest, shards, len(positions))
    # Every process runs the same number of steps; one with less left feeds padding.
    steps = max_over_processes(len(chunks))

    valid_vocab, c = (other or tokenizer).vocab_size, cfg.cache
    model = teacher.model

    def mode_targets(logits, rows_b):
        if c.mode == "topk":
            return sparse.topk_targets(logits, c.k, temperature=c.temperature,
                                       valid_vocab=valid_vocab)
        if c.mode == "sample":
            keys = sparse.row_keys(c.seed, rows_b)
            return sparse.sample_targets(logits, keys, c.draws, temperature=c.temperature,
                                         valid_vocab=valid_vocab)
        return {"logprobs": sparse.full_targets(logits, temperature=1.0,
                                                valid_vocab=valid_vocab)}

    def targets_fn(params, batch, rows_b):
        if feed is None:
            return mode_targets(model.logits(params, batch), rows_b)
        # The teacher reads its rows; its logits are taken at the student's aligned positions
        # (from its hidden states there, as the online teacher's loss takes them).
        outputs = model.apply(params, {ours: batch[theirs]
                                       for theirs, ours in TEACHER_ROW_KEYS.items()})
        index_bt = batch["teacher_index"]
        hidden_btd = sparse.at_aligned_positions(outputs.hidden_btd, index_bt)
        targets = mode_targets(vocabulary_logits(hidden_btd, outputs.head_vd), rows_b)
        return sparse.aligned_only(targets, index_bt >= 0)

    def global_batch(rows: np.ndarray) -> tuple[dict, Any]:
        padded = np.zeros(len(positions), dtype=np.int64)
        padded[:len(rows)] = rows
        local = train.take(padded)
        if feed is not None:
            local.update(feed(padded, local))
        return placement.place(local), placement.place(padded.astype(np.int32))

    compiled = jax.jit(targets_fn, out_shardings=placement.sharding).lower(
        teacher.params, *global_batch(np.zeros(0, np.int64))).compile()

    seq_len = cfg.data.seq_len
    bar = progress_bar(steps * rows_per_step * seq_len, 0, cfg.train.progress, unit="tok",
                       unit_scale=True)
    writer = _ShardWriter(cache_dir, manifest, hashes)
    started = time.perf_counter()

    def collect(shard, rows, out) -> None:
        if shard is not None:  # not a step of padding only
            writer.add(shard, rows, {key: process_local_rows(value)[:len(rows)]
                                     for key, value in out.items()})
        bar.update(rows_per_step * seq_len)

    pending = None  # the previous step's outputs, still being computed
    stopped_at = None
    try:
        for step in range(steps):
            if preemption.reached(step):
                stopped_at = step
                break
            shard, rows = chunks[step] if step < len(chunks) else (None, np.zeros(0, np.int64))
            out = compiled(teacher.params, *global_batch(rows))  # dispatched, not waited for
            if pending is not None:
                collect(*pending)  # the host fetches and packs step - 1 while step runs
            pending = (shard, rows, out)
        if pending is not None:
            collect(*pending)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - started
    if stopped_at is not None:
        raise preemption.stopped(
            f"precompute stopped after {stopped_at} of {steps} teacher passes: {writer.written} "
            f"shards written whole in {cache_dir}; rerun to finish")
    barrier("precompute shards")
    summary = {"cache_dir": str(cache_dir), "mode": cfg.cache.mode,
               "shards_written": writer.written, "shards": n_shards(manifest),
               "rows": train.n_rows, "tokens_per_second":
                   steps * rows_per_step * seq_len / seconds if steps else None}
    if is_main_process():
        summary["bytes_per_token"] = shards_lib.disk_bytes_per_token(cache_dir)
    return summary
