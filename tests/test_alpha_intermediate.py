"""alpha-CROWN's optimisation of intermediate bounds on sigmoid / tanh networks.

Two faults made the optimised intermediate boxes of a 6x200 sigmoid MLP (VNN-COMP 2021 eran)
identical to CROWN's: the slopes moved in steps of ``f'(0)`` (far too large for saturated
neurons), and the optimised bound was intersected with CROWN's by ``max`` / ``min``, so a
neuron whose bound got looser after a step passed no gradient any more. These tests fail on
either fault and check that the optimised bounds stay sound (samples inside them).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relax.bounds.alpha import alpha_crown
from relax.bounds import prepare
from relax.bounds.crown import crown, intersect_keeping_gradient
from verify.spec import Box


def _net(act: type[nn.Module], seed: int, widths=(12, 40, 40, 40, 5), scale: float = 2.5) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.mul_(scale)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("act,seed", [(nn.Sigmoid, 0), (nn.Sigmoid, 1), (nn.Tanh, 2)])
def test_alpha_tightens_intermediate_boxes_and_stays_sound(act, seed):
    net = _net(act, seed)
    x0 = torch.rand(1, 12, dtype=torch.float64)
    box = Box(x0 - 0.3, x0 + 0.3)
    C = torch.eye(5, dtype=torch.float64).unsqueeze(0)
    graph, xs = prepare(net, box, torch.float64)
    ref = crown(graph, xs, C, "crown")
    res = alpha_crown(graph, xs, C, iterations=20)
    names = list(ref.intermediate)
    last = names[-1]
    w_crown = (ref.intermediate[last][1] - ref.intermediate[last][0]).sum()
    w_alpha = (res.intermediate[last][1] - res.intermediate[last][0]).sum()
    assert w_alpha < 0.97 * w_crown, (float(w_alpha), float(w_crown))  # identical before the fix
    assert bool((res.lower >= ref.lower - 1e-9).all())
    assert float((res.lower - ref.lower).sum()) > 0.01 * float(ref.lower.abs().sum())
    # sound: 10,000 samples inside every box and above every lower bound
    xs_s = box.lo + (box.hi - box.lo) * torch.rand(10_000, 12, dtype=torch.float64)
    with torch.no_grad():
        y = net(xs_s)
        assert bool((y >= res.lower[0] - 1e-9).all())
        h = xs_s
        pre = [m for m in net if isinstance(m, nn.Linear)]
        for i, lin in enumerate(pre[:-1]):
            z = lin(h)
            if i > 0:  # the first pre-activation's box is the exact interval one
                lo, hi = res.intermediate[names[i]]
                assert bool((z >= lo.reshape(1, -1) - 1e-9).all() and (z <= hi.reshape(1, -1) + 1e-9).all())
            h = act()(z)


def test_intersection_value_is_exact_and_gradient_goes_through():
    lo = torch.tensor([-1e10, 0.1, -float("inf"), 2.0], dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([1e10, 0.5, float("inf"), 3.0], dtype=torch.float64, requires_grad=True)
    lo_k = torch.tensor([0.3, 0.0, 1.0, -float("inf")], dtype=torch.float64)
    hi_k = torch.tensor([0.7, 1.0, 2.0, float("inf")], dtype=torch.float64)
    l, h = intersect_keeping_gradient(lo, hi, lo_k, hi_k)
    # the value is exactly the intersection (no rounding of 1e10 + 0.3 - 1e10)
    assert l.tolist() == [0.3, 0.1, 1.0, 2.0] and h.tolist() == [0.7, 0.5, 2.0, 3.0]
    (l.sum() + h.sum()).backward()
    assert lo.grad.tolist() == [1.0, 1.0, 0.0, 1.0] and hi.grad.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_stall_stops_a_long_run_once_the_bound_stops_improving():
    net = _net(nn.Sigmoid, 3, widths=(6, 10, 10, 3), scale=1.0)
    x0 = torch.rand(1, 6, dtype=torch.float64)
    box = Box(x0 - 0.05, x0 + 0.05)
    C = -torch.eye(3, dtype=torch.float64).unsqueeze(0)  # rows -y: negative bounds, a shortfall to shrink
    graph, xs = prepare(net, box, torch.float64)
    full = alpha_crown(graph, xs, C, iterations=150)
    short = alpha_crown(graph, xs, C, iterations=150, stall=(10, 0.01))
    assert 10 < short.iterations < full.iterations == 150
    # what the early stop leaves out is less than the tolerance allows per window, a few times over
    gap = float((full.lower - short.lower).sum())
    assert 0 <= gap <= 0.05 * float(full.lower.clamp(max=0).abs().sum())
