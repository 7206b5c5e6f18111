"""An online teacher with another tokenizer: run on its own rows inside the step, its final
hidden states taken at the student's aligned positions.

The batch carries the teacher's rows beside the student's (`kd_jax.align.rows.teacher_rows`:
`teacher_tokens`, `teacher_positions`, `teacher_segment_ids`, and per student position
`teacher_index`, -1 where unaligned; on a token store made once for every row and read back,
`kd_jax.align.prepared`). The teacher reads its rows; its hidden state at
`teacher_index` is what the loss turns into its logits over its own vocabulary, whole or a chunk
at a time (`kd_jax.losses.cross_vocab.CrossVocab`), so neither side's [tokens, vocab] logits
need exist for the batch.

At start-up the first rows are tried (`cross_tokenizer_teacher`): a teacher tokenizer that cannot
read the data, or that shares almost no token with the student's where `mapped` needs them, is
refused; the start-up line says how much the two vocabularies share in those rows, and how much
of the teacher's probability there falls on tokens of no bucket or mapped by prefix only (one
forward pass of the teacher over them).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kd_jax.align.prepared import is_prepared, prepare_teacher_rows
from kd_jax.align.rows import BACKOFF_KEYS, teacher_fields, teacher_seq_len_for
from kd_jax.align.vocabulary import (
    VocabularyMap,
    cached_tables,
    map_vocabularies,
    matched_buckets,
    overlap,
    shared_text,
)
from kd_jax.align.vocabulary import buckets as vocabulary_buckets
from kd_jax.config import Config, ConfigError
from kd_jax.data.chat import ChatTemplate, load_chat_template
from kd_jax.data.packing import Rows
from kd_jax.data.tokenizers import Tokenizer
from kd_jax.losses.chunked import CHUNK_BYTES
from kd_jax.losses.cross_bytes import MAX_INSIDE, ByteTables, CrossBytes
from kd_jax.losses.cross_vocab import Buckets, CrossVocab
from kd_jax.losses.divergences import student_log_probs_btv
from kd_jax.losses.soft_targets import vocabulary_logits
from kd_jax.models.pure import PureModel
from kd_jax.parallel.mesh import activation_sharding
from kd_jax.teacher.loading import LoadedTeacher

# Rows whose teacher rows are made at start-up: what data.teacher_seq_len 0 sizes the teacher's
# rows by, and a teacher tokenizer that cannot read the data is refused on.
PROBE_ROWS = 32

# The least overlap (`kd_jax.align.vocabulary.overlap`: of the first rows' tokens, the share
# whose text the other vocabulary holds as one token) that `loss.cross_vocab mapped` takes, on
# one side at least. Below it on both, nine tokens in ten of either side fall in a bucket
# shorter than themselves, mostly their first bytes: the mapped divergence would distill little
# more than which byte comes next. uld and hybrid need no shared tokens and are not refused.
MIN_OVERLAP = 0.10

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
    byte_tables: ByteTables | None = None  # what method "bytes" reads of the vocabularies

    def soft_targets(self, params: Any, batch: dict[str, jax.Array]) -> CrossVocab | CrossBytes:
        rows = {ours: batch[theirs] for theirs, ours in TEACHER_ROW_KEYS.items()}
        outputs = self.model.apply(params, rows,
                                   activation_sharding=activation_sharding(self.logits_sharding))
        outputs = jax.lax.stop_gradient(outputs)  # the teacher is frozen

        def at(index_bt, aligned_bt):
            # -1 reads position 0, then is cleared: an unaligned position's targets are uniform.
            hidden_btd = jnp.take_along_axis(outputs.hidden_btd,
                                             jnp.maximum(index_bt, 0)[..., None], axis=1)
            return jnp.where(aligned_bt[..., None], hidden_btd, 0)

        index_bt = batch["teacher_index"]
        if self.method != "bytes":
            aligned_bt = index_bt >= 0
            return CrossVocab(at(index_bt, aligned_bt), outputs.head_vd, aligned_bt,
                              self.buckets, self.method, self.teacher_valid)
        back_bt, inside_bt = batch["teacher_back"], batch["teacher_inside"]
        # Backed off, or read whole at the start of the teacher's piece (`inside` 0 there).
        aligned_bt = ((back_bt >= 0) | (index_bt >= 0)) & (inside_bt <= MAX_INSIDE)
        token_bt = jnp.take_along_axis(rows["tokens"], jnp.maximum(back_bt + 1, 0), axis=1)
        # Where the student has read the covering token whole, the position after it is the
        # aligned one (`teacher_index`); elsewhere `here` is not read.
        return CrossBytes(at(back_bt, aligned_bt), at(index_bt, aligned_bt & (index_bt >= 0)),
                          jnp.where(aligned_bt, token_bt, 0), inside_bt, batch["teacher_lo"],
                          batch["teacher_hi"], aligned_bt, outputs.head_vd, self.byte_tables,
                          self.teacher_valid)

    def host_fields(self, rows: np.ndarray, batch: dict | None = None) -> dict[str, Any]:
        return {} if self.feed is None else self.feed(rows, batch)


def probe_mass(model: PureModel, params: Any, rows: dict[str, np.ndarray],
               index_bt: np.ndarray, weight_bt: np.ndarray, masks_kw: np.ndarray,
               temperature: float, teacher_valid: int | None) -> np.ndarray:
    """The teacher's probability at `temperature` on the tokens of each mask (bool [k, its
    logits' width]), summed over the student positions of `weight_bt` 1 (aligned and trained on)
    at their teacher positions `index_bt` in the teacher's `rows` (`tokens`, `positions`,
    `segment_ids`): float64 [k]. A row at a time (the attention of one row is what a forward
    pass holds), its logits a chunk of positions at a time (no [rows, tokens, vocab] array)."""
    width = masks_kw.shape[-1]
    seq = index_bt.shape[1]
    chunk = min(seq, max(1, CHUNK_BYTES // (4 * width)))
    pad = [(0, 0), (0, -seq % chunk)]
    index_bt = np.pad(np.asarray(index_bt, np.int32), pad, constant_values=-1)
    weight_bt = np.pad(np.asarray(weight_bt, np.float32), pad)

    def row_sums(params, row):
        tokens, positions, segment_ids, index_t, weight_t = row
        outputs = model.apply(params, {"tokens": tokens[None], "positions": positions[None],
                                       "segment_ids": segment_ids[None]})
        hidden_td = outputs.hidden_btd[0][jnp.maximum(index_t, 0)]

        def chunk_sums(part):
            hidden_cd, weight_c = part
            p_cw = jnp.exp(student_log_probs_btv(vocabulary_logits(hidden_cd, outputs.head_vd),
                                                 temperature, teacher_valid))
            mass_kc = jnp.sum(jnp.where(masks_kw[:, None, :], p_cw[None], 0.0), axis=-1)
            return jnp.sum(mass_kc * weight_c, axis=-1)  # not a matmul: no reduced precision

        parts = (hidden_td.reshape(-1, chunk, hidden_td.shape[-1]), weight_t.reshape(-1, chunk))
        return jnp.sum(jax.lax.map(chunk_sums, parts), axis=0)

    sums_k = jax.jit(lambda params, *row: jnp.sum(
        jax.lax.map(lambda r: row_sums(params, r), row), axis=0))(
        params, rows["tokens"], rows["positions"], rows["segment_ids"], index_bt, weight_bt)
    return np.asarray(sums_k, np.float64)  # note: a host sync, once at start-up


def check_overlap(cfg: Config, student: Tokenizer, teacher: Tokenizer,
                  vocabulary: VocabularyMap, probe_batch: dict[str, np.ndarray],
                  fields: dict[str, np.ndarray]) -> str:
    """How much the two tokenizers share in the first rows (`probe_batch`, and the teacher's
    rows of them, `fields`), as a phrase of the start-up line; `mapped` refused below
    MIN_OVERLAP on both sides."""
    teacher_bytes, student_bytes = teacher.token_bytes(), student.token_bytes()
    teacher_share, _ = overlap(fields["teacher_tokens"], fields["teacher_segment_ids"] > 0,
                               vocabulary.exact, teacher_bytes)
    student_share, _ = overlap(probe_batch["tokens"], probe_batch["segment_ids"] > 0,
                               shared_text(student_bytes, teacher_bytes), student_bytes)
    shares = (f"in the first {len(probe_batch['tokens'])} rows, {teacher_share:.1%} of the "
              f"teacher's tokens and {student_share:.1%} of the student's spell a token of the "
              "other")
    if cfg.loss.cross_vocab == "mapped" and max(teacher_share, student_share) < MIN_OVERLAP:
        raise ConfigError(
            f"the teacher's tokenizer ({teacher.description}) and the student's "
            f"({student.description}) have almost nothing in common: {shares}, below "
            f"{MIN_OVERLAP:.0%} on both sides, so loss.cross_vocab mapped would compare little "
            "more than first bytes; use loss.cross_vocab uld or hybrid, which need no shared "
            "tokens")
    return shares


# Names the way `vocabulary_of` makes its tables: another way must name another version, so that
# no table cached by an earlier one is read.
MAP_VERSION = "kd_jax.vocabulary_map/1"


def vocabulary_of(student: Tokenizer, teacher: Tokenizer, teacher_width: int,
                  student_width: int) -> tuple[VocabularyMap, Buckets]:
    """How the teacher's vocabulary maps onto the student's, and the buckets both fall in,
    fitted to the two models' logits (`teacher_width`, `student_width` columns)."""
    def make() -> dict[str, np.ndarray]:
        teacher_bytes, student_bytes = teacher.token_bytes(), student.token_bytes()
        vocabulary = map_vocabularies(teacher_bytes, student.ids_by_bytes(), student.vocab_size)
        teacher_bucket, student_bucket, count = vocabulary_buckets(vocabulary, teacher_bytes,
                                                                   student_bytes)
        return {"student_id": vocabulary.student_id, "exact": vocabulary.exact,
                "teacher_bucket": teacher_bucket, "student_bucket": student_bucket,
                "matched": matched_buckets(teacher_bucket, student_bucket, count,
                                           teacher_bytes, student_bytes)}

    # Made once per tokenizer pair on a machine (`cached_tables`).
    tables = cached_tables(f"{MAP_VERSION} {teacher.fingerprint} -> {student.fingerprint}",
                           make)
    vocabulary = VocabularyMap(tables["student_id"], tables["exact"], student.vocab_size)
    return vocabulary, Buckets.of(
        tables["teacher_bucket"], tables["student_bucket"], len(tables["matched"]),
        teacher_width, student_width, matched=tables["matched"])


def _chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    path = getattr(tokenizer, "path", None)
    try:
        return load_chat_template(path) if path else None
    except ConfigError:  # none: a base model, which reads plain text
        return None


def check_chat_templates(cfg: Config, student: Tokenizer, teacher: Tokenizer) -> None:
    """Conversations (`data.messages_column`) are rendered in the student's chat template, and
    the teacher reads the text of that rendering (its special tokens spell none). A teacher
    with a chat template of its own, another one, would read conversations without its own
    markers: refused, as rendering each side in its own template is not done yet."""
    if not cfg.data.messages_column:
        return
    theirs = _chat_template(teacher)
    if theirs is None:
        return
    ours = _chat_template(student)
    if ours is None or ours.text != theirs.text:
        raise ConfigError(
            f"data.messages_column: conversations are rendered in the student's chat template "
            f"({ours.source if ours else 'none'}), and the teacher's is another "
            f"({theirs.source}); a teacher of another tokenizer reads them only in the "
            "student's (each side in its own is not supported): use a teacher without a chat "
            "template, or prompt_column and response_column")


def teacher_feed(cfg: Config, student: Tokenizer, teacher: Tokenizer, train: Rows,
                 max_seq_len: int) -> tuple[int, Callable[[np.ndarray, dict], dict]]:
    """(the teacher's row length, the feed of each batch's teacher rows) for `train`.

    The length is `data.teacher_seq_len`, or what the first rows take (`teacher_seq_len_for`);
    trying them also refuses a teacher tokenizer that cannot read the text (a normalizer that
    changes it) before anything is written. On a token store the teacher rows of every training
    row are made once into <data.store>/teacher_rows (`kd_jax.align.prepared`: by `kd-jax
    prepare`, else here) and read; rows packed in memory have theirs made batch by batch."""
    check_chat_templates(cfg, student, teacher)
    probe = np.arange(min(PROBE_ROWS, train.n_rows))
    teacher_seq_len = cfg.data.teacher_seq_len or teacher_seq_len_for(
        train.take(probe), student, teacher, train.document_starts(probe), max_seq_len)
    if teacher_seq_len > max_seq_len:
        raise ConfigError(f"data.teacher_seq_len ({teacher_seq_len}) exceeds the teacher's "
                          f"max_seq_len ({max_seq_len})")
    backoff = cfg.loss.cross_vocab == "bytes"
    if not cfg.data.store:
        feed = teacher_fields(train, student, teacher, teacher_seq_len, backoff)
        feed(probe, train.take(probe))  # tried whatever the length
        return teacher_seq_len, feed
    root = Path(cfg.data.store) / "teacher_rows"
    if cfg.distributed.enabled and not is_prepared(root, train, student, teacher,
                                                   teacher_seq_len):
        # every process would make the same rows at once
        raise ConfigError(f"the teacher rows of data.store '{cfg.data.store}' for this "
                          f"teacher's tokenizer are not prepared; a multi-process run reads "
                          "prepared ones: run kd-jax prepare with this config first")
    with tqdm(total=train.n_rows, unit="row", desc="teacher rows",
              disable=not (cfg.train.progress and sys.stderr.isatty())) as bar:
        prepared = prepare_teacher_rows(root, train, student, teacher, teacher_seq_len,
                                        bar.update)
    if backoff:
        return teacher_seq_len, prepared.fields

    def fields(rows: np.ndarray, batch: dict | None = None) -> dict[str, np.ndarray]:
        out = prepared.fields(rows, batch)
        return {key: value for key, value in out.items() if key not in BACKOFF_KEYS}

    return teacher_seq_len, fields


def cross_tokenizer_teacher(cfg: Config, student: Tokenizer, train: Rows, loaded: LoadedTeacher,
                            logits_sharding: Any) -> CrossTokenizerTeacher:
    """The online teacher of another tokenizer (`loaded.tokenizer`): the vocabularies' buckets,
    and its rows made from each batch's, tried on the first rows; refused with white-box terms
    or on-policy rows, which need the student's tokens on both sides, and with `mapped` where
    the two share almost no token (MIN_OVERLAP)."""
    teacher = loaded.tokenizer
    for term, on in (("loss.hidden_weight", cfg.loss.hidden_weight > 0),
                     ("loss.attention_weight", cfg.loss.attention_weight > 0),
                     ("onpolicy.fraction", cfg.onpolicy.fraction > 0)):
        if on:
            raise ConfigError(f"{term} needs a teacher with the student's tokenizer; this "
                              f"teacher's ({teacher.description}) is another")
    if teacher.vocab_size > loaded.config.vocab_size:
        raise ConfigError(f"the teacher's tokenizer has {teacher.vocab_size} tokens, more than "
                          f"its model's {loaded.config.vocab_size} logits")
    teacher_seq_len, feed = teacher_feed(cfg, student, teacher, train,
                                         loaded.config.max_seq_len)
    teacher_bytes, student_bytes = teacher.token_bytes(), student.token_bytes()
    vocabulary, buckets = vocabulary_of(student, teacher, loaded.config.vocab_size,
                                        cfg.model.vocab_size)
    probe = np.arange(min(PROBE_ROWS, train.n_rows))
    probe_batch = train.take(probe)
    fields = feed(probe, probe_batch)

    shares = check_overlap(cfg, student, teacher, vocabulary, probe_batch, fields)

    byte_tables = (ByteTables.of(teacher_bytes, student_bytes, loaded.config.vocab_size,
                                 cfg.model.vocab_size)
                   if cfg.loss.cross_vocab == "bytes" else None)
    return CrossTokenizerTeacher(
        loaded.model, buckets, cfg.loss.cross_vocab, teacher.vocab_size, logits_sharding, feed,
        f"teacher tokenizer {teacher.description}, not the student's: rows of "
        f"{teacher_seq_len} teacher tokens, loss.cross_vocab {cfg.loss.cross_vocab}; "
        f"{vocabulary.describe()}; {shares}; "
        + _mass_line(loaded, cfg.loss.temperature, vocabulary, buckets, fields, probe_batch),
        byte_tables)


def _mass_line(loaded: LoadedTeacher, temperature: float, vocabulary: VocabularyMap,
               buckets: Buckets, fields: dict[str, np.ndarray],
               probe_batch: dict[str, np.ndarray]) -> str:
    """What the teacher puts, over the first rows' aligned positions, on tokens the buckets
    leave out and on tokens mapped by prefix only: what `mapped` compares least exactly."""
    aligned_bt = (fields["teacher_index"] >= 0) & (probe_batch["loss_mask"] > 0)
    if not aligned_bt.any():
        return "no position of the first rows is aligned"
    width = len(buckets.teacher_w)
    by_prefix_w = np.zeros(width, bool)
    by_prefix_w[:len(vocabulary.exact)] = vocabulary.mapped & ~vocabulary.exact
    rows = {ours: fields[theirs] for theirs, ours in TEACHER_ROW_KEYS.items()}
    no_bucket, by_prefix = probe_mass(
        loaded.model, loaded.params, rows, fields["teacher_index"], aligned_bt,
        np.stack([buckets.teacher_w < 0, by_prefix_w]), temperature,
        loaded.tokenizer.vocab_size) / aligned_bt.sum()
    return (f"over their {int(aligned_bt.sum()):,} aligned positions the teacher puts "
            f"{no_bucket:.2%} of its probability (at T {temperature:g}) on tokens of no bucket "
            f"and {by_prefix:.2%} on tokens mapped by prefix only")
