"""The triangle LP relaxation of a ReLU network (the linear approximation of Ehlers 2017, "Planet";
the convex outer polytope of Wong & Kolter 2018), and the sparse network encoding it shares with
the exact MILP of :mod:`relax.exact.milp`.

For a chain network in dense form (:func:`relax.ir.dense.to_feedforward`)::

    a_{-1} = x,   z_k = W_k a_{k-1} + b_k,   a_k = relu(z_k)   (k = 0..L-1),   y = W_L a_{L-1} + b_L

and pre-activation bounds ``l_k <= z_k <= u_k`` valid on the input set, each neuron is encoded by

* stably inactive (``u <= 0``): no variable, ``a = 0``;
* stably active (``l >= 0``): one variable ``a`` with ``a = W a_prev + b`` and ``l <= a <= u``;
* unstable (``l < 0 < u``): variables ``z in [l, u]``, ``a in [0, u]`` with ``z = W a_prev + b``,
  ``a >= z`` and the upper triangle side ``a <= u (z - l) / (u - l)`` (LP), or a binary ``delta``
  with ``a <= z - l (1 - delta)``, ``a <= u delta`` (the big-M MILP of Tjeng et al. 2019).

The input set enters as column bounds (a box; an l_inf ball intersected with the domain box) plus,
for an l_1 ball, ``x = c + p - q``, ``p, q >= 0``, ``sum(p + q) <= eps``.

Every property row ``C_i y + d_i`` is minimised over the LP (HiGHS, built once per input and
re-solved with the next cost: warm-started from the previous basis). The reported bound is the
*safe dual bound* of :func:`relax.solvers.safe_dual_bound` -- a lower bound of the LP optimum that
holds regardless of the solver's tolerances (the simplex objective itself is not used). With
``refine=True`` the pre-activation bounds of every hidden layer after the first are re-tightened
by LP (min and max of each unstable ``z_j`` over the relaxation of the layers before it), the
refinement ERAN applies (Singh et al. 2019, "Boosting robustness certification of neural networks").

Initial pre-activation bounds come from :func:`relax.bounds.intermediate_bounds` (CROWN) when that
module is present, intersected with interval bounds computed here; bounds from float32 passes are
widened by ``1e-6 (1 + |b|)`` before use.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from verify.deadline import Deadline
from verify.spec import Box, InputSet, LinearSpec, LpBall

from relax.bounds.roundoff import SAFETY, gamma
from relax.ir.dense import FeedForwardNet, layer_boxes, to_feedforward
from relax.bounds.interval import dense_interval_bounds
from relax.solvers import LinearProgram, make_backend, resolve_solver

__all__ = [
    "UnsupportedNetworkError",
    "InputRegion",
    "NetEncoding",
    "regions_of",
    "spec_rows",
    "relu_net",
    "interval_bounds",
    "initial_bounds",
    "encode",
    "tighten_bounds",
    "lp_lower_bounds",
    "LpResult",
]


class UnsupportedNetworkError(ValueError):
    """The network has no dense form of affine layers and ReLUs (what LP/MILP/SDP encode)."""


# ------------------------------------------------------------------------------------------
# inputs


@dataclass
class InputRegion:
    """One example's input set in flattened coordinates.

    Attributes:
        lo, hi: ``[n0]`` box (for a ball: the ball's box enclosure clipped to the domain).
        p: ``inf`` for boxes and l_inf balls, ``1.0`` for an l_1 ball (adds the l_1 rows).
        center: ``[n0]`` ball center (``None`` for a box).
        eps: ball radius (``None`` for a box).
    """

    lo: np.ndarray
    hi: np.ndarray
    p: float = math.inf
    center: np.ndarray | None = None
    eps: float | None = None


def regions_of(inputs: InputSet) -> list[InputRegion]:
    """Per-example :class:`InputRegion` of a batched box or l_inf / l_1 ball."""
    lo_t, hi_t = inputs.bounds()
    lo = lo_t.detach().double().cpu().reshape(lo_t.shape[0], -1).numpy()
    hi = hi_t.detach().double().cpu().reshape(hi_t.shape[0], -1).numpy()
    if isinstance(inputs, LpBall):
        if inputs.p == 2.0:
            raise UnsupportedNetworkError("l_2 balls are not polyhedral: the LP/MILP encodings support boxes, l_inf and l_1 balls")
        c = inputs.center.detach().double().cpu().reshape(lo.shape[0], -1).numpy()
        eps = inputs.eps.detach().double().cpu().numpy()
        return [InputRegion(lo[b], hi[b], inputs.p, c[b], float(eps[b])) for b in range(lo.shape[0])]
    return [InputRegion(lo[b], hi[b]) for b in range(lo.shape[0])]


def spec_rows(spec: LinearSpec) -> tuple[np.ndarray, np.ndarray]:
    """The property rows as float64 arrays: ``C [B, N, K]``, ``d [B, N]``."""
    return spec.C.detach().double().cpu().numpy(), spec.d.detach().double().cpu().numpy()


def relu_net(model: torch.nn.Module | FeedForwardNet, input_shape: tuple[int, ...], stop_at: float | None = None) -> FeedForwardNet:
    """The dense float64 form of ``model`` (built until the hard deadline ``stop_at``,
    :func:`relax.ir.dense.to_feedforward`); raises :class:`UnsupportedNetworkError` unless every
    activation is a ReLU."""
    net = model if isinstance(model, FeedForwardNet) else to_feedforward(model, tuple(input_shape), stop_at=stop_at)
    bad = sorted({a for a in net.activations if a != "relu"})
    if bad:
        raise UnsupportedNetworkError(f"only ReLU networks are encoded exactly; this one has {', '.join(bad)}")
    net = net.to(dtype=torch.float64, device="cpu")
    for layer in net.layers:
        layer.W, layer.b = layer.W.detach(), layer.b.detach()
    return net


# ------------------------------------------------------------------------------------------
# intermediate bounds


def interval_bounds(net: FeedForwardNet, regions: list[InputRegion]) -> list[tuple[Tensor, Tensor]]:
    """Interval (IBP) bounds of every hidden pre-activation, ``[(l_k [B, n_k], u_k)]``, float64
    (:func:`relax.bounds.interval.dense_interval_bounds`, widened by their round-off).

    For an l_1 ball the first layer also uses ``|W (x - c)| <= eps max_j |W_ij|``, widened by
    the round-off of ``W c + b`` and of the product ``eps max_j |W_ij|``."""
    lo = torch.from_numpy(np.stack([r.lo for r in regions]))
    hi = torch.from_numpy(np.stack([r.hi for r in regions]))
    W, b = net.layers[0].W.double(), net.layers[0].b.double()
    fl = torch.full((len(regions), W.shape[0]), -math.inf, dtype=torch.float64)
    fu = torch.full_like(fl, math.inf)
    for i, r in enumerate(regions):
        if r.p == 1.0 and r.center is not None and r.eps is not None:
            c0 = torch.from_numpy(r.center)
            c = c0 @ W.T + b
            e = r.eps * W.abs().amax(dim=1)
            slack = SAFETY * gamma(W.shape[1] + 2, W.dtype) * (c0.abs() @ W.abs().T + b.abs() + e) + 1e-300
            fl[i], fu[i] = c - e - slack, c + e + slack
    return dense_interval_bounds(net, lo, hi, first=(fl, fu))


def _widen(t: Tensor, down: bool) -> Tensor:
    t = t.double()
    d = 1e-6 * (1.0 + t.abs())
    return t - d if down else t + d


def initial_bounds(
    model: torch.nn.Module | FeedForwardNet, net: FeedForwardNet, inputs: InputSet, method: str = "crown"
) -> tuple[list[tuple[Tensor, Tensor]], str]:
    """Pre-activation bounds ``[(l_k [B, n_k], u_k)]`` (float64) of the ReLU inputs and the name of
    the method that produced them.

    ``method="interval"`` uses :func:`interval_bounds` only. Otherwise ``method`` ("crown",
    "alpha-crown", ...) is passed to ``relax.bounds.intermediate_bounds``, whose boxes are widened by
    ``1e-6 (1 + |b|)``, mapped onto ``net``'s layers (:func:`relax.ir.dense.layer_boxes`: carried
    skip values included) and intersected with the interval bounds. If that module is missing or
    fails, the interval bounds are used and the returned name says why. ``inputs`` may be an
    l_2 ball (for the minimum l_2 distortion): the interval bounds then use its box enclosure.
    A :class:`FeedForwardNet` ``model`` (no graph to run the bound engine on) gets the interval
    bounds.
    """
    if isinstance(inputs, LpBall) and inputs.p == 2.0:
        # interval bounds on the ball's box enclosure; CROWN below sees the l_2 ball itself
        ib = interval_bounds(net, regions_of(Box(*inputs.bounds())))
    else:
        ib = interval_bounds(net, regions_of(inputs))
    if method == "interval" or isinstance(model, FeedForwardNet):
        return ib, "interval"
    try:
        from relax.bounds import intermediate_bounds
    except ImportError:
        return ib, "interval (relax.bounds not available)"
    used = method
    if method not in ("crown", "deeppoly"):
        # relax.bounds gives boxes for interval / crown / deeppoly; optimised (alpha) bounds of
        # the intermediate layers are not exposed, and LP refinement supersedes them anyway
        used = f"crown (for {method})"
        method = "crown"
    try:
        got = intermediate_bounds(model, inputs, method=method, dtype=torch.float64)
    except Exception as e:  # a bound engine failure must not stop an exact method: fall back
        return ib, f"interval ({method} failed: {type(e).__name__}: {e})"
    lo, hi = inputs.bounds()
    mapped = layer_boxes(net, {k: (_widen(l, True), _widen(u, False)) for k, (l, u) in got.items()}, lo, hi)
    if mapped is None:
        return ib, f"interval ({method}'s pre-activation boxes do not match the dense layers)"
    out = [(torch.maximum(l0, l1), torch.minimum(u0, u1)) for (l0, u0), (l1, u1) in zip(ib, mapped)]
    return out, f"{used}+interval"


# ------------------------------------------------------------------------------------------
# encoding


class _Builder:
    """Accumulates columns (bounds, integrality) and rows (COO triplets, two-sided bounds)."""

    def __init__(self) -> None:
        self.col_lo: list[np.ndarray] = []
        self.col_hi: list[np.ndarray] = []
        self.col_int: list[np.ndarray] = []
        self.n = 0
        self.ri: list[np.ndarray] = []
        self.rj: list[np.ndarray] = []
        self.rv: list[np.ndarray] = []
        self.row_lo: list[np.ndarray] = []
        self.row_hi: list[np.ndarray] = []
        self.m = 0

    def cols(self, lo, hi, integer: bool = False) -> np.ndarray:
        lo = np.atleast_1d(np.asarray(lo, dtype=np.float64))
        hi = np.atleast_1d(np.asarray(hi, dtype=np.float64))
        idx = np.arange(self.n, self.n + len(lo))
        self.col_lo.append(lo)
        self.col_hi.append(hi)
        self.col_int.append(np.full(len(lo), integer))
        self.n += len(lo)
        return idx

    def rows(self, M: sp.spmatrix, lo, hi) -> np.ndarray:
        """Add rows ``lo <= M x <= hi``; ``M`` is ``[r, n_cols_so_far]`` (fewer columns ok)."""
        M = sp.coo_matrix(M)
        r = M.shape[0]
        self.ri.append(M.row + self.m)
        self.rj.append(M.col)
        self.rv.append(M.data.astype(np.float64))
        self.row_lo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (r,)).copy())
        self.row_hi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (r,)).copy())
        idx = np.arange(self.m, self.m + r)
        self.m += r
        return idx

    def build(self, integer: bool) -> LinearProgram:
        cat = lambda xs, dt=np.float64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt)  # noqa: E731
        A = sp.csr_matrix((cat(self.rv), (cat(self.ri, np.int64), cat(self.rj, np.int64))), shape=(self.m, self.n))
        A.sum_duplicates()
        col_int = cat(self.col_int, bool)
        return LinearProgram(
            A=A,
            row_lo=cat(self.row_lo),
            row_hi=cat(self.row_hi),
            col_lo=cat(self.col_lo),
            col_hi=cat(self.col_hi),
            c=np.zeros(self.n),
            integer=col_int if integer and col_int.any() else None,
        )


@dataclass
class NetEncoding:
    """The encoded network (LP or MILP) and where each quantity lives.

    Attributes:
        lp: the problem (zero objective; set one with :meth:`expr`).
        x_cols: ``[n0]`` input columns.
        act_cols: per encoded hidden layer, ``[n_k]`` column of each post-activation (``-1``: the
            neuron is stably inactive and fixed to 0).
        z_cols: per layer, column of the pre-activation of unstable neurons (``-1`` elsewhere).
        delta_cols: per layer, binary column of unstable neurons in a MILP (``-1`` elsewhere).
        eps_col: column of the radius variable (minimum-distortion problems) or ``-1``.
        l1_cols: ``(p_cols, q_cols)`` of an l_1 ball, or ``None``.
        bounds: the pre-activation bounds used, ``[(l_k [n_k], u_k)]`` numpy float64.
        n_hidden: number of encoded hidden layers.
        center: ``[n0]`` ball center (for :meth:`point`), or ``None``.
    """

    lp: LinearProgram
    x_cols: np.ndarray
    act_cols: list[np.ndarray]
    z_cols: list[np.ndarray]
    delta_cols: list[np.ndarray]
    eps_col: int
    l1_cols: tuple[np.ndarray, np.ndarray] | None
    bounds: list[tuple[np.ndarray, np.ndarray]]
    n_hidden: int
    center: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def input_cols(self, k: int) -> np.ndarray:
        """Column of each component of the input of layer ``k`` (``-1`` = constant 0)."""
        return self.x_cols if k == 0 else self.act_cols[k - 1]

    def expr(self, k: int, W: np.ndarray, b: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """``W a_{k-1} + b`` as ``(M [m, n_cols], const [m])`` over the columns (``a_{-1} = x``).

        ``W``: ``[m, n_{k-1}]``; ``b``: ``[m]``."""
        cols = self.input_cols(k)
        alive = cols >= 0
        Wa = np.asarray(W, dtype=np.float64)[:, alive]
        M = sp.csr_matrix(Wa)
        M = sp.csr_matrix((M.data, cols[alive][M.indices], M.indptr), shape=(Wa.shape[0], self.lp.num_cols))
        return M, np.asarray(b, dtype=np.float64).copy()

    def binaries(self) -> np.ndarray:
        """The binary columns of every encoded layer (empty for an LP)."""
        return np.concatenate([d[d >= 0] for d in self.delta_cols]) if self.delta_cols else np.zeros(0, dtype=np.int64)

    def binaries_to_relax(self, rows: sp.spmatrix) -> np.ndarray:
        """Binary columns that may be made continuous without changing the optimum of a MILP that
        minimises over ``rows`` (``[r, n_cols]``: the objective, or the rows bounded above).

        A neuron ``j`` of the last encoded layer whose post-activation ``a_j`` enters every row
        with a coefficient ``>= 0``: with ``delta_j`` continuous its encoding is the triangle
        ``a_j >= max(z_j, 0)``, ``a_j <= chord`` (Ehlers 2017), and lowering ``a_j`` of any such
        point to ``max(z_j, 0)`` gives a point of the network that no row holds higher. So the
        relaxed minimum equals the exact one, and every relaxed solution's input is a network
        input whose rows are at most the solution's (Tjeng et al. 2019 branch on all unstable
        ReLUs; on a one-hidden-layer net this removes the binaries of about half of them). Valid
        only while ``a_j`` enters no other active row (true for the last encoded layer when the
        other property rows are free). Relaxing is always a relaxation: the MILP's dual bound
        stays a lower bound whatever ``rows`` are."""
        if not self.n_hidden:
            return np.zeros(0, dtype=np.int64)
        act, dc = self.act_cols[self.n_hidden - 1], self.delta_cols[self.n_hidden - 1]
        unst = np.flatnonzero(dc >= 0)
        if not len(unst):
            return np.zeros(0, dtype=np.int64)
        coef = sp.csc_matrix(rows)[:, act[unst]]
        lowest = np.asarray(coef.min(axis=0).toarray()).ravel() if coef.shape[0] else np.zeros(len(unst))
        return dc[unst[lowest >= 0]]

    def point(self, net: FeedForwardNet, x: np.ndarray, eps: float | None = None, extra: dict[int, float] | None = None) -> np.ndarray:
        """A full column assignment for input ``x [n0]`` (an MILP start): activations by a
        forward pass, ``delta = [z > 0]``, ``p, q`` from ``x - c``; ``extra`` sets more columns."""
        v = np.zeros(self.lp.num_cols)
        v[self.x_cols] = x
        a = x
        for k in range(self.n_hidden):
            z = net.layers[k].W.numpy() @ a + net.layers[k].b.numpy()
            a = np.maximum(z, 0.0)
            ac, zc, dc = self.act_cols[k], self.z_cols[k], self.delta_cols[k]
            v[ac[ac >= 0]] = a[ac >= 0]
            v[zc[zc >= 0]] = z[zc >= 0]
            v[dc[dc >= 0]] = (z[dc >= 0] > 0).astype(np.float64)
        if self.l1_cols is not None and self.center is not None:
            d = x - self.center
            v[self.l1_cols[0]] = np.maximum(d, 0)
            v[self.l1_cols[1]] = np.maximum(-d, 0)
        if self.eps_col >= 0 and eps is not None:
            v[self.eps_col] = eps
        for j, val in (extra or {}).items():
            v[j] = val
        return np.clip(v, self.lp.col_lo, self.lp.col_hi)


def encode(
    net: FeedForwardNet,
    region: InputRegion,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    *,
    n_hidden: int | None = None,
    integer: bool = False,
    distortion: tuple[float, float] | None = None,
) -> NetEncoding:
    """Encode ``net`` over ``region`` as an LP (triangle) or MILP (big-M) -- see the module docstring.

    Args:
        net: dense ReLU network.
        region: the input set of one example.
        bounds: ``[(l_k [n_k], u_k)]`` valid pre-activation bounds for every hidden layer.
        n_hidden: encode only the first ``n_hidden`` hidden layers (for bound refinement).
        integer: MILP (binary ``delta`` per unstable neuron) instead of the triangle LP.
        distortion: ``(p, eps_max)``: add a radius column ``eps in [0, eps_max]`` with
            ``||x - center||_p <= eps`` (p = inf or 1) instead of the fixed radius of ``region``.
    """
    L = len(net.activations)
    n_hidden = L if n_hidden is None else n_hidden
    bld = _Builder()
    x_cols = bld.cols(region.lo, region.hi)
    eps_col, l1 = _input_rows(bld, region, x_cols, distortion)
    act_cols: list[np.ndarray] = []
    z_cols: list[np.ndarray] = []
    d_cols: list[np.ndarray] = []
    used = []
    n_unstable = 0
    prev = x_cols
    for k in range(n_hidden):
        l, u = (np.asarray(t, dtype=np.float64) for t in bounds[k])
        used.append((l, u))
        act, zc, dc = _encode_layer(bld, net.layers[k].W.numpy(), net.layers[k].b.numpy(), l, u, prev, integer)
        n_unstable += int(((l < 0) & (u > 0)).sum())
        act_cols.append(act)
        z_cols.append(zc)
        d_cols.append(dc)
        prev = act
    lp = bld.build(integer)
    enc = NetEncoding(lp, x_cols, act_cols, z_cols, d_cols, eps_col, l1, used, n_hidden, region.center)
    enc.stats = {"columns": lp.num_cols, "rows": lp.num_rows, "nonzeros": int(lp.A.nnz), "unstable": n_unstable}
    return enc


def _input_rows(bld: _Builder, region: InputRegion, x_cols: np.ndarray, distortion: tuple[float, float] | None
                ) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
    """The input set's constraints beyond the input columns' bounds: with ``distortion``
    ``(p, eps_max)`` a radius column and ``||x - center||_p <= eps`` (p = inf or 1), else an l_1
    ball's rows. Returns the radius column (-1: none) and the l_1 rows' ``(p, q)`` columns."""
    n0 = len(x_cols)
    if distortion is None:
        if region.p == 1.0:
            assert region.center is not None and region.eps is not None  # an l_1 ball
            return -1, _l1_rows(bld, x_cols, region.center, region.eps, -1)
        return -1, None
    p, emax = distortion
    if region.center is None:
        raise ValueError("encode: distortion needs a region with a center")
    eps_col = int(bld.cols([0.0], [emax])[0])
    c = region.center
    I = np.arange(n0)
    if math.isinf(p):
        # x_i - eps <= c_i  and  x_i + eps >= c_i
        M1 = sp.coo_matrix((np.r_[np.ones(n0), -np.ones(n0)], (np.r_[I, I], np.r_[x_cols, np.full(n0, eps_col)])), shape=(n0, bld.n))
        bld.rows(M1, -np.inf, c)
        M2 = sp.coo_matrix((np.r_[np.ones(n0), np.ones(n0)], (np.r_[I, I], np.r_[x_cols, np.full(n0, eps_col)])), shape=(n0, bld.n))
        bld.rows(M2, c, np.inf)
        return eps_col, None
    if p == 1.0:
        return eps_col, _l1_rows(bld, x_cols, c, emax, eps_col)
    raise ValueError(f"encode: distortion norm must be inf or 1, got {p}")


def _encode_layer(bld: _Builder, W: np.ndarray, b: np.ndarray, l: np.ndarray, u: np.ndarray, prev: np.ndarray,
                  integer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One hidden layer ``a = relu(W a_prev + b)`` with bounds ``l <= z <= u`` (``[n_k]``) on the
    previous layer's columns ``prev`` (-1: a zero); returns the columns ``[n_k]`` (-1: none) of
    ``a``, of ``z`` (unstable neurons) and of ``delta`` (unstable, MILP)."""
    alive = prev >= 0
    Wa = sp.csr_matrix(W[:, alive])
    pc = prev[alive]
    n_k = W.shape[0]
    act = np.full(n_k, -1, dtype=np.int64)
    zc = np.full(n_k, -1, dtype=np.int64)
    dc = np.full(n_k, -1, dtype=np.int64)
    # stably active: a = W a_prev + b, a in [l, u]
    ja = np.flatnonzero(l >= 0)
    if len(ja):
        act[ja] = bld.cols(l[ja], u[ja])
        M = _with_unit(Wa[ja], pc, act[ja], -1.0, bld.n)
        bld.rows(M, b[ja], b[ja])  # a - W a_prev = b
    ju = np.flatnonzero((l < 0) & (u > 0))
    if not len(ju):
        return act, zc, dc
    lu, uu = l[ju], u[ju]
    zc[ju] = bld.cols(lu, uu)
    act[ju] = bld.cols(np.zeros(len(ju)), uu)
    r = np.arange(len(ju))
    bld.rows(_with_unit(Wa[ju], pc, zc[ju], -1.0, bld.n), b[ju], b[ju])  # z - W a_prev = b
    # a - z >= 0
    bld.rows(sp.coo_matrix((np.r_[np.ones(len(ju)), -np.ones(len(ju))], (np.r_[r, r], np.r_[act[ju], zc[ju]])), shape=(len(ju), bld.n)), 0.0, np.inf)
    if integer:
        dc[ju] = bld.cols(np.zeros(len(ju)), np.ones(len(ju)), integer=True)
        # a - z - l delta <= -l      (a <= z - l (1 - delta))
        M = sp.coo_matrix((np.r_[np.ones(len(ju)), -np.ones(len(ju)), -lu], (np.r_[r, r, r], np.r_[act[ju], zc[ju], dc[ju]])), shape=(len(ju), bld.n))
        bld.rows(M, -np.inf, -lu)
        # a - u delta <= 0
        M = sp.coo_matrix((np.r_[np.ones(len(ju)), -uu], (np.r_[r, r], np.r_[act[ju], dc[ju]])), shape=(len(ju), bld.n))
        bld.rows(M, -np.inf, 0.0)
    else:
        s = uu / (uu - lu)
        # a - s z <= -s l
        M = sp.coo_matrix((np.r_[np.ones(len(ju)), -s], (np.r_[r, r], np.r_[act[ju], zc[ju]])), shape=(len(ju), bld.n))
        bld.rows(M, -np.inf, -s * lu)
    return act, zc, dc


def _with_unit(Wsub: sp.csr_matrix, prev_cols: np.ndarray, unit_cols: np.ndarray, sign: float, n: int) -> sp.coo_matrix:
    """Rows ``unit - W a_prev`` (``sign=-1`` on W) over all ``n`` columns."""
    C = sp.coo_matrix(Wsub)
    r = C.shape[0]
    rows = np.r_[C.row, np.arange(r)]
    cols = np.r_[prev_cols[C.col], unit_cols]
    vals = np.r_[sign * C.data, np.ones(r)]
    return sp.coo_matrix((vals, (rows, cols)), shape=(r, n))


def _l1_rows(bld: _Builder, x_cols: np.ndarray, c: np.ndarray, eps: float, eps_col: int) -> tuple[np.ndarray, np.ndarray]:
    """``x = c + p - q``, ``p, q in [0, eps]``, ``sum(p + q) <= eps`` (or ``<= eps_col``)."""
    n0 = len(x_cols)
    pc = bld.cols(np.zeros(n0), np.full(n0, eps))
    qc = bld.cols(np.zeros(n0), np.full(n0, eps))
    I = np.arange(n0)
    M = sp.coo_matrix((np.r_[np.ones(n0), -np.ones(n0), np.ones(n0)], (np.r_[I, I, I], np.r_[x_cols, pc, qc])), shape=(n0, bld.n))
    bld.rows(M, c, c)
    vals = np.ones(2 * n0)
    cols = np.r_[pc, qc]
    if eps_col >= 0:
        M = sp.coo_matrix((np.r_[vals, -1.0], (np.zeros(2 * n0 + 1, dtype=np.int64), np.r_[cols, eps_col])), shape=(1, bld.n))
        bld.rows(M, -np.inf, 0.0)
    else:
        M = sp.coo_matrix((vals, (np.zeros(2 * n0, dtype=np.int64), cols)), shape=(1, bld.n))
        bld.rows(M, -np.inf, eps)
    return pc, qc


# ------------------------------------------------------------------------------------------
# LP bound refinement and property bounds


#: relative and absolute widening of a MILP dual bound used as a pre-activation bound: the
#: solver's branch-and-bound bound is exact only up to the feasibility / optimality tolerances
#: of its node LPs (~1e-7 here), unlike the LP's safe dual bound
MILP_BOUND_SLACK = (1e-6, 1e-5)


def _milp_widen(bound: float) -> float:
    """A MILP dual bound lowered by :data:`MILP_BOUND_SLACK` (a lower bound stays one)."""
    rel, ab = MILP_BOUND_SLACK
    return bound - rel * abs(bound) - ab


def tighten_bounds(
    net: FeedForwardNet,
    region: InputRegion,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    *,
    solver: str = "auto",
    layers: list[int] | None = None,
    deadline: float | None = None,
    integer: bool = False,
    solve_time_limit: float | None = None,
    order: str = "index",
    rel_gap: float = 1e-4,
    abs_gap: float = 1e-6,
    workers: int = 1,
    priority: list[np.ndarray | None] | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Re-tighten pre-activation bounds of unstable neurons by LP (or MILP), layer by layer.

    For layer ``k`` the triangle LP (``integer=True``: the big-M MILP, one binary per unstable
    ReLU) of layers ``0..k-1`` with the already refined bounds is built once; for every
    unstable neuron ``j`` it is solved for ``min z_j`` and ``max z_j`` (warm-started cost
    changes). New bounds are intersected with the old ones (never loosened):

    * LP: the safe dual bound of an optimal solve (rigorous whatever the tolerances);
    * MILP: the solver's dual (best) bound -- also of a solve stopped at ``solve_time_limit`` or
      the deadline, where the incumbent is *not* a bound -- widened by :data:`MILP_BOUND_SLACK`.

    Args:
        layers: hidden-layer indices to refine (default: all but the first for box / l_inf inputs,
            where interval bounds of layer 0 are exact; all for l_1 balls).
        deadline: ``time.perf_counter()`` value after which refinement stops (bounds stay valid).
        integer: MILP instead of LP.
        solve_time_limit: seconds per solve (``None``: up to the deadline).
        order: ``"index"`` or ``"score"`` (within a layer, largest ``-l u`` first: the neurons
            whose triangle relaxation is loosest, so a deadline cuts the least useful ones).
        priority: per hidden layer ``[n_k]`` (or ``None``): when given for a layer, its
            neurons are solved in decreasing priority instead (ties keep ``order``), e.g. by
            how much their relaxation costs the bound being proved.
        rel_gap, abs_gap: MILP termination gaps (the dual bound is used either way).
        workers: solver threads, each with its own copy of the layer's model, taking the
            neurons in ``order`` (HiGHS and Gurobi release the GIL while solving).

    Returns:
        The refined bounds and stats (solves, solves stopped at a time limit, MILP solves
        stopped once the neuron was proved stable, neurons stabilised -- total and per layer --
        seconds, solvers used).
    """
    if order not in ("index", "score"):
        raise ValueError(f"order must be 'index' or 'score', got {order!r}")
    t0 = time.perf_counter()
    bounds = [(lo.copy(), hi.copy()) for lo, hi in bounds]
    if layers is None:
        layers = list(range(0 if region.p == 1.0 else 1, len(bounds)))
    per_layer_before = [_unstable_count(b) for b in bounds]
    solves = _NeuronSolves(solver, deadline, integer, solve_time_limit, rel_gap, abs_gap)
    stopped = False
    for k in layers:
        if stopped or (deadline is not None and time.perf_counter() > deadline):
            stopped = True
            break
        l, u = bounds[k]
        unst = np.flatnonzero((l < 0) & (u > 0))
        if len(unst) == 0:
            continue
        unst = _solve_order(unst, l, u, order, None if priority is None else priority[k])
        enc = encode(net, region, bounds, n_hidden=k, integer=integer)
        M, const = enc.expr(k, net.layers[k].W.numpy(), net.layers[k].b.numpy())
        todo = iter(unst.tolist())
        n_workers = max(1, min(int(workers), len(unst)))
        with ThreadPoolExecutor(n_workers) as pool:  # the solvers release the GIL while solving
            finished = list(pool.map(lambda _: solves.worker(enc, M, const, l, u, todo), range(n_workers)))
        stopped = not all(finished)
        bounds[k] = (l, np.maximum(u, l))
    per_layer_after = [_unstable_count(b) for b in bounds]
    return bounds, {
        **solves.counts, "unstable_before": sum(per_layer_before), "unstable_after": sum(per_layer_after),
        "unstable_per_layer_before": per_layer_before, "unstable_per_layer_after": per_layer_after,
        "solvers": sorted(solves.solvers), "stopped_at_deadline": stopped, "time_s": time.perf_counter() - t0,
    }


def _solve_order(unst: np.ndarray, l: np.ndarray, u: np.ndarray, order: str, priority: np.ndarray | None) -> np.ndarray:
    """The unstable neurons ``unst`` of a layer (bounds ``l``, ``u``) in the order they are
    solved: by index, or (``"score"``) the largest ``-l u`` first; then, when given, by
    decreasing ``priority`` (ties keep the order)."""
    if order == "score":
        unst = unst[np.argsort(-(-l[unst] * u[unst]), kind="stable")]
    if priority is not None:
        unst = unst[np.argsort(-priority[unst], kind="stable")]
    return unst


def _unstable_count(lu: tuple[np.ndarray, np.ndarray]) -> int:
    return int(((lu[0] < 0) & (lu[1] > 0)).sum())


class _NeuronSolves:
    """The LP / MILP solves of :func:`tighten_bounds`: per neuron ``max z_j`` then ``min z_j`` on
    a backend of each worker's own, the valid bound each solve gives, and the counts (shared by
    the workers of a layer under a lock)."""

    def __init__(self, solver: str, deadline: float | None, integer: bool, solve_time_limit: float | None,
                 rel_gap: float, abs_gap: float) -> None:
        self.solver, self.deadline, self.integer = solver, deadline, integer
        self.solve_time_limit, self.rel_gap, self.abs_gap = solve_time_limit, rel_gap, abs_gap
        self.counts = {"lps": 0, "time_limited": 0, "stopped_stable": 0}
        self.solvers: set[str] = set()
        self.lock = threading.Lock()
        # MILP: a solve may stop once its dual bound proves the neuron stable (max z_j <= 0 or
        # min z_j >= 0, also after widening: 1e-4 > the widening near 0); a stable neuron needs
        # no relaxation, so how tight its bound is matters little
        self.stop_stable = 1e-4 if integer else None

    def new_bound(self, r: Any) -> float | None:
        """The valid lower bound of a solve's minimum, or ``None`` (counts the solve)."""
        kind = "stopped_stable" if r.extra.get("stopped") else "time_limited" if r.status in ("time_limit", "interrupted") else None
        with self.lock:
            self.counts["lps"] += 1
            if self.integer and kind:
                self.counts[kind] += 1
        if not self.integer:
            return r.bound if r.status == "optimal" and math.isfinite(r.bound) else None
        if r.status in ("optimal", "time_limit", "interrupted") and math.isfinite(r.bound):
            return _milp_widen(r.bound)
        return None

    def limit(self) -> float | None:
        """Seconds for the next solve: the per-solve limit, at most the time left."""
        rest = None if self.deadline is None else max(self.deadline - time.perf_counter(), 1e-3)
        if self.solve_time_limit is None:
            return rest
        return self.solve_time_limit if rest is None else min(self.solve_time_limit, rest)

    def _solve(self, be: Any, enc: NetEncoding, binaries: np.ndarray, row: np.ndarray, c: float) -> float | None:
        be.set_objective(row, c)
        if self.integer:  # binaries of the neurons the objective pushes down are not needed
            be.set_integer(binaries, ~np.isin(binaries, enc.binaries_to_relax(sp.csr_matrix(row))))
        return self.new_bound(be.solve(time_limit=self.limit(), rel_gap=self.rel_gap, abs_gap=self.abs_gap,
                                       stop_bound_above=self.stop_stable))

    def worker(self, enc: NetEncoding, M: Any, const: np.ndarray, l: np.ndarray, u: np.ndarray, todo: Any) -> bool:
        """Bound the neurons ``todo`` yields (shared by the workers of a layer) on a model of its
        own, tightening ``l``, ``u`` in place; ``False`` when the deadline stopped it."""
        be = make_backend(enc.lp, self.solver, bound_focus=self.integer)  # only the dual bound of each MILP is used
        binaries = enc.binaries()
        with self.lock:
            self.solvers.add(be.name)
        try:
            while True:
                with self.lock:
                    j = next(todo, None)
                if j is None:
                    return True
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    return False
                row = M.getrow(j).toarray().ravel()
                v = self._solve(be, enc, binaries, -row, -const[j])  # max z_j = -min(-z_j)
                if v is not None:
                    u[j] = min(u[j], -v)
                if u[j] <= 0:
                    continue
                v = self._solve(be, enc, binaries, row, const[j])  # min z_j
                if v is not None:
                    l[j] = max(l[j], v)
        finally:
            be.close()


def _output_rows(net: FeedForwardNet, C: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``C y + d`` as ``(C W_L [N, n_{L-1}], C b_L + d [N])``."""
    WL, bL = net.layers[-1].W.numpy(), net.layers[-1].b.numpy()
    return C @ WL, C @ bL + d


@dataclass
class LpResult:
    """Output of :func:`lp_lower_bounds`.

    Attributes:
        lower: ``[B, N]`` float64 sound lower bounds of the rows ``C y + d`` (``-inf`` where the
            LP failed).
        details: one dict per example (bound method, refinement stats, LP statuses, sizes).
        bounds: per example, the pre-activation bounds used.
        points: per example, ``[N, n0]`` the input part of each row's LP optimum (the midpoint
            of the box where the LP failed) -- good attack starts.
    """

    lower: Tensor
    details: list[dict]
    bounds: list[list[tuple[np.ndarray, np.ndarray]]]
    points: list[np.ndarray] = field(default_factory=list)


def lp_lower_bounds(
    model: torch.nn.Module | FeedForwardNet,
    inputs: InputSet,
    spec: LinearSpec,
    *,
    bounds_method: str = "crown",
    refine: bool = False,
    solver: str = "auto",
    time_limit: float | None = None,
    net: FeedForwardNet | None = None,
    bounds: list[list[tuple[np.ndarray, np.ndarray]]] | None = None,
    deadline: Deadline | None = None,
) -> LpResult:
    """Sound lower bounds of every property row over the triangle LP relaxation.

    Args:
        model: the network (fx graph / module, or already a :class:`FeedForwardNet`).
        inputs: batched box or l_inf / l_1 ball, ``[B, *shape]``.
        spec: ``C [B, N, K]``, ``d [B, N]``.
        bounds_method: intermediate bounds (see :func:`initial_bounds`).
        refine: LP re-tightening of the hidden layers (see :func:`tighten_bounds`).
        solver: "auto" | "highs" | "gurobi".
        time_limit: seconds per example (refinement stops early; each LP has the rest).
        net: the dense form, if already extracted.
        bounds: per example, pre-activation bounds to use instead of :func:`initial_bounds`.
        deadline: for the whole batch, shared evenly by the examples not yet done; each LP
            gets the time left and no LP starts after it (rows not solved keep ``-inf``).

    Returns:
        :class:`LpResult` with ``lower [B, N]`` float64.
    """
    solver_name = resolve_solver(solver)
    if net is None:
        net = relu_net(model, inputs.shape)
    regions = regions_of(inputs)
    if bounds is None:  # interval bounds for a FeedForwardNet model (initial_bounds)
        ib, used = initial_bounds(model, net, inputs, bounds_method)
    else:
        used = "given"
    C, d = spec_rows(spec)
    B, N = d.shape
    lower = np.full((B, N), -np.inf)
    details, all_bounds, points = [], [], []
    batch_deadline = Deadline.of(deadline)
    for bi, reg in enumerate(regions):
        t0 = time.perf_counter()
        mine = batch_deadline.share(B - bi)  # this example's share of the time left
        ex_deadline = mine.at if time_limit is None else min(t0 + time_limit, mine.at or math.inf)
        if bounds is None:
            bnds = [(l[bi].numpy().copy(), u[bi].numpy().copy()) for l, u in ib]
        else:
            bnds = [(l.copy(), u.copy()) for l, u in bounds[bi]]
        det: dict = {"bounds": used, "solver": solver_name}
        if refine:
            bnds, det["refine"] = tighten_bounds(net, reg, bnds, solver=solver, deadline=ex_deadline)
        enc = encode(net, reg, bnds)
        det["lp"] = enc.stats
        pts = _solve_rows(net, enc, reg, C[bi], d[bi], solver, ex_deadline, lower[bi], det)
        det["time_s"] = time.perf_counter() - t0
        details.append(det)
        all_bounds.append(bnds)
        points.append(pts)
    return LpResult(torch.from_numpy(lower), details, all_bounds, points)


def _solve_rows(net: FeedForwardNet, enc: NetEncoding, reg: InputRegion, C: np.ndarray, d: np.ndarray, solver: str,
                deadline: float | None, lower: np.ndarray, det: dict) -> np.ndarray:
    """Minimise each property row ``C y + d`` (``C [N, K]``, ``d [N]``) over one example's LP
    ``enc``, one warm-started solve per row, none started after ``deadline``: the safe dual
    bounds go into ``lower [N]`` (rows not solved optimally keep ``-inf``), the solver's name and
    the statuses into ``det``. Returns ``[N, n0]``: the input part of each row's optimum (the
    midpoint of the box for the others)."""
    N = len(d)
    Cw, cd = _output_rows(net, C, d)
    M, const = enc.expr(len(net.layers) - 1, Cw, cd)
    be = make_backend(enc.lp, solver)  # "auto": Gurobi if the LP fits its licence, else HiGHS
    det["solver"] = be.name
    statuses, messages = [], set()
    pts = np.tile((reg.lo + reg.hi) / 2, (N, 1))
    for i in range(N):
        if deadline is not None and time.perf_counter() >= deadline:
            statuses.append("time_limit")  # not solved: the row keeps -inf
            continue
        be.set_objective(M.getrow(i).toarray().ravel(), const[i])
        rest = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
        r = be.solve(time_limit=rest)
        statuses.append(r.status)
        if r.status == "error" and r.message:
            messages.add(r.message)
        if r.status == "optimal":
            assert r.x is not None  # an optimal solve has its point
            lower[i] = r.bound
            pts[i] = np.clip(r.x[enc.x_cols], reg.lo, reg.hi)
        elif r.status == "infeasible":
            # an empty relaxation means the input set is empty or the bounds are wrong:
            # never read as a proof
            lower[i] = -np.inf
    det["lp_status"] = sorted(set(statuses))
    if any(s != "optimal" for s in statuses):
        det["reason"] = f"LP status {', '.join(sorted(set(statuses)))} on some rows (their bound is -inf)" + (
            f": {'; '.join(sorted(messages))}" if messages else "")
    return pts
