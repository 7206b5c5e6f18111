"""`kd-jax cache import`: a `topk` teacher cache from API logprobs, to distill from a teacher
that only exposes an API. Each line is parsed by `kd_jax.cache.api_responses`, which also says
how an API whose tokenizer is not the student's is read.

Two ways, decided for the whole file. When every API token (generated or in top_logprobs) is a
student token and tokenizing each response gives the API's tokens back, the targets are the
API's, on its own tokens. Otherwise the responses are re-tokenized by the student's tokenizer and
the targets mapped onto it: a student position gets the entries of the API position that has
read exactly the same text, each credited to the student token it spells or else the longest one
it starts with (an API entry longer than any student token there is credited to its prefix), and
a student position inside an API token gets no target (no entries, tail 0: a divergence of 0)
while its hard label is trained on. The manifest then says so (`mapped_from_api`, with the share
of the cached response positions that are aligned), and so does the summary (`aligned_share`).

Rows: one response a row, never packed with another. seq = prompt ids + response ids (the
student's), tokens = seq[:-1], labels = seq[1:], positions 0.., segment_ids 1 on the pairs and 0
on padding, loss_mask 1 exactly where the label is a response token, zero-padded to seq_len. A
sequence with more than seq_len pairs loses the start of its prompt; one whose response alone
does not fit (more than seq_len response labels) is a CacheError naming the line: nothing is
silently cut from what the teacher said, raise seq_len or drop the line.

Targets: k is the most entries any position of the file has; shorter positions are padded with
id 0, log-probability -inf (probability 0: the cache stores -inf exactly, as float16 and as
float32). Pairs whose label is not a response token (prompt, padding) hold id 0, log-probability 0,
tail -inf; their loss_mask is 0.

Temperature: API logprobs are taken as the teacher's distribution at T = 1 (the manifest records
temperature 1.0), whatever temperature the responses were sampled at; training must use T = 1.

Output, written into a temporary sibling directory and renamed into place only when complete
(a failed import leaves nothing that looks like a cache):

    cache_dir/
      manifest.json, shards/   the topk cache over the TRAIN rows (`kd_jax.cache.manifest`)
      rows.npz                 int32 train_* and heldout_* arrays [n, seq_len] (tokens, targets:
                               the labels, positions, segment_ids, loss_mask), and train_lines,
                               heldout_lines [n]: the 1-based JSONL line of each row

The held-out rows are a seeded draw of whole responses and have no cache rows: evaluation scores
the student on their labels. numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.cache import shards
from kd_jax.cache.api_responses import StudentVocabulary, fit, parse, read_lines
from kd_jax.cache.fingerprints import packing_fingerprint
from kd_jax.cache.manifest import (
    VALUE_DTYPES,
    CacheError,
    check_fingerprints,
    copy_student_tokenizer,
    create_manifest,
    make_manifest,
    n_shards,
    read_manifest,
    shard_rows,
)
from kd_jax.data.packing import Packed, covered_bytes, row_hashes
from kd_jax.data.tokenizers import HFTokenizer, Tokenizer

ROWS_NAME = "rows.npz"
# rows.npz names each array as the format first did: the labels are stored as "targets".
_STORED_NAMES = {"tokens": "tokens", "labels": "targets", "positions": "positions",
                 "segment_ids": "segment_ids", "loss_mask": "loss_mask"}
# Second seed word of the held-out draw, so that it never coincides with another stream of `seed`.
_HELDOUT_STREAM = 0xA91


def _empty_rows(n_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {key: np.zeros((n_rows, seq_len), dtype=np.int32) for key in _STORED_NAMES}


def _heldout_lines(n_responses: int, heldout_fraction: float, seed: int) -> np.ndarray:
    """Indices (into the responses, file order) of the held-out ones: a seeded draw."""
    if n_responses < 2 or heldout_fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    n_heldout = min(n_responses - 1, max(1, round(heldout_fraction * n_responses)))
    order = np.random.default_rng([seed, _HELDOUT_STREAM]).permutation(n_responses)
    return np.sort(order[:n_heldout])


def import_openai_jsonl(jsonl_path: str | Path, tokenizer: Tokenizer,
                        cache_dir: str | Path, *, seq_len: int, heldout_fraction: float = 0.05,
                        seed: int = 0, value_dtype: str = "float16",
                        rows_per_shard: int = 256) -> dict[str, Any]:
    """Write a topk cache of API logprobs and its rows into `cache_dir`; returns a summary.

    See the module docstring for the input, the rows and the targets. `cache_dir` must not
    exist or be empty. heldout_fraction in [0, 1): that fraction of the responses (at least one
    when there are two or more, none at 0) is held out, by a draw seeded with `seed`.
    """
    jsonl_path, cache_dir = Path(jsonl_path), Path(cache_dir)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise CacheError(f"seq_len must be a positive int, got {seq_len!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise CacheError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if value_dtype not in VALUE_DTYPES:
        raise CacheError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, "
                         f"got {value_dtype!r}")
    if not jsonl_path.is_file():
        raise CacheError(f"no API responses at {jsonl_path}")
    _check_empty(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the cache keeps the umask's permissions, not 0700.
    staging = cache_dir.parent / f".{cache_dir.name}.import-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        summary = _import(jsonl_path, tokenizer, staging, seq_len=seq_len,
                          heldout_fraction=heldout_fraction, seed=seed, value_dtype=value_dtype,
                          rows_per_shard=rows_per_shard)
        _check_empty(cache_dir)  # again: another process may have made it meanwhile
        if cache_dir.is_dir():
            cache_dir.rmdir()  # empty: the rename below needs the name free
        os.replace(staging, cache_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["cache_dir"] = str(cache_dir)
    return summary


def _check_empty(cache_dir: Path) -> None:
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
        raise CacheError(f"{cache_dir} already exists and is not empty: import into a new "
                         "directory")


def _import(jsonl_path: Path, tokenizer: Tokenizer, staging: Path, *, seq_len: int,
            heldout_fraction: float, seed: int, value_dtype: str,
            rows_per_shard: int) -> dict[str, Any]:
    vocabulary = StudentVocabulary.of(tokenizer)

    # Pass 1: parse and check every line, build its row, and spill its targets to scratch files
    # (they are k times the rows, so they are not held in memory); k is known only at the end.
    scratch_ids = open(staging / "entries.ids.tmp", "wb")
    scratch_logprobs = open(staging / "entries.logprobs.tmp", "wb")
    digest = hashlib.sha256()
    line_numbers, sequences, first_pairs, counts, tails, aligned = [], [], [], [], [], []
    k, duplicates_merged, prompts_cut, own_tokens = 1, 0, 0, True
    with scratch_ids, scratch_logprobs:
        for number, text in read_lines(jsonl_path, digest):
            where = f"{jsonl_path} line {number}"
            response = parse(text, where, vocabulary)
            sequence, first_pair = fit(response, seq_len, where)
            prompts_cut += len(sequence) < len(response.prompt_ids) + len(response.response_ids)
            # With no prompt, response token 0 is an input only: its targets are not stored.
            labelled = slice(1 if first_pair < 0 else 0, None)
            line_counts = np.array([len(ids) for ids in response.entry_ids[labelled]], np.int32)
            for ids, logprobs in zip(response.entry_ids[labelled],
                                     response.entry_logprobs[labelled]):
                scratch_ids.write(ids.astype("<i4").tobytes())
                scratch_logprobs.write(logprobs.astype("<f8").tobytes())
            k = max(k, int(line_counts.max(initial=0)))
            duplicates_merged += response.duplicates_merged
            line_numbers.append(number)
            sequences.append(sequence)
            first_pairs.append(max(first_pair, 0))
            counts.append(line_counts)
            tails.append(response.tails[labelled])
            aligned.append(int(response.aligned[labelled].sum()))
            own_tokens &= response.own_tokens
    if not sequences:
        raise CacheError(f"{jsonl_path} holds no responses")

    heldout = _heldout_lines(len(sequences), heldout_fraction, seed)
    is_heldout = np.zeros(len(sequences), dtype=bool)
    is_heldout[heldout] = True
    train = np.flatnonzero(~is_heldout)
    # How many of the cached positions have a target: all of them where the tokens are the
    # student's own.
    train_positions = sum(len(counts[index]) for index in train)
    train_aligned = sum(aligned[index] for index in train)
    mapped = None if own_tokens else {
        "aligned_positions": train_aligned, "response_positions": train_positions,
        "aligned_share": round(train_aligned / max(train_positions, 1), 4)}
    rows = {"train": _empty_rows(len(train), seq_len),
            "heldout": _empty_rows(len(heldout), seq_len)}
    for split, indices in (("train", train), ("heldout", heldout)):
        for row, index in enumerate(indices):
            sequence, n_pairs = sequences[index], len(sequences[index]) - 1
            arrays = rows[split]
            arrays["tokens"][row, :n_pairs] = sequence[:-1]
            arrays["labels"][row, :n_pairs] = sequence[1:]
            arrays["positions"][row, :n_pairs] = np.arange(n_pairs)
            arrays["segment_ids"][row, :n_pairs] = 1
            arrays["loss_mask"][row, first_pairs[index]: n_pairs] = 1

    jsonl_hash = digest.hexdigest()[:16]
    train_rows = rows["train"]
    hashes = row_hashes(train_rows["tokens"], train_rows["segment_ids"],
                        train_rows["loss_mask"])
    packing = packing_fingerprint(seq_len, hashes)
    manifest = make_manifest(
        "topk", {"k": k, "temperature": 1.0}, vocab_size=tokenizer.vocab_size, seq_len=seq_len,
        n_rows=len(train), rows_per_shard=rows_per_shard, value_dtype=value_dtype,
        fingerprints={"teacher": f"api:{jsonl_hash}", "tokenizer": tokenizer.fingerprint,
                      "data": jsonl_hash, "packing": packing},
        mapped_from_api=mapped)
    manifest = create_manifest(staging, manifest)
    if isinstance(tokenizer, HFTokenizer):  # what `data.tokenizer: auto` reads back
        copy_student_tokenizer(staging, tokenizer.path)

    # Pass 2: the train rows' targets, shard by shard, gathered from the scratch files.
    counts_flat = np.concatenate(counts)
    entry_starts = np.concatenate([[0], np.cumsum(counts_flat, dtype=np.int64)])
    position_starts = np.concatenate([[0], np.cumsum([len(c) for c in counts], dtype=np.int64)])
    tails_flat = np.concatenate(tails)
    n_entries = int(entry_starts[-1])
    if n_entries == 0:
        raise CacheError(f"no response position of {jsonl_path} has a target (none is aligned "
                         "with an API token whose entries map to student tokens): there is "
                         "nothing to distill")
    all_ids = np.memmap(staging / "entries.ids.tmp", dtype="<i4", mode="r", shape=(n_entries,))
    all_logprobs = np.memmap(staging / "entries.logprobs.tmp", dtype="<f8", mode="r",
                             shape=(n_entries,))
    slots = np.arange(k)
    for shard_index in range(n_shards(manifest)):
        first, stop = shard_rows(manifest, shard_index)
        ids_btk = np.zeros((stop - first, seq_len, k), dtype=np.int32)
        logprobs_btk = np.zeros((stop - first, seq_len, k), dtype=np.float32)
        tail_bt = np.full((stop - first, seq_len), -np.inf, dtype=np.float32)
        for row in range(first, stop):
            index = train[row]
            positions = slice(position_starts[index], position_starts[index + 1])
            pairs = slice(first_pairs[index], first_pairs[index] + len(counts[index]))
            filled = slots < counts_flat[positions][:, None]  # [targets, k]
            # Padding slots would read past the position's entries: clamp, then mask.
            at = np.minimum(entry_starts[:-1][positions][:, None] + slots, n_entries - 1)
            ids_btk[row - first, pairs] = np.where(filled, all_ids[at], 0)
            logprobs_btk[row - first, pairs] = np.where(filled, all_logprobs[at], -np.inf)
            tail_bt[row - first, pairs] = tails_flat[positions]
        shards.write_shard(staging, manifest, shard_index,
                           {"ids": ids_btk, "logprobs": logprobs_btk, "tail": tail_bt},
                           hashes[first:stop])
    del all_ids, all_logprobs  # release the maps before the files go
    for scratch in staging.glob("entries.*.tmp"):
        scratch.unlink()

    lines = np.asarray(line_numbers, dtype=np.int32)
    np.savez(staging / ROWS_NAME,
             **{f"{split}_{stored}": rows[split][key] for split in rows
                for key, stored in _STORED_NAMES.items()},
             train_lines=lines[train], heldout_lines=lines[heldout])
    n_labels = {split: int(rows[split]["loss_mask"].sum()) for split in rows}
    return {"mode": "topk", "k": k, "seq_len": seq_len, "lines": len(sequences),
            "train_rows": len(train), "heldout_rows": len(heldout),
            "train_labels": n_labels["train"], "heldout_labels": n_labels["heldout"],
            "prompts_cut": int(prompts_cut), "duplicates_merged": duplicates_merged,
            "mapped_from_api": not own_tokens,
            "aligned_share": 1.0 if own_tokens else mapped["aligned_share"],
            "shards": n_shards(manifest), "fingerprints": manifest["fingerprints"]}


def load_rows(cache_dir: str | Path, tokenizer: Tokenizer) -> tuple[Packed, Packed]:
    """(train, heldout) rows of an imported cache; train row i is cache row i."""
    cache_dir = Path(cache_dir)
    path = cache_dir / ROWS_NAME
    if not path.is_file():
        raise CacheError(f"{path} is missing: {cache_dir} was not made by `kd-jax cache import`")
    manifest = read_manifest(cache_dir)
    check_fingerprints(
        manifest, {"fingerprints": {"tokenizer": tokenizer.fingerprint}}, cache_dir)
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is unreadable ({str(err).splitlines()[0]})") from None
    byte_lengths = tokenizer.byte_lengths()
    splits = []
    for split in ("train", "heldout"):
        names = {key: f"{split}_{stored}" for key, stored in _STORED_NAMES.items()}
        missing = [name for name in names.values() if name not in arrays]
        if missing:
            raise CacheError(f"{path} lacks {', '.join(missing)}")
        values = {key: arrays[name].astype(np.int32, copy=False) for key, name in names.items()}
        shapes = {value.shape for value in values.values()}
        if len(shapes) != 1 or any(len(shape) != 2 or shape[1] != manifest["seq_len"]
                                   for shape in shapes):
            raise CacheError(f"{path}: the {split} arrays have shapes {sorted(shapes)}, "
                             f"expected [n, {manifest['seq_len']}]")
        byte_count = covered_bytes(values["labels"], values["loss_mask"], byte_lengths)
        splits.append(Packed(**values, byte_count=byte_count))
    if splits[0].n_rows != manifest["n_rows"]:
        raise CacheError(f"{path} holds {splits[0].n_rows} train rows, the cache "
                         f"{manifest['n_rows']}")
    return splits[0], splits[1]
