"""kd_jax.cache.codec: bit packing against a bit-by-bit reference, the fields of each mode, and
the row hashes that tie a cache row to a data row."""

import numpy as np
import pytest

from kd_jax.cache.codec import fields, pack_bits, unpack_bits
from kd_jax.data.packing import row_hashes
from tests.cache.test_manifest import cross_manifest, make_manifest


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32])
def test_pack_bits_round_trip(bits):
    count = 37  # count * bits is rarely a whole number of bytes: rows are padded
    values = np.random.default_rng(bits).integers(0, 2**bits, (6, count), dtype=np.uint64)
    values[0, :3] = (0, 2**bits - 1, 2**bits - 1)
    values[1] = 2**bits - 1
    values[2] = 0
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (6, -(-count * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)
    # Rows are independent byte strings: one row packed alone is that row's slice.
    np.testing.assert_array_equal(pack_bits(values[4:5], bits), packed[4:5])
    np.testing.assert_array_equal(unpack_bits(packed[[5, 0]], bits, count), values[[5, 0]])


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_bits_matches_a_bit_by_bit_reference(bits):
    # The reference spells every value out bit by bit (LSB first) and packs the bit string.
    rng = np.random.default_rng(100 + bits)
    for count in (1, 8, 13, 64):
        values = rng.integers(0, 2**bits, (3, count), dtype=np.uint64)
        values[0] = 2**bits - 1
        value_bits = (values[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
        expected = np.packbits(value_bits.reshape(3, -1).astype(np.uint8), axis=-1,
                               bitorder="little")
        np.testing.assert_array_equal(pack_bits(values, bits), expected)


def test_pack_bits_layout_is_least_significant_bit_first():
    # 3-bit values 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001.
    packed = pack_bits(np.array([[1, 2, 7]]), 3)
    assert packed.tolist() == [[0b11010001, 0b00000001]]


def test_pack_bits_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\*\\*3"):
        pack_bits(np.array([[8]]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([[-1]]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([[1]]), 33)


def test_schema_follows_the_manifest():
    by_name = {field.name: field for field in fields(
        make_manifest("sample", vocab_size=131072, value_dtype="float32"))}
    assert (by_name["ids"].bits, by_name["ids"].shape) == (17, (12,))
    assert (by_name["counts"].bits, by_name["counts"].limit) == (4, 13)  # ceil(log2(13))
    assert (by_name["entropy"].kind, by_name["entropy"].bits, by_name["entropy"].shape) == \
        ("float32", 31, ())
    topk = [(f.name, f.bits, f.shape) for f in fields(make_manifest("topk"))]
    assert topk == [("ids", 9, (5,)), ("logprobs", 15, (5,)), ("tail", 15, ())]
    # A teacher with another tokenizer: one bit a position more, whether it is aligned.
    cross = [(f.name, f.kind, f.bits, f.shape) for f in fields(cross_manifest("full"))]
    assert cross == [("logprobs", "float16", 15, (300,)), ("aligned", "uint", 1, ())]


def test_row_hashes_cover_tokens_segments_and_mask():
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    ones = np.ones((2, 8), np.int32)
    base = row_hashes(tokens, ones, ones)
    assert base.dtype == np.uint64 and base.shape == (2,) and base[0] != base[1]
    np.testing.assert_array_equal(row_hashes(tokens.astype(np.int64), ones, ones), base)
    changed_mask = ones.copy()
    changed_mask[1, 3] = 0
    changed = row_hashes(tokens, ones, changed_mask)
    assert changed[0] == base[0] and changed[1] != base[1]
    changed_segments = ones.copy()
    changed_segments[0, 5] = 2
    assert row_hashes(tokens, changed_segments, ones)[0] != base[0]
