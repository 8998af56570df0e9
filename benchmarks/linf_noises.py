"""Certified l_inf radii of smoothing noises on the digits MLP: Gaussian (R_2 / sqrt(d)), Laplace
(R_1 / d), uniform (direct l_inf) and the ||z||^-k exp(-||z||^2/2s^2) noise of Zhang et al. 2020
(``smoothing-zhang``, R_2 / sqrt(d)) at several k.

    .venv/bin/python -m benchmarks.linf_noises            # 100 test digits, n = 10,000 (~4 min on 2 cores)
    .venv/bin/python -m benchmarks.linf_noises --n 100000 # ~11 min (the table of the report)
    .venv/bin/python -m benchmarks.linf_noises --quick    # 30 digits (~1 min)

Same model (``digits-mlp-noise``, trained with Gaussian noise sigma 0.25), same inputs, same
n0 / n / alpha / seed, every noise at the same per-coordinate std ``--sigma`` (0.25). Prints a
Markdown table: smoothed clean accuracy, median certified l_inf radius over the inputs (0 when
wrong or abstained), certified accuracy at a few l_inf radii, seconds per input (the first
``smoothing-zhang`` call of a (d, k, sigma) includes the one-time computation of its thresholds).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from verify.data import digits
from verify.digits_model import load_digits_mlp
from verify.registry import get_method
from verify.spec import LpBall, Robust

RADII = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1)


def _rows(sigma: float, ks: list[int]) -> list[tuple[str, str, dict]]:
    rows = [
        ("gaussian (R2/sqrt d)", "smoothing-gaussian", {}),
        ("laplace (R1/d)", "smoothing-laplace", {}),
        ("uniform (direct linf)", "smoothing-uniform", {}),
    ]
    rows += [(f"zhang k={k} (R2/sqrt d)", "smoothing-zhang", {"k": k}) for k in ks]
    return rows


def run(n_inputs: int, n: int, sigma: float, ks: list[int], alpha: float) -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = digits("test", limit=n_inputs)
    net = load_digits_mlp("noise")
    d = math.prod(x.shape[1:])
    head = ["noise", "clean acc", "median r_inf"] + [f"@{r:g}" for r in RADII] + ["s / input"]
    title = (f"{n_inputs} test digits (d = {d}), digits-mlp-noise, sigma = {sigma:g} per coordinate for every noise, "
             f"n0 = 100, n = {n:,}, alpha = {alpha:g}, seed 0; l_inf radii")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(title + "\n\n" + "\n".join(lines), flush=True)
    for label, name, opts in _rows(sigma, ks):
        m = get_method(name, sigma=sigma, n0=100, n=n, alpha=alpha, seed=0, **opts)
        t0 = time.perf_counter()
        certs = m.certify(net, LpBall(x, 0.0, math.inf), Robust(y))
        dt = (time.perf_counter() - t0) / len(certs)
        ok = np.array([c.prediction == c.label for c in certs])
        rad = np.array([c.radius if c.prediction == c.label else 0.0 for c in certs])
        cells = [label, f"{ok.mean():.2f}", f"{np.median(rad):.4f}"]
        cells += [f"{np.mean(ok & (rad >= r)):.2f}" for r in RADII]
        cells.append(f"{dt:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return title + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--ks", default="0,16,32,48,60")
    a = ap.parse_args()
    inputs, n = (30, a.n) if a.quick else (a.inputs, a.n)
    run(inputs, n, a.sigma, [int(k) for k in a.ks.split(",")], a.alpha)  # prints the table row by row


if __name__ == "__main__":
    main()
