"""Concretisation: the minimum of a linear function ``A . x + bias`` over an input set (box, l_p
ball, a ball clipped by its domain), with the round-off of the sums subtracted when asked."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verify.spec import InputSet, LpBall, dual_norm
from relax.bounds.dot import rowwise_dot
from relax.bounds.roundoff import SAFETY, concretize_error

__all__ = ["concretize", "ball_box_dual", "backward_tail", "concretize_rows"]


def concretize(A: Tensor, bias: Tensor, input_set: InputSet, clipped_ball: bool = False) -> Tensor:
    """``min over x in input_set of A . x + bias``: ``A [S, B, *in]``, ``bias [S, B]`` -> ``[S, B]``.

    Box / l_inf ball: ``A . m - |A| . r`` on the (domain-clipped) box. l_p ball (p = 1, 2):
    Hoelder, ``A . c - eps ||A||_q`` with ``1/p + 1/q = 1``, the box bound on the enclosing
    clipped box and, with ``clipped_ball`` (the spec rows' pass: the intermediate rows are too
    many for its cost) when a domain clips the ball, the dual bound on ball and box together
    (:func:`ball_box_dual`); the largest (all sound: the set lies in each).
    """
    S, B = A.shape[:2]
    A2 = A.reshape(S, B, -1)
    lo, hi = input_set.bounds()
    m, r = ((hi + lo) / 2).reshape(B, -1), ((hi - lo) / 2).reshape(B, -1)
    val = rowwise_dot(A2, m) - rowwise_dot(A2.abs(), r)
    if isinstance(input_set, LpBall) and not math.isinf(input_set.p):
        q = dual_norm(input_set.p)
        c = input_set.center.reshape(B, -1).to(A.dtype)
        nq = A2.abs().amax(-1) if math.isinf(q) else A2.norm(p=q, dim=-1)
        ball = rowwise_dot(A2, c) - input_set.eps.to(A.dtype).view(1, B) * nq
        val = torch.maximum(val, ball)
        if clipped_ball and (input_set.domain_lo is not None or input_set.domain_hi is not None):
            eps = input_set.eps.to(A.dtype).view(1, B, 1)
            val = torch.maximum(val, ball_box_dual(A2, c, eps, lo.reshape(B, -1).to(A.dtype), hi.reshape(B, -1).to(A.dtype), input_set.p))
    return val + bias


def ball_box_dual(A: Tensor, c: Tensor, eps: Tensor, lo: Tensor, hi: Tensor, p: float) -> Tensor:
    """Lower bound ``[S, B]`` of ``min A . x`` over the l_p ball ``||x - c||_p <= eps`` *intersected*
    with the box ``[lo, hi]`` (a ball clipped by the input domain), by Lagrangian duality: for
    any ``mu >= 0``

    * ``p = 1``: ``sum_i min_{x_i in [lo_i, hi_i]} (a_i x_i + mu |x_i - c_i|) - mu eps``
      (each term at ``lo_i``, ``hi_i`` or the clamped centre); ``mu`` is the ``|a_i|`` at which the
      greedy fill of the budget ``eps`` (largest ``|a_i|`` first, each up to its bound) stops,
      which makes the bound the exact minimum;
    * ``p = 2``: ``sum_i min_{x_i} (a_i x_i + mu (x_i - c_i)^2) - mu eps^2`` with the minimiser
      ``clamp(c_i - a_i / (2 mu), lo_i, hi_i)``; ``mu`` by bisection on ``||x(mu) - c|| = eps``.

    Any ``mu`` gives a sound bound (weak duality), so ``mu`` is chosen without gradients. Shapes:
    ``A [S, B, n]``, ``c, lo, hi [B, n]``, ``eps [1, B, 1]``. The round-off of the sums
    (``gamma_n`` times their terms' magnitudes) is subtracted.
    """
    from relax.bounds.roundoff import gamma as _gamma

    n = A.shape[-1]
    c, lo, hi = c.unsqueeze(0), lo.unsqueeze(0), hi.unsqueeze(0)
    cc = torch.minimum(torch.maximum(c, lo), hi)
    zero = eps <= 0  # a point: the plain ball bound is exact there; -inf here (computed with eps 1, kept finite)
    eps = torch.where(zero, torch.ones_like(eps), eps)
    with torch.no_grad():
        Ad = A.detach()
        if p == 1.0:
            cap = torch.where(Ad > 0, cc - lo, hi - cc).clamp_min(0) + (cc - c).abs()
            a_abs, order = Ad.abs().sort(-1, descending=True)
            filled = cap.expand_as(Ad).gather(-1, order).cumsum(-1)
            k = (filled < eps).sum(-1, keepdim=True).clamp(max=n - 1)
            mu = torch.where((filled[..., -1:] < eps), torch.zeros_like(k, dtype=A.dtype), a_abs.gather(-1, k))
        else:
            tiny = torch.finfo(A.dtype).tiny
            lo_mu = torch.full(Ad.shape[:-1] + (1,), tiny, dtype=A.dtype, device=A.device).log()
            hi_mu = (Ad.norm(dim=-1, keepdim=True) / (2 * eps.clamp_min(tiny)) + tiny).log() + 1.0
            for _ in range(40):
                mid = (lo_mu + hi_mu) / 2
                x = torch.minimum(torch.maximum(c - Ad / (2 * mid.exp()), lo), hi)
                big = ((x - c) ** 2).sum(-1, keepdim=True) > eps ** 2  # mu too small
                lo_mu = torch.where(big, mid, lo_mu)
                hi_mu = torch.where(big, hi_mu, mid)
            mu = hi_mu.exp()
    if p == 1.0:
        cand = torch.stack([A * lo + mu * (lo - c).abs(), A * hi + mu * (hi - c).abs(), A * cc + mu * (cc - c).abs()])
        terms = cand.amin(0)
        val = terms.sum(-1) - (mu * eps).squeeze(-1)
        mag = terms.abs().sum(-1) + (mu * eps).squeeze(-1)
    else:
        x = torch.minimum(torch.maximum(c - A.detach() / (2 * mu), lo), hi)
        terms = A * x + mu * (x - c) ** 2
        val = terms.sum(-1) - (mu * eps ** 2).squeeze(-1)
        mag = (A * x).abs().sum(-1) + (mu * (x - c) ** 2).sum(-1) + (mu * eps ** 2).squeeze(-1)
    val = val - 3 * _gamma(n + 4, A.dtype) * mag.detach()
    return torch.where(zero.squeeze(-1), torch.full_like(val, -math.inf), val)


def backward_tail(A_in: Tensor, bias: Tensor, err: Tensor | None, input_set: InputSet, clipped_ball: bool, rounded: bool) -> Tensor:
    """:func:`backward`'s last step: ``A_in . x + bias`` (``A_in [S, B, *in]``, ``bias [S, B]``)
    concretised over the input set, lowered by the round-off ``err [S, B]`` accumulated so far
    and the concretisation's own when ``rounded``."""
    low = concretize(A_in, bias, input_set, clipped_ball)
    if not rounded:
        return low
    S, B = A_in.shape[:2]
    lo, hi = input_set.bounds()
    eps = input_set.eps if isinstance(input_set, LpBall) and not math.isinf(input_set.p) else None
    e = concretize_error(A_in.detach().abs().reshape(S, B, -1), lo.reshape(B, -1), hi.reshape(B, -1), eps)
    err = e if err is None else err + e
    return low - SAFETY * err - torch.finfo(low.dtype).tiny


def concretize_rows(A_in: Tensor, bias: Tensor, err: Tensor | None, input_set: InputSet, clipped_ball: bool, rounded: bool) -> Tensor:
    """:func:`backward_tail` of rows ``A_in [S, B, *in]`` whose batch ``B`` is a virtual batch of
    one input (``input_set.batch_size == 1``: folded into the rows) or the input set's own."""
    S, B = A_in.shape[:2]
    if input_set.batch_size == 1 and B > 1:
        A_in, bias = A_in.reshape(S * B, 1, *A_in.shape[2:]), bias.reshape(S * B, 1)
        if err is not None:
            err = err.expand(S, B).reshape(S * B, 1)
        return backward_tail(A_in, bias, err, input_set, clipped_ball, rounded).view(S, B)
    return backward_tail(A_in, bias, err, input_set, clipped_ball, rounded)
