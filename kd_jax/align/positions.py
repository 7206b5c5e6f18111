"""Which teacher position has seen exactly the text a student position has seen.

A causal model's position i has read tokens 0..i and predicts token i + 1. Spelled in bytes,
token i ends at byte E[i] (the byte lengths of tokens 0..i summed): position i has read
text[:E[i]] and predicts the text from byte E[i] on. A student position i and a teacher position
j have read the same text exactly when E_student[i] == E_teacher[j]; then both predict the same
continuation, whatever either tokenizer did before (digits merged on one side and split on the
other, a multi-byte character in byte-fallback pieces, runs of spaces taken whole or not). A
student position that ends inside a teacher token (a teacher that merged "12" where the student
reads "1", "2") has no such teacher position: it is unaligned, and a loss leaves it to the hard
label. Tokens that spell nothing (a BOS, a special marker) end where the token before them does:
of several teacher positions with the same end, the last is taken (the one whose next token is
the text's); a BOS on one side only is unaligned, since the other side has no position that has
read nothing.

Whether the two next tokens are also the same text (`same_next`) is a second question: where
they are not (the student predicts "1", the teacher "12"), a loss over matched vocabulary
entries compares different events, and one over sorted probabilities (ULD) does not care.

Where a student position ends inside a teacher token, or at its end, `covering` names that
teacher token and how many of its bytes the student has read: what a loss needs to take the
teacher's distribution back to where the token started (`kd_jax.losses.cross_bytes`).

Bytes are what each tokenizer's `token_bytes()` says a token spells, so the two tokenizations
must spell the row's text to the byte; one leading space that a SentencePiece tokenizer adds
(its dummy prefix) is allowed for, anything else (a normalizer that lowercases, strips accents,
folds unicode) is refused with the first bytes that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kd_jax.config import ConfigError


@dataclass(frozen=True)
class Alignment:
    """Per student position: `teacher_position` the teacher position that has read exactly the
    same text (int32, -1 where none has), and `same_next` whether the two next tokens also spell
    the same text (False where unaligned or where either side has no next token)."""

    teacher_position: np.ndarray
    same_next: np.ndarray

    @property
    def aligned(self) -> np.ndarray:
        return self.teacher_position >= 0


def byte_ends(ids: np.ndarray, token_bytes: Sequence[bytes], text: bytes, who: str
              ) -> np.ndarray:
    """E[i], the bytes of `text` read once `ids[:i + 1]` have been (int64), checked: the tokens
    must spell `text`, or `text` after one space a SentencePiece tokenizer put before it.
    `who` names the tokenizer in the error."""
    pieces = [token_bytes[int(token_id)] for token_id in ids]
    spelled = b"".join(pieces)
    ends = np.cumsum([len(piece) for piece in pieces], dtype=np.int64)
    if spelled == text:
        return ends
    if spelled == b" " + text:  # the dummy prefix: its space is text no one wrote
        return np.maximum(ends - 1, 0)
    at = next((k for k, (a, b) in enumerate(zip(spelled, text)) if a != b),
              min(len(spelled), len(text)))
    raise ConfigError(
        f"{who}: its tokens do not spell the text (from byte {at}: {spelled[at:at + 16]!r} "
        f"where the text has {text[at:at + 16]!r}); a tokenizer whose normalizer changes the "
        "text cannot be aligned with another")


def align(student_ends: np.ndarray, teacher_ends: np.ndarray) -> Alignment:
    """The alignment of two tokenizations of one text from their byte ends (`byte_ends`)."""
    student_ends = np.asarray(student_ends, dtype=np.int64)
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    # The last teacher position ending at or before each student end; aligned if it ends there.
    last = np.searchsorted(teacher_ends, student_ends, side="right") - 1
    found = last >= 0
    found[found] = teacher_ends[last[found]] == student_ends[found]
    teacher_position = np.where(found, last, -1).astype(np.int32)

    # The next tokens end at the following ends; both must exist and end at the same byte
    # (they start at the same byte: the aligned ends).
    has_next = found.copy()
    has_next[-1:] = False  # the student's last position has no next token here
    has_next &= last + 1 < len(teacher_ends)
    same_next = np.zeros(len(student_ends), dtype=bool)
    rows = np.flatnonzero(has_next)
    same_next[rows] = student_ends[rows + 1] == teacher_ends[last[rows] + 1]
    return Alignment(teacher_position, same_next)


def align_ids(student_ids: np.ndarray, student_bytes: Sequence[bytes], teacher_ids: np.ndarray,
              teacher_bytes: Sequence[bytes], text: str) -> Alignment:
    """`align` of two token sequences of `text`, each checked to spell it (`byte_ends`)."""
    raw = text.encode("utf-8")
    return align(byte_ends(student_ids, student_bytes, raw, "the student's tokenizer"),
                 byte_ends(teacher_ids, teacher_bytes, raw, "the teacher's tokenizer"))


@dataclass(frozen=True)
class Covering:
    """Per student position: `token` the teacher position of the teacher token that holds the
    last byte the student has read (int32, -1 where none does: a position that has read
    nothing, or past the teacher's tokens), and `inside` how many of that token's bytes the
    student has read (int32, from 1 to its length; 0 where `token` is -1). The student has
    read the teacher's text up to the token's start, then the token's first `inside` bytes."""

    token: np.ndarray
    inside: np.ndarray


def covering(student_ends: np.ndarray, teacher_ends: np.ndarray, teacher_lengths: np.ndarray
             ) -> Covering:
    """The teacher token each student position ends in (`Covering`), from the two byte ends
    (`byte_ends`) and the bytes each teacher token spells (`teacher_lengths`, which holds the
    dummy prefix's space where `byte_ends` took it off)."""
    student_ends = np.asarray(student_ends, dtype=np.int64)
    teacher_ends = np.asarray(teacher_ends, dtype=np.int64)
    # The first teacher token ending at or after the student's end; tokens that spell nothing
    # (a BOS) end where the one before them does, and are never first to reach past it.
    token = np.searchsorted(teacher_ends, student_ends, side="left")
    found = (student_ends > 0) & (token < len(teacher_ends))
    at = np.minimum(token, len(teacher_ends) - 1)
    start = teacher_ends[at] - np.asarray(teacher_lengths, dtype=np.int64)[at]
    inside = np.where(found, student_ends - start, 0)
    return Covering(np.where(found, token, -1).astype(np.int32), inside.astype(np.int32))
