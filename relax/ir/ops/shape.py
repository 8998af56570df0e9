"""Ops that only move values: reshape (view / flatten / squeeze / unsqueeze / contiguous /
Identity / Dropout in eval), permute (transpose), and :class:`Select` for every other op whose
outputs are copies of input entries or constants (slicing, gather / index_select with constant
indices, split, concatenation, expand / repeat / tile, nearest-neighbour upsampling, constant
padding, flips). The interval rule applies the op to both ends; the backward rule sends each
output's coefficient back to the entry it was copied from."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Op, sum_rows

__all__ = ["Reshape", "Permute", "Select"]


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


class Select(Op):
    """``y[i] = x[index[i]]`` where ``from_input[i]``, else ``y[i] = const[i]``, per example, with
    ``x`` the flattened variable inputs concatenated (``in_shapes``, in order).

    ``index``, ``from_input``, ``const``: ``[n_out]`` (long, bool, float). An input entry may feed
    several outputs (expand, gather with repeats): the backward rule then sums their
    coefficients, and a constant output adds ``A_i const_i`` to the bias; either makes the rule
    round, otherwise it only moves values.
    """

    kind = "select"
    exact_forward = True

    def __init__(self, index: Tensor, from_input: Tensor, const: Tensor, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]):
        self.index, self.from_input, self.const = index, from_input, const
        self.in_shapes, self.out_shape = [tuple(s) for s in in_shapes], tuple(out_shape)
        self.sizes = [int(torch.Size(s).numel()) for s in self.in_shapes]
        self.var_pos = from_input.nonzero().flatten()
        self.const_pos = (~from_input).nonzero().flatten()
        used = index[self.var_pos]
        self.moves_only = self.const_pos.numel() == 0 and bool(used.unique().numel() == used.numel())

    def to(self, dtype: torch.dtype) -> "Select":
        return Select(self.index, self.from_input, self.const.to(dtype), self.in_shapes, self.out_shape)

    def _gather(self, xs: tuple[Tensor, ...]) -> Tensor:
        B = max(x.shape[0] for x in xs)  # an input of batch 1 (the input set's box beside a batch of domains) serves every element
        flat = torch.cat([x.expand(B, *x.shape[1:]).reshape(B, -1) for x in xs], 1) if len(xs) > 1 else xs[0].reshape(B, -1)
        dev = flat.device
        out = flat[:, self.index.clamp(min=0).to(dev)]
        if self.const_pos.numel():
            out = torch.where(self.from_input.to(dev), out, self.const.to(device=dev, dtype=out.dtype))
        return out.reshape(B, *self.out_shape)

    def forward(self, *xs):
        return self._gather(xs)

    def interval(self, *bnds):
        return self._gather(tuple(b[0] for b in bnds)), self._gather(tuple(b[1] for b in bnds))

    def backward(self, A):
        S, B = A.shape[:2]
        A2 = A.reshape(S, B, -1)
        dev = A.device
        A_in = torch.zeros(S, B, sum(self.sizes), dtype=A.dtype, device=dev)
        vp = self.var_pos.to(dev)
        A_in = A_in.index_add(2, self.index.to(dev)[vp], A2[:, :, vp])
        bias = None
        if self.const_pos.numel():
            cp = self.const_pos.to(dev)
            bias = sum_rows(A2[:, :, cp] * self.const.to(device=dev, dtype=A.dtype)[cp])
        parts = torch.split(A_in, self.sizes, dim=2) if len(self.sizes) > 1 else [A_in]
        return [a.reshape(S, B, *s) for a, s in zip(parts, self.in_shapes)], bias
