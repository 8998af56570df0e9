"""Input-space branch-and-bound for low-dimensional inputs (ACAS Xu: 5 inputs).

A domain is a sub-box of the input box. Each round pops the ``batch_size`` worst boxes
(smallest margin lower bound), halves each along one dimension, bounds all children in one
batch and drops the proved ones; the rest go back to the queue. Counterexamples are sought
on the way: the centre and the CROWN minimiser corner of every child are evaluated exactly,
and PGD runs on the worst boxes every few rounds.

Bounds per child, on the bound graph (:class:`GraphBoxes`): CROWN intermediate boxes (linear
bounds only for the neurons unstable under the interval boxes) intersected with the parent's
(a child box lies inside its parent), and a backward CROWN pass for the property rows; the
children still open then get a few alpha-CROWN steps on the best row of each group.

Branching: the dimension with the largest ``|A_i| (hi_i - lo_i)``, ``A`` the input
coefficients of the CROWN lower bound of the row closest to proving the worst group (the
"smear" heuristic of Kochenderfer's Reluplex/ACAS line, with CROWN coefficients in place of
the gradient, as in alpha-beta-CROWN's input split), with a cap on the boxes' aspect ratio.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from relax.bab import BabResult, RowSpec, pgd_boxes

#: intermediate boxes of a batch of boxes: per pre-activation node (graph order), ``(lo, hi)``
#: flattened to ``[B, n]``
Bounds = list[tuple[Tensor, Tensor]]

__all__ = ["input_bab", "GraphBoxes"]


class GraphBoxes:
    """A bound graph as the input-split search sees a network: ``forward`` on flat inputs
    ``[B, n_0]``, CROWN bounds of the property rows over a batch of boxes (:meth:`bound`) and
    a few alpha-CROWN steps on given rows over given intermediate boxes (:meth:`optimize`).
    Intermediate boxes travel as a list over ``graph.preactivations()`` of flat ``[B, n]``
    pairs (a child's prior is its parent's boxes)."""

    def __init__(self, graph, deadline: float = math.inf) -> None:
        self.graph = graph
        self.dtype = graph.dtype
        self.names = graph.preactivations()
        # perf_counter time after which a CROWN pass stops tightening intermediate boxes (its
        # bounds stay sound), so that no pass of a large network runs past the search's deadline
        self.deadline = deadline

    def _deadline(self):
        from verify.deadline import Deadline

        return None if math.isinf(self.deadline) else Deadline.until(self.deadline)

    def forward(self, x: Tensor) -> Tensor:
        return self.graph.forward(x.reshape(x.shape[0], *self.graph.input_shape)).reshape(x.shape[0], -1)

    def _set(self, lo: Tensor, hi: Tensor):
        from verify.spec import Box

        shape = self.graph.input_shape
        return Box(lo.reshape(lo.shape[0], *shape), hi.reshape(hi.shape[0], *shape))

    def _boxes(self, pre: Bounds | None) -> dict[str, tuple[Tensor, Tensor]] | None:
        if pre is None:
            return None
        g = self.graph
        return {p: (l.reshape(l.shape[0], *g.shape(p)), u.reshape(u.shape[0], *g.shape(p))) for p, (l, u) in zip(self.names, pre)}

    def bound(self, spec: RowSpec, lo: Tensor, hi: Tensor, prior: Bounds | None) -> tuple[Tensor, Tensor, Bounds]:
        """``lower [B, N]`` of the rows over each box, ``A_in [B, N, n_0]`` (the rows' input
        coefficients), and the boxes' intermediate bounds (intersected with ``prior``)."""
        from relax.bounds.crown import crown

        g, B = self.graph, lo.shape[0]
        C, d = spec.batch(B)
        rec: dict[str, Tensor | None] = {g.input_name: None}
        res = crown(g, self._set(lo, hi), C.to(g.dtype), bound_overrides=self._boxes(prior), out_record=rec, deadline=self._deadline())
        A_rec = rec[g.input_name]
        assert A_rec is not None  # every pass records the input's coefficients
        A = A_rec.reshape(C.shape[1], B, -1).transpose(0, 1)
        pre = [(res.intermediate[p][0].reshape(B, -1), res.intermediate[p][1].reshape(B, -1)) for p in self.names]
        return res.spec_lower() + d.to(g.dtype), A, pre

    def optimize(self, C: Tensor, d: Tensor, lo: Tensor, hi: Tensor, pre: Bounds, steps: int, lr: float) -> Tensor:
        """alpha-CROWN lower bounds ``[B, R]`` of the rows ``C [B, R, K] y + d`` over the boxes
        with their intermediate bounds ``pre`` fixed (``steps`` slope updates)."""
        from relax.bounds.alpha import alpha_crown

        res = alpha_crown(self.graph, self._set(lo, hi), C.to(self.dtype), iterations=steps, lr=lr, intermediate=self._boxes(pre),
                          deadline=self._deadline())
        return res.lower.detach() + d.to(self.dtype)


def _rel_width(lo: Tensor, hi: Tensor, root_w: Tensor) -> Tensor:
    """``[B, n_0]``: widths relative to the root box's (zero-width root dimensions: 0)."""
    w = hi - lo
    return torch.where(root_w > 0, w / torch.where(root_w > 0, root_w, torch.ones_like(root_w)), torch.zeros_like(w))


def _branch_dim(
    spec: RowSpec, lower: Tensor, A: Tensor, lo: Tensor, hi: Tensor, root_w: Tensor, rel_weight: float = 0.5, max_aspect: float = 64.0
) -> Tensor:
    """Split dimension per box ``[B]``: normalised smear (``|A_i| w_i`` of the row closest to
    proving the worst group) plus ``rel_weight`` times the normalised relative width
    ``w_i / root_w_i``; the second term keeps a dimension the final linear bound hardly sees
    (but that keeps inner ReLUs unstable) from never being split. Beyond that, a box whose
    relative widths differ by more than ``max_aspect`` is split along its relatively widest
    dimension: otherwise the smear (zero for a dimension whose only effect is through
    unstable ReLUs) can halve the other dimensions forever while the bound stays loose."""
    gmax = spec.group_max(lower)  # [B, G]
    g_worst = gmax.argmin(-1)  # [B]
    in_group = spec.groups.unsqueeze(0) == g_worst.unsqueeze(1)  # [B, N]
    row = torch.where(in_group, lower, torch.full_like(lower, -math.inf)).argmax(-1)  # [B]
    a = A[torch.arange(A.shape[0]), row]  # [B, n_0]
    w = hi - lo
    smear = a.abs() * w
    rel = _rel_width(lo, hi, root_w)
    score = smear / smear.amax(1, keepdim=True).clamp_min(1e-300) + rel_weight * rel / rel.amax(1, keepdim=True).clamp_min(1e-300)
    score = torch.where(w > 0, score, torch.full_like(score, -1.0))
    dim = score.argmax(-1)
    rmax, widest = rel.max(1)
    return torch.where(rel.gather(1, dim.unsqueeze(1)).squeeze(1) * max_aspect < rmax, widest, dim)


def _split(
    net: GraphBoxes, spec: RowSpec, p_lo: Tensor, p_hi: Tensor, p_low: Tensor, p_A: Tensor, p_pre: Bounds, branching: str, root_w: Tensor,
    max_aspect: float = 64.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Bounds]:
    """Halve each of the ``k`` boxes along one dimension and bound the ``2k`` children.

    ``branching="smear"`` picks the dimension by :func:`_branch_dim`; ``"strong"`` bounds the
    children of every candidate dimension (all of them for ``n_0 <= 8``, else the 3 best by
    smear plus the relatively widest), bounds all their children and keeps the split whose
    worse child is best (strong branching; the chosen children keep the bounds computed here).
    Either way a dimension more than ``max_aspect`` times narrower (relative to the root box)
    than the box's widest is not split.

    Returns:
        children ``lo, hi [2k, n_0]``, their ``lower [2k, N]``, ``A_in`` and intermediate bounds.
    """
    k, n0 = p_lo.shape
    if branching == "smear":
        cand = _branch_dim(spec, p_low, p_A, p_lo, p_hi, root_w, max_aspect=max_aspect).unsqueeze(0)  # [1, k]
    elif branching == "strong":
        if n0 <= 8:
            cand = torch.arange(n0).unsqueeze(1).expand(n0, k)
        else:
            sm = (p_A.abs().amax(1) * (p_hi - p_lo))
            top = sm.topk(min(3, n0), dim=1).indices.T
            cand = torch.cat([top, _rel_width(p_lo, p_hi, root_w).argmax(1).unsqueeze(0)])
    else:
        raise ValueError(f"unknown branching {branching!r}: use 'strong' or 'smear'")
    D = cand.shape[0]
    dims = cand.reshape(-1)  # [D*k]
    lo_r, hi_r = p_lo.repeat(D, 1), p_hi.repeat(D, 1)
    mid = (lo_r[torch.arange(D * k), dims] + hi_r[torch.arange(D * k), dims]) / 2
    c_lo = torch.cat([lo_r, lo_r.clone()])
    c_hi = torch.cat([hi_r.clone(), hi_r])
    j = torch.arange(D * k)
    c_hi[j, dims] = mid
    c_lo[D * k + j, dims] = mid
    c_prior = [(l.repeat(2 * D, 1), u.repeat(2 * D, 1)) for l, u in p_pre]
    lower, A, pre = net.bound(spec, c_lo, c_hi, c_prior)
    if D > 1:
        cm = spec.margin(lower).view(2, D, k)
        score = torch.minimum(cm[0], cm[1]) + 1e-3 * torch.maximum(cm[0], cm[1])
        rel = _rel_width(p_lo, p_hi, root_w)
        c_rel = rel.T.gather(0, cand)  # [D, k]
        # zero-width candidates, and (see _branch_dim) ones far narrower than the widest
        flat = ((p_hi - p_lo).T.gather(0, cand) <= 0) | (c_rel * max_aspect < rel.amax(1).unsqueeze(0))
        score = torch.where(flat, torch.full_like(score, -math.inf), score)
        best = score.argmax(0)  # [k]
        pick = torch.cat([best * k + torch.arange(k), D * k + best * k + torch.arange(k)])
        c_lo, c_hi, lower, A = c_lo[pick], c_hi[pick], lower[pick], A[pick]
        pre = [(l[pick], u[pick]) for l, u in pre]
    return c_lo, c_hi, lower, A, pre


def _alpha_nearest(
    net: GraphBoxes, spec: RowSpec, lo: Tensor, hi: Tensor, pre: Bounds, lower: Tensor, cm: Tensor, margin: float, frac: float, steps: int,
    rows_per_group: int = 1,
) -> tuple[Tensor, Tensor]:
    """alpha-CROWN (``steps`` slope updates) on the open boxes closest to proved (the best
    ``frac`` of them by margin), for the ``rows_per_group`` rows of each group with the best
    CROWN bound (a group's bound is its best row's); those rows' bounds become the max of
    both (each is sound).

    Args:
        lo, hi: ``[B, n_0]``; lower: ``[B, N]``; cm: margins ``[B]``.

    Returns:
        the updated ``lower [B, N]`` and ``cm [B]``.
    """
    open_ = (cm <= margin).nonzero().squeeze(1)
    n = int(open_.numel() * frac)
    if n == 0:
        return lower, cm
    near = open_[torch.argsort(cm[open_], descending=True)[:n]]
    low = lower[near]
    per_group = []  # [n, r] row indices per group
    for g in range(spec.num_groups):
        rows = (spec.groups == g).nonzero().squeeze(1)
        top = low[:, rows].topk(min(rows_per_group, rows.numel()), dim=1).indices
        per_group.append(rows[top])
    idx = torch.cat(per_group, 1)  # [n, R]
    low2 = net.optimize(spec.C[idx], spec.d[idx], lo[near], hi[near], [(l[near], u[near]) for l, u in pre], steps, 0.5)
    lower = lower.clone()
    lower[near] = low.scatter_reduce(1, idx, low2, reduce="amax")
    return lower, spec.margin(lower)


def input_bab(
    net: GraphBoxes,
    spec: RowSpec,
    lo: Tensor,
    hi: Tensor,
    *,
    timeout: float = 60.0,
    batch_size: int = 512,
    max_domains: int = 300_000,
    margin: float = 1e-9,
    pgd_every: int = 5,
    branching: str = "mixed",
    max_aspect: float = 64.0,
    alpha_steps: int = 3,
    alpha_frac: float = 1.0,
    check_point=None,
    seed: int = 0,
) -> BabResult:
    """Decide the property on the box ``[lo, hi]`` (``[n_0]`` each) by input splitting.

    Args:
        net: the network's bound graph (float64 recommended), as :class:`GraphBoxes`.
        spec: the property rows.
        timeout: seconds; past it the result is ``unknown`` with the best bound.
        batch_size: boxes popped per round (each gives two children).
        max_domains: queue limit; beyond it the search stops with ``unknown``.
        margin: a box is proved when its margin lower bound exceeds this.
        branching: ``"strong"``, ``"smear"`` (see :func:`_split`) or ``"mixed"`` (strong
            for the worst quarter of each batch, smear for the rest).
        max_aspect: largest ratio of two relative widths of a box before its relatively
            widest dimension is split regardless of the branching score (see :func:`_branch_dim`).
        alpha_steps, alpha_frac: alpha-CROWN with this many steps on the ``alpha_frac`` of
            the open children closest to proved, for the best row of each group (0: CROWN
            only). A few steps pay: on ACAS Xu prop_2 (3_3, 4_2) 3 steps decide in 30-50 s
            what CROWN alone left open after 400 s.
        pgd_every: run PGD on the worst boxes every this many rounds (0: never).
        check_point: ``f(x [n_0]) -> bool`` confirming a counterexample on the original
            model (default: the dense net itself).
        seed: for the random restarts of PGD.

    Returns:
        :class:`BabResult`; ``falsified`` only with a counterexample ``check_point`` accepted.
    """
    t0 = time.perf_counter()
    deadline = t0 + timeout
    gen = torch.Generator().manual_seed(seed)
    dt = net.dtype
    spec = spec.to(dt)
    lo, hi = lo.to(dt).reshape(1, -1), hi.to(dt).reshape(1, -1)
    check = check_point or (lambda x: bool(spec.margin(spec.values(net.forward(x.unsqueeze(0))))[0] <= 0))
    rejected = 0

    def try_points(xs: Tensor, ms: Tensor) -> Tensor | None:
        nonlocal rejected
        cand = (ms <= 0).nonzero().squeeze(1)
        for i in cand[torch.argsort(ms[cand])][:8].tolist():
            if check(xs[i]):
                return xs[i]
            rejected += 1
        return None

    def finish(status: str, reason: str, lower: float, cex: Tensor | None = None) -> BabResult:
        return BabResult(status, cex, lower, n_bounded, time.perf_counter() - t0, reason, {"rounds": rounds, "rejected_cex": rejected})

    n_bounded, rounds = 0, 0
    # root: bound, attack
    with torch.no_grad():
        lower, A, pre = net.bound(spec, lo, hi, None)
    n_bounded += 1
    m = spec.margin(lower)
    if bool(m[0] > margin):
        return finish("certified", "proved", float(m[0]))
    if time.perf_counter() >= deadline:  # a large network's root pass used the whole budget
        return finish("unknown", "timeout", float(m[0]))
    x, xm = pgd_boxes(net, spec, lo, hi, steps=50, restarts=5, generator=gen)
    cex = try_points(x, xm)
    if cex is not None:
        return finish("falsified", "counterexample", -math.inf, cex)

    # queue: boxes, their margin bound, and their intermediate bounds (priors for children)
    q_lo, q_hi, q_low, q_A, q_pre = lo, hi, lower, A, pre
    round_s, t_round = 0.0, None  # a round starts only if one as long as the last still fits
    while True:
        if t_round is not None:
            round_s = time.perf_counter() - t_round
        if q_lo.shape[0] == 0:
            return finish("certified", "proved", margin)
        if time.perf_counter() + round_s > deadline:
            return finish("unknown", "timeout", float(spec.margin(q_low).min()))
        t_round = time.perf_counter()
        if q_lo.shape[0] > max_domains:
            return finish("unknown", "memory", float(spec.margin(q_low).min()))
        rounds += 1
        k = min(batch_size, q_lo.shape[0])
        order = torch.argsort(spec.margin(q_low))
        take, keep = order[:k], order[k:]
        p_lo, p_hi, p_low, p_A = q_lo[take], q_hi[take], q_low[take], q_A[take]
        p_pre = [(l[take], u[take]) for l, u in q_pre]
        q_lo, q_hi, q_low, q_A = q_lo[keep], q_hi[keep], q_low[keep], q_A[keep]
        q_pre = [(l[keep], u[keep]) for l, u in q_pre]

        with torch.no_grad():
            if branching == "mixed":  # strong branching on the worst quarter, smear on the rest
                ks = max(1, k // 4)
                parts = [
                    _split(net, spec, p_lo[sl], p_hi[sl], p_low[sl], p_A[sl], [(l[sl], u[sl]) for l, u in p_pre], br, hi - lo, max_aspect)
                    for sl, br in ((slice(0, ks), "strong"), (slice(ks, k), "smear"))
                    if sl.stop > sl.start
                ]
                quads = [pt[:4] for pt in parts]  # (lo, hi, lower, A) of each part
                c_lo, c_hi, lower, A = (torch.cat([q[i] for q in quads]) for i in range(4))
                pre = [(torch.cat([pt[4][j][0] for pt in parts]), torch.cat([pt[4][j][1] for pt in parts])) for j in range(len(p_pre))]
            else:
                c_lo, c_hi, lower, A, pre = _split(net, spec, p_lo, p_hi, p_low, p_A, p_pre, branching, hi - lo, max_aspect)
        n_bounded += c_lo.shape[0]
        cm = spec.margin(lower)
        if alpha_steps > 0:
            lower, cm = _alpha_nearest(net, spec, c_lo, c_hi, pre, lower, cm, margin, alpha_frac, alpha_steps)

        # counterexample candidates: centres and the minimiser corners of the worst rows
        with torch.no_grad():
            open_ = ~(cm > margin)
            if open_.any():
                idx = open_.nonzero().squeeze(1)
                a = A[idx]  # [b, N, n0]
                corners = torch.where(a > 0, c_lo[idx].unsqueeze(1), c_hi[idx].unsqueeze(1))  # [b, N, n0]
                pts = torch.cat([(c_lo[idx] + c_hi[idx]) / 2, corners.reshape(-1, corners.shape[-1])])
                pm = spec.margin(spec.values(net.forward(pts)))
                cex = try_points(pts, pm)
                if cex is not None:
                    return finish("falsified", "counterexample", -math.inf, cex)
        if pgd_every and rounds % pgd_every == 0 and open_.any():
            idx = open_.nonzero().squeeze(1)
            worst = idx[torch.argsort(cm[idx])[:64]]
            x, xm = pgd_boxes(net, spec, c_lo[worst], c_hi[worst], steps=20, restarts=1, generator=gen)
            cex = try_points(x, xm)
            if cex is not None:
                return finish("falsified", "counterexample", -math.inf, cex)

        keep_c = open_.nonzero().squeeze(1)
        q_lo = torch.cat([q_lo, c_lo[keep_c]])
        q_hi = torch.cat([q_hi, c_hi[keep_c]])
        q_low = torch.cat([q_low, lower[keep_c]])
        q_A = torch.cat([q_A, A[keep_c]])
        q_pre = [(torch.cat([ql, l[keep_c]]), torch.cat([qu, u[keep_c]])) for (ql, qu), (l, u) in zip(q_pre, pre)]
