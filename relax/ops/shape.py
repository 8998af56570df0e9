"""Shape-only ops: reshape (view / flatten / squeeze / unsqueeze / contiguous / Identity /
Dropout in eval) and permute (transpose). The interval rule applies the op to both ends; the
backward rule is the inverse reshape / permutation of ``A``."""
from __future__ import annotations

from torch import Tensor

from .base import Op

__all__ = ["Reshape", "Permute"]


class Reshape(Op):
    """Per-example ``in_shape -> out_shape`` (same element order)."""

    kind = "reshape"
    exact_forward = True
    moves_only = True

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def interval(self, bnd):
        lo, hi = bnd
        return self.forward(lo), self.forward(hi)

    def backward(self, A):
        return [A.reshape(A.shape[0], A.shape[1], *self.in_shape)], None


class Permute(Op):
    """Per-example permutation ``perm`` of the non-batch dims."""

    kind = "permute"
    exact_forward = True
    moves_only = True

    def __init__(self, perm: list[int]):
        self.perm = list(perm)
        self.inv = [self.perm.index(i) for i in range(len(self.perm))]

    def forward(self, x):
        return x.permute(0, *[p + 1 for p in self.perm])

    def interval(self, bnd):
        lo, hi = bnd
        return self.forward(lo), self.forward(hi)

    def backward(self, A):
        return [A.permute(0, 1, *[p + 2 for p in self.inv])], None
