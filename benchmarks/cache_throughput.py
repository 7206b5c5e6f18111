"""Offline distillation speed: building a cache, reading it, and the step that trains from it.

    python benchmarks/cache_throughput.py --out runs/cache_throughput

The demo's models (teacher d128 x 4 layers, student d48 x 2 layers, byte vocabulary) and batch
(64 x 128 tokens), on the first --documents files of the standard library. Each figure is a ratio
against a baseline measured in the same run:

- precompute: `kd-jax precompute` end to end (host batches in, targets back to the host, packed
  and written on a thread), per mode, against the jitted teacher forward pass alone on the same
  number of device-resident batches (goal: >= 0.9x);
- cache reads: decoding the targets of 64 random rows, against what the cached distill step
  consumes (goal: >= 10x);
- the cached distill step (student forward/backward with the sparse loss and the update)
  against the plain hard-label student step (goal: >= 0.9x).

The teacher is trained for one step only: speed does not depend on what it has learnt.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from kd_jax import cache as cache_lib
from kd_jax import data as data_lib
from kd_jax import demo, loop, losses, precompute
from kd_jax import step as step_lib
from kd_jax.config import CacheConfig

MODES = {"topk": dict(k=32), "sample": dict(draws=12), "full": {}}


def timed(fn, steps: int) -> float:
    """Seconds a call of `fn` takes (it must block): the median of `steps` calls after a warm-up.

    The median, not the mean: on a shared machine a few calls are slowed by other work.
    """
    fn()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cache_throughput")
    parser.add_argument("--documents", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per step benchmark")
    args = parser.parse_args()
    out = Path(args.out)
    recipe = demo.recipe(out)
    teacher_cfg = recipe["teacher"]
    teacher_cfg.train = dataclasses.replace(teacher_cfg.train, steps=1, progress=False)
    loop.run(teacher_cfg, "train")

    base = recipe["distilled"]
    base.data.max_documents = args.documents
    base.train = dataclasses.replace(base.train, progress=False)
    run_data = loop.prepare_data(base)
    batch_rows, seq_len = base.train.batch_size, base.data.seq_len
    tokens_per_step = batch_rows * seq_len
    n_steps = -(-run_data.train.n_rows // batch_rows)
    print(f"{jax.devices()[0].platform}, {run_data.train.n_rows} rows x {seq_len} tokens "
          f"({n_steps} batches of {batch_rows}), teacher d{teacher_cfg.model.d_model} x "
          f"{teacher_cfg.model.n_layers}, student d{base.model.d_model} x "
          f"{base.model.n_layers}")

    # The teacher forward pass alone, on device-resident batches: what precompute cannot beat.
    teacher, teacher_params, _ = loop.load_teacher(base, run_data.tokenizer)
    forward = jax.jit(teacher.logits)
    batches = data_lib.Batches(run_data.train, batch_rows, seed=0)
    device_batch = jax.device_put(batches.at(0))
    forward_seconds = timed(lambda: forward(teacher_params, device_batch).block_until_ready(),
                            args.steps)
    forward_rate = tokens_per_step / forward_seconds

    print("\nprecompute vs the teacher forward alone: its loop (batches in, targets out and "
          "written), and end to end (with loading data and teacher, and compiling)")
    print(f"{'mode':<14} {'B/token':>8} {'loop tok/s':>10} {'x forward':>9} {'e2e tok/s':>10} "
          f"{'x forward':>9}")
    print(f"{'forward alone':<14} {'':>8} {forward_rate:>10,.0f} {1.0:>9.2f}")
    caches = {}
    for mode, params in MODES.items():
        cache_dir = out / f"cache_{mode}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = dataclasses.replace(base, cache=CacheConfig(
            dir=str(cache_dir), mode=mode, batch_size=batch_rows, **params))
        cfg.teacher = dataclasses.replace(base.teacher, path=str(out / "teacher"))
        started = time.perf_counter()
        summary = precompute.precompute(cfg)
        elapsed = time.perf_counter() - started
        rate = run_data.train.n_rows * seq_len / elapsed
        caches[mode] = cfg
        loop_rate = summary["tokens_per_second"]
        print(f"{mode:<14} {summary['bytes_per_token']:>8.2f} {loop_rate:>10,.0f} "
              f"{loop_rate / forward_rate:>9.2f} {rate:>10,.0f} {rate / forward_rate:>9.2f}")

    # The steps: a plain student step, and the student step from each cache.
    student, params = step_lib.init_model(base.model)
    tx, schedule = step_lib.make_optimizer(base.optimizer, base.train.steps)
    valid_vocab = run_data.tokenizer.vocab_size
    host = batches.at(1)
    rows = batches.rows(1)

    def step_seconds(cache_mode, batch):
        update = jax.jit(step_lib.make_update(student, None, tx, schedule, base.loss, 1,
                                              valid_vocab, cache_mode=cache_mode),
                         donate_argnums=(0,))
        state = [step_lib.init_state(jax.tree.map(np.array, params), tx, 0)]
        batch = jax.device_put(batch)

        def one():
            state[0], metrics = update(state[0], None, batch)
            metrics["loss_sum"].block_until_ready()

        return timed(one, args.steps)

    plain = step_seconds(None, host)
    print("\nsteps (64 x 128 tokens) and cache reads (64 random rows, decoded)")
    print(f"{'step':<14} {'s/step':>8} {'tokens/s':>10} {'x plain':>8} {'read tok/s':>11} "
          f"{'read/step':>9}")
    print(f"{'plain student':<14} {plain:>8.3f} {tokens_per_step / plain:>10,.0f} {1.0:>8.2f}")
    rng = np.random.default_rng(0)
    for mode, cfg in caches.items():
        manifest, hashes = cache_lib.open_for_training(
            dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, source="cache")),
            run_data.tokenizer, run_data.train, None)
        reader = cache_lib.TargetBatches(cfg.cache.dir, hashes)
        read = timed(lambda: reader.read(rng.integers(0, run_data.train.n_rows, batch_rows)),
                     args.steps)
        batch = dict(host, **{losses.TARGET_PREFIX + k: v for k, v in reader.read(rows).items()})
        seconds = step_seconds(mode, batch)
        read_rate, step_rate = tokens_per_step / read, tokens_per_step / seconds
        print(f"{mode:<14} {seconds:>8.3f} {step_rate:>10,.0f} {plain / seconds:>8.2f} "
              f"{read_rate:>11,.0f} {read_rate / step_rate:>9.1f}")
        reader.close()
    print("\nx plain: the plain step's time over this step's (>= 0.9 is the goal); read/step: "
          "reads per step time (>= 10)")


if __name__ == "__main__":
    main()
