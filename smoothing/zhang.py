"""Non-Gaussian smoothing noise of Zhang et al. 2020, certified by its functional-optimisation bound.

Zhang, Ye, Gong, Zhu, Liu, "Black-box certification with randomized smoothing: a functional
optimization based framework", NeurIPS 2020 (arXiv 2002.09169).

**Noise.** The rotation-invariant family

    pi_0(z) ~ ||z||_2^(-k) exp(-||z||_2^2 / (2 s^2)),   z in R^d,  0 <= k < d - 1,

a Gaussian whose mass is pulled in from the thin shell ``||z|| ~ s sqrt(d)`` by the ``||z||^-k``
factor (``k = 0``: the Gaussian); the paper's remedy for the thin-shell concentration of Gaussian
noise in high dimension (its section and equation numbers could not be checked here: the text
of the paper was not available, only its abstract and experiment section). ``R = ||z||`` has the law ``s chi_{d-k}`` and the direction is
uniform, independent of ``R``.

**Bound.** For a shift ``delta`` the paper lower-bounds the smoothed top-class probability at
``x + delta`` by the functional optimisation

    L(delta) = min { E_{pi_0}[f(z + delta)] : 0 <= f <= 1, E_{pi_0}[f] >= pA },

whose solution is a level set of the likelihood ratio ``Lambda(z) = pi_0(z - delta) / pi_0(z)``
(Neyman-Pearson); its Lagrangian dual gives, for every ``lambda >= 0``,
``L(delta) >= lambda pA - E_{z ~ pi_0}[(lambda - Lambda(z))_+]`` (equality at the best ``lambda``).
Here ``pi_0`` is rotation invariant, so ``Lambda`` depends on ``R`` and the cosine ``t`` between
``z`` and ``delta`` only, ``R`` and ``t`` are independent with exact CDFs
(``R / s ~ chi_{d-k}``, ``(1 + t)/2 ~ Beta((d-1)/2, (d-1)/2)``), and ``Lambda`` is increasing in
``t`` (for ``||delta|| > 0``).

**Computation, conservative and deterministic** (:func:`interval_threshold`). ``(R, t)`` space is
cut into cells (quantile cells of the two exact laws; cell masses from the exact CDFs). On each
cell, and for all ``||delta||`` in an interval ``[rho_0, rho_1]`` at once, ``Lambda`` is bounded
below by its value at the cell's smallest ``t`` with the two factors minimised separately over the
corners of ``R x rho`` (each factor is extremal at a corner: the Gaussian factor is linear in ``R``
and concave in ``rho``, the ``||.||^-k`` factor is ``-(k/2) log q`` with ``q`` convex in ``1/R`` and
in ``rho``). That gives a discrete ``Y <= Lambda`` (coupled pointwise), so
``E_0[(lambda - Lambda)_+] <= E[(lambda - Y)_+]`` and the dual bound computed with ``Y`` is a lower
bound for every ``||delta||`` of the interval; the smallest ``pA`` for which it exceeds 1/2 is
computed once per interval. The l_2 radius ``rho_J`` is certified when ``pA_lower`` passes the thresholds of all the
intervals ``[rho_{j-1}, rho_j]``, ``j <= J`` (no monotonicity in ``rho`` is assumed). No Monte
Carlo is involved, so the certificate's confidence is the Clopper-Pearson one of CERTIFY.
l_inf and l_1 radii by the dimension factor (``R_inf = R_2 / sqrt(d)``, ``R_1 = R_2``): the l_inf
ball of radius ``R_2 / sqrt(d)`` lies in the l_2 ball of radius ``R_2`` (its corners are on that
sphere, so for a rotation-invariant noise the conversion loses nothing when the bound decreases
with ``||delta||_2``; soundness does not depend on that).

**Not implemented.** The paper's l_inf proposal (a family that mixes ``||z||_inf`` and
``||z||_2``) and its l_inf certificate: that family is not rotation invariant, its likelihood
ratio does not reduce to a low-dimensional statistic, and without the paper's argument for which
``delta`` of the l_inf ball is worst (which could not be retrieved and checked here) no sound
radius follows from the per-``delta`` bound above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.special import betainc, gammainc, gammaincinv
from scipy.stats import beta as _beta
from scipy.stats import norm as _normal
from torch import Tensor

from .noise import Noise

__all__ = ["ZhangNoise", "ZhangGrid", "interval_threshold", "radius_thresholds", "lagrangian_radius"]

#: added to every threshold: covers the float64 error of the cell masses (sums of ~1e5 CDF values)
MASS_MARGIN = 1e-10


@dataclass(frozen=True)
class ZhangGrid:
    """Discretisation of the bound (part of the certificate's statement, never of its validity).

    Attributes:
        radius_cells: cells of ``R``; t_cells: cells of the cosine ``t`` (quantile cells on a
            normal-score scale, so the tails are resolved).
        intervals: number of l_2 radius intervals in ``(0, max_radius s]``.
        max_radius: the largest l_2 radius tried, in units of the scale ``s`` (radii capped there).
    """

    radius_cells: int = 160
    t_cells: int = 1000
    intervals: int = 150
    max_radius: float = 4.5


def _levels(n: int) -> np.ndarray:
    """``n + 1`` probability levels from 0 to 1, evenly spaced on the normal-score scale ``[-8, 8]``."""
    lv = _normal.cdf(np.linspace(-8.0, 8.0, n - 1))
    return np.concatenate([[0.0], lv, [1.0]])


@lru_cache(maxsize=8)
def _cells(d: int, k: int, s: float, grid: ZhangGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cells ``(r_lo [Nr], r_hi [Nr], t_lo [Nt], mass [Nr, Nt])`` of ``(R, t)`` under ``pi_0``.

    ``R^2 / s^2 ~ chi2_{d-k}`` (CDF ``gammainc((d-k)/2, x/2)``), ``(1+t)/2 ~ Beta((d-1)/2, (d-1)/2)``.
    """
    nu, a = (d - k) / 2.0, (d - 1) / 2.0
    lv_r = _levels(grid.radius_cells)
    r_edges = s * np.sqrt(2.0 * gammaincinv(nu, lv_r))  # [Nr + 1], last = inf
    p_r = np.diff(gammainc(nu, (r_edges / s) ** 2 / 2.0))
    lv_t = _levels(grid.t_cells)
    t_edges = 2.0 * _beta.ppf(lv_t, a, a) - 1.0
    t_edges[0], t_edges[-1] = -1.0, 1.0
    p_t = np.diff(betainc(a, a, (t_edges + 1.0) / 2.0))
    return r_edges[:-1], r_edges[1:], t_edges[:-1], np.outer(p_r, p_t)


def _log_ratio_lower(r_lo, r_hi, t, rho0, rho1, k, s):
    """Lower bound ``[Nr, Nt]`` of ``log Lambda(R, t, rho)`` over ``R in [r_lo, r_hi]``,
    ``rho in [rho0, rho1]`` (``Lambda = (R/R')^k exp((R^2 - R'^2) / 2s^2)``, ``R'^2 = R^2 - 2 R rho t + rho^2``)."""
    R = np.stack([r_lo, r_hi])[:, :, None]  # [2, Nr, 1]
    T = t[None, None, :]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        gauss = np.min([np.nan_to_num((2.0 * R * rho * T - rho * rho) / (2 * s * s), nan=-np.inf) for rho in (rho0, rho1)], axis=0)
        gauss = gauss.min(axis=0)  # [Nr, Nt]
        if k == 0:
            return gauss
        v = np.stack([1.0 / r_lo, 1.0 / r_hi])[:, :, None]  # 1/R; 1/0 = inf
        # q = R'^2 / R^2 = (1 - rho t v)^2 + (rho v)^2 (1 - t^2) >= 0 in floating point too
        q = np.max([np.nan_to_num((1.0 - rho * T * v) ** 2 + (rho * v) ** 2 * (1.0 - T * T), nan=np.inf)
                    for rho in (rho0, rho1)], axis=0)
        q = q.max(axis=0)
        return gauss - 0.5 * k * np.log(q)


def interval_threshold(d: int, k: int, s: float, rho0: float, rho1: float, grid: ZhangGrid) -> float:
    """Smallest ``pA`` certifying every ``||delta||_2 in [rho0, rho1]`` (bound ``> 1/2``); 2 if none.

    Lagrangian (weak duality) form of the functional optimisation, for every ``lambda >= 0``:
    ``L >= lambda pA - E_0[(lambda - Lambda)_+] >= lambda pA - E[(lambda - Y)_+]`` (``Y <= Lambda``).
    At ``lambda = y_i`` (atoms sorted, ``C_i`` / ``W_i`` the mass / ``Y``-weighted mass below atom
    ``i``) this is ``y_i (pA - C_i) + W_i``, above 1/2 iff ``pA > C_i + (1/2 - W_i) / y_i``; the
    threshold is the smallest of these, plus a float margin (:data:`MASS_MARGIN`).
    """
    r_lo, r_hi, t_lo, mass = _cells(d, k, s, grid)
    logy = np.nan_to_num(_log_ratio_lower(r_lo, r_hi, t_lo, rho0, rho1, k, s).ravel(), nan=-np.inf, posinf=np.inf)
    order = np.argsort(logy, kind="stable")
    y, m = np.exp(logy[order]), mass.ravel()[order]
    below = np.concatenate([[0.0], np.cumsum(m)[:-1]])  # C_i
    wbelow = np.concatenate([[0.0], np.cumsum(m * y)[:-1]])  # W_i
    pos = y > 0
    if not pos.any():
        return 2.0
    yp = y[pos]
    th = below[pos] + (0.5 - wbelow[pos]) / yp + MASS_MARGIN * (1.0 + 1.0 / yp)
    return float(min(th.min(), 2.0))


@lru_cache(maxsize=32)
def radius_thresholds(d: int, k: int, s: float, grid: ZhangGrid) -> tuple[np.ndarray, np.ndarray]:
    """``(radii [J], thresholds [J])``: ``radii[j]`` is certified iff ``pA >= thresholds[j]``
    (the running maximum of :func:`interval_threshold` over the intervals up to ``j``)."""
    J = int(grid.intervals)
    edges = np.linspace(0.0, float(grid.max_radius) * s, J + 1)
    th = np.empty(J)
    for j in range(J):
        th[j] = interval_threshold(d, k, s, edges[j], edges[j + 1], grid)
        if th[j] > 1.0:
            th[j:] = 2.0
            break
    return edges[1:], np.maximum.accumulate(th)


def lagrangian_radius(pa: np.ndarray, d: int, k: int, s: float, grid: ZhangGrid) -> np.ndarray:
    """Certified l_2 radius ``[B]`` for ``pA_lower [B]``: the largest grid radius whose threshold
    ``pA`` reaches (0 if none)."""
    radii, th = radius_thresholds(int(d), int(k), float(s), grid)
    n = np.searchsorted(th, np.asarray(pa, dtype=np.float64), side="right")  # thresholds <= pA
    return np.where(n > 0, radii[np.maximum(n - 1, 0)], 0.0)


class ZhangNoise(Noise):
    """``pi_0(z) ~ ||z||_2^(-k) exp(-||z||_2^2 / (2 s^2))`` on each row (Zhang et al. 2020).

    ``sigma`` is the per-coordinate std (the convention of every noise here): ``E||z||^2 = s^2 (d-k)
    = sigma^2 d``, so ``s = sigma sqrt(d / (d - k))`` depends on the dimension ``d`` of a row.
    Exact sampler: ``z = R u`` with ``u = g / ||g||``, ``g ~ N(0, I_d)`` (uniform direction) and
    ``R = s sqrt(sum of d - k squared standard normals)`` (``R^(d-1) R^-k e^(-R^2/2s^2)`` is the
    ``chi_{d-k}`` law scaled by ``s``); ``k`` must be an integer with ``0 <= k < d - 1``.

    Args:
        sigma: per-coordinate standard deviation.
        k: the exponent of ``||z||^-k``.
        dim: the row dimension; default: ``fill_`` takes rows ``out[i]`` (``d = prod(out.shape[1:])``).
        grid: discretisation of the radius computation (:class:`ZhangGrid`).
    """

    name = "zhang"
    direct_norms = ("l2",)

    def __init__(self, sigma: float, k: int = 0, dim: int | None = None, grid: ZhangGrid | None = None) -> None:
        if int(k) != k or k < 0:
            raise ValueError(f"ZhangNoise: k must be a non-negative integer, got {k}")
        self.k = int(k)
        self.dim = None if dim is None else int(dim)
        self.grid = grid if grid is not None else ZhangGrid()
        super().__init__(sigma=sigma)

    @staticmethod
    def _std_per_scale() -> float:
        # the scale depends on d; ``scale`` reported here is sigma, use :meth:`scale_for`
        return 1.0

    def scale_for(self, d: int) -> float:
        """``s = sigma sqrt(d / (d - k))`` for rows of dimension ``d``."""
        if not d - self.k > 1:
            raise ValueError(f"ZhangNoise: need k < d - 1, got k={self.k}, d={d}")
        return self.sigma * math.sqrt(d / (d - self.k))

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        d = self.dim if self.dim is not None else math.prod(out.shape[1:])
        rows = out.view(-1, d)
        s = self.scale_for(d)
        rows.normal_(0.0, 1.0, generator=generator)
        chi2 = torch.empty((rows.shape[0], d - self.k), device=out.device, dtype=out.dtype)
        chi2.normal_(0.0, 1.0, generator=generator)
        radius = chi2.square_().sum(dim=1, keepdim=True).sqrt_().mul_(s)
        norm = rows.norm(dim=1, keepdim=True).clamp_(min=torch.finfo(out.dtype).tiny)
        return rows.div_(norm).mul_(radius).view(out.shape)

    def _radius(self, norm: str, pa: np.ndarray, pb: np.ndarray, dim: int) -> np.ndarray:
        shape = pa.shape
        r = lagrangian_radius(pa.reshape(-1), int(dim), self.k, self.scale_for(int(dim)), self.grid)
        return r.reshape(shape)

    def describe(self) -> dict:
        g = self.grid
        return {
            "noise": self.name, "sigma": self.sigma, "k": self.k,
            "radius_method": ("Zhang et al. 2020 functional-optimisation (Neyman-Pearson) bound, computed conservatively on "
                              f"{g.radius_cells} x {g.t_cells} cells of (||z||, cos) from their exact laws for every l2 radius "
                              f"interval of width {g.max_radius:g} s / {g.intervals} (radius capped at {g.max_radius:g} s); "
                              "no Monte Carlo; l_inf = l2 / sqrt(d), l1 = l2"),
        }
