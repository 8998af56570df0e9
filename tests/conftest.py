"""Shared fixtures. Tests that need ../shared (VNN-COMP nets, MNIST) use ``shared_dir``
and skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def find_shared() -> Path | None:
    """``$CERTIFY_SHARED`` or ``../shared`` beside the repository."""
    env = os.environ.get("CERTIFY_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (cand / "benchmarks").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = find_shared()
    if d is None:
        pytest.skip("../shared (VNN-COMP benchmarks and MNIST data) is not beside the repository; set CERTIFY_SHARED to point at it")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tests' nets are small: torch's intra-op thread pool only costs time on a shared
    2-core machine. One thread per test module (restored after it)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
