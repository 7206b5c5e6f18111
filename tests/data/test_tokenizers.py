"""kd_jax.data.tokenizers: the byte tokenizer and tokenizer.json files; what text each id stands
for (`token_bytes`, `byte_lengths`, `ids_by_bytes`); and that the data package stays light.

Tokenizer files made here are shared with the other data and cache tests (`TEXTS`,
`write_byte_level_bpe`, `sentences`)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kd_jax.data
from kd_jax.config import ConfigError
from kd_jax.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "héllo wörld, ça va?", "def f(x):\n    return x + 1\n", "日本語のテキスト",
         "the quick brown fox jumps over the lazy dog"]
# Words of the sentences a second byte-level BPE is trained on: accents, CJK and a symbol give it
# multi-byte characters that split across tokens.
WORDS = ("the quick brown fox jumps over a lazy dog while naïve cafés serve crème brûlée to "
         "日本語 readers; def f(x): return x + 1 # ✓ done").split()
REPO_ROOT = Path(__file__).parents[2]


def sentences(rng, count, extra=()):
    words = list(WORDS) + list(extra)
    return [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(count)]


def write_byte_level_bpe(path, vocab_size=300, corpus=TEXTS):
    """A byte-level BPE tokenizer.json (GPT-2 style) trained on `corpus`, with a special token."""
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


def sentence_bpe(folder):
    """The byte-level BPE of 300 ids trained on a few KB of `sentences`, loaded."""
    corpus = sentences(np.random.default_rng(0), 200)
    assert 4_000 < sum(len(line) for line in corpus) < 16_000
    return load_tokenizer(str(write_byte_level_bpe(folder / "tokenizer.json", corpus=corpus)))


def write_word_level(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"],
                                                                   show_progress=False))
    tokenizer.save(str(path))
    return path


def write_sentencepiece(folder, decoder="llama2"):
    """A SentencePiece-style BPE with byte fallback; (folder, vocab).

    `decoder` "llama2" is Llama 2's tokenizer.json decoder (Replace("▁" -> " "), ByteFallback,
    Fuse, Strip); "metaspace" is a Metaspace decoder. Both spell a word start "▁".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}
    for piece in ["\u2581", "t", "h", "e", "\u2581t", "\u2581the", "<s>"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e")]
    vocab["\u2581th"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = {
        "llama2": decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
        "metaspace": decoders.Metaspace()}[decoder]
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, vocab


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return sentence_bpe(tmp_path_factory.mktemp("bpe"))


# ------------------------------------------------------------------------ the data package


def test_importing_data_pulls_in_neither_jax_nor_hf_libraries():
    modules = sorted(f"kd_jax.data.{module.name}"
                     for module in pkgutil.iter_modules(kd_jax.data.__path__))
    assert {"kd_jax.data.tokenizers", "kd_jax.data.sources", "kd_jax.data.packing",
            "kd_jax.data.batches", "kd_jax.data.prefetch"} <= set(modules)
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted({'jax', 'datasets', 'tokenizers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([104, 105, 300]) == "hi\ufffd"  # padded vocab rows never raise
    assert tokenizer.vocab_size == 256
    np.testing.assert_array_equal(tokenizer.byte_lengths(), np.ones(256))
    assert load_tokenizer("byte").fingerprint == "byte-v1"


def test_hf_byte_level_bpe_round_trip_and_exact_byte_lengths(tmp_path):
    tokenizer = load_tokenizer(str(write_byte_level_bpe(tmp_path / "tokenizer.json")))
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == 300
    for text in TEXTS + ["unseen wörds ✓"]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.max() < tokenizer.vocab_size
        assert tokenizer.decode(ids) == text
        # Byte-level BPE lengths are exact: the pieces add up to the text's UTF-8 size.
        assert tokenizer.byte_lengths()[ids].sum() == len(text.encode("utf-8"))
    assert tokenizer.encode("hello world").size < len("hello world")  # merges were learned
    assert tokenizer.byte_lengths()[tokenizer.token_id("<eos>")] == 0
    # A folder holding tokenizer.json is accepted too.
    assert load_tokenizer(str(tmp_path)).fingerprint == tokenizer.fingerprint


def test_hf_fingerprint_follows_file_content(tmp_path):
    first = load_tokenizer(str(write_byte_level_bpe(tmp_path / "a.json")))
    same = load_tokenizer(str(write_byte_level_bpe(tmp_path / "b.json")))
    other = load_tokenizer(str(write_byte_level_bpe(tmp_path / "c.json", vocab_size=280)))
    assert first.fingerprint == same.fingerprint
    assert first.fingerprint != other.fingerprint


def test_hf_word_level_tokenizer(tmp_path):
    tokenizer = load_tokenizer(str(write_word_level(tmp_path / "tokenizer.json")))
    ids = tokenizer.encode("hello world")
    assert len(ids) == 2
    assert "hello" in tokenizer.decode(ids) and "world" in tokenizer.decode(ids)
    assert tokenizer.byte_lengths()[ids].tolist() == [5, 5]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json") as err:
        load_tokenizer(str(bad))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------- what each id stands for


def test_byte_tokenizer_ids_are_their_bytes():
    tokenizer = ByteTokenizer()
    assert tokenizer.ids_by_bytes() == {bytes([i]): i for i in range(256)}
    assert tokenizer.token_bytes() == [bytes([i]) for i in range(256)]


def test_byte_level_bpe_ids_by_bytes(bpe, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    # Two added non-special tokens: one spells the same bytes as a vocabulary token.
    rust = Tokenizer.from_file(str(bpe.path))
    assert rust.token_to_id("\u0120dog") is not None
    rust.add_tokens([AddedToken(" dog", normalized=False), AddedToken("zebra!", normalized=False)])
    rust.save(str(tmp_path / "tokenizer.json"))
    bpe = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ids_by_bytes = bpe.ids_by_bytes()
    bytes_of = {token_id: spelled for spelled, token_id in ids_by_bytes.items()}
    # Every byte is a token of its own (the byte-level alphabet), partial UTF-8 included.
    assert all(bytes([byte]) in ids_by_bytes for byte in range(256))
    assert ids_by_bytes[b"a"] == bpe.token_id("a")
    assert ids_by_bytes[b" "] == bpe.token_id("\u0120")  # GPT-2 spells a space 'Ġ'
    # The ids of any text spell exactly its UTF-8 bytes, including characters never trained on.
    for text in ["the quick fox", " naïve crème brûlée", "日本語 ✓ €uro \t\n", "zebra! x"]:
        assert b"".join(bytes_of[i] for i in bpe.encode(text)) == text.encode("utf-8")
    # The special token is no text; an added token loses a tie to the vocabulary token.
    assert bpe.token_id("<eos>") not in bytes_of and b"<eos>" not in ids_by_bytes
    added_dog = bpe.token_id(" dog")
    assert added_dog >= bpe._tokenizer.get_vocab_size(with_added_tokens=False)
    assert ids_by_bytes[b" dog"] == bpe.token_id("\u0120dog") < added_dog
    # (encode itself matches added tokens first: it emits the added id for this text, a
    # generating model may emit either; the rule picks the vocabulary one.)
    assert bpe.encode(" dog").tolist() == [added_dog]
    assert ids_by_bytes[b"zebra!"] == bpe.token_id("zebra!")  # no vocabulary token spells it


def test_byte_fallback_and_sentencepiece_pieces(tmp_path):
    folder, vocab = write_sentencepiece(tmp_path)
    ids_by_bytes = load_tokenizer(str(folder)).ids_by_bytes()
    assert ids_by_bytes[b"\xe2"] == 0xE2 and ids_by_bytes[b"t"] == vocab["t"]
    assert ids_by_bytes[b" the"] == vocab["\u2581the"] and ids_by_bytes[b" "] == vocab["\u2581"]
    assert b"<s>" not in ids_by_bytes


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_sentencepiece_word_start_counts_its_space(tmp_path, decoder):
    # Changed on purpose: "▁the" is " the", 4 bytes (it was 3, the bytes of "the" decoded alone).
    folder, vocab = write_sentencepiece(tmp_path, decoder)
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.token_bytes()[vocab["\u2581the"]] == b" the"
    assert tokenizer.byte_lengths()[vocab["\u2581the"]] == 4
    assert tokenizer.byte_lengths()[vocab["\u2581"]] == 1
    assert tokenizer.byte_lengths()[vocab["<s>"]] == 0  # a special token stands for no text


@pytest.mark.parametrize("kind", ["byte", "byte_level_bpe", "sentencepiece", "word_level"])
def test_byte_lengths_are_the_lengths_of_token_bytes(tmp_path, kind):
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "byte_level_bpe":
        tokenizer = load_tokenizer(str(write_byte_level_bpe(tmp_path / "tokenizer.json")))
    elif kind == "sentencepiece":
        tokenizer = load_tokenizer(str(write_sentencepiece(tmp_path)[0]))
    else:
        tokenizer = load_tokenizer(str(write_word_level(tmp_path / "tokenizer.json")))
    token_bytes = tokenizer.token_bytes()
    assert len(token_bytes) == tokenizer.vocab_size
    lengths = tokenizer.byte_lengths()
    assert lengths.dtype == np.int32
    assert lengths.tolist() == [len(spelled) for spelled in token_bytes]
