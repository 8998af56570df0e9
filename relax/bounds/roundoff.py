"""Rigorous bounds on the floating-point round-off of bound computations.

A bound computed in floating point differs from the exact bound by the accumulated rounding error
of its sums, and that error does not scale with the result: a bound of ``0.01`` can be the
difference of two sums of ``1e9``-sized terms. It scales with the *sum of the absolute values of
the terms* and the *length of the sums*. For a dot product of ``n`` terms computed in any order
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 3.1, Eq. (3.5))::

    |fl(a . x) - a . x| <= gamma_n |a| . |x|,      gamma_n = n u / (1 - n u),

with ``u`` the unit round-off (2^-24 in float32, 2^-53 in float64).

The engines use two consequences, node by node:

* **Forward (interval) passes.** A node's box computed from its inputs' boxes errs by at most
  ``gamma_n T`` with the node's *term magnitude* ``T`` (:func:`term_magnitude`: for an affine map
  ``|W| max(|lo|, |hi|) + |b|``, i.e. the interval rule applied to the symmetric box
  ``[-M, M]``); :func:`forward_error` gives that widening (zero for ops that only compare or move
  values: ReLU, max-pooling, reshapes).
* **Backward (CROWN) passes.** At a node with coefficients ``A`` the pass forms products ``A W``
  and bias sums ``A . b`` (or relaxation intercepts); their error, carried to the bound, is at
  most ``gamma_n sum(|A| T)`` (:func:`backward_weight` gives ``gamma_n T`` per neuron). The final
  concretisation over the input adds ``gamma_n sum(|A| max(|lo|, |hi|))``.

Summed over the nodes and multiplied by :data:`SAFETY` (relaxations built from rounded bounds and
slopes, and the rounding of the error sum itself) this is subtracted from every lower bound, so
that the engines return bounds that hold for the exact network on the exact input set. The
weights are the network's own (folded constants are treated as part of the network; folds use the
graph's dtype and their single roundings are within the same allowance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from relax.bounds.dot import rowwise_dot

__all__ = ["SAFETY", "unit_roundoff", "gamma", "sum_length", "term_magnitude", "forward_error", "backward_weight", "step_error",
           "concretize_error", "max_abs", "round_outward"]

#: factor on the summed per-node error terms (see the module docstring)
SAFETY = 3.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """``gamma_n = n u / (1 - n u)`` (infinite once ``n u >= 1/2``: no useful bound)."""
    nu = (n + 2) * unit_roundoff(dtype)
    return math.inf if nu >= 0.5 else nu / (1 - nu)


def round_outward(t: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """``t`` (any shape) in ``dtype``, rounded down (``down``: a lower bound) or up (an upper
    bound) where the cast moved it the wrong way, so that a bound stays a bound."""
    out = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return out
    toward = torch.tensor(-math.inf if down else math.inf, dtype=dtype, device=t.device)
    wrong = (out.to(t.dtype) > t) if down else (out.to(t.dtype) < t)
    return torch.where(wrong, torch.nextafter(out, toward), out)


def max_abs(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(lo.abs(), hi.abs())


def sum_length(in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], op=None) -> int:
    """An upper bound on the number of terms of any sum a node's rules form: its fan-in and
    fan-out are at most the size of its input and output, a bias sum runs over its output; an
    op that knows its sums better says so (``sum_terms``: a sum of tensors adds one term per input)."""
    own = getattr(op, "sum_terms", None)
    if own is not None:
        return max(int(own(in_shapes, out_shape)), 1)
    return max([math.prod(s) for s in in_shapes] + [math.prod(out_shape), 1])


def term_magnitude(op, in_boxes: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``T [B, *out]``: bound on ``|value|`` and on the sum of absolute values of the terms the
    node's rules add up, for inputs in ``in_boxes``. Affine ops: the interval rule on the
    symmetric boxes ``[-M, M]``, ``M = max(|lo|, |hi|)`` (gives ``|W| M + |b|``). Nonlinear
    ops also carry relaxation intercepts of the size of their input: ``T`` gains ``M`` (or,
    when the shape changes, ``T`` is doubled)."""
    own = getattr(op, "term_magnitude", None)
    if own is not None:  # an elementwise function (its box's ends) or an op of several inputs (their boxes)
        with torch.no_grad():
            return own(*in_boxes[0]) if len(in_boxes) == 1 else own(*in_boxes)
    mags = [max_abs(l, h) for l, h in in_boxes]
    with torch.no_grad():
        l, h = op.interval(*[(-m, m) for m in mags])
    T = max_abs(l, h)
    if op.nonlinear and len(in_boxes) > 1:  # a product: planes of both operands and their intercepts,
        T = 6 * T  # two planes per bound when alpha-CROWN mixes them
    elif op.nonlinear:
        T = T + (mags[0] if mags[0].shape == T.shape else T)
    return T


def forward_error(op, in_boxes: list[tuple[Tensor, Tensor]], out_box: tuple[Tensor, Tensor], n: int) -> Tensor | None:
    """How far an interval rule's output box may lie inside the exact one, ``[B, *out]``, or
    None when the rule is exact in floating point (comparisons, moves)."""
    if getattr(op, "exact_forward", False) or getattr(op, "interval_rounded", False):
        return None
    dtype = out_box[0].dtype
    if op.nonlinear and len(in_boxes) == 1:  # a library function of one argument: a few ulps of its value
        return 4 * unit_roundoff(dtype) * max_abs(*out_box)
    return gamma(n, dtype) * term_magnitude(op, in_boxes)


def backward_weight(op, in_boxes: list[tuple[Tensor, Tensor]], n: int, dtype: torch.dtype) -> Tensor | None:
    """``gamma_n T [B, *out]``: the round-off a backward step through ``op`` with coefficients
    ``A`` adds to a bound is at most ``sum(|A| * weight)``; None for pure rearrangements."""
    if getattr(op, "moves_only", False):
        return None
    w = gamma(n, dtype) * term_magnitude(op, in_boxes)
    # an infinite weight (a pole in the box) comes with infinite intercepts, which make every
    # bound with a nonzero coefficient there -inf already; a finite stand-in avoids 0 * inf
    return torch.nan_to_num(w, nan=torch.finfo(w.dtype).max, posinf=torch.finfo(w.dtype).max)


def step_error(A: Tensor, w: Tensor) -> Tensor:
    """``sum(|A| * w)`` over all dims after the first two: the round-off bound ``[S, B]`` of a
    backward step with coefficients ``A [S, B, *shape]`` and weight ``w`` (:func:`backward_weight`,
    ``[B, *shape]`` or ``[1, *shape]``; other broadcastable shapes are summed elementwise)."""
    S, B = A.shape[:2]
    if w.dim() == A.dim() - 1 and w.shape[1:] == A.shape[2:] and w.shape[0] in (1, B):
        err = rowwise_dot(A.abs().reshape(S, B, -1), w.reshape(w.shape[0], -1))
    else:
        err = (A.abs() * w).reshape(S, B, -1).sum(-1)
    if bool(err.isnan().any()):  # an infinite weight (an unbounded box) where a row has coefficient 0: adds 0
        err = torch.where(A != 0, A.abs() * w, torch.zeros((), dtype=A.dtype, device=A.device)).reshape(S, B, -1).sum(-1)
    return err


def concretize_error(absA: Tensor, lo: Tensor, hi: Tensor, eps: Tensor | None = None) -> Tensor:
    """Round-off of ``min_x A x`` over the box ``[lo, hi]`` (or an l_p ball of radius ``eps``
    inside it): ``absA [S, B, n]``, ``lo/hi [B, n]`` -> ``[S, B]``."""
    M = max_abs(lo, hi)
    if eps is not None:
        M = M + eps.view(-1, 1).to(M.dtype)
    return gamma(absA.shape[-1], absA.dtype) * rowwise_dot(absA, M)
