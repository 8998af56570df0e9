"""LipSDP-Neuron (Fazlyab, Robey, Hassani, Morari & Pappas 2019) for the rows ``c^T f`` of a
feed-forward network, with a float64 verification of every solver answer.

**The LMI** (Fazlyab et al. 2019, Thm. 2, with the output term ``W_l^T c c^T W_l`` for one
row). Activations are slope-restricted in ``[alpha, beta] = [0, beta_k]`` (ReLU and tanh:
``beta = 1``; sigmoid: ``beta = 1/4``). With hidden layers ``z_k = act(W_{k-1} z_{k-1} + b)``,
``k = 1..l``, ``z_0 = x`` (``n_0``), ``w = W_l^T c`` and diagonal ``T_k >= 0``, the
block-tridiagonal matrix (blocks ``x, z_1, ..., z_l``)::

    M(rho, T) = [[ -rho I          beta_1 W_0^T T_1                                   ],
                 [ beta_1 T_1 W_0  -2 T_1            beta_2 W_1^T T_2                 ],
                 [                 beta_2 T_2 W_1    -2 T_2              ...          ],
                 [                                   ...     -2 T_l + w w^T           ]]

``M <= 0`` implies ``|c^T f(x) - c^T f(x')| <= sqrt(rho) ||x - x'||_2`` (the slope
quadratic constraint ``dphi (beta dv - dphi) >= 0`` weighted by ``2 T_k``, S-procedure). With
``alpha = 0`` the ``-2 alpha beta W^T T W`` blocks of the paper vanish.

**Reduction** (exact, for speed; :class:`LipSDP`). For ``T_k > 0``, ``rho > 0``: a congruence
with ``blockdiag(I, T_1^{-1}, ..., T_l^{-1})`` makes every block linear in ``U_k = T_k^{-1}``, a
Schur complement eliminates the input block (coupled to ``z_1`` by the constant ``beta_1 W_0^T``,
contributing ``beta_1^2 W_0 W_0^T / rho``) and another one linearises the output term. The LMI
in ``(sigma = 1/rho, U)`` has size ``n_1 + ... + n_l + 1``, independent of the input dimension
(51 x 51 for a 784-50-10 network instead of 844 x 844; a straightforward formulation did not
finish in 21 minutes with Clarabel, this one takes ~5 s per row) and stays block-tridiagonal
(Clarabel's chordal decomposition splits it into cliques of two consecutive layers).

**Soundness.** A solver's answer is never trusted: first-order solvers (SCS) can stop slightly
infeasible, below the optimum (measured on a random 2-10-30-20-2 net: SCS at eps 1e-4 51.53,
Clarabel 52.434). :func:`verify_rho` projects ``U`` to ``>= 0``, moves it towards a strictly
feasible closed-form point (:func:`feasible_point`) only as far as needed, computes the least
``rho`` feasible for that ``U`` (:func:`rho_star`), and inflates ``rho`` until the full,
unreduced LipSDP matrix (in the congruent form :func:`lipsdp_matrix_u`, with the input block
``-rho I_{n_0}``), rebuilt in float64 numpy and scaled to unit diagonal, passes
``eigvalsh(M).max() <= -1e-10 ||M||_F`` (well above the ``O(n eps ||M||)`` backward error of
``eigvalsh``). Only then is ``sqrt(rho)`` reported, rounded up; otherwise the caller falls back
to the global bound. :func:`polish` (gradient steps on ``log U``) improves any strictly feasible
``U`` cheaply; with ``solver="first-order"`` it is the whole solver (for LMIs too large for the
conic solvers, e.g. the 513 x 513 LMI of a 784-256-256-10 net).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from verify.deadline import Deadline

from relax.ir.dense import FeedForwardNet
from relax.lipschitz import ACT_LIPSCHITZ, ROUND_UP, chain_norms
from relax.bounds.roundoff import SAFETY, gamma

__all__ = ["LipSDPResult", "LipSDP", "lipsdp_matrix", "verify_rho", "lipsdp_rows"]


@dataclass
class LipSDPResult:
    """One row's answer.

    Attributes:
        L: verified l2 Lipschitz bound of ``c^T f`` (``sqrt(rho)`` rounded up), or ``None``
            when no feasible point could be verified.
        rho_solver: the solver's ``rho`` for the row (rescaled), unverified.
        rho: the verified ``rho`` (``L^2`` before rounding), or ``None``.
        status: solver status string.
        time_s: wall time of solve + verification.
    """

    L: float | None
    rho_solver: float | None
    rho: float | None
    status: str
    time_s: float
    info: dict = field(default_factory=dict)


def _betas(net: FeedForwardNet) -> list[float]:
    for a in net.activations:
        if a not in ACT_LIPSCHITZ:
            raise ValueError(f"LipSDP: activation {a!r} is not slope-restricted in a known interval")
    return [ACT_LIPSCHITZ[a] for a in net.activations]


def lipsdp_matrix(net: FeedForwardNet, w: np.ndarray, ts: list[np.ndarray], rho: float) -> np.ndarray:
    """The full (unreduced) LipSDP-Neuron matrix ``M(rho, T)`` in float64.

    Args:
        w: ``[n_l]`` last-layer row ``W_l^T c``.
        ts: ``[t_1 [n_1], ..., t_l [n_l]]`` diagonals of ``T_k``.
    Returns:
        ``[n_0 + sum n_k, n_0 + sum n_k]`` symmetric matrix.
    """
    betas = _betas(net)
    Ws = [net.layers[k].W.detach().cpu().double().numpy() for k in range(len(net.activations))]
    sizes = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    M = np.zeros((n, n))
    M[: sizes[0], : sizes[0]] = -rho * np.eye(sizes[0])
    for k, (W, t, b) in enumerate(zip(Ws, ts, betas)):
        i0, i1 = off[k], off[k + 1]  # block of z_k (input side)
        j0, j1 = off[k + 1], off[k + 2]  # block of z_{k+1}
        blk = b * (W.T * t[None, :])  # beta W^T T  [n_k, n_{k+1}]
        M[i0:i1, j0:j1] = blk
        M[j0:j1, i0:i1] = blk.T
        M[j0:j1, j0:j1] += np.diag(-2.0 * t)
    M[off[-2]:, off[-2]:] += np.outer(w, w)
    return M


def _weights(net: FeedForwardNet) -> list[np.ndarray]:
    return [net.layers[k].W.detach().cpu().double().numpy() for k in range(len(net.activations))]


def lipsdp_matrix_u(net: FeedForwardNet, w: np.ndarray, us: list[np.ndarray], rho: float) -> np.ndarray:
    """``S M(rho, T) S`` with ``S = blockdiag(I, U_1, ..., U_l)``, ``U_k = T_k^{-1} = diag(u_k)``:
    the LipSDP matrix in the inverse multipliers (bounded even when some ``t_k`` are huge)::

        [[ -rho I          beta_1 W_0^T                                       ],
         [ beta_1 W_0      -2 U_1          beta_2 U_1 W_1^T                   ],
         [                 beta_2 W_1 U_1  -2 U_2     ...                     ],
         [                                 ...        -2 U_l + U_l w w^T U_l  ]]

    For ``u_k > 0`` it is negative semidefinite iff ``M(rho, U^{-1})`` is (congruence).
    """
    betas = _betas(net)
    Ws = _weights(net)
    sizes = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    M = np.zeros((n, n))
    M[: sizes[0], : sizes[0]] = -rho * np.eye(sizes[0])
    for k, (W, b) in enumerate(zip(Ws, betas)):
        i0, i1, j0, j1 = off[k], off[k + 1], off[k + 1], off[k + 2]
        blk = b * W.T if k == 0 else b * (us[k - 1][:, None] * W.T)  # [n_k, n_{k+1}]
        M[i0:i1, j0:j1] = blk
        M[j0:j1, i0:i1] = blk.T
        M[j0:j1, j0:j1] += np.diag(-2.0 * us[k])
    uw = us[-1] * w
    M[off[-2]:, off[-2]:] += np.outer(uw, uw)
    return M


def _n_matrix(Ws: list[np.ndarray], betas: list[float], w: np.ndarray, us: list[np.ndarray], sigma: float) -> np.ndarray:
    """The reduced LMI matrix ``N(sigma, U)`` of :class:`LipSDP` (size ``sum n_k + 1``)."""
    sizes = [W.shape[0] for W in Ws]
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1]) + 1
    N = np.zeros((n, n))
    for k in range(len(sizes)):
        N[off[k]:off[k + 1], off[k]:off[k + 1]] = np.diag(-2.0 * us[k])
        if k + 1 < len(sizes):
            blk = betas[k + 1] * (us[k][:, None] * Ws[k + 1].T)
            N[off[k]:off[k + 1], off[k + 1]:off[k + 2]] = blk
            N[off[k + 1]:off[k + 2], off[k]:off[k + 1]] = blk.T
    n1 = sizes[0]
    if sigma:
        N[:n1, :n1] += betas[0] ** 2 * sigma * (Ws[0] @ Ws[0].T)
    N[off[-2]:off[-1], -1] = us[-1] * w
    N[-1, off[-2]:off[-1]] = us[-1] * w
    N[-1, -1] = -1.0
    return N


def _formation_error(M: np.ndarray, d: np.ndarray, uw: np.ndarray, u_last: np.ndarray) -> float:
    """Bound on ``||fl(D M D) - D M D||_2`` from forming :func:`lipsdp_matrix_u` and scaling it.

    Every entry of ``M`` is one product of at most three factors, except the last block's
    diagonal ``-2 u_i + (u_i w_i)^2``, a sum of two; with the scaling by ``d_i d_j`` each entry
    errs by at most ``8 u`` times the sum of its terms' magnitudes (Higham Sec. 3.1), and the
    spectral norm of the error is at most its Frobenius norm. The diagonal terms are taken
    whole so that a cancelling diagonal (a tiny ``|M_ii|``, a huge ``d_i``) is covered.
    """
    terms = np.abs(M)
    k = len(u_last)
    idx = np.arange(M.shape[0] - k, M.shape[0])
    terms[idx, idx] = 2.0 * u_last + uw * uw
    unit = np.finfo(np.float64).eps / 2
    return 8 * unit * float(np.linalg.norm(d[:, None] * terms * d[None, :]))


def _jacobi(M: np.ndarray) -> np.ndarray:
    """``d = |diag M|^{-1/2}`` (1 where the diagonal is 0): ``D M D`` has unit diagonal
    magnitudes, so a tolerance relative to its norm is meaningful for every block."""
    a = np.abs(np.diag(M))
    return np.where(a > 0, 1.0 / np.sqrt(np.where(a > 0, a, 1.0)), 1.0)


def feasible_point(Ws: list[np.ndarray], betas: list[float], w: np.ndarray) -> list[np.ndarray]:
    """Inverse multipliers ``u_k = a_k 1`` with ``N(0, U) < 0`` strictly, in closed form.

    ``v^T N(0, aI) v`` is at most the quadratic form of the scalar tridiagonal matrix with
    diagonal ``(-2 a_1, ..., -2 a_l, -1)`` and off-diagonals ``(beta_2 a_1 ||W_1||, ...,
    a_l ||w||)`` in ``(||v_1||, ..., ||v_l||, |s|)``; its LDL^T pivots ``d_{l+1} = -1``,
    ``d_k = -2 a_k + (off_k)^2 / |d_{k+1}|`` stay negative for ``a_k = |d_{k+1}| / (beta^2 ||W_k||^2)``
    (half the largest admissible value), giving ``d_k = -a_k``.
    """
    norms = [float(np.linalg.norm(W, 2)) for W in Ws]
    l = len(Ws)
    a = [0.0] * l
    d_next = 1.0  # |d_{k+1}|
    coupling = [max(float(np.linalg.norm(w)), 1e-300)] + [max(betas[k + 1] * norms[k + 1], 1e-300) for k in range(l - 2, -1, -1)]
    for idx, k in enumerate(range(l - 1, -1, -1)):
        c = coupling[idx]
        a[k] = d_next / c**2
        d_next = a[k]  # -2a + a^2 c^2 / d_next = -a
    return [np.full(W.shape[0], a[k]) for k, W in enumerate(Ws)]


def single_thread():
    """Context limiting BLAS/LAPACK (and OpenMP) pools to one thread. The dense linear algebra
    here is small (at most a few thousand rows); on a shared, loaded CPU multi-threaded
    LAPACK calls were measured 10-200x slower than single-threaded ones."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def verify_rho(net: FeedForwardNet, w: np.ndarray, us: list[np.ndarray], *, check_full: bool = True) -> tuple[float | None, dict]:
    """See :func:`_verify_rho` (run single-threaded)."""
    with single_thread():
        return _verify_rho(net, w, us, check_full=check_full)


def _verify_rho(net: FeedForwardNet, w: np.ndarray, us: list[np.ndarray], *, check_full: bool = True) -> tuple[float | None, dict]:
    """The smallest verified ``rho`` for the inverse multipliers ``us`` (any source), or ``None``.

    1. ``u_k <- max(u_k, 0)``; ``U <- (1 - theta) U + theta U_f`` for ``theta = 0`` and then
       increasing values: a first-order solver may stop slightly infeasible, and ``N`` is affine
       in ``U``, so moving towards the strictly feasible :func:`feasible_point` restores
       ``N(0, U) < 0`` with a margin.
    2. ``rho* = beta_1^2 lambda_max((-H)^{-1/2} G' (-H)^{-1/2})``, ``H = N(0, U)``,
       ``G' = blockdiag(W_0 W_0^T, 0)``: the least ``rho`` feasible for this ``U``.
    3. ``rho = rho* (1 + delta)`` for increasing ``delta`` until the full congruent matrix
       :func:`lipsdp_matrix_u` ``M``, scaled to unit diagonal (``D M D``, ``D = |diag M|^{-1/2}``:
       a congruence, so the sign is kept, and the blocks, whose scales differ by orders of
       magnitude, become comparable), passes ``eigvalsh(DMD).max() <= -(1e-10 ||DMD||_F + e)`` with ``e`` the
       bound on forming ``DMD`` (:func:`_formation_error`);
       if no ``delta`` passes, the next ``theta``.

    Returns:
        ``(rho, info)``; ``rho`` is ``None`` if no attempt passed.
    """
    betas = _betas(net)
    Ws = _weights(net)
    us = [np.maximum(np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0, posinf=0.0), 0.0) for u in us]
    uf = feasible_point(Ws, betas, w)
    info: dict = {"attempts": 0}
    n1 = Ws[0].shape[0]
    for theta in _THETAS:
        ut = [(1 - theta) * u + theta * f for u, f in zip(us, uf)]
        H = _n_matrix(Ws, betas, w, ut, 0.0)
        dh = _jacobi(H)
        lam, V = np.linalg.eigh(-(dh[:, None] * H * dh[None, :]))  # -D H D, D = diag(|H_ii|^-1/2)
        if lam[0] <= 1e-12 * lam[-1]:
            continue
        Q = np.zeros((H.shape[0], Ws[0].shape[1]))
        Q[:n1] = Ws[0]
        # Q^T (-H)^{-1} Q = (D Q)^T (-D H D)^{-1} (D Q)
        S = (V.T @ (dh[:, None] * Q)) / np.sqrt(lam)[:, None]
        rho_star = betas[0] ** 2 * float(np.linalg.svd(S, compute_uv=False)[0] ** 2) if S.size else 0.0
        rho_star = max(rho_star, 1e-300)

        def passes(delta: float) -> tuple[bool, float, float]:
            M = lipsdp_matrix_u(net, w, ut, rho_star * (1 + delta))
            d = _jacobi(M)  # congruence with a positive diagonal keeps the sign of M
            Ms = d[:, None] * M * d[None, :]
            tau = 1e-10 * float(np.linalg.norm(Ms)) + _formation_error(M, d, ut[-1] * w, ut[-1])
            top = float(np.linalg.eigvalsh(Ms)[-1])
            return top <= -tau, top, tau

        if not check_full:
            return rho_star * (1 + 1e-9), {**info, "theta": theta, "delta": 1e-9, "rho_star": rho_star}
        deltas = (1e-9, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
        for i, delta in enumerate(deltas):
            info["attempts"] += 1
            ok, top, tau = passes(delta)
            if not ok:
                continue
            if i > 0:  # geometric bisection between the last failing and this passing delta
                lo_d, hi_d = deltas[i - 1], delta
                for _ in range(3):
                    mid = math.sqrt(lo_d * hi_d)
                    info["attempts"] += 1
                    ok_m, top_m, tau_m = passes(mid)
                    if ok_m:
                        hi_d, top, tau = mid, top_m, tau_m
                    else:
                        lo_d = mid
                delta = hi_d
            return rho_star * (1 + delta), {**info, "theta": theta, "delta": delta, "rho_star": rho_star, "lambda_max": top, "tau": tau}
    return None, {**info, "reason": "no verified rho"}


_THETAS = (0.0, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0)


def _strictly_feasible(Ws: list[np.ndarray], betas: list[float], w: np.ndarray, us: list[np.ndarray]) -> list[np.ndarray] | None:
    """The first ``(1 - theta) U + theta U_f`` (``theta`` in ``_THETAS``) with ``N(0, U) < 0``."""
    us = [np.maximum(np.nan_to_num(np.asarray(u, dtype=np.float64), nan=0.0, posinf=0.0), 0.0) for u in us]
    uf = feasible_point(Ws, betas, w)
    for theta in _THETAS:
        ut = [(1 - theta) * u + theta * f for u, f in zip(us, uf)]
        if math.isfinite(rho_star(Ws, betas, w, ut)[0]):
            return ut
    return None


def rho_star(Ws: list[np.ndarray], betas: list[float], w: np.ndarray, us: list[np.ndarray],
             grad: bool = False) -> tuple[float, list[np.ndarray] | None]:
    """``rho*(U) = beta_1^2 lambda_max(Q^T (-H)^{-1} Q)``, the least ``rho`` with
    ``M(rho, U^{-1}) <= 0`` (``H = N(0, U)``, ``Q = [W_0; 0]``), and optionally its gradient in
    ``U``: with ``y`` the top eigenvector and ``z = (-H)^{-1} Q y``, ``d rho* = beta_1^2 z^T dH z``.
    Returns ``(inf, None)`` when ``H`` is not negative definite. Not a certificate by itself:
    :func:`verify_rho` checks the final point.
    """
    H = _n_matrix(Ws, betas, w, us, 0.0)
    dh = _jacobi(H)
    lam, V = np.linalg.eigh(-(dh[:, None] * H * dh[None, :]))
    if lam[0] <= 1e-12 * lam[-1]:
        return math.inf, None
    n1 = Ws[0].shape[0]
    DQ = np.zeros((H.shape[0], Ws[0].shape[1]))
    DQ[:n1] = dh[:n1, None] * Ws[0]
    S = (V.T @ DQ) / np.sqrt(lam)[:, None]
    _, sv, yt = np.linalg.svd(S, full_matrices=False)
    rho = betas[0] ** 2 * float(sv[0] ** 2)
    if not grad:
        return rho, None
    z = dh * (V @ ((V.T @ (DQ @ yt[0])) / lam))  # (-H)^{-1} Q y
    sizes = [W.shape[0] for W in Ws]
    off = np.concatenate([[0], np.cumsum(sizes)])
    g = []
    for k in range(len(sizes)):
        zk = z[off[k]:off[k + 1]]
        gk = -2.0 * zk**2
        if k + 1 < len(sizes):
            gk += 2.0 * betas[k + 1] * zk * (Ws[k + 1].T @ z[off[k + 1]:off[k + 2]])
        else:
            gk += 2.0 * zk * w * z[-1]
        g.append(betas[0] ** 2 * gk)
    return rho, g


def polish(Ws: list[np.ndarray], betas: list[float], w: np.ndarray, us: list[np.ndarray], iters: int = 50,
           step: float = 0.5, deadline: Deadline | None = None) -> tuple[list[np.ndarray], float]:
    """Lower ``rho*(U)`` by normalised gradient steps on ``log u`` with backtracking (a cheap
    first-order refinement of any strictly feasible ``U``; every accepted point keeps
    ``N(0, U) < 0``). Returns the best ``U`` and its ``rho*``; no step starts after
    ``deadline``."""
    best_u = [np.asarray(u, dtype=np.float64).copy() for u in us]
    best, g = rho_star(Ws, betas, w, best_u, grad=True)
    if not math.isfinite(best) or g is None:
        return best_u, best
    for _ in range(iters):
        if deadline is not None and deadline.expired():
            break
        gl = np.concatenate([u * gi for u, gi in zip(best_u, g)])
        scale = float(np.abs(gl).max())
        if scale == 0 or step < 1e-6:
            break
        dx = -step * gl / scale
        offs = np.cumsum([0] + [len(u) for u in best_u])
        cand = [u * np.exp(dx[offs[k]:offs[k + 1]]) for k, u in enumerate(best_u)]
        r, gc = rho_star(Ws, betas, w, cand, grad=True)
        if r < best:
            assert gc is not None  # r is finite
            best_u, best, g = cand, r, gc
            step *= 1.3
        else:
            step *= 0.4
    return best_u, best


class LipSDP:
    """LipSDP-Neuron of one network in cvxpy, in the reduced *inverse-multiplier* form, compiled
    once and re-solved per row (the row enters only through a parameter, so cvxpy's DPP cache
    reuses the canonicalisation).

    The reduced form: for ``T_k > 0`` and ``rho > 0``, congruence of ``M`` with
    ``blockdiag(I, U_1, ..., U_l)``, ``U_k = T_k^{-1}``, turns every block linear in ``U``
    (``U_{k-1} (beta_k W_{k-1}^T T_k) U_k = beta_k U_{k-1} W_{k-1}^T``, ``U_k (-2 T_k) U_k = -2 U_k``);
    a Schur complement on the input block ``-rho I`` (coupled to ``z_1`` by the constant
    ``beta_1 W_0^T``) adds ``beta_1^2 sigma W_0 W_0^T``, ``sigma = 1/rho``; and one on the output
    term ``(U_l w)(U_l w)^T`` adds a row. So ``M(rho, T) <= 0`` iff::

        N(sigma, U) = [[ -2 U_1 + beta_1^2 sigma G   beta_2 U_1 W_1^T                         ],
                       [ beta_2 W_1 U_1              -2 U_2          ...                      ],
                       [                              ...            -2 U_l      U_l w        ],
                       [                                             w^T U_l     -1           ]] <= 0

    with ``G = W_0 W_0^T``; maximise ``sigma``. The LMI has size ``n_1 + ... + n_l + 1``
    (independent of the input dimension: 51 x 51 for a 784-50-10 network instead of 844 x 844)
    and stays block-tridiagonal, so Clarabel's chordal decomposition splits it into cliques of
    two consecutive layers. The answer is mapped back to ``T = U^{-1}`` and verified on the
    full ``M`` by :func:`verify_rho`.

    Args:
        net: dense float64 network with activations in {relu, sigmoid, tanh}.
        solver: ``"clarabel"`` (interior point, default) or ``"scs"`` (first order).
        eps: solver tolerance (SCS ``eps_abs``/``eps_rel``; Clarabel gap/feasibility tolerances).
        max_iters: solver iteration cap.
        warm_start: SCS only, start each row from the previous row's solution.
    """

    def __init__(self, net: FeedForwardNet, solver: str = "clarabel", eps: float = 1e-8, max_iters: int = 100_000,
                 warm_start: bool = True, polish_iters: int | None = None) -> None:
        self.net = net
        self.solver = solver.lower()
        if self.solver not in ("clarabel", "scs", "first-order"):
            raise ValueError(f"LipSDP solver must be 'clarabel', 'scs' or 'first-order', got {solver!r}")
        self.polish_iters = polish_iters
        self.eps = eps
        self.max_iters = max_iters
        self.warm_start = warm_start
        #: seconds of one solver iteration in the last solve: a time limit is checked between
        #: iterations, so a solve is given its time limit minus one iteration
        self.iter_s = 0.0
        self.betas = _betas(net)
        if not net.activations:
            raise ValueError("LipSDP needs at least one hidden layer")
        Ws = _weights(net)
        self.Ws = Ws
        sizes = [W.shape[0] for W in Ws]
        self.size = sum(sizes) + 1
        if self.solver == "first-order":
            return
        import cvxpy as cp

        G = Ws[0] @ Ws[0].T
        # preconditioning (a change of variables, exact): u_k = a_k * v_k with a_k from the
        # closed-form feasible point for a unit row, and sigma = tau / s with s the squared naive
        # bound for a unit row, so the solver sees variables of order one
        e = np.zeros(sizes[-1])
        e[0] = 1.0
        self.a = [float(f[0]) for f in feasible_point(Ws, self.betas, e)]
        self.s = float(np.prod([(b * np.linalg.norm(W, 2)) ** 2 for b, W in zip(self.betas, Ws)]))
        self.tau = cp.Variable(nonneg=True)
        self.v = [cp.Variable(n, nonneg=True) for n in sizes]
        self.w = cp.Parameter(sizes[-1])
        dims = sizes + [1]
        L = len(sizes)
        blocks: list[list] = [[np.zeros((di, dj)) for dj in dims] for di in dims]
        for k in range(L):
            blocks[k][k] = -2 * self.a[k] * cp.diag(self.v[k])
            if k + 1 < L:
                blk = (self.betas[k + 1] * self.a[k]) * (cp.diag(self.v[k]) @ Ws[k + 1].T)  # [n_k, n_{k+1}]
                blocks[k][k + 1] = blk
                blocks[k + 1][k] = blk.T
        blocks[0][0] = blocks[0][0] + self.tau * ((self.betas[0] ** 2 / self.s) * G)
        col = cp.reshape(self.a[-1] * cp.multiply(self.v[-1], self.w), (sizes[-1], 1), order="F")
        blocks[L - 1][L] = col
        blocks[L][L - 1] = col.T
        blocks[L][L] = -np.ones((1, 1))
        N = cp.bmat(blocks)
        self.problem = cp.Problem(cp.Maximize(self.tau), [(N + N.T) / 2 << 0])

    def _solve_kwargs(self, time_limit: float | None = None) -> dict:
        import cvxpy as cp

        if self.solver == "scs":
            kw = dict(solver=cp.SCS, eps_abs=self.eps, eps_rel=self.eps, max_iters=self.max_iters, warm_start=self.warm_start)
            return kw if time_limit is None else {**kw, "time_limit_secs": float(time_limit)}
        kw = dict(solver=cp.CLARABEL, tol_gap_abs=self.eps, tol_gap_rel=self.eps, tol_feas=self.eps, max_iter=min(self.max_iters, 500))
        try:  # the supernodal faer backend is much faster on the dense PSD-cone blocks
            import clarabel

            if hasattr(clarabel.DefaultSettings(), "direct_solve_method"):
                kw["direct_solve_method"] = "faer"
        except Exception:  # pragma: no cover
            pass
        if time_limit is not None:
            kw["time_limit"] = float(time_limit)
        return kw

    def solve_row(self, w: np.ndarray, verify: bool = True, time_limit: float | None = None) -> LipSDPResult:
        """LipSDP for the row with last-layer vector ``w = W_l^T c`` ``[n_l]``: solve (cvxpy or
        the closed-form start), polish, verify. ``time_limit``: seconds for the solver (a solve
        stopped there gives multipliers that are verified like any other)."""
        t0 = time.perf_counter()
        nw = float(np.linalg.norm(w))
        if nw == 0.0:
            return LipSDPResult(0.0, 0.0, 0.0, "zero row", time.perf_counter() - t0)
        with single_thread():
            us, rho_s, status = None, None, self.solver
            if self.solver != "first-order":
                self.w.value = w / nw
                try:
                    # the first solve (iteration time unknown) gets half the time left
                    tl = None if time_limit is None else max(time_limit - self.iter_s if self.iter_s else time_limit / 2, 1e-3)
                    self.problem.solve(**self._solve_kwargs(tl))
                    st = self.problem.solver_stats
                    if st is not None and st.solve_time and st.num_iters:
                        self.iter_s = float(st.solve_time) / max(int(st.num_iters), 1)
                    status = str(self.problem.status)
                    vals = [v.value for v in self.v]
                    if all(v is not None for v in vals) and self.tau.value is not None and self.tau.value > 0:
                        # (sigma, U) solve the problem for w / ||w||; for w (homogeneity
                        # M(s^2 rho, s^2 T; s w) = s^2 M(rho, T; w)): rho = ||w||^2 / sigma, U = U' / ||w||^2
                        us = [a * np.asarray(v, dtype=np.float64) / nw**2 for a, v in zip(self.a, vals)]
                        rho_s = nw**2 * self.s / float(self.tau.value)
                except Exception as e:  # solver failure: continue from the closed-form point
                    status = f"solver error: {type(e).__name__}: {e}"
                if not verify:
                    L = None if rho_s is None else math.sqrt(rho_s)
                    return LipSDPResult(L, rho_s, None, status + " (unverified)", time.perf_counter() - t0)
            Ws, betas = self.Ws, self.betas
            if us is None:
                us = feasible_point(Ws, betas, w)
            iters = self.polish_iters if self.polish_iters is not None else (100 if self.solver == "first-order" else 20)
            info_p: dict = {}
            if iters > 0:
                start = _strictly_feasible(Ws, betas, w, us)
                if start is not None:
                    r0 = rho_star(Ws, betas, w, start)[0]
                    # polishing stops in time for the verification (which must run to the end)
                    until = None if time_limit is None else Deadline(time_limit - row_estimate(self.net))
                    us, r1 = polish(Ws, betas, w, start, iters=iters, deadline=until)
                    info_p = {"polish_from": r0, "polish_to": r1}
            rho_v, info = _verify_rho(self.net, w, us)
        L = None if rho_v is None else math.sqrt(rho_v) * (1 + ROUND_UP)
        return LipSDPResult(L, rho_s, rho_v, status, time.perf_counter() - t0, {**info, **info_p})


_EIGH_128: list[float] = []


def row_estimate(net: FeedForwardNet) -> float:
    """Estimated seconds to verify one row (:func:`_verify_rho`: about eight symmetric
    eigendecompositions of the full LipSDP matrix), from a timed 128 x 128 ``eigh`` scaled by n^3."""
    if not _EIGH_128:
        a = np.random.default_rng(0).standard_normal((128, 128))
        times = []
        for _ in range(3):  # the first call pays LAPACK's set-up
            t0 = time.perf_counter()
            np.linalg.eigh(a + a.T)
            times.append(time.perf_counter() - t0)
        _EIGH_128.append(min(times))
    n = net.n_in + sum(l.n_out for l in net.layers[:-1]) + 1
    return 8 * _EIGH_128[0] * (n / 128) ** 3


def _row_key(v: np.ndarray) -> bytes:
    """Exact key of a last-layer row up to sign (``c`` and ``-c`` give ``v`` and ``-v`` exactly)."""
    nz = np.flatnonzero(v)
    key_v = v if (nz.size == 0 or v[nz[0]] > 0) else -v
    return (key_v + 0.0).tobytes()  # + 0.0 folds -0.0 into 0.0


class RowSolver:
    """Verified LipSDP l2 bounds of rows ``c^T f``, solved on demand and memoised by row.

    Args:
        net: dense float64 network (at least one hidden layer).
        solver, eps, max_iters: as :class:`LipSDP`.
    """

    def __init__(self, net: FeedForwardNet, solver: str = "clarabel", eps: float | None = None, max_iters: int = 100_000,
                 polish_iters: int | None = None) -> None:
        self.net = net
        self.solver = solver
        self.eps = eps if eps is not None else (1e-8 if solver == "clarabel" else 1e-4)
        self.max_iters = max_iters
        self.polish_iters = polish_iters
        self._prob: LipSDP | None = None
        self.results: dict[bytes, LipSDPResult] = {}
        self.partial: set[bytes] = set()  # rows whose solve a deadline cut short (solved again later)
        self.W_L = net.layers[-1].W.detach().cpu().double()

    @property
    def problem(self) -> LipSDP:
        if self._prob is None:
            self._prob = LipSDP(self.net, solver=self.solver, eps=self.eps, max_iters=self.max_iters, polish_iters=self.polish_iters)
        return self._prob

    def rows(self, C: Tensor) -> np.ndarray:
        """Last-layer vectors ``W_L^T c`` ``[R, n_l]`` of rows ``C [R, K]``."""
        return (C.detach().cpu().double() @ self.W_L).numpy()

    def known(self, C: Tensor) -> np.ndarray:
        """``[R]`` verified bounds already computed (``nan`` where not solved or unverified)."""
        return np.array([self._value(self.results.get(_row_key(v))) for v in self.rows(C)])

    def is_solved(self, C: Tensor) -> np.ndarray:
        """``[R]``: solved (in a later call, rows a deadline cut short count as not solved)."""
        return np.array([(k := _row_key(v)) in self.results and k not in self.partial for v in self.rows(C)], dtype=bool)

    @staticmethod
    def _value(res: LipSDPResult | None) -> float:
        return np.nan if res is None or res.L is None else float(res.L)

    def solve(self, C: Tensor, deadline: Deadline | None = None) -> np.ndarray:
        """Solve (once per row up to sign) and return ``[R]`` bounds (``nan`` = no verified bound).

        ``deadline``: a row starts only if the time left exceeds the last row's time; the solver
        gets the time left (rows not started stay ``nan``)."""
        out, last = [], 0.0
        fresh = set()
        for v in self.rows(C):
            k = _row_key(v)
            if k not in self.results or (k in self.partial and k not in fresh):
                if deadline is not None and not deadline.affords(last or row_estimate(self.net)):
                    out.append(self._value(self.results.get(k)))
                    continue
                t0 = time.perf_counter()
                self.results[k] = self.problem.solve_row(v, time_limit=None if deadline is None else deadline.limit())
                last = time.perf_counter() - t0
                fresh.add(k)
                self.partial.discard(k)
                if deadline is not None and deadline.expired():
                    self.partial.add(k)
            out.append(self._value(self.results[k]))
        return np.array(out) + self._row_error(C)

    def _row_error(self, C: Tensor) -> np.ndarray:
        """``[R]``: how much the bound of the exact row ``W_L^T c`` may exceed that of the computed
        one: ``||fl(w) - w||_2 <= gamma_K || |c| |W_L| ||_2`` (Higham Eq. 3.5) times the hidden
        layers' l2 Lipschitz product."""
        if not hasattr(self, "_hidden_l2"):
            self._hidden_l2 = math.prod(chain_norms(self.net, 2.0))
        Cd = C.detach().cpu().double()
        terms = (Cd.abs() @ self.W_L.abs()).norm(dim=-1).numpy()
        return SAFETY * gamma(Cd.shape[-1] + 2, torch.float64) * terms * self._hidden_l2


def lipsdp_rows(net: FeedForwardNet, C: Tensor, *, solver: str = "clarabel", eps: float | None = None,
                max_iters: int = 100_000, polish_iters: int | None = None) -> tuple[Tensor, list[LipSDPResult]]:
    """Verified LipSDP l2 bounds for rows ``C [R, K]``; rows equal up to sign are solved once.

    Returns:
        ``(L [R] float64, results)``: ``L = nan`` where no verified bound exists (the caller
        falls back to the global bound); ``results`` per unique row, in order of appearance.
    """
    rs = RowSolver(net, solver=solver, eps=eps, max_iters=max_iters, polish_iters=polish_iters)
    L = rs.solve(C)
    return torch.from_numpy(L), list(rs.results.values())
