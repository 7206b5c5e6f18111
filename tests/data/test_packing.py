"""kd_jax.data.packing: greedy packing against a slow reference, segments and positions,
prompt masking, and the bytes the labels cover."""

import dataclasses

import numpy as np
import pytest

from kd_jax.config import ConfigError
from kd_jax.data.packing import document_starts, index_documents, pack, tokenize
from kd_jax.data.sources import Document
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.data.test_tokenizers import TEXTS, write_byte_level_bpe


def _reference_pack(docs, tokenizer, seq_len, prefix=()):
    """A slow, obviously-correct packer: one Python step per pair; `prefix` starts every
    document (and belongs to a chat document's prompt)."""
    rows, row = [], []
    for doc in docs:
        prompt = [] if doc.prompt is None else list(prefix) + list(tokenizer.encode(doc.prompt))
        ids = (list(prefix) if doc.prompt is None else []) + prompt + list(
            tokenizer.encode(doc.text))
        piece = None
        for j in range(len(ids) - 1):
            if len(row) == seq_len:
                rows.append(row)
                row = []
            if not row or piece is None or piece[0] is not doc or row[-1][2] != piece[1]:
                segment = (row[-1][2] + 1) if row else 1
                piece = (doc, segment)
                position = 0
            row.append((ids[j], ids[j + 1], piece[1], position, int(j + 1 >= len(prompt))))
            position += 1
    if row:
        rows.append(row + [(0, 0, 0, 0, 0)] * (seq_len - len(row)))
    columns = np.array(rows, dtype=np.int64).transpose(2, 0, 1)
    return dict(zip(("tokens", "labels", "segment_ids", "positions", "loss_mask"), columns))


def _docs():
    return [Document("abcdefghij"), Document("x"), Document(""), Document("klm"),
            Document("nopqrstuvwxyz0123"), Document("é!"), Document("ok")]


@pytest.mark.parametrize("seq_len", [1, 2, 5, 7, 16, 64])
def test_pack_matches_reference(seq_len):
    tokenizer = ByteTokenizer()
    docs = _docs()
    packed = pack(docs, tokenizer, seq_len)
    expected = _reference_pack(docs, tokenizer, seq_len)
    for key, want in expected.items():
        got = getattr(packed, key)
        assert got.dtype == np.int32 and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_pack_keeps_every_pair_once_in_order_and_pads_only_the_last_row():
    tokenizer = ByteTokenizer()
    docs = _docs()
    packed = pack(docs, tokenizer, seq_len=5)
    real = packed.segment_ids.reshape(-1) > 0
    pairs = list(zip(packed.tokens.reshape(-1)[real], packed.labels.reshape(-1)[real]))
    expected = [(ids[j], ids[j + 1]) for ids in (tokenizer.encode(d.text) for d in docs)
                for j in range(len(ids) - 1)]
    assert pairs == expected
    assert real[: len(expected)].all() and not real[len(expected):].any()
    padding = packed.segment_ids == 0
    assert padding[:-1].sum() == 0  # only the final row is padded
    for key in ("tokens", "labels", "positions", "loss_mask"):
        assert (getattr(packed, key)[padding] == 0).all()


def test_pack_restarts_segments_and_positions_across_rows():
    packed = pack([Document("abcdefg"), Document("hij")], ByteTokenizer(), seq_len=4)
    # pairs: 6 from the first document, 2 from the second -> rows of 4
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1], [1, 1, 2, 2]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 3], [0, 1, 0, 1]])
    assert packed.tokens[1].tobytes() == np.frombuffer(b"efhi", np.uint8).astype(
        np.int32).tobytes()


def test_pack_prompt_response_masks_prompt_labels():
    tokenizer = ByteTokenizer()
    docs = [Document(text="RESP", prompt="pr"), Document("plain")]
    packed = pack(docs, tokenizer, seq_len=16)
    n = (3 + 2) + 4  # "prRESP" gives 5 pairs, "plain" gives 4
    # The label of pair j is token j + 1; the first label ("r") is prompt, then R, E, S, P.
    np.testing.assert_array_equal(packed.loss_mask[0, :n], [0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert packed.byte_count == 8  # 4 response bytes + 4 labels of "plain"
    assert tokenizer.decode(packed.labels[0, :5][packed.loss_mask[0, :5] == 1]) == "RESP"


def test_pack_byte_count():
    tokenizer = ByteTokenizer()
    docs = [Document(text) for text in TEXTS]
    packed = pack(docs, tokenizer, seq_len=8)
    assert packed.byte_count == sum(len(t.encode("utf-8")) - 1 for t in TEXTS)
    assert packed.byte_count == packed.loss_mask.sum()


def test_pack_byte_count_with_bpe(tmp_path):
    tokenizer = load_tokenizer(str(write_byte_level_bpe(tmp_path / "tokenizer.json")))
    docs = [Document(text) for text in TEXTS]
    packed = pack(docs, tokenizer, seq_len=8)
    first_token_bytes = sum(int(tokenizer.byte_lengths()[tokenizer.encode(t)[0]]) for t in TEXTS)
    assert packed.byte_count == sum(len(t.encode("utf-8")) for t in TEXTS) - first_token_bytes


def test_pack_empty_raises():
    with pytest.raises(ConfigError, match="empty"):
        pack([Document(""), Document("a")], ByteTokenizer(), seq_len=8)


def _bos_tokenizer(tmp_path):
    """A byte-level BPE whose post-processor starts every text with <s>, as Llama's does."""
    from tokenizers import Tokenizer, processors

    path = write_byte_level_bpe(tmp_path / "plain.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.add_special_tokens(["<s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.save(str(tmp_path / "bos.json"))
    return load_tokenizer(str(tmp_path / "bos.json")), bos


def test_documents_start_with_the_tokenizers_prefix(tmp_path):
    tokenizer, bos = _bos_tokenizer(tmp_path)
    assert tokenizer.document_prefix == (bos,)
    docs = _docs() + [Document("a response", prompt="a prompt")]
    packed = pack(docs, tokenizer, 16)
    for key, want in _reference_pack(docs, tokenizer, 16, (bos,)).items():
        np.testing.assert_array_equal(getattr(packed, key), want, err_msg=key)
    # One <s> a document (the empty one has no pair, so no row), and never a label.
    assert (packed.tokens == bos).sum() == len(docs) - 1
    assert not (packed.labels == bos).any()
    plain = pack(docs, tokenizer, 16, add_bos=False)
    assert not (plain.tokens == bos).any()
    assert load_tokenizer(str(write_byte_level_bpe(tmp_path / "x.json"))).document_prefix == ()


@pytest.mark.parametrize("seq_len", [3, 8])
def test_document_starts_are_the_pairs_that_open_a_document(tmp_path, seq_len):
    """With a BOS before every document, a document's first pair is the one whose input is
    the BOS; pieces that continue a document into the next row are not starts."""
    tokenizer, bos = _bos_tokenizer(tmp_path)
    docs = _docs()
    packed = pack(docs, tokenizer, seq_len)
    tokenized = tokenize(docs, tokenizer, add_bos=True)
    index = index_documents(np.cumsum(tokenized.lengths) - tokenized.lengths, tokenized.lengths,
                            seq_len)
    starts = document_starts(index, np.arange(packed.n_rows))
    np.testing.assert_array_equal(starts, (packed.tokens == bos) & (packed.segment_ids > 0))
    assert (packed.positions[:, 0] == 0).all() and not starts[:, 0].all()
    np.testing.assert_array_equal(packed.document_starts(np.arange(packed.n_rows)), starts)
    # Rows packed elsewhere, without the index: every piece but a row's first starts a document.
    unknown = dataclasses.replace(packed, starts=None).document_starts(np.arange(packed.n_rows))
    np.testing.assert_array_equal(unknown[:, 1:], starts[:, 1:])
    assert not unknown[:, 0].any()
