"""The fused LM head and loss, chunk by chunk: no [tokens, vocab] array for the whole batch.

The objective (`kd_jax.losses.objective`) needs the student's logits, the teacher's targets and
the labels per token, and every term is a sum over tokens. Here the sequence is cut into chunks
of positions; a `jax.lax.scan` takes one chunk at a time (every row of the batch, so the batch
stays split over the devices as it was) and computes

    student logits = hidden_chunk @ head^T (float32), the teacher's targets for those tokens
    (an online teacher's logits from its own hidden states and head, or a cache's sparse
    targets), the chunk's loss, and its gradients with respect to hidden_chunk and head.

The gradients are taken in the forward pass, as Liger-Kernel's fused linear losses do, and kept:
a `jax.custom_vjp` makes the backward pass scale them by the incoming cotangent, so no head
matmul is redone and the only [tokens, vocab] arrays alive are one chunk's. What is kept is the
gradient for the hidden states [batch, tokens, d] (the hidden states' own size) and for the head
[vocab, d], float32.

Every divergence and every kind of soft target works unchanged: a chunk is the objective of
`objective_on_logits` on [batch, chunk, vocab] logits. Positions past the sequence's end, added
to fill the last chunk, repeat the last position's values and are masked out. A vocabulary split
over the `tensor` mesh axis stays split: the chunk's logits keep the full logits' sharding, and
XLA inserts the cross-device max and sum of the softmax.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kd_jax.config import LossConfig
from kd_jax.losses.soft_targets import SoftTargets, vocabulary_logits

# The automatic chunk keeps one chunk's float32 logits near this many bytes. A chunk's working
# set is about 8 such arrays (the student's and the teacher's logits, their softmaxes, the
# divergence's intermediates, the logits' gradient: measured from the compiled step), ~0.5 GB.
CHUNK_BYTES = 64 * 1024**2
# On a CPU the chunk is smaller, and used whatever the batch: a chunk's passes over its logits
# then run from the caches rather than from memory. 16 MiB (512 tokens at a vocabulary of 8,192)
# was the fastest of 4 to 64 MiB in benchmarks/vs_pytorch.py's steps on a 2-core CPU with 32 MiB
# of L3 cache.
CPU_CHUNK_BYTES = 16 * 1024**2


def chunk_positions(chunk_tokens: int, batch: int, seq: int, vocab: int,
                    platform: str | None = None) -> int:
    """Positions per chunk for `loss.chunk_tokens` (tokens per chunk over the batch's rows);
    0 means one chunk, the unchunked path. `chunk_tokens` 0 chooses: on an accelerator,
    unchunked while the whole batch's float32 logits fit in CHUNK_BYTES, else chunks of about
    CHUNK_BYTES; on a CPU (`platform`, by default JAX's), chunks of about CPU_CHUNK_BYTES.
    -1: never."""
    if chunk_tokens < 0:
        return 0
    if chunk_tokens == 0:
        platform = platform or jax.default_backend()
        budget = CPU_CHUNK_BYTES if platform == "cpu" else CHUNK_BYTES
        if batch * seq * vocab * 4 <= budget:
            return 0
        chunk_tokens = max(1, budget // (vocab * 4))
    positions = max(1, chunk_tokens // batch)
    return 0 if positions >= seq else positions


def chunked_objective(on_logits: Callable, hidden_btd, head_vd, soft_targets: SoftTargets | None,
                      labels_bt, loss_mask_bt, *, positions: int, config: LossConfig,
                      num_valid_tokens, valid_vocab=None, logits_sharding: Any = None):
    """`on_logits(hidden_btd @ head_vd^T, soft_targets, labels, mask, ...)` (the objective on
    logits), `positions` sequence positions at a time; returns (loss, metric sums) as it does."""
    b, t = labels_bt.shape
    n_chunks = math.ceil(t / positions)
    pad = n_chunks * positions - t

    def to_chunks(x, fill_edge=True):
        """[b, t, ...] -> [n_chunks, b, positions, ...], the tail filled by edge values."""
        if pad:
            tail = jnp.repeat(x[:, -1:], pad, axis=1) if fill_edge else jnp.zeros(
                (b, pad, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([x, tail], axis=1)
        x = x.reshape(b, n_chunks, positions, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def from_chunks(x):
        return jnp.moveaxis(x, 0, 1).reshape(b, n_chunks * positions, *x.shape[3:])[:, :t]

    soft_targets = jax.lax.stop_gradient(soft_targets)  # the teacher is frozen
    # Targets computed from a teacher's hidden states (`Projected`, `CrossVocab`) are cut into
    # chunks by their per-token part, and each chunk's rebuilt around the shared head.
    per_token = soft_targets.per_token() if hasattr(soft_targets, "per_token") else soft_targets
    chunks = {
        "hidden": to_chunks(hidden_btd),
        "targets": jax.tree.map(to_chunks, per_token),
        "labels": to_chunks(labels_bt),
        "mask": to_chunks(loss_mask_bt, fill_edge=False),
    }

    def chunk_loss(logits_bcv, targets_c, labels_c, mask_c):
        if logits_sharding is not None:
            logits_bcv = jax.lax.with_sharding_constraint(logits_bcv, logits_sharding)
        if hasattr(soft_targets, "with_per_token"):
            targets_c = soft_targets.with_per_token(targets_c)
        return on_logits(logits_bcv, targets_c, labels_c, mask_c, config=config,
                         num_valid_tokens=num_valid_tokens, valid_vocab=valid_vocab)

    def forward_and_gradients(head_vd, chunks):
        def body(carry, chunk):
            grad_head_dv, metrics = carry
            hidden_bcd = chunk["hidden"]
            loss_c, vjp_fn, metrics_c = jax.vjp(
                lambda logits: chunk_loss(logits, chunk["targets"], chunk["labels"],
                                          chunk["mask"]),
                vocabulary_logits(hidden_bcd, head_vd), has_aux=True)
            (grad_logits_bcv,) = vjp_fn(jnp.ones_like(loss_c))
            # float32 gradients against the weights as stored, as autodiff of the projection
            # would have it
            grad_hidden_bcd = jnp.einsum("bcv,vd->bcd", grad_logits_bcv,
                                         head_vd.astype(hidden_bcd.dtype),
                                         preferred_element_type=jnp.float32
                                         ).astype(hidden_bcd.dtype)
            # The head's gradient is accumulated transposed, [d, vocab]: its matmul then reads
            # the chunk's [tokens, vocab] gradient as it lies, and only the small hidden states
            # are transposed (XLA:CPU's matmuls copy a transposed operand first, and a
            # [tokens, vocab] copy costs as much as the matmul). One [d, vocab] transpose at the
            # end puts it back.
            grad_head_dv = grad_head_dv + jnp.einsum(
                "bcd,bcv->dv", hidden_bcd, grad_logits_bcv, preferred_element_type=jnp.float32)
            metrics = jax.tree.map(jnp.add, metrics, metrics_c)
            return (grad_head_dv, metrics), (loss_c, grad_hidden_bcd)

        def logits_shape(hidden_bcd):
            return jax.ShapeDtypeStruct((*hidden_bcd.shape[:-1], head_vd.shape[0]), jnp.float32)

        metrics_shape = jax.eval_shape(
            lambda logits: chunk_loss(logits, jax.tree.map(lambda x: x[0], chunks["targets"]),
                                      chunks["labels"][0], chunks["mask"][0])[1],
            logits_shape(chunks["hidden"][0]))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
        init = (jnp.zeros(head_vd.shape[::-1], jnp.float32), zeros)
        (grad_head_dv, metrics), (losses, grad_hidden) = jax.lax.scan(body, init, chunks)
        return jnp.sum(losses), metrics, from_chunks(grad_hidden), grad_head_dv.T

    @jax.custom_vjp
    def fused(hidden_btd, head_vd):
        loss, metrics, _, _ = forward_and_gradients(head_vd, dict(chunks, hidden=to_chunks(
            hidden_btd)))
        return loss, metrics

    def fused_fwd(hidden_btd, head_vd):
        loss, metrics, grad_hidden, grad_head = forward_and_gradients(
            head_vd, dict(chunks, hidden=to_chunks(hidden_btd)))
        return (loss, metrics), (grad_hidden, grad_head.astype(head_vd.dtype))

    def fused_bwd(saved, cotangents):
        grad_hidden, grad_head = saved
        scale = cotangents[0]  # the metrics are never differentiated
        return ((scale * grad_hidden).astype(grad_hidden.dtype),
                (scale * grad_head).astype(grad_head.dtype))

    fused.defvjp(fused_fwd, fused_bwd)
    return fused(hidden_btd, head_vd)

