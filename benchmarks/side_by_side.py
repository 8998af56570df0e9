"""Two versions of `certify run` (two source trees, or one tree with two option sets) on the same
VNN-COMP instances, alternated per instance so that both meet the same machine load.

Each instance runs once per arm in a fresh process (`python -m verify.cli run -q --per-box --method M
--timeout T`; M is `--method`, default bab), the arm that goes first alternating from one instance to
the next; a line per run goes to the output CSV at once (instance, arm, status, process wall
seconds, `time_s` reported, and from the boxes' certificates the domains bounded in all, the
smallest margin lower bound reached (how far an undecided search got) and the boxes' own seconds),
and a summary per arm is printed at the end.

Usage (from the repository root; an old tree from `git worktree add /tmp/old <commit>`)::

    python benchmarks/side_by_side.py --instances ../shared/benchmarks/vnncomp/2021/eran/eran_instances.csv \\
        --every 2 --timeout-scale 0.1 --arm old=/tmp/old --arm new=. --out eran.csv
    python benchmarks/side_by_side.py --instances .../oval21_instances.csv --timeout 72 \\
        --arm babsr=.:branch_candidates=1 --arm fsb=.:branch_candidates=3 --out oval.csv

An arm is ``NAME=TREE[:K=V[,K=V...]]`` (method options after the colon).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

csv.field_size_limit(2**31 - 1)  # a per-box row holds its counterexample: 12,296 numbers on cctsdb


def parse_arm(text: str) -> tuple[str, Path, list[str]]:
    """``NAME=TREE[:K=V,...]`` -> (name, tree, ``--option`` arguments)."""
    name, _, rest = text.partition("=")
    tree, _, opts = rest.partition(":")
    if not name or not tree:
        raise SystemExit(f"--arm wants NAME=TREE[:K=V,...], got {text!r}")
    args: list[str] = []
    for kv in filter(None, opts.split(",")):
        args += ["--option", kv]
    return name, Path(tree).resolve(), args


def rotated(arms: list, i: int) -> list:
    """The arms in the order instance ``i`` runs them: the first arm alternates per instance."""
    k = i % len(arms)
    return arms[k:] + arms[:k]


def read_list(path: Path, every: int, start: int) -> list[tuple[Path, Path, float]]:
    """Rows ``onnx, vnnlib, timeout`` of a VNN-COMP instance list (paths relative to its folder)."""
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or i < start or (i - start) % every:
                continue
            rows.append((path.parent / row[0].strip(), path.parent / row[1].strip(), float(row[2])))
    return rows


def run_one(tree: Path, options: list[str], onnx: Path, vnnlib: Path, timeout: float, python: str,
            method: str = "bab") -> tuple[str, float, str, str, str, str, str]:
    """One `certify run` in ``tree``: (status, process wall seconds, reported time_s, domains,
    smallest margin lower bound, the boxes' summed time_s, the boxes' reasons and demoted domains;
    "" where the run did not report one)."""
    cli = tree / "verify" / "cli.py"
    per_box = cli.exists() and "--per-box" in cli.read_text()  # older trees write a row per box anyway
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.csv"
        cmd = [python, "-m", "verify.cli", "run", "-q", *(["--per-box"] if per_box else []), "--model", str(onnx),
               "--spec", str(vnnlib), "--method", method, "--timeout", f"{timeout:g}", "--out", str(out), *options]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3 * timeout + 60)
        except subprocess.TimeoutExpired:
            return "killed", time.perf_counter() - t0, "", "", "", "", ""
        wall = time.perf_counter() - t0
        domains, margin, box_s, notes = _box_details(out)
        found = re.search(r"^result: (\w+) in ([0-9.]+) s", proc.stdout, re.M)
        if found is not None:
            return _AS_STATUS.get(found[1], "?"), wall, found[2], domains, margin, box_s, notes
        rows = []  # a tree without the instance line: its first box's row
        if out.exists():
            with open(out, newline="") as f:
                rows = list(csv.DictReader(f))
        if not rows:
            return "error", wall, "", "", "", "", ""
        return rows[0].get("status", "?"), wall, rows[0].get("time_s", ""), domains, margin, box_s, notes


def _box_details(path: Path) -> tuple[str, str, str, str]:
    """The per-box rows' domains (summed), smallest ``margin_lower`` and summed ``time_s`` (the
    methods' own time, without loading: the one time that trees before and after the instance
    line report alike), and the boxes' reasons with the domains the queue demoted (bab's
    ``reason`` and ``demoted`` details); "" when absent."""
    if not path.exists():
        return "", "", "", ""
    domains, margins, box_s, reasons, demoted = [], [], 0.0, set(), 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                box_s += float(row.get("time_s") or 0.0)
            except ValueError:
                pass
            try:
                det = json.loads(row.get("details") or "{}")
            except json.JSONDecodeError:
                continue
            if isinstance(det.get("domains"), int):
                domains.append(det["domains"])
            if det.get("reason"):
                reasons.add(str(det["reason"]))
            if isinstance(det.get("demoted"), int):
                demoted += det["demoted"]
            try:
                margins.append(float(det["margin_lower"]))
            except (KeyError, TypeError, ValueError):
                pass
    notes = ";".join(sorted(reasons)) + (f";demoted {demoted}" if demoted else "")
    return (str(sum(domains)) if domains else ""), (f"{min(margins):.6g}" if margins else ""), f"{box_s:.3f}", notes


#: the instance answer that `run --spec` prints (``result: <answer> in <t> s``) in the words of
#: the certificates
_AS_STATUS = {"unsat": "certified", "sat": "falsified", "timeout": "unknown", "unknown": "unknown", "error": "error"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=Path, required=True, help="a VNN-COMP instances CSV")
    ap.add_argument("--arm", action="append", required=True, help="NAME=TREE[:K=V,...] (two or more)")
    ap.add_argument("--timeout", type=float, help="seconds per instance (default: the list's, times --timeout-scale)")
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=1, help="every k-th instance")
    ap.add_argument("--start", type=int, default=0, help="first instance (0-based line)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--method", default="bab", help="the method every arm runs (default bab)")
    a = ap.parse_args(argv)
    arms = [parse_arm(t) for t in a.arm]
    if len(arms) < 2:
        raise SystemExit("give at least two --arm")
    rows = read_list(a.instances, a.every, a.start)
    totals: dict[str, dict[str, float]] = {name: {} for name, _, _ in arms}
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "onnx", "vnnlib", "arm", "status", "wall_s", "time_s", "timeout_s", "started_utc", "domains",
                    "margin_lower", "box_s", "notes"])
        for i, (onnx, vnn, t_list) in enumerate(rows):
            T = a.timeout if a.timeout is not None else t_list * a.timeout_scale
            for name, tree, opts in rotated(arms, i):
                started = time.strftime("%H:%M:%S", time.gmtime())
                status, wall, time_s, domains, margin, box_s, notes = run_one(tree, opts, onnx, vnn, T, a.python, a.method)
                w.writerow([i, onnx.name, vnn.name, name, status, f"{wall:.2f}", time_s, f"{T:g}", started, domains, margin,
                            box_s, notes])
                f.flush()
                tot = totals[name]
                tot[status] = tot.get(status, 0) + 1
                tot["wall_s"] = tot.get("wall_s", 0.0) + wall
                print(f"{i} {name} {vnn.name} {status} {wall:.1f}s {domains} domains, margin {margin} {notes}", flush=True)
    for name, tot in totals.items():
        counts = ", ".join(f"{k} {int(v)}" for k, v in sorted(tot.items()) if k != "wall_s")
        print(f"{name}: {counts}; process wall {tot.get('wall_s', 0.0):.1f} s")


if __name__ == "__main__":
    main()
