"""The graph engine's CROWN, alpha-CROWN and beta-CROWN bounds on MLPs equal a dense textbook
implementation written here from the papers' formulas (float64).

Reference (Zhang et al. 2018, CROWN Thm. 3.2; Xu et al. 2021, alpha-CROWN Eq. 5; Wang et al. 2021,
beta-CROWN Eq. 6): for ``y = W_L a_L + b_L``, ``a_k = relu(z_k)``, ``z_{k+1} = W_k a_k + b_k``,
the lower bound of ``c^T y + sum_k extra_k^T z_k`` walks the layers backwards: at a ReLU with box
``[l, u]``, positive coefficients take the lower line (slope ``alpha`` or CROWN's ``1[u > -l]`` on
unstable neurons, 1 / 0 on active / dead ones), negative ones the upper line
``u (z - l) / (u - l)``; the result is concretised over the input box. Intermediate boxes: exact
interval bounds for the first layer, then per layer the interval box of the tightened boxes
before it, intersected with CROWN on its unstable neurons; the spec rows' value is the larger of
CROWN's and the interval bound. The engine must agree to round-off (it subtracts a rigorous
round-off allowance of ~1e-13 here), which pins its algorithm: a change of strategy, a sign error
in a relaxation or a lost Lagrangian term shows up as a difference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relax.bab.activation_split import relu_inputs
from relax.bounds import prepare
from relax.bounds.crown import crown
from verify.spec import Box

DT = torch.float64


def _net(widths: list[int], seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=DT) / a**0.5 * 1.4)
            lin.bias.copy_(torch.randn(b, generator=g, dtype=DT) * 0.3)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _weights(net: nn.Sequential) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lins = [m for m in net if isinstance(m, nn.Linear)]
    return [m.weight.detach() for m in lins], [m.bias.detach() for m in lins]


def ref_lower(Ws, bs, boxes, xl, xu, c, alphas=None, extra=None) -> torch.Tensor:
    """Lower bound of ``c . y + sum_k extra[k] . z_{k+1}`` over ``x in [xl, xu]`` (one input,
    ``c [n_out]``); ``boxes[k]`` the box of ``z_{k+1}`` (``k < L``), ``alphas[k]`` its lower
    slopes."""
    L = len(Ws) - 1
    A = c @ Ws[L]
    bias = c @ bs[L]
    for k in reversed(range(L)):
        l, u = boxes[k]
        unstable, active = (l < 0) & (u > 0), (l >= 0).to(DT)
        uw = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), active)
        ub = torch.where(unstable, -l * uw, torch.zeros_like(u))
        lw = torch.where(unstable, (u > -l).to(DT), active)
        if alphas is not None:
            lw = torch.where(unstable, alphas[k], lw)
        bias = bias + (A.clamp(max=0) * ub).sum()
        A = A * torch.where(A < 0, uw, lw)
        if extra is not None:
            A = A + extra[k]
        bias = bias + A @ bs[k]
        A = A @ Ws[k]
    m, r = (xu + xl) / 2, (xu - xl) / 2
    return A @ m - A.abs() @ r + bias


def _ibp(W, b, l, u, relu=True):
    if relu:
        l, u = l.clamp(min=0), u.clamp(min=0)
    m, r = (u + l) / 2, (u - l) / 2
    c, d = W @ m + b, W.abs() @ r
    return c - d, c + d


def ref_boxes(Ws, bs, xl, xu):
    """CROWN's pre-activation boxes as the engine builds them (see the module docstring)."""
    boxes = [_ibp(Ws[0], bs[0], xl, xu, relu=False)]
    for k in range(1, len(Ws) - 1):
        l, u = _ibp(Ws[k], bs[k], *boxes[-1])
        n = l.shape[0]
        for j in torch.nonzero((l < 0) & (u > 0)).flatten().tolist():
            e = torch.zeros(n, dtype=DT)
            e[j] = 1.0
            lo = ref_lower(Ws[:k + 1], bs[:k + 1], boxes, xl, xu, e)
            hi = -ref_lower(Ws[:k + 1], bs[:k + 1], boxes, xl, xu, -e)
            l[j], u[j] = torch.maximum(l[j], lo), torch.minimum(u[j], hi)
        boxes.append((l, u))
    return boxes


def _ibp_rows(Ws, bs, boxes, C):
    """Interval bound of ``C y``: interval boxes propagated layer by layer, each intersected with
    the given box of its layer (tighter than the last box alone when earlier boxes were split)."""
    l, u = boxes[0]
    for k in range(1, len(boxes)):
        pl, pu = _ibp(Ws[k], bs[k], l, u)
        l, u = torch.maximum(pl, boxes[k][0]), torch.minimum(pu, boxes[k][1])
    l, u = _ibp(Ws[-1], bs[-1], l, u)
    m, r = (u + l) / 2, (u - l) / 2
    return C @ m - C.abs() @ r


def _case(seed: int, widths=(6, 14, 14, 12, 4), eps=0.25):
    net = _net(list(widths), seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(widths[0], generator=g, dtype=DT)
    xl, xu = x - eps, x + eps
    C = torch.randn(3, widths[-1], generator=g, dtype=DT)
    graph, box = prepare(net, Box(xl.unsqueeze(0), xu.unsqueeze(0)), DT)
    pairs = relu_inputs(graph)  # [(relu node, pre-activation node)] in layer order
    assert len(pairs) == len(widths) - 2
    return net, xl, xu, C, graph, box, pairs, g


@pytest.mark.parametrize("seed", range(4))
def test_crown_equals_reference(seed):
    net, xl, xu, C, graph, box, pairs, _ = _case(seed)
    Ws, bs = _weights(net)
    boxes = ref_boxes(Ws, bs, xl, xu)
    res = crown(graph, box, C.unsqueeze(0))
    for k, (_, p) in enumerate(pairs):
        l, u = res.intermediate[p]
        assert torch.allclose(l[0], boxes[k][0], atol=1e-9) and torch.allclose(u[0], boxes[k][1], atol=1e-9), (seed, k)
    ref = torch.stack([ref_lower(Ws, bs, boxes, xl, xu, c) for c in C])
    ref = torch.maximum(ref, _ibp_rows(Ws, bs, boxes, C))
    assert torch.allclose(res.lower[0], ref, atol=1e-9), (res.lower[0], ref)
    assert (res.lower[0] <= ref).all()  # the round-off allowance only lowers


@pytest.mark.parametrize("seed", range(4))
def test_alpha_and_beta_equal_reference(seed):
    """Given slopes (alpha) and Lagrange multipliers of split constraints (beta), on boxes with
    splits applied: the bound of ``c^T y - sum beta_j s_j z_j`` the engine returns is the
    reference's."""
    net, xl, xu, C, graph, box, pairs, g = _case(seed)
    Ws, bs = _weights(net)
    boxes = ref_boxes(Ws, bs, xl, xu)
    split_boxes, extra_ref, extra = [], [], {}
    for k, (_, p) in enumerate(pairs):
        l, u = boxes[k][0].clone(), boxes[k][1].clone()
        s = torch.zeros_like(l)
        unstable = torch.nonzero((l < 0) & (u > 0)).flatten()
        for i, j in enumerate(unstable[:3].tolist()):  # split a few unstable neurons each way
            s[j] = 1.0 if i % 2 == 0 else -1.0
            if s[j] > 0:
                l[j] = 0.0
            else:
                u[j] = 0.0
        split_boxes.append((l, u))
        beta = torch.rand(C.shape[0], l.shape[0], generator=g, dtype=DT) * (s != 0)
        extra_ref.append(-beta * s)  # [N, n]
        extra[p] = (-beta * s).unsqueeze(1)  # [N, B=1, n]
    alphas = [torch.rand(C.shape[0], b[0].shape[0], generator=g, dtype=DT) for b in split_boxes]

    def alpha_fn(start, act, rows):
        assert start == "__out__"
        k = [r for r, _ in pairs].index(act)
        return alphas[k].unsqueeze(1)[rows]  # [N, 1, n]

    inter = {p: (split_boxes[k][0].unsqueeze(0), split_boxes[k][1].unsqueeze(0)) for k, (_, p) in enumerate(pairs)}
    res = crown(graph, box, C.unsqueeze(0), intermediate=inter, alpha_fn=alpha_fn, out_extra=extra)
    ref = torch.stack([ref_lower(Ws, bs, split_boxes, xl, xu, c, [a[i] for a in alphas], [e[i] for e in extra_ref])
                       for i, c in enumerate(C)])
    ref = torch.maximum(ref, _ibp_rows(Ws, bs, split_boxes, C))
    assert torch.allclose(res.lower[0], ref, atol=1e-9), (res.lower[0], ref)
    # without the multipliers the bound differs (the Lagrangian terms are used)
    plain = crown(graph, box, C.unsqueeze(0), intermediate=inter, alpha_fn=alpha_fn).lower[0]
    assert not torch.allclose(plain, res.lower[0], atol=1e-6)
