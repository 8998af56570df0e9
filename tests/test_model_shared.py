"""Every VNN-COMP ONNX net under ../shared loads and matches onnxruntime (or names its unsupported op).

One test per file (ids are the paths under ``benchmarks/vnncomp``); a table of
``file | ok or unsupported op | max abs diff / max(1, max |output|)`` is printed at the end of the module.
"""
from __future__ import annotations

import re

import pytest

from conftest import find_shared
from verify.model import UnsupportedOperatorError, check_against_onnxruntime, check_canonical, load_model, onnx_input_shape

pytestmark = pytest.mark.shared

PATTERNS = ("2021/**/*.onnx", "2022/**/*.onnx.gz", "2024/**/*.onnx.gz")
ATOL = 1e-4  # max abs diff on 4 uniform [0, 1) inputs, relative to max(1, max |output|)
RESULTS: dict[str, tuple[str, float | None]] = {}


def _files() -> list[str]:
    root = find_shared()
    if root is None:
        return ["(no ../shared)"]
    base = root / "benchmarks" / "vnncomp"
    return sorted(str(p.relative_to(base)) for pat in PATTERNS for p in base.glob(pat))


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if not RESULTS:
        return
    lines = [f"{'file':60s} {'result':24s} max abs diff"]
    for name, (status, diff) in sorted(RESULTS.items()):
        lines.append(f"{name:60s} {status:24s} {'' if diff is None else f'{diff:.2e}'}")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():  # show the table even when output is captured
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("rel", _files())
def test_vnncomp_net_matches_onnxruntime(shared_dir, rel):
    path = shared_dir / "benchmarks" / "vnncomp" / rel
    try:
        gm = load_model(path)
    except UnsupportedOperatorError as e:
        op = re.search(r"operator '(\w+)' at node '[^']*'", str(e))
        assert op, f"the error must name the op and the node: {e}"
        RESULTS[rel] = (f"unsupported {op.group(1)}", None)
        return
    check_canonical(gm)
    assert gm.input_shape == onnx_input_shape(path)
    diff = check_against_onnxruntime(gm, path, n=4, seed=0, relative=True)
    RESULTS[rel] = ("ok" if diff <= ATOL else "MISMATCH", diff)
    assert diff <= ATOL, f"{rel}: max abs diff {diff:.3g} (relative to the output scale) against onnxruntime"
