"""Functions of the canonical graph that torch does not provide as needed.

:func:`step`, the Heaviside step ``[x > 0] + v [x = 0]``: the ONNX importer writes comparisons
(Greater, Less, ArgMax's, Where conditions) with it, and the bound engine relaxes it
(:class:`relax.ir.ops.Step`). ``torch.heaviside`` has no derivative, so attacks and Jacobians
through a model would raise; this one's derivative is 0, as ``sign``'s (PGD steps on the
surrogate of :mod:`verify.surrogate` instead).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step"]


class _Heaviside(torch.autograd.Function):
    """``torch.heaviside`` with a zero derivative (as ``sign``'s): torch defines none, and attacks
    and Jacobians take gradients through the model."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, at_zero: Tensor) -> Tensor:
        return torch.heaviside(x, at_zero.to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: Tensor):
        return torch.zeros_like(g), None


def step(x: Tensor, at_zero: Tensor) -> Tensor:
    """``[x > 0] + v [x = 0]`` (``v = at_zero``, a scalar tensor) with a zero derivative: the
    graph function of :class:`Step` (the ONNX importer writes comparisons with it)."""
    return _Heaviside.apply(x, at_zero)
