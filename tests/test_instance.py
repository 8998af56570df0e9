"""The one instance driver (verify/instance.py) behind `certify run --spec`, `certify vnncomp`
and run_instance.sh: one time budget per instance, counterexamples projected into the box in
the model's dtype and confirmed by onnxruntime, VNN-COMP result files from every path,
relative paths in run_instance.sh, a non-zero exit when a row errored. Tiny ONNX files are
written here with onnx.helper."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from verify.certificate import Certificate, CertificateTable
from verify.cli import main as cli_main
from verify.confirm import VNNCOMP_ATOL, project_into_box
from verify.instance import run_instance
from verify.vnncomp import run_benchmark

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _onnx_identity(path: Path) -> Path:
    """``y = (x0, 0)`` for one float32 input ``[1, 1]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.array([[1.0, 0.0]], dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "id",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(W, "W")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _spec(boxes: list[tuple[float, float]], out_atom: str) -> str:
    """VNN-LIB over X_0 (one disjunct per box) and Y_0, Y_1."""
    txt = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    if len(boxes) == 1:
        txt += f"(assert (>= X_0 {boxes[0][0]}))\n(assert (<= X_0 {boxes[0][1]}))\n"
    else:
        txt += "(assert (or " + " ".join(f"(and (>= X_0 {lo}) (<= X_0 {hi}))" for lo, hi in boxes) + "))\n"
    return txt + f"(assert {out_atom})\n"


# The float32 box [999.9999, 1000.00004] holds the float32 values 999.99994 and 1000.0; the
# upper bound rounds to nearest to 1000.000061, 2.1e-5 outside (within VNN-COMP's 1e-4, far
# beyond the old 1e-6 check). Only x = 1000.0 violates (Y_0 >= 999.99997) in the box.
ULP_BOX = (999.9999, 1000.00004)
ULP_ATOM = "(>= Y_0 999.99997)"


@pytest.fixture()
def ulp_instance(tmp_path: Path) -> tuple[Path, Path]:
    onnx_path = _onnx_identity(tmp_path / "id.onnx")
    spec = tmp_path / "ulp.vnnlib"
    spec.write_text(_spec([ULP_BOX], ULP_ATOM))
    return onnx_path, spec


def _parse_result(text: str) -> tuple[str, dict[str, float]]:
    vals = {m.group(1): float(m.group(2)) for m in re.finditer(r"\((X_\d+|Y_\d+)\s+([-+0-9.eE]+)\)", text)}
    return text.splitlines()[0].strip(), vals


def _check_sat_file(text: str, onnx_path: Path) -> None:
    """The file is a VNN-COMP sat answer that onnxruntime confirms exactly, X inside the box."""
    import onnxruntime as ort

    word, vals = _parse_result(text)
    assert word == "sat" and set(vals) == {"X_0", "Y_0", "Y_1"}
    assert text.startswith("sat\n((X_0 ") and "\n (Y_0 " in text
    x = vals["X_0"]
    assert ULP_BOX[0] <= x <= ULP_BOX[1]
    y = ort.InferenceSession(str(onnx_path)).run(None, {"X": np.array([[x]], dtype=np.float32)})[0].reshape(-1)
    assert y[0] == vals["Y_0"] and y[0] >= 999.99997


# ---------------------------------------------------------------------------------------- projection


def test_project_into_box_clamps_in_the_final_dtype():
    # float32(0.1) = 0.100000001 > 0.1: clamping in float64 first, then casting, leaves the box
    x = project_into_box([0.1, -0.1, 0.05], [0.0, -0.1, 0.0], [0.1, 0.0, 0.1], np.float32)
    assert x.dtype == np.float32
    assert float(x[0]) <= 0.1 and float(x[1]) >= -0.1 and float(x[2]) == float(np.float32(0.05))
    assert float(x[0]) == float(np.nextafter(np.float32(0.1), np.float32(0)))
    # a box thinner than one float32 step: the nearest value, within the competition's tolerance
    t = project_into_box([5.0], [1000.00001], [1000.00002], np.float32)
    assert abs(float(t[0]) - 1000.00001) <= VNNCOMP_ATOL
    # float64 models: nothing to round
    assert project_into_box([0.1], [0.0], [0.1], np.float64)[0] == 0.1


def test_counterexample_one_ulp_outside_is_projected_and_sat(ulp_instance):
    """The issue's case: bab's float32 counterexample lies just outside the box; the old
    vnncomp check (1e-6) answered unknown, the driver projects it and answers sat."""
    onnx_path, spec = ulp_instance
    r = run_instance(str(onnx_path), str(spec), 20)
    assert r.result == "sat", r.per_box
    assert ULP_BOX[0] <= r.x[0] <= ULP_BOX[1] and r.x[0] == 1000.0 and r.y == [1000.0, 0.0]


# ---------------------------------------------------------------------------------------- time budget


def _stub_certify(calls: list, status: str = "unknown", counterexample=None):
    """A ``certify`` that records the timeout it gets and uses all of it."""

    def certify(net, inputs, prop, method, *, timeout=None, **kw):
        calls.append(timeout)
        time.sleep(timeout or 0.0)
        c = Certificate(method=str(method), guarantee="deterministic", status=status, norm="box",
                        counterexample=counterexample, time_s=timeout or 0.0,
                        details={"reason": "timeout" if status == "unknown" else "counterexample"})
        t = CertificateTable()
        t.extend([c])
        return t

    return certify


@pytest.mark.parametrize("path", ["run --spec", "vnncomp"])
def test_disjuncts_share_one_time_budget(ulp_instance, tmp_path, monkeypatch, capsys, path):
    onnx_path, _ = ulp_instance
    spec = tmp_path / "two.vnnlib"
    spec.write_text(_spec([(0.0, 1.0), (2.0, 3.0)], "(>= Y_0 10000.0)"))
    calls: list = []
    monkeypatch.setattr("verify.api.certify", _stub_certify(calls))
    budget = 1.0
    t0 = time.perf_counter()
    if path == "run --spec":
        code = cli_main(["run", "--model", str(onnx_path), "--spec", str(spec), "--method", "interval",
                         "--timeout", str(budget), "--out", ""])
        assert code == 0 and "result: timeout" in capsys.readouterr().out
    else:
        assert run_instance(str(onnx_path), str(spec), budget).result == "timeout"
    elapsed = time.perf_counter() - t0
    assert len(calls) == 2 and all(t is not None and t < budget for t in calls)
    assert calls[0] <= budget / 2 and sum(calls) <= budget
    assert elapsed < budget + 1.5  # the old run --spec slept 2 x budget


def test_spent_budget_leaves_later_boxes_unstarted(ulp_instance, tmp_path, monkeypatch):
    onnx_path, _ = ulp_instance
    spec = tmp_path / "two.vnnlib"
    spec.write_text(_spec([(0.0, 1.0), (2.0, 3.0)], "(>= Y_0 10000.0)"))
    calls: list = []
    stub = _stub_certify(calls)
    monkeypatch.setattr("verify.api.certify", lambda *a, timeout=None, **k: stub(*a, timeout=2 * timeout, **k))
    r = run_instance(str(onnx_path), str(spec), 0.5)
    assert r.result == "timeout" and len(calls) == 1
    assert [c.details["vnncomp_result"] for c in r.certificates] == ["timeout", "timeout"]
    assert r.detail == "open: timeout, not started"  # why it stayed open, for the results' detail column


def test_unconfirmed_counterexample_is_no_claim(ulp_instance, monkeypatch, capsys):
    """A method's 'falsified' whose point onnxruntime does not confirm is unknown on every
    path (the old `run --spec` trusted the method's torch check)."""
    onnx_path, spec = ulp_instance
    monkeypatch.setattr("verify.api.certify", _stub_certify([], "falsified", counterexample=[[999.9999]]))
    assert cli_main(["run", "--model", str(onnx_path), "--spec", str(spec), "--method", "interval", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert "result: unknown" in out and "result: sat" not in out
    assert run_instance(str(onnx_path), str(spec), 5).result == "unknown"


# ---------------------------------------------------------------------------------------- result files


def test_run_spec_writes_the_vnncomp_result_file(ulp_instance, tmp_path, capsys):
    onnx_path, spec = ulp_instance
    rf = tmp_path / "out" / "result.txt"
    code = cli_main(["run", "--model", str(onnx_path), "--spec", str(spec), "--method", "bab", "--timeout", "20",
                     "--result-file", str(rf), "--out", str(tmp_path / "r.json")])
    assert code == 0 and "result: sat" in capsys.readouterr().out
    _check_sat_file(rf.read_text(), onnx_path)
    rec = json.loads((tmp_path / "r.json").read_text())  # the instance's record holds the same counterexample
    text = rf.read_text()
    assert rec["result"] == "sat" and all(f"(X_{i} {v!r})" in text for i, v in enumerate(rec["x"]))
    assert all(f"(Y_{j} {v!r})" in text for j, v in enumerate(rec["y"]))


def test_vnncomp_writes_counterexamples_and_exits_nonzero_on_errors(ulp_instance, tmp_path, capsys):
    onnx_path, spec = ulp_instance
    bench = onnx_path.parent
    (bench / "instances.csv").write_text("id.onnx,ulp.vnnlib,20\nmissing.onnx,ulp.vnnlib,20\n")
    out = tmp_path / "res" / "r.csv"
    rows = run_benchmark(bench, out=out, progress=False)
    assert [r["result"] for r in rows] == ["sat", "error"]
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert got[0]["counterexample"] and not got[1]["counterexample"]
    _check_sat_file((out.parent / got[0]["counterexample"]).read_text(), onnx_path)
    # the command: exit 1 with an errored row, the cause on stderr
    code = cli_main(["vnncomp", str(bench), "--out", str(tmp_path / "r2.csv"), "--quiet"])
    cap = capsys.readouterr()
    assert code == 1 and "errors 1" in cap.out and "missing.onnx" in cap.err
    assert "r2_counterexamples" in cap.out and (tmp_path / "r2_counterexamples").is_dir()


def test_vnncomp_exit_zero_without_errors(ulp_instance, tmp_path):
    onnx_path, _ = ulp_instance
    (onnx_path.parent / "instances.csv").write_text("id.onnx,ulp.vnnlib,20\n")
    assert cli_main(["vnncomp", str(onnx_path.parent), "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0


def test_resume_into_a_csv_without_the_counterexample_column(ulp_instance, tmp_path):
    onnx_path, _ = ulp_instance
    bench = onnx_path.parent
    (bench / "instances.csv").write_text("id.onnx,ulp.vnnlib,20\nid.onnx,ulp2.vnnlib,20\n")
    (bench / "ulp2.vnnlib").write_text(_spec([ULP_BOX], "(>= Y_0 10000.0)"))
    old_cols = ["benchmark", "onnx", "vnnlib", "result", "time_s", "timeout_s", "stage", "claim", "flag", "detail"]
    out = tmp_path / "old.csv"
    out.write_text(",".join(old_cols) + "\n" + f"{bench.name},id.onnx,ulp.vnnlib,sat,1.0,20,,,,\n")
    rows = run_benchmark(bench, out=out, resume=True, progress=False)
    assert [r["vnnlib"] for r in rows] == ["ulp2.vnnlib"]
    with open(out, newline="") as f:
        got = list(csv.reader(f))
    assert all(len(r) == len(old_cols) for r in got) and got[-1][3] == "unsat"


# ---------------------------------------------------------------------------------------- run_instance.sh


def test_run_instance_sh_accepts_relative_paths(ulp_instance, tmp_path):
    onnx_path, spec = ulp_instance
    script = REPO / "benchmarks" / "vnncomp" / "run_instance.sh"
    env = {"CERTIFY_PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    (onnx_path.parent / "res").mkdir()
    p = subprocess.run(["bash", str(script), "v1", "toy", onnx_path.name, spec.name, "res/out.txt", "30"],
                       cwd=onnx_path.parent, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    _check_sat_file((onnx_path.parent / "res" / "out.txt").read_text(), onnx_path)


def test_run_spec_with_a_torch_model_confirms_in_its_dtype(ulp_instance, tmp_path, capsys):
    """Without an ONNX file the point is projected into the box in the model's float32 and
    confirmed by a single-input forward pass; the result file has X and Y."""
    _, spec = ulp_instance
    net = torch.nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0], [0.0]]))
        net.bias.zero_()
    pt = tmp_path / "id.pt"
    torch.save(net, pt)
    rf = tmp_path / "r.txt"
    code = cli_main(["run", "--model", str(pt), "--spec", str(spec), "--method", "bab", "--timeout", "20",
                     "--result-file", str(rf), "--out", ""])
    assert code == 0 and "result: sat" in capsys.readouterr().out
    word, vals = _parse_result(rf.read_text())
    assert word == "sat" and ULP_BOX[0] <= vals["X_0"] <= ULP_BOX[1] and vals["Y_0"] == vals["X_0"] == 1000.0


@pytest.mark.parametrize("with_violation", [False, True])
def test_many_boxes_are_bounded_together_first(tmp_path, with_violation):
    """An instance with many boxes (nn4sys: up to 60,000) of few free inputs is first split and
    bounded on all boxes at once (:mod:`relax.bab.many_boxes`); what that proves is unsat without
    a per-box search, and a box that holds a violation is found there (sat, confirmed by
    onnxruntime)."""
    onnx_path = _onnx_identity(tmp_path / "id.onnx")
    boxes = [(float(k), k + 0.5) for k in range(30)]
    if with_violation:
        boxes[17] = (100.0, 101.0)
    spec = tmp_path / "many.vnnlib"
    spec.write_text(_spec(boxes, "(>= Y_0 50.0)"))
    res = run_instance(onnx_path, spec, 60)
    stages = [c.details.get("stage") for c in res.certificates]
    if with_violation:
        assert res.result == "sat" and 100.0 <= res.x[0] <= 101.0 and res.stage == "batched-split"
        assert stages == ["batched-split"] * 18 and res.certificates[-1].details["confirmed_by"] == "onnxruntime"
    else:
        assert res.result == "unsat" and len(res.certificates) == 30 and stages == ["batched-split"] * 30


@pytest.mark.parametrize("with_violation", [False, True])
def test_many_boxes_of_many_free_inputs_are_bounded_together_by_crown(with_violation):
    """Boxes with more free inputs than the batched splitting serves (8 > ``SPLIT_MAX_FREE``) are
    bounded by CROWN all at once instead; a violating box is still found by its own search."""
    from verify.instance import SPLIT_MAX_FREE

    net = torch.nn.Linear(8, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
        net.bias.zero_()
    n = 8
    assert n > SPLIT_MAX_FREE
    boxes = [(float(k), k + 0.5) for k in range(30)]
    if with_violation:
        boxes[17] = (100.0, 101.0)
    txt = "".join(f"(declare-const X_{i} Real)\n" for i in range(n)) + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    txt += "(assert (or " + " ".join("(and " + " ".join(f"(>= X_{i} {lo}) (<= X_{i} {hi})" for i in range(n)) + ")"
                                     for lo, hi in boxes) + "))\n(assert (>= Y_0 50.0))\n"
    res = run_instance(net, txt, 60)
    stages = [c.details.get("stage") for c in res.certificates]
    if with_violation:
        assert res.result == "sat" and 100.0 <= res.x[0] <= 101.0 and stages[:17] == ["batched-crown"] * 17
    else:
        assert res.result == "unsat" and stages == ["batched-crown"] * 30


class _SlowMatch:
    """A compiled pattern whose ``match`` takes at least ``delay`` seconds."""

    def __init__(self, pattern, delay: float):
        self.pattern, self.delay = pattern, delay

    def match(self, *args):
        time.sleep(self.delay)
        return self.pattern.match(*args)


@pytest.mark.parametrize("path", ["run_instance", "raise_errors", "run --spec"])
def test_a_file_not_read_in_time_is_a_timeout_on_time(tmp_path, monkeypatch, capsys, path):
    """Reading counts in the instance's budget and stops at its deadline: the answer is timeout
    soon after the budget, not after the whole file. The clause matcher is slowed to 2 ms a
    clause (3,000 clauses: at least 6 s to read) so that no machine reads the file in time."""
    import verify.vnnlib as vl

    onnx_path = _onnx_identity(tmp_path / "id.onnx")
    spec = tmp_path / "slow.vnnlib"
    spec.write_text(_spec([(float(k), k + 0.5) for k in range(3000)], "(>= Y_0 50000.0)"))
    monkeypatch.setattr(vl, "_FAST_CLAUSE", _SlowMatch(vl._FAST_CLAUSE, 0.002))
    budget = 0.5
    t0 = time.perf_counter()
    if path == "run --spec":
        rf = tmp_path / "result.txt"
        code = cli_main(["run", "--model", str(onnx_path), "--spec", str(spec), "--method", "bab", "--timeout", str(budget),
                         "--out", "", "--result-file", str(rf)])
        assert code == 0 and "result: timeout" in capsys.readouterr().out and rf.read_text() == "timeout\n"
    else:
        res = run_instance(str(onnx_path), str(spec), budget, raise_errors=path == "raise_errors")
        assert res.result == "timeout" and res.stage == "read" and not res.certificates
    assert time.perf_counter() - t0 < budget + 3.0


def test_on_box_gets_each_box_as_it_is_decided(ulp_instance):
    """run_instance(on_box=) hands over every box's final certificate, in box order, with its answer."""
    onnx_path, spec = ulp_instance
    seen: list = []
    res = run_instance(str(onnx_path), str(spec), 20, method="bab", on_box=lambda c: seen.append((c.index, c.details["vnncomp_result"])))
    assert res.result == "sat" and seen == [(c.index, c.details["vnncomp_result"]) for c in res.certificates] and seen[-1][1] == "sat"


def test_competition_entry_takes_the_device_from_the_environment(ulp_instance, tmp_path, monkeypatch, capsys):
    """``run_instance.sh`` has fixed arguments: ``$CERTIFY_DEVICE`` names the device; one this
    machine lacks makes the answer ``error`` naming it (never a guess)."""
    import torch

    from verify.vnncomp import main

    if torch.cuda.device_count() > 9:
        return
    onnx_path, spec = ulp_instance
    monkeypatch.setenv("CERTIFY_DEVICE", "cuda:9")
    out = tmp_path / "r.txt"
    assert main(["instance", str(onnx_path), str(spec), str(out), "30"]) == 0
    assert out.read_text().strip() == "error"
    assert "cuda:9" in capsys.readouterr().out
    monkeypatch.setenv("CERTIFY_DEVICE", "cpu")
    assert main(["instance", str(onnx_path), str(spec), str(out), "30"]) == 0
    assert out.read_text().startswith("sat")
