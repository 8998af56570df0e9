"""The normalisation rule ``x / (s * sum(x))`` (relax.ir.ops.Normalize): its backward relaxation
and interval rule checked on sampled points (entries of mixed sign included), the graph fusion
of ``Div(x, ReduceSum(x))``, and its tightness against the product-of-reciprocal bounds it replaces."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import relax.ir.graph as graph_mod
from relax.bounds import bounds
from relax.ir.graph import build_graph
from relax.ir.ops import Normalize
from verify.spec import Box


def _boxes(g: torch.Generator, B: int, shape: tuple[int, ...], mixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``[B, *shape]`` whose groups (dim 1 of ``shape``) have a positive sum of lower ends."""
    c = torch.rand((B, *shape), generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.rand((B, *shape), generator=g, dtype=torch.float64) * (1.5 if mixed else 0.4)
    lo, hi = c - w, c + w
    if mixed:  # entry 0 of each group negative throughout, others may cross zero
        lo[:, :, 0], hi[:, :, 0] = -0.8, -0.2
    short = (0.3 - lo.sum(2, keepdim=True)).clamp_min(0)  # lift entry 1 until the group's lower sum is 0.3
    lo[:, :, 1:2] += short
    hi[:, :, 1:2] += short
    return lo, hi


def _points(lo: torch.Tensor, hi: torch.Tensor, g: torch.Generator, n: int) -> torch.Tensor:
    """``[n, B, *shape]``: uniform points and vertices of the boxes."""
    u = torch.rand((n, *lo.shape), generator=g, dtype=lo.dtype)
    u[: n // 2] = u[: n // 2].round()
    return lo + u * (hi - lo)


@pytest.mark.parametrize("keepdim", [True, False])
@pytest.mark.parametrize("mixed", [False, True], ids=["positive", "mixed_sign"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_normalize_relaxation_and_interval_hold_on_samples(keepdim, mixed, scale):
    """``A . w >= A_x . x + A_S . S + bias`` and ``w`` inside the interval rule's box at 20,000
    points (half of them vertices), for groups of 4 along dim 1 of ``[3, 4, 2]`` inputs."""
    g = torch.Generator().manual_seed(11 + int(keepdim) + 2 * int(mixed))
    shape, dims, B, R = (3, 4, 2), (1,), 2, 5
    op = Normalize(dims, keepdim, scale, shape)
    lx, ux = _boxes(g, B, shape, mixed)
    lS, uS = scale * lx.sum(2, keepdim=keepdim), scale * ux.sum(2, keepdim=keepdim)
    assert (lS > 0).all()
    A = torch.randn((R, B, *shape), generator=g, dtype=torch.float64)
    A[0, 0, 1] = 0.0  # a row that ignores one group
    (A_x, A_S), bias = op.backward_relaxed(A, op.relax_inputs([(lx, ux), (lS, uS)]))
    assert A_S.shape == (R, B, *lS.shape[1:]) and bias.shape == (R, B) and torch.isfinite(bias).all()
    x = _points(lx, ux, g, 20_000)
    S = scale * x.sum(3, keepdim=keepdim)
    w = op.forward(x.reshape(-1, *shape), S.reshape(-1, *S.shape[2:])).reshape(x.shape)
    lhs = torch.einsum("rbijk,nbijk->nrb", A, w)
    rhs = torch.einsum("rbijk,nbijk->nrb", A_x, x) + torch.einsum("rbij,nbij->nrb", A_S.reshape(R, B, 3, -1), S.reshape(*S.shape[:2], 3, -1)) + bias
    assert (lhs - rhs).min() >= -1e-12 * (1 + lhs.abs().max())
    lo, hi = op.interval((lx, ux), (lS, uS))
    assert (w >= lo - 1e-12).all() and (w <= hi + 1e-12).all()


def test_normalize_positive_box_bound_is_exact_at_the_least_ratio():
    """For ``x >= 0`` the bound's constant part is the least ratio ``c . x / sum(x)`` over the box
    (bisection of Dinkelbach's parametric problem): the bound touches the true minimum, found
    here over all 2^6 vertices."""
    g = torch.Generator().manual_seed(3)
    lx = torch.rand((1, 6), generator=g, dtype=torch.float64) + 0.5
    ux = lx + torch.rand((1, 6), generator=g, dtype=torch.float64)
    op = Normalize((0,), True, 1.0, (6,))
    c = torch.randn((1, 1, 6), generator=g, dtype=torch.float64)
    (A_x, _), bias = op.backward_relaxed(c, op.relax_inputs([(lx, ux), (lx.sum(1, keepdim=True), ux.sum(1, keepdim=True))]))
    v = torch.tensor([[int(b) for b in f"{k:06b}"] for k in range(64)], dtype=torch.float64)
    x = lx + v * (ux - lx)  # [64, 6]
    true = (x / x.sum(1, keepdim=True)) @ c[0, 0]
    bound = x @ A_x[0, 0] + bias[0, 0]
    assert (true - bound).min() >= -1e-12
    assert (true - bound).min() <= 1e-6 * (1 + true.abs().max())


def test_normalize_with_a_sum_that_may_vanish_gives_no_bound():
    """``S`` may be 0 in its box: every row that reads the group gets ``-inf``, the interval is
    unbounded (x / S has a pole there) -- never a finite, false bound."""
    op = Normalize((0,), True, 1.0, (3,))
    lx, ux = torch.tensor([[-1.0, -0.5, 0.2]]), torch.tensor([[1.0, 0.5, 0.4]])
    lS, uS = lx.sum(1, keepdim=True), ux.sum(1, keepdim=True)
    A = torch.tensor([[[1.0, 0.0, -2.0]], [[0.0, 0.0, 0.0]]])
    (A_x, _), bias = op.backward_relaxed(A, op.relax_inputs([(lx, ux), (lS, uS)]))
    assert bias[0, 0] == -math.inf and bias[1, 0] == 0.0 and (A_x == 0).all()
    lo, hi = op.interval((lx, ux), (lS, uS))
    assert (lo == -math.inf).all() and (hi == math.inf).all()


class _TwoAverages(nn.Module):
    """Difference of two weighted averages, each over cubes of a ReLU layer whose units move
    together (pensieve's parallel policies in small): ``v . p / sum(p) - v . q / sum(q)``. The
    averages hardly move while every weight does."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        with torch.no_grad():
            for lin in (self.a, self.b):
                shared = torch.randn(1, 4, generator=g)  # one direction for all six units, and a little of their own
                lin.weight.copy_(shared.expand(6, 4) + 0.01 * torch.randn(6, 4, generator=g))
                lin.bias.copy_(3.0 + 0.2 * torch.arange(6.0))
        self.register_buffer("v", torch.tensor([[10.0], [20.0], [40.0], [80.0], [160.0], [320.0]]))

    def forward(self, x):
        p = torch.relu(self.a(x[:, :4])) ** 3
        q = torch.relu(self.b(x[:, 4:])) ** 3
        return torch.matmul(p / p.sum(1, keepdim=True), self.v) - torch.matmul(q / q.sum(1, keepdim=True), self.v)


def test_fused_normalization_is_tighter_than_the_product_of_a_reciprocal(monkeypatch):
    """The graph holds one Normalize node per ``x / x.sum()``; its CROWN bounds are sound on
    10,000 samples and, at both ends, at most 0.7 times as far from them as the McCormick bounds
    of ``x * (1 / sum(x))`` (the graph built without the fusion; measured: 0.58 and 0.66)."""
    net = torch.fx.symbolic_trace(_TwoAverages().double().eval())
    assert sum(isinstance(n.op, Normalize) for n in build_graph(net, (8,), torch.float64).nodes) == 2
    x0 = torch.rand((1, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    S = Box(x0 - 0.02, x0 + 0.02)
    lo, hi = bounds(net, S, method="crown")
    with torch.no_grad():
        y = net(S.sample(10_000, generator=torch.Generator().manual_seed(4)).reshape(-1, 8))
    ymin, ymax = float(y.min()), float(y.max())
    assert float(lo) <= ymin and float(hi) >= ymax
    monkeypatch.setattr(graph_mod, "_fuse_normalizations", lambda nodes: nodes)
    plain = torch.fx.symbolic_trace(_TwoAverages().double().eval())  # a new module: not the cached graph
    lo_p, hi_p = bounds(plain, S, method="crown")
    assert float(lo_p) <= float(lo) and float(hi_p) >= float(hi)
    assert ymin - float(lo) <= 0.7 * (ymin - float(lo_p)) and float(hi) - ymax <= 0.7 * (float(hi_p) - ymax)


class _InputAverage(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("v", torch.tensor([[1.0], [2.0], [3.0]]))

    def forward(self, x):
        return torch.matmul(x / x.sum(1, keepdim=True), self.v)


def test_normalization_of_the_input_itself_is_fused_and_exact():
    """``x / x.sum()`` straight on the input: one Normalize node, and CROWN's bounds are the
    least and greatest ratio over the box's vertices (the ratio is linear-fractional)."""
    net = torch.fx.symbolic_trace(_InputAverage().double().eval())
    assert [type(n.op).__name__ for n in build_graph(net, (3,), torch.float64).nodes] == ["Reduce", "Normalize", "Linear"]
    lo = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    hi = lo + 0.5
    low, up = bounds(net, Box(lo, hi), method="crown")
    v = torch.tensor([[int(b) for b in f"{k:03b}"] for k in range(8)], dtype=torch.float64)
    with torch.no_grad():
        y = net(lo + v * (hi - lo))
    assert float(y.min()) - 1e-9 <= float(low) <= float(y.min()) and float(y.max()) <= float(up) <= float(y.max()) + 1e-9
