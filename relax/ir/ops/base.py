"""Base classes of the per-op bound rules.

Conventions (per example shapes ``*in``/``*out``, batch ``B``, spec rows ``S``):

* ``forward(*xs)``: concrete evaluation, ``xs[i]: [N, *in_i] -> [N, *out]``.
* ``interval(*bounds)``: interval rule (IBP), ``bounds[i] = (lo, hi)`` each ``[B, *in_i]``.
* Affine ops: ``backward(A)`` with ``A: [S, B, *out]`` returns ``(A_ins, bias)``:
  ``A_ins[i]: [S, B, *in_i]`` and ``bias: [S, B]`` (or ``None``) such that
  ``A . op(x) = sum_i A_ins[i] . x_i + bias`` exactly (the transpose of the linear part, i.e.
  a vector-Jacobian product batched over ``S * B``).
* Nonlinear ops (:class:`Activation`) give a relaxation from the bounds of their input and
  ``backward_relaxed(A, relax, alpha)`` returning ``(A_in, bias)`` with
  ``A . op(x) >= A_in . x + bias`` for every ``x`` in the input bounds (an op of several inputs
  returns a list ``A_in`` and its relaxation comes from ``relax_inputs``) (a *lower* bound: the
  backward pass only ever computes lower bounds; an upper bound is ``-lower(-A)``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
import torch.fx
from torch import Tensor

__all__ = ["Op", "Activation", "Relaxation", "BuildContext", "Expansion", "as_const", "sum_rows"]


def as_const(v: Any, dtype: torch.dtype) -> Tensor:
    """A constant as a tensor of ``dtype``; Python numbers convert directly (through float32,
    the default dtype, ``0.3`` would lose its float64 digits)."""
    return v.to(dtype) if isinstance(v, Tensor) else torch.as_tensor(v, dtype=dtype)


def sum_rows(t: Tensor) -> Tensor:
    """Sum over all dims after the first two: ``[S, B, ...] -> [S, B]``."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def finite(*ts: Tensor) -> bool:
    """Whether every entry of the tensors is finite."""
    return all(bool(torch.isfinite(t).all()) for t in ts)


def times(k: Tensor, x: Tensor) -> Tensor:
    """``k x`` with ``0 * inf = 0``: a slope-0 line is the interval bound, also on an unbounded box."""
    return torch.where(k == 0, torch.zeros_like(k), k * x)


def select_lines(A: Tensor, lw: Tensor, lb: Tensor, uw: Tensor, ub: Tensor, finite_intercepts: bool | None = None
                 ) -> tuple[Tensor, Tensor]:
    """CROWN's backward step through ``lw x + lb <= f(x) <= uw x + ub``: coefficients
    ``A [S, B, *shape]`` take the lower line where positive and the upper where negative;
    returns ``A_in [S, B, *shape]`` and the bias ``[S, B]``. Lines broadcast to ``A``.
    An infinite intercept counts only where its line is used (``0 * inf`` is 0 here);
    ``finite_intercepts``: whether ``lb`` and ``ub`` are finite, when the caller knows."""
    pos = A > 0
    if finite_intercepts is None:
        finite_intercepts = finite(lb, ub)
    if finite_intercepts:  # one select, one product each
        b = torch.where(pos, lb, ub)
    else:
        b = torch.where(pos, lb, torch.where(A < 0, ub, torch.zeros((), dtype=A.dtype, device=A.device)))
    return A * torch.where(pos, lw, uw), sum_rows(A * b)


class Op:
    """A bound rule for one op type."""

    nonlinear = False
    kind = "op"
    #: the interval rule only compares or moves values (no rounding: see :mod:`relax.bounds.roundoff`)
    exact_forward = False
    #: the backward rule only rearranges coefficients (no sums)
    moves_only = False
    #: elementwise (output ``j`` depends on input ``j`` only) with an ``interval`` rule that gives
    #: the exact image of a box (up to round-off): once its input's box is known, no linear
    #: bound through the op is tighter (any sound line, concretised over a box that contains the
    #: input's, stays below the function's minimum there), so the engine computes none
    exact_image = False
    #: ``backward(A)`` is linear in ``A`` (its coefficients reach the same inputs whatever the
    #: row's values: :mod:`relax.bounds.cone` maps one row through it)
    backward_linear = True

    def forward(self, *xs: Any, **kwargs: Any) -> Tensor:  # each op takes its own number of tensors
        raise NotImplementedError

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> "Op":
        """A copy with constants in ``dtype`` (default: same op, constants are folded in
        the graph's dtype already)."""
        return self

    def to_device(self, device: torch.device) -> "Op":
        """A shallow copy whose tensors (attributes, and those inside lists, tuples, dicts and
        nested ops) are on ``device``: the graph builder puts every op's constants on the
        model's device, wherever a rule created them."""
        new = copy.copy(self)
        for k, v in vars(self).items():
            setattr(new, k, _on_device(v, device))
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _on_device(v: Any, device: torch.device) -> Any:
    """``v`` with its tensors on ``device`` (containers and ops rebuilt, other values as they are)."""
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, Op):
        return v.to_device(device)
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(_on_device(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _on_device(x, device) for k, x in v.items()}
    return v


@dataclass
class Relaxation:
    """Elementwise linear bounds ``lw x + lb <= f(x) <= uw x + ub``, each ``[B, *shape]``
    (``lw`` may be replaced per spec row by an alpha ``[S, B, *shape]``)."""

    lw: Tensor
    lb: Tensor
    uw: Tensor
    ub: Tensor
    extra: Any = None

    @cached_property
    def finite_intercepts(self) -> bool:
        """Whether ``lb`` and ``ub`` are finite (checked once: every backward step reads it)."""
        return finite(self.lb, self.ub)

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Relaxation":
        """``fn`` applied to every tensor field (and to the tensors of a tuple ``extra``)."""
        def each(v: Any) -> Any:
            if isinstance(v, Tensor):
                return fn(v)
            if isinstance(v, tuple):
                return tuple(each(x) for x in v)
            return v

        return Relaxation(each(self.lw), each(self.lb), each(self.uw), each(self.ub), each(self.extra))

    def select(self, idx: Tensor, batch: int) -> "Relaxation":
        """The relaxation of the batch elements ``idx [D]`` (indices into the batch of ``batch``
        elements, repeats allowed): every tensor field whose first dim is ``batch`` indexed along
        it; others (a broadcast batch dim of 1) stay as they are."""
        return self.map(lambda v: v[idx] if v.dim() > 0 and v.shape[0] == batch else v)


class Activation(Op):
    """A nonlinear op relaxed by linear bounds (elementwise unless overridden)."""

    nonlinear = True
    #: the relaxation acts per coordinate (a batch of one broadcasts against many rows' batches)
    elementwise = True
    #: whether alpha-CROWN has a free lower-slope parameter for this op
    optimisable = False
    #: the trailing dim of :meth:`alpha_init` beyond the op's output shape (``(2,)``: a lower and
    #: an upper slope per entry)
    slope_pair: tuple[int, ...] = ()

    def relax(self, lo: Tensor, hi: Tensor, mode: str = "crown") -> Relaxation:
        raise NotImplementedError

    def relax_inputs(self, boxes: list[tuple[Tensor, Tensor]], mode: str = "crown") -> Relaxation:
        """The relaxation from the boxes of all inputs (one for an elementwise function; ops
        of several inputs, like a product, override this)."""
        (lo, hi), = boxes
        return self.relax(lo, hi, mode)

    def backward_relaxed(self, A: Tensor, r: Relaxation, alpha: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Lower bound of ``A . f(x)``: positive entries of ``A`` take the lower line, negative
        ones the upper line. ``alpha`` (``[S, B, *shape]``) replaces ``lw`` when given."""
        lw = r.lw if alpha is None else self.alpha_slope(alpha, r)
        return select_lines(A, lw, r.lb, r.uw, r.ub, r.finite_intercepts)

    def alpha_slope(self, alpha: Tensor, r: Relaxation) -> Tensor:
        raise NotImplementedError

    def alpha_init(self, r: Relaxation) -> Tensor:
        """Initial alpha ``[B, *shape]`` reproducing ``r.lw``."""
        raise NotImplementedError


@dataclass
class BuildContext:
    """What a rule builder sees: the fx node, the module, recorded example values (batch 2),
    which nodes are variable, the per-example shapes, the constant dtype."""

    node: torch.fx.Node
    gm: torch.fx.GraphModule
    values: dict[str, Any]
    variable: set[str]
    out_shape: tuple[int, ...]
    in_shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    desc: str
    #: where the model's parameters live (build-time probes run there)
    device: torch.device = torch.device("cpu")

    def is_var(self, a: Any) -> bool:
        return isinstance(a, torch.fx.Node) and a.name in self.variable

    def const(self, a: Any) -> Any:
        """Value of a constant argument (fx nodes resolved to their recorded values)."""
        if isinstance(a, torch.fx.Node):
            if a.name in self.variable:
                from ..graph import UnsupportedOperatorError

                raise UnsupportedOperatorError(f"{self.desc}: argument {a.name!r} must be a constant")
            return self.values[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.const(x) for x in a)
        return a

    def const_tensor(self, a: Any) -> Tensor:
        return as_const(self.const(a), self.dtype)

    def module(self) -> torch.nn.Module:
        return self.gm.get_submodule(str(self.node.target))

    def var_args(self) -> list[torch.fx.Node]:
        return [a for a in self.node.all_input_nodes if a.name in self.variable]

    def fail(self, why: str) -> Exception:
        from ..graph import UnsupportedOperatorError

        return UnsupportedOperatorError(f"unsupported operator: {self.desc}: {why}")


@dataclass
class Expansion:
    """What a builder returns for an op bounded as several bound nodes (softmax, division of two
    tensors): ``steps = [(suffix, op, input names, per-example shape)]`` in order; step ``i`` is
    the node ``f"{node}__{suffix}"``, except the last, which takes the node's own name. Inputs
    name the op's variable inputs or earlier steps (``"__" + suffix``)."""

    steps: list[tuple[str, Op, list[str], tuple[int, ...]]]


Builder = Callable[[BuildContext], "tuple[Op, list[str]]"]
