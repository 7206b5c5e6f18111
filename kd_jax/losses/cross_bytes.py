"""Next-byte distributions of a teacher and a student with different tokenizers, the teacher's
taken back to where its token started (`loss.cross_vocab: bytes`).

The teacher of another tokenizer is a model of text, and so is the student: both say which byte
comes next. A student position has read some text; the teacher token that holds its last byte
(`kd_jax.align.positions.covering`) started at byte s, and the student has read r, that token's
first bytes. The teacher position before that token has read exactly the text up to s, and its
distribution p over the next token is what it says about the text after s. Given that the text
after s starts with r, the next byte is b with probability proportional to

    sum of p(w) over teacher tokens w that start with r and then b
      + p(t) * P(the next token starts with b | the teacher has read t)   where r is a whole
                                                                          token t,

the second term read from the teacher position after t (which exists where the student ends
where t ends: the positions `mapped` aligns). A token with no position before it in the row
(the first of a piece without a BOS) cannot be backed off: where the student has read it whole,
the target is the first byte of the teacher's next token alone, as `mapped`'s is. This is the teacher's next-byte probability over
the tokenizations of the text that start a token at s, one token back: of Phan et al.'s exact
byte-level probabilities (2024, arXiv 2410.09303) it keeps the tokenizations of the last token,
not those further back, and drops the tokens that spell r exactly other than t (the teacher's
mass on "r, then a token that starts anew": what follows such a token would need a forward pass
the row does not have).

Why back off at all: at a position where a teacher token ends, the teacher's own next-token
distribution knows that the text does not go on into a longer token (the tokenizer would have
merged it), so its first bytes shun the bytes that would have extended it. A reader of bytes
cannot know where the teacher's tokens end, and learning the teacher's next byte there teaches
it a bias (benchmarks/cross_tokenizer_quality.py measures it). Backed off, every student
position has a target, inside a teacher token as at its end.

The student's side is the probability of its next token's first byte. For a student that reads
bytes (or single characters, or split digits) that is its whole next-token distribution; a
student with longer tokens compares only the first byte of them, and its own tokens' ends carry
the bias above, uncorrected: for such a student, `mapped` compares more. Bytes the student has
no token to start with, and tokens that spell nothing (special tokens), are left out and both
sides renormalized. The divergence is `loss.divergence`'s between the two distributions over
the 256 bytes, T^2-scaled; the teacher's logits are divided by T before either term is formed.
With a byte-level teacher, whose tokens are bytes, the target is its next byte: with a
byte-level student, `distribution_divergence_bt` on the two distributions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kd_jax.losses.cross_vocab import bucket_log_probs
from kd_jax.losses.divergences import (
    check_leading_shapes,
    distribution_divergence_bt,
    log_sum_exp_bt,
    student_log_probs_btv,
    validate_divergence_args,
)
from kd_jax.losses.soft_targets import vocabulary_logits

BYTES = 256
# Teacher tokens longer than this are backed off only within their first MAX_INSIDE bytes: a
# student position further inside one has no target (runs of spaces or dashes, mostly).
MAX_INSIDE = 32


# eq=False: compared (and hashed) by identity, as a static field of a pytree must be cheaply.
@dataclass(frozen=True, eq=False)
class ByteTables:
    """What the loss reads of the two vocabularies, numpy constants of the compiled step:
    `rank_w` each teacher id's place among the teacher's spellings sorted (int32 [teacher
    width]; the student's partial text selects a run of them, `teacher_lo` to `teacher_hi`),
    `next_lw` the byte at offset l of teacher token w (int16 [MAX_INSIDE + 1, teacher width],
    -1 where the token is shorter, or the student has no token starting with that byte),
    `length_w` each teacher token's bytes, `student_v` each student id's first byte (-1 where
    it spells nothing)."""

    rank_w: np.ndarray
    next_lw: np.ndarray
    length_w: np.ndarray
    student_v: np.ndarray

    @classmethod
    def of(cls, teacher_bytes, student_bytes, teacher_width: int, student_width: int
           ) -> ByteTables:
        """From both tokenizers' `token_bytes()`, padded with -1 to the models' logit widths."""
        if len(teacher_bytes) > teacher_width or len(student_bytes) > student_width:
            raise ValueError("a tokenizer has more tokens than its model has logits")
        first = np.full(student_width, -1, np.int16)
        first[:len(student_bytes)] = [spelled[0] if spelled else -1 for spelled in student_bytes]
        has = np.zeros(BYTES + 1, bool)  # index -1 (no byte) reads the last: False
        has[first[first >= 0]] = True
        order = sorted(range(len(teacher_bytes)), key=lambda w: teacher_bytes[w])
        rank = np.full(teacher_width, np.iinfo(np.int32).max, np.int32)  # padding: in no run
        rank[order] = np.arange(len(order), dtype=np.int32)
        next_lw = np.full((MAX_INSIDE + 1, teacher_width), -1, np.int16)
        length = np.zeros(teacher_width, np.int32)
        for w, spelled in enumerate(teacher_bytes):
            length[w] = len(spelled)
            head = np.frombuffer(spelled[:MAX_INSIDE + 1], np.uint8).astype(np.int16)
            next_lw[:len(head), w] = np.where(has[head], head, -1)
        return cls(rank, next_lw, length, first)


def backed_off_log_probs(log_back_btw, log_here_btw, token_bt, inside_bt, lo_bt, hi_bt,
                         tables: ByteTables):
    """log of the teacher's next-byte distribution [b, t, 256] (the module docstring) from its
    log-probabilities at the position before the covering token and at the covering token's
    own (read where the student has read all of it), unnormalized; -inf where no byte has
    mass. Where `inside_bt` is 0 (no position before the token, and an empty run `lo_bt` =
    `hi_bt`), the first byte of the next token at the covering token's own position alone."""
    lead = log_back_btw.shape[:-1]
    width = log_back_btw.shape[-1]
    # Tokens that start with the student's partial text and go on past it, by their next byte.
    rank_w = jnp.asarray(tables.rank_w)
    starts_btw = (rank_w >= lo_bt[..., None]) & (rank_w < hi_bt[..., None])
    next_btw = jnp.asarray(tables.next_lw)[jnp.clip(inside_bt, 0, MAX_INSIDE)].astype(jnp.int32)
    segment_btw = jnp.where(starts_btw & (next_btw >= 0), next_btw, BYTES)
    n = int(np.prod(lead))
    flat = (segment_btw.reshape(n, width)
            + (BYTES + 1) * jnp.arange(n, dtype=jnp.int32)[:, None]).reshape(-1)
    # Probabilities summed as they are (each at most 1: no shift needed, and one scatter pass
    # rather than three); a byte whose tokens' mass underflows has none.
    total = jax.ops.segment_sum(jnp.exp(log_back_btw).reshape(-1), flat,
                                num_segments=n * (BYTES + 1))
    has = total > 0
    extended = jnp.where(has, jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
    extended_btc = extended.reshape(*lead, BYTES + 1)[..., :BYTES]

    # The covering token whole: its probability, then the first byte of the token after it.
    # `inside` 0: no position before the token (the first of a piece without a BOS), and the
    # target is the next token's first byte alone.
    first_bt = inside_bt == 0
    whole_bt = first_bt | (inside_bt == jnp.asarray(tables.length_w)[token_bt])
    log_token_bt = jnp.where(first_bt, 0.0, jnp.take_along_axis(
        log_back_btw, token_bt[..., None], axis=-1)[..., 0])
    first_btc = bucket_log_probs(log_here_btw, tables.next_lw[0], BYTES)
    ended_btc = jnp.where(whole_bt[..., None], log_token_bt[..., None] + first_btc, -jnp.inf)
    return jnp.logaddexp(extended_btc, ended_btc)


def _normalized(log_btc, ok_bt):
    """`log_btc` renormalized where `ok_bt` and it has mass; uniform elsewhere (a value that is
    dropped, but whose gradient must be finite to be)."""
    total_bt = log_sum_exp_bt(log_btc)
    ok_bt = ok_bt & jnp.isfinite(total_bt)
    return jnp.where(ok_bt[..., None], log_btc - jnp.where(ok_bt, total_bt, 0.0)[..., None],
                     -jnp.log(float(BYTES))), ok_bt


@struct.dataclass
class CrossBytes:
    """Soft targets from a teacher with another tokenizer, compared byte by byte (the module
    docstring): per student position [batch, tokens] the teacher's final hidden states at the
    position before the covering token (`back`) and at the covering token (`here`, [..., d]),
    the covering token's id, how many of its bytes the student has read, the run of the
    teacher's sorted spellings that start with those bytes (`lo` to `hi`), and whether the
    position has a target; the teacher's output head [teacher vocab, d]."""

    back: jax.Array
    here: jax.Array
    token: jax.Array
    inside: jax.Array
    lo: jax.Array
    hi: jax.Array
    aligned: jax.Array
    head: jax.Array
    tables: ByteTables = struct.field(pytree_node=False)
    teacher_valid: int | None = struct.field(pytree_node=False, default=None)

    @property
    def width(self) -> int:
        """The widest [tokens, width] arrays per position, for the chunk's size: the teacher's
        log-probabilities at two positions and the bytes they fall in."""
        return 4 * self.head.shape[0]

    def refusal(self, divergence: str) -> str | None:
        if divergence == "mse":
            return ("divergence 'mse' compares logits column by column and is not defined "
                    "across two vocabularies; use a divergence between distributions")
        return None

    def where(self, mask_bt) -> CrossBytes:
        """These targets where `mask_bt`; elsewhere none, with zero hidden states."""
        return self.replace(back=jnp.where(mask_bt[..., None], self.back, 0),
                            here=jnp.where(mask_bt[..., None], self.here, 0),
                            aligned=self.aligned & mask_bt)

    def per_token(self):
        """What `kd_jax.losses.chunked` cuts into chunks; the head is shared by all."""
        return (self.back, self.here, self.token, self.inside, self.lo, self.hi, self.aligned)

    def with_per_token(self, per_token) -> CrossBytes:
        back, here, token, inside, lo, hi, aligned = per_token
        return self.replace(back=back, here=here, token=token, inside=inside, lo=lo, hi=hi,
                            aligned=aligned)

    def divergence_bt(self, kind: str, student_logits_btv, *, temperature, beta=0.5, skew=0.1,
                      valid_vocab=None) -> jax.Array:
        return bytes_divergence_bt(
            kind, student_logits_btv, vocabulary_logits(self.back, self.head),
            vocabulary_logits(self.here, self.head), self.token, self.inside, self.lo, self.hi,
            self.aligned, self.tables, temperature=temperature, beta=beta, skew=skew,
            student_valid=valid_vocab, teacher_valid=self.teacher_valid)


def bytes_divergence_bt(kind: str, student_logits_btv, back_logits_btw, here_logits_btw,
                        token_bt, inside_bt, lo_bt, hi_bt, aligned_bt, tables: ByteTables, *,
                        temperature, beta=0.5, skew=0.1, student_valid=None,
                        teacher_valid=None) -> jax.Array:
    """Per-token divergence between the teacher's backed-off next-byte distribution and the
    student's first-byte one (the module docstring), T^2-scaled, float32 [batch, tokens]; 0
    where `aligned_bt` is False."""
    temperature, beta, skew = validate_divergence_args(kind, temperature, beta, skew)
    if kind == "mse":
        raise ValueError("divergence 'mse' compares logits column by column and is not defined "
                         "across two vocabularies; use a divergence between distributions")
    check_leading_shapes(student=student_logits_btv.shape[:-1], back=back_logits_btw.shape[:-1],
                         here=here_logits_btw.shape[:-1], token=token_bt.shape,
                         aligned=aligned_bt.shape)
    for side, table, logits in (("student", tables.student_v, student_logits_btv),
                                ("teacher", tables.rank_w, back_logits_btw)):
        if len(table) != logits.shape[-1]:
            raise ValueError(f"the byte tables were made for {len(table)} {side} logits, not "
                             f"{logits.shape[-1]}")

    def teacher(logits_btw):
        return jax.lax.stop_gradient(
            student_log_probs_btv(logits_btw, temperature, teacher_valid))

    log_p_btc, ok_bt = _normalized(
        backed_off_log_probs(teacher(back_logits_btw), teacher(here_logits_btw), token_bt,
                             inside_bt, lo_bt, hi_bt, tables),
        aligned_bt)
    log_q_btc = bucket_log_probs(student_log_probs_btv(student_logits_btv, temperature,
                                                       student_valid), tables.student_v, BYTES)
    log_q_btc = log_q_btc - log_sum_exp_bt(log_q_btc)[..., None]
    scale = temperature * temperature  # Hinton et al. 2015, as in divergence_bt
    value_bt = scale * distribution_divergence_bt(kind, log_p_btc, log_q_btc, beta, skew)
    return jnp.where(ok_bt, value_bt, 0.0)
