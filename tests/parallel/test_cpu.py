"""kd_jax.parallel.cpu: the CPU's bfloat16 matrix instructions, read from its flags; and with
glibc told to keep the step's memory, a CPU execution with a large temporary buffer stops
faulting its pages in anew every call, and is left alone where the process runs on an
accelerator or the user has set glibc's variables. Each of these runs in a process of its own
(the setting is process-wide and must precede JAX's CPU client)."""

import json
import os
import subprocess
import sys

import pytest

from kd_jax.parallel.cpu import bfloat16_matmul_units, cpu_only

PROGRAM = """
import json, resource, sys
from kd_jax.parallel.cpu import keep_cpu_step_memory
applied = keep_cpu_step_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    # A 64 MiB temporary: the matmul's operand is materialized whole.
    return jnp.sum(jnp.dot(jnp.outer(x, x) + 1.0, x[:, None]))

x = jnp.ones(4096)
# The heap settles over the first calls (the next call's buffers are taken while the last
# call's are still held); then it serves every call from pages it has.
for _ in range(40):
    step(x).block_until_ready()
# The median call's faults: a one-off event (the kernel's NUMA balancing unmapping pages to
# sample them, the heap growing once more) falls on one call, not on every one.
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_call": sorted(faults)[4]}))
"""

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the setting is glibc's, on Linux")


def run(program: str, *args: str, **env) -> str:
    """The last line `program` prints, run with the environment less glibc's and JAX's
    platform variables, plus `env`."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", program, *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@glibc_linux
def test_kept_memory_is_not_faulted_in_again():
    default = json.loads(run(PROGRAM, "default", JAX_PLATFORMS="cpu"))
    kept = json.loads(run(PROGRAM, "keep", JAX_PLATFORMS="cpu"))
    assert kept["applied"] and not default["applied"]
    # 64 MiB is 16,384 pages of 4 KiB: faulted in every call by default, reused when kept.
    assert default["faults_per_call"] > 8000
    assert kept["faults_per_call"] < 500


@glibc_linux
def test_left_alone_on_an_accelerator_or_with_the_user_s_own_settings():
    applied = ("from kd_jax.parallel.cpu import keep_cpu_step_memory; "
               "print(keep_cpu_step_memory())")
    assert run(applied, JAX_PLATFORMS="cpu") == "True"
    assert run(applied, JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="4") == "False"
    assert run(applied, JAX_PLATFORMS="cuda,cpu") == "False"


def test_cpu_only_reads_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not cpu_only()


def test_bfloat16_matrix_instructions_are_read_from_the_flags():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
    zen3 = "flags\t\t: fpu sse avx2 fma\n"
    assert bfloat16_matmul_units(zen4) == "avx512_bf16"
    assert bfloat16_matmul_units(sapphire_rapids) == "amx_bf16"
    assert bfloat16_matmul_units(zen3) is None
    assert bfloat16_matmul_units("") is None
