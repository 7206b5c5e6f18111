"""kd_jax.cache.api_import from an API whose tokens are not the student's: the response is
re-tokenized, positions align where both tokenizations have read the same text, entries map to
the student token they spell or the longest one they start with (merged by logsumexp), and a
position inside an API token has no target; checked against hand computations. Also: the
student's own tokens keep the plain import, the refusals (text the student's tokenizer changes,
bytes that are not text, nothing to distill), and distilling from such a cache through the CLI."""

import json
import math

import numpy as np
import pytest

from kd_jax import cli
from kd_jax.cache import api_import
from kd_jax.cache.manifest import FINGERPRINT_PARTS, CacheError, make_manifest, read_manifest
from kd_jax.cache.reader import CacheReader
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.cache.test_api_import import RTOL, _responses, _write_jsonl
from tests.data.test_tokenizers import sentence_bpe

SPACE = "\u0120"  # how a byte-level BPE writes a space


def merging_student(path, lowercase=False):
    """A byte-level BPE whose only merges are " 2", " t", " th", " the" and " c": digits, "€"
    and most words are read a byte at a time."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [(SPACE, "2"), (SPACE, "t"), (SPACE + "t", "h"), (SPACE + "th", "e"), (SPACE, "c")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return merging_student(tmp_path_factory.mktemp("student") / "tokenizer.json")


def _entry(spelled, probability):
    return {"token": spelled.decode("utf-8", errors="replace"), "bytes": list(spelled),
            "logprob": math.log(probability)}


def _line(prompt, tokens):
    """A layout (a) record; `tokens` are (bytes, probability, [(bytes, probability), ...])."""
    content = [{**_entry(spelled, probability), "top_logprobs": [_entry(*top) for top in tops]}
               for spelled, probability, tops in tokens]
    return {"prompt": prompt, "logprobs": {"content": content}}


def _import(tmp_path, tokenizer, records, seq_len, value_dtype="float32"):
    jsonl = _write_jsonl(tmp_path / "r.jsonl", records)
    summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=seq_len,
                                             heldout_fraction=0.0, value_dtype=value_dtype)
    train, _ = api_import.load_rows(tmp_path / "c", tokenizer)
    with CacheReader(tmp_path / "c", verify_checksums=True) as reader:
        cached = reader.read([0])
    return summary, train, {key: value[0] for key, value in cached.items()}


def _assert_targets(cached, pair, want, tail):
    """The cached entries of `pair` are `want` [(id, probability)] in order, then padding."""
    k = cached["ids"].shape[-1]
    ids = [token_id for token_id, _ in want]
    np.testing.assert_array_equal(cached["ids"][pair], np.pad(ids, (0, k - len(ids))))
    np.testing.assert_allclose(cached["logprobs"][pair, :len(want)],
                               np.log([p for _, p in want]), rtol=RTOL["float32"])
    assert np.all(cached["logprobs"][pair, len(want):] == -np.inf)
    np.testing.assert_allclose(cached["tail"][pair], math.log(tail), rtol=RTOL["float32"])


def _assert_no_target(cached, pair):
    assert not cached["ids"][pair].any() and np.all(cached["logprobs"][pair] == -np.inf)
    assert cached["tail"][pair] == 0.0


def test_merged_api_tokens_align_where_both_have_read_the_same_text(tmp_path, student):
    sid = student.ids_by_bytes()
    # The student reads " the", " c", "a", "t", " ", "i", "n", " 2", "0", "2", "4", " ",
    # e2, 82, ac, "5"; the API " th", "e c", "at", " in", " 2024", " €", "5". Student tokens
    # start at bytes 0 4 6 7 8 9 10 11 13 14 15 16 17 18 19 20, the API's at 0 3 6 8 11 16 20.
    record = _line("Q:", [
        (b" th", 0.7, [(b" th", 0.7), (b" a", 0.2)]),
        (b"e c", 0.5, [(b"e c", 0.5)]),  # starts inside " the": read by no student position
        (b"at", 0.6, [(b"at", 0.6), (b"og", 0.3)]),
        (b" in", 0.5, [(b" in", 0.5), (b" on", 0.25), (b" the", 0.125)]),
        (b" 2024", 0.5, [(b" 2024", 0.5), (b" 2025", 0.2), (b" the", 0.1), (b" 2", 0.05)]),
        (" €".encode(), 0.6, [(" €".encode(), 0.6), (b" $", 0.3)]),
        (b"5", 0.4, []),  # no top_logprobs: the generated token alone
    ])
    summary, train, cached = _import(tmp_path, student, [record], seq_len=20)

    response_ids = student.encode(" the cat in 2024 €5")
    assert len(response_ids) == 16
    seq = np.concatenate([student.encode("Q:"), response_ids])
    np.testing.assert_array_equal(train.tokens[0, :17], seq[:-1])
    np.testing.assert_array_equal(train.labels[0, :17], seq[1:])
    # The loss covers exactly the response's 16 student labels, pairs 1..16.
    np.testing.assert_array_equal(np.flatnonzero(train.loss_mask[0]), np.arange(1, 17))

    # Aligned response tokens, by their index j (pair 1 + j), with their mapped entries:
    # " a" -> " ", "at" -> "a", "og" -> "o", " in" and " on" -> " " (merged), " 2024", " 2025"
    # and " 2" -> " 2" (merged), " €" and " $" -> " " (merged).
    want = {0: ([(sid[b" th"], 0.7), (sid[b" "], 0.2)], 0.1),
            2: ([(sid[b"a"], 0.6), (sid[b"o"], 0.3)], 0.1),
            4: ([(sid[b" "], 0.75), (sid[b" the"], 0.125)], 0.125),
            7: ([(sid[b" 2"], 0.75), (sid[b" the"], 0.1)], 0.15),
            11: ([(sid[b" "], 0.9)], 0.1),
            15: ([(sid[b"5"], 0.4)], 0.6)}
    for j in range(16):
        if j in want:
            _assert_targets(cached, 1 + j, *want[j])
        else:  # " c", "t", "i", "n", "0", "2", "4" and the bytes of "€" after the first
            _assert_no_target(cached, 1 + j)
    # The prompt's pair and the padding hold the plain import's filler.
    for pair in (0, 17, 18, 19):
        assert not cached["ids"][pair].any() and not cached["logprobs"][pair].any()
        assert cached["tail"][pair] == -np.inf

    assert summary["k"] == 2 and summary["duplicates_merged"] == 4
    assert summary["mapped_from_api"] and summary["aligned_share"] == 0.375
    assert read_manifest(tmp_path / "c")["mapped_from_api"] == {
        "aligned_positions": 6, "response_positions": 16, "aligned_share": 0.375}


def test_api_tokens_that_split_a_character_map_byte_by_byte(tmp_path):
    # "€12" as e2 82 | ac | "12"; the byte tokenizer reads each byte.
    record = _line("P", [
        (b"\xe2\x82", 0.5, [("€".encode(), 0.5), (b"\xe2", 0.25)]),
        (b"\xac", 0.6, [(b"\xac", 0.6), (b"", 0.3)]),  # spells nothing: its mass is the tail's
        (b"12", 0.5, []),
    ])
    summary, train, cached = _import(tmp_path, ByteTokenizer(), [record], seq_len=6,
                                     value_dtype="float16")
    np.testing.assert_array_equal(train.labels[0, :5], list("€12".encode()))
    np.testing.assert_array_equal(train.loss_mask[0], [1, 1, 1, 1, 1, 0])
    want = {0: ([0xE2], [0.75], 0.25), 2: ([0xAC], [0.6], 0.4), 3: ([ord("1")], [0.5], 0.5)}
    for j in range(5):
        if j not in want:  # 82 (inside e2 82) and "2" (inside "12")
            _assert_no_target(cached, j)
            continue
        ids, probabilities, tail = want[j]
        assert cached["ids"][j, 0] == ids[0]
        np.testing.assert_allclose(cached["logprobs"][j, 0], np.log(probabilities[0]),
                                   rtol=RTOL["float16"])
        np.testing.assert_allclose(cached["tail"][j], math.log(tail), rtol=RTOL["float16"])
    assert summary["aligned_share"] == 0.6


def test_student_tokens_in_another_segmentation_are_mapped(tmp_path, student):
    # " th" + "e" are student tokens, but the student reads " the" as one.
    record = _line("Q", [(b" th", 0.8, [(b" th", 0.8), (b" the", 0.1)]), (b"e", 0.9, [])])
    summary, train, cached = _import(tmp_path, student, [record], seq_len=2)
    sid = student.ids_by_bytes()
    np.testing.assert_array_equal(train.labels[0], [sid[b" the"], 0])
    _assert_targets(cached, 0, [(sid[b" th"], 0.8), (sid[b" the"], 0.1)], 0.1)
    assert summary["mapped_from_api"] and summary["aligned_share"] == 1.0


def test_the_students_own_tokens_keep_the_plain_import(tmp_path, student):
    sid = student.ids_by_bytes()
    record = _line("Q", [(b" the", 0.8, [(b" the", 0.8), (b" 2", 0.1)]), (b" c", 0.9, [])])
    summary, train, cached = _import(tmp_path, student, [record], seq_len=3)
    np.testing.assert_array_equal(train.labels[0], [sid[b" the"], sid[b" c"], 0])
    _assert_targets(cached, 0, [(sid[b" the"], 0.8), (sid[b" 2"], 0.1)], 0.1)
    _assert_targets(cached, 1, [(sid[b" c"], 0.9)], 0.1)
    assert not summary["mapped_from_api"] and summary["aligned_share"] == 1.0
    assert "mapped_from_api" not in json.loads((tmp_path / "c" / "manifest.json").read_text())


@pytest.mark.parametrize("which,records,message", [
    ("lowercase", [_line("Q", [(b" the", 0.5, [])]), _line("Q", [(b" The", 0.5, [])])],
     r"r.jsonl line 2: the student's tokenizer: its tokens do not spell the text \(from byte "
     r"1: b'the' where the text has b'The'\)"),
    ("byte", [_line("Q", [(b"a", 0.5, []), (b"\xe2\x82", 0.5, [])])],
     r"r.jsonl line 1: the response's tokens do not spell UTF-8 text \(unexpected end of data "
     r"at byte 1\)"),
    ("byte", [_line("", [(b"abc", 0.5, [])])],  # no prompt: "b" and "c" are inside "abc"
     r"no response position of .*r.jsonl has a target"),
])
def test_what_cannot_be_mapped_is_refused_in_one_line(tmp_path, which, records, message):
    tokenizer = (merging_student(tmp_path / "lower.json", lowercase=True)
                 if which == "lowercase" else ByteTokenizer())
    jsonl = _write_jsonl(tmp_path / "r.jsonl", records)
    with pytest.raises(CacheError, match=message) as err:
        api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=8)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".c.")]


@pytest.mark.parametrize("mapped,message", [
    ({"aligned_positions": 5, "response_positions": 4, "aligned_share": 1.0}, "is not a share"),
    ({"aligned_positions": 1, "response_positions": 4}, "mapped_from_api lacks aligned_share"),
    ({"aligned": 1, "response_positions": 4, "aligned_share": 0.25}, "unknown key 'aligned'"),
])
def test_a_bad_mapped_from_api_record_is_refused(mapped, message):
    with pytest.raises(CacheError, match=message):
        make_manifest("topk", {"k": 1, "temperature": 1.0}, vocab_size=256, seq_len=4,
                      n_rows=1, rows_per_shard=1, mapped_from_api=mapped,
                      fingerprints=dict.fromkeys(FINGERPRINT_PARTS, "x"))


def test_a_mapped_cache_distills_a_byte_student(tmp_path, capsys):
    """API tokens of a byte-level BPE, a byte student: imported and distilled through the CLI;
    exactly the positions where an API token starts have targets."""
    records, _ = _responses(sentence_bpe(tmp_path), n_lines=12, seed=7)
    jsonl = _write_jsonl(tmp_path / "responses.jsonl", records)
    config = tmp_path / "api.yaml"
    config.write_text(f"""
model: {{vocab_size: 256, d_model: 32, n_layers: 1, n_heads: 4, n_kv_heads: 2, d_ff: 64,
        max_seq_len: 192}}
data: {{source: cache, tokenizer: byte, seq_len: 192, heldout_fraction: 0.2}}
teacher: {{source: cache}}
cache: {{dir: {tmp_path / 'api_cache'}}}
train: {{run_dir: {tmp_path / 'run'}, steps: 3, batch_size: 2, log_every: 1, progress: false}}
""")
    assert cli.main(["cache", "import", str(jsonl), str(tmp_path / "api_cache"),
                     "--config", str(config)]) == 0
    assert "'mapped_from_api': True, 'aligned_share': 0." in capsys.readouterr().out

    train, _ = api_import.load_rows(tmp_path / "api_cache", ByteTokenizer())
    with np.load(tmp_path / "api_cache" / api_import.ROWS_NAME) as rows:
        lines = rows["train_lines"]
    with CacheReader(tmp_path / "api_cache") as reader:
        cached = reader.read(np.arange(train.n_rows))
    for row, line in enumerate(lines):
        record = records[line - 1]
        content = (record["logprobs"] if "logprobs" in record
                   else record["response"]["choices"][0]["logprobs"])["content"]
        lengths = [len(entry["bytes"] or entry["token"].encode()) for entry in content]
        starts = np.cumsum([0] + lengths[:-1])
        pairs = np.flatnonzero(train.loss_mask[row])
        assert len(pairs) == sum(lengths)  # every response byte is a label
        has_target = np.isfinite(cached["logprobs"][row, pairs, 0])
        np.testing.assert_array_equal(np.flatnonzero(has_target), starts)

    assert cli.main(["distill", str(config)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 3 and np.isfinite(report["student"]["bits_per_token"])
