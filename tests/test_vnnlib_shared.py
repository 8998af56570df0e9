"""Parse every VNN-LIB file and instance list of the benchmark folders named in
``EXPECTED_INSTANCES`` under ../shared/benchmarks/vnncomp.

Skips without ../shared (see ``tests/conftest.py``). The total parse time is printed
(``pytest -s``) and bounded. The 2022-2024 sets added later (nn4sys with up to 120,000
disjuncts per file, YOLO, ViT, ...) are the subject of their own issue and tests; listing a
folder here opts it in.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import onnx
import pytest
import torch

from verify.vnnlib import open_maybe_gz, parse_vnnlib, read_instances

pytestmark = pytest.mark.shared

# instances per benchmark folder (../shared/benchmarks/README.md)
EXPECTED_INSTANCES = {
    "acasxu": 186,
    "mnistfc": 90,
    "eran": 72,
    "verivital": 60,
    "oval21": 30,
    "cifar10_resnet": 72,
    "test": 5,
    "collins_rul_cnn": 62,
    "rl_benchmarks": 296,
    "safenlp": 1080,
}


def _known(root: Path, path: Path) -> bool:
    """``path`` lies in one of the benchmark folders of :data:`EXPECTED_INSTANCES`."""
    parts = path.relative_to(root).parts
    return len(parts) > 2 and parts[1] in EXPECTED_INSTANCES


@pytest.fixture(scope="module")
def vnncomp(shared_dir: Path) -> Path:
    d = shared_dir / "benchmarks" / "vnncomp"
    if not d.is_dir():
        pytest.skip(f"{d} is missing")
    return d


@pytest.fixture(scope="module")
def parsed(vnncomp: Path) -> dict[Path, list]:
    files = sorted(p for p in vnncomp.rglob("*") if p.name.endswith((".vnnlib", ".vnnlib.gz")) and _known(vnncomp, p))
    t0 = time.perf_counter()
    out = {f: parse_vnnlib(f) for f in files}
    dt = time.perf_counter() - t0
    print(f"\nparsed {len(files)} VNN-LIB files in {dt:.2f} s")
    # a blow-up guard (the parse time is measured, not asserted, elsewhere): 10x the ~30 s it
    # takes on an idle 2-core machine
    assert dt < 300, f"parsing all files took {dt:.1f} s"
    return out


def test_every_file_parses_to_finite_boxes(parsed):
    assert len(parsed) >= 1600
    for f, props in parsed.items():
        assert props, f
        for p in props:
            n = p.num_inputs
            assert p.input_lo.shape == p.input_hi.shape == (n,), f
            assert torch.isfinite(p.input_lo).all() and torch.isfinite(p.input_hi).all(), f
            assert (p.input_lo <= p.input_hi).all(), f
            C, d, g = p.spec.C, p.spec.d, p.spec.groups
            N = C.shape[0]
            assert C.dim() == 2 and N >= 1 and d.shape == (N,) and g.shape == (N,), f
            assert C.shape[1] == p.num_outputs >= 1, f
            # groups are 0..G-1, each non-empty, and every row reads some output
            G = int(g.max()) + 1
            assert set(g.tolist()) == set(range(G)), f
            assert (C.abs().sum(dim=1) > 0).all(), f


def test_known_files(vnncomp, parsed):
    acas = vnncomp / "2021" / "acasxu"
    # prop 6: an OR over two input regions -> two boxes, the same 4 groups each
    p6 = parsed[acas / "prop_6.vnnlib"]
    assert len(p6) == 2 and all(int(p.spec.groups.max()) + 1 == 4 for p in p6)
    assert p6[0].input_lo[1] > 0 > p6[1].input_hi[1]
    # prop 1: unsafe if Y_0 >= 3.991125645861615 -> row 3.99... - Y_0
    (p1,) = parsed[acas / "prop_1.vnnlib"]
    assert p1.spec.C.tolist() == [[-1.0, 0, 0, 0, 0]] and p1.spec.d.tolist() == [3.991125645861615]
    assert p1.input_lo.tolist() == [0.6, -0.5, -0.5, 0.45, -0.5]
    # every file except prop 6 has a single box
    assert sum(len(v) > 1 for v in parsed.values()) == 1
    # mnistfc robustness specs: 784 inputs in [0, 1], 9 groups of one row each
    (m,) = parsed[vnncomp / "2021" / "mnistfc" / "prop_0_0.03.vnnlib"]
    assert m.num_inputs == 784 and m.num_outputs == 10
    assert m.spec.groups.tolist() == list(range(9))
    assert 0 <= float(m.input_lo.min()) and float(m.input_hi.max()) <= 1


def _io_sizes(onnx_path: str) -> tuple[int, int]:
    g = onnx.load_from_string(open_maybe_gz(onnx_path, text=False)).graph
    inits = {i.name for i in g.initializer}
    inp = [i for i in g.input if i.name not in inits]
    assert len(inp) == 1 and len(g.output) == 1, onnx_path

    def numel(vi) -> int:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        return math.prod(dims)

    return numel(inp[0]), numel(g.output[0])


def test_instance_lists_match_files_and_networks(vnncomp, parsed):
    lists = sorted(p for p in vnncomp.rglob("*instances.csv") if _known(vnncomp, p))
    assert len(lists) == len(EXPECTED_INSTANCES)
    sizes: dict[str, tuple[int, int]] = {}
    by_path = {str(k): v for k, v in parsed.items()}
    for csv_path in lists:
        rows = read_instances(csv_path)
        assert len(rows) == EXPECTED_INSTANCES[csv_path.parent.name], csv_path
        for onnx_path, spec_path, timeout in rows:
            assert Path(onnx_path).exists() and Path(spec_path).exists(), (onnx_path, spec_path)
            assert timeout > 0
            if onnx_path not in sizes:
                sizes[onnx_path] = _io_sizes(onnx_path)
            n_in, n_out = sizes[onnx_path]
            for p in by_path[spec_path]:
                assert (p.num_inputs, p.num_outputs) == (n_in, n_out), (onnx_path, spec_path)
