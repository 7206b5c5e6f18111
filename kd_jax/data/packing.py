"""Packing: documents -> token ids -> rows of next-token pairs with segment ids.

Packing is greedy concatenate-and-split: every document contributes its (input, next-token
label) pairs, which are streamed into rows of `seq_len`; a document that does not fit in the
rest of a row continues in the next one with its positions restarting at 0. Only the last row is
padded.

A row is never stored: it is derived from the token stream (every document's ids back to back)
and a `PairIndex` (where each document's pairs begin). Row r holds pairs [r * seq_len,
(r + 1) * seq_len) of the stream, and pair p of document d is (token t, token t + 1) with
t = token_starts[d] + p - pair_starts[d]. The same `derive_rows` serves rows packed in memory
(`pack`) and rows read from an on-disk token store (`kd_jax.data.store`), so both are the same
rows by construction. numpy only.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Protocol, Sequence

import numpy as np

from kd_jax.config import ConfigError
from kd_jax.data.sources import Document
from kd_jax.data.tokenizers import Tokenizer

# The arrays of a packed row, and of a batch: `labels` are the next-token ids.
BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")
# Rows derived at once: bounds the [rows, seq_len] int64 temporaries of `derive_rows`.
_DERIVE_BLOCK_TOKENS = 1 << 22


@dataclasses.dataclass
class Tokenized:
    """Documents as one token stream."""

    ids: np.ndarray  # int32, every document's ids back to back (its prefix included)
    lengths: np.ndarray  # int64 [documents]
    # int64 [spans, 2]: [start, end) of stream tokens never trained on as labels (a prompt, a
    # chat's user turns), sorted and disjoint
    untrained: np.ndarray


@dataclasses.dataclass(frozen=True)
class PairIndex:
    """Where the pairs of each packed document begin, in the pair stream and the token stream.

    Only documents with 2 or more tokens are packed (one pair needs two tokens)."""

    token_starts: np.ndarray  # int64 [packed documents]: its first token in the token stream
    pair_starts: np.ndarray  # int64 [packed documents]: its first pair in the pair stream
    n_pairs: int
    seq_len: int

    @property
    def n_rows(self) -> int:
        return -(-self.n_pairs // self.seq_len)


class Rows(Protocol):
    """Packed rows, wherever they are: in memory (`Packed`) or in a token store on disk."""

    @property
    def n_rows(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    @property
    def trained_tokens(self) -> int:
        """How many labels the loss covers."""

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of `rows` (int64 indices), int32 [len(rows), seq_len] each."""

    def row_hashes(self) -> np.ndarray:
        """uint64 [n_rows]: `row_hashes` of every row, what a teacher cache is checked against."""

    def document_starts(self, rows: np.ndarray) -> np.ndarray:
        """bool [len(rows), seq_len]: where a piece starts its document (`document_starts`)."""


@dataclasses.dataclass
class Packed:
    """Packed rows held in memory; every array is int32 [n_rows, seq_len]. Padding is 0."""

    tokens: np.ndarray
    labels: np.ndarray  # the next token of each position
    positions: np.ndarray  # restart at 0 at each document piece
    segment_ids: np.ndarray  # 1, 2, ... per document piece within a row; 0 is padding
    loss_mask: np.ndarray  # 1 where the label is trained on
    byte_count: float  # UTF-8 bytes covered by the masked-in labels, for bits per byte
    # bool [n_rows, seq_len]: where a piece starts its document (None: not known, and then
    # every piece but a row's first is taken to start one, as greedy packing makes them)
    starts: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def trained_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of `rows`, int32 [len(rows), seq_len] each."""
        rows = np.asarray(rows, dtype=np.int64)
        return {key: getattr(self, key)[rows].astype(np.int32) for key in BATCH_KEYS}

    def document_starts(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.starts is not None:
            return self.starts[rows]
        segment_ids = self.segment_ids[rows]
        opens = np.zeros(segment_ids.shape, dtype=bool)
        opens[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
        return opens

    def row_hashes(self) -> np.ndarray:
        return row_hashes(self.tokens, self.segment_ids, self.loss_mask)


def pack(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int,
         add_bos: bool = True) -> Packed:
    """Greedy concatenate-and-split packing of next-token pairs, in memory; deterministic.

    With `add_bos`, every document starts with the tokenizer's `document_prefix` (a Llama
    checkpoint's beginning-of-sequence token, which its model expects first), as it would
    encode the document alone.
    """
    check_seq_len(seq_len)
    tokenized = tokenize(docs, tokenizer, add_bos)
    starts = np.cumsum(tokenized.lengths) - tokenized.lengths
    index = index_documents(starts, tokenized.lengths, seq_len)
    if index.n_pairs == 0:
        raise ConfigError(f"the data is empty: none of {len(docs)} documents has 2 or more "
                          "tokens")
    ids = tokenized.ids
    spans = tokenized.untrained
    arrays = derive_all(index, lambda at: ids[at], (spans[:, 0].copy(), spans[:, 1].copy()))
    return Packed(**arrays, byte_count=covered_bytes(arrays["labels"], arrays["loss_mask"],
                                                     tokenizer.byte_lengths()),
                  starts=document_starts(index, np.arange(index.n_rows)))


def check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len must be > 0, got {seq_len}")


def tokenize(docs: Sequence[Document], tokenizer: Tokenizer, add_bos: bool) -> Tokenized:
    """The token stream of `docs`: prefix ++ prompt ++ text, or a chat's rendered pieces.

    Each piece of text is encoded on its own, so a mask boundary never falls inside a token.
    A rendered chat carries its own beginning-of-sequence text (the template writes it), so
    it gets no prefix.
    """
    prefix = np.asarray(tokenizer.document_prefix if add_bos else (), dtype=np.int32)
    pieces, flags, owners = [], [], []
    for number, doc in enumerate(docs):
        if doc.pieces:
            for text, trained in doc.pieces:
                pieces.append(text)
                flags.append(trained)
                owners.append(number)
            continue
        if doc.prompt is not None:
            pieces.append(doc.prompt)
            flags.append(False)
            owners.append(number)
        pieces.append(doc.text)
        flags.append(True)
        owners.append(number)
    encoded = tokenizer.encode_batch(pieces) if pieces else []
    piece_lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    owners = np.asarray(owners, dtype=np.int64)
    flags = np.asarray(flags, dtype=bool)

    # The prefix goes before each document's first piece, except a rendered chat's.
    has_prefix = np.array([bool(len(prefix)) and not doc.pieces for doc in docs], dtype=bool)
    parts, part_lengths, part_untrained = [], [], []
    first_piece = np.ones(len(owners), dtype=bool)
    first_piece[1:] = owners[1:] != owners[:-1]
    for ids, owner, first, trained in zip(encoded, owners, first_piece, flags):
        if first and has_prefix[owner]:
            parts.append(prefix)
            part_lengths.append(len(prefix))
            # The prefix belongs to a prompt: untrained with it, and a label of plain text
            # never (pair 0 predicts the first text token).
            part_untrained.append(docs[owner].prompt is not None and len(ids) > 0)
        parts.append(np.asarray(ids, dtype=np.int32))
        part_lengths.append(len(ids))
        part_untrained.append(not trained)
    lengths = np.bincount(owners, weights=piece_lengths, minlength=len(docs)).astype(np.int64)
    lengths += has_prefix * len(prefix)
    part_lengths = np.asarray(part_lengths, dtype=np.int64)
    part_ends = np.cumsum(part_lengths)
    untrained_parts = np.asarray(part_untrained, dtype=bool) & (part_lengths > 0)
    spans = np.stack([(part_ends - part_lengths)[untrained_parts], part_ends[untrained_parts]],
                     axis=1) if len(part_ends) else np.zeros((0, 2), dtype=np.int64)
    ids = np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(
        0, np.int32)
    return Tokenized(ids=ids, lengths=lengths, untrained=_merge_spans(spans))


def _merge_spans(spans: np.ndarray) -> np.ndarray:
    """Adjacent [start, end) spans joined (a prefix and its prompt), so spans stay disjoint."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) < 2:
        return spans
    new_run = np.ones(len(spans), dtype=bool)
    new_run[1:] = spans[1:, 0] != spans[:-1, 1]
    run_ends = np.append(np.flatnonzero(new_run)[1:], len(spans)) - 1
    return np.stack([spans[new_run, 0], spans[run_ends, 1]], axis=1)


def index_documents(token_starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> PairIndex:
    """The pair index of documents (in this order) starting at `token_starts` in the stream."""
    check_seq_len(seq_len)
    token_starts = np.asarray(token_starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = lengths >= 2  # a document needs two tokens to make one (input, label) pair
    token_starts, lengths = token_starts[keep], lengths[keep]
    pair_counts = lengths - 1
    pair_ends = np.cumsum(pair_counts)
    n_pairs = int(pair_ends[-1]) if len(pair_ends) else 0
    return PairIndex(token_starts=token_starts, pair_starts=pair_ends - pair_counts,
                     n_pairs=n_pairs, seq_len=seq_len)


Spans = tuple[np.ndarray, np.ndarray]  # (starts, ends) of sorted, disjoint [start, end) ranges


def derive_rows(index: PairIndex, rows: np.ndarray, read_tokens: Callable[[np.ndarray],
                                                                           np.ndarray],
                untrained: Spans) -> dict[str, np.ndarray]:
    """The arrays of packed `rows`, int32 [len(rows), seq_len] each.

    `read_tokens(at)` returns the stream's ids at int64 indices `at` (any shape); `untrained`
    holds the stream's spans whose tokens are never trained on as labels. Only the documents
    and spans the rows touch are read (binary searches), so the arrays may be memory maps.
    """
    seq_len = index.seq_len
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    shape = (len(rows), seq_len)
    if len(rows) == 0 or index.n_pairs == 0:
        return {key: np.zeros(shape, dtype=np.int32) for key in BATCH_KEYS}
    if rows.min() < 0 or rows.max() >= index.n_rows:
        raise IndexError(f"rows must lie in [0, {index.n_rows}), got {rows.min()}..{rows.max()}")
    pairs = rows[:, None] * seq_len + np.arange(seq_len, dtype=np.int64)
    real = pairs < index.n_pairs
    pairs = np.minimum(pairs, index.n_pairs - 1)  # padding reads the last pair, then is zeroed
    document = np.searchsorted(index.pair_starts, pairs, side="right") - 1
    pair_start = index.pair_starts[document]
    at = index.token_starts[document] + (pairs - pair_start)
    tokens = read_tokens(at)
    labels = read_tokens(at + 1)

    # The label (token at + 1) is trained on unless an untrained span holds it.
    span_starts, span_ends = untrained
    trained = np.ones(shape, dtype=bool)
    if len(span_starts):
        span = np.searchsorted(span_starts, at + 1, side="right") - 1
        trained &= ~((span >= 0) & (at + 1 < span_ends[np.maximum(span, 0)]))

    # A piece is a run of one document's pairs within one row: the pieces of a row are
    # consecutive documents, numbered from 1, and positions restart at each piece.
    row_start = rows[:, None] * seq_len
    positions = pairs - np.maximum(pair_start, row_start)
    segment_ids = document - document[:, :1] + 1
    out = {"tokens": tokens, "labels": labels, "positions": positions,
           "segment_ids": segment_ids, "loss_mask": trained}
    return {key: np.where(real, value, 0).astype(np.int32) for key, value in out.items()}


def document_starts(index: PairIndex, rows: np.ndarray) -> np.ndarray:
    """bool [len(rows), seq_len]: where a row's pair is its document's first (a piece that
    starts there starts the document; one that starts elsewhere continues it)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    pairs = rows[:, None] * index.seq_len + np.arange(index.seq_len, dtype=np.int64)
    # A binary search in the sorted starts: only the rows' own documents are touched.
    document = np.searchsorted(index.pair_starts, pairs, side="right") - 1
    first = (document >= 0) & (index.pair_starts[np.maximum(document, 0)] == pairs)
    return first & (pairs < index.n_pairs)


def derive_all(index: PairIndex, read_tokens: Callable[[np.ndarray], np.ndarray],
               untrained: Spans) -> dict[str, np.ndarray]:
    """Every row of `index`, derived a block at a time (bounded temporaries)."""
    out = {key: np.zeros((index.n_rows, index.seq_len), dtype=np.int32) for key in BATCH_KEYS}
    block = max(1, _DERIVE_BLOCK_TOKENS // index.seq_len)
    for first in range(0, index.n_rows, block):
        rows = np.arange(first, min(first + block, index.n_rows))
        for key, value in derive_rows(index, rows, read_tokens, untrained).items():
            out[key][rows] = value
    return out


def covered_bytes(labels: np.ndarray, loss_mask: np.ndarray, byte_lengths: np.ndarray) -> float:
    """UTF-8 bytes the masked-in labels stand for: the denominator of bits per byte."""
    byte_lengths = np.asarray(byte_lengths, dtype=np.float64)
    counts = np.bincount(np.ravel(labels), weights=np.ravel(loss_mask).astype(np.float64),
                         minlength=len(byte_lengths))
    return float(counts @ byte_lengths)


def row_hashes(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """uint64 [rows]: blake2b-64 of each row's tokens, segment_ids, loss_mask as int32 LE bytes.

    A cache row and a data row with the same hash were built from the same packed sequence.
    """
    arrays = []
    for name, array in (("tokens", tokens), ("segment_ids", segment_ids),
                        ("loss_mask", loss_mask)):
        array = np.asarray(array)
        if array.ndim != 2 or array.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array [rows, seq_len], got "
                             f"{array.dtype} {array.shape}")
        as_int32 = np.ascontiguousarray(array, dtype="<i4")
        if not np.array_equal(as_int32, array):
            raise ValueError(f"{name} has values outside int32")
        arrays.append(as_int32)
    if len({array.shape for array in arrays}) != 1:
        raise ValueError(f"tokens, segment_ids and loss_mask differ in shape: "
                         f"{[array.shape for array in arrays]}")
    hashes = np.empty(arrays[0].shape[0], dtype=np.uint64)
    for row in range(len(hashes)):
        digest = hashlib.blake2b(digest_size=8)
        for array in arrays:
            digest.update(array[row])
        hashes[row] = int.from_bytes(digest.digest(), "little")
    return hashes
