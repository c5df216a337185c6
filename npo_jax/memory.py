"""Handing freed host memory back to the OS between large tensors.

Orbax/tensorstore allocate and free each tensor's buffers on worker threads; glibc keeps such
freed memory in per-thread arenas, so RSS grows by about one tensor every few saves (measured:
+0.23 GiB per three 256 MB saves). `malloc_trim(0)` returns it, keeping conversion peak memory
at about one tensor instead of growing to the model's size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_host_memory() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
