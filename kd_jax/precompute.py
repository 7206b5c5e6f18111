"""`kd-jax precompute`: run the teacher once over the training rows and cache its targets.

The teacher is sharded as in training (`mesh.teacher_layout`), across all devices and
processes. Every process owns the shards i with i % P == p that are not written yet; each step
it feeds one chunk of one of its shards as its share of the global batch, so every row is
computed at the same place of the same kind of batch whatever else runs beside it, and a shard's
bytes depend only on the data and the teacher. A background thread packs and writes each shard
once all its rows are back (write, then rename): a killed precompute restarts where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax import cache as cache_lib
from kd_jax import cache_store
from kd_jax import data as data_lib
from kd_jax.config import Config, ConfigError


def _chunks(manifest: dict[str, Any], shards: list[int], rows_per_step: int
            ) -> list[tuple[int, np.ndarray]]:
    """(shard, rows) chunks of at most `rows_per_step` rows; a chunk never spans two shards."""
    chunks = []
    for shard in shards:
        first, stop = cache_store.shard_rows(manifest, shard)
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
        first, stop = cache_store.shard_rows(self.manifest, shard)
        if rows[-1] == stop - 1:  # the shard's last chunk: all of it is here
            parts = self._parts.pop(shard)
            arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
            self._queue.put((shard, arrays, self.hashes[first:stop]))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    cache_store.write_shard(self.cache_dir, self.manifest, *item)
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


def precompute(cfg: Config) -> dict[str, Any]:
    """Build (or finish) the cache `cfg.cache.dir` from the teacher `cfg.teacher.path`."""
    from kd_jax import loop

    if cfg.teacher.source != "checkpoint":
        raise ConfigError("kd-jax precompute needs teacher.source=checkpoint and teacher.path "
                          f"(got teacher.source={cfg.teacher.source})")
    if not cfg.cache.dir:
        raise ConfigError("kd-jax precompute needs cache.dir, where the cache is written")
    run_data = loop.prepare_data(cfg)
    tokenizer, train = run_data.tokenizer, run_data.train
    teacher_step = loop.teacher_step(cfg)

    from kd_jax import sharding

    sharding.initialize_distributed(cfg.distributed)

    import jax

    from kd_jax import targets as targets_lib

    mesh = sharding.make_mesh(cfg.mesh)
    rows_per_step = cfg.cache.batch_size or cfg.train.batch_size
    batch_sharding = sharding.batch_sharding(mesh, rows_per_step, what="cache.batch_size")
    positions = sharding.batch_positions(batch_sharding, rows_per_step)
    teacher, teacher_params, teacher_cfg = loop.load_teacher(cfg, tokenizer, mesh)
    if teacher_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({teacher_cfg.vocab_size}) is smaller than "
                          f"the tokenizer's ({tokenizer.vocab_size})")

    hashes = cache_lib.train_row_hashes(train)
    manifest = cache_store.make_manifest(
        cfg.cache.mode, cache_lib.manifest_params(cfg), vocab_size=tokenizer.vocab_size,
        seq_len=cfg.data.seq_len, n_rows=train.n_rows, rows_per_shard=cfg.cache.rows_per_shard,
        fingerprints=cache_lib.fingerprints(
            cfg, tokenizer, train, cache_lib.teacher_fingerprint(cfg.teacher.path,
                                                                 teacher_step)),
        value_dtype=cfg.cache.value_dtype)
    cache_dir = cfg.cache.dir
    if (Path(cache_dir) / cache_store.MANIFEST_NAME).is_file():
        # Every process refuses a cache built from something else (none waits for another).
        cache_store.create_manifest(cache_dir, manifest)
    if jax.process_index() == 0:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_store.create_manifest(cache_dir, manifest)  # or accept the identical one there
    _barrier("manifest")

    shards = cache_store.shards_to_write(cache_dir, manifest, jax.process_index(),
                                         jax.process_count())
    chunks = _chunks(manifest, shards, len(positions))
    # Every process runs the same number of steps; one with less left feeds padding.
    steps = _max_over_processes(len(chunks))

    valid_vocab, c = tokenizer.vocab_size, cfg.cache

    def targets_fn(params, batch, rows_b):
        logits = teacher.logits(params, batch)
        if c.mode == "topk":
            return targets_lib.topk_targets(logits, c.k, temperature=c.temperature,
                                            valid_vocab=valid_vocab)
        if c.mode == "sample":
            keys = targets_lib.row_keys(c.seed, rows_b)
            return targets_lib.sample_targets(logits, keys, c.draws, temperature=c.temperature,
                                              valid_vocab=valid_vocab)
        return {"logprobs": targets_lib.full_targets(logits, temperature=1.0,
                                                     valid_vocab=valid_vocab)}

    seq_len = cfg.data.seq_len

    def global_batch(rows: np.ndarray) -> tuple[dict, Any]:
        padded = np.zeros(len(positions), dtype=np.int64)
        padded[:len(rows)] = rows
        local = {key: getattr(train, key)[padded].astype(np.int32)
                 for key in data_lib.BATCH_KEYS}
        place = lambda value, shape: jax.make_array_from_process_local_data(  # noqa: E731
            batch_sharding, value, shape)
        batch = {key: place(value, (rows_per_step, seq_len)) for key, value in local.items()}
        return batch, place(padded.astype(np.int32), (rows_per_step,))

    compiled = jax.jit(targets_fn, out_shardings=batch_sharding).lower(
        teacher_params, *global_batch(np.zeros(0, np.int64))).compile()

    from tqdm import tqdm

    main_process = jax.process_index() == 0
    bar = tqdm(total=steps * rows_per_step * seq_len, unit="tok", unit_scale=True,
               disable=not (cfg.train.progress and main_process), dynamic_ncols=True,
               leave=False)
    writer = _ShardWriter(cache_dir, manifest, hashes)
    started = time.perf_counter()
    def collect(shard, rows, out) -> None:
        if shard is not None:  # not a step of padding only
            writer.add(shard, rows, {key: sharding.process_local_rows(value)[:len(rows)]
                                     for key, value in out.items()})
        bar.update(rows_per_step * seq_len)

    pending = None  # the previous step's outputs, still being computed
    try:
        for step in range(steps):
            shard, rows = chunks[step] if step < len(chunks) else (None, np.zeros(0, np.int64))
            out = compiled(teacher_params, *global_batch(rows))  # dispatched, not waited for
            if pending is not None:
                collect(*pending)  # the host fetches and packs step - 1 while step runs
            pending = (shard, rows, out)
        if pending is not None:
            collect(*pending)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - started
    _barrier("shards")
    summary = {"cache_dir": str(cache_dir), "mode": cfg.cache.mode,
               "shards_written": writer.written, "shards": cache_store.n_shards(manifest),
               "rows": train.n_rows, "tokens_per_second":
                   steps * rows_per_step * seq_len / seconds if steps else None}
    if main_process:
        summary["bytes_per_token"] = cache_store.disk_bytes_per_token(cache_dir)
    return summary


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"kd_jax precompute {name}")


def _max_over_processes(value: int) -> int:
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))
