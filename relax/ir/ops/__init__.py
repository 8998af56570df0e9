"""Per-op bound rules and **the one place to add a layer type**: :data:`RULES`.

``RULES`` maps an fx target -- a module class (``call_module``), a function
(``call_function``) or a method name (``call_method``) -- to a *builder*
``(ctx: BuildContext) -> (op, input_names)`` that reads the node's constant arguments and
returns a rule object (:class:`~relax.ir.ops.base.Op`) plus the names of its variable inputs.

Adding a layer type = write an :class:`Op` (``forward``, ``interval``, ``backward``; or an
:class:`Activation` with ``relax`` and ``backward_relaxed``) and add its builder here.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .activation import Atan, Erf, ReLU, Sigmoid, Tanh
from .affine import Add, Conv, ConvTranspose, ElemAffine, Linear, Reduce
from .base import Activation, BuildContext, Expansion, Op, Relaxation, as_const
from .elementwise import (Abs, Clip, Cos, Elementwise, Exp, Floor, LeakyReLU, Log, PiecewiseLinear, Power, Reciprocal, Sign,
                          Sin, Sqrt, Step, step)
from .pool import MaxPool2d, avgpool_conv
from .log_softmax import LogSoftmaxRows
from .normalize import Normalize
from .product import Product
from .shape import Permute, Reshape, Select

__all__ = ["RULES", "lookup_rule", "Op", "Activation", "Relaxation", "BuildContext", "Expansion", "Linear", "Conv",
           "ConvTranspose", "ElemAffine", "Add", "Reduce", "Reshape", "Permute", "Select", "ReLU", "Sigmoid", "Tanh", "Erf", "Atan",
           "MaxPool2d", "Elementwise", "Exp", "Log", "Sqrt", "Reciprocal", "Power", "PiecewiseLinear", "Sin", "Cos", "Abs", "LeakyReLU", "Clip",
           "Sign", "Step", "Floor", "Product", "Normalize", "LogSoftmaxRows"]


def _pair(v: Any, n: int = 2) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _single_var(ctx: BuildContext) -> str:
    vs = ctx.var_args()
    if len(vs) != 1:
        raise ctx.fail(f"expects one non-constant input, got {len(vs)}")
    return vs[0].name


def _first_in_shape(ctx: BuildContext) -> tuple[int, ...]:
    return ctx.in_shapes[_single_var(ctx)]


# ---------------------------------------------------------------- shape-only ops
def b_reshape(ctx):
    x = _single_var(ctx)
    return Reshape(ctx.in_shapes[x], ctx.out_shape), [x]


def b_dropout(ctx):
    if ctx.node.op == "call_module" and ctx.module().training:
        raise ctx.fail("Dropout in training mode (call model.eval())")
    if ctx.node.op == "call_function" and ctx.node.kwargs.get("training", len(ctx.node.args) > 2 and ctx.node.args[2]):
        raise ctx.fail("dropout with training=True")
    return b_reshape(ctx)


def b_permute(ctx):
    x = _single_var(ctx)
    nd = len(ctx.in_shapes[x]) + 1
    n = ctx.node
    if n.target in ("transpose", torch.transpose) or n.target == "swapaxes":
        d0, d1 = (ctx.const(a) for a in n.args[1:3])
        perm = list(range(nd))
        d0, d1 = d0 % nd, d1 % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = n.args[1:] if n.op == "call_method" else n.args[1:]
        if len(dims) == 1 and isinstance(ctx.const(dims[0]), (list, tuple)):
            dims = ctx.const(dims[0])
        else:
            dims = [ctx.const(d) for d in dims]
        if "dims" in n.kwargs:
            dims = ctx.const(n.kwargs["dims"])
        perm = [int(d) % nd for d in dims]
    if perm[0] != 0:
        raise ctx.fail("permutes the batch dimension")
    return Permute([p - 1 for p in perm[1:]]), [x]


#: exact in float64 for flat positions below 2**52; the second probe adds this shift
_PROBE_SHIFT = float(2**40)


def b_select(ctx):
    """Any op that only copies entries of its variable inputs or constants (slicing, gather with
    constant indices, cat, expand, repeat, nearest upsampling, constant padding, flip, ...):
    run it on *probes* -- inputs whose entries are their own flat positions (the inputs'
    positions numbered one after the other), then again shifted by ``2**40``. Outputs that moved
    with the shift are copies of the entry their value names; the others are constants."""
    n = ctx.node
    xs = list(dict.fromkeys(a.name for a in ctx.var_args()))
    if not xs:
        raise ctx.fail("no variable input")
    shapes = [ctx.in_shapes[x] for x in xs]
    sizes = [math.prod(sh) for sh in shapes]
    if sum(sizes) >= 2**40:
        raise ctx.fail("inputs too large to index")
    offsets = [sum(sizes[:k]) for k in range(len(xs))]

    def run(flat: torch.Tensor) -> torch.Tensor:
        probes = {x: flat[off:off + sz].reshape(1, *sh).expand(2, *sh) for x, sz, off, sh in zip(xs, sizes, offsets, shapes)}

        def val(a):
            if isinstance(a, torch.fx.Node):
                return probes[a.name] if a.name in probes else ctx.values[a.name]
            return a

        args = torch.fx.node.map_aggregate(n.args, val)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, val)
        with torch.no_grad():
            if n.op == "call_module":
                out = ctx.module()(*args, **kwargs)
            elif n.op == "call_method":
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                out = n.target(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, *ctx.out_shape):
            raise ctx.fail("does not keep the batch dimension")
        out = out.to(torch.float64).reshape(2, -1)
        if not torch.equal(out[0], out[1]):
            raise ctx.fail("mixes the examples of a batch")
        return out[0]

    pos = torch.arange(sum(sizes), dtype=torch.float64, device=ctx.device)
    a, b = run(pos), run(pos + _PROBE_SHIFT)
    from_input = (b - a) == _PROBE_SHIFT
    index = torch.where(from_input, a, torch.zeros_like(a))
    bad = bool(((index != index.round()) | (index < 0) | (index >= sum(sizes))).any())
    if not bad:  # a third probe, shuffled: a selection must move its values the same way
        shuffled = torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(0)).to(pos) * 3 + 0.5
        c = run(shuffled)
        bad = not torch.equal(torch.where(from_input, shuffled[index.long()], a), c)
    if bad:
        raise ctx.fail("is not a selection of its input entries (only value-moving ops are bounded this way)")
    const = torch.where(from_input, torch.zeros_like(a), a).to(ctx.dtype)
    return Select(index.long(), from_input, const, shapes, ctx.out_shape), xs


# ---------------------------------------------------------------- affine ops
def b_linear_module(ctx):
    m = ctx.module()
    W = m.weight.detach().to(ctx.dtype)
    b = None if m.bias is None else m.bias.detach().to(ctx.dtype)
    x = _single_var(ctx)
    return Linear(W, b, len(ctx.in_shapes[x])), [x]


def b_linear_fn(ctx):
    n = ctx.node
    args = list(n.args) + [None] * 3
    x, W, b = args[0], n.kwargs.get("weight", args[1]), n.kwargs.get("bias", args[2])
    if not ctx.is_var(x) or ctx.is_var(W) or (b is not None and ctx.is_var(b)):
        raise ctx.fail("F.linear needs a variable input and constant weight/bias")
    return Linear(ctx.const_tensor(W), None if b is None else ctx.const_tensor(b), len(ctx.in_shapes[x.name])), [x.name]


def _product(ctx, a, b, matmul: bool):
    """``a * b`` / ``a @ b`` of two variable tensors (same per-example rank, so that the batch
    dims align)."""
    sa, sb = ctx.in_shapes[a.name], ctx.in_shapes[b.name]
    if len(sa) != len(sb) or (matmul and len(sa) < 2):
        raise ctx.fail(f"product of variable tensors of per-example shapes {list(sa)} and {list(sb)}")
    return Product(matmul, sa, sb), [a.name, b.name]


def b_matmul(ctx):
    a, b = ctx.node.args[:2]
    if ctx.is_var(a) and ctx.is_var(b):
        return _product(ctx, a, b, matmul=True)
    if ctx.is_var(a) and not ctx.is_var(b):
        W = ctx.const_tensor(b)
        if W.dim() != 2:
            raise ctx.fail("matmul by a constant needs a 2-D constant")
        return Linear(W.t().contiguous(), None, len(ctx.in_shapes[a.name])), [a.name]
    raise ctx.fail("matmul needs a variable left operand and a constant 2-D right operand")


def _conv(ctx, W, b, stride, padding, dilation, groups):
    nd = W.dim() - 2
    if isinstance(padding, str):
        if padding != "valid":
            raise ctx.fail(f"padding={padding!r}")
        padding = 0
    x = _single_var(ctx)
    return Conv(W, b, _pair(stride, nd), _pair(padding, nd), _pair(dilation, nd), int(groups),
                ctx.in_shapes[x], ctx.out_shape), [x]


def _conv_module_params(ctx):
    """Weight and bias of a (transposed) convolution module, in the graph's dtype."""
    m = ctx.module()
    if m.padding_mode != "zeros":
        raise ctx.fail(f"padding_mode={m.padding_mode!r}")
    return m, m.weight.detach().to(ctx.dtype), None if m.bias is None else m.bias.detach().to(ctx.dtype)


def b_conv_module(ctx):
    m, W, b = _conv_module_params(ctx)
    return _conv(ctx, W, b, m.stride, m.padding, m.dilation, m.groups)


def b_conv_fn(ctx):
    n = ctx.node
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    defaults = [None, None, None, 1, 0, 1, 1]
    vals = {k: (n.args[i] if i < len(n.args) else n.kwargs.get(k, defaults[i])) for i, k in enumerate(names)}
    if ctx.is_var(vals["weight"]) or ctx.is_var(vals["bias"]):
        raise ctx.fail("convolution with a non-constant weight")
    W = ctx.const_tensor(vals["weight"])
    b = None if vals["bias"] is None else ctx.const_tensor(vals["bias"])
    return _conv(ctx, W, b, ctx.const(vals["stride"]), ctx.const(vals["padding"]), ctx.const(vals["dilation"]), ctx.const(vals["groups"]))


def b_conv_transpose_module(ctx):
    m, W, b = _conv_module_params(ctx)
    x = _single_var(ctx)
    return ConvTranspose(W, b, _pair(m.stride), _pair(m.padding), _pair(m.output_padding), _pair(m.dilation), int(m.groups),
                         ctx.in_shapes[x], ctx.out_shape), [x]


def b_batchnorm(ctx):
    m = ctx.module()
    if m.training and m.track_running_stats:
        raise ctx.fail("BatchNorm in training mode (call model.eval())")
    if m.running_mean is None:
        raise ctx.fail("BatchNorm without running statistics")
    x = _single_var(ctx)
    shape = ctx.in_shapes[x]
    # folded in the graph's dtype from the exact parameters (folding in float32 and casting
    # the result would bake float32 round-off into a float64 graph)
    var, mean = m.running_var.detach().to(ctx.dtype), m.running_mean.detach().to(ctx.dtype)
    weight = m.weight.detach().to(ctx.dtype) if m.affine else torch.ones_like(var)
    bias = m.bias.detach().to(ctx.dtype) if m.affine else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + m.eps)
    shift = bias - mean * scale
    view = (-1,) + (1,) * (len(shape) - 1)
    return ElemAffine(scale.view(view), shift.view(view), shape), [x]


def _const_per_example(ctx, c, shape) -> torch.Tensor:
    """A constant operand broadcast against ``[batch, *shape]`` -> per-example tensor."""
    t = as_const(c, ctx.dtype)
    if t.dim() > len(shape):
        if t.dim() != len(shape) + 1 or t.shape[0] != 1:
            raise ctx.fail("constant operand varies along the batch dimension")
        t = t[0]
    return t


_BINARY_NAMES = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    "truediv": "div",
}


def b_binary(ctx):
    """add / sub / mul / truediv (function or method), possibly reversed (``c - x``)."""
    n = ctx.node
    name = _BINARY_NAMES.get(n.target) if not isinstance(n.target, str) else _BINARY_NAMES.get(n.target, n.target)
    a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    if n.kwargs.get("rounding_mode") is not None:
        raise ctx.fail("division with rounding_mode")
    alpha = n.kwargs.get("alpha", 1)
    if alpha != 1:
        if ctx.is_var(b):
            raise ctx.fail("alpha != 1 with two variable operands")
        b = ctx.const(b) * alpha
    va, vb = ctx.is_var(a), ctx.is_var(b)
    out = ctx.out_shape
    if va and vb:
        if name in ("add", "sub"):
            return Add([1.0, 1.0 if name == "add" else -1.0], [ctx.in_shapes[a.name], ctx.in_shapes[b.name]]), [a.name, b.name]
        if name == "mul":
            if a.name == b.name:  # x * x: the square, convex and >= 0 (McCormick's planes treat the factors as independent)
                return Power(2), [a.name]
            return _product(ctx, a, b, matmul=False)
        if name == "div":  # a * (1 / b)
            sb = ctx.in_shapes[b.name]
            prod, _ = _product(ctx, a, b, matmul=False)
            return Expansion([("reciprocal", Reciprocal(), [b.name], sb), ("product", prod, [a.name, "__reciprocal"], out)])
        raise ctx.fail(f"{name} of two non-constant tensors")
    if va:
        x, c = a, _const_per_example(ctx, ctx.const(b), out)
        if name == "add":
            return ElemAffine(None, c, ctx.in_shapes[x.name]), [x.name]
        if name == "sub":
            return ElemAffine(None, -c, ctx.in_shapes[x.name]), [x.name]
        if name == "mul":
            return ElemAffine(c, None, ctx.in_shapes[x.name]), [x.name]
        if name == "div":
            return ElemAffine(1.0 / c, None, ctx.in_shapes[x.name]), [x.name]
    else:
        x, c = b, _const_per_example(ctx, ctx.const(a), out)
        if name == "add":
            return ElemAffine(None, c, ctx.in_shapes[x.name]), [x.name]
        if name == "sub":
            return ElemAffine(-torch.ones((), dtype=ctx.dtype), c, ctx.in_shapes[x.name]), [x.name]
        if name == "mul":
            return ElemAffine(c, None, ctx.in_shapes[x.name]), [x.name]
    raise ctx.fail(f"{name} with this operand pattern")


def b_neg(ctx):
    x = _single_var(ctx)
    return ElemAffine(-torch.ones((), dtype=ctx.dtype), None, ctx.in_shapes[x]), [x]


# ---------------------------------------------------------------- pooling
def _pool_args(ctx, names: list[str], defaults: list) -> list:
    """A pooling node's arguments ``names`` (after ``input``): the module's attributes of the same
    names, or the function call's positional / keyword arguments with ``defaults``."""
    n = ctx.node
    if n.op == "call_module":
        m = ctx.module()
        return [getattr(m, name) for name in names]
    full = ["input", *names]
    given = {k_: (n.args[i] if i < len(n.args) else n.kwargs.get(k_, ([None] + defaults)[i])) for i, k_ in enumerate(full)}
    return [ctx.const(given[name]) for name in names]


def b_avgpool(ctx):
    k, s, p, ceil, cip, div = _pool_args(ctx, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                               "divisor_override"], [None, None, 0, False, True, None])
    k = _pair(k)
    s = _pair(s) if s not in (None, []) else k
    p = _pair(p)
    x = _single_var(ctx)
    C, H, W = ctx.in_shapes[x]
    if any(pi > 0 for pi in p) and not cip and div is None:
        raise ctx.fail("AvgPool2d with count_include_pad=False and padding")
    floor_shape = tuple((d + 2 * pi - ki) // si + 1 for d, pi, ki, si in zip((H, W), p, k, s))
    if ceil and tuple(ctx.out_shape[1:]) != floor_shape:
        raise ctx.fail("AvgPool2d with ceil_mode changing the output size")
    divisor = float(div) if div else float(k[0] * k[1])
    return avgpool_conv(C, k, s, p, divisor, ctx.in_shapes[x], ctx.out_shape, ctx.dtype), [x]


def b_maxpool(ctx):
    k, s, p, d, ceil, ri = _pool_args(ctx, ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                                      [None, None, 0, 1, False, False])
    if ri:
        raise ctx.fail("MaxPool2d with return_indices")
    k = _pair(k)
    s = _pair(s) if s not in (None, []) else k
    p, d = _pair(p), _pair(d)
    x = _single_var(ctx)
    C, H, W = ctx.in_shapes[x]
    floor_shape = tuple((h + 2 * pi - di * (ki - 1) - 1) // si + 1 for h, pi, di, ki, si in zip((H, W), p, d, k, s))
    if tuple(ctx.out_shape[1:]) != floor_shape:
        raise ctx.fail("MaxPool2d with ceil_mode changing the output size")
    return MaxPool2d(k, s, p, d, ctx.in_shapes[x], ctx.out_shape), [x]


# ---------------------------------------------------------------- activations
def _act(cls):
    def build(ctx):
        return cls(), [_single_var(ctx)]

    return build


b_relu, b_sigmoid, b_tanh, b_erf, b_atan = _act(ReLU), _act(Sigmoid), _act(Tanh), _act(Erf), _act(Atan)
b_exp, b_log, b_sqrt, b_reciprocal = _act(Exp), _act(Log), _act(Sqrt), _act(Reciprocal)
b_sin, b_cos, b_abs, b_sign, b_floor = _act(Sin), _act(Cos), _act(Abs), _act(Sign), _act(Floor)


def b_heaviside(ctx):
    """``torch.heaviside(x, v)`` or :func:`verify.graph_functions.step` for a constant scalar ``v``
    (the value at 0)."""
    x = _single_var(ctx)
    v = as_const(ctx.const(_arg(ctx, 1, "values")), torch.float64).reshape(-1)
    if v.numel() == 0 or not bool((v == v[0]).all()):
        raise ctx.fail("a value at 0 that is not one number")
    return Step(float(v[0])), [x]


def _arg(ctx, i: int, name: str, default: Any = None) -> Any:
    n = ctx.node
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def b_pow(ctx):
    """``x ** c`` for a constant ``c``: an integer 2..8, 1, 0.5 (sqrt) or -1 (reciprocal)."""
    x = _single_var(ctx)
    if not ctx.is_var(ctx.node.args[0]):
        raise ctx.fail("a constant raised to a variable power")
    c = ctx.const(_arg(ctx, 1, "exponent"))
    c = as_const(c, torch.float64)
    c = float(c.reshape(-1)[0]) if c.numel() == 1 else None
    if c == 1.0:
        return Reshape(ctx.in_shapes[x], ctx.out_shape), [x]
    if c == 0.5:
        return Sqrt(), [x]
    if c == -1.0:
        return Reciprocal(), [x]
    if c is not None and c == int(c) and 2 <= c <= 8:
        return Power(int(c)), [x]
    raise ctx.fail(f"power with exponent {c} (supported: 0.5, -1, 1 and integers 2..8)")


def b_leaky_relu(ctx):
    x = _single_var(ctx)
    slope = ctx.module().negative_slope if ctx.node.op == "call_module" else ctx.const(_arg(ctx, 1, "negative_slope", 0.01))
    return LeakyReLU(float(slope)), [x]


def b_clamp(ctx):
    x = _single_var(ctx)
    n = ctx.node
    if n.op == "call_module":
        m = ctx.module()
        low, high = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
    elif n.target in (F.hardtanh,):
        low, high = ctx.const(_arg(ctx, 1, "min_val", -1.0)), ctx.const(_arg(ctx, 2, "max_val", 1.0))
    else:
        low, high = ctx.const(_arg(ctx, 1, "min")), ctx.const(_arg(ctx, 2, "max"))
    for v in (low, high):
        if v is not None and as_const(v, torch.float64).numel() != 1:
            raise ctx.fail("clamp with tensor bounds")
    low = None if low is None else float(as_const(low, torch.float64))
    high = None if high is None else float(as_const(high, torch.float64))
    return Clip(low, high), [x]


def b_reduce(ctx):
    """``sum`` / ``mean`` over per-example dims (never the batch)."""
    x = _single_var(ctx)
    shape = ctx.in_shapes[x]
    dim = ctx.const(_arg(ctx, 1, "dim"))
    keepdim = bool(ctx.const(_arg(ctx, 2, "keepdim", False)))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        raise ctx.fail("reduces the batch dimension")
    dims = [int(d) % (len(shape) + 1) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    if 0 in dims:
        raise ctx.fail("reduces the batch dimension")
    dims = [d - 1 for d in dims]
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    scale = 1.0 / math.prod(shape[d] for d in dims) if name == "mean" else 1.0
    return Reduce(tuple(dims), keepdim, scale, shape), [x]


def b_softmax(ctx, log=False):
    """``softmax(x)_i = 1 / (1 + sum_{j != i} exp(x_j - x_i))`` along one dim: the differences
    are one linear map (no diagonal: the ``exp(0) = 1`` term is the constant 1, so even the
    interval rule keeps the sum ``>= 1``), then exp, a sum and a reciprocal -- no product of two
    bounded quantities, hence tighter than ``exp(x_i) / sum_j exp(x_j)`` (Wei et al. 2023,
    "Convex bounds on the softmax function"). ``log``: ``log_softmax(x)_i = -log(1 + sum_{j != i}
    exp(x_j - x_i))``, joined with the scores in :class:`~relax.ir.ops.log_softmax.LogSoftmaxRows`."""
    x = _single_var(ctx)
    s = ctx.in_shapes[x]
    if ctx.node.op == "call_module":
        dim = ctx.module().dim
    else:
        dim = ctx.const(_arg(ctx, 1, "dim"))
    if dim is None:
        raise ctx.fail("softmax without dim")
    d = int(dim) % (len(s) + 1) - 1
    if d < 0:
        raise ctx.fail("softmax over the batch dimension")
    n = s[d]
    if n == 1:  # softmax 1, log_softmax 0
        value = torch.full((), 0.0 if log else 1.0, dtype=ctx.dtype)
        return Expansion([("one", ElemAffine(torch.zeros((), dtype=ctx.dtype), value, s), [x], s)])
    perm = list(range(len(s)))
    perm.append(perm.pop(d))  # softmax dim last
    inv = [perm.index(k) for k in range(len(s))]
    sl = tuple(s[k] for k in perm)  # [..., n]
    steps = []
    src = x
    if d != len(s) - 1:
        steps.append(("last", Permute(perm), [x], sl))
        src = "__last"
    steps += _denominator_steps(src, sl, ctx.dtype)
    if log:  # -log of it, joined with the scores (LogSoftmaxRows: differences of outputs bounded through the scores)
        steps += [("log", Log(), ["__plus1"], sl), ("neg", ElemAffine(-torch.ones((), dtype=ctx.dtype), None, sl), ["__log"], sl),
                  ("out", LogSoftmaxRows(sl), [src, "__neg"], sl)]
    else:
        steps.append(("recip", Reciprocal(), ["__plus1"], sl))
    if d != len(s) - 1:
        steps.append(("back", Permute(inv), ["__out" if log else "__recip"], s))
    return Expansion(steps)


def _pairwise_differences(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n (n - 1), n]``: row ``(i, k)`` is ``x_j - x_i`` for the ``k``-th ``j != i``."""
    W = torch.zeros(n, n - 1, n, dtype=dtype)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        W[i, torch.arange(n - 1), torch.tensor(others)] = 1.0
        W[i, :, i] = -1.0
    return W.reshape(n * (n - 1), n)


def _denominator_steps(src: str, sl: tuple[int, ...], dtype: torch.dtype) -> list:
    """``1 + sum_{j != i} exp(x_j - x_i)`` for every entry ``i`` of the last dim of ``sl``
    (``[..., n]``): the pairwise differences (their boxes from the scores' linear forms,
    :mod:`relax.bounds.pairwise`), exp, a sum and ``+1``; the last step is named ``plus1``."""
    n = sl[-1]
    pair = sl[:-1] + (n * (n - 1),)
    grid = sl[:-1] + (n, n - 1)
    diff = Linear(_pairwise_differences(n, dtype), None, len(sl))
    diff.box_from_input = True
    return [
        ("diff", diff, [src], pair),
        ("exp", Exp(), ["__diff"], pair),
        ("grid", Reshape(pair, grid), ["__exp"], grid),
        ("sum", Reduce((len(grid) - 1,), False, 1.0, grid), ["__grid"], sl),
        ("plus1", ElemAffine(None, torch.ones((), dtype=dtype), sl), ["__sum"], sl),
    ]


def b_log_softmax(ctx):
    return b_softmax(ctx, log=True)


def b_max_min(ctx):
    """``maximum(a, b) = a + relu(b - a)``, ``minimum(a, b) = a - relu(a - b)`` (a constant
    operand: ``c + relu(x - c)``)."""
    n = ctx.node
    is_max = n.target in (torch.maximum, "maximum")
    a, b = n.args[0], _arg(ctx, 1, "other")
    out = ctx.out_shape
    if ctx.is_var(a) and ctx.is_var(b):
        sa = ctx.in_shapes[a.name]
        first, second = (b.name, a.name) if is_max else (a.name, b.name)
        return Expansion([
            ("diff", Add([1.0, -1.0], [ctx.in_shapes[first], ctx.in_shapes[second]]), [first, second], out),
            ("relu", ReLU(), ["__diff"], out),
            ("out", Add([1.0, 1.0 if is_max else -1.0], [sa, out]), [a.name, "__relu"], out),
        ])
    x, c = (a, b) if ctx.is_var(a) else (b, a)
    if not isinstance(c, torch.fx.Node) and not isinstance(c, torch.Tensor):
        return Clip(float(c), None) if is_max else Clip(None, float(c)), [x.name]
    c = _const_per_example(ctx, ctx.const(c), out)
    sx = ctx.in_shapes[x.name]
    sign = 1.0 if is_max else -1.0  # max: c + relu(x - c); min: c - relu(c - x)
    return Expansion([
        ("shift", ElemAffine(torch.full((), sign, dtype=ctx.dtype), -sign * c, sx), [x.name], out),
        ("relu", ReLU(), ["__shift"], out),
        ("out", ElemAffine(torch.full((), sign, dtype=ctx.dtype), c, out), ["__relu"], out),
    ])


#: fx target -> builder. Keys: module classes, functions, method names.
RULES: dict[Any, Any] = {
    # modules
    nn.Linear: b_linear_module,
    nn.Conv1d: b_conv_module,
    nn.Conv2d: b_conv_module,
    nn.ConvTranspose2d: b_conv_transpose_module,
    nn.ReLU: b_relu,
    nn.Sigmoid: b_sigmoid,
    nn.Tanh: b_tanh,
    nn.BatchNorm1d: b_batchnorm,
    nn.BatchNorm2d: b_batchnorm,
    nn.AvgPool2d: b_avgpool,
    nn.MaxPool2d: b_maxpool,
    nn.Flatten: b_reshape,
    nn.Unflatten: b_reshape,
    nn.Identity: b_reshape,
    nn.Dropout: b_dropout,
    nn.LeakyReLU: b_leaky_relu,
    nn.Hardtanh: b_clamp,
    nn.ReLU6: b_clamp,
    nn.Softmax: b_softmax, nn.LogSoftmax: b_log_softmax,
    # functions
    operator.add: b_binary, operator.sub: b_binary, operator.mul: b_binary, operator.truediv: b_binary,
    operator.iadd: b_binary, operator.isub: b_binary, operator.imul: b_binary, operator.itruediv: b_binary,
    torch.add: b_binary, torch.sub: b_binary, torch.subtract: b_binary, torch.mul: b_binary,
    torch.multiply: b_binary, torch.div: b_binary, torch.true_divide: b_binary,
    operator.neg: b_neg, torch.neg: b_neg,
    torch.relu: b_relu, F.relu: b_relu,
    torch.sigmoid: b_sigmoid, F.sigmoid: b_sigmoid,
    torch.tanh: b_tanh, F.tanh: b_tanh, torch.erf: b_erf, torch.special.erf: b_erf,
    torch.atan: b_atan, torch.arctan: b_atan,
    torch.flatten: b_reshape, torch.reshape: b_reshape, torch.squeeze: b_reshape, torch.unsqueeze: b_reshape,
    torch.permute: b_permute, torch.transpose: b_permute,
    F.linear: b_linear_fn, torch.matmul: b_matmul, operator.matmul: b_matmul,
    F.conv1d: b_conv_fn, F.conv2d: b_conv_fn,
    F.avg_pool2d: b_avgpool, F.max_pool2d: b_maxpool,
    F.dropout: b_dropout,
    operator.getitem: b_select, torch.cat: b_select, torch.concat: b_select, torch.index_select: b_select,
    torch.narrow: b_select, torch.flip: b_select, torch.roll: b_select, torch.tile: b_select,
    torch.repeat_interleave: b_select, F.interpolate: b_select, F.pad: b_select,
    nn.Upsample: b_select, nn.ZeroPad2d: b_select, nn.ConstantPad1d: b_select, nn.ConstantPad2d: b_select,
    torch.Tensor.expand: b_select,
    torch.exp: b_exp, torch.log: b_log, torch.sqrt: b_sqrt, torch.reciprocal: b_reciprocal, torch.sin: b_sin,
    torch.cos: b_cos, torch.abs: b_abs, torch.sign: b_sign,
    torch.heaviside: b_heaviside, step: b_heaviside, torch.floor: b_floor, torch.pow: b_pow, operator.pow: b_pow,
    F.leaky_relu: b_leaky_relu, torch.clamp: b_clamp, torch.clip: b_clamp, F.hardtanh: b_clamp,
    torch.sum: b_reduce, torch.mean: b_reduce, torch.softmax: b_softmax, F.softmax: b_softmax,
    torch.log_softmax: b_log_softmax, F.log_softmax: b_log_softmax,
    torch.maximum: b_max_min, torch.minimum: b_max_min,
    # methods
    "expand": b_select, "expand_as": b_select, "repeat": b_select, "narrow": b_select, "flip": b_select,
    "index_select": b_select, "__getitem__": b_select,
    "add": b_binary, "sub": b_binary, "mul": b_binary, "div": b_binary, "truediv": b_binary,
    "neg": b_neg,
    "relu": b_relu, "sigmoid": b_sigmoid, "tanh": b_tanh, "erf": b_erf, "atan": b_atan, "arctan": b_atan,
    "view": b_reshape, "reshape": b_reshape, "flatten": b_reshape, "squeeze": b_reshape,
    "unsqueeze": b_reshape, "contiguous": b_reshape, "view_as": b_reshape, "reshape_as": b_reshape,
    "permute": b_permute, "transpose": b_permute,
    "exp": b_exp, "log": b_log, "sqrt": b_sqrt, "reciprocal": b_reciprocal, "sin": b_sin, "cos": b_cos, "abs": b_abs,
    "sign": b_sign, "heaviside": b_heaviside, "floor": b_floor, "pow": b_pow, "clamp": b_clamp, "clip": b_clamp,
    "sum": b_reduce, "mean": b_reduce,
    "softmax": b_softmax, "log_softmax": b_log_softmax, "maximum": b_max_min, "minimum": b_max_min, "matmul": b_matmul,
}


def lookup_rule(node: torch.fx.Node, gm: torch.fx.GraphModule):
    """The builder for ``node`` or ``None``."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        for cls in type(mod).__mro__:  # subclasses of a supported module reuse its rule
            if cls in RULES:
                # a subclass with its own forward is a different op
                if cls is not type(mod) and type(mod).forward is not getattr(cls, "forward", None):
                    return None
                return RULES[cls]
        return None
    if node.op in ("call_function", "call_method"):
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None
