"""Affine ops: Linear, Conv1d/2d (and AvgPool as a depthwise conv), elementwise affine
(BatchNorm in eval, add/sub/mul/div by a constant, neg), sum of two tensors.

Interval rule of ``y = W x + b``: centre ``W m + b`` and radius ``|W| r`` (exact for one affine
layer). Backward rule: ``A -> A W`` (the transpose; for conv the transposed convolution),
bias ``A . b``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Op, sum_rows

__all__ = ["Linear", "Conv", "ElemAffine", "Add", "Reduce", "unbroadcast"]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def unbroadcast(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``t [S, B, *out]`` down to ``[S, B, *shape]`` where ``shape`` broadcast to ``out``."""
    lead = t.dim() - 2 - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(2, 2 + lead)))
    dims = tuple(2 + i for i, s in enumerate(shape) if s == 1 and t.shape[2 + i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


class Linear(Op):
    """``y = x W^T + b`` on the last dim; ``W: [out, in]``, ``b: [out]`` or ``None``."""

    kind = "linear"
    #: its box is taken from its input's linear bounds (softmax's pairwise differences, relax.bounds.pairwise)
    box_from_input = False

    def __init__(self, W: Tensor, b: Tensor | None, in_rank: int = 1):
        self.W, self.b, self.in_rank = W, b, in_rank
        self._absWt: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.W, self.b)

    def interval(self, bnd):
        lo, hi = bnd
        m, r = (hi + lo) / 2, (hi - lo) / 2
        if self._absWt is None:
            self._absWt = self.W.abs().t().contiguous()
        c = F.linear(m, self.W, self.b)
        d = r @ self._absWt
        return c - d, c + d

    def term_magnitude(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``|W| M + |b|`` with ``M = max(|lo|, |hi|)``, ``[B, *out]``: the interval rule on the
        symmetric box ``[-M, M]`` (:func:`relax.bounds.roundoff.term_magnitude`) without its centre,
        which is ``b`` there (one product instead of two)."""
        if self._absWt is None:
            self._absWt = self.W.abs().t().contiguous()
        T = torch.maximum(lo.abs(), hi.abs()) @ self._absWt
        return T if self.b is None else T + self.b.abs()

    def backward(self, A):
        A_in = A @ self.W
        if self.b is None:
            return [A_in], None
        # A . b: a matrix-vector product over the last dim (no [S, B, *out] temporary), then the
        # leading positions of a [..., out] input
        bias = A @ self.b if A.dim() == 3 else sum_rows(A @ self.b)
        return [A_in], bias

    def backward_rows(self, idx: Tensor, sign: Tensor):
        """Backward of the one-hot rows ``sign_s e_{idx[s, b]}`` (``idx [S, B]``): rows of ``W``
        (only for a vector input; on ``[..., in]`` the flat index also names the leading position)."""
        if self.W.dim() != 2 or idx.dim() != 2 or self.in_rank != 1:
            return None
        sg = sign.to(self.W.dtype).view(-1, 1)
        A_in = self.W[idx] * sg.unsqueeze(-1)
        bias = None if self.b is None else self.b[idx] * sg
        return [A_in], bias


class Conv(Op):
    """``F.conv1d/conv2d`` with constant weight ``W [Cout, Cin/groups, *k]`` and bias."""

    kind = "conv"

    def __init__(self, W, b, stride, padding, dilation, groups, in_shape, out_shape):
        self.W, self.b = W, b
        self.nd = W.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.conv = F.conv1d if self.nd == 1 else F.conv2d
        self.convT = F.conv_transpose1d if self.nd == 1 else F.conv_transpose2d
        # output_padding so that the transposed conv returns exactly the input size
        self.out_pad = []
        for i in range(self.nd):
            k = W.shape[2 + i]
            full = (out_shape[1 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1
            self.out_pad.append(in_shape[1 + i] - full)
        self._absW: Tensor | None = None
        self._dense: Tensor | None = None
        n_in, n_out = _prod(in_shape), _prod(out_shape)
        self.rows_dense = n_in * n_out <= self.DENSE_LIMIT
        macs = self._multiply_adds(n_in, n_out)
        self.use_dense = self.rows_dense and W.dtype == torch.float64 and n_in * n_out <= self.DENSE_MAC_RATIO * macs

    #: largest convolution (``n_in * n_out``) kept as a dense ``[out, in]`` matrix: its rows
    #: give the one-hot backward of intermediate bounds by indexing (``backward_rows``)
    DENSE_LIMIT = 2**20
    #: the backward pass uses the matrix instead of the transposed convolution only in float64
    #: and only when the matrix has at most this many times the convolution's multiply-adds
    #: (one thread, torch 2.13, 9-1152 rows: float64 transposed convolutions run ~9x slower per
    #: multiply-add than a matmul, float32 ones as fast, so float32 never gains from the matrix)
    DENSE_MAC_RATIO = 4

    def _multiply_adds(self, n_in: int, n_out: int) -> int:
        """Multiply-adds of the convolution (and of its adjoint): each output meets ``W.shape[1:]`` weights."""
        return n_out * _prod(self.W.shape[1:])

    def dense(self) -> Tensor:
        """The convolution (without bias) as a matrix ``[out, in]``: its columns as images of the
        unit inputs, or, when the output is the smaller side, its rows as adjoint images of the
        unit outputs (a 3x32x32 -> 48x2x2 patch embedding: 192 adjoint images instead of 3,072
        convolutions, 0.5 s -> a few ms; every entry is one weight or zero either way)."""
        if self._dense is None:
            n_in, n_out = _prod(self.in_shape), _prod(self.out_shape)
            if n_out < n_in:
                eye = torch.eye(n_out, dtype=self.W.dtype, device=self.W.device).view(n_out, *self.out_shape)
                self._dense = self._adjoint(eye).reshape(n_out, n_in).contiguous()
            else:
                eye = torch.eye(n_in, dtype=self.W.dtype, device=self.W.device).view(n_in, *self.in_shape)
                self._dense = self._c(eye, self.W, None).reshape(n_in, -1).t().contiguous()
        return self._dense

    def _adjoint(self, a: Tensor) -> Tensor:
        """The adjoint map (transposed convolution) of a batch ``a [n, *out_shape]`` -> ``[n, *in_shape]``."""
        return self.convT(a, self.W, None, self.stride, self.padding, tuple(self.out_pad), self.groups, self.dilation)

    def backward_rows(self, idx: Tensor, sign: Tensor):
        if not self.rows_dense:
            return None
        M = self.dense()
        sg = sign.to(M.dtype).view(-1, 1)
        A_in = (M[idx] * sg.unsqueeze(-1)).view(*idx.shape, *self.in_shape)
        bias = None
        if self.b is not None:
            per = self.b.view(-1, 1).expand(self.b.shape[0], _prod(self.out_shape[1:])).reshape(-1)
            bias = per[idx] * sg
        return [A_in], bias

    def _c(self, x, W, b):
        return self.conv(x, W, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return self._c(x, self.W, self.b)

    def term_magnitude(self, lo: Tensor, hi: Tensor) -> Tensor:
        """``|W| * M + |b|`` with ``M = max(|lo|, |hi|)``, ``[B, *out]``: the interval rule on the
        symmetric box ``[-M, M]`` (:func:`relax.bounds.roundoff.term_magnitude`) in one
        convolution instead of two (its centre is ``b`` there)."""
        if self._absW is None:
            self._absW = self.W.abs()
        return self._c(torch.maximum(lo.abs(), hi.abs()), self._absW, None if self.b is None else self.b.abs())

    def interval(self, bnd):
        lo, hi = bnd
        if self._absW is None:
            self._absW = self.W.abs()
        c = self._c((hi + lo) / 2, self.W, self.b)
        d = self._c((hi - lo) / 2, self._absW, None)
        return c - d, c + d

    def backward(self, A):
        S, B = A.shape[:2]
        bias = None
        if self.b is not None:
            bias = sum_rows(A * self.b.view(-1, *([1] * self.nd)))
        if self.use_dense:
            return [(A.reshape(S, B, -1) @ self.dense()).view(S, B, *self.in_shape)], bias
        a_in = self._adjoint(A.reshape(S * B, *self.out_shape))
        return [a_in.reshape(S, B, *self.in_shape)], bias


class ConvTranspose(Conv):
    """``F.conv_transpose2d`` with constant weight ``W [Cin, Cout/groups, *k]``, bias,
    ``output_padding``; its backward rule is the adjoint, a plain convolution (which returns
    exactly the input size: ``output_padding < stride``)."""

    kind = "conv_transpose"

    def __init__(self, W, b, stride, padding, output_padding, dilation, groups, in_shape, out_shape):
        super().__init__(W, b, stride, padding, dilation, groups, in_shape, out_shape)
        self.output_padding = tuple(output_padding)

    def _c(self, x, W, b):
        return F.conv_transpose2d(x, W, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def _multiply_adds(self, n_in: int, n_out: int) -> int:
        """Each input of the transposed convolution meets ``W.shape[1:]`` weights."""
        return n_in * _prod(self.W.shape[1:])

    def _adjoint(self, a: Tensor) -> Tensor:
        """The adjoint of the transposed convolution: a plain convolution ``[n, *out_shape]`` -> ``[n, *in_shape]``."""
        return F.conv2d(a, self.W, None, self.stride, self.padding, self.dilation, self.groups)


class ElemAffine(Op):
    """``y = x * scale + shift`` elementwise; ``scale``/``shift`` broadcast to the per-example
    output shape (BatchNorm in eval, +,-,*,/ by a constant, neg)."""

    kind = "elementwise affine"
    #: each end is mapped on its own and widened by its own round-off
    interval_rounded = True

    def __init__(self, scale: Tensor | None, shift: Tensor | None, in_shape: tuple[int, ...]):
        self.scale, self.shift, self.in_shape = scale, shift, tuple(in_shape)

    def forward(self, x):
        y = x if self.scale is None else x * self.scale
        return y if self.shift is None else y + self.shift

    def interval(self, bnd):
        lo, hi = bnd  # the ends mapped directly: exact per end, and unbounded ends stay unbounded
        if self.scale is not None:
            a, b = lo * self.scale, hi * self.scale
            lo, hi = torch.minimum(a, b), torch.maximum(a, b)
            if self.scale.numel() > 0 and bool((self.scale == 0).any()):  # 0 * inf is 0
                lo, hi = torch.nan_to_num(lo, nan=0.0, posinf=math.inf, neginf=-math.inf), torch.nan_to_num(hi, nan=0.0, posinf=math.inf, neginf=-math.inf)
        u4 = 2 * torch.finfo(lo.dtype).eps  # 4 u: one product and one sum per end (gamma_2, rounded up)
        if self.shift is not None:
            el, eh = u4 * (lo.abs() + self.shift.abs()), u4 * (hi.abs() + self.shift.abs())
            lo, hi = lo + self.shift, hi + self.shift
        else:
            el, eh = u4 * lo.abs(), u4 * hi.abs()
        return lo - el, hi + eh

    def backward(self, A):
        A_in = A if self.scale is None else A * self.scale
        A_in = unbroadcast(A_in, self.in_shape)
        bias = None if self.shift is None else sum_rows(A * self.shift)
        return [A_in], bias


class Add(Op):
    """``y = sum_i sign_i x_i`` of variable tensors (residual connections), with broadcasting."""

    kind = "add"

    def __init__(self, signs: list[float], in_shapes: list[tuple[int, ...]]):
        self.signs, self.in_shapes = signs, in_shapes

    def forward(self, *xs):
        y = xs[0] * self.signs[0]
        for s, x in zip(self.signs[1:], xs[1:]):
            y = y + s * x
        return y

    def interval(self, *bnds):
        lo = hi = None
        for s, (l, h) in zip(self.signs, bnds):
            a, b = (l, h) if s > 0 else (-h, -l)
            lo = a if lo is None else lo + a
            hi = b if hi is None else hi + b
        return lo, hi

    def backward(self, A):
        return [unbroadcast(A if s > 0 else -A, sh) for s, sh in zip(self.signs, self.in_shapes)], None

    def sum_terms(self, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> int:
        """Terms of its longest sum: each output entry adds one entry of every input; the backward
        rule sums a broadcast input's coefficients over the entries it was copied to."""
        n_out = math.prod(out_shape)
        return max([len(in_shapes)] + [n_out // max(math.prod(s), 1) for s in in_shapes])


class Reduce(Op):
    """``y = scale * sum of x over dims`` (per-example ``dims``; ``keepdim`` as in ``torch.sum``):
    ReduceSum, and ReduceMean with ``scale = 1 / count``."""

    kind = "reduce"
    #: each end of the interval rule is widened by the round-off of its own sum
    interval_rounded = True

    def __init__(self, dims: tuple[int, ...], keepdim: bool, scale: float, in_shape: tuple[int, ...]):
        self.dims, self.keepdim, self.scale, self.in_shape = tuple(sorted(dims)), keepdim, float(scale), tuple(in_shape)
        if self.scale <= 0:
            raise ValueError("Reduce needs a positive scale")

    def _sum(self, x: Tensor, lead: int) -> Tensor:
        y = x.sum(dim=tuple(d + lead for d in self.dims), keepdim=self.keepdim)
        return y if self.scale == 1.0 else y * self.scale

    def forward(self, x):
        return self._sum(x, 1)

    def interval(self, bnd):
        lo, hi = bnd
        n = math.prod(self.in_shape[d] for d in self.dims) + 2
        u = torch.finfo(lo.dtype).eps / 2
        g = 2 * n * u / (1 - n * u)  # twice gamma_n (Higham Eq. (3.5)) for the sum and the scaling
        # terms beyond max / n moved toward 0 (sound for each end): the lower end's sum cannot overflow
        # to +inf, nor the upper's to -inf (huge terms, e.g. exp's overflowed lower ends in a softmax)
        big = torch.finfo(lo.dtype).max / n
        lo, hi = lo.clamp(max=big), hi.clamp(min=-big)
        return self._sum(lo, 1) - g * self._sum(lo.abs(), 1), self._sum(hi, 1) + g * self._sum(hi.abs(), 1)

    def backward(self, A):
        if not self.keepdim:
            for d in self.dims:
                A = A.unsqueeze(d + 2)
        A_in = A.expand(*A.shape[:2], *self.in_shape)
        return [A_in * self.scale if self.scale != 1.0 else A_in.contiguous()], None

    def __repr__(self) -> str:
        return f"Reduce(dims={list(self.dims)}, keepdim={self.keepdim}, scale={self.scale:g})"
