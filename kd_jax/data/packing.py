"""Packing: documents -> token ids -> rows of next-token pairs with segment ids.

Packing is greedy concatenate-and-split: every document contributes its (input, next-token
label) pairs, which are streamed into rows of `seq_len`; a document that does not fit in the
rest of a row continues in the next one with its positions restarting at 0. Only the last row is
padded. numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kd_jax.config import ConfigError
from kd_jax.data.sources import Document
from kd_jax.data.tokenizers import Tokenizer

# The arrays of a packed row, and of a batch: `labels` are the next-token ids.
BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass
class Packed:
    """Packed rows; every array is int32 [n_rows, seq_len]. Padding is 0 everywhere."""

    tokens: np.ndarray
    labels: np.ndarray  # the next token of each position
    positions: np.ndarray  # restart at 0 at each document piece
    segment_ids: np.ndarray  # 1, 2, ... per document piece within a row; 0 is padding
    loss_mask: np.ndarray  # 1 where the label is trained on
    byte_count: float  # UTF-8 bytes covered by the masked-in labels, for bits per byte

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def pack(docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int,
         add_bos: bool = True) -> Packed:
    """Greedy concatenate-and-split packing of next-token pairs; deterministic, vectorized.

    With `add_bos`, every document starts with the tokenizer's `document_prefix` (a Llama
    checkpoint's beginning-of-sequence token, which its model expects first), as it would
    encode the document alone.
    """
    if seq_len <= 0:
        raise ConfigError(f"data.seq_len must be > 0, got {seq_len}")
    ids_per_doc, prompt_lengths = _tokenize(docs, tokenizer)
    prefix = np.asarray(tokenizer.document_prefix if add_bos else (), dtype=np.int32)
    if len(prefix):  # the prefix belongs to the prompt: never a label
        ids_per_doc = [np.concatenate([prefix, ids]) for ids in ids_per_doc]
        prompt_lengths = np.where(prompt_lengths > 0, prompt_lengths + len(prefix), 0)
    lengths = np.array([len(ids) for ids in ids_per_doc], dtype=np.int64)
    keep = lengths >= 2  # a document needs two tokens to make one (input, label) pair
    if not keep.any():
        raise ConfigError(f"the data is empty: none of {len(docs)} documents has 2 or more "
                          "tokens")
    ids_per_doc = [ids for ids, kept in zip(ids_per_doc, keep) if kept]
    lengths, prompt_lengths = lengths[keep], prompt_lengths[keep]

    # Pair j of a document is (token j, token j + 1): the pair stream is the token stream
    # without each document's last token, and the labels are it without each first token.
    all_ids = np.concatenate(ids_per_doc).astype(np.int32, copy=False)
    token_ends = np.cumsum(lengths)
    pair_ends = token_ends - np.arange(1, len(lengths) + 1)  # one pair fewer than tokens
    pair_starts = pair_ends - (lengths - 1)
    n_pairs = int(pair_ends[-1])
    n_rows = -(-n_pairs // seq_len)
    size = n_rows * seq_len

    tokens = np.zeros(size, dtype=np.int32)
    labels = np.zeros(size, dtype=np.int32)
    is_last = np.zeros(len(all_ids), dtype=bool)
    is_last[token_ends - 1] = True
    tokens[:n_pairs] = all_ids[~is_last]
    is_first = np.zeros(len(all_ids), dtype=bool)
    is_first[token_ends - lengths] = True
    labels[:n_pairs] = all_ids[~is_first]

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
    return Packed(tokens=tokens.reshape(shape), labels=labels.reshape(shape),
                  positions=positions.reshape(shape), segment_ids=segment_ids.reshape(shape),
                  loss_mask=loss_mask.reshape(shape),
                  byte_count=covered_bytes(labels, loss_mask, tokenizer.byte_lengths()))


def covered_bytes(labels: np.ndarray, loss_mask: np.ndarray, byte_lengths: np.ndarray) -> float:
    """UTF-8 bytes the masked-in labels stand for: the denominator of bits per byte."""
    byte_lengths = np.asarray(byte_lengths, dtype=np.float64)
    counts = np.bincount(np.ravel(labels), weights=np.ravel(loss_mask).astype(np.float64),
                         minlength=len(byte_lengths))
    return float(counts @ byte_lengths)


def _tokenize(docs: Sequence[Document], tokenizer: Tokenizer) -> tuple[list[np.ndarray],
                                                                       np.ndarray]:
    """Token ids per document (prompt ++ response for chat data) and each prompt's length."""
    encode_batch = tokenizer.encode_batch
    bodies = encode_batch([doc.text for doc in docs])
    chat_at = [i for i, doc in enumerate(docs) if doc.prompt is not None]
    prompt_lengths = np.zeros(len(docs), dtype=np.int64)
    if chat_at:
        prompts = encode_batch([docs[i].prompt for i in chat_at])
        for i, prompt_ids in zip(chat_at, prompts):
            prompt_lengths[i] = len(prompt_ids)
            bodies[i] = np.concatenate([np.asarray(prompt_ids), np.asarray(bodies[i])])
    return [np.asarray(ids, dtype=np.int32) for ids in bodies], prompt_lengths
