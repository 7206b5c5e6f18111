"""Data: documents -> token ids -> packed rows -> the batch of any global step.

The pipeline is host-side numpy and imports no JAX. `datasets` and `tokenizers` are imported
inside the functions that need them, so the built-in demo (the interpreter's own standard
library, byte-level tokens) runs on a bare image.

Packing is greedy concatenate-and-split: every document contributes its (input, next-token
target) pairs, which are streamed into rows of `seq_len`; a document that does not fit in the
rest of a row continues in the next one with its positions restarting at 0. Only the last row is
padded. The batch of step `s` is a pure function of (rows, seed, s), so a checkpoint needs to
record nothing but the step, whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import platform
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from kd_jax.config import ConfigError, DataConfig

_FILE_BUILDERS = ("text", "json", "parquet", "csv")
# Folders whose modules are test suites or third-party code, not the standard library proper.
_STDLIB_EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages"})
# Second seed word for the held-out document draw, so it never coincides with the epoch
# permutations, which use [seed, epoch].
_HELDOUT_STREAM = 0x4D1D
_FINGERPRINT_VERSION = "kd_jax.data/1"  # bump when packing or batching changes meaning
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def byte_lengths(self) -> np.ndarray: ...


class ByteTokenizer:
    """Token i is the UTF-8 byte i; no special tokens. Exact bits-per-byte by construction."""

    vocab_size = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # An id outside 0..255 (the model's padded vocabulary rows) becomes byte 0xFF, which is
        # never valid UTF-8, so it shows up as U+FFFD instead of raising mid-generation.
        in_range = (ids >= 0) & (ids < self.vocab_size)
        raw = np.where(in_range, ids, 0xFF).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int32)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, encoded without special tokens (we pack raw text)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        raw = path.read_bytes()
        self.path = path
        self._tokenizer = RustTokenizer.from_str(raw.decode("utf-8"))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
        self._byte_lengths: np.ndarray | None = None  # computed on first use

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The Rust side tokenizes a batch in parallel threads.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for: exact for byte-level BPE and byte fallback.

        Byte-level BPE (GPT-2, Llama 3, Qwen) spells every byte as one vocabulary character, so
        a token's byte count is its string length. `<0xHH>` byte-fallback pieces are one byte.
        Anything else is the UTF-8 length of the token decoded alone, an approximation: a
        SentencePiece word-start piece "▁the" decodes alone to "the" and counts 3, not 4, and a
        WordPiece "##ing" counts its "##". Special tokens count 0: they stand for no text.
        """
        if self._byte_lengths is not None:
            return self._byte_lengths
        decoder_types = _component_types(json.loads(self._tokenizer.to_str()).get("decoder"))
        byte_level = "ByteLevel" in decoder_types
        byte_fallback = "ByteFallback" in decoder_types
        special = {
            token_id for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
            if added.special
        }
        added_ids = set(self._tokenizer.get_added_tokens_decoder())
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        alone = self._tokenizer.decode_batch(
            [[token_id] for token_id in range(self.vocab_size)], skip_special_tokens=False)
        for token_id in range(self.vocab_size):
            token = self._tokenizer.id_to_token(token_id)
            if token is None or token_id in special:
                continue
            if byte_level and token_id not in added_ids:
                lengths[token_id] = len(token)
            elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths[token_id] = 1
            else:
                lengths[token_id] = len(alone[token_id].encode("utf-8"))
        self._byte_lengths = lengths
        return lengths


def _component_types(component: Any) -> set[str]:
    """Type names in a tokenizer.json component, looking inside `Sequence` wrappers."""
    if not isinstance(component, dict):
        return set()
    types = {component.get("type", "")}
    for child in component.get("decoders", []) or []:
        types |= _component_types(child)
    return types


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte', or a path to a tokenizer.json (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: no tokenizer file at '{path}' (use 'byte' or a "
                          "path to a Hugging Face tokenizer.json)")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ConfigError("data.tokenizer: reading a tokenizer.json needs the 'tokenizers' "
                          "package") from None
    try:
        return HFTokenizer(path)
    except Exception as err:  # the Rust loader raises bare Exceptions with multi-line text
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"data.tokenizer: '{path}' is not a valid tokenizer.json ({first_line})") from None


# ------------------------------------------------------------------------------ documents


@dataclasses.dataclass(frozen=True)
class Document:
    """Plain text, or a (prompt, response) pair whose loss covers only the response."""

    text: str  # the whole document, or the response when `prompt` is set
    prompt: str | None = None
    name: str = ""  # where it came from: a file's relative path, or "row 17"


def load_documents(cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """Return (train, heldout) documents for `cfg`; raises ConfigError for a user mistake."""
    if cfg.source == "stdlib":
        if cfg.heldout_split:
            raise ConfigError("data.heldout_split applies to source 'hub' only; the stdlib "
                              "source holds out files by data.heldout_fraction")
        documents = _stdlib_documents()
        train, heldout = _hold_out(documents, cfg)
    elif cfg.source in _FILE_BUILDERS:
        if cfg.heldout_split:
            raise ConfigError(f"data.heldout_split applies to source 'hub' only; for local "
                              f"'{cfg.source}' files, documents are held out by "
                              f"data.heldout_fraction")
        documents = _dataset_documents(cfg, cfg.split)
        train, heldout = _hold_out(documents, cfg)
    elif cfg.source == "hub":
        if not cfg.path:
            raise ConfigError("data.path must name a Hugging Face dataset for source 'hub'")
        documents = _dataset_documents(cfg, cfg.split)
        if cfg.heldout_split:
            train, heldout = documents, _dataset_documents(cfg, cfg.heldout_split)
        else:
            train, heldout = _hold_out(documents, cfg)
    else:
        raise ConfigError(f"data.source: unknown source '{cfg.source}'")
    if cfg.max_documents > 0:
        train = train[: cfg.max_documents]
    return train, heldout


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return "the stdlib source"
    return f"data source {cfg.source} '{cfg.path}' (split '{cfg.split}')"


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    relative_paths = sorted(
        path.relative_to(root) for path in root.rglob("*.py")
        if not _STDLIB_EXCLUDED_FOLDERS.intersection(path.relative_to(root).parts[:-1]))
    documents = []
    for relative in relative_paths:
        text = (root / relative).read_bytes().decode("utf-8", errors="replace")
        if text:
            documents.append(Document(text=text, name=relative.as_posix()))
    if not documents:
        raise ConfigError(f"the stdlib source is empty: no .py files under {root}")
    return documents


def _data_files(cfg: DataConfig) -> list[str]:
    patterns = [pattern.strip() for pattern in cfg.path.split(",") if pattern.strip()]
    if not patterns:
        raise ConfigError(f"data.path must list the {cfg.source} files to read")
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [match for match in matches if os.path.isfile(match)]
        if not matches:
            raise ConfigError(f"data.path: no file matches '{pattern}'")
        files.extend(matches)
    return files


def _dataset_documents(cfg: DataConfig, split: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.source '{cfg.source}' needs the 'datasets' package") from None
    if cfg.source != "hub":
        files = _data_files(cfg)
        if all(os.path.getsize(file) == 0 for file in files):
            raise ConfigError(f"{_describe(cfg)} is empty: every file matched has 0 bytes")
    try:
        if cfg.source == "hub":
            dataset = datasets.load_dataset(cfg.path, cfg.name or None, split=split)
        else:
            dataset = datasets.load_dataset(cfg.source, data_files=files, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the CLI wants one line
        # DatasetGenerationError wraps the parser's error (a malformed json line, say).
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) \
            and err.__cause__ is not None else err
        reason = (str(cause).strip().splitlines() or [""])[0] or type(cause).__name__
        raise ConfigError(f"could not load {_describe(cfg)}: {reason}") from None
    if len(dataset) == 0:
        raise ConfigError(f"{_describe(cfg)} is empty: 0 rows")

    chat = bool(cfg.prompt_column)
    keys = ("prompt_column", "response_column") if chat else ("text_column",)
    wanted = [getattr(cfg, key) for key in keys]
    available = list(dataset.column_names)
    for key, column in zip(keys, wanted):
        if column not in available:
            raise ConfigError(f"data.{key}: column '{column}' is not in {_describe(cfg)}; "
                              f"available columns: {', '.join(available) or '(none)'}")
    columns = {column: list(dataset[column]) for column in wanted}

    documents = []
    if chat:
        rows = zip(columns[cfg.prompt_column], columns[cfg.response_column])
        for index, (prompt, response) in enumerate(rows):
            prompt, response = _as_text(prompt), _as_text(response)
            if prompt or response:
                documents.append(Document(text=response, prompt=prompt, name=f"row {index}"))
    else:
        for index, text in enumerate(columns[cfg.text_column]):
            text = _as_text(text)
            if text:
                documents.append(Document(text=text, name=f"row {index}"))
    if not documents:
        raise ConfigError(f"{_describe(cfg)} is empty: no non-empty documents")
    return documents


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _hold_out(documents: list[Document], cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """A seeded draw of whole documents (files, for stdlib); both parts keep the source order."""
    if len(documents) < 2:
        raise ConfigError(f"{_describe(cfg)} has {len(documents)} document; at least 2 are "
                          "needed to hold some out (data.heldout_fraction)")
    n_heldout = min(len(documents) - 1, max(1, round(cfg.heldout_fraction * len(documents))))
    order = np.random.default_rng([cfg.seed, _HELDOUT_STREAM]).permutation(len(documents))
    heldout_indices = set(order[:n_heldout].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in heldout_indices]
    heldout = [doc for i, doc in enumerate(documents) if i in heldout_indices]
    return train, heldout


# -------------------------------------------------------------------------------- packing


@dataclasses.dataclass
class Packed:
    """Packed rows; every array is int32 [n_rows, seq_len]. Padding is 0 everywhere."""

    tokens: np.ndarray
    targets: np.ndarray
    positions: np.ndarray  # restart at 0 at each document piece
    segment_ids: np.ndarray  # 1, 2, ... per document piece within a row; 0 is padding
    loss_mask: np.ndarray  # 1 where the target is trained on
    byte_count: float  # UTF-8 bytes covered by the masked-in targets, for bits per byte

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def pack(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int) -> Packed:
    """Greedy concatenate-and-split packing of next-token pairs; deterministic, vectorized."""
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len must be > 0, got {seq_len}")
    ids_per_doc, prompt_lengths = _tokenize(docs, tokenizer)
    lengths = np.array([len(ids) for ids in ids_per_doc], dtype=np.int64)
    keep = lengths >= 2  # a document needs two tokens to make one (input, target) pair
    if not keep.any():
        raise ConfigError(f"the data is empty: none of {len(docs)} documents has 2 or more "
                          "tokens")
    ids_per_doc = [ids for ids, kept in zip(ids_per_doc, keep) if kept]
    lengths, prompt_lengths = lengths[keep], prompt_lengths[keep]

    # Pair j of a document is (token j, token j + 1): the pair stream is the token stream
    # without each document's last token, and the targets are it without each first token.
    all_ids = np.concatenate(ids_per_doc).astype(np.int32, copy=False)
    token_ends = np.cumsum(lengths)
    pair_ends = token_ends - np.arange(1, len(lengths) + 1)  # one pair fewer than tokens
    pair_starts = pair_ends - (lengths - 1)
    n_pairs = int(pair_ends[-1])
    n_rows = -(-n_pairs // seq_len)
    size = n_rows * seq_len

    tokens = np.zeros(size, dtype=np.int32)
    targets = np.zeros(size, dtype=np.int32)
    is_last = np.zeros(len(all_ids), dtype=bool)
    is_last[token_ends - 1] = True
    tokens[:n_pairs] = all_ids[~is_last]
    is_first = np.zeros(len(all_ids), dtype=bool)
    is_first[token_ends - lengths] = True
    targets[:n_pairs] = all_ids[~is_first]

    loss_mask = np.zeros(size, dtype=np.int32)
    loss_mask[:n_pairs] = 1
    # Pair j predicts token j + 1, a prompt token while j + 1 < len(prompt): masked out.
    for start, prompt_length in zip(pair_starts, prompt_lengths):
        if prompt_length > 1:
            loss_mask[start: start + prompt_length - 1] = 0

    # A piece is a run of one document's pairs within one row: it starts at every document
    # start and every row start. There are only about n_documents + n_rows of them, so the
    # per-pair work below is two repeats.
    piece_starts = np.union1d(pair_starts, np.arange(0, n_pairs, seq_len))
    piece_lengths = np.diff(np.append(piece_starts, n_pairs))
    piece_rows = piece_starts // seq_len
    first_piece_of_row = np.searchsorted(piece_starts, np.arange(n_rows) * seq_len)
    piece_segments = np.arange(len(piece_starts)) - first_piece_of_row[piece_rows] + 1
    segment_ids = np.zeros(size, dtype=np.int32)
    segment_ids[:n_pairs] = np.repeat(piece_segments.astype(np.int32), piece_lengths)
    positions = np.zeros(size, dtype=np.int32)
    positions[:n_pairs] = np.arange(n_pairs, dtype=np.int64) - np.repeat(piece_starts,
                                                                          piece_lengths)

    shape = (n_rows, seq_len)
    return Packed(tokens=tokens.reshape(shape), targets=targets.reshape(shape),
                  positions=positions.reshape(shape), segment_ids=segment_ids.reshape(shape),
                  loss_mask=loss_mask.reshape(shape),
                  byte_count=covered_bytes(targets, loss_mask, tokenizer.byte_lengths()))


def covered_bytes(targets: np.ndarray, loss_mask: np.ndarray, byte_lengths: np.ndarray) -> float:
    """UTF-8 bytes the masked-in targets stand for: the denominator of bits per byte."""
    byte_lengths = np.asarray(byte_lengths, dtype=np.float64)
    counts = np.bincount(np.ravel(targets), weights=np.ravel(loss_mask).astype(np.float64),
                         minlength=len(byte_lengths))
    return float(counts @ byte_lengths)


def _tokenize(docs: Sequence[Document], tokenizer: Tokenizer) -> tuple[list[np.ndarray],
                                                                       np.ndarray]:
    """Token ids per document (prompt ++ response for chat data) and each prompt's length."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is None:
        def encode_batch(texts):
            return [tokenizer.encode(text) for text in texts]
    bodies = encode_batch([doc.text for doc in docs])
    chat_at = [i for i, doc in enumerate(docs) if doc.prompt is not None]
    prompt_lengths = np.zeros(len(docs), dtype=np.int64)
    if chat_at:
        prompts = encode_batch([docs[i].prompt for i in chat_at])
        for i, prompt_ids in zip(chat_at, prompts):
            prompt_lengths[i] = len(prompt_ids)
            bodies[i] = np.concatenate([np.asarray(prompt_ids), np.asarray(bodies[i])])
    return [np.asarray(ids, dtype=np.int32) for ids in bodies], prompt_lengths


# -------------------------------------------------------------------------------- batches


class Batches:
    """The batch of any global step, as a pure function of (rows, seed, step).

    The stream of rows runs epoch after epoch; epoch e visits rows in the order
    `default_rng([seed, e]).permutation(n_rows)`. The global batch of step s is stream elements
    [s*B, (s+1)*B), and process p takes the contiguous slice [p*B/P, (p+1)*B/P) of it, so the
    data position (step * B) means the same thing for any number of processes or devices.
    """

    def __init__(self, packed: Packed, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch <= 0:
            raise ConfigError(f"train.batch_size must be > 0, got {global_batch}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ConfigError(f"process index {process_index} is not in [0, {process_count})")
        if global_batch % process_count:
            raise ConfigError(f"train.batch_size ({global_batch}) is not divisible by the "
                              f"number of processes ({process_count})")
        self.packed = packed
        self.global_batch = global_batch
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch = global_batch // process_count
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def n_rows(self) -> int:
        return self.packed.n_rows

    def position(self, step: int) -> int:
        """Global sequences consumed before `step`; independent of the process count."""
        return step * self.global_batch

    def epoch(self, step: int) -> float:
        return self.position(step) / self.n_rows

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:  # a batch spans at most a few epochs
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.n_rows)
        return self._permutations[epoch]

    def rows(self, step: int, positions: np.ndarray | None = None) -> np.ndarray:
        """Row indices of this process's share of step `step`.

        `positions` picks other places in the global batch (0 .. global_batch - 1) instead: the
        rows a process's devices hold under a mesh (`kd_jax.sharding.batch_positions`).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if positions is None:
            first = self.process_index * self.local_batch
            positions = np.arange(first, first + self.local_batch, dtype=np.int64)
        stream = self.position(step) + np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(stream, self.n_rows)
        rows = np.empty(len(stream), dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self.permutation(int(epoch))[offsets[here]]
        return rows

    def at(self, step: int, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        rows = self.rows(step, positions)
        return {key: getattr(self.packed, key)[rows].astype(np.int32) for key in BATCH_KEYS}


def heldout_batches(packed: Packed, batch: int, max_sequences: int) -> Iterator[dict[str,
                                                                                     np.ndarray]]:
    """The first `max_sequences` rows (all if <= 0) in order, in batches of exactly `batch`.

    The last batch is filled with all-zero rows (loss_mask 0), so the jitted evaluation
    function compiles for one shape and the padding adds nothing to masked sums.
    """
    if batch <= 0:
        raise ConfigError(f"evaluation batch must be > 0, got {batch}")
    n_rows = packed.n_rows if max_sequences <= 0 else min(max_sequences, packed.n_rows)
    for first in range(0, n_rows, batch):
        last = min(first + batch, n_rows)
        out = {}
        for key in BATCH_KEYS:
            values = np.zeros((batch, packed.seq_len), dtype=np.int32)
            values[: last - first] = getattr(packed, key)[first:last]
            out[key] = values
        yield out


def fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """A stable hash of everything that decides the packed rows and their order.

    File sources are identified by their path patterns, not their contents (hashing a large
    corpus would cost a full read); the stdlib source by the interpreter version.
    """
    identity = {
        "version": _FINGERPRINT_VERSION,
        "source": cfg.source,
        "path": cfg.path,
        "name": cfg.name,
        "split": cfg.split,
        "heldout_split": cfg.heldout_split,
        "heldout_fraction": cfg.heldout_fraction,
        "text_column": cfg.text_column,
        "prompt_column": cfg.prompt_column,
        "response_column": cfg.response_column,
        "seq_len": cfg.seq_len,
        "max_documents": cfg.max_documents,
        "seed": cfg.seed,
        "tokenizer": tokenizer.fingerprint,
    }
    if cfg.source == "stdlib":
        identity["python"] = platform.python_version()
    encoded = json.dumps(identity, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]
