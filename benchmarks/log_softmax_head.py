"""Robustness certified through a log-softmax head: the shipped digits MLP with and without
``log_softmax(z, dim=1)`` appended (as tutorial networks end), CROWN and alpha-CROWN on the first
``--n`` test digits at several l_inf radii.

``log_softmax(z)_i - log_softmax(z)_j = z_i - z_j``, so a sound verifier can certify exactly as
many inputs with the head as without it; the counts and the worst margins show how close a tree's
bounds come to that. Also prints the summed width of the ten output entries' bounds (single
entries: the head's own relaxation) for the log-softmax net.

    python benchmarks/log_softmax_head.py --n 100
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relax.bounds import bounds  # noqa: E402
from verify import certify  # noqa: E402
from verify.data import digits  # noqa: E402
from verify.digits_model import load_digits_mlp  # noqa: E402
from verify.spec import Box  # noqa: E402


class _Head(nn.Module):
    """``log_softmax(net(x), dim=1)`` (functional: older trees bound only that form)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", default="0.01,0.02,0.03,0.04")
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, y = digits("test", limit=a.n)
    plain = load_digits_mlp().double().eval()
    head = _Head(plain).double().eval()
    print("| eps | method | certified without the head | with the log-softmax head | worst margin gap | entry widths (head) | time (head) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for eps in (float(e) for e in a.eps.split(",")):
        for method in ("crown", "alpha-crown"):
            res = {}
            for name, net in (("plain", plain), ("head", head)):
                t0 = time.perf_counter()
                table = certify(net, x.double(), y, method, eps=eps, dtype=torch.float64)
                res[name] = (table, time.perf_counter() - t0)
            n_plain = sum(c.status == "certified" for c in res["plain"][0])
            n_head = sum(c.status == "certified" for c in res["head"][0])
            gap = max(abs(min(c1.lower) - min(c2.lower)) for c1, c2 in zip(res["plain"][0], res["head"][0]) if c1.lower and c2.lower)
            flat = x.double().reshape(len(x), -1)
            lo, hi = bounds(head, Box((flat - eps).clamp(0, 1).view_as(x), (flat + eps).clamp(0, 1).view_as(x)), method=method)
            print(f"| {eps:g} | {method} | {n_plain} | {n_head} | {gap:.3g} | {float((hi - lo).sum()):.6g} | {res['head'][1]:.2f} s |")


if __name__ == "__main__":
    main()
