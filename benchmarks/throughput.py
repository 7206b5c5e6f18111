"""Tokens a second and model FLOPs utilization (MFU) of the distillation step, four ways.

    python benchmarks/throughput.py [--quick] [--preset cpu|gpu] [--dtype float32|bfloat16]
        [--steps N] [--repeats R] [--teacher-layers N] [--student-layers N] [--json PATH]

On the same models and batch, each step built from kd_jax's own functions as the training loop
builds it (`kd_jax.train.step.make_update`, jitted with the state donated, compiled ahead of
time):

    fused    the online step: teacher forward + student forward/backward + AdamW, one jit
    split    the teacher's forward pass in a jit of its own, its logits handed to a second jit
             that takes the student's step from them (as Tunix's logit strategy does)
    cached   the student's step from top-k targets as a cache stores them (synthetic values;
             reading the cache is not timed: benchmarks/cache_throughput.py measures it)
    student  the student's step on the hard labels alone

Each is compiled once, run for one warm-up step, then timed over `--steps` steps between two
host syncs, `--repeats` times; the median is reported. Tokens/s is the batch's tokens over that.
MFU is the useful FLOPs a second (`useful_flops_per_token`) over the peak of the largest square
matmuls at the step's precision measured in the same run (`measure_peak`); on a known GPU also
over the datasheet peak. Memory is what the compiled executables hold at once (XLA's arguments,
outputs and temporaries, `live_bytes`), and on a GPU run with `--isolate` the device's own peak.

`--isolate` runs each step kind in a process of its own, one after another (a kind that runs
out of memory is a row of the table, not the end of it; the device's peak memory is then that
kind's alone); the parent process touches the device only once they are done, to measure the
peak.

This script imports only jax, flax, optax, numpy, the standard library and kd_jax's core
(config, models, losses, train.step, teacher.online); `benchmarks/vs_pytorch.py` imports the
workload from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_jax.config import LossConfig, ModelConfig, OptimizerConfig  # noqa: E402
from kd_jax.losses.soft_targets import Dense, TopK  # noqa: E402
from kd_jax.models.pure import abstract_model, count_params, init_params  # noqa: E402
from kd_jax.parallel.cpu import keep_cpu_step_memory  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train import step as step_lib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("fused", "split", "cached", "student")
LABELS = {"fused": "fused (online)", "split": "split (2 jits)", "cached": "cached (top-k)",
          "student": "student only"}
WITH_TEACHER = ("fused", "split")  # the kinds that run the teacher's forward pass
# The batch key a cache's targets travel under (kd_jax.teacher.cached.SOFT_TARGETS; that module
# is not imported here: it brings the cache reader and the data pipeline with it).
SOFT_TARGETS = "soft_targets"
# Dense bfloat16 tensor-core peaks from NVIDIA's datasheets, by a substring of device_kind;
# H100 PCIe and NVL are slower parts and fall through to "unknown".
DATASHEET_BF16 = (("H200", 989e12, "H200 SXM, 989 TFLOP/s dense bf16"),
                  ("H100 80GB HBM3", 989e12, "H100 SXM, 989 TFLOP/s dense bf16"))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The sizes of one run: both models, the batch, the loss and the precision.

    In bfloat16 the frozen teacher is held in bfloat16 (as a published checkpoint is) and the
    student keeps float32 parameters and optimizer state, computing in bfloat16.
    """

    teacher_layers: int = 6
    teacher_d: int = 512
    teacher_heads: int = 8
    teacher_kv_heads: int = 8
    teacher_ff: int = 1536
    student_layers: int = 4
    student_d: int = 256
    student_heads: int = 4
    student_kv_heads: int = 4
    student_ff: int = 768
    student_tied: bool = False  # the student's head is its embedding
    vocab: int = 8192
    batch: int = 8
    seq: int = 256
    dtype: str = "float32"
    remat: str = "none"  # the student's model.remat (the frozen teacher keeps nothing)
    attention: str = "auto"  # model.attention of both
    chunk_tokens: int = 0  # loss.chunk_tokens: 0 automatic (chunked at large vocabularies)
    # 0.5 CE + 0.5 T^2 forward KL at T = 2: kd_jax's divergences carry the T^2 themselves
    # (Hinton et al. 2015), so kd_weight is the plain 0.5.
    temperature: float = 2.0
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    topk: int = 32  # the cached step's k (cache.k's default)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


PRESETS = {
    "cpu": Workload(),
    # A Llama-3-8B-shaped teacher (8.03B parameters, 16 GB in bfloat16) and a Llama-3.2-1B-shaped
    # student (1.24B, tied head; 20 GB with its float32 AdamW state and gradients). Chunks of
    # 4,096 tokens keep one chunk's float32 logits at 2 GB (the automatic choice, 64 MB, would
    # scan 128 chunks of 128 tokens). XLA's CPU plan of these shapes (compiled, not run): the
    # fused step 80 GiB, the split step 91 GiB; a GPU's plan differs by tens of percent.
    "gpu": Workload(teacher_layers=32, teacher_d=4096, teacher_heads=32, teacher_kv_heads=8,
                    teacher_ff=14336, student_layers=16, student_d=2048, student_heads=32,
                    student_kv_heads=8, student_ff=8192, student_tied=True, vocab=128256,
                    batch=8, seq=2048, dtype="bfloat16", remat="dots", chunk_tokens=4096),
}


def shrink(workload: Workload) -> Workload:
    """`--quick`: tiny models and batch, the preset's precision and options kept (a preset that
    chunks its loss still does, in two chunks)."""
    return dataclasses.replace(
        workload, teacher_layers=2, teacher_d=64, teacher_heads=4, teacher_kv_heads=2,
        teacher_ff=128, student_layers=2, student_d=32, student_heads=2, student_kv_heads=1,
        student_ff=64, vocab=512, batch=2, seq=32, topk=8,
        chunk_tokens=32 if workload.chunk_tokens else 0)


def build_configs(workload: Workload) -> tuple[ModelConfig, ModelConfig, LossConfig,
                                               OptimizerConfig]:
    """(teacher, student, loss, optimizer) configs of `workload`, kd_jax's own types."""
    w = workload
    teacher = ModelConfig(
        vocab_size=w.vocab, d_model=w.teacher_d, n_layers=w.teacher_layers,
        n_heads=w.teacher_heads, n_kv_heads=w.teacher_kv_heads, d_ff=w.teacher_ff,
        max_seq_len=w.seq, remat="none", attention=w.attention, dtype=w.dtype,
        param_dtype=w.dtype, seed=1)
    student = ModelConfig(
        vocab_size=w.vocab, d_model=w.student_d, n_layers=w.student_layers,
        n_heads=w.student_heads, n_kv_heads=w.student_kv_heads, d_ff=w.student_ff,
        max_seq_len=w.seq, tie_embeddings=w.student_tied, remat=w.remat,
        attention=w.attention, dtype=w.dtype, param_dtype="float32", seed=0)
    loss = LossConfig(divergence="forward_kl", temperature=w.temperature,
                      kd_weight=w.kd_weight, ce_weight=w.ce_weight, chunk_tokens=w.chunk_tokens)
    return teacher, student, loss, OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a model."""

    non_embedding_params: int  # every parameter but the embedding and the output head
    layers: int
    d_model: int
    vocab: int


def model_shape(cfg: ModelConfig, params: Any) -> ModelShape:
    """`cfg`'s shape, its parameters counted from the tree `params` (arrays or shapes)."""
    embeddings = count_params(params["embedding"]) + count_params(params.get("head", {}))
    return ModelShape(count_params(params) - embeddings, cfg.n_layers, cfg.d_model,
                      cfg.vocab_size)


def useful_flops_per_token(seq: int, student: ModelShape,
                           teacher: ModelShape | None = None) -> float:
    """Model FLOPs a token of one step, a multiply-add counted as 2 (Kaplan et al. 2020; PaLM's
    MFU, Chowdhery et al. 2022, appendix B):

        teacher (forward only)     2 N_t + 4 L_t d_t T + 2 d_t V
        student (forward, backward) 6 N_s + 12 L_s d_s T + 6 d_s V

    N the non-embedding parameters (the matmuls of the layers), L layers, d d_model, T the
    sequence (attention's scores and weighted values, causal mask not discounted), V the
    vocabulary (the output head's matmul). Recomputation (remat) is not useful work and is not
    counted, nor is the embedding lookup, the softmaxes or the optimizer.
    """
    flops = (6 * student.non_embedding_params + 12 * student.layers * student.d_model * seq
             + 6 * student.d_model * student.vocab)
    if teacher is not None:
        flops += (2 * teacher.non_embedding_params + 4 * teacher.layers * teacher.d_model * seq
                  + 2 * teacher.d_model * teacher.vocab)
    return float(flops)


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random tokens: one document a row, every position counted."""
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
        "labels": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.int32),
    }


def synthetic_topk(batch: int, seq: int, vocab: int, k: int, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Top-k targets as a cache hands them to the step (decoded: int32 ids, float32 values):
    k distinct ids a token, most probable first, and the log of the mass outside them."""
    rng = np.random.default_rng(seed)
    # Distinct ids without a permutation of the vocabulary per token: one set of k distinct
    # offsets, shifted by a random start per token.
    offsets_k = rng.choice(vocab, k, replace=False)
    ids_btk = (rng.integers(0, vocab, (batch, seq, 1)) + offsets_k) % vocab
    logits_btc = rng.normal(0.0, 2.0, (batch, seq, k + 1))
    logprobs_btc = logits_btc - np.log(np.exp(logits_btc).sum(-1, keepdims=True))
    return {"ids": ids_btk.astype(np.int32),
            "logprobs": -np.sort(-logprobs_btc[..., :k], axis=-1).astype(np.float32),
            "tail": logprobs_btc[..., k].astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class TargetsInBatch:
    """A teacher whose soft targets travel in the batch, as a cache's do (`kd_jax.teacher.cached`
    turns them into the loss's soft targets the same way): the step's `Teacher` protocol."""

    kind: type  # Dense (the split step's logits) or TopK (a cache's)

    def soft_targets(self, params: Any, batch: dict[str, Any]):
        return self.kind(**batch[SOFT_TARGETS])


def measure_peak(dtype: str, sizes: tuple[int, ...], repeats: int = 3,
                 min_seconds: float = 0.2) -> dict[str, Any]:
    """FLOP/s of square matmuls [n, n] @ [n, n] in `dtype`, the best of `repeats` timings of
    enough back-to-back calls to last `min_seconds`; "best" is the largest over the sizes."""
    by_size = {}
    for n in sizes:
        a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype)
                for i in range(2))
        matmul = jax.jit(jnp.matmul).lower(a, b).compile()
        jax.block_until_ready(matmul(a, b))
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        calls = max(1, min(200, int(min_seconds / max(time.perf_counter() - start, 1e-6))))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                out = matmul(a, b)
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - start) / calls)
        by_size[str(n)] = 2 * n**3 / best
        del a, b, out
    return {"dtype": dtype, "by_size": by_size, "best": max(by_size.values())}


def datasheet_peak(device_kind: str, dtype: str) -> tuple[float | None, str]:
    """(FLOP/s, source) of the device's datasheet at `dtype`, or (None, "unknown")."""
    if dtype == "bfloat16":
        for marker, flops, source in DATASHEET_BF16:
            if marker in device_kind:
                return flops, source
    return None, "unknown"


def time_step(step: Callable, state: Any, steps: int, repeats: int,
              sync: Callable = jax.block_until_ready) -> tuple[float, list[float], Any]:
    """(median s/step, each repeat's s/step, the last (state, metrics)) of
    `step(state) -> (state, metrics)`: one warm-up step, then `repeats` times `steps` steps
    between two syncs (dispatch runs ahead of the device, as in the training loop, which
    fetches metrics only to log them). `sync` waits for the device."""
    state, metrics = step(state)
    sync(metrics)
    each = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state)
        sync(metrics)
        each.append((time.perf_counter() - start) / steps)
    return statistics.median(each), each, (state, metrics)


def live_bytes(compiled) -> int | None:
    """What an executable holds at once by XLA's plan: arguments + outputs + temporaries, less
    the outputs written into donated arguments."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def tree_bytes(tree: Any) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def run_kind(kind: str, workload: Workload, steps: int, repeats: int) -> dict[str, Any]:
    """Build, compile and time one step kind; its figures (no MFU: the peak is the caller's).

    "device_peak_bytes" is the GPU's peak for the whole process so far: one kind's own only
    when it runs alone in its process (`--isolate`)."""
    teacher_cfg, student_cfg, loss_cfg, opt_cfg = build_configs(workload)
    student, student_abstract = abstract_model(student_cfg)
    tx, schedule = step_lib.make_optimizer(opt_cfg, steps * repeats + 1)
    shapes = {"student": model_shape(student_cfg, student_abstract)}
    batch = jax.device_put(synthetic_batch(workload.batch, workload.seq, workload.vocab))
    teacher_params = None
    if kind in WITH_TEACHER:
        teacher, teacher_abstract = abstract_model(teacher_cfg)
        shapes["teacher"] = model_shape(teacher_cfg, teacher_abstract)
        # Built inside one jit: no float32 copy of a bfloat16 teacher's weights in memory.
        teacher_params = jax.jit(lambda: init_params(teacher_cfg))()
        online = OnlineTeacher(teacher)
    state = step_lib.init_state_on(student_cfg, tx, 0, None)
    if kind == "fused":
        targets = online
    else:
        targets = {"split": TargetsInBatch(Dense), "cached": TargetsInBatch(TopK)}.get(kind)
    update = jax.jit(step_lib.make_update(student, targets, tx, schedule, loss_cfg, 1,
                                          workload.vocab),
                     donate_argnums=(0,))  # the state's buffers are reused for the next state
    start = time.perf_counter()
    if kind == "split":
        def logits_of(params, batch):
            # In the activation dtype, as a model's forward pass returns its logits.
            return online.soft_targets(params, batch).dense().logits.astype(workload.dtype)

        forward = jax.jit(logits_of).lower(teacher_params, batch).compile()
        logits_shape = jax.eval_shape(logits_of, teacher_params, batch)
        student_step = update.lower(state, None, dict(batch, **{
            SOFT_TARGETS: {"logits": logits_shape}})).compile()

        def step(state):
            logits = forward(teacher_params, batch)
            return student_step(state, None, dict(batch, **{SOFT_TARGETS: {"logits": logits}}))

        # While the teacher runs the student's state is held; while the student steps, the
        # teacher's weights are.
        plan = [live_bytes(forward), live_bytes(student_step)]
        estimate = None if None in plan else max(plan[0] + tree_bytes(state),
                                                 plan[1] + tree_bytes(teacher_params))
    else:
        if kind == "cached":
            batch = dict(batch, **{SOFT_TARGETS: jax.device_put(synthetic_topk(
                workload.batch, workload.seq, workload.vocab, workload.topk))})
        compiled = update.lower(state, teacher_params, batch).compile()
        estimate = live_bytes(compiled)

        def step(state):
            return compiled(state, teacher_params, batch)

    compile_s = time.perf_counter() - start
    seconds, each, (state, metrics) = time_step(step, state, steps, repeats)
    flops = useful_flops_per_token(workload.seq, shapes["student"], shapes.get("teacher"))
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    return {
        "kind": kind, "seconds_per_step": seconds, "seconds_per_step_each": each,
        "tokens_per_second": workload.tokens / seconds, "compile_seconds": compile_s,
        "flops_per_token": flops, "flops_per_second": flops * workload.tokens / seconds,
        "estimated_peak_bytes": estimate,
        "device_peak_bytes": int(stats["peak_bytes_in_use"]) if stats else None,
        "last_loss": float(metrics["loss_sum"] / metrics["tokens"]),
        "params": {name: dataclasses.asdict(shape) for name, shape in shapes.items()},
    }


def failure(err: BaseException) -> str:
    """One line for a step kind that did not run."""
    text = f"{type(err).__name__}: {err}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "out of memory"
    return text.splitlines()[0][:200]


def safe_run_kind(kind: str, workload: Workload, steps: int, repeats: int) -> dict[str, Any]:
    print(f"{kind}: building, compiling and timing", file=sys.stderr, flush=True)
    try:
        return run_kind(kind, workload, steps, repeats)
    except Exception as err:  # one kind's failure (most often memory) is a row of the table
        traceback.print_exc()
        return {"kind": kind, "error": failure(err)}


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count()}


def host_info() -> dict[str, Any]:
    return {"machine": platform.machine(), "system": platform.system(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))}


def versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"python": platform.python_version(), "jax": jax.__version__,
            **{name: version(name) for name in ("jaxlib", "flax", "optax", "numpy")}}


def machine_info() -> dict[str, Any]:
    """The host and its first device (this initializes JAX's backend)."""
    return dict(host_info(), **device_info())


def peak_sizes(platform_name: str, quick: bool) -> tuple[int, ...]:
    if quick:
        return (256, 512)
    return (4096, 8192, 16384) if platform_name == "gpu" else (2048, 4096)


def run_isolated(kind: str, workload: Workload, args: argparse.Namespace,
                 timeout: float | None) -> dict[str, Any]:
    """`safe_run_kind` in a child process; its failure (a crash, a timeout) is reported, not
    raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kind.json"
        command = [sys.executable, __file__, "--child", kind, "--child-json", str(out),
                   "--workload", json.dumps(dataclasses.asdict(workload)),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
        try:
            code = subprocess.run(command, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"kind": kind, "error": f"timed out after {timeout:.0f} s"}
        if out.is_file():
            return json.loads(out.read_text())
        return {"kind": kind, "error": f"the process ended with exit code {code}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps a repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher-layers", type=int)
    parser.add_argument("--student-layers", type=int)
    parser.add_argument("--batch", type=int, help="sequences a step")
    parser.add_argument("--seq", type=int, help="tokens a sequence")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--isolate", action="store_true",
                        help="each step kind in a process of its own")
    parser.add_argument("--budget-s", type=float,
                        help="with --isolate: wall time for all of it; a kind left without "
                             "time is reported as not run")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/throughput*.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown step kinds {unknown}; choose from {', '.join(KINDS)}")
    for name in ("steps", "repeats", "teacher_layers", "student_layers", "batch", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def resolve_workload(args: argparse.Namespace) -> Workload:
    """The preset, shrunk by --quick, then the flags' overrides."""
    if args.workload:
        return Workload(**json.loads(args.workload))
    workload = PRESETS[args.preset]
    if args.quick:
        workload = shrink(workload)
    overrides = {"dtype": args.dtype, "teacher_layers": args.teacher_layers,
                 "student_layers": args.student_layers, "batch": args.batch, "seq": args.seq}
    return dataclasses.replace(workload, **{k: v for k, v in overrides.items() if v is not None})


def default_json(args: argparse.Namespace) -> Path:
    suffix = ("_gpu" if args.preset == "gpu" else "") + ("_quick" if args.quick else "")
    return RESULTS / f"throughput{suffix}.json"


def millions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.3g}M"


def table(report: dict[str, Any]) -> str:
    w, peak = Workload(**report["workload"]), report["peak"]
    results = report["results"]
    params = next((r["params"] for r in results.values() if "teacher" in r.get("params", {})),
                  None)
    sizes = (f"teacher {w.teacher_layers} x {w.teacher_d}, student {w.student_layers} x "
             f"{w.student_d}, vocab {w.vocab}")
    if params:
        sizes += (f" ({millions(params['teacher']['non_embedding_params'])} and "
                  f"{millions(params['student']['non_embedding_params'])} non-embedding)")
    lines = [f"{report['machine'].get('device_kind', '?')} ({report['machine'].get('platform')})"
             f", {w.dtype}; {sizes}; {w.batch} x {w.seq} = {w.tokens} tokens a step, "
             f"{report['steps']} timed steps, median of {report['repeats']}"]
    if "best" in peak:
        lines.append(f"peak: {peak['best'] / 1e12:.4g} TFLOP/s measured ({w.dtype} square "
                     f"matmuls {', '.join(peak['by_size'])}); datasheet: {peak['datasheet']}")
    else:
        lines.append(f"peak: not measured ({peak.get('error')})")
    lines.append(f"{'step':16s} {'s/step':>8s} {'tokens/s':>10s} {'x fused':>7s} "
                 f"{'GFLOP/tok':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'plan MiB':>9s} "
                 f"{'dev. MiB':>9s}")
    fused = results.get("fused", {}).get("seconds_per_step")
    for kind, result in results.items():
        if "error" in result:
            lines.append(f"{LABELS[kind]:16s} did not run: {result['error']}")
            continue
        mib = lambda n: f"{n / 2**20:9,.1f}" if n is not None else f"{'-':>9s}"  # noqa: E731
        ratio = f"{result['seconds_per_step'] / fused:7.2f}" if fused else f"{'-':>7s}"
        mfu = f"{result['mfu']:6.3f}" if result.get("mfu") is not None else f"{'-':>6s}"
        lines.append(
            f"{LABELS[kind]:16s} {result['seconds_per_step']:8.4f} "
            f"{result['tokens_per_second']:10,.0f} {ratio} {result['flops_per_token'] / 1e9:9.4g}"
            f" {result['flops_per_second'] / 1e12:8.4g} {mfu} "
            f"{mib(result['estimated_peak_bytes'])} {mib(result['device_peak_bytes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_cpu_step_memory()  # as `kd-jax` does, before JAX starts
    workload = resolve_workload(args)
    if args.child:
        args.child_json.write_text(json.dumps(safe_run_kind(
            args.child, workload, args.steps, args.repeats)))
        return 0
    started = time.monotonic()
    results = {}
    for kind in args.kinds:
        if not args.isolate:
            results[kind] = safe_run_kind(kind, workload, args.steps, args.repeats)
            if "device_peak_bytes" in results[kind]:  # the process's, not this kind's alone
                results[kind]["device_peak_bytes"] = None
            continue
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        if left is not None and left < 1:
            results[kind] = {"kind": kind, "error": "the time budget was spent"}
            continue
        results[kind] = run_isolated(kind, workload, args, left)
    # Only now does this process touch the device (with --isolate, the kinds' processes are done).
    machine = dict(host_info(), **device_info())
    try:
        peak = measure_peak(workload.dtype, peak_sizes(machine["platform"], args.quick),
                            min_seconds=0.05 if args.quick else 0.2)
    except Exception as err:  # the table is still worth printing
        traceback.print_exc()
        peak = {"error": failure(err)}
    datasheet, source = datasheet_peak(machine["device_kind"], workload.dtype)
    peak.update(datasheet=source, datasheet_flops_per_second=datasheet)
    for result in results.values():
        if "flops_per_second" in result:
            achieved = result["flops_per_second"]
            result["mfu"] = achieved / peak["best"] if "best" in peak else None
            result["mfu_datasheet"] = achieved / datasheet if datasheet else None
    report = {"benchmark": "throughput", "preset": args.preset, "quick": args.quick,
              "isolated": args.isolate, "machine": machine, "versions": versions(),
              "workload": dataclasses.asdict(workload), "tokens_per_step": workload.tokens,
              "steps": args.steps, "repeats": args.repeats, "peak": peak,
              "results": results}
    print(table(report))
    path = args.json or default_json(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    failed = [kind for kind, result in results.items() if "error" in result]
    return 3 if failed or "error" in peak else 0


if __name__ == "__main__":
    sys.exit(main())
