"""kd_jax.data.store and kd_jax.data.prepare: the token store holds exactly the rows packed in
memory, is prepared once, refuses other data by name, survives a kill byte for byte, detects a
damaged row, and costs no memory that grows with the corpus."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from kd_jax.config import Config, ConfigError, DataConfig
from kd_jax.data.batches import Batches
from kd_jax.data.packing import BATCH_KEYS, pack
from kd_jax.data.prepare import prepare
from kd_jax.data.sources import iter_documents, load_documents
from kd_jax.data.store import StoreError, open_store, verify_store
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.data.test_chat import CONVERSATION, TURN_END, write_checkpoint

WORDS = np.array("the of and to in is was for on that with as by at from his her an which "
                 "or be are this had not but were it have they one all their said".split())


def write_corpus(path, n_documents, seed=0, prompts=False, words_per_document=60):
    """Deterministic JSONL: `text` documents of random words (a few empty ones), or
    prompt/response pairs."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as file:
        for i in range(n_documents):
            count = int(rng.integers(0, 2 * words_per_document)) if i % 17 else 0
            text = " ".join(WORDS[rng.integers(0, len(WORDS), count)])
            row = {"prompt": f"q{i}: " + text[:20], "response": text} if prompts else {
                "text": text}
            file.write(json.dumps(row) + "\n")
    return path


def data_config(corpus, store, **overrides):
    fields = {"source": "json", "path": str(corpus), "seq_len": 32, "store": str(store),
              "store_shard_mb": 0.004, **overrides}
    return DataConfig(**fields)


def assert_same_rows(stored, packed):
    assert (stored.n_rows, stored.seq_len) == (packed.n_rows, packed.seq_len)
    every = np.arange(packed.n_rows)
    got, want = stored.take(every), packed.take(every)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(stored.row_hashes()), packed.row_hashes())
    np.testing.assert_array_equal(stored.document_starts(every), packed.document_starts(every))


@pytest.mark.parametrize("prompts", [False, True])
def test_the_store_holds_the_rows_packed_in_memory(tmp_path, prompts):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 300, prompts=prompts)
    columns = {"prompt_column": "prompt", "response_column": "response"} if prompts else {}
    cfg = data_config(corpus, tmp_path / "store", max_documents=250, **columns)
    tokenizer = ByteTokenizer()
    summary = prepare(cfg, tokenizer, progress=False)
    assert summary["prepared"] and len(list((tmp_path / "store").glob("p0-*.json"))) > 5
    train, heldout = open_store(cfg, tokenizer)
    documents = load_documents(cfg)
    for stored, docs in zip((train, heldout), documents):
        assert_same_rows(stored, pack(docs, tokenizer, cfg.seq_len, cfg.add_bos))
    assert train.trained_tokens == int(train.take(np.arange(train.n_rows))["loss_mask"].sum())


def write_prefix_tokenizer(path, corpus):
    """A BPE tokenizer.json whose encodings start with <s>, as Llama's start with their
    beginning-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=120,
                                                       special_tokens=["[UNK]", "<s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.save(str(path))
    return path


def test_a_prefix_tokenizer_and_a_hub_style_heldout_split(tmp_path):
    """A tokenizer.json whose documents start with a beginning-of-sequence id, and a held-out
    split of its own (the store's second part); the streamed split reads the same documents."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_corpus(folder / "train.jsonl", 120, seed=1)
    write_corpus(folder / "test.jsonl", 30, seed=2)
    tokenizer_path = write_prefix_tokenizer(tmp_path / "tokenizer.json", folder / "train.jsonl")
    tokenizer = load_tokenizer(str(tokenizer_path))
    assert tokenizer.document_prefix
    cfg = data_config(folder, tmp_path / "store", source="hub", heldout_split="test",
                      tokenizer=str(tokenizer_path))
    prepare(cfg, tokenizer, progress=False)
    train, heldout = open_store(cfg, tokenizer)
    docs_train, docs_heldout = load_documents(cfg)
    assert_same_rows(train, pack(docs_train, tokenizer, cfg.seq_len))
    assert_same_rows(heldout, pack(docs_heldout, tokenizer, cfg.seq_len))
    streamed = list(iter_documents(DataConfig(**{**cfg.__dict__, "streaming": True}), "test"))
    assert streamed == docs_heldout


def test_heldout_files_named_by_the_user_are_the_heldout_rows(tmp_path):
    """data.heldout_path: the held-out rows are exactly the named files' rows and data.path is
    trained on whole (heldout_fraction unused), in memory and in a store; a store of the
    fraction's split, or of other held-out files, is another store."""
    train_file = write_corpus(tmp_path / "train.jsonl", 90, seed=3)
    first, second = (write_corpus(tmp_path / f"validation-{i}.jsonl", 20, seed=4 + i)
                     for i in range(2))
    cfg = data_config(train_file, tmp_path / "store",
                      heldout_path=f"{tmp_path / 'validation-*.jsonl'}")
    tokenizer = ByteTokenizer()
    docs_train, docs_heldout = load_documents(cfg)
    assert [doc.text for doc in docs_heldout] == [
        doc.text for doc in iter_documents(data_config(first, None), "train")] + [
        doc.text for doc in iter_documents(data_config(second, None), "train")]
    assert [doc.text for doc in docs_train] == [
        doc.text for doc in iter_documents(data_config(train_file, None), "train")]

    prepare(cfg, tokenizer, progress=False)
    train, heldout = open_store(cfg, tokenizer)
    assert_same_rows(train, pack(docs_train, tokenizer, cfg.seq_len))
    assert_same_rows(heldout, pack(docs_heldout, tokenizer, cfg.seq_len))
    with pytest.raises(StoreError, match="was prepared with other data .*heldout_path"):
        open_store(DataConfig(**{**cfg.__dict__, "heldout_path": str(first)}), tokenizer)
    with pytest.raises(StoreError, match="was prepared with other data"):
        open_store(DataConfig(**{**cfg.__dict__, "heldout_path": ""}), tokenizer)


@pytest.mark.parametrize("overrides, message", [
    ({"heldout_path": "{train}"}, "is in data.path too"),
    ({"heldout_path": "{dir}/none-*.jsonl"}, "no file matches"),
    ({"heldout_path": "{train}", "heldout_split": "test"}, "set one"),
    ({"source": "stdlib", "path": "", "heldout_path": "{train}"},
     "source 'stdlib' holds out files by data.heldout_fraction"),
])
def test_bad_heldout_paths_are_one_line_errors(tmp_path, overrides, message):
    from kd_jax.config import validate

    train_file = write_corpus(tmp_path / "train.jsonl", 10)
    fields = {key: value.format(train=train_file, dir=tmp_path) if isinstance(value, str)
              else value for key, value in overrides.items()}
    cfg = Config(data=data_config(train_file, tmp_path / "store", **fields))
    with pytest.raises(ConfigError, match=message) as caught:
        validate(cfg)
        load_documents(cfg.data)
    assert "\n" not in str(caught.value)


def test_chat_rows_train_on_exactly_the_assistant_tokens(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint")
    conversations = []
    for i in range(12):
        turns = [dict(message) for message in CONVERSATION[: 3 + 2 * (i % 2)]]
        turns[1]["content"] += f" ({i})"
        conversations.append(turns)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps({"messages": turns}) + "\n" for turns in conversations))
    tokenizer = load_tokenizer(str(folder))
    cfg = data_config(corpus, tmp_path / "store", messages_column="messages",
                      tokenizer=str(folder / "tokenizer.json"), seq_len=48)
    prepare(cfg, tokenizer, progress=False)
    train, _ = open_store(cfg, tokenizer)
    docs_train, _ = load_documents(cfg)
    packed = pack(docs_train, tokenizer, cfg.seq_len)
    assert_same_rows(train, packed)
    # The labels the loss covers are the assistant turns, each with its closing marker,
    # encoded on their own, in order, and nothing else.
    expected = [tokenizer.encode(message["content"] + TURN_END)
                for doc in docs_train
                for message in conversations[int(doc.name.split()[-1])]
                if message["role"] == "assistant"]
    trained_labels = packed.labels[packed.loss_mask.astype(bool)]
    np.testing.assert_array_equal(trained_labels, np.concatenate(expected))
    assert train.trained_tokens == len(trained_labels)


def test_a_second_prepare_tokenizes_nothing(tmp_path):
    cfg = data_config(write_corpus(tmp_path / "c.jsonl", 100), tmp_path / "store")
    prepare(cfg, ByteTokenizer(), progress=False)
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "store").iterdir()}
    summary = prepare(cfg, ByteTokenizer(), progress=False)
    assert not summary["prepared"]
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "store").iterdir()}
    assert after == before


@pytest.mark.parametrize("change, named", [
    ({"tokenizer": "bpe"}, "another tokenizer (data.tokenizer"),
    ({"text_column": "prompt"}, "other data (data.text_column"),
    ({"touch": True}, "other data (its files changed"),
    ({"seq_len": 64}, "another packing (data.seq_len: 32 there, 64 now)"),
    ({"heldout_fraction": 0.2}, "another packing (data.heldout_fraction"),
])
def test_a_store_of_something_else_is_refused_by_name(tmp_path, change, named):
    from tests.helpers import write_tokenizer

    corpus = write_corpus(tmp_path / "c.jsonl", 60, prompts=True)
    cfg = data_config(corpus, tmp_path / "store", text_column="response")
    prepare(cfg, ByteTokenizer(), progress=False)
    tokenizer = ByteTokenizer()
    if change.pop("tokenizer", None):
        tokenizer = load_tokenizer(str(write_tokenizer(tmp_path / "t.json", corpus)))
    if change.pop("touch", None):
        os.utime(corpus, ns=(time.time_ns(), time.time_ns() + 10**9))
    other = DataConfig(**{**cfg.__dict__, **change})
    for attempt in (lambda: open_store(other, tokenizer), lambda: prepare(other, tokenizer)):
        with pytest.raises(StoreError, match="^data.store .* was prepared with " +
                           named.replace("(", r"\(").replace(")", r"\)")) as caught:
            attempt()
        assert "\n" not in str(caught.value)


def _files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_prepare_killed_midway_resumes_to_the_same_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 3000, words_per_document=200)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cfg = data_config(corpus, killed, store_shard_mb=0.02)
    script = ("import sys; from kd_jax.config import DataConfig; from kd_jax.data.prepare "
              "import prepare; from kd_jax.data.tokenizers import ByteTokenizer; "
              f"prepare(DataConfig(**{cfg.__dict__!r}), ByteTokenizer(), progress=False)")
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (killed / "p0-00004.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "prepare ended early"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists()
    with pytest.raises(StoreError):  # a store being prepared is not read
        open_store(cfg, ByteTokenizer())
    assert prepare(cfg, ByteTokenizer(), progress=False)["prepared"]
    prepare(DataConfig(**{**cfg.__dict__, "store": str(clean)}), ByteTokenizer(),
            progress=False)
    assert _files(killed) == _files(clean)


def test_a_damaged_row_is_refused_when_read(tmp_path):
    cfg = data_config(write_corpus(tmp_path / "c.jsonl", 100), tmp_path / "store")
    prepare(cfg, ByteTokenizer(), progress=False)
    shard = tmp_path / "store" / "p0-00001.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    train, heldout = open_store(cfg, ByteTokenizer())
    with pytest.raises(StoreError, match="does not match its recorded hash"):
        for split in (train, heldout):
            split.take(np.arange(split.n_rows))


def test_prepare_of_a_prepared_store_reads_every_row_back(tmp_path, capsys):
    """kd-jax prepare on a store already there verifies it: every row against its hash, on
    threads, blocks of rows at a time; a flipped byte anywhere, or a truncated shard, is named
    in one line before any run reads it."""
    from kd_jax import cli

    corpus = write_corpus(tmp_path / "c.jsonl", 200)
    cfg = data_config(corpus, tmp_path / "store")
    prepare(cfg, ByteTokenizer(), progress=False)
    train, heldout = open_store(cfg, ByteTokenizer())
    summary = prepare(cfg, ByteTokenizer(), progress=False, verify=True)
    assert not summary["prepared"] and summary["verified"] == train.n_rows + heldout.n_rows
    # Blocks of one row on 3 threads read the same rows as one block.
    assert verify_store(tmp_path / "store", workers=3, block_tokens=1)["rows"] == \
        summary["verified"]
    config = tmp_path / "p.yaml"
    config.write_text(f"data: {{source: json, path: {corpus}, seq_len: 32, tokenizer: byte, "
                      f"store: {tmp_path / 'store'}, store_shard_mb: 0.004}}\n")
    capsys.readouterr()
    assert cli.main(["prepare", str(config)]) == 0
    assert f"every row read back and matching its recorded hash ({summary['verified']:,} rows" \
        in capsys.readouterr().out

    shards = sorted((tmp_path / "store").glob("p*-*.tokens.npy"))
    for shard in (shards[0], shards[len(shards) // 2], shards[-1]):
        pristine = shard.read_bytes()
        damaged = bytearray(pristine)
        damaged[-3] ^= 0x01
        shard.write_bytes(bytes(damaged))
        with pytest.raises(StoreError, match=f"^data.store '.*': {shard.name} does not match "
                                             "its recorded sha256"):
            prepare(cfg, ByteTokenizer(), progress=False, verify=True)
        shard.write_bytes(pristine[:-8])  # truncated: numpy cannot map it
        with pytest.raises(StoreError, match=f"cannot read {shard.name}"):
            prepare(cfg, ByteTokenizer(), progress=False, verify=True)
        shard.write_bytes(pristine)
    damaged = bytearray(shards[1].read_bytes())
    damaged[-1] ^= 0x01  # a document's last token: only a label, in no row's hash
    shards[1].write_bytes(bytes(damaged))
    assert cli.main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{shards[1].name} does not match its recorded sha256" in err[0]

    # A store prepared before shards had digests: its rows' hashes still catch a token.
    manifest_path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = [{k: v for k, v in s.items() if k != "sha256"}
                          for s in manifest["shards"]]
    manifest_path.write_text(json.dumps(manifest))
    damaged[-1] ^= 0x01
    damaged[-3] ^= 0x01
    shards[1].write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match=r"^data.store '.*': (train|heldout) row \d+ does not "
                                         "match its recorded hash"):
        prepare(cfg, ByteTokenizer(), progress=False, verify=True)


def test_bad_stores_are_one_line_errors(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 30)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare(data_config(corpus, tmp_path / "file"), ByteTokenizer())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and is not a token store"):
        prepare(data_config(corpus, tmp_path / "full"), ByteTokenizer())
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    cfg = data_config(corpus, tmp_path / "store")
    prepare(cfg, ByteTokenizer(), progress=False)
    (tmp_path / "store" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot read manifest.json"):
        open_store(cfg, ByteTokenizer())


def _peak_bytes_of_reading(cfg: Config, steps: int) -> int:
    """Peak Python-heap bytes (numpy included) of opening the store and reading `steps`
    training batches and a held-out batch."""
    from kd_jax.train.builder import load_data

    tracemalloc.start()
    try:
        data = load_data(cfg)
        batches = Batches(data.train, global_batch=16, seed=0)
        for step in range(steps):
            batches.take(batches.rows(step, np.arange(16)))
        data.heldout.take(np.arange(16))  # as many rows for either corpus
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks, rows = {}, {}
    for name, documents in (("small", 400), ("large", 40_000)):
        corpus = write_corpus(tmp_path / f"{name}.jsonl", documents, words_per_document=150)
        cfg = Config(data=data_config(corpus, tmp_path / name, seq_len=256, tokenizer="byte",
                                      store_shard_mb=4))
        rows[name] = prepare(cfg.data, ByteTokenizer(), progress=False)["train_rows"]
        peaks[name] = _peak_bytes_of_reading(cfg, steps=20)
    assert (tmp_path / "large.jsonl").stat().st_size > 20e6  # tens of MB, 100x the small one
    # In memory, the large corpus's rows alone would be 20 bytes a token (5 int32 arrays). What
    # grows is one epoch's permutation of the rows, 8 bytes a row (1/32 of a byte a token).
    growth = peaks["large"] - peaks["small"]
    assert growth < 8 * (rows["large"] - rows["small"]) + 100_000, (growth, peaks, rows)


def test_a_teacher_cache_sees_the_same_rows_in_a_store(tmp_path):
    """A cache is checked against the rows' fingerprints: the same for a store and for the
    rows packed in memory, so a cache made from either serves the other."""
    from kd_jax.cache.fingerprints import fingerprints

    cfg = Config(data=data_config(write_corpus(tmp_path / "c.jsonl", 80), tmp_path / "store"))
    tokenizer = ByteTokenizer()
    prepare(cfg.data, tokenizer, progress=False)
    stored, _ = open_store(cfg.data, tokenizer)
    packed = pack(load_documents(cfg.data)[0], tokenizer, cfg.data.seq_len)
    assert (fingerprints(cfg, tokenizer, stored, "teacher")
            == fingerprints(cfg, tokenizer, packed, "teacher"))
