"""Process memory tuning, applied in one place and undone when the run ends.

glibc gives every thread its own malloc arena and keeps freed memory in it; with one thread per
calibration chunk (the lockstep, `lockstep.py`) that raises peak RSS. One shared arena, measured
on SmolLM2 with 64 windows: peak 2.6 -> 2.3 GB and 7% faster. A fixed 4 MB mmap threshold reached
1.6 GB and malloc_trim after each block saved 15%, but both cost 10-20% in page faults, so the
in-memory engine uses neither (BENCHMARKS.md); the out-of-core residency trims after each block
(`return_freed_memory`), where keeping host memory at one block is the point.

Everything here is a no-op off glibc.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

M_ARENA_MAX = -8        # mallopt parameter number (glibc malloc.h)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def one_malloc_arena():
    """While active, every thread allocates from one malloc arena; afterwards the limit is set back
    to glibc's default (0: derived from the core count). glibc fixes its arena limit the first
    time a thread needs a new arena, so threads created inside this block keep sharing one; the
    setting itself does not outlive the block."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_ARENA_MAX, 1)
    try:
        yield
    finally:
        libc.mallopt(M_ARENA_MAX, 0)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (malloc_trim). Out of core, RSS grew by about one block
    per block without it (measured: +10 MB per 10 MB block on a synthetic llama)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
