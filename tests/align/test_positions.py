"""kd_jax.align.positions: every student position maps to the teacher position that has read
exactly the same text, or is unaligned; checked against a brute-force search over prefixes and
against the tokenizers' own decoding, on hand-made cases (digits split or merged, runs of spaces
and newlines, accents, CJK and emoji, byte fallback, a BOS on one side only)."""

import numpy as np
import pytest

from kd_jax.align.positions import align, align_ids, byte_ends
from kd_jax.config import ConfigError
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.data.test_tokenizers import write_sentencepiece

CASES = [
    "In 2024, 12345 apples cost $3.50 and 7 pears 1000000.",
    "a  b   c\n\n\tend    \n",
    "naïve café, 日本語のテキスト 🙂🎉 done",
    "9",
    " leading space and trailing ",
    "x\u200by",  # a zero-width space: three bytes, no glyph
]
# Trained with these so that digits, spaces and CJK merge into multi-byte tokens.
CORPUS = [*CASES, "2024 2024 12345 1000000 100 $3.50", "日本語 日本語 テキスト", "    \n\n  \t",
          "the apples and the pears cost a lot", "🙂🙂🎉🎉 naïve naïve café café"] * 6


def bpe(path, split_digits=False, vocab_size=420):
    """A byte-level BPE trained on CORPUS; `split_digits` puts every digit in a token of its
    own (as Llama 3's pre-tokenizer does not and many students' do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


def with_bos(path, source):
    """`source`'s tokenizer.json with a post-processor that starts every text with <s>."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(source.path))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("align")
    merged = bpe(folder / "merged.json")
    (folder / "sp").mkdir()
    made = {
        "byte": ByteTokenizer(),
        "merged": merged,
        "split": bpe(folder / "split.json", split_digits=True),
        "bos": with_bos(folder / "bos.json", merged),
        "sentencepiece": load_tokenizer(str(write_sentencepiece(folder / "sp")[0])),
    }
    # The cases must exercise what they are for: merged digits and CJK, byte-fallback pieces.
    digits = merged.token_bytes()
    assert any(len(digits[i]) > 1 and digits[i].strip().isdigit()
               for i in merged.encode(CASES[0]))
    assert not any(len(made["split"].token_bytes()[i].strip()) > 1
                   and made["split"].token_bytes()[i].strip().isdigit()
                   for i in made["split"].encode(CASES[0]))
    # The SentencePiece-style vocabulary's ids 0..255 are its <0xHH> byte-fallback pieces.
    assert (made["sentencepiece"].encode(CASES[2]) < 256).sum() > 20
    return made


def ids_of(tokenizer, text):
    return np.concatenate([np.asarray(tokenizer.document_prefix, dtype=np.int32),
                           tokenizer.encode(text)])


def read_by(tokenizer, ids, text):
    """The text each position has read, by brute force: the tokens' bytes joined, less the one
    leading space a SentencePiece tokenizer puts before a text that has none."""
    spelled = tokenizer.token_bytes()
    joined = b"".join(spelled[i] for i in ids)
    drop = 1 if joined == b" " + text.encode() else 0
    prefixes, read = [], b""
    for token_id in ids:
        read += spelled[token_id]
        prefixes.append(read[drop:] if len(read) >= drop else b"")
    return prefixes


PAIRS = [(s, t) for s in ("byte", "merged", "split", "bos", "sentencepiece")
         for t in ("byte", "merged", "split", "bos", "sentencepiece")]


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_each_student_position_maps_to_the_last_teacher_position_that_read_the_same_text(
        tokenizers, student, teacher):
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    for text in CASES:
        s_ids, t_ids = ids_of(s_tok, text), ids_of(t_tok, text)
        got = align_ids(s_ids, s_tok.token_bytes(), t_ids, t_tok.token_bytes(), text)
        s_read, t_read = read_by(s_tok, s_ids, text), read_by(t_tok, t_ids, text)
        for i, seen in enumerate(s_read):
            same = [j for j, other in enumerate(t_read) if other == seen]
            assert got.teacher_position[i] == (same[-1] if same else -1), (text, i)
            j = got.teacher_position[i]
            same_next = (j >= 0 and i + 1 < len(s_read) and j + 1 < len(t_read)
                         and s_read[i + 1] == t_read[j + 1])
            assert got.same_next[i] == same_next, (text, i)
        if student == teacher:  # one tokenizer on both sides: the identity
            np.testing.assert_array_equal(got.teacher_position, np.arange(len(s_ids)))
            assert got.same_next[:-1].all()


def test_aligned_positions_decode_to_the_same_text(tokenizers):
    """Independent of token_bytes: where an aligned student prefix ends on a character boundary,
    both tokenizers' own decoders give the same text for the two prefixes."""
    checked = 0
    for student, teacher in PAIRS:
        s_tok, t_tok = tokenizers[student], tokenizers[teacher]
        for text in CASES:
            s_ids, t_ids = ids_of(s_tok, text), ids_of(t_tok, text)
            got = align_ids(s_ids, s_tok.token_bytes(), t_ids, t_tok.token_bytes(), text)
            for i in np.flatnonzero(got.aligned):
                s_text = s_tok.decode(s_ids[:i + 1]).replace("<s>", "")
                if "\ufffd" in s_text:  # ends inside a character
                    continue
                t_text = t_tok.decode(t_ids[:got.teacher_position[i] + 1]).replace("<s>", "")
                assert s_text.strip() == t_text.strip(), (student, teacher, text, i)
                assert text.startswith(s_text.strip()) or text.strip().startswith(s_text.strip())
                checked += 1
    assert checked > 500


def test_digits_merged_on_one_side_leave_the_positions_inside_them_unaligned(tokenizers):
    merged, split = tokenizers["merged"], tokenizers["split"]
    text = "12345 apples"
    s_ids, t_ids = split.encode(text), merged.encode(text)
    got = align_ids(s_ids, split.token_bytes(), t_ids, merged.token_bytes(), text)
    ends = np.cumsum([len(merged.token_bytes()[i]) for i in t_ids])
    # The student reads the digits one at a time: aligned exactly where a teacher token ends.
    digit_positions = np.arange(5)
    np.testing.assert_array_equal(got.aligned[digit_positions],
                                  np.isin(digit_positions + 1, ends))
    assert not got.aligned[digit_positions].all()
    # Where aligned before a merged teacher token, the next tokens differ ("1" against "12...").
    before_merged = [i for i in np.flatnonzero(got.aligned[:4])
                     if len(merged.token_bytes()[t_ids[got.teacher_position[i] + 1]]) > 1]
    assert before_merged and not got.same_next[before_merged].any()


def test_a_bos_on_one_side_only_is_unaligned_and_on_both_sides_aligned(tokenizers):
    plain, bos = tokenizers["merged"], tokenizers["bos"]
    text = CASES[0]
    with_bos_ids, plain_ids = ids_of(bos, text), ids_of(plain, text)
    assert with_bos_ids[0] == bos.document_prefix[0] and len(with_bos_ids) == len(plain_ids) + 1
    student_bos = align_ids(with_bos_ids, bos.token_bytes(), plain_ids, plain.token_bytes(),
                            text)
    assert student_bos.teacher_position[0] == -1
    np.testing.assert_array_equal(student_bos.teacher_position[1:], np.arange(len(plain_ids)))
    teacher_bos = align_ids(plain_ids, plain.token_bytes(), with_bos_ids, bos.token_bytes(), text)
    np.testing.assert_array_equal(teacher_bos.teacher_position, np.arange(1, len(with_bos_ids)))
    both = align_ids(with_bos_ids, bos.token_bytes(), with_bos_ids, bos.token_bytes(), text)
    assert both.teacher_position[0] == 0 and both.same_next[0]


def test_the_sentencepiece_dummy_prefix_is_allowed_for(tokenizers):
    sp = tokenizers["sentencepiece"]
    text = "the tea"
    ids = sp.encode(text)
    assert b"".join(sp.token_bytes()[i] for i in ids) == b" " + text.encode()
    ends = byte_ends(ids, sp.token_bytes(), text.encode(), "sp")
    assert ends[-1] == len(text) and ends[0] == len(sp.token_bytes()[ids[0]]) - 1


def test_a_tokenizer_that_changes_the_text_is_refused_with_the_bytes_that_differ(tmp_path):
    from tokenizers import Tokenizer, normalizers

    source = bpe(tmp_path / "plain.json")
    raw = Tokenizer.from_file(str(source.path))
    raw.normalizer = normalizers.Lowercase()
    raw.save(str(tmp_path / "lower.json"))
    lower = load_tokenizer(str(tmp_path / "lower.json"))
    text = "the Apples"
    with pytest.raises(ConfigError) as err:
        align_ids(source.encode(text), source.token_bytes(), lower.encode(text),
                  lower.token_bytes(), text)
    message = str(err.value)
    assert "\n" not in message and message.startswith("the teacher's tokenizer")
    assert "from byte 4: b'apples'" in message and "b'Apples'" in message


def test_align_from_ends_handles_empty_rows_and_zero_length_tokens():
    empty = align(np.zeros(0, np.int64), np.array([3]))
    assert empty.teacher_position.shape == (0,)
    # Teacher: "ab" | <sep> (spells nothing) | "c"; student: "a" "b" "c".
    got = align(np.array([1, 2, 3]), np.array([2, 2, 3]))
    np.testing.assert_array_equal(got.teacher_position, [-1, 1, 2])
    np.testing.assert_array_equal(got.same_next, [False, True, False])
    # A window that stops before the teacher's: its last position has no next token to compare.
    window = align(np.array([1, 2]), np.array([1, 2, 3]))
    np.testing.assert_array_equal(window.teacher_position, [0, 1])
    np.testing.assert_array_equal(window.same_next, [True, False])
