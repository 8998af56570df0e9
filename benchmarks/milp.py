"""Exact MILP verification (method ``milp``, HiGHS or Gurobi) on the VNN-COMP 2021 mnistfc 256x2 instances.

Reads ``<shared>/benchmarks/vnncomp/2021/mnistfc/mnistfc_instances.csv`` (30 instances of
``mnist-net_256x2.onnx``, l_inf eps 0.03 / 0.05, 120 s timeout each), loads the ONNX network with
:func:`verify.model.load_model` and each property with :func:`verify.vnnlib.parse_vnnlib`, and
runs ``MilpMethod.certify`` with the instance's timeout. Counterexamples are re-checked with
onnxruntime. Prints a Markdown table and writes it to ``benchmarks/out/milp.md``.

Usage::

    .venv/bin/python benchmarks/milp.py [--shared ../shared] [--limit N] [--net mnist-net_256x2.onnx] [--solver gurobi]

``--solver gurobi`` needs gurobipy with a licence; the pip licence (2000 variables / 2000
constraints) holds these MILPs after :class:`relax.solvers.GurobiBackend` substitutes the defined
columns (~800-1100 variables). The table records the solver each instance's MILP used and its
model size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.report_file import publish  # noqa: E402
from relax.methods.solvers import MilpMethod  # noqa: E402
from verify.model import load_model  # noqa: E402
from verify.vnnlib import parse_vnnlib, read_instances  # noqa: E402

RESULT = {"certified": "unsat", "falsified": "sat", "unknown": "timeout/unknown", "error": "error"}


def _onnx_check(onnx_path: Path, x: np.ndarray, spec, shape) -> str:
    """Re-evaluate a counterexample with onnxruntime: "ok" if it violates the property there."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime missing"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    y = sess.run(None, {inp.name: x.reshape(1, *shape).astype(np.float32)})[0].reshape(1, -1)
    s = spec.linear(1, y.shape[1], dtype=torch.float64)
    return "violated" if not bool(s.holds(torch.from_numpy(y).double())[0]) else "NOT violated"


def _majority(shared: Path) -> dict[str, str]:
    """``{vnnlib name: "sat" | "unsat"}`` of the published 2021 majority for this network, if the
    claims file is in the shared directory."""
    path = shared / "benchmarks" / "vnncomp2021_instance_claims.csv"
    out: dict[str, str] = {}
    if path.is_file():
        import csv

        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["benchmark"] == "mnistfc":
                    out[(r["onnx"], r["vnnlib"])] = r["majority"]
    return out


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared data directory")
    ap.add_argument("--net", default="mnist-net_256x2.onnx")
    ap.add_argument("--limit", type=int, default=None, help="first N instances only")
    ap.add_argument("--timeout", type=float, default=None, help="override the per-instance timeout")
    ap.add_argument("--solver", default="highs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "milp.md"))
    args = ap.parse_args(argv)

    bench = Path(args.shared) / "benchmarks" / "vnncomp" / "2021" / "mnistfc"
    if not bench.is_dir():
        print(f"no mnistfc benchmark under {bench}", file=sys.stderr)
        return 2
    inst = [(o, v, t) for o, v, t in read_instances(bench / "mnistfc_instances.csv") if Path(o).name == args.net]
    if args.limit:
        inst = inst[: args.limit]
    torch.set_num_threads(1)
    load0 = _load()
    gm = load_model(bench / args.net)
    majority = _majority(Path(args.shared))
    shape = tuple(gm.input_shape)
    rows = []
    for onnx, vnn, tmo in inst:
        timeout = args.timeout or float(tmo)
        props = parse_vnnlib(bench / Path(vnn).name, dtype=torch.float32)  # box rounded outward
        t0 = time.perf_counter()
        c0 = time.process_time()
        statuses, notes, cert = [], [], None
        for prop in props:  # one input box per file here
            box = prop.box(shape)
            m = MilpMethod(solver=args.solver, time_limit=timeout)
            left = timeout - (time.perf_counter() - t0)
            cert = m.certify(gm, box, prop.spec, timeout=left)[0]
            statuses.append(cert.status)
            if cert.status == "falsified":
                x = np.asarray(cert.counterexample, dtype=np.float32).reshape(-1)
                notes.append(f"found by {cert.details.get('found_by', '?')}; onnxruntime: " + _onnx_check(bench / Path(onnx).name, x, prop.spec, shape))
                break
            if cert.status != "certified":
                break
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        status = "falsified" if "falsified" in statuses else ("certified" if statuses and all(s == "certified" for s in statuses) else "unknown")
        det = cert.details if cert is not None else {}
        ref = det.get("refine", {})
        rows.append(
            {
                "instance": Path(vnn).stem,
                "result": RESULT[status],
                "majority": majority.get((args.net, Path(vnn).name), "?"),
                "time_s": elapsed,
                "cpu_s": cpu,
                "timeout": timeout,
                "unstable": f"{ref.get('unstable_before', '?')}->{ref.get('unstable_after', '?')}",
                "lp_proved": det.get("lp_proved_groups", ""),
                "milp_groups": len(det.get("groups", {})),
                "bounds": det.get("bounds", ""),
                "solver": det.get("solver", args.solver) + (
                    f" ({det['milp']['solver_variables']} vars / {det['milp']['solver_constraints']} cons)"
                    if "solver_variables" in det.get("milp", {}) else ""),
                "note": "; ".join(notes + ([det["reason"]] if det.get("reason") else []))[:80],
            }
        )
        r = rows[-1]
        print(f"{r['instance']:>16}  {r['result']:>16} (majority {r['majority']:>5})  {r['time_s']:7.1f}s (cpu {r['cpu_s']:6.1f}s)  unstable {r['unstable']:>10}  {r['note']}", flush=True)

    times = [r["time_s"] for r in rows]
    cpus = [r["cpu_s"] for r in rows]
    solved = [r for r in rows if r["result"] in ("sat", "unsat")]
    in_time = [r for r in solved if r["time_s"] <= r["timeout"]]
    disagree = [r["instance"] for r in solved if r["majority"] in ("sat", "unsat") and r["majority"] != r["result"]]
    lines = [
        f"# milp on mnistfc {args.net} (solver {args.solver}, {len(rows)} instances)",
        "",
        f"Command: `.venv/bin/python benchmarks/milp.py --solver {args.solver}{' --limit ' + str(args.limit) if args.limit else ''}`",
        "",
        "| instance | result | 2021 majority | wall (s) | cpu (s) | unstable (CROWN -> LP-refined) | groups proved by LP | MILPs run | MILP solver | note |",
        "|---|---|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['instance']} | {r['result']} | {r['majority']} | {r['time_s']:.1f} | {r['cpu_s']:.1f} | {r['unstable']} | {r['lp_proved']} | {r['milp_groups']} | {r['solver']} | {r['note']} |")
    lines += [
        "",
        f"- decided: {len(solved)}/{len(rows)} (unsat {sum(r['result'] == 'unsat' for r in rows)}, sat {sum(r['result'] == 'sat' for r in rows)}); "
        f"within their timeout: {len(in_time)}/{len(rows)}",
        f"- disagreements with the published 2021 majority: {', '.join(disagree) if disagree else 'none'}",
        f"- wall time: median {statistics.median(times):.1f} s, total {sum(times):.1f} s, max {max(times):.1f} s; "
        f"cpu time: median {statistics.median(cpus):.1f} s, total {sum(cpus):.1f} s, max {max(cpus):.1f} s" if times else "- no instances",
        f"- machine load average (1 min) at start / end: {load0} / {_load()} on {os.cpu_count()} cores",
        f"- bounds: {rows[0]['bounds'] if rows else ''}; torch threads 1, solver threads 1",
    ]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
