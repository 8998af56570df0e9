"""Lipschitz-margin certificates: certified l_p radii and time of ``lipschitz-global``,
``lipschitz-sdp`` and ``lipschitz-local`` on three MLPs.

* ``digits``: the shipped digits MLP 64-32-32-10 (``verify.digits_model``), first ``--n`` test images;
* ``mnist-784-50-10``: a 784-50-10 ReLU MLP trained here for 3 epochs on MNIST test images
  1000..9999 (the training images are not in ``../shared``), evaluated on test images 0..n-1
  (the LipSDP size target: one row's SDP);
* ``mnist-net_256x2``: VNN-COMP 2021 mnistfc ``mnist-net_256x2.onnx`` (via ``verify.model.load_model``),
  first ``--n-mnist`` MNIST test images.

Every method runs through ``verify.certify(..., find_radius=True)`` on the same inputs (domain
``[0, 1]``); misclassified inputs count with radius 0. ``time/input`` is wall time of the whole
call divided by the number of inputs (LipSDP rows are solved lazily and memoised per network, so
its time per input falls with the batch size). BLAS and torch run single-threaded (``--threads``):
on this shared 2-core machine multi-threaded LAPACK was measured 10-200x slower.

Writes a markdown table to stdout and ``benchmarks/out/lipschitz.md``.

Usage: ``.venv/bin/python benchmarks/lipschitz.py [--n 50] [--n-mnist 20] [--norm l2] [--models digits,mnist50,mnist256x2]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verify import certify  # noqa: E402
from verify.data import digits, mnist  # noqa: E402
from verify.digits_model import load_digits_mlp  # noqa: E402

METHODS = ("lipschitz-global", "lipschitz-sdp", "lipschitz-local")


def _shared() -> Path | None:
    for cand in (REPO.parent / "shared",):
        if (cand / "benchmarks").is_dir():
            return cand
    return None


def mnist_50(shared: Path, seed: int = 0) -> nn.Module:
    """784-50-10 ReLU MLP, Adam 3 epochs on MNIST test images 1000..9999 (seeded)."""
    x, y = mnist(shared / "data" / "mnist", "test")
    x, y = x[1000:].flatten(1), y[1000:]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def models(names: list[str], n: int, n_mnist: int):
    """Yield ``(name, model, x, labels)``."""
    shared = _shared()
    for name in names:
        if name == "digits":
            x, y = digits("test", limit=n)
            yield "digits 64-32-32-10", load_digits_mlp(), x, y
        elif shared is None:
            print(f"skipping {name}: ../shared not found", file=sys.stderr)
        elif name == "mnist50":
            x, y = mnist(shared / "data" / "mnist", "test", limit=n_mnist)
            yield "mnist 784-50-10 (trained here)", mnist_50(shared), x, y
        elif name == "mnist256x2":
            from verify.model import load_model

            gm = load_model(shared / "benchmarks" / "vnncomp" / "2021" / "mnistfc" / "mnist-net_256x2.onnx")
            x, y = mnist(shared / "data" / "mnist", "test", limit=n_mnist)
            yield "mnistfc mnist-net_256x2", gm, x.reshape(len(y), *gm.input_shape), y
        else:
            raise SystemExit(f"unknown model {name!r}")


def one_row_times(net: nn.Module) -> list[str]:
    """Time one LipSDP row per solver on the 784-50-10 net (the size target)."""
    from relax.ir.dense import to_feedforward
    from relax.lipschitz import global_lipschitz
    from relax.lipschitz.sdp import LipSDP

    with torch.no_grad():
        ff = to_feedforward(torch.fx.symbolic_trace(net), (1, 28, 28))
    c = torch.zeros(10, dtype=torch.float64)
    c[0], c[1] = 1.0, -1.0
    w = (ff.layers[-1].W.T @ c).numpy()
    rows = [f"| global (product) | {float(global_lipschitz(ff, c.view(1, -1), 2.0, combine=False)[0]):.5f} | | |"]
    for solver, eps in (("clarabel", 1e-8), ("scs", 1e-4), ("first-order", 1e-4)):
        t0 = time.perf_counter()
        r = LipSDP(ff, solver=solver, eps=eps).solve_row(w)
        dt = time.perf_counter() - t0
        raw = f"{r.rho_solver ** 0.5:.5f}" if r.rho_solver else ""
        rows.append(f"| {solver} | {r.L:.5f} | {raw} | {dt:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="digits test images")
    ap.add_argument("--n-mnist", type=int, default=10, help="MNIST test images")
    ap.add_argument("--norm", default="l2")
    ap.add_argument("--models", default="digits,mnist50,mnist256x2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sdp-time-limit", type=float, default=None, help="seconds of SDP solving per model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass

    lines = [f"# Lipschitz-margin certificates, {args.norm} radii (find_radius, domain [0, 1])", "",
             "| model | method | inputs | clean acc | mean radius | median radius | x global (mean) | time / input (s) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, model, x, y in models(args.models.split(","), args.n, args.n_mnist):
        base = None
        for method in METHODS:
            opts = {"time_limit": args.sdp_time_limit} if method == "lipschitz-sdp" else {}
            t0 = time.perf_counter()
            table = certify(model, x, y, method=method, norm=args.norm, find_radius=True, method_options=opts)
            dt = time.perf_counter() - t0
            radii = [c.radius for c in table]
            acc = sum(c.correct for c in table) / len(table)
            mean = statistics.fmean(radii)
            base = mean if method == "lipschitz-global" else base
            note = ""
            d = table[0].details
            if method == "lipschitz-sdp":
                note = f"{d.get('bound')}, LMI {d.get('lmi_size')}"
            elif method == "lipschitz-local":
                note = d.get("bound", "")
            ratio = mean / base if base else float("nan")
            row = f"| {name} | {method} | {len(radii)} | {acc:.2f} | {mean:.4f} | {statistics.median(radii):.4f} | {ratio:.2f} | {dt / len(radii):.3f} | {note} |"
            lines.append(row)
            print(row, flush=True)
    if "mnist50" in args.models.split(",") and _shared() is not None:
        lines += ["", "## One LipSDP row (y_0 - y_1) on mnist 784-50-10: solve + float64 verification", "",
                  "| solver | verified L2 | solver's raw sqrt(rho) | time (s) |", "|---|---|---|---|"]
        print("\n".join(lines[-5:]), flush=True)
        lines += one_row_times(mnist_50(_shared()))
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lipschitz.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten {out / 'lipschitz.md'}")


if __name__ == "__main__":
    main()
