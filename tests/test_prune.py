"""Dead ReLUs pruned during bound propagation (``crown(prune=True)``, ``alpha_crown(prune=True)``,
and ``lower_bounds`` one input at a time) give the bounds of the unpruned graph.

A ReLU neuron whose box says ``u <= 0`` outputs an exact zero, so removing it changes no bound:
CROWN with and without pruning must agree in float64 to round-off, per input and as a batch
(pruning what is dead in every batch element); alpha-CROWN on the pruned graph must stay sound
(below every sampled value), never below CROWN, and optimise; ``lower_bounds`` one input at a
time (the CPU path for large dense nets) must equal the batched call, early stop included.
Non-prunable graphs (convolutions, BatchNorm between Linear and ReLU) must still be bounded.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import relax.bounds as rb
from relax.bounds.alpha import alpha_crown
from relax.bounds import bounds, lower_bounds, prepare
from relax.ir.prune import prunable_relus
from relax.bounds.crown import crown
from verify.spec import Box, LpBall


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


def mlp(widths: list[int], seed: int, *, norm=False, bn=False, out_relu=False, shape=None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    if norm:
        layers.append(Normalize(0.3, 0.7))
    if shape is not None:
        layers.append(nn.Flatten())
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a**0.5 * 1.5)
            lin.bias.copy_(torch.randn(b, generator=g) * 0.3)
        layers.append(lin)
        if i < len(widths) - 2:
            if bn:
                bnl = nn.BatchNorm1d(b)
                with torch.no_grad():
                    bnl.running_mean.copy_(torch.randn(b, generator=g) * 0.1)
                    bnl.running_var.copy_(torch.rand(b, generator=g) + 0.5)
                    bnl.weight.copy_(torch.rand(b, generator=g) + 0.5)
                layers.append(bnl)
            layers.append(nn.ReLU())
    if out_relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def input_sets(B: int, seed: int, shape):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *shape, generator=g, dtype=torch.float64)
    eps = torch.rand(B, generator=g, dtype=torch.float64) * 0.15 + 0.01  # a mix of easy and hard inputs
    yield "linf", LpBall(x, eps, float("inf"))
    yield "l2", LpBall(x, eps * 4, 2)
    yield "l1", LpBall(x, eps * 8, 1)
    lo = x - eps.view(-1, *[1] * (x.dim() - 1))
    yield "box", Box(lo, lo + 0.1)


NETS = {
    "plain": dict(widths=[12, 24, 24, 24, 5]),
    "norm+bn": dict(widths=[12, 20, 20, 4], norm=True, bn=True),
    "out-relu": dict(widths=[12, 16, 16, 6], out_relu=True),
    "image": dict(widths=[16, 20, 20, 3], norm=True, shape=(1, 4, 4)),
}


@pytest.mark.parametrize("name", NETS)
def test_pruned_crown_equals_unpruned(name):
    kw = dict(NETS[name])
    shape = kw.get("shape") or (kw["widths"][0],)
    net = mlp(kw.pop("widths"), seed=len(name), **kw).double()
    pruned_any = False
    for kind, s in input_sets(7, 1, shape):
        graph, s = prepare(net, s, torch.float64)
        K = graph.by_name[graph.output].shape[0]
        C = torch.randn(7, 4, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ref = crown(graph, s, C)
        batch = crown(graph, s, C, prune=True).lower
        assert torch.allclose(batch, ref.lower, atol=1e-9, rtol=1e-9), (name, kind, (batch - ref.lower).abs().max())
        for b in range(7):
            one = crown(graph, s.select([b]), C[b:b + 1], prune=True)
            assert torch.allclose(one.lower, ref.lower[b:b + 1], atol=1e-9, rtol=1e-9), (name, kind, b)
            for p, (l, h) in one.intermediate.items():  # boxes are returned at full size
                assert torch.allclose(l, ref.intermediate[p][0][b:b + 1], atol=1e-9) and torch.allclose(h, ref.intermediate[p][1][b:b + 1], atol=1e-9)
            pruned_any |= any(bool((h <= 0).any()) for p, (l, h) in one.intermediate.items() if p != graph.input_name)
    assert pruned_any, name  # the nets have dead neurons to prune


def test_prunable_relus():
    dense, _ = prepare(mlp([6, 8, 8, 3], seed=0), Box(torch.zeros(1, 6), torch.ones(1, 6)))
    assert len(prunable_relus(dense)) == 2
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    graph, _ = prepare(conv, Box(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)))
    assert prunable_relus(graph) == []


def test_pruned_alpha_crown_sound_and_not_looser():
    net = mlp([10, 32, 32, 32, 4], seed=5).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 10, generator=g, dtype=torch.float64)
    ball = LpBall(x, 0.08, float("inf"))
    graph, ball = prepare(net, ball, torch.float64)
    C = torch.randn(6, 3, 4, dtype=torch.float64, generator=g)
    base = crown(graph, ball, C).lower
    plain = alpha_crown(graph, ball, C, iterations=15).lower
    for b in range(6):  # one input at a time: its own dead neurons pruned
        opt = alpha_crown(graph, ball.select([b]), C[b:b + 1], iterations=15, prune=True).lower
        assert (opt >= base[b:b + 1] - 1e-12).all()
        # the same objective on the same function; Adam's path differs where bounds tie with the
        # CROWN boxes at the start (their subgradient depends on the last bit), so close, not equal
        assert (opt - plain[b:b + 1]).abs().max() < 0.02 * plain[b].abs().mean(), (b, opt, plain[b])
    assert (plain > base + 1e-6).any()  # the slopes were optimised
    pts = ball.sample(4000, generator=torch.Generator().manual_seed(1))  # [n, B, 10]
    with torch.no_grad():
        vals = torch.einsum("bnk,sbk->sbn", C, net(pts.reshape(-1, 10)).reshape(pts.shape[0], 6, 4))
    assert (plain <= vals.min(0).values + 1e-9).all()


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_one_at_a_time_equals_batch(method, monkeypatch):
    """lower_bounds goes one input at a time for large dense nets on the CPU; with early stop
    an input's bounds are frozen once proved, so both give each input's own result."""
    net = mlp([10, 24, 24, 3], seed=2).double()
    x = torch.rand(5, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ball = LpBall(x, 0.05, float("inf"))
    graph, b = prepare(net, ball, torch.float64)
    C = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not rb._one_at_a_time(graph, b)  # a small net: one batch
    full = lower_bounds(graph, b, C, method, iterations=10, early_stop=True)
    monkeypatch.setattr(rb, "PER_INPUT_MIN_WEIGHTS", 1)
    assert rb._one_at_a_time(graph, b)
    each = lower_bounds(graph, b, C, method, iterations=10, early_stop=True)
    tol = 1e-9 if method == "crown" else 0.02 * full.abs().mean()  # Adam: see above
    assert (full - each).abs().max() <= tol, (full - each).abs().max()
    lo, hi = bounds(net, ball, method=method)
    assert (lo <= hi).all()
