"""Tests for kd_jax/data.py: tokenizers, document sources, packing, and step-addressed batches."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kd_jax import data  # noqa: E402
from kd_jax.config import ConfigError, DataConfig  # noqa: E402
from kd_jax.data import Document  # noqa: E402

TEXTS = ["hello world", "héllo wörld, ça va?", "def f(x):\n    return x + 1\n", "日本語のテキスト",
         "the quick brown fox jumps over the lazy dog"]


# ----------------------------------------------------------------------------- tokenizers


def test_importing_data_pulls_in_neither_jax_nor_hf_libraries():
    code = ("import sys, kd_jax.data; "
            "print(sorted({'jax', 'datasets', 'tokenizers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"


def test_byte_tokenizer_round_trip():
    tokenizer = data.ByteTokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([104, 105, 300]) == "hi\ufffd"  # padded vocab rows never raise
    assert tokenizer.vocab_size == 256
    np.testing.assert_array_equal(tokenizer.byte_lengths(), np.ones(256))
    assert data.load_tokenizer("byte").fingerprint == "byte-v1"


def _byte_level_bpe(path, vocab_size=300, corpus=TEXTS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(corpus) * 4, trainer)
    tokenizer.save(str(path))
    return path


def _word_level(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"],
                                                                   show_progress=False))
    tokenizer.save(str(path))
    return path


def test_hf_byte_level_bpe_round_trip_and_exact_byte_lengths(tmp_path):
    tokenizer = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "tokenizer.json")))
    assert isinstance(tokenizer, data.HFTokenizer)
    assert tokenizer.vocab_size == 300
    for text in TEXTS + ["unseen wörds ✓"]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.max() < tokenizer.vocab_size
        assert tokenizer.decode(ids) == text
        # Byte-level BPE lengths are exact: the pieces add up to the text's UTF-8 size.
        assert tokenizer.byte_lengths()[ids].sum() == len(text.encode("utf-8"))
    assert tokenizer.encode("hello world").size < len("hello world")  # merges were learned
    assert tokenizer.byte_lengths()[tokenizer._tokenizer.token_to_id("<eos>")] == 0
    # A folder holding tokenizer.json is accepted too.
    assert data.load_tokenizer(str(tmp_path)).fingerprint == tokenizer.fingerprint


def test_hf_fingerprint_follows_file_content(tmp_path):
    first = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "a.json")))
    same = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "b.json")))
    other = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "c.json", vocab_size=280)))
    assert first.fingerprint == same.fingerprint
    assert first.fingerprint != other.fingerprint


def test_hf_word_level_tokenizer(tmp_path):
    tokenizer = data.load_tokenizer(str(_word_level(tmp_path / "tokenizer.json")))
    ids = tokenizer.encode("hello world")
    assert len(ids) == 2
    assert "hello" in tokenizer.decode(ids) and "world" in tokenizer.decode(ids)
    assert tokenizer.byte_lengths()[ids].tolist() == [5, 5]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer file"):
        data.load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json") as err:
        data.load_tokenizer(str(bad))
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------- packing


def _reference_pack(docs, tokenizer, seq_len):
    """A slow, obviously-correct packer: one Python step per pair."""
    rows, row = [], []
    for doc in docs:
        prompt = [] if doc.prompt is None else list(tokenizer.encode(doc.prompt))
        ids = prompt + list(tokenizer.encode(doc.text))
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
    return dict(zip(("tokens", "targets", "segment_ids", "positions", "loss_mask"), columns))


def _docs():
    return [Document("abcdefghij"), Document("x"), Document(""), Document("klm"),
            Document("nopqrstuvwxyz0123"), Document("é!"), Document("ok")]


@pytest.mark.parametrize("seq_len", [1, 2, 5, 7, 16, 64])
def test_pack_matches_reference(seq_len):
    tokenizer = data.ByteTokenizer()
    docs = _docs()
    packed = data.pack(docs, tokenizer, seq_len)
    expected = _reference_pack(docs, tokenizer, seq_len)
    for key, want in expected.items():
        got = getattr(packed, key)
        assert got.dtype == np.int32 and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_pack_keeps_every_pair_once_in_order_and_pads_only_the_last_row():
    tokenizer = data.ByteTokenizer()
    docs = _docs()
    packed = data.pack(docs, tokenizer, seq_len=5)
    real = packed.segment_ids.reshape(-1) > 0
    pairs = list(zip(packed.tokens.reshape(-1)[real], packed.targets.reshape(-1)[real]))
    expected = [(ids[j], ids[j + 1]) for ids in (tokenizer.encode(d.text) for d in docs)
                for j in range(len(ids) - 1)]
    assert pairs == expected
    assert real[: len(expected)].all() and not real[len(expected):].any()
    padding = packed.segment_ids == 0
    assert padding[:-1].sum() == 0  # only the final row is padded
    for key in ("tokens", "targets", "positions", "loss_mask"):
        assert (getattr(packed, key)[padding] == 0).all()


def test_pack_restarts_segments_and_positions_across_rows():
    packed = data.pack([Document("abcdefg"), Document("hij")], data.ByteTokenizer(), seq_len=4)
    # pairs: 6 from the first document, 2 from the second -> rows of 4
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 1], [1, 1, 2, 2]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 3], [0, 1, 0, 1]])
    assert packed.tokens[1].tobytes() == np.frombuffer(b"efhi", np.uint8).astype(
        np.int32).tobytes()


def test_pack_prompt_response_masks_prompt_targets():
    tokenizer = data.ByteTokenizer()
    docs = [Document(text="RESP", prompt="pr"), Document("plain")]
    packed = data.pack(docs, tokenizer, seq_len=16)
    n = (3 + 2) + 4  # "prRESP" gives 5 pairs, "plain" gives 4
    # Target of pair j is token j + 1; the first target ("r") is prompt, then R, E, S, P.
    np.testing.assert_array_equal(packed.loss_mask[0, :n], [0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert packed.byte_count == 8  # 4 response bytes + 4 targets of "plain"
    assert tokenizer.decode(packed.targets[0, :5][packed.loss_mask[0, :5] == 1]) == "RESP"


def test_pack_byte_count():
    tokenizer = data.ByteTokenizer()
    docs = [Document(text) for text in TEXTS]
    packed = data.pack(docs, tokenizer, seq_len=8)
    assert packed.byte_count == sum(len(t.encode("utf-8")) - 1 for t in TEXTS)
    assert packed.byte_count == packed.loss_mask.sum()


def test_pack_byte_count_with_bpe(tmp_path):
    tokenizer = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "tokenizer.json")))
    docs = [Document(text) for text in TEXTS]
    packed = data.pack(docs, tokenizer, seq_len=8)
    first_token_bytes = sum(int(tokenizer.byte_lengths()[tokenizer.encode(t)[0]]) for t in TEXTS)
    assert packed.byte_count == sum(len(t.encode("utf-8")) for t in TEXTS) - first_token_bytes


def test_pack_empty_raises():
    with pytest.raises(ConfigError, match="empty"):
        data.pack([Document(""), Document("a")], data.ByteTokenizer(), seq_len=8)


# -------------------------------------------------------------------------------- batches


def _packed_rows(n_rows, seq_len=4):
    """A packed set whose row r holds the value r everywhere, to read row indices back."""
    values = np.repeat(np.arange(n_rows, dtype=np.int32)[:, None], seq_len, axis=1)
    return data.Packed(tokens=values, targets=values, positions=values, segment_ids=values + 1,
                       loss_mask=np.ones_like(values), byte_count=float(values.size))


def test_batches_are_deterministic_and_seeded():
    packed = _packed_rows(23)
    a, b, c = (data.Batches(packed, 8, seed) for seed in (0, 0, 1))
    for step in (0, 1, 7, 100):
        batch = a.at(step)
        assert set(batch) == set(data.BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (8, 4) for v in batch.values())
        np.testing.assert_array_equal(batch["tokens"], b.at(step)["tokens"])
    assert any(not np.array_equal(a.at(s)["tokens"], c.at(s)["tokens"]) for s in range(3))


def test_batches_visit_every_row_once_per_epoch():
    n_rows, batch = 23, 4
    batches = data.Batches(_packed_rows(n_rows), batch, seed=3)
    stream = np.concatenate([batches.at(step)["tokens"][:, 0] for step in range(3 * n_rows)])
    epochs = stream[: 4 * n_rows - (4 * n_rows) % n_rows].reshape(-1, n_rows)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n_rows))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    np.testing.assert_array_equal(epochs[1], np.random.default_rng([3, 1]).permutation(n_rows))


def test_batches_process_slices_concatenate_to_global_batch():
    packed = _packed_rows(17)
    whole = data.Batches(packed, 6, seed=5)
    shards = [data.Batches(packed, 6, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(12):
        for key in data.BATCH_KEYS:
            joined = np.concatenate([shard.at(step)[key] for shard in shards])
            np.testing.assert_array_equal(joined, whole.at(step)[key])
        assert shards[0].position(step) == shards[1].position(step) == whole.position(step)
    assert whole.position(5) == 30
    with pytest.raises(ConfigError, match="divisible"):
        data.Batches(packed, 6, seed=0, process_index=0, process_count=4)


def test_batches_at_positions_picks_rows_of_the_global_batch():
    packed = _packed_rows(17)
    batches = data.Batches(packed, 8, seed=2)
    positions = np.array([0, 1, 4, 5])  # e.g. one process's devices on a data x tensor mesh
    for step in range(6):  # crosses epoch boundaries (17 rows, 8 per step)
        whole = batches.at(step)
        part = batches.at(step, positions)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(part[key], whole[key][positions])


def test_heldout_batches_pad_to_one_shape():
    packed = _packed_rows(10)
    batches = list(data.heldout_batches(packed, batch=4, max_sequences=7))
    assert len(batches) == 2
    assert all(b[k].shape == (4, 4) for b in batches for k in data.BATCH_KEYS)
    np.testing.assert_array_equal(batches[0]["tokens"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(batches[1]["tokens"][:3, 0], [4, 5, 6])
    assert (batches[1]["loss_mask"][3] == 0).all() and (batches[1]["segment_ids"][3] == 0).all()
    assert sum(b["loss_mask"].sum() for b in batches) == 7 * 4
    assert len(list(data.heldout_batches(packed, batch=4, max_sequences=100))) == 3


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    byte = data.ByteTokenizer()
    base = DataConfig(source="text", path="a.txt")
    assert data.fingerprint(base, byte) == data.fingerprint(DataConfig(source="text",
                                                                       path="a.txt"), byte)
    bpe = data.load_tokenizer(str(_byte_level_bpe(tmp_path / "tokenizer.json")))
    changed = [DataConfig(source="text", path="b.txt"), DataConfig(source="json", path="a.txt"),
               DataConfig(source="text", path="a.txt", seq_len=128),
               DataConfig(source="text", path="a.txt", seed=1)]
    prints = {data.fingerprint(cfg, byte) for cfg in changed} | {data.fingerprint(base, bpe)}
    assert data.fingerprint(base, byte) not in prints and len(prints) == 5


# ------------------------------------------------------------------------------ documents


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files `datasets` builds from each test's files out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _texts(documents):
    return [doc.text for doc in documents]


def test_load_text_files_with_glob_and_holdout(tmp_path, hf_cache):
    lines = [f"line number {i}" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:20]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[20:]) + "\n\n")  # blank lines are dropped
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), heldout_fraction=0.25, seed=1)
    train, heldout = data.load_documents(cfg)
    assert len(heldout) == 10 and len(train) == 30
    assert sorted(_texts(train) + _texts(heldout)) == sorted(lines)
    assert _texts(train) == [t for t in lines if t in set(_texts(train))]  # source order kept
    again = data.load_documents(cfg)
    assert _texts(again[1]) == _texts(heldout)
    other_seed = data.load_documents(DataConfig(source="text", path=cfg.path,
                                                heldout_fraction=0.25, seed=2))
    assert _texts(other_seed[1]) != _texts(heldout)
    limited, limited_heldout = data.load_documents(
        DataConfig(source="text", path=cfg.path, heldout_fraction=0.25, seed=1, max_documents=5))
    assert _texts(limited) == _texts(train)[:5] and _texts(limited_heldout) == _texts(heldout)


def test_load_jsonl_prompt_response(tmp_path, hf_cache):
    rows = [{"q": f"question {i}?", "a": f"answer {i}.", "id": i} for i in range(10)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(source="json", path=str(path), prompt_column="q", response_column="a",
                     heldout_fraction=0.2)
    train, heldout = data.load_documents(cfg)
    assert len(train) == 8 and len(heldout) == 2
    by_prompt = {doc.prompt: doc.text for doc in train + heldout}
    assert by_prompt == {row["q"]: row["a"] for row in rows}
    packed = data.pack(train, data.ByteTokenizer(), seq_len=32)
    assert packed.byte_count == sum(len(doc.text) for doc in train)


def test_load_parquet_and_csv(tmp_path, hf_cache):
    import datasets

    texts = [f"document {i} " * (i + 1) for i in range(12)]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(12))}).to_parquet(
        str(tmp_path / "d.parquet"))
    cfg = DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), text_column="body",
                     heldout_fraction=0.25)
    train, heldout = data.load_documents(cfg)
    assert sorted(_texts(train + heldout)) == sorted(texts) and len(heldout) == 3

    (tmp_path / "d.csv").write_text("body,n\n" + "".join(f"{t},{i}\n" for i, t in
                                                         enumerate(texts)))
    train, heldout = data.load_documents(DataConfig(source="csv", path=str(tmp_path / "d.csv"),
                                                    text_column="body", heldout_fraction=0.25))
    assert sorted(_texts(train + heldout)) == sorted(texts)


def test_missing_column_names_it_and_the_available_ones(tmp_path, hf_cache):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"content": f"t{i}", "meta": i}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError) as err:
        data.load_documents(DataConfig(source="json", path=str(path)))
    assert "'text'" in str(err.value) and "content" in str(err.value) and "meta" in str(err.value)
    with pytest.raises(ConfigError, match="data.response_column: column 'answer'"):
        data.load_documents(DataConfig(source="json", path=str(path), prompt_column="content",
                                       response_column="answer"))


def test_missing_and_empty_files(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match="no file matches"):
        data.load_documents(DataConfig(source="text", path=str(tmp_path / "nope*.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        data.load_documents(DataConfig(source="text", path=str(tmp_path / "empty.txt")))
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        data.load_documents(DataConfig(source="text", path=str(tmp_path / "blank.txt")))
    with pytest.raises(ConfigError, match="hub"):
        data.load_documents(DataConfig(source="text", path=str(tmp_path / "blank.txt"),
                                       heldout_split="test"))


def test_stdlib_source():
    cfg = DataConfig(source="stdlib", heldout_fraction=0.05, seed=0)
    train, heldout = data.load_documents(cfg)
    assert len(train) > 100 and len(heldout) > 5
    names = [doc.name for doc in train + heldout]
    assert all(name.endswith(".py") for name in names)
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not any(excluded & set(name.split("/")[:-1]) for name in names)
    assert not {doc.name for doc in train} & {doc.name for doc in heldout}
    assert [doc.name for doc in train] == sorted(doc.name for doc in train)
    assert [doc.name for doc in data.load_documents(cfg)[1]] == [doc.name for doc in heldout]
    packed = data.pack(heldout, data.ByteTokenizer(), seq_len=256)
    assert packed.n_rows > 0 and packed.byte_count > 0
