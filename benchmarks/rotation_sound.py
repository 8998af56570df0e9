"""``smoothing-rotation`` on the test digits (``digits-mlp-noise``): the single-rotation
certificate (``sound=False``, valid only for the clean image rotated once by ``theta + beta``)
against the sound one (``sound=True``, valid for the real interpolated attacked image;
Fischer et al. 2020, Sec. 4-5).

Prints one markdown row per configuration and angle: certified accuracy (fraction of inputs
certified with the correct label at that angle), the mean interpolation-error bound ``E``
(sound only), and the wall time per input. The header names the git commit measured.

Usage::

    .venv/bin/python benchmarks/rotation_sound.py [--limit 40] [--angles 1 2 5] [--n 10000]
        [--n-err 1000] [--alpha 0.001]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python benchmarks/x.py` puts benchmarks/ first on the path
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import subprocess
import time

import numpy as np
import torch

from verify.data import load_data
from verify.digits_model import load_digits_mlp
from verify.registry import get_method
from verify.spec import LpBall, Robust

CONFIGS = [
    ("single rotation (sound=False)", dict(sound=False, sigma=10.0)),
    ("sound, sigma=10 deg, sigma_l2=0.25", dict(sound=True, sigma=10.0, sigma_l2=0.25)),
    ("sound, sigma=2 deg, sigma_l2=0.25", dict(sound=True, sigma=2.0, sigma_l2=0.25)),
    ("sound, sigma=2 deg, sigma_l2=0.5", dict(sound=True, sigma=2.0, sigma_l2=0.5)),
]


def _commit() -> str:
    here = Path(__file__).resolve().parent
    return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--angles", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--n-err", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_data("digits", limit=a.limit)
    model = load_digits_mlp("noise").eval()
    print(f"commit {_commit()}, {len(y)} test digits, n={a.n}, n0=100, alpha={a.alpha}, n_err={a.n_err}\n")
    print("| certificate | angle (deg) | certified acc | mean E | time/input (s) |")
    print("|---|---|---|---|---|")
    for label, opts in CONFIGS:
        m = get_method("smoothing-rotation", n=a.n, n0=100, alpha=a.alpha, n_err=a.n_err, **opts) if opts["sound"] else \
            get_method("smoothing-rotation", n=a.n, n0=100, alpha=a.alpha, **opts)
        for ang in a.angles:
            t0 = time.perf_counter()
            certs = m.certify(model, LpBall(x, ang, 2), Robust(y))
            dt = (time.perf_counter() - t0) / len(y)
            acc = np.mean([c.status == "certified" for c in certs])
            E = np.mean([c.details["E"] for c in certs]) if opts["sound"] else float("nan")
            e_s = f"{E:.3f}" if opts["sound"] else "-"
            print(f"| {label} | {ang:g} | {acc:.3f} | {e_s} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()
