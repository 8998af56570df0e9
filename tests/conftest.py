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


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    """The digits MLP saved as a ``.pt`` file (a model path for the CLI)."""
    from verify.digits_model import load_digits_mlp

    p = tmp_path_factory.mktemp("m") / "digits.pt"
    torch.save(load_digits_mlp(), p)
    return p


def err_line(capsys) -> str:
    """The CLI's one error line on stderr (asserted to be exactly one ``certify: error:`` line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("certify: error: ")
    return err[0]


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``certify argv``: it exits with status 2; its one error line (see :func:`err_line`)."""
    from verify.cli import main

    assert main(argv) == 2
    return err_line(capsys)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (scripts whose generators and judges tests share)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def load_fuzz():
    """``benchmarks/fuzz_soundness.py`` as a module (the generator and judge of the soundness
    fuzz, used by the fuzz slice and the conformance suite)."""
    return load_benchmark("fuzz_soundness")


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
