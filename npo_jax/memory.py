"""glibc's handling of freed host memory: handed back between large tensors, kept between steps.

Orbax/tensorstore allocate and free each tensor's buffers on worker threads; glibc keeps such
freed memory in per-thread arenas, so RSS grows by about one tensor every few saves (measured:
+0.23 GiB per three 256 MB saves). `malloc_trim(0)` returns it, keeping conversion peak memory
at about one tensor instead of growing to the model's size.

Training is the opposite case: XLA:CPU allocates every step's temporaries afresh and frees them
at the end of the step. glibc serves blocks that large with mmap (always, from a thread's own
arena) and unmaps them when freed, so every page of them faults in again at the next step
(about 95,000 minor faults per step of the `small` benchmark). `reuse_host_memory` makes glibc
keep and reuse that memory instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
from importlib.metadata import entry_points

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def unmap_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve every block of `threshold` bytes or more with its own mmap, unmapped when freed
    (glibc only): glibc otherwise raises that threshold as large blocks are freed (up to 32 MiB),
    and blocks under it stay in the heap once freed. For a phase that frees many large
    temporaries whose memory should go back at once (`npo-jax parity`'s PyTorch backward of a 3B
    in float32). Returns whether glibc took the setting."""
    libc = _libc()
    return libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def trim_host_memory() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reuse_host_memory() -> bool:
    """Keep freed heap memory for reuse: one malloc arena, no mmap, no automatic trimming (glibc only).

    For training on XLA:CPU (the `small` cached step in one benchmark run: 686 against 589
    tokens/s); `trim_host_memory` still hands memory back when called (after compiling). The
    cost is compile time, the compiler's threads sharing one arena (the `small` step: about 6.7
    against 5.6 s), so it is for runs of many steps, not for the compile-bound demo. Call it
    before jax starts its threads, i.e. before the process's first jax computation: threads that
    already have an arena keep it (and XLA:CPU allocates the step's temporaries on one of its
    own). Does nothing when jax will run on an accelerator (`jax_runs_on_cpu`), where the step's
    temporaries live on the chip and only the compile cost would remain. Returns whether glibc
    took the settings.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not jax_runs_on_cpu():
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def jax_runs_on_cpu() -> bool:
    """Whether jax's default backend will be the CPU, told without starting jax (which would start
    its threads): JAX_PLATFORMS names cpu first, or no accelerator plugin (CUDA/ROCm/TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if list(entry_points(group="jax_plugins")):
        return False
    return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))
