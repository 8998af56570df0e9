"""Normalisation ``w = x / S`` with ``S = scale * sum of x over dims`` (a weighted average's
weights, ``Div(x, ReduceSum(x))``; ReduceMean gives ``scale = 1 / count``).

Bounding ``x * (1 / S)`` as a product of two bounded quantities (McCormick) forgets that ``S``
is made of ``x``; on a policy's output ``v . x / sum(x)`` the error grows with the relative
widths of both boxes even though the value hardly moves when all ``x`` grow together. This
rule keeps the ratio (a linear-fractional function of ``x``; Charnes & Cooper 1962, Dinkelbach
1967). For one group of ``x`` and the coefficients ``c`` of a row on ``w``, and any ``t``::

    c . w = t + g / S,     g = (c - t s 1) . x     (s = scale; exact where S != 0)

With ``S`` in ``[S_l, S_u]``, ``S_l > 0`` (the box of the sum node itself), ``g / S >= h(g)``
with ``h(g) = g / S_u`` for ``g >= 0`` and ``g / S_l`` for ``g < 0``: ``h`` is concave, so on
``g``'s interval ``[g_l, g_u]`` (from the box of ``x``) its secant bounds it from below::

    c . w >= t + b0 + m (c - t s 1) . x

(``m = 1 / S_u``, ``b0 = 0`` when ``g_l >= 0``). The bound holds for every ``t``; ``t`` is chosen
as the largest with ``g_l >= 0`` (by bisection: for ``x >= 0`` it is the least ratio over
the box, where the bound is exact), so the linear term carries the correlation of the entries
of ``x`` back through the network. Groups where ``S`` may be ``<= 0`` (or boxes are
unbounded) give ``-inf`` for every row that uses them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Activation, Relaxation, sum_rows

__all__ = ["Normalize"]

#: bisection steps for the ratio ``t`` (the bound holds for any ``t``; this only sets how near
#: to the least ratio over the box it lands: 2^-40 of the range of ``c / s``)
BISECTION_STEPS = 40


class Normalize(Activation):
    """``x / S`` for inputs ``x`` (per-example shape ``x_shape``) and ``S = scale * x.sum(dims,
    keepdim)`` (the graph's sum node, whose own box is tighter than the sum of ``x``'s)."""

    kind = "normalize"
    #: the relaxation holds the input boxes; a batch of one broadcasts against many rows
    elementwise = True

    def __init__(self, dims: tuple[int, ...], keepdim: bool, scale: float, x_shape: tuple[int, ...]):
        self.dims, self.keepdim, self.scale = tuple(sorted(dims)), bool(keepdim), float(scale)
        self.x_shape = tuple(x_shape)

    def _kept(self, S: Tensor, lead: int) -> Tensor:
        """``S`` with the summed dims kept (size 1), so that it broadcasts against ``x``."""
        if not self.keepdim:
            for d in self.dims:
                S = S.unsqueeze(d + lead)
        return S

    def _sum(self, t: Tensor, lead: int) -> Tensor:
        return t.sum(dim=tuple(d + lead for d in self.dims), keepdim=True)

    def forward(self, x, S):
        return x / self._kept(S, 1)

    def interval(self, bx, bS):
        (lx, ux), (lS, uS) = bx, bS
        lS, uS = self._kept(lS, 1), self._kept(uS, 1)
        pos = lS > 0
        inv_l = torch.where(pos, 1 / uS, -math.inf)  # 1 / S in [1 / S_u, 1 / S_l]
        inv_u = torch.where(pos, 1 / lS, math.inf)
        c = torch.stack(torch.broadcast_tensors(lx * inv_l, lx * inv_u, ux * inv_l, ux * inv_u))
        c = torch.where(torch.isnan(c), torch.zeros_like(c), c)  # 0 * inf: x = 0 gives 0
        lo, hi = torch.where(pos, c.amin(0), -math.inf), torch.where(pos, c.amax(0), math.inf)
        # x >= 0 on the whole group: w_j = x_j / (s (x_j + rest_j)) grows with x_j, falls with the rest
        rest_l, rest_u = self._sum(lx, 1) - lx, self._sum(ux, 1) - ux
        nonneg = (self._sum((lx < 0).to(lx.dtype), 1) == 0) & pos
        den_l, den_u = self.scale * (lx + rest_u), self.scale * (ux + rest_l)
        lo = torch.where(nonneg & (den_l > 0), torch.maximum(lo, lx / den_l.clamp_min(1e-300)), lo)
        hi = torch.where(nonneg & (den_u > 0), torch.minimum(hi, ux / den_u.clamp_min(1e-300)), hi)
        return lo, hi

    def term_magnitude(self, bx, bS) -> Tensor:
        """``[B, *x_shape]``: per unit of a row's coefficient, a bound on the terms the backward
        rule sums (coefficients ``m (c - t s)`` times ``x``, the intercepts ``t + b0``) and on
        ``|w|``: ``(|x_j| + sum |x|) / S_l + 1 / s``, doubled twice for the bisection and secant."""
        (lx, ux), (lS, _) = bx, bS
        M = torch.maximum(lx.abs(), ux.abs())
        lS = self._kept(lS, 1)
        T = (M + self._sum(M, 1)) / lS.clamp_min(1e-300) + 1 / self.scale
        return torch.where(lS > 0, 4 * T, math.inf)

    def relax_inputs(self, boxes, mode="crown"):
        (lx, ux), (lS, uS) = boxes
        empty = lx.new_zeros((lx.shape[0], 0))
        return Relaxation(empty, empty, empty, empty, extra=(lx, ux, self._kept(lS, 1), self._kept(uS, 1)))

    def relax(self, lo, hi, mode="crown"):
        raise TypeError("Normalize has two inputs: use relax_inputs")

    def _ratio(self, c: Tensor, lx: Tensor, ux: Tensor) -> Tensor:
        """``t [S, B, *kept]``: about the largest ``t`` with ``min_box (c - t s) . x >= 0``."""
        s, dims = self.scale, tuple(d + 2 for d in self.dims)
        q = c / s
        t_lo, t_hi = q.amin(dim=dims, keepdim=True), q.amax(dim=dims, keepdim=True)
        for _ in range(BISECTION_STEPS):
            t = (t_lo + t_hi) / 2
            a = c - t * s
            ok = self._sum(torch.minimum(a * lx, a * ux), 2) >= 0
            t_lo, t_hi = torch.where(ok, t, t_lo), torch.where(ok, t_hi, t)
        return t_lo

    def backward_relaxed(self, A, r, alpha=None):
        lx, ux, lS, uS = (v.unsqueeze(0) for v in r.extra)  # [1, B, ...]
        ok = (lS > 0) & torch.isfinite(uS) & (self._sum((~torch.isfinite(lx) | ~torch.isfinite(ux)).to(A.dtype), 2) == 0)
        lx, ux = torch.where(torch.isfinite(lx), lx, 0.0), torch.where(torch.isfinite(ux), ux, 0.0)
        Sl, Su = torch.where(ok, lS, 1.0), torch.where(ok, uS, 1.0)
        t = self._ratio(A, lx, ux)
        a = A - t * self.scale  # [S, B, *x]: g = a . x
        gl, gu = self._sum(torch.minimum(a * lx, a * ux), 2), self._sum(torch.maximum(a * lx, a * ux), 2)
        mixed = (gl < 0) & (gu > 0)
        span = torch.where(mixed, gu - gl, 1.0)
        m = torch.where(mixed, (gu / Su - gl / Sl) / span, torch.where(gl >= 0, 1 / Su, 1 / Sl))
        b0 = torch.where(mixed, gl / Sl - m * gl, 0.0)
        used = self._sum((A != 0).to(A.dtype), 2) > 0
        intercept = torch.where(ok, t + b0, torch.where(used, -math.inf, 0.0))
        A_x = torch.where(ok, m * a, 0.0)
        A_S = A.new_zeros(A.shape[:2] + (lS.shape[2:] if self.keepdim else self._dropped(lS.shape[2:])))
        return [A_x, A_S], sum_rows(intercept)

    def _dropped(self, kept: torch.Size) -> tuple[int, ...]:
        return tuple(k for i, k in enumerate(kept) if i not in self.dims)

    def __repr__(self) -> str:
        return f"Normalize(dims={list(self.dims)}, keepdim={self.keepdim}, scale={self.scale:g})"
