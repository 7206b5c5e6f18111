"""A minimal JAX distillation step: the yardstick for what kd_jax's engine costs on top of the
maths.

Written as one writes it by hand: plain functions over plain dicts of 2-D matrices, a Python
loop over the layers (no scan), causal dense attention, the loss as `log_softmax`s, plain optax,
no config objects, no masks beyond causality, no metrics beyond the loss. The maths is
`benchmarks/throughput.py`'s workload: a Llama-style decoder (RMSNorm, rotary embeddings in
the Hugging Face `rotate_half` convention, SwiGLU), the frozen teacher's forward pass, and

    loss = (kd_weight * T^2 KL(softmax(teacher / T) || softmax(student / T))
            + ce_weight * CE(labels)) summed over tokens / tokens

(CE alone for the student-only step), AdamW with global-norm clipping, weight decay on the
matrices only (not on the norm scales). Every row is one document and every position counts,
as in `throughput.synthetic_batch`.

`from_kd_jax` turns kd_jax's parameter tree into this layout and `to_kd_jax` back, so the two
steps can start from the same weights and be compared after a few steps (`check_equal`, run by
`benchmarks/vs_pytorch.py` before it times anything, and by the tests).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def from_kd_jax(params: Any) -> dict[str, Any]:
    """kd_jax's stacked parameter tree as one dict of 2-D matrices a layer (head [vocab, d])."""
    layers = params["layers"]
    d = params["embedding"].shape[1]
    out = []
    for i in range(layers["wq"].shape[0]):
        wo = layers["wo"][i]
        out.append({
            "attn_norm": layers["attn_norm"][i], "mlp_norm": layers["mlp_norm"][i],
            "wq": layers["wq"][i].reshape(d, -1), "wk": layers["wk"][i].reshape(d, -1),
            "wv": layers["wv"][i].reshape(d, -1), "wo": wo.reshape(-1, wo.shape[-1]),
            "w_gate": layers["w_gate"][i], "w_up": layers["w_up"][i],
            "w_down": layers["w_down"][i]})
    head = params["head"] if "head" in params else params["embedding"]
    return {"embedding": params["embedding"], "head": head, "final_norm": params["final_norm"],
            "layers": out}


def to_kd_jax(params: dict[str, Any], like: Any) -> Any:
    """The inverse of `from_kd_jax`, shaped like the kd_jax tree `like`."""
    stacked = {name: jnp.stack([layer[name] for layer in params["layers"]]).reshape(
        like["layers"][name].shape) for name in like["layers"]}
    out = {"embedding": params["embedding"], "final_norm": params["final_norm"],
           "layers": stacked}
    if "head" in like:
        out["head"] = params["head"]
    return out


def rotary(seq: int, head_dim: int, theta: float = 10000.0):
    """cos and sin [seq, head_dim] of positions 0..seq-1, the two halves repeated."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(seq)[:, None] * inv_freq.astype(np.float32)[None]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def rms_norm(x, scale, eps: float = 1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def forward(params, tokens, n_heads: int, n_kv_heads: int, eps: float = 1e-5):
    """Logits [b, t, vocab] of the decoder with weights `params` (`from_kd_jax`'s layout)."""
    b, t = tokens.shape
    x = params["embedding"][tokens]
    head_dim = params["layers"][0]["wq"].shape[1] // n_heads
    cos, sin = rotary(t, head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))

    def rotate(x):  # [b, t, heads, head_dim]
        half = head_dim // 2
        turned = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, None] + turned * sin[:, None]

    for w in params["layers"]:
        h = rms_norm(x, w["attn_norm"], eps)
        q = rotate((h @ w["wq"]).reshape(b, t, n_heads, head_dim))
        k = rotate((h @ w["wk"]).reshape(b, t, n_kv_heads, head_dim))
        v = (h @ w["wv"]).reshape(b, t, n_kv_heads, head_dim)
        if n_kv_heads != n_heads:
            k = jnp.repeat(k, n_heads // n_kv_heads, axis=2)
            v = jnp.repeat(v, n_heads // n_kv_heads, axis=2)
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(head_dim)
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, t, -1)
        x = x + attended @ w["wo"]
        h = rms_norm(x, w["mlp_norm"], eps)
        x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
    return rms_norm(x, params["final_norm"], eps) @ params["head"].T


def loss(params, teacher_params, batch, *, student_heads: tuple[int, int],
         teacher_heads: tuple[int, int], temperature: float, kd_weight: float,
         ce_weight: float):
    """The mean loss over the batch's tokens; CE alone when `teacher_params` is None."""
    logits = forward(params, batch["tokens"], *student_heads)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.sum(jnp.take_along_axis(log_probs, batch["labels"][..., None], axis=-1))
    tokens = batch["labels"].size
    if teacher_params is None:
        return ce / tokens
    teacher_logits = jax.lax.stop_gradient(
        forward(teacher_params, batch["tokens"], *teacher_heads))
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    kd = jnp.sum(jnp.exp(log_p) * (log_p - log_q)) * temperature**2
    return (kd_weight * kd + ce_weight * ce) / tokens


def optimizer(*, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
              b1: float, b2: float, eps: float, weight_decay: float,
              clip_norm: float) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a linear warm-up into a cosine decay; weight decay on
    the matrices only (not on the norm scales)."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=lr * min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim == 2, params)))


def make_step(tx: optax.GradientTransformation, **loss_kwargs) -> Callable:
    """step(params, opt_state, teacher_params, batch) -> (params, opt_state, loss), jitted with
    the student's parameters and optimizer state donated."""

    def step(params, opt_state, teacher_params, batch):
        value, grads = jax.value_and_grad(loss)(params, teacher_params, batch, **loss_kwargs)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))
