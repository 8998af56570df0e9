"""Which intermediate neurons can change the spec rows' value: the rows' cone of influence.

A neuron with no path to an output entry that the spec rows ``C`` read (a nonzero column of
``C``) gets coefficient 0 in the rows' backward pass, and also in the backward pass of every
neuron that does have such a path (that neuron's ancestors have one too). Its box enters no
bound the spec needs, so CROWN need not tighten it: it keeps its interval box (sound; only
looser where nothing reads it). Object detectors are the case in point: YOLO's properties read
five outputs of one cell of a 13 x 13 grid, and through 3 x 3 convolutions the last layers'
cones hold a few of their 169 positions.

The cone is structural, a superset of the exact one: linear ops map a positive random row
through their own backward step (an entry of the input gets a nonzero coefficient unless every
weight linking it to the row is 0, or, with probability 0, random positive coefficients cancel:
then the neuron just keeps its interval box), elementwise activations keep the mask, and every
other nonlinear op (max-pooling, products, normalisations) and every op whose backward step is
not linear in the row (a log-softmax's join) marks all of its inputs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from relax.ir.graph import BNode, BoundGraph
from relax.ir.ops import Activation, Op, ReLU
from relax.ir.ops.activation import _SShaped
from relax.ir.ops.elementwise import Elementwise

__all__ = ["spec_cone", "cone_rows", "in_cone"]

#: activations whose output entry ``j`` depends on input entry ``j`` alone
_PER_ENTRY = (ReLU, _SShaped, Elementwise)


def spec_cone(graph: BoundGraph, C: Tensor) -> dict[str, Tensor]:
    """``{pre-activation: mask [numel]}`` (bool, on ``C``'s device) of the neurons that can reach
    an output entry with a nonzero coefficient in ``C [B, N, K]``, for the pre-activations that
    have neurons outside the cone (those missing have all of theirs inside). Cached on the graph
    per pattern of ``C``'s nonzero columns."""
    used = (C != 0).reshape(-1, C.shape[-1]).any(0)
    if bool(used.all()):
        return {}
    key = (used.nonzero().flatten().cpu().numpy().tobytes(), used.numel())
    cache = graph.__dict__.setdefault("_cone_cache", {})
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = _cone(graph, used)
    return cache[key]


def in_cone(cone: dict[str, Tensor], node: str, numel: int, device: torch.device) -> Tensor | None:
    """``[numel]`` mask of ``node``'s neurons inside the cone (on ``device``); None (every neuron
    counts) when the node has no mask of that size (a pruned graph)."""
    mask = cone.get(node)
    return None if mask is None or mask.numel() != numel else mask.to(device)


def cone_rows(cone: dict[str, Tensor], node: str, idx: Tensor, bidx: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """The (neuron ``idx [T]``, batch element ``bidx [T]``) pairs of ``node`` (``numel`` neurons per
    batch element) inside the cone; all of them when it has no mask of that size."""
    mask = in_cone(cone, node, numel, idx.device)
    if mask is None or idx.numel() == 0:
        return idx, bidx
    inside = mask[idx]
    return idx[inside], bidx[inside]


def _cone(graph: BoundGraph, used: Tensor) -> dict[str, Tensor]:
    """The masks of :func:`spec_cone` from the output's mask ``used [K]``."""
    gen = torch.Generator().manual_seed(0)
    reach: dict[str, Tensor] = {graph.output: used.cpu()}
    for n in reversed(graph.nodes):
        mask = reach.get(n.name)
        if mask is None or not bool(mask.any()):
            continue
        for name, m in zip(n.inputs, _input_masks(graph, n, mask, gen)):
            m = m.reshape(-1)
            reach[name] = m if name not in reach else reach[name] | m
    out: dict[str, Tensor] = {}
    for p in graph.preactivations():
        if p == graph.input_name:
            continue
        numel = graph.by_name[p].numel
        m = reach.get(p, torch.zeros(numel, dtype=torch.bool))
        if m.numel() == numel and not bool(m.all()):
            out[p] = m.to(used.device)
    return out


def _input_masks(graph: BoundGraph, n: BNode, mask: Tensor, gen: torch.Generator) -> list[Tensor]:
    """For node ``n`` whose output entries ``mask [numel]`` are in the cone: its inputs' masks."""
    sizes = [math.prod(graph.shape(i)) for i in n.inputs]
    everything = [torch.ones(s, dtype=torch.bool) for s in sizes]
    if isinstance(n.op, Activation):
        if isinstance(n.op, _PER_ENTRY) and len(sizes) == 1 and sizes[0] == mask.numel():
            return [mask]
        return everything
    if not getattr(n.op, "backward_linear", True):  # which inputs a row reaches depends on its values
        return everything
    dev = _device(n.op)
    row = torch.where(mask, 1.0 + torch.rand(mask.shape, generator=gen, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    row = row.to(dtype=graph.dtype, device=dev).reshape(1, 1, *n.shape)
    try:
        with torch.no_grad():
            A_ins, _ = n.op.backward(row)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError):  # a step that wants other rows: all inputs
        return everything
    out = []
    for A, s, every in zip(A_ins, sizes, everything):
        if A is None:
            out.append(torch.zeros(s, dtype=torch.bool))
            continue
        if A.numel() % s:  # not [S, B, *input shape]: all of it
            out.append(every)
            continue
        flat = A.reshape(-1, s)
        out.append(((flat != 0) | flat.isnan()).any(0).cpu())
    return out


def _device(op: Op) -> torch.device:
    """The device of an op's constants (the CPU when it has none)."""
    for v in vars(op).values():
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")
