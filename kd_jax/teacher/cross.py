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

from kd_jax.align.rows import teacher_fields, teacher_seq_len_for
from kd_jax.align.vocabulary import buckets as vocabulary_buckets
from kd_jax.align.vocabulary import map_vocabularies
from kd_jax.config import Config, ConfigError
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer
from kd_jax.losses.cross_vocab import Buckets, CrossVocab
from kd_jax.models.pure import PureModel
from kd_jax.parallel.mesh import activation_sharding
from kd_jax.teacher.loading import LoadedTeacher

# Rows whose teacher rows are made at start-up: what data.teacher_seq_len 0 sizes the teacher's
# rows by, and a teacher tokenizer that cannot read the data is refused on.
PROBE_ROWS = 32

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


def cross_tokenizer_teacher(cfg: Config, student: Tokenizer, train: Rows, loaded: LoadedTeacher,
                            logits_sharding: Any) -> CrossTokenizerTeacher:
    """The online teacher of another tokenizer (`loaded.tokenizer`): the vocabularies' buckets,
    and its rows made from each batch's, tried on the first rows; refused with white-box terms
    or on-policy rows, which need the student's tokens on both sides."""
    teacher = loaded.tokenizer
    for term, on in (("loss.hidden_weight", cfg.loss.hidden_weight > 0),
                     ("loss.attention_weight", cfg.loss.attention_weight > 0),
                     ("onpolicy.fraction", cfg.onpolicy.fraction > 0)):
        if on:
            raise ConfigError(f"{term} needs a teacher with the student's tokenizer; this "
                              f"teacher's ({teacher.description}) is another")
    probe = np.arange(min(PROBE_ROWS, train.n_rows))
    probe_batch = train.take(probe)
    # Trying the first rows also refuses a teacher tokenizer that cannot read the text (a
    # normalizer that changes it) before anything is written.
    teacher_seq_len = cfg.data.teacher_seq_len or teacher_seq_len_for(
        probe_batch, student, teacher, train.document_starts(probe),
        loaded.config.max_seq_len)
    if teacher_seq_len > loaded.config.max_seq_len:
        raise ConfigError(f"data.teacher_seq_len ({teacher_seq_len}) exceeds the teacher's "
                          f"max_seq_len ({loaded.config.max_seq_len})")
    if teacher.vocab_size > loaded.config.vocab_size:
        raise ConfigError(f"the teacher's tokenizer has {teacher.vocab_size} tokens, more than "
                          f"its model's {loaded.config.vocab_size} logits")
    vocabulary = map_vocabularies(teacher.token_bytes(), student.ids_by_bytes(),
                                  student.vocab_size)
    buckets = Buckets.of(*vocabulary_buckets(vocabulary, teacher.token_bytes(),
                                             student.token_bytes()),
                         loaded.config.vocab_size, cfg.model.vocab_size)
    feed = teacher_fields(train, student, teacher, teacher_seq_len)
    feed(probe, probe_batch)
    return CrossTokenizerTeacher(
        loaded.model, buckets, cfg.loss.cross_vocab, teacher.vocab_size, logits_sharding, feed,
        f"teacher tokenizer {teacher.description}, not the student's: rows of "
        f"{teacher_seq_len} teacher tokens, loss.cross_vocab {cfg.loss.cross_vocab}; "
        + vocabulary.describe())
