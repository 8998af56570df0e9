"""Registered method ``bab``: complete verification (attack, incomplete bounds, branch-and-bound)
on the bound graph, for every network the graph engine bounds.

Per input of the batch, within the time budget (``timeout`` split evenly over the inputs):

1. falsification by :func:`verify.attack.random_attack` (on the float64 graph);
2. PGD's first restart (the lanes from the set's midpoint; at most 2 % of the budget, 5 s),
   a quick proof by one CROWN pass, then PGD with all restarts (at most 5 % of the budget, 5 s);
   PGD takes its gradients from :func:`verify.surrogate.attack_surrogate` (through ``sign`` and
   a saturated softmax);
3. branch-and-bound: input splitting (:func:`relax.bab.input_split.input_bab` on
   :class:`relax.bab.input_split.GraphBoxes`) for boxes of at most ``input_split_max_dim``
   coordinates; otherwise alpha-CROWN at the root (at most 30 % of the budget), then ReLU
   splitting with beta-CROWN and interval splitting of sigmoid /
   tanh / max-pooling inputs (:func:`relax.bab.activation_split.graph_relu_bab`) on the graph without
   the ReLUs dead at the root (:mod:`relax.ir.prune`); for networks of at least
   ``refine_min_depth`` ReLU layers, after ``refine_after`` of the budget, the root boxes are
   tightened by MILP (:func:`relax.bab.tighten.refine_graph_root`) and the search restarts
   (networks without a dense ReLU view, such as ResNets, branch for the whole time instead);
   for networks with one ReLU layer (exact root boxes), after ``milp_after`` of the search the
   exact MILP (:func:`relax.exact.milp.milp_verify`) takes the rest. The search and the MILP
   bound only the groups of rows that the root leaves open;
4. a search that ends ``exhausted`` (every open domain fully split, unproved) before the
   deadline leaves the time to PGD restarts with new seeds (:func:`attack_until`).

``falsified`` only with a counterexample that a float64 forward pass of the model confirms
(:func:`verify.attack.confirm_counterexample`); ``certified`` only when every BaB domain is
proved with the margin ``margin``; otherwise ``unknown`` with the best margin lower bound in
``details["margin_lower"]``.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from verify.deadline import Deadline, DeadlineExpired
from verify.resources import usable_cores
from verify.options import Options, option
from verify.certificate import Certificate
from verify.registry import FLOAT64_PROOF_MARGIN, CertifyCall, Method, register
from verify.spec import InputSet, LpBall, OutputProperty, SpecError

from relax.bab import BabResult, RowSpec
from relax.ir.graph import BoundGraphModule
from relax.ir.heads import without_log_softmax

__all__ = ["BabMethod", "BabOptions", "run_bab"]

#: the share of the time left that the first PGD restart may take (before the first CROWN pass)
EARLY_PGD_SHARE = 0.02
#: the share of the time left after it within which the first CROWN pass tightens intermediate
#: boxes (the rest keep their interval boxes): a network whose pass needs more than that leaves
#: the later stages, which start with such a pass (alpha-CROWN) or many (the search), no chance
#: either (TinyYOLO: one pass 170 s of a 300 s budget)
FIRST_PASS_SHARE = 0.7
#: a search that ends exhausted with more than this many seconds left hands them to PGD restarts
#: (:func:`attack_until`), which stop this many seconds before the deadline (a PGD step, which
#: the attack's timeout does not interrupt, takes up to about a second on the largest nets here)
LATE_ATTACK_MIN_S = 1.0
LATE_ATTACK_GUARD_S = 1.0
#: largest matrix (numbers) of the dense view that the exact-MILP stage of one-ReLU-layer networks
#: builds (512 MB in float64; a convolution on 28 x 28 inputs with 32 channels needs 18.3 M)
MILP_DENSE_LIMIT = 2**26
#: the share of the time left that alpha-CROWN may take at the root of a ReLU-split search (and
#: again after a MILP refinement of the root's boxes): the search gets the rest
ROOT_ALPHA_SHARE = 0.3
#: the root's alpha-CROWN optimises the intermediate boxes' slopes only if that many CROWN passes
#: (the first pass's time each: its own first pass, then steps of at least a pass) fit its share;
#: else it keeps the first pass's boxes and optimises the spec rows' slopes (TinyYOLO: one pass
#: 170 s of a 300 s budget, which a second pass would repeat)
ROOT_PASSES_MIN = 4
#: rows per group that the activation search keeps (those highest at the root) on networks whose
#: one CROWN pass is expensive (:func:`_search_rows`): a group of five output limits with its
#: averages has 16 rows, and each step of the search bounds every row on every domain
EXPENSIVE_SEARCH_ROWS = 2


@dataclass(frozen=True, kw_only=True)
class BabOptions(Options):
    """Options of :class:`BabMethod` (its docstring explains each)."""

    split: str = option("auto", "what is split: input (boxes of the input), relu (activations), auto (input for "
                        "inputs of at most input_split_max_dim numbers)", choices=("auto", "input", "relu"))
    batch_size: int | None = option(None, "domains bounded per round (none: 512 boxes with input split, 64 domains with relu split)", positive=True)
    input_split_max_dim: int = option(16, "most free input coordinates for which split=auto splits inputs", positive=True)
    attack_steps: int = option(50, "PGD steps before branching")
    attack_restarts: int = option(5, "PGD restarts before branching (the first from the set's midpoint, before the "
                                  "first CROWN pass; the others from random points after it; 0: no PGD)")
    random_samples: int = option(1000, "random-attack samples before PGD (0: none)")
    relu_steps: int = option(10, "alpha / beta optimisation steps per ReLU-split round")
    branch_candidates: int = option(3, "ReLUs whose children are bounded before one is split (filtered smart "
                                    "branching); 1: the BaBSR-style score alone", positive=True)
    margin: float = option(FLOAT64_PROOF_MARGIN, "a domain counts as proved when its margin lower bound exceeds this (the "
                           "bounds are float64 with their round-off accounted for; the default is every bound "
                           "method's float64 safety margin)")
    seed: int = option(0, "seeds the attacks")
    refine_layers: int | None = option(None, "relu split: hidden layers whose root bounds MILP tightens first (none: "
                                       "3 for chains of at least refine_min_depth hidden layers, else 0)")
    refine_min_depth: int = option(4, "hidden layers from which refine_layers=none refines")
    refine_fraction: float = option(0.5, "share of the time left that the refinement may use",
                                    interval=(0.0, 1.0, "closed"))
    refine_solve_time: float = option(1.0, "seconds per MILP of the refinement", positive=True)
    refine_after: float = option(0.1, "share of the time first given to branching without refinement",
                                 interval=(0.0, 1.0, "right-open"))
    refine_workers: int | None = option(None, "MILPs of the refinement solved in parallel (none: one per usable "
                                        "core, at most 4)", positive=True)
    dense_limit: int = option(2**24, "largest matrix (numbers) of the dense view the refinement builds", positive=True)
    milp_after: float = option(0.1, "relu split on networks with one ReLU layer: share of the search time given to "
                               "branching before the exact MILP takes the rest (1: branching only)",
                               interval=(0.0, 1.0, "closed"))
    milp_threads: int | None = option(None, "solver threads of that exact MILP (none: one per usable core, at most 4)",
                                      positive=True)
    narrow_max: int = option(16, "relu split: pre-activation layers of at most this many neurons, after unstable ReLUs "
                             "and loose at the root, get their boxes tightened by input splitting first (0: never)")
    narrow_share: float = option(0.3, "share of the time left that tightening narrow layers may use",
                                 interval=(0.0, 1.0, "closed"))
    narrow_max_inputs: int = option(64, "most free input coordinates for which narrow layers are tightened (their "
                                    "searches split the input)", positive=True)
    groups: str = option("each", "activation split of a property whose open part is an OR of several groups (a "
                         "classifier's other classes, many output limits): each (one search per group, the "
                         "weakest-bounded first; every domain bounds one group) or joint (one search whose domains "
                         "bound every group)", choices=("each", "joint"))
    search_rows: int | None = option(None, "relu split: rows per group of the property that the search bounds, the "
                                     "highest at the root (group averages included); none: all, or 2 where one CROWN "
                                     "pass of the network takes over 2.5 % of the search's time", positive=True)
    queue_memory_mb: float = option(1500.0, "memory cap of the open domains (MB): near it the domains closest to proved "
                                    "are split first; a queue that still reaches it stops the search (unknown)", positive=True)
    entry_proofs: float = option(0.9, "share of the time left after the first CROWN pass that proving the undecided "
                                 "inputs of step functions one entry at a time may use, each on the input entries it "
                                 "depends on (a pixel count of a segmentation head; 0: never)", interval=(0.0, 1.0, "closed"))


@register
class BabMethod(Method):
    """Complete verification by attack + (alpha-)CROWN + branch-and-bound.

    Args:
        split: ``"auto"``, ``"input"`` or ``"relu"``.
        batch_size: domains per BaB round (input split: boxes; ReLU split: domains).
        input_split_max_dim: most free input coordinates (:func:`free_inputs`) for which ``"auto"`` splits inputs.
        attack_steps, attack_restarts: PGD budget before BaB.
        random_samples: random-attack samples before PGD.
        relu_steps: alpha/beta optimisation steps per ReLU-BaB round.
        branch_candidates: ReLUs whose children are bounded before one is split (filtered
            smart branching, De Palma et al. 2021); 1: the BaBSR-style score alone.
        refine_layers: ReLU split only: tighten the root's pre-activation bounds of hidden
            layers ``1..refine_layers`` by MILP before branching (:mod:`relax.bab.tighten`); ``None``
            ("auto"): 3 for chains (no skip connection around a ReLU) with at least
            ``refine_min_depth`` hidden layers, else 0 (off); a number refines ResNets too.
        refine_min_depth: hidden layers from which "auto" refines.
        refine_fraction: share of the time left when refinement starts that it may use.
        refine_solve_time: seconds per MILP of the refinement.
        refine_workers: MILPs of the refinement solved in parallel (threads; the solvers
            release the GIL); ``None``: one per CPU core this process may use, at most 4.
        refine_after: with refinement on, share of the BaB time budget first given to BaB
            without it (instances it decides quickly skip the refinement's cost; 0: refine at
            once); then the root is refined and branching restarts from it.
        dense_limit: largest matrix (numbers) of the dense view that the MILP refinement
            builds; networks with larger affine runs are not refined.
        milp_after: ReLU split on a network whose only nonlinear node is one ReLU layer (every
            ReLU input an affine function of the input, so the root's boxes are exact and the
            MILP with them is the exact problem with the tightest big-M): the share of the
            search time first given to branching; then the exact MILP
            (:func:`relax.exact.milp.milp_verify`, HiGHS / Gurobi branch-and-cut) takes the rest
            (1: never). Its proofs keep the MILP method's margins; its counterexamples are
            confirmed like the search's.
        milp_threads: solver threads of that MILP (``None``: one per CPU core this process may
            use, at most 4; the search is over by then. Gurobi proved the open safenlp lines
            1.8-1.9x faster on 2 threads than on 1, HiGHS 1.3-1.4x: benchmarks/RESULTS.md).
        margin: a domain counts as proved when its margin lower bound exceeds this. The bounds
            are float64 and hold for the exact network (their round-off is in them,
            :mod:`relax.bounds.roundoff`), so the default is the float64 safety margin of every
            bound method (:data:`verify.registry.FLOAT64_PROOF_MARGIN`): properties whose own
            tolerance is ``1e-6`` (ml4acopf's ``Y >= 0.300001`` on an output clamped at 0.3) are
            decided like the ``crown`` method decides them.
        seed: seeds the attacks.
        groups: activation split of a property that is an OR of groups (a classifier's other
            classes; ml4acopf's 216 output limits): ``"each"`` searches every group the root
            leaves open on its own (the weakest-bounded first), as alpha-beta-CROWN keeps one
            OR-clause per domain; ``"joint"`` runs one search whose domains bound all open groups.
        search_rows: rows per group (its rows and their averages, any of which proves it) that
            the activation search bounds, the highest at the root; ``None``: all of them, or
            :data:`EXPENSIVE_SEARCH_ROWS` on networks whose one CROWN pass is expensive
            (:func:`_search_rows`; TinyYOLO's groups of five output limits have 16 rows).
        queue_memory_mb: memory cap of the queue of open domains (both kinds of splitting);
            above ``FULL_QUEUE`` of it the domains closest to proved are split first (a
            depth-first fallback that shrinks the queue); one that reaches it stops the search.
        entry_proofs: share of the time left after the first CROWN pass that the entry stage
            may use (:mod:`relax.bab.entry_proofs`): where the property would hold were every
            undecided input of a step function on the side it has at the set's centre (a
            segmentation head's pixel count), each such entry is proved on its own receptive
            field (:mod:`relax.ir.restrict`) by this pipeline, until the property's bound with the
            proved entries proves it. 0: never.
    """

    name = "bab"
    cost = "slow"
    complete = True
    guarantee = "deterministic"
    certifies = "base"
    summary = ("complete for ReLU networks (l_inf, l_1, l_2 balls, boxes): attack, alpha-CROWN, then input-split "
               "or beta-CROWN ReLU-split branch-and-bound on the bound graph (MILP-refined roots for deep nets, the exact "
               "MILP for one ReLU layer); "
               "inputs of the other nonlinear ops (sigmoid, tanh, erf, atan, max-pooling, ...) split by intervals "
               "(unknown possible)")
    norms = ("linf", "l2", "l1", "box")

    opts: BabOptions

    def decide(self, model, inputs: InputSet, prop: OutputProperty, call: CertifyCall) -> list[Certificate]:
        if call.find_radius:
            raise SpecError("method 'bab' decides one input set; it does not search radii (use eps)")
        t0 = call.deadline.start  # the set-up below (forward pass, dense form) is in the budget
        self.check_input_set(inputs)
        B = inputs.batch_size
        _, y0 = call.clean()
        spec = call.spec()
        certs = []
        for b in range(B):
            left = call.deadline.share(B - b).seconds  # this input's share of the time left
            tb = time.perf_counter() if b else t0  # the first input's time includes the set-up
            res = run_bab(model, inputs.select([b]), spec.select([b]), self.opts, timeout=left)
            status, eps = res.status, call.eps(b)
            certs.append(self.make_certificate(
                status, b, label=call.label(b), prediction=int(y0[b].argmax()), norm=call.norm, eps=eps,
                radius=eps if (eps is not None and status == "certified") else 0.0,
                counterexample=None if res.counterexample is None else res.counterexample.reshape(inputs.shape).cpu(),
                time_s=time.perf_counter() - tb,
                details={
                    "options": self.options(), "stage": res.details.get("stage", ""), "reason": res.reason,
                    "margin_lower": res.lower if math.isfinite(res.lower) else str(res.lower), "domains": res.domains,
                    **{k: res.details[k] for k in ("refine", "plain_bab_first", "queue_peak", "demoted", "groups", "groups_proved", "milp", "bab_first",
                                                    "search_rows", "entries")
                       if k in res.details},
                },
            ))
        return certs


def run_bab(model: torch.nn.Module, inputs: InputSet, spec, opts: BabOptions, timeout: float | None = None,
            root_boxes: dict[str, tuple[Tensor, Tensor]] | None = None) -> BabResult:
    """The full pipeline on one input set (batch of one) and its ``LinearSpec``; the first CROWN
    pass takes ``root_boxes`` (pre-activation boxes ``[1, *shape]`` that hold on the set) as they are.

    Returns:
        :class:`BabResult` with ``details["stage"]`` naming the step that decided.
    """
    from verify.attack import confirm_counterexample, pgd_attack, project_into, random_attack

    t0 = time.perf_counter()
    deadline = math.inf if timeout is None else t0 + timeout
    left = lambda: max(0.0, deadline - time.perf_counter())  # noqa: E731
    shape = inputs.shape

    def done(res: BabResult, stage: str) -> BabResult:
        res.details["stage"] = stage
        res.time_s = time.perf_counter() - t0
        if res.counterexample is not None:  # the point check() confirmed: the candidate projected into the set
            res.counterexample = project_into(inputs, res.counterexample.reshape(1, *shape)).reshape(-1)
        return res

    def check(x: Tensor) -> bool:
        """Candidates (float arithmetic on outward-rounded boxes) are projected into the set in
        float64 first; the projected point is what is confirmed and reported."""
        return bool(confirm_counterexample(model, inputs, spec, project_into(inputs, x.reshape(1, *shape)))[0])

    # random points are evaluated on the bound graph in float64 (a float32 model can round a
    # violation of 1e-7 away: ACAS Xu prop_7); PGD's gradient steps run on the model itself
    # (float64 convolutions cost 2-3x); whatever they find is confirmed on the model
    from relax.bounds import prepare

    graph, x64 = prepare(model, inputs, torch.float64)

    def attack(kind: str) -> BabResult | None:
        # restart 0 (from the midpoint) runs before the bounds, the other restarts after them
        runs = {"random": opts.random_samples, "pgd-midpoint": min(opts.attack_restarts, 1), "pgd": opts.attack_restarts - 1}
        if runs[kind] <= 0:
            return None
        if kind == "random":
            r = random_attack(BoundGraphModule({graph.dtype: graph}), x64, spec, samples=opts.random_samples, seed=opts.seed,
                              timeout=min(left() * 0.05, 5.0))
        elif kind == "pgd-midpoint":  # restart 0 alone: the lanes from the set's midpoint
            r = pgd_attack(model, inputs, spec, steps=opts.attack_steps, restarts=1, seed=opts.seed,
                           timeout=min(left() * EARLY_PGD_SHARE, 5.0))
        else:
            r = pgd_attack(model, inputs, spec, steps=opts.attack_steps, restarts=runs[kind], seed=opts.seed,
                           timeout=min(left() * 0.05, 5.0), from_midpoint=False)
        if bool(r.found[0]) and check(r.x_adv[0].detach().double()):
            return BabResult("falsified", r.x_adv[0].detach().double().reshape(-1), -math.inf, reason="counterexample")
        return None

    res = attack("random")
    if res is None:  # one PGD restart before the bounds: a CROWN pass of a large network can take minutes
        res = attack("pgd-midpoint")
    if res is not None:
        return done(res, "attack")
    # a quick proof (one CROWN pass costs less than PGD's restarts), then PGD, then branch-and-bound
    from relax.bounds.crown import crown

    rs = RowSpec(spec.C[0].double(), spec.d[0].double(), spec.groups).with_averages()
    graph, (C, d) = without_log_softmax(graph, rs.C), rs.batch(1)  # rows a final log-softmax leaves as they are: on the scores
    t_pass = time.perf_counter()
    try:  # a large network's pass stops tightening at FIRST_PASS_SHARE of the budget; its spec rows stop at the deadline
        with torch.no_grad():
            first = crown(graph, x64, C, deadline=Deadline(left() * FIRST_PASS_SHARE), forward=True,
                          stop_at=None if math.isinf(deadline) else deadline, intermediate=root_boxes)
    except DeadlineExpired:
        return done(BabResult("unknown", None, -math.inf, 1, reason="timeout"), "crown")
    first_pass = FirstPass(first.intermediate, time.perf_counter() - t_pass, given=root_boxes is not None)
    low = float(rs.margin(first.spec_lower() + d)[0])
    if low > opts.margin:
        return done(BabResult("certified", None, low, 1, reason="proved"), "crown")
    res = attack("pgd")
    if res is not None:
        return done(res, "attack")
    res = _entries_then_search(model, graph, x64, inputs, rs, opts, deadline, check, first_pass, low)
    if res.status == "unknown" and res.reason == "exhausted":  # no split left that could prove it: attacks get the time
        res = attack_until(model, inputs, spec, opts, deadline, check, res.details) or res
    return done(res, res.details.get("stage", "graph-bab"))


def _entries_then_search(model, graph, x64: InputSet, inputs: InputSet, rs: RowSpec, opts: BabOptions, deadline: float,
                         check, first_pass: FirstPass, low: float) -> BabResult:
    """After the first CROWN pass (its margin bound ``low``): the entry stage in its share of the
    time, then (unless it proved the property) the search until ``deadline``; an unknown answer
    keeps the best bound of the three."""
    left = lambda: max(0.0, deadline - time.perf_counter())  # noqa: E731
    entries = _entry_stage(model, graph, x64, rs, first_pass, opts, time.perf_counter() + opts.entry_proofs * left())
    if entries is not None and entries.status == "certified":
        entries.details["stage"] = "entries"
        return entries
    res = _graph_bab(model, graph, x64, inputs, rs, opts, left(), check, first_pass)
    if entries is not None:
        res.details.update(entries.details)
        low = max(low, entries.lower)
    if res.status == "unknown":  # the first pass's bound holds on the whole set too
        res.lower = max(res.lower, low)
    return res


#: PGD restarts and steps, and random samples, of each entry's own pipeline in the entry stage
#: (one restart from the midpoint, one after its first CROWN pass: most entries hold, and one
#: that flips mostly does so at once; a thousand samples cost a carvana pixel 0.12 s, half of a
#: quick proof)
ENTRY_ATTACK_RESTARTS, ENTRY_ATTACK_STEPS, ENTRY_RANDOM_SAMPLES = 2, 20, 100


def _entry_stage(model, graph, x64: InputSet, rs: RowSpec, first_pass: FirstPass, opts: BabOptions, until: float) -> BabResult | None:
    """:func:`relax.bab.entry_proofs.prove_entries` until the ``perf_counter`` value ``until``,
    each entry decided by this pipeline (its own entry stage off); None when it does not apply."""
    from relax.ir.ops.elementwise import Step

    if opts.entry_proofs <= 0 or not any(isinstance(n.op, Step) for n in graph.nodes):
        return None
    import dataclasses

    from relax.bab.entry_proofs import prove_entries

    sub = dataclasses.replace(opts, entry_proofs=0.0, attack_restarts=min(opts.attack_restarts, ENTRY_ATTACK_RESTARTS),
                              attack_steps=min(opts.attack_steps, ENTRY_ATTACK_STEPS),
                              random_samples=min(opts.random_samples, ENTRY_RANDOM_SAMPLES))
    return prove_entries(graph, x64, rs, first_pass.boxes,
                         lambda m, box, spec, s, boxes: run_bab(m, box, spec, sub, timeout=s, root_boxes=boxes), until, opts.margin)


def attack_until(model: torch.nn.Module, inputs: InputSet, spec, opts: BabOptions, deadline: float,
                 check: Callable[[Tensor], bool], details: dict) -> BabResult | None:
    """PGD restarts from random points of the set, new seeds each round, until ``deadline``
    (a ``perf_counter`` value) less :data:`LATE_ATTACK_GUARD_S`: a search whose unproved domains
    are all fully split (reason "exhausted") cannot use the time, an attack can (binarised nets:
    their sign layers' bounds stay loose however far they are split). The falsified
    result (stage "attack"), confirmed by ``check``, or None; its details (else ``details``) get the
    seconds spent."""
    from verify.attack import pgd_attack

    t0, seed = time.perf_counter(), opts.seed + 1
    budget = lambda: deadline - LATE_ATTACK_GUARD_S - time.perf_counter()  # noqa: E731
    found = None
    while found is None and budget() > LATE_ATTACK_MIN_S and opts.attack_steps > 0:
        r = pgd_attack(model, inputs, spec, steps=opts.attack_steps, restarts=max(opts.attack_restarts, 1), seed=seed,
                       timeout=budget(), from_midpoint=False)
        if bool(r.found[0]) and check(r.x_adv[0].detach().double()):
            found = BabResult("falsified", r.x_adv[0].detach().double().reshape(-1), -math.inf, reason="counterexample",
                              details={"stage": "attack"})
        seed += 1
    if time.perf_counter() > t0 + 0.01:
        (details if found is None else found.details)["attack_after_search_s"] = round(time.perf_counter() - t0, 3)
    return found


@dataclass(frozen=True)
class FirstPass:
    """The pipeline's first CROWN pass: its pre-activation boxes (``{node: (lo, hi)}``, ``[1,
    *shape]``), its seconds, and whether the caller gave the boxes (``run_bab``'s ``root_boxes``:
    then the pass bounded only the spec rows, and its seconds say nothing of a whole pass)."""

    boxes: dict[str, tuple[Tensor, Tensor]]
    seconds: float
    given: bool = False


def _graph_bab(model, graph, x_set: InputSet, inputs: InputSet, rs: RowSpec, opts: BabOptions, time_left: float,
               check_point=None, first_pass: FirstPass | None = None) -> BabResult:
    """Branch-and-bound on the bound graph: input splitting (:mod:`relax.bab.input_split`) for boxes
    of at most ``input_split_max_dim`` coordinates; else alpha-CROWN at the root, then ReLU-sign
    and interval splitting with beta-CROWN bounds (:mod:`relax.bab.activation_split`), for deep ReLU nets
    with MILP-refined root boxes (:func:`relax.bab.tighten.refine_graph_root`). ``graph`` / ``x_set``:
    the float64 bound graph and input set (:func:`relax.bounds.prepare`); ``rs``: the property
    rows with group averages."""
    from relax.bab.activation_split import interval_inputs, relu_inputs

    t0 = time.perf_counter()
    box_like = not isinstance(inputs, LpBall) or math.isinf(inputs.p)
    if box_like and (opts.split == "input" or (opts.split == "auto" and free_inputs(x_set) <= opts.input_split_max_dim)):
        return _input_split_bab(graph, x_set, rs, opts, t0 + time_left, check_point)
    try:
        root = _root_alpha_crown(graph, x_set, rs, opts, time_left, first_pass, stop_at=t0 + time_left)
    except DeadlineExpired:  # its first pass still running at the deadline
        return BabResult("unknown", None, -math.inf, 1, reason="timeout", details={"stage": "graph-alpha-crown"})
    root_rows = (root.lower + rs.batch(1)[1])[0]  # [N] lower bounds of the rows on the whole set
    low = float(rs.margin(root_rows))
    if low > opts.margin:
        return BabResult("certified", None, low, 1, reason="proved", details={"stage": "graph-alpha-crown"})
    narrow: dict = {}
    if box_like and opts.narrow_max > 0 and opts.narrow_share > 0 and free_inputs(x_set) <= opts.narrow_max_inputs:
        try:
            root, root_rows, low, narrow = _narrowed_root(graph, x_set, rs, opts, root, root_rows, low, t0 + time_left)
        except DeadlineExpired:
            return BabResult("unknown", None, low, 1, reason="timeout", details={"stage": "graph-narrow-boxes"})
        if low > opts.margin:
            return BabResult("certified", None, low, 1, reason="proved", details={"stage": "graph-narrow-boxes", "narrow": narrow})
    left = time_left - (time.perf_counter() - t0)
    if not (relu_inputs(graph) or interval_inputs(graph)) or left <= 0:
        return BabResult("unknown", None, low, 1, reason="timeout" if left <= 0 else "incomplete", details={"stage": "graph-alpha-crown"})
    deadline = time.perf_counter() + left
    # the groups the root proves hold on every domain: the search bounds only the open ones
    rs, rows, proved_floor = rs.open_part(root_rows, opts.margin)
    keep, open_rows = _search_rows(opts, first_pass, left), rs.C.shape[0]
    if keep < int(torch.bincount(rs.groups).max()):  # each group's best rows at the root
        rs, kept = rs.best_rows(root_rows[rows.to(root_rows.device)], keep)
        rows = rows[kept.to(rows.device)]
    search = _ActivationSearch(model, graph, x_set, rs, opts, check_point, None if first_pass is None else first_pass.seconds,
                               group_low=rs.group_max(root_rows[rows.to(root_rows.device)]))
    boxes, root_alphas = root.intermediate, root.alphas.get("__out__")
    if root_alphas is not None:  # per-row slopes follow the kept rows; one shared set (memory cap) serves them all
        root_alphas = {r: (a if a.shape[0] == 1 else a[rows.to(a.device)]) for r, a in root_alphas.items()}
    res = _search(search, opts, deadline, left, boxes, root_alphas, low)
    if rs.C.shape[0] < open_rows:
        res.details["search_rows"] = f"{rs.C.shape[0]} of {open_rows}"
    if narrow:
        res.details["narrow"] = narrow
    if res.status == "certified":
        res.lower = min(res.lower, proved_floor)
    elif res.status == "unknown":  # the root's bound holds too (a search stopped in its first pass has none)
        res.lower = max(low, min(res.lower, proved_floor))
    return res


def _search_rows(opts: BabOptions, first_pass: FirstPass | None, left: float) -> int:
    """Rows per group that the activation search bounds: ``search_rows``, else all of them
    unless one CROWN pass of the network costs more than :data:`RECOMPUTE_ROUND_SHARE` of half
    the search's time (the rule that also stops recomputing each domain's boxes): then each
    row costs about as much as a domain, and :data:`EXPENSIVE_SEARCH_ROWS` of them are kept."""
    from relax.bab.activation_split import RECOMPUTE_ROUND_SHARE

    if opts.search_rows is not None:
        return opts.search_rows
    if first_pass is not None and 2 * first_pass.seconds > RECOMPUTE_ROUND_SHARE * left:
        return EXPENSIVE_SEARCH_ROWS
    return sys.maxsize


def _search(search: "_ActivationSearch", opts: BabOptions, deadline: float, left: float, boxes, root_alphas, low: float) -> BabResult:
    """Branch from the root (:meth:`_ActivationSearch.branch`): for one-ReLU-layer nets the exact
    MILP after ``milp_after`` of the time (:func:`_branch_then_milp`), for deep ReLU nets MILP
    refinement of the root's boxes once plain branching has had ``refine_after`` of the time."""
    from relax.bab.activation_split import interval_inputs, relu_inputs

    graph = search.graph
    if opts.milp_after < 1 and _one_relu_layer(graph) and not (isinstance(search.x_set, LpBall) and search.x_set.p == 2.0):
        return _branch_then_milp(search, opts, deadline, left, boxes, root_alphas)
    hidden = len(relu_inputs(graph))
    refine = opts.refine_layers
    if refine is None:
        refine = 3 if (hidden >= opts.refine_min_depth and not interval_inputs(graph)) else 0
    if refine <= 0:
        return search.branch(deadline, boxes, root_alphas)
    from relax.bab.tighten import has_dense_relu_view

    # "auto" refines chains only: on cifar10_resnet's resnet_2b (a dense view with skips) the
    # MILPs took the time of the search that decides it (benchmarks/RESULTS.md, section 13)
    if not has_dense_relu_view(graph, search.model, opts.dense_limit, chain=opts.refine_layers is None):  # nothing to refine:
        # one search for the whole time, none thrown away
        res = search.branch(deadline, boxes, root_alphas)
        res.details["refine"] = "not run: no dense ReLU view of the network"
        return res
    extra: dict = {}
    if opts.refine_after > 0:  # plain branching first: what it decides quickly never pays for the MILPs
        first = search.branch(time.perf_counter() + opts.refine_after * left, boxes, root_alphas)
        if first.status != "unknown" or time.perf_counter() >= deadline:
            return first
        extra["plain_bab_first"] = {"reason": first.reason, "time_s": round(first.time_s, 3), "domains": first.domains,
                                    "root_pass_s": first.details.get("root_pass_s", 0.0)}
    return search.refine_then_branch(deadline, boxes, root_alphas, low, refine, extra)


def _input_split_bab(graph, x_set: InputSet, rs: RowSpec, opts: BabOptions, deadline: float, check_point) -> BabResult:
    """Input splitting from CROWN on the whole box (alpha-CROWN's root costs more than the first
    rounds of splitting), until the ``perf_counter`` value ``deadline``."""
    from relax.bab.input_split import GraphBoxes, input_bab

    lo, hi = (b.reshape(-1) for b in x_set.bounds())
    res = input_bab(GraphBoxes(graph, deadline=deadline), rs, lo, hi, timeout=max(0.0, deadline - time.perf_counter()),
                    batch_size=opts.batch_size or 512, margin=opts.margin, check_point=check_point, seed=opts.seed,
                    max_memory_mb=opts.queue_memory_mb)
    res.details["stage"] = "graph-bab-input" if res.domains > 1 else "graph-crown"
    return res


def free_inputs(x_set: InputSet) -> int:
    """How many input coordinates the set leaves free (most over its batch): wider than the few
    ulps by which a pinned value's box is rounded outward (VNN-LIB files that fix most inputs:
    collins_rul_cnn frees 2-16 of 400-800, nn4sys' pensieve 32 of 96)."""
    lo, hi = (b.reshape(b.shape[0], -1) for b in x_set.bounds())
    return int(((hi - lo) > 1e-6 * (1 + ((hi + lo) / 2).abs())).sum(1).max())


def _narrowed_root(graph, x_set: InputSet, rs: RowSpec, opts: BabOptions, root, root_rows: Tensor, low: float, deadline: float):
    """The root after tightening its narrow layers' boxes (:mod:`relax.bab.narrow_boxes`, in
    ``narrow_share`` of the time left), then alpha-CROWN again within them (``bound_overrides``);
    ``(root, root_rows, low, stats)``, the given root when no layer qualifies. Each row keeps the
    better of its two bounds (both hold)."""
    from relax.bab.narrow_boxes import refine_narrow_boxes
    from relax.bounds.cone import spec_cone
    from relax.bounds.alpha import alpha_crown

    now = time.perf_counter()
    lo, hi = (b.reshape(-1) for b in x_set.bounds())
    found = refine_narrow_boxes(graph, lo.to(graph.dtype), hi.to(graph.dtype), root.intermediate,
                                now + opts.narrow_share * (deadline - now), max_neurons=opts.narrow_max, seed=opts.seed,
                                cone=spec_cone(graph, rs.C.unsqueeze(0).to(graph.dtype)))
    if not found.boxes:
        return root, root_rows, low, {}
    C, d = rs.batch(1)
    left = deadline - time.perf_counter()
    again = alpha_crown(graph, x_set, C.to(graph.dtype), iterations=20, early_stop=True,
                        stop_fn=lambda lw: rs.margin(lw + d) > opts.margin, deadline=Deadline(ROOT_ALPHA_SHARE * left),
                        forward=True, bound_overrides=found.boxes, stop_at=deadline)
    rows = torch.maximum((again.lower + d)[0], root_rows)
    return again, rows, max(low, float(rs.margin(rows))), found.stats


def _root_alpha_crown(graph, x_set: InputSet, rs: RowSpec, opts: BabOptions, time_left: float, first_pass: FirstPass | None = None,
                      stop_at: float | None = None):
    """The root's alpha-CROWN. With ReLUs to split: 20 steps in at most 30 % of the budget (the
    search does the rest). Without (sigmoid / tanh nets: only interval splits, which gain little
    on wide layers), the root's optimised intermediate bounds are the main lever: up to 200 steps
    in at most 70 % of the budget, until the bound stops improving. When fewer than
    :data:`ROOT_PASSES_MIN` passes of the pipeline's ``first_pass`` fit that share, or when the
    caller gave the first pass's boxes, those boxes are kept and only the spec rows' slopes
    optimised: the entry stage's sub-problems start from the whole network's boxes, and
    optimising a carvana pixel's intermediate bounds took 1.0 s of its 1.2-3.4 s where the
    search from the given boxes proved the same pixels in 0.3-1.3 s. ``stop_at``: the hard
    deadline of its first pass (:class:`verify.deadline.DeadlineExpired` past it)."""
    from relax.bab.activation_split import relu_inputs
    from relax.bounds.alpha import alpha_crown

    C, d = rs.batch(1)
    splits_relus = bool(relu_inputs(graph))
    share = (ROOT_ALPHA_SHARE if splits_relus else 0.7) * time_left
    fixed = first_pass is not None and (first_pass.given or ROOT_PASSES_MIN * first_pass.seconds > share)
    return alpha_crown(graph, x_set, C.to(graph.dtype), iterations=20 if splits_relus else 200, early_stop=True,
                       stop_fn=lambda low: rs.margin(low + d) > opts.margin, deadline=Deadline(share),
                       stall=None if splits_relus else (10, 0.01), forward=True,
                       intermediate=first_pass.boxes if fixed and first_pass is not None else None, stop_at=stop_at)


def _branch_then_milp(search: "_ActivationSearch", opts: BabOptions, deadline: float, left: float, boxes, root_alphas) -> BabResult:
    """Branching for ``milp_after`` of the time ``left``, then the exact MILP until ``deadline``;
    branching again (from the root) when the MILP cannot be built or stops early with time left.
    A network that the structure and shapes show has no MILP here branches for the whole time."""
    refused = search.milp_refusal()
    if refused is not None:
        res = search.branch(deadline, boxes, root_alphas)
        res.details["milp"] = refused
        return res
    first = search.branch(time.perf_counter() + opts.milp_after * left, boxes, root_alphas)
    if first.status != "unknown" or time.perf_counter() >= deadline:
        return first
    exact = search.exact_milp(deadline, first, threads=opts.milp_threads or usable_cores(4))
    if exact is not None and (exact.status != "unknown" or deadline - time.perf_counter() < 0.05 * left):
        return exact
    again = search.branch(deadline, boxes, root_alphas)
    again.details["milp"] = first.details.get("milp") if exact is None else {"stopped": exact.reason, **exact.details["milp"]}
    if exact is not None and again.status == "unknown":
        again.lower = max(again.lower, exact.lower)
    return again


def _one_relu_layer(graph) -> bool:
    """The graph's only nonlinear node is one ReLU: every ReLU input is an affine function of
    the network's input, so its root box is exact."""
    from relax.bab.activation_split import relu_inputs

    return len(graph.activations()) == 1 and len(relu_inputs(graph)) == 1


def _same_nodes(fast, graph, rs: RowSpec):
    """The float32 graph ``fast`` with the nodes of ``graph`` (which may have lost its log-softmax
    head: :func:`relax.ir.heads.without_log_softmax`), or None when they cannot be matched."""
    names = lambda g: [n.name for n in g.nodes]  # noqa: E731
    if names(fast) != names(graph):
        fast = without_log_softmax(fast, rs.C)
    return fast if names(fast) == names(graph) else None


class _ActivationSearch:
    """ReLU-sign and interval splitting from a root (its intermediate boxes and output slopes),
    optionally after MILP refinement of the root's boxes."""

    def __init__(self, model, graph, x_set: InputSet, rs: RowSpec, opts: BabOptions, check_point,
                 box_pass_s: float | None = None, group_low: Tensor | None = None) -> None:
        from relax.ir.graph import get_graph

        self.model, self.graph, self.x_set, self.rs, self.opts, self.check_point = model, graph, x_set, rs, opts, check_point
        self.box_pass_s = box_pass_s  # one CROWN pass through the network (the pipeline's first): a domain's boxes
        self.fast = None if graph.dtype != torch.float64 else _same_nodes(get_graph(model, tuple(graph.input_shape), torch.float32), graph, rs)
        self.group_low = group_low  # [G] the root's lower bound of each group's max (the search order of ``groups="each"``)

    def branch(self, until: float, boxes, root_alphas) -> BabResult:
        """Branch until the ``perf_counter`` value ``until`` on the graph pruned of the ReLUs dead
        at the root (dead there: dead in every domain): one search, or with ``groups="each"`` one
        per group of the property (:func:`relax.bab.group_split.groupwise_relu_bab`)."""
        from relax.ir.prune import dead_relus, prune_boxes, prune_graph

        graph = self.graph
        keep = dead_relus(graph, boxes)
        alphas = None if root_alphas is None else {r: (a[..., keep[r]] if r in keep else a) for r, a in root_alphas.items()}
        pruned = (prune_graph(graph, keep), prune_boxes(graph, keep, boxes), None if self.fast is None else prune_graph(self.fast, keep))
        r = self.search(until, pruned, self.rs, alphas, each=self.opts.groups == "each" and self.rs.num_groups > 1)
        r.details["stage"] = "graph-bab"
        return r

    def search(self, until: float, pruned, rs: RowSpec, alphas, each: bool = False) -> BabResult:
        """One activation-split search (:func:`graph_relu_bab`) of the rows ``rs`` on the pruned
        ``(graph, boxes, fast graph)`` from the root slopes ``alphas``; with ``each``, one per
        group of ``rs``, the weakest-bounded at the root first (:func:`groupwise_relu_bab`)."""
        from relax.bab.activation_split import graph_relu_bab
        from relax.bab.group_split import groupwise_relu_bab

        opts = self.opts
        graph, boxes, fast = pruned
        kw = dict(timeout=max(0.0, until - time.perf_counter()), batch_size=opts.batch_size or 64, root_alphas=alphas,
                  steps=opts.relu_steps, margin=opts.margin, check_point=self.check_point, max_memory_mb=opts.queue_memory_mb,
                  fast=fast, candidates=opts.branch_candidates, box_pass_s=self.box_pass_s)
        if not each:
            return graph_relu_bab(graph, self.x_set, rs, boxes, **kw)
        order = None if self.group_low is None else torch.argsort(self.group_low.cpu()).tolist()
        return groupwise_relu_bab(graph, self.x_set, rs, boxes, order=order, **kw)

    def milp_refusal(self) -> str | None:
        """Why :meth:`exact_milp` cannot encode this one-ReLU-layer network, from its shapes and
        structure (no matrix built), or None: a dense view over :data:`MILP_DENSE_LIMIT` numbers, or
        a graph without one (:func:`relax.ir.dense.dense_plan`)."""
        from relax.ir.dense import NotFeedForwardError, dense_size

        try:
            size = dense_size(self.graph)
        except NotFeedForwardError as e:
            return f"not run: {e}"
        if size > MILP_DENSE_LIMIT:
            return f"not run: a dense matrix of {size} numbers (limit {MILP_DENSE_LIMIT})"
        return None

    def exact_milp(self, deadline: float, first: BabResult, threads: int = 1) -> BabResult | None:
        """The exact MILP of the open groups until the ``perf_counter`` value ``deadline``
        (:func:`relax.exact.milp.milp_verify` on ``threads`` solver threads; ``first``: the
        branching before it, whose bound and domains carry over). ``None`` when the network has
        no MILP encoding."""
        from relax.exact.lp import relu_net
        from relax.exact.milp import milp_verify
        from relax.solvers.program import SolverError
        from verify.spec import LinearSpec

        rs, t0 = self.rs, time.perf_counter()
        spec = LinearSpec(rs.C.unsqueeze(0), rs.d.unsqueeze(0), rs.groups)
        refused = self.milp_refusal()
        if refused is not None:
            first.details["milp"] = refused
            return None
        try:  # the dense view first (not interruptible: about 1 s for 18 M numbers), then the MILP in the time left
            net = relu_net(self.model, tuple(self.graph.input_shape))
        except ValueError as e:  # UnsupportedNetworkError, NotFeedForwardError: no MILP encoding
            first.details["milp"] = f"not run: {e}"
            return None
        try:
            out = milp_verify(self.model, self.x_set, spec, refine=False, attack=False, net=net, threads=threads,
                              time_limit=max(0.0, deadline - time.perf_counter()))[0]
        except SolverError as e:
            first.details["milp"] = f"not run: {e}"
            return None
        details = {"stage": "graph-milp", "bab_first": {"time_s": round(first.time_s, 3), "domains": first.domains,
                                                        "margin_lower": first.lower if math.isfinite(first.lower) else str(first.lower)},
                   "milp": {k: out.details[k] for k in ("reason", "note", "found_by") if k in out.details}}
        domains, took = first.domains, time.perf_counter() - t0 + first.time_s
        if out.status == "falsified" and out.counterexample is not None and self.check_point is not None \
                and self.check_point(out.counterexample.reshape(-1)):
            return BabResult("falsified", out.counterexample.double().reshape(-1), -math.inf, domains, took, "counterexample", details)
        low = max(first.lower, float(out.group_lower.min()))
        if out.status == "certified":
            return BabResult("certified", None, low, domains, took, "proved", details)
        return BabResult("unknown", None, low, domains, took, "timeout" if time.perf_counter() >= deadline else "incomplete", details)

    def refine_then_branch(self, deadline: float, boxes, root_alphas, low: float, layers: int, extra: dict) -> BabResult:
        """MILP-refine the root's boxes of the first ``layers`` hidden layers (within
        ``refine_fraction`` of the time left), re-run alpha-CROWN inside them, then branch."""
        from relax.bab.tighten import refine_graph_root
        from relax.bounds.alpha import alpha_crown

        graph, x_set, rs, opts = self.graph, self.x_set, self.rs, self.opts
        C, d = rs.batch(1)
        stop = time.perf_counter() + opts.refine_fraction * max(0.0, deadline - time.perf_counter())
        got = refine_graph_root(graph, self.model, x_set, rs, boxes, root_alphas, layers=layers, deadline=stop,
                                alpha_deadline=stop, margin=opts.margin, solve_time_limit=opts.refine_solve_time,
                                workers=opts.refine_workers or usable_cores(4), dense_limit=opts.dense_limit)
        if got is not None:
            boxes, root_alphas, refined_low, extra["refine"] = got
            low = max(low, refined_low)
            if low <= opts.margin and extra["refine"]["lps"] > 0 and time.perf_counter() < deadline:
                # the root within the refined boxes, in at most the root's share of the time left
                again = alpha_crown(graph, x_set, C.to(graph.dtype), iterations=20, early_stop=True, bound_overrides=boxes,
                                    stop_fn=lambda lw: rs.margin(lw + d) > opts.margin,
                                    deadline=Deadline(ROOT_ALPHA_SHARE * max(0.0, deadline - time.perf_counter())))
                low = max(low, float(rs.margin(again.lower + d)[0]))
                boxes = {**boxes, **{p: (torch.maximum(boxes[p][0], l), torch.minimum(boxes[p][1], h))
                                     for p, (l, h) in again.intermediate.items() if p in boxes}}
                root_alphas = again.alphas.get("__out__", root_alphas)
            if low > opts.margin:
                return BabResult("certified", None, low, 1, reason="proved", details={"stage": "graph-refine", **extra})
        # branching again re-bounds the root and needs a first round of two children at that pace:
        # with less time left than three root passes of the plain branching it would only overrun
        first = extra.get("plain_bab_first", {})
        if deadline - time.perf_counter() < 3 * first.get("root_pass_s", 0.0):
            return BabResult("unknown", None, low, first.get("domains", 0), reason="timeout", details={"stage": "graph-refine", **extra})
        res = self.branch(deadline, boxes, root_alphas)
        res.details.update(extra)
        return res
