"""Elementwise nonlinear functions beyond ReLU / sigmoid / tanh: exp, log, reciprocal, sqrt,
integer powers, sin, cos, abs, leaky ReLU, clip, sign, the Heaviside step and floor.

**One recipe for every relaxation.** A slope ``k`` is chosen by a heuristic, then the intercepts
are the *exact* minimum and maximum of ``g(x) = f(x) - k x`` over ``[l, u]`` (:meth:`Elementwise.extremes`):
``g`` is extreme at an end of the interval or at a point inside where ``f'(x) = k`` or ``f`` has
a kink or a jump; each function lists these *candidate points* in closed form
(:meth:`Elementwise.candidates`; extra candidates are harmless, a missing one would not be).
So ``k x + min g <= f(x) <= k x + max g`` on ``[l, u]`` for every slope: soundness does not rest
on the heuristic, and alpha-CROWN may move the slopes freely (as for sigmoid / tanh in
:mod:`relax.ir.ops.activation`). The interval rule is the same computation with ``k = 0``.

Slopes (CROWN-style, Zhang et al. 2018 Sec. 3.3): where ``f`` is convex on ``[l, u]`` the lower
line is the tangent at the midpoint and the upper line the secant (the tightest upper line of a
convex function); mirrored where concave; otherwise both lines take the secant slope. For convex
(concave) pieces alpha-CROWN optimises the tangent's slope within ``[f'(l), f'(u)]``.

Poles and domains: ``1/x`` on an interval containing 0, ``log`` / ``sqrt`` below 0 give unbounded
lines (``-inf`` / ``+inf`` intercepts, never NaN), so bounds through them are vacuous, not wrong.
Round-off: each value of ``g`` is widened by ``8 eps`` times the magnitude of its two terms.

Cost: the relaxations are recomputed for every branch-and-bound domain and, with optimised
slopes, for every spec row, so the values are folded point by point into a running minimum /
maximum (one pass, no stacked copies), each side is computed only where it is used
(:meth:`Elementwise.lowest` / :meth:`Elementwise.highest`), and the entry-by-entry rules for
special values (:meth:`Elementwise._careful_extremes`) run only where a value came out NaN.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from verify.graph_functions import step

from .base import Activation, Relaxation, select_lines, times

__all__ = ["Elementwise", "Exp", "Log", "Reciprocal", "Sqrt", "Power", "Sin", "Cos", "Abs", "LeakyReLU", "Clip", "Sign",
           "Step", "step", "Floor", "PiecewiseLinear"]

_TWO_PI = 2 * math.pi


def _finite(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


class Elementwise(Activation):
    """An elementwise function relaxed by the recipe of the module docstring. Subclasses give
    ``f``, ``df`` (a one-sided derivative at kinks), :meth:`candidates` and, where it is known,
    :meth:`curvature`."""

    #: the interval rule widens each end by its own round-off (relax.bounds.roundoff adds nothing)
    interval_rounded = True
    #: :meth:`interval` is the extremes of ``f`` over the box (ends and stationary points)
    exact_image = True

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def candidates(self, k: Tensor, lo: Tensor, hi: Tensor) -> list[Tensor]:
        """Points where ``f'(x) = k`` or ``f`` is not differentiable (outside ``[lo, hi]`` or NaN
        where there is none); together with ``lo`` and ``hi`` they hold the extremes of ``f - k x``."""
        return []

    def curvature(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``+1`` where ``f`` is convex on ``[lo, hi]``, ``-1`` where concave, ``0`` otherwise."""
        return torch.zeros_like(lo)

    def f_with_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f(x)`` and the magnitude whose ``8 eps`` bounds the round-off of that computed value:
        ``|f(x)|`` for a function evaluated to a few ulps; a sum of many terms overrides it."""
        fx = self.f(x)
        return fx, fx.abs()

    def forward(self, x):
        return self.f(x)

    # ------------------------------------------------------------------ extremes of f - k x
    #: ``"max"`` where ``f`` is convex everywhere (``f - k x`` then takes its maximum over an
    #: interval at an end), ``"min"`` where concave everywhere: that side needs no candidates
    end_side: str | None = None

    def extremes(self, k: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of ``f(x) - k x`` over ``[lo, hi]`` (broadcast shapes), widened by the
        round-off allowance; ``-inf`` / ``+inf`` where unbounded or undefined."""
        gmin, gmax = self._fold(k, lo, hi, True, True)
        assert gmin is not None and gmax is not None
        return self._settle(gmin, k, lo, hi, False), self._settle(gmax, k, lo, hi, True)

    def lowest(self, k: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """The first half of :meth:`extremes` alone (about half its work)."""
        return self._one_side(k, lo, hi, False)

    def highest(self, k: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """The second half of :meth:`extremes` alone."""
        return self._one_side(k, lo, hi, True)

    def _one_side(self, k: Tensor, lo: Tensor, hi: Tensor, upper: bool) -> Tensor:
        if type(self).extremes is not Elementwise.extremes:  # an override's rule holds both sides
            return self.extremes(k, lo, hi)[int(upper)]
        gmin, gmax = self._fold(k, lo, hi, not upper, upper)
        out = gmax if upper else gmin
        assert out is not None
        return self._settle(out, k, lo, hi, upper)

    def candidate_values(self, k: Tensor, lo: Tensor, hi: Tensor) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """:meth:`candidates` with ``f`` and the magnitude of :meth:`f_with_magnitude` at each where an op knows them
        without evaluating ``f`` there (fixed points: a lookup table's kinks), else None."""
        return [(c, None, None) for c in self.candidates(k, lo, hi)]

    def _points(self, k: Tensor, lo: Tensor, hi: Tensor, ends_only: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(x, f(x), its round-off magnitude)`` at ``lo``, ``hi`` and the candidate points inside ``[lo, hi]``
        (``lo`` stands for one outside)."""
        f_lo, m_lo = self.f_with_magnitude(lo)
        yield lo, f_lo, m_lo
        yield hi, *self.f_with_magnitude(hi)
        for c, fc, mc in [] if ends_only else self.candidate_values(k, lo, hi):
            inside = (c >= lo) & (c <= hi)  # NaN is never inside
            x = torch.where(inside, c, lo)
            if fc is None or mc is None:
                yield x, *self.f_with_magnitude(x)
            else:
                yield x, torch.where(inside, fc, f_lo), torch.where(inside, mc, m_lo)

    def _fold(self, k: Tensor, lo: Tensor, hi: Tensor, want_min: bool, want_max: bool) -> tuple[Tensor | None, Tensor | None]:
        """The least and the largest value of ``g = f - k x`` at the points of :meth:`_points`,
        each widened by its round-off (``8 eps`` times the magnitude of its two terms); NaN
        wherever some value is NaN (``torch.minimum`` / ``maximum`` propagate it).

        Slopes that alpha-CROWN differentiates get the same values (folded without gradients)
        with the gradient of ``g`` at each entry's extreme point (the envelope theorem; a fold
        with gradients would keep every candidate point's graph: 56 for a 54-kink lookup table,
        gigabytes over a layer's optimised rows)."""
        grad = k.requires_grad and torch.is_grad_enabled()
        eps8 = 8 * torch.finfo(lo.dtype).eps
        ends_only = (want_min != want_max) and self.end_side == ("min" if want_min else "max")
        sides = [s for s, want in ((-1.0, want_min), (1.0, want_max)) if want]
        best: dict[float, list[Tensor]] = {}  # side -> [value, its point (with ``grad``)]
        with torch.no_grad():
            kd = k.detach()
            for x, fx, mag in self._points(kd, lo, hi, ends_only):
                kxx = kd * x
                g, tol = fx - kxx, (mag + kxx.abs()) * eps8
                for side in sides:
                    v = g + side * tol
                    if side not in best:
                        best[side] = [v, x.expand_as(v)] if grad else [v]
                        continue
                    b = best[side]
                    if grad:
                        b[1] = torch.where(v < b[0] if side < 0 else v > b[0], x, b[1])
                    b[0] = torch.minimum(b[0], v) if side < 0 else torch.maximum(b[0], v)
            if grad:  # d/dk of g -+ tol at the point: -x -+ 8 eps sign(k x) x
                for side, b in best.items():
                    slope = -b[1] + side * eps8 * torch.sign(kd * b[1]) * b[1]
                    b[1] = torch.where(torch.isfinite(slope), slope, torch.zeros_like(slope))
        # k - kd is 0: the values are the fold's, the gradient the slope's
        out = {side: (b[0] + (k - kd) * b[1]) if grad else b[0] for side, b in best.items()}
        return out.get(-1.0), out.get(1.0)

    def _settle(self, out: Tensor, k: Tensor, lo: Tensor, hi: Tensor, upper: bool) -> Tensor:
        """:meth:`_fold`'s value plus / minus the smallest normal number; where it is NaN (a value
        undefined outside the domain, ``0 * inf``, or an overflowed value widened: ``inf - inf``)
        the careful rule of :meth:`_careful_extremes` decides."""
        tiny = torch.finfo(out.dtype).tiny
        out = out + tiny if upper else out - tiny
        bad = torch.isnan(out)
        if bool(bad.any()):
            out = torch.where(bad, self._careful_extremes(k, lo, hi)[1 if upper else 0], out)
        return out

    def _careful_extremes(self, k: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`extremes` with every special value decided point by point: ``0 * inf`` is 0 (the
        slope-0 line of the interval rule), an overflowed value is bounded by the largest float on
        its side, an undefined one is unbounded."""
        eps = 8 * torch.finfo(lo.dtype).eps
        big = torch.finfo(lo.dtype).max
        lows, highs = [], []
        for x, fx, mag in self._points(k, lo, hi):
            kxx = times(k, x)
            gx, tol = fx - kxx, eps * (mag + kxx.abs())
            low, high = gx - tol, gx + tol
            lows.append(torch.where(torch.isnan(gx), -math.inf, torch.where(torch.isnan(low), big, low)))
            highs.append(torch.where(torch.isnan(gx), math.inf, torch.where(torch.isnan(high), -big, high)))
        gmin = torch.stack(torch.broadcast_tensors(*lows)).amin(0)
        gmax = torch.stack(torch.broadcast_tensors(*highs)).amax(0)
        return self._widen(gmin, gmax, torch.zeros_like(gmin))

    @staticmethod
    def _widen(gmin: Tensor, gmax: Tensor, mag: Tensor) -> tuple[Tensor, Tensor]:
        """Widen by ``8 eps mag`` (plus the smallest normal number); NaN becomes unbounded."""
        tol = 8 * torch.finfo(gmin.dtype).eps * mag + torch.finfo(gmin.dtype).tiny
        inf = torch.full_like(gmin, math.inf)
        gmin = torch.where(torch.isnan(gmin) | torch.isnan(tol), -inf, gmin - tol)
        gmax = torch.where(torch.isnan(gmax) | torch.isnan(tol), inf, gmax + tol)
        return gmin, gmax

    #: ``f >= 0`` everywhere (the interval's lower end is clamped at 0 after its round-off widening)
    nonnegative = False

    def interval(self, bnd):
        lo, hi = bnd
        l, h = self.extremes(torch.zeros_like(lo), lo, hi)
        return (l.clamp_min(0) if self.nonnegative else l), h

    # ------------------------------------------------------------------ slopes and lines
    def _secant(self, lo: Tensor, hi: Tensor) -> Tensor:
        m, w = (lo + hi) / 2, hi - lo
        wide = w > 1e-6 * (1 + m.abs())
        sec = (self.f(hi) - self.f(lo)) / torch.where(wide, w, torch.ones_like(w))
        return _finite(torch.where(wide, sec, self.df(m)))

    def _slope_range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``[f'(lo), f'(hi)]`` sorted (the tangents' slopes on a convex or concave piece)."""
        a, b = _finite(self.df(lo)), _finite(self.df(hi))
        return torch.minimum(a, b), torch.maximum(a, b)

    def relax(self, lo, hi, mode="crown"):
        curv = self.curvature(lo, hi)
        sec = self._secant(lo, hi)
        tan = _finite(self.df((lo + hi) / 2))
        kl = torch.where(curv > 0, tan, sec)
        ku = torch.where(curv < 0, tan, sec)
        lb, ub = self.lowest(kl, lo, hi), self.highest(ku, lo, hi)
        kmin, kmax = self._slope_range(lo, hi)
        return Relaxation(kl, lb, ku, ub, extra=(lo, hi, curv, kmin, kmax))

    def term_magnitude(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Bound on ``|f(x)| + |k x|`` over the box for the slopes the relaxations use (within
        ``f'`` at the ends, the secant and 1), for :mod:`relax.bounds.roundoff`."""
        fl, fh = self.interval((lo, hi))
        k = torch.stack([self.df(lo).abs(), self.df(hi).abs(), self._secant(lo, hi).abs(), torch.ones_like(lo)]).amax(0)
        k = torch.where(torch.isnan(k), torch.full_like(k, math.inf), k)
        return torch.maximum(fl.abs(), fh.abs()) + k * torch.maximum(lo.abs(), hi.abs())

    @property
    def optimisable(self) -> bool:  # type: ignore[override]
        return type(self).curvature is not Elementwise.curvature

    def alpha_init(self, r: Relaxation) -> Tensor:
        """Where convex (concave), the lower (upper) slope as a fraction of ``[f'(l), f'(u)]``."""
        _, _, curv, kmin, kmax = r.extra
        k = torch.where(curv < 0, r.uw, r.lw)
        span = kmax - kmin
        return torch.where(span > 0, (k - kmin) / torch.where(span > 0, span, torch.ones_like(span)),
                           torch.full_like(k, 0.5)).clamp(0, 1)

    def backward_relaxed(self, A, r, alpha=None):
        if alpha is None:
            return select_lines(A, r.lw, r.lb, r.uw, r.ub, r.finite_intercepts)
        lo, hi, curv, kmin, kmax = r.extra
        k = kmin + alpha * (kmax - kmin)  # [S, B, *shape]
        convex, concave = curv > 0, curv < 0  # the optimised tangent: the lower line where convex, the upper where concave
        lw, uw = torch.where(convex, k, r.lw), torch.where(concave, k, r.uw)  # the slopes stay in the graph either way
        lb = torch.where(convex, self.lowest(k, lo, hi), r.lb) if bool(convex.any()) else r.lb
        ub = torch.where(concave, self.highest(k, lo, hi), r.ub) if bool(concave.any()) else r.ub
        return select_lines(A, lw, lb, uw, ub)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Convex(Elementwise):
    end_side = "max"

    def curvature(self, lo, hi):
        return torch.ones_like(lo)


class _Concave(Elementwise):
    end_side = "min"

    def curvature(self, lo, hi):
        return -torch.ones_like(lo)


class Exp(_Convex):
    kind = "exp"
    nonnegative = True

    def f(self, x):
        return torch.exp(x)

    def df(self, x):
        return torch.exp(x)

    def candidates(self, k, lo, hi):
        return [torch.log(k)]  # NaN / -inf for k <= 0: no stationary point


class Log(_Concave):
    """Natural logarithm; unbounded below where ``lo <= 0``."""

    kind = "log"

    def f(self, x):
        return torch.log(x)

    def df(self, x):
        return 1 / x

    def candidates(self, k, lo, hi):
        return [1 / k]


class Sqrt(_Concave):
    kind = "sqrt"
    nonnegative = True

    def f(self, x):
        return torch.sqrt(x)  # NaN below 0: vacuous lines there

    def df(self, x):
        return 0.5 / torch.sqrt(x)

    def candidates(self, k, lo, hi):
        return [torch.where(k > 0, 0.25 / (k * k), torch.full_like(k, math.nan))]


class Reciprocal(Elementwise):
    """``1 / x``: convex for ``x > 0``, concave for ``x < 0``, unbounded on an interval that
    contains 0."""

    kind = "reciprocal"

    def f(self, x):
        return 1 / x

    def df(self, x):
        return -1 / (x * x)

    def candidates(self, k, lo, hi):
        r = torch.sqrt(-1 / k)  # NaN for k > 0
        return [r, -r]

    def curvature(self, lo, hi):
        return torch.where(lo > 0, 1.0, torch.where(hi < 0, -1.0, 0.0)).to(lo.dtype)

    def _settle(self, out, k, lo, hi, upper):
        out = super()._settle(out, k, lo, hi, upper)
        pole = (lo <= 0) & (hi >= 0)  # unbounded on both sides
        return torch.where(pole, math.inf if upper else -math.inf, out)


class Power(Elementwise):
    """``x ** n`` for an integer ``n >= 2`` (convex for even ``n``; odd ``n``: convex for
    ``x >= 0``, concave for ``x <= 0``)."""

    kind = "pow"

    def __init__(self, n: int):
        if int(n) != n or n < 2:
            raise ValueError(f"Power needs an integer exponent >= 2, got {n}")
        self.n = int(n)
        self.nonnegative = self.n % 2 == 0

    def f(self, x):
        return x ** self.n

    def df(self, x):
        return self.n * x ** (self.n - 1)

    def candidates(self, k, lo, hi):
        r = (k.abs() / self.n) ** (1.0 / (self.n - 1))
        return [r, -r]

    def curvature(self, lo, hi):
        if self.n % 2 == 0:
            return torch.ones_like(lo)
        return torch.where(lo >= 0, 1.0, torch.where(hi <= 0, -1.0, 0.0)).to(lo.dtype)

    def __repr__(self) -> str:
        return f"Power({self.n})"


class PiecewiseLinear(Elementwise):
    """``f(x) = c + sum_k w_k relu(x - t_k)``: a continuous piecewise-linear function of one
    variable with kinks ``t [K]`` and slope changes ``w [K]``, applied to every entry (the
    sigmoid lookup tables of ml4acopf's networks: 54 ReLUs on shifted copies of each entry,
    summed by a MatMul, fused by :func:`relax.ir.graph._fuse_lookup_tables`). Relaxed as one
    function, whose lines follow its shape on the box, instead of ``K`` separate ReLU triangles
    whose gaps add up; branch-and-bound halves the input interval instead of splitting ``K``
    ReLUs. The extremes of ``f - k x`` lie at the ends and the kinks; ``f`` is convex on a box
    where every kink inside has ``w_k >= 0``, concave where every one has ``w_k <= 0``."""

    kind = "piecewise linear"

    def __init__(self, t: Tensor, w: Tensor, c: float = 0.0):
        if t.dim() != 1 or t.shape != w.shape:
            raise ValueError(f"PiecewiseLinear needs kinks and slope changes of one shape [K], got {tuple(t.shape)}, {tuple(w.shape)}")
        self.t, self.w, self.c = t, w, float(c)
        self._abs_c = abs(self.c)
        self._terms = t.numel() + 3  # the summed terms: c and K products of a difference (gamma_{K+3})
        self._at_kinks: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def _each(self, x: Tensor) -> Tensor:
        return torch.relu(x.unsqueeze(-1) - self.t.to(x.dtype))  # [*, K]

    def f(self, x):
        return self._each(x) @ self.w.to(x.dtype) + self.c

    def df(self, x):
        return (x.unsqueeze(-1) >= self.t.to(x.dtype)).to(x.dtype) @ self.w.to(x.dtype)

    def f_with_magnitude(self, x):
        # recursive summation of c and K terms w_k (x - t_k)_+, each a rounded difference and product
        each = self._each(x)
        fx = each @ self.w.to(x.dtype) + self.c
        return fx, (self._terms / 8.0) * (each @ self.w.abs().to(x.dtype) + self._abs_c + fx.abs())

    def candidates(self, k, lo, hi):
        return [torch.full_like(lo, float(tk)) for tk in self.t.tolist()]

    def candidate_values(self, k, lo, hi):
        # f and its magnitude at the kinks, computed once per dtype and device by the same
        # functions (K x K numbers instead of K per entry and kink)
        key = (lo.dtype, lo.device)
        if key not in self._at_kinks:
            t = self.t.to(device=lo.device, dtype=lo.dtype)
            self._at_kinks[key] = (t, *self.f_with_magnitude(t))
        t, ft, mt = self._at_kinks[key]
        return [(t[j].expand_as(lo), ft[j], mt[j]) for j in range(t.numel())]

    def curvature(self, lo, hi):
        t, w = self.t.to(lo.dtype), self.w.to(lo.dtype)
        inside = (t > lo.unsqueeze(-1)) & (t < hi.unsqueeze(-1))  # [*, K]
        bends_up, bends_down = (inside & (w > 0)).any(-1), (inside & (w < 0)).any(-1)
        return torch.where(~bends_down, 1.0, torch.where(~bends_up, -1.0, 0.0)).to(lo.dtype)

    def __repr__(self) -> str:
        return f"PiecewiseLinear({self.t.numel()} kinks)"


class _Periodic(Elementwise):
    """sin / cos: stationary points in closed form within a few periods; wider intervals use
    ``|f| <= 1`` (``f - k x`` within ``[-1, 1] - k [lo, hi]``)."""

    def base_points(self, k: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def candidates(self, k, lo, hi):
        m0 = torch.floor(lo / _TWO_PI)
        out = []
        for b in self.base_points(k):
            for j in range(-1, 4):
                out.append(b + _TWO_PI * (m0 + j))
        return out

    def extremes(self, k, lo, hi):
        gmin, gmax = super().extremes(k, lo, hi)
        kl, kh = k * lo, k * hi
        crude_min = -1 - torch.maximum(kl, kh)
        crude_max = 1 - torch.minimum(kl, kh)
        crude_min, crude_max = self._widen(crude_min, crude_max, 1 + torch.maximum(kl.abs(), kh.abs()))
        narrow = (hi - lo) <= 2 * _TWO_PI  # every stationary point is listed
        gmin = torch.where(narrow, torch.maximum(gmin, crude_min), crude_min)
        gmax = torch.where(narrow, torch.minimum(gmax, crude_max), crude_max)
        return gmin, gmax


class Sin(_Periodic):
    kind = "sin"

    def f(self, x):
        return torch.sin(x)

    def df(self, x):
        return torch.cos(x)

    def base_points(self, k):
        a = torch.acos(k)  # NaN for |k| > 1
        return [a, -a]


class Cos(_Periodic):
    kind = "cos"

    def f(self, x):
        return torch.cos(x)

    def df(self, x):
        return -torch.sin(x)

    def base_points(self, k):
        a = torch.asin(-k)
        return [a, math.pi - a]


class Abs(_Convex):
    kind = "abs"
    exact_forward = True
    nonnegative = True

    def f(self, x):
        return x.abs()

    def df(self, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    def candidates(self, k, lo, hi):
        return [torch.zeros_like(lo)]


class LeakyReLU(Elementwise):
    """``x`` for ``x >= 0``, ``slope x`` below (convex for ``slope <= 1``)."""

    kind = "leaky_relu"
    exact_forward = False

    def __init__(self, slope: float):
        self.slope = float(slope)

    def f(self, x):
        return torch.where(x >= 0, x, self.slope * x)

    def df(self, x):
        return torch.where(x >= 0, 1.0, self.slope).to(x.dtype)

    def candidates(self, k, lo, hi):
        return [torch.zeros_like(lo)]

    def curvature(self, lo, hi):
        return torch.full_like(lo, 1.0 if self.slope <= 1 else -1.0)

    def __repr__(self) -> str:
        return f"LeakyReLU({self.slope})"


class Clip(Elementwise):
    """``min(max(x, low), high)`` (either end may be ``None``)."""

    kind = "clip"
    exact_forward = True

    def __init__(self, low: float | None, high: float | None):
        self.low, self.high = low, high

    def f(self, x):
        return torch.clamp(x, self.low, self.high)

    def df(self, x):
        inside = torch.ones_like(x, dtype=torch.bool)
        if self.low is not None:
            inside &= x >= self.low
        if self.high is not None:
            inside &= x <= self.high
        return inside.to(x.dtype)

    def candidates(self, k, lo, hi):
        return [torch.full_like(lo, float(v)) for v in (self.low, self.high) if v is not None]

    def __repr__(self) -> str:
        return f"Clip({self.low}, {self.high})"


class Sign(Elementwise):
    """``sign(x)`` (``-1, 0, 1``; binarised networks). On each side of 0 ``f - k x`` is linear, so
    its extremes are at ``lo``, ``hi`` and the limits ``-1, 0, +1`` at 0 (bounds over the closure,
    hence sound)."""

    kind = "sign"
    exact_forward = True

    def f(self, x):
        return torch.sign(x)

    def df(self, x):
        return torch.zeros_like(x)

    def extremes(self, k, lo, hi):
        g_lo, g_hi = self.f(lo) - k * lo, self.f(hi) - k * hi
        gmin, gmax = torch.minimum(g_lo, g_hi), torch.maximum(g_lo, g_hi)
        zero_in = (lo <= 0) & (hi >= 0)
        left = zero_in & (lo < 0)  # values -1 approached from the left of 0
        right = zero_in & (hi > 0)
        gmin = torch.where(left, torch.minimum(gmin, -torch.ones_like(gmin)), gmin)
        gmin = torch.where(zero_in, torch.minimum(gmin, torch.zeros_like(gmin)), gmin)
        gmax = torch.where(right, torch.maximum(gmax, torch.ones_like(gmax)), gmax)
        gmax = torch.where(zero_in, torch.maximum(gmax, torch.zeros_like(gmax)), gmax)
        mag = 1 + torch.maximum((k * lo).abs(), (k * hi).abs())
        return self._widen(gmin, gmax, mag)

    def interval(self, bnd):
        lo, hi = bnd
        return torch.sign(lo), torch.sign(hi)  # nondecreasing, exact


class Step(Elementwise):
    """The Heaviside step ``[x > 0] + v [x = 0]`` (``v = 0``: ``x > 0``; ``v = 1``: ``x >= 0``;
    comparisons, ArgMax and Where conditions of ONNX graphs). On each side of 0 ``f - k x`` is
    linear, so its extremes are at ``lo``, ``hi`` and the values ``0``, ``v``, ``1`` at 0.

    Lines where ``lo < 0 < hi`` (the tightest through the step's corners): lower ``k x`` with
    ``k in [0, 1 / hi]``, upper ``1 + k x`` with ``k in [0, 1 / -lo]``. CROWN takes the end of
    each range with the smaller area between line and step (``1 / hi`` when ``hi > -lo``, as a
    ReLU's lower slope; ``1 / -lo`` when ``-lo > hi``); alpha-CROWN optimises both as fractions
    of their ranges (any slope in them, or out of them, is sound: the intercepts are exact). A
    composition ``relu(sign(x))`` loses up to 1/2 of this lower line at ``hi``."""

    kind = "step"
    exact_forward = True
    slope_pair = (2,)

    def __init__(self, at_zero: float = 0.0):
        self.at_zero = float(at_zero)

    def f(self, x):
        return torch.where(x > 0, torch.ones_like(x), torch.where(x == 0, torch.full_like(x, self.at_zero), torch.zeros_like(x)))

    def df(self, x):
        return torch.zeros_like(x)

    def extremes(self, k, lo, hi):
        g_lo, g_hi = self.f(lo) - times(k, lo), self.f(hi) - times(k, hi)
        gmin, gmax = torch.minimum(g_lo, g_hi), torch.maximum(g_lo, g_hi)
        zero_in = (lo <= 0) & (hi >= 0)
        for present, value in ((zero_in & (lo < 0), 0.0), (zero_in, self.at_zero), (zero_in & (hi > 0), 1.0)):
            v = torch.full_like(gmin, value)
            gmin = torch.where(present, torch.minimum(gmin, v), gmin)
            gmax = torch.where(present, torch.maximum(gmax, v), gmax)
        mag = 1 + abs(self.at_zero) + torch.maximum(times(k, lo).abs(), times(k, hi).abs())
        return self._widen(gmin, gmax, mag)

    def interval(self, bnd):
        lo, hi = bnd
        if 0.0 <= self.at_zero <= 1.0:  # nondecreasing: exact
            return self.f(lo), self.f(hi)
        return super().interval(bnd)

    @staticmethod
    def _ranges(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The largest lower and upper slopes (``1 / hi``, ``1 / -lo``) where the box holds 0 inside, else 0."""
        cross = (lo < 0) & (hi > 0)
        one = torch.ones_like(lo)
        lower = torch.where(cross, one / torch.where(cross, hi, one), 0 * one)
        return lower, torch.where(cross, one / torch.where(cross, -lo, one), 0 * one)

    def relax(self, lo, hi, mode="crown"):
        kl_max, ku_max = self._ranges(lo, hi)
        kl = torch.where(hi > -lo, kl_max, torch.zeros_like(kl_max))
        ku = torch.where(-lo > hi, ku_max, torch.zeros_like(ku_max))
        return Relaxation(kl, self.lowest(kl, lo, hi), ku, self.highest(ku, lo, hi), extra=(lo, hi, kl_max, ku_max))

    def term_magnitude(self, lo, hi):
        kl_max, ku_max = self._ranges(lo, hi)
        return 1 + abs(self.at_zero) + torch.maximum(kl_max, ku_max) * torch.maximum(lo.abs(), hi.abs())

    @property
    def optimisable(self) -> bool:  # type: ignore[override]
        return True

    def alpha_init(self, r: Relaxation) -> Tensor:
        """Both slopes as fractions of their ranges, ``[B, *shape, 2]`` (lower, upper)."""
        _, _, kl_max, ku_max = r.extra
        frac = lambda k, m: torch.where(m > 0, k / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(m))  # noqa: E731
        return torch.stack([frac(r.lw, kl_max), frac(r.uw, ku_max)], -1)

    def backward_relaxed(self, A, r, alpha=None):
        if alpha is None:
            return select_lines(A, r.lw, r.lb, r.uw, r.ub, r.finite_intercepts)
        lo, hi, kl_max, ku_max = r.extra
        kl, ku = alpha[..., 0].clamp(0, 1) * kl_max, alpha[..., 1].clamp(0, 1) * ku_max  # [S, B, *shape]
        return select_lines(A, kl, self.lowest(kl, lo, hi), ku, self.highest(ku, lo, hi))

    def __repr__(self) -> str:
        return f"Step(at_zero={self.at_zero})"


class Floor(Elementwise):
    """``floor(x)``: ``x - 1 < floor(x) <= x`` and ``floor(lo) <= floor(x) <= floor(hi)``, so
    ``f - k x`` is bounded by the extremes of two linear functions on ``[lo, hi]``."""

    kind = "floor"
    exact_forward = True

    def f(self, x):
        return torch.floor(x)

    def df(self, x):
        return torch.zeros_like(x)

    def extremes(self, k, lo, hi):
        kl, kh = k * lo, k * hi
        a_lo, a_hi = (1 - k) * lo, (1 - k) * hi  # x - k x at the ends
        gmin = torch.maximum(torch.minimum(a_lo, a_hi) - 1, torch.floor(lo) - torch.maximum(kl, kh))
        gmax = torch.minimum(torch.maximum(a_lo, a_hi), torch.floor(hi) - torch.minimum(kl, kh))
        mag = 1 + torch.maximum(lo.abs(), hi.abs()) * (1 + k.abs())
        return self._widen(gmin, gmax, mag)

    def interval(self, bnd):
        lo, hi = bnd
        return torch.floor(lo), torch.floor(hi)
