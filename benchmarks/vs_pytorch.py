"""kd_jax's distillation step against the same step written in plain PyTorch, in one run.

    python benchmarks/vs_pytorch.py [--quick] [--steps N] [--repeats R] [--no-compile]
        [--no-torch] [--malloc-default] [--json PATH]

The workload is `benchmarks/throughput.py`'s (by default: teacher 6 x 512, student 4 x 256,
vocabulary 8,192, 8 x 256 tokens, 0.5 CE + 0.5 T^2 forward KL at T = 2, AdamW with global-norm
clipping). Both sides start from the same weights: kd_jax initializes them and the PyTorch models
are given copies, so both report the same loss at step 0 (checked: the run fails otherwise).

The PyTorch step is what one writes by hand: a Llama-style decoder (RMSNorm, rotary embeddings,
`scaled_dot_product_attention`, SwiGLU), the frozen teacher under `no_grad`, the losses with
`log_softmax`, `clip_grad_norm_` and `torch.optim.AdamW` (foreach). It runs in float32 eager,
then with bfloat16 autocast, then (unless `--no-compile`) with its forward and loss under
`torch.compile` (backward through AOTAutograd). kd_jax's step is the training loop's own
(`kd_jax.train.step.make_update`, one jit, state donated), float32. Beside them, the minimal
JAX step of the same maths (`minimal_step.py`: plain functions, no engine), from the same
weights; before anything is timed it must agree with kd_jax's step after 3 steps, in the losses
and in every parameter (the run fails otherwise). Two step kinds each: the fused distillation
step and the student-only hard-label step. `--no-torch` times kd_jax against the minimal step
alone (a machine without PyTorch: `benchmarks/gpu.sh` runs it on the GPU).

On a CPU, the process first keeps each step's memory mapped between steps
(`kd_jax.parallel.cpu.keep_cpu_step_memory`, as `kd-jax` does): it applies to every variant
alike, PyTorch's included; `--malloc-default` leaves glibc's allocator as it is.

Both frameworks get the same threads (`torch.set_num_threads` to the CPUs this process may
use; XLA:CPU uses them all). The variants are timed in turn within each repeat, so that the
machine's drift falls on all of them alike; each figure is the median over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minimal_step as minimal  # noqa: E402
import throughput as tp  # noqa: E402

from kd_jax.models.pure import abstract_model, init_params  # noqa: E402
from kd_jax.models.transformer import NOT_DECAYED  # noqa: E402
from kd_jax.parallel.cpu import keep_cpu_step_memory  # noqa: E402
from kd_jax.teacher.online import OnlineTeacher  # noqa: E402
from kd_jax.train import step as step_lib  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The PyTorch side: the same decoder and loss, written as plain PyTorch
# ---------------------------------------------------------------------------------------------

def torch_weights(params: Any, requires_grad: bool) -> dict[str, Any]:
    """kd_jax's parameter tree as flat PyTorch tensors (copies), layers still stacked."""
    import torch

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        tensor = torch.tensor(np.asarray(leaf, np.float32))
        flat[name] = tensor.requires_grad_(requires_grad)
    return flat


def torch_forward(w: dict[str, Any], cfg, tokens, cos, sin):
    """Logits [b, t, vocab] of the decoder `cfg` with weights `w` (kd_jax's layout)."""
    import torch
    import torch.nn.functional as F

    def rms_norm(x, scale):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
                * scale.float()).to(x.dtype)

    def rotate(x):  # x [b, heads, t, head_dim]; Hugging Face's rotate_half convention
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    b, t = tokens.shape
    n, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_model
    x = w["embedding"][tokens]
    for i in range(cfg.n_layers):
        h = rms_norm(x, w["layers/attn_norm"][i])
        q = (h @ w["layers/wq"][i].reshape(d, n * hd)).view(b, t, n, hd).transpose(1, 2)
        k = (h @ w["layers/wk"][i].reshape(d, kv * hd)).view(b, t, kv, hd).transpose(1, 2)
        v = (h @ w["layers/wv"][i].reshape(d, kv * hd)).view(b, t, kv, hd).transpose(1, 2)
        attended = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True,
                                                  enable_gqa=kv != n)
        x = x + attended.transpose(1, 2).reshape(b, t, n * hd) @ w["layers/wo"][i].reshape(
            n * hd, d)
        h = rms_norm(x, w["layers/mlp_norm"][i])
        x = x + (F.silu(h @ w["layers/w_gate"][i]) * (h @ w["layers/w_up"][i])) @ w[
            "layers/w_down"][i]
    head = w["embedding"] if cfg.tie_embeddings else w["head"]
    return rms_norm(x, w["final_norm"]) @ head.T


def torch_rotary(cfg, seq: int):
    """cos and sin [1, 1, t, head_dim] of positions 0..seq-1, as kd_jax computes them."""
    import torch

    from kd_jax.models.transformer import rope_inv_freq

    angles = torch.arange(seq, dtype=torch.float32)[:, None] * torch.tensor(rope_inv_freq(cfg))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[None, None], angles.sin()[None, None]


def torch_loss(student_logits, teacher_logits, labels, workload: tp.Workload):
    """(kd_weight * T^2 KL(p_T || q_T) + ce_weight * CE) summed over tokens / tokens."""
    import torch.nn.functional as F

    s = student_logits.float().flatten(0, 1)
    ce = F.cross_entropy(s, labels.flatten(), reduction="sum")
    if teacher_logits is None:
        return ce / labels.numel()
    temperature = workload.temperature
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    kd = F.kl_div(log_q, log_p, reduction="sum", log_target=True) * temperature**2
    return (workload.kd_weight * kd + workload.ce_weight * ce) / labels.numel()


def torch_step(workload: tp.Workload, teacher_cfg, student_cfg, opt_cfg, teacher_params,
               student_params, batch: dict[str, np.ndarray], mode: str, distill: bool
               ) -> Callable[[], float]:
    """One PyTorch training step as a function returning the step's loss (before the update).

    `mode`: "eager" (float32), "bf16" (bfloat16 autocast) or "compile" (torch.compile)."""
    import torch

    student = torch_weights(student_params, requires_grad=True)
    teacher = torch_weights(teacher_params, requires_grad=False) if distill else None
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    student_rotary = torch_rotary(student_cfg, workload.seq)
    teacher_rotary = torch_rotary(teacher_cfg, workload.seq)

    def loss_of(student_w, teacher_w):
        teacher_logits = None
        if teacher_w is not None:
            with torch.no_grad():
                teacher_logits = torch_forward(teacher_w, teacher_cfg, tokens, *teacher_rotary)
        logits = torch_forward(student_w, student_cfg, tokens, *student_rotary)
        return torch_loss(logits, teacher_logits, labels, workload)

    if mode == "compile":
        loss_of = torch.compile(loss_of)
    # As kd_jax's optimizer: no decay on the norms' scales, global-norm clipping, the same betas
    # and epsilon (the learning rate is constant here; a schedule costs nothing either way).
    decay = [p for name, p in student.items() if name.split("/")[-1] not in NOT_DECAYED]
    no_decay = [p for name, p in student.items() if name.split("/")[-1] in NOT_DECAYED]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt_cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps, foreach=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(student, teacher)
        else:
            loss = loss_of(student, teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(student.values()), opt_cfg.clip_norm)
        optimizer.step()
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------
# The JAX sides: the training loop's step, and the minimal step of the same maths
# ---------------------------------------------------------------------------------------------

class Holder:
    """A step's state between calls (donated each call, replaced by the step's output)."""

    def __init__(self, state: Any):
        self.state = state


def jax_step(workload: tp.Workload, teacher_cfg, student_cfg, loss_cfg, opt_cfg, teacher_params,
             total_steps: int, batch: dict[str, np.ndarray], distill: bool
             ) -> tuple[Callable[[], Any], Any, Holder]:
    """kd_jax's compiled step as a function returning the step's metrics (their loss_sum over
    tokens is the loss before the update), the student's initial parameters, and the holder of
    its state."""
    student, _ = abstract_model(student_cfg)
    tx, schedule = step_lib.make_optimizer(opt_cfg, total_steps)
    teacher = OnlineTeacher(abstract_model(teacher_cfg)[0]) if distill else None
    state = step_lib.init_state_on(student_cfg, tx, 0, None)
    initial_params = jax.device_get(state.params)
    update = jax.jit(step_lib.make_update(student, teacher, tx, schedule, loss_cfg, 1,
                                          workload.vocab), donate_argnums=(0,))
    device_batch = jax.device_put(batch)
    t_params = teacher_params if distill else None
    compiled = update.lower(state, t_params, device_batch).compile()
    holder = Holder(state)

    def step():
        holder.state, metrics = compiled(holder.state, t_params, device_batch)
        return metrics

    return step, initial_params, holder


def minimal_jax_step(workload: tp.Workload, teacher_cfg, student_cfg, opt_cfg, teacher_params,
                     initial_params, total_steps: int, batch: dict[str, np.ndarray],
                     distill: bool) -> tuple[Callable[[], Any], Holder]:
    """The minimal JAX step (`minimal_step.py`) from the student's weights `initial_params`
    (kd_jax's tree), as a function returning the step's loss; and the holder of its (params,
    optimizer state)."""
    tx = minimal.optimizer(lr=opt_cfg.lr, warmup_steps=opt_cfg.warmup_steps,
                           total_steps=total_steps, min_lr_ratio=opt_cfg.min_lr_ratio,
                           b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, clip_norm=opt_cfg.clip_norm)
    update = minimal.make_step(
        tx, student_heads=(student_cfg.n_heads, student_cfg.n_kv_heads),
        teacher_heads=(teacher_cfg.n_heads, teacher_cfg.n_kv_heads),
        temperature=workload.temperature, kd_weight=workload.kd_weight,
        ce_weight=workload.ce_weight)
    params = jax.device_put(minimal.from_kd_jax(initial_params))
    teacher = jax.device_put(minimal.from_kd_jax(teacher_params)) if distill else None
    device_batch = jax.device_put(batch)
    holder = Holder((params, tx.init(params)))
    compiled = update.lower(*holder.state, teacher, device_batch).compile()

    def step():
        params, opt_state, loss = compiled(*holder.state, teacher, device_batch)
        holder.state = (params, opt_state)
        return loss

    return step, holder


def check_minimal_matches(workload: tp.Workload, teacher_cfg, student_cfg, loss_cfg, opt_cfg,
                          teacher_params, batch, distill: bool, steps: int = 3
                          ) -> dict[str, float]:
    """Run kd_jax's step and the minimal step `steps` steps from the same weights; their
    largest differences in loss (relative) and in parameters (absolute, over every weight)."""
    kd_step, initial, kd_holder = jax_step(workload, teacher_cfg, student_cfg, loss_cfg,
                                           opt_cfg, teacher_params, 100, batch, distill)
    min_step, min_holder = minimal_jax_step(workload, teacher_cfg, student_cfg, opt_cfg,
                                            teacher_params, initial, 100, batch, distill)
    loss_gap = 0.0
    for _ in range(steps):
        kd_loss, min_loss = loss_of_metrics(kd_step()), float(min_step())
        loss_gap = max(loss_gap, abs(kd_loss - min_loss) / abs(kd_loss))
    kd_params = jax.device_get(kd_holder.state.params)
    min_params = jax.device_get(minimal.to_kd_jax(min_holder.state[0], kd_params))
    gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), kd_params, min_params)
    return {"loss": loss_gap, "params": max(jax.tree.leaves(gaps))}


def loss_of_metrics(metrics) -> float:
    return float(metrics["loss_sum"] / metrics["tokens"])


def time_variant(step: Callable, steps: int, sync: Callable) -> float:
    """Seconds a step over `steps` steps between two syncs."""
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-torch", action="store_true",
                        help="kd_jax against the minimal JAX step only (no PyTorch needed)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's allocator as it is (kd_jax.parallel.cpu)")
    args = parser.parse_args(argv)
    # Before JAX starts its CPU client; it applies to every variant alike (one process).
    kept_memory = False if args.malloc_default else keep_cpu_step_memory()
    threads = len(os.sched_getaffinity(0))
    if not args.no_torch:
        import torch

        torch.set_num_threads(threads)
    workload = tp.shrink(tp.Workload()) if args.quick else tp.Workload()
    teacher_cfg, student_cfg, loss_cfg, opt_cfg = tp.build_configs(workload)
    batch = tp.synthetic_batch(workload.batch, workload.seq, workload.vocab)
    teacher_params = jax.jit(lambda: init_params(teacher_cfg))()
    total = (args.repeats + 2) * args.steps + 4

    # The peak is measured before and after the steps, and the better taken: a machine's speed
    # drifts, and what another process takes from it only lowers the figure.
    sizes = tp.peak_sizes(jax.devices()[0].platform, args.quick)
    peaks = [tp.measure_peak("float32", sizes)]
    modes = [] if args.no_torch else ["eager", "bf16"] + ([] if args.no_compile else ["compile"])
    variants: dict[str, tuple[Callable, Callable]] = {}
    first_loss: dict[str, float] = {}
    compile_seconds: dict[str, float] = {}
    for kind, distill in (("fused", True), ("student", False)):
        name = f"kd_jax {kind}"
        start = time.perf_counter()
        step, initial, _ = jax_step(workload, teacher_cfg, student_cfg, loss_cfg, opt_cfg,
                                 teacher_params, total, batch, distill)
        first_loss[name] = loss_of_metrics(step())  # step 0: the weights both sides share
        compile_seconds[name] = time.perf_counter() - start
        variants[name] = (step, jax.block_until_ready)
        minimal_name = f"jax minimal {kind}"
        start = time.perf_counter()
        step, _ = minimal_jax_step(workload, teacher_cfg, student_cfg, opt_cfg, teacher_params,
                                   initial, total, batch, distill)
        first_loss[minimal_name] = float(step())
        compile_seconds[minimal_name] = time.perf_counter() - start
        variants[minimal_name] = (step, jax.block_until_ready)
        for mode in modes:
            torch_name = f"torch {mode} {kind}"
            start = time.perf_counter()
            step = torch_step(workload, teacher_cfg, student_cfg, opt_cfg, teacher_params,
                              initial, batch, mode, distill)
            first_loss[torch_name] = step()
            compile_seconds[torch_name] = time.perf_counter() - start
            variants[torch_name] = (step, lambda out: out)

    # The same weights and batch give the same loss at step 0 (bfloat16 within its precision).
    for name, loss in first_loss.items():
        reference = first_loss[f"kd_jax {name.split()[-1]}"]
        tolerance = 2e-2 if "bf16" in name else 1e-4
        if abs(loss - reference) > tolerance * abs(reference):
            print(f"{name}: loss at step 0 is {loss:.6f}, kd_jax's {reference:.6f}",
                  file=sys.stderr)
            return 1

    # The minimal step is the same maths: after 3 steps from the same weights, the same losses
    # and the same parameters, within float32's rounding through AdamW (whose update is
    # normalized, so a gradient's rounding can move a weight by a fraction of the learning
    # rate: the bound is a tenth of what the 3 steps' learning rates could move it).
    _, schedule = step_lib.make_optimizer(opt_cfg, 100)
    bounds = {"loss": 1e-5, "params": 0.1 * sum(float(schedule(i)) for i in range(3))}
    agreement = {}
    for kind, distill in (("fused", True), ("student", False)):
        agreement[kind] = check_minimal_matches(workload, teacher_cfg, student_cfg, loss_cfg,
                                                opt_cfg, teacher_params, batch, distill)
        for what, gap in agreement[kind].items():
            if not gap <= bounds[what]:
                print(f"jax minimal {kind}: after 3 steps its {what} differ from kd_jax's by "
                      f"{gap:.3g} (bound {bounds[what]:.3g})", file=sys.stderr)
                return 1

    for step, sync in variants.values():  # a second warm-up step (torch.compile's recompiles)
        sync(step())
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (step, sync) in variants.items():
            timings[name].append(time_variant(step, args.steps, sync))
    seconds = {name: statistics.median(each) for name, each in timings.items()}

    peaks.append(tp.measure_peak("float32", sizes))
    peak = max(peaks, key=lambda p: p["best"])
    student_abstract = abstract_model(student_cfg)[1]
    teacher_abstract = abstract_model(teacher_cfg)[1]
    shapes = {"student": tp.model_shape(student_cfg, student_abstract),
              "teacher": tp.model_shape(teacher_cfg, teacher_abstract)}
    rows = []
    for name, value in seconds.items():
        kind = name.split()[-1]
        flops = tp.useful_flops_per_token(workload.seq, shapes["student"],
                                          shapes["teacher"] if kind == "fused" else None)
        reference = seconds[f"kd_jax {kind}"]
        rows.append({"variant": name, "kind": kind, "seconds_per_step": value,
                     "seconds_per_step_each": timings[name],
                     "tokens_per_second": workload.tokens / value,
                     "kd_jax_speed_ratio": value / reference,  # > 1: kd_jax is faster
                     "flops_per_second": flops * workload.tokens / value,
                     "fraction_of_f32_peak": flops * workload.tokens / value / peak["best"],
                     "loss_at_step_0": first_loss[name],
                     "setup_seconds": compile_seconds[name]})
    report = {"benchmark": "vs_pytorch", "quick": args.quick, "machine": tp.machine_info(),
              "versions": dict(tp.versions(), **({} if args.no_torch else {
                  "torch": importlib.metadata.version("torch")})),
              "threads": threads, "workload": dataclasses.asdict(workload),
              "steps": args.steps, "repeats": args.repeats, "peak": peak,
              "glibc_malloc_kept_step_memory": kept_memory,
              "minimal_step_agreement": {"after_steps": 3, "bounds": bounds, **agreement},
              "results": rows}
    print(f"{report['machine']['device_kind']}, {threads} threads; teacher "
          f"{workload.teacher_layers} x {workload.teacher_d}, student {workload.student_layers} x "
          f"{workload.student_d}, vocab {workload.vocab}, {workload.batch} x {workload.seq} "
          f"tokens; median of {args.repeats} x {args.steps} steps; float32 matmul peak "
          f"{peak['best'] / 1e9:,.0f} GFLOP/s; step memory kept: {kept_memory}")
    print(f"{'variant':24s} {'s/step':>8s} {'tokens/s':>10s} {'kd_jax x':>9s} "
          f"{'of peak':>8s} {'loss@0':>9s} {'setup s':>8s}")
    for row in rows:
        print(f"{row['variant']:24s} {row['seconds_per_step']:8.4f} "
              f"{row['tokens_per_second']:10,.0f} {row['kd_jax_speed_ratio']:9.2f} "
              f"{row['fraction_of_f32_peak']:8.1%} {row['loss_at_step_0']:9.5f} "
              f"{row['setup_seconds']:8.1f}")
    print("kd_jax x: this variant's time over kd_jax's for the same kind (> 1: kd_jax faster)")
    name = "vs_minimal" if args.no_torch else "vs_pytorch"
    path = args.json or tp.RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if all(math.isfinite(row["seconds_per_step"]) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
