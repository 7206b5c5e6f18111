"""`kd-jax prepare`: tokenize the configured data once into a token store (`kd_jax.data.store`).

Documents stream from the source (`sources.iter_documents`) into shards of about
`data.store_shard_mb` of text, each tokenized in one batch (a tokenizer.json encodes a batch on
every core) and written whole under a temporary name. A killed prepare resumes at the first
missing shard, skipping the documents of the shards written, and ends byte-identical to an
uninterrupted one: the shard boundaries depend only on the documents, and nothing written
depends on the time. Then the split is drawn, each split's pair index and row hashes written, and
the manifest last. numpy, the standard library, and tqdm for the progress bar.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data import store as store_lib
from kd_jax.data.packing import (
    PairIndex,
    Spans,
    derive_rows,
    index_documents,
    row_hashes,
    tokenize,
)
from kd_jax.data.sources import (
    Document,
    check_source,
    heldout_mask,
    heldout_source,
    iter_documents,
)
from kd_jax.data.tokenizers import Tokenizer

# Rows derived at once while hashing: bounds the temporaries of `derive_rows`.
_HASH_BLOCK_TOKENS = 1 << 22


def prepare(cfg: DataConfig, tokenizer: Tokenizer, progress: bool = True,
            verify: bool = False) -> dict[str, Any]:
    """Make `cfg.store` hold `cfg`'s data, tokenized and packed; a summary of what it holds.

    An existing store of the same data is kept as it is (nothing is tokenized again), and with
    `verify` read whole, every row against its recorded hash (`store.verify_store`: summary
    key `verified`, the rows checked); one of other data, another tokenizer or another packing
    is refused by name, a damaged one names its first damaged row or file.
    """
    directory = Path(cfg.store)
    expected = store_lib.identity(cfg, tokenizer)
    if store_lib.is_prepared(directory):
        started = time.perf_counter()
        recorded = store_lib.read_json(directory / store_lib.MANIFEST, directory)
        store_lib.check_identity(directory, recorded.get("identity", {}), expected,
                                 "was prepared with")
        summary = _summary(directory, recorded, prepared=False, seconds=0.0)
        if verify:
            total = sum(split["rows"] for split in recorded["splits"].values())
            with tqdm(total=total, unit="row", desc="verifying", leave=False,
                      disable=not (progress and sys.stderr.isatty())) as bar:
                summary["verified"] = store_lib.verify_store(directory, bar.update)["rows"]
            summary["seconds"] = round(time.perf_counter() - started, 2)
        return summary
    check_source(cfg)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"data.store '{directory}' is a file, not a directory")
    started = time.perf_counter()
    preparing = {"version": store_lib.VERSION, "tokenizer": expected["tokenizer"],
                 "data": expected["data"], "store_shard_mb": cfg.store_shard_mb}
    if (directory / store_lib.PREPARING).is_file():
        recorded = store_lib.read_json(directory / store_lib.PREPARING, directory)
        store_lib.check_identity(directory, recorded, preparing, "holds part of a store of")
        if recorded != preparing:
            raise store_lib.StoreError(
                f"data.store '{directory}' holds part of a store with other shard sizes "
                f"(data.store_shard_mb {recorded.get('store_shard_mb')}); delete it first")
    else:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"data.store '{directory}' cannot be created "
                              f"({err.strerror or type(err).__name__})") from None
        if any(directory.iterdir()):
            raise ConfigError(f"data.store '{directory}' is not empty and is not a token "
                              "store; choose an empty or new directory")
        write_json(directory / store_lib.PREPARING, preparing)

    # Each part a (config, split) read whole: the training source, then what is held out
    # whole (a hub split, or files), if anything is.
    parts = [(cfg, cfg.split)]
    if cfg.heldout_split:
        parts.append((cfg, cfg.heldout_split))
    elif cfg.heldout_path:
        parts.append((heldout_source(cfg), cfg.split))
    # On a terminal only: in a log, a bar is a run of carriage returns, and a refusal would
    # follow it on the same line.
    bar = tqdm(unit="B", unit_scale=True, desc="tokenizing",
               disable=not (progress and sys.stderr.isatty()),
               dynamic_ncols=True, leave=False)
    try:
        for part, (part_cfg, split) in enumerate(parts):
            _tokenize_part(part_cfg, tokenizer, directory, part, split, bar)
    finally:
        bar.close()
    manifest = _finish(cfg, tokenizer, directory, len(parts), expected)
    return _summary(directory, manifest, prepared=True, seconds=time.perf_counter() - started)


def _summary(directory: Path, manifest: dict, prepared: bool, seconds: float) -> dict[str, Any]:
    splits = manifest["splits"]
    return {"store": str(directory), "prepared": prepared, "seconds": round(seconds, 2),
            "documents": manifest["documents"], "tokens": manifest["tokens"],
            "train_rows": splits["train"]["rows"], "heldout_rows": splits["heldout"]["rows"],
            "seq_len": manifest["seq_len"]}


def write_atomic(path: Path, write) -> None:
    """`write(file)` to a temporary name beside `path`, then rename: whole or absent."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda file: file.write(
        (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()))


def write_array(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda file: np.save(file, np.ascontiguousarray(array),
                                             allow_pickle=False))


def _shard_name(part: int, shard: int) -> str:
    return f"p{part}-{shard:05d}"


def _text_bytes(doc: Document) -> int:
    texts = [text for text, _ in doc.pieces] if doc.pieces else [doc.prompt or "", doc.text]
    return sum(len(text.encode("utf-8")) for text in texts)


def _tokenize_part(cfg: DataConfig, tokenizer: Tokenizer, directory: Path, part: int,
                   split: str, bar: tqdm) -> None:
    """Write the shards of one split of the source not written yet."""
    if (directory / f"p{part}.json").is_file():
        return
    written = []
    while (directory / f"{_shard_name(part, len(written))}.json").is_file():
        written.append(store_lib.read_json(
            directory / f"{_shard_name(part, len(written))}.json", directory))
    bar.update(sum(shard["text_bytes"] for shard in written))
    documents = iter_documents(cfg, split)
    # Resuming: the documents of the shards already written are read again, not tokenized.
    skipped = sum(shard["documents"] for shard in written)
    if skipped:
        next(itertools.islice(documents, skipped - 1, skipped), None)
    limit = int(cfg.store_shard_mb * (1 << 20))
    shard = len(written)
    for batch in _batches_of_text(documents, limit):
        _write_shard(directory, part, shard, batch, tokenizer, cfg.add_bos)
        bar.update(sum(_text_bytes(doc) for doc in batch))
        shard += 1
    if shard == 0:
        raise ConfigError(f"data split '{split}' is empty: no documents")
    write_json(directory / f"p{part}.json", {"shards": shard})


def _batches_of_text(documents: Iterable[Document], limit: int) -> Iterable[list[Document]]:
    """Consecutive documents, cut where their text first reaches `limit` bytes."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += _text_bytes(doc)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_shard(directory: Path, part: int, shard: int, documents: list[Document],
                 tokenizer: Tokenizer, add_bos: bool) -> None:
    tokenized = tokenize(documents, tokenizer, add_bos)
    dtype = store_lib.tokens_dtype(tokenizer.vocab_size)
    ids = tokenized.ids
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ConfigError(f"the tokenizer produced id {ids.max()}, outside {dtype}")
    name = _shard_name(part, shard)
    write_array(directory / f"{name}.tokens.npy", ids.astype(dtype))
    write_array(directory / f"{name}.lengths.npy", tokenized.lengths)
    write_array(directory / f"{name}.untrained.npy", tokenized.untrained)
    write_json(directory / f"{name}.json", {
        "documents": len(documents), "tokens": int(len(ids)),
        "text_bytes": sum(_text_bytes(doc) for doc in documents),
        # what `store.verify_store` checks the file against: a row's hash covers its tokens,
        # not the label its last position predicts (a document's last token)
        "sha256": store_lib.file_sha256(directory / f"{name}.tokens.npy")})


def _finish(cfg: DataConfig, tokenizer: Tokenizer, directory: Path, n_parts: int,
            expected: dict) -> dict:
    """Draw the split, write each split's pair index and row hashes, then the manifest."""
    shards, lengths, part_documents, spans = [], [], [], []
    first_token = 0
    for part in range(n_parts):
        count = store_lib.read_json(directory / f"p{part}.json", directory)["shards"]
        documents = 0
        for shard in range(count):
            name = _shard_name(part, shard)
            info = store_lib.read_json(directory / f"{name}.json", directory)
            shards.append({"file": f"{name}.tokens.npy", "tokens": info["tokens"],
                           **({"sha256": info["sha256"]} if "sha256" in info else {})})
            lengths.append(np.load(directory / f"{name}.lengths.npy", allow_pickle=False))
            spans.append(np.load(directory / f"{name}.untrained.npy", allow_pickle=False)
                         + first_token)
            first_token += info["tokens"]
            documents += info["documents"]
        part_documents.append(documents)
    lengths = np.concatenate(lengths)
    spans = np.concatenate(spans).reshape(-1, 2)
    write_array(directory / "untrained.starts.npy", spans[:, 0])
    write_array(directory / "untrained.ends.npy", spans[:, 1])
    token_starts = np.cumsum(lengths) - lengths

    if n_parts == 2:  # data.heldout_split or heldout_path: the second part is held out whole
        train = np.arange(part_documents[0])
        heldout = np.arange(part_documents[0], part_documents[0] + part_documents[1])
    else:
        held = heldout_mask(part_documents[0], cfg)
        train, heldout = np.flatnonzero(~held), np.flatnonzero(held)
    if cfg.max_documents > 0:
        train = train[: cfg.max_documents]

    # Reading the shards written, as training will, makes each row's hash from the stream.
    stream = store_lib.TokenStream(directory, shards)
    splits = {}
    for split, documents in (("train", train), ("heldout", heldout)):
        index = index_documents(token_starts[documents], lengths[documents], cfg.seq_len)
        if index.n_pairs == 0:
            raise ConfigError(f"the {split} data is empty: none of its {len(documents)} "
                              "documents has 2 or more tokens")
        hashes, trained = _hash_rows(index, stream.read,
                                     (spans[:, 0].copy(), spans[:, 1].copy()))
        write_array(directory / f"{split}.token_starts.npy", index.token_starts)
        write_array(directory / f"{split}.pair_starts.npy", index.pair_starts)
        write_array(directory / f"{split}.hashes.npy", hashes)
        splits[split] = {"documents": int(len(index.token_starts)), "pairs": index.n_pairs,
                         "rows": index.n_rows, "trained_tokens": trained}
    manifest = {"version": store_lib.VERSION, "identity": expected, "seq_len": cfg.seq_len,
                "tokens_dtype": store_lib.tokens_dtype(tokenizer.vocab_size).name,
                "documents": int(len(lengths)), "tokens": int(first_token),
                "shards": shards, "splits": splits}
    write_json(directory / store_lib.MANIFEST, manifest)
    return manifest


def _hash_rows(index: PairIndex, read_tokens: Callable[[np.ndarray], np.ndarray],
               untrained: Spans) -> tuple[np.ndarray, int]:
    """Every row's hash, and how many labels are trained on."""
    hashes = np.zeros(index.n_rows, dtype=np.uint64)
    trained = 0
    block = max(1, _HASH_BLOCK_TOKENS // index.seq_len)
    for first in range(0, index.n_rows, block):
        rows = np.arange(first, min(first + block, index.n_rows))
        arrays = derive_rows(index, rows, read_tokens, untrained)
        hashes[rows] = row_hashes(arrays["tokens"], arrays["segment_ids"], arrays["loss_mask"])
        trained += int(arrays["loss_mask"].sum())
    return hashes, trained
