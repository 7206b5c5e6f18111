"""Held-out evaluation of a student (and its teacher): how much of the teacher the student keeps.

Per model: cross-entropy as bits per token and bits per byte, next-token accuracy, expected
calibration error; for a student with a teacher, top-1 agreement and KL(teacher || student) at
T = 1. Statistics are summed on device over the evaluation batches and fetched once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from kd_jax import data as data_lib
from kd_jax import metrics as metrics_lib


def evaluate(eval_fn: Callable, params: Any, teacher_params: Any, heldout: data_lib.Packed,
             byte_lengths: np.ndarray, batch_size: int, max_sequences: int,
             place: Callable | None = None) -> dict[str, dict]:
    """Run the jitted `eval_fn` over the first `max_sequences` held-out rows; host-side summary.

    `place` turns each host batch into the arrays `eval_fn` takes (e.g. this process's rows of
    a global batch on a mesh); by default the host batch goes in as it is.
    """
    totals = None
    rows = _scored_rows(heldout, max_sequences)
    for batch in data_lib.heldout_batches(heldout, batch_size, rows):
        sums = eval_fn(params, teacher_params, batch if place is None else place(batch))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)  # note: the one host sync of an evaluation
    byte_count = data_lib.covered_bytes(heldout.targets[:rows], heldout.loss_mask[:rows],
                                        byte_lengths)
    return {name: metrics_lib.summarize(sums, byte_count=byte_count)
            for name, sums in totals.items()}


def heldout_bytes(heldout: data_lib.Packed, max_sequences: int) -> bytes:
    """The target bytes the evaluation scores, in order (byte-level tokenizer only)."""
    rows = _scored_rows(heldout, max_sequences)
    mask = heldout.loss_mask[:rows].astype(bool)
    return heldout.targets[:rows][mask].astype(np.uint8).tobytes()


def _scored_rows(heldout: data_lib.Packed, max_sequences: int) -> int:
    """How many held-out rows an evaluation scores: the first `max_sequences`, or all (<= 0)."""
    total = heldout.n_rows
    return min(max_sequences, total) if max_sequences > 0 else total
