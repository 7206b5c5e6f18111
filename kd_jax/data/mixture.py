"""Mixtures: several sources, each in its own token store, drawn from by weight.

`data.mixture` lists sources (each a few `data.*` source keys and a `weight`); source i is
prepared into `<data.store>/<i>` like any store. Their training rows are numbered one after
another (source 0's rows first), so a teacher cache indexes a mixture like any data. The
position k of the training stream belongs to a source by a seeded schedule: the stream is cut
into blocks of `BLOCK` positions, in which source i has its share of the weights (largest
remainders) in a seeded order; within a source, positions run through its own rows epoch after
epoch, each epoch in a seeded order. So the rows of step s are a pure function of (stores,
weights, seed, s), the weights hold in every block, and a small source is repeated rather than
exhausted. Held-out rows interleave the sources in proportion to their sizes. numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.packing import Rows

BLOCK = 4096  # stream positions whose sources follow the weights exactly
_MIXTURE_STREAM = 0x4D49  # second seed word of the block orders, apart from epochs' [seed, e]
# The data keys a mixture's source may set; the others (tokenizer, seq_len, ...) are shared.
SOURCE_KEYS = ("source", "path", "name", "split", "heldout_split", "heldout_fraction",
               "heldout_path",
               "text_column", "prompt_column", "response_column", "messages_column",
               "streaming", "max_documents")


def components(cfg: DataConfig) -> list[tuple[float, DataConfig]]:
    """(weight, the data config of its store) for each source of `data.mixture`."""
    from kd_jax.config import coerce, section_types
    from kd_jax.config.coercion import weighted_entry

    types = section_types(DataConfig)
    out = []
    for i, entry in enumerate(cfg.mixture):
        where = f"data.mixture[{i}]"
        weight = weighted_entry(entry, where, ("weight", *SOURCE_KEYS), ("weight",),
                                f"a weight and source keys ({', '.join(SOURCE_KEYS)})",
                                "a source key of a mixture")
        fields = {key: coerce(value, types[key], f"{where}.{key}")
                  for key, value in entry.items() if key != "weight"}
        out.append((weight, dataclasses.replace(cfg, **fields, store=f"{cfg.store}/{i}",
                                                mixture=[])))
    total = sum(weight for weight, _ in out)
    shares = [weight / total for weight, _ in out]
    if min(shares) * BLOCK < 1:
        raise ConfigError(f"data.mixture: every weight must be at least 1/{BLOCK} of their sum "
                          f"(got {min(shares):.2g})")
    return [(share, component) for share, (_, component) in zip(shares, out)]


def block_counts(shares: list[float]) -> np.ndarray:
    """Positions of each source in a block: its share of BLOCK, largest remainders first."""
    exact = np.asarray(shares, dtype=np.float64) * BLOCK
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: BLOCK - counts.sum()]] += 1
    return counts


class _SeveralStores:
    """What rows drawn from several stores share: their length and what they hold."""

    parts: list[Rows]

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len

    @property
    def trained_tokens(self) -> int:
        return sum(part.trained_tokens for part in self.parts)

    @property
    def rows_read(self) -> int:
        return sum(part.rows_read for part in self.parts)


class MixedRows(_SeveralStores):
    """The training rows of several stores, numbered one after another (`packing.Rows`)."""

    def __init__(self, parts: list[Rows], shares: list[float]):
        self.parts = parts
        self.shares = shares
        sizes = np.array([part.n_rows for part in parts], dtype=np.int64)
        self.offsets = np.cumsum(sizes) - sizes
        self.sizes = sizes
        self.counts = block_counts(shares)

    @property
    def n_rows(self) -> int:
        return int(self.sizes.sum())

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        return _gather(self.parts, part, rows - self.offsets[part])

    def document_starts(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        return _gather(self.parts, part, rows - self.offsets[part], "document_starts")["starts"]

    def row_hashes(self) -> np.ndarray:
        return np.concatenate([np.asarray(part.row_hashes()) for part in self.parts])

    def stream_rows(self, stream: np.ndarray, seed: int, permutation) -> np.ndarray:
        """The rows at training-stream positions `stream`; `permutation(part, epoch)` is the
        order of a source's rows in one of its epochs."""
        stream = np.asarray(stream, dtype=np.int64)
        blocks, slots = np.divmod(stream, BLOCK)
        rows = np.empty(len(stream), dtype=np.int64)
        for block in np.unique(blocks):
            owner, rank = self._block(int(block), seed)
            here = blocks == block
            part = owner[slots[here]]
            # The source's own stream: earlier blocks' positions, then this block's.
            position = block * self.counts[part] + rank[slots[here]]
            epochs, offsets = np.divmod(position, self.sizes[part])
            local = np.empty(len(part), dtype=np.int64)
            for p, epoch in set(zip(part.tolist(), epochs.tolist())):
                at = (part == p) & (epochs == epoch)
                local[at] = permutation(p, epoch)[offsets[at]]
            rows[here] = self.offsets[part] + local
        return rows

    def _block(self, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Which source each slot of a block draws from, and its rank among that source's."""
        owner = np.repeat(np.arange(len(self.parts)), self.counts)
        owner = np.random.default_rng([seed, _MIXTURE_STREAM, block]).permutation(owner)
        rank = np.empty(BLOCK, dtype=np.int64)
        for p in range(len(self.parts)):
            at = np.flatnonzero(owner == p)
            rank[at] = np.arange(len(at))
        return owner, rank


class InterleavedRows(_SeveralStores):
    """Held-out rows of several stores, interleaved in proportion to their sizes, so the first
    rows an evaluation scores come from every source (`packing.Rows`)."""

    def __init__(self, parts: list[Rows]):
        self.parts = parts
        sizes = [part.n_rows for part in parts]
        part = np.concatenate([np.full(size, p) for p, size in enumerate(sizes)])
        local = np.concatenate([np.arange(size) for size in sizes])
        # Row j of a source of n sits at (j + 1/2) / n of the way through.
        order = np.argsort((local + 0.5) / np.asarray(sizes)[part], kind="stable")
        self.part, self.local = part[order], local[order]

    @property
    def n_rows(self) -> int:
        return int(len(self.part))

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return _gather(self.parts, self.part[rows], self.local[rows])

    def document_starts(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return _gather(self.parts, self.part[rows], self.local[rows],
                       "document_starts")["starts"]

    def row_hashes(self) -> np.ndarray:
        hashes = np.concatenate([np.asarray(part.row_hashes()) for part in self.parts])
        sizes = np.array([part.n_rows for part in self.parts], dtype=np.int64)
        return hashes[(np.cumsum(sizes) - sizes)[self.part] + self.local]


def _gather(parts: list[Rows], part: np.ndarray, local: np.ndarray,
            read: str = "take") -> dict[str, np.ndarray]:
    """Rows `local[i]` of sources `part[i]`, in the order asked, each source read once by its
    method `read` (`take`, or `document_starts`, whose array comes back under "starts")."""
    out: dict[str, np.ndarray] = {}
    for p in np.unique(part):
        here = part == p
        got = getattr(parts[p], read)(local[here])
        for key, value in (got if isinstance(got, dict) else {"starts": got}).items():
            if key not in out:
                out[key] = np.zeros((len(part), value.shape[1]), dtype=value.dtype)
            out[key][here] = value
    return out
