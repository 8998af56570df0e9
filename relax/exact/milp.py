"""Exact verification of ReLU networks by mixed-integer linear programming (Tjeng, Xiao & Tedrake,
"Evaluating robustness of neural networks with mixed integer programming", ICLR 2019), and the
exact minimum adversarial distortion for l_inf / l_1 (l_2 with an MIQP solver).

Encoding (see :func:`relax.exact.lp.encode` with ``integer=True``): big-M constraints per unstable ReLU
with the tightest pre-activation bounds available (CROWN when ``relax.bounds`` is present, then
LP re-tightening, :func:`relax.exact.lp.tighten_bounds`); stable neurons are fixed (inactive ones
removed, active ones linear). Max-pooling is not encoded (the dense form rejects it). Per solve,
the binaries of last-layer ReLUs that every active row weighs with a coefficient ``>= 0`` are made
continuous (:meth:`relax.exact.lp.NetEncoding.binaries_to_relax`: the optimum is unchanged, about
half the binaries of a one-hidden-layer net go).

Groups (``LinearSpec`` semantics): the property is violated iff some group ``g`` has every row
``C_i y + d_i <= 0``. For each group one MILP decides it::

    t_g* = min_{x in set} max_{i in g} (C_i y(x) + d_i)
         = min t  s.t.  C_i y(x) + d_i <= t  (i in g),  x in set,  network constraints

The group is violated iff ``t_g* <= 0`` and proved iff ``t_g* > 0``. For a robustness property
(one row per group) this is the minimum of each margin. Groups already proved by the triangle LP
(safe dual bounds) are skipped; the rest are solved in order of the attack's margin with early
termination (HiGHS MIP interrupt callback) as soon as the dual bound exceeds ``margin`` (proved)
or a solution with ``t <= 0`` appears (a candidate counterexample).

Soundness and tolerances:

* "certified" needs, for every group, an LP safe bound ``> 1e-9`` or a MILP proof that
  ``t_g* >= margin`` (default ``1e-4``, in the units of the property rows): the MILP runs with the
  cutoff ``margin`` (nodes whose LP bound reaches it are pruned) and no primal heuristics. The MILP dual bound is HiGHS's
  branch-and-bound bound; its node LPs are solved to feasibility tolerances ``1e-7`` and integrality
  is enforced to ``1e-7``. Integrality and primal slack only enlarge the feasible set (they can
  only lower the bound, i.e. err on the safe side); the margin covers dual-feasibility error of the
  node LPs. This is "exact within solver tolerance", not a rational-arithmetic proof.
* "falsified" only after the MILP's input point (or the attack's) violates the property in a plain
  forward pass of the torch model in float32 *and* float64 and lies in the input set; if not, small
  repairs are tried (projection onto the set, small signed-gradient steps), else "unknown".
* Solver failures, infeasible relaxations and time limits give "unknown" with the reason.
"""
from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from verify.attack import AttackResult, pgd_attack, repair_counterexample
from verify.placement import model_device, model_float_dtype
from verify.deadline import Deadline
from verify.spec import Box, InputSet, LinearSpec, LpBall, OutputProperty, Robust, parse_norm

from relax.ir.dense import FeedForwardNet
from relax.exact.lp import (
    NetEncoding,
    _output_rows,
    encode,
    initial_bounds,
    lp_lower_bounds,
    regions_of,
    relu_net,
    spec_rows,
    tighten_bounds,
)
from relax.solvers import GurobiBackend, LinearProgram, SolverError, make_backend, resolve_solver

__all__ = [
    "MilpOutcome",
    "DistortionResult",
    "milp_verify",
    "minimum_distortion",
]


# ------------------------------------------------------------------------------------------
# forward passes (the attacks and the counterexample checks are verify.attack's)

#: PGD steps from the LP optima of the open groups (they start near a violation if there is one)
LP_START_STEPS = 50


_DOUBLE_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _double(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (cached per model object)."""
    m = _DOUBLE_COPIES.get(model)
    if m is None:
        m = copy.deepcopy(model).double().eval()
        _DOUBLE_COPIES[model] = m
    return m


def _model_dtype(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    return model_float_dtype(model) or torch.float32, model_device(model)


def _margins(model: torch.nn.Module, x: Tensor, spec: LinearSpec, dtype: torch.dtype) -> Tensor:
    """Group maxima ``[B, G]`` of the rows at ``x`` evaluated in ``dtype``."""
    m = _double(model) if dtype == torch.float64 else model
    dev = _model_dtype(model)[1]
    with torch.no_grad():
        y = m(x.to(device=dev, dtype=dtype)).reshape(x.shape[0], -1)
    return spec.to(device=dev, dtype=dtype).group_max(spec.to(device=dev, dtype=dtype).values(y))


class _one_thread:
    """Run a block with one torch intra-op thread (restored after). The attacks here are many
    tiny ops; on a busy machine torch's thread pool makes them 10-20x slower (measured)."""

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if self.prev != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.prev != 1:
            torch.set_num_threads(self.prev)



# ------------------------------------------------------------------------------------------
# the verification MILP


@dataclass
class MilpOutcome:
    """Result of :func:`milp_verify` for one example.

    Attributes:
        status: "certified" | "falsified" | "unknown".
        group_lower: ``[G]`` lower bounds of ``t_g* = min_x max_{i in g} row_i`` (MILP dual bound,
            or the LP safe bound for groups the LP proved; ``-inf`` if nothing is known).
        group_upper: ``[G]`` values of the best solutions found (``inf`` if none).
        row_lower: ``[N]`` sound per-row lower bounds (LP safe bounds, raised to the MILP bound for
            single-row groups).
        counterexample: ``[*shape]`` float64 confirmed violating input (inside the set), or ``None``.
        details: JSON-serialisable facts (bounds, sizes, per-group solver status, reasons).
    """

    status: str
    group_lower: np.ndarray
    group_upper: np.ndarray
    row_lower: np.ndarray
    counterexample: Tensor | None = None
    details: dict = field(default_factory=dict)


def _add_spec_rows(enc: NetEncoding, net: FeedForwardNet, C: np.ndarray, d: np.ndarray, with_t: bool) -> tuple[LinearProgram, np.ndarray, int, np.ndarray, np.ndarray]:
    """Append the rows ``C_i y + d_i (- t) <= 0`` (initially free) and a column ``t``.

    Returns ``(lp, row_index [N], t_col, M [N, n] over the old columns, const [N])``."""
    Cw, cd = _output_rows(net, C, d)
    M, const = enc.expr(len(net.layers) - 1, Cw, cd)
    lp = enc.lp
    n = lp.num_cols
    N = M.shape[0]
    t_col = -1
    if with_t:
        t_col = n
        Mt = sp.hstack([M, sp.csr_matrix(-np.ones((N, 1)))]).tocsr()
        A = sp.vstack([sp.hstack([lp.A, sp.csr_matrix((lp.num_rows, 1))]), Mt]).tocsr()
        col_lo = np.r_[lp.col_lo, -np.inf]  # set per group from valid row bounds
        col_hi = np.r_[lp.col_hi, np.inf]
        integer = None if lp.integer is None else np.r_[lp.integer, False]
    else:
        A = sp.vstack([lp.A, M]).tocsr()
        col_lo, col_hi, integer = lp.col_lo.copy(), lp.col_hi.copy(), lp.integer
    rows = np.arange(lp.num_rows, lp.num_rows + N)
    new = LinearProgram(
        A=A,
        row_lo=np.r_[lp.row_lo, np.full(N, -np.inf)],
        row_hi=np.r_[lp.row_hi, np.full(N, np.inf)],
        col_lo=col_lo,
        col_hi=col_hi,
        c=np.zeros(A.shape[1]),
        integer=integer,
    )
    return new, rows, t_col, M, const


def _set_needed_binaries(be: Any, enc: NetEncoding, rows: sp.spmatrix) -> int:
    """Make integer only the binaries of ``enc`` that a MILP minimising over ``rows`` (the rows of
    the group it solves; the others free) needs (:meth:`NetEncoding.binaries_to_relax`); returns
    how many stay integer."""
    binaries = enc.binaries()
    relaxed = enc.binaries_to_relax(rows)
    be.set_integer(binaries, ~np.isin(binaries, relaxed))
    return len(binaries) - len(relaxed)


def _join_errors(errors: list[tuple[int, str]]) -> str:
    """``"groups 0, 1: <message>; group 3: <other message>"`` (one entry per distinct message)."""
    by: dict[str, list[int]] = {}
    for g, msg in errors:
        by.setdefault(msg, []).append(int(g))
    return "; ".join(f"group{'s' if len(gs) > 1 else ''} {', '.join(map(str, sorted(gs)))}: {m}" for m, gs in by.items())


def _encoding_contains(lp: LinearProgram, v: np.ndarray) -> bool:
    """Whether the encoding's rows and columns admit the point ``v`` (a network evaluation at a
    point of the input set): if not, some pre-activation bound excludes a point it must
    contain, and no bound or radius from this encoding may be trusted. The tolerance scales
    with the terms of each row (float64 evaluation of the point)."""
    Av = lp.A @ v
    tol = 1e-9 * (1 + abs(lp.A) @ np.abs(v))
    if np.any(Av < lp.row_lo - tol) or np.any(Av > lp.row_hi + tol):
        return False
    ctol = 1e-9 * (1 + np.abs(v))
    return not (np.any(v < lp.col_lo - ctol) or np.any(v > lp.col_hi + ctol))


def _bounds_contain(net: FeedForwardNet, bnds: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> bool:
    """Whether every pre-activation of ``net`` at the input ``x [n0]`` (float64 forward pass)
    lies within its bounds ``bnds[k] = (l_k, u_k)``, up to the round-off of the pass (a
    tolerance on the sum of the absolute values of the terms)."""
    a = x
    for k, (l, u) in enumerate(bnds):
        W, b = net.layers[k].W.double().numpy(), net.layers[k].b.double().numpy()
        z = W @ a + b
        tol = 1e-9 * (np.abs(W) @ np.abs(a) + np.abs(b)) + 1e-300
        if np.any(z < np.asarray(l).ravel() - tol) or np.any(z > np.asarray(u).ravel() + tol):
            return False
        a = np.maximum(z, 0.0)
    return True


def _proved(lower: float, lp_proved: bool, margin: float) -> bool:
    """A group is proved by its LP safe bound (> 1e-9) or a MILP bound ``>= margin``."""
    return bool(lp_proved) or lower >= margin


#: a MILP proof needs ``t_g* >= max(margin, MILP_TOLERANCE * magnitude)``: the node LPs are solved
#: to absolute tolerances (~1e-7) on rows whose terms can be large, so the dual bound's error
#: scales with the magnitude of the group's terms (``|M| max(|lo|, |hi|) + |const|``)
MILP_TOLERANCE = 1e-6


def _group_margins(M: sp.csr_matrix, const: np.ndarray, lp: LinearProgram, groups: np.ndarray, margin: float) -> np.ndarray:
    """``[G]``: the proof margin of each group, ``max(margin, MILP_TOLERANCE * magnitude)``."""
    n = M.shape[1]
    big = np.maximum(np.abs(lp.col_lo[:n]), np.abs(lp.col_hi[:n]))
    big = np.where(np.isfinite(big), big, 0.0)
    mag = np.asarray(abs(M) @ big + np.abs(const)).ravel()
    G = int(groups.max()) + 1
    out = np.full(G, float(margin))
    for g in range(G):
        out[g] = max(margin, MILP_TOLERANCE * float(mag[groups == g].max()))
    return out


def _interval_rows(M: sp.csr_matrix, const: np.ndarray, lp: LinearProgram) -> np.ndarray:
    """Lower bounds of the rows ``M v + const`` over the column box of ``lp`` (``[N]``)."""
    n = M.shape[1]
    lo, hi = lp.col_lo[:n], lp.col_hi[:n]
    Mp, Mn = M.maximum(0), M.minimum(0)
    return np.asarray(Mp @ lo + Mn @ hi + const).ravel()


def milp_verify(
    model: torch.nn.Module,
    inputs: InputSet,
    spec: LinearSpec,
    *,
    bounds_method: str = "crown",
    refine: bool = True,
    solver: str = "auto",
    time_limit: float | None = 120.0,
    attack: bool = True,
    margin: float = 1e-4,
    exact: bool = False,
    threads: int = 1,
    net: FeedForwardNet | None = None,
) -> list[MilpOutcome]:
    """Decide the property on every example of ``inputs`` exactly (within tolerance).

    Args:
        model: fx graph / torch module of a ReLU chain network ``[B, *shape] -> [B, K]``.
        inputs: batched box or l_inf / l_1 ball.
        spec: ``C [B, N, K]``, ``d [B, N]``, ``groups [N]``.
        bounds_method: initial pre-activation bounds (:func:`relax.exact.lp.initial_bounds`).
        refine: LP re-tightening of the hidden layers' bounds before the MILP.
        solver: "auto" | "highs" | "gurobi".
        time_limit: seconds per example (attack, bounds and MILPs together); ``None`` = none.
        attack: run :func:`verify.attack.pgd_attack` first (a quick falsification and the MILP start).
        margin: a group counts as proved when the MILP shows ``t_g* >= margin`` (row units).
        exact: solve every group to optimality (no early stop, gap 1e-9; all groups even after
            a violation) -- ``group_lower`` / ``group_upper`` then bracket ``t_g*`` tightly.
        threads: solver threads.

    Returns:
        One :class:`MilpOutcome` per example.
    """
    solver_name = resolve_solver(solver)  # validates; "auto" is decided per model by make_backend
    if net is None:
        net = relu_net(model, inputs.shape)
    B = inputs.batch_size
    # the examples share the batch's time from here on (attack and bounds included)
    call = Deadline(None if time_limit is None else time_limit * B)
    attacked, gm_att = None, None
    if attack:
        with _one_thread():
            attacked = pgd_attack(model, inputs, spec, steps=40, restarts=2, seed=0)
        with torch.no_grad():
            gm_att = _margins(model, attacked.x_adv, spec, torch.float64).cpu().numpy()  # [B, G]
    ib, used = initial_bounds(model, net, inputs, bounds_method)
    groups = spec.groups.cpu().numpy()
    C, d = spec_rows(spec)
    run = _MilpRun(
        model=model, net=net, inputs=inputs, spec=spec, groups=groups, G=int(groups.max()) + 1 if len(groups) else 0,
        C=C, d=d, regions=regions_of(inputs),
        solver=solver, solver_name=solver_name, margin=margin, exact=exact, refine=refine, threads=threads,
        attack=attack, attacked=attacked, gm_att=gm_att, initial=ib, bounds_used=used,
    )
    outs: list[MilpOutcome] = []
    for b in range(B):
        outs.append(_verify_example(run, b, call.share(B - b).at))
    return outs


@dataclass
class _MilpRun:
    """What the examples of one :func:`milp_verify` call share (the batch's attack and bounds)."""

    model: torch.nn.Module
    net: FeedForwardNet
    inputs: InputSet
    spec: LinearSpec
    groups: np.ndarray  # [N] group of each row
    G: int
    C: np.ndarray  # [B, N, K]
    d: np.ndarray  # [B, N]
    regions: list
    solver: str
    solver_name: str
    margin: float
    exact: bool
    refine: bool
    threads: int
    attack: bool
    attacked: AttackResult | None  # the batch's PGD (confirmed counterexamples where found)
    gm_att: np.ndarray | None  # [B, G] group margins at the attack's points
    initial: list  # per layer (lower [B, n], upper [B, n]) pre-activation bounds
    bounds_used: str


@dataclass
class _Example:
    """One example's running record: its sets, what is known of each group, the details."""

    b: int
    t0: float
    deadline: float | None
    in_b: InputSet
    spec_b: LinearSpec
    gl: np.ndarray  # [G] lower bounds of t_g*
    gu: np.ndarray  # [G] values of solutions found
    det: dict

    def outcome(self, status: str, row_lower: np.ndarray, cex: Tensor | None = None) -> MilpOutcome:
        self.det.setdefault("time_s", time.perf_counter() - self.t0)
        return MilpOutcome(status, self.gl, self.gu, row_lower, cex, self.det)


def _verify_example(run: _MilpRun, b: int, deadline: float | None) -> MilpOutcome:
    """Stages for example ``b``: the batch attack's counterexample, the (refined) bounds and the LP
    screen, PGD from the LP optima, then one MILP per group the LP left open."""
    ex = _Example(b, time.perf_counter(), deadline, run.inputs.select([b]), run.spec.select([b]),
                  np.full(run.G, -np.inf), np.full(run.G, np.inf),
                  {"bounds": run.bounds_used, "solver": run.solver_name, "margin": run.margin})
    no_rows = np.full(len(run.groups), -np.inf)
    if run.attacked is not None and bool(run.attacked.found[b]):
        return _falsified(run, ex, run.attacked.x_adv[b : b + 1], "attack", no_rows)
    screened = _lp_screen(run, ex)
    if screened is None:
        return ex.outcome("unknown", no_rows)
    bnds, lpres, t_lp = screened
    row_lower = lpres.lower[0].numpy().copy()
    for g in range(run.G):
        ex.gl[g] = row_lower[run.groups == g].max()
    lp_proved = ex.gl > 1e-9
    ex.det["lp_proved_groups"] = int(lp_proved.sum())
    g_order, found = _attack_from_lp_optima(run, ex, lpres, row_lower, lp_proved)
    if found is not None:
        return _falsified(run, ex, found, "attack from an LP optimum", row_lower)
    # the MILPs are not started when building them would pass the deadline
    if deadline is not None and deadline - time.perf_counter() < t_lp and not bool(lp_proved.all()):
        ex.det["reason"] = "time limit before the MILP"
        return ex.outcome("unknown", row_lower)
    return _solve_groups(run, ex, bnds, row_lower, lp_proved, g_order)


def _falsified(run: _MilpRun, ex: _Example, x: Tensor, found_by: str, row_lower: np.ndarray) -> MilpOutcome:
    """The outcome for a confirmed counterexample ``x [1, *shape]`` found by an attack."""
    gmx = _margins(run.model, x, ex.spec_b, torch.float64)[0].cpu().numpy()
    ex.gu = np.minimum(ex.gu, gmx)
    ex.det.update(found_by=found_by, note="confirmed")
    return ex.outcome("falsified", row_lower, x[0].double().cpu())


def _lp_screen(run: _MilpRun, ex: _Example) -> tuple[list, Any, float] | None:
    """The example's pre-activation bounds (LP-refined with ``refine``) and the LP's safe lower
    bounds of the rows: ``(bounds, LP result, seconds of the LP)``; ``None`` on solver trouble
    (the reason in ``ex.det``)."""
    b = ex.b
    bnds = [(lo[b].numpy().copy(), hi[b].numpy().copy()) for lo, hi in run.initial]
    try:
        if run.refine:
            bnds, ex.det["refine"] = tighten_bounds(run.net, run.regions[b], bnds, solver=run.solver, deadline=ex.deadline)
        t_lp = time.perf_counter()
        lpres = lp_lower_bounds(run.net, ex.in_b, ex.spec_b, solver=run.solver, net=run.net, bounds=[bnds],
                                deadline=Deadline.until(ex.deadline))
    except SolverError as e:
        ex.det["reason"] = f"solver: {e}"
        return None
    return bnds, lpres, time.perf_counter() - t_lp  # ~ the cost of encoding and building the MILP too


def _attack_from_lp_optima(
    run: _MilpRun, ex: _Example, lpres: Any, row_lower: np.ndarray, lp_proved: np.ndarray
) -> tuple[dict[int, float], Tensor | None]:
    """PGD from the LP optima of the open groups (a violation often sits near them). Returns the
    order of the groups for the MILPs (lowest margin seen first: likely violations first) and a
    confirmed counterexample ``[1, *shape]`` or ``None``."""
    open_g = [g for g in range(run.G) if not lp_proved[g]]
    g_order = {g: (float(run.gm_att[ex.b, g]) if run.gm_att is not None else 0.0) for g in range(run.G)}
    if not (run.attack and open_g and not run.exact):
        return g_order, None
    groups, pts = run.groups, lpres.points[0]
    rows_of = [int(np.flatnonzero(groups == g)[np.argmax(row_lower[groups == g])]) for g in open_g]
    starts = torch.from_numpy(pts[rows_of]).reshape(len(open_g), 1, *run.inputs.shape)
    with _one_thread():
        near = pgd_attack(run.model, ex.in_b, ex.spec_b, steps=LP_START_STEPS, step_size=2.0 / LP_START_STEPS,
                          starts=starts, start_groups=open_g)
    gmx = _margins(run.model, near.x_adv, ex.spec_b, torch.float64)[0].cpu().numpy()  # [G]
    for g in open_g:
        g_order[g] = min(g_order[g], float(gmx[g]))
    return g_order, (near.x_adv if bool(near.found[0]) else None)


def _solve_groups(
    run: _MilpRun, ex: _Example, bnds: list, row_lower: np.ndarray, lp_proved: np.ndarray, g_order: dict[int, float]
) -> MilpOutcome:
    """Encode the MILP of example ``ex.b`` once and solve it per open group (lowest ``g_order``
    first): proved when every group's optimum clears its margin, falsified by a confirmed
    solution point, unknown otherwise (reasons in the details)."""
    b, det = ex.b, ex.det
    enc = encode(run.net, run.regions[b], bnds, integer=True)
    det["milp"] = dict(enc.stats)
    lp, rows, t_col, M, const = _add_spec_rows(enc, run.net, run.C[b], run.d[b], with_t=True)
    try:
        be = make_backend(lp, run.solver, threads=run.threads)
    except SolverError as e:
        det["reason"] = f"solver: {e}"
        return ex.outcome("unknown", row_lower)
    det["solver"] = be.name
    if isinstance(be, GurobiBackend):  # be.name == "gurobi"
        det["milp"].update(solver_variables=be.num_vars, solver_constraints=be.num_constraints)
    cost = np.zeros(lp.num_cols)
    cost[t_col] = 1.0
    be.set_objective(cost)
    reg = run.regions[b]
    x_start = (run.attacked.x_adv[b].double().cpu().reshape(-1).numpy() if run.attacked is not None
               else (reg.center if reg.center is not None else (reg.lo + reg.hi) / 2))
    v_start = enc.point(run.net, x_start)
    # the encoding must contain this point of the input set (else the bounds are invalid)
    if not _bounds_contain(run.net, bnds, x_start) or not _encoding_contains(enc.lp, v_start):
        det["reason"] = "the pre-activation bounds exclude a point of the input set (invalid bounds)"
        return ex.outcome("unknown", row_lower)
    loop = _GroupLoop(run, ex, be, rows, t_col, M, const, enc, v_start, lp_proved)
    for g in sorted((g for g in range(run.G) if not lp_proved[g] or run.exact), key=lambda g: g_order[g]):
        if not loop.solve(g):
            break
    return loop.finish(row_lower)


class _GroupLoop:
    """The per-group MILPs of one example on one backend, and what they establish."""

    def __init__(self, run: _MilpRun, ex: _Example, be: Any, rows: np.ndarray, t_col: int, M: Any, const: np.ndarray,
                 enc: NetEncoding, v_start: np.ndarray, lp_proved: np.ndarray) -> None:
        self.run, self.ex, self.be, self.rows, self.t_col, self.const = run, ex, be, rows, t_col, const
        self.enc, self.v_start, self.lp_proved = enc, v_start, lp_proved
        self.M = M
        self.row_vals = np.asarray(M @ v_start + const).ravel()
        self.row_floor = _interval_rows(M, const, enc.lp)  # valid lower bounds of every row
        self.gmargin = _group_margins(M, const, enc.lp, run.groups, run.margin)
        ex.det["group_margins"] = self.gmargin.tolist()
        self.status = "certified"
        self.cex: Tensor | None = None
        self.reasons: list[str] = []
        self.errors: list[tuple[int, str]] = []
        self.per_group: dict = {}

    def _run_milp(self, g: int, rest: float | None) -> Any:
        """Solve group ``g``'s MILP ``min t s.t. every row of g <= t`` within ``rest`` seconds."""
        be, rows, sel, ex = self.be, self.rows, np.flatnonzero(self.run.groups == g), self.ex
        t_lo = max(ex.gl[g], self.row_floor[sel].max())
        be.set_row_bounds(rows, np.full(len(rows), -np.inf), np.full(len(rows), np.inf))
        be.set_row_bounds(rows[sel], np.full(len(sel), -np.inf), -self.const[sel])
        be.set_col_bounds([self.t_col], [t_lo], [np.inf])
        self.per_group[g] = {"binaries": _set_needed_binaries(be, self.enc, self.M[sel])}  # other groups' rows are free
        t_start = max(self.row_vals[sel].max(), t_lo)
        if self.run.exact:
            return be.solve(time_limit=rest, start=np.r_[self.v_start, t_start], rel_gap=0.0, abs_gap=1e-9)
        # proof mode: only solutions with t < margin matter (cutoff prunes the rest), no primal
        # heuristics; stop at the first t <= 0 (a candidate counterexample)
        mg = float(self.gmargin[g])
        start = np.r_[self.v_start, t_start] if t_start < mg else None
        return be.solve(time_limit=rest, start=start, stop_bound_above=mg, stop_primal_below=0.0, cutoff=mg, heuristics=False)

    def solve(self, g: int) -> bool:
        """Solve group ``g`` and record what it shows; ``False``: stop (deadline or, outside exact
        mode, a confirmed counterexample)."""
        run, ex = self.run, self.ex
        rest = None if ex.deadline is None else ex.deadline - time.perf_counter()
        if rest is not None and rest <= 0:
            self.per_group[g] = "not run (time limit)"
            self.status = "unknown"
            self.reasons.append("time limit before all groups were solved")
            return False
        r = self._run_milp(g, rest)
        self.per_group[g] = {"status": r.status, "bound": r.bound, "objective": r.objective, "time_s": round(r.time_s, 3),
                             **self.per_group.get(g, {}), **r.extra}
        if r.status in ("infeasible", "error"):
            # the encoding holds a point of the set (checked before): an empty MILP means solver
            # trouble; report, never prove
            self.status = "unknown"
            if r.status == "error":
                self.errors.append((g, r.message))
            else:
                self.reasons.append(f"group {g}: MILP reported infeasible")
            return True
        bound = r.bound if run.exact else min(r.bound, float(self.gmargin[g]))  # nodes past the cutoff were pruned
        if math.isfinite(bound):
            ex.gl[g] = max(ex.gl[g], bound)
        ex.gu[g] = min(ex.gu[g], r.objective)
        if _proved(ex.gl[g], self.lp_proved[g], float(self.gmargin[g])):
            return True
        if r.x is not None and r.objective <= 0:
            xs = torch.from_numpy(r.x[self.enc.x_cols]).reshape(1, *run.inputs.shape)
            ok, xc, note = repair_counterexample(run.model, ex.in_b, ex.spec_b, xs, group=g)
            if ok:
                self.cex, self.status = xc[0].double().cpu(), "falsified"
                ex.det.update(found_by="milp", note=note)
                return run.exact
            self.reasons.append(f"group {g}: {note}")
        if self.status != "falsified":
            self.status = "unknown"
            if r.status == "time_limit":
                self.reasons.append(f"group {g}: time limit (dual bound {r.bound:.4g})")
            elif r.status == "optimal":
                self.reasons.append(f"group {g}: optimum {r.objective:.4g} within the margin {run.margin:g} of 0")
        return True

    def finish(self, row_lower: np.ndarray) -> MilpOutcome:
        """The example's outcome; single-row groups raise their row's lower bound to the MILP's."""
        run, ex, groups = self.run, self.ex, self.run.groups
        for g in range(run.G):
            if (groups == g).sum() == 1 and math.isfinite(ex.gl[g]):
                i = int(np.flatnonzero(groups == g)[0])
                row_lower[i] = max(row_lower[i], ex.gl[g])
        status = self.status
        if status == "certified" and not all(_proved(ex.gl[g], self.lp_proved[g], float(self.gmargin[g])) for g in range(run.G)):
            status = "unknown"
        ex.det["groups"] = {str(k): v for k, v in self.per_group.items()}
        if self.errors:
            self.reasons.append("solver error " + _join_errors(self.errors))
        if self.reasons and status != "falsified":
            ex.det["reason"] = "; ".join(self.reasons)
        ex.det["time_s"] = time.perf_counter() - ex.t0
        return MilpOutcome(status, ex.gl, ex.gu, row_lower, self.cex, ex.det)


# ------------------------------------------------------------------------------------------
# minimum adversarial distortion


@dataclass
class DistortionResult:
    """Exact minimum distortion of one example (within solver tolerance).

    Attributes:
        value: distance of the closest confirmed adversarial example found (``inf`` if none
            exists within ``eps_max``): an upper bound on the true minimum ``d*``.
        lower: the MILP dual bound, a lower bound on ``d*`` (within solver tolerance); a sound
            certified radius is anything strictly below it (:attr:`certified_radius`).
        eps_max: the radius the big-M bounds were computed for.
        status: "optimal" (``value - lower <= 1e-4 (1 + value)``, see ``gap``), "time_limit",
            "no_adversarial" (none within ``eps_max``, or anywhere in the domain: ``lower = inf``),
            "unconfirmed" (a MILP optimum closer than ``value`` failed the forward-pass check:
            ``[lower, value]`` still brackets ``d*``) or "error" (solver / licence error, reason in
            ``details``).
        counterexample: ``[*shape]`` float64, the adversarial input at distance ``value`` (as confirmed,
            not rounded to the model's dtype).
    """

    value: float
    lower: float
    eps_max: float
    status: str
    counterexample: Tensor | None = None
    details: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.value - self.lower

    @property
    def certified_radius(self) -> float:
        """``max(0, lower (1 - 1e-5) - 1e-6)``: below the MILP dual bound by a margin for the
        solver's dual tolerance."""
        if math.isnan(self.lower):
            return 0.0
        if math.isinf(self.lower):
            return math.inf if self.lower > 0 else 0.0
        return max(0.0, self.lower * (1 - 1e-5) - 1e-6)


def _lp_norm(v: np.ndarray, p: float) -> float:
    return float(np.abs(v).max()) if math.isinf(p) else float(np.linalg.norm(v, ord=p))


def _domain_radius(c: np.ndarray, dlo: np.ndarray, dhi: np.ndarray, p: float) -> float:
    far = np.maximum(c - dlo, dhi - c)
    return _lp_norm(far, p)


#: :func:`minimum_distortion` re-computes the bounds and the MILP for the remaining groups once an
#: adversarial example closer than this fraction of the current radius is known
SHRINK_REBUILD = 0.97


def minimum_distortion(
    model: torch.nn.Module,
    x: Tensor,
    labels: Tensor | int | OutputProperty,
    norm: str | float = "inf",
    domain: tuple[float | Tensor, float | Tensor] | None = (0.0, 1.0),
    timeout: float | None = 60.0,
    *,
    solver: str = "auto",
    bounds_method: str = "crown",
    refine: bool = True,
    eps_max: float | None = None,
    threads: int = 1,
    return_details: bool = False,
) -> Tensor | tuple[Tensor, list[DistortionResult]]:
    """Exact minimum adversarial distortion ``d* = min {||x' - x||_p : x' in domain, property
    violated at x'}`` by MILP (the "minimum adversarial distortion" of Tjeng et al. 2019).

    Per group ``g`` of the property one MILP ``min eps s.t. ||x' - x||_p <= eps, all rows of g
    <= 0``; ``d* = min_g``. Groups run in order of the clean margins; each later group gets the
    best distance so far as an upper bound on ``eps`` (often making it infeasible at once). The
    big-M bounds are valid on the ball of radius ``eps_max`` = the distance of a PGD adversarial
    example (searched on a doubling radius grid), or the whole domain when none is found, or the
    given ``eps_max`` (then ``d* > eps_max`` is reported as "no_adversarial" with
    ``lower = eps_max``).

    Tolerance: ``value`` is the distance of an input confirmed adversarial by a float32 and float64
    forward pass (an upper bound on ``d*``, at most ~1e-6 above the MILP optimum after the repair
    steps of :func:`verify.attack.repair_counterexample`); ``lower`` is the MILP dual bound (relative gap 1e-5), a
    lower bound on ``d*`` up to the solver's tolerances. Every sound certified radius ``r`` obeys
    ``r < d* <= value``.

    Args:
        model: ReLU chain network ``[B, *shape] -> [B, K]``.
        x: clean inputs ``[B, *shape]``.
        labels: ``[B]`` labels (Robust property) or any output property.
        norm: "inf" or 1; 2 needs an MIQP solver (Gurobi; HiGHS raises SolverError).
        domain: valid input range ``(lo, hi)`` (floats or tensors broadcastable to ``x``) or ``None`` (then ``eps_max`` or an attack
            must bound the search).
        timeout: seconds per example.
        return_details: also return the :class:`DistortionResult` list.

    Returns:
        ``values [B]`` float64 (and the details when asked).
    """
    p = parse_norm(norm)
    solver_name = resolve_solver(solver)
    if p == 2.0 and solver_name != "gurobi":
        raise SolverError("minimum l_2 distortion is a mixed-integer QP; HiGHS has no MIQP (install gurobipy with a licence and use solver='gurobi')")
    prop = labels if isinstance(labels, OutputProperty) else Robust(labels)
    dtype, dev = _model_dtype(model)
    x = x.to(device=dev, dtype=dtype)
    B = x.shape[0]
    shape = tuple(x.shape[1:])
    net = relu_net(model, shape)
    with torch.no_grad():
        y0 = model(x).reshape(B, -1)
    spec = prop.linear(B, y0.shape[1], device=dev, dtype=torch.float64)
    if domain is None:
        dlo = dhi = None
    else:
        dlo = torch.as_tensor(domain[0], dtype=torch.float64).to(dev).expand(x.shape).to(dtype)
        dhi = torch.as_tensor(domain[1], dtype=torch.float64).to(dev).expand(x.shape).to(dtype)
    results = []
    for b in range(B):
        dl = None if dlo is None else dlo[b : b + 1]
        dh = None if dhi is None else dhi[b : b + 1]
        results.append(_distortion_one(model, net, x[b : b + 1], spec.select([b]), p, dl, dh, timeout, solver, bounds_method, refine, eps_max, threads))
    vals = torch.tensor([r.value for r in results], dtype=torch.float64)
    return (vals, results) if return_details else vals


def _attack_radius(model, x, spec, p, top, dl, dh, c) -> tuple[float, Tensor | None]:
    """Smallest PGD-adversarial distance found: radii ``top 2^-k`` (k = 10..0) in one batch, then
    8 radii between the first success and half of it. Returns ``(distance, point)`` of a
    confirmed adversarial input, or ``(inf, None)``."""
    best_val, best_x = math.inf, None
    radii = [top * 2.0**-k for k in range(10, -1, -1)]
    for rnd in range(2):
        R = len(radii)
        ball = LpBall(x.expand(R, *x.shape[1:]).clone(), torch.tensor(radii, dtype=x.dtype, device=x.device), p, dl, dh)
        specR = LinearSpec(spec.C.expand(R, -1, -1), spec.d.expand(R, -1), spec.groups)
        with _one_thread():
            res = pgd_attack(model, ball, specR, steps=40, restarts=2, seed=0)
        hit = None
        for i in range(R):
            if bool(res.found[i]):
                xc = res.x_adv[i : i + 1]
                dist = _lp_norm(xc.double().cpu().reshape(-1).numpy() - c, p)
                if dist < best_val:
                    best_val, best_x = dist, xc
                hit = i
                break
        if hit is None or rnd == 1:
            break
        e = radii[hit]
        radii = list(np.linspace(e / 2, e, 9)[:-1])
    return best_val, best_x


def _distortion_one(model, net, x, spec, p, dl, dh, timeout, solver_name, bounds_method, refine, eps_max, threads) -> DistortionResult:
    """:func:`minimum_distortion` for one example ``x [1, *shape]``; ``dl, dh``: domain
    ``[1, *shape]`` or ``None``. A PGD distance on a radius grid bounds the search, then one MILP
    per group (:class:`_DistortionSearch`)."""
    t0 = time.perf_counter()
    deadline = None if timeout is None else t0 + timeout
    c = x.double().cpu().reshape(-1).numpy()
    dlo = np.full(len(c), -np.inf) if dl is None else dl.double().cpu().reshape(-1).numpy()
    dhi = np.full(len(c), np.inf) if dh is None else dh.double().cpu().reshape(-1).numpy()
    det: dict = {"norm": "linf" if math.isinf(p) else f"l{int(p)}", "solver": resolve_solver(solver_name)}
    gm0 = _margins(model, x, spec, torch.float64)[0].cpu().numpy()
    if (gm0 <= 0).any() and repair_counterexample(model, None, spec, x)[0]:
        return DistortionResult(0.0, 0.0, 0.0, "optimal", x[0].cpu(), {"note": "the clean input already violates the property"})
    # 1. attack on a doubling radius grid -> eps_max
    top = eps_max if eps_max is not None else _domain_radius(c, dlo, dhi, p)
    if not math.isfinite(top):
        raise ValueError("minimum_distortion: give a finite domain or eps_max")
    best_val, best_x = _attack_radius(model, x, spec, p, top, dl, dh, c)
    det["attack_distance"] = best_val
    emax = float(min(top, best_val) if math.isfinite(best_val) else top)
    det["eps_max"] = emax
    # 2. bounds valid on the ball of radius emax and the MILP, then one MILP per group
    search = _DistortionSearch(model, net, x, spec, p, dl, dh, deadline, solver_name, bounds_method, refine, threads,
                               best_val, best_x, det)
    try:
        search.build(emax, first=True)
    except SolverError as e:
        det["reason"] = f"solver: {e}"
        det["time_s"] = time.perf_counter() - t0
        return DistortionResult(best_val, 0.0, emax, "error", None if best_x is None else best_x[0].double().cpu(), det)
    # one MILP per group (measured on the digits MLP: a single MILP over all groups with a
    # binary per group is up to 5x faster on some l_inf inputs but far slower on others, and
    # its big-M output rows make the l_2 MIQP time out; per group is the predictable choice)
    order = [int(g) for g in np.argsort(gm0)]
    for g in order:
        search.solve(g, last=g == order[-1])
    result = search.result(emax, eps_max)
    det["time_s"] = time.perf_counter() - t0
    return result


class _DistortionSearch:
    """The per-group MILPs of :func:`minimum_distortion` for one example, on bounds valid for the
    ball of radius ``R`` around ``x`` (rebuilt on a smaller ball when a closer adversarial
    example shrinks the search enough: :data:`SHRINK_REBUILD`)."""

    def __init__(self, model, net, x, spec, p, dl, dh, deadline, solver_name, bounds_method, refine, threads,
                 best_val: float, best_x: Tensor | None, det: dict) -> None:
        self.model, self.net, self.x, self.spec, self.p, self.dl, self.dh = model, net, x, spec, p, dl, dh
        self.deadline, self.solver_name, self.bounds_method, self.refine, self.threads = deadline, solver_name, bounds_method, refine, threads
        self.c = x.double().cpu().reshape(-1).numpy()
        self.C = spec.C[0].detach().double().cpu().numpy()
        self.d = spec.d[0].detach().double().cpu().numpy()
        self.groups = spec.groups.cpu().numpy()
        self.G = int(self.groups.max()) + 1
        self.best_val, self.best_x, self.det = best_val, best_x, det
        self.glow = np.zeros(self.G)  # lower bound of each group's minimum distance (0 = nothing known)
        self.per_group: dict[int, Any] = {}
        self.timed_out = False
        self.errors: list[tuple[int, str]] = []

    def build(self, radius: float, first: bool = False) -> None:
        """Bounds valid on the ball of ``radius`` (for l_2: CROWN on the l_2 ball, intervals and the
        LP refinement on its box enclosure, which contains it), the MILP and its backend."""
        x, p, c, net = self.x, self.p, self.c, self.net
        ball = LpBall(x, radius, p, self.dl, self.dh)
        ib, used = initial_bounds(self.model, net, ball, self.bounds_method)
        reg = regions_of(LpBall(x, radius, math.inf, self.dl, self.dh) if p == 2.0 else ball)[0]
        bnds = [(lo[0].numpy().copy(), hi[0].numpy().copy()) for lo, hi in ib]
        ref = None
        if self.refine:
            bnds, ref = tighten_bounds(net, reg, bnds, solver=self.solver_name, deadline=self.deadline)
        enc = encode(net, reg, bnds, integer=True) if p == 2.0 else encode(net, reg, bnds, integer=True, distortion=(p, radius))
        self._check_probes(enc, bnds, radius)
        lp, rows, _, self.M, const = _add_spec_rows(enc, net, self.C, self.d, with_t=False)
        be = make_backend(lp, self.solver_name, threads=self.threads, keep=enc.x_cols, quadratic=p == 2.0)
        cost = np.zeros(lp.num_cols)
        if p == 2.0:
            cost[enc.x_cols] = -2 * c
            be.set_objective(cost, float(c @ c), qdiag=(enc.x_cols, np.ones(len(c))))
        else:
            cost[enc.eps_col] = 1.0
            be.set_objective(cost)
        stats = dict(enc.stats)
        if isinstance(be, GurobiBackend):  # be.name == "gurobi"
            stats.update(solver_variables=be.num_vars, solver_constraints=be.num_constraints)
        self.enc, self.lp, self.rows, self.const, self.be, self.R = enc, lp, rows, const, be, radius
        if first:
            self.det["bounds"], self.det["milp"], self.det["solver"] = used, stats, be.name
            if ref is not None:
                self.det["refine"] = ref
        else:
            self.det.setdefault("rebuilt", []).append({"radius": radius, **stats})

    def _check_probes(self, enc: NetEncoding, bnds: list, radius: float) -> None:
        """Points of the ball (the centre, the best adversarial example) must satisfy the encoding,
        else its pre-activation bounds are invalid and so would be any radius."""
        c, p, net = self.c, self.p, self.net
        probes = [(c, 0.0)]
        if self.best_x is not None:
            xb = self.best_x.double().cpu().reshape(-1).numpy()
            if _lp_norm(xb - c, p) <= radius:
                probes.append((xb, _lp_norm(xb - c, p)))
        for xp, dist in probes:
            if not _bounds_contain(net, bnds, xp) or not _encoding_contains(enc.lp, enc.point(net, xp, eps=None if p == 2.0 else dist)):
                raise SolverError("the pre-activation bounds exclude a point of the input set (invalid bounds)")

    def _start(self, g: int, sel: np.ndarray) -> np.ndarray | None:
        """The best adversarial example as a MILP start for group ``g`` when it violates ``g``."""
        if self.best_x is None or _margins(self.model, self.best_x, self.spec, torch.float64)[0, g] > 0:
            return None
        xb = self.best_x.double().cpu().reshape(-1).numpy()
        point = self.enc.point(self.net, xb, eps=_lp_norm(xb - self.c, self.p))
        return point if np.all(self.lp.A[self.rows[sel]] @ point <= -self.const[sel] + 1e-9) else None

    def solve(self, g: int, last: bool) -> None:
        """Group ``g``'s MILP ``min ||x' - x||_p s.t. every row of g <= 0`` below the best distance
        so far; a solution point, confirmed, becomes the best adversarial example."""
        be, rows, sel, p = self.be, self.rows, np.flatnonzero(self.groups == g), self.p
        be.set_row_bounds(rows, np.full(len(rows), -np.inf), np.full(len(rows), np.inf))
        be.set_row_bounds(rows[sel], np.full(len(sel), -np.inf), -self.const[sel])
        cutoff = min(self.best_val, self.R)
        if p != 2.0:
            be.set_col_bounds([self.enc.eps_col], [0.0], [cutoff])
        binaries = _set_needed_binaries(be, self.enc, self.M[sel])
        start = self._start(g, sel)
        rest = None if self.deadline is None else self.deadline - time.perf_counter()
        if rest is not None and rest <= 0:
            self.timed_out = True
            self.per_group[g] = "not run (time limit)"
            return
        # l_2: the objective is the squared distance; solutions at distance >= cutoff (where the
        # bounds may not hold, outside the l_2 ball of radius R) are pruned by the solver
        # (the l_2 cutoff is widened by 1e-6 so that points at distance exactly R stay in)
        r = be.solve(time_limit=rest, start=start, rel_gap=1e-5, abs_gap=1e-7, cutoff=(cutoff * (1 + 1e-6) + 1e-9) ** 2 if p == 2.0 else None)
        self.per_group[g] = {"status": r.status, "bound": r.bound, "objective": r.objective, "time_s": round(r.time_s, 3),
                             "binaries": binaries, **r.extra}
        if r.status in ("infeasible", "cutoff"):
            self.glow[g] = cutoff
            return
        if r.status == "error":
            self.errors.append((g, r.message))
            return
        if r.status != "optimal":
            self.timed_out = True
        bound = r.bound if p != 2.0 else math.sqrt(max(r.bound, 0.0))
        self.glow[g] = max(0.0, min(bound, cutoff)) if math.isfinite(bound) else 0.0
        if r.x is not None:
            self._take_solution(g, torch.from_numpy(r.x[self.enc.x_cols]).reshape(1, *self.x.shape[1:]))
        # the remaining groups only need the ball of radius best_val: when it is clearly
        # smaller than the one the bounds were computed for, tighter bounds (fewer unstable
        # neurons, smaller big-M constants) pay for the rebuild
        if self.best_val < SHRINK_REBUILD * self.R and not last and (self.deadline is None or time.perf_counter() < self.deadline):
            try:
                self.build(self.best_val)
            except SolverError:
                pass

    def _take_solution(self, g: int, xs: Tensor) -> None:
        """Confirm the MILP's point ``xs [1, *shape]`` (repaired, else pushed slightly away from
        the centre: the optimum sits on a decision boundary) and keep it if it is closer."""
        dom = None
        if self.dl is not None:
            dom = Box(self.dl.double().cpu().expand_as(xs).clone(), self.dh.double().cpu().expand_as(xs).clone())
        ok, xc, note = repair_counterexample(self.model, dom, self.spec, xs, group=g)
        if not ok:
            centre = torch.from_numpy(self.c).reshape_as(xs)
            for gamma in (1e-6, 1e-5, 1e-4, 1e-3):
                xt = centre + (1 + gamma) * (xs - centre)
                if dom is not None:
                    xt = dom.project(xt)
                ok, xc, note = repair_counterexample(self.model, dom, self.spec, xt, group=g)
                if ok:
                    break
        if ok:
            dist = _lp_norm(xc.double().cpu().reshape(-1).numpy() - self.c, self.p)
            if dist < self.best_val:
                self.best_val, self.best_x = dist, xc
        else:
            self.per_group[g]["note"] = note

    def result(self, emax: float, eps_max: float | None) -> DistortionResult:
        """The distance, its lower bound and the status from what the groups showed."""
        best_val, G, det = self.best_val, self.G, self.det
        lower = float(min(self.glow.min(), best_val)) if G else math.inf
        all_pruned = len(self.per_group) == G and all(
            isinstance(v, dict) and v["status"] in ("infeasible", "cutoff") for v in self.per_group.values())
        if self.errors:
            status = "error"
            det["reason"] = "solver error: " + _join_errors(self.errors)
        elif self.timed_out:
            status = "time_limit"
        elif not math.isfinite(best_val) and all_pruned:
            # every group's MILP is empty below the radius: none within eps_max (or the domain)
            status = "no_adversarial"
            lower = emax if eps_max is not None else math.inf
        elif math.isfinite(best_val) and best_val - lower <= 1e-4 * (1 + best_val):
            status = "optimal"
        else:
            # a MILP optimum below the best confirmed distance that no forward pass confirms
            status = "unconfirmed"
            det["reason"] = "a MILP solution closer than any confirmed adversarial example was not confirmed by a forward pass"
        det["groups"] = {str(k): v for k, v in self.per_group.items()}
        return DistortionResult(best_val, lower, emax, status, None if self.best_x is None else self.best_x[0].double().cpu(), det)
