"""CROWN / DeepPoly backward linear bound propagation on a :class:`~relax.ir.graph.BoundGraph`.

One pass (Zhang et al. 2018, CROWN, Theorem 3.2; Singh et al. 2019, DeepPoly back-substitution)
computes *lower* bounds of ``A0 . z_start`` for a batch of row vectors ``A0 [S, B, *shape]``:
walking the graph backwards, affine ops map ``A`` through their transpose and nonlinear ops
through their linear relaxation (lower line where ``A >= 0``, upper line where ``A < 0``), until
``A . x + bias`` on the input is concretised over the input set (:func:`concretize`). An upper
bound is minus the lower bound of ``-A``: we stack ``[C; -C]`` as rows, so one code path serves
both and every row (and alpha) is independent.

Intermediate bounds (the pre-activation boxes the relaxations need) come layer by layer from
the same pass, started at each pre-activation node with rows ``+e_j`` and ``-e_j``, and are
intersected with IBP boxes (both are sound, so their intersection is). Only the neurons that
need it get rows: for a ReLU input, the neurons still unstable (``l < 0 < u``) under the
current best box (a stable ReLU is exact whatever its bounds); for Sigmoid / Tanh / MaxPool
inputs, all neurons. The (neuron, batch element) pairs form a virtual batch (no padding). A
pre-activation one affine layer from a box input keeps its (exact) IBP box.

Memory: rows are processed in chunks so that no coefficient tensor exceeds ``max_elements``.
On the CPU the chunks are smaller still, :data:`CACHE_ELEMENTS` (rows and, for the spec rows,
batch elements): a backward step reads and writes its coefficients several times (the
relaxation, the round-off term, the transposed op), and a chunk that stays in a core's cache
makes those passes 1.6-2.5x faster than one tensor of all rows (ACAS Xu input splitting, a
CIFAR CNN's and a ResNet's CROWN pass; ``benchmarks/RESULTS.md``). A pass that records an
autograd graph (alpha / beta steps) is cut by ``max_elements`` alone (see :func:`_chunk_limit`).
The intermediate rows of convolutional layers are carried as patches (each row's receptive field
only, :mod:`relax.bounds.patches`) where those are much smaller than the maps; same bounds.

**Round-off.** Every bound returned here holds for the exact network on the exact input set: each
backward step adds its round-off bound ``sum(|A| * weight)`` (:func:`relax.bounds.roundoff.backward_weight`,
from the boxes of the node's inputs), the concretisation adds its own, and the total (times
:data:`relax.bounds.roundoff.SAFETY`) is subtracted from the lower bound; interval boxes are widened the
same way (:mod:`relax.bounds.interval`).

**Branch-and-bound entry point.** :func:`crown` accepts ``bound_overrides = {node: (lo, hi)}``
(``[B, *shape]``, per batch element = per domain): they are intersected with the computed box
of that node before its relaxation is built, and the later layers are then bounded within the
tighter box. A ReLU split "neuron j of node p inactive/active in domain b" is
``hi[b, j] = 0`` / ``lo[b, j] = 0``. ``intermediate={node: (lo, hi)}`` instead *fixes* a node's
box (skips computing it; used by alpha-CROWN and to re-use bounds across BaB steps). A domain
whose box is empty (``lo > hi`` somewhere) is infeasible; its bounds are then vacuous.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from verify.deadline import Deadline, DeadlineExpired, stop_past
from verify.precision import ieee_float32
from verify.spec import InputSet, LpBall

from relax.ir.graph import BNode, BoundGraph
from relax.bounds.interval import interval_bounds
from relax.ir.ops import Relaxation, ReLU
from relax.bounds.concretize import concretize, concretize_rows
from relax.bounds.cone import cone_rows, spec_cone
from relax.bounds.dot import batch_first_dot
from relax.bounds.forward import forward_boxes
from relax.bounds.patches import (PaddedMaps, PatchPlan, chw_shape, dense_to_patches, patch_input_rows, patch_lower_bounds, patch_plan,
                                  patch_rows_lower_bounds, slopes_gatherable)
from relax.bounds.pairwise import PairwiseRows
from relax.bounds.roundoff import SAFETY, backward_weight, gamma, max_abs, step_error, sum_length

__all__ = ["CrownResult", "crown", "backward", "concretize", "rows_needed", "bound_node", "ibp_is_exact", "skips_linear_bounds",
           "Rows", "AlphaFn"]

#: ``alpha_fn(start_node, activation_node, rows) -> [S, B, *shape] | None``
AlphaFn = Callable[[str, str, slice | None], "Tensor | None"]


@dataclass
class Rows:
    """Start rows ``sign_s * e_{idx[s, b]}`` at a node (``idx [S, B]`` flat neuron indices,
    ``sign [S]``) without building the dense one-hot tensor."""

    idx: Tensor
    sign: Tensor

    def dense(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        S, B = self.idx.shape
        n = math.prod(shape)
        A = torch.zeros(S, B, n, dtype=dtype, device=self.idx.device)
        A.scatter_(2, self.idx.unsqueeze(-1), self.sign.to(dtype).view(S, 1, 1).expand(S, B, 1))
        return A.view(S, B, *shape)


@dataclass
class CrownResult:
    """``lower [B, N]`` (None without a spec), the pre-activation boxes ``intermediate``
    (``{node: (lo, hi)}``, ``[B, *shape]``) and the relaxations used."""

    lower: Tensor | None
    intermediate: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    relaxations: dict[str, Relaxation] = field(default_factory=dict)
    #: the round-off weights of the nodes (:func:`node_weights`) of the graph the pass ended on
    weights: dict[str, Tensor | None] = field(default_factory=dict)
    #: ``[B, N]``: the spec rows' linear bound alone (``lower`` is its max with the interval bound),
    #: the constant that goes with the input coefficients a pass records (``out_record``)
    linear_lower: Tensor | None = None

    def spec_lower(self) -> Tensor:
        """``lower`` of a pass that had spec rows ``C``."""
        assert self.lower is not None, "crown ran without spec rows"
        return self.lower


def backward(
    graph: BoundGraph,
    start: str,
    A0: Tensor | Rows,
    relax: dict[str, Relaxation],
    input_set: InputSet,
    alphas: dict[str, Tensor] | None = None,
    weights: dict[str, Tensor | None] | None = None,
    extra: dict[str, Tensor] | None = None,
    record: dict[str, Tensor | None] | None = None,
    clipped_ball: bool = False,
    stop_at: float | None = None,
) -> Tensor:
    """Lower bounds ``[S, B]`` of ``A0 . z_start + sum_p extra[p] . z_p`` over the input set.

    Args:
        start: node whose value the rows multiply.
        A0: ``[S, B, *shape(start)]`` or :class:`Rows`.
        relax: relaxation of every nonlinear ancestor of ``start``.
        alphas: ``{activation node: [S, B, *shape]}`` lower slopes replacing the relaxation's.
        weights: ``{node: [B, *shape]}`` round-off weights (:func:`node_weights`); the bound
            is then lowered by its round-off bound (a bound of the exact computation).
        extra: ``{node: [S, B, *shape]}`` coefficients on ancestors of ``start`` added to the
            expression (beta-CROWN's Lagrangian terms of split constraints, Wang et al. 2021).
        record: ``{node: None}``; filled with the (detached) coefficients ``[S, B, *shape]``
            reaching each listed node (branching scores).
        clipped_ball: concretise l_1 / l_2 balls clipped by their domain exactly
            (:func:`concretize`).
        stop_at: a hard deadline (``perf_counter`` value): :class:`DeadlineExpired` at the first
            node the pass reaches after it (for callers that discard a late bound).
    """
    A_in, bias, err = backward_form(graph, start, A0, relax, alphas, weights, extra, record, stop_at)
    return concretize_rows(A_in, bias, err, input_set, clipped_ball, weights is not None)


def backward_form(
    graph: BoundGraph,
    start: str,
    A0: Tensor | Rows,
    relax: dict[str, Relaxation],
    alphas: dict[str, Tensor] | None = None,
    weights: dict[str, Tensor | None] | None = None,
    extra: dict[str, Tensor] | None = None,
    record: dict[str, Tensor | None] | None = None,
    stop_at: float | None = None,
    until: str | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`backward` before the concretisation: the linear lower bound
    ``A0 . z_start >= A_in . x + bias - SAFETY * err`` on the input set, as ``A_in [S, B, *in]``,
    ``bias [S, B]`` and the round-off ``err`` (``[S, B]`` or broadcastable; ``None`` without
    ``weights``) of the steps so far (:func:`relax.bounds.concretize.backward_tail` adds the
    concretisation's own and subtracts the total). ``until``: a node on every path from
    ``start`` to the input (:func:`_patch_cut`); the pass stops there and ``A_in`` is its
    coefficients."""
    anc = _ancestors(graph, start)
    As, bias, err, start_done = _start_coefficients(graph, start, A0, weights)
    for n in reversed(graph.nodes):
        if n.name not in anc or (start_done and n.name == start):
            continue
        A = As.pop(n.name, None)
        if n.name == until and A is not None:
            As[graph.input_name] = A
            break
        if extra is not None and n.name in extra:
            A = extra[n.name] if A is None else A + extra[n.name]
        if A is None:
            continue
        stop_past(stop_at, f"backward pass stopped at node {n.name!r}")
        if record is not None and n.name in record:
            record[n.name] = A.detach()
        w = None if weights is None else weights.get(n.name)
        if w is not None:
            e = step_error(A.detach(), w)
            err = e if err is None else err + e
        A_ins, b = _through(n, A, relax, alphas)
        if b is not None:
            bias = b if bias is None else bias + b
        for name, Ai in zip(n.inputs, A_ins):
            if Ai is None:
                continue
            As[name] = Ai if name not in As else As[name] + Ai
    A_in = As.pop(graph.input_name)
    if record is not None and graph.input_name in record:
        record[graph.input_name] = A_in.detach()
    if bias is None:
        bias = torch.zeros(A_in.shape[:2], dtype=A_in.dtype, device=A_in.device)
    return A_in, bias, err


def _start_coefficients(graph: BoundGraph, start: str, A0: Tensor | Rows, weights: dict[str, Tensor | None] | None
                        ) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None, bool]:
    """:func:`backward`'s first step: the coefficients ``{node: [S, B, *shape]}`` the pass starts
    from, the bias ``[S, B]`` and round-off ``[S, B]`` so far (or None), and whether the start
    node's op is already applied (:class:`Rows` of an op with ``backward_rows``: the rows of its
    matrix directly, no one-hot product)."""
    node = graph.by_name[start]
    if not isinstance(A0, Rows):
        return {start: A0}, None, None, False
    rows_fn = getattr(node.op, "backward_rows", None)
    got = rows_fn(A0.idx, A0.sign) if rows_fn is not None else None
    if got is None:
        return {start: A0.dense(node.shape, graph.dtype)}, None, None, False
    (A_in,), bias = got
    err = None
    w = None if weights is None else weights.get(start)
    if w is not None:
        w = w.reshape(w.shape[0], -1)
        err = w.expand(A0.idx.shape[1], -1).gather(1, A0.idx.t()).t()  # a batch of one serves every row
    return {node.inputs[0]: A_in}, bias, err, True


def _through(n: BNode, A: Tensor, relax: dict[str, Relaxation], alphas: dict[str, Tensor] | None
             ) -> tuple[list[Tensor | None], Tensor | None]:
    """The coefficients ``A`` on node ``n``'s output mapped onto its inputs (a nonlinear op
    through its relaxation, with ``alphas``' lower slopes when given) and the bias it adds."""
    if n.op.nonlinear:
        alpha = None if alphas is None else alphas.get(n.name)
        A_in, b = n.op.backward_relaxed(A, relax[n.name], alpha)
        return (A_in if isinstance(A_in, list) else [A_in]), b
    return n.op.backward(A)


def node_weights(graph: BoundGraph, boxes: dict[str, tuple[Tensor, Tensor]], weights: dict[str, Tensor | None],
                 stop_at: float | None = None) -> None:
    """Add to ``weights`` the round-off weight (:func:`relax.bounds.roundoff.backward_weight`) of every
    node whose own and input boxes are in ``boxes`` and that has none yet (``stop_at``: a hard
    deadline, :class:`DeadlineExpired` before the first weight computed after it)."""
    for n in graph.nodes:
        if n.name in weights or n.name not in boxes or any(i not in boxes for i in n.inputs):
            continue
        stop_past(stop_at, f"round-off weights stopped at node {n.name!r}")
        ins = [boxes[i] for i in n.inputs]
        n_terms = sum_length([b[0].shape[1:] for b in ins], n.shape, n.op)
        weights[n.name] = backward_weight(n.op, ins, n_terms, ins[0][0].dtype)


def box_row_bounds(C: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Lower bounds ``[B, N]`` of ``C y`` over ``y`` in ``[lo, hi]`` (``C [B, N, K]``, boxes
    ``[B, K]``), lowered by the round-off bound of the two sums."""
    m, r = (hi + lo) / 2, (hi - lo) / 2
    low = batch_first_dot(C, m) - batch_first_dot(C.abs(), r)
    err = gamma(C.shape[-1] + 2, C.dtype) * batch_first_dot(C.abs(), max_abs(lo, hi))
    low = low - SAFETY * err - torch.finfo(low.dtype).tiny
    return torch.nan_to_num(low, nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # unbounded boxes: inf - inf


def _rows_through_inputs(n: BNode, C: Tensor, boxes: dict[str, tuple[Tensor, Tensor]], w: Tensor | None) -> Tensor:
    """Lower bounds ``[B, N]`` of the rows ``C [B, N, K]`` on the output of an affine op of several
    inputs (``rows_through_inputs``: a log-softmax's join) from its inputs' boxes: the op's
    backward step maps the rows onto each input (a difference of two log-softmax outputs onto the
    scores alone), each input's part is bounded on its box (an input without coefficients in a
    row adds 0 there, whatever its box), less the step's round-off (``w``: its weight)."""
    A_ins, bias = n.op.backward(C.transpose(0, 1))  # the rows as [N, B, K]
    low = torch.zeros(C.shape[:2], dtype=C.dtype, device=C.device) if bias is None else bias.transpose(0, 1)
    for A, name in zip(A_ins, n.inputs):
        if A is None:
            continue
        A = A.transpose(0, 1)
        used = (A != 0).any(-1)
        low = low + torch.where(used, box_row_bounds(A, *boxes[name]), torch.zeros_like(low))
    if w is not None:
        low = low - SAFETY * step_error(C.transpose(0, 1), w).transpose(0, 1)
    return low


def intersect_keeping_gradient(lo: Tensor, hi: Tensor, lo_known: Tensor, hi_known: Tensor) -> tuple[Tensor, Tensor]:
    """The box ``[max(lo, lo_known), min(hi, hi_known)]`` (all ``[...]``, broadcastable) whose
    gradient is that of ``(lo, hi)`` (straight through the intersection).

    Both boxes are sound, so the intersection is; the gradient matters to alpha-CROWN's
    optimisation of intermediate bounds: with plain ``max`` / ``min`` a neuron whose optimised
    bound is, after a step, looser than the known (CROWN / interval) one passes no gradient to
    its slopes any more, and those slopes stop improving (on a 6x200 sigmoid MLP the
    intermediate boxes then never tighten). Straight through, the slopes keep moving towards
    a tighter bound of their own while the value used is the better of the two.
    """
    new_lo, new_hi = torch.maximum(lo, lo_known), torch.minimum(hi, hi_known)
    if not (lo.requires_grad or hi.requires_grad):
        return new_lo, new_hi
    # value exactly new_lo (x - x is 0 for finite x; no rounding of a difference of large
    # numbers), gradient that of lo; an infinite end has no gradient to pass
    lo_st = torch.where(torch.isfinite(lo), new_lo.detach() + (lo - lo.detach()), new_lo)
    hi_st = torch.where(torch.isfinite(hi), new_hi.detach() + (hi - hi.detach()), new_hi)
    return lo_st, hi_st


def _ancestors(graph: BoundGraph, name: str) -> set[str]:
    cache = graph.__dict__.setdefault("_anc_cache", {})
    if name not in cache:
        cache[name] = graph.ancestors(name)
    return cache[name]


def rows_needed(graph: BoundGraph, node: str, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Which neurons of pre-activation ``node`` need linear bounds.

    Returns flat pairs ``(idx [T], bidx [T])``: neuron ``idx[t]`` of batch element ``bidx[t]``.
    All neurons when a non-ReLU op consumes the node, else the unstable ones (``lo < 0 < hi``).
    """
    B = lo.shape[0]
    l2, h2 = lo.reshape(B, -1), hi.reshape(B, -1)
    only_relu = all(isinstance(graph.by_name[c].op, ReLU) for c in graph.consumers[node])
    mask = (l2 < 0) & (h2 > 0) if only_relu else torch.ones_like(l2, dtype=torch.bool)
    bidx, idx = mask.nonzero(as_tuple=True)
    return idx, bidx


def _max_width(graph: BoundGraph, start: str) -> int:
    anc = _ancestors(graph, start)
    w = math.prod(graph.input_shape)
    for k in anc:
        if k != graph.input_name:
            w = max(w, graph.by_name[k].numel)
    return w


def ibp_is_exact(graph: BoundGraph, node: str, input_set: InputSet) -> bool:
    """Whether IBP already gives the exact box of ``node``: a box input set, and ``node``
    reached from the input by a chain of affine ops of which at most one mixes coordinates
    (Linear / Conv); CROWN's bound is then the same and is skipped."""
    if isinstance(input_set, LpBall) and not math.isinf(input_set.p):
        return False
    from relax.ir.ops import Conv, ElemAffine, Linear, Permute, Reshape

    mixing, k = 0, node
    while k != graph.input_name:
        n = graph.by_name[k]
        if len(n.inputs) != 1:
            return False
        if isinstance(n.op, (Linear, Conv)):
            mixing += 1
        elif not isinstance(n.op, (ElemAffine, Reshape, Permute)):
            return False
        k = n.inputs[0]
    return mixing <= 1


def _image_of_known(graph: BoundGraph, node: str, known: "dict[str, tuple[Tensor, Tensor]] | set[str]",
                    boxes: dict[str, tuple[Tensor, Tensor]] | None = None) -> bool:
    """Whether ``node``'s interval box is the exact image of boxes already known, so that no
    linear bound of it is tighter and none is computed. True when ``node``'s op computes each
    output entry from one entry of a single input whose box is exact (:func:`_exact_box`): an
    ``exact_image`` function (ReLU, sigmoid, tanh, exp, reciprocal, ...), an elementwise affine
    map or a move (reshape, transpose, selection), e.g. a ReLU output feeding a max-pooling,
    softmax's reciprocal feeding the product with the values, the affine and absolute-value
    steps of an imported OneHot. Any sound line through such a chain, concretised over a box
    that contains the known one, stays below the chain's minimum there, so the image is at
    least as tight (the box the engine would get is the same). Likewise an op marked
    ``box_from_input`` (softmax's pairwise differences: n - 1 times the rows of their input)
    takes the interval image of its input's box, intersected with the box
    :class:`~relax.bounds.pairwise.PairwiseRows` got from its input's linear bounds.
    ``boxes``: the interval boxes so far, where a sum of inputs of which all but one are single
    points (a constant offset) also counts as a move."""
    n = graph.by_name[node]
    if getattr(n.op, "box_from_input", False):
        return len(n.inputs) == 1 and n.inputs[0] in known
    ins = _per_entry(graph, n, boxes)
    return ins is not None and all(_exact_box(graph, i, known, boxes, {}) for i in ins)


def _per_entry(graph: BoundGraph, n: BNode, boxes: dict[str, tuple[Tensor, Tensor]] | None) -> list[str] | None:
    """The inputs of ``n`` whose boxes decide its box entry by entry (each output entry one
    input entry's image), or None when ``n`` is not such an op. A sum counts when all its
    inputs but one are constant offsets (:func:`_constant`): a linear bound of ``x + c`` is then
    below ``lo_x + hi_c`` (its part in ``x`` below ``lo_x``, which is as tight as any), so the
    image ``lo_x + lo_c`` gives up at most the width of ``c``'s box."""
    from relax.ir.ops import Add, ElemAffine, Select

    op = n.op
    if len(n.inputs) == 1 and (getattr(op, "exact_image", False) or isinstance(op, ElemAffine) or op.moves_only):
        return list(n.inputs)
    if isinstance(op, Select):
        return list(n.inputs)
    if isinstance(op, Add) and boxes is not None and all(i in boxes for i in n.inputs):
        varying = [i for i in n.inputs if not _constant(*boxes[i])]
        return varying if len(varying) <= 1 else None
    return None


def _constant(lo: Tensor, hi: Tensor) -> bool:
    """Whether every entry of the box ``[lo, hi]`` is a single value up to the round-off
    widening of interval rules (a width within 64 ulps of its magnitude: a mask the input box
    fixes, a comparison decided everywhere)."""
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        return False
    tol = 64 * torch.finfo(lo.dtype).eps * (1 + torch.maximum(lo.abs(), hi.abs()))
    return bool(((hi - lo) <= tol).all())


def _exact_box(graph: BoundGraph, name: str, known: "dict[str, tuple[Tensor, Tensor]] | set[str]",
               boxes: dict[str, tuple[Tensor, Tensor]] | None, memo: dict[str, bool]) -> bool:
    """Whether the interval box of ``name`` is as tight as any linear bound of it: the input's,
    a known box, or the per-entry image (:func:`_per_entry`) of such boxes."""
    if name == graph.input_name or name in known:
        return True
    if name not in memo:
        memo[name] = False  # (a graph has no cycles; this only stops a repeated walk)
        ins = _per_entry(graph, graph.by_name[name], boxes)
        memo[name] = ins is not None and all(_exact_box(graph, i, known, boxes, memo) for i in ins)
    return memo[name]


def skips_linear_bounds(graph: BoundGraph, node: str, input_set: InputSet, boxes: dict[str, tuple[Tensor, Tensor]] | None = None) -> bool:
    """Whether :func:`crown` takes ``node``'s box from the interval rule alone (so alpha-CROWN
    plans no rows for it); ``boxes``: the pass's boxes (see :func:`_image_of_known`)."""
    return ibp_is_exact(graph, node, input_set) or _image_of_known(graph, node, set(graph.preactivations()), boxes)


def bound_node(
    graph: BoundGraph,
    node: str,
    lo: Tensor,
    hi: Tensor,
    relax: dict[str, Relaxation],
    input_set: InputSet,
    max_elements: int,
    rows: tuple[Tensor, Tensor] | None = None,
    alpha_fn: AlphaFn | None = None,
    weights: dict[str, Tensor | None] | None = None,
    deadline: Deadline | None = None,
    pairs: PairwiseRows | None = None,
    stop_at: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Tighten the box ``(lo, hi)`` ``[B, *shape]`` of ``node`` with linear bounds on the rows
    :func:`rows_needed` picks (or ``rows``). Returns the intersected box. No chunk of rows starts
    after ``deadline`` (the rows not reached keep their given box); a chunk of dense rows still
    running at the hard deadline ``stop_at`` (``perf_counter`` value) is abandoned at its next
    backward step, dense or patch (its rows keep their given box too). ``pairs``: also collect the
    bounds of a linear map of the node's entries from their linear bounds
    (:class:`~relax.bounds.pairwise.PairwiseRows`; used only when every entry has a row).

    The ``T`` (neuron, batch element) pairs form a *virtual batch*: rows ``+e`` and ``-e`` of
    pair ``t`` are ``A0[0, t]`` and ``A0[1, t]``, with the relaxations and the input set
    gathered per pair, so no work is padded when batch elements have different numbers of
    unstable neurons. Alphas for these rows are ``[2, T, *shape]``.
    """
    B = lo.shape[0]
    idx, bidx = rows if rows is not None else rows_needed(graph, node, lo, hi)
    T = idx.shape[0]
    if T == 0:
        return lo, hi
    l2, h2 = lo.reshape(B, -1), hi.reshape(B, -1)
    if pairs is not None and not (T == l2.numel() and torch.equal(idx, torch.arange(l2.shape[1], device=idx.device).repeat(B))):
        pairs = None  # the groups need every entry's row, in order
    grad = torch.is_grad_enabled() and alpha_fn is not None
    rp = _RowPass.of(graph, node, relax, weights, input_set, alpha_fn, pairs, B, idx.device)
    width = rp.plan.width if rp.plan is not None else _max_width(graph, node)
    step = max(1, min(T, _chunk_limit(max_elements, lo.device, grad) // max(1, 2 * width)))
    new_l, new_h = [], []
    t0, max_step = 0, step
    if deadline is not None and deadline.seconds is not None:
        step = min(step, 8)  # under a deadline chunks start small and grow while they stay short
    if pairs is not None:
        step, max_step = pairs.group(step), pairs.group(max_step)
    while t0 < T:
        if deadline is not None and deadline.expired():
            break
        t_chunk = time.perf_counter()
        t1 = min(T, t0 + step)
        try:
            low = rp.lower(t0, t1, idx[t0:t1], bidx[t0:t1], stop_at)  # [2, c]
        except DeadlineExpired:
            break
        new_l.append(low[0])
        new_h.append(-low[1])
        step = _next_step(step, max_step, t1 - t0, t_chunk, deadline, pairs)
        t0 = t1
    if not new_l:
        return lo, hi
    nl, nh = torch.cat(new_l), torch.cat(new_h)
    nl = torch.nan_to_num(nl, nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # undefined (inf - inf): no information
    nh = torch.nan_to_num(nh, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    idx, bidx = idx[:nl.shape[0]], bidx[:nl.shape[0]]
    gl, gh = l2[bidx, idx], h2[bidx, idx]
    nl, nh = intersect_keeping_gradient(nl, nh, gl, gh)
    l2 = l2.index_put((bidx, idx), nl)
    h2 = h2.index_put((bidx, idx), nh)
    return l2.view_as(lo), h2.view_as(hi)


@dataclass
class _RowPass:
    """How :func:`bound_node` bounds a chunk of its rows ``+e, -e``: as patches from the entries
    they come from (``plan``, ``where``: :func:`_moved_source`), dense down to a cut node and then
    as patches (``cut``: :func:`_patch_cut`), or dense; ``shared``: one input whose relaxations,
    round-off weights and input set serve every row by broadcasting."""

    graph: BoundGraph
    node: str
    relax: dict[str, Relaxation]
    weights: dict[str, Tensor | None] | None
    input_set: InputSet
    alpha_fn: AlphaFn | None
    pairs: PairwiseRows | None
    acts: list[str]
    shared: bool
    where: Tensor
    plan: PatchPlan | None
    cut: str | None
    cut_plans: dict[tuple[int, int], PatchPlan | None]
    maps: PaddedMaps = field(default_factory=PaddedMaps)  # the patch passes' padded maps, kept across chunks

    @classmethod
    def of(cls, graph: BoundGraph, node: str, relax: dict[str, Relaxation], weights: dict[str, Tensor | None] | None, input_set: InputSet,
           alpha_fn: AlphaFn | None, pairs: PairwiseRows | None, B: int, device: torch.device) -> "_RowPass":
        acts = _acts_before(graph, node)
        shared = B == 1 and all(graph.by_name[a].op.elementwise for a in acts)
        start, where = _moved_source(graph, node)
        # with alpha-CROWN's slopes: patches where each row's slopes can be gathered into its window
        plan = patch_plan(graph, start, input_set) if alpha_fn is None or slopes_gatherable(graph, acts) else None
        # a cut only for nodes the patch rules do not reach; where they do but dense rows are cheaper, dense rows
        reachable = plan is not None or patch_plan(graph, start, input_set, max_share=math.inf) is not None
        cut = _patch_cut(graph, node, input_set) if not reachable and alpha_fn is None and pairs is None else None
        return cls(graph, node, relax, weights, input_set, alpha_fn, pairs, acts, shared, where.to(device), plan, cut, {})

    def lower(self, t0: int, t1: int, sub: Tensor, bsel: Tensor, stop_at: float | None = None) -> Tensor:
        """Lower bounds ``[2, c]`` of rows ``t0:t1`` (entries ``sub`` of batch elements ``bsel``);
        rows raise :class:`DeadlineExpired` at a backward step after ``stop_at``."""
        g, w, rounded = self.graph, self.weights, self.weights is not None
        if self.cut is not None:
            low = self._through_cut(self.cut, sub, bsel, stop_at)
            if low is not None:
                return low
            self.cut = None  # the rows' coefficients there are not local: dense rows for the rest of the node
        sign = torch.tensor([1.0, -1.0], device=sub.device)
        alphas = _chunk_alphas(self.alpha_fn, self.node, self.acts, slice(t0, t1))
        if self.plan is not None:  # the rows +e then -e, each with its own slopes
            alphas = None if not alphas else {a: v.reshape(2 * (t1 - t0), *v.shape[2:]) for a, v in alphas.items()}
        if self.plan is not None and self.pairs is None:  # convolutional layers: each row's coefficients in its receptive field only
            return patch_lower_bounds(g, self.plan, self.where[sub].repeat(2), bsel.repeat(2), sign.repeat_interleave(t1 - t0),
                                      self.relax, w, self.input_set, alphas, stop_at, self.maps).view(2, -1)
        if self.plan is not None:  # the same rows as dense linear bounds on the input, for the pairs
            A, b, e = patch_input_rows(g, self.plan, self.where[sub].repeat(2), bsel.repeat(2), sign.repeat_interleave(t1 - t0),
                                       self.relax, w, alphas, stop_at, self.maps)
            form = (A.view(2, t1 - t0, *A.shape[1:]), b.view(2, -1), None if e is None else e.view(2, -1))
            iset = self.input_set if self.input_set.batch_size == 1 else self.input_set.select(bsel)
        else:
            form = self._dense_form(sub, bsel, alphas, stop_at=stop_at)
            iset = self.input_set if self.shared else self.input_set.select(bsel)
        low = concretize_rows(*form, iset, False, rounded)
        if self.pairs is not None:
            self.pairs.add(*form, iset, rounded)
        return low

    def _dense_form(self, sub: Tensor, bsel: Tensor, alphas: dict[str, Tensor] | None, until: str | None = None,
                    stop_at: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """:func:`backward_form` of the rows ``+-e_sub`` (batch elements ``bsel``), down to the
        input or to the node ``until``."""
        rel = {a: (self.relax[a] if self.shared else self.relax[a].map(lambda v: v[bsel])) for a in self.acts}  # one element per row
        w = self.weights
        wsel = w if self.shared or w is None else {k: (None if v is None else v[bsel]) for k, v in w.items()}
        sign = torch.tensor([1.0, -1.0], device=sub.device)
        return backward_form(self.graph, self.node, Rows(torch.stack([sub, sub]), sign), rel, alphas, wsel, until=until,
                             stop_at=stop_at)

    def _through_cut(self, cut: str, sub: Tensor, bsel: Tensor, stop_at: float | None = None) -> Tensor | None:
        """Lower bounds ``[2, c]`` of the rows ``+-e_sub``: the dense pass down to ``cut``
        (:func:`_patch_cut`), then the patch pass from there; None when the rows' coefficients at
        ``cut`` do not fit a small window (the caller goes dense)."""
        c, g = sub.shape[0], self.graph
        A, bias, err = self._dense_form(sub, bsel, None, until=cut, stop_at=stop_at)
        got = dense_to_patches(A.reshape(2 * c, *g.shape(cut)), chw_shape(g.shape(cut)))
        if got is None:
            return None
        A0, pos, window = got
        if window not in self.cut_plans:
            self.cut_plans[window] = patch_plan(g, cut, self.input_set, window)
        plan = self.cut_plans[window]
        if plan is None:
            return None
        err0 = None if err is None else err.expand(2, c).reshape(-1)
        return patch_rows_lower_bounds(g, plan, A0, pos, bsel.repeat(2), self.relax, self.weights, self.input_set,
                                       bias.reshape(-1), err0, stop_at=stop_at, maps=self.maps).view(2, c)


def _patch_cut(graph: BoundGraph, node: str, input_set: InputSet) -> str | None:
    """The node nearest to ``node`` that lies on every path from ``node`` to the input and from
    which a patch pass can start (:func:`relax.bounds.patches.patch_plan`), or None: the rows
    of a node behind per-position ops (a softmax over channels, an argmax, a one-hot) go dense
    down to it, then as patches."""
    anc = _ancestors(graph, node)
    pending = set(graph.by_name[node].inputs)
    for n in reversed(graph.nodes):
        if n.name == node or n.name not in anc:
            continue
        if pending == {n.name} and patch_plan(graph, n.name, input_set) is not None:
            return n.name
        pending.discard(n.name)
        pending.update(n.inputs)
    return None


def _moved_source(graph: BoundGraph, node: str) -> tuple[str, Tensor]:
    """The node whose entries ``node``'s are, through ops that only move the entries of their one
    input (transposes, reshapes, slices or gathers without repeats), and where each of ``node``'s
    entries is in it (flat ``[n]``, read off the ops' forward passes on the entries' numbers);
    ``(node, arange)`` when ``node`` is not such an op."""
    cache = graph.__dict__.setdefault("_moved_cache", {})
    if node not in cache:
        cache[node] = _trace_moves(graph, node)
    return cache[node]


def _trace_moves(graph: BoundGraph, node: str) -> tuple[str, Tensor]:
    where = torch.arange(math.prod(graph.shape(node)))
    n = graph.by_name[node]
    while not n.op.nonlinear and getattr(n.op, "moves_only", False) and len(n.inputs) == 1 and n.inputs[0] != graph.input_name:
        shape = graph.shape(n.inputs[0])
        numbers = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, *shape)
        where = n.op.forward(numbers).reshape(-1).long()[where]
        n = graph.by_name[n.inputs[0]]
    return n.name, where


def _next_step(step: int, max_step: int, done: int, t_chunk: float, deadline: Deadline | None, pairs: PairwiseRows | None) -> int:
    """Rows of :func:`bound_node`'s next chunk: under a deadline, chunks of at most ~1 s (or 5 %
    of what is left) predicted by the last chunk's time per row."""
    if deadline is None or deadline.seconds is None:
        return step
    per_row = (time.perf_counter() - t_chunk) / done
    step = int(max(1, min(max_step, min(1.0, 0.05 * deadline.remaining()) / max(per_row, 1e-9))))
    return step if pairs is None else pairs.group(step)


def _chunk_alphas(alpha_fn: AlphaFn | None, node: str, acts: list[str], rows: slice) -> dict[str, Tensor] | None:
    """The slopes alpha-CROWN gives the rows ``rows`` of ``node``'s pass, per activation."""
    if alpha_fn is None:
        return None
    alphas = {}
    for act in acts:
        a = alpha_fn(node, act, rows)
        if a is not None:
            alphas[act] = a
    return alphas


#: on the CPU, the largest coefficient tensor of one chunk of a backward pass (2 MiB in float64:
#: it and the temporaries of a backward step stay in a core's L2 / L3 cache); measured on one
#: thread of a 2-core EPYC (1 MiB L2 per core, 32 MiB L3): 2**18 best, 1.6-2.5x faster than 2**25
#: on ACAS Xu, CIFAR CNN and ResNet CROWN passes (``benchmarks/RESULTS.md``)
CACHE_ELEMENTS = 2**18


def _chunk_limit(max_elements: int, device: torch.device, grad: bool = False) -> int:
    """The elements one chunk of coefficients may hold: ``max_elements``, and on the CPU at most
    :data:`CACHE_ELEMENTS` unless the pass records an autograd graph (``grad``): its chunks'
    tensors all stay alive for the backward anyway, and each chunk's slice of a slope tensor
    sends back a gradient of the whole tensor (verivital's CNN: a batch of 256 domains took 4x
    longer at 2**20 than in one piece); a GPU wants large kernels."""
    if device.type != "cpu" or grad:
        return max_elements
    return min(max_elements, CACHE_ELEMENTS)


def _acts_before(graph: BoundGraph, node: str) -> list[str]:
    anc = _ancestors(graph, node)
    return [n.name for n in graph.activations() if n.name in anc]


@ieee_float32()  # the round-off allowances assume IEEE arithmetic (no TF32 on a GPU)
def crown(
    graph: BoundGraph,
    input_set: InputSet,
    C: Tensor | None,
    mode: str = "crown",
    *,
    max_elements: int = 2**25,
    bound_overrides: dict[str, tuple[Tensor, Tensor]] | None = None,
    intermediate: dict[str, tuple[Tensor, Tensor]] | None = None,
    alpha_fn: AlphaFn | None = None,
    rows: dict[str, tuple[Tensor, Tensor]] | None = None,
    out_extra: dict[str, Tensor] | None = None,
    out_record: dict[str, Tensor | None] | None = None,
    fixed: dict | None = None,
    prune: bool = False,
    roundoff_weights: dict[str, Tensor | None] | None = None,
    deadline: Deadline | None = None,
    rigorous: bool = True,
    stop_at: float | None = None,
    forward: bool = False,
    relaxations: dict[str, Relaxation] | None = None, cone_of: Tensor | None = None,
) -> CrownResult:
    """CROWN (``mode="crown"``) or DeepPoly (``mode="deeppoly"``) bounds.

    Args:
        graph, input_set: the bound graph and the batched input set.
        C: ``[B, N, K]`` rows on the output (``None``: intermediate bounds only).
        mode: slope rules of the relaxations (:mod:`relax.ir.ops.activation`).
        max_elements: chunk size limit of the coefficient tensors.
        bound_overrides: ``{node: (lo, hi)}`` intersected with the node's computed box
            (branch-and-bound splits, see the module docstring).
        intermediate: ``{node: (lo, hi)}`` boxes used as given (not recomputed).
        alpha_fn: alpha provider (alpha-CROWN), see :data:`AlphaFn`; start node ``"__out__"``
            denotes the spec rows.
        rows: ``{node: (idx, bidx)}`` fixed row choice per pre-activation (alpha-CROWN).
        out_extra, out_record: :func:`backward`'s ``extra`` / ``record`` for the spec rows
            (``[N, B, *shape]``).
        fixed: a dict the caller keeps across calls that differ only in ``alpha_fn`` /
            ``out_extra`` (alpha / beta optimisation steps) while ``intermediate`` fixes every
            pre-activation box: the relaxations, round-off weights and interval bound of the
            rows are computed on the first call and reused (they depend on the boxes only).
        prune: drop each ReLU neuron dead in every batch element (``u <= 0``) from the graph as
            soon as its box is known (:mod:`relax.ir.prune`): later passes multiply smaller
            matrices, the bounds are the same (a dead ReLU is an exact zero); not with ``alpha_fn``
            / ``rows`` / ``out_extra`` / ``out_record`` / ``fixed`` (their tensors have the full shapes).
        roundoff_weights: round-off weights to use instead of computing them (a result's
            ``weights`` from boxes that contain this pass's: the weights grow with the boxes'
            magnitudes, so they stay upper bounds; alpha-CROWN's steps reuse the first pass's).
        deadline: after it, no more linear bounds of intermediate neurons are computed (those
            not reached keep their interval boxes: sound, looser); the spec rows' pass still runs.
        rigorous: False: the spec rows' bound without its round-off allowance and the interval bound
            (cheaper; **not a bound of the exact network**: only for ranking, as FSB ranks candidates).
        stop_at: a hard deadline (``perf_counter`` value): a dense intermediate chunk then keeps its
            interval boxes from its next backward step on, and the spec rows' pass raises
            :class:`DeadlineExpired` at the next node (for callers that discard late bounds: bab).
        forward: the forward linear bounds' boxes (:func:`relax.bounds.forward.forward_boxes`: few inputs,
            wide layers) join the overrides, so CROWN bounds only the neurons they leave unstable.
        relaxations: ``{nonlinear node: Relaxation [B, *shape]}`` used as given, built by ``mode`` from
            this pass's very boxes (a parent's for its children: :class:`relax.bab.activation_split.ParentBoxes`).
        cone_of: rows ``[B, N, K]`` whose cone (:mod:`relax.bounds.cone`) limits a pass without ``C``.

    Returns:
        :class:`CrownResult`. ``lower`` is the larger of the linear and the IBP bound of ``C y``
        (with the linear bound's gradient).
    """
    if fixed is not None and "relax" in fixed:
        return _spec_rows_from(fixed, graph, input_set, C, rigorous, max_elements, alpha_fn, out_extra, out_record, stop_at)
    if prune and (alpha_fn is not None or rows is not None or out_extra is not None or out_record is not None or fixed is not None
                  or roundoff_weights is not None or relaxations is not None):
        raise ValueError("crown: prune=True works with plain CROWN passes only")
    bound_overrides = _with_forward_boxes(graph, input_set, bound_overrides) if forward and intermediate is None else bound_overrides
    bp = _BoxPass(graph, input_set, mode, max_elements=max_elements, overrides=bound_overrides or {}, intermediate=intermediate,
                  alpha_fn=alpha_fn, rows=rows, roundoff_weights=roundoff_weights, deadline=deadline, stop_at=stop_at,
                  given=relaxations, cone=_cone(graph, C if C is not None else cone_of))  # only the rows' cone is bounded
    for p in graph.preactivations():
        bp.keep(p, *bp.box(p))
        if prune:
            bp.graph = _prune_dead(bp.graph, p, bp.known, bp.relax, bp.weights, bp.ibp)
    return CrownResult(None, bp.inter, bp.relax_full, bp.weights) if C is None else bp.spec(C, fixed, out_extra, out_record, rigorous, stop_at)


def _cone(graph: BoundGraph, rows: Tensor | None) -> dict[str, Tensor] | None:
    """The cone of influence of ``rows`` (:func:`relax.bounds.cone.spec_cone`), None without rows."""
    return None if rows is None else spec_cone(graph, rows)


def _spec_rows_from(fixed: dict, graph: BoundGraph, input_set: InputSet, C: Tensor | None, rigorous: bool, max_elements: int,
                    alpha_fn: AlphaFn | None, out_extra: dict[str, Tensor] | None, out_record: dict[str, Tensor | None] | None,
                    stop_at: float | None) -> CrownResult:
    """:func:`crown`'s spec rows on the relaxations, round-off weights, boxes and interval bound a
    first call left in ``fixed``."""
    assert C is not None  # fixed is filled by a call with spec rows, and the calls differ in alpha_fn / out_extra only
    if fixed["rigorous"] != rigorous:  # a ranking pass's cache must never serve a bound
        raise ValueError("crown: `fixed` was filled with another `rigorous`")
    return _spec_rows(graph, input_set, C, fixed["relax"], fixed["weights"], fixed["inter"], fixed["ibp_low"], max_elements,
                      alpha_fn, out_extra, out_record, stop_at)


def _with_forward_boxes(graph: BoundGraph, input_set: InputSet, overrides: dict[str, tuple[Tensor, Tensor]] | None
                        ) -> dict[str, tuple[Tensor, Tensor]] | None:
    """``overrides`` intersected with the forward linear bounds' boxes of the pre-activations
    (:func:`relax.bounds.forward.forward_boxes`; unchanged for networks of many inputs)."""
    lo, hi = input_set.bounds()
    fwd = forward_boxes(graph, lo.detach(), hi.detach(), None if overrides is None else
                        {k: (l.detach(), h.detach()) for k, (l, h) in overrides.items()})
    if fwd is None:
        return overrides
    out = dict(overrides or {})
    for p, (l, h) in fwd.items():
        if p == graph.input_name:
            continue
        out[p] = (torch.maximum(out[p][0], l), torch.minimum(out[p][1], h)) if p in out else (l, h)
    return out


class _BoxPass:
    """A CROWN pass's pre-activation boxes, computed in graph order (:meth:`box`, then
    :meth:`keep`), then its spec rows (:meth:`spec`).

    State: ``graph`` (pruned as the pass goes when :func:`crown` prunes), the boxes so far
    ``known`` (of the current graph) and ``inter`` (as computed, returned), the relaxations
    ``relax`` (current graph) and ``relax_full`` (as built, returned), the round-off
    ``weights`` and the interval boxes ``ibp`` computed so far; the other fields are
    :func:`crown`'s arguments.
    """

    def __init__(self, graph: BoundGraph, input_set: InputSet, mode: str, *, max_elements: int,
                 overrides: dict[str, tuple[Tensor, Tensor]], intermediate: dict[str, tuple[Tensor, Tensor]] | None,
                 alpha_fn: AlphaFn | None, rows: dict[str, tuple[Tensor, Tensor]] | None,
                 roundoff_weights: dict[str, Tensor | None] | None, deadline: Deadline | None,
                 stop_at: float | None = None, given: dict[str, Relaxation] | None = None,
                 cone: dict[str, Tensor] | None = None) -> None:
        self.graph, self.input_set, self.mode = graph, input_set, mode
        self.cone = cone or {}  # the spec rows' cone of influence (relax.bounds.cone): rows only inside it
        self.given = given or {}
        self.stop_at = stop_at
        self.max_elements, self.ov, self.intermediate = max_elements, overrides, intermediate
        self.alpha_fn, self.rows, self.deadline = alpha_fn, rows, deadline
        self.lo_in, self.hi_in = input_set.bounds()
        self.known: dict[str, tuple[Tensor, Tensor]] = {}
        self.relax: dict[str, Relaxation] = {}
        self.relax_full: dict[str, Relaxation] = {}  # as built, before any pruning (returned)
        self.inter: dict[str, tuple[Tensor, Tensor]] = {}
        self.weights: dict[str, Tensor | None] = dict(roundoff_weights or {})
        self.ibp: dict[str, tuple[Tensor, Tensor]] = {}  # interval boxes computed so far
        self.pair_boxes: dict[str, tuple[Tensor, Tensor]] = {}  # boxes of box_from_input nodes from their input's forms

    def box(self, p: str) -> tuple[Tensor, Tensor]:
        """Pre-activation ``p``'s box ``[B, *shape]``: given, the input set's, the interval box
        (when that is exact or as tight), else linear bounds within the interval box; intersected
        with the override."""
        graph, ov = self.graph, self.ov
        if self.intermediate is not None and p in self.intermediate:
            l, h = self.intermediate[p]
        elif p == graph.input_name:
            l, h = self.lo_in, self.hi_in
        elif ibp_is_exact(graph, p, self.input_set) or _image_of_known(graph, p, self.known, self._boxes_upto(p)):
            l, h = self._boxes_upto(p)[p]
            if p in self.pair_boxes:  # pairwise combinations of the input's linear bounds
                pl, ph = self.pair_boxes.pop(p)
                l, h = torch.maximum(l, pl), torch.minimum(h, ph)
        else:
            boxes = self.ibp = interval_bounds(graph, self.lo_in, self.hi_in, known=self.known, upto=p, done=self.ibp)
            node_weights(graph, boxes, self.weights)
            l, h = boxes[p]
            if p in ov:
                l, h = l.maximum(ov[p][0]), h.minimum(ov[p][1])
            pairs, target = self._pairwise_consumer(p, l.shape[0])
            rows: tuple[Tensor, Tensor] | None = None
            if self.rows is not None and p in self.rows:
                rows = self.rows[p]
            elif p in self.cone and pairs is None:  # (softmax's pairwise boxes need every entry's row)
                # a node alpha-CROWN plans no rows for (none unstable in the cone) gets none either
                rows = cone_rows(self.cone, p, *rows_needed(graph, p, l, h), l[0].numel())
            l, h = bound_node(graph, p, l, h, self.relax, self.input_set, self.max_elements,
                              rows=rows, alpha_fn=self.alpha_fn, weights=self.weights,
                              deadline=self.deadline, pairs=pairs, stop_at=self.stop_at)
            if pairs is not None and pairs.lows:
                self.pair_boxes[target] = pairs.box(l.dtype, l.device)
        if p in ov:
            l, h = intersect_keeping_gradient(l, h, *ov[p])
        return l, h

    def _boxes_upto(self, p: str) -> dict[str, tuple[Tensor, Tensor]]:
        """The interval boxes up to ``p`` (computed once per node, kept in ``self.ibp``)."""
        self.ibp = interval_bounds(self.graph, self.lo_in, self.hi_in, known=self.known, upto=p, done=self.ibp)
        return self.ibp

    def _pairwise_consumer(self, p: str, B: int) -> tuple[PairwiseRows | None, str]:
        """The collector for ``p``'s consumer that is a linear map of the last dim bounded from its
        input (``box_from_input``: softmax's differences; one such consumer, whatever the others:
        a log-softmax's scores also feed its join), else ``(None, "")``."""
        c_shape = self.graph.by_name[p].shape
        fitting = [c for c in (self.graph.by_name[k] for k in self.graph.consumers[p])
                   if getattr(c.op, "box_from_input", False) and isinstance(getattr(c.op, "W", None), Tensor)
                   and PairwiseRows.fits(c.op.W, c_shape)]
        if len(fitting) != 1:
            return None, ""
        c = fitting[0]
        W = c.op.W
        grad = torch.is_grad_enabled() and self.alpha_fn is not None
        limit = _chunk_limit(self.max_elements, self.lo_in.device, grad)
        return PairwiseRows(W, getattr(c.op, "b", None), c_shape, B, limit), c.name

    def keep(self, p: str, l: Tensor, h: Tensor) -> None:
        """Record ``p``'s box and relax the nonlinear ops whose inputs are now all known."""
        self.known[p] = (l, h)
        self.inter[p] = (l, h)
        if p in self.ibp:  # no box computed so far depends on p's (topological order)
            self.ibp[p] = (l, h)
        for c in self.graph.consumers[p]:
            cn = self.graph.by_name[c]
            if cn.op.nonlinear and all(i in self.known for i in cn.inputs):  # a product waits for both inputs
                r = self.given.get(c)
                if r is None:
                    r = cn.op.relax_inputs([self.known[i] for i in cn.inputs], self.mode)
                self.relax[c] = self.relax_full[c] = r

    def spec(self, C: Tensor, fixed: dict | None, out_extra: dict[str, Tensor] | None,
             out_record: dict[str, Tensor | None] | None, rigorous: bool = True, stop_at: float | None = None) -> CrownResult:
        """The spec rows ``C [B, N, K]`` after every box: the interval bound of the rows, then
        their backward pass (:func:`_spec_rows`); fills ``fixed`` when every box was given.
        Not ``rigorous``: no interval bound and no round-off allowance (see :func:`crown`)."""
        graph = self.graph
        weights: dict[str, Tensor | None] | None = None
        if rigorous:
            boxes = interval_bounds(graph, self.lo_in, self.hi_in, known=self.known, done=self.ibp, stop_at=stop_at)
            node_weights(graph, boxes, self.weights, stop_at)
            ibp_low = box_row_bounds(C, *boxes[graph.output])
            out = graph.by_name.get(graph.output)
            if out is not None and getattr(out.op, "rows_through_inputs", False):
                ibp_low = torch.maximum(ibp_low, _rows_through_inputs(out, C, boxes, self.weights.get(out.name)))
            weights = self.weights
        else:
            ibp_low = torch.full(C.shape[:2], -math.inf, dtype=C.dtype, device=C.device)
        if fixed is not None and self.intermediate is not None and all(p in self.intermediate for p in graph.preactivations()):
            fixed.update(relax=self.relax, weights=weights, inter=self.inter, ibp_low=ibp_low, rigorous=rigorous)
        res = _spec_rows(graph, self.input_set, C, self.relax, weights, self.inter, ibp_low, self.max_elements, self.alpha_fn,
                         out_extra, out_record, stop_at)
        res.relaxations, res.weights = self.relax_full, self.weights
        return res


def _prune_dead(graph: BoundGraph, p: str, known: dict[str, tuple[Tensor, Tensor]], relax: dict[str, Relaxation],
                weights: dict[str, Tensor | None], ibp: dict[str, tuple[Tensor, Tensor]]) -> BoundGraph:
    """``graph`` without the neurons of the ReLUs after pre-activation ``p`` that are dead in
    every batch element of ``known[p]``; ``known``, ``relax``, ``weights`` and the interval boxes
    ``ibp`` restricted to the kept neurons in place (the round-off weights and interval boxes of
    the ops after the ReLU are dropped, to be recomputed on the smaller ops)."""
    from relax.ir.prune import dead_relus, prune_boxes, prune_graph

    keep = dead_relus(graph, {p: known[p]})
    if not keep:
        return graph
    known.update(prune_boxes(graph, keep, {p: known[p]}))
    ibp.update(prune_boxes(graph, keep, {k: ibp[k] for k in [p, *keep] if k in ibp}))
    for r, k in keep.items():
        k = k.to(known[p][0].device)
        if r in relax:
            relax[r] = _keep_neurons(relax[r], k)
        for name in (p, r):
            w = weights.get(name)
            if w is not None:
                weights[name] = w[:, k]
        for c in graph.consumers[r]:
            weights.pop(c, None)
            ibp.pop(c, None)
    return prune_graph(graph, keep)


def _keep_neurons(r: Relaxation, keep: Tensor) -> Relaxation:
    """A relaxation of a flat layer (fields ``[B, n]``) restricted to the neurons ``keep [n]``."""
    def sel(v):
        return v[:, keep] if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == keep.shape[0] else v

    return Relaxation(sel(r.lw), sel(r.lb), sel(r.uw), sel(r.ub), sel(r.extra))


@dataclass
class _BatchSlice:
    """Batch elements ``b0:b1`` of a pass over ``B``: tensors whose batch dimension has size ``B``
    are sliced, size-1 (broadcast) ones kept."""

    B: int
    b0: int
    b1: int

    def dim0(self, v: Any) -> Any:
        return v[self.b0:self.b1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == self.B else v

    def dim1(self, v: Any) -> Any:
        return v[:, self.b0:self.b1] if isinstance(v, Tensor) and v.dim() > 1 and v.shape[1] == self.B else v

    def input_set(self, s: InputSet) -> InputSet:
        return s.select(slice(self.b0, self.b1)) if s.batch_size == self.B else s


def _sliced(d: dict[str, Tensor] | None, part: _BatchSlice | None, dim: int) -> dict[str, Tensor] | None:
    """``d``'s tensors sliced along their batch dimension ``dim`` (0 or 1), or ``d`` itself
    without a slice."""
    if d is None or part is None:
        return d
    fn = part.dim0 if dim == 0 else part.dim1
    return {k: fn(v) for k, v in d.items()}


def _spec_rows(graph: BoundGraph, input_set: InputSet, C: Tensor, relax: dict[str, Relaxation], weights: dict[str, Tensor | None] | None,
               inter: dict[str, tuple[Tensor, Tensor]], ibp_low: Tensor, max_elements: int, alpha_fn: AlphaFn | None,
               out_extra: dict[str, Tensor] | None, out_record: dict[str, Tensor | None] | None,
               stop_at: float | None = None) -> CrownResult:
    """:func:`crown`'s last step: the backward pass of the spec rows ``C [B, N, K]``, intersected
    with their interval bound ``ibp_low [B, N]``; lowered by the round-off bound unless ``weights``
    is None. Chunks of at most :func:`_chunk_limit` coefficients: all rows of a batch slice when
    they fit (the relaxations are then read once), else fewer rows; the batch sliced as needed."""
    B, N, K = C.shape
    out = graph.output
    At = C.transpose(0, 1)  # [N, B, K]
    grad = torch.is_grad_enabled() and (alpha_fn is not None or out_extra is not None or C.requires_grad)
    cells = max(1, _chunk_limit(max_elements, C.device, grad) // max(1, _max_width(graph, out)))  # rows x batch elements
    s_step = min(N, cells)
    b_step = max(1, min(B, cells // s_step))
    acts = _acts_before(graph, out)
    parts: list[Tensor] = []
    recorded: dict[str, list[Tensor]] = {k: [] for k in out_record} if out_record is not None else {}  # per node: the chunks' rows
    for s0 in range(0, N, s_step):
        s1 = min(N, s0 + s_step)
        alphas_s = None
        if alpha_fn is not None:
            alphas_s = {}
            for act in acts:
                a = alpha_fn("__out__", act, slice(s0, s1))
                if a is not None:
                    alphas_s[act] = a
        ex_s = None if out_extra is None else {k: v[s0:s1] for k, v in out_extra.items()}
        cols, recs = [], []
        for b0 in range(0, B, b_step):
            b1 = min(B, b0 + b_step)
            part = _BatchSlice(B, b0, b1) if b_step < B else None
            rec = None if out_record is None else dict.fromkeys(out_record)
            if part is None:
                rel, x_part, w_part = relax, input_set, weights
            else:
                rel = {k: r.map(part.dim0) for k, r in relax.items()}
                x_part = part.input_set(input_set)
                w_part = None if weights is None else {k: part.dim0(w) for k, w in weights.items()}
            cols.append(backward(graph, out, At[s0:s1, b0:b1], rel, x_part, _sliced(alphas_s, part, 1), w_part,
                                 _sliced(ex_s, part, 1), rec, clipped_ball=True, stop_at=stop_at))
            recs.append(rec)
        parts.append(cols[0] if len(cols) == 1 else torch.cat(cols, 1))
        for k in recorded:
            got: list[Tensor] = [v for r in recs if r is not None and (v := r[k]) is not None]
            if got:
                recorded[k].append(got[0] if len(got) == 1 else torch.cat(got, 1))
    for k, vs in recorded.items():  # one concatenation per node (not one per chunk: quadratic in the chunks)
        if vs:
            out_record[k] = vs[0] if len(vs) == 1 else torch.cat(vs)  # type: ignore[index]
    low = torch.cat(parts, 0).t()
    # an undefined value (inf - inf, 0 * inf) carries no information: -inf, never a NaN bound
    low = torch.nan_to_num(low, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    # the value is max(linear, interval); the gradient always that of the linear bound, so that an
    # optimiser of slopes / multipliers is not stuck where the interval bound is ahead at the start
    # (x - x is exactly 0 for finite x: the value is the max itself, not a re-rounded sum)
    grad_path = torch.where(torch.isfinite(low), low - low.detach(), torch.zeros_like(low))
    return CrownResult(torch.maximum(low, ibp_low).detach() + grad_path, inter, relax, linear_lower=low.detach())
