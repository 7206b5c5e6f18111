"""kd_jax.align.rows: the teacher's rows for packed student rows. Checked by brute force: every
aligned student position and its teacher position have read the same text within their pieces,
it is the last teacher position that has, and an unaligned position has no such teacher
position (or starts inside a character); documents that span rows, a BOS on either side, a
SentencePiece teacher's dummy prefix, teacher rows cut short."""

import numpy as np
import pytest

from kd_jax.align.rows import _whole_characters, teacher_rows
from kd_jax.data.packing import derive_all, document_starts, index_documents, tokenize
from kd_jax.data.sources import Document
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.align.test_positions import CASES, bpe, with_bos
from tests.data.test_tokenizers import write_sentencepiece

DOCS = [Document(text) for text in CASES + ["日本語のテキスト " * 3, "short", "12345 " * 5]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    (folder / "sp").mkdir()
    merged = bpe(folder / "merged.json")
    return {"byte": ByteTokenizer(), "merged": merged,
            "split": bpe(folder / "split.json", split_digits=True),
            "bos": with_bos(folder / "bos.json", merged),
            "sentencepiece": load_tokenizer(str(write_sentencepiece(folder / "sp")[0]))}


def packed(tokenizer, seq_len):
    tokenized = tokenize(DOCS, tokenizer, add_bos=True)
    index = index_documents(np.cumsum(tokenized.lengths) - tokenized.lengths, tokenized.lengths,
                            seq_len)
    spans = tokenized.untrained
    batch = derive_all(index, lambda at: tokenized.ids[at], (spans[:, 0], spans[:, 1]))
    return batch, document_starts(index, np.arange(index.n_rows))


def read(spelled, ids):
    """The bytes read after each token of a piece, less a SentencePiece dummy space (a space
    read first that the other side's text does not hold is dropped by the caller)."""
    out, text = [], b""
    for token_id in ids:
        text += spelled[int(token_id)]
        out.append(text)
    return out


@pytest.mark.parametrize("student,teacher,teacher_seq_len", [
    ("byte", "merged", 64), ("merged", "byte", 96), ("split", "bos", 40), ("bos", "split", 40),
    ("merged", "sentencepiece", 64), ("sentencepiece", "merged", 48), ("merged", "merged", 40),
    ("byte", "merged", 12)])
def test_aligned_positions_have_read_the_same_text_within_their_pieces(
        tokenizers, student, teacher, teacher_seq_len):
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    batch, starts = packed(s_tok, 16)
    assert not starts[:, 0].all()  # a document continues from one row into the next
    got = teacher_rows(batch, s_tok, t_tok, teacher_seq_len, starts)
    s_bytes, t_bytes = s_tok.token_bytes(), t_tok.token_bytes()
    aligned = checked_unaligned = 0
    for row in range(batch["tokens"].shape[0]):
        for piece in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
            s_at = np.flatnonzero(batch["segment_ids"][row] == piece)
            t_at = np.flatnonzero(got["teacher_segment_ids"][row] == piece)
            s_read = read(s_bytes, batch["tokens"][row, s_at])
            t_read = read(t_bytes, got["teacher_tokens"][row, t_at])
            whole = b"".join(s_bytes[int(i)] for i in batch["tokens"][row, s_at]) + s_bytes[
                int(batch["labels"][row, s_at[-1]])]
            skip = _whole_characters(whole)[0]
            # The teacher's dummy space: its text read first, where the student's has none.
            if t_read and t_read[-1][:1] == b" " and not whole[skip:].startswith(b" "):
                t_read = [r[1:] for r in t_read]
            for k, seen in enumerate(s_read):
                j = got["teacher_index"][row, s_at[k]]
                same = [n for n, other in enumerate(t_read) if other == seen[skip:]]
                if skip:
                    assert j == -1
                elif same:
                    assert j == t_at[same[-1]], (row, piece, k)
                    aligned += 1
                else:
                    assert j == -1, (row, piece, k)
                    checked_unaligned += 1
        # Teacher positions restart at each piece; nothing past the filled part.
        real = got["teacher_segment_ids"][row] > 0
        assert not got["teacher_tokens"][row][~real].any()
    assert aligned > 25  # not vacuous
    if student != teacher:
        assert checked_unaligned > 0


def test_a_teacher_piece_starts_with_its_bos_only_where_the_document_starts(tokenizers):
    s_tok, t_tok = tokenizers["merged"], tokenizers["bos"]
    batch, starts = packed(s_tok, 16)
    got = teacher_rows(batch, s_tok, t_tok, 64, starts)
    bos = t_tok.document_prefix[0]
    for row in range(batch["tokens"].shape[0]):
        for piece in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
            first_student = np.flatnonzero(batch["segment_ids"][row] == piece)[0]
            first_teacher = np.flatnonzero(got["teacher_segment_ids"][row] == piece)[0]
            assert (got["teacher_tokens"][row, first_teacher] == bos) == starts[
                row, first_student]
            assert got["teacher_positions"][row, first_teacher] == 0
    # A document of one token makes no pair, so it has no piece ("9" for most tokenizers).
    assert starts.sum() == sum(len(ids) >= 2 for ids in s_tok.encode_batch(
        [doc.text for doc in DOCS])) and not starts.all()


def test_a_piece_that_starts_inside_a_character_is_unaligned(tokenizers):
    """The byte student cuts the Japanese document's characters at row boundaries."""
    s_tok, t_tok = tokenizers["byte"], tokenizers["merged"]
    batch, starts = packed(s_tok, 16)
    got = teacher_rows(batch, s_tok, t_tok, 64, starts)
    cut = 0
    for row in range(batch["tokens"].shape[0]):
        first = batch["tokens"][row, 0]
        if not starts[row, 0] and first & 0xC0 == 0x80:  # a continuation byte opens the row
            piece = batch["segment_ids"][row] == batch["segment_ids"][row, 0]
            assert (got["teacher_index"][row][piece] == -1).all()
            cut += 1
    assert cut > 0


def test_same_next_marks_where_both_next_tokens_are_the_same_text(tokenizers):
    s_tok, t_tok = tokenizers["split"], tokenizers["merged"]
    batch, starts = packed(s_tok, 16)
    got = teacher_rows(batch, s_tok, t_tok, 64, starts)
    s_bytes, t_bytes = s_tok.token_bytes(), t_tok.token_bytes()
    for row, k in zip(*np.nonzero(got["teacher_index"] >= 0)):
        j = got["teacher_index"][row, k]
        label = s_bytes[int(batch["labels"][row, k])]
        same_piece = (j + 1 < got["teacher_tokens"].shape[1]
                      and got["teacher_segment_ids"][row, j + 1]
                      == got["teacher_segment_ids"][row, j])
        teacher_next = t_bytes[int(got["teacher_tokens"][row, j + 1])] if same_piece else None
        if got["same_next"][row, k]:
            assert teacher_next == label
        elif same_piece and teacher_next == label:
            pytest.fail(f"row {row} position {k}: the next tokens are the same text")
    assert got["same_next"].any() and not got["same_next"][got["teacher_index"] >= 0].all()


@pytest.mark.parametrize("raw,want", [(b"abc", (0, 0)), ("日本".encode()[1:], (2, 0)),
                                      ("日本".encode()[:-1], (0, 2)), ("é".encode()[:1], (0, 1)),
                                      (b"", (0, 0)), ("🙂".encode(), (0, 0))])
def test_whole_characters(raw, want):
    assert _whole_characters(raw) == want


def test_the_teacher_row_length_is_sized_from_the_rows(tokenizers):
    from kd_jax.align.rows import teacher_seq_len_for

    for student, teacher, longest in (("merged", "byte", 512), ("byte", "merged", 512),
                                      ("byte", "merged", 16)):
        s_tok, t_tok = tokenizers[student], tokenizers[teacher]
        batch, starts = packed(s_tok, 16)
        got = teacher_seq_len_for(batch, s_tok, t_tok, starts, longest)
        most = (teacher_rows(batch, s_tok, t_tok, longest, starts)["teacher_segment_ids"] > 0
                ).sum(axis=1).max()
        if longest >= 1.1 * most + 64:
            assert got % 64 == 0 and 1.1 * most <= got < 1.1 * most + 64
        assert got <= longest
        # Rows of that length cut nothing the longest rows held.
        cut = teacher_rows(batch, s_tok, t_tok, got, starts)["teacher_index"]
        if got < longest:
            np.testing.assert_array_equal(
                cut, teacher_rows(batch, s_tok, t_tok, longest, starts)["teacher_index"])


@pytest.mark.parametrize("student,teacher,teacher_seq_len", [
    ("byte", "merged", 64), ("split", "bos", 40), ("byte", "sentencepiece", 64),
    ("merged", "merged", 40), ("byte", "merged", 12)])
def test_each_position_backs_off_to_the_start_of_the_teacher_token_it_ends_in(
        tokenizers, student, teacher, teacher_seq_len):
    """With `backoff`: the teacher position before the covering token has read the student's
    text up to that token, and the token's first `teacher_inside` bytes are the rest of it;
    `teacher_lo`:`teacher_hi` is every spelling that starts with them; a position with no such
    token in the row (the first token of a piece without a BOS, past a cut row) has -1."""
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    batch, starts = packed(s_tok, 16)
    got = teacher_rows(batch, s_tok, t_tok, teacher_seq_len, starts, backoff=True)
    plain = teacher_rows(batch, s_tok, t_tok, teacher_seq_len, starts)
    for key in plain:  # the rest is what it is without
        np.testing.assert_array_equal(got[key], plain[key])
    s_bytes, t_bytes = s_tok.token_bytes(), t_tok.token_bytes()
    ordered = sorted(t_bytes)
    backed = missing = 0
    for row in range(batch["tokens"].shape[0]):
        for piece in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
            s_at = np.flatnonzero(batch["segment_ids"][row] == piece)
            t_at = np.flatnonzero(got["teacher_segment_ids"][row] == piece)
            s_read = read(s_bytes, batch["tokens"][row, s_at])
            t_read = read(t_bytes, got["teacher_tokens"][row, t_at])
            whole = b"".join(s_bytes[int(i)] for i in batch["tokens"][row, s_at]) + s_bytes[
                int(batch["labels"][row, s_at[-1]])]
            if _whole_characters(whole)[0]:
                continue  # no teacher position has read what the student has
            # The teacher's dummy space, read first where the student's text has none.
            dummy = (b" " if t_read and t_read[-1][:1] == b" " and not whole.startswith(b" ")
                     else b"")
            for k, seen in enumerate(s_read):
                back = got["teacher_back"][row, s_at[k]]
                # By brute force: the first teacher token whose text reaches past `seen`.
                reach = [n for n, other in enumerate(t_read) if len(other) >= len(dummy + seen)]
                if back == -1:
                    assert not reach or reach[0] == 0 or reach[0] >= len(t_read) or (
                        t_at[reach[0]] >= teacher_seq_len), (row, piece, k)
                    missing += 1
                    continue
                n = int(np.flatnonzero(t_at == back)[0]) + 1
                assert reach[0] == n, (row, piece, k)
                token = t_bytes[int(got["teacher_tokens"][row, t_at[n]])]
                inside = got["teacher_inside"][row, s_at[k]]
                assert 1 <= inside <= len(token)
                assert t_read[n - 1] + token[:inside] == dummy + seen, (row, piece, k)
                lo, hi = got["teacher_lo"][row, s_at[k]], got["teacher_hi"][row, s_at[k]]
                assert ordered[lo:hi] == sorted(w for w in t_bytes
                                                if w.startswith(token[:inside]))
                backed += 1
    assert backed > 25 and missing > 0  # both cases met
