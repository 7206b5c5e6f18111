"""Read throughput of the teacher-logit cache against an uncompressed memory-mapped copy.

    python benchmarks/cache_read.py [--rows 512] [--seq-len 1024] [--batches 100]

Writes a synthetic top-32 cache and a 12-draw sample cache (vocab 131072) in a temporary
directory, plus the same values as plain int32/float32 `.npy` files, then times decoding
random batches of 16 rows into int32/float32 arrays from each. The files were just written, so
this is a warm page cache: it measures decoding, not the disk. The ratio column says what the
bit-packing costs in read time; the bytes columns what it saves on disk. The last column is
what training pays to check each shard's sha256 the first time it reads it (once per shard per
run), in tokens of that shard checked per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kd_jax.cache.codec import fields
from kd_jax.cache.manifest import create_manifest, make_manifest, n_shards, shard_rows
from kd_jax.cache.reader import CacheReader
from kd_jax.cache.shards import disk_bytes_per_token, open_shard, write_shard
from kd_jax.teacher.sparse import SAMPLER

VOCAB = 131072
FINGERPRINTS = {"teacher": "synthetic", "tokenizer": "synthetic", "data": "synthetic",
                "packing": "synthetic"}
MODES = {"topk": {"k": 32, "temperature": 1.0},
         "sample": {"draws": 12, "temperature": 1.0, "seed": 0, "sampler": SAMPLER}}


def synthetic_shard(manifest: dict, first: int, stop: int, rng: np.random.Generator) -> dict:
    rows, seq_len = stop - first, manifest["seq_len"]
    if manifest["mode"] == "topk":
        k = manifest["params"]["k"]
        logprobs = -np.sort(rng.exponential(2.0, (rows, seq_len, k)), axis=-1)
        return {"ids": rng.integers(0, VOCAB, (rows, seq_len, k), dtype=np.int32),
                "logprobs": logprobs.astype(np.float32),
                "tail": -rng.exponential(4.0, (rows, seq_len)).astype(np.float32)}
    draws = manifest["params"]["draws"]
    return {"ids": rng.integers(0, VOCAB, (rows, seq_len, draws), dtype=np.int32),
            "counts": rng.multinomial(draws, np.full(draws, 1.0 / draws),
                                      size=(rows, seq_len)).astype(np.int32),
            "entropy": rng.exponential(2.0, (rows, seq_len)).astype(np.float32)}


def build(root: Path, mode: str, rows: int, seq_len: int) -> tuple[Path, dict, float]:
    """Write a cache and an uncompressed copy; returns (cache_dir, plain memmaps, write s)."""
    manifest = make_manifest(mode, MODES[mode], vocab_size=VOCAB, seq_len=seq_len,
                             n_rows=rows, rows_per_shard=64, fingerprints=FINGERPRINTS)
    cache_dir = root / mode
    create_manifest(cache_dir, manifest)
    plain = {}
    for field in fields(manifest):
        dtype = np.int32 if field.kind == "uint" else np.float32
        plain[field.name] = np.lib.format.open_memmap(
            root / f"{mode}_{field.name}.npy", mode="w+", dtype=dtype,
            shape=(rows, seq_len, *field.shape))
    rng = np.random.default_rng(0)
    hashes = np.arange(rows, dtype=np.uint64)  # stand-ins: no data rows to hash here
    write_seconds = 0.0
    for index in range(n_shards(manifest)):
        first, stop = shard_rows(manifest, index)
        arrays = synthetic_shard(manifest, first, stop, rng)
        start = time.perf_counter()
        write_shard(cache_dir, manifest, index, arrays, hashes[first:stop])
        write_seconds += time.perf_counter() - start
        for name, values in arrays.items():
            plain[name][first:stop] = values
    for values in plain.values():
        values.flush()
    return cache_dir, plain, write_seconds


def time_reads(read, rows: int, batch_rows: int, batches: int) -> float:
    """Seconds per batch of `batch_rows` random rows, after one warm-up batch."""
    rng = np.random.default_rng(1)
    read(rng.integers(0, rows, batch_rows))
    start = time.perf_counter()
    for _ in range(batches):
        read(rng.integers(0, rows, batch_rows))
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    tokens_per_batch = args.batch_rows * args.seq_len
    print(f"vocab {VOCAB}, {args.rows} rows x {args.seq_len} tokens, {args.batches} timed "
          f"batches of {args.batch_rows} rows ({tokens_per_batch} tokens), warm page cache")
    print(f"{'cache':22s} {'B/token':>8s} {'B/entry':>8s} {'ms/batch':>9s} {'tokens/s':>11s} "
          f"{'x plain':>8s} {'write tok/s':>12s} {'check tok/s':>12s}")
    with tempfile.TemporaryDirectory() as root:
        for mode, params in MODES.items():
            cache_dir, plain, write_seconds = build(Path(root), mode, args.rows, args.seq_len)
            entries = params.get("k", params.get("draws"))
            reader = CacheReader(cache_dir)
            cached = time_reads(reader.read, args.rows, args.batch_rows, args.batches)

            def read_plain(rows, plain=plain):
                return {name: np.asarray(values[rows]) for name, values in plain.items()}

            baseline = time_reads(read_plain, args.rows, args.batch_rows, args.batches)
            cache_bytes = disk_bytes_per_token(cache_dir)
            plain_bytes = sum(values.nbytes for values in plain.values()) / (
                args.rows * args.seq_len)
            label = f"{mode} {'k' if mode == 'topk' else 'n'}={entries}"
            write_rate = args.rows * args.seq_len / write_seconds
            start = time.perf_counter()
            for index in range(n_shards(reader.manifest)):
                open_shard(cache_dir, reader.manifest, index, verify_checksum=True)
            check_rate = args.rows * args.seq_len / (time.perf_counter() - start)
            print(f"{label + ', cache':22s} {cache_bytes:8.2f} {cache_bytes / entries:8.3f} "
                  f"{cached * 1e3:9.2f} {tokens_per_batch / cached:11,.0f} "
                  f"{cached / baseline:8.2f} {write_rate:12,.0f} {check_rate:12,.0f}")
            print(f"{label + ', plain npy':22s} {plain_bytes:8.2f} {plain_bytes / entries:8.3f} "
                  f"{baseline * 1e3:9.2f} {tokens_per_batch / baseline:11,.0f} {1.0:8.2f}")
            reader.close()


if __name__ == "__main__":
    main()
