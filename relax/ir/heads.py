"""A network's final log-softmax dropped for rows it cannot change.

``log_softmax(z)_i = z_i - LSE(z)`` over each softmax group, so a row ``c`` of the property whose
coefficients sum to 0 over every group (a difference of two outputs: every robustness row) has
``c . log_softmax(z) = c . z`` at every input. For such rows the graph without the head (its
output the scores ``z``, moved as the head's output was) gives every row the same value: a search
on it (``bab``) decides the same property without the log-sum-exp nodes, as on the logits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from relax.ir.graph import BNode, BoundGraph
from relax.ir.ops import LogSoftmaxRows, Permute, Reshape

__all__ = ["without_log_softmax"]


def _head_chain(graph: BoundGraph) -> list[str] | None:
    """``[join, move, ..., output]``: the :class:`LogSoftmaxRows` node and the reshapes and
    permutations from it to the output (no selection or padding: every output entry is one entry
    of the head), or None when the output is not such a chain."""
    if graph.output not in graph.by_name:  # the output is the input itself
        return None
    chain = [graph.output]
    while not isinstance(graph.by_name[chain[0]].op, LogSoftmaxRows):
        n = graph.by_name[chain[0]]
        if not isinstance(n.op, (Reshape, Permute)) or n.inputs[0] == graph.input_name:  # entries reordered, none added
            return None
        if graph.consumers[n.inputs[0]] != [n.name]:
            return None
        chain.insert(0, n.inputs[0])
    return chain


def _groups(graph: BoundGraph, chain: list[str]) -> Tensor:
    """``[K]``: the softmax group of each output entry (the join's last dim is the softmax's)."""
    shape = graph.by_name[chain[0]].shape
    ids = torch.arange(math.prod(shape[:-1]), dtype=torch.float64).repeat_interleave(shape[-1]).reshape(1, *shape)
    for name in chain[1:]:
        ids = graph.by_name[name].op.forward(ids)
    return ids.reshape(-1).long()


def _sums_vanish(rows: Tensor, groups: Tensor) -> bool:
    """Whether every row of ``rows [R, K]`` sums to exactly 0 over each group (``groups [K]``):
    ``math.fsum`` is the exact sum correctly rounded, 0 only for an exact 0 (a float sum can
    cancel ``2^60 + 1 - 2^60`` to 0)."""
    terms: dict[tuple[int, int], list[float]] = {}
    for r, k in rows.nonzero().tolist():
        terms.setdefault((r, int(groups[k])), []).append(float(rows[r, k]))
    return all(math.fsum(v) == 0.0 for v in terms.values())


def without_log_softmax(graph: BoundGraph, C: Tensor) -> BoundGraph:
    """``graph`` with its final log-softmax replaced by the softmax's scores when every row of
    ``C [..., N, K]`` sums to exactly 0 over each softmax group (module docstring), else ``graph``."""
    chain = _head_chain(graph)
    if chain is None:
        return graph
    if not _sums_vanish(C.reshape(-1, C.shape[-1]).to(torch.float64).cpu(), _groups(graph, chain)):
        return graph
    join = graph.by_name[chain[0]]
    scores = join.inputs[0]
    nodes = [BNode(n.name, Reshape(n.shape, n.shape), [scores], n.shape) if n.name == join.name else n for n in graph.nodes]
    needed, stack = set(), [graph.output]
    by_name = {n.name: n for n in nodes}
    while stack:
        name = stack.pop()
        if name in needed or name == graph.input_name:
            continue
        needed.add(name)
        stack.extend(by_name[name].inputs)
    kept = [n for n in nodes if n.name in needed]
    return BoundGraph(graph.input_name, graph.input_shape, kept, graph.output, graph.dtype, graph.device)
