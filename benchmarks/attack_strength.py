"""Strength of :func:`verify.attack.pgd_attack` on the digits MLP: PGD accuracy per radius and
number of restarts, measured as in the seed claims (:func:`verify.compare.attack_robust`).

For each restart count (in the order given, one attack per radius on the whole batch) prints
one markdown row per radius:

* ``acc`` -- fraction of the test digits classified correctly and not broken at that radius;
* ``nested acc`` -- not broken at that radius or any smaller one (a larger ball holds the
  smaller ones, so this is the attack's honest upper bound on robust accuracy);
* ``not monotone`` -- inputs broken at a smaller radius but not at this one (an attack that
  misses counterexamples it found in a smaller ball);
* ``lost vs 1`` -- inputs broken with 1 restart but not with this many (needs 1 in the list);
* ``time_s`` -- wall time of the attack at all radii.

The row header names the code measured: the git commit of the checkout holding ``verify``.

Usage::

    .venv/bin/python benchmarks/attack_strength.py [--limit 539] [--norm linf]
        [--eps 0.05 0.075 0.1] [--restarts 1 5] [--steps 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from verify.compare import attack_robust  # noqa: E402
from verify.data import digits  # noqa: E402
from verify.digits_model import load_digits_mlp  # noqa: E402


def code_version() -> str:
    """Short commit of the checkout this script's ``verify`` comes from (``+dirty`` when its
    tracked files differ from that commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, radii: list[float], norm: float,
            steps: int, restarts: int, seed: int) -> tuple[dict[float, torch.Tensor], float]:
    """Per radius, bool ``[N]`` not broken (correct and no counterexample found); and the wall
    time in seconds. ``x [N, 1, 8, 8]``, ``y [N]``."""
    t0 = time.perf_counter()
    robust = attack_robust(net, x, y, radii, norm, steps=steps, restarts=restarts, seed=seed)
    return robust, time.perf_counter() - t0


def rows(robust: dict[float, torch.Tensor], base: dict[float, torch.Tensor] | None) -> list[tuple]:
    """``(radius, acc, nested acc, not monotone, lost vs base)`` per radius, ascending."""
    out, nested, broken_before = [], None, None
    for r in sorted(robust):
        ok = robust[r]
        nested = ok.clone() if nested is None else nested & ok
        not_mono = 0 if broken_before is None else int((broken_before & ok).sum())
        broken_before = ~ok if broken_before is None else broken_before | ~ok
        lost = "" if base is None else int((~base[r] & ok).sum())
        n = len(ok)
        out.append((r, int(ok.sum()) / n, int(nested.sum()) / n, not_mono, lost))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N test digits (default: all 539)")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.075, 0.1])
    ap.add_argument("--restarts", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y = digits("test", limit=a.limit)
    net = load_digits_mlp("noise")
    norm = math.inf if a.norm == "linf" else 2.0
    print(f"code {code_version()}, {len(y)} test digits, {a.norm}, steps {a.steps}, seed {a.seed}")
    print("| restarts | radius | acc | nested acc | not monotone | lost vs 1 | time_s |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for R in a.restarts:
        robust, secs = measure(net, x, y, a.eps, norm, a.steps, R, a.seed)
        base = robust if R == 1 and base is None else base
        for r, acc, nacc, nm, lost in rows(robust, None if R == 1 else base):
            print(f"| {R} | {r:g} | {acc:.3f} | {nacc:.3f} | {nm} | {lost} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
