"""CROWN and alpha-CROWN for ReLU chains, with the stable neurons of each input pruned.

For a network that is a chain ``z_1 = W_0 x + b_0, a_k = relu(z_k), z_{k+1} = W_k a_k + b_k``
(fully connected nets such as VNN-COMP's mnistfc and ERAN's MLPs), the bounds of
:func:`relax.linear.crown` and :func:`relax.alpha.alpha_crown` are computed here with far
fewer flops, same strategy and same numbers (up to round-off):

* a neuron that is **dead** on an input's box (``u <= 0``) has ``relu = 0`` exactly: its column
  drops out of every backward product of that input; an **active** one (``l >= 0``) is the
  identity. So each input keeps only its *alive* neurons ``{u > 0}`` per layer, and the
  backward products use ``W_k[alive_{k+1}, alive_k]`` (on mnistfc at eps 0.03, 20-60 % of the
  neurons of a layer are alive per input, while the union over a batch is nearly all);
* rows are started only at neurons that are unstable (``l < 0 < u``) under the current box,
  as in :func:`relax.linear.rows_needed`.

The per-input index sets are padded to the largest count in the batch (index ``n`` points at
an extra zero row / column of the padded weights), so each layer is one batched matmul
``[B, R, m_k] @ [B, m_k, m_{k-1}]``: no Python loop over inputs, the same code on CUDA.

Intermediate boxes are CROWN bounds intersected with IBP boxes computed from the tightened
boxes before them; the first layer's box is exact IBP on a box / l_inf input set. The output
bound is intersected with the IBP bound of ``C y``. alpha-CROWN follows :mod:`relax.alpha`
(one alpha per start, ReLU layer, row, input and neuron; intermediate boxes recomputed with
their own alphas each iteration and intersected with the CROWN boxes; Adam with projection and
learning-rate decay; best bound per row kept, so never looser than CROWN; early stop freezes
an input's bounds).

Soundness does not depend on the pruning being tight: a neuron is dropped only when its box
says ``u <= 0``, and the boxes are sound bounds. Round-off is bounded as in :mod:`relax.linear`
(:mod:`relax.roundoff`): every IBP box is widened by ``gamma_n (|W| M + |b|)``, every backward
pass accumulates ``gamma_n |A| (|W| M + |b| + |intercept|)`` per layer (``M``: the magnitude
of the layer's input on its box) and its concretisation's error, and returns its lower bound
minus ``SAFETY`` times that sum; so the bounds hold for the exact network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from verify.deadline import Deadline
from verify.spec import InputSet, LpBall

from .adam import ProjectedAdam
from .alpha import all_rows_positive
from .graph import BoundGraph
from .linear import concretize
from .ops import ElemAffine, Linear, ReLU, Reshape
from .roundoff import SAFETY, gamma

__all__ = ["ReluChain", "chain_of", "chain_crown", "chain_alpha_crown"]


@dataclass
class ReluChain:
    """``Ws[k]``: ``[n_{k+1}, n_k]``, ``bs[k]``: ``[n_{k+1}]``; a ReLU after every layer but the
    last. ``Wp``/``bp``: the same padded with a zero last row and column / entry."""

    Ws: list[Tensor]
    bs: list[Tensor]
    #: round-off bound of the folded first-layer bias ``b + W shift`` ([n_1]), zeros if none
    fold_err: Tensor | None = None

    def __post_init__(self) -> None:
        self.Wp = [F.pad(W, (0, 1, 0, 1)) for W in self.Ws]
        self.bp = [F.pad(b, (0, 1)) for b in self.bs]
        self.absWt = [W.abs().t().contiguous() for W in self.Ws]
        # |b| per layer (the first also carries the fold's round-off), padded like bp
        abs_b = [b.abs() for b in self.bs]
        if self.fold_err is not None:
            abs_b[0] = abs_b[0] + self.fold_err
        self.abs_b = abs_b
        self.abs_bp = [F.pad(b, (0, 1)) for b in abs_b]
        self.gammas = [gamma(max(W.shape), W.dtype) for W in self.Ws]

    @property
    def depth(self) -> int:
        return len(self.Ws)


def chain_of(graph: BoundGraph) -> ReluChain | None:
    """The graph as a :class:`ReluChain` (cached on the graph), or None when it is not one:
    elementwise affine ops and reshapes before the first Linear are folded into it, elementwise
    affine ops after a Linear into that Linear; any other op (conv, sigmoid, residual add, ...)
    means no chain."""
    cache = graph.__dict__.setdefault("_relu_chain", {})
    if "chain" not in cache:
        cache["chain"] = _extract(graph)
    return cache["chain"]


def _extract(graph: BoundGraph) -> ReluChain | None:
    n0 = math.prod(graph.input_shape)
    dt = graph.dtype
    first = next((n.op for n in graph.nodes if isinstance(n.op, Linear)), None)
    if first is None:
        return None
    dev = first.W.device
    scale = torch.ones(n0, dtype=dt, device=dev)  # prefix x -> x * scale + shift (flattened)
    shift = torch.zeros(n0, dtype=dt, device=dev)
    shape = graph.input_shape
    prev = graph.input_name
    Ws: list[Tensor] = []
    bs: list[Tensor] = []
    fold_err = None
    want_relu = False
    for n in graph.nodes:
        if n.inputs != [prev]:
            return None
        op = n.op
        if isinstance(op, Reshape):
            if Ws and len(n.shape) != 1:
                return None
        elif isinstance(op, ElemAffine):
            s = torch.ones(shape, dtype=dt, device=dev) if op.scale is None else op.scale.to(dt).expand(shape)
            t = torch.zeros(shape, dtype=dt, device=dev) if op.shift is None else op.shift.to(dt).expand(shape)
            s, t = s.reshape(-1), t.reshape(-1)
            if not Ws:
                scale, shift = scale * s, shift * s + t
            elif want_relu:  # after a Linear, before its ReLU: fold into that Linear
                Ws[-1], bs[-1] = Ws[-1] * s.unsqueeze(1), bs[-1] * s + t
            else:
                return None
        elif isinstance(op, Linear):
            if op.W.dim() != 2 or len(n.shape) != 1 or want_relu:
                return None
            W = op.W.to(dt)
            b = torch.zeros(W.shape[0], dtype=dt, device=dev) if op.b is None else op.b.to(dt)
            if not Ws:
                fold_err = gamma(n0 + 1, dt) * (W.abs() @ shift.abs() + b.abs())
                W, b = W * scale.unsqueeze(0), b + W @ shift
            Ws.append(W)
            bs.append(b)
            want_relu = True
        elif isinstance(op, ReLU):
            if not want_relu:
                return None
            want_relu = False
        else:
            return None
        shape = n.shape
        prev = n.name
    if prev != graph.output or not Ws or Ws[0].shape[1] != n0:
        return None
    dev = Ws[0].device
    if not want_relu:  # the output is a ReLU (ERAN's nets): an identity layer after it
        K = Ws[-1].shape[0]
        Ws.append(torch.eye(K, dtype=dt, device=dev))
        bs.append(torch.zeros(K, dtype=dt, device=dev))
    return ReluChain(Ws, bs, fold_err)


# ----------------------------------------------------------------------------- per-input layers


def _padded_index(mask: Tensor) -> Tensor:
    """``mask [B, n]`` -> ``[B, m]`` indices of its True entries in increasing order, padded
    with ``n`` (``m`` = the largest count, at least 1)."""
    B, n = mask.shape
    m = max(1, int(mask.sum(1).max()))
    key = torch.where(mask, torch.arange(n, device=mask.device), n + torch.arange(n, device=mask.device))
    idx = key.sort(dim=1).values[:, :m]
    return torch.where(idx < n, idx, torch.full_like(idx, n))


def _take(Wp: Tensor, rows: Tensor, cols: Tensor | None) -> Tensor:
    """Per input ``b``: padded weights ``Wp`` at rows ``rows[b]`` and columns ``cols[b]`` (all
    real columns when None): ``[B, r, c]``."""
    if rows.shape[0] == 1:  # one input: two index_selects beat advanced indexing
        out = Wp.index_select(0, rows[0])
        return (out[:, :-1] if cols is None else out.index_select(1, cols[0])).unsqueeze(0)
    return Wp[:, :-1][rows] if cols is None else Wp[rows.unsqueeze(2), cols.unsqueeze(1)]


def _gather(v: Tensor, idx: Tensor) -> Tensor:
    """``v [B, n]`` at ``idx [B, m]`` (pad index ``n`` -> 0)."""
    return F.pad(v, (0, 1)).gather(1, idx)


@dataclass
class _Layer:
    """ReLU layer k of a batch: alive indices ``[B, m]`` and, on them, the relaxation (``lo``
    default lower slope, ``up`` upper slope, ``icpt`` upper intercept, ``unstable``), the bias
    ``b`` of ``z_k`` and ``W`` = ``W_{k-1}`` restricted to (alive_k, alive_{k-1}): ``[B, m_k,
    m_{k-1}]`` (``[B, m_1, n_0]`` for the first layer)."""

    alive: Tensor
    unstable: Tensor
    lo: Tensor
    up: Tensor
    icpt: Tensor
    b: Tensor
    W: Tensor
    #: round-off weight ``gamma_n (|W| M_prev + |b| + |icpt|)`` per alive neuron ``[B, m_k]``
    err_w: Tensor | None = None


def _relax(l: Tensor, u: Tensor, alive: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lg, ug = _gather(l, alive), _gather(u, alive)
    unstable = (lg < 0) & (ug > 0)
    active = (lg >= 0) & (ug > 0)  # excludes the pads (0, 0)
    one = active.to(l.dtype)
    denom = torch.where(unstable, ug - lg, torch.ones_like(ug))
    up = torch.where(unstable, ug / denom, one)
    icpt = torch.where(unstable, -up * lg, torch.zeros_like(lg))
    lo = torch.where(unstable, (ug > -lg).to(l.dtype), one)
    return unstable, lo, up, icpt


def _layer(net: ReluChain, k: int, l: Tensor, u: Tensor, prev: Tensor | None, prev_mag: Tensor,
           cache: dict | None = None) -> _Layer:
    """Layer ``k`` (1-based) from its box ``l, u [B, n_k]``; ``prev``: alive indices of layer
    ``k - 1`` (None for k = 1); ``prev_mag``: magnitude bound of that layer's output on those
    indices (of the input for k = 1). ``cache``: alive set and gathered weights kept across
    calls whose boxes only shrink (alpha-CROWN iterations: a dead neuron stays dead)."""
    hit = None if cache is None else cache.get(("layer", k))
    if hit is None:
        alive = _padded_index(u > 0)
        W = _take(net.Wp[k - 1], alive, prev)  # [B, m_k, m_{k-1} or n_0]
        hit = (alive, W, net.bp[k - 1][alive])
        if cache is not None:
            cache[("layer", k)] = hit
    alive, W, b = hit
    unstable, lo, up, icpt = _relax(l, u, alive)
    # the round-off weight: computed once per cache (boxes within a cache only shrink, so the
    # magnitudes of the first boxes bound every later pass's)
    err_w = None if cache is None else cache.get(("err_w", k))
    if err_w is None:
        with torch.no_grad():
            terms = torch.bmm(W.abs(), prev_mag.unsqueeze(2)).squeeze(2) + net.abs_bp[k - 1][alive] + icpt.abs()
            err_w = net.gammas[k - 1] * terms
        if cache is not None:
            cache[("err_w", k)] = err_w
    return _Layer(alive, unstable, lo, up, icpt, b, W, err_w)


def _out_mag(layer: _Layer, l: Tensor, u: Tensor) -> Tensor:
    """Magnitude bound of the relu outputs of a layer on its alive indices ``[B, m]``."""
    return _gather(torch.maximum(l.abs(), u.abs()), layer.alive)


def _backward(
    A: Tensor, c: Tensor, layers: list[_Layer], input_set: InputSet, alphas: list[Tensor | None] | None,
    center: Tensor, rad: Tensor, err0: Tensor | None = None,
) -> Tensor:
    """Lower bound ``[B, R]`` of rows with coefficients ``A [B, R, m_j]`` on the alive
    ``a_j`` of the last of ``layers`` (constant ``c [B, R]``), back to the input, lowered by
    the round-off bound of the pass (``err0 [B, R]``: round-off already in ``A`` and ``c``)."""
    err = torch.zeros_like(c) if err0 is None else err0
    for j in range(len(layers) - 1, -1, -1):
        L = layers[j]
        err = err + torch.bmm(A.detach().abs(), L.err_w.unsqueeze(2)).squeeze(2)
        lo = L.lo.unsqueeze(1)
        a = None if alphas is None else alphas[j]
        if a is not None:
            lo = torch.where(L.unstable.unsqueeze(1), a, lo)
        # lower line where A >= 0, upper line where A < 0: A lo + min(A, 0) (up - lo)
        An = A.clamp(max=0)
        A = A * lo + An * (L.up.unsqueeze(1) - lo)
        c = c + torch.bmm(An, L.icpt.unsqueeze(2)).squeeze(2) + torch.bmm(A, L.b.unsqueeze(2)).squeeze(2)
        A = torch.bmm(A, L.W)
    mag = center.abs() + rad
    if isinstance(input_set, LpBall) and not math.isinf(input_set.p):
        mag = mag + input_set.eps.to(mag.dtype).view(-1, 1)
    err = err + gamma(A.shape[2], A.dtype) * torch.bmm(A.detach().abs(), mag.unsqueeze(2)).squeeze(2)
    return _concretize(A, c, input_set, center, rad) - SAFETY * err - torch.finfo(c.dtype).tiny


def _concretize(A: Tensor, c: Tensor, input_set: InputSet, center: Tensor, rad: Tensor) -> Tensor:
    """``min A x + c`` over the input set: ``A [B, R, n_0]``."""
    if isinstance(input_set, LpBall) and not math.isinf(input_set.p):
        return concretize(A.transpose(0, 1), c.t(), input_set).t()
    return c + torch.bmm(A, center.unsqueeze(2)).squeeze(2) - torch.bmm(A.abs(), rad.unsqueeze(2)).squeeze(2)


def _ibp_input(net: ReluChain, center: Tensor, rad: Tensor) -> tuple[Tensor, Tensor]:
    """Box of ``z_1 = W_0 x + b_0`` over the input box ``center +- rad`` (exact up to the
    round-off it is widened by)."""
    m = F.linear(center, net.Ws[0], net.bs[0])
    r = rad @ net.absWt[0]
    w = net.gammas[0] * ((center.abs() + rad) @ net.absWt[0] + net.abs_b[0])
    return m - r - w, m + r + w


def _ibp(net: ReluChain, k: int, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """IBP box of ``z_{k+1}`` from the box of ``z_k`` (k >= 1) through relu and layer k,
    widened by its round-off bound."""
    lo, hi = l.clamp(min=0), u.clamp(min=0)
    m = F.linear((hi + lo) / 2, net.Ws[k], net.bs[k])
    r = ((hi - lo) / 2) @ net.absWt[k]
    w = net.gammas[k] * (hi @ net.absWt[k] + net.abs_b[k])
    return m - r - w, m + r + w


def _start_rows(net: ReluChain, k: int, idx: Tensor, layers: list[_Layer], cache: dict | None = None) -> tuple[Tensor, Tensor]:
    """Rows ``+e_i`` then ``-e_i`` of ``z_k`` for ``idx [B, r]`` (padded) as coefficients on the
    alive ``a_{k-1}`` (on ``x`` for k = 1): ``A [B, 2r, m]``, ``c [B, 2r]``."""
    if cache is not None:
        if ("rows", k) not in cache:
            cache[("rows", k)] = _start_rows(net, k, idx, layers)
        return cache[("rows", k)]
    A = _take(net.Wp[k - 1], idx, None if k == 1 else layers[k - 2].alive)
    c = net.bp[k - 1][idx]
    return torch.cat([A, -A], 1), torch.cat([c, -c], 1)


def _chunks(R: int, B: int, width: int, max_elements: int) -> list[slice]:
    step = max(1, max_elements // max(1, B * width))
    return [slice(s, min(R, s + step)) for s in range(0, R, step)]


def _bound_rows(
    net: ReluChain, k: int, idx: Tensor, layers: list[_Layer], input_set: InputSet, center: Tensor, rad: Tensor,
    max_elements: int, alphas: list[Tensor | None] | None = None, cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """CROWN lower / upper bounds ``[B, r]`` of ``z_k`` at ``idx [B, r]``."""
    A, c = _start_rows(net, k, idx, layers, cache)
    r = idx.shape[1]
    width = max([A.shape[2]] + [L.W.shape[2] for L in layers[: k - 1]])
    parts = []
    for sl in _chunks(2 * r, idx.shape[0], width, max_elements):
        al = None if alphas is None else [None if a is None else a[:, sl] for a in alphas]
        parts.append(_backward(A[:, sl], c[:, sl], layers[: k - 1], input_set, al, center, rad))
    low = torch.cat(parts, 1)
    return low[:, :r], -low[:, r:]


def _put(v: Tensor, idx: Tensor, new: Tensor, better: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``v [B, n]`` with ``v[b, idx[b, i]] = better(v[b, idx], new)`` (pads ignored)."""
    vp = F.pad(v, (0, 1))
    return vp.scatter(1, idx, better(vp.gather(1, idx), new))[:, :-1]


@dataclass
class ChainResult:
    """``lower [B, N]``; the boxes ``[(l_k, u_k)]`` of the ReLU layers and their ``layers``."""

    lower: Tensor
    boxes: list[tuple[Tensor, Tensor]]
    layers: list[_Layer]


def _pass(
    net: ReluChain, input_set: InputSet, C: Tensor, max_elements: int,
    fixed: list[tuple[Tensor, Tensor]] | None = None, plan: list[Tensor | None] | None = None,
    alphas: dict | None = None, cache: dict | None = None,
) -> ChainResult:
    """One CROWN pass (with ``alphas``: one alpha-CROWN evaluation). ``fixed``: boxes every
    computed box is intersected with (alive sets then taken from them), used as they are when
    ``plan`` is None; ``plan``: the row indices per layer (None entries: no rows)."""
    lo_in, hi_in = input_set.bounds()
    B = lo_in.shape[0]
    x_lo, x_hi = lo_in.reshape(B, -1), hi_in.reshape(B, -1)
    center, rad = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2
    box_input = not (isinstance(input_set, LpBall) and not math.isinf(input_set.p))
    boxes: list[tuple[Tensor, Tensor]] = []
    layers: list[_Layer] = []
    for k in range(1, net.depth):
        if fixed is not None and plan is None:  # boxes given: only the output rows are bounded
            l, u = fixed[k - 1]
            boxes.append((l, u))
            layers.append(_layer(net, k, l, u, *_prev(layers, boxes, center, rad), cache))
            continue
        if k == 1:
            l, u = _ibp_input(net, center, rad)
        else:
            l, u = _ibp(net, k - 1, *boxes[-1])
        if fixed is not None:
            l, u = l.maximum(fixed[k - 1][0]), u.minimum(fixed[k - 1][1])
        if not (k == 1 and box_input):
            # rows: the plan's (alpha-CROWN; None = no unstable neuron), else the unstable ones
            idx = plan[k - 1] if plan is not None and k > 1 else _padded_index((l < 0) & (u > 0))
            if idx is not None and bool((idx < l.shape[1]).any()):
                al = None if alphas is None else alphas.get(k)
                nl, nu = _bound_rows(net, k, idx, layers, input_set, center, rad, max_elements, al, cache)
                l, u = _put(l, idx, nl, torch.maximum), _put(u, idx, nu, torch.minimum)
            if fixed is not None:
                l, u = l.maximum(fixed[k - 1][0]), u.minimum(fixed[k - 1][1])
        boxes.append((l, u))
        layers.append(_layer(net, k, l, u, *_prev(layers, boxes, center, rad), cache))
    # the output rows
    if layers:
        Lw = net.Wp[-1][:-1]  # [K, n_{L-1} + 1]: zero last column for the pads
        A = torch.bmm(C, Lw[:, layers[-1].alive].permute(1, 0, 2))  # coefficients on the alive a_{L-1}
        ol, ou = _ibp(net, net.depth - 1, *boxes[-1])
    else:
        A = torch.bmm(C, net.Ws[0].expand(B, *net.Ws[0].shape))
        ol, ou = _ibp_input(net, center, rad)
    c = C @ net.bs[-1]
    # round-off of A = C W_L and c = C b_L: gamma_K |C| (|W_L| M + |b_L|)
    prev_mag = _out_mag(layers[-1], *boxes[-1]) if layers else center.abs() + rad
    Wl = net.Wp[-1][:-1][:, layers[-1].alive].permute(1, 0, 2) if layers else net.Ws[0].expand(B, *net.Ws[0].shape)
    t_out = torch.bmm(Wl.abs(), prev_mag.unsqueeze(2)).squeeze(2) + net.abs_b[-1]
    err0 = gamma(C.shape[2], C.dtype) * torch.bmm(C.abs(), t_out.unsqueeze(2)).squeeze(2)
    width = max([A.shape[2]] + [L.W.shape[2] for L in layers])
    parts = []
    for sl in _chunks(C.shape[1], B, width, max_elements):
        al = None if alphas is None else [None if a is None else a[:, sl] for a in alphas.get("out", [])] or None
        parts.append(_backward(A[:, sl], c[:, sl], layers, input_set, al, center, rad, err0[:, sl]))
    low = torch.cat(parts, 1)
    om, orad = (ou + ol) / 2, (ou - ol) / 2
    ibp_low = torch.bmm(C, om.unsqueeze(2)).squeeze(2) - torch.bmm(C.abs(), orad.unsqueeze(2)).squeeze(2)
    ibp_err = gamma(C.shape[2], C.dtype) * torch.bmm(C.abs(), torch.maximum(ol.abs(), ou.abs()).unsqueeze(2)).squeeze(2)
    ibp_low = ibp_low - SAFETY * ibp_err - torch.finfo(C.dtype).tiny
    return ChainResult(torch.maximum(low, ibp_low), boxes, layers)


def _prev(layers: list[_Layer], boxes: list[tuple[Tensor, Tensor]], center: Tensor, rad: Tensor) -> tuple[Tensor | None, Tensor]:
    """Alive indices and output magnitudes of the layer before the next one (the input's
    magnitude before the first)."""
    if not layers:
        return None, center.abs() + rad
    return layers[-1].alive, _out_mag(layers[-1], *boxes[-2])


#: weights (multiply-adds per row) from which a net is bounded one input at a time on the CPU
PER_INPUT_MIN_WEIGHTS = 100_000


def _per_input(net: ReluChain, input_set: InputSet, per_input: bool | None) -> bool:
    """One input at a time on the CPU for nets with many weights (no padding: the alive counts
    of a batch's inputs differ by 10x and more; mnistfc: 3x faster), the padded batch for small
    nets (Python overhead per input dominates: 20-30x slower one by one on the digits MLP) and
    on other devices (a GPU hides the padding)."""
    if per_input is not None:
        return per_input
    big = sum(W.numel() for W in net.Ws) >= PER_INPUT_MIN_WEIGHTS
    return big and input_set.bounds()[0].device.type == "cpu" and input_set.batch_size > 1


def chain_crown(net: ReluChain, input_set: InputSet, C: Tensor, max_elements: int = 2**25, per_input: bool | None = None) -> Tensor:
    """CROWN lower bounds ``[B, N]`` of ``C y`` (``C [B, N, K]``) on a ReLU chain."""
    if _per_input(net, input_set, per_input):
        return torch.cat([_pass(net, input_set.select([i]), C[i : i + 1], max_elements).lower for i in range(C.shape[0])])
    return _pass(net, input_set, C, max_elements).lower


def chain_alpha_crown(
    net: ReluChain,
    input_set: InputSet,
    C: Tensor,
    *,
    iterations: int = 20,
    lr: float = 0.1,
    lr_decay: float = 0.98,
    optimize_intermediate: bool = True,
    early_stop: bool = False,
    stop_fn: Callable[[Tensor], Tensor] | None = None,
    max_elements: int = 2**25,
    per_input: bool | None = None,
    deadline: Deadline | None = None,
) -> Tensor:
    """alpha-CROWN lower bounds ``[B, N]`` of ``C y`` on a ReLU chain; the options as in
    :func:`relax.alpha.alpha_crown` (``stop_fn`` sees the whole batch's ``[B, N]`` bounds)."""
    B, N = C.shape[:2]
    if stop_fn is None:
        stop_fn = all_rows_positive
    kw = dict(iterations=iterations, lr=lr, lr_decay=lr_decay, optimize_intermediate=optimize_intermediate,
              early_stop=early_stop, max_elements=max_elements, deadline=deadline)
    if not _per_input(net, input_set, per_input):
        return _alpha(net, input_set, C, stop_fn=stop_fn, **kw)
    # CPU: one input at a time (grouping inputs of similar sizes was measured: no faster)
    out = []
    for i in range(B):
        def stop_i(low: Tensor, i: int = i) -> Tensor:
            full = torch.full((B, N), -math.inf, dtype=low.dtype, device=low.device)
            full[i] = low[0]
            return stop_fn(full)[i : i + 1]

        out.append(_alpha(net, input_set.select([i]), C[i : i + 1], stop_fn=stop_i, **kw))
    return torch.cat(out)


def _alpha(
    net: ReluChain, input_set: InputSet, C: Tensor, *, iterations: int, lr: float, lr_decay: float,
    optimize_intermediate: bool, early_stop: bool, stop_fn: Callable[[Tensor], Tensor], max_elements: int,
    deadline: Deadline | None = None,
) -> Tensor:
    with torch.no_grad():
        init = _pass(net, input_set, C, max_elements)
    best = init.lower.clone()
    B = best.shape[0]
    done_b = stop_fn(best) if early_stop else torch.zeros(B, dtype=torch.bool, device=best.device)
    if iterations <= 0 or net.depth < 2 or bool(done_b.all()):
        return best
    fixed = init.boxes
    plan: list[Tensor | None] = [None] * len(fixed)
    alphas: dict = {"out": [L.lo.unsqueeze(1).expand(B, C.shape[1], -1).clone() for L in init.layers]}
    if optimize_intermediate:
        for k in range(2, net.depth):
            l, u = fixed[k - 1]
            mask = (l < 0) & (u > 0)
            if bool(mask.any()):
                plan[k - 1] = _padded_index(mask)
                r2 = 2 * plan[k - 1].shape[1]
                alphas[k] = [L.lo.unsqueeze(1).expand(B, r2, -1).clone() for L in init.layers[: k - 1]]
    params = [a for v in alphas.values() for a in v]
    for a in params:
        a.requires_grad_(True)
    opt = ProjectedAdam(params, lr, lr_decay)
    # the alive sets of the CROWN boxes hold for every iteration (boxes are intersected with them)
    cache = {("layer", k + 1): (L.alive, L.W, L.b) for k, L in enumerate(init.layers)}
    cache.update({("err_w", k + 1): L.err_w for k, L in enumerate(init.layers)})
    for it in range(iterations):
        if deadline is not None and deadline.expired():  # best so far (>= CROWN's bounds)
            break
        with torch.enable_grad():
            res = _pass(net, input_set, C, max_elements, fixed=fixed, plan=plan if optimize_intermediate else None,
                        alphas=alphas, cache=cache)
            low = res.lower
            best = torch.where(done_b.unsqueeze(1), best, torch.maximum(best, low.detach()))
            if early_stop:
                done_b = done_b | stop_fn(best)
                if bool(done_b.all()):
                    break
            if it == iterations - 1:
                break
            loss = -(low * (~done_b).unsqueeze(1)).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        opt.step(grads)
    return best
