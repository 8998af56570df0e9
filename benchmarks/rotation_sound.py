"""``smoothing-rotation`` and ``smoothing-translation`` on the test digits (``digits-mlp-noise``):
the single-transform certificate (``sound=False``, valid only for the clean image transformed
once by ``theta + beta``) against the sound one (``sound=True``, valid for the real interpolated
attacked image; Fischer et al. 2020, Sec. 4-5).

Prints one markdown row per configuration and range (degrees / pixels, l2 length of the shift):
certified accuracy (fraction of inputs certified with the correct label at that range), the mean
interpolation-error bound ``E`` (sound only), and the wall time per input. With ``--timeouts``
it prints instead how far past each timeout the sound modes answer (a search of ~``n_err``
samples cut by the deadline). The header names the git commit measured.

Usage::

    .venv/bin/python benchmarks/rotation_sound.py [--limit 40] [--angles 1 2 5] [--shifts 0.25 0.5 1]
        [--n 10000] [--n-err 1000] [--alpha 0.001] [--transforms rotation translation]
    .venv/bin/python benchmarks/rotation_sound.py --timeouts 0.05 0.1 0.2 0.5 1 [--repeats 5]
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

CONFIGS = {
    "rotation": [
        ("single rotation (sound=False)", dict(sound=False, sigma=10.0)),
        ("sound, sigma=10 deg, sigma_l2=0.25", dict(sound=True, sigma=10.0, sigma_l2=0.25)),
        ("sound, sigma=2 deg, sigma_l2=0.25", dict(sound=True, sigma=2.0, sigma_l2=0.25)),
        ("sound, sigma=2 deg, sigma_l2=0.5", dict(sound=True, sigma=2.0, sigma_l2=0.5)),
    ],
    "translation": [
        ("single translation (sound=False), sigma=0.25 px", dict(sound=False, sigma=0.25)),
        ("sound, sigma=0.5 px, sigma_l2=0.25", dict(sound=True, sigma=0.5, sigma_l2=0.25)),
        ("sound, sigma=0.25 px, sigma_l2=0.5", dict(sound=True, sigma=0.25, sigma_l2=0.5)),
        ("sound, sigma=0.1 px, sigma_l2=1.0", dict(sound=True, sigma=0.1, sigma_l2=1.0)),
    ],
}
METHOD = {"rotation": "smoothing-rotation", "translation": "smoothing-translation"}


def _commit() -> str:
    here = Path(__file__).resolve().parent
    return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def _table(x, y, model, a) -> None:
    print("| transform | certificate | range | certified acc | mean E | time/input (s) |")
    print("|---|---|---|---|---|---|")
    for tr in a.transforms:
        for label, opts in CONFIGS[tr]:
            extra = dict(n_err=a.n_err) if opts["sound"] else {}
            m = get_method(METHOD[tr], n=a.n, n0=100, alpha=a.alpha, **extra, **opts)
            for rng in (a.angles if tr == "rotation" else a.shifts):
                t0 = time.perf_counter()
                certs = m.certify(model, LpBall(x, rng, 2), Robust(y))
                dt = (time.perf_counter() - t0) / len(y)
                acc = np.mean([c.status == "certified" for c in certs])
                e_s = f"{np.mean([c.details['E'] for c in certs]):.3f}" if opts["sound"] else "-"
                unit = "deg" if tr == "rotation" else "px"
                print(f"| {tr} | {label} | {rng:g} {unit} | {acc:.3f} | {e_s} | {dt:.2f} |", flush=True)


def _overruns(x, y, model, a) -> None:
    """Wall time past the timeout of the sound modes, whose error search alone would take far
    longer (``n_err`` = 200000); sampling ``n=500`` fits in every timeout."""
    print("| method | timeout (s) | max wall (s) | max overrun (s) | statuses |")
    print("|---|---|---|---|---|")
    for tr in a.transforms:
        m = get_method(METHOD[tr], n=500, n0=50, alpha=0.01, n_err=200_000)
        m.certify(model, LpBall(x[:1], 1.0, 2), Robust(y[:1]), timeout=0.01)  # imports
        for to in a.timeouts:
            walls, st = [], set()
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                certs = m.certify(model, LpBall(x, 1.0, 2), Robust(y), timeout=to)
                walls.append(time.perf_counter() - t0)
                st |= {c.status for c in certs}
            print(f"| {METHOD[tr]} | {to:g} | {max(walls):.3f} | {max(walls) - to:+.3f} | {', '.join(sorted(st))} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--angles", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--shifts", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--transforms", nargs="+", choices=sorted(CONFIGS), default=["rotation", "translation"])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--n-err", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--timeouts", type=float, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, y = load_data("digits", limit=a.limit)
    model = load_digits_mlp("noise").eval()
    if a.timeouts:
        print(f"commit {_commit()}, {len(y)} test digits per call, n=500, n0=50, n_err=200000, {a.repeats} repeats\n")
        _overruns(x, y, model, a)
        return
    print(f"commit {_commit()}, {len(y)} test digits, n={a.n}, n0=100, alpha={a.alpha}, n_err={a.n_err}\n")
    _table(x, y, model, a)


if __name__ == "__main__":
    main()
