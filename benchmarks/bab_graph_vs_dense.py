"""The graph branch-and-bound against the dense one, on the networks both can decide.

Random 20-30-30-3 ReLU MLPs (seeded), a random centre in [0, 1]^20, the exact l_inf minimum
distortion ``d*`` by MILP (or, if the MILP does not finish, the distance of a PGD example), and
the balls of radius ``f d*`` for ``f`` in 0.5, 0.8, 0.95: ``bab`` with ``split=relu`` (the dense
engine, :mod:`relax.bab_relu`) and with ``dense_limit=1`` (the graph engine,
:mod:`relax.bab_graph`), one after the other per ball. Prints answer, time and domains of each.

Usage::

    .venv/bin/python benchmarks/bab_graph_vs_dense.py [--nets 4] [--timeout 20]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fuzz_soundness as fz  # noqa: E402
from verify import certify  # noqa: E402
from verify.spec import LpBall, Robust  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| net | f | d* | dense: answer, s, domains | graph: answer, s, domains |\n|---|---|---|---|---|")
    for seed in range(args.nets):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 3)).eval()
        gm = torch.fx.symbolic_trace(mlp)
        gm.input_shape = (20,)
        x0 = torch.rand(1, 20)
        with torch.no_grad():
            label = int(gm(x0).argmax())
        prop = Robust(torch.tensor([label]))
        w = fz.find_witness(gm, "mlp", x0, prop, math.inf)
        for f in (0.5, 0.8, 0.95):
            ball = LpBall(x0, w.dist * f, math.inf, 0.0, 1.0)
            cells = []
            for opts in ({"split": "relu"}, {"dense_limit": 1}):
                t = time.perf_counter()
                c = certify(gm, ball, prop, "bab", timeout=args.timeout, method_options=opts)[0]
                cells.append(f"{c.status} ({c.details.get('stage')}), {time.perf_counter() - t:.2f}, {c.details.get('domains')}")
            print(f"| {seed} | {f} | {w.dist:.4f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
