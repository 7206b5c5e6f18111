"""Held-out evaluation: the student's (and the teacher's) statistics on held-out rows.

For every model: cross-entropy (nats and bits per token, bits per byte), next-token accuracy and
expected calibration error; for a student with a teacher, top-1 agreement and KL(teacher ||
student) at T = 1 (with a teacher of another tokenizer, at the positions that align, over the
vocabularies' buckets: `OtherTokenizer`). Statistics are summed on device over the evaluation
batches and fetched once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data.batches import heldout_batches, scored_rows
from kd_jax.data.packing import Rows, covered_bytes
from kd_jax.eval.metrics import summarize, token_stats
from kd_jax.losses.cross_vocab import Buckets, mapped_divergence_bt
from kd_jax.losses.soft_targets import vocabulary_logits
from kd_jax.models.pure import PureModel


# The batch key of the rows each teacher of another tokenizer reads, by the teacher's name.
OTHER_ROWS = "other_tokenizer_rows"
_ROW_NAMES = {"teacher_tokens": "tokens", "teacher_positions": "positions",
              "teacher_segment_ids": "segment_ids"}


@dataclasses.dataclass(frozen=True)
class OtherTokenizer:
    """A teacher of another tokenizer, as evaluated: it reads rows of its own (`OTHER_ROWS`,
    `kd_jax.align.rows.teacher_rows`), is scored on its own next tokens (bits per byte over the
    bytes they spell), and the student is compared with it where a position aligns: agreement
    is the two most probable tokens falling in one bucket, KL the forward KL over the buckets
    (`kd_jax.losses.cross_vocab.mapped_divergence_bt`, T = 1)."""

    model: PureModel
    buckets: Buckets
    byte_lengths: np.ndarray  # bytes each teacher id spells
    valid_vocab: int  # the teacher tokenizer's


def _other_tokenizer_stats(teacher: OtherTokenizer, params, rows: dict, student_logits_btv,
                           batch: dict, valid_vocab: int) -> tuple[dict, dict]:
    """(the teacher's statistics on its own rows, the student's where it aligns with it)."""
    tokens = rows["teacher_tokens"]
    outputs = teacher.model.apply(params, {ours: rows[theirs]
                                           for theirs, ours in _ROW_NAMES.items()})
    logits_btw = vocabulary_logits(outputs.hidden_btd, outputs.head_vd)
    # Its next token within the same piece: the last position of a piece predicts nothing.
    segment_bt = rows["teacher_segment_ids"]
    labels_bt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    next_segment_bt = jnp.concatenate([segment_bt[:, 1:], jnp.zeros_like(segment_bt[:, :1])],
                                      axis=1)
    own_mask_bt = (segment_bt > 0) & (next_segment_bt == segment_bt)
    own = token_stats(logits_btw, labels_bt, own_mask_bt, valid_vocab=teacher.valid_vocab)
    label_bytes_bt = jnp.asarray(teacher.byte_lengths, jnp.float32)[labels_bt]
    own["byte_sum"] = jnp.sum(jnp.where(own_mask_bt, label_bytes_bt, 0.0))

    index_bt = rows["teacher_index"]
    aligned_bt = (index_bt >= 0) & (batch["loss_mask"] > 0)
    gathered_btw = jnp.take_along_axis(logits_btw, jnp.maximum(index_bt, 0)[..., None], axis=1)
    versus = token_stats(student_logits_btv, batch["labels"], aligned_bt,
                         valid_vocab=valid_vocab)
    student_bucket = jnp.asarray(teacher.buckets.student_v)[
        jnp.argmax(student_logits_btv[..., :valid_vocab], axis=-1)]
    teacher_bucket = jnp.asarray(teacher.buckets.teacher_w)[
        jnp.argmax(gathered_btw[..., :teacher.valid_vocab], axis=-1)]
    agree_bt = (student_bucket == teacher_bucket) & (student_bucket >= 0)
    kl_bt = mapped_divergence_bt("forward_kl", student_logits_btv, gathered_btw,
                                 teacher.buckets, temperature=1.0, student_valid=valid_vocab,
                                 teacher_valid=teacher.valid_vocab)
    versus["agree_sum"] = jnp.sum(jnp.where(aligned_bt, agree_bt, False), dtype=jnp.float32)
    versus["kl_sum"] = jnp.sum(jnp.where(aligned_bt, kl_bt, 0.0))
    return own, versus


def make_eval_fn(student: PureModel,
                 teacher: PureModel | dict[str, PureModel | OtherTokenizer] | None,
                 valid_vocab: int) -> Callable:
    """eval_fn(params, teacher_params, batch) -> metric sums for the student and the teacher.

    Several teachers, or one of another tokenizer: `teacher` a mapping of names to models (or
    `OtherTokenizer`s), `teacher_params` one of names to their parameters; the sums of each
    teacher under its name, the student's agreement with it under "student~name" (with the
    first of the student's tokenizer also in the student's own).
    """

    def eval_fn(params, teacher_params, batch):
        logits = student.logits(params, batch)
        out = {}
        teachers = teacher if isinstance(teacher, dict) else {}
        first_logits = None
        for name, model in teachers.items():
            if isinstance(model, OtherTokenizer):
                out[name], out[f"student~{name}"] = _other_tokenizer_stats(
                    model, teacher_params[name], batch[OTHER_ROWS][name], logits, batch,
                    valid_vocab)
                continue
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
             place: Callable | None = None,
             host_fields: Callable[[dict, np.ndarray], dict] | None = None) -> dict[str, dict]:
    """Run the jitted `eval_fn` over the first `max_sequences` held-out rows; host-side summary.

    `place` turns each host batch into the arrays `eval_fn` takes (e.g. this process's rows of
    a global batch on a mesh); by default the host batch goes in as it is. `host_fields(batch,
    starts)` adds what teachers of another tokenizer read (`starts`: where a piece starts its
    document).
    """
    totals, byte_count = None, 0.0
    rows = scored_rows(heldout, max_sequences)
    for first, batch in zip(range(0, rows, batch_size), heldout_batches(heldout, batch_size,
                                                                         rows)):
        byte_count += covered_bytes(batch["labels"], batch["loss_mask"], byte_lengths)
        if host_fields is not None:
            starts = np.zeros(batch["tokens"].shape, bool)
            real = np.arange(first, min(first + batch_size, rows))
            starts[:len(real)] = heldout.document_starts(real)
            batch.update(host_fields(batch, starts))
        sums = eval_fn(params, teacher_params, batch if place is None else place(batch))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)  # note: the one host sync of an evaluation
    # A teacher of another tokenizer is scored over the bytes its own next tokens spell.
    return {name: summarize(sums, byte_count=float(sums.pop("byte_sum", byte_count)))
            for name, sums in totals.items()}


def heldout_bytes(heldout: Rows, max_sequences: int) -> bytes:
    """The label bytes the evaluation scores, in order (byte-level tokenizer only)."""
    rows = heldout.take(np.arange(scored_rows(heldout, max_sequences)))
    mask = rows["loss_mask"].astype(bool)
    return rows["labels"][mask].astype(np.uint8).tobytes()
