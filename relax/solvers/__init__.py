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
(:func:`relax.solvers.gurobi._eliminate_defined_columns`).
"""
from __future__ import annotations

import numpy as np

from .gurobi import PIP_LICENCE_LIMITS, GurobiBackend, gurobi_available, gurobi_fits, gurobi_size_limits
from .highs import HighsBackend
from .program import INF, SOLVERS, Backend, LinearProgram, SolverError, SolveResult, safe_dual_bound

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
    "INF",
]


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
