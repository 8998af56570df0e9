"""The HiGHS backend (highspy, always installed): LPs and MILPs, warm-started re-solves."""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from .program import INF, Backend, LinearProgram, SolverError, SolveResult, safe_dual_bound

__all__ = ["HighsBackend"]


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
    """HiGHS through highspy; one ``Highs`` object per model (basis kept between solves), on one thread."""

    name = "highs"

    def __init__(self, lp: LinearProgram, threads: int = 1) -> None:
        import highspy

        super().__init__(lp)
        self._hp = highspy
        h = _new_highs()
        # HiGHS runs one thread scheduler per process, sized by the first solve; a later model
        # asking for another size fails ("Not Set"), and resizing it would disturb solves running
        # in other threads (the refinement's workers). So every model runs on one thread, the
        # size the first solve fixes; ``threads`` is for the Gurobi backend.
        h.setOptionValue("threads", 1)
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
        self._set_bounds(self.h.changeColsBounds, self.lp.col_lo, self.lp.col_hi, idx, lo, hi)

    def set_row_bounds(self, idx: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        self._set_bounds(self.h.changeRowsBounds, self.lp.row_lo, self.lp.row_hi, idx, lo, hi)

    def _change_integrality(self, idx: np.ndarray, flags: np.ndarray) -> None:
        V = self._hp.HighsVarType
        self.h.changeColsIntegrality(len(idx), idx.astype(np.int32), np.array([V.kInteger if f else V.kContinuous for f in flags]))

    @staticmethod
    def _set_bounds(change, lows: np.ndarray, highs: np.ndarray, idx: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        """Bounds ``lo, hi`` of the columns or rows ``idx``, in HiGHS (``change``) and in our copy."""
        idx = np.asarray(idx, dtype=np.int32)
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        change(len(idx), idx, lo, hi)
        lows[idx] = lo
        highs[idx] = hi

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
