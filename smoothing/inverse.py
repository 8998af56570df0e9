"""The inverse task: how often does the prediction survive a random perturbation from a set?

For an input set ``S_b`` (a :class:`verify.spec.InputSet`: a box or an l_p ball with its
domain) and a reference class ``y_b`` (by default the prediction at the set's midpoint /
centre), estimate

    q_b = P_{x' ~ D(S_b)} ( argmax f(x') = y_b )

with a two-sided Clopper-Pearson interval at level ``1 - alpha`` (and a one-sided lower
bound). ``D(S)`` is the sampling distribution, stated in the result:

* boxes and l_inf balls: uniform on the set (the ball intersected with the domain is a box);
* l2 / l1 balls: uniform on the ball (Gaussian direction times ``U^(1/d)``; for l1 the
  exponential-spacings construction), then clipped to the domain. Clipping keeps points in
  the ball (it moves every coordinate towards the centre, which lies in the domain) but the
  distribution is then no longer uniform where the domain cuts the ball.

This is a statistical statement about ``f`` on ``S``, not a certificate: ``q_b = 1`` is never
proved by sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Unpack

import numpy as np
import torch
from torch import Tensor

from verify.spec import Box, InputSet, LpBall

from .sampling import SamplingOptions, count_classes
from .stats import cp_interval, cp_lower, label_counts

__all__ = ["InvarianceEstimate", "UnitSampler", "estimate_invariance"]


@dataclass
class InvarianceEstimate:
    """Per input: ``estimate [B]`` (= k/n), ``lower``/``upper [B]`` two-sided CP interval,
    ``lower_one_sided [B]``, ``agree [B]`` counts, ``reference [B]`` classes."""

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    lower_one_sided: np.ndarray
    agree: np.ndarray
    reference: Tensor
    n: int
    alpha: float
    distribution: str


class UnitSampler:
    """Fills parameter tensors for :func:`smoothing.sampling.monte_carlo`: uniform in
    ``[0, 1)^d`` (``kind="box"``), or uniform in the unit l2 / l1 ball (``d + 1`` numbers per
    sample, turned into points by :meth:`points`)."""

    def __init__(self, kind: str, dim: int) -> None:
        if kind not in ("box", "l2", "l1"):
            raise ValueError(kind)
        self.kind, self.dim = kind, dim

    @property
    def param_dim(self) -> int:
        return self.dim if self.kind == "box" else self.dim + 1

    def fill_(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.kind == "box":
            return out.uniform_(0.0, 1.0, generator=generator)
        if self.kind == "l2":
            out[:, : self.dim].normal_(generator=generator)
            out[:, self.dim :].uniform_(0.0, 1.0, generator=generator)
            return out
        return out.uniform_(-1.0, 1.0, generator=generator)

    def points(self, u: Tensor) -> Tensor:
        """``[S, param_dim] -> [S, dim]`` points in the unit ball (or the unit cube)."""
        d = self.dim
        if self.kind == "box":
            return u
        if self.kind == "l2":
            g = u[:, :d]
            r = u[:, d:].clamp_min(0.0) ** (1.0 / d)
            return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30) * r
        # l1: e_i = -log|u_i| ~ Exp(1) (i <= d+1); e_{1..d} / sum_{1..d+1} e is uniform on the
        # simplex {y >= 0, sum y <= 1}; random signs from sign(u_i) give the l1 ball
        e = -torch.log(u.abs().clamp_min(torch.finfo(u.dtype).tiny))
        pts = e[:, :d] / e.sum(dim=1, keepdim=True)
        return pts * torch.where(u[:, :d] < 0, -1.0, 1.0).to(u.dtype)


def _pack(inputs: InputSet) -> tuple[Tensor, str, str]:
    """Per input, a stacked tensor ``[B, 4, *shape]`` (lo/centre, hi/eps, domain lo, domain
    hi), the sampler kind and a description of the distribution."""
    if isinstance(inputs, Box) or (isinstance(inputs, LpBall) and math.isinf(inputs.p)):
        lo, hi = inputs.bounds()
        z = torch.zeros_like(lo)
        return torch.stack([lo, hi, z, z], 1), "box", "uniform on the set"
    if isinstance(inputs, LpBall):
        c = inputs.center
        e = inputs._eps_view().expand_as(c)
        big = torch.finfo(c.dtype).max
        dlo = (inputs.domain_lo if inputs.domain_lo is not None else torch.tensor(-big, dtype=c.dtype, device=c.device)).expand_as(c)
        dhi = (inputs.domain_hi if inputs.domain_hi is not None else torch.tensor(big, dtype=c.dtype, device=c.device)).expand_as(c)
        kind = "l2" if inputs.p == 2.0 else "l1"
        return torch.stack([c, e, dlo, dhi], 1), kind, f"uniform on the {kind} ball, then clipped to the domain"
    raise TypeError(f"unsupported input set {type(inputs).__name__}")


def estimate_invariance(
    model: torch.nn.Module,
    inputs: InputSet,
    *,
    reference: Tensor | None = None,
    n: int = 10_000,
    alpha: float = 0.001,
    **sampling: Unpack[SamplingOptions],
) -> InvarianceEstimate:
    """Estimate ``P_{x' ~ D(S)}(argmax f(x') = reference)`` for every set of the batch.

    Args:
        model: classifier ``[S, *shape] -> [S, K]``.
        inputs: a :class:`~verify.spec.Box` or :class:`~verify.spec.LpBall` (batch ``B``).
        reference: ``[B]`` classes (default: ``argmax f`` at the midpoint / centre).
        n: samples per set.
        alpha: the interval holds with probability ``>= 1 - alpha`` per input.
        sampling: see :class:`~smoothing.sampling.SamplingOptions`; with ``share_noise`` (the
            default) the inputs of the batch use the same uniform draws (each interval keeps
            its level), ``False``: independent draws per input.
    """
    packed, kind, desc = _pack(inputs)
    shape = tuple(inputs.shape)
    d = math.prod(shape)
    sampler = UnitSampler(kind, d)
    if reference is None:
        with torch.inference_mode():
            reference = model(inputs.midpoint()).reshape(inputs.batch_size, -1).argmax(dim=1)

    def perturb(rows: Tensor, u: Tensor) -> Tensor:
        a, b, dlo, dhi = (rows[:, i].reshape(rows.shape[0], -1) for i in range(4))
        if kind == "box":
            pts = a + (b - a) * u
        else:
            pts = torch.minimum(torch.maximum(a + b * sampler.points(u), dlo), dhi)
        return pts.reshape(rows.shape[0], *shape)

    counts = count_classes(
        model, packed, sampler, [n], streams=["inverse"], perturb=perturb, param_shape=(sampler.param_dim,), **sampling,
    )[0]
    agree, _ = label_counts(counts, reference)
    lo, hi = cp_interval(agree, n, alpha)
    return InvarianceEstimate(agree / n, lo, hi, cp_lower(agree, n, alpha), agree, reference, n, alpha, desc)
