"""The LP / MILP problem form shared by the backends (:class:`LinearProgram`), their result
(:class:`SolveResult`), the backend interface (:class:`Backend`) and the safe dual bound of an LP
(:func:`safe_dual_bound`; the derivation is in :mod:`relax.solvers`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

__all__ = ["SOLVERS", "INF", "SolverError", "LinearProgram", "SolveResult", "safe_dual_bound", "Backend"]

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


class Backend:
    """Common interface. ``lp`` is kept in sync with cost / bound changes (for the safe bound)."""

    name: str = ""

    def __init__(self, lp: LinearProgram) -> None:
        # a private copy of what the backend changes (costs, bounds, integrality): several
        # backends may be built on one problem (parallel workers), and each one's safe dual
        # bound must read its own costs and bounds; ``A`` is shared (never changed)
        self.lp = LinearProgram(
            A=lp.A, row_lo=np.array(lp.row_lo, dtype=np.float64), row_hi=np.array(lp.row_hi, dtype=np.float64),
            col_lo=np.array(lp.col_lo, dtype=np.float64), col_hi=np.array(lp.col_hi, dtype=np.float64),
            c=np.array(lp.c, dtype=np.float64), offset=float(lp.offset),
            integer=None if lp.integer is None else np.array(lp.integer, dtype=bool),
        )

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

    def set_integer(self, idx: ArrayLike, integer: ArrayLike) -> None:
        """Mark the columns ``idx`` integer (``True``) or continuous (``False``); a problem
        whose integer columns are all made continuous is solved as an LP (safe dual bound)."""
        idx = np.asarray(idx, dtype=np.int64)
        flags = np.asarray(integer, dtype=bool)
        if self.lp.integer is None:
            if not flags.any():
                return
            self.lp.integer = np.zeros(self.lp.num_cols, dtype=bool)
        self._change_integrality(idx, flags)
        self.lp.integer[idx] = flags

    def _change_integrality(self, idx: np.ndarray, flags: np.ndarray) -> None:
        """The solver's side of :meth:`set_integer` (``idx [k]`` int64, ``flags [k]`` bool)."""
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
