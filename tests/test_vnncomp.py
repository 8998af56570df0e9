"""VNN-COMP runner: result-file format (checked with onnxruntime), disjunct semantics,
incremental CSV + resume, the CLI hooks and run_instance.sh. The nets are tiny ONNX files
written here with ``onnx.helper``; one test uses ../shared."""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from verify.vnncomp import (
    CSV_COLUMNS,
    InstanceResult,
    add_vnncomp_parser,
    main,
    run_benchmark,
    run_instance,
    run_vnncomp_command,
    summarize_rows,
    write_result_file,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _onnx_mlp(path: Path, seed: int = 0, sizes=(2, 8, 8, 2)) -> None:
    """A small ReLU MLP as an ONNX file (MatMul + Add + Relu, opset 13), input [1, n]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "X"
    for i in range(len(sizes) - 1):
        W = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        b = (rng.standard_normal(sizes[i + 1]) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]))
        out = "Y" if i == len(sizes) - 2 else f"a{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out if i == len(sizes) - 2 else f"z{i}"]))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        cur = out
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, sizes[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, sizes[-1]])], inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(path))


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"X": x.astype(np.float32).reshape(1, -1)})[0].reshape(-1).astype(np.float64)


def _vnnlib(boxes: list[list[tuple[float, float]]], out_atoms: str) -> str:
    """A violation over ``boxes`` (one disjunct each) and an output condition."""
    n = len(boxes[0])
    txt = "".join(f"(declare-const X_{i} Real)\n" for i in range(n))
    txt += "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    if len(boxes) == 1:
        for i, (lo, hi) in enumerate(boxes[0]):
            txt += f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n"
    else:
        parts = []
        for bx in boxes:
            parts.append("(and " + " ".join(f"(>= X_{i} {lo}) (<= X_{i} {hi})" for i, (lo, hi) in enumerate(bx)) + ")")
        txt += "(assert (or " + " ".join(parts) + "))\n"
    return txt + f"(assert {out_atoms})\n"


def _margin_range(path: Path, box) -> tuple[float, float]:
    """min / max of y0 - y1 over an 11 x 11 grid of a 2-D box (onnxruntime)."""
    xs = np.linspace(box[0][0], box[0][1], 11)
    ys = np.linspace(box[1][0], box[1][1], 11)
    vals = [_ort(path, np.array([a, b])) for a in xs for b in ys]
    m = [v[0] - v[1] for v in vals]
    return min(m), max(m)


@pytest.fixture()
def bench(tmp_path: Path) -> Path:
    """A benchmark folder: 2 nets, 3 vnnlib files (one sat, one unsat, one 2-disjunct)."""
    d = tmp_path / "toy"
    d.mkdir()
    _onnx_mlp(d / "net0.onnx", 0)
    _onnx_mlp(d / "net1.onnx", 1)
    box = [(-1.0, 1.0), (-1.0, 1.0)]
    lo0, _ = _margin_range(d / "net0.onnx", box)
    # sat: y1 >= y0 somewhere when y0 - y1 dips below 0 on the grid (else a condition every
    # output meets); either way a point of the box violates
    sat_atom = "(>= Y_1 Y_0)" if lo0 < 0 else "(<= Y_0 10000.0)"
    (d / "sat.vnnlib").write_text(_vnnlib([box], sat_atom))
    # unsat: y0 >= 1e4 is impossible for these small nets on the box
    (d / "unsat.vnnlib").write_text(_vnnlib([box], "(>= Y_0 10000.0)"))
    # two input boxes, each with an impossible output: unsat overall
    (d / "disj.vnnlib").write_text(_vnnlib([[(-1, 0), (-1, 0)], [(0, 1), (0, 1)]], "(>= Y_0 10000.0)"))
    (d / "instances.csv").write_text("net0.onnx,sat.vnnlib,20\nnet0.onnx,unsat.vnnlib,20\nnet1.onnx,disj.vnnlib,20")
    return d


def _parse_result(text: str) -> tuple[str, dict[str, float]]:
    lines = text.strip().splitlines()
    vals = {m.group(1): float(m.group(2)) for m in re.finditer(r"\((X_\d+|Y_\d+)\s+([-+0-9.eE]+)\)", text)}
    return lines[0].strip(), vals


def test_sat_result_file_is_confirmed_by_onnxruntime(bench, tmp_path):
    res = run_instance(str(bench / "net0.onnx"), str(bench / "sat.vnnlib"), 20)
    assert res.result == "sat"
    out = tmp_path / "r.txt"
    write_result_file(out, res)
    word, vals = _parse_result(out.read_text())
    assert word == "sat"
    x = np.array([vals["X_0"], vals["X_1"]])
    y = np.array([vals["Y_0"], vals["Y_1"]])
    assert ((x >= -1 - 1e-4) & (x <= 1 + 1e-4)).all()
    y_ort = _ort(bench / "net0.onnx", x)
    assert np.allclose(y, y_ort, rtol=1e-3, atol=1e-6)
    assert y_ort[1] >= y_ort[0]  # the violation (>= Y_1 Y_0) holds


def test_unsat_and_disjuncts(bench, tmp_path):
    assert run_instance(str(bench / "net0.onnx"), str(bench / "unsat.vnnlib"), 20).result == "unsat"
    assert run_instance(str(bench / "net1.onnx"), str(bench / "disj.vnnlib"), 20).result == "unsat"
    # one disjunct reachable (the whole box is a counterexample: no output atom bites) -> sat
    d = bench / "mixed.vnnlib"
    d.write_text(_vnnlib([[(-1, 0), (-1, 0)], [(0, 1), (0, 1)]], "(<= Y_0 10000.0)"))
    r = run_instance(str(bench / "net1.onnx"), str(d), 20)
    assert r.result == "sat"
    out = tmp_path / "r.txt"
    write_result_file(out, r)
    assert out.read_text().startswith("sat\n((X_0 ")


def test_result_file_words(tmp_path):
    for word in ("unsat", "timeout", "unknown", "error"):
        p = tmp_path / f"{word}.txt"
        write_result_file(p, InstanceResult(word, 1.0))
        assert p.read_text() == word + "\n"


def test_missing_file_is_error_not_guess(bench):
    r = run_instance(str(bench / "nope.onnx"), str(bench / "sat.vnnlib"), 5)
    assert r.result == "error"


def test_incremental_csv_and_resume(bench, tmp_path):
    out = tmp_path / "res.csv"
    rows = run_benchmark(bench, out=out, limit=2, progress=False)
    assert [r["result"] for r in rows] == ["sat", "unsat"]
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 and list(got[0].keys()) == CSV_COLUMNS
    with pytest.raises(FileExistsError):
        run_benchmark(bench, out=out, progress=False)
    rows2 = run_benchmark(bench, out=out, resume=True, progress=False)
    assert [r["vnnlib"] for r in rows2] == ["disj.vnnlib"]
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["vnnlib"] for r in got] == ["sat.vnnlib", "unsat.vnnlib", "disj.vnnlib"]
    s = summarize_rows(got)
    assert (s["verified"], s["falsified"], s["unknown"], s["errors"]) == (2, 1, 0, 0)
    assert run_benchmark(bench, out=out, resume=True, progress=False) == []


def test_claims_flag_disagreement(bench, tmp_path):
    claims = tmp_path / "claims.csv"
    claims.write_text("benchmark,onnx,vnnlib,majority\ntoy,net0.onnx,unsat.vnnlib,sat\n")
    rows = run_benchmark(bench, out=tmp_path / "c.csv", limit=2, claims=claims, progress=False)
    assert rows[1]["flag"].startswith("DISAGREES")
    assert summarize_rows(rows)["flagged"]


def test_cli_hooks(bench, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    add_vnncomp_parser(sub)
    args = ap.parse_args(["vnncomp", str(bench / "instances.csv"), "--out", str(tmp_path / "o.csv"), "--limit", "1", "--quiet"])
    assert run_vnncomp_command(args) == 0
    assert "verified 0, falsified 1" in capsys.readouterr().out
    # python -m verify.vnncomp instance ...
    rf = tmp_path / "inst.txt"
    assert main(["instance", str(bench / "net0.onnx"), str(bench / "unsat.vnnlib"), str(rf), "20"]) == 0
    assert rf.read_text() == "unsat\n"


def test_certify_run_takes_a_gzipped_model_by_its_plain_name(bench, capsys):
    """VNN-COMP lists name ``net.onnx`` where the folder holds ``net.onnx.gz`` only (as the
    VNN-LIB files): `certify run --model net.onnx` reads the ``.gz``."""
    import gzip

    from verify.cli import main as cli_main

    plain = bench / "net0.onnx"
    (bench / "net0.onnx.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert cli_main(["run", "-q", "--model", str(plain), "--spec", str(bench / "unsat.vnnlib"), "--method", "bab",
                     "--timeout", "20", "--out", ""]) == 0
    assert capsys.readouterr().out.startswith("result: unsat in ")
    assert cli_main(["run", "-q", "--model", str(bench / "net9.onnx"), "--spec", str(bench / "unsat.vnnlib"),
                     "--method", "bab", "--out", ""]) != 0
    assert "model file not found" in capsys.readouterr().err


def test_run_instance_sh(bench, tmp_path):
    rf = tmp_path / "sh.txt"
    script = REPO / "benchmarks" / "vnncomp" / "run_instance.sh"
    env = {"CERTIFY_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    p = subprocess.run(["bash", str(script), "v1", "toy", str(bench / "net0.onnx"), str(bench / "sat.vnnlib"), str(rf), "30"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    word, vals = _parse_result(rf.read_text())
    assert word == "sat" and {"X_0", "X_1", "Y_0", "Y_1"} <= set(vals)
    bad = subprocess.run(["bash", str(script), "v2", "toy", "a", "b", str(rf), "30"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0


@pytest.mark.shared
def test_shared_test_benchmark(shared_dir, tmp_path):
    """The 2021 'test' benchmark: 4 unsat + 1 sat, as published."""
    rows = run_benchmark(shared_dir / "benchmarks" / "vnncomp" / "2021" / "test", out=tmp_path / "t.csv", progress=False)
    got = {(r["onnx"], r["vnnlib"]): r["result"] for r in rows}
    assert got[("test_sat.onnx", "test_prop.vnnlib")] == "sat"
    assert got[("test_unsat.onnx", "test_prop.vnnlib")] == "unsat"
    assert sum(v == "unsat" for v in got.values()) == 4
