"""Tighter root boxes for narrow pre-activation layers, by input splitting on each of their neurons.

CROWN's box of a pre-activation node ``z`` that comes after many unstable ReLUs can be several
times wider than the values ``z`` takes, and every relaxation after ``z`` inherits that width
(nn4sys's pensieve: the 6 logits before ``relu(z)^3`` and a weighted average, boxes 5x wider than
their sampled ranges under 336 unstable convolution ReLUs; with the sampled ranges as boxes CROWN
proves the property). When ``z`` has few neurons, each of its bounds is a small branch-and-bound
problem of its own: on the graph prefix that ends at ``z`` (:meth:`relax.ir.graph.BoundGraph.prefix`)
and over the same input box, input splitting (:func:`relax.bab.input_split.input_bab`) decides
``z_i > t`` for ``t`` a little below the least value of ``z_i`` sampled (and ``z_i < t`` above the
greatest). A proof gives the bound ``t`` on the whole box; a search stopped at its time share still
gives its best lower bound; a counterexample (a point past ``t``) moves ``t`` past it and the
search runs again. The caller intersects the boxes with the computed ones (both hold). When the
first :data:`GIVE_UP_AFTER` searches prove nothing, the stage stops and leaves its time to the
caller (the searches split the input: on wide inputs they rarely close).

Which nodes: inputs of nonlinear ops of at most ``max_neurons`` numbers, after at least one ReLU
unstable at the root, whose root box is wider than :data:`LOOSE_RATIO` times their sampled range;
of those, only the ones no other such node precedes (the later ones follow from them).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from relax.bab import RowSpec

__all__ = ["NarrowBoxes", "narrow_nodes", "refine_narrow_boxes", "LOOSE_RATIO"]

#: a node is refined only if its root box is wider than this many times its sampled range
LOOSE_RATIO = 2.0
#: random points of the input box that give the sampled ranges (and the first targets)
SAMPLES = 512
#: most numbers the samples' node values may take (2**24: 128 MB in float64)
SAMPLE_NUMBERS = 2**24
#: bounds searched without a proof after which the stage stops (the rest of its time goes back)
GIVE_UP_AFTER = 2
#: searches per bound: the first target, then targets past the counterexamples found
TRIES = 3


@dataclass
class NarrowBoxes:
    """What :func:`refine_narrow_boxes` found: ``boxes {node: (lo, hi) [1, *shape]}`` (only the
    nodes with a bound tighter than the root's; each box inside the root's), and ``stats`` (nodes, bounds proved / bounded /
    left, searches retargeted past a counterexample, domains, seconds)."""

    boxes: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _unstable_relu_inputs(graph, boxes: dict[str, tuple[Tensor, Tensor]]) -> set[str]:
    """ReLU input nodes whose root box crosses 0 (or that have no box)."""
    from relax.bab.activation_split import relu_inputs

    out = set()
    for r, _ in relu_inputs(graph):
        b = boxes.get(r)
        if b is None or bool(((b[0] < 0) & (b[1] > 0)).any()):
            out.add(r)
    return out


def _structural(graph, boxes: dict[str, tuple[Tensor, Tensor]], max_neurons: int) -> dict[str, set[str]]:
    """Pre-activation nodes of at most ``max_neurons`` numbers with a root box and a ReLU
    unstable at the root among their ancestors, in topological order, with their ancestors."""
    unstable = _unstable_relu_inputs(graph, boxes)
    small = [p for p in graph.preactivations() if p != graph.input_name and p in boxes and math.prod(graph.shape(p)) <= max_neurons]
    return {p: anc for p in small if (anc := graph.ancestors(p)) & unstable}


def narrow_nodes(graph, boxes: dict[str, tuple[Tensor, Tensor]], vals: dict[str, Tensor], max_neurons: int,
                 structural: dict[str, set[str]] | None = None) -> list[str]:
    """The nodes to refine (module docstring), in topological order; ``boxes``: the root's
    boxes ``[1, *shape]``; ``vals``: sampled values ``[S, *shape]`` of (at least) the nodes of
    :func:`_structural` (``structural``: its result, if computed already)."""
    chosen: list[str] = []
    for p, anc in (structural if structural is not None else _structural(graph, boxes, max_neurons)).items():
        if any(c in anc for c in chosen):
            continue
        lo, hi = boxes[p]
        v = vals[p]
        sampled = (v.amax(0) - v.amin(0)).reshape(-1)
        width = (hi - lo).reshape(-1)
        if bool((width > LOOSE_RATIO * sampled + 1e-9 * (1 + v.abs().amax(0).reshape(-1))).any()):
            chosen.append(p)
    return chosen


def _outward(value: float, up: bool) -> float:
    """``value`` moved two float64 steps away from the bound's side (the sum that made it rounded once)."""
    to = math.inf if up else -math.inf
    return math.nextafter(math.nextafter(value, to), to)


def _one_bound(prefix, lo: Tensor, hi: Tensor, i: int, up: bool, extreme: float, spread: float, tol: float,
               deadline: float, seed: int, stats: dict) -> float | None:
    """A sound bound of neuron ``i`` of ``prefix``'s output over ``[lo, hi]``: below its values
    (``up`` False) or above (True); None when no search bounded it. ``extreme``: the least
    (greatest) value seen; ``spread``: the sampled range, which sets the target's distance."""
    from relax.bab.input_split import GraphBoxes, input_bab

    sgn = -1.0 if up else 1.0
    K = math.prod(prefix.shape(prefix.output))
    C = torch.zeros(1, K, dtype=prefix.dtype, device=lo.device)
    C[0, i] = sgn
    gap = tol * max(spread, 1e-6 * (1.0 + abs(extreme)))
    for _ in range(TRIES):
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        t = extreme - sgn * gap  # the property sgn * (z_i - t) > 0
        rs = RowSpec(C, torch.tensor([-sgn * t], dtype=prefix.dtype, device=lo.device), torch.zeros(1, dtype=torch.long))
        res = input_bab(GraphBoxes(prefix, deadline=deadline), rs, lo, hi, timeout=left, margin=0.0, seed=seed)
        stats["domains"] += res.domains
        if res.status == "certified":  # sgn * (z_i - t) > 0 on the whole box
            stats["proved"] += 1
            return _outward(t, up)
        if res.status == "falsified" and res.counterexample is not None:  # a point past t: aim past it
            with torch.no_grad():
                v = float(prefix.forward(res.counterexample.to(prefix.dtype).reshape(1, *prefix.input_shape)).reshape(-1)[i])
            moved = abs(v - extreme)
            extreme = max(extreme, v) if up else min(extreme, v)
            gap = 2 * gap + moved  # aim as far past the new extreme as it moved
            stats["retargeted"] += 1
            continue
        if math.isfinite(res.lower):  # sgn * (z_i - t) >= lower on the whole box
            stats["bounded"] += 1
            return _outward(t + sgn * res.lower, up)
        return None
    return None


def refine_narrow_boxes(graph, lo: Tensor, hi: Tensor, boxes: dict[str, tuple[Tensor, Tensor]], deadline: float, *,
                        max_neurons: int = 16, tol: float = 0.03, seed: int = 0, cone: dict[str, Tensor] | None = None) -> NarrowBoxes:
    """Refined root boxes of the narrow nodes (module docstring) by ``deadline`` (a
    ``perf_counter`` value; each bound gets an equal share of the time left).

    Args:
        graph: the bound graph; lo, hi: the input box ``[n_0]`` (flat).
        boxes: the root's boxes ``{node: (lo, hi) [1, *shape]}`` (CROWN / alpha-CROWN).
        max_neurons: largest node refined; tol: a target's distance past the sampled extreme,
            as a share of the sampled range.
        cone: the property's cone of influence (:func:`relax.bounds.cone.spec_cone`): neurons
            outside it are not refined (no bound the property needs reads their boxes).

    Returns:
        :class:`NarrowBoxes` (empty boxes when no node qualifies).
    """
    t0 = time.perf_counter()
    cone = cone or {}
    structural = {p: anc for p, anc in _structural(graph, boxes, max_neurons).items() if p not in cone or bool(cone[p].any())}
    if not structural:  # most networks: no sampling, no cost
        return NarrowBoxes()
    # the samples' values of the prefix that holds every candidate, at most SAMPLE_NUMBERS numbers in all
    prefix_nodes = set().union(*structural.values())
    per_sample = sum(n.numel for n in graph.nodes if n.name in prefix_nodes)
    S = min(SAMPLES, max(16, SAMPLE_NUMBERS // max(per_sample, 1)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(S, lo.numel(), generator=gen, dtype=lo.dtype).to(lo.device)
    x = (lo + (hi - lo) * u).to(graph.dtype).reshape(S, *graph.input_shape)
    with torch.no_grad():
        vals = graph.values(x, prefix_nodes)
    nodes = narrow_nodes(graph, boxes, vals, max_neurons, structural)
    outside = {p: ~cone[p].cpu() if p in cone and cone[p].numel() == math.prod(graph.shape(p)) else None for p in nodes}
    out = NarrowBoxes(stats={"nodes": nodes, "proved": 0, "bounded": 0, "retargeted": 0, "domains": 0})
    n_bounds = 2 * sum(math.prod(graph.shape(p)) for p in nodes)
    done = 0
    for p in nodes:
        if done >= GIVE_UP_AFTER and not out.stats["proved"]:  # the searches do not close here: leave the time to the caller
            out.stats["given_up"] = True
            break
        prefix = graph.prefix(p)
        v = vals[p].reshape(S, -1)
        vmin, vmax = v.amin(0), v.amax(0)
        blo, bhi = (b.reshape(-1).clone() for b in boxes[p])
        improved = False
        for i in range(v.shape[1]):
            skip = outside[p]
            if skip is not None and bool(skip[i]):
                continue
            for up in (False, True):
                if done >= GIVE_UP_AFTER and not out.stats["proved"]:
                    out.stats["given_up"] = True
                    break
                share = (deadline - time.perf_counter()) / max(n_bounds - done, 1)
                done += 1
                spread = float(vmax[i] - vmin[i])
                b = _one_bound(prefix, lo, hi, i, up, float(vmax[i] if up else vmin[i]), spread, tol,
                               time.perf_counter() + share, seed, out.stats)
                if b is None:
                    continue
                improved |= b < float(bhi[i]) if up else b > float(blo[i])
                if up:
                    bhi[i] = min(float(bhi[i]), b)
                else:
                    blo[i] = max(float(blo[i]), b)
        if improved:
            shape = boxes[p][0].shape
            out.boxes[p] = (blo.reshape(shape), bhi.reshape(shape))
    out.stats["left"] = n_bounds - out.stats["proved"] - out.stats["bounded"]
    out.stats["seconds"] = round(time.perf_counter() - t0, 3)
    return out
