"""Elementwise activations: ReLU, Sigmoid, Tanh, Erf, Atan.

ReLU on ``[l, u]`` (Zhang et al. 2018, CROWN, Sec. 3.2 and Fig. 1; Singh et al. 2019,
DeepPoly, Sec. 4): stable neurons are exact; an unstable one (``l < 0 < u``) gets the upper line
``u (x - l) / (u - l)`` and a lower line ``alpha x`` with ``alpha in [0, 1]``. CROWN-adaptive
and DeepPoly both take ``alpha = 1 if u > -l else 0`` (the smaller-area choice; DeepPoly
Eq. (2)); alpha-CROWN optimises alpha (Xu et al. 2021, Eq. (5)).

Sigmoid / Tanh / Erf / Atan (S-shaped: convex for ``x < 0``, concave for ``x > 0``). A slope ``k`` is chosen
by a heuristic, then the intercept is the *exact* extreme of ``g(x) = f(x) - k x`` over
``[l, u]``: ``g`` decreases, increases, decreases with turning points ``x1 < 0 < x2`` where
``f'(x) = k`` (closed form), so ``min g = min(g(l), g(u), g(x1) if x1 in [l, u])`` and
``max g = max(g(l), g(u), g(x2) if x2 in [l, u])``. Every slope thus gives a sound line, and the
line is never looser than the tangent/secant construction with the same slope (the mixed-sign
case of CROWN's Table 1 needs no separate soundness argument). Slopes:

* ``crown`` (CROWN Sec. 3.3 / auto_LiRPA's BoundSigmoid idea): upper line = secant when
  ``u <= 0``, tangent at the midpoint when ``l >= 0``; in the mixed case the secant if it stays
  above ``f`` (its slope ``<= f'(u)``), else the tangent from a point ``d in [0, u]`` that passes
  through ``(l, f(l))`` (found by bisection). The lower line is the mirror image.
* ``deeppoly`` (DeepPoly Sec. 4.3): ``lambda = secant slope``, ``lambda' = min(f'(l), f'(u))``;
  lower slope ``lambda`` if ``l > 0`` else ``lambda'``; upper slope ``lambda`` if ``u <= 0`` else
  ``lambda'``.
* alpha-CROWN: both slopes are free parameters, any slope being sound (see above). They are
  optimised as fractions ``alpha in [0, 1]`` of the range of ``f'`` on ``[l, u]``:
  ``k = k_min + alpha (k_max - k_min)`` with ``k_min = min(f'(l), f'(u))`` and ``k_max = f'`` at
  the point of ``[l, u]`` nearest 0 (``f'`` is unimodal). Every tangent / secant slope of the
  heuristics lies in that range (mean value theorem), and an optimiser step of a given size then
  moves a saturated neuron's slope (``f' ~ 1e-3``) as much, relatively, as a central one's; steps
  in units of ``f'(0)`` instead overshoot the slopes of saturated neurons, the intermediate bounds
  get looser than CROWN's at the first step and their slopes stop receiving gradient. Started
  from the ``crown`` slopes, optimised per spec row (like auto_LiRPA's tangent points, Xu et
  al. 2020, scaled to the interval).

A relative round-off allowance ``4 eps (1 + |f| + |k x|)`` is subtracted from / added to the
intercepts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Activation, Relaxation, sum_rows, times

__all__ = ["ReLU", "Sigmoid", "Tanh", "Erf", "Atan"]


class ReLU(Activation):
    kind = "relu"
    exact_forward = True
    exact_image = True
    optimisable = True

    def forward(self, x):
        return torch.relu(x)

    def interval(self, bnd):
        lo, hi = bnd
        return lo.clamp(min=0), hi.clamp(min=0)

    def relax(self, lo, hi, mode="crown"):
        unstable = (lo < 0) & (hi > 0)
        active = lo >= 0
        denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
        uw = torch.where(unstable, hi / denom, active.to(hi.dtype))
        ub = torch.where(unstable, -lo * uw, torch.zeros_like(hi))
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):  # the chord's limits
            uw, ub = _unbounded_chords(lo, hi, unstable, uw, ub)
        lw = torch.where(unstable, (hi > -lo).to(hi.dtype), active.to(hi.dtype))
        return Relaxation(lw, torch.zeros_like(lw), uw, ub, extra=unstable)

    def backward_relaxed(self, A, r, alpha=None):
        lw = r.lw if alpha is None else self.alpha_slope(alpha, r)
        up = A.clamp(max=0) * r.ub if r.finite_intercepts else torch.where(A < 0, A * r.ub, torch.zeros((), dtype=A.dtype, device=A.device))
        return A * torch.where(A < 0, r.uw, lw), sum_rows(up)

    def alpha_slope(self, alpha, r):
        return torch.where(r.extra, alpha, r.lw)

    def alpha_init(self, r):
        return r.lw.clone()


def _unbounded_chords(lo: Tensor, hi: Tensor, unstable: Tensor, uw: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU's upper line on unstable boxes with an infinite end (the chord's limit; ``inf / inf``
    and ``inf * 0`` would make it NaN): ``x - lo`` when only ``hi`` is infinite, the constant
    ``hi`` when only ``lo`` is, the constant ``+inf`` when both are (a row that takes it is
    unbounded; a row with coefficient 0 there is not touched: :meth:`ReLU.backward_relaxed`)."""
    inf_hi, inf_lo = unstable & torch.isinf(hi), unstable & torch.isinf(lo)
    one, zero = torch.ones_like(hi), torch.zeros_like(hi)
    uw = torch.where(inf_hi & ~inf_lo, one, torch.where(inf_lo, zero, uw))
    ub = torch.where(inf_hi & ~inf_lo, -lo, torch.where(inf_lo & ~inf_hi, hi, torch.where(inf_lo, torch.full_like(hi, math.inf), ub)))
    return uw, ub


class _SShaped(Activation):
    """Common relaxation of sigmoid and tanh (see module docstring)."""

    fprime0 = 1.0  # f'(0), the largest slope
    exact_image = True
    slope_pair = (2,)

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def turning(self, k: Tensor) -> Tensor:
        """``x2 > 0`` with ``f'(x2) = k`` for ``0 < k < f'(0)`` (``x1 = -x2``)."""
        raise NotImplementedError

    def forward(self, x):
        return self.f(x)

    def interval(self, bnd):
        lo, hi = bnd
        return self.f(lo), self.f(hi)

    def intercepts(self, k: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of ``f(x) - k x`` over ``[lo, hi]`` (exact up to round-off, widened)."""
        return self.intercept(k, lo, hi, lower=True), self.intercept(k, lo, hi, lower=False)

    def intercept(self, k: Tensor, lo: Tensor, hi: Tensor, lower: bool) -> Tensor:
        """``min`` (``lower``) or ``max`` of ``g(x) = f(x) - k x`` over ``[lo, hi]``: the ends and
        the turning point ``x1 = -x2 < 0`` (a minimum of ``g``) or ``x2 > 0`` (a maximum) where it
        lies in the interval; widened by a round-off allowance."""
        g_lo, g_hi = self.f(lo) - times(k, lo), self.f(hi) - times(k, hi)
        inner = (k > 0) & (k < self.fprime0)
        x = self.turning(torch.where(inner, k, torch.full_like(k, self.fprime0 / 2)))
        if lower:
            x = -x
        g_x = self.f(x) - k * x
        use = inner & (x >= lo) & (x <= hi)
        tol = 4 * torch.finfo(k.dtype).eps * (1 + self.fprime0 + times(k.abs(), torch.maximum(lo.abs(), hi.abs())))
        if lower:
            return torch.minimum(torch.minimum(g_lo, g_hi), torch.where(use, g_x, torch.full_like(k, float("inf")))) - tol
        return torch.maximum(torch.maximum(g_lo, g_hi), torch.where(use, g_x, torch.full_like(k, -float("inf")))) + tol

    def _tangent_through(self, lo, hi, point, side, steps=24):
        """Bisection for the tangent point ``d`` between 0 and ``side``'s end whose tangent
        passes through ``(point, f(point))`` (only a slope heuristic: soundness comes from
        :meth:`intercepts`)."""
        fp = self.f(point)
        if side == "upper":  # d in [0, hi]: smallest d with tangent(d)(lo) >= f(lo)
            a, b = torch.zeros_like(hi), hi.clamp(min=0)
            for _ in range(steps):
                m = (a + b) / 2
                ok = self.f(m) + self.df(m) * (point - m) >= fp
                b = torch.where(ok, m, b)
                a = torch.where(ok, a, m)
            return b
        a, b = lo.clamp(max=0), torch.zeros_like(lo)  # d in [lo, 0]: largest d with tangent(d)(hi) <= f(hi)
        for _ in range(steps):
            m = (a + b) / 2
            ok = self.f(m) + self.df(m) * (point - m) <= fp
            a = torch.where(ok, m, a)
            b = torch.where(ok, b, m)
        return a

    def relax(self, lo, hi, mode="crown"):
        m = (lo + hi) / 2
        w = hi - lo
        wide = w > 1e-6 * (1 + m.abs())
        secant = torch.where(wide, (self.f(hi) - self.f(lo)) / torch.where(wide, w, torch.ones_like(w)), self.df(m))
        if mode == "deeppoly":
            kmin = torch.minimum(self.df(lo), self.df(hi))
            kl = torch.where(lo > 0, secant, kmin)
            ku = torch.where(hi <= 0, secant, kmin)
        else:
            tan_m = self.df(m)
            # upper slope
            ok_sec_u = secant <= self.df(hi)
            du = self._tangent_through(lo, hi, lo, "upper")
            ku = torch.where(hi <= 0, secant, torch.where(lo >= 0, tan_m, torch.where(ok_sec_u, secant, self.df(du))))
            ok_sec_l = secant <= self.df(lo)
            dl = self._tangent_through(lo, hi, hi, "lower")
            kl = torch.where(lo >= 0, secant, torch.where(hi <= 0, tan_m, torch.where(ok_sec_l, secant, self.df(dl))))
        kl, ku = (torch.where(torch.isnan(k), torch.zeros_like(k), k) for k in (kl, ku))  # an unbounded box's midpoint is NaN
        lb = self.intercept(kl, lo, hi, lower=True)
        ub = self.intercept(ku, lo, hi, lower=False)
        kmin = torch.minimum(self.df(lo), self.df(hi))
        kmax = self.df(torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi))
        return Relaxation(kl, lb, ku, ub, extra=(lo, hi, kmin, kmax))

    optimisable = True

    def alpha_init(self, r: Relaxation) -> Tensor:
        """Both slopes as fractions of ``[k_min, k_max]`` (module docstring), ``[B, *shape, 2]``
        (lower, upper), in ``[0, 1]`` like a ReLU's alpha; alpha-CROWN optimises them freely,
        since :meth:`intercepts` makes a sound line of any slope."""
        _, _, kmin, kmax = r.extra
        span = kmax - kmin
        pos = span > 0
        frac = lambda k: torch.where(pos, (k - kmin) / torch.where(pos, span, torch.ones_like(span)),  # noqa: E731
                                     torch.full_like(k, 0.5)).clamp(0, 1)
        return torch.stack([frac(r.lw), frac(r.uw)], -1)

    def backward_relaxed(self, A, r, alpha=None):
        if alpha is None:
            return super().backward_relaxed(A, r)
        lo, hi, kmin, kmax = r.extra
        span = kmax - kmin
        kl, ku = kmin + alpha[..., 0] * span, kmin + alpha[..., 1] * span  # [S, B, *shape]
        lb = self.intercept(kl, lo, hi, lower=True)
        ub = self.intercept(ku, lo, hi, lower=False)
        # lines per row ([S, B, *shape]): the two clamps cost less than select_lines' finiteness check
        Ap, An = A.clamp(min=0), A.clamp(max=0)
        return Ap * kl + An * ku, sum_rows(Ap * lb + An * ub)


class Sigmoid(_SShaped):
    kind = "sigmoid"
    fprime0 = 0.25

    def f(self, x):
        return torch.sigmoid(x)

    def df(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)

    def turning(self, k):
        # s (1 - s) = k, s2 = (1 + sqrt(1 - 4k)) / 2 > 1/2; x2 = log(s2 / (1 - s2)),
        # 1 - s2 = 2k / (1 + sqrt(1 - 4k)) without cancellation.
        # so x2 = 2 log(1 + r) - log(4k).
        r = torch.sqrt((1 - 4 * k).clamp(min=0))
        return 2 * torch.log1p(r) - torch.log(4 * k)


class Tanh(_SShaped):
    kind = "tanh"
    fprime0 = 1.0

    def f(self, x):
        return torch.tanh(x)

    def df(self, x):
        t = torch.tanh(x)
        return 1 - t * t

    def turning(self, k):
        # 1 - t^2 = k, t = sqrt(1 - k); x2 = atanh(t) = (log(1 + t) - log(1 - t)) / 2,
        # 1 - t = k / (1 + t) without cancellation.
        t = torch.sqrt((1 - k).clamp(min=0))
        return 0.5 * (torch.log1p(t) - torch.log(k / (1 + t)))


class Erf(_SShaped):
    """The error function (GELU's ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2``): odd and S-shaped like
    tanh, ``erf'(x) = 2 / sqrt(pi) exp(-x^2)``."""

    kind = "erf"
    fprime0 = 2.0 / math.sqrt(math.pi)

    def f(self, x):
        return torch.erf(x)

    def df(self, x):
        return self.fprime0 * torch.exp(-x * x)

    def turning(self, k):
        # 2 / sqrt(pi) exp(-x^2) = k: x2 = sqrt(log(f'(0) / k))
        return torch.sqrt(torch.log(self.fprime0 / k).clamp(min=0))


class Atan(_SShaped):
    """The arctangent: odd and S-shaped, bounded by ``pi / 2`` (within the ``1 + f'(0)`` of the
    round-off allowance), ``atan'(x) = 1 / (1 + x^2)``."""

    kind = "atan"
    fprime0 = 1.0

    def f(self, x):
        return torch.atan(x)

    def df(self, x):
        return 1.0 / (1.0 + x * x)

    def turning(self, k):
        # 1 / (1 + x^2) = k: x2 = sqrt(1 / k - 1)
        return torch.sqrt((1.0 / k - 1.0).clamp(min=0))
