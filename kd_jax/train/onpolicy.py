"""On-policy distillation: some rows of every batch answered by the student, inside the step.

Off-policy distillation trains the student on text it would not have written itself; GKD
(Agarwal et al. 2024) also trains it on its own samples, scored by the teacher, so what it
learns matches what it does at inference. Here a fixed set of rows of each batch
(`answered_rows`: round(fraction x batch) of them, spread evenly, so every device of a
data-parallel batch answers its share) keeps only its prompt; the student's current parameters
answer it with the KV-cache sampler (`kd_jax.models.generate`), and the answered row replaces
the row in the batch. The rest of the step is unchanged: the teacher's forward pass, the
white-box terms and the divergence see the answered rows like any others, and the loss is
normalized by the tokens of the whole mixed batch. Nothing of the sampling reaches the host.

A row's prompt is its first segment's first L tokens:

* a row whose first labels are untrained (a prompt/response row, a chat's user turn) gives its
  untrained prompt, whole: L = (first trained position) + 1, the tokens up to the one that
  predicts the first response token;
* a row trained from its first token (plain text) gives its first `prompt_tokens` tokens;

in both cases at most the first segment and at most seq_len - max_new_tokens tokens. The
answered row is one segment: the prompt at positions [0, L), the answer's n tokens after it
(the stop token included, when one was drawn: the student learns to stop as the teacher scores
stopping), padding after. The loss covers the answer: the label at position i is the token at
i + 1, trained for L - 1 <= i < L + n - 1.

Each answered row draws with its own key: the state's key of the step, folded with a constant
of this module and the row's index, so a resumed run draws what the uninterrupted one drew.

This module imports only jax and numpy (plus the pure kd_jax modules): it is part of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.config import ModelConfig, OnPolicyConfig
from kd_jax.models.generate import Sampling, make_sampler

# Folded into the state's key: the answers' draws are a stream of their own.
_ANSWER_STREAM = 0x0A45


def answered_rows(batch_size: int, fraction: float) -> np.ndarray:
    """The rows (int64, ascending) a batch's student answers: round(fraction x batch_size) of
    them, row r when floor((r + 1) n / B) > floor(r n / B), i.e. evenly spread."""
    n = round(fraction * batch_size)
    r = np.arange(batch_size)
    return np.flatnonzero((r + 1) * n // batch_size > r * n // batch_size)


def prompt_lengths(segment_ids_nt: jax.Array, loss_mask_nt: jax.Array, prompt_tokens: int,
                   width: int) -> jax.Array:
    """int32 [rows]: how many leading tokens of each row are its prompt (module docstring)."""
    t = segment_ids_nt.shape[1]
    first_segment_nt = jnp.cumprod(segment_ids_nt == segment_ids_nt[:, :1], axis=1)
    segment_length_n = first_segment_nt.sum(axis=1)
    trained_nt = loss_mask_nt != 0
    first_trained_n = jnp.where(trained_nt.any(axis=1), jnp.argmax(trained_nt, axis=1), t)
    length_n = jnp.where(first_trained_n > 0, first_trained_n + 1, prompt_tokens)
    return jnp.clip(length_n, 1, jnp.minimum(segment_length_n, width)).astype(jnp.int32)


def left_padded(tokens_nt: jax.Array, lengths_n: jax.Array, width: int, pad_id: int = 0
                ) -> jax.Array:
    """The first lengths_n tokens of each row at the right end of `width` slots (the sampler's
    layout, `kd_jax.models.generate.left_pad`)."""
    source_np = jnp.arange(width)[None, :] - (width - lengths_n)[:, None]
    taken_np = jnp.take_along_axis(tokens_nt, jnp.maximum(source_np, 0), axis=1)
    return jnp.where(source_np >= 0, taken_np, pad_id).astype(jnp.int32)


def answered_batch_rows(tokens_nt: jax.Array, lengths_n: jax.Array, answer_nm: jax.Array,
                        emitted_n: jax.Array) -> dict[str, jax.Array]:
    """Rows of the batch's arrays (`kd_jax.data.packing.BATCH_KEYS`), int32 [rows, seq_len]:
    each row's prompt (its first lengths_n tokens) followed by the first emitted_n tokens of
    its answer, the loss on the answer."""
    t, m = tokens_nt.shape[1], answer_nm.shape[1]
    i_t = jnp.arange(t)[None, :]
    end_n1 = (lengths_n + emitted_n)[:, None]
    answer_index_nt = i_t - lengths_n[:, None]
    answer_nt = jnp.take_along_axis(answer_nm, jnp.clip(answer_index_nt, 0, m - 1), axis=1)
    tokens_nt = jnp.where(i_t < lengths_n[:, None], tokens_nt,
                          jnp.where(i_t < end_n1, answer_nt, 0))
    trained_nt = (i_t >= lengths_n[:, None] - 1) & (i_t < end_n1 - 1)
    next_nt = jnp.concatenate([tokens_nt[:, 1:], jnp.zeros_like(tokens_nt[:, :1])], axis=1)
    in_row_nt = i_t < end_n1
    return {
        "tokens": tokens_nt.astype(jnp.int32),
        "labels": jnp.where(trained_nt, next_nt, 0).astype(jnp.int32),
        "positions": jnp.where(in_row_nt, i_t, 0).astype(jnp.int32),
        "segment_ids": in_row_nt.astype(jnp.int32),
        "loss_mask": trained_nt.astype(jnp.int32),
    }


def answer_keys(rng: jax.Array, rows: np.ndarray) -> jax.Array:
    """uint32 [rows, 2]: each answered row's key, from the state's raw key and the row."""
    base = jax.random.fold_in(jax.random.wrap_key_data(rng), _ANSWER_STREAM)
    keys = jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.asarray(rows, jnp.uint32))
    return jax.random.key_data(keys)


@dataclasses.dataclass(frozen=True, eq=False)
class OnPolicy:
    """What the step needs to answer its rows: which, how, and the sampler."""

    rows: np.ndarray  # int64: the rows of a batch the student answers
    prompt_tokens: int
    width: int  # the widest prompt: seq_len - max_new_tokens
    sampling: Sampling  # Python numbers
    stop_ids: np.ndarray  # int32; [-1] for none
    sample: Callable[..., Any]  # `kd_jax.models.generate.make_sampler`'s

    @classmethod
    def of(cls, cfg: OnPolicyConfig, model: ModelConfig, batch_size: int, seq_len: int,
           valid_vocab: int, stop_ids: np.ndarray, cache_sharding: Any = None,
           activation_sharding: Any = None) -> OnPolicy | None:
        """The on-policy part of a step as `cfg` says; None when it answers no row."""
        rows = answered_rows(batch_size, cfg.fraction)
        if not len(rows):
            return None
        sample = make_sampler(model, cfg.max_new_tokens, valid_vocab,
                              cache_sharding=cache_sharding,
                              activation_sharding=activation_sharding)
        return cls(rows, cfg.prompt_tokens, seq_len - cfg.max_new_tokens,
                   Sampling(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p)),
                   np.asarray(stop_ids, np.int32), sample)

    def answer(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(the batch with its answered rows replaced, metric sums: "answers", the rows
        answered, and "answer_tokens", the tokens they sampled)."""
        rows = jnp.asarray(self.rows)
        taken = {key: batch[key][rows] for key in ("tokens", "segment_ids", "loss_mask")}
        lengths_n = prompt_lengths(taken["segment_ids"], taken["loss_mask"],
                                   self.prompt_tokens, self.width)
        prompt_np = left_padded(taken["tokens"], lengths_n, self.width)
        generated = self.sample(params, prompt_np, lengths_n, answer_keys(rng, self.rows),
                                self.sampling, self.stop_ids)
        emitted_n = generated.lengths_b + generated.stopped_b.astype(jnp.int32)
        answered = answered_batch_rows(taken["tokens"], lengths_n, generated.tokens_bn,
                                       emitted_n)
        batch = dict(batch)
        for key, value in answered.items():
            batch[key] = jnp.asarray(batch[key]).at[rows].set(value.astype(batch[key].dtype))
        return batch, {"answers": jnp.float32(len(self.rows)),
                       "answer_tokens": jnp.sum(emitted_n, dtype=jnp.float32)}

