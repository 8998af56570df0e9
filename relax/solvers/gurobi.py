"""The Gurobi backend (gurobipy, optional): licence probing and its size limits, the column
elimination that fits a MILP into a size-limited licence, and :class:`GurobiBackend` (also the
mixed-integer QPs of the minimum l_2 distortion)."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from gurobipy import Constr

from .program import INF, Backend, LinearProgram, SolverError, SolveResult, safe_dual_bound

__all__ = ["GurobiBackend", "gurobi_available", "gurobi_size_limits", "gurobi_fits", "PIP_LICENCE_LIMITS"]

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

    def _change_integrality(self, idx, flags):
        rc = self.pos[idx]
        if np.any(rc < 0):
            raise SolverError("internal: the integrality of an eliminated column cannot change")
        GRB = self._GRB
        self.m.setAttr("VType", [self._vars[int(i)] for i in rc], [GRB.BINARY if f else GRB.CONTINUOUS for f in flags])

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
