"""Branch-and-bound on the bound graph: any network whose nonlinearities the graph engine
relaxes (dense chains, residual connections, convolutions, max-pooling, sigmoid / tanh), on
boxes and on l_inf, l_1 and l_2 balls.

A *domain* narrows some pre-activations: a ReLU input gets a sign ``s_j = +1`` (``z_j >= 0``,
the ReLU is the identity) or ``s_j = -1`` (``z_j <= 0``, it is zero); the input of a sigmoid,
tanh or max-pooling gets half of its interval. Domains are bounded in batches along the graph
engine's batch dimension (:func:`relax.bounds.crown.crown`, one batch element per domain):

* every pre-activation box is the parent domain's box (at the root: alpha-CROWN's)
  intersected with the domain's splits, then, while affordable, recomputed by CROWN within
  them from the earliest split of the round on (the boxes before it cannot change: they
  depend on no split below them); each open domain keeps its boxes in the queue (float32,
  rounded outwards) for its children, so the boxes tighten down the tree;
* the spec rows are bounded by CROWN with optimised slopes (alpha: ReLU, sigmoid, tanh) and,
  for each ReLU split, a Lagrange multiplier ``beta_j >= 0`` of its constraint ``s_j z_j >= 0``
  (beta-CROWN, Wang et al. 2021, Eq. 6): the bound of ``c^T f(x) - sum_j beta_j s_j z_j(x)`` is a
  lower bound of ``c^T f`` on the domain for any ``beta >= 0``, and Adam ascends it (without
  learning-rate decay). Each row keeps its best iterate; children go on from their parent's
  last iterate (Adam's progress) and are never bounded below their parent. With ``fast`` (the
  network in float32) the steps run in float32 and the bound that counts is one float64 pass
  with each row's best parameters;
* ReLUs dead at the root (``u <= 0``) are removed from the graph before the search
  (:mod:`relax.ir.prune`, done by the caller);
* where a domain's boxes are not recomputed (smart-branching trials; rounds of large networks),
  its children keep their parent's boxes except at the split nodes, so the relaxations of every
  other nonlinear node (a softmax's exp and 1/x, attention's products) are built once per parent
  and repeated for its children (:class:`ParentBoxes`; the bounds are the same bit for bit);
* a domain whose box becomes empty somewhere is infeasible and is dropped;
* a domain whose ReLUs are all fixed is affine: :mod:`relax.bab.leaf` solves its LP (SOCP for
  l_2) for the exact multipliers, which the engine turns into the domain's bound (LP duality:
  the bound is then the exact minimum), and tries the minimisers as counterexamples.

Branching: per domain, the unsplit unstable ReLU with the largest BaBSR-style score
(Bunel et al. 2020): the intercept ``-l u / (u - l)`` of its upper relaxation line weighted by
how much the unproved spec rows lose through it (``max(-A_j, 0)`` with ``A_j`` the rows'
coefficient on the ReLU output under the last iterate's parameters), with a small share of ``|A_j| min(u, -l)`` to order the rest;
sigmoid / tanh inputs score ``|A_j|`` times their relaxation's gap, max-pooling inputs their
width. Inputs of at most a few coordinates are split instead (:mod:`relax.bab.input_split`).

The search is anytime: it stops at the deadline with the smallest domain bound as the best
bound. The domain queue is held under a memory cap. Past ``FULL_ENTRY_SHARE`` of it, the domains
closest to proved keep only their splits (interval ends as float32 rounded outwards), bounds and
slopes (uint8): a fraction of their bytes; their multipliers and boxes are dropped and start
again from the root's. While the queue
is more than ``FULL_QUEUE`` full, the domains closest to proved are split first (their children
mostly close, so the queue shrinks; best-first again below), and only a queue that still
reaches the cap stops the search (``unknown``, reason "memory"). A round starts only when one
as long as the last (the first: two children at the root's pace) still fits before the deadline, and a pass of smart-branching
trials only when it ends before it at the last pass's pace; rounds start with one domain and
double up to ``batch_size`` while they take under 2 % of the budget, and the per-domain recomputation of the
boxes is dropped once a round takes over 5 % or the recomputation over half a round (large
networks, where more domains on the root's boxes pay better).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verify.deadline import Deadline, DeadlineExpired
from verify.registry import FLOAT64_PROOF_MARGIN
from verify.spec import InputSet, LpBall

from relax.bounds.adam import ProjectedAdam
from relax.bab import BabResult, RowSpec
from relax.bab.leaf import leaf_multipliers, leaf_bound
from relax.ir.graph import BoundGraph
from relax.bounds.cone import in_cone, spec_cone
from relax.bounds.crown import crown
from relax.bounds.roundoff import round_outward
from relax.ir.ops import Relaxation, ReLU

__all__ = ["graph_relu_bab", "bound_domains", "relu_inputs", "interval_inputs", "relu_scores"]


def relu_inputs(graph: BoundGraph) -> list[tuple[str, str]]:
    """``[(relu node, its input node)]`` in graph order."""
    return [(n.name, n.inputs[0]) for n in graph.nodes if isinstance(n.op, ReLU)]


def interval_inputs(graph: BoundGraph) -> list[tuple[str, str]]:
    """``[(activation node, its input node)]`` of the other nonlinear ops (sigmoid, tanh,
    max-pooling), whose inputs are split by halving their interval."""
    relu_in = {p for _, p in relu_inputs(graph)}
    return [(n.name, n.inputs[0]) for n in graph.activations()
            if not isinstance(n.op, ReLU) and len(n.inputs) == 1 and n.inputs[0] not in relu_in]


def _split_boxes(root: dict[str, tuple[Tensor, Tensor]], splits: dict[str, Tensor], shapes: dict[str, tuple[int, ...]],
                 ivals: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Root boxes ``[1, *shape]`` (or one per domain, ``[D, *shape]``) intersected with the sign
    splits ``[D, n]`` and the interval splits ``(lo [D, n], hi [D, n])`` -> ``[D, *shape]``."""
    out = {}
    for p, (l, h) in root.items():
        if ivals is not None and p in ivals:
            il, ih = ivals[p]
            D = il.shape[0]
            lf = torch.maximum(l.reshape(l.shape[0], -1), il.to(l.dtype))
            hf = torch.minimum(h.reshape(h.shape[0], -1), ih.to(h.dtype))
            out[p] = (lf.reshape(D, *shapes[p]), hf.reshape(D, *shapes[p]))
            continue
        if p not in splits:
            out[p] = (l, h)
            continue
        s = splits[p]
        D = s.shape[0]
        lf, hf = l.reshape(l.shape[0], -1).expand(D, -1), h.reshape(h.shape[0], -1).expand(D, -1)
        lf = torch.where(s > 0, lf.clamp_min(0.0), lf)
        hf = torch.where(s < 0, hf.clamp_max(0.0), hf)
        out[p] = (lf.reshape(D, *shapes[p]), hf.reshape(D, *shapes[p]))
    return out


@dataclass
class _Pass:
    """What a bounding pass over ``D`` domains needs: the graph, the input set (a batch of one:
    every domain's; the passes concretise all domains' rows with one matrix-vector product),
    the pre-activation boxes ``{node: (lo, hi)}`` (``[D, *shape]``) and the property rows
    ``C [D, N, K]``, ``d [D, N]`` (all in the graph's dtype)."""

    graph: BoundGraph
    x_set: InputSet
    boxes: dict[str, tuple[Tensor, Tensor]]
    C: Tensor
    d: Tensor
    parents: "ParentBoxes | None" = None  # the domains' parents, whose relaxations they share where they can
    _shared: dict[str, Relaxation] | None = field(default=None, repr=False)

    def on(self, fast: BoundGraph) -> "_Pass":
        """The same pass on ``fast`` (the network in another dtype)."""
        dt = fast.dtype
        return _Pass(fast, self.x_set.to(dtype=dt), {p: (l.to(dt), h.to(dt)) for p, (l, h) in self.boxes.items()},
                     self.C.to(dt), self.d.to(dt), self.parents)

    def shared(self) -> dict[str, Relaxation] | None:
        """The relaxations the domains share with their parents, on this pass's graph (built on
        first use: a pass the deadline skips builds none)."""
        if self.parents is not None and self._shared is None:
            self._shared = self.parents.relaxations(self.graph)
        return self._shared


def _domain_pass(graph: BoundGraph, inputs: InputSet, rs: RowSpec, root: dict[str, tuple[Tensor, Tensor]],
                 splits: dict[str, Tensor], ivals: dict[str, tuple[Tensor, Tensor]] | None, recompute: bool,
                 deadline: float, settled: Sequence[str] = (), parents: "ParentBoxes | None" = None) -> tuple[_Pass, Tensor, float]:
    """The domains' :class:`_Pass` (boxes: ``root``'s within the splits, recomputed by CROWN when
    ``recompute``, except the ``settled`` ones; sharing relaxations with ``parents``, which only
    boxes that are not recomputed allow), ``infeasible [D]`` (an empty box somewhere) and the
    recomputation's seconds."""
    if recompute and parents is not None:
        raise ValueError("bound_domains: relaxations shared with the parents, but the boxes are to be recomputed")
    if splits:
        D = next(iter(splits.values())).shape[0]
    else:
        assert ivals  # a domain has ReLU splits or interval splits
        D = next(iter(ivals.values()))[0].shape[0]
    shapes = {p: graph.shape(p) for p in root}
    boxes = _split_boxes(root, splits, shapes, ivals)
    infeasible = torch.zeros(D, dtype=torch.bool, device=graph.device)
    for l, h in boxes.values():
        infeasible |= (l > h).reshape(l.shape[0], -1).any(1).expand(D)
    boxes = {p: (l.expand(D, *l.shape[1:]), h.expand(D, *h.shape[1:])) for p, (l, h) in boxes.items()}
    C, d = rs.batch(D)
    C, d = C.to(graph.dtype), d.to(graph.dtype)
    t_boxes = time.perf_counter()
    if recompute:
        with torch.no_grad():
            x_all = inputs.select(torch.zeros(D, dtype=torch.long, device=graph.device))  # per-domain rows need the set per domain
            boxes = crown(graph, x_all, None, bound_overrides=boxes, intermediate={p: boxes[p] for p in settled if p in boxes} or None,
                          deadline=Deadline.until(None if math.isinf(deadline) else deadline), cone_of=C[:1]).intermediate
        for l, h in boxes.values():
            infeasible |= (l > h).reshape(D, -1).any(1)
    return _Pass(graph, inputs, boxes, C, d, parents), infeasible, time.perf_counter() - t_boxes


def shared_relaxations(graph: BoundGraph, parent_boxes: dict[str, tuple[Tensor, Tensor]], children: Tensor,
                       changed: Iterable[str], mode: str = "crown") -> dict[str, Relaxation]:
    """The relaxations that children share with their parents, built once per parent:
    ``{nonlinear node: Relaxation [D, *shape]}`` for every node none of whose inputs is in
    ``changed`` (the nodes whose boxes the children's splits narrow). ``parent_boxes``: the
    parents' pre-activation boxes ``[P, *shape]`` (taken in ``graph``'s dtype); ``children [D]``: each child's parent. A relaxation
    acts per batch element, so the children's equal their parents' bit for bit; smart branching's
    trials bound ``2 k`` children of each domain whose softmax, exp or products keep their boxes."""
    changed = set(changed)
    P = next(iter(parent_boxes.values()))[0].shape[0]
    out = {}
    for n in graph.nodes:
        if not n.op.nonlinear or any(i in changed or i not in parent_boxes for i in n.inputs):
            continue
        boxes = [(parent_boxes[i][0].to(graph.dtype), parent_boxes[i][1].to(graph.dtype)) for i in n.inputs]
        out[n.name] = n.op.relax_inputs(boxes, mode).select(children, P)
    return out


@dataclass
class ParentBoxes:
    """What children share with their parents when their boxes are not recomputed: the parents'
    pre-activation boxes ``{node: (lo, hi)}`` (``[P, *shape]``), each child's parent
    (``children [D]``) and the nodes whose boxes the children's splits narrow (``changed``)."""

    boxes: dict[str, tuple[Tensor, Tensor]]
    children: Tensor
    changed: frozenset[str]

    @classmethod
    def repeated(cls, boxes: dict[str, tuple[Tensor, Tensor]], domains: list[int], copies: int, changed: Iterable[str]) -> "ParentBoxes":
        """The ``domains`` of ``boxes`` (``[D, *shape]``) as parents of ``copies`` children each, in a
        row (smart branching's trials)."""
        at = torch.tensor(domains, device=next(iter(boxes.values()))[0].device)
        return cls({p: (l[at], h[at]) for p, (l, h) in boxes.items()},
                   torch.arange(len(domains), device=at.device).repeat_interleave(copies), frozenset(changed))

    def relaxations(self, graph: BoundGraph) -> dict[str, Relaxation]:
        """:func:`shared_relaxations` on ``graph``."""
        with torch.no_grad():
            return shared_relaxations(graph, self.boxes, self.children, self.changed)


def _start_slopes(ps: _Pass, alphas0: dict[str, Tensor] | None, N: int, D: int) -> dict[str, Tensor]:
    """The slopes to optimise, ``{activation node: [N, D, *shape(, 2)]}`` (ReLU slopes, sigmoid /
    tanh slope pairs; leaves with gradients): the parents' ``alphas0`` (``[D, N or 1, n]``; one
    set shared by the rows is alpha_crown's memory cap) or the relaxations' initial ones."""
    dt = ps.graph.dtype
    alphas = {}
    for n in ps.graph.activations():
        if not n.op.optimisable:
            continue
        if alphas0 is not None and n.name in alphas0:  # no relaxation needed: only the slopes' shape
            a0 = alphas0[n.name].to(dt).transpose(0, 1)  # [N or 1, D, n]
            a = a0.expand(N, *a0.shape[1:]).reshape(N, D, *ps.graph.shape(n.name), *n.op.slope_pair)
        else:
            with torch.no_grad():
                init = n.op.alpha_init(n.op.relax_inputs([ps.boxes[i] for i in n.inputs]))  # [D, *shape(, 2)]
            a = init.unsqueeze(0).expand(N, *init.shape)
        alphas[n.name] = a.clone().requires_grad_(True)
    return alphas


def _start_multipliers(splits: dict[str, Tensor], betas0: dict[str, Tensor] | None, N: int, D: int,
                       dt: torch.dtype) -> dict[str, Tensor]:
    """The multipliers to optimise, ``{relu input node with a split: [N, D, n]}`` (leaves with
    gradients): the parents' ``betas0`` (``[D, N, n]``) or 0, and 0 where a neuron is not split."""
    betas = {}
    for p, sp in splits.items():
        if not bool((sp != 0).any()):
            continue
        b = betas0[p].to(dt).transpose(0, 1) if betas0 is not None and p in betas0 else torch.zeros(N, D, sp.shape[1], dtype=dt, device=sp.device)
        betas[p] = (b * (sp != 0).unsqueeze(0)).clone().requires_grad_(True)
    return betas


@dataclass
class _SplitLagrangian:
    """beta-CROWN's objective on ``D`` domains and ``N`` rows: the CROWN lower bound of
    ``c^T f(x) - sum_j beta_j s_j z_j(x)`` with the slopes ``alphas`` and the multipliers
    ``betas`` of the split constraints ``s_j z_j >= 0`` (signs ``{relu input node: [1, D, n]}``)."""

    signs: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    N: int
    D: int

    rigorous: bool = True  # False: bounds for ranking only (crown's ``rigorous``)
    stop_at: float | None = None  # a hard deadline of every pass (crown's ``stop_at``)

    def lower(self, ps: _Pass, alphas: dict[str, Tensor], betas: dict[str, Tensor], fixed: dict,
              record: dict[str, Tensor | None] | None = None) -> Tensor:
        """``[D, N]`` lower bounds of the rows ``C y + d``; ``fixed``: :func:`crown`'s cache of the
        boxes' relaxations (the boxes do not change across the steps); ``record``: filled with
        the rows' coefficients."""
        N, D = self.N, self.D
        extra = {p: -(b * self.signs[p].to(b.dtype)).reshape(N, D, *self.shapes[p]) for p, b in betas.items()}
        afn = lambda start, act, sl: None if (act not in alphas or start != "__out__") else alphas[act][sl]  # noqa: E731
        return crown(ps.graph, ps.x_set, ps.C, intermediate=ps.boxes, alpha_fn=afn, out_extra=extra, out_record=record,
                     fixed=fixed, rigorous=self.rigorous, stop_at=self.stop_at, relaxations=ps.shared()).spec_lower() + ps.d


def _ascend(lagrangian: _SplitLagrangian, ps: _Pass, alphas: dict[str, Tensor], betas: dict[str, Tensor], fixed: dict,
            record: dict[str, Tensor | None], *, steps: int, lr_alpha: float, lr_beta: float, deadline: float,
            keep_params: bool, reserve_s: float | None = 0.0) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Adam ascent of the bound on the slopes and multipliers (in place; no learning-rate decay:
    children go on from their parents' last iterate): ``steps`` updates, each followed by an
    evaluation, none started unless it is expected to end before ``deadline`` with ``reserve_s``
    seconds to spare (the last step's duration predicts the next; ``reserve_s``: the caller's pass
    after the ascent, None: unknown, one step's duration); the last evaluation fills ``record``
    (the branching scores use the last iterate's coefficients).

    Returns:
        each row's best bound ``[D, N]`` over the evaluations and, with ``keep_params``, each
        row's best slopes and multipliers (else empty dicts).
    """
    N, D = lagrangian.N, lagrangian.D
    params = list(alphas.values()) + list(betas.values())
    n_steps = steps if params else 0
    opt_a = ProjectedAdam(list(alphas.values()), lr_alpha, 1.0) if n_steps else None  # their moments cost a pass's memory traffic
    opt_b = ProjectedAdam(list(betas.values()), lr_beta, 1.0, upper=None) if betas and n_steps else None
    best: Tensor | None = None
    best_a: dict[str, Tensor] = {}  # set by the first evaluation (with keep_params)
    best_b: dict[str, Tensor] = {}
    step_s = 0.0  # the last step's duration
    for i in range(n_steps + 1):
        t_step = time.perf_counter()
        if i > 0 and t_step + step_s + (step_s if reserve_s is None else reserve_s) >= deadline:
            break
        update = i < n_steps
        with torch.enable_grad() if update else torch.no_grad():
            low = lagrangian.lower(ps, alphas, betas, fixed, None if update else record)
            grads = torch.autograd.grad(-low.sum(), params, allow_unused=True) if update else None
        low = low.detach()
        if best is None:
            best = low
            if keep_params:
                best_a, best_b = {r: a.detach().clone() for r, a in alphas.items()}, {p: b.detach().clone() for p, b in betas.items()}
        else:
            better = (low > best).t()  # [N, D]: rows are independent problems, each keeps its best iterate
            best = torch.where(better.t(), low, best)
            if keep_params:
                for r, a in alphas.items():
                    best_a[r] = torch.where(better.view(N, D, *([1] * (a.dim() - 2))), a.detach(), best_a[r])
                for p, b in betas.items():
                    best_b[p] = torch.where(better.view(N, D, 1), b.detach(), best_b[p])
        if update:
            assert grads is not None and opt_a is not None
            opt_a.step(grads[: len(alphas)])
            if opt_b is not None:
                opt_b.step(grads[len(alphas):])
        step_s = time.perf_counter() - t_step
    assert best is not None  # the first evaluation always runs
    return best, best_a, best_b


def _domain_major(alphas: dict[str, Tensor], betas: dict[str, Tensor], N: int, D: int
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The slopes and multipliers ``[N, D, ...]`` as the children start from them: detached,
    ``[D, N, n]``, float32."""
    return ({r: a.detach().reshape(N, D, -1).transpose(0, 1).float() for r, a in alphas.items()},
            {p: b.detach().transpose(0, 1).float() for p, b in betas.items()})


def bound_domains(
    graph: BoundGraph,
    inputs: InputSet,
    rs: RowSpec,
    root: dict[str, tuple[Tensor, Tensor]],
    splits: dict[str, Tensor],
    *,
    alphas0: dict[str, Tensor] | None = None,
    betas0: dict[str, Tensor] | None = None,
    steps: int = 10,
    lr_alpha: float = 0.1, lr_beta: float = 0.05,
    deadline: float = math.inf,
    recompute: bool = True,
    ivals: dict[str, tuple[Tensor, Tensor]] | None = None,
    fast: BoundGraph | None = None,
    settled: Sequence[str] = (),
    rigorous: bool = True, exact_s: float = 0.0, hard: bool = False, parents: ParentBoxes | None = None,
) -> "DomainBounds":
    """Bounds of the spec rows on ``D`` domains.

    Args:
        inputs: the input set, batch of one.
        rs: the property rows (``C [N, K]``, ``d [N]``).
        root: pre-activation boxes ``{node: (lo, hi)}``, ``[1, *shape]`` (the root's) or
            ``[D, *shape]`` (each domain's parent's).
        splits: ``{relu input node: [D, n] int8}`` split signs (0 = not split).
        alphas0, betas0: starting slopes ``{activation node: [D, N, n]}`` (``n`` the numbers
            per row: a ReLU's slopes, a sigmoid's / tanh's slope pairs) and multipliers
            ``{relu input node: [D, N, n]}`` (the parents'; default CROWN's slopes and 0).
        steps: alpha/beta Adam steps after the first pass (until ``deadline``, a ``perf_counter`` value).
        recompute: recompute the pre-activation boxes of every domain by CROWN within its
            split boxes (tighter, one linear pass per unstable neuron); else use the split
            root boxes as they are.
        settled: pre-activations whose boxes (``root``'s within the splits) the recomputation
            keeps as they are: those before every domain's newest split.
        ivals: interval splits ``{input node of a sigmoid / tanh / max-pooling: (lo [D, n],
            hi [D, n])}`` intersected with the boxes.
        fast: the same network in a faster dtype (float32) for the optimisation steps; the
            returned bounds are then one pass of ``graph`` with each row's best parameters.
        rigorous: False: ``rows`` without round-off allowance or interval bound, **not bounds
            of the network** (filtered smart branching's trials only rank candidates; the
            boxes and ``infeasible`` stay sound).
        exact_s: with ``fast``, the expected seconds of the last pass on ``graph`` (a previous
            round's :attr:`DomainBounds.exact_s`): the ascent leaves them before ``deadline``.
        hard: ``deadline`` is hard: a spec-row pass still running at it raises
            :class:`verify.deadline.DeadlineExpired` (for callers that discard late bounds).
        parents: the domains' parents, whose relaxations they share where their splits leave a
            node's inputs alone (:class:`ParentBoxes`; only without ``recompute``, which changes the boxes).
    """
    exact, infeasible, boxes_s = _domain_pass(graph, inputs, rs, root, splits, ivals, recompute, deadline, settled, parents)
    D, N = exact.C.shape[:2]
    # the slopes and multipliers are optimised on ``fast`` (the same network in float32: about
    # twice as fast); any slopes in range and multipliers >= 0 give a sound bound, so the bound
    # that counts is one last pass on ``graph`` with each row's best parameters
    ps = exact if fast is None else exact.on(fast)
    alphas = _start_slopes(ps, alphas0, N, D)
    betas = _start_multipliers(splits, betas0, N, D, ps.graph.dtype)
    lagrangian = _SplitLagrangian({p: splits[p].to(ps.graph.dtype).unsqueeze(0) for p in betas},
                                  {p: graph.shape(p) for p in betas}, N, D, rigorous,
                                  deadline if hard and math.isfinite(deadline) else None)
    record: dict[str, Tensor | None] = dict.fromkeys([r for r, _ in relu_inputs(graph) + interval_inputs(graph)] + [graph.input_name])
    vacuous = torch.full((D, N), -math.inf, dtype=graph.dtype, device=graph.device)
    if time.perf_counter() >= deadline:  # the boxes took the budget: vacuous bounds, no more passes
        return DomainBounds(vacuous, infeasible, record, exact.boxes, *_domain_major(alphas, betas, N, D), boxes_s)
    fixed: dict = {}  # relaxations, round-off weights, interval rows: the boxes do not change across the steps
    best, best_a, best_b = _ascend(lagrangian, ps, alphas, betas, fixed, record, steps=steps, lr_alpha=lr_alpha,
                                   lr_beta=lr_beta, deadline=deadline, keep_params=fast is not None,
                                   reserve_s=(exact_s or None) if fast is not None else 0.0)
    if time.perf_counter() >= deadline and (fast is not None or record[graph.input_name] is None):
        # no time for the pass that gives sound bounds / the record: vacuous bounds, on time
        # (a round past its deadline is discarded: ``_ReluSearch.round``)
        best = vacuous
    t_exact = time.perf_counter()
    if best is not vacuous:
        best = _last_pass(lagrangian, exact, best, best_a, best_b, alphas, betas, fixed, record, fast is not None)
    # children go on from the last iterate (Adam's progress), the proving bound uses each row's best
    return DomainBounds(best, infeasible, record, exact.boxes, *_domain_major(alphas, betas, N, D), boxes_s,
                        time.perf_counter() - t_exact if fast is not None and best is not vacuous else 0.0)


@torch.no_grad()
def _last_pass(lagrangian: _SplitLagrangian, exact: _Pass, best: Tensor, best_a: dict[str, Tensor], best_b: dict[str, Tensor],
               alphas: dict[str, Tensor], betas: dict[str, Tensor], fixed: dict, record: dict[str, Tensor | None],
               optimised_fast: bool) -> Tensor:
    """After the ascent: with ``optimised_fast`` the sound bound ``[D, N]``, each row's best
    parameters on the network itself (filling ``record`` if the ascent did not); else ``best``,
    after filling ``record`` from the last iterate when the deadline stopped the ascent first."""
    dt, first = exact.graph.dtype, exact.graph.input_name
    if optimised_fast:
        return lagrangian.lower(exact, {r: a.to(dt) for r, a in best_a.items()}, {p: b.to(dt) for p, b in best_b.items()}, {},
                                record if record[first] is None else None)
    if record[first] is None:
        lagrangian.lower(exact, alphas, betas, fixed, record)
    return best


@dataclass
class DomainBounds:
    """What :func:`bound_domains` found for ``D`` domains: ``rows [D, N]`` lower bounds of
    ``C y + d`` (each row's best iterate), ``infeasible [D]``, ``record`` (the rows'
    coefficients ``[N, D, *shape]`` on each ReLU output and on the input, last iterate),
    ``boxes`` (``[D, *shape]`` per pre-activation), and the last iterate's ``alphas``
    (``{relu node: [D, N, n]}``) and ``betas`` (``{relu input node: [D, N, n]}``), float32, for
    the children to go on from, and the seconds the boxes' recomputation took."""

    rows: Tensor
    infeasible: Tensor
    record: dict[str, Tensor | None]
    boxes: dict[str, tuple[Tensor, Tensor]]
    alphas: dict[str, Tensor]
    betas: dict[str, Tensor]
    boxes_s: float = 0.0  # seconds spent recomputing the boxes
    exact_s: float = 0.0  # seconds of the last pass on the network itself (after optimising on ``fast``)


def _unproved_rows(db: "DomainBounds", rs: RowSpec) -> Tensor:
    """``[D, N]``: 1 for the rows of groups not yet proved, else 0 (their losses count)."""
    return (~(rs.group_max(db.rows) > 0)).to(torch.float64).gather(1, rs.groups.expand(db.rows.shape[0], -1))


def relu_scores(graph: BoundGraph, db: "DomainBounds", splits: dict[str, Tensor], rs: RowSpec,
                weight: Tensor | None = None) -> dict[str, Tensor]:
    """BaBSR-style scores ``{relu input node: [D, n]}`` of the unsplit unstable ReLUs (-1 for the
    others; nodes without any left out): the intercept of the upper relaxation line weighted by
    how much the unproved rows lose through it (see the module docstring). ``weight``:
    :func:`_unproved_rows` when the caller has it."""
    D = db.rows.shape[0]
    weight = _unproved_rows(db, rs) if weight is None else weight
    cone = spec_cone(graph, rs.C.unsqueeze(0))  # a neuron outside it cannot move the rows: never split
    out = {}
    for r, p in relu_inputs(graph):
        l, h = db.boxes[p]
        l, h = l.reshape(D, -1).double(), h.reshape(D, -1).double()
        unstable = (l < 0) & (h > 0) & (splits[p] == 0) & _in_cone(cone, p, l.shape[1], l.device)
        if not bool(unstable.any()):
            continue
        Ar = db.record.get(r)
        if Ar is None:
            a_neg = a_abs = torch.zeros_like(l)
        else:
            Ar = Ar.reshape(Ar.shape[0], D, -1).double() * weight.t().unsqueeze(-1)
            a_neg, a_abs = (-Ar).clamp_min(0).sum(0), Ar.abs().sum(0)
        inter = (-l * h / (h - l).clamp_min(1e-30)).clamp_min(0)
        score = a_neg * inter + 1e-3 * a_abs * torch.minimum(h, -l) + 1e-9 * inter
        out[p] = torch.where(unstable, score, torch.full_like(score, -1.0))
    return out


def _in_cone(cone: dict[str, Tensor], p: str, n: int, device: torch.device) -> Tensor | bool:
    """:func:`relax.bounds.cone.in_cone` with True for "every neuron" (to ``&`` with a mask)."""
    mask = in_cone(cone, p, n, device)
    return True if mask is None else mask


def _branch(graph: BoundGraph, db: "DomainBounds", splits: dict[str, Tensor], rs: RowSpec,
            scores: dict[str, Tensor] | None = None) -> tuple[list[str | None], Tensor, Tensor]:
    """Per domain the (node, neuron) to split next and where: ``([D] node names or None,
    [D] indices, [D] split points)``; the point is NaN for a ReLU (split at 0 into the two
    signs), the middle of the box for the input of another nonlinear op.

    Scores: a ReLU's BaBSR score (see the module docstring); for a sigmoid / tanh input,
    ``|A_j|`` times the largest gap between the upper and lower relaxation lines over the box;
    for a max-pooling input, its width times the mean ``|A|`` of the pooling's outputs. Rows of
    groups already proved do not count. ``scores``: :func:`relu_scores` when the caller has them."""
    D = db.rows.shape[0]
    weight = _unproved_rows(db, rs)
    cone = spec_cone(graph, rs.C.unsqueeze(0))
    if scores is None:
        scores = relu_scores(graph, db, splits, rs, weight)
    best_score = torch.full((D,), -1.0, dtype=torch.float64, device=graph.device)
    best_node: list[str | None] = [None] * D
    best_idx = torch.zeros(D, dtype=torch.long, device=graph.device)
    for p, score in scores.items():
        sc, idx = score.max(1)
        better = sc > best_score
        best_score = torch.where(better, sc, best_score)
        best_idx = torch.where(better, idx, best_idx)
        for dd in better.nonzero().flatten().tolist():
            best_node[dd] = p
    best_t = torch.full((D,), math.nan, dtype=torch.float64, device=graph.device)
    for a, p in interval_inputs(graph):
        l, h = db.boxes[p]
        l, h = l.reshape(D, -1).double(), h.reshape(D, -1).double()
        width = h - l
        splittable = (width > 1e-7 * (1 + torch.maximum(l.abs(), h.abs()))) & _in_cone(cone, p, l.shape[1], l.device)
        if not bool(splittable.any()):
            continue
        Aa = db.record.get(a)
        Aa = None if Aa is None else Aa.reshape(Aa.shape[0], D, -1).double() * weight.t().unsqueeze(-1)
        op = graph.by_name[a].op
        if Aa is not None and op.elementwise:  # (a max-pooling of stride 1 keeps the size too)
            r = op.relax(l, h)
            dw = (r.uw - r.lw).double()
            db_ = (r.ub - r.lb).double()
            gap = torch.maximum(dw * l + db_, dw * h + db_).clamp_min(0)
            score = Aa.abs().sum(0) * gap
        else:
            a_mean = torch.zeros(D, 1, dtype=torch.float64, device=graph.device) if Aa is None else Aa.abs().sum(0).mean(1, keepdim=True)
            score = a_mean * width
        score = torch.where(splittable, score + 1e-12 * width, torch.full_like(score, -1.0))
        sc, idx = score.max(1)
        better = sc > best_score
        best_score = torch.where(better, sc, best_score)
        best_idx = torch.where(better, idx, best_idx)
        mid = ((l + h) / 2).gather(1, idx.unsqueeze(1)).squeeze(1)
        best_t = torch.where(better, mid, best_t)
        for dd in better.nonzero().flatten().tolist():
            best_node[dd] = p
    for dd, n in enumerate(best_node):  # a ReLU chosen after an interval node
        if n is not None and n in splits:
            best_t[dd] = math.nan
    return best_node, best_idx, best_t


#: the share of the queue's memory cap above which the domains closest to proved go first
FULL_QUEUE = 0.8

#: the share of the queue's memory cap that domains with all their fields (slopes, multipliers,
#: boxes) may fill; beyond it, the ones closest to proved keep their splits, bounds and uint8
#: slopes (:class:`_DomainStore`), and their children start from the root's multipliers and boxes
FULL_ENTRY_SHARE = 0.5

#: children bounded in one pass of filtered smart branching (a round bounds up to 2 x 64)
FSB_CHILDREN_PER_PASS = 128

#: the domains' boxes are recomputed by CROWN only while a round stays within this share of
#: the search's time and its boxes take at most half of it; before the first round, two whole
#: CROWN passes (its two children) must fit the share (vit's IBP-trained net: one pass 15-25 s
#: of 100, whose first round recomputed boxes for 65 s under load)
RECOMPUTE_ROUND_SHARE = 0.05

#: when a round as long as the last no longer fits before the deadline, the search runs a smaller
#: one: its domains at the last round's pace per domain fill this share of the time left (smaller
#: batches cost more per domain; a round still running at the deadline is abandoned)
LAST_ROUND_MARGIN = 0.5
#: seconds per GB of the queue's buffers that freeing them takes (about 0.1 s per GB measured on
#: a loaded two-core machine; twice that): the rounds stop that much before the search's end, so
#: that a search returning at its deadline with a full queue still answers on time
RELEASE_S_PER_GB = 0.2


def _filtered_smart_branch(graph: BoundGraph, inputs: InputSet, rs: RowSpec, db: "DomainBounds", splits: dict[str, Tensor],
                           choice: tuple[list[str | None], Tensor, Tensor], domains: Tensor, candidates: int,
                           deadline: float, scores: dict[str, Tensor] | None = None,
                           fast: BoundGraph | None = None, clock: "TrialClock | None" = None) -> tuple[list[str | None], Tensor, Tensor]:
    """Filtered smart branching (De Palma et al. 2021, "Improved branch and bound for neural
    network verification via Lagrangian decomposition", Sec. 5): for each of ``domains`` whose
    choice is a ReLU, the ``candidates`` unsplit ReLUs with the largest BaBSR scores are tried,
    each child of each candidate bounded by one CROWN pass on the domain's boxes with its
    parent's last slopes and multipliers (no optimisation; one batch of ``2 * candidates`` per
    domain); the candidate whose worse child has the larger margin is taken. Infeasible children
    count as proved. Returns ``choice`` with those domains' ReLU choices replaced. ``scores``:
    :func:`relu_scores` of ``db`` when the caller has them (as :func:`_branch` did). ``fast``:
    the network in float32, on which the trial bounds are computed without round-off allowance
    (they only rank the candidates: no bound of theirs is kept). ``clock``: a pass of trials that
    would end past the deadline at its measured pace is not started (a pass does not stop inside)."""
    node, idx, tsplit = choice
    sel = [d for d in domains.tolist() if node[d] is not None and node[d] in splits]
    per_pass = max(1, FSB_CHILDREN_PER_PASS // (2 * max(1, candidates)))
    if scores is None:
        scores = relu_scores(graph, db, splits, rs)
    if len(sel) > per_pass:  # the children of one pass stay as many as a round's
        for start in range(0, len(sel), per_pass):
            choice = _filtered_smart_branch(graph, inputs, rs, db, splits, choice, torch.tensor(sel[start:start + per_pass], device=graph.device),
                                            candidates, deadline, scores, fast, clock)
        return choice
    if not sel or not scores or candidates < 2 or time.perf_counter() >= deadline:
        return choice
    names = list(scores)
    flat = torch.cat([scores[p] for p in names], dim=1)[sel]  # [S, sum n]
    offsets = torch.tensor([0] + [scores[p].shape[1] for p in names], device=flat.device).cumsum(0)
    k = min(candidates, flat.shape[1])
    top_s, top_i = flat.topk(k, dim=1)  # [S, k]
    S = len(sel)
    rep = torch.tensor(sel, device=graph.device).repeat_interleave(2 * k)  # child j of domain s at s * 2k + j
    child_splits = {p: splits[p][rep].clone() for p in splits}
    which = torch.searchsorted(offsets, top_i, right=True) - 1  # [S, k]: candidate's node in names
    neuron = top_i - offsets[which]  # [S, k]: its neuron there
    row = torch.arange(S * k, device=flat.device).view(S, k) // k * 2 * k + 2 * torch.arange(k, device=flat.device)  # first child
    for n_, p in enumerate(names):
        at = which == n_
        if bool(at.any()):
            dev = child_splits[p].device
            r_, i_ = row[at].to(dev), neuron[at].to(dev)
            child_splits[p][r_, i_] = 1
            child_splits[p][r_ + 1, i_] = -1
    trial = graph if fast is None else fast
    dt = trial.dtype
    boxes = {p: (l[rep].to(dt), h[rep].to(dt)) for p, (l, h) in db.boxes.items()}
    alphas0 = {r: a[rep] for r, a in db.alphas.items()}
    betas0 = {p: b[rep] for p, b in db.betas.items()}
    ivals = None
    inodes = [q for _, q in interval_inputs(graph)]
    if inodes:  # the domains' interval splits are already in their boxes
        ivals = {q: (boxes[q][0].reshape(len(rep), -1), boxes[q][1].reshape(len(rep), -1)) for q in inodes}
    if clock is not None and not clock.fits(len(rep), deadline):
        return choice
    t = time.perf_counter()
    parents = ParentBoxes.repeated(db.boxes, sel, 2 * k, splits)  # what the splits leave alone: relaxed once per domain
    try:
        with torch.no_grad():
            kids = bound_domains(trial, inputs.to(dtype=dt), rs, boxes, child_splits, alphas0=alphas0, betas0=betas0, steps=0,
                                 deadline=deadline, recompute=False, ivals=ivals, rigorous=False, hard=True, parents=parents)
    except DeadlineExpired:  # still running at the deadline: BaBSR's choice stays
        kids = None
    if clock is not None:  # (an abandoned pass: at least this pace)
        clock.record(len(rep), time.perf_counter() - t)
    if kids is None or time.perf_counter() >= deadline:
        return choice
    m = rs.margin(kids.rows).double()
    m = torch.where(kids.infeasible, torch.full_like(m, math.inf), m).reshape(S, k, 2)
    worse = m.min(2).values.masked_fill(top_s <= 0, -math.inf)  # [S, k]; only real candidates
    best = worse.argmax(1)
    node, idx = list(node), idx.clone()
    real = (worse.gather(1, best.unsqueeze(1)).squeeze(1) > -math.inf).tolist()  # else (vacuous bounds) BaBSR's choice stays
    best_node = which.gather(1, best.unsqueeze(1)).squeeze(1).tolist()
    best_neuron = neuron.gather(1, best.unsqueeze(1)).squeeze(1).tolist()
    for a, d in enumerate(sel):
        if real[a]:
            node[d], idx[d] = names[best_node[a]], best_neuron[a]
    return node, idx, tsplit


@dataclass
class TrialClock:
    """The measured pace of smart-branching trial passes: seconds per child of the last pass
    (first: the root domain's pass alone, an upper bound of a child's share in a batch)."""

    per_child: float = 0.0

    def fits(self, children: int, deadline: float) -> bool:
        """Whether a pass of ``children`` at this pace ends before ``deadline``."""
        return time.perf_counter() + children * self.per_child < deadline

    def record(self, children: int, seconds: float) -> None:
        self.per_child = seconds / max(1, children)


class _Candidates:
    """Confirms candidate counterexamples: evaluates points ``xs [M, *input_shape]`` on the graph
    and passes the ``tries`` most violating ones to ``check_point``; counts what it checked."""

    def __init__(self, graph: BoundGraph, rs: RowSpec, check_point, tries: int = 4) -> None:
        self.graph, self.rs, self.check_point, self.tries = graph, rs, check_point, tries
        self.checked = 0

    def __call__(self, xs: Tensor) -> Tensor | None:
        """The first confirmed point ``[n_in]`` (float64), or None."""
        if self.check_point is None or xs.shape[0] == 0:
            return None
        g, rs = self.graph, self.rs
        with torch.no_grad():
            y = g.forward(xs.reshape(-1, *g.input_shape).to(g.dtype)).reshape(xs.shape[0], -1)
            ms = rs.margin(y.double() @ rs.C.T.double() + rs.d.double())
        for i in torch.argsort(ms)[: self.tries].tolist():
            if float(ms[i]) > 0:
                break
            self.checked += 1
            x = xs[i].reshape(-1).double()
            if self.check_point(x):
                return x
        return None


def _corners(graph: BoundGraph, inputs: InputSet, db: "DomainBounds") -> Tensor:
    """Minimisers of the domains' linear bounds over the input box, ``[N * D, *input_shape]``:
    candidate counterexamples (corners of the box)."""
    A = db.record.get(graph.input_name)
    lo, hi = inputs.bounds()
    if A is None:
        return lo.reshape(1, *graph.input_shape)
    A = A.reshape(A.shape[0] * A.shape[1], -1)
    lo, hi = lo.reshape(1, -1).to(A.dtype), hi.reshape(1, -1).to(A.dtype)
    if isinstance(inputs, LpBall) and not math.isinf(inputs.p):  # the ball's minimiser, in the domain
        c = inputs.center.reshape(1, -1).to(A.dtype)
        eps = float(inputs.eps.reshape(-1)[0])
        if inputs.p == 2.0:
            x = c - eps * A / A.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            i = A.abs().argmax(1)
            x = c.expand_as(A).clone()
            rows = torch.arange(A.shape[0], device=A.device)
            x[rows, i] -= eps * A[rows, i].sign()
        return torch.minimum(torch.maximum(x, lo), hi).reshape(-1, *graph.input_shape)
    return torch.where(A > 0, lo, hi).reshape(-1, *graph.input_shape)


class _Buffers:
    """Tensors (first dimension: entry) in buffers that double when full: :meth:`take` removes
    entries by moving the last ones into their places and :meth:`add` appends, so a round costs
    O(entries moved), not O(queue) (a queue of 10^5 domains is otherwise copied every round)."""

    def __init__(self, fields: dict[str, Tensor], max_n: int | None = None) -> None:
        self.n = next(iter(fields.values())).shape[0]
        self.max_n = max_n  # the buffers never grow beyond this many entries
        self.buf = {k: v.clone() for k, v in fields.items()}

    def get(self, key: str) -> Tensor:
        return self.buf[key][: self.n]

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (their capacity)."""
        return sum(v.numel() * v.element_size() for v in self.buf.values())

    def take(self, idx: Tensor) -> dict[str, Tensor]:
        """The entries ``idx`` (distinct), removed."""
        out = {k: v[idx] for k, v in self.buf.items()}
        k, n = idx.numel(), self.n
        gone = torch.zeros(n, dtype=torch.bool, device=idx.device)
        gone[idx] = True
        holes = idx[idx < n - k]
        movers = (n - k) + (~gone[n - k:]).nonzero().flatten()
        for v in self.buf.values():
            v[holes] = v[movers]
        self.n = n - k
        return out

    def add(self, fields: dict[str, Tensor]) -> None:
        m = next(iter(fields.values())).shape[0]
        if self.n + m > next(iter(self.buf.values())).shape[0]:
            cap = max(2 * (self.n + m), 64)
            if self.max_n is not None:
                cap = max(self.n + m, min(cap, self.max_n))
            self.buf = {k: _grown(v, self.n, cap) for k, v in self.buf.items()}
        for k, v in fields.items():
            self.buf[k][self.n: self.n + m] = v
        self.n += m


def _grown(v: Tensor, n: int, cap: int) -> Tensor:
    """A buffer of ``cap`` entries holding ``v[:n]`` first; only those are copied (the rest stays
    unwritten, so its pages are not touched until used)."""
    out = v.new_empty((cap, *v.shape[1:]))
    out[:n] = v[:n]
    return out


class _DomainStore:
    """The open domains, in two tiers. A *full* entry keeps all of a domain's fields (its splits,
    slopes, multipliers, boxes, bounds); past ``full_max`` entries, the full entries closest to
    proved (largest ``low``) are *demoted*: only the fields ``light`` are kept, those in
    ``fractions`` (slopes, in ``[0, 1]``) as uint8 (``round(255 v)``), those in ``lower_ends`` /
    ``upper_ends`` (interval splits' ends) as float32 rounded outwards, and :meth:`take` gives a
    demoted domain the ``template``'s other fields (the root's multipliers, 0, and boxes: sound for
    every domain, whose splits are applied to the boxes when it is bounded; any slope in ``[0, 1]``
    is sound). So a search whose queue outgrows the memory cap goes on with looser starting points
    for the domains it would split last, instead of stopping.

    Entries are indexed full first, then demoted (:meth:`get`, :meth:`take`); :attr:`load` is
    the memory held, in full entries."""

    def __init__(self, fields: dict[str, Tensor], max_n: int | None = None, light: Iterable[str] | None = None,
                 full_max: int | None = None, light_ratio: float = 0.0, fractions: Iterable[str] = (),
                 lower_ends: Iterable[str] = (), upper_ends: Iterable[str] = ()) -> None:
        self.full = _Buffers(fields, max_n)
        self.light = [k for k in fields if light is not None and k in set(light)]
        self.fractions = set(fractions) & set(self.light)  # fields in [0, 1], kept as uint8 when demoted
        # float64 interval ends, kept as float32 rounded outwards (the domain can only grow: sound)
        self.ends = {k: True for k in lower_ends if k in self.light} | {k: False for k in upper_ends if k in self.light}
        self.template = {k: v[:1].clone() for k, v in fields.items() if k not in self.light}
        self.full_max = full_max if light is not None else None
        self.light_ratio = light_ratio  # a demoted entry's bytes / a full entry's
        self.demoted: _Buffers | None = None
        self.demotions = 0  # entries demoted so far

    @property
    def n(self) -> int:
        return self.full.n + (self.demoted.n if self.demoted is not None else 0)

    @property
    def load(self) -> float:
        return self.full.n + (self.light_ratio * self.demoted.n if self.demoted is not None else 0.0)

    @property
    def nbytes(self) -> int:
        """Bytes the two tiers' buffers hold."""
        return self.full.nbytes + (self.demoted.nbytes if self.demoted is not None else 0)

    def get(self, key: str) -> Tensor:
        if self.demoted is None or not self.demoted.n:
            return self.full.get(key)
        return torch.cat([self.full.get(key), self.demoted.get(key)])

    def take(self, idx: Tensor) -> dict[str, Tensor]:
        """The entries ``idx`` (distinct), removed; demoted ones with the template's fields. The
        field ``"restored"`` (bool) marks those."""
        nf = self.full.n
        out = self.full.take(idx[idx < nf])
        out["restored"] = torch.zeros(next(iter(out.values())).shape[0], dtype=torch.bool, device=idx.device)
        if self.demoted is None or not bool((idx >= nf).any()):
            return out
        back = self.demoted.take(idx[idx >= nf] - nf)
        for k in self.fractions:
            back[k] = back[k].to(out[k].dtype) / 255
        for k in self.ends:
            back[k] = back[k].to(out[k].dtype)
        m = next(iter(back.values())).shape[0]
        back.update({k: v.expand(m, *v.shape[1:]) for k, v in self.template.items()})
        back["restored"] = torch.ones(m, dtype=torch.bool, device=idx.device)
        return {k: torch.cat([v, back[k]]) for k, v in out.items()}

    def add(self, fields: dict[str, Tensor]) -> None:
        self.full.add(fields)
        over = self.full.n - self.full_max if self.full_max is not None else 0
        if over > 0:  # the full entries closest to proved keep their light fields only
            gone = self.full.take(torch.topk(self.full.get("low"), over).indices)
            kept = {k: (gone[k].clamp(0, 1) * 255).round().to(torch.uint8) if k in self.fractions
                    else round_outward(gone[k], torch.float32, down=self.ends[k]) if k in self.ends else gone[k] for k in self.light}
            if self.demoted is None:
                self.demoted = _Buffers(kept)
            else:
                self.demoted.add(kept)
            self.demotions += over


class _ReluSearch:
    """The state of one :func:`graph_relu_bab` run: the split nodes, the deadline, the domains
    bounded, the worst fully split domain left open, and the result's bookkeeping.

    A domain's next split is a node ``names[k]`` (ReLU inputs first, then interval-split
    inputs; ``k = -1``: none, a leaf), a neuron and, for an interval split, the split point."""

    def __init__(self, graph: BoundGraph, inputs: InputSet, rs: RowSpec, root: dict[str, tuple[Tensor, Tensor]], *,
                 timeout: float, steps: int, margin: float, check_point, fast: BoundGraph | None, candidates: int) -> None:
        self.t0 = time.perf_counter()
        self.end = self.deadline = self.t0 + timeout  # the search's rounds stop by ``deadline`` (:meth:`SearchRun.step`)
        self.graph, self.inputs, self.rs, self.root = graph, inputs, rs, root
        self.steps, self.margin, self.check_point, self.fast, self.candidates = steps, margin, check_point, fast, candidates
        self.nodes = [p for _, p in relu_inputs(graph)]
        self.inodes = [p for _, p in interval_inputs(graph)]
        self.names = self.nodes + self.inodes
        self.sizes = {p: math.prod(graph.shape(p)) for p in self.names}
        self.order = graph.preactivations()  # topological
        self.position = {p: i for i, p in enumerate(self.order)}
        self.box_nodes = [p for p in self.order if p in root and p != graph.input_name]  # boxes kept per domain
        self.N = rs.C.shape[0]
        self.falsify = _Candidates(graph, rs, check_point)
        self.bounded = 0
        self.worst_leaf = math.inf  # the smallest margin of a fully split domain left open
        self.queue_peak = 1  # the most open domains held at once (the root)
        self.demoted = 0  # domains whose slopes, multipliers and boxes the store dropped (:class:`_DomainStore`)
        self.exact_per_domain = 0.0  # the last round's exact pass (:attr:`DomainBounds.exact_s`) per domain
        self.alpha_names: list[str] = []  # the slopes' nodes of the last bounding (the store's "a:" fields)
        self.trials = TrialClock()  # seconds per child of a smart-branching trial pass
        self.root_pass_s: float | None = None  # the root domain's pass (:meth:`start`)
        self.tail_s = 0.0  # the last round's seconds after its bounding (candidates, branching choices, queue)

    def first_round_s(self) -> float:
        """The first round's expected seconds: the root's two children, each at least a pass like
        the root's (or a smart-branching trial child's)."""
        return 2 * self.trials.per_child

    def result(self, status: str, reason: str, lower: float, x: Tensor | None = None) -> BabResult:
        details: dict[str, float] = {"candidates_checked": self.falsify.checked, "queue_peak": self.queue_peak}
        if self.demoted:
            details["demoted"] = self.demoted
        if self.root_pass_s is not None:
            details["root_pass_s"] = round(self.root_pass_s, 4)
        return BabResult(status, x, lower, self.bounded, time.perf_counter() - self.t0, reason, details)

    def store_limits(self, max_memory_mb: float, batch_size: int) -> tuple[int, int]:
        """``(max_domains, batch_size)``: the open domains that fit in ``max_memory_mb`` and the
        domains per round (a round's children fit beside the queue)."""
        # the store's buffers double when full (twice the bytes at worst)
        max_domains = max(int(max_memory_mb * 2**20 / (2 * self.domain_bytes())), 4)
        return max_domains, max(1, min(batch_size, max_domains // 4))

    def domain_bytes(self, light: bool = False) -> int:
        """Bytes of one domain in the store: int8 splits, float32 alphas and betas per ReLU
        input; float64 boxes and float32 slope pairs per interval-split input; float32 boxes of
        every pre-activation; ``light``: a demoted domain's (the splits, float32 interval ends, uint8
        alphas, bounds)."""
        sizes, N = self.sizes, self.N
        relus, ivals = sum(sizes[p] for p in self.nodes), sum(sizes[p] for p in self.inodes)
        if light:  # uint8 alphas (2 per interval-split input), float32 interval ends
            return relus * (1 + N) + ivals * (8 + 2 * N) + 8 * N + 64
        return (relus * (1 + 8 * N) + ivals * (16 + 8 * N)
                + sum(8 * math.prod(self.graph.shape(p)) for p in self.box_nodes) + 64)

    def code(self, ns: list[str | None]) -> Tensor:
        """``[D]``: the index in ``names`` of each domain's next split node (-1: none)."""
        return torch.tensor([-1 if n is None else self.names.index(n) for n in ns], dtype=torch.long, device=self.graph.device)

    def entries(self, splits: dict[str, Tensor], ivals: dict[str, tuple[Tensor, Tensor]], alphas: dict[str, Tensor],
                betas: dict[str, Tensor], boxes: dict[str, tuple[Tensor, Tensor]], low: Tensor, rows: Tensor,
                choice: tuple[list[str | None], Tensor, Tensor]) -> dict[str, Tensor]:
        """The store's fields of some domains (first dimension: domain): splits, interval splits,
        slopes, multipliers (every ReLU input), pre-activation boxes (float32, rounded outwards),
        margin ``low``, ``rows`` bounds and next split."""
        node, idx, t = choice
        kept = {p: (round_outward(boxes[p][0], torch.float32, down=True), round_outward(boxes[p][1], torch.float32, down=False))
                for p in self.box_nodes}
        return {**{f"s:{p}": splits[p] for p in self.nodes}, **{f"l:{p}": ivals[p][0] for p in self.inodes},
                **{f"bl:{p}": lh[0] for p, lh in kept.items()}, **{f"bh:{p}": lh[1] for p, lh in kept.items()},
                **{f"h:{p}": ivals[p][1] for p in self.inodes}, **{f"a:{r}": a for r, a in alphas.items()},
                **{f"b:{p}": betas[p] for p in self.nodes}, "low": low, "rows": rows, "node": self.code(node), "idx": idx, "t": t}

    def choose(self, db: "DomainBounds", splits: dict[str, Tensor], domains: Tensor) -> tuple[list[str | None], Tensor, Tensor]:
        """Each domain's next split (:func:`_branch`), by filtered smart branching for ``domains``."""
        scores = relu_scores(self.graph, db, splits, self.rs)
        choice = _branch(self.graph, db, splits, self.rs, scores)
        if self.candidates > 1:
            choice = _filtered_smart_branch(self.graph, self.inputs, self.rs, db, splits, choice, domains, self.candidates,
                                            self.deadline, scores, self.fast, self.trials)
        return choice

    def settle_leaf(self, sp: dict[str, Tensor], dbs: "DomainBounds", j: int) -> tuple[str, Tensor | None]:
        """Domain ``j`` with every ReLU fixed: "proved" by its exact multipliers, "falsified"
        (with the point), or "open" (other ops, or no solution in time)."""
        graph, inputs, rs = self.graph, self.inputs, self.rs
        one = {p: v[j] for p, v in sp.items()}
        one_boxes = {p: (l[j:j + 1], h[j:j + 1]) for p, (l, h) in dbs.boxes.items()}
        lp = (leaf_multipliers(graph, inputs, rs, one, one_boxes, deadline=self.deadline)
              if time.perf_counter() < self.deadline and not self.inodes else None)
        if lp is None:
            return "open", None
        for xc in lp[1]:
            if self.check_point is not None and self.check_point(xc):
                return "falsified", xc
        if float(rs.margin(leaf_bound(graph, inputs, rs, one, one_boxes, lp[0]))) > self.margin:
            return "proved", None
        return "open", None

    def start(self, root_alphas: dict[str, Tensor] | None, max_domains: int, batch_size: int) -> BabResult | _DomainStore:
        """Bound the root domain: its result when that decides, else the store with it."""
        sizes, N = self.sizes, self.N
        dev = self.graph.device
        splits = {p: torch.zeros(1, sizes[p], dtype=torch.int8, device=dev) for p in self.nodes}
        ivals = {p: (torch.full((1, sizes[p]), -math.inf, dtype=torch.float64, device=dev),
                     torch.full((1, sizes[p]), math.inf, dtype=torch.float64, device=dev))
                 for p in self.inodes}
        alphas0 = None if root_alphas is None else {r: a.reshape(a.shape[0], 1, -1).transpose(0, 1).float() for r, a in root_alphas.items()}
        t = time.perf_counter()
        try:  # a root pass past the deadline is abandoned (the caller has the root's bound)
            db = bound_domains(self.graph, self.inputs, self.rs, self.root, splits, alphas0=alphas0, steps=0, deadline=self.deadline,
                               recompute=False, ivals=ivals, hard=True)
        except DeadlineExpired:
            self.root_pass_s = time.perf_counter() - t  # at least this long
            return self.result("unknown", "timeout", -math.inf)
        self.root_pass_s = time.perf_counter() - t
        t_tail = time.perf_counter()  # the root's candidates and first choice: the first round's tail until it has its own
        self.trials.record(1, self.root_pass_s)  # a trial child's pass is the same kind (in a batch: cheaper each)
        self.bounded = 1
        self.alpha_names = list(db.alphas)
        m = self.rs.margin(db.rows)
        if bool(db.infeasible[0]) or bool(m[0] > self.margin):
            return self.result("certified", "proved", float(m[0]))
        x = self.falsify(_corners(self.graph, self.inputs, db))
        if x is not None:
            return self.result("falsified", "counterexample", -math.inf, x)
        if time.perf_counter() + self.first_round_s() >= self.deadline:  # the search would stop before its first round
            return self.result("unknown", "timeout", float(m[0]))
        choice = self.choose(db, splits, torch.zeros(1, dtype=torch.long, device=dev))
        if choice[0][0] is None:  # nothing to split at the root
            status, x = self.settle_leaf(splits, db, 0)
            if status == "falsified":
                return self.result("falsified", "counterexample", -math.inf, x)
            return self.result("certified", "proved", self.margin) if status == "proved" else self.result("unknown", "exhausted", float(m[0]))
        fields = self.entries(splits, ivals, db.alphas, {p: torch.zeros(1, N, sizes[p], device=dev) for p in self.nodes}, db.boxes,
                              m, db.rows, choice)
        light = [k for k in fields if k[:2] in ("s:", "l:", "h:", "a:") or k in ("low", "rows", "node", "idx", "t")]
        self.tail_s = time.perf_counter() - t_tail
        return _DomainStore(fields, max_n=max_domains + 2 * batch_size, light=light, full_max=int(FULL_ENTRY_SHARE * max_domains),
                            light_ratio=self.domain_bytes(light=True) / self.domain_bytes(), fractions=[k for k in light if k[:2] == "a:"],
                            lower_ends=[f"l:{p}" for p in self.inodes], upper_ends=[f"h:{p}" for p in self.inodes])

    def children(self, par: dict[str, Tensor], k: int) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]], dict[str, Tensor],
                                                               dict[str, Tensor], dict[str, tuple[Tensor, Tensor]], list[str]]:
        """The ``2k`` children of the ``k`` domains ``par`` (the store's fields): every domain
        twice, its chosen ReLU set to +1 / -1 or its chosen interval halved (first copies: the
        lower half), with their parent's slopes, multipliers and boxes. Returns the splits,
        interval splits, slopes, multipliers, boxes (``[2k, ...]``; the input's: the root's) and
        the pre-activations up to the earliest new split (their boxes cannot change)."""
        child = {p: par[f"s:{p}"].repeat(2, 1) for p in self.nodes}
        c_ivals = {p: (par[f"l:{p}"].repeat(2, 1), par[f"h:{p}"].repeat(2, 1)) for p in self.inodes}
        for j, (kn, i) in enumerate(zip(par["node"].tolist(), par["idx"].tolist())):
            p = self.names[kn]
            if p in child:  # ReLU: the two signs
                child[p][j, i] = 1
                child[p][j + k, i] = -1
            else:  # another op's input: the two halves of its interval
                t = float(par["t"][j])
                c_ivals[p][1][j, i] = t
                c_ivals[p][0][j + k, i] = t
        c_alphas = {r: par[f"a:{r}"].repeat(2, 1, 1) for r in self.alpha_names}
        c_betas = {p: par[f"b:{p}"].repeat(2, 1, 1) for p in self.nodes}
        dt = self.graph.dtype
        c_boxes = {p: (torch.cat([par[f"bl:{p}"]] * 2).to(dt), torch.cat([par[f"bh:{p}"]] * 2).to(dt)) if p in self.box_nodes
                   else self.root[p] for p in self.root}
        # a restored domain has the root's boxes: recomputed from the first node on
        first = 0 if bool(par["restored"].any()) else min(self.position[self.names[kn]] for kn in par["node"].tolist())
        return child, c_ivals, c_alphas, c_betas, c_boxes, self.order[: first + 1]

    def parents(self, par: dict[str, Tensor], k: int, c_boxes: dict[str, tuple[Tensor, Tensor]]) -> ParentBoxes:
        """The boxes of the ``k`` domains ``par`` as their children (:meth:`children`: child ``j``
        and ``j + k`` of domain ``j``, boxes ``c_boxes``) have them where this round's splits do not
        reach: within the domains' interval splits; changed are the ReLU inputs and the nodes
        split by halving in this round."""
        raw = {p: (l[:k], h[:k]) if p in self.box_nodes else (l.expand(k, *l.shape[1:]), h.expand(k, *h.shape[1:]))
               for p, (l, h) in c_boxes.items()}
        ivals = {p: (par[f"l:{p}"], par[f"h:{p}"]) for p in self.inodes}
        boxes = _split_boxes(raw, {}, {p: self.graph.shape(p) for p in raw}, ivals)
        changed = frozenset(self.nodes) | {self.names[kn] for kn in par["node"].tolist()}
        return ParentBoxes(boxes, torch.arange(k, device=self.graph.device).repeat(2), changed)

    def round(self, q: _DomainStore, k: int, recompute: bool, nearest: bool = False) -> BabResult | tuple[float, float]:
        """One round: the ``k`` worst domains of ``q`` are split (``nearest``: the ``k`` closest
        to proved, whose children are the likeliest to be proved, so that the queue shrinks),
        their children bounded; the children's leaves settled, the open ones back into ``q``.
        Returns the result when the round decides the search, else the round's seconds (from
        the bounding on) and the seconds of the boxes' recomputation."""
        graph, rs, N = self.graph, self.rs, self.N
        par = q.take(torch.topk(q.get("low") if nearest else -q.get("low"), k).indices)
        child, c_ivals, c_alphas, c_betas, c_boxes, settled = self.children(par, k)
        t_round = time.perf_counter()

        # past the deadline (its bounds may be vacuous, or the rest of the round would end after it):
        # unknown with the parents' bounds (a child lies in its parent)
        def timeout() -> BabResult:
            low = min(float(par["low"].min()), float(q.get("low").min()) if q.n else math.inf, self.worst_leaf)
            return self.result("unknown", "timeout", low)

        parents = None if recompute else self.parents(par, k, c_boxes)
        try:
            db = bound_domains(graph, self.inputs, rs, c_boxes, child, alphas0=c_alphas, betas0=c_betas, steps=self.steps,
                               deadline=self.deadline, recompute=recompute, ivals=c_ivals, fast=self.fast, settled=settled,
                               exact_s=self.exact_per_domain * 2 * k, hard=True, parents=parents)
        except DeadlineExpired:  # a pass still running at the deadline: abandoned
            return timeout()
        if db.exact_s:  # per domain: the rounds' batches grow
            self.exact_per_domain = db.exact_s / (2 * k)
        self.bounded += 2 * k
        t_tail = time.perf_counter()  # from here the round does not stop at the deadline: its seconds are kept
        if time.perf_counter() >= self.deadline:
            return timeout()
        x = self.falsify(_corners(graph, self.inputs, db))
        if x is not None:
            return self.result("falsified", "counterexample", -math.inf, x)
        if time.perf_counter() >= self.deadline:
            return timeout()
        db.rows = torch.maximum(db.rows, par["rows"].repeat(2, 1))  # a child lies in its parent: the parent's bounds hold
        m = rs.margin(db.rows)
        open_ = ~db.infeasible & ~(m > self.margin)
        cnode, cidx, ct = self.choose(db, child, open_.nonzero().flatten())
        leaf = torch.tensor([n is None for n in cnode], device=open_.device) & open_
        for j in leaf.nonzero().flatten().tolist():
            status, x = self.settle_leaf(child, db, j)
            if status == "falsified":
                return self.result("falsified", "counterexample", -math.inf, x)
            if status == "open":  # an undefined (NaN) margin proves nothing: -inf
                v = float(m[j])
                self.worst_leaf = min(self.worst_leaf, v if v == v else -math.inf)
        open_ &= ~leaf
        sel = open_.nonzero().flatten()
        if sel.numel():
            betas = {p: (db.betas[p][sel] if p in db.betas else torch.zeros(sel.numel(), N, self.sizes[p], device=sel.device)) for p in self.nodes}
            q.add(self.entries({p: child[p][sel] for p in self.nodes}, {p: (lo[sel], hi[sel]) for p, (lo, hi) in c_ivals.items()},
                               {r: a[sel] for r, a in db.alphas.items()}, betas,
                               {p: (lo[sel], hi[sel]) for p, (lo, hi) in db.boxes.items()}, m[sel], db.rows[sel],
                               ([cnode[i] for i in sel.tolist()], cidx[sel], ct[sel])))
            self.queue_peak = max(self.queue_peak, q.n)
        self.alpha_names = list(db.alphas)
        self.tail_s = time.perf_counter() - t_tail
        return time.perf_counter() - t_round, db.boxes_s


def smaller_round(k: int, left: float, last_round: float, last_k: int) -> int:
    """Domains of a round that must fit in ``left`` seconds when the last round (``last_k``
    domains) took ``last_round``: as many as fill :data:`LAST_ROUND_MARGIN` of ``left`` at its pace
    per domain, at most ``k`` (0: not even one)."""
    return min(k, int(LAST_ROUND_MARGIN * last_k * left / last_round))


def graph_relu_bab(
    graph: BoundGraph,
    inputs: InputSet,
    rs: RowSpec,
    root: dict[str, tuple[Tensor, Tensor]],
    *,
    timeout: float,
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
    """ReLU-split BaB from the root boxes ``root`` (``[1, *shape]``) and slopes ``root_alphas``
    (``{relu node: [N, 1, *shape]}``, alpha-CROWN's for the spec rows; optional).

    ``certified`` when every domain's bound exceeds ``margin`` or is infeasible; ``falsified``
    when a candidate (corners of the domains' linear bounds, LP minimisers of fully split
    domains) passes ``check_point(x [n_in]) -> bool``; otherwise ``unknown`` at the deadline
    (``reason="timeout"``), when the queue would exceed ``max_memory_mb`` (``"memory"``) or when
    only fully split domains remain unproved (``"exhausted"``). Children inherit their parent's
    slopes and multipliers (the new split's multiplier starts at 0). ``fast``: the network in
    float32 for the optimisation steps (:func:`bound_domains`). ``candidates``: ReLUs tried per
    domain by filtered smart branching (:func:`_filtered_smart_branch`; 1: the BaBSR score alone).
    ``box_pass_s``: seconds of one CROWN pass through the whole network (the pipeline's first),
    the cost of recomputing one domain's boxes (:data:`RECOMPUTE_ROUND_SHARE`).
    """
    s = _ReluSearch(graph, inputs, rs, root, timeout=timeout, steps=steps, margin=margin, check_point=check_point, fast=fast,
                    candidates=candidates)
    if not s.names:
        return BabResult("unknown", None, -math.inf, 0, reason="nothing to split")
    run = SearchRun(s, max_memory_mb, batch_size, box_pass_s)
    done = run.begin(root_alphas)
    while done is None:
        done = run.step()
    return done


class SearchRun:
    """One activation-split search that advances a round at a time (:meth:`step`), so that
    several can share one deadline and one memory cap (:mod:`relax.bab.group_split`).

    Rounds start with one domain and double up to ``batch_size`` while they take under 2 % of
    the budget; the per-domain recomputation of the boxes is dropped once a round takes over
    :data:`RECOMPUTE_ROUND_SHARE` of the budget or the recomputation over half a round."""

    def __init__(self, s: "_ReluSearch", max_memory_mb: float, batch_size: int, box_pass_s: float | None) -> None:
        self.s = s
        self.max_domains, self.batch_size = s.store_limits(max_memory_mb, batch_size)
        self.timeout = s.deadline - s.t0
        self.last_round = s.first_round_s()  # a round starts only if one as long as the last still fits
        # per-domain CROWN boxes, while they cost less than the rest of a round
        self.recompute = box_pass_s is None or 2 * box_pass_s <= RECOMPUTE_ROUND_SHARE * self.timeout
        self.cap, self.last_k = 1, 1  # domains per round (doubled up to batch_size while rounds stay short); the last round's
        self.q: _DomainStore | None = None

    def begin(self, root_alphas: dict[str, Tensor] | None) -> BabResult | None:
        """Bound the root: its result when that decides, else None (the search goes on)."""
        q = self.s.start(root_alphas, self.max_domains, self.batch_size)
        if isinstance(q, BabResult):
            return q
        self.q = q
        self.last_round = self.s.first_round_s()
        return None

    def lowest(self) -> float:
        """The smallest bound of an open domain (or fully split one left open)."""
        assert self.q is not None
        return min(float(self.q.get("low").min()) if self.q.n else math.inf, self.s.worst_leaf)

    def step(self) -> BabResult | None:
        """One round (best-first; near the memory cap the domains closest to proved first, whose
        children mostly close, so that the queue shrinks). The result when the search ends."""
        s, q, timeout = self.s, self.q, self.timeout
        assert q is not None
        # a round's bounding stops at ``s.deadline``; what follows it, and freeing the queue when the search returns, take time too
        s.deadline = s.end - 2 * s.tail_s - RELEASE_S_PER_GB * q.nbytes / 2**30
        s.demoted = q.demotions
        q.full_max = int(FULL_ENTRY_SHARE * self.max_domains)  # the cap shrinks while other groups' searches hold more
        if q.n == 0:
            # proved only when no fully split domain was left open (an open one of margin -inf too)
            return s.result("unknown", "exhausted", s.worst_leaf) if s.worst_leaf < math.inf else s.result("certified", "proved", s.margin)
        k = min(self.cap, q.n, int(self.max_domains - q.load))  # a round of k domains adds at most k full entries
        left = s.deadline - time.perf_counter()
        if self.last_round >= left:  # a round as long as the last does not fit: a smaller one, if one fits
            k = smaller_round(k, left, self.last_round, self.last_k)
            if k < 1:
                return s.result("unknown", "timeout", self.lowest())
        if k < 1:
            return s.result("unknown", "memory", self.lowest())
        done = s.round(q, k, self.recompute, nearest=q.load + 2 * k > FULL_QUEUE * self.max_domains)
        if isinstance(done, BabResult):
            return done
        (self.last_round, boxes_s), self.last_k = done, k
        if self.recompute and (self.last_round > RECOMPUTE_ROUND_SHARE * timeout or boxes_s > 0.5 * self.last_round):
            self.recompute = False  # large networks: more domains with the root's boxes pay better
        elif self.last_round < 0.02 * timeout:
            self.cap = min(self.batch_size, 2 * self.cap)
        return None
