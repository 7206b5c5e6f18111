"""Tokens generated per second: the key/value cache against recomputing the whole sequence.

    python benchmarks/generate_speed.py [--quick] [--repeats R]

The model is the throughput benchmark's student (`benchmarks/throughput.py` `Workload`: d 256,
4 layers, 4 heads, vocabulary 8,192; float32), with random weights. Each row of a batch has a
64-token prompt and gets 128 new tokens, greedily, two ways:

- cached: `kd_jax.models.generate.make_sampler`, the prompts prefilled once, then one token a
  step against the key/value cache (`jax.lax.while_loop`, one program);
- recompute: each new token from a full forward pass of the model (`PureModel.apply`) over the
  whole sequence so far, padded to the final length so that one program serves every step (a
  `jax.lax.fori_loop`; positions past the sequence are padding, segment 0), projecting only
  the last real position onto the vocabulary.

Both are compiled first (the compile time is printed apart), their tokens compared, then each is
timed whole (prefill included) as the median of --repeats calls, alternately. tokens/s counts
new tokens. Writes benchmarks/results/generate_speed.json (generate_speed_quick.json with
--quick): the machine, the versions, the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

from kd_jax.config import ModelConfig  # noqa: E402
from kd_jax.models.generate import Sampling, left_pad, make_sampler, row_keys  # noqa: E402
from kd_jax.models.pure import abstract_model, logits_btv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def model_config(quick: bool, max_len: int) -> ModelConfig:
    w = tp.Workload()
    if quick:
        return ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=64, max_seq_len=max_len)
    return ModelConfig(vocab_size=w.vocab, d_model=w.student_d, n_layers=w.student_layers,
                       n_heads=w.student_heads, n_kv_heads=w.student_kv_heads,
                       d_ff=w.student_ff, max_seq_len=max_len)


def random_params(cfg: ModelConfig):
    """Weights of std 0.3 (norm scales 1): peaked distributions, so the two ways' argmaxes are
    not near ties and their tokens can be compared."""
    model, abstract = abstract_model(cfg)
    rng = np.random.default_rng(0)

    def leaf(path, shape_dtype):
        if str(path[-1].key).endswith("norm"):
            return np.ones(shape_dtype.shape, np.float32)
        return 0.3 * rng.standard_normal(shape_dtype.shape).astype(np.float32)

    return model, jax.device_put(jax.tree_util.tree_map_with_path(leaf, abstract))


def recompute_generator(model, new_tokens: int):
    """`generate(params, prompt_bp) -> new tokens [b, new_tokens]`: a full forward pass per
    token over a fixed-length sequence."""

    def generate(params, prompt_bp):
        batch, width = prompt_bp.shape
        total = width + new_tokens
        tokens_bt = jnp.zeros((batch, total), jnp.int32).at[:, :width].set(prompt_bp)
        positions_bt = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))

        def step(i, tokens_bt):
            length = width + i  # tokens so far; the rest is padding
            segment_ids_bt = jnp.broadcast_to(jnp.arange(total) < length, (batch, total))
            outputs = model.apply(params, {"tokens": tokens_bt, "positions": positions_bt,
                                           "segment_ids": segment_ids_bt.astype(jnp.int32)})
            last_b1d = jax.lax.dynamic_slice_in_dim(outputs.hidden_btd, length - 1, 1, axis=1)
            token_b = jnp.argmax(logits_btv(last_b1d, outputs.head_vd)[:, 0], axis=-1)
            return jax.lax.dynamic_update_slice(tokens_bt, token_b[:, None].astype(jnp.int32),
                                                (0, length))

        return jax.lax.fori_loop(0, new_tokens, step, tokens_bt)[:, width:]

    return jax.jit(generate)


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - started)
    return seconds


def run_batch(model, params, cfg, batch: int, prompt_len: int, new_tokens: int,
              repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    tokens, lengths = left_pad(list(prompts))
    sampler = make_sampler(cfg, new_tokens)
    keys, stop = row_keys(0, np.arange(batch)), np.array([-1], np.int32)
    recompute = recompute_generator(model, new_tokens)

    def cached():
        return sampler(params, tokens, lengths, keys, Sampling(), stop).tokens_bn

    def full():
        return recompute(params, prompts)

    compile_seconds, first_tokens = {}, {}
    for name, fn in (("cached", cached), ("recompute", full)):
        started = time.perf_counter()
        first_tokens[name] = np.asarray(fn())
        compile_seconds[name] = time.perf_counter() - started
    agree = float(np.mean(first_tokens["cached"] == first_tokens["recompute"]))
    times = {"cached": [], "recompute": []}
    for _ in range(repeats):  # alternately, so a burst of load hits both
        times["cached"] += timed(cached, 1)
        times["recompute"] += timed(full, 1)
    median = {name: float(np.median(values)) for name, values in times.items()}
    generated = batch * new_tokens
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "tokens_agree": agree,
            "cached_seconds": median["cached"], "recompute_seconds": median["recompute"],
            "cached_tokens_per_second": generated / median["cached"],
            "recompute_tokens_per_second": generated / median["recompute"],
            "speedup": median["recompute"] / median["cached"],
            "first_call_seconds": compile_seconds, "all_seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check the script")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompt_len, new_tokens = (8, 8) if args.quick else (64, 128)
    batches = (1, 4) if args.quick else (1, 32)
    cfg = model_config(args.quick, prompt_len + new_tokens)
    model, params = random_params(cfg)
    load = os.getloadavg()[0]
    print(f"{jax.devices()[0].platform}, jax {jax.__version__}; d {cfg.d_model}, "
          f"{cfg.n_layers} layers, vocabulary {cfg.vocab_size}; {prompt_len}-token prompts, "
          f"{new_tokens} new tokens, greedy; load average {load:.2f}")
    rows = [run_batch(model, params, cfg, batch, prompt_len, new_tokens, args.repeats)
            for batch in batches]
    print(f"{'batch':>5} | {'cached tok/s':>12} {'recompute tok/s':>15} {'speed-up':>8} | "
          f"{'tokens agree':>12} | {'first call, cached / recompute':>30}")
    for row in rows:
        first = row["first_call_seconds"]
        print(f"{row['batch']:>5} | {row['cached_tokens_per_second']:>12,.0f} "
              f"{row['recompute_tokens_per_second']:>15,.0f} {row['speedup']:>7.1f}x | "
              f"{row['tokens_agree']:>12.0%} | "
              f"{first['cached']:>13.1f} s / {first['recompute']:.1f} s")
    report = {"quick": args.quick, "machine": tp.machine_info(), "versions": tp.versions(),
              "load_average": list(os.getloadavg()), "load_average_at_start": load,
              "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers,
                        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                        "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size, "dtype": cfg.dtype},
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("generate_speed_quick.json" if args.quick else "generate_speed.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
