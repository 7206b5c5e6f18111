"""kd_jax.data.batches: the rows of any step (seeded, every row once an epoch, any split of a
batch's positions), the held-out batches, and the data fingerprint."""

import numpy as np
import pytest

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.batches import Batches, fingerprint, heldout_batches
from kd_jax.data.packing import BATCH_KEYS, Packed
from kd_jax.data.tokenizers import ByteTokenizer, load_tokenizer
from tests.data.test_tokenizers import write_byte_level_bpe


def _packed_rows(n_rows, seq_len=4):
    """A packed set whose row r holds the value r everywhere, to read row indices back."""
    values = np.repeat(np.arange(n_rows, dtype=np.int32)[:, None], seq_len, axis=1)
    return Packed(tokens=values, labels=values, positions=values, segment_ids=values + 1,
                  loss_mask=np.ones_like(values), byte_count=float(values.size))


def _whole_batch(batches, step):
    return batches.take(batches.rows(step, np.arange(batches.global_batch)))


def test_batches_are_deterministic_and_seeded():
    packed = _packed_rows(23)
    a, b, c = (Batches(packed, 8, seed) for seed in (0, 0, 1))
    for step in (0, 1, 7, 100):
        batch = _whole_batch(a, step)
        assert set(batch) == set(BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (8, 4) for v in batch.values())
        np.testing.assert_array_equal(batch["tokens"], _whole_batch(b, step)["tokens"])
    assert any(not np.array_equal(_whole_batch(a, s)["tokens"], _whole_batch(c, s)["tokens"])
               for s in range(3))


def test_batches_visit_every_row_once_per_epoch():
    n_rows, batch = 23, 4
    batches = Batches(_packed_rows(n_rows), batch, seed=3)
    stream = np.concatenate([_whole_batch(batches, step)["tokens"][:, 0]
                             for step in range(3 * n_rows)])
    epochs = stream[: 4 * n_rows - (4 * n_rows) % n_rows].reshape(-1, n_rows)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n_rows))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    np.testing.assert_array_equal(epochs[1], np.random.default_rng([3, 1]).permutation(n_rows))


def test_batches_rows_at_split_positions_concatenate_to_the_whole_batch():
    # What a process holds is a set of positions of the global batch; any split of the batch's
    # positions into pieces reads back the whole batch, and the data position is the same.
    packed = _packed_rows(17)
    batches = Batches(packed, 6, seed=5)
    positions = np.arange(6)
    for step in range(12):  # crosses epoch boundaries (17 rows, 6 per step)
        whole = batches.rows(step, positions)
        for pieces in (np.split(positions, 2), np.split(positions, 3), [positions[:1],
                                                                         positions[1:]]):
            joined = np.concatenate([batches.rows(step, piece) for piece in pieces])
            np.testing.assert_array_equal(joined, whole)
            joined_batch = {key: np.concatenate([batches.take(batches.rows(step, piece))[key]
                                                 for piece in pieces]) for key in BATCH_KEYS}
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(joined_batch[key], batches.take(whole)[key])
    assert batches.position(5) == 30


def test_batches_refuse_an_empty_batch_and_a_negative_step():
    # (Process counts that do not divide the batch are refused by the mesh's batch sharding,
    # kd_jax.parallel.mesh.batch_sharding, since Batches no longer knows of processes.)
    with pytest.raises(ConfigError, match="train.batch_size must be > 0, got 0"):
        Batches(_packed_rows(17), 0, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        Batches(_packed_rows(17), 6, seed=0).rows(-1, np.arange(6))


def test_batches_at_positions_picks_rows_of_the_global_batch():
    packed = _packed_rows(17)
    batches = Batches(packed, 8, seed=2)
    positions = np.array([0, 1, 4, 5])  # e.g. one process's devices on a data x tensor mesh
    for step in range(6):  # crosses epoch boundaries (17 rows, 8 per step)
        whole = _whole_batch(batches, step)
        part = batches.take(batches.rows(step, positions))
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(part[key], whole[key][positions])


def test_heldout_batches_pad_to_one_shape():
    packed = _packed_rows(10)
    batches = list(heldout_batches(packed, batch=4, max_sequences=7))
    assert len(batches) == 2
    assert all(b[k].shape == (4, 4) for b in batches for k in BATCH_KEYS)
    np.testing.assert_array_equal(batches[0]["tokens"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(batches[1]["tokens"][:3, 0], [4, 5, 6])
    assert (batches[1]["loss_mask"][3] == 0).all() and (batches[1]["segment_ids"][3] == 0).all()
    assert sum(b["loss_mask"].sum() for b in batches) == 7 * 4
    assert len(list(heldout_batches(packed, batch=4, max_sequences=100))) == 3


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    byte = ByteTokenizer()
    base = DataConfig(source="text", path="a.txt")
    assert fingerprint(base, byte) == fingerprint(DataConfig(source="text", path="a.txt"), byte)
    bpe = load_tokenizer(str(write_byte_level_bpe(tmp_path / "tokenizer.json")))
    changed = [DataConfig(source="text", path="b.txt"), DataConfig(source="json", path="a.txt"),
               DataConfig(source="text", path="a.txt", seq_len=128),
               DataConfig(source="text", path="a.txt", seed=1)]
    prints = {fingerprint(cfg, byte) for cfg in changed} | {fingerprint(base, bpe)}
    assert fingerprint(base, byte) not in prints and len(prints) == 5
