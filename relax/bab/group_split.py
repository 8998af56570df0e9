"""Branch-and-bound of a property that is an OR of groups: one search per group, interleaved.

A property is violated when some group's rows are all ``<= 0`` at one input (a classifier's
"some other class wins", ml4acopf's "some output leaves its limits"), so it holds iff every
group holds on the whole input set: each group can be decided on its own. A joint search,
whose domains bound every group, proves a domain only when all groups hold on it, so the
splits that different groups need multiply, and each domain stores slopes and multipliers for
every row. Here each group the root leaves open gets its own :class:`SearchRun` (its domains
bound its rows alone), as alpha-beta-CROWN keeps one OR-clause per domain. The runs advance a
round at a time in turn, the weakest-bounded group first, under one deadline and one memory cap
(each run's room is the cap less what the others hold), so a counterexample of any group is
found at the pace of the others and a proved group's domains are freed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from verify.registry import FLOAT64_PROOF_MARGIN
from verify.spec import InputSet

from relax.bab import BabResult, RowSpec
from relax.bab.activation_split import SearchRun, _ReluSearch
from relax.ir.graph import BoundGraph

__all__ = ["groupwise_relu_bab"]


def _group_alphas(alphas: dict[str, Tensor] | None, rows: Tensor) -> dict[str, Tensor] | None:
    """The root slopes ``{node: [N or 1, ...]}`` of the rows ``rows`` (one shared set serves all)."""
    if alphas is None:
        return None
    return {r: (a if a.shape[0] == 1 else a[rows.to(a.device)]) for r, a in alphas.items()}


def _share_memory(runs: list[SearchRun], full: list[int], i: int) -> None:
    """Run ``i``'s room: its domains at the whole cap (``full[i]``) times the share of the cap
    the other runs' queues leave free."""
    used = sum(r.q.load / f for j, (r, f) in enumerate(zip(runs, full)) if j != i and r.q is not None)
    runs[i].max_domains = max(int(full[i] * (1.0 - used)), 0)


def groupwise_relu_bab(
    graph: BoundGraph,
    inputs: InputSet,
    rs: RowSpec,
    root: dict[str, tuple[Tensor, Tensor]],
    *,
    timeout: float,
    order: Sequence[int] | None = None,
    root_alphas: dict[str, Tensor] | None = None,
    batch_size: int = 32,
    steps: int = 10,
    margin: float = FLOAT64_PROOF_MARGIN,
    max_memory_mb: float = 1500.0,
    check_point=None,
    fast: BoundGraph | None = None,
    candidates: int = 3,
    box_pass_s: float | None = None,
) -> BabResult:
    """:func:`relax.bab.activation_split.graph_relu_bab` with one search per group of ``rs``
    (``order``: the groups' order, default ``0..G-1``), the searches' rounds in turn.

    ``certified`` when every group's search proves it (bound: the least of theirs),
    ``falsified`` when any finds a counterexample, else ``unknown`` with the first search that
    stopped unproved's reason and the least bound over the groups."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    G = rs.num_groups
    runs: list[SearchRun] = []
    proved_low, proved, bounded, peak, demoted = math.inf, 0, 0, 0, 0  # over the proved groups; the most domains held at once

    def finish(res: BabResult, others: list[SearchRun]) -> BabResult:
        """``res`` (a search's end) for the whole property: the least bound over the groups, the
        domains of every search."""
        if res.status == "unknown":
            res.lower = min([res.lower, proved_low] + [r.lowest() for r in others if r.q is not None])
        res.domains += bounded + sum(r.s.bounded for r in others)
        res.time_s = time.perf_counter() - t0
        res.details.update(groups=G, groups_proved=proved, queue_peak=max(peak, 1))
        # the deciding run's own count (in its result), the proved runs', the other runs' stores'
        total = res.details.get("demoted", 0) + demoted + sum(r.q.demotions for r in others if r.q is not None)
        if total:
            res.details["demoted"] = total
        return res

    order = list(range(G)) if order is None else list(order)
    for at, g in enumerate(order):
        rs_g, rows = rs.select_groups(torch.arange(G, device=rs.groups.device) == g)
        s = _ReluSearch(graph, inputs, rs_g, root, timeout=max(0.0, deadline - time.perf_counter()), steps=steps, margin=margin,
                        check_point=check_point, fast=fast, candidates=candidates)
        if not s.names:
            return BabResult("unknown", None, -math.inf, 0, reason="nothing to split")
        run = SearchRun(s, max_memory_mb, batch_size, box_pass_s)
        done = run.begin(_group_alphas(root_alphas, rows))
        if done is None:
            runs.append(run)
        elif done.status == "certified":
            bounded, proved_low, proved = bounded + s.bounded, min(proved_low, done.lower), proved + 1
        else:  # a counterexample, or no time for the root pass or a first round
            if at + 1 < len(order):  # groups not reached have no bound here (the caller keeps the root's)
                done.lower = -math.inf
            return finish(done, runs)
    full = [r.max_domains for r in runs]
    i = 0
    while runs:
        i %= len(runs)
        _share_memory(runs, full, i)
        done = runs[i].step()
        peak = max(peak, sum(r.q.n for r in runs if r.q is not None))
        if done is None:
            i += 1
        elif done.status == "certified":
            bounded, proved_low, proved = bounded + runs[i].s.bounded, min(proved_low, done.lower), proved + 1
            demoted += runs[i].s.demoted
            del runs[i], full[i]
        else:
            return finish(done, runs[:i] + runs[i + 1:])
    return finish(BabResult("certified", None, proved_low, 0, reason="proved"), [])
