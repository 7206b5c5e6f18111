"""The map between a teacher's vocabulary and a student's: tokens that spell the same text.

A teacher token maps to the student token that spells the same bytes (`token_bytes()`: byte-level
BPE's alphabet, SentencePiece's word marker and byte-fallback pieces already read as the bytes
they stand for, so Llama 3's "Ġthe" and Llama 2's "▁the" are both b" the"). Where the student
has several ids for those bytes, its own `ids_by_bytes()` choice is taken (an ordinary token
over a byte piece). Special tokens spell nothing and map to nothing. What does not map is where a
cross-tokenizer loss must do something else (one bucket for the rest, or sorted probabilities),
so the map says how much of the teacher's probability falls there (`unmapped_mass`): a student
that splits digits against a teacher with multi-digit tokens shows it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class VocabularyMap:
    """`student_id[t]`: the student's id spelling what teacher id t spells, or -1 (int32,
    [teacher vocabulary])."""

    student_id: np.ndarray
    student_vocab: int

    @property
    def mapped(self) -> np.ndarray:
        return self.student_id >= 0

    def describe(self) -> str:
        """One line for the start-up log: how much of each vocabulary the map covers."""
        teacher_vocab = len(self.student_id)
        mapped = int(self.mapped.sum())
        reached = len(np.unique(self.student_id[self.mapped]))
        return (f"{mapped:,} of the teacher's {teacher_vocab:,} tokens "
                f"({mapped / max(teacher_vocab, 1):.1%}) spell a student token; they reach "
                f"{reached:,} of the student's {self.student_vocab:,}")


def map_vocabularies(teacher_bytes: Sequence[bytes], student_ids_by_bytes: Mapping[bytes, int],
                     student_vocab: int) -> VocabularyMap:
    """The map from the teacher's `token_bytes()` and the student's `ids_by_bytes()`."""
    student_id = np.array([student_ids_by_bytes.get(spelled, -1) if spelled else -1
                           for spelled in teacher_bytes], dtype=np.int32)
    return VocabularyMap(student_id, student_vocab)


def unmapped_mass(teacher_probs: np.ndarray, vocabulary: VocabularyMap) -> np.ndarray:
    """The teacher's probability on tokens with no student counterpart, per position
    ([..., teacher vocabulary] -> [...]); computed as 1 minus the mapped mass would lose a
    small unmapped share to rounding, so it is summed directly."""
    probs = np.asarray(teacher_probs, dtype=np.float64)
    return probs[..., ~vocabulary.mapped].sum(axis=-1)
