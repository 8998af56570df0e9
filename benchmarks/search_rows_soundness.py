"""Soundness of `bab`'s `search_rows` (the search bounds only each group's best rows at the root).

Random ReLU MLPs (2 or 3 hidden layers, 4-8 inputs, 3-6 outputs; every third with each layer's
weights 1e3 ** 0.25 times larger), a box around a random point of [0, 1]^n, and the property
"some output exceeds t" (one group of one row per output, plus their averages), with t a share
-0.3, -0.1, -0.02, 0 or 0.02 of the least largest output of 20,000 samples away from it. Each
case is decided by the exact MILP (`milp`) and by `bab --split relu` with `search_rows` 1 and 2;
a certified / falsified answer of `bab` that differs from the MILP's is a false answer.

Usage (from the repository root)::

    python benchmarks/search_rows_soundness.py --nets 60 --seed 600
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verify.api import certify  # noqa: E402
from verify.spec import Box, Linear  # noqa: E402

SHARES = (-0.3, -0.1, -0.02, 0.0, 0.02)


def _case(seed: int) -> tuple[nn.Module, Box, float, int]:
    """The net, the box, the least sampled largest output and the number of outputs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_in, width, n_out = 4 + seed % 5, 8 + 4 * (seed % 4), 3 + seed % 4
    layers: list[nn.Module] = [nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    if seed % 2:
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, n_out)).eval()
    with torch.no_grad():
        first = net[0]
        assert isinstance(first, nn.Linear)
        first.weight.mul_(6.0)  # the box maps to a wide range of several outputs
        first.bias.sub_(first.weight.sum(1) * 0.5)
        if seed % 3 == 0:
            for m in net:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(1e3 ** 0.25)
    x0 = torch.rand(1, n_in, generator=g)
    r = 0.05 + 0.1 * float(torch.rand(1, generator=g))
    lo, hi = (x0 - r).clamp(0, 1), (x0 + r).clamp(0, 1)
    with torch.no_grad():
        least = float(net(lo + (hi - lo) * torch.rand(20000, n_in, generator=g)).max(1).values.min())
    return net, Box(lo, hi), least, n_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", type=int, default=60)
    ap.add_argument("--seed", type=int, default=600)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds of each bab run")
    a = ap.parse_args(argv)
    t0, wrong = time.perf_counter(), 0
    counts: Counter[tuple[int, str, str]] = Counter()
    for seed in range(a.seed, a.seed + a.nets):
        net, box, least, n_out = _case(seed)
        for share in SHARES:
            t = least + share * abs(least)
            spec = Linear(torch.eye(n_out, dtype=torch.float64), torch.full((n_out,), -t, dtype=torch.float64),
                          torch.zeros(n_out, dtype=torch.long))
            exact = certify(net, box, spec, "milp", timeout=60)[0].status
            for rows in (1, 2):
                got = certify(net, box, spec, "bab", timeout=a.timeout, method_options={"split": "relu", "search_rows": rows})[0].status
                counts[(rows, exact, got)] += 1
                if exact in ("certified", "falsified") and got in ("certified", "falsified") and got != exact:
                    wrong += 1
                    print(f"FALSE ANSWER: seed {seed}, share {share}, search_rows {rows}: milp {exact}, bab {got}", flush=True)
    print(f"cases {sum(counts.values())}, false answers {wrong}, {time.perf_counter() - t0:.0f} s")
    for (rows, exact, got), n in sorted(counts.items()):
        print(f"search_rows {rows}: milp {exact}, bab {got}: {n}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
