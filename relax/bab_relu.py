"""ReLU-splitting branch-and-bound with beta-CROWN bounds (Wang et al. 2021) for
high-dimensional inputs (mnistfc: 784 inputs, 512-1536 ReLUs).

A domain is a set of split decisions ``s_j in {+1: z_j >= 0, -1: z_j <= 0}`` on unstable
ReLUs, with its own pre-activation bounds (the root's alpha-CROWN bounds, clamped by the
splits), slopes ``alpha`` and multipliers ``beta`` (inherited from the parent, the new split's
beta starting at 0). Each round pops the ``batch_size`` domains with the smallest margin,
branches each on the ReLU with the best BaBSR-style score (Bunel et al. 2020: the gain of
removing the triangle relaxation's intercept, ``|min(lambda, 0)| * (-u l / (u - l))``, with
``lambda`` the CROWN coefficient on the ReLU's output), bounds all children in one batch
with a few steps of joint alpha/beta optimisation, and drops the proved ones. The minimiser
corners of every child's linear bound are evaluated exactly as counterexample candidates.

Precision: the optimisation of the children's alphas and betas and the branching scores run
in ``fast_dtype`` (float32: about twice as fast on a CPU); the bound that proves a domain is
always re-evaluated in the network's dtype (float64) with the optimised parameters -- any
alphas in [0, 1] and betas >= 0 give a sound bound, so only that last pass needs precision.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .bab import BabResult, RowSpec, pgd_boxes
from .beta import BestIterate, Bounds, ReluNet, backward_bound, intermediate_bounds, optimize_bound, refined_bounds

__all__ = ["relu_bab"]


def _layer_scores(net: ReluNet, spec: RowSpec, lo: Tensor, hi: Tensor, pre: Bounds, alphas, betas, splits, lower: Tensor) -> list[Tensor]:
    """BaBSR-style scores ``[B, n_k]`` per hidden layer (``-inf`` for stable or split ReLUs):
    how much the upper relaxation's intercept of each unstable ReLU lowers the bound of the
    rows not yet proved (Bunel et al. 2020), with a tiny tie-break by ``min(u, -l)``."""
    B = lo.shape[0]
    C, d = spec.batch(B)
    with torch.no_grad():
        _, info = backward_bound(net, C, d, lo, hi, pre, None, alphas, betas, splits, keep_lambdas=True)
    # weight the rows that still matter: rows of groups not yet proved
    w = (~(spec.group_max(lower) > 0)).to(lower.dtype).gather(1, spec.groups.expand(B, -1))  # [B, N]
    out = []
    for k, (l, u) in enumerate(pre):
        lam = info["lambdas"][k]  # [B, N, n_k]
        unst = (l < 0) & (u > 0) & (splits[k] == 0)
        icpt = torch.where(unst, -u * l / torch.where(unst, u - l, torch.ones_like(u)), torch.zeros_like(u))
        sc = ((-lam).clamp(min=0) * w.unsqueeze(-1)).sum(1) * icpt
        sc = sc + 1e-6 * ((lam.abs() * w.unsqueeze(-1)).sum(1) * torch.minimum(u, -l)).clamp(min=0)
        out.append(torch.where(unst, sc, torch.full_like(sc, -math.inf)))
    return out


def _scores(net: ReluNet, spec: RowSpec, lo: Tensor, hi: Tensor, pre: Bounds, alphas, betas, splits, lower: Tensor) -> Tensor:
    """:func:`_layer_scores` of all hidden layers side by side, ``[B, sum n_k]``."""
    return torch.cat(_layer_scores(net, spec, lo, hi, pre, alphas, betas, splits, lower), 1)


def relu_bab(
    net: ReluNet,
    spec: RowSpec,
    lo: Tensor,
    hi: Tensor,
    *,
    timeout: float = 60.0,
    batch_size: int = 64,
    steps: int = 10,
    root_steps: int = 50,
    intermediate_steps: int = 10,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    max_memory_mb: float = 1500.0,
    margin: float = 1e-9,
    check_point=None,
    seed: int = 0,
    fast_dtype: torch.dtype | None = torch.float32,
    refine_layers: int = 0,
    refine_fraction: float = 0.5,
    refine_solve_time: float = 1.0,
    refine_workers: int = 1,
    refine_after: float = 0.0,
) -> BabResult:
    """Decide the property on the box ``[lo, hi]`` (``[n_0]`` each) by splitting ReLUs.

    Args:
        timeout: seconds; past it the result is ``unknown`` with the best bound.
        batch_size: domains popped per round (each gives two children).
        steps: alpha/beta optimisation steps per round; root_steps: alpha steps at the root;
            intermediate_steps: alpha-CROWN steps per layer for the root's intermediate bounds.
        max_memory_mb: memory budget of the domain queue; beyond it ``unknown``.
        margin: a domain is proved when its margin lower bound exceeds this.
        check_point: ``f(x [n_0]) -> bool`` confirming a counterexample on the original model.
        fast_dtype: dtype of the children's optimisation and of the branching scores (None:
            the network's); proving bounds are recomputed in the network's dtype.
        refine_layers: when the root is neither proved nor falsified, tighten the root's
            pre-activation bounds of hidden layers ``1..refine_layers`` by MILP, one layer at a
            time, each followed by alpha-CROWN on the later layers
            (:func:`relax.refine.refine_bounds`), then recompute the root bound and branch
            (0: off).
        refine_fraction: share of the time left at its start that the MILP refinement may use.
        refine_solve_time: seconds per MILP of the refinement (its dual bound is used).
        refine_workers: MILPs of the refinement solved in parallel (threads).
        refine_after: with refinement on, share of ``timeout`` first spent branching without
            it (what plain BaB decides quickly never pays for the refinement); then the root
            is refined and branching restarts from it (0: refine at once).

    Returns:
        :class:`BabResult`.
    """
    t0 = time.perf_counter()
    deadline = t0 + timeout
    gen = torch.Generator().manual_seed(seed)
    dt = net.dtype
    spec = spec.to(dt)
    lo, hi = lo.to(dt).reshape(1, -1), hi.to(dt).reshape(1, -1)
    check = check_point or (lambda x: bool(spec.margin(spec.values(net.forward(x.unsqueeze(0))))[0] <= 0))
    N, nl = spec.C.shape[0], len(net.sizes)
    n_bounded, rounds, rejected = 0, 0, 0
    extra: dict = {}

    def finish(status: str, reason: str, lower: float, cex: Tensor | None = None) -> BabResult:
        return BabResult(status, cex, lower, n_bounded, time.perf_counter() - t0, reason, {"rounds": rounds, "rejected_cex": rejected, **extra})

    def try_points(xs: Tensor) -> Tensor | None:
        nonlocal rejected
        with torch.no_grad():
            ms = spec.margin(spec.values(net.forward(xs)))
        cand = (ms <= 0).nonzero().squeeze(1)
        for i in cand[torch.argsort(ms[cand])][:8].tolist():
            if check(xs[i]):
                return xs[i]
            rejected += 1
        return None

    def corners(net_f: ReluNet, m: int, pre_f: Bounds, al, be, sp) -> Tensor:
        """Minimiser corners of ``m`` domains' linear bounds (computed in the fast dtype from
        ``pre_f``, on ``net_f``: the net in that dtype), taken from the exact box."""
        C, d = spec_f.batch(m)
        with torch.no_grad():
            _, info = backward_bound(net_f, C, d, lo_f.expand(m, -1), hi_f.expand(m, -1), pre_f, None, al, be, sp)
        return torch.where(info["A_in"] > 0, lo, hi).reshape(-1, lo.shape[1])

    # root: alpha-CROWN intermediate bounds and final bound
    # alpha-CROWN intermediate bounds only for nets small enough to afford them
    if max(net.sizes) > 1024:  # wide (e.g. convolutional) layers: forward + unstable-only CROWN
        pre = refined_bounds(net, lo, hi)
    else:
        pre = intermediate_bounds(net, lo, hi, alpha_steps=intermediate_steps, deadline=t0 + 0.3 * timeout)
    if time.perf_counter() > deadline:
        return finish("unknown", "timeout", -math.inf)
    net, pre = net.without_dead(pre)  # every domain lies in the root box: dead stays dead
    fdt = dt if fast_dtype is None else fast_dtype
    spec_f = spec.to(fdt)
    lo_f, hi_f = lo.to(fdt), hi.to(fdt)
    net_f = _in_dtype(net, fdt)
    C, d = spec.batch(1)
    lower, alphas, _ = optimize_bound(net, C, d, lo, hi, pre, steps=root_steps, lr_alpha=lr_alpha, deadline=deadline)
    n_bounded += 1
    if bool(spec.margin(lower)[0] > margin):
        return finish("certified", "proved", float(spec.margin(lower)[0]))
    if time.perf_counter() > deadline:  # the root bound is the answer so far
        return finish("unknown", "timeout", float(spec.margin(lower)[0]))
    cex = try_points(corners(net_f, 1, _cast(pre, fdt), [a.to(fdt) for a in alphas], None, None))
    if cex is None and time.perf_counter() < deadline:
        x, _ = pgd_boxes(net, spec, lo, hi, steps=50, restarts=3, generator=gen)
        cex = try_points(x)
    if cex is not None:
        return finish("falsified", "counterexample", -math.inf, cex)

    def branch(net: ReluNet, pre: Bounds, lower: Tensor, alphas: list[Tensor], until: float) -> BabResult:
        """Best-first branching from the root (its ``pre``, bound ``lower`` and slopes) until
        every domain is proved, a counterexample is found, or ``until`` passes."""
        nonlocal n_bounded, rounds
        net_f = _in_dtype(net, fdt)
        splits = [torch.zeros(1, n, dtype=torch.int8) for n in net.sizes]
        betas = [torch.zeros(1, N, n, dtype=fdt) for n in net.sizes]
        alphas = [a.to(fdt) for a in alphas]
        per_domain = 4 * (2 * N * sum(net.sizes)) + 8 * (2 * sum(net.sizes)) + sum(net.sizes) + 8 * N
        max_domains = max(int(max_memory_mb * 2**20 / per_domain), 2 * batch_size)
        offsets = [0]
        for n in net.sizes:
            offsets.append(offsets[-1] + n)

        gave_up, gave_up_bound = False, math.inf
        round_s, t_round = 0.0, None  # the last round's time: a round that would end past ``until`` is not started
        q = _DomainQueue({"low": lower, "pre": pre, "alphas": alphas, "betas": betas, "splits": splits}, spec.margin, max_domains)
        while True:
            if t_round is not None:
                round_s = time.perf_counter() - t_round
            M = len(q)
            if M == 0:
                if gave_up:
                    return finish("unknown", "exhausted", gave_up_bound)
                return finish("certified", "proved", margin)
            if time.perf_counter() + round_s > until:
                return finish("unknown", "timeout", min(gave_up_bound, q.min_margin()))
            t_round = time.perf_counter()
            if M > max_domains:
                return finish("unknown", "memory", min(gave_up_bound, q.min_margin()))
            rounds += 1
            k = min(batch_size, M)
            # best-first; with the queue near its memory budget, the domains closest to proved
            # first, so that the queue shrinks (the depth-first fallback of alpha-beta-CROWN)
            p = q.pop(k, easiest=M > 0.8 * max_domains)
            al, be = p["alphas"], p["betas"]
            sc = _scores(net_f, spec_f, lo_f.expand(k, -1), hi_f.expand(k, -1), _cast(p["pre"], fdt), al, be, p["splits"], p["low"].to(fdt))
            best, flat = sc.max(1)
            # a domain with no unstable ReLU left is a single linear region: decide it exactly
            # with one LP per group (counterexample, proved, or -- solver trouble -- give up)
            exhausted = torch.isinf(best)
            if exhausted.any():
                ex = exhausted.nonzero().squeeze(1)
                for i in ex.tolist():
                    verdict, x = _decide_region(net, spec, lo[0], hi[0], [(l[i], u[i]) for l, u in p["pre"]], [s_[i] for s_ in p["splits"]], margin)
                    if x is not None:
                        cex = try_points(x.unsqueeze(0))
                        if cex is not None:
                            return finish("falsified", "counterexample", -math.inf, cex)
                    if verdict != "proved":
                        gave_up = True
                        gave_up_bound = min(gave_up_bound, float(spec.margin(p["low"][i : i + 1]).min()))
                rest = (~exhausted).nonzero().squeeze(1)
                p = _select(p, rest)
                best, flat = best[rest], flat[rest]
                al, be = [a[rest] for a in al], [b[rest] for b in be]
                k = rest.numel()
                if k == 0:
                    continue
            layer = torch.bucketize(flat, torch.tensor(offsets[1:]), right=True)
            # children: [0:k] active (z >= 0), [k:2k] inactive (z <= 0)
            ch = _select(p, torch.cat([torch.arange(k), torch.arange(k)]))
            for li in range(nl):
                sel = (layer == li).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                j = flat[sel] - offsets[li]
                s = ch["splits"][li]
                s[sel, j] = 1
                s[k + sel, j] = -1
                l, u = ch["pre"][li]
                l[sel, j] = l[sel, j].clamp(min=0)
                u[k + sel, j] = u[k + sel, j].clamp(max=0)
            c_lo, c_hi = lo.expand(2 * k, -1), hi.expand(2 * k, -1)
            C, d = spec_f.batch(2 * k)
            best_it = BestIterate()
            ch_pre_f = _cast(ch["pre"], fdt)
            _, al2, be2 = optimize_bound(
                net_f, C, d, lo_f.expand(2 * k, -1), hi_f.expand(2 * k, -1), ch_pre_f, ch["alphas"], ch["betas"], ch["splits"],
                steps=steps, lr_alpha=lr_alpha, lr_beta=lr_beta, deadline=until, track=best_it,
            )
            # the proving bound: each row's best parameters, evaluated in the network's dtype
            C, d = spec.batch(2 * k)
            with torch.no_grad():
                low, _ = backward_bound(net, C, d, c_lo, c_hi, ch["pre"], None, [a.to(dt) for a in best_it.alphas],
                                        [b.to(dt) for b in best_it.betas], ch["splits"])
            n_bounded += 2 * k
            low = torch.maximum(low, ch["low"])  # a child lies inside its parent: the parent's bound holds
            # a child whose split contradicts its bounds (l > u somewhere) is empty: drop it
            infeasible = torch.zeros(2 * k, dtype=torch.bool)
            for l, u in ch["pre"]:
                infeasible |= (l > u + 1e-9).any(1)
            open_ = ~(spec.margin(low) > margin) & ~infeasible
            if open_.any():
                idx = open_.nonzero().squeeze(1)
                cex = try_points(corners(net_f, idx.numel(), [(l[idx], u[idx]) for l, u in ch_pre_f], [a[idx] for a in al2], [b[idx] for b in be2], [s[idx] for s in ch["splits"]]))
                if cex is not None:
                    return finish("falsified", "counterexample", -math.inf, cex)
            ch["low"], ch["alphas"], ch["betas"] = low, al2, be2
            q.push(_select(ch, open_.nonzero().squeeze(1)))

    if refine_layers > 0 and refine_after > 0:
        # plain BaB first: what it decides quickly never pays for the refinement
        first = branch(net, pre, lower, alphas, until=min(deadline, t0 + refine_after * timeout))
        if first.status != "unknown" or time.perf_counter() > deadline:
            return first
        extra["plain_bab_first"] = {"reason": first.reason, "time_s": round(first.time_s, 3), "domains": first.domains}
    if refine_layers > 0:
        # MILP-tightened root bounds: every domain's relaxation gets tighter, and neurons
        # that become stable are never branched on; branching restarts from the root
        from .refine import refine_bounds

        def root_proved(p: Bounds) -> bool:
            """Whether the root bound with the bounds refined so far proves the property (then
            the later layers need no MILPs)."""
            nonlocal n_bounded, lower, alphas
            low, alphas, _ = optimize_bound(net, C, d, lo, hi, p, steps=root_steps, lr_alpha=lr_alpha, deadline=deadline)
            n_bounded += 1
            lower = torch.maximum(lower, low)  # every bound of the root box holds
            return bool(spec.margin(lower)[0] > margin)

        def impact(p: Bounds) -> list[Tensor]:
            """Refine first the neurons whose relaxation costs the root bound most: the
            branching score with the root's latest slopes (measured on mnistfc 256x6
            prop_0_0.03, benchmarks/RESULTS.md section 4: a better root bound after the same
            refinement time than loosest-first, and than a score that also credits a neuron's
            effect on the later layers' bounds)."""
            return _layer_scores(net, spec, lo, hi, p, alphas, None, [torch.zeros_like(l) for l, _ in p], lower)

        stop = min(deadline, time.perf_counter() + refine_fraction * max(deadline - time.perf_counter(), 0.0))
        pre, extra["refine"] = refine_bounds(net, lo, hi, pre, layers=refine_layers, deadline=stop, alpha_deadline=deadline,
                                             solve_time_limit=refine_solve_time,
                                             workers=refine_workers, alpha_steps=intermediate_steps, stop_if=root_proved,
                                             priority=impact)
        if extra["refine"]["stopped_by_check"]:
            return finish("certified", "proved", float(spec.margin(lower)[0]))
        net, pre = net.without_dead(pre)
        low2, alphas, _ = optimize_bound(net, C, d, lo, hi, pre, steps=root_steps, lr_alpha=lr_alpha, deadline=deadline)
        lower = torch.maximum(lower, low2)  # both bound the same box
        n_bounded += 1
        if bool(spec.margin(lower)[0] > margin):
            return finish("certified", "proved", float(spec.margin(lower)[0]))
        if time.perf_counter() > deadline:
            return finish("unknown", "timeout", float(spec.margin(lower)[0]))
    return branch(net, pre, lower, alphas, until=deadline)


def _decide_region(net: ReluNet, spec: RowSpec, lo: Tensor, hi: Tensor, pre, splits, margin: float) -> tuple[str, Tensor | None]:
    """Decide the property on one linear region (every ReLU fixed by a split or by its
    bounds) exactly: per group ``g``, the LP ``min t s.t. row_i(x) <= t (i in g)``, ``x`` in
    the box and on the region's side of every ReLU. ``t* > 0`` for every group proves the
    region (with a 1e-6 relative slack for the solver's tolerance); an LP solution with
    ``t* <= 0`` is a counterexample candidate; an infeasible region is empty (proved).

    Returns:
        ``("proved" | "candidate" | "unknown", x or None)``.
    """
    import numpy as np
    from scipy.optimize import linprog

    n0 = lo.shape[0]
    M = torch.eye(n0, dtype=net.dtype)
    c = torch.zeros(n0, dtype=net.dtype)
    A_ub, b_ub = [], []
    for k, (W, b) in enumerate(zip(net.Ws[:-1], net.bs[:-1])):
        M, c = W @ M, W @ c + b  # z_k = M x + c
        l, u = pre[k]
        active = (splits[k] > 0) | (l >= 0)
        # active: -z <= 0 ; inactive: z <= 0
        sign = torch.where(active, -torch.ones_like(l), torch.ones_like(l))
        A_ub.append(sign.unsqueeze(1) * M)
        b_ub.append(-sign * c)
        M, c = M * active.unsqueeze(1).to(M.dtype), c * active.to(c.dtype)
    M, c = net.Ws[-1] @ M, net.Ws[-1] @ c + net.bs[-1]
    R, r = spec.C @ M, spec.C @ c + spec.d  # rows = R x + r
    A0 = torch.cat(A_ub).numpy()
    b0 = torch.cat(b_ub).numpy()
    # widen the region by a small slack: a region that is empty only within the solver's
    # feasibility tolerance stays feasible, so "infeasible" below means robustly empty and
    # every other verdict is about a superset of the region (sound)
    b0 = b0 + 1e-6 * (1.0 + np.abs(b0))
    bounds = [(float(a), float(b_)) for a, b_ in zip(lo, hi)] + [(None, None)]
    verdict, cand = "proved", None
    for g in range(spec.num_groups):
        rows = (spec.groups == g).nonzero().squeeze(1)
        A = np.vstack([np.hstack([A0, np.zeros((A0.shape[0], 1))]), np.hstack([R[rows].numpy(), -np.ones((len(rows), 1))])])
        b_ = np.concatenate([b0, -r[rows].numpy()])
        obj = np.zeros(n0 + 1)
        obj[-1] = 1.0
        res = linprog(obj, A_ub=A, b_ub=b_, bounds=bounds, method="highs")
        if res.status == 2:  # infeasible even with the slack: no point of the box lies in this region
            return "proved", None
        if res.status != 0:
            verdict = "unknown"
            continue
        t = float(res.fun)
        scale = 1.0 + float(np.abs(R[rows].numpy()).sum(1).max() * np.abs(np.concatenate([lo.numpy(), hi.numpy()])).max() + np.abs(r[rows].numpy()).max())
        if t > margin + 1e-6 * scale:
            continue
        verdict = "candidate" if t <= 0 else "unknown"
        if cand is None:
            cand = torch.from_numpy(res.x[:n0]).to(net.dtype)
    return verdict, cand


def _in_dtype(net: ReluNet, dtype: torch.dtype) -> ReluNet:
    """``net`` with its weights in ``dtype`` (itself when already so)."""
    return net if net.dtype == dtype else ReluNet([W.to(dtype) for W in net.Ws], [b.to(dtype) for b in net.bs], net.input_shape)


def _cast(pre: Bounds, dtype: torch.dtype) -> Bounds:
    """``pre`` in ``dtype`` (for the optimisation only: proving bounds use the exact ``pre``)."""
    return [(l.to(dtype), u.to(dtype)) for l, u in pre]


def _select(q: dict, idx: Tensor) -> dict:
    """The domains ``idx`` of a domain batch."""
    return _from_leaves([t[idx] for t in _leaves(q)], len(q["pre"]))


def _leaves(q: dict) -> list[Tensor]:
    """The tensors of a domain batch, in a fixed order (first dimension = domain)."""
    return [q["low"], *[t for lu in q["pre"] for t in lu], *q["alphas"], *q["betas"], *q["splits"]]


def _from_leaves(ts: list[Tensor], nl: int) -> dict:
    pre = [(ts[1 + 2 * i], ts[2 + 2 * i]) for i in range(nl)]
    o = 1 + 2 * nl
    return {"low": ts[0], "pre": pre, "alphas": ts[o : o + nl], "betas": ts[o + nl : o + 2 * nl], "splits": ts[o + 2 * nl : o + 3 * nl]}


class _DomainQueue:
    """Open domains in preallocated tensors (first dimension = slot), so that a round copies
    only the domains it pops and pushes, never the whole queue: popping frees slots, pushing
    appends; when the storage is full, the live domains are compacted into a new storage of
    twice their number (at most ``max_slots`` unless more are live), so the storage stays
    within the memory budget the caller checks with ``len``. ``margin(low [M, N]) -> [M]``
    orders the domains."""

    def __init__(self, first: dict, margin, max_slots: int) -> None:
        self._nl = len(first["pre"])
        self._max_slots = max_slots
        self._margin = margin
        self._store = [t.clone() for t in _leaves(first)]
        self._used = first["low"].shape[0]  # slots written so far
        self._alive = torch.ones(self._used, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self._alive[: self._used].sum())

    def _margins(self, dead: float) -> Tensor:
        """Margins of the written slots, ``dead`` for the free ones."""
        m = self._margin(self._store[0][: self._used])
        return torch.where(self._alive[: self._used], m, torch.full_like(m, dead))

    def min_margin(self) -> float:
        return float(self._margins(math.inf).min()) if len(self) else math.inf

    def pop(self, k: int, easiest: bool = False) -> dict:
        """The ``k`` open domains with the smallest margin bound (``easiest``: the largest,
        i.e. closest to proved), removed from the queue."""
        m = self._margins(-math.inf if easiest else math.inf)
        idx = torch.topk(m, k, largest=easiest).indices
        out = _from_leaves([t[idx] for t in self._store], self._nl)
        self._alive[idx] = False
        return out

    def push(self, q: dict) -> None:
        new = _leaves(q)
        m = new[0].shape[0]
        if m == 0:
            return
        if self._used + m > self._store[0].shape[0]:
            live = self._alive[: self._used].nonzero().squeeze(1)
            n_live = live.numel()
            cap = max(min(max(2 * (n_live + m), 64), self._max_slots), n_live + m)
            grown = []
            for t in self._store:
                g = t.new_empty((cap, *t.shape[1:]))
                g[:n_live] = t[live]
                grown.append(g)
            self._store, self._used = grown, n_live
            self._alive = torch.zeros(cap, dtype=torch.bool)
            self._alive[:n_live] = True
        for t, x in zip(self._store, new):
            t[self._used : self._used + m] = x
        self._alive[self._used : self._used + m] = True
        self._used += m


