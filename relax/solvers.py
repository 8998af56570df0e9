"""A small common interface over the LP/MILP solvers: HiGHS (highspy, always there) and Gurobi
(gurobipy, optional, used when it imports and its licence starts).

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
tolerances; callers add their own margin (see :mod:`relax.milp`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

__all__ = [
    "LinearProgram",
    "SolveResult",
    "SolverError",
    "Backend",
    "HighsBackend",
    "GurobiBackend",
    "gurobi_available",
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


def safe_dual_bound(lp: LinearProgram, c: np.ndarray, y: np.ndarray | None, offset: float = 0.0) -> float:
    """Rigorous lower bound of ``min c^T x + offset`` over the LP from any row multipliers ``y``.

    ``y [m]``: row duals in the convention "reduced cost = c - A^T y" (HiGHS and Gurobi for a
    minimisation). Multipliers on a side that is infinite are set to 0 (any such vector is
    dual-feasible for the boxed problem). Returns ``-inf`` when a reduced cost meets an infinite
    column bound. See the module docstring for the formula and the round-off margin.
    """
    m = lp.num_rows
    y = np.zeros(m) if y is None else np.asarray(y, dtype=np.float64).copy()
    y[(y > 0) & ~np.isfinite(lp.row_lo)] = 0.0
    y[(y < 0) & ~np.isfinite(lp.row_hi)] = 0.0
    r = np.asarray(c, dtype=np.float64) - lp.A.T @ y
    row_terms = np.where(y > 0, y * np.where(np.isfinite(lp.row_lo), lp.row_lo, 0.0), 0.0) + np.where(
        y < 0, y * np.where(np.isfinite(lp.row_hi), lp.row_hi, 0.0), 0.0
    )
    pos, neg = r > 0, r < 0
    if np.any(pos & ~np.isfinite(lp.col_lo)) or np.any(neg & ~np.isfinite(lp.col_hi)):
        return -INF
    col_terms = np.where(pos, r * np.where(pos, lp.col_lo, 0.0), 0.0) + np.where(neg, r * np.where(neg, lp.col_hi, 0.0), 0.0)
    total = float(row_terms.sum() + col_terms.sum() + offset)
    size = float(np.abs(row_terms).sum() + np.abs(col_terms).sum() + abs(offset))
    if not math.isfinite(total):
        return -INF
    return total - 1e-9 * (1.0 + size)


# ------------------------------------------------------------------------------------------
# availability


_gurobi_state: tuple[bool, str] | None = None


def gurobi_available() -> tuple[bool, str]:
    """``(ok, reason)``: gurobipy imports and a licence environment starts."""
    global _gurobi_state
    if _gurobi_state is None:
        try:
            import gurobipy as gp  # noqa: F401

            env = gp.Env(empty=True)
            env.setParam("OutputFlag", 0)
            env.start()
            env.dispose()
            _gurobi_state = (True, "gurobipy licence ok")
        except ImportError:
            _gurobi_state = (False, "gurobipy is not installed")
        except Exception as e:  # licence errors are gurobipy.GurobiError
            _gurobi_state = (False, f"gurobipy licence: {e}")
    return _gurobi_state


def resolve_solver(solver: str) -> str:
    """``"auto"`` -> ``"gurobi"`` when available else ``"highs"``; checks explicit names."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "gurobi" if gurobi_available()[0] else "highs"
    if solver == "gurobi":
        ok, why = gurobi_available()
        if not ok:
            raise SolverError(f"solver='gurobi' requested but {why}")
    return solver


def make_backend(lp: LinearProgram, solver: str = "auto", threads: int = 1) -> "Backend":
    """A backend holding ``lp`` for repeated solves."""
    name = resolve_solver(solver)
    return GurobiBackend(lp, threads) if name == "gurobi" else HighsBackend(lp, threads)


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

    def set_col_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        raise NotImplementedError

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
    if st in (S.kInterrupt, S.kHighsInterrupt, S.kObjectiveBound, S.kObjectiveTarget, S.kSolutionLimit):
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
        if lp.is_mip:
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

    def set_col_bounds(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
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


class GurobiBackend(Backend):
    """Gurobi through gurobipy (optional). Licence-size limits surface as ``status="error"``."""

    name = "gurobi"

    def __init__(self, lp: LinearProgram, threads: int = 1) -> None:
        import gurobipy as gp
        from gurobipy import GRB

        super().__init__(lp)
        self._gp, self._GRB = gp, GRB
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        m = gp.Model(env=env)
        m.Params.Threads = int(threads)
        m.Params.IntFeasTol = 1e-7
        vtype = np.where(lp.integer, GRB.BINARY, GRB.CONTINUOUS) if lp.is_mip else GRB.CONTINUOUS
        lo = np.asarray(lp.col_lo, dtype=np.float64)
        hi = np.asarray(lp.col_hi, dtype=np.float64)
        x = m.addMVar(lp.num_cols, lb=np.where(np.isfinite(lo), lo, -GRB.INFINITY), ub=np.where(np.isfinite(hi), hi, GRB.INFINITY), vtype=vtype)
        # every row as "A x - s = 0" with a range variable s in [row_lo, row_hi]: row bounds
        # then change like column bounds, and the equality's dual is the row multiplier
        A = sp.csr_matrix(lp.A)
        rlo = np.asarray(lp.row_lo, dtype=np.float64)
        rhi = np.asarray(lp.row_hi, dtype=np.float64)
        self.s = m.addMVar(lp.num_rows, lb=np.where(np.isfinite(rlo), rlo, -GRB.INFINITY), ub=np.where(np.isfinite(rhi), rhi, GRB.INFINITY))
        self._cons = m.addConstr(A @ x - self.s == 0) if lp.num_rows else None
        m.setObjective(gp.LinExpr() + float(lp.offset))
        self.m, self.x = m, x
        self.set_objective(lp.c, lp.offset)

    def set_objective(self, c, offset=0.0, qdiag=None):
        c = np.asarray(c, dtype=np.float64)
        obj = c @ self.x + float(offset)
        if qdiag is not None:
            cols, w = np.asarray(qdiag[0], dtype=np.int64), np.asarray(qdiag[1], dtype=np.float64)
            xs = self.x[cols]
            obj = obj + xs @ sp.diags(w) @ xs
        self.m.setObjective(obj, self._GRB.MINIMIZE)
        self.lp.c, self.lp.offset = c, float(offset)

    def set_col_bounds(self, idx, lo, hi):
        GRB = self._GRB
        idx = np.asarray(idx, dtype=np.int64)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        self.x[idx].lb = np.where(np.isfinite(lo), lo, -GRB.INFINITY)
        self.x[idx].ub = np.where(np.isfinite(hi), hi, GRB.INFINITY)
        self.lp.col_lo[idx] = lo
        self.lp.col_hi[idx] = hi

    def set_row_bounds(self, idx, lo, hi):
        GRB = self._GRB
        idx = np.asarray(idx, dtype=np.int64)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        self.s[idx].lb = np.where(np.isfinite(lo), lo, -GRB.INFINITY)
        self.s[idx].ub = np.where(np.isfinite(hi), hi, GRB.INFINITY)
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
            if start is not None:
                self.x.Start = np.asarray(start, dtype=np.float64)
                if self.lp.num_rows:
                    self.s.Start = self.lp.A @ np.asarray(start, dtype=np.float64)

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
            return SolveResult("error", message=f"Gurobi: {e}", time_s=time.perf_counter() - t0)
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
            res.x = np.array(self.x.X)
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
            y = np.array(self._cons.Pi) if self._cons is not None else np.zeros(0)
            res.bound = safe_dual_bound(self.lp, self.lp.c, y, self.lp.offset)
        elif status == "infeasible":
            res.bound = INF
        res.time_s = time.perf_counter() - t0
        return res
