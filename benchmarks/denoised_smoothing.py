"""Denoised smoothing on the digits (Salman et al. 2020): certified accuracy vs l2 radius.

The four variants of the demo (:data:`verify.demo.DENOISED_VARIANTS`) at sigma 0.25: the plain
digits MLP smoothed, the shipped MSE and stability denoisers in front of it
(``smoothing-denoised``), and the noise-trained MLP smoothed; on the digits test split, for each
``--n`` (estimation samples; ``n0 = 100``, ``alpha = 0.001``, seed 0). Prints one Markdown table
per ``n`` with the date, commit and load average (1 min) at the start and end.

Usage::

    .venv/bin/python benchmarks/denoised_smoothing.py [--limit 539] [--n 5000,100000]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python benchmarks/x.py` puts benchmarks/ first on the path
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import datetime
import os
import subprocess

import torch

from verify.data import digits
from verify.demo import denoised_comparison
from verify.report import format_markdown


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first k test digits (default: all 539)")
    ap.add_argument("--n", default="5000,100000", help="estimation samples, comma-separated")
    ap.add_argument("--radii", default="0,0.25,0.5,0.75,1.0")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    radii = [float(r) for r in a.radii.split(",")]
    x, y = digits("test", limit=a.limit)
    start, load0 = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]
    print(f"{start:%Y-%m-%d %H:%M} UTC, commit {_commit()}, {len(y)} test digits, sigma 0.25, n0 100, alpha 0.001, "
          f"seed 0, one torch thread, {os.cpu_count()} cores")
    for n in (int(v) for v in a.n.split(",")):
        rows = denoised_comparison(x, y, radii, {"n": n, "n0": 100, "alpha": 0.001, "seed": 0})
        print(f"\n### n = {n:,}\n")
        cols = [(k, k) for k in rows[0]]
        cells = [{k: (f"{v:.1f}" if k == "seconds" else f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        print(format_markdown(cells, cols))
    print(f"\nload average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
