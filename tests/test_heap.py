"""verify.heap: freed tensors of a few MB go back to the system instead of piling up as heap holes.

The pattern below is the mechanism that grew TinyYOLO's CROWN pass past 10 GB (torch's CPU tensors
are glibc ``malloc`` blocks): temporaries of a few MB, each followed by a small result that stays
alive, so that freeing them leaves holes in the heap. It calls ``malloc`` itself, in a fresh
process, so that the layout does not depend on what the interpreter allocated before.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import verify.heap
from verify.cli import main
from verify.heap import HeapTrimmer, _glibc

REPO = Path(__file__).resolve().parents[1]

PATTERN = """
import ctypes, sys, time
from verify.heap import HeapTrimmer, _glibc, start_heap_trimmer
libc = _glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "thread":
    trimmer = start_heap_trimmer(excess_mb=64, period_s=0.02)
else:
    trimmer = HeapTrimmer(libc, excess_mb=64)
    trimmer.start()
libc.free(libc.malloc(30 << 20))  # a freed mapped block raises glibc's threshold to 30 MB
start, temporaries, kept = rss_mb(), [], []
for i in range(40):  # [8 MB temporary][64 KB result] x 40 from the heap's top, temporaries written
    temporaries.append(libc.malloc(8 << 20))
    ctypes.memset(temporaries[-1], 1, 8 << 20)
    kept.append(libc.malloc(64 << 10))
for p in temporaries:  # 40 holes of 8 MB, each pinned by the result after it
    libc.free(p)
before = rss_mb() - start
if sys.argv[1] == "thread":
    time.sleep(0.3)
else:
    trimmer.step()
print(before, rss_mb() - start, trimmer.checks, trimmer.trims)
"""

needs_glibc = pytest.mark.skipif(_glibc() is None or not Path("/proc/self/statm").exists(),
                                 reason="the trimmer needs glibc's mallinfo2 / malloc_trim and /proc")


def _pattern(mode: str) -> tuple[float, float, int, int]:
    """(MB resident beyond the kept tensors before the trimmer's step, after it, checks, trims)."""
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], cwd=REPO, capture_output=True, text=True, check=True)
    before, after, checks, trims = out.stdout.split()
    return float(before), float(after), int(checks), int(trims)


@needs_glibc
def test_a_trimmer_step_returns_freed_temporaries():
    before, after, _, trims = _pattern("step")
    if before < 150:
        pytest.skip(f"glibc did not fragment on the pattern this time ({before:.0f} MB beyond the kept tensors)")
    assert trims == 1 and after < 30, f"{after:.0f} MB of freed temporaries resident after {trims} trims (before: {before:.0f} MB)"


@needs_glibc
def test_the_watcher_thread_checks_every_period():
    _, after, checks, trims = _pattern("thread")
    assert checks >= 5 and after < 64 + 30, (checks, trims, after)


@needs_glibc
def test_the_trimmer_leaves_a_heap_in_use_alone():
    import torch

    trimmer = HeapTrimmer(_glibc(), excess_mb=64)
    trimmer.start()
    held = [torch.ones(1 << 20) for _ in range(32)]  # 128 MB in use: not a reason to trim
    assert not trimmer.step() and trimmer.trims == 0 and len(held) == 32


def test_the_command_line_starts_the_trimmer(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(verify.heap, "start_heap_trimmer", lambda *a: calls.append(a))
    rc = main(["run", "-q", "--model", "digits-mlp", "--data", "digits", "--limit", "1", "--eps", "0.01",
               "--method", "interval", "--out", str(tmp_path / "o.csv")])
    assert rc == 0 and calls == [()]


def test_the_executor_workers_start_the_trimmer(monkeypatch):
    from verify.executor import _init_worker

    calls = []
    monkeypatch.setattr(verify.heap, "start_heap_trimmer", lambda *a: calls.append(a))
    _init_worker(1)
    assert calls == [()]
