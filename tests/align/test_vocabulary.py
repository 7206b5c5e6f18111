"""kd_jax.align.vocabulary: teacher tokens map to the student token that spells the same text,
across byte-level BPE, SentencePiece-style and byte tokenizers; the teacher's probability on
what does not map."""

import numpy as np

from kd_jax.align.vocabulary import map_vocabularies, unmapped_mass
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.align.test_positions import bpe
from tests.data.test_tokenizers import write_sentencepiece


def vocabulary_map(teacher, student):
    return map_vocabularies(teacher.token_bytes(), student.ids_by_bytes(), student.vocab_size)


def test_tokens_spelling_the_same_text_map_whatever_their_markers(tmp_path):
    """Byte-level BPE's "Ġthe" and SentencePiece's "▁the" are both " the"; byte-fallback pieces
    and byte-level single bytes are the bytes; special tokens map to nothing."""
    (tmp_path / "sp").mkdir()
    sp = load_tokenizer(str(write_sentencepiece(tmp_path / "sp")[0]))
    byte_level = bpe(tmp_path / "bpe.json")
    got = vocabulary_map(sp, byte_level)
    for piece in ("\u2581the", "\u2581t", "t", "<0x41>", "<0xF0>"):
        teacher_id = sp.token_id(piece)
        spelled = piece.replace("\u2581", " ").encode() if not piece.startswith("<0x") \
            else bytes([int(piece[3:5], 16)])
        student_id = got.student_id[teacher_id]
        if spelled in byte_level.ids_by_bytes():
            assert byte_level.token_bytes()[student_id] == spelled, piece
        else:
            assert student_id == -1, piece
    assert got.student_id[sp.token_id("\u2581the")] >= 0  # " the" is in the trained BPE
    assert got.student_id[sp.token_id("<s>")] == -1  # a special token, though both have "<s>"
    # Into the byte tokenizer: exactly the one-byte tokens map, each to its byte.
    into_bytes = vocabulary_map(byte_level, ByteTokenizer())
    spelled = byte_level.token_bytes()
    for teacher_id, student_id in enumerate(into_bytes.student_id):
        if len(spelled[teacher_id]) == 1:
            assert student_id == spelled[teacher_id][0]
        else:
            assert student_id == -1
    line = into_bytes.describe()
    mapped = sum(len(b) == 1 for b in spelled)
    assert f"{mapped:,} of the teacher's {byte_level.vocab_size:,} tokens" in line
    assert "of the student's 256" in line and "\n" not in line


def test_the_same_tokenizer_maps_to_itself(tmp_path):
    tokenizer = bpe(tmp_path / "bpe.json")
    got = vocabulary_map(tokenizer, tokenizer)
    special = tokenizer.token_id("<s>")
    expected = np.arange(tokenizer.vocab_size)
    expected[special] = -1
    np.testing.assert_array_equal(got.student_id, expected)


def test_unmapped_mass_is_the_teacher_probability_on_unmapped_tokens(tmp_path):
    """A teacher with multi-digit tokens against a student that splits digits: the mass on the
    teacher's multi-digit tokens is what does not map."""
    teacher, student = bpe(tmp_path / "merged.json"), bpe(tmp_path / "split.json",
                                                          split_digits=True)
    got = vocabulary_map(teacher, student)
    spelled = teacher.token_bytes()
    multi_digit = np.array([len(b.strip()) > 1 and b.strip().isdigit() for b in spelled])
    assert multi_digit.any() and not got.mapped[multi_digit].any()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, teacher.vocab_size))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.where(got.mapped, 0.0, probs).sum(-1)
    np.testing.assert_allclose(unmapped_mass(probs, got), expected, rtol=1e-12)
    # All the teacher's mass on one multi-digit token: all of it unmapped.
    one_hot = np.zeros(teacher.vocab_size)
    one_hot[np.flatnonzero(multi_digit)[0]] = 1.0
    assert unmapped_mass(one_hot, got) == 1.0
