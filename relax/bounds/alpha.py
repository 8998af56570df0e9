"""alpha-CROWN (Xu et al. 2021, "Fast and Complete", Sec. 3.1, Eq. (5)-(6)): the lower slope
``alpha`` of every unstable ReLU is a free parameter in ``[0, 1]``; the CROWN bound is a
differentiable function of the alphas and is maximised by projected Adam.

What is optimised (with ``optimize_intermediate=True``, our default, the strategy of
auto_LiRPA's ``CROWN-Optimized`` with ``enable_opt_interm_bounds=True``: intermediate bounds are
recomputed with their own alphas at every iteration; auto_LiRPA's own default is
``optimize_intermediate=False``, output-layer alphas only):

* one alpha per (start, ReLU node, output row, batch element, neuron): the spec rows
  (``[N, B, *shape]``, start ``"__out__"``) and, with ``optimize_intermediate=True``, every
  pre-activation's ``+e_j`` / ``-e_j`` rows (``[2, T, *shape]`` for its ``T`` unstable
  (neuron, batch element) pairs); ReLUs only (Sigmoid/Tanh/MaxPool keep their CROWN relaxation);
* the loss is minus the sum of the spec rows' lower bounds (intermediate alphas get their
  gradient through the relaxations that depend on the intermediate bounds);
* intermediate boxes are intersected at every iteration with the initial CROWN boxes, and the
  set of intermediate rows is fixed at the neurons unstable under CROWN;
* the best lower bound per row over the iterations is kept (iteration 0 is plain CROWN), so
  the result is never looser than CROWN; every iterate is itself a sound bound.

With ``optimize_intermediate=False`` only the spec rows' alphas are optimised and the CROWN
intermediate boxes are re-used (much cheaper per iteration, usually a bit looser).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from verify.deadline import Deadline
from verify.spec import InputSet

from relax.bounds.adam import ProjectedAdam
from relax.ir.graph import BoundGraph
from relax.ir.prune import dead_relus, prune_boxes, prune_graph
from relax.bounds.cone import cone_rows, spec_cone
from relax.bounds.interval import interval_bounds
from relax.bounds.crown import AlphaFn, CrownResult, _acts_before, _keep_neurons, crown, rows_needed, skips_linear_bounds

__all__ = ["AlphaResult", "alpha_crown", "all_rows_positive"]


@dataclass
class AlphaResult:
    """``lower [B, N]`` best bounds, ``crown_lower`` the CROWN bounds it started from,
    ``iterations`` run, the intermediate boxes (CROWN's intersected with every step's) and the
    final alphas."""

    lower: Tensor
    crown_lower: Tensor
    iterations: int
    intermediate: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    alphas: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def all_rows_positive(low: Tensor) -> Tensor:
    """Default early-stop test: ``low [B, N]`` -> Bool ``[B]``, every row's bound positive."""
    return (low > 0).all(dim=1)


def alpha_crown(
    graph: BoundGraph,
    input_set: InputSet,
    C: Tensor,
    *,
    iterations: int = 20,
    lr: float = 0.1,
    lr_decay: float = 0.98,
    optimize_intermediate: bool = True,
    early_stop: bool = False,
    stop_fn: Callable[[Tensor], Tensor] | None = None,
    max_elements: int = 2**25,
    bound_overrides: dict[str, tuple[Tensor, Tensor]] | None = None,
    deadline: Deadline | None = None,
    intermediate: dict[str, tuple[Tensor, Tensor]] | None = None,
    prune: bool = False,
    stall: tuple[int, float] | None = None,
    forward: bool = False,
    stop_at: float | None = None,
) -> AlphaResult:
    """Optimised lower bounds ``[B, N]`` of ``C y`` (``C [B, N, K]``).

    Args:
        iterations: Adam steps (after the CROWN initialisation).
        lr, lr_decay: Adam learning rate and its per-step exponential decay.
        optimize_intermediate: also optimise the alphas of the intermediate bounds.
        early_stop: stop optimising a batch element once it is done: ``stop_fn(lower [B, N])
            -> Bool [B]`` (default: every row > 0). A done element's bounds are frozen, so a
            batch gives the same bounds as its elements one by one (up to round-off).
        max_elements, bound_overrides: as in :func:`relax.bounds.crown.crown`.
        deadline: no step starts after it (the CROWN bounds come first, so the result is
            always sound: the best over the steps done).
        intermediate: every pre-activation box given (``{node: (lo, hi)}``, ``[B, *shape]``,
            e.g. a parent domain's): only the spec rows' slopes are optimised, over these boxes.
        stall: ``(window, tolerance)``: stop early once the summed shortfall of the best bounds
            below 0 (``sum(min(best, 0))``) improved by less than ``tolerance`` times its size
            over the last ``window`` steps (for long runs: ``iterations`` is then a cap).
        prune: the ReLU neurons dead in every batch element under the CROWN boxes are removed
            from the graph before the optimisation (:func:`relax.bounds.crown.crown`'s ``prune``; the
            same bounds, smaller products). The result's ``intermediate`` and ``alphas`` are
            then those of the pruned graph.
        forward: the first CROWN pass within forward linear bounds' boxes (:func:`relax.bounds.crown.crown`'s
            ``forward``: networks of few inputs).
        stop_at: a hard deadline (``perf_counter`` value) of the first CROWN pass's spec rows:
            :class:`verify.deadline.DeadlineExpired` when that pass is still running then (the
            steps after it start only where ``deadline`` affords them).
    """
    fixed_pass: dict | None = None
    if intermediate is not None:
        optimize_intermediate, fixed_pass = False, {}
    with torch.no_grad():
        init = crown(graph, input_set, C, "crown", max_elements=max_elements, bound_overrides=bound_overrides,
                     intermediate=intermediate, fixed=fixed_pass, prune=prune, deadline=deadline, forward=forward,
                     stop_at=stop_at)
    if prune:
        graph, init, bound_overrides = _pruned(graph, init, bound_overrides)
    crown_lower = init.spec_lower()
    best = crown_lower.clone()
    relus = [n.name for n in graph.activations() if n.op.optimisable]  # ReLU, sigmoid, tanh
    if stop_fn is None:
        stop_fn = all_rows_positive
    done_b = stop_fn(best) if early_stop else torch.zeros(best.shape[0], dtype=torch.bool, device=best.device)
    if iterations <= 0 or not relus or bool(done_b.all()):
        return AlphaResult(best, crown_lower, 0, init.intermediate)
    # fixed bounds: the CROWN boxes (and the user's overrides) are intersected every iteration
    fixed = dict(init.intermediate)
    plan = _intermediate_rows(graph, input_set, fixed, spec_cone(graph, C)) if optimize_intermediate else {}
    alphas = _start_slopes(graph, init, relus, plan, C.shape[1], max_elements)
    params = [a for per_start in alphas.values() for a in per_start.values()]
    if not params:
        return AlphaResult(best, crown_lower, 0, init.intermediate)
    overrides = {**fixed, **{k: b for k, b in (bound_overrides or {}).items() if k not in fixed}}
    # with the boxes fixed, every step's relaxations, round-off weights and interval bound of the
    # rows are the same: computed on the first step, reused after (relax.bounds.crown.crown's ``fixed``)
    step_pass = _StepPass(graph, input_set, C, max_elements, overrides, None if optimize_intermediate else fixed, plan,
                          fixed_pass if fixed_pass is not None else ({} if not optimize_intermediate else None), init.weights,
                          deadline, _slope_lookup(alphas))
    ascent = _Ascent(best, done_b, dict(init.intermediate), optimize_intermediate, stop_fn if early_stop else None, stall)
    ascent.run(step_pass, ProjectedAdam(params, lr, lr_decay), params, iterations, deadline)
    return AlphaResult(ascent.best, crown_lower, ascent.done, ascent.boxes, alphas)


def _intermediate_rows(graph: BoundGraph, input_set: InputSet, boxes: dict[str, tuple[Tensor, Tensor]],
                       cone: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The rows whose bounds are optimised, ``{pre-activation node: (idx, bidx)}``: the neurons
    unstable under the CROWN ``boxes`` (:func:`relax.bounds.crown.rows_needed`) of every node
    whose box comes from linear bounds (graph order; nodes without such neurons left out), inside
    the spec rows' ``cone`` (:func:`relax.bounds.cone.spec_cone`) when given."""
    plan: dict[str, tuple[Tensor, Tensor]] = {}
    every = interval_bounds(graph, *input_set.bounds(), known=boxes)  # which sums are constant offsets
    for p in graph.preactivations():
        if p == graph.input_name or not _acts_before(graph, p) or skips_linear_bounds(graph, p, input_set, every):
            continue
        idx, bidx = cone_rows(cone or {}, p, *rows_needed(graph, p, *boxes[p]), boxes[p][0][0].numel())
        if idx.shape[0] > 0:
            plan[p] = (idx, bidx)
    return plan


def _start_slopes(graph: BoundGraph, init: CrownResult, relus: list[str], plan: dict[str, tuple[Tensor, Tensor]], N: int,
                  max_elements: int) -> dict[str, dict[str, Tensor]]:
    """The slopes to optimise (leaves with gradients), from the relaxations of the CROWN pass
    ``init``: ``{start: {activation node: slopes}}``, start ``"__out__"`` (the ``N`` spec rows,
    ``[N, B, *shape(, 2)]``) then each pre-activation of ``plan`` (``[2, T, *shape(, 2)]``: its
    ``+e_j`` / ``-e_j`` rows over the virtual batch of its ``T`` (neuron, batch element) pairs).

    Memory cap: per-row slopes of the spec rows while the slopes so far fit in ``max_elements``,
    else one set shared by all rows (``[1, B, ...]``); an intermediate start whose slopes do not
    fit keeps CROWN's slopes (no entry).
    """
    alphas: dict[str, dict[str, Tensor]] = {}
    used = 0  # slope elements so far (the optimiser keeps two more copies)
    for s in ["__out__", *plan]:
        alphas[s] = {}
        node = graph.output if s == "__out__" else s
        for act in _acts_before(graph, node):
            if act not in relus:
                continue
            lw = graph.by_name[act].op.alpha_init(init.relaxations[act]).detach()  # [B, *shape(, 2)]
            if s == "__out__":
                rows = N if used + N * lw.numel() <= max_elements else 1
                a = lw.unsqueeze(0).expand(rows, *lw.shape).clone()
            else:  # virtual batch of the (neuron, batch element) pairs, see linear.bound_node
                if used + 2 * plan[s][1].numel() * (lw.numel() // max(1, lw.shape[0])) > max_elements:
                    continue
                lw = lw[plan[s][1]]
                a = lw.unsqueeze(0).expand(2, *lw.shape).clone()
            used += a.numel()
            a.requires_grad_(True)
            alphas[s][act] = a
    return alphas


def _slope_lookup(alphas: dict[str, dict[str, Tensor]]) -> AlphaFn:
    """:func:`relax.bounds.crown.crown`'s ``alpha_fn`` over the slopes of :func:`_start_slopes`."""
    def alpha_fn(start: str, act: str, sl: slice | None):
        a = alphas.get(start, {}).get(act)
        if a is None:
            return None
        if start == "__out__":
            return a if a.shape[0] == 1 else a[sl]  # one shared set broadcasts over the rows
        return a[:, sl]

    return alpha_fn


@dataclass
class _StepPass:
    """The CROWN pass of an optimisation step: everything but the slopes' values fixed.
    ``intermediate``: the boxes used as given (only the spec rows optimised), else ``None`` (the
    boxes recomputed with ``plan``'s rows); ``cache``: :func:`relax.bounds.crown.crown`'s
    ``fixed``; ``weights``: the first pass's round-off weights."""

    graph: BoundGraph
    input_set: InputSet
    C: Tensor
    max_elements: int
    overrides: dict[str, tuple[Tensor, Tensor]]
    intermediate: dict[str, tuple[Tensor, Tensor]] | None
    plan: dict[str, tuple[Tensor, Tensor]]
    cache: dict | None
    weights: dict[str, Tensor | None]
    deadline: Deadline | None
    alpha_fn: AlphaFn

    def __call__(self) -> CrownResult:
        return crown(self.graph, self.input_set, self.C, "crown", max_elements=self.max_elements, bound_overrides=self.overrides,
                     intermediate=self.intermediate, alpha_fn=self.alpha_fn, rows=self.plan, fixed=self.cache,
                     roundoff_weights=self.weights, deadline=self.deadline)


@dataclass
class _Ascent:
    """Projected Adam on the slopes: the best bounds ``[B, N]`` so far (iteration 0: CROWN's),
    the batch elements done ``[B]`` (their bounds frozen), the steps run, and the boxes
    (intersected with every step's when ``tighten_boxes``). ``stop_fn``: the early-stop test
    (``None``: no early stop); ``stall``: as in :func:`alpha_crown`."""

    best: Tensor
    done_b: Tensor
    boxes: dict[str, tuple[Tensor, Tensor]]
    tighten_boxes: bool
    stop_fn: Callable[[Tensor], Tensor] | None
    stall: tuple[int, float] | None
    done: int = 0

    def run(self, step_pass: _StepPass, opt: ProjectedAdam, params: list[Tensor], iterations: int, deadline: Deadline | None) -> None:
        """Up to ``iterations`` steps; none started that the last one's duration says would end
        after ``deadline`` (a pass cut by the deadline gives nothing: its bounds are vacuous)."""
        shortfall: list[float] = []  # sum(min(best, 0)) after each step, for ``stall``
        last = 0.0  # seconds of the last step
        for it in range(iterations):
            if deadline is not None and not deadline.affords(last):
                break
            t_step = time.perf_counter()
            with torch.enable_grad():
                res = step_pass()
                low = res.spec_lower()
                # fmax / fmin: a step's undefined (NaN) bound is no information, not a bound that replaces the best
                if self.tighten_boxes:
                    self.boxes = {k: (torch.fmax(self.boxes[k][0], l.detach()), torch.fmin(self.boxes[k][1], h.detach()))
                                  for k, (l, h) in res.intermediate.items() if k in self.boxes}
                self.best = torch.where(self.done_b.unsqueeze(1), self.best, torch.fmax(self.best, low.detach()))
                self.done = it + 1
                if self.stop_fn is not None:
                    self.done_b = self.done_b | self.stop_fn(self.best)
                    if bool(self.done_b.all()):
                        break
                if it == iterations - 1 or _stalled(shortfall, self.best, self.stall):
                    break
                if deadline is not None and deadline.expired():  # no step that no pass will use
                    break
                loss = -(low * (~self.done_b).unsqueeze(1)).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            opt.step(grads)
            last = time.perf_counter() - t_step


def _stalled(history: list[float], best: Tensor, stall: tuple[int, float] | None) -> bool:
    """Record ``sum(min(best, 0))`` and say whether it improved by less than ``tolerance``
    times its size over the last ``window`` records."""
    if stall is None:
        return False
    window, tol = stall
    history.append(float(best.clamp(max=0).sum()))
    if len(history) <= window:
        return False
    gain = history[-1] - history[-1 - window]
    return gain < tol * abs(history[-1])


def _pruned(graph: BoundGraph, init: CrownResult, overrides: dict[str, tuple[Tensor, Tensor]] | None
            ) -> tuple[BoundGraph, CrownResult, dict[str, tuple[Tensor, Tensor]] | None]:
    """The graph without the ReLU neurons dead under ``init``'s boxes, with ``init``'s boxes and
    relaxations and the ``overrides`` restricted to the kept neurons."""
    keep = dead_relus(graph, init.intermediate)
    if not keep:
        return graph, init, overrides
    relax = {k: (_keep_neurons(r, keep[k].to(r.lw.device)) if k in keep else r) for k, r in init.relaxations.items()}
    # the pass pruned the same neurons as it went, so its round-off weights fit the pruned graph
    pruned = CrownResult(init.lower, prune_boxes(graph, keep, init.intermediate), relax, init.weights)
    return prune_graph(graph, keep), pruned, (None if overrides is None else prune_boxes(graph, keep, overrides))
