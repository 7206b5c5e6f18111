"""The teacher's rows for a batch of the student's packed rows, and where they align.

A packed student row holds pieces of documents (`kd_jax.data.packing`: positions restart at
each piece, and the model reads a piece alone). Each piece is also written for the teacher: its
text is what the piece's tokens spell (its inputs, and the last position's label, the text the
piece's last position predicts), tokenized by the teacher's tokenizer, after the teacher's own
document prefix (its BOS) where the piece starts a document. The teacher's pieces fill a row of
`teacher_seq_len` in the same order. Every student position then has `teacher_index`, the
position in the teacher's row that has read exactly the text it has (`kd_jax.align.positions`),
or -1, and `same_next`, whether the two next tokens are the same text. With `backoff`, also
what `kd_jax.losses.cross_bytes` reads: `teacher_back`, the teacher position before the token
the student position ends in (-1 where there is none in the row), `teacher_inside`, how many of
that token's bytes the student has read, and `teacher_lo`, `teacher_hi`, the run of the
teacher's sorted spellings that start with them (`kd_jax.align.vocabulary.SortedSpellings`).

Two cases leave a piece's positions unaligned: a piece that starts inside a character (a
byte-level student cut a multi-byte character at a row boundary: the teacher can only read from
the next whole character, so no teacher position has read what the student has), and teacher
tokens past `teacher_seq_len` (a teacher that needs more tokens for the same text than the
student; the row is cut, and the positions that would align past the cut do not).
Special tokens inside a piece (a chat template's markers) spell no text, so the teacher's piece
does not hold them; rendering a conversation in each side's own template is the caller's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kd_jax.align.positions import align, byte_ends, covering
from kd_jax.align.vocabulary import SortedSpellings
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer

# The arrays `teacher_rows` returns: the teacher's row, and per student position its alignment.
TEACHER_KEYS = ("teacher_tokens", "teacher_positions", "teacher_segment_ids")
ALIGNMENT_KEYS = ("teacher_index", "same_next")
BACKOFF_KEYS = ("teacher_back", "teacher_inside", "teacher_lo", "teacher_hi")
_SORTED: dict[str, SortedSpellings] = {}  # by tokenizer fingerprint


def sorted_spellings(tokenizer: Tokenizer) -> SortedSpellings:
    """The tokenizer's spellings sorted, made once a process."""
    if tokenizer.fingerprint not in _SORTED:
        _SORTED[tokenizer.fingerprint] = SortedSpellings(tokenizer.token_bytes())
    return _SORTED[tokenizer.fingerprint]


def _whole_characters(raw: bytes) -> tuple[int, int]:
    """(bytes to skip at the start, bytes to drop at the end) for `raw` to be whole UTF-8
    characters: continuation bytes (10xxxxxx) before the first character start, and an
    incomplete character at the end."""
    start = 0
    while start < len(raw) and start < 4 and raw[start] & 0xC0 == 0x80:
        start += 1
    end = len(raw)
    for back in range(1, min(4, len(raw) - start) + 1):
        byte = raw[end - back]
        if byte & 0xC0 == 0x80:
            continue
        need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        if need > back:
            end -= back
        break
    return start, len(raw) - end


def _pieces(segment_ids_s: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each piece (a run of one segment id > 0) in a row."""
    real = np.flatnonzero(segment_ids_s > 0)
    if len(real) == 0:
        return []
    cuts = np.flatnonzero(np.diff(segment_ids_s[real]) != 0) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(real, cuts)]


def teacher_rows(batch: dict[str, np.ndarray], student: Tokenizer, teacher: Tokenizer,
                 teacher_seq_len: int, document_start: np.ndarray, backoff: bool = False
                 ) -> dict[str, np.ndarray]:
    """The teacher's rows and the alignment for a batch of packed student rows (`tokens`,
    `labels`, `segment_ids`: int [rows, seq_len]); `document_start` [rows, seq_len] is True
    where a piece starts a document (then the teacher's piece starts with its document prefix).
    Returns int32 `teacher_tokens`, `teacher_positions`, `teacher_segment_ids` [rows,
    teacher_seq_len] (0 past the pieces) and int32 `teacher_index`, bool `same_next` [rows,
    seq_len]; with `backoff`, int32 BACKOFF_KEYS [rows, seq_len] too (the module docstring)."""
    tokens, labels = np.asarray(batch["tokens"]), np.asarray(batch["labels"])
    segment_ids = np.asarray(batch["segment_ids"])
    rows, seq_len = tokens.shape
    student_bytes, teacher_bytes = student.token_bytes(), teacher.token_bytes()
    prefix = np.asarray(teacher.document_prefix, dtype=np.int64)

    # Every piece's text first, so the teacher's tokenizer takes them as one batch.
    pieces: list[tuple[int, int, int, bytes, int]] = []  # row, start, end, bytes, skipped
    texts: list[str] = []
    for row in range(rows):
        for start, end in _pieces(segment_ids[row]):
            ids = np.append(tokens[row, start:end], labels[row, end - 1])
            raw = b"".join(student_bytes[int(token_id)] for token_id in ids)
            skip, drop = _whole_characters(raw)
            pieces.append((row, start, end, raw, skip))
            texts.append(raw[skip:len(raw) - drop].decode("utf-8"))
    encoded: Sequence[np.ndarray] = teacher.encode_batch(texts) if texts else []

    out = {key: np.zeros((rows, teacher_seq_len), np.int32) for key in TEACHER_KEYS}
    teacher_index = np.full((rows, seq_len), -1, np.int32)
    same_next = np.zeros((rows, seq_len), bool)
    backed = {key: np.zeros((rows, seq_len), np.int32) for key in BACKOFF_KEYS}
    backed["teacher_back"][:] = -1
    spellings = sorted_spellings(teacher) if backoff else None
    filled = np.zeros(rows, np.int64)
    for (row, start, end, raw, skip), text, ids in zip(pieces, texts, encoded):
        piece_ids = np.concatenate([prefix, ids]) if document_start[row, start] else ids
        at, room = filled[row], teacher_seq_len - filled[row]
        kept = piece_ids[:room]
        out["teacher_tokens"][row, at:at + len(kept)] = kept
        out["teacher_positions"][row, at:at + len(kept)] = np.arange(len(kept))
        out["teacher_segment_ids"][row, at:at + len(kept)] = segment_ids[row, start]
        filled[row] += len(kept)
        if skip or len(kept) == 0:  # the teacher cannot read what the student read first
            continue
        student_ids = np.append(tokens[row, start:end], labels[row, end - 1])
        student_ends = byte_ends(student_ids, student_bytes, raw, "the student's tokenizer")
        teacher_ends = byte_ends(piece_ids, teacher_bytes, text.encode("utf-8"),
                                 "the teacher's tokenizer")
        alignment = align(student_ends, teacher_ends)
        # The piece's positions (not the label appended to spell the last prediction).
        position, next_same = alignment.teacher_position[:-1], alignment.same_next[:-1]
        inside = (position >= 0) & (position < len(kept))
        teacher_index[row, start:end] = np.where(inside, at + position, -1)
        same_next[row, start:end] = inside & next_same
        if backoff:
            lengths = np.array([len(teacher_bytes[int(t)]) for t in piece_ids], np.int64)
            cover = covering(student_ends[:-1], teacher_ends, lengths)
            # A token read from the position before it, both in the row.
            has = (cover.token >= 1) & (cover.token < len(kept))
            for offset in np.flatnonzero(has):
                token = int(piece_ids[cover.token[offset]])
                read = int(cover.inside[offset])
                lo, hi = spellings.run(teacher_bytes[token][:read])
                backed["teacher_lo"][row, start + offset] = lo
                backed["teacher_hi"][row, start + offset] = hi
            backed["teacher_back"][row, start:end] = np.where(has, at + cover.token - 1, -1)
            backed["teacher_inside"][row, start:end] = np.where(has, cover.inside, 0)
    return {**out, "teacher_index": teacher_index, "same_next": same_next,
            **(backed if backoff else {})}


def teacher_fields(data: Rows, student: Tokenizer, teacher: Tokenizer, teacher_seq_len: int,
                   backoff: bool = False) -> Callable[[np.ndarray, dict], dict[str, np.ndarray]]:
    """A teacher's `host_fields(rows, batch)`: for `batch`, rows `rows` of `data`, the teacher's
    rows and `teacher_index`, and with `backoff` BACKOFF_KEYS (what the step reads; `same_next`
    stays on the host)."""
    keys = (*TEACHER_KEYS, "teacher_index", *(BACKOFF_KEYS if backoff else ()))

    def fields(rows: np.ndarray, batch: dict) -> dict[str, np.ndarray]:
        out = teacher_rows(batch, student, teacher, teacher_seq_len, data.document_starts(rows),
                           backoff)
        return {key: out[key] for key in keys}

    return fields


def teacher_seq_len_for(batch: dict[str, np.ndarray], student: Tokenizer, teacher: Tokenizer,
                        document_start: np.ndarray, longest: int, multiple: int = 64) -> int:
    """A teacher row length for rows like `batch`'s: the most teacher tokens one of them takes
    (written into rows of `longest`), a tenth more, rounded up to a `multiple`, at most
    `longest`."""
    rows = teacher_rows(batch, student, teacher, longest, document_start)
    most = int((rows["teacher_segment_ids"] > 0).sum(axis=1).max(initial=1))
    return min(longest, -(-int(most * 1.1) // multiple) * multiple)
