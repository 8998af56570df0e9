"""Interpolation error of composed bilinear translations, maximised exactly over the range.

Fischer, Baader, Vechev 2020 ("Certified defense to image transformations via randomized
smoothing", NeurIPS), Sec. 4-5, for the translation ``T_t`` of :func:`smoothing.semantic.translate`
(bilinear, zero padding, ``align_corners=False``): ``T_t(y)[p] = v_y(p - t)`` at every pixel
``p`` (index coordinates), ``v_y`` the bilinear interpolant of ``y`` extended by zeros.
Sub-pixel shifts do not compose (``T_0.4(T_0.3 x) != T_0.7 x``: two tent filters blur more
than one), so a defender smoothing the attacked image sees

    T_beta(T_gamma(x)) = T_{beta + gamma}(x) + eps(beta, gamma),   beta, gamma in R^2,

and the certificate needs ``E >= ||eps(beta, gamma)||_2`` for every ``gamma`` of the range.

Why a finite set of ``gamma`` gives the exact maximum (our derivation; the paper bounds
general transformations by interval refinement, which translations do not need):

* every pixel shares the fractional part of the shift, so on a cell where ``floor(gamma_x)``
  and ``floor(gamma_y)`` are fixed, ``T_gamma(x)`` is a bilinear function of ``gamma`` (four
  whole-pixel shifts of ``x`` with weights ``(1 - a)(1 - c), a(1 - c), (1 - a)c, ac``); ``T_beta``
  is linear, so ``T_beta(T_gamma x)`` is too; ``T_{beta+gamma}(x)`` is bilinear on cells where
  ``floor(beta + gamma)`` is fixed;
* so on each rectangle of the grid cut by the lines ``gamma_c in Z`` and ``gamma_c in Z - beta_c``
  the error vector is ``e(s, t) = A + sB + tC + stD``; along each axis it is affine, its norm is
  convex there, and the maximum of ``||e||_2`` over the rectangle is at one of its corners;
* the maximum over the square ``[-G, G]^2`` is the maximum over the products of the cut points
  in ``(-G, G)`` and ``+-G`` per axis.

The attacker's range is the square ``||gamma||_inf <= G``, which contains the l2 disk of
radius ``G``, so one ``E`` serves both norms. Computed in float64, plus the allowance
``FLOAT_SLACK * max|x|`` per pixel for the float32 sampling grid of ``translate``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verify.deadline import Deadline

from .rotation_error import FLOAT_SLACK, ErrorSearch, _interp

__all__ = ["translation_composition_error", "translation_corners", "translation_error_search"]


def _shift(img: Tensor, s: Tensor) -> Tensor:
    """``T_s(img)`` for ``img [N, C, H, W]`` float64 and shifts ``s [N, 2] = (dx, dy)`` pixels:
    ``[N, C, H*W]``."""
    H, W = img.shape[-2:]
    ii, jj = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return _interp(img, jj.reshape(1, -1) - s[:, :1], ii.reshape(1, -1) - s[:, 1:])


def translation_composition_error(x: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """Exact (float64) ``||T_beta(T_gamma(x)) - T_{beta+gamma}(x)||_2`` per row.

    Args:
        x: ``[C, H, W]`` image; ``beta``, ``gamma``: ``[N, 2]`` shifts ``(dx, dy)`` in pixels.
    Returns:
        ``[N]`` l2 norms.
    """
    x = x.detach().double().cpu()
    C, H, W = x.shape
    b, g = beta.double().cpu().reshape(-1, 2), gamma.double().cpu().reshape(-1, 2)
    xs = x.unsqueeze(0).expand(len(b), C, H, W)
    twice = _shift(_shift(xs, g).reshape(len(b), C, H, W), b)
    return (twice - _shift(xs, b + g)).flatten(1).norm(dim=1)


def _cuts(b: Tensor, G: float) -> Tensor:
    """Per-axis candidates ``[m, 4 ceil(G) + 1]`` for shift components ``b [m]``: ``+-G``, the
    integers and the points ``k - b`` in ``(-G, G)``; candidates outside are clamped onto ``+-G``
    (repeats of the ends, harmless)."""
    K = math.ceil(G)
    m = len(b)
    ends = torch.tensor([-G, G], dtype=torch.float64).expand(m, 2)
    ints = torch.arange(-K + 1, K, dtype=torch.float64).expand(m, -1)  # every integer in (-G, G)
    # k - b = (floor(b) - b) + j with floor(b) - b in (-1, 0]: inside (-G, G) needs -K < j <= K
    offs = (torch.floor(b) - b).unsqueeze(1) + torch.arange(-K + 1, K + 1, dtype=torch.float64)
    return torch.cat([ends, ints, offs], 1).clamp(-G, G)


def translation_corners(b: Tensor, G: float) -> Tensor:
    """All corners of the pieces of ``[-G, G]^2`` for the shifts ``b [m, 2]``: ``[m, L*L, 2]``."""
    cx, cy = _cuts(b[:, 0], G), _cuts(b[:, 1], G)
    L = cx.shape[1]
    gx = cx.unsqueeze(2).expand(-1, L, L)
    gy = cy.unsqueeze(1).expand(-1, L, L)
    return torch.stack([gx, gy], -1).reshape(len(b), L * L, 2)


def translation_error_search(
    x: Tensor,
    betas: Tensor,
    max_shift: float,
    *,
    points: int = 2048,
    deadline: Deadline | float | None = None,
) -> ErrorSearch:
    """``E >= max_j max_{||gamma||_inf <= max_shift} ||T_{beta_j}(T_gamma x) - T_{beta_j+gamma} x||_2``,
    the maximum itself (plus the float allowance): evaluated at the corners of the pieces on
    which the error is bilinear (module docstring; Fischer et al. 2020, Sec. 5, for the sampled
    ``beta_j``).

    Args:
        x: ``[C, H, W]`` (or ``[H, W]``) image.
        betas: ``[m, 2]`` smoothing shifts in pixels.
        max_shift: the attacker's range ``G`` in pixels (``>= 0``), per axis.
        points: corner evaluations per tensor call (memory, and how often the deadline is checked).
        deadline: a :class:`~verify.deadline.Deadline`, or seconds from now (``None``: none).
    Returns:
        an :class:`~smoothing.rotation_error.ErrorSearch`; incomplete (``E = inf``) when the
        deadline passes before every ``beta_j`` is done.
    """
    dl = Deadline.of(deadline)
    x = x.detach().double().cpu()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    G = abs(float(max_shift))
    b = betas.detach().double().cpu().reshape(-1, 2)
    slack = FLOAT_SLACK * float(x.abs().max()) * math.sqrt(x.numel())
    if G == 0 or len(b) == 0:
        return ErrorSearch(slack, 0.0, True, 0, True, "empty range: no interpolation error")
    per = translation_corners(b[:1], G).shape[1]
    step = max(1, points // per)
    best = 0.0
    for i in range(0, len(b), step):
        if dl.expired():
            return ErrorSearch.incomplete(best, f"deadline passed after {i} of {len(b)} sampled shifts")
        corners = translation_corners(b[i:i + step], G)  # [k, per, 2]
        bb = b[i:i + step].unsqueeze(1).expand_as(corners)
        best = max(best, float(translation_composition_error(x, bb.reshape(-1, 2), corners.reshape(-1, 2)).max()))
    return ErrorSearch(best + slack, best, True, 0, True, f"exact maximum over {per} piece corners per sampled shift")
