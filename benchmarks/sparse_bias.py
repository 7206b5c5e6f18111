"""Bias and noise of the sparse (offline) distillation targets against the full forward KL.

    python benchmarks/sparse_bias.py [--tokens 256] [--repeats 16] [--vocab 4096]

No trained teacher is needed: the teacher is synthetic but shaped like a language model's
next-token distribution, Zipf-like over the vocabulary (logit = -log(rank) / tau, ranks randomly
permuted per token) with a per-token random sharpness tau, so some tokens are near-certain and
others flat. The student is the teacher with its logits rescaled and perturbed by noise.

For each token it reports, against the exact KL(p || q) (T = 1):
* top-k, k in {1, 4, 16, 64}: the mean bucketed KL (k ids + one tail bucket; deterministic),
  its relative bias (always <= 0 by the data-processing inequality), the mean teacher mass the
  k ids cover, and the cosine between the bucketed and the full gradient w.r.t. the student;
* sampled, n in {1, 4, 12, 32} draws: the mean estimate over `repeats` independent draws per
  token, its bias with a standard error (should be ~0), the standard deviation of a single
  token's estimate, and the cosine between one draw's gradient and the full gradient.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import divergences
from kd_jax.losses.soft_targets import sampled_kl_bt, topk_divergence_bt
from kd_jax.teacher.sparse import row_keys, sample_targets, topk_targets

TOPK = (1, 4, 16, 64)
SAMPLES = (1, 4, 12, 32)


def synthetic_pair(tokens: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(student, teacher) logits [1, tokens, vocab], float32."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((tokens, vocab)), axis=-1) + 1  # a random permutation per token
    sharpness = np.exp(rng.uniform(np.log(0.3), np.log(1.5), size=(tokens, 1)))  # tau
    teacher = -np.log(ranks) / sharpness + 0.3 * rng.standard_normal((tokens, vocab))
    student = (teacher * rng.uniform(0.7, 1.3, size=(tokens, 1))
               + 1.0 * rng.standard_normal((tokens, vocab)))
    return student[None].astype(np.float32), teacher[None].astype(np.float32)


def cosine_bt(a_btv, b_btv):
    dot = jnp.sum(a_btv * b_btv, axis=-1)
    return dot / (jnp.linalg.norm(a_btv, axis=-1) * jnp.linalg.norm(b_btv, axis=-1))


def value_and_grad_bt(divergence_bt, student_btv):
    """Per-token values and per-token gradients (tokens are independent)."""
    values_bt = divergence_bt(student_btv)
    grads_btv = jax.grad(lambda s: jnp.sum(divergence_bt(s)))(student_btv)
    return values_bt, grads_btv


@jax.jit
def full_kl(student_btv, teacher_btv):
    return value_and_grad_bt(
        lambda s: divergences.divergence_bt("forward_kl", s, teacher_btv, temperature=1.0),
        student_btv)


@functools.partial(jax.jit, static_argnums=2)
def topk_kl(student_btv, teacher_btv, k, full_grad_btv):
    cached = topk_targets(teacher_btv, k, temperature=1.0, valid_vocab=None)
    values_bt, grads_btv = value_and_grad_bt(
        lambda s: topk_divergence_bt("forward_kl", s, cached["ids"], cached["logprobs"],
                                     cached["tail"], temperature=1.0), student_btv)
    covered_bt = -jnp.expm1(cached["tail"])  # 1 - tail mass
    return values_bt, covered_bt, cosine_bt(grads_btv, full_grad_btv)


@functools.partial(jax.jit, static_argnums=2)
def sampled_kl(student_rtv, teacher_rtv, n, row_indices_r, full_grad_btv):
    """One row per repeat of the same tokens; each row draws its own samples."""
    cached = sample_targets(teacher_rtv, row_keys(0, row_indices_r), n, temperature=1.0,
                            valid_vocab=None)
    values_rt, grads_rtv = value_and_grad_bt(
        lambda s: sampled_kl_bt(s, cached["ids"], cached["counts"], cached["entropy"],
                                temperature=1.0), student_rtv)
    return values_rt, cosine_bt(grads_rtv, full_grad_btv)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=16, help="independent draws per token")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=8, help="repeats per compiled call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()

    student, teacher = synthetic_pair(args.tokens, args.vocab, args.seed)
    exact_bt, full_grad_btv = full_kl(student, teacher)
    exact = np.asarray(exact_bt, np.float64)
    p = jax.nn.softmax(teacher)
    entropy = float(-jnp.mean(jnp.sum(p * jnp.log(p), -1)))
    print(f"{jax.default_backend()}, {args.tokens} tokens, vocab {args.vocab}, T = 1: teacher "
          f"entropy {entropy:.2f} nats, top-1 mass {float(jnp.mean(p.max(-1))):.2f}; "
          f"exact forward KL {exact.mean():.4f} nats/token")

    print(f"\n{'top-k':>6} {'mean KL':>9} {'rel. bias':>10} {'mass in k':>10} {'grad cos':>9}")
    for k in TOPK:
        values, covered, cosine = topk_kl(student, teacher, k, full_grad_btv)
        mean = float(np.mean(np.asarray(values, np.float64)))
        print(f"{k:>6} {mean:>9.4f} {mean / exact.mean() - 1:>+10.1%} "
              f"{float(jnp.mean(covered)):>10.3f} {float(jnp.mean(cosine)):>9.3f}")

    print(f"\n{'n':>6} {'mean KL':>9} {'rel. bias':>10} {'+- s.e.':>8} {'sd/token':>9} "
          f"{'grad cos':>9}")
    students = np.broadcast_to(student, (args.chunk,) + student.shape[1:])
    teachers = np.broadcast_to(teacher, (args.chunk,) + teacher.shape[1:])
    for n in SAMPLES:
        chunks = [sampled_kl(students, teachers, n, np.arange(first, first + args.chunk),
                             full_grad_btv)
                  for first in range(0, args.repeats, args.chunk)]
        values_rt = np.concatenate([np.asarray(v, np.float64) for v, _ in chunks])
        cosine = np.mean([np.asarray(c).mean() for _, c in chunks])
        errors_rt = values_rt - exact[0]
        bias = errors_rt.mean()
        standard_error = errors_rt.std(ddof=1) / np.sqrt(errors_rt.size)
        sd_per_token = np.sqrt(np.mean(values_rt.var(axis=0, ddof=1)))
        print(f"{n:>6} {values_rt.mean():>9.4f} {bias / exact.mean():>+10.1%} "
              f"{standard_error / exact.mean():>8.1%} {sd_per_token:>9.3f} {cosine:>9.3f}")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
