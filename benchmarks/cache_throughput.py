"""Offline distillation speed: building a cache, reading it, and the step that trains from it.

    python benchmarks/cache_throughput.py --out runs/cache_throughput

The demo's models (teacher d128 x 4 layers, student d48 x 2 layers, byte vocabulary) and batch
(64 x 128 tokens), on the first --documents files of the standard library. Each figure is a ratio
against a baseline measured in the same run:

- precompute: `kd-jax precompute` end to end (host batches in, targets back to the host, packed
  and written on a thread), per mode, against the jitted teacher forward pass alone on
  device-resident batches (goal: >= 0.9x), for the demo's teacher and for a larger one
  (d256 x 8 layers, 6.4M parameters; --larger-documents 0 skips it);
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

from kd_jax import demo
from kd_jax.config import CacheConfig
from kd_jax.data.batches import Batches
from kd_jax.models.pure import init_model
from kd_jax.teacher.cached import open_cache
from kd_jax.teacher.loading import load_teacher
from kd_jax.train import loop
from kd_jax.train import step as step_lib
from kd_jax.train.builder import load_data
from kd_jax.train.precompute import precompute

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


# A wider, deeper teacher than the demo's: the same precompute, with more forward pass per token.
# 8 x (attention 2*256*256 + 2*256*128, MLP 3*256*768) + 2 x 256*256 = 6.4M parameters.
LARGER_TEACHER = {"d_model": 256, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "d_ff": 768}


def precompute_table(out: Path, recipe: dict, teacher_model: dict, documents: int, steps: int,
                     label: str) -> tuple[dict, dict, dict]:
    """Train a teacher for one step, then time its forward pass alone and each mode's precompute.

    Returns the caches' configs by mode, the data, and the student's base config.
    """
    teacher_cfg = recipe["teacher"]
    teacher_cfg.model = dataclasses.replace(teacher_cfg.model, **teacher_model)
    teacher_cfg.train = dataclasses.replace(teacher_cfg.train, steps=1, progress=False,
                                            run_dir=str(out / "teacher"))
    loop.run(teacher_cfg, "train")

    base = recipe["distilled"]
    base.data.max_documents = documents
    base.train = dataclasses.replace(base.train, progress=False)
    base.teacher = dataclasses.replace(base.teacher, path=str(out / "teacher"))
    run_data = load_data(base)
    batch_rows, seq_len = base.train.batch_size, base.data.seq_len
    tokens_per_step = batch_rows * seq_len
    model = teacher_cfg.model
    print(f"\n{label}: teacher d{model.d_model} x {model.n_layers} layers, "
          f"{run_data.train.n_rows} rows x {seq_len} tokens "
          f"({-(-run_data.train.n_rows // batch_rows)} batches of {batch_rows})")

    # The teacher forward pass alone, on device-resident batches: what precompute cannot beat.
    # It is timed before each mode and after the last, and each mode is compared with the mean
    # of the two timings around it: the machine's speed drifts by more than the effect.
    loaded = load_teacher(base, run_data.tokenizer)
    teacher, teacher_params = loaded.model, loaded.params
    forward = jax.jit(teacher.logits)
    batches = Batches(run_data.train, batch_rows, seed=0)
    device_batch = jax.device_put(batches.take(batches.rows(0, np.arange(batch_rows))))

    def forward_rate() -> float:
        return tokens_per_step / timed(
            lambda: forward(teacher_params, device_batch).block_until_ready(), steps)

    print("precompute vs the teacher forward alone: its loop (batches in, targets out and "
          "written), and end to end (with loading data and teacher, and compiling)")
    print(f"{'mode':<8} {'B/token':>8} {'forward tok/s':>13} {'loop tok/s':>10} {'x forward':>9} "
          f"{'e2e tok/s':>10} {'x forward':>9}")
    caches = {}
    before = forward_rate()
    for mode, params in MODES.items():
        cache_dir = out / f"cache_{mode}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = dataclasses.replace(base, cache=CacheConfig(
            dir=str(cache_dir), mode=mode, batch_size=batch_rows, **params))
        started = time.perf_counter()
        summary = precompute(cfg)
        elapsed = time.perf_counter() - started
        after = forward_rate()
        baseline = (before + after) / 2
        rate = run_data.train.n_rows * seq_len / elapsed
        caches[mode] = cfg
        loop_rate = summary["tokens_per_second"]
        print(f"{mode:<8} {summary['bytes_per_token']:>8.2f} {baseline:>13,.0f} "
              f"{loop_rate:>10,.0f} {loop_rate / baseline:>9.2f} {rate:>10,.0f} "
              f"{rate / baseline:>9.2f}", flush=True)
        before = after
    return caches, run_data, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cache_throughput")
    parser.add_argument("--documents", type=int, default=30)
    parser.add_argument("--larger-documents", type=int, default=20,
                        help="files for the larger teacher's precompute (0: skip it)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per step benchmark")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"{jax.devices()[0].platform}, jax {jax.__version__}")
    caches, run_data, base = precompute_table(out / "demo", demo.recipe(out / "demo"), {},
                                              args.documents, args.steps, "demo teacher")
    if args.larger_documents:
        precompute_table(out / "larger", demo.recipe(out / "larger"), LARGER_TEACHER,
                         args.larger_documents, max(5, args.steps // 4), "larger teacher")

    batch_rows, seq_len = base.train.batch_size, base.data.seq_len
    tokens_per_step = batch_rows * seq_len
    batches = Batches(run_data.train, batch_rows, seed=0)

    # The steps: a plain student step, and the student step from each cache.
    student, params = init_model(base.model)
    tx, schedule = step_lib.make_optimizer(base.optimizer, base.train.steps)
    valid_vocab = run_data.tokenizer.vocab_size
    rows = batches.rows(1, np.arange(batch_rows))
    host = batches.take(rows)

    def step_timer(teacher, batch):
        """Compile the step once; the returned call times it (median of --steps steps).

        `teacher` None is the plain hard-label step; a cached teacher reads its targets from
        the batch.
        """
        update = jax.jit(step_lib.make_update(student, teacher, tx, schedule, base.loss, 1,
                                              valid_vocab),
                         donate_argnums=(0,))
        state = [step_lib.init_state(jax.tree.map(np.array, params), tx, 0)]
        batch = jax.device_put(batch)

        def one():
            state[0], metrics = update(state[0], None, batch)
            metrics["loss_sum"].block_until_ready()

        return lambda: timed(one, args.steps)

    # The plain step is timed before each cached one and after the last; each cached step is
    # compared with the mean of the two plain timings around it.
    plain_timer = step_timer(None, host)
    plain_before = plain_timer()
    print("\nsteps (64 x 128 tokens) and cache reads (64 random rows, decoded)")
    print(f"{'step':<8} {'plain s/step':>12} {'s/step':>8} {'tokens/s':>10} {'x plain':>8} "
          f"{'read tok/s':>11} {'read/step':>9}")
    rng = np.random.default_rng(0)
    for mode, cfg in caches.items():
        cached = open_cache(
            dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, source="cache")),
            run_data.tokenizer, run_data.train, None)
        read = timed(lambda cached=cached: cached.host_fields(
            rng.integers(0, run_data.train.n_rows, batch_rows)), args.steps)
        batch = dict(host, **cached.host_fields(rows))
        seconds = step_timer(cached, batch)()
        plain_after = plain_timer()
        plain = (plain_before + plain_after) / 2
        read_rate, step_rate = tokens_per_step / read, tokens_per_step / seconds
        print(f"{mode:<8} {plain:>12.3f} {seconds:>8.3f} {step_rate:>10,.0f} "
              f"{plain / seconds:>8.2f} {read_rate:>11,.0f} {read_rate / step_rate:>9.1f}",
              flush=True)
        cached.close()
        plain_before = plain_after
    print("\nx plain: the plain step's time over this step's (>= 0.9 is the goal); read/step: "
          "reads per step time (>= 10)")


if __name__ == "__main__":
    main()
