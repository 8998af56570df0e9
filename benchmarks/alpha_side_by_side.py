"""alpha-CROWN's bound on VNN-COMP instances by two source trees, alternated per instance.

Per instance (the first input box of the VNN-LIB file, float64) each tree computes
``relax.bounds.alpha.alpha_crown`` with its defaults (20 steps, intermediate bounds optimised) in a fresh
process; a line per run goes to the output CSV at once: the worst spec row's lower bound
``lb_min`` (> 0: the box is proved), the mean over the rows, and the seconds of the call.

Usage (from the repository root; an old tree from ``git worktree add /tmp/old <commit>``)::

    python benchmarks/alpha_side_by_side.py --pairs pairs.txt --arm old=/tmp/old --arm new=. --out alpha.csv

``pairs.txt``: one ``ONNX,VNNLIB`` (paths) per line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from side_by_side import parse_arm, rotated  # the sibling script: arms and their alternation


def one(onnx: str, vnnlib: str, iterations: int) -> dict:
    """The bound of the first box of ``vnnlib`` on ``onnx`` with the tree on ``sys.path``."""
    import torch

    from relax.bounds.alpha import alpha_crown
    from relax.bounds import prepare
    from verify.model import load_model
    from verify.spec import Box
    from verify.vnnlib import parse_vnnlib

    torch.set_num_threads(1)
    net = load_model(onnx)
    p = parse_vnnlib(vnnlib)[0]
    shape = net.input_shape
    box = Box(p.input_lo.reshape(1, *shape).double(), p.input_hi.reshape(1, *shape).double())
    graph, xs = prepare(net, box, torch.float64)
    t0 = time.perf_counter()
    r = alpha_crown(graph, xs, p.spec.C.unsqueeze(0).double(), iterations=iterations)
    dt = time.perf_counter() - t0
    lb = r.lower[0] + p.spec.d.double()
    return {"lb_min": float(lb.min()), "lb_mean": float(lb.mean()), "seconds": dt}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, help="lines ONNX,VNNLIB")
    ap.add_argument("--arm", action="append", default=[], help="NAME=TREE (two or more)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("ONNX", "VNNLIB"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.iterations)))
        return
    if a.pairs is None or a.out is None or len(a.arm) < 2:
        raise SystemExit("give --pairs, --out and at least two --arm NAME=TREE")
    arms = [parse_arm(t)[:2] for t in a.arm]
    pairs = [line.strip().split(",") for line in a.pairs.read_text().splitlines() if line.strip()]
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "onnx", "vnnlib", "arm", "lb_min", "lb_mean", "seconds"])
        for i, (onnx, vnn) in enumerate(pairs):
            for name, tree in rotated(arms, i):
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", onnx, vnn, "--iterations", str(a.iterations)],
                                   cwd=tree, env=env, capture_output=True, text=True)
                d = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {}
                w.writerow([i, Path(onnx).name, Path(vnn).name, name, d.get("lb_min", "error"), d.get("lb_mean", ""),
                            round(d["seconds"], 2) if d else ""])
                f.flush()
                print(i, name, Path(vnn).name, d.get("lb_min", r.stderr.strip().splitlines()[-1:] if r.stderr else "error"), flush=True)


if __name__ == "__main__":
    main()
