"""Projected Adam for the bound optimisations (alpha slopes in [0, 1], beta multipliers >= 0)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ProjectedAdam"]


class ProjectedAdam:
    """Adam (Kingma & Ba 2015) with exponential learning-rate decay and projection onto
    ``[0, upper]`` (``upper=None``: ``>= 0``), a few lines instead of importing
    ``torch.optim``, whose first import costs seconds."""

    def __init__(self, params: list[Tensor], lr: float, decay: float, betas=(0.9, 0.999), eps=1e-8, upper: float | None = 1.0):
        self.params, self.lr, self.decay, self.b1, self.b2, self.eps = params, lr, decay, betas[0], betas[1], eps
        self.upper = upper
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if g is None:
                continue
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)
            p.clamp_(min=0.0, max=self.upper)
        self.lr *= self.decay
