"""Lipschitz bounds on the rows ``c^T f(x)`` of a network, global and local, and the radius
they certify.

Setting (dense form of :mod:`relax.ir.dense`, all float64)::

    z_0 = x (flattened, n_0),  z_{k+1} = act_k(W_k z_k + b_k)  (k < L),  f(x) = W_L z_L + b_L

For a row ``c`` (``[K]``; ``e_i - e_j`` for a robustness property) the function
``g_c(x) = c^T f(x)`` is Lipschitz w.r.t. ``||.||_p`` with constant
``L_c = sup_x ||grad g_c(x)||_q`` (``1/p + 1/q = 1``).

**Global bound (the naive product).** ``L_c <= ||W_L^T c||_q * prod_{k<L} lip_k * ||W_k||_{p->p}``
with ``lip = 1`` for ReLU and tanh and ``1/4`` for sigmoid (each activation is elementwise with
slopes in ``[0, lip]``, so its Jacobian is a diagonal matrix of norm ``<= lip`` in every l_p).
The last layer enters through the difference row ``W_L^T c`` (much tighter than ``||c|| ||W_L||``).
Operator norms are exact, never power iteration (which converges from below):

* ``p = 2``: the largest singular value, from ``eigvalsh`` of the smaller Gram matrix of the dense
  ``W_k`` (for convolutions this is the exact norm of the zero-padded, strided operator);
* ``p = inf``: the largest absolute row sum; ``p = 1``: the largest absolute column sum.

The three chains are combined by the norm inequalities ``||x||_inf <= ||x||_2 <= ||x||_1 <=
sqrt(n)||x||_2 <= n ||x||_inf``: ``L_2 <= min(L_2^chain, L_inf^chain, sqrt(n) L_1^chain)`` etc.

Layers too large for a dense matrix (``n_out * n_in > dense_limit``) are bounded on the torch
modules themselves (:func:`module_global_lipschitz`): convolutions by the singular values of the
kernel's Fourier blocks (Sedghi, Gupta & Long 2019, Thm. 6: the circular convolution on an
``N x N`` grid has singular values ``union_{u,v} sigma(P(u, v))``, ``P(u,v) = sum_{a,b} K[:, :, a, b]
exp(-2 pi i (a u + b v) / N)``), with ``N`` = the padded input size so that the zero-padded and
strided convolution is a row subset of a sub-block of that circulant, hence of no larger
norm; optionally each block's norm is replaced by the Gram-iteration bound (Delattre, Barthelemy,
Araujo & Allauzen 2023, Alg. 1: ``||G_t||_F^{1/2^t}`` with ``G_{t+1} = G_t^H G_t``), an upper bound
by construction.

**Local bound.** Inside an input set whose pre-activation bounds are ``[l_k, u_k]`` the activation
slopes lie in ``[s_lo, s_hi]`` (ReLU: stable active ``[1,1]``, stable inactive ``[0,0]``,
unstable ``[0,1]``), so the gradient ``W_1^T D_1 ... W_L^T c`` lies in the interval vector obtained
by interval arithmetic over the backward graph; ``L_c^loc = max ||grad||_q`` over that interval
(:func:`local_lipschitz`). It is valid for every pair of points of a *convex* set on which the
slope bounds hold (mean-value theorem along the segment).

**Certified radius** (Hein & Andriushchenko 2017, Thm. 2.1; Tsuzuku, Sato & Sugiyama 2018, Prop. 1):
with margin ``m_c = c^T f(x_0) + d`` and ``L_c`` a Lipschitz bound of ``c^T f`` (the "difference"
form, here ``c = e_label - e_j``), every ``x`` with ``||x - x_0||_p < m_c / L_c`` has
``c^T f(x) + d > 0``; so the radius is ``min_groups max_{c in group} m_c / L_c`` (a Robust property:
``min_j m_j / L_j``). If only per-logit bounds ``L`` (each ``f_k`` is ``L``-Lipschitz) are known,
``L_c <= 2 L`` gives Tsuzuku's ``m / (2L)``; with a bound ``L`` on the l2-to-l2 constant of the
whole logit vector, ``||(e_i - e_j)^T J|| <= sqrt(2) L`` gives ``m / (sqrt(2) L)``. The difference
form used here is never looser than either.

All constants are computed in float64 and rounded up by the relative factor ``1 + ROUND_UP``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from relax.ir.dense import FeedForwardNet
from relax.bounds.interval import dense_interval_bounds as interval_bounds
from relax.bounds.roundoff import SAFETY, gamma

__all__ = [
    "ROUND_UP",
    "ACT_LIPSCHITZ",
    "dual_norm",
    "operator_norm",
    "chain_norms",
    "combine_norms",
    "global_lipschitz",
    "interval_bounds",
    "activation_slopes",
    "local_lipschitz",
    "certified_radius",
    "conv_fourier_norm",
    "module_global_lipschitz",
    "dense_size",
]

#: relative round-up applied to every reported Lipschitz constant
ROUND_UP = 1e-9

#: Lipschitz constant (= max slope; min slope is 0) of each activation
ACT_LIPSCHITZ = {"relu": 1.0, "sigmoid": 0.25, "tanh": 1.0}

_NORMS = (1.0, 2.0, math.inf)


def dual_norm(p: float) -> float:
    """``q`` with ``1/p + 1/q = 1`` for ``p`` in {1, 2, inf}."""
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[float(p)]


def _vec_norm(v: Tensor, q: float, dim: int = -1) -> Tensor:
    if math.isinf(q):
        return v.abs().amax(dim=dim)
    if q == 1.0:
        return v.abs().sum(dim=dim)
    return v.norm(dim=dim)


def operator_norm(W: Tensor | np.ndarray, p: float) -> float:
    """Exact ``||W||_{p->p}`` of a dense ``W [n_out, n_in]`` (float64), rounded up.

    ``p = 2``: ``sqrt(lambda_max(G))`` with ``G`` the smaller of ``W W^T`` / ``W^T W`` (LAPACK
    ``eigvalsh``, backward-stable: the largest eigenvalue is accurate to ``O(n eps ||G||)``);
    ``p = inf``: max absolute row sum; ``p = 1``: max absolute column sum.
    """
    A = W.detach().cpu().double().numpy() if isinstance(W, Tensor) else np.asarray(W, dtype=np.float64)
    if A.size == 0:
        return 0.0
    p = float(p)
    if math.isinf(p):
        v = float(np.abs(A).sum(axis=1).max())
    elif p == 1.0:
        v = float(np.abs(A).sum(axis=0).max())
    elif p == 2.0:
        G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
        lam = float(np.linalg.eigvalsh(G)[-1])
        # eigvalsh error <= c n eps ||G||_2: add it before the square root
        lam += 4 * G.shape[0] * np.finfo(np.float64).eps * max(lam, 0.0)
        v = math.sqrt(max(lam, 0.0))
    else:
        raise ValueError(f"operator_norm: p must be 1, 2 or inf, got {p}")
    return v * (1 + ROUND_UP)


def chain_norms(net: FeedForwardNet, p: float) -> list[float]:
    """``[lip_k * ||W_k||_{p->p} for k < L]``: the hidden part of the product bound."""
    out = []
    for k, act in enumerate(net.activations):
        out.append(ACT_LIPSCHITZ[act] * operator_norm(net.layers[k].W, p))
    return out


def combine_norms(chains: dict[float, Tensor], n_in: int) -> dict[float, Tensor]:
    """Tighten per-norm Lipschitz bounds with the norm inequalities between l_1, l_2, l_inf on
    ``R^{n_in}``: a bound ``L_r`` w.r.t. ``||.||_r`` gives ``L_p <= L_r * sup_x ||x||_r/||x||_p``.

    ``chains``: ``{p: tensor of bounds}`` for some of p in {1, 2, inf}; returns all three.
    """
    factor = {  # sup ||x||_r / ||x||_p on R^n, keyed (r, p)
        (2.0, math.inf): math.sqrt(n_in), (1.0, math.inf): float(n_in), (1.0, 2.0): math.sqrt(n_in),
        (math.inf, 2.0): 1.0, (math.inf, 1.0): 1.0, (2.0, 1.0): 1.0,
    }
    out: dict[float, Tensor] = {}
    for p in _NORMS:
        best: Tensor | None = None
        for r, L in chains.items():
            cand = L if r == p else L * factor[(r, p)] * (1 + ROUND_UP)
            best = cand if best is None else torch.minimum(best, cand)
        assert best is not None  # chains is not empty
        out[p] = best
    return out


def global_lipschitz(net: FeedForwardNet, C: Tensor, p: float, *, combine: bool = True) -> Tensor:
    """Global Lipschitz bounds of the rows ``c^T f`` w.r.t. ``||.||_p`` (the naive product).

    Args:
        net: dense float64 form of the network.
        C: rows ``[..., K]`` on the ``K`` outputs.
        p: input norm, 1, 2 or inf.
        combine: also use the other two norms' chains through the norm inequalities.

    Returns:
        ``[...]`` float64 upper bounds, rounded up.
    """
    p = float(p)
    W_L = net.layers[-1].W
    Cw = C.to(W_L)
    V = Cw @ W_L  # [..., n_L] = (W_L^T c)^T
    # |fl(V) - V| <= gamma_K |C| |W_L| (Higham Eq. 3.5): bound |V| by |fl(V)| plus that
    V = V.abs() + gamma(Cw.shape[-1], V.dtype) * (Cw.abs() @ W_L.abs())
    norms = (p,) if not combine else _NORMS
    chains = {}
    for r in norms:
        prod = 1.0
        for v in chain_norms(net, r):
            prod *= v
        chains[r] = _vec_norm(V, dual_norm(r)) * prod * (1 + ROUND_UP)
    if not combine:
        return chains[p]
    return combine_norms(chains, net.n_in)[p]


# ------------------------------------------------------------------------------------------
# local bounds


def _act_slope(name: str, z: Tensor) -> Tensor:
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(name)


def activation_slopes(name: str, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds ``[s_lo, s_hi]`` on the derivative of the activation over ``[l, u]`` (elementwise).

    ReLU: 1 if ``l > 0``, 0 if ``u < 0``, else ``[0, 1]`` (the Clarke generalised derivative at 0
    is ``[0, 1]``, so this covers the kink). Sigmoid / tanh: the derivative is even and
    decreasing in ``|z|``: max at the point of ``[l, u]`` closest to 0, min at an endpoint.
    Both are widened by ``1e-12`` relative for round-off in the slope formula.
    """
    if name == "relu":
        s_lo = (l > 0).to(l.dtype)
        s_hi = (u >= 0).to(l.dtype)
        return s_lo, s_hi
    z0 = torch.clamp(torch.zeros_like(l), l, u)
    s_hi = _act_slope(name, z0) * (1 + 1e-12)
    s_lo = torch.minimum(_act_slope(name, l), _act_slope(name, u)) * (1 - 1e-12)
    return s_lo.clamp_min(0), s_hi


def _interval_scale(glo: Tensor, ghi: Tensor, s_lo: Tensor, s_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Elementwise product of an interval ``[glo, ghi]`` with a nonnegative ``[s_lo, s_hi]``."""
    a, b = glo * s_lo, glo * s_hi
    c, d = ghi * s_lo, ghi * s_hi
    return torch.minimum(torch.minimum(a, b), torch.minimum(c, d)), torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def local_lipschitz(
    net: FeedForwardNet,
    C: Tensor,
    p: float,
    pre_bounds: list[tuple[Tensor, Tensor]],
) -> Tensor:
    """Lipschitz bounds of the rows ``c^T f`` valid on a convex input set.

    Interval arithmetic over the backward graph: the gradient of ``c^T f`` is
    ``W_0^T D_0 W_1^T D_1 ... W_{L-1}^T D_{L-1} W_L^T c`` with ``D_k = diag(act_k'(pre_k))``
    and ``act_k'`` inside :func:`activation_slopes` of the bounds ``pre_bounds[k]``. Carrying
    ``[g_lo, g_hi]`` backwards (``W^T [g]``: centre ``W^T mid``, radius ``|W|^T rad``; ``D [g]``:
    :func:`_interval_scale`) gives an interval vector containing every gradient;
    ``L = || max(|g_lo|, |g_hi|) ||_q``. For ``p = 2`` the first layer is also bounded by the
    triangle inequality ``||W_0^T mid||_2 + ||W_0||_2 ||rad||_2`` and the smaller is kept.

    Args:
        net: dense float64 network.
        C: rows ``[B, N, K]``.
        p: input norm.
        pre_bounds: ``[(l_k, u_k)]`` pre-activation bounds ``[B, n_{k+1}]`` over the set
            (:func:`interval_bounds`, or CROWN bounds).

    Returns:
        ``[B, N]`` float64 Lipschitz bounds (not rounded up; :func:`local_lipschitz` callers
        combine with the global bound and round).
    """
    p = float(p)
    q = dual_norm(p)
    Ld = len(net.layers) - 1
    W_L = net.layers[-1].W
    Cw = C.to(W_L)
    g = Cw @ W_L  # [B, N, n_L]
    g_err = SAFETY * gamma(Cw.shape[-1] + 2, g.dtype) * (Cw.abs() @ W_L.abs())
    glo, ghi = g - g_err, g + g_err
    w0_norm = None
    for k in range(Ld - 1, -1, -1):
        l, u = pre_bounds[k]
        s_lo, s_hi = activation_slopes(net.activations[k], l.to(W_L), u.to(W_L))
        glo, ghi = _interval_scale(glo, ghi, s_lo.unsqueeze(1), s_hi.unsqueeze(1))
        W = net.layers[k].W.to(W_L)
        mid, rad = (ghi + glo) / 2, (ghi - glo) / 2
        absW = W.abs()
        cm = mid @ W
        # the radius also covers the round-off of both sums: gamma_n (|mid| + rad) |W|
        # (Higham Eq. 3.5; the terms, not the possibly cancelled result)
        err = SAFETY * gamma(W.shape[0] + 2, W.dtype) * ((mid.abs() + rad) @ absW)
        cr = rad @ absW + err
        if k == 0 and p == 2.0:
            w0_norm = operator_norm(W, 2.0)
            tri = cm.norm(dim=-1) + w0_norm * rad.norm(dim=-1) + err.norm(dim=-1)
        glo, ghi = cm - cr, cm + cr
    box = _vec_norm(torch.maximum(glo.abs(), ghi.abs()), q)
    if w0_norm is not None:
        box = torch.minimum(box, tri)
    # the sums' round-off is inside the radii; what is left are the elementwise products of
    # _interval_scale and the final norm (a few ulps each, relative to the nonnegative values)
    return box * (1 + 1e-11 * (Ld + 1))


# ------------------------------------------------------------------------------------------
# radius


def certified_radius(margin: Tensor, L: Tensor, groups: Tensor, safety: Tensor | None = None) -> Tensor:
    """Largest certified radius from margins and Lipschitz bounds of the property rows.

    A row ``c^T f + d`` with margin ``m = c^T f(x_0) + d`` and Lipschitz bound ``L`` stays
    positive on the open ball ``||x - x_0||_p < m / L``. The property (every group has a
    positive row) therefore holds for ``||x - x_0|| <= r`` with
    ``r = min_g max_{i in g} (m_i - s_i) / L_i`` where ``s_i >= 0`` is the float-safety margin
    demanded of a proof (``m_i - s_i - L_i r >= 0`` then exceeds the margin ... for r slightly
    smaller; the returned value is shrunk by a relative ``1e-12`` to stay strictly inside).

    Args:
        margin: ``[B, N]`` row values at the clean input (float64).
        L: ``[B, N]`` Lipschitz bounds (``>= 0``; 0 means the row is constant).
        groups: ``[N]`` group index of each row.
        safety: ``[B, N]`` margins to subtract (default 0).

    Returns:
        ``[B]`` float64 radii, ``>= 0`` (0 where the clean input is not proved).
    """
    m = margin if safety is None else margin - safety
    r = torch.where(L > 0, m / L.clamp_min(1e-300), torch.where(m > 0, torch.full_like(m, math.inf), torch.zeros_like(m)))
    r = r.clamp_min(0.0)
    G = int(groups.max()) + 1 if groups.numel() else 0
    out = torch.full((r.shape[0], G), -math.inf, dtype=r.dtype, device=r.device)
    out = out.scatter_reduce(1, groups.to(r.device).expand_as(r), r, reduce="amax")
    rad = out.amin(dim=1) if G else torch.full((r.shape[0],), math.inf, dtype=r.dtype)
    return (rad * (1 - 1e-12)).clamp_min(0.0)


# ------------------------------------------------------------------------------------------
# module-level bounds for networks too large for the dense form


def dense_size(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """The most numbers :func:`relax.ir.dense.to_feedforward` would allocate for one layer
    (:func:`relax.ir.dense.dense_size` on the model's bound graph, from its shapes alone)."""
    from relax.ir import dense
    from relax.ir.graph import get_graph

    p0 = next(iter(model.parameters()), None)
    return dense.dense_size(get_graph(model, tuple(input_shape), torch.float32 if p0 is None else p0.dtype))


def conv_fourier_norm(weight: Tensor, in_hw: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...] = (1, 1),
                      groups: int = 1, method: str = "fourier", gram_iters: int = 6) -> float:
    """Guaranteed upper bound on ``||conv||_{2->2}`` of a Conv1d/Conv2d with this kernel, any
    stride, zero padding ``padding`` on an input of spatial size ``in_hw``.

    The zero-padded strided convolution is (padding = isometric embedding, stride = row
    selection, output crop = row selection) a submatrix of the circular convolution on the
    padded grid ``N_d = in_hw_d + 2 padding_d`` (at least the dilated kernel size), whose
    singular values are those of the ``N_1 N_2`` Fourier blocks ``P(u, v) [c_out, c_in]``
    (Sedghi et al. 2019, Thm. 6). ``method="fourier"``: exact SVD of every block;
    ``method="gram"``: Gram iteration on every block (Delattre et al. 2023), cheaper for wide
    channels and an upper bound by construction. Rounded up.
    """
    Wt = weight.detach().cpu().double()
    if Wt.dim() == 3:  # Conv1d -> Conv2d with a height-1 kernel
        Wt = Wt.unsqueeze(2)
        in_hw, padding, dilation = (1, *in_hw), (0, *padding), (1, *dilation)
    c_out, c_in_g, kh, kw = Wt.shape
    if groups > 1:  # block-diagonal over groups: the norm is the max over groups
        go = c_out // groups
        return max(conv_fourier_norm(weight[g * go:(g + 1) * go], in_hw[-2:] if weight.dim() == 4 else in_hw[-1:],
                                     padding[-2:] if weight.dim() == 4 else padding[-1:],
                                     dilation[-2:] if weight.dim() == 4 else dilation[-1:], 1, method, gram_iters) for g in range(groups))
    dh, dw = dilation
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    N1 = max(in_hw[0] + 2 * padding[0], ekh)
    N2 = max(in_hw[1] + 2 * padding[1], ekw)
    K = torch.zeros(c_out, c_in_g, N1, N2, dtype=torch.float64)
    K[:, :, 0:ekh:dh, 0:ekw:dw] = Wt
    P = torch.fft.fft2(K).permute(2, 3, 0, 1).reshape(-1, c_out, c_in_g)  # [N1 N2, c_out, c_in]
    if method == "fourier":
        s = torch.linalg.svdvals(P).amax().item()
        s *= 1 + 8 * max(c_out, c_in_g) * np.finfo(np.float64).eps
    elif method == "gram":
        G = P
        # ||G_t||_2 <= ||G_t||_F, and ||P||_2 = ||G_t||_2^{1/2^t} with G_{t} = G_{t-1}^H G_{t-1}
        logscale = torch.zeros(G.shape[0], dtype=torch.float64)
        for t in range(gram_iters):
            f = torch.linalg.matrix_norm(G, "fro").clamp_min(1e-300)
            G = G / f[:, None, None]
            logscale = 2 * (logscale + torch.log(f))
            G = G.mH @ G
        f = torch.linalg.matrix_norm(G, "fro").clamp_min(1e-300)
        logb = (logscale + torch.log(f)) / (2 ** gram_iters)
        s = math.exp(logb.max().item()) * (1 + 1e-10)
    else:
        raise ValueError(f"conv bound method must be 'fourier' or 'gram', got {method!r}")
    return s * (1 + ROUND_UP)


_SHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose}
_SHAPE_METHODS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "size"}


def _module_norm(m: nn.Module, in_shape: tuple[int, ...], p: float, conv_bound: str) -> float:
    """Upper bound on ``||m||_{p->p}`` for one affine module (bias ignored)."""
    p = float(p)
    if isinstance(m, nn.Linear):
        return operator_norm(m.weight, p)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        W = m.weight.detach().double()
        if p == 2.0:
            pad = m.padding if isinstance(m.padding, tuple) else None
            if pad is None or isinstance(m.padding, str):
                ks = W.shape[2:]
                pad = tuple(((k - 1) * d + 1) for k, d in zip(ks, m.dilation))  # generous for 'same'
            if m.padding_mode != "zeros" and m.padding_mode != "circular":
                # reflect/replicate padding duplicates inputs: bound by sqrt(multiplicity)
                raise NotImplementedError(f"padding_mode={m.padding_mode!r} not supported by the conv bound")
            return conv_fourier_norm(W, tuple(in_shape[1:]), pad, m.dilation, m.groups, conv_bound)
        # every output is a kernel-weighted sum: row sums <= sum |K[o]|; an input feeds each
        # output channel through at most every kernel tap: column sums <= sum_o |K[o, i]|
        A = W.abs()
        if math.isinf(p):
            v = A.flatten(1).sum(1).max().item()
        else:
            go = W.shape[0] // m.groups
            v = max(A[g * go:(g + 1) * go].sum(dim=(0, *range(2, A.dim()))).max().item() for g in range(m.groups))
        return v * (1 + ROUND_UP)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = m.weight.detach().double() if m.affine else torch.ones(m.num_features, dtype=torch.float64)
        assert m.running_var is not None  # a BatchNorm that tracks running statistics
        scale = scale / torch.sqrt(m.running_var.double() + m.eps)
        return scale.abs().max().item() * (1 + ROUND_UP)
    if isinstance(m, nn.AvgPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
        s = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
        # each output averages k1*k2 inputs (weights <= 1/(k1 k2)); each input feeds at most
        # ceil(k/s) outputs per axis: ||.||_inf <= 1, ||.||_1 <= prod ceil(k/s)/k, ||.||_2 <= sqrt of both
        cover = math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1]) / (k[0] * k[1])
        v = {math.inf: 1.0, 1.0: cover, 2.0: math.sqrt(cover)}[p]
        return v * (1 + ROUND_UP)
    if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)):
        return 1.0
    raise NotImplementedError(f"no operator-norm rule for module {type(m).__name__}")


def module_global_lipschitz(model: torch.fx.GraphModule, input_shape: tuple[int, ...], C: Tensor, p: float,
                            conv_bound: str = "fourier") -> Tensor:
    """Global product bound computed on the modules of a chain graph, without dense matrices.

    Every affine module between activations contributes its operator-norm bound
    (:func:`_module_norm`: exact SVD for Linear, :func:`conv_fourier_norm` for convolutions);
    the affine run after the last activation contributes ``||J^T c||_q`` computed exactly by one
    vector-Jacobian product per row. Only chains (no skip connection around an activation) are
    supported.

    Args:
        C: rows ``[..., K]``.
    Returns:
        ``[...]`` float64 bounds w.r.t. ``||.||_p`` (rounded up).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from relax.ir.dense import _activation_of

    gm = model
    modules = dict(gm.named_modules())
    dt = next(iter(gm.parameters())).dtype
    ShapeProp(gm).propagate(torch.zeros(1, *input_shape, dtype=dt))
    prod = _ChainProduct()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            prod.widest = max(prod.widest, int(np.prod(meta.shape[1:])))
        act = _activation_of(node, modules)
        if act is not None:
            prod.activation(node, act)
            continue
        in_node = node.args[0] if node.args else None
        in_shape = tuple(in_node.meta["tensor_meta"].shape[1:]) if isinstance(in_node, torch.fx.Node) and "tensor_meta" in in_node.meta else ()
        if in_shape:
            prod.widest = max(prod.widest, int(np.prod(in_shape)))
        factor = _affine_factor(node, modules, in_shape, prod.widest, p, conv_bound)
        if factor is not None:
            prod.affine(*factor)
    Cf = C.reshape(-1, C.shape[-1]).double()
    V = _tail_rows(gm, prod.last_act, input_shape, Cf)
    q = dual_norm(p)
    # the vector-Jacobian product is a chain of `steps` products: its round-off is at most
    # steps gamma_n |W_1|^T ... |W_m|^T |c| (Higham Eq. 3.5 per product), in norm at most
    # steps gamma_n run_abs ||c||_q, added to the computed norm
    vjp_err = SAFETY * max(prod.steps, 1) * gamma(prod.widest + 2, torch.float64) * prod.run_abs * _vec_norm(Cf, q)
    L = (_vec_norm(V, q) + vjp_err) * prod.head * (1 + 4 * ROUND_UP)
    return L.reshape(C.shape[:-1])


@dataclass
class _ChainProduct:
    """:func:`module_global_lipschitz`'s product along the chain: ``head`` over the finished
    affine runs and activations, the current run's norm bound ``run`` and ``run_abs`` (the same
    with ``|W|`` in place of ``W``, for its round-off), the products in the run ``steps``, the
    widest layer so far (the longest sum the products form) and the last activation node."""

    head: float = 1.0
    run: float = 1.0
    run_abs: float = 1.0
    steps: int = 0
    widest: int = 1
    last_act: torch.fx.Node | None = None

    def activation(self, node: torch.fx.Node, act: str) -> None:
        """The run ends at activation ``act`` (node ``node``)."""
        self.head *= self.run * ACT_LIPSCHITZ[act]
        self.run, self.run_abs, self.steps = 1.0, 1.0, 0
        self.last_act = node

    def affine(self, norm: float, abs_factor: float) -> None:
        """One more affine op in the run: its norm bound, and ``|W|``'s over it."""
        self.run *= norm
        self.run_abs *= norm * abs_factor
        self.steps += 1


def _affine_factor(node: torch.fx.Node, modules: dict[str, nn.Module], in_shape: tuple[int, ...], widest: int, p: float,
                   conv_bound: str) -> tuple[float, float] | None:
    """An affine node's ``(norm bound, bound of ||abs(W)|| / norm bound)`` (a module, or a
    multiplication / division by a constant); None for reshapes and additions of a constant
    (norm 1, no product). Raises ``NotImplementedError`` for anything else."""
    if node.op == "call_module":
        assert isinstance(node.target, str)  # a module's qualified name
        norm = _module_norm(modules[node.target], in_shape, p, conv_bound)
        # || |W| ||_{p->p} = ||W||_{p->p} for p = 1, inf; for p = 2 it is at most
        # ||W||_F <= sqrt(rank) ||W||_2
        return norm, (math.sqrt(max(1, int(np.prod(in_shape)) if in_shape else widest)) if p == 2.0 else 1.0)
    if (node.op == "call_function" and node.target in _SHAPE_FUNCS) or (node.op == "call_method" and node.target in _SHAPE_METHODS):
        return None
    if node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.truediv, torch.div, operator.add, torch.add, operator.sub, torch.sub):
        nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
        consts = [a for a in node.args if not isinstance(a, torch.fx.Node)]
        if len(nodes) != 1:
            raise NotImplementedError(f"node {node.name!r}: {node.target} of two tensors (a residual?) is not supported by the module-level bound")
        if node.target in (operator.mul, torch.mul):
            return float(torch.as_tensor(consts[0]).abs().max()), 1.0
        if node.target in (operator.truediv, torch.div):
            if node.args[0] is not nodes[0]:
                raise NotImplementedError(f"node {node.name!r}: division by a tensor is not affine")
            return 1.0 / float(torch.as_tensor(consts[0]).abs().min()), 1.0
        return None
    raise NotImplementedError(f"node {node.name!r} ({node.op} {node.target}) not supported by the module-level bound")


def _tail_rows(gm: torch.fx.GraphModule, last_act: torch.fx.Node | None, input_shape: tuple[int, ...], Cf: Tensor) -> Tensor:
    """``[M, n]``: the rows ``Cf [M, K]`` through the transposed Jacobian of the affine tail
    after ``last_act`` (from the input without one), by autograd on a float64 copy."""
    import copy

    g64 = copy.deepcopy(gm).double().eval()
    a_shape = tuple(last_act.meta["tensor_meta"].shape[1:]) if last_act is not None else tuple(input_shape)
    a = torch.zeros(Cf.shape[0], *a_shape, dtype=torch.float64, requires_grad=True)
    out = _run_tail(g64, last_act.name if last_act is not None else None, a)
    (out * Cf).sum().backward()
    assert a.grad is not None
    return a.grad.reshape(Cf.shape[0], -1).detach()


def _run_tail(gm: torch.fx.GraphModule, start: str | None, value: Tensor) -> Tensor:
    """Evaluate the graph from the node named ``start`` (whose value is ``value``) to the
    output; with ``start=None`` from the input placeholder."""
    env: dict[str, object] = {}
    modules = dict(gm.named_modules())
    started = start is None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if start is None:
                env[node.name] = value
            continue
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node.name] = obj
            continue
        if not started:
            if node.name == start:
                env[node.name] = value
                started = True
            continue
        args = torch.fx.graph.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.graph.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "output":
            out = args[0]
            return out[0] if isinstance(out, (tuple, list)) else out
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node.name] = obj
        elif node.op == "call_module":
            env[node.name] = modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            env[node.name] = node.target(*args, **kwargs)
        else:
            self_obj, *rest = args
            env[node.name] = getattr(self_obj, node.target)(*rest, **kwargs)
    raise RuntimeError("graph has no output")
