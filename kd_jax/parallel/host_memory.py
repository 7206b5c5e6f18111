"""Host memory for XLA:CPU: keep each step's temporary buffer's pages from one step to the next.

XLA:CPU allocates an execution's temporary buffer (all its intermediate arrays at once: 442 MB
for `benchmarks/vs_pytorch.py`'s student step) with `malloc` from its worker threads at the
start of every execution, and frees it at the end. glibc serves so large a block from a thread's
arena by `mmap` and gives it back by `munmap`, so every step faults its temporaries in again, a
page at a time, and the kernel zeroes each: 108,000 page faults and a fifth of the step's time
on a 2-core CPU (measured with `getrusage`: 258 ms of system time a step; 0 after this).

`keep_cpu_step_memory` tells glibc to serve every thread from the main heap, never by `mmap`, and
to return freed memory to the system only above 2 GiB: the heap then keeps the pages of the
largest step and the next step reuses them. The cost is that a process holds its peak host
memory until it exits (what a caching allocator does anyway).

It changes nothing unless the process will run on a CPU (no accelerator plugin installed, or
JAX_PLATFORMS names cpu alone), the C library is glibc, and the user has set no MALLOC_*
variable of their own. It must run before JAX starts its CPU client (the client's threads pick
their arena at their first allocation); later, or on another platform, it is a no-op.

This module imports only the standard library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2 * 1024**3

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")
_done: list[bool] = []


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu alone, or it is unset and no
    accelerator plugin is installed (told without starting any backend)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


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
