"""One MLP trained six ways, each certified by its natural method (issue 20, item 4).

    python benchmarks/train_compare.py            # default: l2, full digits train split, 200 test digits
    python benchmarks/train_compare.py --quick    # seconds: fewer epochs, digits and samples
    python benchmarks/train_compare.py --norm inf # l_inf balls (smoothing radii by R_2 / sqrt(d))

The architecture is the demo's 64-32-32-10 ReLU MLP (:func:`verify.digits_model.digits_mlp`),
trained on the digits train split by :func:`verify.train.train_model` -- the code behind
``certify train`` (the equivalent commands are printed) -- with the same seed, epochs and
optimiser for every method:

==========  ===============================================  =================================
training    loss                                             certified by
==========  ===============================================  =================================
standard    cross-entropy                                    alpha-crown (f)
noise       Gaussian augmentation, sigma                     smoothing-gaussian (g = smoothed f)
smoothadv   SmoothAdv (Salman et al. 2019), sigma, l2 eps     smoothing-gaussian (g)
pgd         PGD adversarial training (Madry et al. 2018)     alpha-crown (f)
ibp         IBP (Gowal et al. 2018)                          alpha-crown (f)
crown-ibp   CROWN-IBP (Zhang et al. 2020)                    alpha-crown (f)
==========  ===============================================  =================================

Every model is certified on the same first ``--limit`` test digits with ``find_radius``; the
curves are the certified accuracy (certified, correct, radius >= r) against r. Deterministic
certificates hold for f with certainty; smoothing certificates hold for g with probability
``1 - alpha`` each. Writes ``benchmarks/results/train_compare_<norm>.png`` and prints a
Markdown table.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # `python benchmarks/train_compare.py`: import the package of this checkout
    sys.path.insert(0, str(REPO))

import argparse
import math
import time

import torch

from verify import certify
from verify.data import digits
from verify.spec import norm_name, parse_norm
from verify.train import TrainConfig, build_mlp, train_model

METHODS = ("standard", "noise", "smoothadv", "pgd", "ibp", "crown-ibp")
#: per norm: training radius of pgd / ibp / crown-ibp, radii of the table, largest radius searched
NORM_DEFAULTS = {"l2": (0.5, (0.0, 0.25, 0.5, 0.75, 1.0), 2.0), "linf": (0.1, (0.0, 0.025, 0.05, 0.1, 0.15), 0.4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--norm", default="2", help="2 or inf (default 2)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--limit", type=int, default=200, help="test digits certified")
    ap.add_argument("--eps", type=float, help="training radius of pgd / ibp / crown-ibp (default l2 0.5, linf 0.1)")
    ap.add_argument("--sigma", type=float, default=0.25, help="noise of noise / smoothadv training and of certification")
    ap.add_argument("--smoothadv-eps", type=float, default=0.5, help="SmoothAdv's l2 attack radius")
    ap.add_argument("--n", type=int, default=100_000, help="smoothing samples per input (n0 = 100, alpha = 0.001)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for the PNG")
    ap.add_argument("--quick", action="store_true", help="10 epochs, 40 digits, n = 1,000")
    args = ap.parse_args(argv)
    args.p = parse_norm(args.norm)
    eps, radii, max_radius = NORM_DEFAULTS[norm_name(args.p)]
    args.eps = eps if args.eps is None else args.eps
    args.radii, args.max_radius = radii, max_radius
    if args.quick:
        args.epochs, args.limit, args.n = 10, 40, 1_000
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def config(method: str, args: argparse.Namespace) -> TrainConfig:
    """The training options of ``method`` (the rest: :class:`TrainConfig`'s defaults = the demo's)."""
    extra: dict = {}
    if method in ("noise", "smoothadv"):
        extra["sigma"] = args.sigma
    if method == "smoothadv":
        extra.update(eps=args.smoothadv_eps, attack_steps=4, noise_samples=2)
    if method in ("pgd", "ibp", "crown-ibp"):
        extra.update(eps=args.eps, norm=args.p)
    return TrainConfig(method=method, epochs=args.epochs, seed=args.seed, **extra).check()


def command(cfg: TrainConfig) -> str:
    """The ``certify train`` command line that trains the same model."""
    parts = [f"certify train --data digits --arch mlp --method {cfg.method} --epochs {cfg.epochs} --seed {cfg.seed}"]
    if cfg.sigma:
        parts.append(f"--sigma {cfg.sigma:g}")
    if cfg.eps:
        parts.append(f"--eps {cfg.eps:g}")
    if cfg.method in ("pgd", "ibp", "crown-ibp"):
        parts.append(f"--norm {'inf' if math.isinf(cfg.ball_norm()) else 2}")
    if cfg.method == "smoothadv":
        parts.append(f"--attack-steps {cfg.attack_steps} --noise-samples {cfg.noise_samples}")
    return " ".join(parts) + f" --out {cfg.method}.pt"


def certifier(method: str, args: argparse.Namespace) -> tuple[str, dict]:
    """The natural certification method of a training method, with its options."""
    if method in ("noise", "smoothadv"):
        return "smoothing-gaussian", {"sigma": args.sigma, "n0": 100, "n": args.n, "alpha": 0.001, "seed": 0}
    return "alpha-crown", {}


def run_one(method: str, args: argparse.Namespace, data: tuple) -> dict:
    """Train and certify one model; returns its row of the results."""
    (x, y), (xt, yt) = data
    cfg = config(method, args)
    net = build_mlp((1, 8, 8), 10, (32, 32), seed=cfg.seed)
    t0 = time.perf_counter()
    train_model(net, x, y, cfg)
    train_s = time.perf_counter() - t0
    cert, opts = certifier(method, args)
    t0 = time.perf_counter()
    table = certify(net, xt, yt, method=cert, eps=0.0, norm=args.p, find_radius=True, max_radius=args.max_radius,
                    method_options=opts)
    cert_s = (time.perf_counter() - t0) / len(yt)
    with torch.no_grad():
        clean = float((net(xt).argmax(1) == yt).float().mean())
    print(f"{method}: trained in {train_s:.1f} s, {cert} {cert_s:.3f} s/input; {command(cfg)}", file=sys.stderr)
    return {"method": method, "cert": cert, "table": table, "train_s": train_s, "cert_s": cert_s, "clean_f": clean}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The results table: clean accuracy of f, certified accuracy at the radii, times."""
    head = ["training", "certified by", "acc f", *[f"cert@{r:g}" for r in args.radii], "train s", "certify s/input"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r["table"].certified_accuracy(list(args.radii))
        who = "g, P >= 0.999" if r["cert"].startswith("smoothing") else "f"
        cells = [r["method"], f"{r['cert']} ({who})", f"{r['clean_f']:.3f}", *[f"{a:.3f}" for a in acc],
                 f"{r['train_s']:.1f}", f"{r['cert_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Certified accuracy vs radius, one curve per training method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = 1.25 * max(args.radii)
    grid = [top * i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        style = "--" if r["cert"].startswith("smoothing") else "-"
        ax.plot(grid, r["table"].certified_accuracy(grid), style, label=f"{r['method']} ({r['cert']})")
    ax.set_xlabel(f"{norm_name(args.p)} radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(f"digits MLP 64-32-32-10, {args.limit} test digits: trained six ways\n"
                 f"(dashed: smoothed g, sigma {args.sigma:g}, n {args.n}, alpha 0.001; solid: f)", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = digits("train"), digits("test", limit=args.limit)
    rows = [run_one(m, args, data) for m in args.methods]
    path = Path(args.out) / f"train_compare_{norm_name(args.p)}.png"
    plot(rows, args, path)
    print(f"Certified accuracy on {args.limit} digits test inputs, {norm_name(args.p)}; pgd / ibp / crown-ibp trained "
          f"at eps {args.eps:g}, noise / smoothadv at sigma {args.sigma:g} (smoothadv eps {args.smoothadv_eps:g}); "
          f"{args.epochs} epochs, seed {args.seed}\n")
    print(markdown(rows, args))
    print(f"\nwrote {path}; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
