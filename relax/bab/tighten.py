"""MILP refinement of the intermediate (pre-activation) bounds of the first hidden layers of a
ReLU network with a dense view, before branch-and-bound (the 2021 alpha-beta-CROWN configuration for the deeper
mnistfc nets; the MILP is the big-M encoding of Tjeng et al. 2019, :func:`relax.exact.lp.encode`).

Branch-and-bound keeps the root's pre-activation bounds ``pre`` for every domain, so each
neuron that refinement makes stable is one ReLU fewer to branch on, and each tighter bound
tightens every domain's relaxation. For layers ``k = 1..r`` in turn (layer 0 is exact from the
box), every unstable neuron's ``max z_j`` and ``min z_j`` are bounded over the MILP of the
hidden layers ``0..k-1`` with the already refined bounds (:func:`relax.exact.lp.tighten_bounds` with
``integer=True``); then alpha-CROWN on the bound graph recomputes the layers after ``k`` within
the refined ones (:func:`refine_graph_root`), so
that layer ``k + 1`` starts with fewer unstable neurons. The gain cascades: on mnistfc 256x6
prop_13_0.03 the unstable neurons of layers 3-5 go from 84, 256, 256 to 26, 0, 7 once layers
1-2 are refined. Within a layer, the neurons are solved in the order a caller's ``priority`` gives
(branch-and-bound passes the branching score at the root: the neurons whose relaxation costs the
bound most first), so a deadline cuts the least useful MILPs; the MILPs themselves run without
cutting planes (:class:`relax.solvers.GurobiBackend` ``bound_focus``).

Soundness: only the solver's dual bound is used (also when a solve stops at its time limit:
the incumbent is not a bound), widened by :data:`relax.exact.lp.MILP_BOUND_SLACK` and intersected
with the old bounds, then rounded outwards to the bounds' dtype.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from relax.ir.dense import FeedForwardNet
from relax.exact.lp import InputRegion, tighten_bounds
from relax.bounds.roundoff import round_outward

#: pre-activation bounds of one domain per hidden layer: ``[(l_k [1, n_k], u_k [1, n_k])]``
Bounds = list[tuple[Tensor, Tensor]]

__all__ = ["has_dense_relu_view", "refine_bounds", "refine_graph_root"]


def refine_bounds(
    net: FeedForwardNet,
    lo: Tensor,
    hi: Tensor,
    pre: Bounds,
    *,
    layers: int = 2,
    deadline: float | None = None,
    solve_time_limit: float | None = None,
    solver: str = "auto",
    integer: bool = True,
    rel_gap: float = 1e-3,
    workers: int = 1,
    stop_if: Callable[[Bounds], bool] | None = None,
    priority: Callable[[Bounds], list[Tensor]] | None = None,
    recompute: Callable[[Bounds, int], Bounds] | None = None,
) -> tuple[Bounds, dict]:
    """Tighten ``pre`` for the unstable neurons of hidden layers ``1..layers`` by MILP.

    Args:
        net: the dense view of a ReLU network (:func:`relax.ir.dense.to_feedforward`).
        lo, hi: the input box, ``[n_0]`` or ``[1, n_0]``.
        pre: valid pre-activation bounds of one domain, ``[(l_k [1, n_k], u_k [1, n_k])]`` for
            every hidden layer.
        layers: refine hidden layers ``1..layers`` (clipped to the net's depth; 0: no change).
        deadline: ``time.perf_counter()`` value after which refinement stops (what is done so
            far is kept; every bound stays valid).
        solve_time_limit: seconds per MILP (its dual bound is used when it stops).
        solver: ``"auto"`` (Gurobi when the model fits its licence, else HiGHS), ``"highs"`` or
            ``"gurobi"``.
        integer: MILP (default) or the triangle LP (for comparison).
        rel_gap: MILP relative gap at which a solve stops (its dual bound is used either way;
            a bound within 0.1 % of the extremum is as useful as the extremum).
        workers: MILPs solved in parallel (threads, one model copy each).
        stop_if: called with the bounds after each refined layer but the last (e.g. "the root
            is proved with them"); refinement stops when it returns True
            (``stats["stopped_by_check"]``).
        recompute: ``recompute(bounds, k) -> bounds`` after refining hidden layer ``k``: the
            later layers' bounds from the refined ones (each intersected with the old; e.g.
            alpha-CROWN on the bound graph, :func:`refine_graph_root`); ``None``: the later
            layers keep their bounds.
        priority: called with the current bounds before each refined layer; returns per hidden
            layer a ``[1, n_k]`` (or ``[n_k]``) score: that layer's neurons are solved in
            decreasing score (so the deadline cuts the least important ones). ``None``: the
            loosest triangle relaxation (largest ``-l u``) first.

    Returns:
        ``(pre', stats)``: bounds with ``l_k <= l'_k <= u'_k <= u_k`` (same shapes and dtype as
        ``pre``) and :func:`relax.exact.lp.tighten_bounds`'s stats summed over the layers.
    """
    t0 = time.perf_counter()
    todo = list(range(1, min(layers, len(pre) - 1) + 1))
    stats: dict = {"lps": 0, "time_limited": 0, "stopped_stable": 0, "solvers": [], "stopped_at_deadline": False,
                   "stopped_by_check": False, "unstable_per_layer_before": [int(((l < 0) & (u > 0)).sum()) for l, u in pre]}
    if not todo:
        return pre, {**stats, "time_s": 0.0}
    region = InputRegion(_numpy(lo), _numpy(hi))
    out: Bounds = list(pre)
    for k in todo:
        if deadline is not None and time.perf_counter() > deadline:
            stats["stopped_at_deadline"] = True
            break
        prio: list[np.ndarray | None] | None = None if priority is None else [_numpy(p) for p in priority(out)]
        new, st = tighten_bounds(net, region, [(_numpy(l), _numpy(u)) for l, u in out], solver=solver, layers=[k], deadline=deadline,
                                 integer=integer, solve_time_limit=solve_time_limit, order="score", rel_gap=rel_gap, abs_gap=1e-4,
                                 workers=workers, priority=prio)
        out[k] = _intersect(out[k], new[k])
        _add_layer_stats(stats, st)
        # the later layers within the refined ones, while more layers follow in time (else the
        # caller's own recomputation, after the refinement, propagates what this layer gained)
        if recompute is not None and k + 1 < len(out) and st["lps"] > 0 and not st["stopped_at_deadline"]:
            out = recompute(out, k)
        if stop_if is not None and k != todo[-1] and not st["stopped_at_deadline"] and stop_if(out):
            stats["stopped_by_check"] = True
            break
    stats["unstable_per_layer_after"] = [int(((l < 0) & (u > 0)).sum()) for l, u in out]
    stats["time_s"] = time.perf_counter() - t0
    return out, stats


def _numpy(t: Tensor) -> np.ndarray:
    """``t`` flat, float64, as a numpy array."""
    return t.detach().double().cpu().reshape(-1).numpy()


def _intersect(old: tuple[Tensor, Tensor], new: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor]:
    """The box ``old`` (``[1, n]`` each) intersected with the float64 bounds ``new`` (``[n]``),
    rounded outwards to ``old``'s dtype."""
    (l, u), (nl, nu) = old, new
    nl_t = round_outward(torch.from_numpy(np.ascontiguousarray(nl)), l.dtype, down=True).reshape(l.shape).to(l.device)
    nu_t = round_outward(torch.from_numpy(np.ascontiguousarray(nu)), u.dtype, down=False).reshape(u.shape).to(u.device)
    return torch.maximum(l, nl_t), torch.minimum(u, nu_t)


def _add_layer_stats(stats: dict, st: dict) -> None:
    """Add one layer's :func:`relax.exact.lp.tighten_bounds` stats ``st`` to ``stats``."""
    for key in ("lps", "time_limited", "stopped_stable"):
        stats[key] += st[key]
    stats["solvers"] = sorted(set(stats["solvers"]) | set(st["solvers"]))
    stats["stopped_at_deadline"] |= st["stopped_at_deadline"]


def refine_graph_root(
    graph,
    model: torch.nn.Module,
    x_set,
    rs,
    root: dict[str, tuple[Tensor, Tensor]],
    root_alphas: dict[str, Tensor] | None,
    *,
    layers: int,
    deadline: float,
    alpha_deadline: float,
    margin: float,
    solve_time_limit: float | None = None,
    workers: int = 1,
    alpha_steps: int = 20,
    dense_limit: int = 2**24,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor] | None, float, dict] | None:
    """MILP refinement of the root boxes of a ReLU network on the bound graph (before
    branch-and-bound, :func:`relax.bab.activation_split.graph_relu_bab`).

    The MILPs encode the network's dense view (:func:`relax.ir.dense.to_feedforward`, one
    matrix per affine chain, built once); after each refined layer with solved MILPs,
    while time is left, alpha-CROWN on the graph (until ``alpha_deadline``)
    recomputes every later box within the refined ones (``bound_overrides``) and the root's
    spec bound, which stops the refinement once it proves the property. Neurons are refined in
    the order of their branching score at the root (:func:`relax.bab.activation_split.relu_scores`).

    Args:
        graph, model, x_set: the bound graph, the model it came from, the input set (batch 1).
        rs: the property rows; root: ``{pre-activation node: (lo, hi) [1, *shape]}``;
        root_alphas: the root's spec-row slopes (alpha-CROWN's ``"__out__"`` alphas).
        layers: hidden layers ``1..layers`` refined; deadline: for the MILPs;
        alpha_deadline: for the recomputation; margin: a bound above it proves the root.
        dense_limit: largest matrix (numbers) of the dense view; larger networks (wide
            convolutions, whose expansion alone takes seconds) are not refined.

    Returns:
        ``(boxes, alphas, root margin lower bound, stats)``, or None when the network has no
        dense ReLU view matching its graph (residual connections, other activations).
    """
    from relax.bab.activation_split import interval_inputs, relu_inputs

    nodes = [p for _, p in relu_inputs(graph)]
    if interval_inputs(graph) or not nodes:
        return None
    ff = _dense_view(graph, model, nodes, dense_limit)
    if ff is None:
        return None
    r = _GraphRoot(graph, ff, x_set, rs, root, root_alphas, margin=margin, alpha_steps=alpha_steps, alpha_deadline=alpha_deadline)
    lo, hi = x_set.bounds()
    pre = r.layers(root)
    out, stats = refine_bounds(ff, lo.reshape(1, -1), hi.reshape(1, -1), pre, layers=layers, deadline=deadline,
                               solve_time_limit=solve_time_limit, workers=workers, stop_if=lambda b: r.lower > margin,
                               priority=r.priority, recompute=r.recompute)
    return r.as_boxes(out), r.alphas, r.lower, stats


def has_dense_relu_view(graph, model: torch.nn.Module, dense_limit: int, *, chain: bool = False) -> bool:
    """Whether :func:`refine_graph_root` can encode the network, from its structure and shapes
    alone (no matrix built): ReLUs only, a dense view (:func:`relax.ir.dense.dense_plan`; skip
    connections carried across the ReLU layers) whose matrices have at most ``dense_limit``
    numbers; with ``chain``, also one ReLU node per layer and nothing carried (no skip connection
    around a ReLU)."""
    from relax.bab.activation_split import interval_inputs, relu_inputs
    from relax.ir.dense import NotFeedForwardError, dense_plan, dense_size

    if interval_inputs(graph) or not relu_inputs(graph):
        return False
    try:
        plan = dense_plan(graph)
        if chain and (any(len(L) != 1 for L in plan.layers) or any(plan.carried)):
            return False
        return all(a == "relu" for a in plan.acts) and dense_size(graph) <= dense_limit
    except NotFeedForwardError:
        return False


def _dense_view(graph, model: torch.nn.Module, nodes: list[str], dense_limit: int) -> FeedForwardNet | None:
    """The dense ReLU view of ``model`` whose hidden layers hold the graph's ReLU inputs
    ``nodes`` (and carried skip values), or None (no such view, or a matrix over ``dense_limit``
    numbers)."""
    from relax.ir.dense import NotFeedForwardError, to_feedforward

    if not isinstance(model, torch.fx.GraphModule):
        try:
            model = torch.fx.symbolic_trace(model)
        except Exception:  # fx raises TraceError, TypeError, ... on control flow (a restricted graph's selections): no view
            return None
    try:  # a layer over dense_limit numbers is refused from the shapes, before any is built
        ff = to_feedforward(model, tuple(graph.input_shape), max_numbers=dense_limit)
    except (NotFeedForwardError, ValueError):
        return None
    held = sorted(b.node for blocks in ff.blocks for b in blocks if not b.carry)
    if any(a != "relu" for a in ff.activations) or held != sorted(nodes):
        return None
    return ff


class _GraphRoot:
    """The root on the bound graph while :func:`refine_graph_root` refines it: its boxes
    ``{pre-activation node: (lo, hi) [1, *shape]}`` (tightened by every recomputation), spec-row
    slopes and best margin lower bound. The dense view's bounds ``[(l [1, n_k], u)]`` (float64,
    CPU) map onto the boxes by its blocks (:meth:`as_boxes`; :meth:`layers` the other way)."""

    def __init__(self, graph, ff: FeedForwardNet, x_set, rs, root: dict[str, tuple[Tensor, Tensor]],
                 root_alphas: dict[str, Tensor] | None, *, margin: float, alpha_steps: int, alpha_deadline: float) -> None:
        self.graph, self.ff, self.x_set, self.rs = graph, ff, x_set, rs
        self.margin, self.alpha_steps, self.alpha_deadline = margin, alpha_steps, alpha_deadline
        self.held = [[b for b in blocks if not b.carry] for blocks in ff.blocks]  # per dense layer, its graph ReLU inputs
        C, d = rs.batch(1)
        self.C, self.d = C.to(graph.dtype), d.to(graph.dtype)
        self.alphas = root_alphas
        self.lower = -math.inf
        self.boxes = dict(root)

    def layers(self, boxes: dict[str, tuple[Tensor, Tensor]]) -> Bounds:
        """The dense layers' bounds from graph boxes (:func:`relax.ir.dense.layer_boxes`)."""
        from relax.ir.dense import layer_boxes

        lo, hi = self.x_set.bounds()
        got = layer_boxes(self.ff, boxes, lo, hi)
        assert got is not None, "the dense view holds every ReLU input (_dense_view)"
        return got

    def as_boxes(self, b: Bounds) -> dict[str, tuple[Tensor, Tensor]]:
        """The root boxes with the ReLU inputs' rows of ``b``, rounded outwards to the graph's dtype."""
        g = self.graph
        boxes = dict(self.boxes)
        for (l, u), held in zip(b, self.held):
            for blk in held:
                shape = (1, *g.shape(blk.node))
                rows = slice(blk.start, blk.start + blk.size)
                boxes[blk.node] = (round_outward(l[:, rows], g.dtype, down=True).reshape(shape).to(g.device),
                                   round_outward(u[:, rows], g.dtype, down=False).reshape(shape).to(g.device))
        return boxes

    def recompute(self, b: Bounds, k: int) -> Bounds:
        """alpha-CROWN within the bounds ``b``: the root's margin bound, slopes and boxes, and
        ``b`` intersected with the boxes (:func:`refine_bounds`'s ``recompute``)."""
        from verify.deadline import Deadline

        from relax.bounds.alpha import alpha_crown

        rs, d = self.rs, self.d
        res = alpha_crown(self.graph, self.x_set, self.C, iterations=self.alpha_steps, bound_overrides=self.as_boxes(b), early_stop=True,
                          stop_fn=lambda low: rs.margin(low + d) > self.margin,
                          deadline=Deadline(max(0.0, self.alpha_deadline - time.perf_counter())))
        self.lower = max(self.lower, float(rs.margin(res.lower + d)[0]))  # every pass bounds the same root
        self.alphas = res.alphas.get("__out__", self.alphas)
        self.boxes.update({p: (torch.maximum(self.boxes[p][0], l), torch.minimum(self.boxes[p][1], h))
                           for p, (l, h) in res.intermediate.items() if p in self.boxes})
        return [(torch.maximum(l, nl), torch.minimum(u, nu)) for (l, u), (nl, nu) in zip(b, self.layers(self.boxes))]

    def priority(self, b: Bounds) -> list[Tensor]:
        """The ReLUs' branching scores at the root within ``b`` (-1: stable), ``[1, n_k]`` per node."""
        from relax.bab.activation_split import bound_domains, relu_scores

        graph, rs = self.graph, self.rs
        nodes = [blk.node for held in self.held for blk in held]
        splits = {p: torch.zeros(1, math.prod(graph.shape(p)), dtype=torch.int8, device=graph.device) for p in nodes}
        al = None if self.alphas is None else {r: a.reshape(a.shape[0], 1, -1).transpose(0, 1).float() for r, a in self.alphas.items()}
        db = bound_domains(graph, self.x_set, rs, self.as_boxes(b), splits, alphas0=al, steps=0, recompute=False)
        sc = relu_scores(graph, db, splits, rs)
        out = []
        for (l, _), held in zip(b, self.held):  # -1 for a carried row (stable) and a node without a score
            score = torch.full(l.shape, -1.0, dtype=torch.float64)
            for blk in held:
                if blk.node in sc:
                    score[:, blk.start:blk.start + blk.size] = sc[blk.node].reshape(1, -1).double().cpu()
            out.append(score)
        return out
