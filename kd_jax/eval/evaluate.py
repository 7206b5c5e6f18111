"""Held-out evaluation: the student's (and the teacher's) statistics on held-out rows.

For every model: cross-entropy (nats and bits per token, bits per byte), next-token accuracy and
expected calibration error; for a student with a teacher, top-1 agreement and KL(teacher ||
student) at T = 1. Statistics are summed on device over the evaluation batches and fetched once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from kd_jax.data.batches import heldout_batches, scored_rows
from kd_jax.data.packing import Rows, covered_bytes
from kd_jax.eval.metrics import summarize, token_stats
from kd_jax.models.pure import PureModel


def make_eval_fn(student: PureModel, teacher: PureModel | dict[str, PureModel] | None,
                 valid_vocab: int) -> Callable:
    """eval_fn(params, teacher_params, batch) -> metric sums for the student and the teacher.

    Several teachers: `teacher` a mapping of names to models, `teacher_params` one of names to
    their parameters; the sums of each teacher under its name, the student's agreement with it
    under "student~name" (with the first also in the student's own).
    """

    def eval_fn(params, teacher_params, batch):
        logits = student.logits(params, batch)
        out = {}
        teachers = teacher if isinstance(teacher, dict) else {}
        first_logits = None
        for name, model in teachers.items():
            teacher_logits = model.logits(teacher_params[name], batch)
            out[name] = token_stats(teacher_logits, batch["labels"], batch["loss_mask"],
                                    valid_vocab=valid_vocab)
            out[f"student~{name}"] = token_stats(logits, batch["labels"], batch["loss_mask"],
                                                 valid_vocab=valid_vocab,
                                                 teacher_logits_btv=teacher_logits)
            first_logits = teacher_logits if first_logits is None else first_logits
        if teacher is not None and not teachers:
            first_logits = teacher.logits(teacher_params, batch)
            out["teacher"] = token_stats(
                first_logits, batch["labels"], batch["loss_mask"], valid_vocab=valid_vocab)
        out["student"] = token_stats(
            logits, batch["labels"], batch["loss_mask"], valid_vocab=valid_vocab,
            teacher_logits_btv=first_logits)
        return out

    return eval_fn


def evaluate(eval_fn: Callable, params: Any, teacher_params: Any, heldout: Rows,
             byte_lengths: np.ndarray, batch_size: int, max_sequences: int,
             place: Callable | None = None) -> dict[str, dict]:
    """Run the jitted `eval_fn` over the first `max_sequences` held-out rows; host-side summary.

    `place` turns each host batch into the arrays `eval_fn` takes (e.g. this process's rows of
    a global batch on a mesh); by default the host batch goes in as it is.
    """
    totals, byte_count = None, 0.0
    rows = scored_rows(heldout, max_sequences)
    for batch in heldout_batches(heldout, batch_size, rows):
        byte_count += covered_bytes(batch["labels"], batch["loss_mask"], byte_lengths)
        sums = eval_fn(params, teacher_params, batch if place is None else place(batch))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)  # note: the one host sync of an evaluation
    return {name: summarize(sums, byte_count=byte_count) for name, sums in totals.items()}


def heldout_bytes(heldout: Rows, max_sequences: int) -> bytes:
    """The label bytes the evaluation scores, in order (byte-level tokenizer only)."""
    rows = heldout.take(np.arange(scored_rows(heldout, max_sequences)))
    mask = rows["loss_mask"].astype(bool)
    return rows["labels"][mask].astype(np.uint8).tobytes()
