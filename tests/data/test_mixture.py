"""kd_jax.data.mixture: sources drawn from by weight, every block exactly; each source's rows run
in seeded epochs; the batch of a step is a pure function of the step; held-out rows interleave;
bad mixtures are one-line errors. And the `kd-jax prepare` command end to end."""

import dataclasses

import numpy as np
import pytest

from kd_jax import cli
from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.batches import Batches
from kd_jax.data.mixture import BLOCK, InterleavedRows, MixedRows, block_counts, components
from kd_jax.data.prepare import prepare
from kd_jax.data.store import open_store
from kd_jax.data.tokenizers import ByteTokenizer
from tests.data.test_store import data_config, write_corpus


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """(train, heldout) rows of a small and a ten times larger store."""
    root = tmp_path_factory.mktemp("mixture")
    opened = []
    for name, documents in (("small", 40), ("large", 400)):
        cfg = data_config(write_corpus(root / f"{name}.jsonl", documents, seed=len(name)),
                          root / name)
        prepare(cfg, ByteTokenizer(), progress=False)
        opened.append(open_store(cfg, ByteTokenizer()))
    return opened


def test_block_counts_follow_the_weights_and_fill_the_block():
    counts = block_counts([0.5, 0.3, 0.2])
    assert counts.sum() == BLOCK and abs(counts / BLOCK - [0.5, 0.3, 0.2]).max() < 1 / BLOCK
    assert block_counts([1 / 3] * 3).tolist() == [1366, 1365, 1365]


def test_every_block_draws_by_weight_and_small_sources_repeat(two_stores):
    (small, _), (large, _) = two_stores
    mixed = MixedRows([small, large], [0.5, 0.5])
    batches = Batches(mixed, global_batch=BLOCK, seed=3)
    for step in range(3):
        rows = batches.rows(step, np.arange(BLOCK))
        from_small = rows < small.n_rows
        assert from_small.sum() == BLOCK // 2  # the weights, in every block exactly
        # The small source runs through its rows in epochs: each epoch a permutation.
        small_rows = rows[from_small]
        epochs = BLOCK // 2 // small.n_rows
        for epoch in range(epochs):
            chunk = small_rows[epoch * small.n_rows: (epoch + 1) * small.n_rows]
            if step == 0:
                assert sorted(chunk) == list(range(small.n_rows))
        assert rows.max() < mixed.n_rows


def test_the_rows_of_a_step_are_a_pure_function_of_the_step(two_stores):
    (small, _), (large, _) = two_stores
    mixed = MixedRows([small, large], [0.2, 0.8])
    whole = Batches(mixed, 64, seed=1)
    expected = [whole.rows(step, np.arange(64)) for step in range(200)]
    # Another process (fresh state, its own half, steps visited out of order) agrees.
    other = Batches(MixedRows([small, large], [0.2, 0.8]), 64, seed=1)
    for step in (150, 3, 77, 0, 199):
        np.testing.assert_array_equal(other.rows(step, np.arange(32, 64)), expected[step][32:])
    assert not np.array_equal(Batches(mixed, 64, seed=2).rows(0, np.arange(64)), expected[0])
    # Rows are numbered source after source: a read returns that source's row.
    rows = expected[5]
    taken = mixed.take(rows)
    for i in (0, 17, 63):
        source, local = ((small, rows[i]) if rows[i] < small.n_rows
                         else (large, rows[i] - small.n_rows))
        np.testing.assert_array_equal(taken["tokens"][i], source.take([local])["tokens"][0])
    np.testing.assert_array_equal(
        mixed.row_hashes(), np.concatenate([small.row_hashes(), large.row_hashes()]))


def test_heldout_rows_interleave_every_source_once(two_stores):
    (_, small), (_, large) = two_stores
    heldout = InterleavedRows([small, large])
    assert heldout.n_rows == small.n_rows + large.n_rows
    pairs = sorted(zip(heldout.part.tolist(), heldout.local.tolist()))
    assert pairs == [(0, j) for j in range(small.n_rows)] + [(1, j) for j in range(large.n_rows)]
    first = heldout.part[: max(2, heldout.n_rows // small.n_rows)]
    assert set(first.tolist()) == {0, 1}  # the first rows scored come from both
    np.testing.assert_array_equal(heldout.take([0])["tokens"][0],
                                  (small if heldout.part[0] == 0 else large).take(
                                      [heldout.local[0]])["tokens"][0])


def test_document_starts_follow_each_row_to_its_source(two_stores):
    (small, small_held), (large, large_held) = two_stores
    for mixed in (MixedRows([small, large], [1.0, 1.0]),
                  InterleavedRows([small_held, large_held])):
        rows = np.random.default_rng(0).integers(0, mixed.n_rows, 50)
        got = mixed.document_starts(rows)
        assert got.dtype == bool and got.any() and not got.all()
        tokens = mixed.take(rows)["tokens"]
        for i, row in enumerate(rows):
            if isinstance(mixed, MixedRows):
                part = int(np.searchsorted(mixed.offsets, row, side="right") - 1)
                source, local = mixed.parts[part], row - mixed.offsets[part]
            else:
                source, local = mixed.parts[mixed.part[row]], mixed.local[row]
            np.testing.assert_array_equal(got[i], source.document_starts([local])[0])
            np.testing.assert_array_equal(tokens[i], source.take([local])["tokens"][0])


@pytest.mark.parametrize("mixture, message", [
    ([{"source": "json"}], r"data.mixture\[0\] must be a mapping with a weight"),
    ([{"weight": 1, "sauce": "json"}], "'sauce' is not a source key of a mixture"),
    ([{"weight": 0, "source": "stdlib"}], r"data.mixture\[0\].weight must be a finite number"),
    ([{"weight": "nan", "source": "stdlib"}], "must be a finite number > 0, got nan"),
    ([{"weight": 1, "source": "stdlib"}, {"weight": 1e-6, "source": "stdlib"}],
     "every weight must be at least 1/4096 of their sum"),
    ([{"weight": 1, "seq_len": 8}], "'seq_len' is not a source key"),
])
def test_bad_mixtures_are_one_line_errors(mixture, message):
    with pytest.raises(ConfigError, match=message) as caught:
        components(DataConfig(store="s", mixture=mixture))
    assert "\n" not in str(caught.value)


def test_components_share_the_data_settings_and_have_their_own_stores():
    cfg = DataConfig(store="mix", seq_len=64, tokenizer="byte", mixture=[
        {"weight": 3, "source": "json", "path": "a.jsonl", "text_column": "body"},
        {"weight": 1, "source": "stdlib"}])
    (w0, first), (w1, second) = components(cfg)
    assert (w0, w1) == (0.75, 0.25)
    assert (first.store, second.store) == ("mix/0", "mix/1")
    assert first.text_column == "body" and second.text_column == "text"
    assert first.seq_len == second.seq_len == 64 and not first.mixture
    assert dataclasses.replace(first, path="a.jsonl") == first


def test_the_prepare_command(tmp_path, capsys):
    """Prepare a mixture, find it prepared, train from it, and refuse mistakes in one line."""
    for name, seed in (("a", 1), ("b", 2)):
        write_corpus(tmp_path / f"{name}.jsonl", 60, seed=seed)
    config = tmp_path / "mix.yaml"
    config.write_text(f"""
model: {{d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, d_ff: 64, max_seq_len: 32}}
data:
  tokenizer: byte
  seq_len: 32
  store: {tmp_path / 'store'}
  store_shard_mb: 0.002
  mixture:
    - {{weight: 0.7, source: json, path: {tmp_path / 'a.jsonl'}}}
    - {{weight: 0.3, source: json, path: {tmp_path / 'b.jsonl'}}}
train: {{run_dir: {tmp_path / 'run'}, steps: 2, batch_size: 4, progress: false,
        eval_sequences: 4, log_every: 1}}
""")
    capsys.readouterr()
    assert cli.main(["prepare", str(config)]) == 0
    assert capsys.readouterr().out.count("prepared in") == 2
    assert cli.main(["prepare", str(config)]) == 0
    assert capsys.readouterr().out.count("already prepared") == 2
    assert cli.main(["train", str(config)]) == 0
    for args, message in (
            (["data.store="], "data.mixture needs data.store"),
            (["data.seq_len=16", "model.max_seq_len=16"], "another packing (data.seq_len: 32 "
                                                          "there, 16 now)")):
        capsys.readouterr()
        assert cli.main(["prepare", str(config), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kd-jax: error: ") and message in err[0]
