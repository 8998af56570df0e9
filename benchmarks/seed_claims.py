"""The seed's claims, reproduced: six statements of the lecture "Certified Robustness in High
Dimensions" checked against the suite's own methods (issue 20, item 6).

    python benchmarks/seed_claims.py           # full run (a few minutes on 2 CPU cores):
                                               # writes section 14 of RESULTS.md and PNGs
    python benchmarks/seed_claims.py --quick   # seconds: the same checks on fewer inputs and
                                               # samples; prints the section (CI runs this)

1. A linear binary classifier ``f(x) = [w.x + b > 0]`` is its own Gaussian smoothing (``g = f``)
   and its exact l2 radius is ``|w.x + b| / ||w||`` (Cohen et al. 2019, Prop. 3-4): CERTIFY's
   prediction equals f's, its radius is ``sigma Phi^-1(pA_lower)``, never above the exact
   distance, and approaches it as ``n`` grows; with the exact ``pA = Phi(dist / sigma)`` the
   suite's radius formula gives the distance itself (Theorem 1 is tight here).
2. With all ``n`` samples correct, ``pA_lower = alpha^(1/n)`` (one-sided Clopper-Pearson), so the
   largest radius ``n`` samples can certify is ``sigma Phi^-1(alpha^(1/n))``.
3. The l_inf radius from a Gaussian l2 radius is ``R_2 / sqrt(d)``: for a classifier whose
   l2 distance (hence ``R_2``) does not depend on ``d``, the certified l_inf radius falls as
   ``d^(-1/2)``.
4. Certified top-k accuracy (Jia et al. 2020) is at least certified top-1 accuracy.
5. The Lipschitz radius ``margin / L`` (per class pair, as ``lipschitz-*`` compute it) is never
   above the exact minimum adversarial distortion (``milp`` with ``find_radius``).
6. Certified accuracy of f at radius r is at most its accuracy under the suite's PGD attack.

Every check raises :class:`ClaimError` naming the claim and the numbers; :func:`main` runs all
six, prints every failure and returns 1 if any claim failed (the section is written either way,
with the verdict of each check).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # `python benchmarks/seed_claims.py`: import the package of this checkout
    sys.path.insert(0, str(REPO))

import argparse
import datetime as _dt
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.stats import norm as normal
from torch import nn

from smoothing.noise import GaussianNoise
from verify import certify
from verify.certificate import CertificateTable
from verify.compare import attack_robust
from verify.data import digits
from verify.digits_model import NOISE_SIGMA, load_digits_mlp
from verify.report import exact_radius_of, plot_certified_accuracy
from verify.spec import TopK

SECTION_TITLE = "## 14. The seed's claims, reproduced"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
FIGURES = REPO / "benchmarks" / "results"
ALPHA = 0.001
#: relative tolerance of "radius <= exact": the suite shrinks its own radii by 1e-9 and more
RTOL = 1e-6


class ClaimError(AssertionError):
    """A measured number contradicts one of the seed's claims."""

    def __init__(self, claim: int, message: str) -> None:
        super().__init__(f"claim {claim} contradicted: {message}")
        self.claim = claim


@dataclass(frozen=True)
class Settings:
    """Sizes of a run (``quick``: seconds, for CI; else the recorded run)."""

    quick: bool
    linear_dim: int = 16
    linear_inputs: int = 20
    linear_sigma: float = 0.5
    linear_ns: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    rmax_ns: tuple[int, ...] = (100, 1_000, 10_000, 100_000, 1_000_000)
    dims: tuple[int, ...] = (4, 16, 64, 256, 1024, 4096)
    dim_n: int = 100_000
    topk_digits: int | None = None  # None: all 539 test digits
    topk_n: int = 10_000
    exact_digits: int = 10
    exact_norms: tuple[str, ...] = ("linf", "l2")
    lipschitz_methods: tuple[str, ...] = ("lipschitz-global", "lipschitz-local", "lipschitz-sdp")
    curve_digits: int | None = None
    curve_methods: tuple[str, ...] = ("interval", "lipschitz-global", "lipschitz-local", "crown", "alpha-crown")
    pgd_steps: int = 100
    #: one restart: on this MLP five find the same counterexamples (benchmarks/attack_strength.py)
    pgd_restarts: int = 1
    smoothing_n: int = 10_000

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        """The full run's sizes, or the quick run's."""
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True, linear_inputs=8, linear_ns=(1_000, 10_000, 100_000), rmax_ns=(100, 1_000, 10_000, 100_000),
            dims=(4, 64, 1024), dim_n=10_000, topk_digits=60, topk_n=2_000, exact_digits=1, exact_norms=("linf",),
            lipschitz_methods=("lipschitz-global", "lipschitz-local"), curve_digits=20,
            curve_methods=("interval", "lipschitz-local", "crown"), pgd_steps=40, pgd_restarts=1, smoothing_n=2_000,
        )


# ------------------------------------------------------------------------------------------
# models


def linear_binary(w: torch.Tensor, b: float) -> nn.Linear:
    """Two logits ``[0, w.x + b]`` (float64): class 1 iff ``w.x + b > 0``."""
    net = nn.Linear(w.numel(), 2).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1] = w.double()
        net.bias[1] = float(b)
    return net.eval()


def constant_classifier() -> nn.Linear:
    """A one-input classifier that always answers class 0 (every noise sample is correct)."""
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([1.0, 0.0]))
    return net.eval()


def _gaussian(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, norm: float, **options: Any):
    """``smoothing-gaussian`` through :func:`verify.certify` on inputs of any range."""
    return certify(net, x, labels, method="smoothing-gaussian", norm=norm, domain=None, dtype=x.dtype,
                   alpha=ALPHA, **options)


# ------------------------------------------------------------------------------------------
# claim 1: a linear classifier is its own smoothing, radius |w.x + b| / ||w||


def linear_inputs(d: int, count: int, sigma: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(w [d], x [count, d], b)``: inputs at l2 distances ``0.05 sigma .. 2 sigma`` (alternating
    sides) from the hyperplane ``w.x + b = 0``, each from a random foot point on it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    b = float(torch.randn(1, generator=g, dtype=torch.float64))
    z = torch.randn(count, d, generator=g, dtype=torch.float64)
    foot = z - ((z @ w + b) / (w @ w))[:, None] * w
    t = torch.linspace(0.05, 2.0, count, dtype=torch.float64) * sigma
    side = torch.where(torch.arange(count) % 2 == 0, 1.0, -1.0).double()
    return w, foot + (side * t)[:, None] * (w / w.norm()), b


def run_linear(s: Settings) -> dict[str, Any]:
    """CERTIFY on a linear binary classifier at every ``n`` of the settings."""
    w, x, b = linear_inputs(s.linear_dim, s.linear_inputs, s.linear_sigma)
    net = linear_binary(w, b)
    with torch.no_grad():
        f = net(x).argmax(dim=1)
    dist = ((x @ w + b).abs() / w.norm()).numpy()
    exact_pa = normal.cdf(dist / s.linear_sigma)
    r_exact_pa = GaussianNoise(sigma=s.linear_sigma).radius(exact_pa, norm="l2", dim=s.linear_dim)
    rows = []
    for n in s.linear_ns:
        tab = _gaussian(net, x, f, 2, sigma=s.linear_sigma, n=n, n0=100, batch_size=min(n, 100_000))
        for i, c in enumerate(tab):
            rows.append({"n": n, "index": i, "distance": float(dist[i]), "f": int(f[i]), "prediction": int(c.prediction),
                         "pa_lower": float(c.details["pA_lower"]), "radius": float(c.radius),
                         "radius_exact_pa": float(r_exact_pa[i]), "sign": int(torch.sign(x[i] @ w + b))})
    return {"sigma": s.linear_sigma, "d": s.linear_dim, "rows": rows}


def linear_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ``n``: inputs, abstentions, g = f agreements, mean and max of radius / exact distance."""
    out = []
    for n in sorted({r["n"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["n"] == n]
        ratio = np.array([r["radius"] / r["distance"] for r in rows])
        decided = [r for r in rows if r["prediction"] >= 0]
        out.append({"n": n, "inputs": len(rows), "abstain": len(rows) - len(decided),
                    "g_equals_f": sum(r["prediction"] == r["f"] for r in decided), "mean_ratio": float(ratio.mean()),
                    "max_ratio": float(ratio.max()), "min_gap": float(min(r["distance"] - r["radius"] for r in rows))})
    return out


def check_linear(res: dict[str, Any]) -> None:
    """Claim 1: g = f, radius = sigma Phi^-1(pA_lower) <= |w.x+b|/||w||, exact pA gives the
    distance, and the mean radius / distance grows with ``n``."""
    sigma = res["sigma"]
    for r in res["rows"]:
        where = f"n={r['n']}, input {r['index']} (distance {r['distance']:.6g})"
        if r["f"] != (1 if r["sign"] > 0 else 0):
            raise ClaimError(1, f"{where}: f(x) = {r['f']} but sign(w.x + b) = {r['sign']}")
        if r["prediction"] >= 0 and r["prediction"] != r["f"]:
            raise ClaimError(1, f"{where}: g predicts {r['prediction']} but f(x) = {r['f']}")
        if r["prediction"] >= 0 and not math.isclose(r["radius"], sigma * normal.ppf(r["pa_lower"]), rel_tol=RTOL, abs_tol=1e-12):
            raise ClaimError(1, f"{where}: radius {r['radius']:.9g} != sigma Phi^-1(pA_lower) = {sigma * normal.ppf(r['pa_lower']):.9g}")
        if r["radius"] > r["distance"] * (1 + RTOL):
            raise ClaimError(1, f"{where}: certified radius {r['radius']:.9g} > exact distance {r['distance']:.9g}")
        if not math.isclose(r["radius_exact_pa"], r["distance"], rel_tol=RTOL):
            raise ClaimError(1, f"{where}: the radius of the exact pA is {r['radius_exact_pa']:.9g}, not the distance")
    means = [row["mean_ratio"] for row in linear_summary(res)]
    if any(b < a for a, b in zip(means, means[1:])):
        raise ClaimError(1, f"mean radius / distance does not grow with n: {[round(m, 4) for m in means]}")


# ------------------------------------------------------------------------------------------
# claim 2: the largest certifiable radius against n


def rmax_closed_form(n: int, alpha: float = ALPHA, sigma: float = 1.0) -> tuple[float, float]:
    """``(alpha^(1/n), sigma Phi^-1(alpha^(1/n)))``, the latter as ``isf(1 - p)`` with
    ``1 - p = -expm1(log(alpha) / n)`` (no cancellation near ``p = 1``)."""
    q = -math.expm1(math.log(alpha) / n)
    return 1.0 - q, sigma * float(normal.isf(q))


def run_rmax(s: Settings, sigma: float = 1.0) -> dict[str, Any]:
    """CERTIFY of a classifier that is always right, at every ``n``."""
    net, x, y = constant_classifier(), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    rows = []
    for n in s.rmax_ns:
        c = _gaussian(net, x, y, 2, sigma=sigma, n=n, n0=100, batch_size=min(n, 100_000))[0]
        rows.append({"n": n, "count": int(c.details["counts"].get("0", 0)), "pa_lower": float(c.details["pA_lower"]),
                     "radius": float(c.radius)})
    return {"sigma": sigma, "alpha": ALPHA, "rows": rows}


def check_rmax(res: dict[str, Any]) -> None:
    """Claim 2: all samples correct, pA_lower = alpha^(1/n), radius = sigma Phi^-1(alpha^(1/n))."""
    for r in res["rows"]:
        p, rmax = rmax_closed_form(r["n"], res["alpha"], res["sigma"])
        if r["count"] != r["n"]:
            raise ClaimError(2, f"n={r['n']}: only {r['count']} samples in the class (the setup needs all n)")
        if not math.isclose(1 - r["pa_lower"], 1 - p, rel_tol=1e-6):
            raise ClaimError(2, f"n={r['n']}: pA_lower {r['pa_lower']:.12g} != alpha^(1/n) = {p:.12g}")
        if not (rmax * (1 - RTOL) <= r["radius"] <= rmax):
            raise ClaimError(2, f"n={r['n']}: radius {r['radius']:.12g} != sigma Phi^-1(alpha^(1/n)) = {rmax:.12g}")


# ------------------------------------------------------------------------------------------
# claim 3: l_inf radius R_2 / sqrt(d)


def run_dimension(s: Settings, sigma: float = 0.5, distances: Sequence[float] = (0.25, 0.5, 1.0)) -> dict[str, Any]:
    """Per ``d``: ``w = 1/sqrt(d)`` (unit l2 norm, ``||w||_1 = sqrt(d)``), inputs ``t w`` at l2
    distance ``t`` from ``w.x = 0``; CERTIFY in l2 and l_inf with the same seed (same counts)."""
    rows = []
    for d in s.dims:
        w = torch.full((d,), 1.0 / math.sqrt(d))
        net = linear_binary(w, 0.0).float()
        t = torch.tensor(distances, dtype=torch.float32)
        x, y = t[:, None] * w, torch.ones(len(distances), dtype=torch.long)
        opts = {"sigma": sigma, "n": s.dim_n, "n0": 100, "batch_size": 1000}
        t0 = time.perf_counter()
        r2, rinf = (_gaussian(net, x, y, p, **opts) for p in (2, math.inf))
        secs = time.perf_counter() - t0
        for i, dist in enumerate(distances):
            rows.append({"d": d, "distance": float(dist), "linf_distance": float(dist) / float(w.abs().sum()),
                         "r2": float(r2[i].radius), "rinf": float(rinf[i].radius), "seconds": secs / len(distances)})
    return {"sigma": sigma, "n": s.dim_n, "rows": rows}


def dimension_slope(res: dict[str, Any]) -> float:
    """Least-squares slope of ``log(mean R_inf)`` against ``log d``."""
    dims = sorted({r["d"] for r in res["rows"]})
    mean = [np.mean([r["rinf"] for r in res["rows"] if r["d"] == d]) for d in dims]
    return float(np.polyfit(np.log(dims), np.log(mean), 1)[0])


def check_dimension(res: dict[str, Any], slope_tol: float = 0.05) -> None:
    """Claim 3: ``R_inf = R_2 / sqrt(d)`` on every row, ``R_inf`` <= the exact l_inf distance,
    and ``R_inf`` falls as ``d^(-1/2)`` (fitted slope within ``slope_tol`` of -1/2)."""
    for r in res["rows"]:
        where = f"d={r['d']}, l2 distance {r['distance']:g}"
        if r["r2"] <= 0:
            raise ClaimError(3, f"{where}: no l2 radius certified (R_2 = {r['r2']:g})")
        if not math.isclose(r["rinf"] * math.sqrt(r["d"]), r["r2"], rel_tol=1e-9):
            raise ClaimError(3, f"{where}: R_inf sqrt(d) = {r['rinf'] * math.sqrt(r['d']):.9g} != R_2 = {r['r2']:.9g}")
        if r["rinf"] > r["linf_distance"] * (1 + RTOL) or r["r2"] > r["distance"] * (1 + RTOL):
            raise ClaimError(3, f"{where}: R_inf {r['rinf']:.6g} / R_2 {r['r2']:.6g} above the exact distances "
                                f"{r['linf_distance']:.6g} / {r['distance']:.6g}")
    slope = dimension_slope(res)
    if abs(slope + 0.5) > slope_tol:
        raise ClaimError(3, f"log R_inf against log d has slope {slope:.4f}, not -1/2 (tolerance {slope_tol})")


# ------------------------------------------------------------------------------------------
# claim 4: top-k >= top-1


def run_topk(s: Settings, ks: Sequence[int] = (1, 2, 3)) -> dict[str, Any]:
    """``smoothing-gaussian`` (top-1) and ``smoothing-topk`` (k = 1, 2, 3) on the digits MLP
    trained with noise sigma 0.25, at that sigma, l2."""
    x, y = digits("test", limit=s.topk_digits)
    net = load_digits_mlp("noise")
    radii = [round(0.1 * i, 1) for i in range(11)]
    opts = {"sigma": NOISE_SIGMA, "n": s.topk_n, "alpha": ALPHA, "seed": 0}
    top1 = certify(net, x, y, method="smoothing-gaussian", norm=2, n0=100, **opts)
    out: dict[str, Any] = {"radii": radii, "inputs": len(y), "n": s.topk_n, "sigma": NOISE_SIGMA,
                           "top1": top1.certified_accuracy(radii), "topk": {}, "radius_k": {}}
    for k in ks:
        tab = certify(net, x, TopK(y, k), method="smoothing-topk", norm=2, **opts)
        out["topk"][k] = tab.certified_accuracy(radii)
        out["radius_k"][k] = [c.radius for c in tab]
    return out


def check_topk(res: dict[str, Any]) -> None:
    """Claim 4: per input the top-k radius grows with k (same counts), and certified top-k
    accuracy (k >= 2) is at least smoothing-gaussian's top-1 accuracy at every radius."""
    ks = sorted(res["radius_k"])
    for a, b in zip(ks, ks[1:]):
        for i, (ra, rb) in enumerate(zip(res["radius_k"][a], res["radius_k"][b])):
            if rb < ra:
                raise ClaimError(4, f"input {i}: top-{b} radius {rb:.6g} < top-{a} radius {ra:.6g}")
    for k in (k for k in ks if k >= 2):
        for r, acc_k, acc_1 in zip(res["radii"], res["topk"][k], res["top1"]):
            if acc_k < acc_1:
                raise ClaimError(4, f"radius {r:g}: certified top-{k} accuracy {acc_k:.4f} < top-1 accuracy {acc_1:.4f}")


# ------------------------------------------------------------------------------------------
# claim 5: Lipschitz radius <= exact radius


def _pair_radius(c) -> float:
    """``min_j margin_j / L_j`` over the rows of a lipschitz certificate (no safety margin)."""
    m, L = np.asarray(c.details["margin"]), np.asarray(c.details["lipschitz"])
    return float(np.min(np.where(L > 0, m / np.maximum(L, 1e-300), np.inf)))


def run_lipschitz_exact(s: Settings) -> dict[str, Any]:
    """``milp`` with ``find_radius`` (exact minimum distortion) beside every Lipschitz method's
    radius on the first digits, per norm; l2 needs Gurobi (an MIQP)."""
    x, y = digits("test", limit=s.exact_digits)
    net = load_digits_mlp("noise")
    rows, notes = [], []
    for nm in s.exact_norms:
        p, cap = (math.inf, 0.25) if nm == "linf" else (2.0, 2.0)
        exact = [exact_radius_of(c) for c in certify(net, x, y, method="milp", norm=p, find_radius=True, max_radius=cap)]
        lip = {m: certify(net, x, y, method=m, norm=p, find_radius=True, max_radius=cap) for m in s.lipschitz_methods}
        for i in range(len(y)):
            row = {"norm": nm, "index": i, "label": int(y[i]), "exact": exact[i]["exact"], "upper": exact[i]["upper"],
                   "status": exact[i]["status"], "text": exact[i]["text"], "radius": {m: float(t[i].radius) for m, t in lip.items()}}
            if "lipschitz-global" in lip:
                row["pair_radius"] = _pair_radius(lip["lipschitz-global"][i])
            rows.append(row)
            if not math.isfinite(row["upper"]):
                notes.append(f"{nm} digit {i}: no exact radius ({exact[i]['text']})")
    return {"rows": rows, "notes": notes, "methods": list(s.lipschitz_methods)}


def check_lipschitz_exact(res: dict[str, Any]) -> None:
    """Claim 5: every Lipschitz radius <= the distance of milp's confirmed adversarial example,
    and lipschitz-global's radius <= its own ``min_j margin_j / L_j``."""
    for r in res["rows"]:
        where = f"{r['norm']} digit {r['index']}"
        if "pair_radius" in r and r["radius"]["lipschitz-global"] > r["pair_radius"] * (1 + 1e-12):
            raise ClaimError(5, f"{where}: lipschitz-global radius {r['radius']['lipschitz-global']:.9g} > "
                                f"min_j margin_j / L_j = {r['pair_radius']:.9g}")
        if not math.isfinite(r["upper"]):
            continue
        for m, rad in r["radius"].items():
            if rad > r["upper"] * (1 + RTOL):
                raise ClaimError(5, f"{where}: {m} radius {rad:.6g} > exact radius {r['upper']:.6g}")
    if not any(math.isfinite(r["upper"]) for r in res["rows"]):
        raise ClaimError(5, "milp gave no exact radius on any digit: nothing was compared")


# ------------------------------------------------------------------------------------------
# claim 6: certified accuracy <= PGD accuracy


CURVE_RADII = {"linf": [0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2], "l2": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]}
CURVE_CAP = {"linf": 0.25, "l2": 2.0}


def run_curves(s: Settings) -> dict[str, Any]:
    """Per norm: PGD accuracy of f and certified accuracy of each deterministic method at the
    radii (plus smoothing-gaussian, which certifies g), with the per-input verdicts."""
    x, y = digits("test", limit=s.curve_digits)
    net = load_digits_mlp("noise")
    out: dict[str, Any] = {"inputs": len(y)}
    for nm, radii in CURVE_RADII.items():
        p = math.inf if nm == "linf" else 2.0
        raw = attack_robust(net, x, y, radii, p, steps=s.pgd_steps, restarts=s.pgd_restarts, seed=0)
        robust = nested_robust(raw)
        tables = {m: certify(net, x, y, method=m, norm=p, find_radius=True, max_radius=CURVE_CAP[nm]) for m in s.curve_methods}
        tables["smoothing-gaussian"] = certify(net, x, y, method="smoothing-gaussian", norm=p, sigma=NOISE_SIGMA,
                                               n=s.smoothing_n, alpha=ALPHA, seed=0)
        out[nm] = {"radii": radii, "pgd": [sum(robust[float(r)]) / len(y) for r in radii],
                   "pgd_raw": [int(raw[float(r)].sum()) / len(y) for r in radii], "robust": robust, "tables": tables,
                   "methods": {m: _curve_of(t, radii) for m, t in tables.items()}}
    return out


def nested_robust(raw: dict[float, torch.Tensor]) -> dict[float, list[bool]]:
    """Per radius, per input: not broken by the attack at this radius or any smaller one (the
    ball of radius r holds every smaller ball, so a counterexample there is one at r too)."""
    out: dict[float, list[bool]] = {}
    ok = None
    for r in sorted(raw):
        ok = raw[r].clone() if ok is None else ok & raw[r]
        out[float(r)] = ok.tolist()
    return out


def _curve_of(table, radii: Sequence[float]) -> dict[str, Any]:
    """Certified accuracy at the radii and, per input, the radius if certified and correct (else 0)."""
    return {"certifies": table[0].certifies, "acc": table.certified_accuracy(radii),
            "radius": [c.radius if c.certified and c.correct else 0.0 for c in table]}


def check_curves(res: dict[str, Any]) -> None:
    """Claim 6: for every method certifying f, certified accuracy <= PGD accuracy at every
    radius, and no input certified at radius R is broken by PGD at some r <= R."""
    for nm in CURVE_RADII:
        cur = res[nm]
        for m, c in cur["methods"].items():
            if c["certifies"] != "base":
                continue
            for r, ca, pa in zip(cur["radii"], c["acc"], cur["pgd"]):
                if ca > pa:
                    raise ClaimError(6, f"{nm} radius {r:g}: {m} certified accuracy {ca:.4f} > PGD accuracy {pa:.4f}")
            for r, ok in cur["robust"].items():
                for i, (rad, good) in enumerate(zip(c["radius"], ok)):
                    if not good and 0 < float(r) <= rad * (1 - RTOL):
                        raise ClaimError(6, f"{nm}: {m} certifies input {i} at radius {rad:.6g} but PGD breaks it at {r:g}")


# ------------------------------------------------------------------------------------------
# figures (matplotlib is in the project's dependencies; skipped when it is missing)


def have_matplotlib() -> bool:
    """Whether matplotlib imports (figures are skipped without it; the tables hold the curves)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _figure(height: float) -> tuple[Any, Any]:
    """A new figure ``5.5 x height`` inches with one axes: ``(fig, ax)``."""
    return _pyplot().subplots(figsize=(5.5, height), dpi=100)


def _style(ax, title_size: int | None = 9, **grid: Any) -> None:
    """The figures' common look: the title's font size (``None``: as it is), a small legend and
    a light grid (``grid``: more options of ``ax.grid``)."""
    if title_size is not None:
        ax.title.set_fontsize(title_size)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, **grid)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def figure_linear(res: dict[str, Any], path: Path) -> Path:
    """Certified radius against the exact distance, one marker per ``n``, and the diagonal."""
    fig, ax = _figure(4.2)
    dmax = max(r["distance"] for r in res["rows"])
    ax.plot([0, dmax], [0, dmax], "k-", lw=1, label="exact |w.x+b| / ||w||")
    for n in sorted({r["n"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["n"] == n]
        ax.plot([r["distance"] for r in rows], [r["radius"] for r in rows], "o", ms=4, label=f"CERTIFY, n={n:,}")
    ax.set(xlabel="exact l2 distance to the decision boundary", ylabel="certified l2 radius of g",
           title=f"Claim 1: linear classifier, sigma={res['sigma']:g}, d={res['d']}, alpha={ALPHA:g}")
    _style(ax)
    return _save(fig, path)


def figure_rmax(res: dict[str, Any], path: Path) -> Path:
    """``R_max / sigma`` against ``n``: the suite's CERTIFY and the closed form."""
    fig, ax = _figure(4.0)
    ns = np.logspace(np.log10(min(r["n"] for r in res["rows"])), np.log10(max(r["n"] for r in res["rows"])), 100)
    ax.plot(ns, [rmax_closed_form(int(n), res["alpha"], 1.0)[1] for n in ns], "k-", lw=1, label="Phi^-1(alpha^(1/n))")
    ax.plot([r["n"] for r in res["rows"]], [r["radius"] / res["sigma"] for r in res["rows"]], "o", label="CERTIFY, all n correct")
    ax.set_xscale("log")
    ax.set(xlabel="samples n", ylabel="largest certifiable radius / sigma", title=f"Claim 2: R_max against n (alpha={res['alpha']:g})")
    _style(ax)
    return _save(fig, path)


def figure_dimension(res: dict[str, Any], path: Path) -> Path:
    """Log-log ``R_inf`` against ``d`` per distance, with ``R_2 / sqrt(d)`` and the exact l_inf distance."""
    fig, ax = _figure(4.2)
    for dist in sorted({r["distance"] for r in res["rows"]}):
        rows = sorted((r for r in res["rows"] if r["distance"] == dist), key=lambda r: r["d"])
        dims = [r["d"] for r in rows]
        line, = ax.plot(dims, [r["rinf"] for r in rows], "o-", ms=4, label=f"certified l_inf, l2 distance {dist:g}")
        ax.plot(dims, [r["linf_distance"] for r in rows], ":", color=line.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="input dimension d", ylabel="l_inf radius",
           title=f"Claim 3: R_inf = R_2 / sqrt(d) (dotted: exact l_inf distance), sigma={res['sigma']:g}, n={res['n']:,}")
    _style(ax, 8, which="both")
    return _save(fig, path)


def figure_topk(res: dict[str, Any], path: Path) -> Path:
    """Certified accuracy against the l2 radius: top-1 (smoothing-gaussian) and top-k."""
    fig, ax = _figure(4.0)
    ax.plot(res["radii"], res["top1"], "k-o", ms=3, label="top-1 (smoothing-gaussian)")
    for k, acc in sorted(res["topk"].items()):
        ax.plot(res["radii"], acc, "--o", ms=3, label=f"top-{k} (smoothing-topk)")
    ax.set(xlabel="l2 radius", ylabel="certified accuracy of g", ylim=(-0.02, 1.02),
           title=f"Claim 4: digits MLP (noise), {res['inputs']} digits, sigma={res['sigma']:g}, n={res['n']:,}")
    _style(ax)
    return _save(fig, path)


def figure_lipschitz(res: dict[str, Any], path: Path) -> Path:
    """Lipschitz radius against the exact radius, per method and norm, with the diagonal."""
    plt = _pyplot()
    norms = sorted({r["norm"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(norms), figsize=(5.0 * len(norms), 4.0), dpi=100, squeeze=False)
    for ax, nm in zip(axes[0], norms):
        rows = [r for r in res["rows"] if r["norm"] == nm and math.isfinite(r["upper"])]
        top = max([r["upper"] for r in rows] + [1e-9])
        ax.plot([0, top], [0, top], "k-", lw=1, label="exact (milp)")
        for m in res["methods"]:
            ax.plot([r["upper"] for r in rows], [r["radius"][m] for r in rows], "o", ms=4, label=m)
        ax.set(xlabel=f"exact minimum distortion ({nm})", ylabel="certified radius", title=f"Claim 5: {nm}")
        _style(ax, title_size=None)
    return _save(fig, path)


def figures(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """All PNGs of a run under ``out``; ``{}`` without matplotlib."""
    if not have_matplotlib():
        return {}
    made = {
        "linear": figure_linear(results["linear"], out / "seed_claim1_linear.png"),
        "rmax": figure_rmax(results["rmax"], out / "seed_claim2_rmax.png"),
        "dimension": figure_dimension(results["dimension"], out / "seed_claim3_dimension.png"),
        "topk": figure_topk(results["topk"], out / "seed_claim4_topk.png"),
        "lipschitz": figure_lipschitz(results["lipschitz"], out / "seed_claim5_lipschitz.png"),
    }
    for nm in CURVE_RADII:
        cur = results["curves"][nm]
        tab = sum(cur["tables"].values(), CertificateTable())
        made[f"curves_{nm}"] = plot_certified_accuracy(
            tab, cur["radii"], out / f"seed_claim6_{nm}.png", attack_curve=dict(zip(cur["radii"], cur["pgd"])),
            title=f"Claim 6: digits MLP (noise), {results['curves']['inputs']} digits, {nm}: certified vs PGD accuracy\n"
                  "solid: deterministic, certify f; dashed: smoothing certifies g (not checked against PGD on f)",
            model_name="digits-mlp-noise")
    return made


# ------------------------------------------------------------------------------------------
# markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def md_linear(res: dict[str, Any]) -> str:
    """Claim 1's table (per n) and an excerpt per input at the largest n."""
    summ = linear_summary(res)
    t1 = _table(["n", "inputs", "abstain", "g = f (decided)", "mean radius / exact", "max radius / exact",
                 "min (exact - radius)"],
                [[r["n"], r["inputs"], r["abstain"], r["g_equals_f"], r["mean_ratio"], r["max_ratio"], r["min_gap"]] for r in summ])
    n_max = max(r["n"] for r in res["rows"])
    at_max = [r for r in res["rows"] if r["n"] == n_max]
    rows = at_max[:: max(1, len(at_max) // 8)]
    t2 = _table(["input", "exact distance", "pA_lower", "radius", "sigma Phi^-1(pA_lower)", "radius of exact pA"],
                [[r["index"], r["distance"], f"{r['pa_lower']:.6f}", r["radius"], sigma_ppf(res["sigma"], r["pa_lower"]),
                  r["radius_exact_pa"]] for r in rows])
    head = f"d = {res['d']}, sigma = {res['sigma']:g}, alpha = {ALPHA:g}, n0 = 100, seed 0; exact distance = abs(w.x + b) / norm(w)."
    return f"{head}\n\n{t1}\n\nAt n = {n_max:,} (some inputs):\n\n{t2}"


def sigma_ppf(sigma: float, p: float) -> float:
    """``sigma Phi^-1(p)`` (scipy), the formula the radius is checked against."""
    return float(sigma * normal.ppf(p))


def md_rmax(res: dict[str, Any]) -> str:
    """Claim 2's table."""
    rows = []
    for r in res["rows"]:
        p, rmax = rmax_closed_form(r["n"], res["alpha"], res["sigma"])
        rows.append([r["n"], f"{r['pa_lower']:.10f}", f"{p:.10f}", f"{r['radius']:.9f}", f"{rmax:.9f}",
                     f"{(r['radius'] - rmax) / rmax:.1e}", f"{NOISE_SIGMA * rmax:.4f}"])
    return _table(["n", "pA_lower (CERTIFY)", "alpha^(1/n)", "R_max / sigma (CERTIFY)", "Phi^-1(alpha^(1/n))",
                   "relative difference", f"R_max at sigma {NOISE_SIGMA:g}"], rows)


def md_dimension(res: dict[str, Any]) -> str:
    """Claim 3's table."""
    rows = [[r["d"], r["distance"], r["r2"], r["rinf"], r["rinf"] * math.sqrt(r["d"]) / r["r2"], r["linf_distance"],
             r["rinf"] / r["linf_distance"]] for r in sorted(res["rows"], key=lambda r: (r["distance"], r["d"]))]
    head = f"sigma = {res['sigma']:g}, n = {res['n']:,}, alpha = {ALPHA:g}, float32."
    tail = f"Fitted slope of log(mean R_inf) against log d: **{dimension_slope(res):.4f}**."
    table = _table(["d", "l2 distance", "R_2", "R_inf", "R_inf sqrt(d) / R_2", "exact l_inf distance", "R_inf / exact"], rows)
    return f"{head}\n\n{table}\n\n{tail}"


def md_topk(res: dict[str, Any]) -> str:
    """Claim 4's table: certified accuracy against the radius."""
    header = ["classifier g"] + [f"@{r:g}" for r in res["radii"]]
    rows = [["top-1, smoothing-gaussian"] + list(res["top1"])]
    rows += [[f"top-{k}, smoothing-topk"] + list(a) for k, a in sorted(res["topk"].items())]
    head = f"{res['inputs']} test digits, sigma = {res['sigma']:g}, n = {res['n']:,}, alpha = {ALPHA:g}, seed 0."
    return head + "\n\n" + _table(header, [[row[0]] + [f"{v:.3f}" for v in row[1:]] for row in rows])


def md_lipschitz(res: dict[str, Any]) -> str:
    """Claim 5's table: exact radius beside each Lipschitz radius, per digit."""
    rows = []
    for r in res["rows"]:
        ex = r["text"] or r["status"]
        rows.append([r["norm"], r["index"], r["label"], ex] + [f"{r['radius'][m]:.4f}" for m in res["methods"]])
    text = _table(["norm", "digit", "label", "exact (milp)"] + list(res["methods"]), rows)
    return text + ("\n\n" + "; ".join(res["notes"]) if res["notes"] else "")


def md_curves(res: dict[str, Any]) -> str:
    """Claim 6's tables: certified accuracy per method and PGD accuracy, per norm."""
    parts = []
    for nm in CURVE_RADII:
        cur = res[nm]
        rows = [[f"{m} ({'f' if c['certifies'] == 'base' else 'g, not checked'})"] + [f"{v:.3f}" for v in c["acc"]]
                for m, c in cur["methods"].items()]
        rows.append(["PGD accuracy of f, each radius attacked on its own"] + [f"{v:.3f}" for v in cur["pgd_raw"]])
        rows.append(["**PGD accuracy of f** (broken at some r' <= r counts as broken)"] + [f"**{v:.3f}**" for v in cur["pgd"]])
        parts.append(f"{nm} ({res['inputs']} test digits):\n\n" + _table(["method"] + [f"@{r:g}" for r in cur["radii"]], rows))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------
# the run


@dataclass
class Claim:
    """One claim: its number, title, what it states, and how to run, check and show it."""

    number: int
    key: str
    title: str
    statement: str
    run: Callable[[Settings], dict[str, Any]]
    check: Callable[[dict[str, Any]], None]
    markdown: Callable[[dict[str, Any]], str]


CLAIMS = [
    Claim(1, "linear", "A linear classifier is its own Gaussian smoothing",
          "f(x) = [w.x + b > 0] (two logits [0, w.x + b]; random w, b; inputs at 0.05 to 2 sigma from the "
          "hyperplane, on alternating sides). Checked: g's prediction (CERTIFY through `verify.certify(..., method=\"smoothing-gaussian\")`) "
          "equals f's; its radius equals sigma Phi^-1(pA_lower) (scipy); it is never above |w.x+b|/||w||; the mean "
          "radius / exact distance grows with n; and `GaussianNoise.radius` at the exact pA = Phi(dist/sigma) returns "
          "the distance (Cohen et al. 2019, Theorem 1 is tight on a linear classifier, Prop. 3-4).",
          run_linear, check_linear, md_linear),
    Claim(2, "rmax", "The largest certifiable radius against n",
          "A classifier that is always right (a constant), sigma = 1: every CERTIFY sample is correct, so the "
          "one-sided Clopper-Pearson bound is alpha^(1/n) and R_max = sigma Phi^-1(alpha^(1/n)) (alpha = 0.001). "
          "Checked: all n samples counted, pA_lower and the radius equal the closed form (relative 1e-6; the suite "
          "shrinks its radii by 1e-9).",
          run_rmax, check_rmax, md_rmax),
    Claim(3, "dimension", "The l_inf radius from a Gaussian l2 radius is R_2 / sqrt(d)",
          "f(x) = [w.x > 0] with w = (1, ..., 1)/sqrt(d): its l2 distance t does not depend on d, so neither does "
          "R_2 (in law), while its exact l_inf distance is t/sqrt(d). `smoothing-gaussian` in l2 and l_inf "
          "(same seed, same counts), three inputs per d. Checked: R_inf sqrt(d) = R_2 on every row, R_inf <= the exact "
          "l_inf distance, and the fitted slope of log R_inf against log d is -1/2 within 0.05.",
          run_dimension, check_dimension, md_dimension),
    Claim(4, "topk", "Certified top-k accuracy is at least top-1's",
          "The shipped digits MLP trained with noise (`digits_mlp_noise.pt`), at its training sigma, l2. Checked: per input "
          "the `smoothing-topk` radius grows with k (the same counts: same seed), and top-k certified accuracy "
          "(k >= 2) is at least `smoothing-gaussian`'s top-1 at every radius.",
          run_topk, check_topk, md_topk),
    Claim(5, "lipschitz", "The Lipschitz radius is never above the exact radius",
          "The suite's Lipschitz radius is min_j (margin_j - safety) / L_j with L_j a Lipschitz bound of the "
          "pairwise difference f_label - f_j. Tsuzuku et al.'s margin / (2 L), with L a bound of every logit, "
          "is never larger (a pair's constant is at most 2 L), so the check covers it. Exact radius: `milp` with `find_radius` (the distance of a confirmed adversarial example; "
          "l2 is an MIQP solved by Gurobi). Digits MLP (noise), first test digits. Checked: every Lipschitz radius "
          "<= the exact one, and lipschitz-global's radius <= min_j margin_j / L_j from its own details.",
          run_lipschitz_exact, check_lipschitz_exact, md_lipschitz),
    Claim(6, "curves", "Certified accuracy is at most empirical (PGD) accuracy",
          "Digits MLP (noise), first test digits; deterministic methods with `find_radius`, the suite's PGD "
          "(`verify.compare.attack_robust`, targeted, one lane per class, one restart); an input the attack breaks at "
          "some radius counts as broken at every larger one. Checked for every method certifying f: "
          "certified accuracy <= PGD accuracy at every radius, and no input certified at radius R is broken by PGD "
          "at r <= R. `smoothing-gaussian` certifies g, another classifier: shown, not checked against PGD on f.",
          run_curves, check_curves, md_curves),
]


def run_all(s: Settings, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[int, str], dict[str, float]]:
    """Run and check every claim: ``(results by key, failures by claim number, seconds by key)``."""
    results, failures, secs = {}, {}, {}
    for c in CLAIMS:
        t0 = time.perf_counter()
        results[c.key] = c.run(s)
        secs[c.key] = time.perf_counter() - t0
        try:
            c.check(results[c.key])
            log(f"claim {c.number} ({c.title}): holds [{secs[c.key]:.1f} s]")
        except ClaimError as e:
            failures[c.number] = str(e)
            log(f"CLAIM {c.number} FAILED ({c.title}): {e}")
    return results, failures, secs


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line() -> str:
    """CPU model and count, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), shared with other work; torch {torch.__version__} on "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def provenance(a: argparse.Namespace, start: _dt.datetime, load: tuple[float, float], seconds: float) -> str:
    """The command (the options that change numbers), commit, machine, load and date of a run
    (no paths of this machine)."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty and dirty != "unknown" else "")
    cmd = "OMP_NUM_THREADS=1 python benchmarks/seed_claims.py" + (" --quick" if a.quick else "") + (
        f" --threads {a.threads}" if a.threads != 1 else "")
    return (f"Command: `{cmd}` (commit {commit}; {start:%Y-%m-%d %H:%M} UTC; {seconds:.0f} s). Machine: "
            f"{machine_line()}; load average (1 min, `uptime`) {load[0]:.2f} at the start, {load[1]:.2f} at the end.")


def section(results: dict[str, Any], failures: dict[int, str], secs: dict[str, float], head: str,
            figs: dict[str, Path], md_dir: Path) -> str:
    """The markdown of section 14: provenance, then per claim its statement, verdict, table, figure."""
    parts = [SECTION_TITLE, "", head, "",
             "Every number below is measured by the command above; each claim's check fails the run (exit 1) "
             "with the numbers when they contradict it. Smoothing certificates hold with probability 1 - alpha "
             "(alpha = 0.001) each; a seeded run gives the same numbers again."]
    fig_of = {1: ["linear"], 2: ["rmax"], 3: ["dimension"], 4: ["topk"], 5: ["lipschitz"], 6: ["curves_linf", "curves_l2"]}
    for c in CLAIMS:
        verdict = f"**FAILED**: {failures[c.number]}" if c.number in failures else "**holds**"
        parts += ["", f"### Claim {c.number}: {c.title}", "", c.statement, "",
                  f"Check: {verdict} ({secs[c.key]:.1f} s).", "", c.markdown(results[c.key])]
        for key in fig_of[c.number]:
            if key in figs:
                parts += ["", f"![claim {c.number}]({os.path.relpath(figs[key], md_dir)})"]
    return "\n".join(parts) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` (starting with :data:`SECTION_TITLE`) into ``path``: replace that section
    (up to the next ``## `` heading) if present, else append it."""
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == SECTION_TITLE), None)
    if start is None:
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        path.write_text(old + sep + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + tail if tail else ""))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``--quick``, ``--results PATH`` (``-`` = print only), ``--figures DIR``, ``--threads``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds instead of minutes (fewer inputs and samples)")
    ap.add_argument("--results", default=None, help="markdown file for section 14 (default: benchmarks/RESULTS.md; "
                    "with --quick: print only); '-' prints only")
    ap.add_argument("--figures", default=None, help="folder for the PNGs (default: benchmarks/results; with --quick: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every claim, write the section and figures; 0 if all hold, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    start, load0, t0 = _dt.datetime.now(_dt.timezone.utc), os.getloadavg()[0], time.perf_counter()
    results, failures, secs = run_all(Settings.make(a.quick))
    res_path = None if a.results == "-" or (a.results is None and a.quick) else Path(a.results or RESULTS_MD)
    fig_dir = Path(a.figures) if a.figures else (None if a.quick else FIGURES)
    figs = figures(results, fig_dir) if fig_dir is not None else {}
    md_dir = res_path.parent if res_path is not None else REPO / "benchmarks"
    head = provenance(a, start, (load0, os.getloadavg()[0]), time.perf_counter() - t0)
    text = section(results, failures, secs, head, figs, md_dir)
    if res_path is None:
        print(text)
    else:
        write_section(res_path, text)
        print(f"wrote {SECTION_TITLE[3:]} to {res_path}" + (f" and {len(figs)} figures to {fig_dir}" if figs else ""))
    for number, msg in sorted(failures.items()):
        print(f"CLAIM {number} FAILED: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
