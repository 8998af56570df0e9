"""Smoothing over rotation angle and translation (Fischer et al. 2020, "Certified defense to
image transformations via randomized smoothing", NeurIPS).

The noise lives in the transformation's parameter space: ``gamma ~ N(0, sigma^2 I_P)`` with
``P = 1`` (angle, degrees) or ``P = 2`` (shift ``(dx, dy)``, pixels). The smoothed classifier
of an image ``x`` as a function of the transform parameter ``theta`` is

    g_x(theta) = argmax_c P_gamma( f(T_{theta + gamma}(x)) = c ),

and since ``gamma -> f(T_gamma(x))`` is just a classifier of the parameter, Cohen et al.'s
Gaussian theorem in ``R^P`` gives ``g_x(theta) = g_x(0)`` for ``||theta||_2 < R`` with
``R = sigma Phi^-1(pA_lower)`` (Fischer et al. 2020, Theorem 3.2 for additive transforms),
in degrees or pixels.

What is certified, exactly: the composed map "transform the clean image ``x`` once by
``theta + gamma`` with the stated interpolation (bilinear ``grid_sample`` or nearest) and
padding, then classify". This is **not** the same as smoothing an image that was already
rotated: ``T_gamma(T_theta(x)) != T_{theta + gamma}(x)`` with interpolation (every
resampling blurs and loses the corners that left the frame), so a defender who only sees the
attacked image ``T_theta(x)`` and smooths it is not covered by :func:`certify_semantic`.
:func:`certify_rotation_sound` closes that gap for rotations as Fischer et al. (Sec. 4-5) do:
l2 noise on top of the angle noise and a bound on the interpolation error
(:mod:`smoothing.rotation_error`); :func:`certify_translation_sound` does the same for
translations, whose error maximum over the range is exact (:mod:`smoothing.translation_error`).
Translations by whole pixels compose exactly away from the borders (zero padding still loses
the pixels shifted out of the frame); sub-pixel ones do not (0.3 px then 0.4 px differs from
0.7 px by about 17 % of a digit's l2 norm).
"""
from __future__ import annotations

import math
from typing import Callable, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm as norm_dist
from torch import Tensor

from verify.deadline import Deadline

from .certify import CertifyOptions, CertifyResult, certify
from .noise import GaussianNoise
from .rotation_error import ErrorSearch, exceed_probability, rotation_error_search
from .sampling import SamplingOptions
from .translation_error import translation_error_search

__all__ = ["SemanticTransform", "Rotation", "Translation", "rotate", "translate", "certify_semantic", "certify_rotation_sound",
           "certify_translation_sound", "sound_rotation_radius"]


def _as4d(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() == 4:
        return x, False
    if x.dim() == 3:  # [S, H, W]
        return x.unsqueeze(1), True
    raise ValueError(f"images must be [S, C, H, W] or [S, H, W], got shape {tuple(x.shape)}")


def _affine(x: Tensor, A: Tensor, t: Tensor, interpolation: str, padding: str) -> Tensor:
    """Resample ``x [S, C, H, W]``: output pixel at ``p`` (pixel units, origin at the image
    centre, x right, y down) reads the input at ``A[s] p + t[s]``. ``A [S, 2, 2]``, ``t [S, 2]``."""
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    S, _, H, W = x.shape
    # normalised coords (align_corners=False): u = p_x / (W/2), v = p_y / (H/2)
    sc = torch.tensor([W / 2.0, H / 2.0], dtype=x.dtype, device=x.device)
    An = A / sc.view(1, 2, 1) * sc.view(1, 1, 2)  # D^-1 A D with D = diag(W/2, H/2)
    tn = t / sc
    theta = torch.cat([An, tn.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=interpolation, padding_mode=padding, align_corners=False)


def rotate(x: Tensor, degrees: Tensor, interpolation: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Rotate images ``x [S, C, H, W]`` (or ``[S, H, W]``) about their centre by
    ``degrees [S]`` (positive = counter-clockwise as displayed, row 0 on top)."""
    x4, sq = _as4d(x)
    th = degrees.to(x.dtype).reshape(-1) * (math.pi / 180.0)
    c, s = torch.cos(th), torch.sin(th)
    # inverse map of a counter-clockwise display rotation in y-down coordinates
    A = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = _affine(x4, A, torch.zeros(x4.shape[0], 2, dtype=x.dtype, device=x.device), interpolation, padding)
    return out.squeeze(1) if sq else out


def translate(x: Tensor, shifts: Tensor, interpolation: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Shift images ``x [S, C, H, W]`` by ``shifts [S, 2] = (dx right, dy down)`` pixels."""
    x4, sq = _as4d(x)
    S = x4.shape[0]
    A = torch.eye(2, dtype=x.dtype, device=x.device).expand(S, 2, 2)
    out = _affine(x4, A, -shifts.to(x.dtype).reshape(S, 2), interpolation, padding)
    return out.squeeze(1) if sq else out


class SemanticTransform:
    """A parametric image transformation ``T_theta``: ``params`` parameters, a unit, and
    ``apply(x_rows [S, C, H, W], theta [S, params]) -> [S, C, H, W]``."""

    name: str = ""
    params: int = 1
    unit: str = ""

    def __init__(self, interpolation: str = "bilinear", padding: str = "zeros") -> None:
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding must be zeros, border or reflection, got {padding!r}")
        self.interpolation = interpolation
        self.padding = padding

    def apply(self, x: Tensor, theta: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"transform": self.name, "unit": self.unit, "interpolation": self.interpolation, "padding": self.padding}


class Rotation(SemanticTransform):
    """Rotation by an angle in degrees (``params = 1``)."""

    name = "rotation"
    params = 1
    unit = "deg"

    def apply(self, x: Tensor, theta: Tensor) -> Tensor:
        return rotate(x, theta.reshape(-1), self.interpolation, self.padding)


class Translation(SemanticTransform):
    """Translation by ``(dx, dy)`` pixels (``params = 2``); the radius is the l2 length of
    the shift."""

    name = "translation"
    params = 2
    unit = "px"

    def apply(self, x: Tensor, theta: Tensor) -> Tensor:
        return translate(x, theta.reshape(-1, 2), self.interpolation, self.padding)


def certify_semantic(
    model: torch.nn.Module,
    x: Tensor,
    transform: SemanticTransform,
    sigma: float,
    **options: Unpack[CertifyOptions],
) -> CertifyResult:
    """CERTIFY in the parameter space of ``transform`` (``sigma`` in degrees or pixels).

    Args:
        x: images ``[B, C, H, W]`` (or ``[B, H, W]``).
        options: :func:`~smoothing.certify.certify`'s (:class:`~smoothing.certify.CertifyOptions`,
            its defaults); ``norm`` is the norm of the parameter vector (``"l2"``; for
            translations ``"linf"`` gives ``R_2 / sqrt(2)``).
    Returns:
        a :class:`~smoothing.certify.CertifyResult` whose ``radius`` is in the transform's unit.
    """
    return certify(model, x, GaussianNoise(sigma=sigma), perturb=transform.apply, param_shape=(transform.params,),
                   dim=transform.params, **options)


def sound_rotation_radius(pa_lower: np.ndarray, q: float, E: np.ndarray, sigma: float, sigma_l2: float) -> np.ndarray:
    """Certified angle (degrees, ``[B]``) of the combined smoothing, before the cap at the
    range the error was bounded on.

    With ``pA`` = P_{beta, delta}(f(R_beta(x) + delta) = cA) >= ``pa_lower``, and
    ``P_beta(max_gamma ||R_beta(R_gamma x) - R_{beta+gamma} x||_2 > E) <= q``: for each beta the
    l2 shift of the delta-noise is at most ``E`` (Cohen et al. in ``delta``), and the angle
    shift is ``gamma`` (Cohen et al. in ``beta``); the two compose to a 2-d Gaussian shift of
    whitened length ``sqrt((gamma/sigma)^2 + (E/sigma_l2)^2)`` (Fischer et al. 2020, Sec. 4,
    the combined (beta, delta) smoothing; the beta-dependent error is bounded by the worst case
    ``E``), and the event ``error > E`` costs at most ``q``:

        P(f(R_beta(R_gamma x) + delta) = cA) >= Phi(Phi^-1(pA) - sqrt((gamma/sigma)^2 + (E/sigma_l2)^2)) - q,

    which is ``> 1/2`` (so ``cA`` is the smoothed prediction at ``R_gamma(x)``) iff
    ``|gamma| < sigma sqrt(R^2 - (E/sigma_l2)^2)`` with ``R = Phi^-1(pA) - Phi^-1(1/2 + q)``.
    Returns 0 where ``R <= E / sigma_l2``.
    """
    R = norm_dist.ppf(np.clip(pa_lower, 0.0, 1.0)) - norm_dist.ppf(min(0.5 + q, 1.0))
    e = np.asarray(E, dtype=np.float64) / sigma_l2
    ok = np.isfinite(R) & (R > e)
    return np.where(ok, sigma * np.sqrt(np.clip(R * R - e * e, 0.0, None)), 0.0)


ErrorFn = Callable[[Tensor, Tensor, float, Deadline], ErrorSearch]


def _certify_sound(
    model: torch.nn.Module,
    x: Tensor,
    transform: SemanticTransform,
    error: ErrorFn,
    sigma: float,
    sigma_l2: float,
    max_range: np.ndarray,
    *,
    n0: int,
    n: int,
    alpha: float,
    n_err: int,
    scale: float = 1.0,
    **sampling: Unpack[SamplingOptions],
) -> CertifyResult:
    """The combined (parameter, l2) smoothing certificate of Fischer et al. 2020, Sec. 4-5, for
    any transform whose composition error ``error(x [C, H, W], betas [n_err, P], range, deadline)``
    bounds; see :func:`certify_rotation_sound`. ``sampling``'s ``seed`` also seeds the error
    statement's parameter draws. The whole call, sampling and every error search, shares
    ``sampling``'s ``deadline``: sampling past it raises :class:`~smoothing.sampling.SamplingTimeout`; an
    error search past it leaves its inputs with ``E = inf``, radius 0 and
    ``extra["searches"][b].complete`` False (no certificate rests on a partial bound). ``scale`` multiplies the l2 radius before
    the cap at ``max_range`` (``1 / sqrt(2)`` for an linf radius of a 2-d shift)."""
    x4, _ = _as4d(x)
    shape = tuple(x4.shape[1:])
    d, P = math.prod(shape), transform.params

    def perturb(rows: Tensor, u: Tensor) -> Tensor:  # u ~ N(0, I_{P+d}) -> (beta, delta)
        moved = transform.apply(rows.reshape(-1, *shape), u[:, :P] * sigma)
        return (moved + sigma_l2 * u[:, P:].reshape(-1, *shape)).reshape(rows.shape)

    res = certify(model, x, GaussianNoise(sigma=1.0), n0=n0, n=n, alpha=alpha / 2, perturb=perturb, param_shape=(P + d,),
                  dim=P + d, **sampling)
    q = exceed_probability(n_err, alpha / 2)
    dl = Deadline.until(sampling.get("deadline"))
    gen = torch.Generator().manual_seed(int(sampling.get("seed", 0)) + 7919)  # monte_carlo's default seed
    searches = []
    for b in range(len(x4)):
        if dl.expired():  # not even the set-up of the remaining searches
            searches.append(ErrorSearch.incomplete(0.0, "deadline passed before this input's search"))
            continue
        betas = torch.randn(n_err, P, generator=gen, dtype=torch.float64) * sigma
        searches.append(error(x4[b], betas.squeeze(1) if P == 1 else betas, float(max_range[b]), dl))
    E = np.array([s.E for s in searches])
    r = np.minimum(scale * sound_rotation_radius(res.pa_lower, q, E, sigma, sigma_l2), np.asarray(max_range, dtype=np.float64))
    ok = (res.prediction >= 0).cpu().numpy() & (r > 0) & np.isfinite(E)
    res.radius = np.where(ok, r, 0.0)
    res.extra.update({"E": E, "E_lower": np.array([s.lower for s in searches]), "q": q, "searches": searches})
    return res


def certify_rotation_sound(
    model: torch.nn.Module,
    x: Tensor,
    sigma: float,
    sigma_l2: float,
    max_angle: np.ndarray,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    n_err: int = 1000,
    err_tol: float = 0.02,
    **sampling: Unpack[SamplingOptions],
) -> CertifyResult:
    """Rotation certificate valid on the real, interpolated image ``R_gamma(x)``, every
    ``|gamma| <= max_angle`` (Fischer et al. 2020, Sec. 4-5, individual guarantee).

    Smoothed classifier: ``g(z) = argmax_c P(f(R_beta(z) + delta) = c)``, ``beta ~ N(0, sigma^2)``
    degrees, ``delta ~ N(0, sigma_l2^2 I)`` in the model's input space (the defender applies it to
    whatever image arrives). Confidence ``1 - alpha`` overall: ``alpha / 2`` for the Clopper-Pearson
    bound on ``pA`` (CERTIFY at ``x``), ``alpha / 2`` for the error statement of ``n_err`` fresh
    beta draws (:func:`~smoothing.rotation_error.exceed_probability`), union bound.

    Args:
        x: clean images ``[B, C, H, W]`` (or ``[B, H, W]``).
        max_angle: ``[B]`` the attacker's range (degrees) over which the error is bounded.
        sampling: see :class:`~smoothing.sampling.SamplingOptions`; its ``deadline`` covers the
            whole call (sampling and error search).
    Returns:
        a :class:`~smoothing.certify.CertifyResult` with ``radius`` in degrees, capped at
        ``max_angle``; ``extra`` holds ``E [B]`` (``inf`` where the search did not finish),
        ``E_lower [B]`` (largest exact error seen), ``q`` and ``searches`` (``[B]``
        :class:`~smoothing.rotation_error.ErrorSearch`).
    """
    def error(img: Tensor, betas: Tensor, rng: float, dl: Deadline) -> ErrorSearch:
        return rotation_error_search(img, betas, rng, tol=err_tol, deadline=dl)

    res = _certify_sound(model, x, Rotation(), error, sigma, sigma_l2, max_angle, n0=n0, n=n, alpha=alpha, n_err=n_err,
                         **sampling)
    res.norm = "rotation-deg"
    return res


def certify_translation_sound(
    model: torch.nn.Module,
    x: Tensor,
    sigma: float,
    sigma_l2: float,
    max_shift: np.ndarray,
    *,
    norm: str = "l2",
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    n_err: int = 1000,
    **sampling: Unpack[SamplingOptions],
) -> CertifyResult:
    """Translation certificate valid on the real, interpolated image ``T_gamma(x)`` (bilinear,
    zero padding), every shift ``gamma`` with ``||gamma|| <= radius <= max_shift`` (Fischer et al.
    2020, Sec. 4-5, with the exact error maximum of :mod:`smoothing.translation_error`).

    Smoothed classifier: ``g(z) = argmax_c P(f(T_beta(z) + delta) = c)``, ``beta ~ N(0, sigma^2 I_2)``
    pixels, ``delta ~ N(0, sigma_l2^2 I)``. Same confidence accounting as
    :func:`certify_rotation_sound` (``alpha / 2`` for ``pA``, ``alpha / 2`` for the error statement).
    The error is bounded over the square ``||gamma||_inf <= max_shift``; the l2 radius is
    :func:`sound_rotation_radius` with ``|gamma|`` read as ``||gamma||_2`` (the whitened shift is
    ``(gamma / sigma, E / sigma_l2)`` in ``R^{2 + d}``), the linf one that over ``sqrt(2)``.

    Args:
        x: clean images ``[B, C, H, W]`` (or ``[B, H, W]``).
        max_shift: ``[B]`` the attacker's range (pixels, per axis).
        norm: ``"l2"`` or ``"linf"``, the norm of the shift vector the radius is stated in.
        sampling: as in :func:`certify_rotation_sound`.
    Returns:
        a :class:`~smoothing.certify.CertifyResult` with ``radius`` in pixels, capped at
        ``max_shift``; ``extra`` as in :func:`certify_rotation_sound`.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")

    def error(img: Tensor, betas: Tensor, rng: float, dl: Deadline) -> ErrorSearch:
        return translation_error_search(img, betas, rng, deadline=dl)

    res = _certify_sound(model, x, Translation(), error, sigma, sigma_l2, max_shift, n0=n0, n=n, alpha=alpha, n_err=n_err,
                         scale=1.0 if norm == "l2" else 1 / math.sqrt(2), **sampling)
    res.norm = "translation-px" + ("" if norm == "l2" else "-linf")
    return res
