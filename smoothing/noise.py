"""Smoothing noises: one class per distribution, with a sampler and its certified radii.

Every noise has

* ``sample(shape, device, generator, dtype)`` -> a tensor of ``shape`` drawn i.i.d. per
  coordinate from the noise (with the given ``torch.Generator``, so runs repeat exactly);
* ``radius(pa_lower, pb_upper=None, norm="l2", dim=d)`` -> the certified radius (float64
  numpy array) of the smoothed classifier ``g(x) = argmax_c P(f(x + delta) = c)`` given a
  lower bound ``pa_lower`` on the top class probability and optionally an upper bound
  ``pb_upper`` on every other class (default ``1 - pa_lower``, the "one-sided" radius).

Scale convention: ``sigma`` is the per-coordinate standard deviation of the noise, in the
**model's input space** (normalisation belongs inside the model), for every noise (the
convention of Yang et al. 2020 / rs4a); ``scale`` (``lambda``) is the distribution's own
parameter, derived from it.

Radii for a norm the noise has no formula for are converted from a norm it has, with the
dimension factors ``||v||_p <= ||v||_q`` (``q <= p``) and ``||v||_q <= d^(1/q - 1/p) ||v||_p``
(``q <= p``): e.g. Gaussian l_inf radius ``R_2 / sqrt(d)``.

Floating point: radii are computed in float64 and shrunk by a relative ``FLOAT_MARGIN``;
see :data:`FLOAT_NOTE` for what this does not cover.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import norm as _normal
from torch import Tensor

__all__ = [
    "Noise",
    "GaussianNoise",
    "LaplaceNoise",
    "UniformNoise",
    "FLOAT_MARGIN",
    "FLOAT_NOTE",
    "convert_radius",
    "get_noise",
]

#: relative amount every certified radius is shrunk by (float64 round-off of Phi^-1, log, ...)
FLOAT_MARGIN = 1e-9

#: stated in every smoothing certificate's details (Voracek & Hein 2023, "Sound randomized
#: smoothing in floating-point arithmetics")
FLOAT_NOTE = (
    "radius computed in float64 from the Clopper-Pearson bound and shrunk by a relative margin of "
    f"{FLOAT_MARGIN:g}; NOT covered: the noise is drawn by torch's pseudo-random sampler and added "
    "in the model dtype (x + noise is rounded), and the base classifier is evaluated in that dtype, "
    "so the sampled distribution is a discretised, rounded version of the ideal one. Voracek & Hein "
    "(2023) show such rounding can in principle be exploited; the guarantee assumes exact "
    "real-valued noise."
)

_NORMS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


def _p(norm: str) -> float:
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; use l1, l2 or linf")
    return _NORMS[norm]


def convert_radius(radius: np.ndarray, from_norm: str, to_norm: str, dim: int) -> np.ndarray:
    """Radius of an l_q ball contained in the l_p ball of radius ``radius`` in ``R^dim``.

    If ``q <= p``: ``||v||_p <= ||v||_q`` so the same radius. If ``q > p``:
    ``||v||_p <= d^(1/p - 1/q) ||v||_q``, so ``radius / d^(1/p - 1/q)`` (e.g. l2 -> linf:
    ``R_2 / sqrt(d)``; l2 -> l_q for q > 2: ``R_2 / d^(1/2 - 1/q)``).
    """
    p, q = _p(from_norm), _p(to_norm)
    if q <= p:
        return np.asarray(radius, dtype=np.float64)
    expo = 1.0 / p - (0.0 if math.isinf(q) else 1.0 / q)
    return np.asarray(radius, dtype=np.float64) / float(dim) ** expo


class Noise:
    """Base class. Subclasses set ``name``, ``direct_norms`` and implement ``sample`` and
    ``_radius(norm, pa, pb, dim)`` for each norm in ``direct_norms``."""

    name: ClassVar[str] = ""
    direct_norms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, sigma: float | None = None, scale: float | None = None) -> None:
        if (sigma is None) == (scale is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of sigma and scale")
        if sigma is not None:
            sigma = float(sigma)
            if not sigma > 0 or not math.isfinite(sigma):
                raise ValueError(f"{type(self).__name__}: sigma must be positive and finite, got {sigma}")
            self.sigma = sigma
            self.scale = sigma / self._std_per_scale()
        else:
            scale = float(scale)  # type: ignore[arg-type]
            if not scale > 0 or not math.isfinite(scale):
                raise ValueError(f"{type(self).__name__}: scale must be positive and finite, got {scale}")
            self.scale = scale
            self.sigma = scale * self._std_per_scale()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma:g}, scale={self.scale:g})"

    @staticmethod
    def _std_per_scale() -> float:
        """Per-coordinate standard deviation of the noise at ``scale = 1``."""
        raise NotImplementedError

    def sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """I.i.d. noise of ``shape`` (e.g. ``[m, *input_shape]``) on ``device``."""
        return self.fill_(torch.empty(tuple(shape), device=device, dtype=dtype), generator)

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill ``out`` in place with i.i.d. noise (no extra allocation); returns ``out``.
        :meth:`sample` is ``fill_`` on a new tensor, so both give the same stream."""
        raise NotImplementedError

    def _radius(self, norm: str, pa: np.ndarray, pb: np.ndarray, dim: int) -> np.ndarray:
        raise NotImplementedError

    def supports(self, norm: str) -> bool:
        """Whether a (possibly dimension-converted) radius exists for ``norm``."""
        return norm in _NORMS and bool(self.direct_norms)

    def radius(
        self,
        pa_lower: float | np.ndarray,
        pb_upper: float | np.ndarray | None = None,
        norm: str = "l2",
        dim: int = 1,
    ) -> np.ndarray:
        """Certified radius of the smoothed classifier in ``norm`` (float64, ``>= 0``).

        Args:
            pa_lower: lower bound on the top class probability, ``[...]``.
            pb_upper: upper bound on every other class probability (default
                ``1 - pa_lower``).
            norm: ``"l1"``, ``"l2"`` or ``"linf"``.
            dim: number of input coordinates ``d`` (for the dimension factors).
        Returns:
            ``[...]`` radii; 0 where ``pa_lower <= pb_upper``. When ``norm`` is not direct,
            the largest of the converted direct radii.
        """
        pa = np.asarray(pa_lower, dtype=np.float64)
        pb = 1.0 - pa if pb_upper is None else np.minimum(np.asarray(pb_upper, dtype=np.float64), 1.0 - pa)
        if norm in self.direct_norms:
            r = self._radius(norm, pa, pb, dim)
        else:
            _p(norm)
            r = np.max([convert_radius(self._radius(m, pa, pb, dim), m, norm, dim) for m in self.direct_norms], axis=0)
        r = np.where(pa > pb, r, 0.0)
        r = np.nan_to_num(r, nan=0.0, posinf=np.finfo(np.float64).max)
        return np.maximum(r * (1.0 - FLOAT_MARGIN), 0.0)

    def describe(self) -> dict:
        return {"noise": self.name, "sigma": self.sigma, "scale": self.scale}


class GaussianNoise(Noise):
    """Isotropic Gaussian ``N(0, sigma^2 I)``; ``scale = sigma``.

    l2 radius (Cohen et al. 2019, Theorem 1):
    ``R = sigma/2 (Phi^-1(pA_lower) - Phi^-1(pB_upper))``; with ``pB = 1 - pA`` (Cohen et al.
    2019, CERTIFY / Theorem 2) ``R = sigma Phi^-1(pA_lower)``. l_p for ``p > 2`` through the
    dimension factor ``R_p = R_2 / d^(1/2 - 1/p)`` (so ``R_inf = R_2 / sqrt(d)``, the
    conversion of Yang et al. 2020, Sec. 2 / rs4a); ``R_1 = R_2``.
    """

    name = "gaussian"
    direct_norms = ("l2",)

    @staticmethod
    def _std_per_scale() -> float:
        return 1.0

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return out.normal_(0.0, self.scale, generator=generator)

    def _radius(self, norm, pa, pb, dim):
        # norm.isf(1 - pa) would lose digits near pa = 1; ppf of pb and pa in float64
        return self.scale / 2.0 * (_normal.ppf(pa) - _normal.ppf(pb))


class LaplaceNoise(Noise):
    """I.i.d. Laplace ``p(z) ~ exp(-|z|_1 / lambda)`` per coordinate; ``sigma = sqrt(2) lambda``.

    l1 radius (Teng et al. 2020, "l1 adversarial robustness certificates: a randomized
    smoothing approach", Theorem 1):
    ``R = max(lambda/2 log(pA/pB), -lambda log(1 - pA + pB))``; with ``pB = 1 - pA``:
    ``R = -lambda log(2 (1 - pA))`` (also Yang et al. 2020, Table 1 / rs4a
    ``Laplace.certify_l1``). The first term follows from the likelihood ratio
    ``exp(+-||delta||_1 / lambda)``; the second is the 1-D Neyman-Pearson worst case
    (a shift along one coordinate), which Teng et al. show is the worst case in l1.
    Other norms by the dimension factor (``R_2 = R_1 / sqrt(d)``, ``R_inf = R_1 / d``).
    """

    name = "laplace"
    direct_norms = ("l1",)

    @staticmethod
    def _std_per_scale() -> float:
        return math.sqrt(2.0)

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # inverse CDF: u ~ U(-1/2, 1/2), z = -lambda sign(u) log(1 - 2|u|); 1 - 2|u| is kept
        # >= eps/2 of the dtype so that u = -1/2 (which uniform_ can return) stays finite
        u = out.uniform_(-0.5, 0.5, generator=generator)
        sign = u.sign()
        tiny = torch.finfo(out.dtype).eps / 2
        return u.abs_().mul_(-2.0).clamp_(min=-1.0 + tiny).log1p_().mul_(sign).mul_(-self.scale)

    def _radius(self, norm, pa, pb, dim):
        lam = self.scale
        with np.errstate(divide="ignore", invalid="ignore"):
            r1 = lam / 2.0 * np.log(pa / pb)
            r2 = -lam * np.log(1.0 - pa + pb)
        return np.maximum(r1, r2)


class UniformNoise(Noise):
    """I.i.d. uniform on ``[-lambda, lambda]^d``; ``sigma = lambda / sqrt(3)``.

    Radii (Yang et al. 2020, "Randomized smoothing of all shapes and sizes", Table 1 and
    rs4a ``Uniform.certify_l1`` / ``certify_linf``; derived from the total variation
    ``TV(U, U + delta) = 1 - prod_i (1 - |delta_i| / (2 lambda))``):

    * l1: ``R = 2 lambda (pA - 1/2)``; with a separate ``pB``: ``R = lambda (pA - pB)``
      (certified while ``TV <= ||delta||_1 / (2 lambda) < (pA - pB) / 2``).
    * l_inf: ``R = 2 lambda (1 - (3/2 - pA)^(1/d))``; with ``pB``:
      ``R = 2 lambda (1 - (1 - (pA - pB)/2)^(1/d))`` (all ``|delta_i| = R``).

    l2 by conversion (the larger of ``R_1 / sqrt(d)`` and ``R_inf``).
    """

    name = "uniform"
    direct_norms = ("l1", "linf")

    @staticmethod
    def _std_per_scale() -> float:
        return 1.0 / math.sqrt(3.0)

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return out.uniform_(-self.scale, self.scale, generator=generator)

    def _radius(self, norm, pa, pb, dim):
        lam = self.scale
        gap = pa - pb
        if norm == "l1":
            return lam * gap
        # linf
        return 2.0 * lam * (1.0 - np.power(np.clip(1.0 - gap / 2.0, 0.0, 1.0), 1.0 / dim))


_NOISES = {"gaussian": GaussianNoise, "laplace": LaplaceNoise, "uniform": UniformNoise}


def get_noise(name: str, sigma: float) -> Noise:
    """``get_noise("gaussian", 0.25)`` -> :class:`GaussianNoise` with that sigma."""
    if name not in _NOISES:
        raise ValueError(f"unknown noise {name!r}; available: {', '.join(_NOISES)}")
    return _NOISES[name](sigma=sigma)
