"""The CPU as a platform: whether JAX will run on it, what its matrix units take, and host
memory that XLA:CPU's steps keep from one step to the next.

Step memory. XLA:CPU allocates an execution's temporary buffer (all its intermediate arrays at
once: 442 MB for `benchmarks/vs_pytorch.py`'s student step) with `malloc` from its worker
threads at the start of every execution, and frees it at the end. glibc serves so large a block
from a thread's arena by `mmap` and gives it back by `munmap`, so every step faults its
temporaries in again, a page at a time, and the kernel zeroes each: 108,000 page faults and 258
ms of system time a step for that student step on a 2-core CPU (`getrusage`), 0 after the
heap has settled with `keep_cpu_step_memory`. It tells glibc to serve every thread from the main
heap, never by `mmap`, and to return freed memory to the system only above 2 GiB: the heap then
keeps the pages of the largest steps and later steps reuse them. The cost is that the process
holds its peak host memory until it exits, as a caching allocator does (the heap settles after
a few steps at about twice a step's temporaries: the next step's buffers are taken while the
last step's are still held).

It changes nothing unless the process will run on a CPU (`cpu_only`), the C library is glibc,
and the user has set no MALLOC_* variable of their own. It must run before JAX starts its CPU
client (the client's threads pick their arena at their first allocation); `kd-jax` calls it
first thing.

This module imports only the standard library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from pathlib import Path

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2 * 1024**3

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")
# x86 flags of the instructions that multiply bfloat16 and accumulate in float32 (AVX512-BF16's
# dot products, AMX's tiles), which XLA:CPU's matmuls use.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_done: list[bool] = []


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu alone, or it is unset and no
    accelerator plugin is installed (told without starting any backend)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def bfloat16_matmul_units(cpuinfo: str | None = None) -> str | None:
    """The flag of this CPU's bfloat16 matrix instructions (`_BF16_FLAGS`), or None: then
    bfloat16 matmuls are emulated, slower than float32. Read from /proc/cpuinfo (`cpuinfo`: its
    text, for tests); None where there is no such file."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text(errors="replace")
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((flag for flag in _BF16_FLAGS if flag in flags), None)
    return None


def keep_cpu_step_memory() -> bool:
    """Configure glibc's allocator as the module docstring says; True if it did (once a
    process)."""
    if _done:
        return _done[0]
    applied = False
    if (cpu_only() and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
            and not any(name.startswith("MALLOC_") for name in os.environ)):
        libc = ctypes.CDLL(None)
        applied = bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                       and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
    _done.append(applied)
    return applied
