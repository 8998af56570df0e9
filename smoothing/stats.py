"""Confidence bounds for randomized smoothing: Clopper-Pearson, the PREDICT test, sample sizes.

All probabilities here are computed in float64 (numpy / scipy), never in the model's dtype.

* :func:`cp_lower` / :func:`cp_upper`: one-sided Clopper-Pearson bounds (Clopper & Pearson
  1934), the bounds of Cohen et al. 2019, Alg. "CERTIFY" (``LowerConfBound``).
* :func:`cp_interval`: the two-sided interval (statsmodels ``proportion_confint(method="beta")``).
* :func:`predict_pvalue`: the two-sided binomial test of Cohen et al. 2019, Alg. "PREDICT".
* :func:`check_n_alpha` / :func:`min_samples`: the sample sizes that can never certify.
* :func:`label_counts`: a label's count and the other classes' counts, the bounds' inputs.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, binomtest
from torch import Tensor

__all__ = [
    "SmoothingConfigError",
    "cp_lower",
    "cp_upper",
    "cp_interval",
    "predict_pvalue",
    "max_lower_bound",
    "min_samples",
    "check_n_alpha",
    "label_counts",
]


class SmoothingConfigError(ValueError):
    """Options of a smoothing method that cannot work (e.g. an (n, alpha) pair that can
    never certify, a non-positive sigma)."""


def _host_int64(a: np.ndarray | Tensor) -> np.ndarray:
    """A host int64 numpy copy (or view) of a tensor or array."""
    return np.asarray(a.cpu() if isinstance(a, Tensor) else a, dtype=np.int64)


def label_counts(counts: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Split class counts ``[B, K]`` at ``labels [B]``: the label's count ``[B]`` and the other
    classes' counts ``[B, K-1]`` (in increasing class order), int64 on the host."""
    c = _host_int64(counts)
    lab = _host_int64(labels).reshape(-1)
    B, K = c.shape
    mask = np.ones_like(c, dtype=bool)
    mask[np.arange(B), lab] = False
    return c[np.arange(B), lab], c[mask].reshape(B, K - 1)


def _arr(k) -> np.ndarray:
    return np.asarray(k, dtype=np.float64)


def cp_lower(k, n: int | np.ndarray, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion.

    ``P(p >= cp_lower(K, n, alpha)) >= 1 - alpha`` for ``K ~ Bin(n, p)``; it is the
    ``alpha`` quantile of ``Beta(k, n - k + 1)`` and 0 for ``k = 0``.

    Args:
        k: successes, int or array ``[...]``.
        n: trials (broadcastable to ``k``).
        alpha: error probability in (0, 1).
    Returns:
        float64 array of the shape of ``k``.
    """
    k, n = _arr(k), _arr(n)
    with np.errstate(invalid="ignore"):
        lo = beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, np.nan_to_num(lo, nan=0.0))


def cp_upper(k, n: int | np.ndarray, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound: ``1 - cp_lower(n - k, n, alpha)``
    (the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)``, 1 for ``k = n``)."""
    k, n = _arr(k), _arr(n)
    return 1.0 - cp_lower(n - k, n, alpha)


def cp_interval(k, n: int | np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided ``1 - alpha`` Clopper-Pearson interval ``(lo, hi)`` (``alpha/2`` per side),
    computed with ``statsmodels.stats.proportion.proportion_confint(method="beta")``."""
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(_arr(k), _arr(n), alpha=alpha, method="beta")
    k, n = _arr(k), _arr(n)
    lo = np.where(k <= 0, 0.0, np.nan_to_num(lo, nan=0.0))
    hi = np.where(k >= n, 1.0, np.nan_to_num(hi, nan=1.0))
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def predict_pvalue(n_a: int, n_b: int) -> float:
    """p-value of the two-sided binomial test ``n_a ~ Bin(n_a + n_b, 1/2)`` used by PREDICT
    (Cohen et al. 2019, Alg. PREDICT): PREDICT returns the top class when it is ``<= alpha``."""
    if n_a + n_b == 0:
        return 1.0
    return float(binomtest(int(n_a), int(n_a + n_b), 0.5).pvalue)


def max_lower_bound(n: int, alpha: float) -> float:
    """The largest one-sided CP lower bound ``n`` samples can give: all ``n`` successes give
    ``alpha ** (1/n)`` (the ``alpha`` quantile of ``Beta(n, 1)``)."""
    return float(alpha ** (1.0 / n))


def min_samples(alpha: float, threshold: float = 0.5) -> int:
    """Smallest ``n`` whose best CP lower bound ``alpha**(1/n)`` exceeds ``threshold``:
    ``n > log(alpha) / log(threshold)``; for ``threshold = 1/2``, ``n > log2(1/alpha)``
    (``alpha = 0.001`` needs ``n >= 10``)."""
    if not 0 < alpha < 1:
        raise SmoothingConfigError(f"alpha must be in (0, 1), got {alpha}")
    m = math.log(alpha) / math.log(threshold)
    n = math.floor(m) + 1
    # guard the floating-point edge: make sure the returned n works and n-1 does not
    while max_lower_bound(n, alpha) <= threshold:
        n += 1
    while n > 1 and max_lower_bound(n - 1, alpha) > threshold:
        n -= 1
    return n


def check_n_alpha(n: int, alpha: float, *, pb_bound: bool = False, num_classes: int | None = None) -> None:
    """Reject an ``(n, alpha)`` pair with which CERTIFY can never certify.

    One-sided CERTIFY (Cohen et al. 2019) certifies only if ``pA_lower > 1/2``; the best
    possible ``pA_lower`` (all ``n`` samples in class A) is ``alpha ** (1/n)``, so it needs
    ``alpha ** (1/n) > 1/2``, i.e. ``n > log2(1/alpha)``. With ``pb_bound`` (``alpha/2`` for
    ``pA``, ``alpha/2`` split over the other ``K - 1`` classes) it needs
    ``(alpha/2) ** (1/n) > min(1 - (alpha / (2 (K-1))) ** (1/n), 1 - (alpha/2) ** (1/n))``.

    Raises:
        SmoothingConfigError: with the smallest ``n`` that would work.
    """
    if not 0 < alpha < 1:
        raise SmoothingConfigError(f"alpha must be in (0, 1), got {alpha}")
    if int(n) != n or n < 1:
        raise SmoothingConfigError(f"n must be a positive integer, got {n}")
    if not pb_bound:
        if max_lower_bound(n, alpha) <= 0.5:
            raise SmoothingConfigError(
                f"n={n} samples can never certify at alpha={alpha}: even with all {n} samples in the top class "
                f"the Clopper-Pearson lower bound is alpha**(1/n) = {max_lower_bound(n, alpha):.4f} <= 1/2; "
                f"use n >= {min_samples(alpha)}"
            )
        return
    K = 2 if num_classes is None else int(num_classes)
    pa = max_lower_bound(n, alpha / 2)
    pb = min(1.0 - max_lower_bound(n, alpha / (2 * max(K - 1, 1))), 1.0 - pa)
    if pa <= pb:
        m = n
        while True:
            m += 1
            pa_m = max_lower_bound(m, alpha / 2)
            if pa_m > min(1.0 - max_lower_bound(m, alpha / (2 * max(K - 1, 1))), 1.0 - pa_m):
                break
        raise SmoothingConfigError(
            f"n={n} samples can never certify at alpha={alpha} with the separate pB bound ({K} classes): the best "
            f"pA lower bound {pa:.4f} does not exceed the best pB upper bound {pb:.4f}; use n >= {m}"
        )
