"""Input-space branch-and-bound for low-dimensional inputs (ACAS Xu: 5 inputs).

A domain is a sub-box of the input box. Each round pops the ``batch_size`` worst boxes
(smallest margin lower bound), halves each along one dimension, bounds all children in one
batch and drops the proved ones; the rest go back to the queue. Counterexamples are sought
on the way: the centre and the CROWN minimiser corner of every child are evaluated exactly,
and PGD (the project's falsifier, :func:`verify.attack.pgd_attack`, each box its own set) runs
on the worst boxes every few rounds.

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
from dataclasses import dataclass

import torch
from torch import Tensor

from relax.bab import BabResult, RowSpec
from verify.attack import pgd_attack
from verify.deadline import DeadlineExpired
from verify.registry import FLOAT64_PROOF_MARGIN
from verify.spec import Box, LinearSpec

#: intermediate boxes of a batch of boxes: per pre-activation node (graph order), ``(lo, hi)``
#: flattened to ``[B, n]``
Bounds = list[tuple[Tensor, Tensor]]

__all__ = ["input_bab", "GraphBoxes"]

#: the share of the queue's memory cap above which the boxes closest to proved go first
FULL_QUEUE = 0.8
#: strong branching bounds ``2 n_0`` children per box (``n_0`` free inputs): it is replaced by smear branching when that
#: many passes at the root's pace would take more than this share of the budget (a large network:
#: the cGAN generators' root pass takes seconds, ACAS Xu's milliseconds)
STRONG_BRANCHING_SHARE = 0.05


class GraphBoxes(torch.nn.Module):
    """A bound graph as the input-split search sees a network: ``forward`` on flat inputs
    ``[B, n_0]`` (a module without parameters, run in the graph's dtype: the attacks of
    :mod:`verify.attack` take it as the model and work in the dtype of the boxes), CROWN bounds
    of the property rows over a batch of boxes (:meth:`bound`) and a few alpha-CROWN steps on
    given rows over given intermediate boxes (:meth:`optimize`). Intermediate boxes travel as a
    list over ``graph.preactivations()`` of flat ``[B, n]`` pairs (a child's prior is its
    parent's boxes)."""

    def __init__(self, graph, deadline: float = math.inf) -> None:
        super().__init__()
        self.graph = graph
        self.dtype = graph.dtype
        self.names = graph.preactivations()
        # perf_counter time after which a CROWN pass stops tightening intermediate boxes (its
        # bounds stay sound), so that no pass of a large network runs past the search's deadline
        self.deadline = deadline

    def _deadline(self):
        from verify.deadline import Deadline

        return None if math.isinf(self.deadline) else Deadline.until(self.deadline)

    def _stop_at(self) -> float | None:
        """The hard deadline of the passes' spec rows (:class:`verify.deadline.DeadlineExpired`
        past it: :func:`input_bab` then answers with the bounds it has)."""
        return None if math.isinf(self.deadline) else self.deadline

    def forward(self, x: Tensor) -> Tensor:
        """``[B, n_0] -> [B, K]`` (``x`` converted to the graph's dtype)."""
        return self.graph.forward(x.to(self.dtype).reshape(x.shape[0], *self.graph.input_shape)).reshape(x.shape[0], -1)

    def _set(self, lo: Tensor, hi: Tensor) -> Box:
        shape = self.graph.input_shape
        return Box(lo.reshape(lo.shape[0], *shape), hi.reshape(hi.shape[0], *shape))

    def _boxes(self, pre: Bounds | None) -> dict[str, tuple[Tensor, Tensor]] | None:
        if pre is None:
            return None
        g = self.graph
        return {p: (l.reshape(l.shape[0], *g.shape(p)), u.reshape(u.shape[0], *g.shape(p))) for p, (l, u) in zip(self.names, pre)}

    def bound(self, spec: RowSpec, lo: Tensor, hi: Tensor, prior: Bounds | None) -> tuple[Tensor, Tensor, Bounds, Tensor]:
        """``lower [B, N]`` of the rows over each box, ``A_in [B, N, n_0]`` (the rows' input
        coefficients), the boxes' intermediate bounds (intersected with ``prior``), and ``linear
        [B, N]``: the rows' linear bounds alone, ``min_box A_in . x + c`` (``lower`` may be higher,
        from the interval bound: only ``linear`` goes with ``A_in``)."""
        from relax.bounds.crown import crown

        g, B = self.graph, lo.shape[0]
        C, d = spec.batch(B)
        rec: dict[str, Tensor | None] = {g.input_name: None}
        res = crown(g, self._set(lo, hi), C.to(g.dtype), bound_overrides=self._boxes(prior), out_record=rec, deadline=self._deadline(),
                    forward=True, stop_at=self._stop_at())
        A_rec = rec[g.input_name]
        assert A_rec is not None  # every pass records the input's coefficients
        A = A_rec.reshape(C.shape[1], B, -1).transpose(0, 1)
        pre = [(res.intermediate[p][0].reshape(B, -1), res.intermediate[p][1].reshape(B, -1)) for p in self.names]
        assert res.linear_lower is not None
        return res.spec_lower() + d.to(g.dtype), A, pre, res.linear_lower + d.to(g.dtype)

    def optimize(self, C: Tensor, d: Tensor, lo: Tensor, hi: Tensor, pre: Bounds, steps: int, lr: float) -> Tensor:
        """alpha-CROWN lower bounds ``[B, R]`` of the rows ``C [B, R, K] y + d`` over the boxes
        with their intermediate bounds ``pre`` fixed (``steps`` slope updates)."""
        from relax.bounds.alpha import alpha_crown

        res = alpha_crown(self.graph, self._set(lo, hi), C.to(self.dtype), iterations=steps, lr=lr, intermediate=self._boxes(pre),
                          deadline=self._deadline(), stop_at=self._stop_at())
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
    a = A[torch.arange(A.shape[0], device=A.device), row]  # [B, n_0]
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Bounds, Tensor]:
    """Halve each of the ``k`` boxes along one dimension and bound the ``2k`` children.

    ``branching="smear"`` picks the dimension by :func:`_branch_dim`; ``"strong"`` bounds the
    children of every candidate dimension (every free input of the root box when there are at most
    8, else the 3 best by smear plus the relatively widest), bounds all their children and keeps the split whose
    worse child is best (strong branching; the chosen children keep the bounds computed here).
    Either way a dimension more than ``max_aspect`` times narrower (relative to the root box)
    than the box's widest is not split.

    Returns:
        children ``lo, hi [2k, n_0]``, their ``lower [2k, N]``, ``A_in``, intermediate bounds and
        linear bounds (:meth:`GraphBoxes.bound`).
    """
    k, n0 = p_lo.shape
    if branching == "smear":
        cand = _branch_dim(spec, p_low, p_A, p_lo, p_hi, root_w, max_aspect=max_aspect).unsqueeze(0)  # [1, k]
    elif branching == "strong":
        free = (root_w.reshape(-1) > 0).nonzero().flatten()  # inputs the box fixes are never candidates
        if free.numel() == 0:
            free = torch.arange(n0, device=p_lo.device)
        if free.numel() <= 8:
            cand = free.unsqueeze(1).expand(free.numel(), k)
        else:
            sm = (p_A.abs().amax(1) * (p_hi - p_lo))
            top = sm.topk(min(3, n0), dim=1).indices.T
            cand = torch.cat([top, _rel_width(p_lo, p_hi, root_w).argmax(1).unsqueeze(0)])
    else:
        raise ValueError(f"unknown branching {branching!r}: use 'strong' or 'smear'")
    D = cand.shape[0]
    dims = cand.reshape(-1)  # [D*k]
    lo_r, hi_r = p_lo.repeat(D, 1), p_hi.repeat(D, 1)
    j = torch.arange(D * k, device=lo_r.device)
    mid = (lo_r[j, dims] + hi_r[j, dims]) / 2
    c_lo = torch.cat([lo_r, lo_r.clone()])
    c_hi = torch.cat([hi_r.clone(), hi_r])
    c_hi[j, dims] = mid
    c_lo[D * k + j, dims] = mid
    c_prior = [(l.repeat(2 * D, 1), u.repeat(2 * D, 1)) for l, u in p_pre]
    lower, A, pre, lin = net.bound(spec, c_lo, c_hi, c_prior)
    if D > 1:
        cm = spec.margin(lower).view(2, D, k)
        score = torch.minimum(cm[0], cm[1]) + 1e-3 * torch.maximum(cm[0], cm[1])
        rel = _rel_width(p_lo, p_hi, root_w)
        c_rel = rel.T.gather(0, cand)  # [D, k]
        # zero-width candidates, and (see _branch_dim) ones far narrower than the widest
        flat = ((p_hi - p_lo).T.gather(0, cand) <= 0) | (c_rel * max_aspect < rel.amax(1).unsqueeze(0))
        score = torch.where(flat, torch.full_like(score, -math.inf), score)
        best = score.argmax(0)  # [k]
        ks = torch.arange(k, device=best.device)
        pick = torch.cat([best * k + ks, D * k + best * k + ks])
        c_lo, c_hi, lower, A, lin = c_lo[pick], c_hi[pick], lower[pick], A[pick], lin[pick]
        pre = [(l[pick], u[pick]) for l, u in pre]
    return c_lo, c_hi, lower, A, pre, lin


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


def clip_to_violations(spec: RowSpec, lo: Tensor, hi: Tensor, low: Tensor, A: Tensor, lin: Tensor, margin: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """The boxes shrunk to the part where the property can fail ("input domain clipping", as in
    alpha-beta-CROWN's input split), from each row's linear lower bound on its box.

    Row ``r``'s linear bound ``A_r . x + c_r <= r(x)`` on the box (``c_r`` recovered from its
    minimum ``lin_r`` minus the minimum of ``A_r . x``, less that sum's round-off) confines the
    points where ``r(x) <= margin`` to the half-space ``A_r . x + c_r <= margin``; a row whose
    lower bound ``low_r`` (perhaps an interval bound, higher than ``lin_r``) exceeds ``margin``
    never fails. A group fails only where all its rows do: its box is clipped by each row's
    half-space in turn (per coordinate, the least the other terms can be); the property fails
    only in the hull of the groups' boxes.

    Args:
        lo, hi: ``[B, n_0]``; low: the rows' lower bounds ``[B, N]``; A: their linear bounds'
            input coefficients ``[B, N, n_0]``; lin: those linear bounds' minima on the boxes ``[B, N]``.

    Returns:
        ``lo, hi`` clipped and ``proved [B]`` (every group's box empty: the property holds there).
    """
    from relax.bounds.roundoff import gamma

    n0 = lo.shape[1]
    g_n = 2 * gamma(n0 + 2, lo.dtype)
    mag = torch.maximum(lo.abs(), hi.abs())  # [B, n0]
    slack = g_n * ((A.abs() * mag.unsqueeze(1)).sum(2) + lin.abs() + abs(margin))  # [B, N] round-off allowance
    c = lin - torch.minimum(A * lo.unsqueeze(1), A * hi.unsqueeze(1)).sum(2) - slack  # [B, N]
    out_lo, out_hi = torch.full_like(lo, math.inf), torch.full_like(hi, -math.inf)
    for g in range(spec.num_groups):
        gl, gh = lo.clone(), hi.clone()
        for r in (spec.groups == g).nonzero().flatten().tolist():
            a = A[:, r]  # [B, n0]
            t = torch.minimum(a * gl, a * gh)
            rest = margin - c[:, r:r + 1] - (t.sum(1, keepdim=True) - t)  # a_i x_i <= rest_i at a violation
            err = slack[:, r:r + 1] + g_n * (t.abs().sum(1, keepdim=True) + rest.abs())
            safe = torch.where(a != 0, a, torch.ones_like(a))
            bound = (rest + err) / safe  # widened outward by the sums' round-off (then one relative ulp)
            bound = bound + torch.where(a > 0, 1.0, -1.0) * 4 * torch.finfo(lo.dtype).eps * bound.abs()
            usable = torch.isfinite(bound)  # a NaN (an undefined bound) or an infinite cut clips nothing
            gh = torch.where((a > 0) & usable, torch.minimum(gh, bound), gh)
            gl = torch.where((a < 0) & usable, torch.maximum(gl, bound), gl)
        rows = (spec.groups == g).to(low.device)
        empty = (gl > gh).any(1, keepdim=True) | (low[:, rows] > margin).any(1, keepdim=True)
        out_lo = torch.where(empty, out_lo, torch.minimum(out_lo, gl))
        out_hi = torch.where(empty, out_hi, torch.maximum(out_hi, gh))
    proved = (out_lo > out_hi).any(1)
    return torch.where(proved.unsqueeze(1), lo, out_lo), torch.where(proved.unsqueeze(1), hi, out_hi), proved


@dataclass
class _BoxBatch:
    """Boxes and their bounds: ``lo, hi [B, n_0]``, the rows' lower bounds ``low [B, N]``, the
    rows' input coefficients ``A [B, N, n_0]``, the intermediate boxes ``pre`` and the rows'
    linear bounds that go with ``A``, ``lin [B, N]`` (:meth:`GraphBoxes.bound`)."""

    lo: Tensor
    hi: Tensor
    low: Tensor
    A: Tensor
    pre: Bounds
    lin: Tensor

    def __len__(self) -> int:
        return self.lo.shape[0]

    def fitting(self, memory_mb: float) -> int:
        """How many boxes like these fit in ``memory_mb`` (the queue is copied when it grows:
        twice the bytes at worst)."""
        per_box = sum(t[0].numel() * t.element_size() for t in [self.lo, self.hi, self.low, self.A, self.lin, *(b for lu in self.pre for b in lu)])
        return max(int(memory_mb * 2**20 / (2 * per_box)), 4)

    def pick(self, idx: Tensor | slice) -> "_BoxBatch":
        return _BoxBatch(self.lo[idx], self.hi[idx], self.low[idx], self.A[idx], [(l[idx], u[idx]) for l, u in self.pre], self.lin[idx])

    def cat(self, other: "_BoxBatch") -> "_BoxBatch":
        return _BoxBatch(torch.cat([self.lo, other.lo]), torch.cat([self.hi, other.hi]), torch.cat([self.low, other.low]),
                         torch.cat([self.A, other.A]),
                         [(torch.cat([ql, l]), torch.cat([qu, u])) for (ql, qu), (l, u) in zip(self.pre, other.pre)],
                         torch.cat([self.lin, other.lin]))


def _children(net: GraphBoxes, spec: RowSpec, par: _BoxBatch, branching: str, root_w: Tensor, max_aspect: float) -> _BoxBatch:
    """The ``2k`` children of the ``k`` boxes ``par``, bounded (:func:`_split`); ``"mixed"``:
    strong branching on the first quarter (the worst boxes), smear on the rest."""
    if branching != "mixed":
        return _BoxBatch(*_split(net, spec, par.lo, par.hi, par.low, par.A, par.pre, branching, root_w, max_aspect))
    k = len(par)
    ks = max(1, k // 4)
    parts = [_BoxBatch(*_split(net, spec, p.lo, p.hi, p.low, p.A, p.pre, br, root_w, max_aspect))
             for sl, br in ((slice(0, ks), "strong"), (slice(ks, k), "smear")) if sl.stop > sl.start
             for p in [par.pick(sl)]]
    return parts[0] if len(parts) == 1 else parts[0].cat(parts[1])


def _bounded_children(net: GraphBoxes, spec: RowSpec, parents: _BoxBatch, split: tuple[str, Tensor, float], margin: float,
                      clip: bool, alpha_steps: int, alpha_frac: float) -> tuple[_BoxBatch, Tensor]:
    """The children of ``parents`` (:func:`_children` with ``split = (branching, root widths,
    max aspect)``), CROWN-bounded, clipped (:func:`clip_to_violations`), then alpha-stepped
    (:func:`_alpha_nearest`); with their margins ``[2k]`` (``inf`` where clipping proved them)."""
    with torch.no_grad():
        kids = _children(net, spec, parents, *split)
    cm = spec.margin(kids.low)
    if clip:
        kids.lo, kids.hi, proved = clip_to_violations(spec, kids.lo, kids.hi, kids.low, kids.A, kids.lin, margin)
        cm = torch.where(proved, math.inf, cm)
    if alpha_steps > 0:
        kids.low, cm = _alpha_nearest(net, spec, kids.lo, kids.hi, kids.pre, kids.low, cm, margin, alpha_frac, alpha_steps)
    return kids, cm


class _InputSearch:
    """The bookkeeping of one :func:`input_bab` run: the boxes bounded, the rounds, the
    candidate counterexamples ``check`` rejected, and the generator of PGD's seeds."""

    def __init__(self, net: GraphBoxes, spec: RowSpec, check_point, seed: int) -> None:
        self.t0 = time.perf_counter()
        self.net, self.spec = net, spec
        self.gen = torch.Generator().manual_seed(seed)
        self.check = check_point or (lambda x: bool(spec.margin(spec.values(net.forward(x.unsqueeze(0))))[0] <= 0))
        self.rejected = 0
        self.n_bounded, self.rounds = 0, 0
        self.queue_peak = 1  # the most open boxes held at once (the root)
        self.root_pass_s = 0.0  # the root box's bound (:meth:`root`)

    def finish(self, status: str, reason: str, lower: float, cex: Tensor | None = None) -> BabResult:
        return BabResult(status, cex, lower, self.n_bounded, time.perf_counter() - self.t0, reason,
                         {"rounds": self.rounds, "rejected_cex": self.rejected, "queue_peak": self.queue_peak})

    def try_points(self, xs: Tensor, ms: Tensor) -> Tensor | None:
        """The first of the (at most 8) most violating points ``xs`` (margins ``ms``) that
        ``check`` confirms, or None."""
        cand = (ms <= 0).nonzero().squeeze(1)
        for i in cand[torch.argsort(ms[cand])][:8].tolist():
            if self.check(xs[i]):
                return xs[i]
            self.rejected += 1
        return None

    def root(self, lo: Tensor, hi: Tensor, margin: float, deadline: float) -> BabResult | _BoxBatch:
        """Bound and attack the whole box: the result when that decides, else the box as the queue."""
        net, spec = self.net, self.spec
        t = time.perf_counter()
        try:
            with torch.no_grad():
                lower, A, pre, lin = net.bound(spec, lo, hi, None)
        except DeadlineExpired:  # the root's pass still running at the deadline: no bound
            return self.finish("unknown", "timeout", -math.inf)
        self.root_pass_s = time.perf_counter() - t
        self.n_bounded += 1
        m = spec.margin(lower)
        if bool(m[0] > margin):
            return self.finish("certified", "proved", float(m[0]))
        if time.perf_counter() >= deadline:  # a large network's root pass used the whole budget
            return self.finish("unknown", "timeout", float(m[0]))
        cex = self.pgd(lo, hi, steps=50, restarts=5, deadline=deadline)
        if cex is not None:
            return self.finish("falsified", "counterexample", -math.inf, cex)
        return _BoxBatch(lo, hi, lower, A, pre, lin)

    def falsify(self, kids: _BoxBatch, cm: Tensor, open_: Tensor, pgd: bool) -> Tensor | None:
        """A confirmed counterexample among the open children ``open_ [2k]`` (margins ``cm``):
        their centres and the minimiser corners of their rows' linear bounds, then (``pgd``)
        PGD on the 64 worst; or None."""
        net, spec = self.net, self.spec
        with torch.no_grad():
            if open_.any():
                idx = open_.nonzero().squeeze(1)
                a = kids.A[idx]  # [b, N, n0]
                corners = torch.where(a > 0, kids.lo[idx].unsqueeze(1), kids.hi[idx].unsqueeze(1))  # [b, N, n0]
                pts = torch.cat([(kids.lo[idx] + kids.hi[idx]) / 2, corners.reshape(-1, corners.shape[-1])])
                pm = spec.margin(spec.values(net.forward(pts)))
                cex = self.try_points(pts, pm)
                if cex is not None:
                    return cex
        if pgd and open_.any():
            idx = open_.nonzero().squeeze(1)
            worst = idx[torch.argsort(cm[idx])[:64]]
            return self.pgd(kids.lo[worst], kids.hi[worst], steps=20, restarts=1)
        return None

    def pgd(self, lo: Tensor, hi: Tensor, steps: int, restarts: int, deadline: float = math.inf) -> Tensor | None:
        """PGD (:func:`verify.attack.pgd_attack`) in the boxes ``lo, hi [b, n_0]``, each box its
        own set: per box a lane from its centre and ``restarts`` from random points (seeded from
        the search's generator, so every call starts elsewhere), ``steps`` signed-gradient steps
        starting at half the box's half-width (then the cosine schedule). The first of the
        boxes' confirmed points that ``check`` also accepts (:meth:`try_points`), or None.
        No step after the ``perf_counter`` value ``deadline``."""
        C, d = self.spec.batch(lo.shape[0])
        seed = int(torch.randint(2**62, (1,), generator=self.gen))
        r = pgd_attack(self.net, Box(lo, hi), LinearSpec(C, d, self.spec.groups), steps=steps, restarts=restarts + 1,
                       step_size=0.5, seed=seed, timeout=None if math.isinf(deadline) else max(0.0, deadline - time.perf_counter()))
        return self.try_points(r.x_adv, torch.where(r.found, r.margin, math.inf))


def input_bab(
    net: GraphBoxes,
    spec: RowSpec,
    lo: Tensor,
    hi: Tensor,
    *,
    timeout: float = 60.0,
    batch_size: int = 512,
    max_memory_mb: float = 1500.0,
    margin: float = FLOAT64_PROOF_MARGIN,
    pgd_every: int = 5,
    branching: str = "mixed",
    max_aspect: float = 64.0,
    alpha_steps: int = 3,
    alpha_frac: float = 1.0,
    check_point=None,
    seed: int = 0,
    clip: bool = True,
) -> BabResult:
    """Decide the property on the box ``[lo, hi]`` (``[n_0]`` each) by input splitting.

    Args:
        net: the network's bound graph (float64 recommended), as :class:`GraphBoxes`.
        spec: the property rows.
        timeout: seconds; past it the result is ``unknown`` with the best bound.
        batch_size: boxes popped per round (each gives two children).
        max_memory_mb: cap of the queue (boxes, bounds, intermediate boxes); above :data:`FULL_QUEUE`
            of it the boxes closest to proved go first; at it: ``unknown`` ("memory").
        margin: a box is proved when its margin lower bound exceeds this.
        branching: ``"strong"``, ``"smear"`` (:func:`_split`) or ``"mixed"`` (strong for the worst quarter
            of each batch); smear when ``2 n_0`` root passes exceed :data:`STRONG_BRANCHING_SHARE` of ``timeout``.
        max_aspect: the largest ratio of a box's relative widths before its widest is split (:func:`_branch_dim`).
        alpha_steps, alpha_frac: alpha-CROWN steps on the ``alpha_frac`` of the open children closest to
            proved (0: CROWN only); on ACAS Xu prop_2 (3_3, 4_2) 3 steps decide in 30-50 s what CROWN did not in 400 s.
        pgd_every: run PGD on the worst boxes every this many rounds (0: never). seed: its restarts'.
        check_point: ``f(x [n_0]) -> bool`` confirming a counterexample on the model (default: the graph).
        clip: shrink every bounded child to where its rows' linear bounds allow a violation
            (:func:`clip_to_violations`); a child with none left is proved.

    Returns:
        :class:`BabResult`; ``falsified`` only with a counterexample ``check_point`` accepted.
    """
    s = _InputSearch(net, spec.to(net.dtype), check_point, seed)
    deadline = s.t0 + timeout
    spec = s.spec
    lo, hi = lo.to(net.dtype).reshape(1, -1), hi.to(net.dtype).reshape(1, -1)
    queue = s.root(lo, hi, margin, deadline)  # boxes, their bounds and intermediate boxes (priors for children)
    if isinstance(queue, BabResult):
        return queue
    branching = "smear" if 2 * max(1, int((hi > lo).sum())) * s.root_pass_s > STRONG_BRANCHING_SHARE * timeout else branching
    root_w = hi - lo
    max_domains = queue.fitting(max_memory_mb)
    round_s, t_round = 0.0, None  # a round starts only if one as long as the last still fits
    while True:
        if t_round is not None:
            round_s = time.perf_counter() - t_round
        if len(queue) == 0:
            return s.finish("certified", "proved", margin)
        if time.perf_counter() + round_s > deadline:
            return s.finish("unknown", "timeout", float(spec.margin(queue.low).min()))
        t_round = time.perf_counter()
        k = min(batch_size, len(queue), max_domains - len(queue))  # a round of k boxes adds at most k to the queue
        if k < 1:
            return s.finish("unknown", "memory", float(spec.margin(queue.low).min()))
        s.rounds += 1
        # best-first; near the memory cap the boxes closest to proved first (depth-first)
        order = torch.argsort(spec.margin(queue.low), descending=len(queue) + k > FULL_QUEUE * max_domains)
        parents, queue = queue.pick(order[:k]), queue.pick(order[k:])
        try:
            kids, cm = _bounded_children(net, spec, parents, (branching, root_w, max_aspect), margin, clip, alpha_steps, alpha_frac)
        except DeadlineExpired:  # a pass still running at the deadline: the parents' bounds stand
            return s.finish("unknown", "timeout", float(spec.margin(torch.cat([queue.low, parents.low])).min()))
        s.n_bounded += len(kids)
        open_ = ~(cm > margin)
        cex = s.falsify(kids, cm, open_, pgd=bool(pgd_every) and s.rounds % pgd_every == 0)
        if cex is not None:
            return s.finish("falsified", "counterexample", -math.inf, cex)
        queue = queue.cat(kids.pick(open_.nonzero().squeeze(1)))
        s.queue_peak = max(s.queue_peak, len(queue))
