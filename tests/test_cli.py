"""The certify command line, called in-process (``main([...])``) and once as the console script."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cli_error
from verify.cli import main
from verify.digits_model import load_digits_mlp
from verify.options import Options, option
from verify.registry import BoundMethod, list_methods, register


@dataclass(frozen=True, kw_only=True)
class _ScaleOptions(Options):
    scale: float = option(1.0, "a test option")


@register
class _TestInterval(BoundMethod):
    """Interval bounds for Flatten/Linear/ReLU chains: the fallback while relax has no method."""

    name = "test-interval"
    summary = "interval bounds for Linear/ReLU chains (tests only)"
    norms = ("linf", "l2", "box")

    opts: _ScaleOptions

    def lower_bounds(self, model, inputs, spec):
        lo, hi = inputs.bounds()
        for node in model.graph.nodes:
            if node.op != "call_module":
                continue
            m = model.get_submodule(node.target)
            if isinstance(m, nn.Flatten):
                lo, hi = lo.flatten(1), hi.flatten(1)
            elif isinstance(m, nn.ReLU):
                lo, hi = lo.clamp_min(0), hi.clamp_min(0)
            elif isinstance(m, nn.Linear):
                c, r = m((lo + hi) / 2), ((hi - lo) / 2) @ m.weight.abs().T
                lo, hi = c - r, c + r
            else:
                raise ValueError(f"test-interval: unsupported module {type(m).__name__}")
        c, r = (lo + hi) / 2, (hi - lo) / 2
        return torch.einsum("bnk,bk->bn", spec.C, c) - torch.einsum("bnk,bk->bn", spec.C.abs(), r) + spec.d


METHOD = "interval"
REQUIRED = {"method", "status", "radius", "time_s", "guarantee", "certifies", "index", "label", "prediction", "eps", "norm"}




def test_methods_lists_registered(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in list_methods().items():
        assert name in out
    assert "options:" in out and "scale=1.0" in out  # the test method's option and default


def test_run_writes_csv(model_pt, tmp_path, capsys):
    out = tmp_path / "r.csv"
    rc = main(["run", "--model", str(model_pt), "--data", "digits", "--limit", "12", "--eps", "0.01",
               "--method", METHOD, "--radius", "--max-radius", "0.1", "--out", str(out), "-q"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12 and REQUIRED <= set(rows[0])
    assert {r["method"] for r in rows} == {METHOD} and [int(r["index"]) for r in rows] == list(range(12))
    assert all(float(r["radius"]) >= 0 for r in rows)
    text = capsys.readouterr().out
    assert "cert@0.01" in text and "12 rows" in text


def _digit_spec(tmp_path, boxes: int = 1) -> Path:
    """A VNN-LIB file with ``boxes`` boxes of +-0.001 around a test digit (a disjunction when
    more than one); the violation: the next class beats the label."""
    from verify.data import digits

    x, y = digits("test", limit=1)
    lab, other = int(y[0]), (int(y[0]) + 1) % 10
    lines = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    clauses = []
    for b in range(boxes):
        w = 1e-3 * (b + 1)
        atoms = [f"(>= X_{i} {max(0.0, v - w)}) (<= X_{i} {min(1.0, v + w)})" for i, v in enumerate(x.flatten().tolist())]
        clauses.append("(and " + " ".join(atoms) + ")")
    lines.append(f"(assert (or {' '.join(clauses)}))")
    lines.append(f"(assert (<= Y_{lab} Y_{other}))")
    spec = tmp_path / "p.vnnlib"
    spec.write_text("\n".join(lines))
    return spec


def test_run_vnnlib(model_pt, tmp_path, capsys):
    # one record for the instance (the JSON of --out), not a list of boxes
    spec = _digit_spec(tmp_path)
    out = tmp_path / "r.json"
    assert main(["run", "--model", str(model_pt), "--spec", str(spec), "--method", METHOD, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "result: unsat" in text
    rec = json.loads(out.read_text())
    assert rec["result"] == "unsat" and rec["boxes"] == 1 and rec["box_answers"] == "1 unsat" and rec["x"] is None


def test_run_vnnlib_quiet_one_line(model_pt, tmp_path, capsys):
    """A VNN-LIB file is one property: ``-q`` prints one line however many boxes it has, and
    the CSV holds one row for the instance."""
    spec = _digit_spec(tmp_path, boxes=12)
    out = tmp_path / "r.csv"
    assert main(["run", "-q", "--model", str(model_pt), "--spec", str(spec), "--method", METHOD, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("result: unsat in ") and "12 boxes: 12 unsat" in lines[0]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["result"] == "unsat" and rows[0]["boxes"] == "12" and rows[0]["vnnlib"] == "p.vnnlib"


def test_run_vnnlib_per_box(model_pt, tmp_path, capsys):
    """``--per-box`` keeps the per-box detail: a line per box and one certificate row per box."""
    spec = _digit_spec(tmp_path, boxes=3)
    out = tmp_path / "r.json"
    assert main(["run", "-q", "--per-box", "--model", str(model_pt), "--spec", str(spec), "--method", METHOD,
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["property 0", "property 1", "property 2", "result"]
    rows = json.loads(out.read_text())
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "certified" and r["details"]["vnncomp_result"] == "unsat" for r in rows)


def test_run_vnnlib_per_box_csv(model_pt, tmp_path, capsys):
    """A CSV of boxes holds one certificate row per box (read back by CertificateTable)."""
    from verify.certificate import CertificateTable

    spec = _digit_spec(tmp_path, boxes=3)
    out = tmp_path / "boxes.csv"
    assert main(["run", "-q", "--per-box", "--model", str(model_pt), "--spec", str(spec), "--method", METHOD,
                 "--out", str(out)]) == 0
    rows = CertificateTable.from_csv(str(out))
    assert [c.index for c in rows] == [0, 1, 2] and all(c.details["vnncomp_result"] == "unsat" for c in rows)
    assert all(c.details["vnnlib"] == "p.vnnlib" for c in rows)


class _InterruptedInterval(_TestInterval):
    """test-interval that is interrupted (Ctrl-C) on its third call; registered by the fixture
    below only, so that no run over every method meets it."""

    name = "test-interrupted"
    calls = 0
    watch: Path | None = None  # a file whose lines are counted when the interruption comes
    lines_then = -1

    def lower_bounds(self, model, inputs, spec):
        type(self).calls += 1
        if type(self).calls == 3:
            if self.watch is not None:
                type(self).lines_then = len(self.watch.read_text().splitlines())
            raise KeyboardInterrupt
        return super().lower_bounds(model, inputs, spec)


@pytest.fixture()
def interrupted_method():
    from verify import registry

    register(_InterruptedInterval)
    _InterruptedInterval.calls, _InterruptedInterval.watch, _InterruptedInterval.lines_then = 0, None, -1
    yield _InterruptedInterval.name
    registry._REGISTRY.pop(_InterruptedInterval.name, None)


def test_run_vnnlib_per_box_csv_is_written_as_it_goes(model_pt, tmp_path, capsys, interrupted_method, monkeypatch):
    """The rows of the boxes decided are in the file while the run goes on (flushed at once with
    FLUSH_S = 0), and an interrupted run keeps them."""
    from verify.cli import _PerBox

    monkeypatch.setattr(_PerBox, "FLUSH_S", 0.0)
    spec = _digit_spec(tmp_path, boxes=5)
    out = tmp_path / "boxes.csv"
    _InterruptedInterval.watch = out
    assert main(["run", "-q", "--per-box", "--model", str(model_pt), "--spec", str(spec), "--method", interrupted_method,
                 "--out", str(out)]) == 130
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["index"] for r in rows] == ["0", "1"] and all(r["status"] == "certified" for r in rows)
    assert _InterruptedInterval.lines_then == 3  # the header and two rows were on disk before the third box


def test_per_box_needs_spec(model_pt, capsys):
    argv = ["run", "--model", str(model_pt), "--data", "digits", "--eps", "0.1", "--method", METHOD, "--per-box"]
    assert "--per-box is for --spec runs" in cli_error(capsys, argv)


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--model", "missing.pt", "--data", "digits", "--eps", "0.1"], "model file not found"),
        (["--model", "{pt}", "--data", "missing.npz", "--eps", "0.1"], "no such file"),
        (["--model", "{pt}", "--data", "digits", "--eps", "-0.1"], "--eps must be"),
        (["--model", "{pt}", "--data", "digits", "--eps", "0.1", "--norm", "l3"], "norm"),
        (["--model", "{pt}", "--data", "digits", "--eps", "0.1", "--option", "nonsense=1"], "has no option 'nonsense'"),
        (["--model", "{pt}", "--data", "digits", "--eps", "0.1", "--option", "novalue"], "key=value"),
        (["--model", "{pt}", "--spec", "missing.vnnlib"], "spec file not found"),
        (["--model", "{pt}", "--eps", "0.1"], "--eps needs --data"),
    ],
)
def test_run_errors_one_line(model_pt, capsys, args, cause):
    args = [a.replace("{pt}", str(model_pt)) for a in args]
    assert cause in cli_error(capsys, ["run", "--method", METHOD, *args])


def test_other_errors_one_line(model_pt, tmp_path, capsys):
    argv = ["run", "--model", str(model_pt), "--data", "digits", "--eps", "0.1", "--method", "no-such-method"]
    assert "unknown method 'no-such-method'" in cli_error(capsys, argv)
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 oops))\n")
    assert "bad.vnnlib" in cli_error(capsys, ["run", "--model", str(model_pt), "--spec", str(bad), "--method", METHOD])
    cli_error(capsys, ["frobnicate"])
    with pytest.MonkeyPatch.context() as mp:  # ray absent: a one-line error naming the extra
        mp.setitem(sys.modules, "ray", None)
        argv = ["compare", "--model", str(model_pt), "--data", "digits", "--radii", "0,0.1", "--executor", "ray",
                "--methods", METHOD]
        assert "certify[ray]" in cli_error(capsys, argv)
    with pytest.raises(ValueError):  # --debug: the traceback is not swallowed
        main(["run", "--model", str(model_pt), "--data", "digits", "--eps", "0.1", "--norm", "l3", "--method", METHOD, "--debug"])


def test_console_script_error():
    exe = Path(sys.executable).with_name("certify")
    if not exe.exists():
        pytest.skip("the certify console script is not installed in this environment")
    r = subprocess.run([str(exe), "run", "--model", "missing.onnx", "--spec", "x.vnnlib", "--method", METHOD],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("certify: error: ")


def test_compare_resume(model_pt, tmp_path, capsys):
    base = ["compare", "--model", str(model_pt), "--data", "digits", "--methods", METHOD, "--radii", "0,0.01",
            "--out", str(tmp_path), "--chunk-size", "4", "--no-attack", "--max-radius", "0.05", "-q"]
    assert main([*base, "--limit", "8"]) == 0
    assert main([*base, "--limit", "12", "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "compare_results.csv")))
    assert sorted(int(r["index"]) for r in rows) == list(range(12))  # 8 kept, 4 new, none twice
    assert (tmp_path / "compare.png").is_file() and "## Summary" in (tmp_path / "compare.md").read_text()
    assert "resumed: 8" in capsys.readouterr().err


def test_demo_small(tmp_path, capsys, monkeypatch):
    import verify.demo as demo

    monkeypatch.setitem(demo.DEMO_OPTIONS, "smoothing-*", {**demo.DEMO_OPTIONS["smoothing-*"], "n": 500, "n0": 50})
    # exact solvers take seconds per input: 2 inputs of lp, none of the others in this test
    # (lipschitz-sdp's LipSDP solves cost ~35 s per norm; the exact-radius table of the demo
    # is tested in tests/test_demo_exact.py)
    monkeypatch.setattr(demo, "DEMO_LIMITS", {"lp": 2, "milp": 0, "sdp": 0, "lipschitz-sdp": 0, "bab*": 0, "alpha-crown": 2})
    assert main(["demo", "--limit", "10", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "certified accuracy on 10 test digits" in out and "cert@0.025" in out and METHOD in out
    for norm in ("linf", "l2"):
        assert (tmp_path / f"demo_{norm}.png").is_file()
        rows = list(csv.DictReader(open(tmp_path / f"demo_{norm}_results.csv")))
        per_method = {m: sum(r["method"] == m for r in rows) for m in {r["method"] for r in rows}}
        assert METHOD in per_method and all(n == (2 if m in ("lp", "alpha-crown") else 10) for m, n in per_method.items())
        assert not any(r["status"] == "error" for r in rows), [r["details"] for r in rows if r["status"] == "error"][:1]


def test_process_executor_matches_local(tmp_path):
    """Workers are fresh processes: they see only methods registered by the package."""
    from verify.compare import compare
    from verify.data import digits

    x, y = digits("test", limit=6)
    net = load_digits_mlp()
    kw = dict(radii=[0.0, 0.01], norm="inf", max_radius=0.05, attack=False, progress=False)
    loc = compare(net, x, y, ["interval"], out_dir=tmp_path / "a", **kw)
    pro = compare(net, x, y, ["interval"], out_dir=tmp_path / "b", executor="process", workers=1, chunk_size=3, **kw)
    assert [c.index for c in pro.table] == list(range(6))
    assert [c.radius for c in pro.table] == pytest.approx([c.radius for c in loc.table], abs=1e-6)


def test_ray_executor_matches_local(tmp_path):
    """A local Ray instance gives the same table as the in-process run, a deterministic and a
    probabilistic method (seeded per input, so chunking does not change the smoothing counts)."""
    ray = pytest.importorskip("ray", reason="ray is an optional extra: pip install 'certify[ray]'")
    from verify.compare import compare
    from verify.data import digits

    x, y = digits("test", limit=6)
    net = load_digits_mlp()
    methods = ["interval", "smoothing-gaussian"]
    opts = {"smoothing-gaussian": {"n": 200, "n0": 20, "sigma": 0.25, "alpha": 0.01}}
    kw = dict(radii=[0.0, 0.01], norm="inf", max_radius=0.05, attack=False, progress=False, options=opts)
    loc = compare(net, x, y, methods, out_dir=tmp_path / "a", **kw)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        dist = compare(net, x, y, methods, out_dir=tmp_path / "b", executor="ray", workers=2, chunk_size=2, **kw)
    finally:
        ray.shutdown()

    def rows(t):
        return sorted((c.method, c.index, c.status, round(c.radius, 6)) for c in t.table)

    assert rows(dist) == rows(loc)
    assert len(rows(loc)) == 12
    assert (tmp_path / "b" / "compare_results.csv").is_file()
