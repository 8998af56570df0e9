"""Certified output bounds of a smoothed regressor: percentile / median smoothing (Chiang et al.
2020, "Detection as regression: certified object detection by median smoothing", NeurIPS).

For a regressor ``f: R^d -> R^m`` and Gaussian noise ``N(0, sigma^2 I)``, the percentile-
smoothed regressor is, per output coordinate,

    h_p(x) = sup{ y : P(f(x + delta) <= y) <= p }     (p = 1/2: median smoothing).

Chiang et al. 2020, Theorem 1: for ``||delta||_2 <= eps``,

    h_{p_low}(x) <= h_p(x + delta) <= h_{p_up}(x),
    p_low = Phi(Phi^-1(p) - eps/sigma),   p_up = Phi(Phi^-1(p) + eps/sigma).

Estimation (Chiang et al. 2020, Sec. 3.2 / order statistics): with ``n`` samples sorted
``y_(1) <= ... <= y_(n)``, ``P(y_(k) <= h_q(x)) >= P(Bin(n, q) >= k)`` and
``P(y_(k) >= h_q(x)) >= P(Bin(n, q) <= k - 1)``. We take the largest ``k_low`` with
``P(Bin(n, p_low) <= k_low - 1) <= alpha'`` and the smallest ``k_up`` with
``P(Bin(n, p_up) <= k_up - 1) >= 1 - alpha'``, ``alpha' = alpha / (2 m)`` (Bonferroni over
both sides and the ``m`` outputs). Where no such index exists the bound is ``-inf`` / ``+inf``
(too few samples for that ``eps``). All bounds hold together with probability ``>= 1 - alpha``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch
from scipy.stats import binom
from scipy.stats import norm as _normal
from torch import Tensor

from .noise import GaussianNoise
from .sampling import SamplingOptions, monte_carlo

__all__ = ["RegressionBounds", "order_statistic_indices", "sample_outputs", "bounds_from_samples", "percentile_bounds"]


@dataclass
class RegressionBounds:
    """``lower``/``upper`` ``[B, m]`` (float64): bounds on ``h_p(x')`` for every
    ``||x' - x||_2 <= eps``; ``estimate [B, m]``: the empirical ``p``-percentile at ``x``."""

    lower: np.ndarray
    upper: np.ndarray
    estimate: np.ndarray
    percentile: float
    eps: float
    sigma: float
    n: int
    alpha: float
    k_low: int | None
    k_up: int | None


@functools.lru_cache(maxsize=1024)
def order_statistic_indices(n: int, p_low: float, p_up: float, alpha_side: float) -> tuple[int | None, int | None]:
    """1-based order statistic indices ``(k_low, k_up)`` (``None`` when none is valid): with
    probability ``>= 1 - alpha_side`` each, ``y_(k_low) <= h_{p_low}`` and ``y_(k_up) >= h_{p_up}``."""
    ks = np.arange(1, n + 1)
    cdf_low = binom.cdf(ks - 1, n, p_low)  # P(Bin <= k-1) = P(y_(k) > q) bound
    ok_low = np.nonzero(cdf_low <= alpha_side)[0]
    k_low = int(ks[ok_low[-1]]) if ok_low.size else None
    cdf_up = binom.cdf(ks - 1, n, p_up)
    ok_up = np.nonzero(cdf_up >= 1.0 - alpha_side)[0]
    k_up = int(ks[ok_up[0]]) if ok_up.size else None
    return k_low, k_up


def sample_outputs(
    model: torch.nn.Module,
    x: Tensor,
    sigma: float,
    n: int,
    **sampling: Unpack[SamplingOptions],
) -> np.ndarray:
    """The outputs ``f(x + delta)``, ``delta ~ N(0, sigma^2 I)``, sorted per input and output.

    Args:
        model: regressor ``[S, *shape] -> [S, m]`` (or ``[S]``).
        x: ``[B, *shape]``.
        sampling: see :class:`~smoothing.sampling.SamplingOptions`.

    Returns:
        ``[B, n, m]`` float64, ascending along the sample axis (the order statistics
        ``y_(1) <= ... <= y_(n)`` of every input and output). The noise of an input does not
        depend on the other inputs (:mod:`smoothing.sampling`), so any split of a batch gives
        the same samples.
    """
    noise = GaussianNoise(sigma=sigma)
    B = x.shape[0]
    store: dict[str, Tensor] = {}

    def consume(slot: Tensor, pos: Tensor, out: Tensor) -> None:
        if "y" not in store:
            store["y"] = torch.empty(B, n, out.shape[1], dtype=out.dtype, device=out.device)
        store["y"][slot, pos] = out

    with torch.inference_mode():
        monte_carlo(model, x, noise, [n], consume, streams=["regression"], **sampling)
    return store["y"].double().sort(dim=1).values.cpu().numpy()


def _check_percentile_eps(percentile: float, eps: float) -> None:
    """Reject a percentile outside (0, 1) and a negative radius."""
    if not 0 < percentile < 1:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def bounds_from_samples(y: np.ndarray, sigma: float, eps: float, percentile: float, alpha: float) -> RegressionBounds:
    """Chiang et al. 2020, Thm. 1 with order-statistic confidence bounds, from sorted samples.

    Args:
        y: ``[B, n, m]`` sorted samples of :func:`sample_outputs`.
        eps: l2 radius (0: bounds on ``h_p(x)`` itself).
        alpha: the ``2 m`` one-sided bounds of all ``B`` inputs' outputs hold together with
            probability ``>= 1 - alpha`` per input (``alpha / (2 m)`` each).
    """
    _check_percentile_eps(percentile, eps)
    B, n, m = y.shape
    z = _normal.ppf(percentile)
    p_low = float(_normal.cdf(z - eps / sigma))
    p_up = float(_normal.cdf(z + eps / sigma))
    k_low, k_up = order_statistic_indices(n, p_low, p_up, alpha / (2 * m))
    lower = y[:, k_low - 1, :] if k_low is not None else np.full((B, m), -np.inf)
    upper = y[:, k_up - 1, :] if k_up is not None else np.full((B, m), np.inf)
    k_est = min(n, max(1, int(np.ceil(percentile * n))))
    return RegressionBounds(lower, upper, y[:, k_est - 1, :], percentile, float(eps), float(sigma), n, alpha, k_low, k_up)


def percentile_bounds(
    model: torch.nn.Module,
    x: Tensor,
    sigma: float,
    eps: float,
    *,
    percentile: float = 0.5,
    n: int = 10_000,
    alpha: float = 0.001,
    **sampling: Unpack[SamplingOptions],
) -> RegressionBounds:
    """Certified bounds on the percentile-smoothed regressor over the l2 ball of radius ``eps``.

    Args:
        model: regressor ``[S, *shape] -> [S, m]`` (or ``[S]``).
        x: ``[B, *shape]``.
        sigma: Gaussian noise level (input space of the model).
        eps: l2 radius of the perturbations (0: bounds on ``h_p(x)`` itself).
        percentile: ``p`` in (0, 1); 0.5 is median smoothing.
        n: samples per input.
        sampling: see :class:`~smoothing.sampling.SamplingOptions`.
    """
    _check_percentile_eps(percentile, eps)
    y = sample_outputs(model, x, sigma, n, **sampling)
    return bounds_from_samples(y, sigma, eps, percentile, alpha)
