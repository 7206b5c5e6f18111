"""Tokenizers: the byte tokenizer, and Hugging Face `tokenizer.json` files.

Besides encoding and decoding, a tokenizer says what text each id stands for, in one place,
`token_bytes()`: bits per byte divides by it (`byte_lengths`), and an API's tokens, which come as
bytes, are mapped back to ids by it (`ids_by_bytes`). numpy only; `tokenizers` is imported when a
tokenizer.json is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from kd_jax.config import ConfigError

_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# When several ids spell the same bytes, `ids_by_bytes` prefers the lowest rank, then the lowest id.
_ORDINARY, _BYTE_PIECE, _ADDED = 0, 1, 2


class Tokenizer(Protocol):
    vocab_size: int
    fingerprint: str
    # The ids the tokenizer puts before every text it encodes with its special tokens (Llama's
    # beginning-of-sequence token); packing starts each document with them (`data.add_bos`).
    document_prefix: tuple[int, ...]

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def token_bytes(self) -> list[bytes]: ...

    def byte_lengths(self) -> np.ndarray: ...

    def ids_by_bytes(self) -> dict[bytes, int]: ...


class ByteTokenizer:
    """Token i is the UTF-8 byte i; no special tokens. Exact bits-per-byte by construction."""

    vocab_size = 256
    fingerprint = "byte-v1"
    description = "the byte tokenizer"
    document_prefix: tuple[int, ...] = ()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # An id outside 0..255 (the model's padded vocabulary rows) becomes byte 0xFF, which is
        # never valid UTF-8, so it shows up as U+FFFD instead of raising mid-generation.
        in_range = (ids >= 0) & (ids < self.vocab_size)
        raw = np.where(in_range, ids, 0xFF).astype(np.uint8).tobytes()
        return raw.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        return [bytes([token_id]) for token_id in range(self.vocab_size)]

    def byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int32)

    def ids_by_bytes(self) -> dict[bytes, int]:
        return {bytes([token_id]): token_id for token_id in range(self.vocab_size)}


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, encoded without special tokens (we pack raw text)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        raw = path.read_bytes()
        self.path = path
        self.description = f"tokenizer {path}"
        self._tokenizer = RustTokenizer.from_str(raw.decode("utf-8"))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = file_fingerprint(raw)
        self._spellings: list[tuple[bytes, int]] | None = None  # computed on first use
        self.document_prefix = self._special_prefix()

    def _special_prefix(self) -> tuple[int, ...]:
        """What the tokenizer's post-processor puts before a text: Llama's <|begin_of_text|>
        or <s>, nothing for GPT-2 or Qwen. Read by encoding a text with and without it."""
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        special = self._tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(special) - len(plain) + 1):
            if special[start:start + len(plain)] == plain:
                return tuple(special[:start])
        return ()

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The Rust side tokenizes a batch in parallel threads.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled `token` as the tokenizer.json writes it."""
        return self._tokenizer.token_to_id(token)

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id stands for in the middle of a text (b"" for special tokens).

        A byte-level BPE token (GPT-2, Llama 3, Qwen) is its characters read back through the
        byte-level alphabet, exactly; a `<0xHH>` byte-fallback piece is that byte; a
        SentencePiece piece has its word-start marker read as the space it stands for ("▁the"
        is b" the"); anything else is the UTF-8 of the token decoded alone (a WordPiece "##ing"
        keeps its "##"). Special tokens stand for no text.
        """
        return [spelled for spelled, _ in self._spelled()]

    def byte_lengths(self) -> np.ndarray:
        """len(token_bytes()) per id, int32: the denominator of bits per byte."""
        return np.array([len(spelled) for spelled in self.token_bytes()], dtype=np.int32)

    def ids_by_bytes(self) -> dict[bytes, int]:
        """`token_bytes` inverted: bytes -> id, for text that arrives as tokens' bytes.

        When several ids spell the same bytes, the lowest id among ordinary vocabulary tokens
        wins; a `<0xHH>` piece only when no ordinary token is that byte (the tokenizer falls
        back to byte pieces only for what its pieces cannot spell: Llama 2's "<0x74>" has a
        lower id than its "t", yet it emits "t"); a non-special added token only when no
        vocabulary token spells it. (For text spelled by both, `encode` matches the added token
        first, while a generating model may emit either id: the bytes cannot tell, and the
        vocabulary id is chosen.)
        """
        best: dict[bytes, tuple[int, int]] = {}
        for token_id, (spelled, rank) in enumerate(self._spelled()):
            if spelled and (rank, token_id) < best.get(spelled, (_ADDED + 1, 0)):
                best[spelled] = (rank, token_id)
        return {spelled: token_id for spelled, (_, token_id) in best.items()}

    def _spelled(self) -> list[tuple[bytes, int]]:
        """(bytes, rank) per id: what `token_bytes` returns, and its preference rank."""
        if self._spellings is not None:
            return self._spellings
        rust = self._tokenizer
        byte_level, byte_fallback, marker = _decoder_spelling(
            json.loads(rust.to_str()).get("decoder"))
        added = rust.get_added_tokens_decoder()
        char_to_byte = _byte_level_chars()
        alone = rust.decode_batch([[token_id] for token_id in range(self.vocab_size)],
                                  skip_special_tokens=False)
        spellings = []
        for token_id in range(self.vocab_size):
            token = rust.id_to_token(token_id)
            rank = _ORDINARY
            if token is None or (token_id in added and added[token_id].special):
                spelled = b""
            elif token_id in added:  # an added token is matched as raw text, never byte-encoded
                spelled, rank = token.encode("utf-8"), _ADDED
            elif byte_level and all(char in char_to_byte for char in token):
                spelled = bytes(char_to_byte[char] for char in token)
            elif byte_fallback and (match := _BYTE_FALLBACK_PIECE.fullmatch(token)):
                spelled, rank = bytes([int(match.group(1), 16)]), _BYTE_PIECE
            elif marker:
                spelled = token.replace(marker, " ").encode("utf-8")
            else:
                spelled = alone[token_id].encode("utf-8")
            spellings.append((spelled, rank))
        self._spellings = spellings
        return spellings


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2, Llama 3, Qwen): each byte as one printable char.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes, in increasing order, take the code points 256, 257, ... Returns char -> byte.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if chr(byte) not in char_to_byte]
    char_to_byte.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return char_to_byte


def _decoder_spelling(decoder: Any) -> tuple[bool, bool, str | None]:
    """(byte-level, byte fallback, the SentencePiece word-start marker or None) of a decoder,
    looking inside `Sequence` decoders."""
    byte_level, byte_fallback, marker = False, False, None
    if not isinstance(decoder, dict):
        return byte_level, byte_fallback, marker
    kind = decoder.get("type")
    if kind == "ByteLevel":
        byte_level = True
    elif kind == "ByteFallback":
        byte_fallback = True
    elif kind == "Metaspace":
        marker = decoder.get("replacement", "\u2581")
    elif kind == "Replace" and decoder.get("content") == " ":
        pattern = decoder.get("pattern") or {}
        marker = pattern.get("String") if isinstance(pattern, dict) else None
    for child in decoder.get("decoders", []) or []:
        child_level, child_fallback, child_marker = _decoder_spelling(child)
        byte_level |= child_level
        byte_fallback |= child_fallback
        marker = marker or child_marker
    return byte_level, byte_fallback, marker


def file_fingerprint(source: bytes | Path) -> str:
    """A tokenizer.json's fingerprint (its bytes, or the file holding them), as
    `HFTokenizer.fingerprint` is."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte', or a path to a tokenizer.json (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: no tokenizer file at '{path}' (use 'byte' or a "
                          "path to a Hugging Face tokenizer.json)")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ConfigError("data.tokenizer: reading a tokenizer.json needs the 'tokenizers' "
                          "package") from None
    try:
        return HFTokenizer(path)
    except Exception as err:  # the Rust loader raises bare Exceptions with multi-line text
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"data.tokenizer: '{path}' is not a valid tokenizer.json ({first_line})") from None


def stop_token_ids(stop: list[int | str], tokenizer: Tokenizer, name: str) -> np.ndarray:
    """int32 ids of the config key `name` (token ids or one-token strings), or the tokenizer's
    end-of-sequence token when empty; [-1] for none."""
    ids = []
    for token in stop or [end_of_sequence(tokenizer)]:
        if token is None:
            continue
        if isinstance(token, str):
            token_id = tokenizer.token_id(token) if isinstance(tokenizer, HFTokenizer) else None
            token_id = tokenizer.ids_by_bytes().get(token.encode("utf-8"), token_id) \
                if token_id is None else token_id
            if token_id is None:
                raise ConfigError(f"{name}: {token!r} is not one token of "
                                  f"{tokenizer.description}: give its id")
            token = token_id
        if token >= tokenizer.vocab_size:
            raise ConfigError(f"{name}: token id {token} is not below the vocabulary "
                              f"size ({tokenizer.vocab_size})")
        ids.append(token)
    return np.asarray(ids or [-1], dtype=np.int32)


def end_of_sequence(tokenizer: Tokenizer) -> str | None:
    """The eos_token of the tokenizer_config.json beside a tokenizer.json, if there is one."""
    return configured_token(tokenizer, "eos_token")


def configured_token(tokenizer: Tokenizer, key: str) -> str | None:
    """The token the tokenizer_config.json beside a tokenizer.json names under `key`
    ("eos_token", "bos_token"), if it is one of the tokenizer's tokens."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    path = tokenizer.path.parent / "tokenizer_config.json"
    try:
        token = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) and tokenizer.token_id(token) is not None else None
