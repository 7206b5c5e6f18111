"""kd_jax.align.prepared: the teacher rows of every training row, made once. Read back for any
rows, in any order and across shards, they are what `teacher_rows` makes for those rows; a
stopped prepare keeps its whole shards; rows of another store or tokenizer get a directory of
their own, and a shard read against other student rows is refused in one line."""

import numpy as np
import pytest

from kd_jax.align import prepared
from kd_jax.align.prepared import MANIFEST, prepare_teacher_rows
from kd_jax.align.rows import teacher_rows
from kd_jax.config import ConfigError
from kd_jax.data.packing import pack
from kd_jax.data.tokenizers import ByteTokenizer
from tests.align.test_positions import bpe
from tests.align.test_rows import DOCS

TEACHER_SEQ = 48


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(student rows, student tokenizer, teacher tokenizer): bytes into a BPE."""
    teacher = bpe(tmp_path_factory.mktemp("prepared") / "merged.json")
    student = ByteTokenizer()
    return pack(DOCS * 3, student, 16, add_bos=True), student, teacher


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(prepared, "SHARD_ROWS", 7)  # several shards, the last one short


def test_prepared_rows_are_the_rows_made_per_batch(pair, tmp_path, small_shards):
    data, student, teacher = pair
    made = prepare_teacher_rows(tmp_path, data, student, teacher, TEACHER_SEQ)
    assert data.n_rows > 3 * 7
    rng = np.random.default_rng(0)
    for rows in (np.arange(data.n_rows), rng.permutation(data.n_rows)[:13],
                 np.array([data.n_rows - 1, 0, 8])):
        got = made.fields(rows)
        want = teacher_rows(data.take(rows), student, teacher, TEACHER_SEQ,
                            data.document_starts(rows), backoff=True)
        assert sorted(got) == ["teacher_back", "teacher_hi", "teacher_index", "teacher_inside",
                               "teacher_lo", "teacher_positions", "teacher_segment_ids",
                               "teacher_tokens"]
        for name, value in got.items():
            assert value.dtype == np.int32
            np.testing.assert_array_equal(value, want[name], err_msg=name)
    # Not trivially empty: a byte student aligns where the teacher's tokens end.
    assert (made.fields(np.arange(data.n_rows))["teacher_index"] >= 0).mean() > 0.2
    # The smallest integer types hold them: a 420-id vocabulary in 16 bits.
    assert np.load(next(made.directory.glob("shard-00000.tokens.npy"))).dtype == np.uint16


def test_a_stopped_prepare_keeps_its_whole_shards(pair, tmp_path, small_shards):
    data, student, teacher = pair
    first = prepare_teacher_rows(tmp_path, data, student, teacher, TEACHER_SEQ)
    directory = first.directory
    kept = directory / "shard-00000.tokens.npy"
    kept_time = kept.stat().st_mtime_ns
    # As a kill after shard 0 leaves it: no manifest, later shards' markers missing.
    (directory / MANIFEST).unlink()
    (directory / "shard-00002.json").unlink()
    seen = []
    again = prepare_teacher_rows(tmp_path, data, student, teacher, TEACHER_SEQ,
                                 progress=seen.append)
    assert kept.stat().st_mtime_ns == kept_time  # read, not made again
    assert sum(seen) == data.n_rows and (directory / MANIFEST).is_file()
    rows = np.arange(data.n_rows)
    for name, value in again.fields(rows).items():
        np.testing.assert_array_equal(value, first.fields(rows)[name], err_msg=name)


def test_other_rows_or_tokenizers_get_their_own_directory(pair, tmp_path, small_shards):
    data, student, teacher = pair
    one = prepare_teacher_rows(tmp_path, data, student, teacher, TEACHER_SEQ)
    other_data = pack(DOCS[::-1] * 3, student, 16, add_bos=True)
    assert prepare_teacher_rows(tmp_path, other_data, student, teacher,
                                TEACHER_SEQ).directory != one.directory
    assert prepare_teacher_rows(tmp_path, data, student, teacher,
                                TEACHER_SEQ + 16).directory != one.directory
    # Read against other student rows than its own (a store prepared again in place).
    stale = prepared.PreparedTeacherRows(one.directory, np.asarray(other_data.row_hashes()))
    with pytest.raises(ConfigError, match="made from other student rows") as err:
        stale.fields(np.arange(min(other_data.n_rows, data.n_rows)))
    assert "\n" not in str(err.value)


def test_a_damaged_shard_is_one_line(pair, tmp_path, small_shards):
    data, student, teacher = pair
    made = prepare_teacher_rows(tmp_path, data, student, teacher, TEACHER_SEQ)
    (made.directory / "shard-00001.index.npy").write_bytes(b"not an array")
    fresh = prepared.PreparedTeacherRows(made.directory, np.asarray(data.row_hashes()))
    with pytest.raises(ConfigError, match="shard 1 cannot be read"):
        fresh.fields(np.array([8]))


def test_prepare_makes_the_teacher_rows_and_distill_reads_them(teacher_run, tmp_path, capsys):
    """`kd-jax prepare` with a teacher of another tokenizer writes its rows beside the store;
    distilling from the store then reads them, and takes the steps the same run takes with its
    rows packed in memory and its teacher rows made batch by batch."""
    from kd_jax import cli
    from tests.data.test_tokenizers import write_byte_level_bpe
    from tests.helpers import distill_config, losses_by_step

    root, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(tmp_path / "tokenizer.json", vocab_size=300, corpus=lines)
    config = distill_config(tmp_path / "distill.yaml", corpus, root / "teacher",
                            tmp_path / "unused")
    common = [f"data.tokenizer={tokenizer}", "model.vocab_size=320", "train.steps=2",
              "train.checkpoint_every=2"]
    store = tmp_path / "store"
    assert cli.main(["prepare", str(config), f"data.store={store}", *common]) == 0
    assert "teacher rows of" in capsys.readouterr().out
    made = list((store / "teacher_rows").glob(f"*/{MANIFEST}"))
    assert len(made) == 1
    shard = made[0].parent / "shard-00000.tokens.npy"
    shard_time = shard.stat().st_mtime_ns
    assert cli.main(["distill", str(config), f"data.store={store}",
                     f"train.run_dir={tmp_path / 'stored'}", *common]) == 0
    assert shard.stat().st_mtime_ns == shard_time  # read, not made again
    assert cli.main(["distill", str(config), f"train.run_dir={tmp_path / 'memory'}",
                     *common]) == 0
    stored, memory = (losses_by_step(tmp_path / name) for name in ("stored", "memory"))
    assert sorted(stored) == [1, 2]
    for step in stored:
        np.testing.assert_allclose(stored[step], memory[step], rtol=1e-6)
