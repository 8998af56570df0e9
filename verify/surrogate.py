"""Gradients for attacks where the model's own gradient is zero or underflows.

``sign``, ``floor``, ``round`` and ``ceil`` have a zero derivative almost everywhere, so gradient
steps on a binarised network (VNN-COMP 2023's traffic-sign nets: convolutions followed by
``sign``) never move; and a softmax output that saturates (probabilities 1 and 1e-234) makes every
margin gradient underflow. Following the backward-pass differentiable approximation (BPDA) of
Athalye, Carlini & Wagner (ICML 2018, Sec. 4.1), an attack takes its steps on a *surrogate* of
the model (:func:`attack_surrogate`) whose forward values are the model's and whose backward pass
replaces those derivatives:

* ``sign(x)`` back-propagates as ``(tanh(x / s) + tanh(x / (s / NARROW))) / 2``, ``s`` the median
  ``|x|`` of each sample at that node -- the straight-through estimator used to train binarised
  networks (Bengio et al. 2013; Hubara et al. 2016), with widths that follow the layer's own
  scale. The narrow term puts most of the gradient on the units closest to flipping, the only
  ones a small input set can flip (on VNN-COMP 2023's traffic-sign nets at eps 1, a width of the
  median alone spreads it over units that cannot flip and PGD stalls); the wide term keeps a
  direction where no unit is close;
* ``sign`` of a value that is already a sign (``sign(sign(x) + 0.1)``, the binarised nets' way of
  mapping 0 to +1, possibly through other constant shifts or scalings) back-propagates as the
  identity: its input takes two or three values, all far from 0 at the layer's scale, so a
  kernel of that scale would give it no gradient;
* the Heaviside step (the importer's comparisons) back-propagates as half the sign's surrogate;
* ``floor``, ``round`` and ``ceil`` back-propagate as the identity;
* a softmax at the output is left out when every property row compares two outputs (``c (y_a -
  y_b)`` with ``c > 0`` and no offset): softmax keeps the order of the entries it normalises, so
  such a row has the same sign on the logits.

Only the attack's steps use the surrogate: every candidate is confirmed on the model itself
(:func:`verify.attack.confirm_counterexample`).
"""
from __future__ import annotations

import copy
import operator
import weakref

import torch
import torch.fx as fx
from torch import Tensor

from .graph_functions import step
from .placement import model_tensors
from .spec import LinearSpec

__all__ = ["attack_surrogate", "pairwise_rows"]

_SOFTMAX = (torch.softmax, torch.nn.functional.softmax)


#: how many times narrower the second kernel of the sign surrogate is than the layer's median
NARROW = 10.0


class _SignSurrogate(torch.autograd.Function):
    """``sign(x)`` forward; backward the derivative of ``(tanh(x / s) + tanh(NARROW x / s)) / 2``,
    ``s`` = per-sample median of ``|x|`` over all but the first dimension (the whole tensor for
    ``x`` of one dimension)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        a = x.detach().abs()
        if a.numel() == 0:
            s = a.new_ones(())
        elif a.dim() >= 2:
            s = a.flatten(1).median(dim=1).values.view(-1, *([1] * (a.dim() - 1)))
        else:
            s = a.median()
        ctx.save_for_backward(x, s.clamp_min(torch.finfo(a.dtype).tiny ** 0.5))
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        n = s / NARROW
        return g * 0.5 * ((1 - torch.tanh(x / s) ** 2) / s + (1 - torch.tanh(x / n) ** 2) / n)


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` forward (a rounding function), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fn) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def sign_surrogate(x: Tensor) -> Tensor:
    """``sign(x)`` with the gradient of :class:`_SignSurrogate`."""
    return _SignSurrogate.apply(x)


def resign_surrogate(x: Tensor) -> Tensor:
    """``sign(x)`` with the identity as its gradient: for ``x`` that is already a sign, shifted or
    scaled by constants."""
    return _StraightThrough.apply(x, torch.sign)


def heaviside_surrogate(x: Tensor, values: Tensor) -> Tensor:
    """``heaviside(x, values)`` with half the gradient of :func:`sign_surrogate` (``[x > 0] =
    (sign(x) + 1) / 2`` away from 0)."""
    s = sign_surrogate(x)
    return torch.heaviside(x.detach(), values.to(x.dtype)) + 0.5 * (s - s.detach())


def floor_surrogate(x: Tensor) -> Tensor:
    """``floor(x)`` with the identity as its gradient."""
    return _StraightThrough.apply(x, torch.floor)


def round_surrogate(x: Tensor) -> Tensor:
    """``round(x)`` with the identity as its gradient."""
    return _StraightThrough.apply(x, torch.round)


def ceil_surrogate(x: Tensor) -> Tensor:
    """``ceil(x)`` with the identity as its gradient."""
    return _StraightThrough.apply(x, torch.ceil)


#: the surrogate of each function whose derivative is zero almost everywhere (functions of one
#: tensor; the graph calls them by name, so each is a module-level function)
_SURROGATES = {torch.sign: sign_surrogate, torch.floor: floor_surrogate, torch.round: round_surrogate,
               torch.ceil: ceil_surrogate}


def logits_output(z: Tensor, dim: int) -> Tensor:
    """The softmax input ``z`` itself when the softmax normalises the class dimension of a
    ``[n, K]`` output (row order kept), else ``softmax(z, dim)``."""
    if z.dim() == 2 and dim in (1, -1):
        return z
    return torch.softmax(z, dim)


def pairwise_rows(spec: LinearSpec) -> bool:
    """Every row of ``spec`` (``C [B, N, K]``, ``d [B, N]``) is ``c (y_a - y_b)`` with ``c > 0``
    and ``d = 0``: its sign is the same on the logits as on a softmax of them."""
    C, d = spec.C, spec.d
    if C.numel() == 0 or bool((d != 0).any()):
        return False
    nonzero = C != 0
    if not bool((nonzero.sum(dim=-1) == 2).all()):
        return False
    return bool((C.sum(dim=-1) == 0).all())  # two nonzeros summing to zero: +c and -c


#: surrogates built so far, per model, whether the output softmax is dropped and the model's
#: device and dtype (the model's parameters are shared, not copied)
_BUILT: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, torch.nn.Module | None]]" = weakref.WeakKeyDictionary()


def attack_surrogate(model: torch.nn.Module, spec: LinearSpec) -> torch.nn.Module:
    """The module an attack takes its gradient steps on (see the module docstring): ``model``
    itself unless it is a ``torch.fx.GraphModule`` with ``sign`` / rounding nodes, or with a
    softmax output and a property of :func:`pairwise_rows`. The surrogate shares the model's
    parameters; its outputs are the model's (the logits where the softmax was left out)."""
    if not isinstance(model, fx.GraphModule):
        return model
    drop_softmax = _softmax_output(model.graph) is not None and pairwise_rows(spec)  # the rows' check only then
    first = next(iter(model_tensors(model)), None)
    # keyed by where the model is: ``model.to()`` replaces buffer objects, which a copy would miss
    key = (drop_softmax, None if first is None else (first.device, first.dtype))
    per_model = _BUILT.setdefault(model, {})
    if key not in per_model:  # None: nothing to change (no reference back to the model)
        per_model[key] = _build(model, drop_softmax)
    built = per_model[key]
    return model if built is None else built


def _softmax_output(graph: fx.Graph) -> fx.Node | None:
    """The softmax node whose value the graph returns, if it returns one."""
    out = next(reversed(graph.nodes))  # fx keeps the output node last
    last = out.args[0] if out.op == "output" and out.args else None
    if isinstance(last, fx.Node) and last.op == "call_function" and last.target in _SOFTMAX:
        return last
    return None


#: elementwise maps that keep a two-valued tensor two-valued when their other operand is a constant
_SHIFTS = (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div)


def _is_a_sign(arg) -> bool:
    """``arg`` is a graph value ``sign(...)`` (the original or a surrogate), possibly shifted or
    scaled by numbers: each step on the way has the sign as its one graph operand, every other
    operand a Python number."""
    while isinstance(arg, fx.Node) and arg.op == "call_function":
        if arg.target in (torch.sign, sign_surrogate, resign_surrogate):
            return True
        if arg.target not in _SHIFTS or arg.kwargs:
            return False
        nodes = [a for a in arg.args if isinstance(a, fx.Node)]
        if len(nodes) != 1 or not all(isinstance(a, (int, float, fx.Node)) for a in arg.args):
            return False
        arg = nodes[0]
    return False


def _build(model: fx.GraphModule, drop_softmax: bool) -> torch.nn.Module | None:
    graph = copy.deepcopy(model.graph)
    changed = False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.heaviside, step) and len(node.args) == 2 and not node.kwargs:
            node.target, changed = heaviside_surrogate, True
        elif node.target in _SURROGATES and len(node.args) == 1 and not node.kwargs:
            resign = node.target is torch.sign and _is_a_sign(node.args[0])
            node.target, changed = resign_surrogate if resign else _SURROGATES[node.target], True
    last = _softmax_output(graph) if drop_softmax else None
    if last is not None:
        dim = last.kwargs.get("dim", last.args[1] if len(last.args) > 1 else None)
        if isinstance(dim, int) and not last.kwargs.keys() - {"dim"} and len(last.args) <= 2:
            last.target, last.args, last.kwargs, changed = logits_output, (last.args[0], dim), {}, True
    if not changed:
        return None
    graph.lint()
    return fx.GraphModule(model, graph)
