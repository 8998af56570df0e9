"""What this process may use of the machine (CPU cores). Imported by the engines, so it imports
nothing of the project."""
from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores(cap: int | None = None) -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at most
    ``cap``; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, n if cap is None else min(cap, n))
