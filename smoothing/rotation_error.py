"""Sound upper bound on the interpolation error of composed bilinear rotations.

Fischer, Baader, Vechev 2020 ("Certified defense to image transformations via randomized
smoothing", NeurIPS), Sec. 4-5: interpolated rotations do not compose, so a defender who smooths
the *attacked* image ``R_gamma(x)`` over ``beta`` sees

    R_beta(R_gamma(x)) = R_{beta + gamma}(x) + eps(beta, gamma),

and the certificate needs a bound ``E >= ||eps(beta, gamma)||_2``. The paper bounds
``max_{gamma in [-G, G]} ||eps(beta, gamma)||_2`` for *sampled* ``beta`` by interval analysis
with refinement of the ``gamma`` range, and turns the samples into a statistical statement
``P_beta(max_gamma ||eps|| > E) <= q`` (their individual, "IndivSPT"-style guarantee). This
module is our own implementation of that bounding step for the suite's rotation
(:func:`smoothing.semantic.rotate`, bilinear, zero padding, ``align_corners=False``):

* ``R_theta(y)[p] = v_y(A(theta) p)`` where ``p`` runs over the pixel centres (origin at the
  image centre), ``A(theta) = [[cos, -sin], [sin, cos]]`` and ``v_y`` is the bilinear
  interpolant of ``y`` extended by zeros (a continuous function, bilinear on every grid cell);
* for an angle interval, ``A(theta) p`` lies in a box (interval ``cos`` / ``sin``); on a box
  narrower than one pixel, ``v_y`` attains its min / max at one of the 3 x 3 points formed by the
  box edges and the grid line inside it (``v_y`` is linear along axis-parallel segments in a
  cell), so the box's range of ``v_y`` is exact; for an interval image ``[y_lo, y_hi]`` the
  weights are >= 0, so ``v_{y_lo} <= v_y <= v_{y_hi}`` pointwise;
* per box ``[g0, g1]`` of angles and a fixed ``beta``: ``R_gamma(x)`` is enclosed pixel-wise,
  then ``R_beta`` of that interval image, and ``R_{beta+gamma}(x)`` over ``beta + [g0, g1]``;
  the error's l2 bound is the norm of the per-pixel max ``|.|`` of the difference interval;
* branch and bound: boxes whose bound exceeds the best exact error found (at box midpoints) by
  more than ``tol`` are halved, up to ``max_rounds``; the returned ``E`` is the max bound over
  all final boxes, so it is an upper bound whatever the stopping point (tighter with more rounds).

Computed in float64, plus an allowance of ``FLOAT_SLACK * max|x|`` per pixel for the float32
sampling grid of :func:`~smoothing.semantic.rotate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from verify.deadline import Deadline

__all__ = ["FLOAT_SLACK", "ErrorSearch", "rotation_error_search", "rotation_error_bound", "composition_error",
           "exceed_probability"]

#: per-pixel allowance (relative to ``max|x|``) for float32 rounding of the sampling grid
FLOAT_SLACK = 1e-4


def _trig_interval(t0: Tensor, t1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact ranges of ``cos`` and ``sin`` on ``[t0, t1]`` (radians, ``[N]`` each), widened by
    ``1e-12``: ``(cos_lo, cos_hi, sin_lo, sin_hi)``, each ``[N]``."""
    half = math.pi / 2
    k0, k1 = torch.ceil(t0 / half), torch.floor(t1 / half)
    cands_c = [torch.cos(t0), torch.cos(t1)]
    cands_s = [torch.sin(t0), torch.sin(t1)]
    for j in range(4):  # extreme points of cos / sin at multiples of pi/2 inside the interval
        # the smallest multiple k >= k0 with k = j mod 4
        k = k0 + torch.remainder(j - k0, 4)
        inside = k <= k1
        val_c = [1.0, 0.0, -1.0, 0.0][j]
        val_s = [0.0, 1.0, 0.0, -1.0][j]
        cands_c.append(torch.where(inside, torch.full_like(t0, val_c), torch.cos(t0)))
        cands_s.append(torch.where(inside, torch.full_like(t0, val_s), torch.sin(t0)))
    c, s = torch.stack(cands_c), torch.stack(cands_s)
    w = 1e-12
    return c.min(0).values - w, c.max(0).values + w, s.min(0).values - w, s.max(0).values + w


def _centres(H: int, W: int) -> tuple[Tensor, Tensor]:
    """Pixel centres ``(px [H*W], py [H*W])`` with origin at the image centre (y down)."""
    ys = torch.arange(H, dtype=torch.float64) + 0.5 - H / 2
    xs = torch.arange(W, dtype=torch.float64) + 0.5 - W / 2
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    return px.reshape(-1), py.reshape(-1)


def _interp(img: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    """Bilinear interpolant with zero padding at index coordinates.

    Args:
        img: ``[N, C, H, W]`` float64 images.
        qx, qy: ``[N, P]`` index coordinates (pixel ``(i, j)`` has centre ``(j, i)``).
    Returns:
        ``[N, C, P]`` values.
    """
    N, C, H, W = img.shape
    pad = torch.nn.functional.pad(img, (1, 1, 1, 1)).reshape(N, C, (H + 2) * (W + 2))
    x0, y0 = torch.floor(qx), torch.floor(qy)
    tx, ty = qx - x0, qy - y0
    out = torch.zeros(N, C, qx.shape[1], dtype=img.dtype)
    for dx, dy, w in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        ix = (x0 + dx + 1).clamp(0, W + 1).long()  # outside the frame -> the zero border
        iy = (y0 + dy + 1).clamp(0, H + 1).long()
        idx = (iy * (W + 2) + ix).unsqueeze(1).expand(N, C, -1)
        out = out + w.unsqueeze(1) * pad.gather(2, idx)
    return out


def _box_range(lo: Tensor, hi: Tensor, bx: tuple[Tensor, Tensor], by: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Range of ``v_y`` over location boxes, ``y`` in ``[lo, hi]`` (``[N, C, H, W]``).

    ``bx = (x0, x1)``, ``by = (y0, y1)``: ``[N, P]`` index-coordinate boxes, each narrower than
    one pixel. Returns ``(min [N, C, P], max [N, C, P])`` over the 3 x 3 candidate points.
    """
    if bool(((bx[1] - bx[0]) >= 1).any() or ((by[1] - by[0]) >= 1).any()):
        raise ValueError("location box wider than a pixel: refine the angle boxes first")
    xs = (bx[0], torch.minimum(torch.ceil(bx[0]), bx[1]), bx[1])
    ys = (by[0], torch.minimum(torch.ceil(by[0]), by[1]), by[1])
    mins, maxs = [], []
    for qx in xs:
        for qy in ys:
            mins.append(_interp(lo, qx, qy))
            maxs.append(_interp(hi, qx, qy))
    return torch.stack(mins).min(0).values, torch.stack(maxs).max(0).values


Box = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


def _location_box(t0: Tensor, t1: Tensor, px: Tensor, py: Tensor, H: int, W: int) -> Box:
    """Index-coordinate boxes of ``A(theta) p`` for ``theta in [t0, t1]`` (radians, ``[N]``),
    every pixel centre ``p``: ``((x0, x1), (y0, y1))``, each ``[N, P]``."""
    cl, ch, sl, sh = (v.unsqueeze(1) for v in _trig_interval(t0, t1))

    def mul(lo: Tensor, hi: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:  # interval [lo, hi] times p
        a, b = lo * p, hi * p
        return torch.minimum(a, b), torch.maximum(a, b)

    cxl, cxh = mul(cl, ch, px)
    syl, syh = mul(sl, sh, py)
    sxl, sxh = mul(sl, sh, px)
    cyl, cyh = mul(cl, ch, py)
    # q_x = cos p_x - sin p_y ; q_y = sin p_x + cos p_y ; index = q + size/2 - 1/2
    return (cxl - syh + W / 2 - 0.5, cxh - syl + W / 2 - 0.5), (sxl + cyl + H / 2 - 0.5, sxh + cyh + H / 2 - 0.5)


def _rotate_point(img: Tensor, theta: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """``R_theta(img)`` for ``img [N, C, H, W]``, ``theta [N]`` radians: ``[N, C, H*W]``."""
    H, W = img.shape[-2:]
    c, s = torch.cos(theta).unsqueeze(1), torch.sin(theta).unsqueeze(1)
    return _interp(img, c * px - s * py + W / 2 - 0.5, s * px + c * py + H / 2 - 0.5)


def composition_error(x: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """Exact (float64) ``||R_beta(R_gamma(x)) - R_{beta+gamma}(x)||_2`` per row.

    Args:
        x: ``[C, H, W]`` image; ``beta``, ``gamma``: ``[N]`` angles in degrees.
    Returns:
        ``[N]`` l2 norms.
    """
    x = x.detach().double().cpu()
    C, H, W = x.shape
    px, py = _centres(H, W)
    b, g = beta.double().cpu() * (math.pi / 180), gamma.double().cpu() * (math.pi / 180)
    xs = x.unsqueeze(0).expand(len(b), C, H, W)
    once = _rotate_point(xs, g, px, py).reshape(len(b), C, H, W)
    twice = _rotate_point(once, b, px, py)
    direct = _rotate_point(xs, b + g, px, py)
    return (twice - direct).flatten(1).norm(dim=1)


def _box_bounds(x: Tensor, beta: Tensor, g0: Tensor, g1: Tensor) -> Tensor:
    """Upper bounds on ``max_{gamma in [g0, g1]} ||R_beta(R_gamma x) - R_{beta+gamma} x||_2``.

    Args:
        x: ``[C, H, W]`` float64; ``beta, g0, g1``: ``[N]`` radians.
    Returns:
        ``[N]`` bounds (before the float allowance).
    """
    C, H, W = x.shape
    N = len(beta)
    px, py = _centres(H, W)
    xs = x.unsqueeze(0).expand(N, C, H, W)
    bx, by = _location_box(g0, g1, px, py, H, W)
    ylo, yhi = _box_range(xs, xs, bx, by)  # R_gamma(x), gamma in [g0, g1]: [N, C, P]
    c, s = torch.cos(beta).unsqueeze(1), torch.sin(beta).unsqueeze(1)
    qx, qy = c * px - s * py + W / 2 - 0.5, s * px + c * py + H / 2 - 0.5
    tlo = _interp(ylo.reshape(N, C, H, W), qx, qy)  # R_beta of the interval image
    thi = _interp(yhi.reshape(N, C, H, W), qx, qy)
    bx2, by2 = _location_box(beta + g0, beta + g1, px, py, H, W)
    dlo, dhi = _box_range(xs, xs, bx2, by2)  # R_{beta+gamma}(x)
    worst = torch.maximum((thi - dlo).abs(), (tlo - dhi).abs())
    return worst.flatten(1).norm(dim=1)


@dataclass
class ErrorSearch:
    """Outcome of an interpolation-error search under a deadline.

    Attributes:
        E: the sound bound on the error over every sampled parameter and the whole attacker's
            range (float allowance included); ``inf`` when ``complete`` is False.
        lower: the largest exact error evaluated (a lower bound on the true maximum).
        complete: every sampled parameter's whole range was bounded at least once. Only then
            is ``E`` a bound; a certificate may use the search only when this is True.
        rounds: refinement rounds finished (0 for searches without refinement).
        refined: the search ran to its own end (False: it stopped at the deadline, and a
            complete ``E`` is looser than the untimed one).
        progress: what was done, in words (for the certificate details).
    """

    E: float
    lower: float
    complete: bool
    rounds: int
    refined: bool
    progress: str

    @classmethod
    def incomplete(cls, lower: float, progress: str) -> "ErrorSearch":
        """The deadline passed before every range was bounded: no bound at all."""
        return cls(math.inf, lower, False, 0, False, progress)


def _evaluate(x: Tensor, beta: Tensor, g0: Tensor, g1: Tensor, chunk: int, dl: Deadline) -> tuple[Tensor | None, float]:
    """Interval bounds of the boxes (``[N]`` each, radians) and the largest exact error at the
    box midpoints, ``chunk`` boxes at a time; ``(None, best)`` if the deadline passes first."""
    ubs, best = [], 0.0
    for i in range(0, len(beta), chunk):
        if dl.expired():
            return None, best
        b, lo, hi = beta[i:i + chunk], g0[i:i + chunk], g1[i:i + chunk]
        ubs.append(_box_bounds(x, b, lo, hi))
        best = max(best, float(composition_error(x, b * 180 / math.pi, (lo + hi) / 2 * 180 / math.pi).max()))
    return torch.cat(ubs), best


def rotation_error_search(
    x: Tensor,
    betas: Tensor,
    max_angle: float,
    *,
    tol: float = 0.02,
    max_rounds: int = 12,
    chunk: int = 256,
    deadline: Deadline | float | None = None,
) -> ErrorSearch:
    """Upper bound ``E >= max_j max_{|gamma| <= max_angle} ||R_{beta_j}(R_gamma x) - R_{beta_j+gamma} x||_2``.

    Branch and bound over ``gamma`` boxes for every sampled ``beta_j`` (Fischer et al. 2020,
    Sec. 5, interval bound of the interpolation error refined over the attacker's range). The
    deadline is checked before every chunk of boxes. Stopped in the first round (some range not
    yet bounded): incomplete, ``E = inf``. Stopped later: the bounds of the boxes still waiting
    to be split cover their unfinished children, so ``E`` is complete (only looser).

    Args:
        x: ``[C, H, W]`` (or ``[H, W]``) image.
        betas: ``[m]`` smoothing angles in degrees.
        max_angle: the attacker's range ``G`` in degrees (``>= 0``).
        tol: stop refining a box once its bound is within ``tol`` (l2) of the best exact error.
        max_rounds: number of halvings at most; the result stays an upper bound when it stops.
        chunk: boxes evaluated per tensor call (memory, and how often the deadline is checked).
        deadline: a :class:`~verify.deadline.Deadline`, or seconds from now (``None``: none).
    Returns:
        an :class:`ErrorSearch`.
    """
    dl = Deadline.of(deadline)
    x = x.detach().double().cpu()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    C, H, W = x.shape
    G = abs(float(max_angle)) * math.pi / 180
    b = betas.detach().double().cpu().reshape(-1) * (math.pi / 180)
    slack = FLOAT_SLACK * float(x.abs().max()) * math.sqrt(x.numel())
    if G == 0 or len(b) == 0:
        return ErrorSearch(slack, 0.0, True, 0, True, "empty range: no interpolation error")
    r_max = math.hypot(H / 2, W / 2)
    pieces = max(1, math.ceil(2 * G / (0.3 / r_max)))  # location boxes well under a pixel
    edges = torch.linspace(-G, G, pieces + 1, dtype=torch.float64)
    beta = b.repeat_interleave(pieces)
    g0, g1 = edges[:-1].repeat(len(b)), edges[1:].repeat(len(b))
    best, done, waiting = 0.0, 0.0, 0.0  # waiting: the largest bound of a box being split
    for rnd in range(max_rounds + 1):
        ub, seen = _evaluate(x, beta, g0, g1, chunk, dl)
        best = max(best, seen)
        if ub is None:
            if rnd == 0:
                return ErrorSearch.incomplete(best, f"deadline passed in the first round of {len(beta)} angle boxes")
            return ErrorSearch(max(done, waiting, best) + slack, best, True, rnd, False,
                               f"deadline passed in refinement round {rnd}: bound of round {rnd - 1} kept")
        keep = ub > best + tol
        done = max(done, float(ub[~keep].max()) if bool((~keep).any()) else 0.0)
        if not bool(keep.any()):
            break
        if rnd == max_rounds:
            done = max(done, float(ub[keep].max()))
            break
        waiting = float(ub[keep].max())
        beta, g0, g1 = beta[keep], g0[keep], g1[keep]
        m = (g0 + g1) / 2
        beta, g0, g1 = beta.repeat(2), torch.cat([g0, m]), torch.cat([m, g1])
    return ErrorSearch(max(done, best) + slack, best, True, rnd + 1, True, f"refined in {rnd + 1} rounds")


def rotation_error_bound(x: Tensor, betas: Tensor, max_angle: float, *, tol: float = 0.02, max_rounds: int = 12,
                         chunk: int = 256) -> tuple[float, float]:
    """:func:`rotation_error_search` without a deadline: ``(E, lower)``, the sound bound (with
    the float allowance) and the largest exact error seen (``E >= lower``)."""
    res = rotation_error_search(x, betas, max_angle, tol=tol, max_rounds=max_rounds, chunk=chunk)
    return res.E, res.lower


def exceed_probability(m: int, alpha: float) -> float:
    """``q`` such that, with probability ``>= 1 - alpha`` over ``m`` i.i.d. draws ``beta_j``,
    ``P_beta(err(beta) > max_j err(beta_j)) <= q``: ``q = 1 - alpha^(1/m)``.

    (The tail mass above the sample maximum exceeds ``q`` only if all ``m`` draws fall below
    the ``(1 - q)`` quantile, probability ``<= (1 - q)^m = alpha``; this is the one-sided
    Clopper-Pearson bound with all ``m`` draws under the threshold, the statistical error bound
    of Fischer et al. 2020, Sec. 5.)
    """
    if m < 1:
        raise ValueError(f"need at least one beta sample, got {m}")
    return 1.0 - alpha ** (1.0 / m)
