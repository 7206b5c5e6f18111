"""A `topk` teacher cache from API logprobs: distill from a teacher that only exposes an API.

Input is JSONL, one response a line, in the OpenAI chat-completions logprobs format, either

    {"prompt": "<text the model saw>", "logprobs": {"content": [...]}}
    {"prompt": "<text the model saw>", "response": <a whole chat.completion object>}

(the second reads `response["choices"][0]["logprobs"]["content"]`). Each content entry is one
generated token: `token`, `logprob`, `bytes` (null for some APIs: then the UTF-8 of `token`) and
`top_logprobs`, up to 20 entries of the same shape: the teacher's distribution at that position.

`prompt` is the text exactly as the model saw it, chat template and all, applied by the user:
this module tokenizes it as plain text with `tokenizer.encode` and adds nothing. The response is
not re-tokenized: its ids come from the bytes of the API's tokens (`Tokenizer.ids_by_bytes`), so the
student is trained on the teacher's own segmentation, which must therefore be one its tokenizer
can spell token by token.

Rows: one response a row, never packed with another. seq = prompt ids + response ids, tokens =
seq[:-1], labels = seq[1:], positions 0.., segment_ids 1 on the pairs and 0 on padding,
loss_mask 1 exactly where the label is a response token, zero-padded to seq_len. A sequence
with more than seq_len pairs loses the start of its prompt; one whose response alone does not
fit (more than seq_len response targets) is a CacheError naming the line: nothing is silently
cut from what the teacher said, raise seq_len or drop the line.

Targets of a pair whose target is response token j: the top_logprobs of content[j], deduplicated
(two entries that map to one id are merged by logsumexp), most probable first. k is the most
entries any position of the file has; shorter positions are padded with id 0, log-probability
-inf (probability 0: the cache stores -inf exactly, as float16 and as float32). A position whose
top_logprobs is empty or missing uses the generated token and its logprob as its one entry.
tail = log(1 - sum p) in float64, floored at log(`_FULL_MASS_SLACK`): an API model's softmax never
leaves exactly nothing outside its top entries, and a sum that reaches 1 is the rounding of its
logprobs (an empty tail would make a reverse KL infinite wherever the student has mass there).
Pairs that are not response targets (prompt, padding) hold id 0, log-probability 0, tail -inf;
their loss_mask is 0.

Errors name the line (1-based, as an editor counts) and the response token (0-based: its index in
the content list), and whether the generated token or a top_logprobs entry is at fault.

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

import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.cache import shards
from kd_jax.cache.codec import row_hashes
from kd_jax.cache.fingerprints import packing_fingerprint
from kd_jax.cache.manifest import (
    VALUE_DTYPES,
    CacheError,
    check_fingerprints,
    create_manifest,
    make_manifest,
    n_shards,
    read_manifest,
    shard_rows,
)
from kd_jax.data.packing import Packed, covered_bytes
from kd_jax.data.tokenizers import Tokenizer

ROWS_NAME = "rows.npz"
# rows.npz names each array as the format first did: the labels are stored as "targets".
_STORED_NAMES = {"tokens": "tokens", "labels": "targets", "positions": "positions",
                 "segment_ids": "segment_ids", "loss_mask": "loss_mask"}
# A tail mass below this is the rounding of the API's logprobs: the tail is taken as this much.
# It is below what a float16 log-probability near 0 resolves (its spacing at -0.01 is 7.6e-6).
_FULL_MASS_SLACK = 1e-6

# A log-probability up to this much above 0 is rounding (stored as 0); more is a broken line.
_POSITIVE_SLACK = 1e-3

# Second seed word of the held-out draw, so that it never coincides with another stream of `seed`.
_HELDOUT_STREAM = 0xA91


@dataclasses.dataclass
class _Response:
    """One line, mapped to ids; targets [j] are the teacher's entries for response token j."""

    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [R]
    entry_ids: list[np.ndarray]  # R arrays of int32 [c_j], most probable first, unique
    entry_logprobs: list[np.ndarray]  # R arrays of float64 [c_j]
    tails: np.ndarray  # float64 [R]
    duplicates_merged: int


def _lines(path: Path, digest: Any) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; the raw bytes go into `digest`."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CacheError(f"{path} line {number} is not UTF-8 ({err.reason} at byte "
                                 f"{err.start})") from None
            if text.strip():
                yield number, text


def _content(record: Any, where: str) -> tuple[str, list]:
    """(prompt, logprobs content list) of a parsed line, in either accepted layout."""
    if not isinstance(record, dict):
        raise CacheError(f"{where} is not a JSON object")
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise CacheError(f"{where} has no \"prompt\" string (the text the model saw, chat "
                         "template applied)")
    if "logprobs" in record:
        logprobs, path = record["logprobs"], "logprobs"
    elif "response" in record:
        try:
            logprobs = record["response"]["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            raise CacheError(f"{where}: \"response\" has no choices[0].logprobs (a "
                             "chat.completion object)") from None
        path = "response.choices[0].logprobs"
    else:
        raise CacheError(f"{where} has neither \"logprobs\" nor \"response\"")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        raise CacheError(f"{where}: {path}.content is not a list (request logprobs=true and "
                         "top_logprobs)")
    return prompt, content


def _entry(entry: Any, where: str) -> tuple[bytes, float]:
    """(bytes, logprob) of a content or top_logprobs entry."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise CacheError(f"{where} has no \"token\" string")
    raw = entry.get("bytes")
    if raw is None:
        spelled = entry["token"].encode("utf-8")
    elif isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        spelled = bytes(raw)
    else:
        raise CacheError(f"{where}: \"bytes\" must be a list of ints in [0, 256) or null")
    logprob = entry.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) \
            or math.isnan(logprob) or logprob > _POSITIVE_SLACK:
        raise CacheError(f"{where}: \"logprob\" must be a number <= 0, got {logprob!r}")
    return spelled, min(float(logprob), 0.0)


def _parse(text: str, where: str, tokenizer: Tokenizer,
           ids_by_bytes: dict[bytes, int]) -> _Response:
    try:
        record = json.loads(text)
    except ValueError as err:
        raise CacheError(f"{where} is not JSON ({err})") from None
    prompt, content = _content(record, where)
    response_ids = np.empty(len(content), dtype=np.int32)
    entry_ids, entry_logprobs = [], []
    tails = np.empty(len(content), dtype=np.float64)
    merged = 0
    for j, item in enumerate(content):
        here = f"{where}, response token {j}"
        spelled, logprob = _entry(item, here)
        if spelled not in ids_by_bytes:
            raise CacheError(f"{here}: generated token {spelled!r} is not a token of "
                             f"{tokenizer.description}")
        response_ids[j] = ids_by_bytes[spelled]
        top = item.get("top_logprobs") or []
        if not isinstance(top, list):
            raise CacheError(f"{here}: \"top_logprobs\" is not a list")
        # The teacher's mass per id, merged by logsumexp when two entries map to one id.
        by_id: dict[int, list[float]] = {}
        for entry in top:
            entry_bytes, entry_logprob = _entry(entry, f"{here}, top_logprobs entry")
            if entry_bytes not in ids_by_bytes:
                raise CacheError(f"{here}: top_logprobs entry {entry_bytes!r} is not a token "
                                 f"of {tokenizer.description}")
            by_id.setdefault(ids_by_bytes[entry_bytes], []).append(entry_logprob)
        if not top:  # no distribution given: the generated token's own probability is known
            by_id = {int(response_ids[j]): [logprob]}
        merged += sum(len(values) - 1 for values in by_id.values())
        ids = np.fromiter(by_id, dtype=np.int32, count=len(by_id))
        logprobs = np.array([np.logaddexp.reduce(np.array(values, dtype=np.float64))
                             for values in by_id.values()], dtype=np.float64)
        logprobs = np.minimum(logprobs, 0.0)  # a merge of rounded values can pass 0
        order = np.lexsort((ids, -logprobs))  # most probable first, ties by id
        entry_ids.append(ids[order])
        entry_logprobs.append(logprobs[order])
        rest = 1.0 - float(np.sum(np.exp(logprobs)))
        tails[j] = math.log(max(rest, _FULL_MASS_SLACK))
    prompt_ids = np.asarray(tokenizer.encode(prompt), dtype=np.int32)
    return _Response(prompt_ids=prompt_ids, response_ids=response_ids, entry_ids=entry_ids,
                     entry_logprobs=entry_logprobs, tails=tails, duplicates_merged=merged)


def _fit(response: _Response, seq_len: int, where: str) -> tuple[np.ndarray, int]:
    """(the kept sequence, the pair whose target is response token 0; -1 if it has none).

    A sequence longer than seq_len + 1 tokens loses the start of its prompt, keeping at least
    one prompt token so that every response token stays a target.
    """
    n_prompt, n_response = len(response.prompt_ids), len(response.response_ids)
    n_targets = n_response if n_prompt else n_response - 1  # with no prompt, token 0 is input
    if n_targets < 1:
        raise CacheError(f"{where} has {n_prompt} prompt and {n_response} response tokens: no "
                         "response token can be a target")
    if n_targets > seq_len:
        raise CacheError(f"{where}: the response has {n_response} tokens, but a row of seq_len "
                         f"{seq_len} holds at most {seq_len} response targets; raise seq_len or "
                         "drop the line")
    drop = max(0, n_prompt + n_response - 1 - seq_len)  # < n_prompt by the check above
    sequence = np.concatenate([response.prompt_ids[drop:], response.response_ids])
    return sequence, n_prompt - drop - 1


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
    ids_by_bytes = tokenizer.ids_by_bytes()

    # Pass 1: parse and check every line, build its row, and spill its targets to scratch files
    # (they are k times the rows, so they are not held in memory); k is known only at the end.
    scratch_ids = open(staging / "entries.ids.tmp", "wb")
    scratch_logprobs = open(staging / "entries.logprobs.tmp", "wb")
    digest = hashlib.sha256()
    line_numbers, sequences, first_pairs, counts, tails = [], [], [], [], []
    k, duplicates_merged, prompts_cut = 1, 0, 0
    with scratch_ids, scratch_logprobs:
        for number, text in _lines(jsonl_path, digest):
            where = f"{jsonl_path} line {number}"
            response = _parse(text, where, tokenizer, ids_by_bytes)
            sequence, first_pair = _fit(response, seq_len, where)
            prompts_cut += len(sequence) < len(response.prompt_ids) + len(response.response_ids)
            # With no prompt, response token 0 is an input only: its targets are not stored.
            targets = slice(1 if first_pair < 0 else 0, None)
            line_counts = np.array([len(ids) for ids in response.entry_ids[targets]], np.int32)
            for ids, logprobs in zip(response.entry_ids[targets],
                                     response.entry_logprobs[targets]):
                scratch_ids.write(ids.astype("<i4").tobytes())
                scratch_logprobs.write(logprobs.astype("<f8").tobytes())
            k = max(k, int(line_counts.max(initial=0)))
            duplicates_merged += response.duplicates_merged
            line_numbers.append(number)
            sequences.append(sequence)
            first_pairs.append(max(first_pair, 0))
            counts.append(line_counts)
            tails.append(response.tails[targets])
    if not sequences:
        raise CacheError(f"{jsonl_path} holds no responses")

    heldout = _heldout_lines(len(sequences), heldout_fraction, seed)
    is_heldout = np.zeros(len(sequences), dtype=bool)
    is_heldout[heldout] = True
    train = np.flatnonzero(~is_heldout)
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
                      "data": jsonl_hash, "packing": packing})
    manifest = create_manifest(staging, manifest)

    # Pass 2: the train rows' targets, shard by shard, gathered from the scratch files.
    counts_flat = np.concatenate(counts)
    entry_starts = np.concatenate([[0], np.cumsum(counts_flat, dtype=np.int64)])
    position_starts = np.concatenate([[0], np.cumsum([len(c) for c in counts], dtype=np.int64)])
    tails_flat = np.concatenate(tails)
    n_entries = int(entry_starts[-1])
    # Every target position has at least one entry (see _parse), so n_entries > 0.
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
    n_targets = {split: int(rows[split]["loss_mask"].sum()) for split in rows}
    return {"mode": "topk", "k": k, "seq_len": seq_len, "lines": len(sequences),
            "train_rows": len(train), "heldout_rows": len(heldout),
            "train_targets": n_targets["train"], "heldout_targets": n_targets["heldout"],
            "prompts_cut": int(prompts_cut), "duplicates_merged": duplicates_merged,
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
