"""The output of a log-softmax, seen two ways at once.

``log_softmax(x)_i = x_i - LSE(x)`` with ``LSE(x) = log sum_j exp(x_j)`` over the softmax dim, and
the graph computes each entry as ``y_i = -log(1 + sum_{j != i} exp(x_j - x_i))`` (relaxed around
its own entry: the tightest single-entry bounds). :class:`LogSoftmaxRows` takes both the scores
``x`` and those entries ``y`` and returns ``y``; its backward step uses the identity
``y_i - y_k = x_i - x_k``. A row ``a`` on ``y`` is split as ``a = p + q`` with
``q = (sum_i a_i) e_k`` (``k`` the entry of ``a`` largest in magnitude) and ``sum_i p_i = 0``, so

    a . y = p . x + q . y        (exact: ``p . y = p . x - (sum_i p_i) LSE(x)``)

A difference of two outputs (``sum_i a_i = 0``: every robustness row) is thus bounded through the
scores alone, exactly as on the logits, and a single entry (``a = e_i``) through its own relaxed
form. The interval rule returns the entries' box.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Op

__all__ = ["LogSoftmaxRows"]


class LogSoftmaxRows(Op):
    """``(x [.., n], y [.., n]) -> y``, where ``y = log_softmax(x)`` over the last dim (module
    docstring); per-example shape ``shape`` (softmax dim last)."""

    kind = "log-softmax rows"
    #: the interval rule widens its own ends by their round-off
    interval_rounded = True
    #: as the output, rows are bounded on its inputs' boxes too (relax.bounds.crown._rows_through_inputs)
    rows_through_inputs = True
    #: a row is split by its own sum (the part ``(sum a) e_k`` lands on the largest entry)
    backward_linear = False

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The entries' box intersected with ``x_i - LSE(x)`` for ``LSE(x)`` in
        ``[max_j x_j, max_j x_j + log n]`` and with ``y <= 0``: finite wherever the scores' box
        is, also where an exp of the entries' forms overflowed. Each end is moved outward by
        ``4 u`` of its terms (two roundings)."""
        (lx, hx), (ly, hy) = bounds
        u = torch.finfo(lx.dtype).eps / 2
        top_hi, top_lo = hx.amax(-1, keepdim=True), lx.amax(-1, keepdim=True)
        log_n = math.log(self.shape[-1])
        lo = lx - top_hi - log_n
        lo = lo - 4 * u * (lx.abs() + top_hi.abs() + log_n)
        hi = (hx - top_lo) + 4 * u * (hx.abs() + top_lo.abs())
        lo, hi = torch.nan_to_num(lo, nan=-math.inf), torch.nan_to_num(hi, nan=math.inf)
        return torch.maximum(ly, lo), torch.minimum(torch.minimum(hy, hi), torch.zeros_like(hy))

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        """``A [S, B, *shape]`` -> ``[p, q]`` on ``(x, y)`` (module docstring), no bias; ``q`` is
        None when every row's coefficients sum to 0 (the entries' relaxations are then not visited:
        their boxes may be unbounded where an exp overflowed)."""
        total = A.sum(-1, keepdim=True)  # [S, B, .., 1]
        if not bool(total.any()):
            return [A, None], None
        k = A.abs().argmax(-1, keepdim=True)
        q = torch.zeros_like(A).scatter_(-1, k, total)
        return [A - q, q], None

    def term_magnitude(self, bx: tuple[Tensor, Tensor], by: tuple[Tensor, Tensor]) -> Tensor:
        """``[B, *shape]``: per unit of ``sum |a|``, a bound on the error of the split. With the
        rounded sum ``t = sum a + e`` (``|e| <= gamma_n sum |a|``) and the rounded ``a_k - t``
        (error ``d``, ``|d| <= 2 u sum |a|``), ``p . x + q . y`` differs from ``a . y`` by
        ``d x_k - e LSE(x)``, and ``|LSE(x)| <= max |x| + log n``: so ``2 max |x| + log n`` over the
        group (the entries' box, infinite where an exp overflowed, does not enter)."""
        mx = torch.maximum(bx[0].abs(), bx[1].abs()).amax(-1, keepdim=True)
        return (2 * mx + math.log(self.shape[-1])).expand_as(by[0])

    def __repr__(self) -> str:
        return f"LogSoftmaxRows(shape={list(self.shape)})"
