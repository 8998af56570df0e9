"""Keep freed tensor memory from piling up in the C heap (glibc's malloc, which torch's CPU
allocator uses).

glibc serves a request above its *mmap threshold* with a fresh ``mmap`` and gives it back to the
system when it is freed; smaller requests come from the heap, whose freed holes are reused only
by requests that fit in them. By default the threshold is dynamic: each freed mmapped block
raises it to that block's size, up to 32 MB (64-bit). After the first such free, tensors up to
32 MB come from the heap, and a bound pass whose temporary tensors change size from one chunk or
node to the next while smaller results stay alive between them grows the heap hole by hole:
TinyYOLO's dense CROWN pass (yolo_2023) went past 10 GB of resident memory in 60 s and then
failed to allocate 18 MB, where the same run with the threshold fixed peaks at 1.3-1.7 GB
(benchmarks/RESULTS.md, section 9).

:func:`bound_heap_growth` fixes the threshold (which also turns the dynamic raising off): blocks
of at least ``HEAP_MMAP_THRESHOLD`` bytes are mapped and unmapped one by one. Smaller tensors stay
on the heap, where allocating is cheaper (a mapped block costs its page faults on first touch:
an elementwise pass over a 2 MB mapped tensor measured 10x slower here than over a heap one).
The entry points that run verification in a process of their own (the ``certify`` command, the
executor's worker processes, the benchmark scripts) call it; a program that imports the library
decides for itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["HEAP_MMAP_THRESHOLD", "bound_heap_growth"]

HEAP_MMAP_THRESHOLD = 4 * 1024 * 1024
"""Bytes from which glibc maps a block of its own (``M_MMAP_THRESHOLD``)."""

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def bound_heap_growth(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes and its trim threshold at twice that
    (the free top of the heap beyond it goes back to the system). Returns False, changing
    nothing, where the C library is not glibc (``mallopt`` missing) or refuses the values."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
