"""Token store: the data tokenized once into files that are memory-mapped and read a few rows at
a time, so start-up time and memory do not grow with the corpus.

A store holds token streams, not rows: each row is derived when read (`packing.derive_rows`)
from the stream and a pair index, the same rows `packing.pack` builds in memory. A directory:

    prepare.json            what is being prepared (tokenizer, data, shard size); written first
    p0-00000.tokens.npy     part 0 (data.split), shard 0: its documents' ids back to back
    p0-00000.lengths.npy    int64 [documents]: each document's token count
    p0-00000.untrained.npy  int64 [spans, 2]: token ranges of the shard never trained on as labels
    p0-00000.json           the shard's counts; written last, so it marks the shard whole
    p0.json                 the part is tokenized whole: its shard count
    p1-...                  part 1 (data.heldout_split or data.heldout_path), when there is one
    train.token_starts.npy  int64 [documents]: the split's packed documents in the token stream,
    train.pair_starts.npy   and in the pair stream (the pair index)
    train.hashes.npy        uint64 [rows]: `row_hashes` of each row, checked at every read
    heldout.*               the same for the held-out split
    untrained.starts.npy    the untrained spans of every shard, in the whole token stream
    untrained.ends.npy
    manifest.json           written last: without it a store is still being prepared

Every file is written under a temporary name and renamed, so a kill leaves whole files only;
`kd_jax.data.prepare` writes a store, this module reads one. numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.packing import PairIndex, derive_rows, document_starts, row_hashes
from kd_jax.data.sources import data_files
from kd_jax.data.tokenizers import Tokenizer

VERSION = "kd_jax.store/1"
MANIFEST = "manifest.json"
PREPARING = "prepare.json"
SPLITS = ("train", "heldout")


class StoreError(ConfigError):
    """A token store that cannot be used as it is: one line, naming the store."""


def identity(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    """What a store's contents depend on, by config key: its tokenizer, its data, its packing.

    Local files are identified by path, size and modification time (hashing a large corpus
    at every start would cost a full read); the stdlib source by the interpreter version.
    """
    data: dict[str, Any] = {"data.source": cfg.source, "data.path": cfg.path,
                            "data.name": cfg.name, "data.split": cfg.split,
                            "data.heldout_split": cfg.heldout_split}
    if cfg.heldout_path:  # absent otherwise: stores prepared before it stay valid
        data["data.heldout_path"] = cfg.heldout_path
    for key in ("text_column", "prompt_column", "response_column", "messages_column"):
        if getattr(cfg, key):
            data[f"data.{key}"] = getattr(cfg, key)
    if cfg.messages_column:
        data["data.text_column"] = None  # unused: the messages column is read instead
    data["data.add_bos"] = list(tokenizer.document_prefix) if cfg.add_bos else []
    if cfg.source == "stdlib":
        data["python"] = platform.python_version()
    elif cfg.source != "hub":
        data["files of data.path"] = [
            [file, os.stat(file).st_size, os.stat(file).st_mtime_ns] for file in data_files(cfg)]
        if cfg.heldout_path:
            data["files of data.heldout_path"] = [
                [file, os.stat(file).st_size, os.stat(file).st_mtime_ns]
                for file in data_files(cfg, heldout=True)]
    packing: dict[str, Any] = {"data.seq_len": cfg.seq_len,
                               "data.max_documents": cfg.max_documents}
    if not (cfg.heldout_split or cfg.heldout_path):
        packing.update({"data.heldout_fraction": cfg.heldout_fraction, "data.seed": cfg.seed})
    return {"tokenizer": {"data.tokenizer": tokenizer.fingerprint}, "data": data,
            "packing": packing}


def tokens_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_prepared(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def check_identity(directory: str | Path, recorded: dict, expected: dict, what: str) -> None:
    """Refuse a store prepared from something else, naming the setting that differs."""
    for part, noun in (("tokenizer", "another tokenizer"), ("data", "other data"),
                       ("packing", "another packing")):
        if part not in expected:
            continue
        there, here = recorded.get(part, {}), expected[part]
        for key in sorted(set(there) | set(here)):
            if there.get(key) != here.get(key):
                detail = ("its files changed since (size or modification time)"
                          if key == "files of data.path"
                          else f"{key}: {_short(there.get(key))} there, {_short(here.get(key))} "
                               "now")
                raise StoreError(f"data.store '{directory}' {what} {noun} ({detail}); use "
                                 "another data.store, or delete this one to prepare it again")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: Path, directory: str | Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"data.store '{directory}': cannot read {path.name} "
                         f"({type(err).__name__}); delete the store to prepare it again") from None


def load_array(directory: Path, name: str) -> np.ndarray:
    """A store's array, memory-mapped (nothing is read until it is indexed)."""
    try:
        return np.load(directory / name, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StoreError(f"data.store '{directory}': cannot read {name} "
                         f"({type(err).__name__}); delete the store to prepare it again") from None


class TokenStream:
    """The shards' token ids as one stream, memory-mapped."""

    def __init__(self, directory: Path, shards: list[dict]):
        self.directory = directory
        self.tokens = [load_array(directory, shard["file"]) for shard in shards]
        counts = np.array([shard["tokens"] for shard in shards], dtype=np.int64)
        self.shard_starts = np.cumsum(counts) - counts

    def read(self, at: np.ndarray) -> np.ndarray:
        """The stream's ids at int64 indices `at` (any shape), read from the shards' maps."""
        flat = np.asarray(at, dtype=np.int64).reshape(-1)
        shard = np.searchsorted(self.shard_starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int32)
        for s in np.unique(shard):
            here = shard == s
            out[here] = self.tokens[s][flat[here] - self.shard_starts[s]]
        return out.reshape(np.shape(at))


class TokenStore:
    """A prepared store, memory-mapped: nothing but its manifest is read when it opens."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_json(self.directory / MANIFEST, directory)
        if self.manifest.get("version") != VERSION:
            raise StoreError(f"data.store '{directory}' has format "
                             f"{self.manifest.get('version')!r}, not {VERSION}; prepare it again")
        self.stream = TokenStream(self.directory, self.manifest["shards"])
        self.untrained = (load_array(self.directory, "untrained.starts.npy"),
                          load_array(self.directory, "untrained.ends.npy"))

    def split(self, name: str) -> StoreRows:
        return StoreRows(self, name)


class StoreRows:
    """One split's packed rows, read from a `TokenStore` a few at a time (`packing.Rows`).

    Every read checks each row against the hash recorded when the store was prepared, so a
    damaged store fails loudly instead of training on other tokens.
    """

    def __init__(self, store: TokenStore, split: str):
        info = store.manifest["splits"][split]
        self.store = store
        self.split_name = split
        directory = store.directory
        self.index = PairIndex(token_starts=load_array(directory, f"{split}.token_starts.npy"),
                               pair_starts=load_array(directory, f"{split}.pair_starts.npy"),
                               n_pairs=int(info["pairs"]), seq_len=int(store.manifest["seq_len"]))
        self.hashes = load_array(directory, f"{split}.hashes.npy")
        self.trained_tokens = int(info["trained_tokens"])
        self.rows_read = 0  # how many rows this process has read: it reads only its own

    @property
    def n_rows(self) -> int:
        return self.index.n_rows

    @property
    def seq_len(self) -> int:
        return self.index.seq_len

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        arrays = derive_rows(self.index, rows, self.store.stream.read, self.store.untrained)
        got = row_hashes(arrays["tokens"], arrays["segment_ids"], arrays["loss_mask"])
        bad = np.flatnonzero(got != self.hashes[rows])
        if len(bad):
            raise StoreError(f"data.store '{self.store.directory}': {self.split_name} row "
                             f"{rows[bad[0]]} does not match its recorded hash: the store is "
                             "damaged; delete it to prepare it again")
        self.rows_read += len(rows)
        return arrays

    def document_starts(self, rows: np.ndarray) -> np.ndarray:
        return document_starts(self.index, rows)

    def row_hashes(self) -> np.ndarray:
        return self.hashes


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read a few MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_store(directory: str | Path, on_rows: Callable[[int], None] = lambda count: None,
                 workers: int | None = None, block_tokens: int = 1 << 20) -> dict[str, int]:
    """Read every row of a prepared store and check it against its recorded hash, blocks of
    rows on `workers` threads (numpy's gathers and the hashing release the interpreter's lock
    for most of the work); `on_rows(count)` after each block. Returns the rows and shards
    checked; StoreError naming the first damaged row or file."""
    store = TokenStore(directory)
    for shard, tokens in zip(store.manifest["shards"], store.stream.tokens):
        if len(tokens) != shard["tokens"]:
            raise StoreError(f"data.store '{directory}': {shard['file']} holds {len(tokens):,} "
                             f"tokens, not {shard['tokens']:,}: the store is damaged; delete "
                             "it to prepare it again")

    def check_file(shard: dict) -> None:
        if "sha256" in shard and file_sha256(store.directory / shard["file"]) != shard["sha256"]:
            raise StoreError(f"data.store '{directory}': {shard['file']} does not match its "
                             "recorded sha256: the store is damaged; delete it to prepare it "
                             "again")

    splits = [store.split(name) for name in SPLITS]
    blocks = [(rows, np.arange(first, min(first + max(1, block_tokens // rows.seq_len),
                                          rows.n_rows)))
              for rows in splits
              for first in range(0, rows.n_rows, max(1, block_tokens // rows.seq_len))]

    def check(block) -> int:
        rows, indices = block
        rows.take(indices)  # raises on a row that does not match its hash
        return len(indices)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(check_file, store.manifest["shards"]))  # stores older than the digests: none
        for count in pool.map(check, blocks):
            on_rows(count)
    return {"rows": sum(rows.n_rows for rows in splits),
            "shards": len(store.manifest["shards"])}


def open_store(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[StoreRows, StoreRows]:
    """The (train, heldout) rows of the prepared store `cfg.store`, checked against `cfg`."""
    store = TokenStore(cfg.store)
    check_identity(cfg.store, store.manifest["identity"], identity(cfg, tokenizer),
                   "was prepared with")
    return store.split("train"), store.split("heldout")
