"""kd_jax.align.vocabulary: teacher tokens map to the student token that spells the same text,
else to the longest one their text starts with, across byte-level BPE, SentencePiece-style and
byte tokenizers; the buckets both vocabularies fall in, and which of them are matched; how much
of a tokenizer's rows the other vocabulary spells; the teacher's mass on what maps to nothing."""

import numpy as np

from kd_jax.align.vocabulary import (
    buckets,
    map_vocabularies,
    matched_buckets,
    overlap,
    shared_text,
    unmapped_mass,
)
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.align.test_positions import bpe
from tests.data.test_tokenizers import write_sentencepiece


def vocabulary_map(teacher, student):
    return map_vocabularies(teacher.token_bytes(), student.ids_by_bytes(), student.vocab_size)


def longest_prefix_reference(spelled, student):
    """The student id of the longest student token `spelled` starts with, by brute force."""
    best, best_length = -1, 0
    for text, token_id in student.ids_by_bytes().items():
        if spelled.startswith(text) and len(text) > best_length:
            best, best_length = token_id, len(text)
    return best


def test_each_teacher_token_maps_to_the_same_text_or_the_longest_it_starts_with(tmp_path):
    (tmp_path / "sp").mkdir()
    pairs = {"sp": load_tokenizer(str(write_sentencepiece(tmp_path / "sp")[0])),
             "merged": bpe(tmp_path / "merged.json"),
             "split": bpe(tmp_path / "split.json", split_digits=True), "byte": ByteTokenizer()}
    for teacher_name, teacher in pairs.items():
        for student_name, student in pairs.items():
            got = vocabulary_map(teacher, student)
            for teacher_id, spelled in enumerate(teacher.token_bytes()):
                want = longest_prefix_reference(spelled, student) if spelled else -1
                assert got.student_id[teacher_id] == want, (teacher_name, student_name, spelled)
                assert got.exact[teacher_id] == (
                    want >= 0 and student.token_bytes()[want] == spelled)
    # Markers undone: SentencePiece's "▁the" is the byte-level BPE's " the", exactly.
    sp, merged = pairs["sp"], pairs["merged"]
    the = vocabulary_map(sp, merged).student_id[sp.token_id("\u2581the")]
    assert merged.token_bytes()[the] == b" the"
    assert vocabulary_map(sp, merged).student_id[sp.token_id("<s>")] == -1  # special


def test_digits_merged_by_the_teacher_map_to_the_split_student_s_first_digit(tmp_path):
    teacher, student = bpe(tmp_path / "merged.json"), bpe(tmp_path / "split.json",
                                                          split_digits=True)
    got = vocabulary_map(teacher, student)
    numerals = [i for i, b in enumerate(teacher.token_bytes())
                if len(b.strip()) > 1 and b.strip().isdigit()]
    assert numerals
    for teacher_id in numerals:
        spelled = teacher.token_bytes()[teacher_id]
        assert not got.exact[teacher_id]
        assert spelled.startswith(student.token_bytes()[got.student_id[teacher_id]])
    line = got.describe()
    assert f"{int(got.exact.sum()):,} of the teacher's {teacher.vocab_size:,}" in line
    assert "\n" not in line


def test_buckets_hold_each_token_in_the_longest_mapped_student_token_it_starts_with(tmp_path):
    teacher, student = bpe(tmp_path / "merged.json"), bpe(tmp_path / "split.json",
                                                          split_digits=True)
    got = vocabulary_map(teacher, student)
    teacher_bucket, student_bucket, count = buckets(got, teacher.token_bytes(),
                                                    student.token_bytes())
    image = np.unique(got.student_id[got.mapped])
    assert count == len(image)
    image_bytes = [student.token_bytes()[i] for i in image]
    for spelled_all, bucket_of in ((teacher.token_bytes(), teacher_bucket),
                                   (student.token_bytes(), student_bucket)):
        for spelled, bucket in zip(spelled_all, bucket_of):
            starts = [n for n, text in enumerate(image_bytes) if spelled.startswith(text)]
            want = max(starts, key=lambda n: len(image_bytes[n])) if starts and spelled else -1
            assert bucket == want
    # Every bucket has members on both sides: its own student token, a teacher token mapped.
    assert set(teacher_bucket[teacher_bucket >= 0]) == set(range(count))
    assert set(student_bucket[student_bucket >= 0]) == set(range(count))


def test_the_same_tokenizer_maps_to_itself_and_its_buckets_are_its_tokens(tmp_path):
    tokenizer = bpe(tmp_path / "bpe.json")
    got = vocabulary_map(tokenizer, tokenizer)
    special = tokenizer.token_id("<s>")
    expected = np.arange(tokenizer.vocab_size)
    expected[special] = -1
    np.testing.assert_array_equal(got.student_id, expected)
    assert got.exact[expected >= 0].all()
    teacher_bucket, student_bucket, count = buckets(got, tokenizer.token_bytes(),
                                                    tokenizer.token_bytes())
    np.testing.assert_array_equal(teacher_bucket, student_bucket)
    assert count == tokenizer.vocab_size - 1


def test_unmapped_mass_is_the_teacher_probability_on_unmapped_tokens(tmp_path):
    (tmp_path / "sp").mkdir()
    teacher = load_tokenizer(str(write_sentencepiece(tmp_path / "sp")[0]))
    got = vocabulary_map(teacher, bpe(tmp_path / "bpe.json"))
    assert (~got.mapped).sum() == 1  # <s>
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, teacher.vocab_size))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(unmapped_mass(probs, got), probs[..., teacher.token_id("<s>")],
                               rtol=1e-12)


def tokenizer_pairs(tmp_path):
    (tmp_path / "sp").mkdir()
    return {"sp": load_tokenizer(str(write_sentencepiece(tmp_path / "sp")[0])),
            "merged": bpe(tmp_path / "merged.json"),
            "split": bpe(tmp_path / "split.json", split_digits=True), "byte": ByteTokenizer()}


def test_a_bucket_is_matched_when_all_its_members_spell_its_text(tmp_path):
    """Against the definition, member by member, for every pair; the same tokenizer's buckets
    all matched; a bucket holding a teacher's merged numeral not."""
    pairs = tokenizer_pairs(tmp_path)
    for teacher_name, teacher in pairs.items():
        for student_name, student in pairs.items():
            teacher_bytes, student_bytes = teacher.token_bytes(), student.token_bytes()
            teacher_bucket, student_bucket, count = buckets(
                vocabulary_map(teacher, student), teacher_bytes, student_bytes)
            got = matched_buckets(teacher_bucket, student_bucket, count, teacher_bytes,
                                  student_bytes)
            for bucket in range(count):
                teacher_members = [teacher_bytes[i] for i in np.flatnonzero(
                    teacher_bucket == bucket)]
                student_members = [student_bytes[i] for i in np.flatnonzero(
                    student_bucket == bucket)]
                text = min(student_members, key=len)
                want = bool(teacher_members) and all(
                    member == text for member in teacher_members + student_members)
                assert got[bucket] == want, (teacher_name, student_name, text)
            if teacher_name == student_name:
                assert got.all()
    teacher, student = pairs["merged"], pairs["split"]
    teacher_bucket, student_bucket, count = buckets(
        vocabulary_map(teacher, student), teacher.token_bytes(), student.token_bytes())
    matched = matched_buckets(teacher_bucket, student_bucket, count, teacher.token_bytes(),
                              student.token_bytes())
    numeral = next(i for i, b in enumerate(teacher.token_bytes())
                   if len(b.strip()) > 1 and b.strip().isdigit())
    assert not matched[teacher_bucket[numeral]] and 0 < matched.sum() < count


def test_overlap_is_the_share_of_text_tokens_the_other_vocabulary_spells(tmp_path):
    pairs = tokenizer_pairs(tmp_path)
    text = "In 2024, 12345 apples cost $3.50 and the pears 1000000: naïve café, 日本語"
    for name, teacher in pairs.items():
        for other_name, student in pairs.items():
            shared = shared_text(teacher.token_bytes(), student.token_bytes())
            np.testing.assert_array_equal(shared, vocabulary_map(teacher, student).exact)
            bos = [teacher.token_id("<s>")] if name == "merged" else []  # spells nothing
            ids = np.concatenate([bos, teacher.encode(text)]).astype(np.int32)
            spelled = [teacher.token_bytes()[i] for i in ids]
            others = set(student.token_bytes()) - {b""}
            kept = [b for b in spelled if b]
            share, count = overlap(ids[None], np.ones((1, len(ids)), bool), shared,
                                   teacher.token_bytes())
            assert count == len(kept)
            assert share == sum(b in others for b in kept) / len(kept), (name, other_name)
    byte = pairs["byte"]
    ids = byte.encode("abc")
    assert overlap(ids, np.array([False, False, False]), np.ones(256, bool),
                   byte.token_bytes()) == (1.0, 0)  # no token: nothing to refuse on
    assert overlap(ids, np.array([True, False, True]), np.arange(256) == ord("a"),
                   byte.token_bytes()) == (0.5, 2)
