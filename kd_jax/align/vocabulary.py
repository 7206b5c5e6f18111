"""The map between a teacher's vocabulary and a student's, by the text their tokens spell.

What a token spells is its tokenizer's `token_bytes()` (byte-level BPE's alphabet, SentencePiece's
word marker and byte-fallback pieces already read as the bytes they stand for, so Llama 3's
"Ġthe" and Llama 2's "▁the" are both b" the"; special tokens spell nothing).

A teacher token maps to the student token that spells the same bytes (`exact`), else to the
longest student token its bytes start with: the teacher's "2024" to a digit-splitting student's
"2", the student token its next text would start with. A next-token distribution then moves
across: the student's probability of "2" is compared with the teacher's of every token that
starts the text the way "2" does. Only where the student has no token for a teacher token's
first byte does it map to nothing (-1); special tokens never map.

`buckets` turns the map into what the loss compares (`kd_jax.losses.cross_vocab`): the student
tokens some teacher token maps to are the buckets, and every token of either vocabulary falls in
the bucket of the longest of them its bytes start with (the student's "2024", which the teacher
lacks, falls in "20" if the teacher maps a token there, else "2"). Tokens of neither bucket
(special tokens) are left out of the comparison. A bucket is matched (`matched_buckets`) when
every member on both sides spells its own text: " the" on both sides and nothing longer, one
event for both tokenizers; the `hybrid` loss compares those token by token.

How much two tokenizers share is measured on the text a run trains on (`overlap`): of one
side's tokens in its rows, the share whose text the other vocabulary holds as one token.

Making the map and its buckets walks both vocabularies in Python (1.5 s for 150,000 teacher and
50,000 student tokens on a 2-core CPU): `cached_tables` keeps them per tokenizer pair in the
user's cache directory (`$KD_JAX_CACHE`, else `$XDG_CACHE_HOME/kd_jax`, else
`~/.cache/kd_jax`), as numpy files named by the pair's fingerprints.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class VocabularyMap:
    """`student_id[t]`: the student's id teacher id t maps to, or -1; `exact[t]`: whether the
    two spell the same text (int32 and bool, [teacher vocabulary])."""

    student_id: np.ndarray
    exact: np.ndarray
    student_vocab: int

    @property
    def mapped(self) -> np.ndarray:
        return self.student_id >= 0

    def describe(self) -> str:
        """One line for the start-up log: how much of each vocabulary the map covers."""
        teacher_vocab = len(self.student_id)
        exact = int(self.exact.sum())
        by_prefix = int(self.mapped.sum()) - exact
        reached = len(np.unique(self.student_id[self.mapped]))
        return (f"{exact:,} of the teacher's {teacher_vocab:,} tokens spell a student token, "
                f"{by_prefix:,} more start with one, {teacher_vocab - exact - by_prefix:,} "
                f"map to none; they reach {reached:,} of the student's "
                f"{self.student_vocab:,}")


def longest_prefix(spelled: bytes, ids_by_bytes: Mapping[bytes, int], longest: int) -> int:
    """The id of the longest key of `ids_by_bytes` that `spelled` starts with (itself first),
    or -1; `longest` is the length of the longest key, computed once by the caller."""
    for length in range(min(len(spelled), longest), 0, -1):
        token_id = ids_by_bytes.get(spelled[:length])
        if token_id is not None:
            return token_id
    return -1


def map_vocabularies(teacher_bytes: Sequence[bytes], student_ids_by_bytes: Mapping[bytes, int],
                     student_vocab: int) -> VocabularyMap:
    """The map from the teacher's `token_bytes()` and the student's `ids_by_bytes()` (which
    picks among student ids spelling the same bytes: an ordinary token over a byte piece)."""
    longest = max((len(key) for key in student_ids_by_bytes), default=0)
    student_id = np.array([longest_prefix(spelled, student_ids_by_bytes, longest)
                           for spelled in teacher_bytes], dtype=np.int32)
    exact = np.array([bool(spelled) and spelled in student_ids_by_bytes
                      for spelled in teacher_bytes], dtype=bool)
    return VocabularyMap(student_id, exact, student_vocab)


def buckets(vocabulary: VocabularyMap, teacher_bytes: Sequence[bytes],
            student_bytes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """(the bucket of each teacher id, of each student id, the number of buckets): int32
    arrays, -1 for a token of no bucket (the module docstring)."""
    image = np.unique(vocabulary.student_id[vocabulary.mapped])
    bucket_by_bytes = {student_bytes[int(student_id)]: n for n, student_id in enumerate(image)}
    longest = max((len(key) for key in bucket_by_bytes), default=0)

    def of(spelled: Sequence[bytes]) -> np.ndarray:
        return np.array([longest_prefix(text, bucket_by_bytes, longest) for text in spelled],
                        dtype=np.int32)

    return of(teacher_bytes), of(student_bytes), len(image)


def matched_buckets(teacher_bucket: np.ndarray, student_bucket: np.ndarray, count: int,
                    teacher_bytes: Sequence[bytes], student_bytes: Sequence[bytes]) -> np.ndarray:
    """Per bucket of `buckets`, whether it is matched (bool [count]): it has members on both
    sides and every one of them spells the bucket's own text. Every member starts with that
    text, and the student token a bucket is named after is its shortest member, so a bucket is
    matched when no member on either side is longer than its shortest student member."""
    teacher_bucket, student_bucket = np.asarray(teacher_bucket), np.asarray(student_bucket)
    teacher_lengths, student_lengths = _lengths(teacher_bytes), _lengths(student_bytes)
    in_teacher, in_student = teacher_bucket >= 0, student_bucket >= 0
    own = np.full(count, np.iinfo(np.int64).max)  # the length of the bucket's text
    np.minimum.at(own, student_bucket[in_student], student_lengths[in_student])
    longest = np.zeros(count, np.int64)
    np.maximum.at(longest, teacher_bucket[in_teacher], teacher_lengths[in_teacher])
    np.maximum.at(longest, student_bucket[in_student], student_lengths[in_student])
    has_teacher = np.bincount(teacher_bucket[in_teacher], minlength=count) > 0
    return has_teacher & (longest == own)  # a bucket of no student member keeps own at max


class SortedSpellings:
    """A vocabulary's spellings in sorted order: the tokens that start with some bytes are a
    run of them (`run`), which `kd_jax.losses.cross_bytes` selects by each token's place in the
    order (`ByteTables.rank_w`, made by the same sort)."""

    def __init__(self, token_bytes: Sequence[bytes]):
        self.spellings = sorted(token_bytes)
        self._runs: dict[bytes, tuple[int, int]] = {}

    def run(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi): the places of the spellings that start with `prefix` (non-empty)."""
        found = self._runs.get(prefix)
        if found is None:
            lo = bisect.bisect_left(self.spellings, prefix)
            # Past every spelling that starts with `prefix`: its last byte below 255 raised.
            stem = prefix.rstrip(b"\xff")
            hi = (bisect.bisect_left(self.spellings, stem[:-1] + bytes([stem[-1] + 1]), lo)
                  if stem else len(self.spellings))
            found = self._runs[prefix] = (lo, hi)
        return found


def _lengths(token_bytes: Sequence[bytes]) -> np.ndarray:
    return np.array([len(spelled) for spelled in token_bytes], dtype=np.int64)


def shared_text(token_bytes: Sequence[bytes], other_bytes: Sequence[bytes]) -> np.ndarray:
    """Per id of one vocabulary, whether some token of the other spells exactly its text (bool;
    False for a token that spells nothing). For the teacher's, this is `VocabularyMap.exact`."""
    other = {spelled for spelled in other_bytes if spelled}
    return np.array([bool(spelled) and spelled in other for spelled in token_bytes], dtype=bool)


def overlap(ids: np.ndarray, where: np.ndarray, shared: np.ndarray,
            token_bytes: Sequence[bytes]) -> tuple[float, int]:
    """(share, count): of the tokens `ids[where]` (a tokenizer's rows and where they hold
    tokens) that spell text, how many there are and the share `shared` marks (`shared_text`);
    a share of 1.0 where none spells text. Special tokens (a BOS) are left out: they spell
    nothing, so no text of the other side could match them."""
    held = np.asarray(ids)[np.asarray(where, dtype=bool)]
    text = held[_lengths(token_bytes)[held] > 0]
    return (float(shared[text].mean()) if len(text) else 1.0), len(text)


def unmapped_mass(teacher_probs: np.ndarray, vocabulary: VocabularyMap) -> np.ndarray:
    """The teacher's probability on tokens that map to no student token, per position
    ([..., teacher vocabulary] -> [...]); summed directly, since 1 minus the mapped mass would
    lose a small share to rounding."""
    probs = np.asarray(teacher_probs, dtype=np.float64)
    return probs[..., ~vocabulary.mapped].sum(axis=-1)


def cache_home() -> Path:
    """Where kd_jax keeps what it computes once per machine (the module docstring)."""
    if os.environ.get("KD_JAX_CACHE"):
        return Path(os.environ["KD_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kd_jax"


def cached_tables(key: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`make()`'s arrays, kept under `cache_home()` by `key` (a tokenizer pair's fingerprints):
    read back when there, made and written (whole or not at all) when not. A cache that cannot
    be written, or a file that cannot be read, costs only the making."""
    path = cache_home() / "vocabulary_maps" / (
        hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                return {name: stored[name] for name in stored.files if name != "key"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # absent or damaged: made again below
    tables = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            np.savez(file, key=np.asarray(key), **tables)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: nothing kept
    return tables
