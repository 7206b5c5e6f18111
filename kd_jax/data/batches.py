"""Batches: the rows of any global step, the held-out batches, and the data's fingerprint.

The batch of step `s` is a pure function of (rows, seed, s), so a checkpoint needs to record
nothing but the step, whatever the number of processes. numpy only.
"""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Iterator

import numpy as np

from kd_jax.config import ConfigError, DataConfig
from kd_jax.data.mixture import MixedRows
from kd_jax.data.packing import BATCH_KEYS, Rows
from kd_jax.data.tokenizers import Tokenizer

_FINGERPRINT_VERSION = "kd_jax.data/1"  # bump when packing or batching changes meaning


class Batches:
    """The rows of any global step, as a pure function of (rows, seed, step).

    The stream of rows runs epoch after epoch; epoch e visits rows in the order
    `default_rng([seed, e]).permutation(n_rows)`. The global batch of step s is stream elements
    [s*B, (s+1)*B); a process asks for the places of it that its devices hold (`positions`,
    `kd_jax.parallel.hosts.BatchPlacement.positions`), so the data position (step * B) means the
    same thing for any number of processes or devices.
    """

    def __init__(self, data: Rows, global_batch: int, seed: int):
        if global_batch <= 0:
            raise ConfigError(f"train.batch_size must be > 0, got {global_batch}")
        self.data = data
        self.global_batch = global_batch
        self.seed = seed
        self._permutations: dict[tuple[int, int | None], np.ndarray] = {}

    @property
    def n_rows(self) -> int:
        return self.data.n_rows

    def position(self, step: int) -> int:
        """Global sequences consumed before `step`; independent of the process count."""
        return step * self.global_batch

    def permutation(self, epoch: int, part: int | None = None) -> np.ndarray:
        """The order of the rows in `epoch` (of a mixture's source `part`)."""
        key = (epoch, part)
        if key not in self._permutations:
            # A batch spans at most a few epochs (of each source of a mixture).
            if len(self._permutations) >= 4 * len(getattr(self.data, "parts", [None])):
                self._permutations.pop(next(iter(self._permutations)))
            if part is None:
                rng, n_rows = np.random.default_rng([self.seed, epoch]), self.n_rows
            else:
                rng = np.random.default_rng([self.seed, epoch, part])
                n_rows = self.data.parts[part].n_rows
            self._permutations[key] = rng.permutation(n_rows)
        return self._permutations[key]

    def rows(self, step: int, positions: np.ndarray) -> np.ndarray:
        """Row indices at `positions` (0 .. global_batch - 1) of step `step`'s global batch."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        stream = self.position(step) + np.asarray(positions, dtype=np.int64)
        if isinstance(self.data, MixedRows):
            return self.data.stream_rows(stream, self.seed,
                                         lambda part, epoch: self.permutation(epoch, part))
        epochs, offsets = np.divmod(stream, self.n_rows)
        rows = np.empty(len(stream), dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self.permutation(int(epoch))[offsets[here]]
        return rows

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of `rows`, int32 [len(rows), seq_len] each."""
        return self.data.take(rows)


def heldout_batches(data: Rows, batch: int, max_sequences: int) -> Iterator[dict[str,
                                                                                 np.ndarray]]:
    """The first `max_sequences` rows (all if <= 0) in order, in batches of exactly `batch`.

    The last batch is filled with all-zero rows (loss_mask 0), so the jitted evaluation
    function compiles for one shape and the padding adds nothing to masked sums.
    """
    if batch <= 0:
        raise ConfigError(f"evaluation batch must be > 0, got {batch}")
    n_rows = scored_rows(data, max_sequences)
    for first in range(0, n_rows, batch):
        last = min(first + batch, n_rows)
        rows = data.take(np.arange(first, last))
        out = {}
        for key in BATCH_KEYS:
            values = np.zeros((batch, data.seq_len), dtype=np.int32)
            values[: last - first] = rows[key]
            out[key] = values
        yield out


def scored_rows(data: Rows, max_sequences: int) -> int:
    """How many held-out rows an evaluation scores: the first `max_sequences`, or all (<= 0)."""
    return min(max_sequences, data.n_rows) if max_sequences > 0 else data.n_rows


def fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """A stable hash of everything that decides the packed rows and their order.

    File sources are identified by their path patterns, not their contents (hashing a large
    corpus would cost a full read); the stdlib source by the interpreter version.
    """
    identity = {
        "version": _FINGERPRINT_VERSION,
        "source": cfg.source,
        "path": cfg.path,
        "name": cfg.name,
        "split": cfg.split,
        "heldout_split": cfg.heldout_split,
        "heldout_fraction": cfg.heldout_fraction,
        "text_column": cfg.text_column,
        "prompt_column": cfg.prompt_column,
        "response_column": cfg.response_column,
        "seq_len": cfg.seq_len,
        "max_documents": cfg.max_documents,
        "seed": cfg.seed,
        "tokenizer": tokenizer.fingerprint,
    }
    if cfg.source == "stdlib":
        identity["python"] = platform.python_version()
    if cfg.add_bos and tokenizer.document_prefix:  # absent otherwise: older caches stay valid
        identity["document_prefix"] = list(tokenizer.document_prefix)
    for key in ("messages_column", "mixture", "heldout_path"):  # likewise
        if getattr(cfg, key):
            identity[key] = getattr(cfg, key)
    encoded = json.dumps(identity, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]
