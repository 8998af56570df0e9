"""Product of two variable tensors: elementwise ``x * y`` (with broadcasting) or ``x @ y``
(matrix product over the last two dims, batched over the others), as in attention
(``softmax(Q K^T) V``), normalisations (``x / sqrt(var)``) and power-flow equations.

Every output is a sum of products ``x_a y_b`` (one term for ``*``). Each term is bounded by the
McCormick planes of ``x y`` on the box ``[lx, ux] x [ly, uy]`` (McCormick 1976; the bilinear
relaxation CROWN uses for transformers, Shi et al. 2020, Sec. 3.3):

    x y >= ly x + lx y - lx ly        ((x - lx)(y - ly) >= 0)
    x y <= uy x + lx y - lx uy        ((x - lx)(y - uy) <= 0)

A lower bound of ``A . z`` takes the lower plane where ``A >= 0`` and the upper one where ``A < 0``;
since the planes are bilinear expressions in the bounds, the backward step is the same product
with a bound in place of one operand: coefficient of ``x`` ``= A+ (.) ly + A- (.) uy``, of ``y``
``= A (.) lx``, bias ``-A+ . (lx (.) ly) - A- . (lx (.) uy)``, where ``(.)`` is ``*`` or the
matrix product's adjoint. The interval rule is exact for ``*`` (the four corners) and the
midpoint-radius enclosure ``|mx| ry + rx |my| + rx ry`` around ``mx @ my`` for ``@``.

Each bound has a second McCormick plane, exact on the other two edges of the box:

    x y >= uy x + ux y - ux uy        ((x - ux)(y - uy) >= 0)
    x y <= ly x + ux y - ux ly        ((x - ux)(y - ly) <= 0)

and any convex combination of a bound's two planes is a bound. alpha-CROWN optimises the
weight ``alpha`` in ``[0, 1]`` of the first plane per output entry and row (for ``@`` one weight
serves the terms of an entry, so the step stays two matrix products per operand); ``alpha = 1``
is the fixed rule above. Where a bound is infinite the fixed rule is used.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .affine import unbroadcast
from .base import Activation, Relaxation, finite, sum_rows

__all__ = ["Product"]


class Product(Activation):
    """``x * y`` (``matmul=False``) or ``x @ y`` of two variable inputs with per-example shapes
    ``x_shape`` and ``y_shape`` (broadcast against each other)."""

    kind = "product"
    #: the relaxation holds the input boxes; a batch of one broadcasts against many rows
    elementwise = True

    def __init__(self, matmul: bool, x_shape: tuple[int, ...], y_shape: tuple[int, ...]):
        self.matmul, self.x_shape, self.y_shape = matmul, tuple(x_shape), tuple(y_shape)

    def _f(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.matmul(x, y) if self.matmul else x * y

    def forward(self, x, y):
        return self._f(x, y)

    def interval(self, bx, by):
        (lx, ux), (ly, uy) = bx, by
        if not self.matmul:  # the four corners; 0 * inf counts as 0 (x = 0 gives 0 whatever y)
            c = torch.stack(torch.broadcast_tensors(lx * ly, lx * uy, ux * ly, ux * uy))
            c = torch.where(torch.isnan(c), torch.zeros_like(c), c)
            lo, hi = c.amin(0), c.amax(0)
        else:
            mx, rx = (lx + ux) / 2, (ux - lx) / 2
            my, ry = (ly + uy) / 2, (uy - ly) / 2
            mid = torch.matmul(mx, my)
            rad = torch.matmul(mx.abs(), ry) + torch.matmul(rx, my.abs()) + torch.matmul(rx, ry)
            lo, hi = mid - rad, mid + rad
        inf = torch.full_like(lo, float("inf"))  # an undefined end (inf - inf) is unbounded
        return torch.where(torch.isnan(lo), -inf, lo), torch.where(torch.isnan(hi), inf, hi)

    def relax_inputs(self, boxes, mode="crown"):
        (lx, ux), (ly, uy) = boxes
        empty = lx.new_zeros((lx.shape[0], 0))
        return Relaxation(empty, empty, empty, empty, extra=(lx, ux, ly, uy))

    def relax(self, lo, hi, mode="crown"):
        raise TypeError("Product has two inputs: use relax_inputs")

    def _adjoint_x(self, A: Tensor, y: Tensor) -> Tensor:
        """``d(A . f(x, y)) / dx`` for fixed ``y``: ``A [S, B, *out]``, ``y [B, *y_shape]``."""
        if self.matmul:
            return unbroadcast(torch.matmul(A, y.transpose(-1, -2)), self.x_shape)
        return unbroadcast(A * y, self.x_shape)

    def _adjoint_y(self, A: Tensor, x: Tensor) -> Tensor:
        if self.matmul:
            return unbroadcast(torch.matmul(x.transpose(-1, -2), A), self.y_shape)
        return unbroadcast(A * x, self.y_shape)

    optimisable = True

    def alpha_init(self, r: Relaxation) -> Tensor:
        """The first planes' weight, 1 (the fixed rule), per output entry ``[B, *out]``."""
        lx, _, ly, _ = r.extra
        return torch.ones_like(self._f(lx, ly))

    def backward_relaxed(self, A, r, alpha=None):
        lx, ux, ly, uy = r.extra
        Ap, An = A.clamp(min=0), A.clamp(max=0)
        if alpha is not None and finite(lx, ux, ly, uy):
            return self._mixed_planes(Ap, An, alpha, lx, ux, ly, uy)
        A_x = self._adjoint_x(Ap, ly) + self._adjoint_x(An, uy)
        A_y = self._adjoint_y(A, lx)
        bias = -sum_rows(Ap * self._f(lx, ly)) - sum_rows(An * self._f(lx, uy))
        return [A_x, A_y], bias

    def _mixed_planes(self, Ap: Tensor, An: Tensor, alpha: Tensor, lx: Tensor, ux: Tensor, ly: Tensor, uy: Tensor
                      ) -> tuple[list[Tensor], Tensor]:
        """The backward step with ``alpha`` of the first plane and ``1 - alpha`` of the second:
        lower ``alpha (ly, lx, lx ly) + (1 - alpha) (uy, ux, ux uy)`` where ``A >= 0``, upper
        ``alpha (uy, lx, lx uy) + (1 - alpha) (ly, ux, ux ly)`` where ``A < 0`` (coefficients of
        ``x``, of ``y``, the product subtracted)."""
        a = alpha.clamp(0, 1)
        P1, P2, Q1, Q2 = Ap * a, Ap * (1 - a), An * a, An * (1 - a)
        A_x = self._adjoint_x(P1 + Q2, ly) + self._adjoint_x(P2 + Q1, uy)
        A_y = self._adjoint_y(P1 + Q1, lx) + self._adjoint_y(P2 + Q2, ux)
        bias = -(sum_rows(P1 * self._f(lx, ly)) + sum_rows(P2 * self._f(ux, uy))
                 + sum_rows(Q1 * self._f(lx, uy)) + sum_rows(Q2 * self._f(ux, ly)))
        return [A_x, A_y], bias

    def __repr__(self) -> str:
        return f"Product({'matmul' if self.matmul else 'mul'}, {list(self.x_shape)}, {list(self.y_shape)})"
