"""kd_jax.cache.api_import: the rows and topk targets of an imported cache read back exactly,
both line layouts, the error cases (nothing left behind), truncation, duplicate merging, and the
held-out split. (How API tokens map to ids, `Tokenizer.ids_by_bytes`, is tested with the
tokenizers in tests/data/test_tokenizers.py.)"""

import hashlib
import json
import math

import numpy as np
import pytest

from kd_jax.cache import api_import
from kd_jax.cache.manifest import (
    FINGERPRINT_PARTS,
    CacheError,
    create_manifest,
    make_manifest,
    read_manifest,
)
from kd_jax.cache.reader import CacheReader
from kd_jax.cache.shards import verify
from kd_jax.data.packing import row_hashes
from kd_jax.data.tokenizers import ByteTokenizer
from tests.data.test_tokenizers import sentence_bpe, sentences

# One ulp of the stored dtype (float16 keeps 11 significant bits, float32 24): covers a value
# computed in float64 by another route than the importer's, then rounded to the stored dtype.
RTOL = {"float16": 2.0 ** -10, "float32": 2.0 ** -23}
FLOAT16_RTOL = RTOL["float16"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 style) of 300 ids trained on a few KB, with a special
    token."""
    return sentence_bpe(tmp_path_factory.mktemp("bpe"))


# ---------------------------------------------------------------- synthetic API responses


def _api_entry(spelled, logprob, rng, allow_null=True):
    """One entry as an API writes it; `bytes` is null now and then when the token is UTF-8."""
    try:
        token, utf8 = spelled.decode("utf-8"), True
    except UnicodeDecodeError:  # OpenAI spells a partial character as "bytes:\xe2\x82"
        token, utf8 = "bytes:" + "".join(f"\\x{byte:02x}" for byte in spelled), False
    null = allow_null and utf8 and rng.random() < 0.3
    return {"token": token, "logprob": float(logprob), "bytes": None if null else list(spelled)}


def _responses(tokenizer, n_lines, seed, max_top=5):
    """(JSONL records, what each should import as), alternating layouts (a) and (b)."""
    rng = np.random.default_rng(seed)
    ids_by_bytes = tokenizer.ids_by_bytes()
    bytes_of = {token_id: spelled for spelled, token_id in ids_by_bytes.items()}
    candidates = np.array(sorted(bytes_of))
    records, expected = [], []
    for line in range(n_lines):
        prompt = "User: " + sentences(rng, 1)[0] + "\nAssistant:"
        response_text = " " + sentences(rng, 1, extra=["€", "𝔘"])[0]
        response_ids = tokenizer.encode(response_text)
        content, positions = [], []
        for token_id in response_ids:
            n_top = int(rng.integers(1, max_top + 1))
            top_ids = rng.choice(candidates, size=n_top, replace=False)
            mass = 1.0 if rng.random() < 0.25 else rng.uniform(0.3, 0.99)
            logprobs = np.log(rng.dirichlet(np.ones(n_top)) * mass)
            entry = _api_entry(bytes_of[int(token_id)], rng.uniform(-3, 0), rng)
            entry["top_logprobs"] = [_api_entry(bytes_of[int(i)], lp, rng)
                                     for i, lp in zip(top_ids, logprobs)]
            content.append(entry)
            order = np.lexsort((top_ids, -logprobs))
            rest = 1.0 - math.fsum(math.exp(lp) for lp in logprobs)
            positions.append((top_ids[order], logprobs[order],
                              math.log(max(rest, 1e-6))))
        logprobs_block = {"content": content}
        if line % 2:
            record = {"prompt": prompt, "response": {
                "id": f"chatcmpl-{line}", "object": "chat.completion", "model": "teacher",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": response_text},
                             "logprobs": logprobs_block}]}}
        else:
            record = {"prompt": prompt, "logprobs": logprobs_block}
        records.append(record)
        expected.append({"prompt_ids": tokenizer.encode(prompt), "response_ids": response_ids,
                         "response_bytes": len(response_text.encode("utf-8")),
                         "positions": positions})
    return records, expected


def _write_jsonl(path, records, blank_line_after=None):
    lines = [json.dumps(record) for record in records]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _stored(values, value_dtype):
    """What the cache holds for float64 `values`: rounded to float32, then to `value_dtype`."""
    return np.asarray(values).astype(np.float32).astype(value_dtype).astype(np.float32)


def _check_cache(cache_dir, tokenizer, expected, seq_len, value_dtype):
    """Everything read back (CacheReader and load_rows) equals the input, row by row."""
    train, heldout = api_import.load_rows(cache_dir, tokenizer)
    with np.load(cache_dir / api_import.ROWS_NAME, allow_pickle=False) as rows:
        lines = {"train": rows["train_lines"], "heldout": rows["heldout_lines"]}
    hashes = row_hashes(train.tokens, train.segment_ids, train.loss_mask)
    assert verify(cache_dir, hashes)["rows"] == train.n_rows
    with CacheReader(cache_dir, verify_checksums=True) as reader:
        cached = reader.read(np.arange(train.n_rows), expected_hashes=hashes)
        k = reader.manifest["params"]["k"]
    assert k == max(len(ids) for line in expected for ids, _, _ in line["positions"])
    for packed, split in ((train, "train"), (heldout, "heldout")):
        assert packed.seq_len == seq_len and packed.n_rows == len(lines[split])
        byte_count = 0
        for row, line_number in enumerate(lines[split]):
            want = expected[line_number - 1]
            prompt, response = want["prompt_ids"], want["response_ids"]
            seq = np.concatenate([prompt, response])
            n_pairs, first = len(seq) - 1, len(prompt) - 1
            np.testing.assert_array_equal(packed.tokens[row, :n_pairs], seq[:-1])
            np.testing.assert_array_equal(packed.labels[row, :n_pairs], seq[1:])
            np.testing.assert_array_equal(packed.positions[row, :n_pairs], np.arange(n_pairs))
            np.testing.assert_array_equal(packed.segment_ids[row], np.arange(seq_len) < n_pairs)
            np.testing.assert_array_equal(packed.loss_mask[row], (np.arange(seq_len) >= first)
                                          & (np.arange(seq_len) < n_pairs))
            for name in ("tokens", "labels", "positions"):
                assert not getattr(packed, name)[row, n_pairs:].any()
            byte_count += want["response_bytes"]
            if split == "heldout":
                continue
            for j, (ids, logprobs, tail) in enumerate(want["positions"]):
                pair = first + j
                np.testing.assert_array_equal(cached["ids"][row, pair],
                                              np.pad(ids, (0, k - len(ids))))
                np.testing.assert_array_equal(cached["logprobs"][row, pair, :len(ids)],
                                              _stored(logprobs, value_dtype))
                assert np.all(cached["logprobs"][row, pair, len(ids):] == -np.inf)
                if tail == -np.inf:
                    assert cached["tail"][row, pair] == -np.inf
                else:
                    np.testing.assert_allclose(cached["tail"][row, pair], tail,
                                               rtol=RTOL[value_dtype])
            outside = packed.loss_mask[row] == 0  # prompt and padding pairs
            assert not cached["ids"][row, outside].any()
            assert not cached["logprobs"][row, outside].any()
            assert np.all(cached["tail"][row, outside] == -np.inf)
        # Byte-level lengths are exact: the masked-in labels are the responses' bytes.
        assert packed.byte_count == byte_count
    return train, heldout, lines


# ------------------------------------------------------------------------------ imports


@pytest.mark.parametrize("which,value_dtype", [("byte", "float16"), ("bpe", "float16"),
                                               ("bpe", "float32")])
def test_import_reads_back_exactly(tmp_path, bpe, which, value_dtype):
    tokenizer = ByteTokenizer() if which == "byte" else bpe
    records, expected = _responses(tokenizer, n_lines=23, seed=1)
    jsonl = _write_jsonl(tmp_path / "responses.jsonl", records)
    entries = [entry for record in records[::2] for entry in record["logprobs"]["content"]]
    entries += [top for entry in entries for top in entry["top_logprobs"]]
    assert any(entry["bytes"] is None for entry in entries)  # fall back to the token's UTF-8
    assert any(entry["token"].startswith("bytes:") for entry in entries)  # part of a character
    seq_len = max(len(want["prompt_ids"]) + len(want["response_ids"]) for want in expected) + 3
    summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "cache",
                                             seq_len=seq_len, heldout_fraction=0.2, seed=4,
                                             value_dtype=value_dtype, rows_per_shard=4)
    assert summary["lines"] == 23 and summary["heldout_rows"] == round(0.2 * 23)
    assert summary["train_rows"] + summary["heldout_rows"] == 23
    assert summary["prompts_cut"] == 0 and summary["shards"] == -(-summary["train_rows"] // 4)
    _, _, lines = _check_cache(tmp_path / "cache", tokenizer, expected, seq_len, value_dtype)
    assert sorted(np.concatenate([lines["train"], lines["heldout"]])) == list(range(1, 24))

    manifest = read_manifest(tmp_path / "cache")
    jsonl_hash = hashlib.sha256(jsonl.read_bytes()).hexdigest()[:16]
    assert manifest["fingerprints"]["teacher"] == "api:" + jsonl_hash
    assert manifest["fingerprints"]["data"] == jsonl_hash
    assert manifest["fingerprints"]["tokenizer"] == tokenizer.fingerprint
    assert manifest["params"]["temperature"] == 1.0 and manifest["value_dtype"] == value_dtype
    assert manifest["vocab_size"] == tokenizer.vocab_size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "responses.jsonl"]
    # A Hugging Face tokenizer is copied in: `data.tokenizer: auto` reads it back from there.
    copied = ["tokenizer"] if which == "bpe" else []
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == sorted([
        "manifest.json", "rows.npz", "shards", *copied])
    if which == "bpe":
        assert (tmp_path / "cache" / "tokenizer" / "tokenizer.json").read_bytes() == \
            bpe.path.read_bytes()


def test_import_is_deterministic_and_the_heldout_split_is_seeded(tmp_path, bpe):
    records, _ = _responses(bpe, n_lines=40, seed=2)
    jsonl = _write_jsonl(tmp_path / "responses.jsonl", records, blank_line_after=5)

    def heldout_lines(name, seed):
        api_import.import_openai_jsonl(jsonl, bpe, tmp_path / name, seq_len=128,
                                       heldout_fraction=0.1, seed=seed)
        with np.load(tmp_path / name / "rows.npz", allow_pickle=False) as rows:
            train, heldout = rows["train_lines"], rows["heldout_lines"]
        assert not set(train) & set(heldout) and len(heldout) == 4
        assert sorted([*train, *heldout]) == [n for n in range(1, 42) if n != 6]  # 6 is blank
        return heldout

    first, again = heldout_lines("a", seed=0), heldout_lines("b", seed=0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, heldout_lines("c", seed=1))
    shard = "shards/000000.kdc"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_two_responses_hold_one_out_and_one_keeps_it(tmp_path):
    tokenizer = ByteTokenizer()
    records, _ = _responses(tokenizer, n_lines=2, seed=3)
    for n_lines, heldout in ((2, 1), (1, 0)):
        jsonl = _write_jsonl(tmp_path / f"{n_lines}.jsonl", records[:n_lines])
        summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / f"c{n_lines}",
                                                 seq_len=256, heldout_fraction=0.01)
        assert (summary["train_rows"], summary["heldout_rows"]) == (n_lines - heldout, heldout)
        _, heldout_rows = api_import.load_rows(tmp_path / f"c{n_lines}", tokenizer)
        assert heldout_rows.tokens.shape == (heldout, 256)


def _one_line(prompt, tokens, top=None):
    """A layout (a) record of byte tokens: each token certain unless `top` is given."""
    content = [{"token": token, "logprob": 0.0, "bytes": list(token.encode()),
                "top_logprobs": top if top is not None else
                [{"token": token, "logprob": 0.0, "bytes": list(token.encode())}]}
               for token in tokens]
    return {"prompt": prompt, "logprobs": {"content": content}}


def test_duplicate_ids_are_merged_by_logsumexp(tmp_path):
    tokenizer = ByteTokenizer()
    # "a" twice (once spelled by bytes, once by its token with bytes null), then "b".
    top = [{"token": "a", "logprob": math.log(0.3), "bytes": [97]},
           {"token": "b", "logprob": math.log(0.5), "bytes": [98]},
           {"token": "a", "logprob": math.log(0.1), "bytes": None}]
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("Q:", ["a"], top)])
    summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=4)
    assert summary["duplicates_merged"] == 1 and summary["k"] == 2
    with CacheReader(tmp_path / "c") as reader:
        cached = reader.read([0])
    pair = 1  # "Q:" + "a": pair 1 predicts the response token
    np.testing.assert_array_equal(cached["ids"][0, pair], [98, 97])  # most probable first
    np.testing.assert_allclose(cached["logprobs"][0, pair], np.log([0.5, 0.4]), rtol=FLOAT16_RTOL)
    np.testing.assert_allclose(cached["tail"][0, pair], math.log(0.1), rtol=FLOAT16_RTOL)


def test_empty_top_logprobs_use_the_generated_token(tmp_path):
    tokenizer = ByteTokenizer()
    record = _one_line("Q", ["x", "y"], top=[])
    record["logprobs"]["content"][1]["logprob"] = math.log(0.25)
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [record])
    summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=8)
    assert summary["k"] == 1
    with CacheReader(tmp_path / "c") as reader:
        cached = reader.read([0])
    np.testing.assert_array_equal(cached["ids"][0, :2, 0], [ord("x"), ord("y")])
    np.testing.assert_allclose(cached["logprobs"][0, :2, 0], [0.0, math.log(0.25)],
                               rtol=FLOAT16_RTOL)
    # logprob 0: all the mass, up to rounding; the tail is floored at 1e-6, not empty.
    np.testing.assert_allclose(cached["tail"][0, :2], [math.log(1e-6), math.log(0.75)],
                               rtol=FLOAT16_RTOL)


def test_without_a_prompt_the_first_response_token_is_only_an_input(tmp_path):
    tokenizer = ByteTokenizer()
    top = [{"token": "q", "logprob": math.log(0.5), "bytes": None}]
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("", list("abc"), top)])
    api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=4)
    train, _ = api_import.load_rows(tmp_path / "c", tokenizer)
    np.testing.assert_array_equal(train.tokens[0], [ord("a"), ord("b"), 0, 0])
    np.testing.assert_array_equal(train.labels[0], [ord("b"), ord("c"), 0, 0])
    np.testing.assert_array_equal(train.loss_mask[0], [1, 1, 0, 0])
    with CacheReader(tmp_path / "c") as reader:
        cached = reader.read([0])
    np.testing.assert_array_equal(cached["ids"][0, :, 0], [ord("q"), ord("q"), 0, 0])
    np.testing.assert_allclose(cached["tail"][0], [math.log(0.5)] * 2 + [-np.inf] * 2,
                               rtol=FLOAT16_RTOL)


def test_a_long_prompt_loses_its_start_and_a_long_response_is_refused(tmp_path):
    tokenizer = ByteTokenizer()
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("0123456789", list("abcd")),
                                                _one_line("PQ", list("wxyz"))])
    summary = api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "c", seq_len=6,
                                             heldout_fraction=0.0)
    assert summary["prompts_cut"] == 1 and summary["train_rows"] == 2
    train, _ = api_import.load_rows(tmp_path / "c", tokenizer)
    # 14 tokens, 13 pairs; the last 7 tokens are kept: "789" + "abcd".
    np.testing.assert_array_equal(train.tokens[0], [ord(c) for c in "789abc"])
    np.testing.assert_array_equal(train.labels[0], [ord(c) for c in "89abcd"])
    np.testing.assert_array_equal(train.loss_mask[0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(train.loss_mask[1], [0, 1, 1, 1, 1, 0])

    # Exactly seq_len response tokens fit behind one prompt token; one more does not.
    fits = _write_jsonl(tmp_path / "fits.jsonl", [_one_line("0123", list("abcdef"))])
    api_import.import_openai_jsonl(fits, tokenizer, tmp_path / "fits", seq_len=6)
    too_long = _write_jsonl(tmp_path / "long.jsonl", [_one_line("P", list("ab")),
                                                      _one_line("0123", list("abcdefg"))])
    with pytest.raises(CacheError, match=r"long.jsonl line 2: the response has 7 tokens, but a "
                                         r"row of seq_len 6 holds at most 6"):
        api_import.import_openai_jsonl(too_long, tokenizer, tmp_path / "long", seq_len=6)
    assert not (tmp_path / "long").exists()


def _assert_nothing_left(tmp_path, inputs):
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(inputs)


def test_a_token_the_student_lacks_is_mapped_not_refused(tmp_path, bpe):
    """One entry that is no student token takes the whole file to the mapped import
    (tests/cache/test_api_import_cross.py): it is credited to the longest student token it
    starts with, and every position still aligns."""
    records, _ = _responses(bpe, n_lines=4, seed=5)
    records[2]["logprobs"]["content"][1]["top_logprobs"][0]["bytes"] = [0xE2, 0x96, 0x71, 0x71]
    assert b"\xe2\x96qq" not in bpe.ids_by_bytes()
    jsonl = _write_jsonl(tmp_path / "top.jsonl", records)
    summary = api_import.import_openai_jsonl(jsonl, bpe, tmp_path / "cache", seq_len=128,
                                             heldout_fraction=0.0)
    assert summary["mapped_from_api"] and summary["aligned_share"] == 1.0
    assert read_manifest(tmp_path / "cache")["mapped_from_api"]["aligned_share"] == 1.0


@pytest.mark.parametrize("line,message", [
    ("not json", r"line 1 is not JSON"),
    ('{"logprobs": {"content": []}}', r'line 1 has no "prompt" string'),
    ('{"prompt": "x", "response": {"choices": []}}', r'"response" has no choices\[0\].logprobs'),
    ('{"prompt": "x", "logprobs": null}', r"logprobs.content is not a list"),
    ('{"prompt": "x", "logprobs": {"content": []}}', r"no response token can be a label"),
    ('{"prompt": "x", "logprobs": {"content": [{"token": "a", "logprob": 0.5}]}}',
     r'response token 0: "logprob" must be a number <= 0, got 0.5'),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    (tmp_path / "r.jsonl").write_text(line + "\n")
    with pytest.raises(CacheError, match=message):
        api_import.import_openai_jsonl(tmp_path / "r.jsonl", ByteTokenizer(),
                                       tmp_path / "cache", seq_len=8)
    _assert_nothing_left(tmp_path, ["r.jsonl"])


@pytest.mark.parametrize("arguments,message", [
    ({"seq_len": 0}, "seq_len must be a positive int"),
    ({"seq_len": 8, "heldout_fraction": 1.0}, r"heldout_fraction must be in \[0, 1\)"),
    ({"seq_len": 8, "value_dtype": "bfloat16"}, "value_dtype must be one of float16, float32"),
])
def test_invalid_arguments(tmp_path, arguments, message):
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("Q", ["a"])])
    with pytest.raises(CacheError, match=message):
        api_import.import_openai_jsonl(jsonl, ByteTokenizer(), tmp_path / "c", **arguments)
    _assert_nothing_left(tmp_path, ["r.jsonl"])


def test_an_existing_cache_dir_is_refused_unless_empty(tmp_path):
    tokenizer = ByteTokenizer()
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("Q", ["a"])])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="already exists and is not empty"):
        api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "full", seq_len=4)
    assert [path.name for path in (tmp_path / "full").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "empty", seq_len=4)
    with pytest.raises(CacheError, match="already exists and is not empty"):
        api_import.import_openai_jsonl(jsonl, tokenizer, tmp_path / "empty", seq_len=4)
    api_import.load_rows(tmp_path / "empty", tokenizer)


def test_load_rows_refuses_other_caches_and_tokenizers(tmp_path, bpe):
    manifest = make_manifest(
        "topk", {"k": 1, "temperature": 1.0}, vocab_size=256, seq_len=4, n_rows=1,
        rows_per_shard=1, fingerprints=dict.fromkeys(FINGERPRINT_PARTS, "x"))
    create_manifest(tmp_path / "precomputed", manifest)
    with pytest.raises(CacheError, match=r"rows.npz is missing: .*precomputed was not made by "
                                         r"`kd-jax cache import`"):
        api_import.load_rows(tmp_path / "precomputed", ByteTokenizer())
    jsonl = _write_jsonl(tmp_path / "r.jsonl", [_one_line("Q", ["a"])])
    api_import.import_openai_jsonl(jsonl, ByteTokenizer(), tmp_path / "c", seq_len=4)
    with pytest.raises(CacheError, match="different tokenizer"):
        api_import.load_rows(tmp_path / "c", bpe)
