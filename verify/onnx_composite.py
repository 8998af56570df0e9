"""ONNX operators converted as exact compositions of operators the bound engine already relaxes.

Each converter below writes one ONNX operator with the functions of the canonical graph (ReLU,
clamp, exp, log, abs, reciprocal, sqrt, erf, products, sums, selections), so that it needs no
bound rule of its own: the composition is equal to the operator on every input (identities in
each docstring), and its bounds are those of the parts. Registered in
:data:`verify.onnx_import._CONVERTERS` (:data:`CONVERTERS`).

* activations: PRelu ``s x + (1 - s) relu(x)`` (one ReLU, any slope), Elu / Selu / Celu,
  Softplus ``relu(x) + log(1 + exp(-|x|))`` (no overflow), Mish, Softsign, HardSigmoid, HardSwish,
  ThresholdedRelu, Gelu (opset 20, exact and tanh forms), Erf, Ceil, Sinh / Cosh (two exps),
  Shrink (two ReLUs and two steps), Swish (opset 24);
* normalisations: LayerNormalization (opset 17), InstanceNormalization, GroupNormalization
  (opsets 18 and 21);
* reductions and n-ary ops: ReduceMax / ReduceMin (pairwise maxima), ReduceL1 / ReduceL2 /
  ReduceSumSquare, Sum / Mean of several inputs;
* linear maps: Resize with ``mode="linear"`` (bilinear: two constant matrices);
* moves: DepthToSpace / SpaceToDepth (reshape, transpose, reshape);
* indexing: Tile, Where (a constant condition: a mask; a comparison's output: ``y + c (x - y)``).
"""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .graph_functions import step as heaviside_step

if TYPE_CHECKING:  # the converter class lives in verify.onnx_import, which imports this module
    import onnx

    from .onnx_import import _Converter

__all__ = ["CONVERTERS", "FOLDS", "REDUCE_MAX_ENTRIES", "node_label", "reduce_axes", "resize_linear"]

#: the most entries ReduceMax / ReduceMin compares (one maximum node per entry)
REDUCE_MAX_ENTRIES = 256


def node_label(node) -> str:
    """How errors name an ONNX node: its name, else its first output, else its operator."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _relu(cv: "_Converter", x: fx.Node, h: str) -> fx.Node:
    return cv.fn(torch.relu, x, hint=h)


def _mul(cv: "_Converter", x: fx.Node, c: Any, h: str) -> fx.Node:
    return cv.fn(operator.mul, x, c, hint=h)


def _add(cv: "_Converter", x: Any, y: Any, h: str) -> fx.Node:
    return cv.fn(operator.add, x, y, hint=h)


def _neg_part(cv: "_Converter", x: fx.Node, h: str) -> fx.Node:
    """``min(x, 0) = -relu(-x)``."""
    return _mul(cv, _relu(cv, _mul(cv, x, -1.0, h), h), -1.0, h)


# ------------------------------------------------------------------------------ activations


def _prelu(cv: "_Converter", node, a) -> fx.Node:
    """``PRelu(x) = s x + (1 - s) relu(x)`` for any slope ``s`` (one ReLU per entry: for ``x >= 0``
    ``s x + (1 - s) x = x``, below 0 ``s x``)."""
    x, h = cv.dyn(node), node_label(node)
    slope = cv.const(node, 1)  # broadcast to x as ONNX does (trailing dims; per channel: [C, 1, 1])
    r = len(cv.shape(x))
    s = cv.operand(node, slope, r)
    one_minus = 1.0 - s if isinstance(s, float) else cv.operand(node, 1.0 - slope, r)
    return _add(cv, _mul(cv, x, s, h), _mul(cv, _relu(cv, x, h), one_minus, h), h)


def _elu_like(alpha_default: float, gamma_default: float | None, celu: bool = False) -> Callable:
    """Elu ``relu(x) + alpha (exp(min(x, 0)) - 1)``; Selu ``gamma`` times that; Celu with
    ``exp(min(x, 0) / alpha)``."""
    def convert(cv: "_Converter", node, a) -> fx.Node:
        x, h = cv.dyn(node), node_label(node)
        alpha = float(a.get("alpha", alpha_default))
        neg = _neg_part(cv, x, h)
        if celu:
            neg = _mul(cv, neg, 1.0 / alpha, h)
        e = _add(cv, cv.fn(torch.exp, neg, hint=h), -1.0, h)
        y = _add(cv, _relu(cv, x, h), _mul(cv, e, alpha, h), h)
        if gamma_default is not None:
            y = _mul(cv, y, float(a.get("gamma", gamma_default)), h)
        return y

    return convert


def _softplus_of(cv: "_Converter", x: fx.Node, h: str) -> fx.Node:
    e = cv.fn(torch.exp, _mul(cv, cv.fn(torch.abs, x, hint=h), -1.0, h), hint=h)
    return _add(cv, _relu(cv, x, h), cv.fn(torch.log, _add(cv, e, 1.0, h), hint=h), h)


def _softplus(cv: "_Converter", node, a) -> fx.Node:
    """``log(1 + exp(x)) = relu(x) + log(1 + exp(-|x|))`` (exact; exp never overflows)."""
    return _softplus_of(cv, cv.dyn(node), node_label(node))


def _mish(cv: "_Converter", node, a) -> fx.Node:
    """``x tanh(softplus(x))`` (a product of two activations)."""
    x, h = cv.dyn(node), node_label(node)
    return cv.fn(operator.mul, x, cv.fn(torch.tanh, _softplus_of(cv, x, h), hint=h), hint=h)


def _softsign(cv: "_Converter", node, a) -> fx.Node:
    """``x / (1 + |x|)``: ``x`` times a reciprocal (a product of two activations)."""
    x, h = cv.dyn(node), node_label(node)
    r = cv.fn(torch.reciprocal, _add(cv, cv.fn(torch.abs, x, hint=h), 1.0, h), hint=h)
    return cv.fn(operator.mul, x, r, hint=h)


def _hard_sigmoid_of(cv: "_Converter", x: fx.Node, alpha: float, beta: float, h: str) -> fx.Node:
    return cv.fn(torch.clamp, _add(cv, _mul(cv, x, alpha, h), beta, h), 0.0, 1.0, hint=h)


def _hard_sigmoid(cv: "_Converter", node, a) -> fx.Node:
    """``clamp(alpha x + beta, 0, 1)``."""
    return _hard_sigmoid_of(cv, cv.dyn(node), float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)), node_label(node))


def _hard_swish(cv: "_Converter", node, a) -> fx.Node:
    """``x HardSigmoid(x)`` with ``alpha = 1/6, beta = 1/2`` (a product of two activations)."""
    x, h = cv.dyn(node), node_label(node)
    return cv.fn(operator.mul, x, _hard_sigmoid_of(cv, x, 1.0 / 6.0, 0.5, h), hint=h)


def _thresholded_relu(cv: "_Converter", node, a) -> fx.Node:
    """``x [x > alpha]``: ``x`` times the step ``[x - alpha > 0]`` (:func:`verify.graph_functions.step`)."""
    x, h = cv.dyn(node), node_label(node)
    step = cv.fn(heaviside_step, _add(cv, x, -float(a.get("alpha", 1.0)), h), cv.const_node(np.array(0.0), h), hint=h)
    return cv.fn(operator.mul, x, step, hint=h)


def _erf(cv: "_Converter", node, a) -> fx.Node:
    return cv.fn(torch.erf, cv.dyn(node), hint=node_label(node))


def _gelu(cv: "_Converter", node, a) -> fx.Node:
    """Gelu (opset 20): ``x (1 + erf(x / sqrt 2)) / 2``, or with ``approximate="tanh"``
    ``x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2`` (products of activations)."""
    x, h = cv.dyn(node), node_label(node)
    mode = a.get("approximate", "none")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "tanh":
        cube = cv.fn(torch.pow, x, 3.0, hint=h)
        inner = _mul(cv, _add(cv, x, _mul(cv, cube, 0.044715, h), h), math.sqrt(2.0 / math.pi), h)
        s = cv.fn(torch.tanh, inner, hint=h)
    elif mode == "none":
        s = cv.fn(torch.erf, _mul(cv, x, 1.0 / math.sqrt(2.0), h), hint=h)
    else:
        raise cv.unsupported(node, f"approximate={mode!r}")
    half = _add(cv, _mul(cv, s, 0.5, h), 0.5, h)
    return cv.fn(operator.mul, x, half, hint=h)


def _hyperbolic(cv: "_Converter", node, a) -> fx.Node:
    """Sinh / Cosh: ``(exp(x) -/+ exp(-x)) / 2``."""
    x, h = cv.dyn(node), node_label(node)
    up, down = cv.fn(torch.exp, x, hint=h), cv.fn(torch.exp, _mul(cv, x, -1.0, h), hint=h)
    return _mul(cv, cv.fn(operator.sub if node.op_type == "Sinh" else operator.add, up, down, hint=h), 0.5, h)


def _shrink(cv: "_Converter", node, a) -> fx.Node:
    """Shrink: ``x - bias`` above ``lambd``, ``x + bias`` below ``-lambd``, else 0; that is
    ``relu(x - lambd) - relu(-x - lambd) + (lambd - bias) ([x - lambd > 0] - [-x - lambd > 0])``
    (the steps only where ``bias != lambd``)."""
    x, h = cv.dyn(node), node_label(node)
    lambd, bias = float(a.get("lambd", 0.5)), float(a.get("bias", 0.0))
    if lambd < 0:  # the two branches overlap (onnxruntime takes x + bias first): not this composition
        raise cv.unsupported(node, f"lambd={lambd:g} < 0")
    above, below = _add(cv, x, -lambd, h), _add(cv, _mul(cv, x, -1.0, h), -lambd, h)
    y = cv.fn(operator.sub, _relu(cv, above, h), _relu(cv, below, h), hint=h)
    if lambd != bias:
        zero = cv.const_node(np.array(0.0), h)
        jump = cv.fn(operator.sub, cv.fn(heaviside_step, above, zero, hint=h), cv.fn(heaviside_step, below, zero, hint=h), hint=h)
        y = _add(cv, y, _mul(cv, jump, lambd - bias, h), h)
    return y


def _swish(cv: "_Converter", node, a) -> fx.Node:
    """Swish (opset 24): ``x sigmoid(alpha x)`` (a product of two activations)."""
    x, h = cv.dyn(node), node_label(node)
    alpha = float(a.get("alpha", 1.0))
    return cv.fn(operator.mul, x, cv.fn(torch.sigmoid, _mul(cv, x, alpha, h) if alpha != 1.0 else x, hint=h), hint=h)


def _ceil(cv: "_Converter", node, a) -> fx.Node:
    """``ceil(x) = -floor(-x)``."""
    x, h = cv.dyn(node), node_label(node)
    y = _mul(cv, cv.fn(torch.floor, _mul(cv, x, -1.0, h), hint=h), -1.0, h)
    cv.integral.add(y)
    return y


# ------------------------------------------------------------------------------ normalisations


def _normalise(cv: "_Converter", x: fx.Node, dims: tuple[int, ...], eps: float, h: str) -> fx.Node:
    """``(x - mean) / sqrt(var + eps)`` over torch dims ``dims`` (biased variance, as ONNX)."""
    d = cv.fn(operator.sub, x, cv.fn(torch.mean, x, dims, True, hint=h), hint=h)
    var = cv.fn(torch.mean, cv.fn(operator.mul, d, d, hint=h), dims, True, hint=h)
    return cv.fn(operator.truediv, d, cv.fn(torch.sqrt, _add(cv, var, eps, h), hint=h), hint=h)


def _affine_tail(cv: "_Converter", node, y: fx.Node, scale: np.ndarray | None, bias: np.ndarray | None, rank: int) -> fx.Node:
    h = node_label(node)
    if scale is not None and not np.all(scale == 1):
        y = _mul(cv, y, cv.operand(node, scale, rank), h)
    if bias is not None and not np.all(bias == 0):
        y = _add(cv, y, cv.operand(node, bias, rank), h)
    return y


def _layer_norm(cv: "_Converter", node, a) -> fx.Node:
    """LayerNormalization (opset 17) over the axes from ``axis`` on, then ``* scale + B``."""
    x = cv.dyn(node)
    r = len(cv.shape(x))
    axis = int(a.get("axis", -1)) % r
    dims = tuple(cv.axis(node, k, r) for k in range(axis, r))
    if int(a.get("stash_type", 1)) != 1:
        raise cv.unsupported(node, f"stash_type={a.get('stash_type')}")
    y = _normalise(cv, x, dims, float(a.get("epsilon", 1e-5)), node_label(node))
    return _affine_tail(cv, node, y, cv.const(node, 1), cv.const(node, 2, optional=True), r)


def _instance_norm(cv: "_Converter", node, a) -> fx.Node:
    """InstanceNormalization: each channel of each example over its spatial dims, then the
    per-channel ``scale`` and ``B``."""
    x = cv.dyn(node)
    cv.require_batched(node, x, (3, 4, 5))
    r = len(cv.shape(x))
    dims = tuple(cv.axis(node, k, r) for k in range(2, r))  # the spatial dims
    y = _normalise(cv, x, dims, float(a.get("epsilon", 1e-5)), node_label(node))
    per_channel = (1, -1) + (1,) * (r - 2)  # [1, C, 1, ...]
    scale, bias = cv.const(node, 1), cv.const(node, 2)
    return _affine_tail(cv, node, y, scale.reshape(per_channel), bias.reshape(per_channel), r)


def _group_norm(cv: "_Converter", node, a) -> fx.Node:
    """GroupNormalization: the channels in ``num_groups`` groups, each group of each example
    normalised over its channels and spatial dims, then ``scale`` and ``bias`` per channel
    (opset 21) or per group (opset 18, each group's value on its channels)."""
    x = cv.dyn(node)
    cv.require_batched(node, x, (3, 4, 5))
    shape = cv.shape(x)
    c, g = shape[1], int(a["num_groups"])
    h = node_label(node)
    if g < 1 or c % g:
        raise cv.unsupported(node, f"{g} groups of {c} channels")
    if int(a.get("stash_type", 1)) != 1:
        raise cv.unsupported(node, f"stash_type={a.get('stash_type')}")
    grouped = cv.reshape(node, x, (1, g, (c // g) * math.prod(shape[2:])))
    y = cv.reshape(node, _normalise(cv, grouped, (2,), float(a.get("epsilon", 1e-5)), h), (1, *shape[1:]))
    scale, bias = (np.ravel(cv.const(node, i)) for i in (1, 2))
    if scale.size == g and g != c:  # per group (opset 18)
        scale, bias = np.repeat(scale, c // g), np.repeat(bias, c // g)
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    return _affine_tail(cv, node, y, scale.reshape(per_channel), bias.reshape(per_channel), len(shape))


# ------------------------------------------------------------------------------ reductions


def reduce_axes(cv: "_Converter", node: "onnx.NodeProto", a: dict, x: fx.Node) -> tuple[int, ...] | None:
    """Torch dims of a Reduce* node (attribute before opset 18, input after); None: none (a no-op)."""
    r = len(cv.shape(x))
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = [int(v) for v in np.ravel(cv.const(node, 1))]
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(r))
    return tuple(sorted(cv.axis(node, int(ax), r) for ax in axes))


def _reduce_extreme(largest: bool) -> Callable:
    """ReduceMax / ReduceMin: the entries along each axis folded with ``maximum`` / ``minimum``
    (each ``a + relu(b - a)``), at most :data:`REDUCE_MAX_ENTRIES` entries per output."""
    f = torch.maximum if largest else torch.minimum

    def convert(cv: "_Converter", node, a) -> fx.Node:
        x, h = cv.dyn(node), node_label(node)
        dims = reduce_axes(cv, node, a, x)
        if dims is None:
            return x
        shape = cv.example[x].shape
        n = math.prod(int(shape[d]) for d in dims)
        if n > REDUCE_MAX_ENTRIES:
            raise cv.unsupported(node, f"{n} entries per output (at most {REDUCE_MAX_ENTRIES})")
        for d in dims:
            parts = [cv.fn(torch.narrow, x, d, k, 1, hint=h) for k in range(int(shape[d]))]
            while len(parts) > 1:  # a balanced tree of maxima
                parts = [cv.fn(f, parts[k], parts[k + 1], hint=h) if k + 1 < len(parts) else parts[k]
                         for k in range(0, len(parts), 2)]
            x = parts[0]
        if not a.get("keepdims", 1):
            for d in reversed(dims):
                x = cv.fn(torch.squeeze, x, d, hint=h)
        return x

    return convert


def _reduce_of(kind: str) -> Callable:
    """ReduceSumSquare ``sum x^2``, ReduceL2 ``sqrt(sum x^2)``, ReduceL1 ``sum |x|``."""
    def convert(cv: "_Converter", node, a) -> fx.Node:
        x, h = cv.dyn(node), node_label(node)
        dims = reduce_axes(cv, node, a, x)
        keep = bool(a.get("keepdims", 1))
        t = cv.fn(torch.abs, x, hint=h) if kind == "l1" else cv.fn(operator.mul, x, x, hint=h)
        if dims is None:
            return cv.fn(torch.sqrt, t, hint=h) if kind == "l2" else t
        s = cv.fn(torch.sum, t, dims, keep, hint=h)
        return cv.fn(torch.sqrt, s, hint=h) if kind == "l2" else s

    return convert


def _sum_mean(mean: bool) -> Callable:
    """Sum / Mean of several inputs (numpy broadcasting; a constant operand allowed)."""
    def convert(cv: "_Converter", node, a) -> fx.Node:
        h = node_label(node)
        vals = [cv.arg(node, i) for i in range(len(node.input))]
        dyn = [v for v in vals if isinstance(v, fx.Node)]
        const = [v for v in vals if isinstance(v, np.ndarray)]
        y = dyn[0]
        for v in dyn[1:]:
            y = cv.fn(operator.add, *cv.align(y, v, h), hint=h)
        if const:
            total = np.sum(np.broadcast_arrays(*const), axis=0) if len(const) > 1 else const[0]
            y = _add(cv, y, cv.operand(node, np.asarray(total), len(cv.shape(y))), h)
        return _mul(cv, y, 1.0 / len(vals), h) if mean else y

    return convert


# ------------------------------------------------------------------------------ indexing


def _depth_to_space(cv: "_Converter", node, a) -> fx.Node:
    """DepthToSpace (pixel shuffle; modes DCR and CRD) and SpaceToDepth: a reshape, a transpose
    and a reshape of an NCHW tensor (moves only)."""
    x = cv.dyn(node)
    cv.require_batched(node, x, (4,))
    b = int(a["blocksize"])
    _, c, hh, ww = cv.shape(x)
    h = node_label(node)
    if node.op_type == "SpaceToDepth":
        if hh % b or ww % b:
            raise cv.unsupported(node, f"blocksize {b} does not divide {hh} x {ww}")
        mid, perm, out = (1, c, hh // b, b, ww // b, b), (0, 3, 5, 1, 2, 4), (1, c * b * b, hh // b, ww // b)
    else:
        if c % (b * b):
            raise cv.unsupported(node, f"blocksize {b}: {c} channels are not a multiple of {b * b}")
        if a.get("mode", "DCR") == "CRD":
            mid, perm = (1, c // (b * b), b, b, hh, ww), (0, 1, 4, 2, 5, 3)
        else:
            mid, perm = (1, b, b, c // (b * b), hh, ww), (0, 3, 4, 1, 5, 2)
        out = (1, c // (b * b), hh * b, ww * b)
    y = cv.fn(torch.permute, cv.reshape(node, x, mid), perm, hint=h)
    return cv.reshape(node, y, out)


def _tile(cv: "_Converter", node, a) -> fx.Node:
    """Tile by constant repeats (the batch axis repeated once)."""
    x = cv.dyn(node)
    reps = [int(v) for v in np.ravel(cv.const(node, 1))]
    r = len(cv.shape(x))
    if len(reps) != r or min(reps) < 1:
        raise cv.unsupported(node, f"repeats {reps} for rank {r}")
    if cv.batched and reps[0] != 1:
        raise cv.unsupported(node, "it repeats the batch dimension")
    full = ([1] * cv.offset + reps[cv.offset:]) if cv.batched else ([1] * cv.offset + reps)
    return cv.fn(torch.tile, x, tuple(full), hint=node_label(node))


def _where(cv: "_Converter", node, a) -> fx.Node:
    """Where with a constant condition: ``x m + y (1 - m)`` (``m`` the 0 / 1 mask; one branch may
    be a constant); with an input-dependent one (a comparison's 0 / 1 values):
    ``y + c (x - y)``, a product of two activations where ``x - y`` depends on the input."""
    cond = cv.arg(node, 0)
    if isinstance(cond, fx.Node):
        return _where_dynamic(cv, node, cond)
    h = node_label(node)
    m = cv.const(node, 0).astype(np.float64)
    parts: list[Any] = []
    for v, mask in ((cv.arg(node, 1), m), (cv.arg(node, 2), 1.0 - m)):
        if isinstance(v, fx.Node):
            if mask.ndim > len(cv.shape(v)):
                raise cv.unsupported(node, f"a condition of rank {mask.ndim} above its branch's {len(cv.shape(v))}")
            parts.append(_mul(cv, v, cv.operand(node, mask, len(cv.shape(v))), h))
        else:  # where the mask is 0 the branch is not taken (an infinite constant there is not 0 * inf)
            parts.append(np.where(mask != 0, np.asarray(v, dtype=np.float64), 0.0))
    nodes = [p for p in parts if isinstance(p, fx.Node)]
    out = nodes[0] if len(nodes) == 1 else cv.fn(operator.add, *cv.align(nodes[0], nodes[1], h), hint=h)
    for c in (p for p in parts if isinstance(p, np.ndarray)):
        out = _add(cv, out, cv.operand(node, c, len(cv.shape(out))), h)
    return out


def _where_dynamic(cv: "_Converter", node, c: fx.Node) -> fx.Node:
    h = node_label(node)
    if c not in cv.integral:
        raise cv.unsupported(node, "a condition that is not known to hold 0 / 1 (not a comparison's output)")
    x, y = (cv.arg(node, i) for i in (1, 2))
    if x is None or y is None:
        raise cv.unsupported(node, "a missing branch")
    rank = max([len(cv.shape(c))] + [len(cv.shape(v)) for v in (x, y) if isinstance(v, fx.Node)]
               + [np.ndim(v) for v in (x, y) if not isinstance(v, fx.Node)])

    def lift(v: Any) -> Any:  # a node of full rank, or a constant operand
        if isinstance(v, fx.Node):
            for _ in range(rank - len(cv.shape(v))):
                v = cv.fn(torch.unsqueeze, v, 1, hint=h)
            return v
        return cv.operand(node, np.asarray(v, dtype=np.float64), rank)

    for v in (x, y):
        if not isinstance(v, fx.Node) and not np.all(np.isfinite(np.asarray(v, dtype=np.float64))):
            raise cv.unsupported(node, "an infinite constant branch with an input-dependent condition (inf - inf)")
    cl, xl, yl = lift(c), lift(x), lift(y)
    if not isinstance(xl, fx.Node) and not isinstance(yl, fx.Node):  # c x + (1 - c) y with constants
        diff = cv.operand(node, np.asarray(x, np.float64) - np.asarray(y, np.float64), rank)
        return _add(cv, _mul(cv, cl, diff, h), yl, h)
    d = cv.fn(operator.sub, xl, yl, hint=h)
    return cv.fn(operator.add, yl, cv.fn(operator.mul, cl, d, hint=h), hint=h) if isinstance(yl, fx.Node) \
        else _add(cv, cv.fn(operator.mul, cl, d, hint=h), yl, h)


def _linear_weights(n_in: int, n_out: int, scale: float, ctm: str) -> np.ndarray | None:
    """``[n_out, n_in]``: ONNX Resize's linear interpolation along one axis (its coordinate rule,
    the source coordinate clamped to ``[0, n_in - 1]``, two neighbours); None for an unknown rule."""
    i = np.arange(n_out, dtype=np.float64)
    if ctm == "half_pixel":
        xo = (i + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        xo = (i + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    elif ctm == "align_corners":
        xo = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    elif ctm == "asymmetric":
        xo = i / scale
    elif ctm == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        xo = n_in / 2 * (1 - adjustment) + (i + 0.5) / scale - 0.5
    else:
        return None
    xo = np.clip(xo, 0, n_in - 1)
    x0 = np.floor(xo).astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    w1 = xo - x0
    M = np.zeros((n_out, n_in))
    np.add.at(M, (np.arange(n_out), x0), 1 - w1)
    np.add.at(M, (np.arange(n_out), x1), w1)
    return M


def resize_linear(cv: "_Converter", node: "onnx.NodeProto", a: dict, x: fx.Node, out: list[int],
                  scales: list[float] | None) -> fx.Node:
    """Resize with ``mode="linear"`` of the two spatial dims of an NCHW tensor: bilinear
    interpolation is a fixed linear map of each channel, ``Y = M_h X M_w^T``, written as two
    bias-free linear layers (the last axis, then axis -2 between transposes)."""
    h = node_label(node)
    ctm = a.get("coordinate_transformation_mode", "half_pixel" if node.op_type == "Resize" else "asymmetric")
    if a.get("antialias", 0) or a.get("axes") is not None:
        raise cv.unsupported(node, "antialias or axes with mode=linear")
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        raise cv.unsupported(node, f"keep_aspect_ratio_policy={policy}")
    s = cv.shape(x)
    mats = []
    for k, (n_in, n_out) in enumerate(zip(s[2:], out[2:])):
        scale = float(scales[k + 2]) if scales is not None else n_out / n_in
        M = _linear_weights(n_in, n_out, scale, ctm)
        if M is None:
            raise cv.unsupported(node, f"coordinate_transformation_mode={ctm} with mode=linear")
        mats.append(M)

    def linear(M: np.ndarray) -> torch.nn.Linear:
        lin = torch.nn.Linear(M.shape[1], M.shape[0], bias=False).to(torch.float64)
        lin.weight = torch.nn.Parameter(torch.as_tensor(M))
        return lin

    y = cv.module(linear(mats[1]), x, h)  # along W
    y = cv.fn(torch.transpose, y, -1, -2, hint=h)
    y = cv.module(linear(mats[0]), y, h)  # along H
    return cv.fn(torch.transpose, y, -1, -2, hint=h)


def _fold_reduce(f: Callable) -> Callable:
    """A Reduce* node of a constant (shape subgraphs): numpy's reduction over its axes."""
    def fold(cv: "_Converter", node, a, ins: list) -> np.ndarray:
        axes = a.get("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = [int(v) for v in np.ravel(ins[1])]
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return ins[0]
            axes = list(range(np.ndim(ins[0])))
        return f(ins[0], axis=tuple(int(v) for v in axes), keepdims=bool(a.get("keepdims", 1)))

    return fold


#: constant folds of the operators above (their inputs all constants: shape subgraphs)
FOLDS: dict[str, Callable] = {
    "Sum": lambda cv, n, a, ins: np.sum(np.broadcast_arrays(*ins), axis=0),
    "Mean": lambda cv, n, a, ins: np.mean(np.broadcast_arrays(*ins), axis=0),
    "Tile": lambda cv, n, a, ins: np.tile(ins[0], [int(v) for v in np.ravel(ins[1])]),
    "Ceil": lambda cv, n, a, ins: np.ceil(ins[0]),
    "Sinh": lambda cv, n, a, ins: np.sinh(ins[0]),
    "Cosh": lambda cv, n, a, ins: np.cosh(ins[0]),
    "ReduceMax": _fold_reduce(np.max),
    "ReduceMin": _fold_reduce(np.min),
    "ReduceSum": _fold_reduce(np.sum),
    "ReduceMean": _fold_reduce(np.mean),
}

#: ONNX op type -> converter
CONVERTERS: dict[str, Callable] = {
    "PRelu": _prelu,
    "Elu": _elu_like(1.0, None),
    "Selu": _elu_like(1.67326319217681884765625, 1.05070102214813232421875),
    "Celu": _elu_like(1.0, None, celu=True),
    "Softplus": _softplus,
    "Mish": _mish,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _depth_to_space,
    "Softsign": _softsign,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "ThresholdedRelu": _thresholded_relu,
    "Erf": _erf,
    "Gelu": _gelu,
    "Ceil": _ceil,
    "Sinh": _hyperbolic,
    "Cosh": _hyperbolic,
    "Shrink": _shrink,
    "Swish": _swish,
    "GroupNormalization": _group_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "ReduceMax": _reduce_extreme(True),
    "ReduceMin": _reduce_extreme(False),
    "ReduceSumSquare": _reduce_of("sum_square"),
    "ReduceL2": _reduce_of("l2"),
    "ReduceL1": _reduce_of("l1"),
    "Sum": _sum_mean(False),
    "Mean": _sum_mean(True),
    "Tile": _tile,
    "Where": _where,
}
