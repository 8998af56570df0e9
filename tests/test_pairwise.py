"""Softmax's pairwise score differences bounded from the scores' linear bounds
(:mod:`relax.bounds.pairwise`): sound (sampled, float32 and float64, batches of several
inputs, l_inf and l_2 sets) and at least as tight as the interval difference, strictly on
correlated scores."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relax.bounds import bounds, intermediate_bounds, prepare
from relax.bounds.crown import crown
from relax.bounds.pairwise import PairwiseRows
from test_bounds_soundness import _node_values
from verify.spec import LpBall


class Head(nn.Module):
    """One self-attention head on ``tokens`` tokens of width ``dim`` after a ReLU layer."""

    def __init__(self, tokens: int = 4, dim: int = 5):
        super().__init__()
        self.t, self.d = tokens, dim
        self.emb = nn.Linear(dim, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc = nn.Linear(tokens * dim, 3)

    def forward(self, x):
        z = torch.relu(self.emb(x.view(-1, self.t, self.d)))
        att = torch.softmax(torch.matmul(self.q(z), self.k(z).transpose(1, 2)), dim=-1)
        return self.fc(torch.matmul(att, self.v(z)).flatten(1))


def _diff_node(graph) -> str:
    names = [n.name for n in graph.nodes if getattr(n.op, "box_from_input", False)]
    assert len(names) == 1, names
    return names[0]


def _samples(input_set, k: int) -> torch.Tensor:
    """``k`` points of each ball of the batch, the corners of the l_inf box among them:
    ``[B * k, *shape]`` (batch element major)."""
    c, eps = input_set.center, input_set.eps.view(-1, *([1] * (input_set.center.dim() - 1)))
    B = c.shape[0]
    u = torch.rand(B, k, *c.shape[1:], dtype=c.dtype) * 2 - 1
    u[:, : k // 4] = u[:, : k // 4].sign()  # vertices: where the extremes of a linear form lie
    if input_set.p == 2:
        u = u / u.flatten(2).norm(dim=-1).clamp_min(1.0).view(B, k, *([1] * (c.dim() - 1)))
    return (c.unsqueeze(1) + eps.unsqueeze(1) * u).reshape(B * k, *c.shape[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [float("inf"), 2.0])
def test_softmax_differences_hold_and_are_tighter_than_intervals(dtype, p):
    torch.manual_seed(3)
    net = Head().to(dtype)
    B, eps = 3, 0.15 if p != 2 else 0.4
    center = torch.randn(B, 20, dtype=dtype)
    ball = LpBall(center, torch.full((B,), eps, dtype=dtype), p)
    graph, ball = prepare(net, ball, dtype)
    res = crown(graph, ball, None)
    name = _diff_node(graph)
    lo, hi = res.intermediate[name]
    scores = graph.by_name[name].inputs[0]
    s_lo, s_hi = res.intermediate[scores]
    # the interval difference of the scores' boxes, what the node had before
    W = graph.by_name[name].op.W.to(dtype)
    Wp, Wm = W.clamp(min=0), W.clamp(max=0)
    int_lo = s_lo @ Wp.t() + s_hi @ Wm.t()
    int_hi = s_hi @ Wp.t() + s_lo @ Wm.t()
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # the node's interval box is rounded outward
    assert (lo >= int_lo - tol).all() and (hi <= int_hi + tol).all()
    assert ((hi - lo).sum() < 0.9 * (int_hi - int_lo).sum()), "no tighter than the interval difference"
    x = _samples(ball, 2500)
    d = _node_values(graph, x)[name].view(B, 2500, *lo.shape[1:])
    assert (d >= lo.unsqueeze(1)).all() and (d <= hi.unsqueeze(1)).all()


def test_output_bounds_with_pairs_contain_samples_and_pgd_points():
    """The whole net's CROWN / alpha-CROWN bounds (which use the differences' boxes) contain
    its outputs at sampled points."""
    torch.manual_seed(5)
    net = Head(tokens=3, dim=4).double()
    ball = LpBall(torch.randn(2, 12, dtype=torch.float64), torch.full((2,), 0.2, dtype=torch.float64), float("inf"))
    x = _samples(ball, 4000)
    y = net(x).view(2, 4000, 3)
    for method in ("crown", "alpha-crown"):
        lo, hi = bounds(net, ball, method=method)
        assert (y >= lo.unsqueeze(1) - 1e-9).all() and (y <= hi.unsqueeze(1) + 1e-9).all(), method


def test_pairs_cut_by_a_deadline_leave_the_rest_unbounded():
    """A collector that met only some groups answers -inf / inf for the others (the caller
    then keeps their interval box)."""
    W = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    pr = PairwiseRows(W, None, (3, 2), 2, 2**18)
    ball = LpBall(torch.zeros(1, 4), torch.ones(1), float("inf"))
    A = torch.randn(2, 2, 4)  # one group of two entries
    pr.add(A, torch.zeros(2, 2), None, ball, False)
    lo, hi = pr.box(torch.float32, torch.device("cpu"))
    assert lo.shape == (2, 3, 2)
    assert torch.isfinite(lo.view(-1, 2)[0]).all() and torch.isinf(lo.view(-1, 2)[1:]).all()
    # the group's lower bound is min over the box of L_0 - U_1 (U_1 = -A[1, 1]) exactly
    expect = -(A[0, 0] + A[1, 1]).abs().sum()
    assert torch.allclose(lo.view(-1, 2)[0, 0], expect)


def test_only_the_differences_and_what_follows_them_change():
    """Every box before the differences equals that of a pass with the pairwise collector off;
    the differences' own box is tighter. (Boxes after them may move either way: CROWN's
    relaxations are not monotone in their input boxes.)"""
    torch.manual_seed(7)
    net = Head().double()
    ball = LpBall(torch.randn(2, 20, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64), float("inf"))
    with_pairs = intermediate_bounds(net, ball, "crown")
    import relax.bounds.crown as cr

    orig = cr._BoxPass._pairwise_consumer
    try:
        cr._BoxPass._pairwise_consumer = lambda self, p, B: (None, "")
        without = intermediate_bounds(net, ball, "crown")
    finally:
        cr._BoxPass._pairwise_consumer = orig
    graph, _ = prepare(net, ball, torch.float64)
    diff = _diff_node(graph)
    before = [k for k in with_pairs if diff not in graph.ancestors(k)]  # not computed from the differences
    assert before
    for k in before:
        assert torch.equal(with_pairs[k][0], without[k][0]) and torch.equal(with_pairs[k][1], without[k][1]), k
    (lo, hi), (lo0, hi0) = with_pairs[diff], without[diff]
    assert (lo >= lo0).all() and (hi <= hi0).all() and (hi - lo).sum() < 0.9 * (hi0 - lo0).sum()


def test_pair_rows_take_gathers_equal_to_the_dense_contraction():
    """Rows ``e_j - e_i`` are combined by two gathers; the result equals the dense contraction
    (which any other ``W`` takes), bounds and allowances alike."""
    torch.manual_seed(11)
    n = 4
    W = torch.zeros(n * (n - 1), n, dtype=torch.float64)
    k = 0
    for i in range(n):
        for j in range(n):
            if j != i:
                W[k, j], W[k, i] = 1.0, -1.0
                k += 1
    ball = LpBall(torch.randn(1, 6, dtype=torch.float64), torch.full((1,), 0.3, dtype=torch.float64), float("inf"))
    A = torch.randn(2, 3 * n, 6, dtype=torch.float64)  # three groups
    bias, err = torch.randn(2, 3 * n, dtype=torch.float64), torch.rand(2, 3 * n, dtype=torch.float64) * 1e-9
    fast, dense = PairwiseRows(W, None, (3, n), 1, 2**18), PairwiseRows(W, None, (3, n), 1, 2**18)
    assert fast._pairs is not None
    dense._pairs = None
    for pr in (fast, dense):
        pr.add(A, bias, err, ball, True)
    (lf, hf), (ld, hd) = fast.box(torch.float64, torch.device("cpu")), dense.box(torch.float64, torch.device("cpu"))
    assert torch.allclose(lf, ld, rtol=0, atol=1e-12) and torch.allclose(hf, hd, rtol=0, atol=1e-12)
    assert torch.isfinite(lf).all() and torch.isfinite(hf).all()
