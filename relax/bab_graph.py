"""ReLU-split branch-and-bound on the bound graph: any network whose nonlinearities the graph
engine relaxes (residual connections, convolutions, max-pooling, sigmoid / tanh layers beside
ReLUs), without a dense form.

A *domain* fixes the sign of some ReLU inputs: ``s_j = +1`` (``z_j >= 0``, the ReLU is the
identity) or ``s_j = -1`` (``z_j <= 0``, it is zero). Domains are bounded in batches along the
graph engine's batch dimension (:func:`relax.linear.crown`, one batch element per domain):

* every pre-activation box is the root's alpha-CROWN box intersected with the domain's splits
  (``lo_j = 0`` / ``hi_j = 0``; a split leaves earlier layers' boxes valid, and the root boxes stay
  valid for every domain, so none is recomputed);
* the spec rows are bounded by CROWN with optimised ReLU slopes (alpha) and, for each split,
  a Lagrange multiplier ``beta_j >= 0`` of its constraint ``s_j z_j >= 0`` (beta-CROWN, Wang et
  al. 2021, Eq. 6): the bound of ``c^T f(x) - sum_j beta_j s_j z_j(x)`` is a lower bound of
  ``c^T f`` on the domain for any ``beta >= 0``, and Adam ascends it. Once every unstable ReLU of
  a domain is split the network is affine there and the best ``beta`` makes the bound the exact
  minimum over the domain (LP duality);
* a domain whose box becomes empty somewhere is infeasible and is dropped.

Branching: per domain, the unsplit unstable ReLU with the largest BaBSR-style score
(Bunel et al. 2020): the intercept ``-l u / (u - l)`` of its upper relaxation line weighted by
how much the spec rows lose through it (``max(-A_j, 0)`` with ``A_j`` the rows' coefficient on
the ReLU output), with a small share of ``|A_j| min(u, -l)`` to order the rest.

The search is anytime: it stops at the deadline with the smallest domain bound as the best
bound, or when the domain queue exceeds its memory cap. A round starts only when one as long as
the last still fits before the deadline; rounds start with one domain and double up to
``batch_size`` while they take under 2 % of the budget, and the per-domain recomputation of the
boxes is dropped once a round takes over 5 % (large networks).
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from verify.spec import InputSet

from .adam import ProjectedAdam
from .bab import BabResult, RowSpec
from .graph import BoundGraph
from .linear import crown
from .ops import ReLU

__all__ = ["graph_relu_bab", "bound_domains", "relu_inputs"]


def relu_inputs(graph: BoundGraph) -> list[tuple[str, str]]:
    """``[(relu node, its input node)]`` in graph order."""
    return [(n.name, n.inputs[0]) for n in graph.nodes if isinstance(n.op, ReLU)]


def _split_boxes(root: dict[str, tuple[Tensor, Tensor]], splits: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Root boxes ``[1, *shape]`` intersected with the splits ``[D, n]`` -> ``[D, *shape]``."""
    out = {}
    for p, (l, h) in root.items():
        if p not in splits:
            out[p] = (l, h)
            continue
        s = splits[p]
        D = s.shape[0]
        lf, hf = l.reshape(1, -1).expand(D, -1), h.reshape(1, -1).expand(D, -1)
        lf = torch.where(s > 0, lf.clamp_min(0.0), lf)
        hf = torch.where(s < 0, hf.clamp_max(0.0), hf)
        out[p] = (lf.reshape(D, *shapes[p]), hf.reshape(D, *shapes[p]))
    return out


def bound_domains(
    graph: BoundGraph,
    inputs: InputSet,
    rs: RowSpec,
    root: dict[str, tuple[Tensor, Tensor]],
    splits: dict[str, Tensor],
    *,
    steps: int = 10,
    lr: float = 0.1,
    deadline: float = math.inf,
    recompute: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Tensor | None], dict[str, tuple[Tensor, Tensor]]]:
    """Bounds of the spec rows on ``D`` domains.

    Args:
        inputs: the input set, batch of one.
        rs: the property rows (``C [N, K]``, ``d [N]``).
        root: root pre-activation boxes ``{node: (lo, hi)}``, ``[1, *shape]``.
        splits: ``{relu input node: [D, n] int8}`` split signs (0 = not split).
        steps: alpha/beta Adam steps after the CROWN pass (stopped at ``deadline``,
            a ``time.perf_counter()`` value).
        recompute: recompute the pre-activation boxes of every domain by CROWN within its
            split boxes (tighter, one linear pass per unstable neuron); else use the split
            root boxes as they are.

    Returns:
        ``(rows [D, N], infeasible [D], A, boxes)``: lower bounds of ``C y + d`` per domain
        (the best over the steps), the domains found empty, the rows' coefficients
        ``[N, D, *shape]`` on each ReLU output (from the CROWN pass) and the domains' boxes.
    """
    D = next(iter(splits.values())).shape[0]
    shapes = {p: graph.shape(p) for p in root}
    boxes = _split_boxes(root, splits, shapes)
    infeasible = torch.zeros(D, dtype=torch.bool)
    for l, h in boxes.values():
        infeasible |= (l > h).reshape(l.shape[0], -1).any(1).expand(D)
    boxes = {p: (l.expand(D, *l.shape[1:]), h.expand(D, *h.shape[1:])) for p, (l, h) in boxes.items()}
    x_set = inputs.select(torch.zeros(D, dtype=torch.long))
    C, d = rs.batch(D)
    C = C.to(graph.dtype)
    d = d.to(graph.dtype)
    relus = relu_inputs(graph)
    record: dict[str, Tensor | None] = {r: None for r, _ in relus}
    with torch.no_grad():
        if recompute:
            res = crown(graph, x_set, C, bound_overrides=boxes, out_record=record)
            boxes = res.intermediate
            for l, h in boxes.values():
                infeasible |= (l > h).reshape(D, -1).any(1)
        else:
            res = crown(graph, x_set, C, intermediate=boxes, out_record=record)
    best = res.lower + d
    if steps <= 0 or time.perf_counter() >= deadline:
        return best, infeasible, record, boxes
    N = C.shape[1]
    alphas = {}
    for r, _ in relus:
        lw = res.relaxations[r].lw.detach()  # [D, *shape]
        alphas[r] = lw.unsqueeze(0).expand(N, *lw.shape).clone().requires_grad_(True)
    betas = {p: torch.zeros(N, D, s.shape[1], dtype=graph.dtype, requires_grad=True) for p, s in splits.items() if bool((s != 0).any())}
    signs = {p: splits[p].to(graph.dtype).unsqueeze(0) for p in betas}
    params = list(alphas.values())
    opt_a = ProjectedAdam(params, lr, 0.98)
    opt_b = ProjectedAdam(list(betas.values()), lr, 0.98, upper=None) if betas else None

    def alpha_fn(start: str, act: str, sl):
        a = alphas.get(act)
        return None if a is None or start != "__out__" else a[sl]

    for _ in range(steps):
        if time.perf_counter() >= deadline:
            break
        with torch.enable_grad():
            extra = {p: -(b * signs[p]).reshape(N, D, *shapes[p]) for p, b in betas.items()}
            low = crown(graph, x_set, C, intermediate=boxes, alpha_fn=alpha_fn, out_extra=extra).lower + d
            best = torch.maximum(best, low.detach())
            grads = torch.autograd.grad(-low.sum(), params + list(betas.values()), allow_unused=True)
        opt_a.step(grads[: len(params)])
        if opt_b is not None:
            opt_b.step(grads[len(params):])
    return best, infeasible, record, boxes


def _leaf_lp(graph: BoundGraph, inputs: InputSet, rs: RowSpec, split: dict[str, Tensor], boxes: dict[str, tuple[Tensor, Tensor]],
             max_inputs: int = 4096) -> tuple[dict[str, Tensor], list[Tensor]] | None:
    """Optimal multipliers of a domain whose ReLUs are all fixed (by splits or by their boxes).

    The network is affine on such a domain; per spec row, the LP ``min row(x)`` over the input
    box and the split constraints ``s_j z_j(x) >= 0`` (HiGHS) gives the multipliers of those
    constraints, which are the best ``beta`` (LP duality). They are returned for the engine to
    turn into a bound (the LP value itself is not used as a proof), with the LP minimisers whose
    value is ``<= 0`` as candidate counterexamples. ``None`` when the domain is not of this kind
    (other nonlinear ops, more than ``max_inputs`` inputs) or an LP fails.

    Args:
        split: ``{relu input node: [n] int8}``; boxes: ``{node: (lo, hi)}`` ``[1, *shape]``.
    Returns:
        ``({node: [N, n] beta}, [candidate x [n_in]])``.
    """
    import numpy as np
    from scipy.optimize import linprog

    if any(not isinstance(n.op, ReLU) for n in graph.activations()):
        return None
    n_in = math.prod(graph.input_shape)
    if n_in > max_inputs:
        return None
    masks = {}
    for r, p in relu_inputs(graph):
        l, h = boxes[p][0].reshape(-1), boxes[p][1].reshape(-1)
        s = split[p]
        masks[r] = ((s > 0) | ((s == 0) & (l >= 0))).to(graph.dtype)
    X = torch.cat([torch.zeros(1, n_in, dtype=graph.dtype), torch.eye(n_in, dtype=graph.dtype)]).reshape(n_in + 1, *graph.input_shape)
    vals = {graph.input_name: X}
    with torch.no_grad():
        for n in graph.nodes:
            if n.name in masks:
                vals[n.name] = vals[n.inputs[0]] * masks[n.name].reshape(1, *n.shape)
            else:
                vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
    rows_A, rows_b, where = [], [], []
    for p, sp in split.items():
        P = vals[p].reshape(n_in + 1, -1).double()
        for j in (sp != 0).nonzero().flatten().tolist():
            sj = float(sp[j])
            rows_A.append((-sj * (P[1:, j] - P[0, j])).numpy())
            rows_b.append(sj * float(P[0, j]))
            where.append((p, j))
    Y = vals[graph.output].reshape(n_in + 1, -1).double()
    lo, hi = (b.reshape(-1).double().numpy() for b in inputs.bounds())
    A_ub = np.array(rows_A) if rows_A else None
    b_ub = np.array(rows_b) if rows_b else None
    betas = {p: torch.zeros(rs.C.shape[0], sp.numel(), dtype=graph.dtype) for p, sp in split.items()}
    cands = []
    for i in range(rs.C.shape[0]):
        c_row = rs.C[i].double()
        obj = ((Y[1:] - Y[0]) @ c_row).numpy()
        const = float(Y[0] @ c_row + rs.d[i])
        res = linprog(obj, A_ub=A_ub, b_ub=b_ub, bounds=list(zip(lo, hi)), method="highs")
        if res.status == 2 and A_ub is not None:  # no point meets the splits: Farkas multipliers
            lam = _infeasibility_multipliers(A_ub, b_ub, lo, hi)
            if lam is None:
                return None
            lam, gap = lam
            fmin = const + float(np.minimum(obj * lo, obj * hi).sum())
            scale = 2.0 * (abs(fmin) + 1.0) / gap  # f - scale g >= fmin + scale gap > 0
            for (p, j), v in zip(where, lam):
                betas[p][i, j] = scale * float(v)
            continue
        if res.status != 0:
            return None
        if A_ub is not None:
            lam = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
            for (p, j), v in zip(where, lam):
                betas[p][i, j] = float(v)
        if res.fun + const <= 0:
            cands.append(torch.as_tensor(res.x, dtype=torch.float64))
    return betas, cands


def _infeasibility_multipliers(A_ub, b_ub, lo, hi) -> tuple["np.ndarray", float] | None:
    """For ``{x in [lo, hi] : A_ub x <= b_ub}`` empty (the rows are ``-s_j z_j(x) <= 0``):
    ``lambda >= 0`` summing to 1 and ``gap > 0`` such that ``sum_j lambda_j s_j z_j(x) <= -gap``
    on the whole box, from the phase-1 LP ``max t`` s.t. ``A_ub x + t <= b_ub`` (its optimum is
    ``-gap`` and its dual is ``lambda``, Farkas). Used only to choose multipliers: the bound
    they give is computed by the engine."""
    import numpy as np
    from scipy.optimize import linprog

    m, n = A_ub.shape
    A1 = np.hstack([A_ub, np.ones((m, 1))])
    c = np.zeros(n + 1)
    c[-1] = -1.0
    res = linprog(c, A_ub=A1, b_ub=b_ub, bounds=list(zip(lo, hi)) + [(None, 1.0)], method="highs")
    if res.status != 0 or -res.fun >= 0:
        return None
    lam = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    return lam, float(res.fun)


def _leaf_bound(graph: BoundGraph, inputs: InputSet, rs: RowSpec, split: dict[str, Tensor],
                boxes: dict[str, tuple[Tensor, Tensor]], betas: dict[str, Tensor]) -> Tensor:
    """``[N]`` lower bounds of the rows on one fully split domain with the given multipliers
    (the engine's bound, round-off included)."""
    C, d = rs.batch(1)
    N = C.shape[1]
    extra = {p: -(b * split[p].to(b.dtype).unsqueeze(0)).reshape(N, 1, *graph.shape(p)) for p, b in betas.items()}
    with torch.no_grad():
        low = crown(graph, inputs, C.to(graph.dtype), intermediate=boxes, out_extra=extra).lower + d.to(graph.dtype)
    return low[0]


def _branch(relus: list[tuple[str, str]], boxes: dict[str, tuple[Tensor, Tensor]], splits: dict[str, Tensor],
            A: dict[str, Tensor | None]) -> tuple[list[str | None], Tensor]:
    """Per domain the (node, neuron) to split next: ``([D] node names or None, [D] indices)``."""
    D = next(iter(splits.values())).shape[0]
    best_score = torch.full((D,), -1.0, dtype=torch.float64)
    best_node: list[str | None] = [None] * D
    best_idx = torch.zeros(D, dtype=torch.long)
    for r, p in relus:
        l, h = boxes[p]
        l, h = l.reshape(D, -1).double(), h.reshape(D, -1).double()
        unstable = (l < 0) & (h > 0) & (splits[p] == 0)
        if not bool(unstable.any()):
            continue
        Ar = A.get(r)
        a = torch.zeros_like(l) if Ar is None else Ar.reshape(Ar.shape[0], D, -1).double().sum(0)
        inter = (-l * h / (h - l).clamp_min(1e-30)).clamp_min(0)
        score = (-a).clamp_min(0) * inter + 1e-3 * a.abs() * torch.minimum(h, -l) + 1e-9 * inter
        score = torch.where(unstable, score, torch.full_like(score, -1.0))
        s, i = score.max(1)
        better = s > best_score
        best_score = torch.where(better, s, best_score)
        best_idx = torch.where(better, i, best_idx)
        for dd in better.nonzero().flatten().tolist():
            best_node[dd] = p
    return best_node, best_idx


def graph_relu_bab(
    graph: BoundGraph,
    inputs: InputSet,
    rs: RowSpec,
    root: dict[str, tuple[Tensor, Tensor]],
    *,
    timeout: float,
    batch_size: int = 32,
    steps: int = 10,
    margin: float = 1e-6,
    max_domains: int = 100_000,
    check_point=None,
) -> BabResult:
    """ReLU-split BaB from the root boxes ``root`` (alpha-CROWN's, ``[1, *shape]``).

    ``certified`` when every domain's bound exceeds ``margin`` or is infeasible; otherwise
    ``unknown`` at the deadline (``reason="timeout"``), when the queue would exceed
    ``max_domains`` (``"memory"``) or when only fully split domains remain unproved
    (``"exhausted"``). ``check_point(x [n_in]) -> bool`` confirms the candidate counterexamples
    of fully split domains (:func:`_leaf_lp`); the attacks are the caller's.
    """
    t0 = time.perf_counter()
    deadline = t0 + timeout
    relus = relu_inputs(graph)
    if not relus:
        return BabResult("unknown", None, -math.inf, 0, reason="no ReLU to split")
    nodes = [p for _, p in relus]
    sizes = {p: math.prod(graph.shape(p)) for p in nodes}
    # the queue: split signs per node [Q, n_p] and each domain's bound [Q]
    queue = {p: torch.zeros(1, sizes[p], dtype=torch.int8) for p in nodes}
    low, infeasible, A, boxes = bound_domains(graph, inputs, rs, root, queue, steps=0, deadline=deadline)
    qlow = rs.margin(low)
    if bool(infeasible[0]) or bool(qlow[0] > margin):
        return BabResult("certified", None, float(qlow[0]), 1, time.perf_counter() - t0, reason="proved")
    node, idx = _branch(relus, boxes, queue, A)
    qnode, qidx = node, idx
    bounded = 1
    worst_leaf = math.inf
    last_round = 0.0  # a round starts only if one as long as the last still fits
    recompute = True  # per-domain CROWN boxes, while a round costs under 5 % of the budget
    cap = 1  # domains per round: doubled up to batch_size while rounds stay short
    while True:
        if time.perf_counter() + last_round >= deadline:
            lower = min(float(qlow.min()), worst_leaf) if qlow.numel() else worst_leaf
            return BabResult("unknown", None, lower, bounded, time.perf_counter() - t0, reason="timeout")
        Q = qlow.shape[0]
        if Q == 0:
            if math.isfinite(worst_leaf):
                return BabResult("unknown", None, worst_leaf, bounded, time.perf_counter() - t0, reason="exhausted")
            return BabResult("certified", None, margin, bounded, time.perf_counter() - t0, reason="proved")
        if Q + batch_size > max_domains:
            return BabResult("unknown", None, float(qlow.min()), bounded, time.perf_counter() - t0, reason="memory")
        k = min(cap, Q)
        pick = torch.topk(-qlow, k).indices
        keep = torch.ones(Q, dtype=torch.bool)
        keep[pick] = False
        # children: every picked domain twice, the chosen neuron set to +1 / -1
        child = {p: queue[p][pick].repeat(2, 1) for p in nodes}
        for j, b in enumerate(pick.tolist()):
            p = qnode[b]
            child[p][j, qidx[b]] = 1
            child[p][j + k, qidx[b]] = -1
        t_round = time.perf_counter()
        low, infeasible, A, boxes = bound_domains(graph, inputs, rs, root, child, steps=steps, deadline=deadline, recompute=recompute)
        last_round = time.perf_counter() - t_round
        if recompute and last_round > 0.05 * timeout:
            recompute = False
        elif last_round < 0.02 * timeout:
            cap = min(batch_size, 2 * cap)
        bounded += 2 * k
        m = rs.margin(low)
        open_ = ~infeasible & ~(m > margin)
        cnode, cidx = _branch(relus, boxes, child, A)
        leaf = torch.tensor([n is None for n in cnode]) & open_
        for j in leaf.nonzero().flatten().tolist():  # every ReLU fixed: the exact LP multipliers
            one = {p: v[j] for p, v in child.items()}
            one_boxes = {p: (l[j:j + 1], h[j:j + 1]) for p, (l, h) in boxes.items()}
            lp = _leaf_lp(graph, inputs, rs, one, one_boxes) if time.perf_counter() < deadline else None
            if lp is not None:
                for x in lp[1]:
                    if check_point is not None and check_point(x):
                        return BabResult("falsified", x, -math.inf, bounded, time.perf_counter() - t0, reason="counterexample")
                mj = float(rs.margin(_leaf_bound(graph, inputs, rs, one, one_boxes, lp[0])))
                if mj > margin:
                    continue
            worst_leaf = min(worst_leaf, float(m[j]))
        open_ &= ~leaf
        sel = open_.nonzero().flatten()
        queue = {p: torch.cat([queue[p][keep], child[p][sel]]) for p in nodes}
        qlow = torch.cat([qlow[keep], m[sel]])
        kept = keep.nonzero().flatten().tolist()
        qnode = [qnode[i] for i in kept] + [cnode[i] for i in sel.tolist()]
        qidx = torch.cat([qidx[keep], cidx[sel]])
