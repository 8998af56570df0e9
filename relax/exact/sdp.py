"""The SDP relaxation of ReLU networks (Raghunathan, Steinhardt & Liang, "Semidefinite relaxations
for certifying robustness to adversarial examples", NeurIPS 2018, arXiv:1811.01057), with a sound
bound.

Lift ``v = [1, x, a_unstable]`` (inputs and the unstable post-activations) to ``P = v v^T`` and
relax ``rank P = 1`` to ``P >= 0`` (PSD). Stable neurons are substituted exactly: an inactive one
is 0, an active one equals its pre-activation, so every pre-activation is an affine function
``z_j = Z_j v`` and products of two such functions are linear in ``P``. With pre-activation bounds
``l <= z <= u`` the constraints are (the paper's ReLU constraints ``a >= 0``, ``a >= z``,
``a (a - z) = 0`` and its quadratic bound constraints, lifted):

* ``P_00 = 1``;
* input box: ``l <= P_0x <= u``, ``diag(P_xx) <= (l + u) * P_0x - l * u``;
* unstable ReLU ``a = relu(z)``: ``P_0a >= 0``, ``P_0a >= Z P_0``, ``P_aa = Z P_a``
  (the complementarity ``a (a - z) = 0``), ``P_aa <= u P_0a``, ``P_0a <= u``;
* stably active: ``l <= Z P_0 <= u`` and ``Z P Z^T <= (l + u) Z P_0 - l u``;
* (``triangle=True``, an addition to the paper) the triangle upper side
  ``P_0a <= u (Z P_0 - l) / (u - l)``, so the relaxation is never looser than the LP.

The objective ``min C_i y + d_i = c_i^T P_0,last + const`` is solved with cvxpy (Clarabel or SCS).

Soundness. An interior-point optimum is approximate, so its value is not used. Writing the problem
as ``min <C0, P>`` s.t. ``E vec(P) = e``, ``G vec(P) <= h``, ``P >= 0``, any multipliers ``nu``
and ``lam >= 0`` give, for every feasible ``P`` (weak duality)::

    <C0, P> >= -nu^T e - lam^T h + <S, P>,   S = sym(C0 + E^T nu + G^T lam)
            >= -nu^T e - lam^T h + min(0, lambda_min(S)) * T

where ``T >= trace(P)``. The constraints bound every diagonal entry (``P_ii <= max(l_i^2, u_i^2)``
follows from ``P_0i in [l_i, u_i]`` and the diagonal constraints on the lifted coordinates), so
``T = 1 + sum_i max(l_i^2, u_i^2)``. We take the solver's multipliers (inequality ones clipped
at 0, equality ones with both sign conventions, keeping the larger bound -- each is valid), compute
``lambda_min(S)`` with numpy in float64 and return that bound minus ``1e-9 (1 + sum |terms|)``
for the round-off of the evaluation. The result is a lower bound whatever the solver's accuracy.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from verify.deadline import Deadline
from verify.spec import InputSet, LinearSpec, LpBall

from relax.ir.dense import FeedForwardNet
from relax.exact.lp import UnsupportedNetworkError, initial_bounds, regions_of, relu_net, spec_rows, tighten_bounds

__all__ = ["SdpResult", "SdpProblem", "sdp_lower_bounds", "SDP_SOLVERS"]

SDP_SOLVERS = ("auto", "clarabel", "scs")
#: "auto" uses Clarabel (interior point, accurate; its dense PSD block costs O(n^6)) up to this
#: side of P and SCS (first order, eps 1e-4) above it -- the verified bound absorbs SCS's
#: inaccuracy (measured: 20x faster at n = 65, bound 3% weaker)
AUTO_CLARABEL_MAX_N = 30
SCS_OPTIONS = {"eps_abs": 1e-4, "eps_rel": 1e-4, "max_iters": 5000}
#: rows whose triangle-LP bound is already this far above 0 are not sent to the SDP (lp_first)
LP_FIRST_MARGIN = 1e-6
#: seconds per entry of P (n^2) that building and compiling the cvxpy problem and SCS's set-up
#: take (none of it interruptible), an upper estimate from measurements (see
#: :func:`sdp_setup_estimate`; mnistfc 256x2, n = 891: a 30 s deadline still ended after 40 s
#: with 2e-5); a deadline that leaves less time skips the SDP (its rows stay unknown)
SETUP_SECONDS_PER_ENTRY = 5e-5


#: seconds the first ``import cvxpy`` of a process may take (measured 2-5 s on a loaded 2-core machine)
CVXPY_IMPORT_SECONDS = 5.0


def cvxpy_import_estimate() -> float:
    """Seconds still needed to import cvxpy in this process (0 once imported)."""
    import sys

    return 0.0 if "cvxpy" in sys.modules else CVXPY_IMPORT_SECONDS


def sdp_setup_estimate(n: int) -> float:
    """Estimated seconds to build, compile and run a first solver iteration for an ``n x n`` P
    (plus importing cvxpy, the first time)."""
    return SETUP_SECONDS_PER_ENTRY * n * n + 0.05 + cvxpy_import_estimate()


def _time_limit_kw(use: str, seconds: float | None) -> dict:
    """The solver's own time limit option (Clarabel ``time_limit``, SCS ``time_limit_secs``); a
    solve stopped there still returns multipliers, whose dual bound is verified like any other."""
    if seconds is None:
        return {}
    return {"time_limit": seconds} if use == "clarabel" else {"time_limit_secs": seconds}


class _Rows:
    """Sparse rows over ``vec(P)`` (column-major, ``n x n``) with right-hand sides."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.i: list[int] = []
        self.j: list[int] = []
        self.v: list[float] = []
        self.rhs: list[float] = []

    def idx(self, a, b) -> np.ndarray:
        return np.asarray(a) + np.asarray(b) * self.n

    def add(self, cols, vals, rhs: float) -> None:
        r = len(self.rhs)
        cols = np.atleast_1d(cols)
        vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), cols.shape)
        self.i.extend([r] * len(cols))
        self.j.extend(cols.tolist())
        self.v.extend(vals.tolist())
        self.rhs.append(float(rhs))

    def matrix(self) -> tuple[sp.csr_matrix, np.ndarray]:
        m = len(self.rhs)
        A = sp.csr_matrix((self.v, (self.i, self.j)), shape=(m, self.n * self.n))
        A.sum_duplicates()
        return A, np.asarray(self.rhs)


@dataclass
class SdpProblem:
    """The lifted problem of one example (see the module docstring).

    Attributes:
        n: side of ``P``.
        E, e: equality rows ``E vec(P) = e``; G, h: inequality rows ``G vec(P) <= h``.
        last: ``[n_{L-1}, n]`` sparse: the last hidden layer's activations as affine maps of ``v``
            (``a = last @ v``, ``v = P[:, 0]``).
        trace_bound: ``T >= trace(P)`` for every feasible ``P``.
    """

    n: int
    E: sp.csr_matrix
    e: np.ndarray
    G: sp.csr_matrix
    h: np.ndarray
    last: sp.csr_matrix
    trace_bound: float
    stats: dict = field(default_factory=dict)


def build_sdp(net: FeedForwardNet, lo: np.ndarray, hi: np.ndarray, bounds: list[tuple[np.ndarray, np.ndarray]], triangle: bool = True) -> SdpProblem:
    """Lift ``net`` over the box ``[lo, hi]`` (``[n0]``) with pre-activation ``bounds``.

    Only the inputs and the *unstable* neurons are lifted: ``v = [1, x, a_unstable]``. Every other
    quantity is an affine function ``r^T v`` of them (stably active ``a = z``, inactive ``a = 0``),
    so ``z_j = Z_j v`` with ``Z`` built layer by layer, and products of such functions are linear
    in ``P`` (``(r^T v)(s^T v) = r^T P s``). This is the paper's relaxation with the stable neurons
    substituted exactly (no looser, and ``P`` is much smaller)."""
    n0 = len(lo)
    n_unst = [int(((l < 0) & (u > 0)).sum()) for l, u in bounds]
    n = 1 + n0 + sum(n_unst)
    eq, ineq = _Rows(n), _Rows(n)
    I = eq.idx
    diag_bound = [1.0]
    xi = np.arange(1, n0 + 1)
    eq.add(I(0, 0), 1.0, 1.0)
    for k, i in enumerate(xi):
        ineq.add(I(0, i), -1.0, -lo[k])
        ineq.add(I(0, i), 1.0, hi[k])
        ineq.add([I(i, i), I(0, i)], [1.0, -(lo[k] + hi[k])], -lo[k] * hi[k])
        diag_bound.append(max(lo[k] ** 2, hi[k] ** 2))
    # A: activations of the current layer as affine maps of v, [n_k, n]
    A = sp.csr_matrix((np.ones(n0), (np.arange(n0), xi)), shape=(n0, n))
    nxt = 1 + n0
    for k, (l, u) in enumerate(bounds):
        W = sp.csr_matrix(net.layers[k].W.numpy())
        b = net.layers[k].b.numpy()
        Z = (W @ A).tocsr()
        Z = Z + sp.csr_matrix((b, (np.arange(len(b)), np.zeros(len(b), dtype=np.int64))), shape=Z.shape)
        Z = Z.tocsr()
        rows_i, rows_j, rows_v = [], [], []
        for j in range(len(l)):
            zj = Z.getrow(j)
            zc, zv = zj.indices, zj.data
            if u[j] <= 0:
                continue
            if l[j] >= 0:
                # stably active: a = z; bounds l <= z <= u and (z - l)(z - u) <= 0
                ineq.add(I(0, zc), -zv, -l[j])
                ineq.add(I(0, zc), zv, u[j])
                qi, qj = np.meshgrid(zc, zc, indexing="ij")
                qv = np.outer(zv, zv)
                ineq.add(np.r_[I(qi.ravel(), qj.ravel()), I(0, zc)], np.r_[qv.ravel(), -(l[j] + u[j]) * zv], -l[j] * u[j])
                rows_i.extend([j] * len(zc))
                rows_j.extend(zc.tolist())
                rows_v.extend(zv.tolist())
                continue
            v = nxt
            nxt += 1
            rows_i.append(j)
            rows_j.append(v)
            rows_v.append(1.0)
            ineq.add(I(0, v), -1.0, 0.0)  # a >= 0
            ineq.add(I(0, v), 1.0, u[j])  # a <= u
            ineq.add(np.r_[I(0, v), I(0, zc)], np.r_[-1.0, zv], 0.0)  # a >= z
            # a^2 = a z:  P_vv - sum_i Z_ji P_iv = 0
            eq.add(np.r_[I(v, v), I(zc, v)], np.r_[1.0, -zv], 0.0)
            ineq.add([I(v, v), I(0, v)], [1.0, -u[j]], 0.0)  # a^2 <= u a
            if triangle:
                s = u[j] / (u[j] - l[j])
                ineq.add(np.r_[I(0, v), I(0, zc)], np.r_[1.0, -s * zv], -s * l[j])  # a <= s (z - l)
            diag_bound.append(u[j] ** 2)
        A = sp.csr_matrix((rows_v, (rows_i, rows_j)), shape=(len(l), n))
    E, e = eq.matrix()
    G, h = ineq.matrix()
    return SdpProblem(n, E, e, G, h, A, float(sum(diag_bound)), {"n": n, "unstable": int(sum(n_unst)), "eq": len(e), "ineq": len(h)})


def _dual_bound(prob: SdpProblem, c0: np.ndarray, nu: np.ndarray, lam: np.ndarray) -> float:
    """The weak-duality bound of the module docstring for multipliers ``nu``, ``lam``."""
    lam = np.maximum(np.asarray(lam, dtype=np.float64).ravel(), 0.0)
    nu = np.asarray(nu, dtype=np.float64).ravel()
    svec = c0 + prob.E.T @ nu + prob.G.T @ lam
    S = svec.reshape(prob.n, prob.n, order="F")
    S = (S + S.T) / 2
    lmin = float(np.linalg.eigvalsh(S)[0])
    # eigvalsh is backward stable: its error is at most ~ n * eps * ||S||; count it against us
    lmin -= 1e-13 * prob.n * float(np.linalg.norm(S))
    # so is the round-off of forming S: each entry errs by at most gamma_k times the sum of the
    # absolute values of its terms (Higham Eq. (3.5)); the entries are often differences of
    # large terms, so ||S|| does not bound it. Weyl: lambda_min moves by at most ||dS||_F.
    mag = np.abs(c0) + abs(prob.E).T @ np.abs(nu) + abs(prob.G).T @ lam
    k = int(max(np.diff(sp.csc_matrix(prob.E).indptr).max(initial=0), np.diff(sp.csc_matrix(prob.G).indptr).max(initial=0))) + 3
    g = k * 2.0**-53 / (1 - k * 2.0**-53)
    lmin -= 2 * g * float(np.linalg.norm(mag))
    terms = np.r_[-nu * prob.e, -lam * prob.h]
    corr = min(0.0, lmin) * prob.trace_bound
    total = float(terms.sum()) + corr
    return total - 1e-9 * (1.0 + float(np.abs(terms).sum()) + abs(corr))


@dataclass
class SdpResult:
    """Output of :func:`sdp_lower_bounds`: ``lower [B, N]`` float64 and per-example details."""

    lower: Tensor
    details: list[dict]


def sdp_lower_bounds(
    model: torch.nn.Module | FeedForwardNet,
    inputs: InputSet,
    spec: LinearSpec,
    *,
    bounds_method: str = "crown",
    refine: bool = False,
    triangle: bool = True,
    solver: str = "auto",
    lp_first: bool = False,
    net: FeedForwardNet | None = None,
    deadline: Deadline | None = None,
) -> SdpResult:
    """Sound lower bounds of every property row over the SDP relaxation (l_inf balls and boxes).

    Args:
        model: ReLU chain network (or its dense form).
        inputs: batched box or l_inf ball ``[B, *shape]``.
        spec: ``C [B, N, K]``, ``d [B, N]``.
        bounds_method: pre-activation bounds (:func:`relax.exact.lp.initial_bounds`).
        refine: LP re-tightening of those bounds first.
        triangle: add the triangle LP constraint (tighter; see the module docstring).
        solver: "auto", "clarabel" or "scs" (through cvxpy); see ``AUTO_CLARABEL_MAX_N``.
        lp_first: solve the triangle LP first and skip the SDP for rows it already proves
            (their bound is the LP's safe bound; both are sound). A speed option for the method.
        deadline: for the whole batch (shared by the examples left); each solve gets the
            solver's time limit, no solve starts after it, and the SDP is skipped when the time
            left is below :func:`sdp_setup_estimate` (rows not solved stay ``-inf``).

    Returns:
        :class:`SdpResult` with ``lower [B, N]`` (``-inf`` where the solver failed).
    """
    import cvxpy  # noqa: F401 -- first, as its seconds are budgeted (cvxpy_import_estimate)

    if solver not in SDP_SOLVERS:
        raise ValueError(f"sdp solver must be one of {SDP_SOLVERS}, got {solver!r}")
    if isinstance(inputs, LpBall) and not math.isinf(inputs.p):
        raise UnsupportedNetworkError("the SDP relaxation here handles boxes and l_inf balls only")
    if net is None:
        net = relu_net(model, inputs.shape)
    ib, used = initial_bounds(model, net, inputs, bounds_method)  # interval bounds for a FeedForwardNet model
    regions = regions_of(inputs)
    C, d = spec_rows(spec)
    B, N = d.shape
    lower = np.full((B, N), -np.inf)
    details = []
    batch_deadline = Deadline.of(deadline)
    for bi, reg in enumerate(regions):
        t0 = time.perf_counter()
        mine = batch_deadline.share(B - bi)
        bnds = [(l[bi].numpy().copy(), u[bi].numpy().copy()) for l, u in ib]
        det: dict = {"bounds": used, "solver": solver, "triangle": triangle}
        if refine:
            bnds, det["refine"] = tighten_bounds(net, reg, bnds, deadline=mine.at)
        n_est = 1 + reg.lo.size + sum(int(((l < 0) & (u > 0)).sum()) for l, u in bnds)
        if not mine.affords(sdp_setup_estimate(n_est)):
            det["reason"] = f"not run: the SDP (n ~ {n_est}) needs about {sdp_setup_estimate(n_est):.1f} s, {mine.remaining():.1f} s left"
        else:
            prob = build_sdp(net, reg.lo, reg.hi, bnds, triangle)
            det["sdp"] = prob.stats
            sdp = _CvxpySdp(prob, solver)
            det["solver"] = sdp.solver
            skip = np.zeros(N, dtype=bool)
            if lp_first:
                skip = _lp_first(net, inputs, spec, bi, bnds, mine, lower[bi], det)
            _solve_rows(sdp, net, C[bi], d[bi], skip, mine, lower[bi], det)
        det["time_s"] = time.perf_counter() - t0
        details.append(det)
    return SdpResult(torch.from_numpy(lower), details)


def _lp_first(net: FeedForwardNet, inputs: InputSet, spec: LinearSpec, bi: int, bnds: list[tuple[np.ndarray, np.ndarray]],
              deadline: Deadline, lower: np.ndarray, det: dict) -> np.ndarray:
    """The triangle LP's bounds of example ``bi``'s rows: the rows it proves (``[N]`` bool) get
    its bound in ``lower [N]``."""
    from relax.exact.lp import lp_lower_bounds

    lpl = lp_lower_bounds(net, inputs.select([bi]), spec.select([bi]), net=net, bounds=[bnds], deadline=deadline).lower[0].numpy()
    skip = lpl > LP_FIRST_MARGIN
    lower[skip] = lpl[skip]
    det["rows_proved_by_lp"] = int(skip.sum())
    return skip


class _CvxpySdp:
    """One example's SDP in cvxpy, ``min <c0, vec(P)>`` over its constraints and ``P`` PSD, with
    the cost ``c0`` a parameter (built once, solved per row); ``solver``: the one used."""

    def __init__(self, prob: SdpProblem, solver: str) -> None:
        import cvxpy as cp

        self.prob = prob
        n = prob.n
        P = cp.Variable((n, n), PSD=True)
        p = cp.vec(P, order="F")
        self.cost = cp.Parameter(n * n)
        self.cons = [prob.E @ p == prob.e, prob.G @ p <= prob.h]
        self.problem = cp.Problem(cp.Minimize(self.cost @ p), self.cons)
        self.solver = solver if solver != "auto" else ("clarabel" if n <= AUTO_CLARABEL_MAX_N else "scs")
        self.kw = {"solver": cp.CLARABEL} if self.solver == "clarabel" else {"solver": cp.SCS, **SCS_OPTIONS}

    def bound(self, c0: np.ndarray, deadline: Deadline) -> tuple[str, float | None]:
        """The solve's status and the sound lower bound of ``min <c0, P>`` from its multipliers
        (None without them); the solve's time limit is what ``deadline`` leaves."""
        import cvxpy as cp

        self.cost.value = c0
        try:
            with warnings.catch_warnings():  # "inaccurate" is fine: the bound is verified
                warnings.simplefilter("ignore")
                self.problem.solve(**self.kw, **_time_limit_kw(self.solver, deadline.limit()))
            st = self.problem.status
        except cp.error.SolverError as e:
            st = f"solver error: {e}"
        nu, lam = self.cons[0].dual_value, self.cons[1].dual_value
        if nu is None or lam is None:
            return st, None
        return st, max(_dual_bound(self.prob, c0, nu, lam), _dual_bound(self.prob, c0, -np.asarray(nu), lam))


def _solve_rows(sdp: _CvxpySdp, net: FeedForwardNet, C: np.ndarray, d: np.ndarray, skip: np.ndarray, deadline: Deadline,
                lower: np.ndarray, det: dict) -> None:
    """Minimise each property row ``C y + d`` (``C [N, K]``, ``d [N]``) not in ``skip`` over
    ``sdp``, none started after ``deadline``: the sound bounds go into ``lower [N]``, the
    statuses into ``det``."""
    n = sdp.prob.n
    WL, bL = net.layers[-1].W.numpy(), net.layers[-1].b.numpy()
    rowsC = C @ WL  # [N, n_{L-1}]
    const = C @ bL + d
    obj = sdp.prob.last.T @ rowsC.T  # [n, N]: row i of the spec as a function of v = P[:, 0]
    statuses = []
    for i in range(len(d)):
        if skip[i]:
            continue
        if deadline.expired():
            statuses.append("not run (time limit)")
            continue
        c0 = np.zeros(n * n)
        c0[:n] = obj[:, i]  # column 0 of P (column-major vec)
        st, bound = sdp.bound(c0, deadline)
        statuses.append(st)
        if bound is not None:
            lower[i] = bound + const[i]
    det["status"] = sorted(set(statuses))
