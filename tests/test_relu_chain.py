"""The pruned ReLU-chain engine (relax.relu_chain) against the general graph engine.

CROWN on a chain must equal the graph's CROWN (same strategy, only stable neurons dropped) in
float64, per input and as a padded batch (the code path used on GPUs); alpha-CROWN must be
sound (below every sampled value), never looser than CROWN, and it optimises (better than
CROWN somewhere). Chains are recognised with their normalisation prefix, a BatchNorm after a
Linear and a ReLU on the output; anything else is left to the graph engine.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relax.alpha import alpha_crown
from relax.bounds import bounds, prepare
from relax.linear import crown
from relax.relu_chain import chain_alpha_crown, chain_crown, chain_of
from verify.spec import Box, LpBall

torch.set_default_dtype(torch.float32)


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


def input_sets(n_in: int, B: int, seed: int, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *(shape or (n_in,)), generator=g, dtype=torch.float64)
    eps = torch.rand(B, generator=g, dtype=torch.float64) * 0.15 + 0.01  # a mix of easy and hard inputs
    yield "linf", LpBall(x, eps, float("inf"))
    yield "l2", LpBall(x, eps * 4, 2)
    lo = x - eps.view(-1, *[1] * (x.dim() - 1))
    yield "box", Box(lo, lo + 0.1)


NETS = {
    "plain": dict(widths=[12, 24, 24, 24, 5]),
    "norm+bn": dict(widths=[12, 20, 20, 4], norm=True, bn=True),
    "out-relu": dict(widths=[12, 16, 16, 6], out_relu=True),
    "image": dict(widths=[16, 20, 20, 3], norm=True, shape=(1, 4, 4)),
}


@pytest.mark.parametrize("name", NETS)
def test_crown_equals_graph_engine(name):
    kw = dict(NETS[name])
    shape = kw.get("shape")
    net = mlp(kw.pop("widths"), seed=len(name), **kw).double()
    for kind, s in input_sets(net[1 if kw.get("norm") else 0].in_features if not shape else 16, 7, 1, shape):
        graph, s = prepare(net, s, torch.float64)
        chain = chain_of(graph)
        assert chain is not None, name
        K = graph.by_name[graph.output].shape[0]
        C = torch.randn(7, 4, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ref = crown(graph, s, C).lower
        one_by_one = chain_crown(chain, s, C, per_input=True)
        padded = chain_crown(chain, s, C, per_input=False)
        assert torch.allclose(one_by_one, ref, atol=1e-9, rtol=1e-9), (name, kind, (one_by_one - ref).abs().max())
        assert torch.allclose(padded, ref, atol=1e-9, rtol=1e-9), (name, kind, (padded - ref).abs().max())


def test_not_a_chain_goes_to_the_graph_engine():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    sig = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).eval()
    two = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 2)).eval()
    for net, shape in ((conv, (1, 4, 4)), (sig, (4,)), (two, (4,))):
        graph, _ = prepare(net, Box(torch.zeros(1, *shape), torch.ones(1, *shape)))
        assert chain_of(graph) is None


@pytest.mark.parametrize("per_input", [True, False])
def test_alpha_crown_sound_and_not_looser(per_input):
    net = mlp([10, 32, 32, 32, 4], seed=5).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 10, generator=g, dtype=torch.float64)
    ball = LpBall(x, 0.08, float("inf"))
    graph, ball = prepare(net, ball, torch.float64)
    chain = chain_of(graph)
    C = torch.randn(6, 3, 4, dtype=torch.float64, generator=g)
    base = chain_crown(chain, ball, C)
    opt = chain_alpha_crown(chain, ball, C, iterations=15, per_input=per_input)
    assert (opt >= base - 1e-12).all()
    assert (opt > base + 1e-6).any()  # the slopes were optimised
    pts = ball.sample(4000, generator=torch.Generator().manual_seed(1))  # [n, B, 10]
    with torch.no_grad():
        vals = torch.einsum("bnk,sbk->sbn", C, net(pts.reshape(-1, 10)).reshape(pts.shape[0], 6, 4))
    assert (opt <= vals.min(0).values + 1e-9).all()
    # the graph engine's alpha-CROWN optimises the same objective: comparable, not identical
    ref = alpha_crown(graph, ball, C, iterations=15).lower
    assert (opt - ref).mean().abs() < 0.05 * ref.abs().mean()


def test_public_api_uses_the_chain_and_early_stop_matches_batch():
    """bounds() goes through the chain engine for MLPs; early stop freezes an input's bounds,
    so a batch gives each input's one-by-one result."""
    from relax.bounds import lower_bounds

    net = mlp([10, 24, 24, 3], seed=2)
    x = torch.rand(5, 10, generator=torch.Generator().manual_seed(4))
    ball = LpBall(x, 0.05, float("inf"))
    lo, hi = bounds(net, ball, method="crown")
    graph, b = prepare(net, ball)
    # float32: both engines subtract a worst-case round-off allowance, computed per engine
    # (relax.roundoff), so they agree to that allowance here, not to the round-off itself
    assert torch.allclose(lo, crown(graph, b, torch.eye(3).expand(5, 3, 3)).lower, atol=1e-3)
    C = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    full = lower_bounds(graph, b, C, "alpha-crown", iterations=10, early_stop=True)
    each = torch.cat([lower_bounds(graph, b.select([i]), C[i : i + 1], "alpha-crown", iterations=10, early_stop=True) for i in range(5)])
    assert torch.allclose(full, each, atol=1e-3)  # float32: padding changes round-off, and Adam amplifies it a little
