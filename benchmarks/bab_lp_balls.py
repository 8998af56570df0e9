"""Complete verification of l_1 and l_2 balls by ``bab`` on the digits MLP, against exact distances.

For each of the first ``--n`` correctly classified test digits:

* l_1: the exact minimum distortion ``d*`` by MILP (:func:`relax.exact.milp.minimum_distortion`), then
  ``bab`` on the balls of radius ``0.9 d*`` (must be certified) and ``1.1 d*`` (must not be;
  a counterexample is expected);
* l_2: the exact ``d*`` by MIQP when Gurobi can solve it (licence and size), with the same two
  balls; otherwise ``d*`` is bracketed: ``bab`` at ``r / 2`` and at ``r`` with ``r`` the distance
  of the closest adversarial example PGD finds (``d* <= r``); the ball of radius ``r`` must not be
  certified.

Prints one row per digit and norm and a summary (decided, wrong, median time) as markdown.

Usage::

    .venv/bin/python benchmarks/bab_lp_balls.py [--n 20] [--timeout 60]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from relax.exact.milp import minimum_distortion  # noqa: E402
from verify import certify  # noqa: E402
from verify.attack import pgd_attack  # noqa: E402
from verify.data import digits  # noqa: E402
from verify.digits_model import load_digits_mlp  # noqa: E402
from verify.spec import LpBall, Robust  # noqa: E402


def pgd_distance(net, x0: torch.Tensor, label: int, p: float) -> float:
    """Smallest radius on a doubling grid at which PGD finds an adversarial example, refined by
    bisection (an upper bound on d*)."""
    prop = Robust(torch.tensor([label]))

    def found(r: float) -> bool:
        spec = prop.linear(1, 10)
        res = pgd_attack(net, LpBall(x0, r, p, 0.0, 1.0), spec, steps=100, restarts=5, seed=0)
        return bool(res.found[0])

    hi = 0.05
    while not found(hi):
        hi *= 2
        if hi > 64:
            return math.inf
    lo = hi / 2
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if found(mid) else (mid, hi)
    return hi


def exact_rows(net, x0: torch.Tensor, prop: Robust, i: int, d: float, p: float, name: str, timeout: float, stats: list) -> list[str]:
    """bab on the balls of radius 0.9 d* (must be certified) and 1.1 d* (must not be), with
    d* exact: table rows, and ``(status, wrong, seconds)`` appended to ``stats``."""
    rows = []
    for f, want in ((0.9, "certified"), (1.1, "not certified")):
        t = time.perf_counter()
        c = certify(net, LpBall(x0, d * f, p, 0.0, 1.0), prop, "bab", timeout=timeout)[0]
        dt = time.perf_counter() - t
        wrong = (c.status == "certified") != (want == "certified") and c.status != "unknown"
        stats.append((c.status, wrong, dt))
        rows.append(f"| {i} | {name} | {f} x d* = {d * f:.4f} | {c.status} | {want} | {dt:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net = load_digits_mlp("plain").eval()
    x, y = digits("test")
    rows, stats = [], {"l1": [], "l2": []}
    taken = 0
    for i in range(x.shape[0]):
        if taken >= args.n:
            break
        x0, label = x[i:i + 1], int(y[i])
        with torch.no_grad():
            if int(net(x0).argmax()) != label:
                continue
        taken += 1
        prop = Robust(torch.tensor([label]))
        # l_1 against the exact MILP distance
        _, res = minimum_distortion(net, x0, prop, 1.0, (0.0, 1.0), timeout=120, return_details=True)
        if res[0].status == "optimal":
            d = float(res[0].lower)
            rows += exact_rows(net, x0, prop, i, d, 1.0, "l1", args.timeout, stats["l1"])
        # l_2: exact by MIQP where Gurobi (licensed) solves it, else bracketed by PGD
        d2 = None
        try:
            _, res2 = minimum_distortion(net, x0, prop, 2.0, (0.0, 1.0), timeout=120, solver="gurobi", return_details=True)
            if res2[0].status == "optimal":
                d2 = float(res2[0].lower)
        except Exception:  # noqa: BLE001 - no Gurobi, no licence or a size limit: the PGD bracket
            d2 = None
        if d2 is not None:
            rows += exact_rows(net, x0, prop, i, d2, 2.0, "l2 (MIQP)", args.timeout, stats["l2"])
            print(rows[-1], flush=True)
            continue
        r = pgd_distance(net, x0, label, 2.0)
        if math.isfinite(r):
            for f, want in ((0.5, "decided"), (1.0, "not certified")):
                t = time.perf_counter()
                c = certify(net, LpBall(x0, r * f, 2.0, 0.0, 1.0), prop, "bab", timeout=args.timeout)[0]
                dt = time.perf_counter() - t
                wrong = want == "not certified" and c.status == "certified"
                stats["l2"].append((c.status, wrong, dt))
                rows.append(f"| {i} | l2 | {f} x r_pgd = {r * f:.4f} | {c.status} | {want} | {dt:.2f} |")
        print(rows[-1], flush=True)
    print("\n| digit | norm | radius | bab | expected | time (s) |\n|---|---|---|---|---|---:|")
    print("\n".join(rows))
    print("\n| norm | balls | certified | falsified | unknown | wrong | median time (s) |\n|---|---:|---:|---:|---:|---:|---:|")
    for k, v in stats.items():
        if v:
            print(f"| {k} | {len(v)} | {sum(s == 'certified' for s, _, _ in v)} | {sum(s == 'falsified' for s, _, _ in v)} | "
                  f"{sum(s == 'unknown' for s, _, _ in v)} | {sum(w for _, w, _ in v)} | {statistics.median(t for _, _, t in v):.2f} |")


if __name__ == "__main__":
    main()
