"""How the models' matrix products are computed: the projections over the flattened tokens, and
16-bit products asked for in float32 on a CPU. The values are the plain einsums' on every
platform; what differs is how fast XLA runs them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *w.shape[:contract]] contracted with w [*w.shape[:contract], *out] -> [..., *out]
    in x's dtype (`btd,dnh->btnh` for the queries, `btnh,nhd->btd` for the attention output),
    computed as one [tokens, in] @ [in, out] matmul over the tokens flattened.

    Written as the einsum of the 3-D activations, autodiff gives the weight's gradient as a
    contraction over two dimensions (batch and sequence) at once, and XLA:CPU lays its operands
    out by copying them transposed, fused with the elementwise ops that produced them (SwiGLU's
    backward), at a fraction of memory speed; flattened, it is one plain matmul. The student
    step of benchmarks/vs_pytorch.py (2-core CPU) took 0.55-0.56 s against 0.62-0.64 s with the
    3-D einsums. On a GPU the reshapes are bitcasts and the matmuls the same.
    """
    lead, inner, outer = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
    x_mk = x.reshape(math.prod(lead), math.prod(inner))
    w_kn = w.reshape(math.prod(inner), math.prod(outer))
    return matmul("mk,kn->mn", x_mk, w_kn).reshape(*lead, *outer)


def matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in a's dtype. On a CPU a 16-bit product is asked for in float32
    and rounded after: the CPU's bfloat16 dot-product instructions accumulate in float32, and
    XLA:CPU takes them only for a float32 result (a bfloat16 result takes a path slower than
    float32's: 405 against 181 GFLOP/s at [2048, 576] x [576, 1536] on a 2-core AMD EPYC with
    avx512_bf16). Elsewhere the matmul libraries accumulate in float32 whatever they return."""
    if a.dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.einsum(spec, a, b)
