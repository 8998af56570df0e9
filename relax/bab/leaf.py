"""Domains of the graph branch-and-bound whose ReLUs are all fixed: the exact multipliers.

On such a domain the network is affine in its input, ``z_j(x) = a_j . x + b_j`` for every split
neuron and ``row_i(x) = c_i . x + e_i`` for every spec row (read off one forward pass of the
masked network on the basis vectors). Per row, the convex problem ``min row_i(x)`` over the input
set (box, l_1 or l_2 ball clipped by the box) and the split constraints ``s_j z_j(x) >= 0`` is
solved (HiGHS for the LP, cvxpy with Clarabel for the l_2 cone); its multipliers of the split
constraints are the best ``beta`` (LP / conic duality), which the bound engine turns into a
bound (:func:`leaf_bound`): the solver's value itself is never used as a proof. An infeasible
domain gets Farkas multipliers from the phase-1 problem, scaled so that the engine's bound
becomes positive. Minimisers with a value ``<= 0`` are returned as candidate counterexamples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from verify.spec import InputSet, LpBall

from relax.bab import RowSpec
from relax.ir.graph import BoundGraph
from relax.bounds.crown import crown
from relax.ir.ops import ReLU

if TYPE_CHECKING:
    import numpy as np

__all__ = ["leaf_multipliers", "leaf_bound"]


def _relu_inputs(graph: BoundGraph) -> list[tuple[str, str]]:
    return [(n.name, n.inputs[0]) for n in graph.nodes if isinstance(n.op, ReLU)]


def leaf_multipliers(graph: BoundGraph, inputs: InputSet, rs: RowSpec, split: dict[str, Tensor], boxes: dict[str, tuple[Tensor, Tensor]],
             max_inputs: int = 4096, deadline: float = math.inf) -> tuple[dict[str, Tensor], list[Tensor]] | None:
    """Optimal multipliers of a domain whose ReLUs are all fixed (by splits or by their boxes).

    The network is affine on such a domain; per spec row, the LP ``min row(x)`` over the input
    box and the split constraints ``s_j z_j(x) >= 0`` (HiGHS) gives the multipliers of those
    constraints, which are the best ``beta`` (LP duality). They are returned for the engine to
    turn into a bound (the LP value itself is not used as a proof), with the LP minimisers whose
    value is ``<= 0`` as candidate counterexamples. ``None`` when the domain is not of this kind
    (other nonlinear ops, more than ``max_inputs`` inputs) or an LP fails.

    Args:
        split: ``{relu input node: [n] int8}``; boxes: ``{node: (lo, hi)}`` ``[1, *shape]``.
        deadline: ``time.perf_counter()`` value; each solve gets the time left as its limit
            (a solve cut short gives ``None``).
    Returns:
        ``({node: [N, n] beta}, [candidate x [n_in]])``.
    """
    import numpy as np

    if any(not isinstance(n.op, ReLU) for n in graph.activations()):
        return None
    n_in = math.prod(graph.input_shape)
    if n_in > max_inputs:
        return None
    masks = {}
    for r, p in _relu_inputs(graph):
        l = boxes[p][0].reshape(-1)
        s = split[p]
        masks[r] = ((s > 0) | ((s == 0) & (l >= 0))).to(graph.dtype)
    X = torch.cat([torch.zeros(1, n_in, dtype=graph.dtype, device=graph.device), torch.eye(n_in, dtype=graph.dtype, device=graph.device)]).reshape(n_in + 1, *graph.input_shape)
    vals = {graph.input_name: X}
    with torch.no_grad():
        for n in graph.nodes:
            if n.name in masks:
                vals[n.name] = vals[n.inputs[0]] * masks[n.name].reshape(1, *n.shape)
            else:
                vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
    rows_A, rows_b, where = [], [], []
    for p, sp in split.items():
        P = vals[p].reshape(n_in + 1, -1).double().cpu()
        for j in (sp != 0).nonzero().flatten().tolist():
            sj = float(sp[j])
            rows_A.append((-sj * (P[1:, j] - P[0, j])).numpy())
            rows_b.append(sj * float(P[0, j]))
            where.append((p, j))
    Y = vals[graph.output].reshape(n_in + 1, -1).double().cpu()
    lo, hi = (b.reshape(-1).double().cpu().numpy() for b in inputs.bounds())
    ball = None
    if isinstance(inputs, LpBall) and not math.isinf(inputs.p):
        ball = (inputs.center.reshape(-1).double().cpu().numpy(), float(inputs.eps.reshape(-1)[0]), float(inputs.p))
    A_ub = np.array(rows_A) if rows_A else None
    b_ub = np.array(rows_b) if rows_b else None
    betas = {p: torch.zeros(rs.C.shape[0], sp.numel(), dtype=graph.dtype) for p, sp in split.items()}  # CPU, moved at the end
    cands = []
    for i in range(rs.C.shape[0]):
        c_row = rs.C[i].double().cpu()
        obj = ((Y[1:] - Y[0]) @ c_row).numpy()
        const = float(Y[0] @ c_row + rs.d[i])
        res = _solve_leaf(obj, A_ub, b_ub, lo, hi, ball, deadline=deadline)
        if res.status == 2 and A_ub is not None:  # no point meets the splits: Farkas multipliers
            farkas = _infeasibility_multipliers(A_ub, b_ub, lo, hi, ball, deadline)
            if farkas is None:
                return None
            lam, gap = farkas
            fmin = const + float(np.minimum(obj * lo, obj * hi).sum())
            scale = 2.0 * (abs(fmin) + 1.0) / gap  # f - scale g >= fmin + scale gap > 0
            for (p, j), v in zip(where, lam):
                betas[p][i, j] = scale * float(v)
            continue
        if res.status != 0:
            return None
        if res.lam is not None:
            for (p, j), v in zip(where, res.lam):
                betas[p][i, j] = float(v)
        if res.fun + const <= 0:
            cands.append(torch.as_tensor(res.x, dtype=torch.float64, device=graph.device))
    return {p: b.to(graph.device) for p, b in betas.items()}, cands


@dataclass
class _LeafSolution:
    status: int  # 0 optimal, 2 infeasible, other: failed
    fun: float = math.nan
    x: "np.ndarray | None" = None
    lam: "np.ndarray | None" = None  # multipliers (>= 0) of the rows of A_ub


def _solve_leaf(c, A_ub, b_ub, lo, hi, ball, extra_var: bool = False, deadline: float = math.inf) -> _LeafSolution:
    """``min c . x`` over the box ``[lo, hi]``, ``A_ub x <= b_ub`` and, with ``ball = (centre,
    eps, p)`` (``p`` 1 or 2), ``||x - centre||_p <= eps``: HiGHS for the LP, cvxpy (Clarabel) for
    the l_2 cone. ``extra_var``: the last entry of ``c`` / column of ``A_ub`` is a free variable
    ``t <= 1`` (the phase-1 problem); no solution (status 1) once ``deadline`` passes."""
    import time

    import numpy as np

    n = len(lo)
    limit = deadline - time.perf_counter()
    if limit <= 0:
        return _LeafSolution(1)
    opts = {} if math.isinf(limit) else {"time_limit": limit}
    if ball is None:
        from scipy.optimize import linprog

        bounds = list(zip(lo, hi)) + ([(None, 1.0)] if extra_var else [])
        res = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs", options=opts)
        lam = None if res.status != 0 or A_ub is None else np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
        return _LeafSolution(res.status, float(res.fun) if res.status == 0 else math.nan, res.x, lam)
    import cvxpy as cp

    centre, eps, p = ball
    z = cp.Variable(n + (1 if extra_var else 0))
    x = z[:n]
    cons = [x >= lo, x <= hi, cp.norm(x - centre, p) <= eps]
    if extra_var:
        cons.append(z[n] <= 1.0)
    split = None
    if A_ub is not None:
        split = A_ub @ z <= b_ub
        cons.append(split)
    prob = cp.Problem(cp.Minimize(c @ z), cons)
    import warnings

    try:
        with warnings.catch_warnings():  # an inaccurate solution is refused below, not used
            warnings.simplefilter("ignore")
            prob.solve(solver=cp.CLARABEL, **opts)
    except cp.error.SolverError:
        return _LeafSolution(1)
    if prob.status == cp.INFEASIBLE:
        return _LeafSolution(2)
    if prob.status != cp.OPTIMAL:
        return _LeafSolution(1)
    lam = None if split is None else np.maximum(np.asarray(split.dual_value, dtype=np.float64), 0.0)
    return _LeafSolution(0, float(prob.value), np.asarray(z.value, dtype=np.float64), lam)


def _infeasibility_multipliers(A_ub, b_ub, lo, hi, ball=None, deadline: float = math.inf) -> tuple["np.ndarray", float] | None:
    """For ``{x in [lo, hi] : A_ub x <= b_ub}`` empty (the rows are ``-s_j z_j(x) <= 0``):
    ``lambda >= 0`` summing to 1 and ``gap > 0`` such that ``sum_j lambda_j s_j z_j(x) <= -gap``
    on the whole box, from the phase-1 LP ``max t`` s.t. ``A_ub x + t <= b_ub`` (its optimum is
    ``-gap`` and its dual is ``lambda``, Farkas). Used only to choose multipliers: the bound
    they give is computed by the engine."""
    import numpy as np

    m, n = A_ub.shape
    A1 = np.hstack([A_ub, np.ones((m, 1))])
    c = np.zeros(n + 1)
    c[-1] = -1.0
    res = _solve_leaf(c, A1, b_ub, lo, hi, ball, extra_var=True, deadline=deadline)
    if res.status != 0 or -res.fun >= 0 or res.lam is None:
        return None
    return res.lam, float(res.fun)


def leaf_bound(graph: BoundGraph, inputs: InputSet, rs: RowSpec, split: dict[str, Tensor],
                boxes: dict[str, tuple[Tensor, Tensor]], betas: dict[str, Tensor]) -> Tensor:
    """``[N]`` lower bounds of the rows on one fully split domain with the given multipliers
    (the engine's bound, round-off included)."""
    C, d = rs.batch(1)
    N = C.shape[1]
    extra = {p: -(b * split[p].to(b.dtype).unsqueeze(0)).reshape(N, 1, *graph.shape(p)) for p, b in betas.items()}
    with torch.no_grad():
        low = crown(graph, inputs, C.to(graph.dtype), intermediate=boxes, out_extra=extra).spec_lower() + d.to(graph.dtype)
    return low[0]
