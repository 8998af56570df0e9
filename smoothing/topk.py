"""Certified top-k predictions under Gaussian smoothing (Jia et al. 2020, "Certified robustness
for top-k predictions against adversarial perturbations via randomized smoothing", ICLR).

Theorem 1 of Jia et al.: let ``pl_lower`` bound the probability of label ``l`` from below and
``p_up[c]`` bound every other class from above. Sort the other classes' upper bounds in
decreasing order and keep the first ``k``; ``S_t`` is the set of the ``t`` smallest of those
``k`` (``t = 1..k``) and ``p_{S_t} = min(sum_{c in S_t} p_up[c], 1 - pl_lower)``. Then ``l`` is
among the top-k classes of ``g(x + delta)`` for every ``||delta||_2 < R_l``, where ``R_l`` is
the root of

    Phi(Phi^-1(pl_lower) - R/sigma) - min_{t=1..k} Phi(Phi^-1(p_{S_t}) + R/sigma) / t = 0,

solved here by bisection (the left side decreases in ``R``). For ``k = 1``,
``R = sigma/2 (Phi^-1(pl_lower) - Phi^-1(p_{b_1}))``: Cohen et al.'s radius.

Probability bounds: simultaneous one-sided Clopper-Pearson bounds at ``alpha / K`` for each of
the ``K`` classes (Bonferroni), as in Jia et al.'s experiments.
"""
from __future__ import annotations

from typing import Unpack

import numpy as np
import torch
from scipy.stats import norm as _normal
from torch import Tensor

from .noise import FLOAT_MARGIN, GaussianNoise
from .sampling import SamplingOptions, count_classes
from .stats import cp_lower, cp_upper, label_counts

__all__ = ["topk_radius", "topk_bounds", "certify_topk"]


def topk_radius(pl_lower: np.ndarray, p_upper: np.ndarray, k: int, sigma: float, iters: int = 200) -> np.ndarray:
    """Jia et al. 2020, Theorem 1 radius, batched.

    Args:
        pl_lower: ``[B]`` lower bounds on the label's probability.
        p_upper: ``[B, K-1]`` upper bounds on the other classes' probabilities.
        k: top-k.
        sigma: Gaussian noise level.
    Returns:
        ``[B]`` float64 l2 radii (0 where the label is not certified in the top-k at x).
    """
    pl = np.asarray(pl_lower, dtype=np.float64).reshape(-1)
    pu = np.asarray(p_upper, dtype=np.float64).reshape(pl.shape[0], -1)
    if not 1 <= k <= pu.shape[1]:
        raise ValueError(f"k={k} must be in 1..{pu.shape[1]} (number of other classes)")
    top = -np.sort(-pu, axis=1)[:, :k]  # [B, k] decreasing
    # p_{S_t}: sum of the t smallest of the top-k, t = 1..k -> reversed cumulative sums
    ps = np.cumsum(top[:, ::-1], axis=1)  # [:, t-1] = sum of t smallest
    ps = np.minimum(ps, (1.0 - pl)[:, None])
    t = np.arange(1, k + 1, dtype=np.float64)[None, :]
    a = _normal.ppf(pl)
    with np.errstate(divide="ignore"):
        b = _normal.ppf(ps)

    def h(r: np.ndarray) -> np.ndarray:
        return _normal.cdf(a - r / sigma) - np.min(_normal.cdf(b + r[:, None] / sigma) / t, axis=1)

    B = pl.shape[0]
    ok = h(np.zeros(B)) > 0
    lo = np.zeros(B)
    hi = np.full(B, sigma)
    for _ in range(200):  # grow hi until h(hi) <= 0
        grow = ok & (h(hi) > 0)
        if not grow.any():
            break
        hi = np.where(grow, hi * 2, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        pos = h(mid) > 0
        lo = np.where(ok & pos, mid, lo)
        hi = np.where(ok & ~pos, mid, hi)
        if np.all(hi - lo <= 1e-13 * np.maximum(hi, 1e-300)):
            break
    return np.where(ok, lo * (1.0 - FLOAT_MARGIN), 0.0)


def topk_bounds(counts: np.ndarray | Tensor, labels: np.ndarray | Tensor, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous bounds from counts ``[B, K]``: ``pl_lower [B]`` and ``p_upper [B, K-1]``
    (the other classes in increasing class order), each one-sided at ``alpha / K``."""
    n_l, others = label_counts(counts, labels)
    K = others.shape[1] + 1
    a = alpha / K
    pl = cp_lower(n_l, n, a)
    pu = np.minimum(cp_upper(others, n, a), (1.0 - pl)[:, None])
    return pl, pu


def certify_topk(
    model: torch.nn.Module,
    x: Tensor,
    labels: Tensor,
    k: int,
    sigma: float,
    *,
    n: int = 100_000,
    alpha: float = 0.001,
    **sampling: Unpack[SamplingOptions],
) -> dict[str, np.ndarray | Tensor]:
    """Certify that ``labels[b]`` is in the top-k of the Gaussian-smoothed classifier.

    Args:
        x: ``[B, *shape]``; labels: ``[B]`` long.
        sampling: see :class:`~smoothing.sampling.SamplingOptions`.
    Returns:
        dict with ``radius [B]`` (l2), ``pl_lower [B]``, ``p_upper [B, K-1]``,
        ``counts [B, K]``, ``top1 [B]`` (argmax of the counts).
    """
    noise = GaussianNoise(sigma=sigma)
    counts = count_classes(model, x, noise, [n], streams=["topk"], **sampling)[0]
    pl, pu = topk_bounds(counts, labels, n, alpha)
    r = topk_radius(pl, pu, k, sigma)
    return {"radius": r, "pl_lower": pl, "p_upper": pu, "counts": counts, "top1": counts.argmax(dim=1)}
