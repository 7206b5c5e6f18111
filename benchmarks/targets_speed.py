"""The cost of computing cache targets at large vocabularies: kd_jax's against the direct way.

    python benchmarks/targets_speed.py

For each vocabulary, on random logits (the cost does not depend on their values):

- top-k: `kd_jax.teacher.sparse.top_k` (blocked, exact) against one `jax.lax.top_k` over the
  vocabulary, and `sparse.topk_targets` whole against the direct recipe (log_softmax,
  `lax.top_k`, the tail's log-sum-exp over a scattered copy);
- sample: the two-level inverse CDF against one cumulative sum over the vocabulary, and
  `sparse.sample_targets` whole.

Both sides of each ratio are timed in the same run, alternately (median of --repeats calls), and
their outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.teacher import sparse


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls of the jitted `fn` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def direct_topk_targets(logits_btv, k):
    log_p = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    logprobs, ids = jax.lax.top_k(log_p, k)
    rest = jnp.put_along_axis(log_p, ids, -jnp.inf, axis=-1, inplace=False)
    return {"ids": ids, "logprobs": logprobs, "tail": jax.nn.logsumexp(rest, axis=-1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    k, n = args.k, args.draws
    print(f"{jax.devices()[0].platform}, jax {jax.__version__}; k = {k}, n = {n}; "
          "ms a call, and the direct way's time over kd_jax's")
    print(f"{'vocab':>7} {'tokens':>6} | {'lax.top_k':>9} {'top_k':>7} {'x':>5} | "
          f"{'direct':>7} {'topk_tg':>7} {'x':>5} | {'1-level':>7} {'2-level':>7} {'x':>5} | "
          f"{'sample_tg':>9}")
    for vocab, tokens in ((256, 8192), (32768, 1024), (50257, 512), (131072, 256)):
        logits = 3.0 * jax.random.normal(jax.random.key(vocab), (1, tokens, vocab))

        lax_top_k = jax.jit(lambda x: jax.lax.top_k(x, k))
        blocked = jax.jit(lambda x: sparse.top_k(x, k))
        direct = jax.jit(lambda x: direct_topk_targets(x, k))
        ours = jax.jit(lambda x: sparse.topk_targets(x, k, temperature=1.0, valid_vocab=None))
        assert np.array_equal(lax_top_k(logits)[1], blocked(logits)[1])
        assert np.array_equal(direct(logits)["ids"], ours(logits)["ids"])

        quanta = jnp.round(jnp.exp(jax.nn.log_softmax(logits)) * 2**30).astype(jnp.int32)
        total = jnp.sum(quanta, axis=-1, keepdims=True)
        uniforms = jax.random.randint(jax.random.key(1), (1, tokens, n), 0, total)
        one_level = jax.jit(lambda q, u: sparse._inverse_cdf_btn(q, u, block=q.shape[-1]))
        two_level = jax.jit(sparse._inverse_cdf_btn)
        assert np.array_equal(one_level(quanta, uniforms), two_level(quanta, uniforms))
        keys = sparse.row_keys(0, jnp.arange(1))
        sample = jax.jit(lambda x, key: sparse.sample_targets(x, key, n, temperature=1.0,
                                                               valid_vocab=None))

        ms = {}
        for name, fn, fn_args in (("lax", lax_top_k, (logits,)), ("blocked", blocked, (logits,)),
                                  ("direct", direct, (logits,)), ("ours", ours, (logits,)),
                                  ("one", one_level, (quanta, uniforms)),
                                  ("two", two_level, (quanta, uniforms)),
                                  ("sample", sample, (logits, keys))):
            ms[name] = 1e3 * timed(fn, *fn_args, repeats=args.repeats)
        print(f"{vocab:>7} {tokens:>6} | {ms['lax']:>9.1f} {ms['blocked']:>7.1f} "
              f"{ms['lax'] / ms['blocked']:>5.2f} | {ms['direct']:>7.1f} {ms['ours']:>7.1f} "
              f"{ms['direct'] / ms['ours']:>5.2f} | {ms['one']:>7.1f} {ms['two']:>7.1f} "
              f"{ms['one'] / ms['two']:>5.2f} | {ms['sample']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
