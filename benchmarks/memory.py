"""The distillation loss's memory and time: the fused, chunked head against the alternatives.

    python benchmarks/memory.py [--quick]

The loss of one microbatch, from the student's final hidden states and head and an online
teacher's (`Projected`), with its gradients for the student's hidden states and head: the part
of the step whose size grows with the vocabulary. Four ways, compiled for the same shapes:

    unchunked     the whole batch's logits at once (the reference path, `loss.chunk_tokens=-1`)
    remat         the same under `jax.checkpoint`: logits recomputed in the backward pass
    scan+remat    chunks scanned, each under `jax.checkpoint` (the head matmul redone backward)
    chunked       kd_jax's fused path: chunks scanned, gradients taken in the forward pass
                  (`kd_jax.losses.chunked`, a custom_vjp; nothing redone)

1. Compile only (nothing allocated), one device: XLA's temporary bytes, for vocabularies 32,000
   and 128,256, student hidden 2,048 and 4,096 (the teacher's 4,096), 8,192 tokens (4 x 2,048),
   forward KL at T = 2 plus 0.5 cross-entropy, float32.
2. Time, where it fits on this machine: medians of --repeats calls, alternating, at vocabulary
   32,000, hidden 512, 4 x 512 tokens; every path's loss and gradients are first checked equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_jax.config import LossConfig  # noqa: E402
from kd_jax.losses.objective import objective, objective_on_logits  # noqa: E402
from kd_jax.losses.soft_targets import Projected  # noqa: E402
from kd_jax.models.pure import ModelOutputs  # noqa: E402

LOSS = LossConfig(divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.5)
TEACHER_D = 4096


def loss_fn(way: str, chunk_tokens: int):
    """(hidden, head, teacher hidden, teacher head, labels, mask) -> loss, by `way`."""
    def fused(hidden, head, t_hidden, t_head, labels, mask, cfg):
        return objective(ModelOutputs(hidden, head), Projected(t_hidden, t_head), labels, mask,
                         config=cfg, num_valid_tokens=mask.sum())[0]

    if way == "unchunked":
        return lambda *a: fused(*a, dataclasses.replace(LOSS, chunk_tokens=-1))
    if way == "chunked":
        return lambda *a: fused(*a, dataclasses.replace(LOSS, chunk_tokens=chunk_tokens))
    if way == "remat":
        return jax.checkpoint(lambda *a: fused(*a, dataclasses.replace(LOSS, chunk_tokens=-1)))

    def scan_remat(hidden, head, t_hidden, t_head, labels, mask):  # way == "scan+remat"
        b, t = labels.shape
        positions = max(1, chunk_tokens // b)
        n = t // positions

        def split(x):
            return jnp.moveaxis(x.reshape(b, n, positions, *x.shape[2:]), 1, 0)

        @jax.checkpoint
        def chunk(carry, xs):
            h, th, lab, m = xs
            logits = jnp.einsum("bcd,vd->bcv", h, head, preferred_element_type=jnp.float32)
            loss, _ = objective_on_logits(
                logits, Projected(th, t_head).dense(), lab, m, config=LOSS,
                num_valid_tokens=mask.sum())
            return carry + loss, None

        total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32),
                                tuple(map(split, (hidden, t_hidden, labels, mask))))
        return total

    return scan_remat


WAYS = ("unchunked", "remat", "scan+remat", "chunked")


def inputs(vocab, d, batch, seq, concrete=False):
    shapes = [((batch, seq, d), jnp.float32), ((vocab, d), jnp.float32),
              ((batch, seq, TEACHER_D if not concrete else d), jnp.float32),
              ((vocab, TEACHER_D if not concrete else d), jnp.float32),
              ((batch, seq), jnp.int32), ((batch, seq), jnp.int32)]
    if not concrete:
        return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    rng = np.random.default_rng(0)
    arrays = [(0.5 * rng.normal(size=shape)).astype(np.float32) for shape, _ in shapes[:4]]
    return arrays + [rng.integers(0, vocab, (batch, seq)).astype(np.int32),
                     np.ones((batch, seq), np.int32)]


def compiled(way, chunk_tokens, args):
    grad = jax.jit(jax.value_and_grad(loss_fn(way, chunk_tokens), argnums=(0, 1)))
    return grad, grad.lower(*args).compile()


def memory_table(sizes, chunk_tokens):
    print(f"compiled temporaries per device, MiB (loss and its gradients; "
          f"{sizes[0][2]} x {sizes[0][3]} tokens, chunks of {chunk_tokens} tokens)")
    print(f"{'vocab':>8s} {'hidden':>6s} " + " ".join(f"{way:>11s}" for way in WAYS)
          + f" {'chunked/unchunked':>18s}")
    for vocab, d, batch, seq in sizes:
        args = inputs(vocab, d, batch, seq)
        temps = {way: compiled(way, chunk_tokens, args)[1].memory_analysis().temp_size_in_bytes
                 for way in WAYS}
        print(f"{vocab:8d} {d:6d} " + " ".join(f"{temps[w] / 2**20:11.0f}" for w in WAYS)
              + f" {temps['chunked'] / temps['unchunked']:18.3f}")


def time_table(vocab, d, batch, seq, chunk_tokens, repeats):
    args = inputs(vocab, d, batch, seq, concrete=True)
    fns = {way: compiled(way, chunk_tokens, args)[0] for way in WAYS}
    reference = fns["unchunked"](*args)
    for way, fn in fns.items():
        value, grads = fn(*args)
        np.testing.assert_allclose(value, reference[0], rtol=1e-5, err_msg=way)
        for got, want in zip(grads, reference[1]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                       err_msg=way)
    times = {way: [] for way in WAYS}
    for _ in range(repeats):
        for way, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[way].append(time.perf_counter() - start)
    base = np.median(times["unchunked"])
    print(f"\nseconds per loss + gradients, vocab {vocab}, hidden {d}, {batch} x {seq} tokens, "
          f"chunks of {chunk_tokens} tokens, {jax.devices()[0].platform}")
    for way in WAYS:
        median = np.median(times[way])
        print(f"{way:>11s} {median:8.3f} s   x unchunked speed {base / median:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        memory_table([(32000, 512, 2, 1024), (128256, 512, 2, 1024)], 256)
        time_table(8192, 256, 2, 256, 128, 3)
        return
    memory_table([(vocab, d, 4, 2048) for vocab in (32000, 128256) for d in (2048, 4096)], 512)
    time_table(32000, 512, 4, 512, 512, args.repeats)


if __name__ == "__main__":
    main()
