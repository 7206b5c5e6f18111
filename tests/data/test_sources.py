"""kd_jax.data.sources: documents from the standard library, text, JSON, Parquet and CSV files,
the held-out draw, and the refusals that name the missing column or file."""

import json

import pytest

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.packing import pack
from kd_jax.data.sources import load_documents
from kd_jax.data.tokenizers import ByteTokenizer


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
    train, heldout = load_documents(cfg)
    assert len(heldout) == 10 and len(train) == 30
    assert sorted(_texts(train) + _texts(heldout)) == sorted(lines)
    assert _texts(train) == [t for t in lines if t in set(_texts(train))]  # source order kept
    again = load_documents(cfg)
    assert _texts(again[1]) == _texts(heldout)
    other_seed = load_documents(DataConfig(source="text", path=cfg.path,
                                           heldout_fraction=0.25, seed=2))
    assert _texts(other_seed[1]) != _texts(heldout)
    limited, limited_heldout = load_documents(
        DataConfig(source="text", path=cfg.path, heldout_fraction=0.25, seed=1, max_documents=5))
    assert _texts(limited) == _texts(train)[:5] and _texts(limited_heldout) == _texts(heldout)


def test_load_jsonl_prompt_response(tmp_path, hf_cache):
    rows = [{"q": f"question {i}?", "a": f"answer {i}.", "id": i} for i in range(10)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(source="json", path=str(path), prompt_column="q", response_column="a",
                     heldout_fraction=0.2)
    train, heldout = load_documents(cfg)
    assert len(train) == 8 and len(heldout) == 2
    by_prompt = {doc.prompt: doc.text for doc in train + heldout}
    assert by_prompt == {row["q"]: row["a"] for row in rows}
    packed = pack(train, ByteTokenizer(), seq_len=32)
    assert packed.byte_count == sum(len(doc.text) for doc in train)


def test_load_parquet_and_csv(tmp_path, hf_cache):
    import datasets

    texts = [f"document {i} " * (i + 1) for i in range(12)]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(12))}).to_parquet(
        str(tmp_path / "d.parquet"))
    cfg = DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), text_column="body",
                     heldout_fraction=0.25)
    train, heldout = load_documents(cfg)
    assert sorted(_texts(train + heldout)) == sorted(texts) and len(heldout) == 3

    (tmp_path / "d.csv").write_text("body,n\n" + "".join(f"{t},{i}\n" for i, t in
                                                         enumerate(texts)))
    train, heldout = load_documents(DataConfig(source="csv", path=str(tmp_path / "d.csv"),
                                               text_column="body", heldout_fraction=0.25))
    assert sorted(_texts(train + heldout)) == sorted(texts)


def test_missing_column_names_it_and_the_available_ones(tmp_path, hf_cache):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"content": f"t{i}", "meta": i}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError) as err:
        load_documents(DataConfig(source="json", path=str(path)))
    assert "'text'" in str(err.value) and "content" in str(err.value) and "meta" in str(err.value)
    with pytest.raises(ConfigError, match="data.response_column: column 'answer'"):
        load_documents(DataConfig(source="json", path=str(path), prompt_column="content",
                                  response_column="answer"))


def test_missing_and_empty_files(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match="no file matches"):
        load_documents(DataConfig(source="text", path=str(tmp_path / "nope*.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_documents(DataConfig(source="text", path=str(tmp_path / "empty.txt")))
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_documents(DataConfig(source="text", path=str(tmp_path / "blank.txt")))
    with pytest.raises(ConfigError, match="hub"):
        load_documents(DataConfig(source="text", path=str(tmp_path / "blank.txt"),
                                  heldout_split="test"))


def test_stdlib_source():
    cfg = DataConfig(source="stdlib", heldout_fraction=0.05, seed=0)
    train, heldout = load_documents(cfg)
    assert len(train) > 100 and len(heldout) > 5
    names = [doc.name for doc in train + heldout]
    assert all(name.endswith(".py") for name in names)
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not any(excluded & set(name.split("/")[:-1]) for name in names)
    assert not {doc.name for doc in train} & {doc.name for doc in heldout}
    assert [doc.name for doc in train] == sorted(doc.name for doc in train)
    assert [doc.name for doc in load_documents(cfg)[1]] == [doc.name for doc in heldout]
    packed = pack(heldout, ByteTokenizer(), seq_len=256)
    assert packed.n_rows > 0 and packed.byte_count > 0
