"""Forward linear bounds (:mod:`relax.bounds.forward`): every node's box encloses its values.

Each network of the soundness zoo (tests/test_bounds_soundness.py: every supported op) on a box:
10,000 sampled points and the box's corners evaluated node by node must lie inside the forward
boxes (float64: up to 1e-9; float32 boxes against float64 values). A network without
activations is bounded exactly; a float32 network whose coefficients cancel keeps its exact
minimum; and CROWN within forward boxes (``crown(..., forward=True)``) stays inside them and
encloses the samples.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from relax.bounds.crown import crown
from relax.bounds.forward import forward_bounds
from relax.bounds.interval import interval_bounds
from relax.bounds.roundoff import round_outward
from relax.ir.graph import build_graph
from test_bounds_soundness import NETS, _node_values
from verify.spec import Box, LpBall


def _points(lo: torch.Tensor, hi: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n + 64, *shape]``: uniform samples and random corners of the box ``lo, hi [1, *shape]``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, *lo.shape[1:], generator=g, dtype=lo.dtype)
    c = (torch.rand(64, *lo.shape[1:], generator=g) < 0.5).to(lo.dtype)
    return torch.cat([lo + (hi - lo) * u, lo + (hi - lo) * c])


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_boxes_enclose_every_nodes_values(name, dtype):
    gm, shape = NETS[name]
    graph = build_graph(gm, shape, dtype)
    exact = build_graph(gm, shape, torch.float64)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, *shape, generator=g, dtype=torch.float64)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.05).clamp(0, 1)
    boxes = forward_bounds(graph, round_outward(lo, dtype, down=True), round_outward(hi, dtype, down=False))
    vals = _node_values(exact, _points(lo, hi, 10_000, 1))
    tol = 1e-9 if dtype == torch.float64 else 0.0
    for p, v in vals.items():
        l, h = (t.double() for t in boxes[p])
        assert (v >= l - tol).all() and (v <= h + tol).all(), (name, p, float((l - v).max()), float((v - h).max()))


def test_forward_boxes_are_exact_on_an_affine_network():
    """Without activations the forms are the network itself: the box is its exact image
    (the corners' extremes), and tighter than the interval boxes of the same chain."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 12), nn.Linear(12, 3)).double().eval()
    graph = build_graph(torch.fx.symbolic_trace(net), (4,), torch.float64)
    lo, hi = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    corners = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.float64)
    with torch.no_grad():
        y = net(corners)
    l, h = forward_bounds(graph, lo, hi)[graph.output]
    torch.testing.assert_close(l[0], y.min(0).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(h[0], y.max(0).values, rtol=0, atol=1e-12)
    il, ih = interval_bounds(graph, lo, hi)[graph.output]
    assert ((ih - il) > (h - l) + 1e-6).all()


def test_forward_boxes_keep_the_exact_minimum_of_cancelling_float32_coefficients():
    """``a . relu(W0 x + 40)`` with pairs of ``a`` cancelling (1e8 terms, 1e2 result,
    tests/test_float_soundness.py): the float32 forms' round-off allowance keeps the exact
    minimum inside the output box. (With no widening at all this fails; with the steps' allowances
    alone dropped it holds: the outward rounding of the first layer's constants, amplified by the
    1e8 weights, then covers the last step.)"""
    from test_float_soundness import _cancelling_hidden_net

    for seed in range(10):
        gm, ball, exact = _cancelling_hidden_net(seed)
        graph = build_graph(gm, (2,), torch.float32)
        lo, hi = ball.bounds()
        l, _ = forward_bounds(graph, lo, hi)[graph.output]
        assert float(l) <= exact, (seed, float(l), exact)


@pytest.mark.parametrize("name", ["mlp", "residual", "sigmoid_tanh", "smooth"])
def test_crown_within_forward_boxes_is_sound(name, monkeypatch):
    """``crown(..., forward=True)`` (the size rules lifted so that these small nets use it): every
    pre-activation box lies inside its forward box, and the spec rows' bounds hold on samples.
    (Tighter than plain CROWN is *not* guaranteed: CROWN's adaptive ReLU lower slopes depend on
    the boxes.)"""
    import relax.bounds.forward as fwd_mod

    monkeypatch.setattr(fwd_mod, "MIN_WIDTH_PER_COLUMN", 0)
    monkeypatch.setattr(fwd_mod, "MAX_INPUTS", 64)  # the residual net has 50 inputs
    gm, shape = NETS[name]
    graph = build_graph(gm, shape, torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    S = Box((x - 0.1).clamp(0, 1), (x + 0.05).clamp(0, 1))
    K = math.prod(graph.shape(graph.output))
    C = torch.randn(2, 3, K, generator=g, dtype=torch.float64)
    res = crown(graph, S, C, forward=True)
    fwd = fwd_mod.forward_boxes(graph, *S.bounds())
    assert fwd is not None
    for p, (l, h) in res.intermediate.items():
        if p in fwd and p != graph.input_name:
            assert (l >= fwd[p][0]).all() and (h <= fwd[p][1]).all(), p
    for b in range(2):
        pts = _points(S.lo[b:b + 1], S.hi[b:b + 1], 5_000, 11 + b)
        y = _node_values(graph, pts)[graph.output].reshape(pts.shape[0], -1)
        assert ((y @ C[b].t()) >= res.spec_lower()[b] - 1e-9).all()


def test_forward_boxes_only_for_few_inputs_and_wide_layers():
    """The size rule: an ACAS-Xu-sized MLP (5 inputs, 50-neuron layers) keeps plain CROWN; the
    same inputs before a 2,000-neuron layer get forward boxes; 40 free inputs never do, 40 inputs
    of which the box fixes 35 do."""
    from relax.bounds.forward import forward_boxes

    def boxes(n_in: int, width: int, free: int | None = None):
        net = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, 3)).double().eval()
        graph = build_graph(torch.fx.symbolic_trace(net), (n_in,), torch.float64)
        lo = torch.zeros(1, n_in, dtype=torch.float64)
        hi = lo + 0.1
        if free is not None:  # the box fixes the other inputs
            hi[:, free:] = lo[:, free:]
        return forward_boxes(graph, lo, hi)

    assert boxes(5, 50) is None
    assert boxes(5, 2000) is not None
    assert boxes(40, 20000) is None
    assert boxes(40, 2000, free=5) is not None  # the rule counts the free inputs


def test_forward_boxes_serve_a_ball_by_its_bounding_box(monkeypatch):
    import relax.bounds.forward as fwd_mod

    monkeypatch.setattr(fwd_mod, "MIN_WIDTH_PER_COLUMN", 0)
    gm, shape = NETS["mlp"]
    graph = build_graph(gm, shape, torch.float64)
    x = torch.full((1, *shape), 0.5, dtype=torch.float64)
    ball = LpBall(x, 0.3, 2.0, 0.0, 1.0)
    C = torch.eye(4, dtype=torch.float64).unsqueeze(0)
    low = crown(graph, ball, C, forward=True).spec_lower()
    pts = ball.sample(5_000, generator=torch.Generator().manual_seed(2)).reshape(-1, *shape)
    y = _node_values(graph, pts)[graph.output]
    assert (y >= low - 1e-9).all()


@pytest.mark.parametrize("method", ["crown", "deeppoly", "alpha-crown"])
def test_bound_methods_with_the_forward_option_are_sound_and_use_the_forward_boxes(method, monkeypatch):
    """``forward=True`` of the registered methods: on a network the size rule admits (5 inputs,
    a 1,600-neuron layer) the forward boxes are computed and the rows' bounds hold on 10,000
    samples and 64 corners of the box; without the option they are not computed."""
    import relax.bounds.crown as crown_mod
    from verify.registry import get_method
    from verify.spec import LinearSpec

    calls = []
    real = crown_mod.forward_boxes
    monkeypatch.setattr(crown_mod, "forward_boxes", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(5, 1600), nn.ReLU(), nn.Linear(1600, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    x = torch.rand(2, 5)
    S = Box(x - 0.05, x + 0.05)
    C = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]]).expand(2, -1, -1)
    spec = LinearSpec(C, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    low = get_method(method, forward=True).lower_bounds(net, S, spec).double()
    assert calls, "the forward boxes were not computed"
    net64 = copy.deepcopy(net).double()
    for b in range(2):
        pts = _points(S.lo[b:b + 1].double(), S.hi[b:b + 1].double(), 10_000, 4 + b)
        with torch.no_grad():
            vals = net64(pts) @ C[b].double().t()
        assert (vals >= low[b] - 1e-6).all()
    del calls[:]
    get_method(method).lower_bounds(net, S, spec)
    assert not calls
