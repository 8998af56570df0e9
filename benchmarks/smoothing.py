"""Randomized smoothing on MNIST: certified accuracy and the cost of CERTIFY.

    .venv/bin/python -m benchmarks.smoothing            # full run (~10-20 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.smoothing --quick    # smoke run (~1 min)
    .venv/bin/python -m benchmarks.smoothing --throughput-only   # only step 3 (run it on a quiet machine)

1. Train a small CNN with Gaussian noise augmentation (sigma 0.25 and 0.5) on MNIST test
   images 0-7999 (the training images are not in ../shared), seeded.
2. CERTIFY (n0 = 100, n = 10,000, alpha = 0.001) 500 images from 8000-9999 (every 4th) and
   report certified accuracy at l2 radius 0.25, 0.5, 0.75, 1.0, 1.5; the first ``--big`` (20)
   of them also with n = 100,000.
3. Throughput (on ``--threads`` (1) torch threads): CERTIFY against the fair baseline, plain
   ``model(batch)`` on a pre-made batch of the same size, same model, device and total rows
   (every CERTIFY pass is checked to have exactly ``batch`` rows); baseline, CERTIFY, baseline
   back to back, ``--repeats`` (21) times, ratio = median of the per-repeat ratios, with an A/A
   control (baseline vs baseline) for the noise floor; with a breakdown (forward / noise /
   counting / other, ms per 10,000 samples), for the small CNN (10 and 100 images per call,
   each x (100 + 1,000) samples, batch 1000) and a ResNet-20 on 28x28 (1 image x (100 + 100), batch 100), each with
   the default noise shared by the inputs of a batch and with independent per-input noise
   (``share_noise=False``). Short runs and many repeats: on a shared machine the load changes
   within seconds, and a ratio is only as good as the two runs it compares.

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


class _Block(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


def resnet20() -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels) for 1x28x28 inputs; seeded
    random weights, eval mode: used for timing only (the cost of a pass does not depend on
    the weights)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval()


class _PassSizes(nn.Module):
    """Wraps a model and records the rows of every forward pass (used once, untimed, to check
    that CERTIFY's passes have exactly the baseline's batch size)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


def _quartiles(v: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def throughput(net: nn.Module, x: torch.Tensor, n: int, batch_size: int, repeats: int, share: bool, n0: int = 100) -> dict:
    """CERTIFY on ``x [B, ...]`` (``n0 + n`` samples per input, ``batch_size`` rows per pass)
    against the fair baseline: ``net(batch)`` on one pre-made batch of ``batch_size`` noisy
    copies of the same images, as many passes as CERTIFY runs rows (checked: every CERTIFY
    pass has exactly ``batch_size`` rows).

    Each repeat runs baseline, CERTIFY, baseline back to back (A-B-A, cancels a linear drift of
    the machine's load); its ratio is CERTIFY time / mean of the two baseline times; the result
    is the median over repeats, with the quartiles. The A/A control (second baseline / first
    baseline of a repeat, same work twice) shows how far a ratio moves by noise alone. The same
    with this process's CPU time, and the fastest-run ratio (fastest CERTIFY / fastest baseline;
    other load only ever slows a run down).

    Each repeat also times the parts CERTIFY adds, on the same number of rows: ``noise`` =
    ``normal_`` into a reused ``[batch_size, ...]`` buffer plus the in-place ``add_`` of the
    image; ``count`` = ``argmax`` + ``bincount`` of a pre-made ``[batch_size, K]`` output;
    ``other`` = CERTIFY - forward - noise - count (Python, per-input generators, statistics,
    and measurement noise). All in ms per 10,000 samples (medians)."""
    noise = GaussianNoise(sigma=0.25)
    B = x.shape[0]
    rows = B * (n0 + n)
    if n % batch_size or (B * n0) % batch_size or batch_size % n0:
        raise ValueError(f"choose B*n0 and n multiples of batch_size (and n0 | batch_size): B={B} n0={n0} n={n} batch={batch_size}")
    nb = rows // batch_size
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        batch = x[torch.arange(batch_size) % B] + noise.sample((batch_size, *x.shape[1:]), generator=g)  # pre-made
        buf = torch.empty_like(batch)
        logits = net(batch)
        K = logits.shape[1]
        slot = torch.zeros(batch_size, dtype=torch.long)
        wrapped = _PassSizes(net)
        certify(wrapped, x, noise, n0=n0, n=n, alpha=0.001, batch_size=batch_size, share_noise=share)  # warm-up + check
        if set(wrapped.sizes) != {batch_size} or len(wrapped.sizes) != nb:
            raise AssertionError(f"CERTIFY passes {sorted(set(wrapped.sizes))} x {len(wrapped.sizes)}, expected {nb} x {batch_size}")
        keys = ("plain1", "certify", "plain2", "cpu_plain1", "cpu_certify", "cpu_plain2", "noise", "count")
        res: dict[str, list[float]] = {k: [] for k in keys}

        def timed(name: str, f) -> None:
            t, c = time.perf_counter(), time.process_time()
            f()
            res[name].append(time.perf_counter() - t)
            res["cpu_" + name].append(time.process_time() - c)

        def plain() -> None:
            for _ in range(nb):
                net(batch)

        def cert() -> None:
            certify(net, x, noise, n0=n0, n=n, alpha=0.001, batch_size=batch_size, share_noise=share)

        for _ in range(repeats):
            timed("plain1", plain)
            timed("certify", cert)
            timed("plain2", plain)
            t = time.perf_counter()
            for _ in range(nb):
                noise.fill_(buf, g).add_(x[0])
            res["noise"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(nb):
                torch.bincount(slot * K + logits.argmax(1), minlength=K)
            res["count"].append(time.perf_counter() - t)
    base = [(a + b) / 2 for a, b in zip(res["plain1"], res["plain2"])]
    cpu_base = [(a + b) / 2 for a, b in zip(res["cpu_plain1"], res["cpu_plain2"])]
    ratios = [c / p for c, p in zip(res["certify"], base)]
    aa = [b / a for a, b in zip(res["plain1"], res["plain2"])]
    per10k = 1e7 / rows  # seconds per run -> ms per 10,000 samples
    fwd = statistics.median(base) * per10k
    nz, cnt = statistics.median(res["noise"]) * per10k, statistics.median(res["count"]) * per10k
    cert_ms = statistics.median(res["certify"]) * per10k
    return {"plain": rows / statistics.median(base), "certify": rows / statistics.median(res["certify"]),
            "ratio": statistics.median(ratios), "ratio_q": _quartiles(ratios), "ratios": ratios,
            "aa": statistics.median(aa), "aa_q": _quartiles(aa),
            "cpu_ratio": statistics.median([c / p for c, p in zip(res["cpu_certify"], cpu_base)]),
            "min_ratio": min(res["certify"]) / min(res["plain1"] + res["plain2"]),
            "fwd_ms": fwd, "noise_ms": nz, "count_ms": cnt, "certify_ms": cert_ms,
            "other_ms": cert_ms - fwd - nz - cnt, "rows": rows, "passes": nb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--num", type=int, default=500, help="images certified (every 4th of 8000-9999)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-big", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=20, help="how many of the images also get n-big")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=21, help="throughput repeats (baseline, CERTIFY, baseline)")
    ap.add_argument("--tp-images", type=int, nargs="+", default=[10, 100],
                    help="images per CERTIFY call in the throughput runs (small CNN; batch = --batch-size); the draw of "
                    "shared noise is paid once per call, so its share of the cost falls with the images per call")
    ap.add_argument("--tp-n", type=int, default=1000, help="n per image in a throughput run (short runs, many repeats: "
                    "the machine is shared, so each ratio compares two runs under about the same load)")
    ap.add_argument("--tp-resnet-images", type=int, default=1, help="images per ResNet-20 throughput run (0: skip)")
    ap.add_argument("--tp-resnet-n", type=int, default=100)
    ap.add_argument("--tp-resnet-batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the throughput step")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--throughput-only", action="store_true", help="skip the certified-accuracy table (models are cached in benchmarks/out)")
    a = ap.parse_args(argv)
    if a.quick:
        a.num, a.n, a.n_big, a.big, a.epochs, a.repeats, a.tp_images = 40, 1000, 5000, 5, 2, 2, [2]
        a.batch_size, a.tp_resnet_n, a.tp_resnet_batch = 200, 100, 100

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
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    lines += ["", f"## CERTIFY throughput vs plain forward passes ({a.threads} torch thread(s), same model, device, rows per pass)", "",
              f"Baseline: `model(batch)` on one pre-made batch of noisy copies of the same images, as many rows as CERTIFY "
              f"evaluates; CERTIFY n0=100, alpha=0.001, every pass exactly `batch` rows (checked). {a.repeats} repeats of "
              "baseline, CERTIFY, baseline back to back; ratio = CERTIFY time / mean of the two baseline times, median "
              "[quartiles] over repeats; A/A = second / first baseline of a repeat (same work: the noise floor of a ratio); "
              "CPU-time ratio the same with this process's CPU time; fastest-run ratio = fastest CERTIFY / fastest "
              "baseline. Breakdown in ms per 10,000 samples (medians): forward = baseline, noise = `normal_` + in-place "
              "add into a reused buffer, count = argmax + bincount, other = the rest of CERTIFY (and noise).", "",
              "| model | noise streams | images x (n0 + n) | batch | plain fwd samples/s | CERTIFY samples/s | ratio (median) "
              "| ratio quartiles | A/A median [quartiles] | CPU-time ratio | fastest-run ratio | forward ms | noise ms | count ms | other ms |",
              "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    configs = [("small CNN (sigma 0.25 model)", nets[a.sigmas[0]], k, a.tp_n, a.batch_size) for k in a.tp_images]
    configs.append(("ResNet-20 (random weights)", resnet20(), a.tp_resnet_images, a.tp_resnet_n, a.tp_resnet_batch))
    for label_m, net, imgs, n_tp, bs in configs:
        if label_m.startswith("ResNet") and a.tp_resnet_images <= 0:
            continue
        for share in (True, False):
            tp = throughput(net, xt[:imgs], n_tp, bs, a.repeats, share)
            label = "shared by the batch's inputs (default)" if share else "independent per input (share_noise=False)"
            lines.append(f"| {label_m} | {label} | {imgs} x (100 + {n_tp:,}) | {bs} | {tp['plain']:,.0f} | {tp['certify']:,.0f} | "
                         f"**{tp['ratio']:.3f}** | {tp['ratio_q'][0]:.3f}-{tp['ratio_q'][1]:.3f} | {tp['aa']:.3f} "
                         f"[{tp['aa_q'][0]:.3f}-{tp['aa_q'][1]:.3f}] | {tp['cpu_ratio']:.3f} | {tp['min_ratio']:.3f} | "
                         f"{tp['fwd_ms']:.1f} | {tp['noise_ms']:.1f} | {tp['count_ms']:.2f} | {tp['other_ms']:.1f} |")
            log(lines[-1])
    lines += ["", f"Load average at the start of this section (1/5/15 min): {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}."]
    load = os.getloadavg()
    lines += ["", f"Load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
              f"{os.cpu_count()} cores (other processes share the machine; absolute samples/s vary with it, the "
              "interleaved ratio much less).",
              "", f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Total time {time.perf_counter() - t_all:.0f}s. Command: `.venv/bin/python -m benchmarks.smoothing"
              + "".join(" " + v for v in (sys.argv[1:] if argv is None else argv)) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "smoothing.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
