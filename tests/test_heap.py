"""verify.heap: freed tensors of a few MB go back to the system instead of piling up as heap holes.

The pattern below is the one that grew TinyYOLO's CROWN pass past 10 GB: temporaries that change
size from one step to the next, each followed by a smaller result that stays alive. It runs in a
fresh process with glibc's default policy and with :func:`verify.heap.bound_heap_growth`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import verify.heap
from verify.cli import main

REPO = Path(__file__).resolve().parents[1]

PATTERN = """
import sys, torch
from verify.heap import bound_heap_growth
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
applied = sys.argv[1] == "bounded" and bound_heap_growth()
torch.ones(30 << 20, dtype=torch.uint8)  # freeing a mapped block raises glibc's default threshold
start, kept = rss_mb(), []
for i in range(40):
    temporary = torch.ones((5 << 20) + i * (200 << 10), dtype=torch.uint8)  # 5 .. 12.8 MB
    kept.append(torch.ones(1 << 18))  # 1 MB that stays alive
    del temporary
print(int(applied), rss_mb() - start - 40)
"""


def _growth_beyond_kept(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], cwd=REPO, capture_output=True, text=True, check=True)
    applied, growth = out.stdout.split()
    return applied == "1", float(growth)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_bounded_heap_returns_freed_temporaries():
    applied, bounded = _growth_beyond_kept("bounded")
    if not applied:
        pytest.skip("the C library has no glibc mallopt: the policy is not applied there")
    _, default = _growth_beyond_kept("default")
    if default < 150:
        pytest.skip(f"this C library's default policy does not fragment on the pattern ({default:.0f} MB)")
    assert bounded < 30, f"{bounded:.0f} MB of freed temporaries still resident (default policy: {default:.0f} MB)"


def test_the_command_line_applies_the_policy(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(verify.heap, "bound_heap_growth", lambda *a: calls.append(a) or True)
    rc = main(["run", "-q", "--model", "digits-mlp", "--data", "digits", "--limit", "1", "--eps", "0.01",
               "--method", "interval", "--out", str(tmp_path / "o.csv")])
    assert rc == 0 and calls == [()]


def test_the_executor_workers_apply_the_policy(monkeypatch):
    from verify.executor import _init_worker

    calls = []
    monkeypatch.setattr(verify.heap, "bound_heap_growth", lambda *a: calls.append(a) or True)
    _init_worker(1)
    assert calls == [()]
