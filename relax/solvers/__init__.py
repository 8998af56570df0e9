"""A small common interface over the LP/MILP solvers: HiGHS (highspy, always there) and Gurobi
(gurobipy, optional, used when it imports and its licence starts; ``solver="auto"`` uses it only
for models that fit the licence -- gurobipy's pip licence allows 2000 variables and 2000
constraints, 200 variables once the objective is quadratic -- and HiGHS otherwise). Gurobi also
solves the mixed-integer QPs of the minimum l_2 distortion, which HiGHS cannot.

The problem form is the textbook one, built from scipy.sparse matrices::

    minimise    c^T x + offset
    subject to  row_lo <= A x <= row_hi,   col_lo <= x <= col_hi,   x_j integer (j in integer)

A backend is built once per model and re-solved with changed costs or column bounds (HiGHS and
Gurobi both keep the basis, so the re-solves are warm-started).

Sound LP bounds (:func:`safe_dual_bound`): a simplex optimum carries the solver's feasibility
tolerances (~1e-7), so its objective value is not a proof. Any row-multiplier vector ``y`` gives a
valid lower bound by weak duality when every column is boxed (Neumaier & Shcherbina, "Safe bounds
in linear and mixed-integer programming", Math. Programming 99, 2004)::

    c^T x = y^T (A x) + (c - A^T y)^T x
          >= sum_i min(y_i row_lo_i, y_i row_hi_i) + sum_j min(r_j col_lo_j, r_j col_hi_j)

with ``r = c - A^T y``. We evaluate it in float64 with the solver's duals (signs clipped so that
no multiplier multiplies an infinite side) and subtract ``1e-9 * (1 + sum of |terms|)`` for the
round-off of that sum: the result is a lower bound of the LP *whatever the solver's tolerances*.
MILP dual bounds come from the solver's branch-and-bound and are trusted only up to its
tolerances; callers add their own margin (see :mod:`relax.exact.milp`). For a convex diagonal QP the
same bound holds with the quadratic columns' terms minimised in closed form.

To fit a size-limited licence the Gurobi backend substitutes, in a MILP that would not fit
otherwise, the columns that an equality row defines (pre-activations, stably active neurons): an
equivalent model with one variable per input and two per unstable neuron
(:func:`_eliminate_defined_columns`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from gurobipy import Constr

__all__ = [
    "LinearProgram",
    "SolveResult",
    "SolverError",
    "Backend",
    "HighsBackend",
    "GurobiBackend",
    "gurobi_available",
    "gurobi_size_limits",
    "gurobi_fits",
    "PIP_LICENCE_LIMITS",
    "resolve_solver",
    "make_backend",
    "safe_dual_bound",
    "SOLVERS",
]

SOLVERS = ("auto", "highs", "gurobi")
INF = math.inf


class SolverError(RuntimeError):
    """A requested solver is unavailable or cannot handle the problem (e.g. MIQP on HiGHS)."""


@dataclass
class LinearProgram:
    """``min c^T x + offset  s.t.  row_lo <= A x <= row_hi, col_lo <= x <= col_hi``.

    Attributes:
        A: ``[m, n]`` scipy sparse matrix.
        row_lo, row_hi: ``[m]`` (``-inf`` / ``inf`` for a missing side).
        col_lo, col_hi: ``[n]``.
        c: ``[n]`` costs; offset: constant added to the objective.
        integer: ``[n]`` bool, the integer (here: binary) columns; ``None`` for an LP.
    """

    A: sp.spmatrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    c: np.ndarray
    offset: float = 0.0
    integer: np.ndarray | None = None

    @property
    def num_cols(self) -> int:
        return self.A.shape[1]

    @property
    def num_rows(self) -> int:
        return self.A.shape[0]

    @property
    def is_mip(self) -> bool:
        return self.integer is not None and bool(np.any(self.integer))


@dataclass
class SolveResult:
    """Outcome of one solve.

    Attributes:
        status: ``"optimal"``, ``"infeasible"``, ``"cutoff"`` (no solution below the cutoff),
            ``"time_limit"``, ``"interrupted"`` (our own early stop), ``"unbounded"`` or ``"error"``.
        objective: value of the best primal solution found (``inf`` if none).
        bound: a lower bound on the minimum (LP: :func:`safe_dual_bound`; MILP: the solver's
            dual bound; ``-inf`` if none is known).
        x: ``[n]`` best primal solution or ``None``.
        message: solver status text for ``details``.
        time_s: wall time of the solve.
    """

    status: str
    objective: float = INF
    bound: float = -INF
    x: np.ndarray | None = None
    message: str = ""
    time_s: float = 0.0
    extra: dict = field(default_factory=dict)


def safe_dual_bound(
    lp: LinearProgram, c: np.ndarray, y: np.ndarray | None, offset: float = 0.0, qdiag: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Rigorous lower bound of ``min c^T x + offset (+ sum_j w_j x_j^2)`` over the LP from any row
    multipliers ``y``.

    ``y [m]``: row duals in the convention "reduced cost = c - A^T y" (HiGHS and Gurobi for a
    minimisation). Multipliers on a side that is infinite are set to 0 (any such vector is
    dual-feasible for the boxed problem). Returns ``-inf`` when a reduced cost meets an infinite
    column bound. See the module docstring for the formula and the round-off margin.

    ``qdiag = (cols, w)`` with ``w >= 0`` (a convex diagonal QP): the term of such a column is
    ``min_{x_j in [lo_j, hi_j]} w_j x_j^2 + r_j x_j`` (at the clipped stationary point), still a
    lower bound by weak duality of the Lagrangian.
    """
    m = lp.num_rows
    y = np.zeros(m) if y is None else np.asarray(y, dtype=np.float64).copy()
    y[(y > 0) & ~np.isfinite(lp.row_lo)] = 0.0
    y[(y < 0) & ~np.isfinite(lp.row_hi)] = 0.0
    r = np.asarray(c, dtype=np.float64) - lp.A.T @ y
    row_terms = np.where(y > 0, y * np.where(np.isfinite(lp.row_lo), lp.row_lo, 0.0), 0.0) + np.where(
        y < 0, y * np.where(np.isfinite(lp.row_hi), lp.row_hi, 0.0), 0.0
    )
    quad = np.zeros(len(r), dtype=bool)
    qterms = np.zeros(0)
    if qdiag is not None:
        qc = np.asarray(qdiag[0], dtype=np.int64)
        w = np.asarray(qdiag[1], dtype=np.float64)
        if np.any(w < 0):
            return -INF
        quad[qc] = w > 0
        qc, w = qc[w > 0], w[w > 0]
        lo, hi = lp.col_lo[qc], lp.col_hi[qc]
        xs = np.clip(-r[qc] / (2 * w), lo, hi)  # finite: w > 0
        qterms = w * xs * xs + r[qc] * xs
    pos, neg = (r > 0) & ~quad, (r < 0) & ~quad
    if np.any(pos & ~np.isfinite(lp.col_lo)) or np.any(neg & ~np.isfinite(lp.col_hi)):
        return -INF
    col_terms = np.where(pos, r * np.where(pos, lp.col_lo, 0.0), 0.0) + np.where(neg, r * np.where(neg, lp.col_hi, 0.0), 0.0)
    total = float(row_terms.sum() + col_terms.sum() + qterms.sum() + offset)
    size = float(np.abs(row_terms).sum() + np.abs(col_terms).sum() + np.abs(qterms).sum() + abs(offset))
    if not math.isfinite(total):
        return -INF
    return total - 1e-9 * (1.0 + size) - _reduced_cost_roundoff(lp, c, y)


def _reduced_cost_roundoff(lp: LinearProgram, c: np.ndarray, y: np.ndarray) -> float:
    """Bound on the effect of the float64 round-off of ``r = c - A^T y`` on the dual bound:
    ``|fl(r_j) - r_j| <= gamma_n (|c_j| + (|A|^T |y|)_j)`` (Higham Eq. (3.5), ``n`` the
    column's length), times the column's largest bound. ``r_j`` is often the difference of
    large terms that cancel, so the terms, not ``|r_j|``, set the error (x2 for the other sums)."""
    A = lp.A.tocsc() if hasattr(lp.A, "tocsc") else sp.csc_matrix(lp.A)
    n = int(np.diff(A.indptr).max()) + 2 if A.shape[1] else 2
    g = (n + 2) * 2.0**-53
    mag = np.maximum(np.abs(lp.col_lo), np.abs(lp.col_hi))
    mag = np.where(np.isfinite(mag), mag, 0.0)
    terms = np.abs(np.asarray(c, dtype=np.float64)) + abs(A).T @ np.abs(y)
    return 2.0 * g / (1 - g) * float(terms @ mag)


# ------------------------------------------------------------------------------------------
# availability


_gurobi_state: tuple[bool, str] | None = None
_gurobi_limits: dict[str, int] | None = None

#: the size limits of gurobipy's pip licence (measured with gurobipy 13.0.3: a model with 2001
#: variables or 2001 linear constraints fails with error 10010 "Model too large for
#: size-limited license"; a model with a quadratic term fails above 200 variables in total)
PIP_LICENCE_LIMITS = {"variables": 2000, "constraints": 2000, "quadratic_variables": 200}


def gurobi_available() -> tuple[bool, str]:
    """``(ok, reason)``: gurobipy imports and a licence environment starts. Also probes whether
    the licence is size-limited (the pip licence; see :func:`gurobi_size_limits`)."""
    global _gurobi_state, _gurobi_limits
    if _gurobi_state is None:
        try:
            import gurobipy as gp  # noqa: F401

            env = gp.Env(empty=True)
            env.setParam("OutputFlag", 0)
            env.start()
            probe = gp.Model(env=env)
            try:
                probe.addMVar(PIP_LICENCE_LIMITS["variables"] + 1, lb=0.0, ub=1.0)
                probe.optimize()
                _gurobi_state = (True, "gurobipy licence ok (not size-limited)")
            except gp.GurobiError as e:
                if getattr(e, "errno", None) != 10010:
                    raise
                _gurobi_limits = dict(PIP_LICENCE_LIMITS)
                _gurobi_state = (True, "gurobipy size-limited licence (pip): at most 2000 variables and 2000 constraints, 200 variables with quadratic terms")
            finally:
                probe.dispose()
                env.dispose()
        except ImportError:
            _gurobi_state = (False, "gurobipy is not installed")
        except Exception as e:  # licence errors are gurobipy.GurobiError
            _gurobi_state = (False, f"gurobipy licence: {e}")
    return _gurobi_state


def gurobi_size_limits() -> dict[str, int] | None:
    """The size limits of the Gurobi licence (``PIP_LICENCE_LIMITS`` for the size-limited pip
    licence), or ``None`` when Gurobi is unavailable or not size-limited."""
    gurobi_available()
    return None if _gurobi_limits is None else dict(_gurobi_limits)


def gurobi_fits(variables: int, constraints: int, quadratic: bool = False) -> bool:
    """Whether a model of that size may be solved under the Gurobi licence (``True`` when the
    licence has no size limit)."""
    lim = gurobi_size_limits()
    if lim is None:
        return True
    vmax = lim["quadratic_variables"] if quadratic else lim["variables"]
    return variables <= vmax and constraints <= lim["constraints"]


def resolve_solver(solver: str) -> str:
    """``"auto"`` -> ``"gurobi"`` when available else ``"highs"``; checks explicit names.

    (With ``"auto"``, :func:`make_backend` still uses HiGHS for a model that exceeds a
    size-limited Gurobi licence.)"""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "gurobi" if gurobi_available()[0] else "highs"
    if solver == "gurobi":
        ok, why = gurobi_available()
        if not ok:
            raise SolverError(f"solver='gurobi' requested but {why}")
    return solver


def make_backend(
    lp: LinearProgram, solver: str = "auto", threads: int = 1, *, keep: np.ndarray | None = None,
    eliminate: bool | None = None, quadratic: bool = False, bound_focus: bool = False,
) -> "Backend":
    """A backend holding ``lp`` for repeated solves.

    ``solver="auto"``: Gurobi when it is available and the model fits its licence (after the
    column elimination of :class:`GurobiBackend`), else HiGHS. An explicit ``"gurobi"`` always
    builds the Gurobi model; a licence size error then comes back from ``solve`` as
    ``status="error"`` with Gurobi's message. ``keep``, ``eliminate``: see :class:`GurobiBackend`;
    ``quadratic``: the objective will get a quadratic term (stricter licence limit; HiGHS has no
    MIQP, so ``"auto"`` keeps Gurobi even when it does not fit); ``bound_focus``: see
    :class:`GurobiBackend` (HiGHS: no effect)."""
    name = resolve_solver(solver)
    if name == "gurobi":
        be = GurobiBackend(lp, threads, keep=keep, eliminate=eliminate, quadratic=quadratic, bound_focus=bound_focus)
        if solver == "auto" and not quadratic and not be.fits():
            be.close()
            return HighsBackend(lp, threads)
        return be
    return HighsBackend(lp, threads)


# ------------------------------------------------------------------------------------------
# backends


class Backend:
    """Common interface. ``lp`` is kept in sync with cost / bound changes (for the safe bound)."""

    name: str = ""

    def __init__(self, lp: LinearProgram) -> None:
        self.lp = lp

    def set_objective(self, c: np.ndarray, offset: float = 0.0, qdiag: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Cost ``c [n]`` and constant ``offset``; ``qdiag = (cols, w)`` adds ``sum_j w_j x_j^2``
        (MIQP; Gurobi only)."""
        raise NotImplementedError

    def set_col_bounds(self, idx: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        raise NotImplementedError

    def fits(self, quadratic: bool | None = None) -> bool:
        """Whether the model fits the solver's licence (always, except a size-limited Gurobi)."""
        return True

    def close(self) -> None:
        """Free the solver's model (optional)."""

    def set_row_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        raise NotImplementedError

    def solve(
        self,
        time_limit: float | None = None,
        stop_bound_above: float | None = None,
        stop_primal_below: float | None = None,
        start: np.ndarray | None = None,
        rel_gap: float = 1e-4,
        abs_gap: float = 1e-6,
        cutoff: float | None = None,
        heuristics: bool = True,
    ) -> SolveResult:
        """Solve the current model.

        Args:
            time_limit: seconds (``None``: no limit).
            stop_bound_above: MILP only: stop as soon as the dual bound exceeds this value.
            stop_primal_below: MILP only: stop as soon as a solution with objective <= this value
                is found.
            start: MILP start ``[n]`` (a full feasible assignment), optional.
            rel_gap, abs_gap: MILP termination gaps.
            cutoff: MILP only: only solutions with objective ``< cutoff`` are of interest; nodes
                whose bound reaches it are pruned. If none exists the status is ``"cutoff"``
                and ``bound = cutoff`` (the minimum is ``>= cutoff``).
            heuristics: MILP only: primal heuristics on; ``False`` is "proof mode" (no primal
                heuristics, less strong branching).
        """
        raise NotImplementedError


_highs_banner_done = False


def _new_highs():
    """A ``highspy.Highs`` with output off. HiGHS prints a banner to the process's stdout on the
    first construction; ``relax`` does not print, so that one construction runs with file
    descriptor 1 pointed at /dev/null."""
    global _highs_banner_done
    import os
    import sys

    import highspy

    if _highs_banner_done:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _highs_banner_done = True
    h.setOptionValue("output_flag", False)
    return h


def _highs_status(st, is_mip: bool) -> str:
    import highspy

    S = highspy.HighsModelStatus
    if st == S.kOptimal:
        return "optimal"
    if st == S.kInfeasible:
        return "infeasible"
    if st in (S.kUnbounded, S.kUnboundedOrInfeasible):
        return "unbounded"
    if st == S.kTimeLimit:
        return "time_limit"
    if st in (S.kInterrupt, S.kHighsInterrupt,  # type: ignore[attr-defined, unused-ignore]  # in highspy 1.16, not in its stubs
              S.kObjectiveBound, S.kObjectiveTarget, S.kSolutionLimit):
        return "interrupted"
    if st == S.kIterationLimit:
        return "time_limit"
    return "error"


class HighsBackend(Backend):
    """HiGHS through highspy; one ``Highs`` object per model (basis kept between solves)."""

    name = "highs"

    def __init__(self, lp: LinearProgram, threads: int = 1) -> None:
        import highspy

        super().__init__(lp)
        self._hp = highspy
        h = _new_highs()
        h.setOptionValue("threads", int(threads))
        # keep the MILP's dual bound honest where it matters: tighter integrality tolerance
        h.setOptionValue("mip_feasibility_tolerance", 1e-7)
        A = sp.csc_matrix(lp.A, dtype=np.float64)
        A.sort_indices()
        hl = highspy.HighsLp()
        hl.num_col_ = A.shape[1]
        hl.num_row_ = A.shape[0]
        hl.col_cost_ = np.asarray(lp.c, dtype=np.float64)
        hl.offset_ = float(lp.offset)
        hl.col_lower_ = np.asarray(lp.col_lo, dtype=np.float64)
        hl.col_upper_ = np.asarray(lp.col_hi, dtype=np.float64)
        hl.row_lower_ = np.asarray(lp.row_lo, dtype=np.float64)
        hl.row_upper_ = np.asarray(lp.row_hi, dtype=np.float64)
        hl.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        hl.a_matrix_.start_ = A.indptr.astype(np.int32)
        hl.a_matrix_.index_ = A.indices.astype(np.int32)
        hl.a_matrix_.value_ = A.data
        if lp.is_mip and lp.integer is not None:
            hl.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous for v in lp.integer]
        st = h.passModel(hl)
        if st == highspy.HighsStatus.kError:
            raise SolverError("HiGHS rejected the model (passModel error)")
        self.h = h
        self._stop: dict = {}
        self._cb_on = False

    def set_objective(self, c: np.ndarray, offset: float = 0.0, qdiag=None) -> None:
        if qdiag is not None:
            raise SolverError("HiGHS has no mixed-integer quadratic programming (MIQP); use solver='gurobi'")
        c = np.asarray(c, dtype=np.float64)
        n = self.lp.num_cols
        self.h.changeColsCost(n, np.arange(n, dtype=np.int32), c)
        self.h.changeObjectiveOffset(float(offset))
        self.lp.c = c
        self.lp.offset = float(offset)

    def set_col_bounds(self, idx: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        idx = np.asarray(idx, dtype=np.int32)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        self.h.changeColsBounds(len(idx), idx, lo, hi)
        self.lp.col_lo[idx] = lo
        self.lp.col_hi[idx] = hi

    def set_row_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int32)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        self.h.changeRowsBounds(len(idx), idx, lo, hi)
        self.lp.row_lo[idx] = lo
        self.lp.row_hi[idx] = hi

    def _interrupt(self, e) -> None:
        # highspy keeps data_in.user_interrupt between runs: set it explicitly on every call
        s = self._stop
        d = e.data_out
        stop = False
        if s.get("above") is not None and d.mip_dual_bound > s["above"]:
            s["why"] = "dual bound above threshold"
            stop = True
        elif s.get("below") is not None and d.mip_primal_bound <= s["below"]:
            s["why"] = "primal solution below threshold"
            stop = True
        e.interrupt(stop)

    _HEURISTICS = (
        "mip_heuristic_run_feasibility_jump",
        "mip_heuristic_run_rins",
        "mip_heuristic_run_rens",
        "mip_heuristic_run_root_reduced_cost",
    )

    def solve(self, time_limit=None, stop_bound_above=None, stop_primal_below=None, start=None, rel_gap=1e-4, abs_gap=1e-6, cutoff=None, heuristics=True):
        h = self.h
        t0 = time.perf_counter()
        h.setOptionValue("time_limit", float(time_limit) if time_limit is not None else INF)
        mip = self.lp.is_mip
        if mip:
            h.setOptionValue("mip_rel_gap", float(rel_gap))
            h.setOptionValue("mip_abs_gap", float(abs_gap))
            h.setOptionValue("objective_bound", float(cutoff) if cutoff is not None else INF)
            h.setOptionValue("mip_heuristic_effort", 0.05 if heuristics else 0.0)
            # proof mode: trust pseudo-costs after 2 strong-branching samples instead of 8
            # (10-25% less CPU on the mnistfc 256x2 proofs; HiGHS default otherwise)
            h.setOptionValue("mip_pscost_minreliable", 8 if heuristics else 2)
            for o in self._HEURISTICS:
                h.setOptionValue(o, bool(heuristics))
            self._stop = {"above": stop_bound_above, "below": stop_primal_below}
            if (stop_bound_above is not None or stop_primal_below is not None) and not self._cb_on:
                h.cbMipInterrupt.subscribe(self._interrupt)
                self._cb_on = True
            if start is not None:
                sol = self._hp.HighsSolution()
                sol.col_value = np.asarray(start, dtype=np.float64)
                sol.value_valid = True
                h.setSolution(sol)
        try:
            h.run()
        except Exception as e:  # pragma: no cover - solver crash
            return SolveResult("error", message=f"HiGHS raised {type(e).__name__}: {e}", time_s=time.perf_counter() - t0)
        st = h.getModelStatus()
        status = _highs_status(st, mip)
        info = h.getInfo()
        msg = h.modelStatusToString(st)
        res = SolveResult(status, message=msg)
        if mip:
            has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
            if has_sol:
                res.objective = float(info.objective_function_value)
                res.x = np.array(h.getSolution().col_value)
            if status == "optimal" or status in ("time_limit", "interrupted"):
                res.bound = float(info.mip_dual_bound)
                if not math.isfinite(res.bound) and status == "optimal" and has_sol:
                    res.bound = res.objective
            if status == "infeasible":
                res.bound = INF
                if cutoff is not None:
                    res.status, res.bound = "cutoff", float(cutoff)
            res.extra = {"mip_gap": float(info.mip_gap), "nodes": int(info.mip_node_count)}
            if self._stop.get("why"):
                res.extra["stopped"] = self._stop["why"]
                self._stop["why"] = None
        else:
            if status == "optimal":
                sol = h.getSolution()
                res.objective = float(info.objective_function_value)
                res.x = np.array(sol.col_value)
                res.bound = safe_dual_bound(self.lp, self.lp.c, np.array(sol.row_dual), self.lp.offset)
            elif status == "infeasible":
                res.bound = INF
        res.time_s = time.perf_counter() - t0
        return res


def _eliminate_defined_columns(lp: LinearProgram, keep: np.ndarray | None) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray, dict[int, int]]:
    """Substitute continuous columns that an equality row defines (``z - W a_prev = b``: the
    pre-activation of an unstable neuron, the output of a stably active one) by that row's
    affine expression in the remaining columns. The problem is equivalent (same feasible set of
    the remaining columns, same objective): the eliminated column's bounds become the bounds of
    its defining row. This keeps a MILP of a ReLU network small enough for a size-limited
    licence (Gurobi's pip licence: 2000 variables, 200 with a quadratic objective).

    Rows are visited in order; in each equality row the continuous, non-``keep`` column with the
    largest index among those of magnitude >= half the row's largest is eliminated, provided it
    is not already used by an earlier substitution (so no back-substitution is ever needed).

    Returns ``(kept [n_k], S [n, n_k], s0 [n], defining {row: column})`` with
    ``x = S x_kept + s0``.
    """
    A = sp.csr_matrix(lp.A, dtype=np.float64)
    m, n = A.shape
    integer = lp.integer if lp.integer is not None else np.zeros(n, dtype=bool)
    protected = integer.copy()
    if keep is not None:
        protected[np.asarray(keep, dtype=np.int64)] = True
    eq = np.isfinite(lp.row_lo) & (lp.row_lo == lp.row_hi)
    elim = np.zeros(n, dtype=bool)
    used = np.zeros(n, dtype=bool)
    T: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    s0 = np.zeros(n)
    defining: dict[int, int] = {}
    w = np.zeros(n)
    for r in np.flatnonzero(eq):
        cols = A.indices[A.indptr[r] : A.indptr[r + 1]]
        vals = A.data[A.indptr[r] : A.indptr[r + 1]]
        const = 0.0
        w[:] = 0.0
        for j, v in zip(cols, vals):
            if elim[j]:
                ti, tv = T[j]
                w[ti] += v * tv
                const += v * s0[j]
            else:
                w[j] += v
        nz = np.flatnonzero(w)
        if len(nz) == 0:
            continue
        cand = nz[~protected[nz] & ~used[nz]]
        if len(cand) == 0:
            continue
        big = np.abs(w[cand]) >= 0.5 * np.abs(w[nz]).max()
        if not big.any():
            continue
        j = int(cand[big].max())
        wj = w[j]
        rest = nz[nz != j]
        T[j] = (rest, -w[rest] / wj)
        s0[j] = (lp.row_lo[r] - const) / wj
        elim[j] = True
        used[rest] = True
        defining[int(r)] = j
    kept = np.flatnonzero(~elim)
    pos = np.full(n, -1, dtype=np.int64)
    pos[kept] = np.arange(len(kept))
    ri = [kept]
    ci = [np.arange(len(kept))]
    vi = [np.ones(len(kept))]
    for j, (ti, tv) in T.items():
        ri.append(np.full(len(ti), j))
        ci.append(pos[ti])
        vi.append(tv)
    S = sp.csr_matrix((np.concatenate(vi), (np.concatenate(ri), np.concatenate(ci))), shape=(n, len(kept)))
    return kept, S, s0, defining


def _constraint_count(lo: np.ndarray, hi: np.ndarray) -> int:
    """Native constraints of rows ``lo <= a x <= hi`` in the layout of :class:`GurobiBackend`
    (one per equality or one-sided row, two per two-sided row), counting a free row as one: it
    may get a bound later (the property rows of :mod:`relax.exact.milp` do)."""
    fl, fh = np.isfinite(lo), np.isfinite(hi)
    eq = fl & fh & (lo == hi)
    return int(eq.sum() + (fl & ~eq).sum() + (fh & ~eq).sum() + (~fl & ~fh).sum())


class GurobiBackend(Backend):
    """Gurobi through gurobipy (optional). Licence-size limits surface as ``status="error"``
    with Gurobi's message (see also :meth:`fits`).

    Rows become native Gurobi constraints (one for an equality or a one-sided row, two for a
    two-sided row, none for a free row), so the model has exactly one variable per column.

    ``eliminate``: substitute the columns defined by equality rows
    (:func:`_eliminate_defined_columns`) -- an equivalent model with fewer variables but denser
    rows; columns in ``keep`` (e.g. those that will get quadratic costs) are never eliminated.
    Default (``None``): only for a MIP (or a QP: ``quadratic``, judged by the limit for quadratic
    objectives) that would not fit the licence otherwise. Measured on mnistfc 256x2: Gurobi's own
    presolve on the full model proves 2-4x faster than on the substituted one, so elimination is
    a way to fit the pip licence, not a speed-up. LP bounds of an eliminated model are the
    solver's (a safe dual bound needs the original rows).

    ``bound_focus``: the MILPs are solved for their dual bound only, many short solves (e.g.
    a neuron's pre-activation bound): no cutting planes and ``MIPFocus=3`` (move the bound).
    Measured on the eliminated (dense-row) layer-1/2 MILPs of mnistfc 256x4/256x6 with a 1 s
    limit: 3x faster to optimality with the same bounds where they solve, tighter bounds where
    they stop at the limit (benchmarks/RESULTS.md section 4)."""

    name = "gurobi"

    def __init__(
        self, lp: LinearProgram, threads: int = 1, *, keep: np.ndarray | None = None, eliminate: bool | None = None,
        quadratic: bool = False, bound_focus: bool = False,
    ) -> None:
        import gurobipy as gp
        from gurobipy import GRB

        super().__init__(lp)
        self._gp, self._GRB = gp, GRB
        n = lp.num_cols
        if eliminate is None:
            eliminate = (lp.is_mip or quadratic) and not gurobi_fits(n, _constraint_count(lp.row_lo, lp.row_hi), quadratic)
        if eliminate:
            self.kept, self.S, self.s0, self.defining = _eliminate_defined_columns(lp, keep)
        else:
            self.kept, self.S, self.s0, self.defining = np.arange(n), sp.identity(n, format="csr"), np.zeros(n), {}
        self.eliminated = len(self.kept) < n
        self.pos = np.full(n, -1, dtype=np.int64)
        self.pos[self.kept] = np.arange(len(self.kept))
        self._row_of = {j: r for r, j in self.defining.items()}
        A = sp.csr_matrix(lp.A, dtype=np.float64)
        m_rows = lp.num_rows
        if self.eliminated:
            # other rows: A S x + A s0; a defining row (identically 0 = 0 after substitution)
            # becomes the eliminated column's expression S_j x + s0_j, bounded like the column
            drows = np.fromiter(self.defining.keys(), dtype=np.int64, count=len(self.defining))
            dcols = np.fromiter(self.defining.values(), dtype=np.int64, count=len(self.defining))
            keep_rows = np.ones(m_rows)
            keep_rows[drows] = 0.0
            P = sp.csr_matrix((np.ones(len(drows)), (drows, dcols)), shape=(m_rows, n))
            self.Ar = sp.csr_matrix(sp.diags(keep_rows) @ (A @ self.S) + P @ self.S)
            self.Ar.eliminate_zeros()
            self.shift = np.asarray(A @ self.s0).ravel()
            self.shift[drows] = 0.0
        else:
            self.Ar, self.shift = A, np.zeros(m_rows)
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        self.env = env
        m = gp.Model(env=env)
        m.Params.Threads = int(threads)
        # the tightest tolerances Gurobi accepts: a big-M of 1e8 (weights of scale 1e3) turns an
        # integrality slack of 1e-7 into ReLU outputs off by 10 (a false l_2 distance was found so)
        m.Params.IntFeasTol = 1e-9
        m.Params.FeasibilityTol = 1e-9
        m.Params.NumericFocus = 2
        if bound_focus:
            m.Params.Cuts = 0
            m.Params.MIPFocus = 3
        lo = np.asarray(lp.col_lo, dtype=np.float64)[self.kept]
        hi = np.asarray(lp.col_hi, dtype=np.float64)[self.kept]
        vtype: np.ndarray | str
        if lp.is_mip and lp.integer is not None:
            vtype = np.where(lp.integer[self.kept], GRB.BINARY, GRB.CONTINUOUS)
        else:
            vtype = GRB.CONTINUOUS
        self.m = m
        self.x = m.addMVar(len(self.kept), lb=np.where(np.isfinite(lo), lo, -GRB.INFINITY), ub=np.where(np.isfinite(hi), hi, GRB.INFINITY), vtype=vtype)
        self._vars = self.x.tolist()
        m.update()
        self._eq: dict[int, Constr] = {}
        self._hi: dict[int, Constr] = {}
        self._lo: dict[int, Constr] = {}
        rlo, rhi = self._row_bounds_reduced()
        self._add_rows(np.arange(lp.num_rows), rlo, rhi)
        self._q: tuple[np.ndarray, np.ndarray] | None = None
        self.set_objective(lp.c, lp.offset)

    # --- sizes and licence
    @property
    def num_vars(self) -> int:
        return len(self.kept)

    @property
    def num_constraints(self) -> int:
        return len(self._eq) + len(self._hi) + len(self._lo)

    def fits(self, quadratic: bool | None = None) -> bool:
        """Whether the model fits the licence's size limits (:func:`gurobi_fits`), counting each
        currently free row as a constraint it may become."""
        q = self._q is not None if quadratic is None else quadratic
        free = self.lp.num_rows - len(set(self._eq) | set(self._hi) | set(self._lo))
        return gurobi_fits(self.num_vars, self.num_constraints + free, q)

    def close(self) -> None:
        self.m.dispose()
        self.env.dispose()

    # --- rows
    def _row_bounds_reduced(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of every reduced row: the original bounds minus the substitution constant, and
        for a defining row the bounds of the column it eliminated."""
        lo = self.lp.row_lo - self.shift
        hi = self.lp.row_hi - self.shift
        for r, j in self.defining.items():
            lo[r] = self.lp.col_lo[j] - self.s0[j]
            hi[r] = self.lp.col_hi[j] - self.s0[j]
        return lo, hi

    def _expr(self, r: int):
        a, b = self.Ar.indptr[r], self.Ar.indptr[r + 1]
        return self._gp.LinExpr(self.Ar.data[a:b].tolist(), [self._vars[j] for j in self.Ar.indices[a:b]])

    def _add_rows(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Initial rows, in three matrix calls (equalities, upper sides, lower sides)."""
        GRB = self._GRB
        fl, fh = np.isfinite(lo), np.isfinite(hi)
        eq = fl & fh & (lo == hi)
        for mask, sense, rhs, store in ((eq, GRB.EQUAL, lo, self._eq), (fh & ~eq, GRB.LESS_EQUAL, hi, self._hi), (fl & ~eq, GRB.GREATER_EQUAL, lo, self._lo)):
            rows = idx[mask]
            if len(rows) == 0:
                continue
            cons = self.m.addMConstr(self.Ar[rows], self.x, sense, rhs[mask])
            for r, c in zip(rows, cons.tolist()):
                store[int(r)] = c
        self.m.update()

    def _set_row(self, r: int, lo: float, hi: float) -> None:
        """Make reduced row ``r`` read ``lo <= a_r x <= hi`` (adds / removes constraints)."""
        GRB, m = self._GRB, self.m
        if math.isfinite(lo) and lo == hi:
            for store in (self._hi, self._lo):
                if r in store:
                    m.remove(store.pop(r))
            if r in self._eq:
                self._eq[r].RHS = lo
            else:
                self._eq[r] = m.addLConstr(self._expr(r), GRB.EQUAL, lo)
            return
        if r in self._eq:
            m.remove(self._eq.pop(r))
        for val, store, sense in ((hi, self._hi, GRB.LESS_EQUAL), (lo, self._lo, GRB.GREATER_EQUAL)):
            if math.isfinite(val):
                if r in store:
                    store[r].RHS = val
                else:
                    store[r] = m.addLConstr(self._expr(r), sense, val)
            elif r in store:
                m.remove(store.pop(r))

    def _row_duals(self) -> np.ndarray:
        y = np.zeros(self.lp.num_rows)
        for store in (self._eq, self._hi, self._lo):
            if store:
                rows = np.fromiter(store.keys(), dtype=np.int64, count=len(store))
                y[rows] += np.array(self.m.getAttr("Pi", list(store.values())))
        return y

    # --- the Backend interface
    def set_objective(self, c, offset=0.0, qdiag=None):
        c = np.asarray(c, dtype=np.float64)
        cr = np.asarray(self.S.T @ c).ravel() if self.eliminated else c
        obj = cr @ self.x + float(offset) + float(c @ self.s0)
        self._q = None
        if qdiag is not None:
            cols, w = np.asarray(qdiag[0], dtype=np.int64), np.asarray(qdiag[1], dtype=np.float64)
            rc = self.pos[cols]
            if np.any(rc < 0):
                raise SolverError("internal: a column with a quadratic cost was eliminated; pass it in keep=")
            xs = self.x[rc]
            obj = obj + xs @ sp.diags(w) @ xs
            self._q = (cols, w)
        self.m.setObjective(obj, self._GRB.MINIMIZE)
        self.lp.c, self.lp.offset = c, float(offset)

    def set_col_bounds(self, idx, lo, hi):
        GRB = self._GRB
        idx = np.asarray(idx, dtype=np.int64)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        self.lp.col_lo[idx] = lo
        self.lp.col_hi[idx] = hi
        rc = self.pos[idx]
        k = rc >= 0
        if k.any():
            v = self.x[rc[k]]
            v.lb = np.where(np.isfinite(lo[k]), lo[k], -GRB.INFINITY)
            v.ub = np.where(np.isfinite(hi[k]), hi[k], GRB.INFINITY)
        if (~k).any():
            for j in idx[~k]:
                r = self._row_of[int(j)]
                self._set_row(r, float(self.lp.col_lo[j] - self.s0[j]), float(self.lp.col_hi[j] - self.s0[j]))

    def set_row_bounds(self, idx, lo, hi):
        idx = np.asarray(idx, dtype=np.int64)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        for r, a, b in zip(idx, lo, hi):
            if int(r) in self.defining:
                if not (a == b == self.lp.row_lo[r] == self.lp.row_hi[r]):
                    raise SolverError("internal: the bounds of a row that defines an eliminated column cannot change")
                continue
            self._set_row(int(r), float(a - self.shift[r]), float(b - self.shift[r]))
        self.lp.row_lo[idx] = lo
        self.lp.row_hi[idx] = hi

    def solve(self, time_limit=None, stop_bound_above=None, stop_primal_below=None, start=None, rel_gap=1e-4, abs_gap=1e-6, cutoff=None, heuristics=True):
        GRB, m = self._GRB, self.m
        t0 = time.perf_counter()
        m.Params.TimeLimit = float(time_limit) if time_limit is not None else GRB.INFINITY
        mip = self.lp.is_mip
        why: dict = {}
        cb: Callable | None = None
        if mip:
            m.Params.MIPGap = float(rel_gap)
            m.Params.MIPGapAbs = float(abs_gap)
            m.Params.Cutoff = float(cutoff) if cutoff is not None else GRB.INFINITY
            m.Params.Heuristics = 0.05 if heuristics else 0.0
            self.x.Start = np.asarray(start, dtype=np.float64)[self.kept] if start is not None else np.full(self.num_vars, GRB.UNDEFINED)

            def cb(model, where):
                if where == GRB.Callback.MIP:
                    bnd = model.cbGet(GRB.Callback.MIP_OBJBND)
                    best = model.cbGet(GRB.Callback.MIP_OBJBST)
                    if stop_bound_above is not None and bnd > stop_bound_above:
                        why["stopped"] = "dual bound above threshold"
                        model.terminate()
                    elif stop_primal_below is not None and best <= stop_primal_below:
                        why["stopped"] = "primal solution below threshold"
                        model.terminate()

        try:
            m.optimize(cb) if (cb is not None and (stop_bound_above is not None or stop_primal_below is not None)) else m.optimize()
        except self._gp.GurobiError as e:
            res = SolveResult("error", message=f"Gurobi: {e}", time_s=time.perf_counter() - t0)
            res.extra = {"gurobi_errno": getattr(e, "errno", None), "variables": self.num_vars, "constraints": self.num_constraints}
            return res
        st = m.Status
        status = {
            GRB.OPTIMAL: "optimal",
            GRB.INFEASIBLE: "infeasible",
            GRB.INF_OR_UNBD: "unbounded",
            GRB.UNBOUNDED: "unbounded",
            GRB.TIME_LIMIT: "time_limit",
            GRB.INTERRUPTED: "interrupted",
            GRB.CUTOFF: "cutoff",
        }.get(st, "error")
        res = SolveResult(status, message=f"gurobi status {st}", extra=dict(why))
        if m.SolCount > 0:
            res.objective = float(m.ObjVal)
            xr = np.array(self.x.X)
            res.x = np.asarray(self.S @ xr).ravel() + self.s0 if self.eliminated else xr
        if mip:
            if status in ("optimal", "time_limit", "interrupted"):
                res.bound = float(m.ObjBound)
            if status == "infeasible":
                res.bound = INF
                if cutoff is not None:
                    res.status = "cutoff"
            if res.status == "cutoff":
                res.bound = float(cutoff)
        elif status == "optimal":
            if self.eliminated:
                # no safe bound without the original rows' multipliers: the solver's optimum
                # (trusted up to its tolerances, like a MILP dual bound)
                res.bound = res.objective
                res.extra["bound"] = "solver optimum (eliminated columns)"
            else:
                res.bound = safe_dual_bound(self.lp, self.lp.c, self._row_duals(), self.lp.offset, qdiag=self._q)
        elif status == "infeasible":
            res.bound = INF
        res.time_s = time.perf_counter() - t0
        return res
