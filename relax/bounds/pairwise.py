"""Bounds of a linear map of a node from the linear bounds of the node's own entries.

Softmax is bounded through the pairwise differences of its scores, ``d = s W^T`` with ``W
[n (n - 1), n]`` (rows ``e_j - e_i``; :func:`relax.ir.ops.b_softmax`, after Wei et al. 2023).
Giving each difference its own backward pass costs ``n - 1`` times the passes of the scores; the
interval difference ``[l_j - u_i, u_j - l_i]`` of the scores' boxes costs nothing but forgets
that both scores depend on the same input (on vit_2023's first attention layer it is loose by
a factor of 3). In between: the backward pass of each score ends in a linear lower and upper
bound on the input, ``L_j(x) <= s_j <= U_j(x)`` (:func:`relax.bounds.crown.backward_form`), and

    d_k = sum_j W_kj s_j >= sum_j (W+_kj L_j(x) + W-_kj U_j(x))

is a linear function of ``x``, concretised over the input set like any backward row. No extra
backward pass: the scores' forms are combined chunk by chunk (each chunk holds whole softmax
rows) and dropped. Round-off: the forms' own allowances add up with the weights ``|W|``, and the
concretisation's is taken over ``|W+| |L| + |W-| |U|`` (the summed terms, not the result; the
one over the combined ``|A|`` that every concretisation adds comes on top).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verify.spec import InputSet, LpBall
from relax.bounds.concretize import concretize_rows
from relax.bounds.roundoff import concretize_error

__all__ = ["PairwiseRows"]


class PairwiseRows:
    """Collects, chunk by chunk, the box of ``z W^T + b`` (``W [m, n]`` on the last dim of a node
    ``z`` with per-example shape ``shape``) from the linear bounds of ``z``'s entries.

    The chunks must come in order and hold whole groups of ``n`` consecutive entries (one last
    dim each); :meth:`box` gives ``(lo, hi)`` ``[B, *shape[:-1], m]``, unbounded where no chunk
    came (a deadline)."""

    def __init__(self, W: Tensor, b: Tensor | None, shape: tuple[int, ...], batch: int, max_elements: int) -> None:
        self.W, self.b, self.shape, self.batch = W, b, tuple(shape), batch
        self.n, self.m = W.shape[1], W.shape[0]
        self.max_elements = max_elements
        self.lows: list[Tensor] = []
        self.highs: list[Tensor] = []
        self._pairs = _pair_columns(W)

    @staticmethod
    def fits(W: Tensor, shape: tuple[int, ...]) -> bool:
        """Whether ``W`` maps the last dim of ``shape`` (a 2-D weight of matching width)."""
        return W.dim() == 2 and len(shape) >= 1 and W.shape[1] == shape[-1]

    def group(self, step: int) -> int:
        """``step`` rows rounded to whole groups of ``n`` (at least one group)."""
        return max(self.n, step // self.n * self.n)

    def add(self, A_in: Tensor, bias: Tensor, err: Tensor | None, input_set: InputSet, rounded: bool) -> None:
        """One chunk of ``c`` entries in order: ``A_in [2, c, *in]``, ``bias [2, c]``, ``err`` (``[2, c]``
        or broadcastable, or None), the rows ``+e`` then ``-e`` of :func:`backward_form`; ``input_set``
        is the chunk's (one element per row, or a batch of one for all rows)."""
        c = A_in.shape[1]
        g, n = c // self.n, self.n
        lower_form = A_in[0].reshape(g, n, -1)  # L(x) = lower_form . x + lower_bias <= z
        upper_form = -A_in[1].reshape(g, n, -1)  # z <= upper_form . x + upper_bias
        lower_bias, upper_bias = bias[0].reshape(g, n), -bias[1].reshape(g, n)
        if err is None:
            e_lo = e_hi = torch.zeros_like(lower_bias)
        else:
            e2 = err.expand(2, c)
            e_lo, e_hi = e2[0].reshape(g, n), e2[1].reshape(g, n)
        per_group = max(1, self.max_elements // max(1, 2 * self.m * lower_form.shape[-1]))
        for s in range(0, g, per_group):
            t = slice(s, min(g, s + per_group))
            iset = input_set if input_set.batch_size == 1 else input_set.select(torch.arange(t.start, t.stop) * n)
            low, high = self._chunk(lower_form[t], upper_form[t], lower_bias[t], upper_bias[t], e_lo[t], e_hi[t], iset, rounded)
            self.lows.append(low)
            self.highs.append(high)

    def _combine(self, Wp: Tensor, Wm: Tensor, P: Tensor, N: Tensor) -> Tensor:
        """``W+ P + W- N`` over the entries: ``P, N [g, n, in]`` -> ``[m, g, in]``. Rows with one
        positive and one negative entry (softmax's differences) are two gathers; any other
        ``W`` is a dense contraction."""
        if self._pairs is not None:
            jp, vp, jm, vm = self._pairs
            Pt, Nt = P.transpose(0, 1), N.transpose(0, 1)  # [n, g, in] views
            return Pt.index_select(0, jp) * vp.view(-1, 1, 1).to(P.dtype) + Nt.index_select(0, jm) * vm.view(-1, 1, 1).to(P.dtype)
        return torch.einsum("mn,gni->mgi", Wp, P) + torch.einsum("mn,gni->mgi", Wm, N)

    def _chunk(self, Lf: Tensor, Uf: Tensor, Lb: Tensor, Ub: Tensor, eL: Tensor, eU: Tensor, iset: InputSet, rounded: bool
               ) -> tuple[Tensor, Tensor]:
        """Lower and upper bounds ``[g, m]`` of the ``m`` combinations of ``g`` groups
        (forms ``[g, n, in]``, biases and allowances ``[g, n]``)."""
        Wp, Wm = self.W.clamp(min=0).to(Lf.dtype), self.W.clamp(max=0).to(Lf.dtype)
        # lower: W+ L + W- U; the upper bound of z W^T is minus the lower bound of z (-W)^T = W- L + W+ U
        A_lo = self._combine(Wp, Wm, Lf, Uf)
        A_up = -self._combine(Wp, Wm, Uf, Lf)
        b_lo = (Lb @ Wp.t() + Ub @ Wm.t()).t()  # [m, g]
        b_up = (-(Lb @ Wm.t()) - Ub @ Wp.t()).t()
        A = torch.stack([A_lo, A_up]).reshape(2 * self.m, Lf.shape[0], -1)
        bias = torch.stack([b_lo, b_up]).reshape(2 * self.m, -1)
        err = None
        if rounded:
            # the forms' own allowances, and the concretisation's over the summed magnitudes
            # |W+| |L| + |W-| |U| (a sum of the entries' terms, so the entries' dot products with the
            # set's magnitude combine; concretize_rows adds its own over |A| <= that on top)
            ce = _entry_allowance(torch.stack([Lf.detach().abs(), Uf.detach().abs()]), iset)  # [2, g, n]
            eL, eU = eL.detach() + ce[0], eU.detach() + ce[1]
            aWp, aWm = Wp, -Wm
            err_lo = (eL @ aWp.t() + eU @ aWm.t()).t()
            err_up = (eL @ aWm.t() + eU @ aWp.t()).t()
            err = torch.stack([err_lo, err_up]).reshape(2 * self.m, -1)
        low = concretize_rows(A, bias, err, iset, False, rounded).view(2, self.m, -1)
        lower, upper = low[0].t(), -low[1].t()  # [g, m]
        if self.b is not None:
            lower, upper = lower + self.b, upper + self.b
        return lower, upper

    def box(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` ``[B, *shape[:-1], m]`` of the combinations; ``-inf`` / ``inf`` past the
        last chunk."""
        groups = self.batch * math.prod(self.shape[:-1])
        lo = torch.cat(self.lows) if self.lows else torch.empty(0, self.m, dtype=dtype, device=device)
        hi = torch.cat(self.highs) if self.highs else torch.empty(0, self.m, dtype=dtype, device=device)
        missing = groups - lo.shape[0]
        if missing:
            lo = torch.cat([lo, torch.full((missing, self.m), -math.inf, dtype=dtype, device=device)])
            hi = torch.cat([hi, torch.full((missing, self.m), math.inf, dtype=dtype, device=device)])
        lo = torch.nan_to_num(lo, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        hi = torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=-math.inf)
        out = (self.batch, *self.shape[:-1], self.m)
        return lo.reshape(out), hi.reshape(out)


def _entry_allowance(absF: Tensor, iset: InputSet) -> Tensor:
    """:func:`relax.bounds.roundoff.concretize_error` of each entry's form: ``absF [2, g, n, in]``
    (``|L|``, ``|U|``) -> ``[2, g, n]``, for the groups' input sets (or one for all)."""
    lo, hi = iset.bounds()
    two, g, n = absF.shape[:3]
    eps = iset.eps if isinstance(iset, LpBall) and not math.isinf(iset.p) else None
    Bi = lo.shape[0]
    lo2, hi2 = lo.reshape(Bi, -1), hi.reshape(Bi, -1)
    if Bi == 1:  # one input for every group: fold the groups into the rows
        return concretize_error(absF.reshape(two * g * n, 1, -1), lo2, hi2, eps).view(two, g, n)
    F = absF.permute(0, 2, 1, 3).reshape(two * n, g, -1)  # [2 n, g, in]: batch = the groups
    return concretize_error(F, lo2, hi2, eps).view(two, n, g).transpose(1, 2)


def _pair_columns(W: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """For a ``W [m, n]`` whose every row has exactly one positive and one negative entry:
    the positive entries' columns and values, then the negative ones' (each ``[m]``); else None."""
    pos, neg = W > 0, W < 0
    if W.dim() != 2 or not (bool((pos.sum(1) == 1).all()) and bool((neg.sum(1) == 1).all())):
        return None
    jp, jm = pos.float().argmax(1), neg.float().argmax(1)
    rows = torch.arange(W.shape[0], device=W.device)
    return jp, W[rows, jp], jm, W[rows, jm]
