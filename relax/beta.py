"""Batched CROWN / alpha-CROWN / beta-CROWN on dense ReLU networks, for branch-and-bound.

The network is the textbook chain (see :mod:`relax.affine_net`)::

    z_1 = W_0 x + b_0,   a_k = relu(z_k),   z_{k+1} = W_k a_k + b_k,   y = z_L

Every function works on a *batch of domains* (leading dimension ``B``): each domain has its
own input box ``[lo, hi]`` (``[B, n_0]``), its own pre-activation bounds ``pre[k-1] = (l_k,
u_k)`` (``[B, n_k]``, k = 1..L-1) and, in ReLU branch-and-bound, its own split signs
``splits[k-1]`` (``[B, n_k]``, +1 = "z_k >= 0", -1 = "z_k <= 0", 0 = free).

* CROWN (Zhang et al. 2018): one backward pass of linear relaxations; the lower ReLU slope is
  the adaptive 0/1 choice, the upper one the triangle chord ``u / (u - l)``.
* alpha-CROWN (Xu et al. 2021): the lower slopes ``alpha in [0, 1]`` (one per output row and
  neuron) are optimised by projected gradient ascent on the bound.
* beta-CROWN (Wang et al. 2021, Eq. (6)-(8)): a split constraint ``s z_j >= 0`` enters the
  backward pass through a Lagrange multiplier ``beta_j >= 0``: the coefficient on ``z_k``
  gets ``- beta_j s_j`` added. Any ``beta >= 0`` gives a sound bound; the betas are optimised
  jointly with the alphas. The split neurons themselves are stable under the clamped bounds
  (``l = 0`` or ``u = 0``), so the bound also uses the "override" form of the split.

All bounds are computed in the dtype of the network (float64 by default) and hold for the exact
network: the backward pass accumulates the round-off bound of its sums (``gamma_n`` times the
sum of the absolute values of their terms, :mod:`relax.roundoff`) and subtracts it, and the
forward linear bounds carry an error bound per affine function that widens their boxes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .adam import ProjectedAdam
from .roundoff import SAFETY, gamma

__all__ = ["ReluNet", "NotReluNetError", "BestIterate", "backward_bound", "intermediate_bounds", "forward_bounds", "refined_bounds", "optimize_bound", "Bounds"]

#: per-layer (l_k, u_k) bounds of the pre-activations, each ``[B, n_k]``
Bounds = list[tuple[Tensor, Tensor]]


class NotReluNetError(ValueError):
    """The model is not a chain of affine layers and ReLUs."""


@dataclass
class ReluNet:
    """Dense ReLU network. ``Ws[k]``: ``[n_{k+1}, n_k]``, ``bs[k]``: ``[n_{k+1}]``; a ReLU
    follows every layer but the last. ``input_shape``: the model's per-example input shape."""

    Ws: list[Tensor]
    bs: list[Tensor]
    input_shape: tuple[int, ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype = torch.float64, input_shape: tuple[int, ...] | None = None) -> "ReluNet":
        """Collapse a canonical graph into dense layers (``input_shape`` defaults to
        ``model.input_shape``).

        Raises:
            NotReluNetError: not a chain, or an activation other than ReLU.
        """
        from .affine_net import NotFeedForwardError, to_feedforward

        try:
            ff = to_feedforward(model, input_shape or getattr(model, "input_shape", None) or None)
        except NotFeedForwardError as e:
            raise NotReluNetError(str(e)) from e
        if any(a != "relu" for a in ff.activations):
            raise NotReluNetError(f"activations {sorted(set(ff.activations))}: only ReLU is supported")
        return cls([l.W.detach().to(dtype) for l in ff.layers], [l.b.detach().to(dtype) for l in ff.layers], tuple(ff.input_shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.Ws[0].dtype

    @property
    def abs_WT(self) -> list[Tensor]:
        """``|W_k|^T`` per layer (cached; for the round-off bounds)."""
        cache = self.__dict__.get("_abs_WT")
        if cache is None or cache[0] is not self.Ws[0]:
            cache = (self.Ws[0], [W.abs().T.contiguous() for W in self.Ws])
            self.__dict__["_abs_WT"] = cache
        return cache[1]

    @property
    def n_in(self) -> int:
        return self.Ws[0].shape[1]

    @property
    def sizes(self) -> list[int]:
        """Widths of the ReLU layers ``[n_1, ..., n_{L-1}]``."""
        return [W.shape[0] for W in self.Ws[:-1]]

    def without_dead(self, pre: Bounds) -> tuple["ReluNet", Bounds]:
        """The same function on the domains of ``pre`` without the ReLUs that are dead in all
        of them (``u <= 0``: output exactly 0), and ``pre`` restricted to the kept ones. On
        mnistfc at eps 0.03 this keeps 20-60 % of each layer, and every later bound
        computation of branch-and-bound shrinks accordingly. (A layer keeps at least one
        ReLU, dead or not, so that no matrix is empty.)"""
        keep = []
        for l, u in pre:
            k = (u > 0).any(0)
            if not bool(k.any()):
                k = k.clone()
                k[0] = True
            keep.append(k)
        Ws, bs, prev = [], [], None
        for k, (W, b) in enumerate(zip(self.Ws, self.bs)):
            if prev is not None:
                W = W[:, prev]
            if k < len(keep):
                W, b, prev = W[keep[k]], b[keep[k]], keep[k]
            Ws.append(W)
            bs.append(b)
        return ReluNet(Ws, bs, self.input_shape), [(l[:, m], u[:, m]) for (l, u), m in zip(pre, keep)]

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, n_0]`` (or ``[B, *input_shape]``) -> ``y [B, K]``."""
        z = x.reshape(x.shape[0], -1).to(self.dtype)
        for k, (W, b) in enumerate(zip(self.Ws, self.bs)):
            z = z @ W.T + b
            if k < len(self.Ws) - 1:
                z = torch.relu(z)
        return z


def _relax(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ReLU relaxation on ``[l, u]``: (unstable mask, default lower slope, upper slope, upper
    intercept), each ``[B, n]``: ``slope_lo * z <= relu(z) <= slope_up * z + icpt``."""
    unstable = (l < 0) & (u > 0)
    active = (l >= 0).to(l.dtype)
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    s_up = torch.where(unstable, u / denom, active)
    icpt = torch.where(unstable, -s_up * l, torch.zeros_like(l))
    s_lo = torch.where(unstable, (u > -l).to(l.dtype), active)
    return unstable, s_lo, s_up, icpt


def backward_bound(
    net: ReluNet,
    C: Tensor,
    d: Tensor | None,
    lo: Tensor,
    hi: Tensor,
    pre: Bounds,
    upto: int | None = None,
    alphas: list[Tensor] | None = None,
    betas: list[Tensor] | None = None,
    splits: list[Tensor] | None = None,
    keep_lambdas: bool = False,
    relaxed: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, dict]:
    """Sound lower bound of ``C z_upto + d`` over the domains (one CROWN backward pass).

    Args:
        C: ``[B, N, n_upto]`` (or ``[1, N, n_upto]``, broadcast); ``d``: ``[B, N]`` or None.
        lo, hi: input boxes ``[B, n_0]``.
        pre: bounds of ``z_1 .. z_{upto-1}`` (at least ``upto - 1`` entries).
        upto: layer index 1..L of the bounded pre-activation (default L = the output).
        alphas: per ReLU layer ``[B, N, n_k]`` lower slopes in [0, 1] (None: adaptive CROWN).
        betas, splits: per ReLU layer ``[B, N, n_k] >= 0`` and ``[B, n_k]`` in {-1, 0, 1}.
        keep_lambdas: also return the coefficients on each ``a_k`` (for branching scores).
        relaxed: ``_relax(*pre[k-1])`` per layer, when the caller has it already (saves
            recomputing it for many passes over the same domains).

    Returns:
        ``lower [B, N]`` and a dict with ``A_in [B, N, n_0]`` (coefficients on x: the lower
        bound is ``A_in x + c`` minimised over the box) and, if asked, ``lambdas[k-1]``.
    """
    L = len(net.Ws)
    upto = L if upto is None else upto
    B = lo.shape[0]
    A = C
    c = torch.zeros(B, C.shape[1], dtype=lo.dtype, device=lo.device) if d is None else d
    lambdas: list[Tensor | None] = [None] * (L - 1)
    err = torch.zeros(B, C.shape[1], dtype=lo.dtype, device=lo.device)
    m_in = torch.maximum(lo.abs(), hi.abs())
    for k in range(upto - 1, 0, -1):
        # round-off of A b_k and A W_k: gamma_n |A| (|W_k| M_k + |b_k|), M_k bounding |a_k|
        l_k, u_k = pre[k - 1]
        m_k = torch.maximum(l_k.abs(), u_k.abs())
        err = err + _roundoff(A, m_k @ net.abs_WT[k] + net.bs[k].abs(), max(net.Ws[k].shape))
        c = c + A @ net.bs[k]
        A = A @ net.Ws[k]  # coefficient on a_k: [B, N, n_k]
        if keep_lambdas:
            lambdas[k - 1] = A
        unstable, s_lo, s_up, icpt = _relax(*pre[k - 1]) if relaxed is None else relaxed[k - 1]
        if alphas is not None and alphas[k - 1] is not None:
            s_lo = torch.where(unstable.unsqueeze(1), alphas[k - 1], s_lo.unsqueeze(1))
        else:
            s_lo = s_lo.unsqueeze(1)
        An = A.clamp(max=0)
        err = err + _roundoff(An, icpt.abs() + m_k, icpt.shape[-1])
        c = c + (An @ icpt.unsqueeze(-1)).squeeze(-1)
        A = A * torch.where(A < 0, s_up.unsqueeze(1), s_lo)
        if betas is not None and betas[k - 1] is not None:
            A = A - betas[k - 1] * splits[k - 1].unsqueeze(1).to(A.dtype)
    err = err + _roundoff(A, m_in @ net.abs_WT[0] + net.bs[0].abs(), max(net.Ws[0].shape))
    c = c + A @ net.bs[0]
    A = A @ net.Ws[0]  # [B, N, n_0]
    err = err + _roundoff(A, m_in, A.shape[-1])
    center, rad = (lo + hi) / 2, (hi - lo) / 2
    lower = c + (A @ center.unsqueeze(-1)).squeeze(-1) - (A.abs() @ rad.unsqueeze(-1)).squeeze(-1)
    lower = lower - SAFETY * err - torch.finfo(lower.dtype).tiny
    return lower, {"A_in": A, "lambdas": lambdas}


def _roundoff(A: Tensor, terms: Tensor, n: int) -> Tensor:
    """``gamma_n |A| . terms``: ``A [B or 1, N, m]``, ``terms [B, m]`` -> ``[B, N]`` (no
    gradient: the round-off bound is a constant of the optimisation)."""
    with torch.no_grad():
        return gamma(n, A.dtype) * (A.detach().abs() @ terms.unsqueeze(-1)).squeeze(-1)


def _clamp_split(l: Tensor, u: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor]:
    if s is None:
        return l, u
    l = torch.where(s > 0, l.clamp(min=0), l)
    u = torch.where(s < 0, u.clamp(max=0), u)
    return l, u


def intermediate_bounds(
    net: ReluNet,
    lo: Tensor,
    hi: Tensor,
    prior: Bounds | None = None,
    splits: list[Tensor] | None = None,
    start: int = 1,
    alpha_steps: int = 0,
    lr: float = 0.25,
    deadline: float | None = None,
) -> Bounds:
    """CROWN (or alpha-CROWN with ``alpha_steps > 0``) bounds of every pre-activation layer.

    Layers ``< start`` are taken from ``prior``; later ones are recomputed and intersected with
    ``prior`` when given (both are sound). Split signs clamp the bounds (``l = 0`` / ``u = 0``).
    Past ``deadline`` (``time.perf_counter()`` seconds) the alpha steps are skipped.

    Returns:
        ``[(l_k, u_k)]`` for k = 1..L-1, each ``[B, n_k]``.
    """
    pre: Bounds = []
    B = lo.shape[0]
    for m in range(1, len(net.Ws)):
        s = splits[m - 1] if splits is not None else None
        if m < start and prior is not None:
            pre.append(_clamp_split(*prior[m - 1], s))
            continue
        n = net.sizes[m - 1]
        eye = torch.eye(n, dtype=lo.dtype)
        C = torch.cat([eye, -eye]).unsqueeze(0).expand(B, 2 * n, n)
        if alpha_steps > 0 and m > 1 and (deadline is None or time.perf_counter() < deadline):
            lb, _, _ = optimize_bound(net, C, None, lo, hi, pre, steps=alpha_steps, lr_alpha=lr, upto=m, deadline=deadline)
        else:
            with torch.no_grad():
                lb, _ = backward_bound(net, C, None, lo, hi, pre, upto=m)
        l, u = lb[:, :n], -lb[:, n:]
        if prior is not None:
            l, u = torch.maximum(l, prior[m - 1][0]), torch.minimum(u, prior[m - 1][1])
        pre.append(_clamp_split(l, u, s))
    return pre


def _forward_init(net: ReluNet, B: int) -> Tensor:
    """Affine bounds of ``z_1`` in the packed form of :func:`_forward_step`: ``[B, n_0 + 1, 2 n_1]``
    (rows: the coefficients on ``x`` and the constant; columns: lower side, then upper side)."""
    F = torch.cat([net.Ws[0].T, net.bs[0].unsqueeze(0)])  # [n_0 + 1, n_1]
    return torch.cat([F, F], 1).unsqueeze(0).expand(B, -1, -1)


def _forward_concretize(F: Tensor, lo: Tensor, hi: Tensor, E: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``l, u [B, n]``: the packed affine bounds ``F [B, n_0 + 1, 2 n]`` minimised / maximised
    over the boxes, widened by the round-off of the sums and by ``E [B, 2 n]`` (the error bound
    of each computed affine function, :func:`_forward_error`); and ``mag [B, 2 n]``, the sum
    of the absolute values of each function's terms on the box."""
    n = F.shape[2] // 2
    ones = torch.ones_like(lo[:, :1])
    center = torch.cat([(lo + hi) / 2, ones], 1).unsqueeze(1)  # [B, 1, n_0 + 1]
    rad = torch.cat([(hi - lo) / 2, 0 * ones], 1).unsqueeze(1)
    Fa = F.abs()
    mid = (center @ F).squeeze(1)
    spread = (rad @ Fa).squeeze(1)
    mag = (center.abs() @ Fa).squeeze(1) + spread  # (|center| + rad, 1) . |F|
    w = gamma(F.shape[1], F.dtype) * mag
    if E is not None:
        w = w + E
    w = SAFETY * w
    return mid[:, :n] - spread[:, :n] - w[:, :n], mid[:, n:] + spread[:, n:] + w[:, n:], mag


def _forward_error(net: ReluNet, k: int, l: Tensor, u: Tensor, mag: Tensor, E: Tensor,
                   relaxed: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Error bound ``[B, 2 n_{k+1}]`` of the affine functions :func:`_forward_step` computes from
    ``F`` (term magnitudes ``mag [B, 2 n_k]`` from :func:`_forward_concretize`, error bound
    ``E [B, 2 n_k]``): the inherited error through the (non-negative) slopes and ``|W|``, plus
    ``gamma_n`` times the magnitude of the summed terms."""
    _, s_lo, s_up, icpt = _relax(l, u) if relaxed is None else relaxed
    slopes = torch.cat([s_lo, s_up], 1)
    absW = net.abs_WT[k]  # [n_k, n_{k+1}]
    mag = mag * slopes  # |relaxed term| per column
    mag[:, l.shape[1]:] += icpt.abs()
    inherited = E * slopes
    g = gamma(2 * absW.shape[0] + 1, mag.dtype)
    n = l.shape[1]
    out_lo = (inherited[:, :n] + inherited[:, n:]) @ absW + g * ((mag[:, :n] + mag[:, n:]) @ absW + net.bs[k].abs())
    return torch.cat([out_lo, out_lo], 1)


def _forward_step(net: ReluNet, k: int, l: Tensor, u: Tensor, F: Tensor, relaxed: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Packed affine bounds ``F [B, n_0 + 1, 2 n_k]`` of ``z_k`` (``Al x + cl <= z_k <= Au x +
    cu``: lower side in the first ``n_k`` columns, the constant in the last row) through the
    ReLU relaxation on ``[l, u]`` and layer ``k``: the same for ``z_{k+1}``.
    ``relu(z) >= s_lo z >= s_lo (Al x + cl)``; ``relu(z) <= s_up z + icpt <= s_up (Au x + cu) + icpt``
    (slopes are >= 0); then ``W = W+ + W-`` picks the lower or upper side per sign -- one
    ``[B (n_0 + 1), 2 n_k] @ [2 n_k, 2 n_{k+1}]`` product for both sides. ``relaxed``:
    ``_relax(l, u)`` if already computed."""
    _, s_lo, s_up, icpt = _relax(l, u) if relaxed is None else relaxed
    R = F * torch.cat([s_lo, s_up], 1).unsqueeze(1)
    R[:, -1, l.shape[1]:] += icpt
    W, b = net.Ws[k], net.bs[k]
    Wp, Wn = W.T.clamp(min=0), W.T.clamp(max=0)
    Wbig = torch.cat([torch.cat([Wp, Wn], 1), torch.cat([Wn, Wp], 1)])  # [2 n_k, 2 n_{k+1}]
    out = R @ Wbig
    out[:, -1] += torch.cat([b, b])
    return out


def forward_bounds(net: ReluNet, lo: Tensor, hi: Tensor, prior: Bounds | None = None) -> Bounds:
    """Pre-activation bounds by forward linear propagation (CROWN-forward / symbolic
    intervals): every ``z_k`` is sandwiched between two affine functions of ``x``
    (``[B, n_k, n_0 + 1]`` each), concretised over the box. Costs ``O(n_k n_{k-1} n_0)`` per
    domain and layer instead of the backward pass's ``O(n_k n_{k-1} n_k)``: the right choice
    for low-dimensional inputs (ACAS Xu: ``n_0 = 5``) when thousands of boxes are bounded at
    once. Intersected with ``prior`` (e.g. a parent box's bounds) when given.

    Returns:
        ``[(l_k, u_k)]`` for k = 1..L-1, each ``[B, n_k]``.
    """
    F = _forward_init(net, lo.shape[0])
    ferr = torch.zeros(F.shape[0], F.shape[2], dtype=F.dtype, device=F.device)  # error bound of each affine function
    pre: Bounds = []
    for k in range(1, len(net.Ws)):
        l, u, mag = _forward_concretize(F, lo, hi, ferr)
        if prior is not None:
            l, u = torch.maximum(l, prior[k - 1][0]), torch.minimum(u, prior[k - 1][1])
        pre.append((l, u))
        if k == len(net.Ws) - 1:
            break
        ferr = _forward_error(net, k, l, u, mag, ferr)
        F = _forward_step(net, k, l, u, F)
    return pre


def refined_bounds(net: ReluNet, lo: Tensor, hi: Tensor, prior: Bounds | None = None, splits: list[Tensor] | None = None) -> Bounds:
    """CROWN-quality pre-activation bounds at a fraction of the cost: layer by layer, forward
    linear bounds (intersected with ``prior``) decide which neurons are unstable, and only
    those get a backward CROWN pass (one two-row pass per unstable (box, neuron) pair).

    A stable neuron's bounds never enter a relaxation (its ReLU is exactly linear), so the
    result is as tight as :func:`intermediate_bounds` where it matters, and usually tighter
    thanks to ``prior``. On small input boxes few neurons are unstable (ACAS Xu: 1-7 %),
    which makes this 10-50x cheaper than a full backward pass per layer.

    Returns:
        ``[(l_k, u_k)]`` for k = 1..L-1, each ``[B, n_k]``.
    """
    F = _forward_init(net, lo.shape[0])
    ferr = torch.zeros(F.shape[0], F.shape[2], dtype=F.dtype, device=F.device)  # error bound of each affine function
    pre: Bounds = []
    rel: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # _relax of each finished layer
    for k in range(1, len(net.Ws)):
        l, u, mag = _forward_concretize(F, lo, hi, ferr)
        if prior is not None:
            l, u = torch.maximum(l, prior[k - 1][0]), torch.minimum(u, prior[k - 1][1])
        s = splits[k - 1] if splits is not None else None
        l, u = _clamp_split(l, u, s)
        unst = (l < 0) & (u > 0)
        if k > 1 and bool(unst.any()):
            bi, ni = unst.nonzero(as_tuple=True)  # one backward "domain" per unstable neuron
            E = torch.zeros(bi.shape[0], 2, l.shape[1], dtype=lo.dtype, device=lo.device)
            E[torch.arange(bi.shape[0]), 0, ni] = 1.0
            E[torch.arange(bi.shape[0]), 1, ni] = -1.0
            sub = [(pl[bi], pu[bi]) for pl, pu in pre]
            sub_rel = [tuple(t[bi] for t in r) for r in rel]
            lb, _ = backward_bound(net, E, None, lo[bi], hi[bi], sub, upto=k, relaxed=sub_rel)
            l = l.clone()
            u = u.clone()
            l[bi, ni] = torch.maximum(l[bi, ni], lb[:, 0])
            u[bi, ni] = torch.minimum(u[bi, ni], -lb[:, 1])
            l, u = _clamp_split(l, u, s)
        pre.append((l, u))
        if k == len(net.Ws) - 1:
            break
        rel.append(_relax(l, u))
        ferr = _forward_error(net, k, l, u, mag, ferr, rel[-1])
        F = _forward_step(net, k, l, u, F, rel[-1])
    return pre


def optimize_bound(
    net: ReluNet,
    C: Tensor,
    d: Tensor | None,
    lo: Tensor,
    hi: Tensor,
    pre: Bounds,
    alphas: list[Tensor] | None = None,
    betas: list[Tensor] | None = None,
    splits: list[Tensor] | None = None,
    steps: int = 20,
    lr_alpha: float = 0.1,
    lr_beta: float = 0.05,
    upto: int | None = None,
    deadline: float | None = None,
    stop_margin: float | None = None,
    track: "BestIterate | None" = None,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """alpha(-beta)-CROWN: maximise the lower bound of ``C z + d`` over slopes (and betas).

    Adam ascent on ``sum(lower)``, alphas projected to [0, 1] and betas to ``>= 0``; every
    iterate is a sound bound, so the best one per row is returned. ``stop_margin``: stop
    early once every row of every domain exceeds it. ``track``: a :class:`BestIterate` that
    receives, per row, the parameters of that row's best iterate (rows are independent
    problems with their own alphas and betas, so re-evaluating them with
    :func:`backward_bound`, e.g. in float64 after optimising in float32, gives back each
    row's best bound).

    Returns:
        ``best_lower [B, N]``, the alphas (``[B, N, n_k]`` per layer) and betas at the end
        (the end, not the best: as a warm start for children they keep Adam's progress).
    """
    L = len(net.Ws) if upto is None else upto
    B, N = lo.shape[0], C.shape[1]
    nl = L - 1
    if alphas is None:
        alphas = []
        for k in range(nl):
            l, u = pre[k]
            alphas.append((u > -l).to(lo.dtype).unsqueeze(1).expand(B, N, -1).clone())
    alphas = [a.detach().clone().requires_grad_(True) for a in alphas[:nl]]
    if splits is not None:
        if betas is None:
            betas = [torch.zeros(B, N, s.shape[1], dtype=lo.dtype, device=lo.device) for s in splits[:nl]]
        betas = [b.detach().clone().requires_grad_(True) for b in betas[:nl]]
    if steps <= 0:
        with torch.no_grad():
            best, _ = backward_bound(net, C, d, lo, hi, pre, L, alphas, betas, splits)
        return best, [a.detach() for a in alphas], None if betas is None else [b.detach() for b in betas]
    relaxed = [_relax(*pre[k]) for k in range(nl)]  # the bounds are fixed: relax once, not per step
    if splits is not None:
        splits = [s.to(lo.dtype) for s in splits]  # cast once, not per step
    best: Tensor | None = None
    opt_a = ProjectedAdam(alphas, lr_alpha, decay=1.0)  # alphas in [0, 1]
    opt_b = None if betas is None else ProjectedAdam(betas, lr_beta, decay=1.0, upper=None)  # betas >= 0

    def record(lower: Tensor) -> Tensor:
        """The best bound so far (and, with ``track``, each row's best parameters)."""
        if track is not None:
            if best is None:
                track.start(lower, alphas, betas)
            else:
                track.update(lower, alphas, betas)
        return lower.detach() if best is None else torch.maximum(best, lower.detach())

    # the first step's bound is that of the starting parameters: each iterate is evaluated once
    for _ in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        lower, _ = backward_bound(net, C, d, lo, hi, pre, L, alphas, betas, splits, relaxed=relaxed)
        with torch.no_grad():
            best = record(lower)
            if stop_margin is not None and bool((best > stop_margin).all()):
                break
        grads = torch.autograd.grad(-lower.sum(), alphas + (betas or []), allow_unused=True)
        opt_a.step(grads[: len(alphas)])
        if opt_b is not None:
            opt_b.step(grads[len(alphas) :])
    with torch.no_grad():
        lower, _ = backward_bound(net, C, d, lo, hi, pre, L, alphas, betas, splits, relaxed=relaxed)
        best = record(lower)
    return best, [a.detach() for a in alphas], None if betas is None else [b.detach() for b in betas]


class BestIterate:
    """Filled by :func:`optimize_bound`: per row (domain, output row), the best bound seen
    (``lower [B, N]``) and the alphas / betas (``[B, N, n_k]`` per layer) that gave it."""

    lower: Tensor
    alphas: list[Tensor]
    betas: list[Tensor] | None

    def start(self, lower: Tensor, alphas: list[Tensor], betas: list[Tensor] | None) -> "BestIterate":
        self.lower = lower.detach().clone()
        self.alphas = [a.detach().clone() for a in alphas]
        self.betas = None if betas is None else [b.detach().clone() for b in betas]
        return self

    def update(self, lower: Tensor, alphas: list[Tensor], betas: list[Tensor] | None) -> None:
        better = lower > self.lower  # [B, N]
        if not bool(better.any()):
            return
        self.lower = torch.where(better, lower, self.lower)
        m = better.unsqueeze(-1)
        self.alphas = [torch.where(m, a.detach(), k) for a, k in zip(alphas, self.alphas)]
        if betas is not None and self.betas is not None:
            self.betas = [torch.where(m, b.detach(), k) for b, k in zip(betas, self.betas)]
