"""How a cache's values become bytes: the fields of each mode, bit packing, and 16-bit floats
without their sign.

Fields per mode (T = seq_len, V = vocab_size, id_bits = max(1, ceil(log2 V))):

    topk    ids [T, k] id_bits, logprobs [T, k], tail [T] (log of the mass outside the top k)
    sample  ids [T, n] id_bits, counts [T, n] ceil(log2(n+1)) bits (count 0: a padding slot),
            entropy [T]
    full    logprobs [T, V]

A cache of a teacher with another tokenizer (its manifest's `cross_tokenizer`) has the fields of
its mode in the teacher's vocabulary (V is the teacher tokenizer's), each student position
holding the teacher's targets at the teacher position aligned with it, and one field more:

    aligned [T] 1 bit: whether the position has an aligned teacher position; where it has
            none, every other field holds zeros, which no loss reads

Values are float16, or float32 with value_dtype "float32". A log-probability is never positive
and an entropy never negative, so the sign bit is not stored: 15 bits a float16 value. That bit
keeps top-16 at vocab 131072 under 4.25 bytes an entry: (16 * (17 + 15) + 15) / 8 / 16 = 4.12.
A row's values are bit-packed, least significant bit first, and padded to a whole byte, so any
run of rows is a byte slice. numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from kd_jax.cache.manifest import CROSS_TOKENIZER

_PACK_CHUNK_VALUES = 1 << 20  # values bit-packed at once: bounds the 12-bytes-a-value temporaries


@dataclasses.dataclass(frozen=True)
class Field:
    """One array a cache stores per token; on disk it is `bits` bits a value, bit-packed."""

    name: str
    kind: str  # uint | float16 | float32
    bits: int
    shape: tuple[int, ...]  # per token: (k,), (draws,), (vocab_size,) or ()
    limit: int = 0  # uint: values lie in [0, limit)
    sign: int = 0  # floats: -1 values are <= 0, +1 values are >= 0; the sign bit is not stored

    @property
    def per_token(self) -> int:
        return math.prod(self.shape)


def fields(manifest: dict[str, Any]) -> list[Field]:
    """The fields of a cache, in their on-disk order, from its (validated) manifest."""
    mode, params, vocab = manifest["mode"], manifest["params"], manifest["vocab_size"]
    value_kind = manifest["value_dtype"]
    value_bits = 15 if value_kind == "float16" else 31  # the sign bit is implied
    ids_bits = manifest["id_bits"]
    if mode == "topk":
        k = params["k"]
        values = [Field("ids", "uint", ids_bits, (k,), limit=vocab),
                  Field("logprobs", value_kind, value_bits, (k,), sign=-1),
                  Field("tail", value_kind, value_bits, (), sign=-1)]
    elif mode == "sample":
        draws = params["draws"]
        values = [Field("ids", "uint", ids_bits, (draws,), limit=vocab),
                  Field("counts", "uint", draws.bit_length(), (draws,), limit=draws + 1),
                  Field("entropy", value_kind, value_bits, (), sign=+1)]
    else:
        values = [Field("logprobs", value_kind, value_bits, (vocab,), sign=-1)]
    if CROSS_TOKENIZER in manifest:
        values.append(Field("aligned", "uint", 1, (), limit=2))
    return values


def row_bytes(field: Field, seq_len: int) -> int:
    return -(-seq_len * field.per_token * field.bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, ceil(count * bits / 8)]: each row's values, `bits` each, LSB first.

    `values` is a non-negative integer array [rows, count] below 2**bits, bits in [1, 32].
    """
    values = np.asarray(values)
    if values.ndim != 2 or not 1 <= bits <= 32:
        raise ValueError(f"pack_bits wants [rows, count] values and bits in [1, 32], got "
                         f"shape {values.shape} and bits {bits}")
    if values.size and (values.min() < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits})")
    rows, count = values.shape
    groups = -(-count // 8)
    out = np.empty((rows, groups * bits), dtype=np.uint8)
    chunk = max(1, _PACK_CHUNK_VALUES // max(groups * 8, 1))
    for start in range(0, rows, chunk):
        out[start: start + chunk] = _pack_groups(values[start: start + chunk], bits, groups)
    return out[:, :-(-count * bits // 8)]


def _pack_groups(values: np.ndarray, bits: int, groups: int) -> np.ndarray:
    """Pack 8 values at a time: 8 x `bits` bits are exactly `bits` bytes.

    The 8 values of a group are shifted into four little-endian 64-bit words (at most 256
    bits), one shift and OR per value and word it touches, and the words' first `bits` bytes
    are the group's bytes: a few passes over the array instead of one a bit.
    """
    rows, count = values.shape
    padded = np.zeros((rows, groups * 8), dtype=np.uint64)
    padded[:, :count] = values
    padded = padded.reshape(rows, groups, 8)
    words = np.zeros((rows, groups, 4), dtype="<u8")
    for i in range(8):
        word, shift = divmod(i * bits, 64)
        words[..., word] |= padded[..., i] << np.uint64(shift)
        if shift + bits > 64:  # the value's high bits spill into the next word
            words[..., word + 1] |= padded[..., i] >> np.uint64(64 - shift)
    return words.view(np.uint8).reshape(rows, groups, 32)[..., :bits].reshape(rows, -1)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_bits`: uint32 [rows, count] from uint8 [rows, row_bytes]."""
    packed = np.asarray(packed, dtype=np.uint8)
    row_bytes = -(-count * bits // 8)
    if packed.ndim != 2 or packed.shape[1] != row_bytes:
        raise ValueError(f"{count} values of {bits} bits take {row_bytes} bytes a row, got "
                         f"shape {packed.shape}")
    padded = np.zeros((packed.shape[0], row_bytes + 8), dtype=np.uint8)
    padded[:, :row_bytes] = packed
    return unpack_padded(padded, bits, count)


@functools.lru_cache(maxsize=16)
def _bit_positions(bits: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For value j of a row: the byte holding its first bit, and that bit's place in the byte."""
    first_bit = np.arange(count, dtype=np.int64) * bits
    return first_bit >> 3, (first_bit & 7).astype(np.uint8)


def unpack_padded(padded: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Decode rows of packed bytes, each followed by 8 zero bytes (so wide loads stay inside).

    Value j of a row is read as the little-endian word starting at its first byte, shifted and
    masked: one gather a value instead of one a bit. A value and its offset in the byte (< 8)
    fit 32 bits up to 25 bits a value; wider values load 64 bits.
    """
    rows, stride = padded.shape
    if rows == 0:
        return np.zeros((0, count), dtype=np.uint32)
    byte_index, shift = _bit_positions(bits, count)
    word = np.dtype("<u4") if bits + 7 <= 32 else np.dtype("<u8")
    flat = np.ascontiguousarray(padded).reshape(-1)
    # Every byte offset as the start of an (unaligned) word: a view, nothing is copied.
    windows = np.ndarray(shape=(flat.size - word.itemsize + 1,), dtype=word, buffer=flat,
                         strides=(1,))
    starts = np.arange(0, rows * stride, stride, dtype=np.intp)[:, None] + byte_index
    values = np.take(windows, starts)  # np.take: ~2x faster than windows[starts] here
    values >>= shift.astype(word)
    values &= word.type((1 << bits) - 1)
    return values.astype(np.uint32, copy=False)


def encode_floats(values: np.ndarray, field: Field) -> np.ndarray:
    """Float values as `field.bits`-bit codes: the IEEE bits without the (known) sign bit."""
    dtype, sign_mask = (np.float16, 0x7FFF) if field.kind == "float16" else (np.float32,
                                                                               0x7FFFFFFF)
    with np.errstate(over="ignore"):  # beyond float16's range is -inf: probability ~0
        rounded = values.astype(dtype)
    codes = rounded.view(np.uint16 if dtype is np.float16 else np.uint32)
    return codes & codes.dtype.type(sign_mask)  # drop the sign bit: |value|


def decode_floats(codes: np.ndarray, field: Field) -> np.ndarray:
    if field.kind == "float16":
        sign_bit = np.uint16(0x8000 if field.sign < 0 else 0)
        return (codes.astype(np.uint16) | sign_bit).view(np.float16).astype(np.float32)
    sign_bit = np.uint32(0x80000000 if field.sign < 0 else 0)
    return (codes.astype(np.uint32) | sign_bit).view(np.float32)
