"""Give the C heap's free pages back to the system between jobs.

A job's decoded frames, crops and tensors are freed when it ends, but glibc keeps much of that
memory mapped: its mmap threshold rises once big blocks are freed, so later frames come from the
heap, whose free pages it returns only at the top. An idle 1080p worker kept 150-180 MB more than
it needed (`python bench/bench_heap.py`); `malloc_trim` returns them in about 10 ms.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from typing import Callable


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's resident set size, from /proc (None where there is none)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; whether this C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
