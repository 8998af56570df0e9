"""Give freed tensor memory that piles up in the C heap back to the system (glibc's malloc, which
torch's CPU allocator uses).

glibc serves a request above its *mmap threshold* with a mapping of its own, unmapped when it is
freed; smaller requests come from the heap, whose freed holes are reused only by requests that
fit in them. The threshold is dynamic: each freed mapped block raises it to that block's size, up
to 32 MB. From then on tensors of up to 32 MB come from the heap, and a bound pass whose
temporaries change size from one chunk or node to the next while smaller results stay alive
between them grows the heap hole by hole: TinyYOLO's dense CROWN pass (yolo_2023, code of
5e0df7a) went past 10 GB resident in 60 s, then failed to allocate 18 MB (benchmarks/RESULTS.md,
section 9).

Fixing the threshold low stops that, but every mapped block then pays its page faults on first
touch: TinyYOLO's patch pass took 278 s instead of 174 s with a 4 MB threshold on this machine.
So the heap keeps glibc's policy and a watcher thread (:func:`start_heap_trimmer`) checks once per
``period_s`` how much resident memory is neither in use by malloc (``mallinfo2``: ``uordblks +
hblkhd``) nor there when it started; above ``excess_mb`` it calls ``malloc_trim(0)``, which
releases the whole free pages of every heap hole (``madvise(MADV_DONTNEED)``; 313 MB of torch
tensors' holes in 21 ms here). A run that does not fragment never trims. The holes' addresses
stay reserved (virtual size still grows; only resident memory is bounded).

The entry points that run verification in a process of their own (the ``certify`` command, the
executor's worker processes, the VNN-COMP script) start it; a program that imports the library
decides for itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["HeapTrimmer", "start_heap_trimmer", "TRIMMER_THREAD"]

TRIMMER_THREAD = "certify-heap-trimmer"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> Any:
    """The C library with ``mallinfo2`` and ``malloc_trim`` typed, or None (not glibc >= 2.33)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class HeapTrimmer:
    """Trims the heap when resident memory exceeds malloc's in-use bytes by ``excess_mb`` more
    than at the start (``baseline``: libraries, the interpreter's own arenas)."""

    libc: Any
    excess_mb: float
    baseline: int = 0
    checks: int = 0
    trims: int = 0

    def unused_resident(self) -> int:
        info = self.libc.mallinfo2()
        return _resident_bytes() - info.uordblks - info.hblkhd

    def start(self) -> None:
        self.baseline = self.unused_resident()

    def step(self) -> bool:
        """Trim when the unused resident memory grew by more than ``excess_mb``; True if it did."""
        self.checks += 1
        if self.unused_resident() - self.baseline <= self.excess_mb * 2**20:
            return False
        self.libc.malloc_trim(0)
        self.trims += 1
        self.baseline = max(self.baseline, self.unused_resident())  # what trimming cannot release
        return True


def start_heap_trimmer(excess_mb: float = 256.0, period_s: float = 1.0) -> HeapTrimmer | None:
    """Start the watcher thread (a daemon, once per process); None where the C library is not
    glibc or ``/proc`` is missing."""
    libc = _glibc()
    if libc is None or not os.path.exists("/proc/self/statm"):
        return None
    for t in threading.enumerate():
        if t.name == TRIMMER_THREAD:
            return getattr(t, "trimmer", None)
    trimmer = HeapTrimmer(libc, excess_mb)
    trimmer.start()

    def watch() -> None:
        while True:
            time.sleep(period_s)
            trimmer.step()

    thread = threading.Thread(target=watch, name=TRIMMER_THREAD, daemon=True)
    thread.trimmer = trimmer  # type: ignore[attr-defined]
    thread.start()
    return trimmer
