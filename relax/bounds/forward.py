"""Forward linear bounds: every node's values bounded by linear functions of the input.

Forward-mode linear relaxation (Xu et al. 2020, "Automatic perturbation analysis for scalable
certified robustness and beyond", Sec. 3.2 "forward mode"; the symbolic intervals of ReluVal /
Neurify): node ``z`` keeps ``L(x) <= z(x) <= U(x)`` for every ``x`` in the input box, with
``L, U`` linear in the ``n_0`` inputs. An affine op
``y = W z + b`` maps them to ``W+ L + W- U + b`` and ``W+ U + W- L + b``; an elementwise
activation relaxed by lines ``a_l z + c_l <= f(z) <= a_u z + c_u`` on its input's box maps them
to ``a_l+ L + a_l- U + c_l`` and ``a_u+ U + a_u- L + c_u``. A node's box is the minimum / maximum
of its functions over the input box, intersected with its interval box.

Cost: ``n_0 + 1`` columns through every node, against CROWN's one backward pass per unstable
neuron: for networks with a few inputs and wide layers (the cGAN generators of VNN-COMP 2023: 5
inputs, 28,800-neuron layers) the boxes cost about a forward pass of ``n_0 + 1`` inputs. Looser
than CROWN's boxes on a wide input box, close to them on the small boxes of input splitting.

Round-off (as in :mod:`relax.bounds.roundoff`): a step's coefficients err by at most
``gamma_n`` times the sums of their terms' magnitudes, so over the input box its functions err by
at most ``gamma_n T``, ``T`` the op's term magnitude on the symmetric box of the inputs' function
sizes (``max |L(x)| + max |U(x)|``); ``SAFETY`` times that is taken off ``L``'s constant and added
to ``U``'s (rounded outward), so the next step's sizes include it. A node's box is the minimum /
maximum of its functions, widened by the round-off of that sum.

Ops: linear, convolution, transposed convolution, elementwise affine, add, reduce, reshape,
permute and select; elementwise activations with finite relaxation lines. Any other op's node
gets constant functions (its interval box), which stays sound.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from relax.bounds.interval import node_box
from relax.bounds.roundoff import SAFETY, gamma, max_abs, sum_length, term_magnitude
from relax.ir.graph import BoundGraph
from relax.ir.ops.base import finite

__all__ = ["forward_bounds", "FORWARD_KINDS"]

#: affine op kinds whose linear part this module applies to coefficient columns
FORWARD_KINDS = ("linear", "conv", "conv_transpose", "elementwise affine", "add", "reduce", "reshape", "permute", "select")

#: a node's forms ``(L, U)``, each ``[B, n_0 + 1, *shape]``: the coefficients of the ``n_0`` free
#: inputs (:func:`free_columns`), then the constant
Forms = tuple[Tensor, Tensor]


def free_count(lo: Tensor, hi: Tensor) -> int:
    """The most free inputs (``lo < hi``) of any box of the batch ``lo, hi [B, *input_shape]``."""
    return int((hi > lo).reshape(lo.shape[0], -1).sum(1).max()) if lo.numel() else 0


def free_columns(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The input's forms over its free inputs: ``(ident [B, k + 1, *input_shape], zlo, zhi [B, k])``
    with ``k`` = :func:`free_count`. Column ``j < k`` of box ``b`` is the unit vector of its
    ``j``-th free input (zero past its own count), whose range is ``[zlo, zhi][b, j]`` (0 for the
    padding); the last column holds the fixed inputs' values (``lo = hi``) and 0 at the free ones,
    so ``x = sum_j ident[:, j] z_j + ident[:, k]`` exactly. VNN-COMP's nn4sys boxes fix 151-153
    of 154 inputs; an l_inf ball frees every input (``k = n``, the identity)."""
    B, shape = lo.shape[0], lo.shape[1:]
    lo_f, hi_f = lo.reshape(B, -1), hi.reshape(B, -1)
    free = hi_f > lo_f
    k = free_count(lo, hi)
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :k]  # each box's free inputs first, in order
    used = torch.gather(free, 1, order)  # [B, k]: a real column, not padding
    cols = torch.zeros(B, k, lo_f.shape[1], dtype=lo.dtype, device=lo.device)
    cols.scatter_(2, order.unsqueeze(2), used.to(lo.dtype).unsqueeze(2))
    const = torch.where(free, torch.zeros_like(lo_f), lo_f).unsqueeze(1)
    zero = torch.zeros((), dtype=lo.dtype, device=lo.device)
    zlo = torch.where(used, torch.gather(lo_f, 1, order), zero)
    zhi = torch.where(used, torch.gather(hi_f, 1, order), zero)
    return torch.cat([cols, const], 1).reshape(B, k + 1, *shape), zlo, zhi


def forward_bounds(graph: BoundGraph, lo: Tensor, hi: Tensor,
                   known: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Boxes ``{node: (lo, hi)}`` (``[B, *shape]``) of the input and every node from forward
    linear bounds over the input box ``lo, hi [B, *input_shape]``, each intersected with the
    node's interval box and with ``known`` (tighter boxes, e.g. branch-and-bound's).

    The forms' columns are the box's *free* inputs (``lo < hi``; :func:`free_columns`): an input
    fixed by its box is a number, folded into the constant column."""
    ident, lo_f, hi_f = free_columns(lo, hi)
    n0 = lo_f.shape[1]
    mx = max_abs(lo_f, hi_f)
    forms: dict[str, Forms] = {graph.input_name: (ident, ident)}
    boxes = {graph.input_name: (lo, hi)}
    last_use = {i: k for k, n in enumerate(graph.nodes) for i in n.inputs}  # forms are freed after their last consumer
    for k, n in enumerate(graph.nodes):
        ins = [boxes[i] for i in n.inputs]
        l, h = node_box(n, ins)
        got = _step(n, [forms[i] for i in n.inputs], ins, mx, n0)
        for i in set(n.inputs):
            if last_use[i] == k:
                del forms[i]
        if got is not None:
            fl, fh = _concretize(got, lo_f, hi_f, mx, n0)
            l, h = torch.maximum(l, fl), torch.minimum(h, fh)
        if known is not None and n.name in known:
            l, h = torch.maximum(l, known[n.name][0]), torch.minimum(h, known[n.name][1])
        boxes[n.name] = (l, h)
        if n.name in last_use:
            forms[n.name] = got if got is not None else _constant(l, h, n0)
    return boxes


def _constant(l: Tensor, h: Tensor, n0: int) -> Forms:
    """Constant forms of a box (infinite ends: forms that no later step can use)."""
    z = torch.zeros(l.shape[0], n0, *l.shape[1:], dtype=l.dtype, device=l.device)
    return torch.cat([z, l.unsqueeze(1)], 1), torch.cat([z, h.unsqueeze(1)], 1)


def _size(f: Forms, mx: Tensor, n0: int) -> Tensor:
    """``[B, *shape]``: a bound on ``|L(x)| + |U(x)|`` over the input box (``mx [B, n_0]``: the
    inputs' largest magnitudes), the sum of the magnitudes of the forms' terms."""
    L, U = f
    B = L.shape[0]
    mview = mx.view(B, n0, *([1] * (L.dim() - 2)))
    return ((L[:, :n0].abs() + U[:, :n0].abs()) * mview).sum(1) + L[:, n0].abs() + U[:, n0].abs()


def _concretize(f: Forms, lo: Tensor, hi: Tensor, mx: Tensor, n0: int) -> tuple[Tensor, Tensor]:
    """The forms' minimum of ``L`` and maximum of ``U`` over the input box, ``[B, *shape]``,
    widened by the round-off of the sums (``gamma_{n_0 + 1}`` times their terms)."""
    L, U = f
    B = L.shape[0]
    view = (B, n0) + (1,) * (L.dim() - 2)
    lo_, hi_ = lo.view(view), hi.view(view)
    Lw, Uw = L[:, :n0], U[:, :n0]
    low = (torch.where(Lw > 0, lo_, hi_) * Lw).sum(1) + L[:, n0]
    up = (torch.where(Uw > 0, hi_, lo_) * Uw).sum(1) + U[:, n0]
    g = gamma(n0 + 1, L.dtype)
    mview = mx.view(view)
    low = low - SAFETY * g * ((Lw.abs() * mview).sum(1) + L[:, n0].abs())
    up = up + SAFETY * g * ((Uw.abs() * mview).sum(1) + U[:, n0].abs())
    return torch.nan_to_num(low, nan=-math.inf), torch.nan_to_num(up, nan=math.inf)


def _step(n, ins: list[Forms], in_boxes: list[tuple[Tensor, Tensor]], mx: Tensor, n0: int) -> Forms | None:
    """The node's forms from its inputs' (None: the op is not handled, or a form is not finite)."""
    op = n.op
    if not finite(*[t for f in ins for t in f]):
        return None
    if op.kind == "product":
        return None if op.matmul else _product(n, ins, in_boxes, mx, n0)
    if op.nonlinear:
        if not getattr(op, "elementwise", False) or len(ins) != 1:
            return None
        return _activation(n, ins[0], in_boxes[0], mx, n0)
    if op.kind not in FORWARD_KINDS:
        return None
    L, U = _affine(op, ins, n.shape, n0)
    if getattr(op, "moves_only", False):
        return L, U
    nsum = sum_length([b[0].shape[1:] for b in in_boxes], n.shape, op)
    sizes = [_size(f, mx, n0) for f in ins]
    return _widen(L, U, SAFETY * gamma(nsum, L.dtype) * term_magnitude(op, [(-s, s) for s in sizes]), n0)


def _widen(L: Tensor, U: Tensor, err: Tensor, n0: int) -> Forms:
    """``L - err`` and ``U + err`` in the constants (``err [B, *shape]``), one ulp outward."""
    L[:, n0] = torch.nextafter(L[:, n0] - err, torch.tensor(-math.inf, dtype=L.dtype, device=L.device))
    U[:, n0] = torch.nextafter(U[:, n0] + err, torch.tensor(math.inf, dtype=U.dtype, device=U.device))
    return L, U


def _affine(op, ins: list[Forms], out_shape: tuple[int, ...], n0: int) -> Forms:
    """``W+ L + W- U + b`` and ``W+ U + W- L + b`` of an affine op, ``[B, n_0 + 1, *out]`` (new tensors)."""
    (L, U), B, k = ins[0], ins[0][0].shape[0], n0 + 1
    kind = op.kind
    if kind in ("reshape", "permute", "reduce"):
        flat = lambda t: t.reshape(B * k, *t.shape[2:])  # noqa: E731
        return op.forward(flat(L)).reshape(B, k, *out_shape), op.forward(flat(U)).reshape(B, k, *out_shape)
    if kind == "select":
        cols = lambda i: tuple(f[i].reshape(B * k, *f[i].shape[2:]) for f in ins)  # noqa: E731
        keep = op.from_input.to(L.device).reshape(out_shape)
        gl, gh = (op.forward(*cols(i)).reshape(B, k, *out_shape) for i in (0, 1))
        zero = torch.zeros((), dtype=L.dtype, device=L.device)
        gl[:, :n0], gh[:, :n0] = torch.where(keep, gl[:, :n0], zero), torch.where(keep, gh[:, :n0], zero)
        return gl, gh
    if kind == "add":
        lo_sum = hi_sum = None
        for s, (Li, Ui) in zip(op.signs, ins):
            Li, Ui = (_pad(t, len(out_shape)) for t in (Li, Ui))
            a, b = (Li, Ui) if s > 0 else (-Ui, -Li)
            lo_sum, hi_sum = (a, b) if lo_sum is None or hi_sum is None else (lo_sum + a, hi_sum + b)
        assert lo_sum is not None and hi_sum is not None
        return lo_sum + 0, hi_sum + 0
    if kind == "elementwise affine":
        s, t = op.scale, op.shift
        L, U = _pad(L, len(out_shape)), _pad(U, len(out_shape))
        if s is None:
            Ln, Un = L.clone(), U.clone()
        else:
            sp, sn = s.clamp(min=0), s.clamp(max=0)
            Ln, Un = L * sp + U * sn, U * sp + L * sn
        if t is not None:
            Ln[:, n0] = Ln[:, n0] + t
            Un[:, n0] = Un[:, n0] + t
        return Ln, Un
    Wp, Wn = op.W.clamp(min=0), op.W.clamp(max=0)
    if kind == "linear":
        Ln, Un = F.linear(L, Wp) + F.linear(U, Wn), F.linear(U, Wp) + F.linear(L, Wn)
    else:  # conv, conv_transpose: the columns batched
        flat = lambda t: t.reshape(B * k, *t.shape[2:])  # noqa: E731
        Ln = (op._c(flat(L), Wp, None) + op._c(flat(U), Wn, None)).reshape(B, k, *out_shape)
        Un = (op._c(flat(U), Wp, None) + op._c(flat(L), Wn, None)).reshape(B, k, *out_shape)
    if op.b is not None:
        b = op.forward(torch.zeros(1, *L.shape[2:], dtype=L.dtype, device=L.device))[0]  # the bias on the output
        Ln[:, n0] = Ln[:, n0] + b
        Un[:, n0] = Un[:, n0] + b
    return Ln, Un


def _pad(t: Tensor, rank: int) -> Tensor:
    """``[B, k, *shape]`` with ones inserted after ``k`` up to ``rank`` per-example dims (per-example broadcasting)."""
    return t.reshape(t.shape[0], t.shape[1], *([1] * (rank - (t.dim() - 2))), *t.shape[2:])


def _per_example(t: Tensor, rank: int) -> Tensor:
    """A box ``[B, *shape]`` as ``[B, 1, *ones, *shape]`` with ``rank`` per-example dims (broadcasts against forms)."""
    return t.reshape(t.shape[0], 1, *([1] * (rank - (t.dim() - 1))), *t.shape[1:])


def _product(n, ins: list[Forms], in_boxes: list[tuple[Tensor, Tensor]], mx: Tensor, n0: int) -> Forms | None:
    """Through an elementwise product ``x * y`` (broadcasting) by its McCormick planes on the
    inputs' boxes (:mod:`relax.ir.ops.product`): ``x y >= ly x + lx y - lx ly`` and
    ``x y <= uy x + lx y - lx uy``, each term's sign choosing which form of ``x`` / ``y`` bounds it."""
    (lx, ux), (ly, uy) = in_boxes
    if not finite(lx, ux, ly, uy):
        return None
    r = len(n.shape)
    (Lx, Ux), (Ly, Uy) = ((_pad(L, r), _pad(U, r)) for L, U in ins)
    lx_, ly_, uy_ = (_per_example(t, r) for t in (lx, ly, uy))
    pos = lambda t: t.clamp(min=0)  # noqa: E731
    neg = lambda t: t.clamp(max=0)  # noqa: E731
    Ln = pos(ly_) * Lx + neg(ly_) * Ux + pos(lx_) * Ly + neg(lx_) * Uy
    Un = pos(uy_) * Ux + neg(uy_) * Lx + pos(lx_) * Uy + neg(lx_) * Ly
    Ln[:, n0] = Ln[:, n0] - (lx_ * ly_)[:, 0]
    Un[:, n0] = Un[:, n0] - (lx_ * uy_)[:, 0]
    # each number is a sum of at most three rounded products: gamma_3 times the terms' sizes over the box
    sx, sy = (_per_example(_size(f, mx, n0), r)[:, 0] for f in ins)
    a, c = _per_example(torch.maximum(ly.abs(), uy.abs()), r)[:, 0], lx_[:, 0].abs()
    return _widen(Ln, Un, SAFETY * gamma(3, Ln.dtype) * (a * sx + c * sy + c * a), n0)


def _activation(n, f: Forms, box: tuple[Tensor, Tensor], mx: Tensor, n0: int) -> Forms | None:
    """Through an elementwise activation's relaxation lines on the input's box."""
    l, h = box
    if not finite(l, h):
        return None
    r = n.op.relax(l, h, "crown")
    if not finite(r.lw, r.lb, r.uw, r.ub):
        return None
    L, U = f
    lw, uw = r.lw.unsqueeze(1), r.uw.unsqueeze(1)
    Ln = lw.clamp(min=0) * L + lw.clamp(max=0) * U
    Un = uw.clamp(min=0) * U + uw.clamp(max=0) * L
    Ln[:, n0] = Ln[:, n0] + r.lb
    Un[:, n0] = Un[:, n0] + r.ub
    slope = torch.maximum(r.lw.abs(), r.uw.abs())
    # the lines are built from rounded boxes: their round-off counts the input's size too (as term_magnitude does)
    g = gamma(sum_length([tuple(l.shape[1:])], n.shape), L.dtype)
    return _widen(Ln, Un, SAFETY * g * (slope * _size(f, mx, n0) + r.lb.abs() + r.ub.abs() + max_abs(l, h)), n0)


#: forward bounds serve as a CROWN pass's boxes when the boxes have at most this many free inputs
#: (``n_0 + 1`` columns per node against one backward pass per unstable neuron)
MAX_INPUTS = 32
#: ... and some pre-activation has at least this many neurons per column: below, CROWN's own
#: intermediate bounds are cheap already (ACAS Xu: 50-neuron layers, a pass of 64 boxes 0.1 s),
#: and the forward boxes, which leave fewer neurons to CROWN, change its adaptive ReLU slopes
#: (measured: 85 of 256 ACAS Xu rows' bounds lower, 7 higher, on 64 sub-boxes; one input-split
#: search 3,647 -> 72,639 domains)
MIN_WIDTH_PER_COLUMN = 256
#: numbers of the largest node's forms per chunk of the batch (``[b, n_0 + 1, *shape]``)
CHUNK_ELEMENTS = 2**22


def forward_boxes(graph: BoundGraph, lo: Tensor, hi: Tensor, known: dict[str, tuple[Tensor, Tensor]] | None = None
                  ) -> dict[str, tuple[Tensor, Tensor]] | None:
    """:func:`forward_bounds` of the pre-activations for boxes with at most :data:`MAX_INPUTS`
    free inputs (``n_0``, :func:`free_count`: the others fixed by the box) on networks with some
    nonlinear op and a pre-activation of at least :data:`MIN_WIDTH_PER_COLUMN` ``* (n_0 + 1)``
    neurons (else None), computed in chunks of the batch; ``known``: boxes ``[B, *shape]`` to
    intersect with."""
    n0 = free_count(lo, hi)
    if n0 > MAX_INPUTS or not graph.activations():
        return None
    if max(math.prod(graph.shape(p)) for p in graph.preactivations()) < MIN_WIDTH_PER_COLUMN * (n0 + 1):
        return None
    widest = max([n0] + [math.prod(n.shape) for n in graph.nodes])
    step = max(1, CHUNK_ELEMENTS // ((n0 + 1) * widest))
    B = lo.shape[0]
    wanted = graph.preactivations()
    parts: list[dict[str, tuple[Tensor, Tensor]]] = []
    with torch.no_grad():
        for b0 in range(0, B, step):
            sl = slice(b0, min(B, b0 + step))
            kn = None if known is None else {k: (l[sl] if l.shape[0] == B else l, h[sl] if h.shape[0] == B else h)
                                             for k, (l, h) in known.items()}
            got = forward_bounds(graph, lo[sl], hi[sl], kn)
            parts.append({p: got[p] for p in wanted})
    if len(parts) == 1:
        return parts[0]
    return {p: (torch.cat([q[p][0] for q in parts]), torch.cat([q[p][1] for q in parts])) for p in wanted}
