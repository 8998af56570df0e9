"""Randomized smoothing on MNIST: certified accuracy and the cost of CERTIFY.

    .venv/bin/python -m benchmarks.smoothing            # full run (~10-20 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.smoothing --quick    # smoke run (~1 min)
    .venv/bin/python -m benchmarks.smoothing --throughput-only   # only step 3 (run it on a quiet machine)

1. Train a small CNN with Gaussian noise augmentation (sigma 0.25 and 0.5) on MNIST test
   images 0-7999 (the training images are not in ../shared), seeded.
2. CERTIFY (n0 = 100, n = 10,000, alpha = 0.001) 500 images from 8000-9999 (every 4th) and
   report certified accuracy at l2 radius 0.25, 0.5, 0.75, 1.0, 1.5; the first ``--big`` (20)
   of them also with n = 100,000.
3. Throughput: samples/s of CERTIFY against plain batched forward passes of the same model on
   the same device (same rows per pass), interleaved in one run; median of ``--repeats``
   runs, with independent per-input noise (default) and with ``share_noise=True``.

Prints a Markdown table and writes ``benchmarks/out/smoothing.md`` (gitignored).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python benchmarks/smoothing.py` would shadow the smoothing package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from benchmarks.data import load_mnist_test
from smoothing.certify import certify
from smoothing.noise import GaussianNoise
from smoothing.training import train_noise_augmented

RADII = (0.25, 0.5, 0.75, 1.0, 1.5)
OUT = Path(__file__).resolve().parent / "out"


def small_cnn() -> nn.Module:
    """conv 16x4x4/2 - conv 32x4x4/2 - fc 100 - fc 10 (the 'small' MNIST CNN of the verification literature)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def get_model(sigma: float, x: torch.Tensor, y: torch.Tensor, epochs: int, log) -> nn.Module:
    path = OUT / f"smoothing_cnn_sigma{sigma:g}_ep{epochs}.pt"
    torch.manual_seed(0)
    net = small_cnn()
    if path.exists():
        net.load_state_dict(torch.load(path))
        log(f"loaded {path.name}")
    else:
        t = time.perf_counter()
        train_noise_augmented(net, x, y, sigma=sigma, epochs=epochs, batch_size=128, lr=1e-3, seed=0)
        log(f"trained sigma={sigma:g} in {time.perf_counter() - t:.0f}s")
        OUT.mkdir(exist_ok=True)
        torch.save(net.state_dict(), path)
    return net.eval()


def cert_acc(pred: np.ndarray, radius: np.ndarray, y: np.ndarray, r: float) -> float:
    return float(np.mean((pred == y) & (radius >= r) & (radius > 0)))


def throughput(net: nn.Module, x: torch.Tensor, n: int, batch_size: int, repeats: int, share: bool) -> dict:
    """Interleaved runs: CERTIFY on ``x`` (n0 = 100, n) vs plain forward passes of the same
    number of rows in batches of ``batch_size``. Returns medians and the median ratio."""
    noise = GaussianNoise(sigma=0.25)
    rows = x.shape[0] * (n + 100)
    plain_in = torch.rand(batch_size, *x.shape[1:])
    nb = max(1, rows // batch_size)
    rates_c, rates_p, ratios, cpu_ratios = [], [], [], []
    with torch.inference_mode():
        net(plain_in)
        certify(net, x[:1], noise, n0=100, n=batch_size, alpha=0.001, batch_size=batch_size, share_noise=share)  # warm-up
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(nb):
                net(plain_in).argmax(1)
            tp, cp = (time.perf_counter() - t) / (nb * batch_size), (time.process_time() - c) / (nb * batch_size)
            t, c = time.perf_counter(), time.process_time()
            certify(net, x, noise, n0=100, n=n, alpha=0.001, batch_size=batch_size, share_noise=share)
            tc, cc = (time.perf_counter() - t) / rows, (time.process_time() - c) / rows
            rates_p.append(1 / tp)
            rates_c.append(1 / tc)
            ratios.append(tc / tp)
            cpu_ratios.append(cc / cp)
    return {"plain": statistics.median(rates_p), "certify": statistics.median(rates_c), "ratio": statistics.median(ratios),
            "ratios": ratios, "cpu_ratio": statistics.median(cpu_ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--num", type=int, default=500, help="images certified (every 4th of 8000-9999)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-big", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=20, help="how many of the images also get n-big")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tp-images", type=int, default=10, help="images per throughput run")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--throughput-only", action="store_true", help="skip the certified-accuracy table (models are cached in benchmarks/out)")
    a = ap.parse_args(argv)
    if a.quick:
        a.num, a.n, a.n_big, a.big, a.epochs, a.repeats, a.tp_images = 40, 1000, 5000, 5, 2, 2, 2

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    x, y = load_mnist_test()
    xtr, ytr = x[:8000], y[:8000]
    idx = torch.arange(8000, 10000, 4)[: a.num]
    xt, yt = x[idx], y[idx].numpy()
    lines = [
        f"# Randomized smoothing on MNIST (small CNN, {torch.get_num_threads()} CPU threads, torch {torch.__version__})",
        "",
        f"Trained with Gaussian noise on MNIST test images 0-7999 ({a.epochs} epochs); certified on {len(idx)} images "
        f"(every 4th of 8000-9999); CERTIFY n0=100, alpha=0.001, l2 radius; certifies the smoothed classifier g.",
        "",
        "| sigma | n | images | clean acc f | g abstain | " + " | ".join(f"cert acc r={r:g}" for r in RADII) + " | time/img |",
        "|---|---|---|---|---|" + "---|" * len(RADII) + "---|",
    ]
    t_all = time.perf_counter()
    nets = {}
    for sigma in a.sigmas:
        net = get_model(sigma, xtr, ytr, a.epochs, log)
        nets[sigma] = net
        with torch.inference_mode():
            clean = float((net(xt).argmax(1).numpy() == yt).mean())
        for n, m in () if a.throughput_only else ((a.n, len(idx)), (a.n_big, min(a.big, len(idx)))):
            t = time.perf_counter()
            res = certify(net, xt[:m], GaussianNoise(sigma=sigma), n0=100, n=n, alpha=0.001, batch_size=a.batch_size)
            dt = time.perf_counter() - t
            pred, rad = res.prediction.numpy(), res.radius
            acc = [cert_acc(pred, rad, yt[:m], r) for r in RADII]
            clean_m = float((net(xt[:m]).argmax(1).numpy() == yt[:m]).mean()) if m != len(idx) else clean
            if n == a.n:
                pred_small, rad_small = pred, rad
                acc_s = " | ".join(f"{v:.3f}" for v in acc)
            else:  # the same images at the small n, for comparison
                small = [cert_acc(pred_small[:m], rad_small[:m], yt[:m], r) for r in RADII]
                acc_s = " | ".join(f"{v:.3f} (n={a.n:,}: {s:.3f})" for v, s in zip(acc, small))
            lines.append(f"| {sigma:g} | {n:,} | {m} | {clean_m:.3f} | {float(np.mean(pred < 0)):.3f} | {acc_s} | {dt / m:.2f}s |")
            log(lines[-1])
    lines += ["", "## CERTIFY throughput vs plain forward passes (same model, device, rows per pass)", "",
              f"{a.tp_images} images x (100 + {a.n:,}) samples per run, batch {a.batch_size} rows, {a.repeats} interleaved runs; "
              "ratio = CERTIFY time / plain forward time per row (median over runs); the CPU-time ratio uses this process's CPU time, less sensitive to other load.", "",
              "| noise streams | plain fwd samples/s | CERTIFY samples/s | ratio (median) | ratios (all runs) | CPU-time ratio (median) |", "|---|---|---|---|---|---|"]
    net = nets[a.sigmas[0]]
    for share in (False, True):
        tp = throughput(net, xt[: a.tp_images], a.n, a.batch_size, a.repeats, share)
        label = "shared across the batch (share_noise=True)" if share else "independent per input (default)"
        lines.append(f"| {label} | {tp['plain']:,.0f} | {tp['certify']:,.0f} | {tp['ratio']:.3f} | "
                     + ", ".join(f"{r:.2f}" for r in tp["ratios"]) + f" | {tp['cpu_ratio']:.3f} |")
        log(lines[-1])
    load = os.getloadavg()
    lines += ["", f"Load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
              f"{os.cpu_count()} cores (other processes share the machine; absolute samples/s vary with it, the "
              "interleaved ratio much less).",
              "", f"Total time {time.perf_counter() - t_all:.0f}s. Command: `.venv/bin/python -m benchmarks.smoothing"
              + (" --quick" if a.quick else "") + (" --throughput-only" if a.throughput_only else "") + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "smoothing.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
