"""Input splitting across the many boxes of one instance, all in one batch.

VNN-COMP's nn4sys files hold hundreds to tens of thousands of boxes, each fixing all but one to
three of the network's inputs (mscn_128d: 154 inputs, 1-3 free). One CROWN pass per box costs
15-35 ms there (every pre-activation bounded from the input), and input splitting box by box pays
a search's set-up per box. Here the pieces of every box travel together:

* each round bounds every open piece in chunks of one batch: forward linear bounds over the
  piece's *free* inputs (:func:`relax.bounds.forward.forward_bounds`, a few columns per node),
  whose boxes serve one CROWN pass of the property rows (``crown(..., intermediate=...)``: no
  intermediate backward pass); measured on mscn_128d 2 ms a piece against 15-35 ms for a CROWN
  pass, and as tight on pieces of a split box (the same 120 boxes proved at 16 pieces each);
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
from relax.bounds.forward import forward_bounds
from relax.ir.graph import BoundGraph
from verify.spec import Box

__all__ = ["ManyBoxesResult", "split_many_boxes", "bound_pieces"]

#: pieces bounded per batch (forward forms ``[chunk, free + 1, widest node]``)
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


def bound_pieces(graph: BoundGraph, lo: Tensor, hi: Tensor, C: Tensor, d: Tensor) -> Tensor:
    """Rigorous lower bounds ``[P, N]`` of ``C y + d`` (``C [P, N, K]``, ``d [P, N]``) over the boxes
    ``lo, hi [P, *input_shape]``: forward linear bounds' boxes, then one CROWN pass of the rows."""
    with torch.no_grad():
        boxes = forward_bounds(graph, lo, hi)
        inter = {p: boxes[p] for p in graph.preactivations() if p != graph.input_name}
        return crown(graph, Box(lo, hi), C, intermediate=inter).spec_lower() + d


def split_many_boxes(
    graph: BoundGraph,
    lo: Tensor,
    hi: Tensor,
    C: Tensor,
    d: Tensor,
    groups: Tensor,
    *,
    stop_at: float = math.inf,
    margin: float = 1e-6,
    max_pieces: int = 64,
) -> ManyBoxesResult:
    """Decide the boxes ``lo, hi [M, n_in]`` (flat inputs; their rows ``C [M, N, K]``, ``d [M, N]``,
    ``groups [N]``) by splitting them together until ``stop_at`` (``perf_counter`` value); see the
    module docstring. Boxes still open at ``stop_at`` are neither proved nor given up."""
    M = lo.shape[0]
    dev, dt = lo.device, graph.dtype
    spec = RowSpec(C[0], d[0], groups.to(dev)) if M else None
    lo, hi, C, d = lo.to(dt), hi.to(dt), C.to(dt), d.to(dt)
    root_w = hi - lo
    owner = torch.arange(M, device=dev)
    plo, phi = lo, hi
    alive = torch.ones(M, dtype=torch.bool, device=dev)  # not yet given up nor falsified
    given_up = torch.zeros(M, dtype=torch.bool, device=dev)
    cands: dict[int, Tensor] = {}
    pieces = rounds = 0
    while owner.numel() and time.perf_counter() < stop_at:
        rounds += 1
        by_free = torch.argsort((phi > plo).sum(1), stable=True)  # a chunk's forms have as many columns as its freest piece
        plo, phi, owner = plo[by_free], phi[by_free], owner[by_free]
        keep_lo, keep_hi, keep_own = [], [], []
        for s in range(0, owner.numel(), CHUNK):
            if time.perf_counter() >= stop_at:
                keep_lo.append(plo[s:])
                keep_hi.append(phi[s:])
                keep_own.append(owner[s:])
                break
            o, l, h = owner[s:s + CHUNK], plo[s:s + CHUNK], phi[s:s + CHUNK]
            low = bound_pieces(graph, l.reshape(-1, *graph.input_shape), h.reshape(-1, *graph.input_shape), C[o], d[o])
            pieces += o.numel()
            open_ = ~(_margin(spec, low) > margin)
            o, l, h = o[open_], l[open_], h[open_]
            bad = _violating_centres(graph, spec, l, h, C[o], d[o])
            for i in torch.unique(o[bad]).tolist():
                if alive[i]:
                    cands[i] = ((l + h) / 2)[bad & (o == i)][0]
                    alive[i] = False
            keep_lo.append(l)
            keep_hi.append(h)
            keep_own.append(o)
        plo, phi, owner = torch.cat(keep_lo), torch.cat(keep_hi), torch.cat(keep_own)
        plo, phi, owner = _drop(plo, phi, owner, alive)
        if time.perf_counter() >= stop_at:
            break
        plo, phi, owner, stuck = _halve(plo, phi, owner, root_w)
        over = torch.bincount(owner, minlength=M) > max_pieces
        over[stuck] = True
        given_up |= over & alive
        alive &= ~over
        plo, phi, owner = _drop(plo, phi, owner, alive)
    has_open = torch.bincount(owner, minlength=M) > 0
    return ManyBoxesResult(alive & ~has_open, cands, given_up, pieces, rounds)


def _margin(spec: RowSpec | None, low: Tensor) -> Tensor:
    assert spec is not None
    return spec.margin(low)


def _drop(plo: Tensor, phi: Tensor, owner: Tensor, alive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of the boxes still ``alive``."""
    keep = alive[owner]
    return plo[keep], phi[keep], owner[keep]


def _violating_centres(graph: BoundGraph, spec: RowSpec | None, lo: Tensor, hi: Tensor, C: Tensor, d: Tensor) -> Tensor:
    """``[P]`` bool: the pieces whose centre's output (the graph's forward pass) violates the rows
    ``C [P, N, K]``, ``d [P, N]`` (some group with no row ``> 0``)."""
    if lo.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=lo.device)
    with torch.no_grad():
        y = graph.forward(((lo + hi) / 2).reshape(-1, *graph.input_shape)).reshape(lo.shape[0], -1)
    rows = torch.einsum("pnk,pk->pn", C, y.to(C.dtype)) + d
    return _margin(spec, rows) <= 0


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
