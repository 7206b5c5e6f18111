"""An online teacher with another tokenizer: run on its own rows inside the step, its final
hidden states taken at the student's aligned positions.

The batch carries the teacher's rows beside the student's (`kd_jax.align.rows.teacher_rows`:
`teacher_tokens`, `teacher_positions`, `teacher_segment_ids`, and per student position
`teacher_index`, -1 where unaligned). The teacher reads its rows; its hidden state at
`teacher_index` is what the loss turns into its logits over its own vocabulary, whole or a chunk
at a time (`kd_jax.losses.cross_vocab.CrossVocab`), so neither side's [tokens, vocab] logits
need exist for the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses.cross_vocab import Buckets, CrossVocab
from kd_jax.models.pure import PureModel
from kd_jax.parallel.mesh import activation_sharding

# The batch's arrays for the teacher's rows, and the names the teacher's model reads them by.
TEACHER_ROW_KEYS = {"teacher_tokens": "tokens", "teacher_positions": "positions",
                    "teacher_segment_ids": "segment_ids"}


@dataclasses.dataclass(frozen=True)
class CrossTokenizerTeacher:
    model: PureModel
    buckets: Buckets
    method: str = "mapped"  # kd_jax.losses.cross_vocab.METHODS
    teacher_valid: int | None = None  # the teacher tokenizer's vocabulary (its head may be wider)
    logits_sharding: Any = None
    # (rows, their batch) -> the teacher's rows and `teacher_index` (`align.rows.teacher_fields`)
    feed: Callable[[np.ndarray, dict], dict] | None = None
    note: str = ""  # the start-up line: the two tokenizers and how the vocabularies map

    def soft_targets(self, params: Any, batch: dict[str, jax.Array]) -> CrossVocab:
        rows = {ours: batch[theirs] for theirs, ours in TEACHER_ROW_KEYS.items()}
        outputs = self.model.apply(params, rows,
                                   activation_sharding=activation_sharding(self.logits_sharding))
        outputs = jax.lax.stop_gradient(outputs)  # the teacher is frozen
        index_bt = batch["teacher_index"]
        aligned_bt = index_bt >= 0
        # -1 reads position 0, then is cleared: an unaligned position's targets are uniform.
        hidden_btd = jnp.take_along_axis(outputs.hidden_btd, jnp.maximum(index_bt, 0)[..., None],
                                         axis=1)
        hidden_btd = jnp.where(aligned_bt[..., None], hidden_btd, 0)
        return CrossVocab(hidden_btd, outputs.head_vd, aligned_bt, self.buckets, self.method,
                          self.teacher_valid)

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        return {} if self.feed is None else self.feed(rows, batch)
