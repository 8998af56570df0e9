"""MILP refinement of the intermediate (pre-activation) bounds of the first hidden layers of a
dense ReLU net, before branch-and-bound (the 2021 alpha-beta-CROWN configuration for the deeper
mnistfc nets; the MILP is the big-M encoding of Tjeng et al. 2019, :func:`relax.lp.encode`).

Branch-and-bound keeps the root's pre-activation bounds ``pre`` for every domain, so each
neuron that refinement makes stable is one ReLU fewer to branch on, and each tighter bound
tightens every domain's relaxation. For layers ``k = 1..r`` in turn (layer 0 is exact from the
box), every unstable neuron's ``max z_j`` and ``min z_j`` are bounded over the MILP of the
hidden layers ``0..k-1`` with the already refined bounds (:func:`relax.lp.tighten_bounds` with
``integer=True``); then alpha-CROWN recomputes the layers after ``k`` from the refined ones, so
that layer ``k + 1`` starts with fewer unstable neurons. The gain cascades: on mnistfc 256x6
prop_13_0.03 the unstable neurons of layers 3-5 go from 84, 256, 256 to 26, 0, 7 once layers
1-2 are refined. Within a layer, the neurons are solved in the order a caller's ``priority`` gives
(branch-and-bound passes the branching score at the root: the neurons whose relaxation costs the
bound most first), so a deadline cuts the least useful MILPs; the MILPs themselves run without
cutting planes (:class:`relax.solvers.GurobiBackend` ``bound_focus``).

Soundness: only the solver's dual bound is used (also when a solve stops at its time limit:
the incumbent is not a bound), widened by :data:`relax.lp.MILP_BOUND_SLACK` and intersected
with the old bounds, then rounded outwards to the bounds' dtype.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .affine_net import AffineLayer, FeedForwardNet
from .beta import Bounds, ReluNet, intermediate_bounds
from .lp import InputRegion, tighten_bounds

__all__ = ["refine_bounds"]


def _feedforward(net: ReluNet) -> FeedForwardNet:
    """``net`` as the float64 CPU :class:`FeedForwardNet` that :mod:`relax.lp` encodes."""
    layers = [AffineLayer(W.detach().double().cpu(), b.detach().double().cpu()) for W, b in zip(net.Ws, net.bs)]
    return FeedForwardNet((net.n_in,), layers, ["relu"] * (len(layers) - 1))


def _outward(t64: Tensor, dtype: torch.dtype, down: bool) -> Tensor:
    """``t64`` in ``dtype``, rounded down (``down``) or up, so that the bound stays valid."""
    t = t64.to(dtype)
    if dtype == torch.float64:
        return t
    inf = torch.tensor(-torch.inf if down else torch.inf, dtype=dtype)
    bad = (t.double() > t64) if down else (t.double() < t64)
    return torch.where(bad, torch.nextafter(t, inf), t)


def refine_bounds(
    net: ReluNet,
    lo: Tensor,
    hi: Tensor,
    pre: Bounds,
    *,
    layers: int = 2,
    deadline: float | None = None,
    alpha_deadline: float | None = None,
    solve_time_limit: float | None = None,
    solver: str = "auto",
    integer: bool = True,
    rel_gap: float = 1e-3,
    workers: int = 1,
    alpha_steps: int | None = None,
    stop_if: Callable[[Bounds], bool] | None = None,
    priority: Callable[[Bounds], list[Tensor]] | None = None,
) -> tuple[Bounds, dict]:
    """Tighten ``pre`` for the unstable neurons of hidden layers ``1..layers`` by MILP.

    Args:
        net: dense ReLU net (``Ws[k] [n_{k+1}, n_k]``).
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
        alpha_steps: after each refined layer, recompute the bounds of all later layers by
            alpha-CROWN with this many steps (:func:`relax.beta.intermediate_bounds`; not
            stopped by ``deadline`` but by ``alpha_deadline``, past which they are CROWN
            bounds), intersected with the old ones: the next layer's MILPs
            then only cover the neurons still unstable, on tighter big-M bounds. ``None``:
            later layers keep their bounds.
        stop_if: called with the bounds after each refined layer but the last (e.g. "the root
            is proved with them"); refinement stops when it returns True
            (``stats["stopped_by_check"]``).
        priority: called with the current bounds before each refined layer; returns per hidden
            layer a ``[1, n_k]`` (or ``[n_k]``) score: that layer's neurons are solved in
            decreasing score (so the deadline cuts the least important ones). ``None``: the
            loosest triangle relaxation (largest ``-l u``) first.

    Returns:
        ``(pre', stats)``: bounds with ``l_k <= l'_k <= u'_k <= u_k`` (same shapes and dtype as
        ``pre``) and :func:`relax.lp.tighten_bounds`'s stats summed over the layers.
    """
    t0 = time.perf_counter()
    todo = list(range(1, min(layers, len(pre) - 1) + 1))
    stats: dict = {"lps": 0, "time_limited": 0, "stopped_stable": 0, "solvers": [], "stopped_at_deadline": False,
                   "stopped_by_check": False, "unstable_per_layer_before": [int(((l < 0) & (u > 0)).sum()) for l, u in pre]}
    if not todo:
        return pre, {**stats, "time_s": 0.0}
    region = InputRegion(lo.detach().double().cpu().reshape(-1).numpy(), hi.detach().double().cpu().reshape(-1).numpy())
    ff = _feedforward(net)
    out: Bounds = list(pre)
    for k in todo:
        if deadline is not None and time.perf_counter() > deadline:
            stats["stopped_at_deadline"] = True
            break
        b64 = [(l.detach().double().cpu().reshape(-1).numpy(), u.detach().double().cpu().reshape(-1).numpy()) for l, u in out]
        prio = None if priority is None else [p.detach().double().cpu().reshape(-1).numpy() for p in priority(out)]
        new, st = tighten_bounds(ff, region, b64, solver=solver, layers=[k], deadline=deadline, integer=integer,
                                 solve_time_limit=solve_time_limit, order="score", rel_gap=rel_gap, abs_gap=1e-4, workers=workers,
                                 priority=prio)
        (l, u), (nl, nu) = out[k], new[k]
        nl_t = _outward(torch.from_numpy(np.ascontiguousarray(nl)), l.dtype, down=True).reshape(l.shape).to(l.device)
        nu_t = _outward(torch.from_numpy(np.ascontiguousarray(nu)), u.dtype, down=False).reshape(u.shape).to(u.device)
        out[k] = (torch.maximum(l, nl_t), torch.minimum(u, nu_t))
        for key in ("lps", "time_limited", "stopped_stable"):
            stats[key] += st[key]
        stats["solvers"] = sorted(set(stats["solvers"]) | set(st["solvers"]))
        stats["stopped_at_deadline"] |= st["stopped_at_deadline"]
        if alpha_steps is not None and k + 1 < len(out):
            out = intermediate_bounds(net, lo.reshape(1, -1), hi.reshape(1, -1), prior=out, start=k + 2, alpha_steps=alpha_steps,
                                      deadline=alpha_deadline)
        if stop_if is not None and k != todo[-1] and not st["stopped_at_deadline"] and stop_if(out):
            stats["stopped_by_check"] = True
            break
    stats["unstable_per_layer_after"] = [int(((l < 0) & (u > 0)).sum()) for l, u in out]
    stats["time_s"] = time.perf_counter() - t0
    return out, stats
