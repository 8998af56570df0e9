"""Input splitting across the many boxes of one instance, all in one batch.

VNN-COMP's nn4sys files hold hundreds to tens of thousands of boxes, each fixing all but one to
three of the network's inputs (mscn_128d: 154 inputs, 1-3 free). One CROWN pass per box costs
15-35 ms there (every pre-activation bounded from the input), and input splitting box by box pays
a search's set-up per box. Here the pieces of every box travel together:

* each round bounds every open piece in chunks of one batch: forward linear bounds over the
  piece's *free* inputs (:func:`relax.bounds.forward.forward_bounds`, a few columns per node),
  whose boxes serve one CROWN pass of the property rows (``crown(..., intermediate=...)``: no
  intermediate backward pass), or a CROWN pass, whichever was faster on the first chunk
  (:func:`_faster_way`); measured on mscn_128d the former takes 2 ms a piece against 23-35 ms for
  a CROWN pass, and is as tight on pieces of a split box (the same 120 boxes proved at 16 pieces
  each);
* a piece is proved when its margin lower bound (:class:`~relax.bab.RowSpec`: every group has
  a row ``> 0``) exceeds ``margin``; the others are evaluated at their centre (a centre whose
  output violates the property is a *candidate* counterexample of its box, for the caller to
  confirm) and halved along the free input widest relative to its box;
* a box with more than ``max_pieces`` open pieces, or whose piece cannot be halved in its
  dtype, is left (``given_up``) to the caller's per-box search; a box is proved when none of its
  pieces is open.

The pieces of a box cover it exactly (both halves share the midpoint), and every proof is a
rigorous bound on a piece, so a proved box holds everywhere in it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from relax.bab import RowSpec
from relax.bounds.crown import crown
from relax.bounds.forward import CHUNK_ELEMENTS, forward_bounds
from relax.ir.graph import BoundGraph
from verify.deadline import DeadlineExpired
from verify.registry import FLOAT64_PROOF_MARGIN
from verify.spec import Box

__all__ = ["ManyBoxesResult", "split_many_boxes", "bound_pieces"]

#: the most pieces bounded per batch (and the forward forms ``[chunk, free + 1, widest node]`` at most
#: :data:`relax.bounds.forward.CHUNK_ELEMENTS` numbers)
CHUNK = 1024


@dataclass
class ManyBoxesResult:
    """``proved [M]`` (bool): the boxes every piece of which was proved; ``candidates``: ``{box:
    point [n_in]}`` whose output violates the property on the graph (to be confirmed by the caller);
    ``given_up [M]``: boxes left for their piece count or float resolution; ``pieces``: pieces bounded."""

    proved: Tensor
    candidates: dict[int, Tensor]
    given_up: Tensor
    pieces: int = 0
    rounds: int = 0


def bound_pieces(graph: BoundGraph, lo: Tensor, hi: Tensor, C: Tensor, d: Tensor, how: str = "forward",
                 stop_at: float | None = None) -> Tensor:
    """Rigorous lower bounds ``[P, N]`` of ``C y + d`` (``C [P, N, K]``, ``d [P, N]``) over the boxes
    ``lo, hi [P, *input_shape]``. ``how``: ``"forward"``, forward linear bounds' boxes and one
    CROWN pass of the rows within them; ``"crown"``, a CROWN pass (each pre-activation bounded by
    its own backward rows, dead ReLUs pruned). ``stop_at``: :class:`~verify.deadline.DeadlineExpired`
    from a CROWN pass still running then."""
    with torch.no_grad():
        if how == "crown":
            return crown(graph, Box(lo, hi), C, prune=True, stop_at=stop_at).spec_lower() + d
        boxes = forward_bounds(graph, lo, hi)
        inter = {p: boxes[p] for p in graph.preactivations() if p != graph.input_name}
        return crown(graph, Box(lo, hi), C, intermediate=inter, stop_at=stop_at).spec_lower() + d


def _faster_way(graph: BoundGraph, lo: Tensor, hi: Tensor, C: Tensor, d: Tensor, stop_at: float) -> tuple[str, Tensor]:
    """Bound the pieces both ways of :func:`bound_pieces`, the CROWN pass stopped once it takes
    longer than the forward one: the faster way and the larger of the bounds ``[P, N]`` (both
    sound). Which is faster depends on the network: lindex (one input, 128-neuron layers) 0.09 ms a
    box by CROWN against 0.23 ms forward; mscn_128d (154 inputs, 1-3 free; products by masks) 23-35
    ms against 2 ms."""
    t0 = time.perf_counter()
    low = bound_pieces(graph, lo, hi, C, d, "forward", stop_at)
    t1 = time.perf_counter()
    try:
        low_c = bound_pieces(graph, lo, hi, C, d, "crown", min(stop_at, t1 + (t1 - t0)))
    except DeadlineExpired:
        return "forward", low
    way = "crown" if time.perf_counter() - t1 < t1 - t0 else "forward"
    return way, torch.maximum(low, low_c)


def split_many_boxes(
    graph: BoundGraph,
    lo: Tensor,
    hi: Tensor,
    C: Tensor,
    d: Tensor,
    groups: Tensor,
    *,
    stop_at: float = math.inf,
    margin: float = FLOAT64_PROOF_MARGIN,
    max_pieces: int = 64,
) -> ManyBoxesResult:
    """Decide the boxes ``lo, hi [M, n_in]`` (flat inputs; their rows ``C [M, N, K]``, ``d [M, N]``,
    ``groups [N]``) by splitting them together until ``stop_at`` (``perf_counter`` value); see the
    module docstring. Boxes still open at ``stop_at`` are neither proved nor given up."""
    M = lo.shape[0]
    dt = graph.dtype
    s = _Search(graph, C.to(dt), d.to(dt), groups.to(lo.device), stop_at, margin, M)
    root_w = (hi - lo).to(dt)
    plo, phi, owner = lo.to(dt), hi.to(dt), torch.arange(M, device=lo.device)
    given_up = torch.zeros(M, dtype=torch.bool, device=lo.device)
    rounds = 0
    while owner.numel() and time.perf_counter() < stop_at:
        rounds += 1
        plo, phi, owner = s.round(plo, phi, owner)
        if time.perf_counter() >= stop_at:
            break
        plo, phi, owner, stuck = _halve(plo, phi, owner, root_w)
        over = torch.bincount(owner, minlength=M) > max_pieces
        over[stuck] = True
        given_up |= over & s.alive
        s.alive &= ~over
        plo, phi, owner = _drop(plo, phi, owner, s.alive)
    has_open = torch.bincount(owner, minlength=M) > 0
    return ManyBoxesResult(s.alive & ~has_open, s.cands, given_up, s.pieces, rounds)


#: the first chunk's pieces (both ways of bounding are timed on it); later chunks grow to a tenth
#: of the time left at the last chunk's pace, up to CHUNK
FIRST_CHUNK = 128


class _Search:
    """The state shared by the rounds: the rows of every box, which boxes are still ``alive``
    (not given up, no candidate found), the candidates, the way of bounding and the pace."""

    def __init__(self, graph: BoundGraph, C: Tensor, d: Tensor, groups: Tensor, stop_at: float, margin: float, M: int):
        self.graph, self.C, self.d, self.stop_at, self.margin = graph, C, d, stop_at, margin
        # the groups' margins only (RowSpec.margin reads the groups); each piece's rows are C[owner], d[owner]
        self.spec = RowSpec(C.new_zeros(C.shape[1:]), d.new_zeros(d.shape[1:]), groups)
        self.alive = torch.ones(M, dtype=torch.bool, device=groups.device)
        self.cands: dict[int, Tensor] = {}
        self.way: str | None = None  # chosen on the first chunk (_faster_way)
        self.pieces = 0
        self.chunk = FIRST_CHUNK
        self.widest = max([math.prod(graph.input_shape)] + [n.numel for n in graph.nodes])

    def round(self, plo: Tensor, phi: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bound every piece ``[P, n_in]`` (chunks, until ``stop_at``): the pieces still open, of
        the boxes still alive (those not reached by ``stop_at`` included)."""
        free = (phi > plo).sum(1)
        by_free = torch.argsort(free, stable=True)  # a chunk's forms have as many columns as its freest piece
        plo, phi, owner = plo[by_free], phi[by_free], owner[by_free]
        # the forms of the widest node stay within CHUNK_ELEMENTS numbers (large networks: small chunks)
        cap = max(1, CHUNK_ELEMENTS // ((int(free.max()) + 1) * self.widest)) if owner.numel() else 1
        kept: list[tuple[Tensor, Tensor, Tensor]] = []
        s = 0
        while s < owner.numel():
            t0 = time.perf_counter()
            e = s + min(self.chunk, cap)
            got = self._chunk(plo[s:e], phi[s:e], owner[s:e]) if t0 < self.stop_at else None
            if got is None:  # past the deadline: the rest stays open
                kept.append((plo[s:], phi[s:], owner[s:]))
                break
            kept.append(got)
            pace = (time.perf_counter() - t0) / max(1, min(e, owner.numel()) - s)
            self.chunk = int(min(CHUNK, max(FIRST_CHUNK, 0.1 * (self.stop_at - time.perf_counter()) / max(pace, 1e-9))))
            s = e
        plo, phi, owner = (torch.cat(t) for t in zip(*kept))
        return _drop(plo, phi, owner, self.alive)

    def _chunk(self, l: Tensor, h: Tensor, o: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The open pieces of one chunk (None: stopped by the deadline); violating centres become
        their boxes' candidates."""
        g, C, d = self.graph, self.C[o], self.d[o]
        lo_s, hi_s = l.reshape(-1, *g.input_shape), h.reshape(-1, *g.input_shape)
        try:
            if self.way is None:
                self.way, low = _faster_way(g, lo_s, hi_s, C, d, self.stop_at)
            else:
                low = bound_pieces(g, lo_s, hi_s, C, d, self.way, self.stop_at)
        except DeadlineExpired:
            return None
        self.pieces += o.numel()
        open_ = ~(self.spec.margin(low) > self.margin)
        o, l, h = o[open_], l[open_], h[open_]
        bad = _violating_centres(g, self.spec, l, h, self.C[o], self.d[o])
        for i in torch.unique(o[bad]).tolist():
            if self.alive[i]:
                self.cands[i] = ((l + h) / 2)[bad & (o == i)][0]
                self.alive[i] = False
        return l, h, o


def _drop(plo: Tensor, phi: Tensor, owner: Tensor, alive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of the boxes still ``alive``."""
    keep = alive[owner]
    return plo[keep], phi[keep], owner[keep]


def _violating_centres(graph: BoundGraph, spec: RowSpec, lo: Tensor, hi: Tensor, C: Tensor, d: Tensor) -> Tensor:
    """``[P]`` bool: the pieces whose centre's output (the graph's forward pass) violates the rows
    ``C [P, N, K]``, ``d [P, N]`` (some group with no row ``> 0``)."""
    if lo.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=lo.device)
    with torch.no_grad():
        y = graph.forward(((lo + hi) / 2).reshape(-1, *graph.input_shape)).reshape(lo.shape[0], -1)
    rows = torch.einsum("pnk,pk->pn", C, y.to(C.dtype)) + d
    return spec.margin(rows) <= 0


def _halve(plo: Tensor, phi: Tensor, owner: Tensor, root_w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each piece halved along its free input widest relative to its box's width: the two halves
    (``[2P, n]``), their owners and the boxes (``[k]`` indices) with a piece whose midpoint equals
    an end in this dtype (not halvable)."""
    rel = torch.where(root_w[owner] > 0, (phi - plo) / root_w[owner].clamp(min=torch.finfo(plo.dtype).tiny), 0.0)
    j = rel.argmax(1)
    rows = torch.arange(plo.shape[0], device=plo.device)
    a, b = plo[rows, j], phi[rows, j]
    mid = a + (b - a) / 2
    stuck = owner[(mid <= a) | (mid >= b)]
    lo2, hi2 = plo.clone(), phi.clone()
    hi2[rows, j] = mid  # left halves [a, mid], right halves [mid, b]: they cover [a, b]
    lo2[rows, j] = mid
    return torch.cat([plo, lo2]), torch.cat([hi2, phi]), torch.cat([owner, owner]), torch.unique(stuck)
