"""MaxPool2d (relaxed) and AvgPool2d (affine: a depthwise convolution).

MaxPool relaxation (DeepPoly, Singh et al. 2019, Sec. 4.4 style): per window with input
bounds ``[l_j, u_j]`` let ``i = argmax_j l_j``. Lower line ``y >= x_i`` (always true: the max is
at least every element). Upper: if ``l_i >= max_{j != i} u_j`` the max *is* ``x_i`` (exact);
otherwise the constant ``max_j u_j``. Padding cells are ``-inf`` (never the max).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .affine import Conv
from .base import Activation, Relaxation

__all__ = ["MaxPool2d", "avgpool_conv"]


class MaxPool2d(Activation):
    kind = "maxpool2d"
    exact_forward = True
    elementwise = False

    def __init__(self, kernel, stride, padding, dilation, in_shape, out_shape):
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        C, H, W = in_shape
        # flat input position of every (window cell, window): [k*k, L], -1 for padding
        pos = torch.arange(1, H * W + 1, dtype=torch.float64).view(1, 1, H, W)
        pos = F.unfold(F.pad(pos, (padding[1], padding[1], padding[0], padding[0])), kernel, dilation, 0, stride)
        self.pos = (pos[0].round().long() - 1)  # [kk, L]

    def forward(self, x):
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)

    def interval(self, bnd):
        lo, hi = bnd
        return self.forward(lo), self.forward(hi)

    def _windows(self, t: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, kk, L]`` with -inf padding."""
        B, C = t.shape[:2]
        p = self.padding
        t = F.pad(t, (p[1], p[1], p[0], p[0]), value=float("-inf"))
        w = F.unfold(t.reshape(B * C, 1, *t.shape[2:]), self.kernel, self.dilation, 0, self.stride)
        return w.view(B, C, w.shape[1], w.shape[2])

    def relax(self, lo, hi, mode="crown"):
        lw_, uw_ = self._windows(lo), self._windows(hi)
        lmax, idx = lw_.max(dim=2)  # [B, C, L]
        umax = uw_.max(dim=2).values
        others = uw_.scatter(2, idx.unsqueeze(2), float("-inf")).max(dim=2).values
        exact = lmax >= others
        pos = self.pos.to(lo.device)
        in_idx = pos[idx, torch.arange(pos.shape[1], device=lo.device).expand_as(idx)]  # [B, C, L]
        shape = (lo.shape[0], *self.out_shape)
        return Relaxation(None, None, None, umax.view(shape), extra=(in_idx, exact.view(shape)))

    def backward_relaxed(self, A, r, alpha=None):
        S, B = A.shape[:2]
        in_idx, exact = r.extra
        Ap, An = A.clamp(min=0), A.clamp(max=0)
        coeff = Ap + torch.where(exact, An, torch.zeros_like(An))
        bias = (torch.where(exact, torch.zeros_like(An), An) * r.ub).reshape(S, B, -1).sum(-1)
        C, H, W = self.in_shape
        A_in = torch.zeros(S, B, C, H * W, dtype=A.dtype, device=A.device)
        A_in = A_in.scatter_add(3, in_idx.unsqueeze(0).expand(S, -1, -1, -1), coeff.reshape(S, B, C, -1))
        return A_in.view(S, B, C, H, W), bias


def avgpool_conv(C: int, kernel, stride, padding, divisor: float, in_shape, out_shape, dtype) -> Conv:
    """AvgPool2d with ``count_include_pad=True`` (or no padding) as a depthwise conv."""
    W = torch.full((C, 1, *kernel), 1.0 / divisor, dtype=dtype)
    return Conv(W, None, tuple(stride), tuple(padding), (1, 1), C, in_shape, out_shape)
