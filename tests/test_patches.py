"""Patch-shaped coefficients for convolutional layers (:mod:`relax.bounds.patches`).

The patch pass must give CROWN's dense bounds (the same terms, only the zeros skipped): equal
in float64 up to summation order on a network with every supported op (padding, two
convolutions in a row, stride 2, average pooling, dilation, groups, BatchNorm, a residual add, ReLU and sigmoid), for a batch of
one and a virtual batch of several inputs; its boxes must enclose 10,000 samples and the corners
of the box in float32 too; and the plan falls back to dense rows wherever it does not apply.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relax.bounds.crown as crown_mod
import relax.bounds.patches as patches
from relax.bounds.crown import crown
from relax.ir.graph import build_graph
from test_bounds_soundness import _node_values
from verify.spec import Box, LpBall


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c5, self.bn, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.c3 = nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c4, self.cg = nn.Conv2d(16, 16, 5, padding=2), nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        h = torch.relu(self.c2(torch.relu(self.bn(self.c5(self.c1(h))))) - h)  # conv -> conv: biases on the padding
        h = torch.relu(self.c3(self.pool(h)))
        h = torch.relu(self.cg(torch.sigmoid(self.c4(h))))
        return self.fc(h.flatten(1))


def _net(seed: int) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    net = _ResNet().eval()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    return torch.fx.symbolic_trace(net)


class _UNetLike(nn.Module):
    """A channel slice of the input, a node ``[1, C, H, W]`` between reshapes, a channel gather
    and a concatenation along channels (as in carvana's UNets and many exported nets), and an
    softmax over the channels after a transpose to channels-last (its scores' rows start at the
    convolution's output; its differences are bounded from the scores' linear bounds)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.c, self.fc = nn.Conv2d(8, 5, 3, padding=1), nn.Linear(5 * 10 * 10, 3)

    def forward(self, x):
        h = torch.relu(self.a(x[:, :3]))
        g = torch.relu(self.b(h).unsqueeze(1)).squeeze(1)
        z = self.c(torch.cat([g, h[:, [4, 1, 4]], x[:, 3:]], 1)).permute(0, 2, 3, 1)  # channels last
        return self.fc(torch.softmax(z, -1).flatten(1))


def _both(graph, S, C, monkeypatch):
    """CROWN's result with patches forced on every conv-chain node, and with dense rows only."""
    used = []
    real = patches.patch_plan

    def spy(*a, **k):
        plan = real(*a, **k)
        used.append(plan is not None)
        return plan

    monkeypatch.setattr(patches, "MAX_PATCH_SHARE", math.inf)
    monkeypatch.setattr(crown_mod, "patch_plan", spy)
    with_patches = crown(graph, S, C)
    monkeypatch.setattr(crown_mod, "patch_plan", lambda *a, **k: None)
    dense = crown(graph, S, C)
    return with_patches, dense, used


@pytest.mark.parametrize("batch", [1, 3])
def test_patch_bounds_equal_the_dense_pass_in_float64(batch, monkeypatch):
    graph = build_graph(_net(0), (3, 16, 16), torch.float64)
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, 16, 16, generator=g, dtype=torch.float64)
    S = Box(x - 0.03, x + 0.03)
    C = torch.randn(batch, 4, 5, generator=g, dtype=torch.float64)
    got, ref, used = _both(graph, S, C, monkeypatch)
    assert sum(used) >= 4  # the conv-chain nodes by patches
    for p, (l0, h0) in ref.intermediate.items():
        l1, h1 = got.intermediate[p]
        scale = 1e-12 * (1 + float((h0 - l0).abs().max()))
        assert (l1 - l0).abs().max() <= scale and (h1 - h0).abs().max() <= scale, p
    assert torch.allclose(got.spec_lower(), ref.spec_lower(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_selections_and_reshapes_keep_the_dense_bounds(dtype, monkeypatch):
    torch.manual_seed(3)
    gm = torch.fx.symbolic_trace(_UNetLike())
    graph, exact = build_graph(gm, (4, 10, 10), dtype), build_graph(gm, (4, 10, 10), torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 4, 10, 10, generator=g, dtype=torch.float64)
    lo, hi = x - 0.05, x + 0.05
    C = torch.randn(2, 3, 3, generator=g, dtype=dtype)
    moved = []
    real = crown_mod._moved_source
    monkeypatch.setattr(crown_mod, "_moved_source", lambda g, node: (r := real(g, node))[0] != node and moved.append(node) or r)
    paired, cut = [], []
    real_rows, real_cut = crown_mod.patch_input_rows, crown_mod._RowPass._through_cut
    monkeypatch.setattr(crown_mod, "patch_input_rows", lambda *a: paired.append(1) or real_rows(*a))
    monkeypatch.setattr(crown_mod._RowPass, "_through_cut", lambda rp, *a: (r := real_cut(rp, *a)) is not None and cut.append(rp.node) or r)
    got, ref, used = _both(graph, Box(lo.to(dtype), hi.to(dtype)), C, monkeypatch)
    assert sum(used) >= 3  # the convolutions' pre-activation nodes through the selections by patches
    assert set(moved) == {"unsqueeze", "permute"} and paired  # ReLU and softmax inputs: rows from the convolutions
    assert cut  # the softmax's inner nodes: dense down to the convolution, then patches
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for p, (l0, h0) in ref.intermediate.items():
        l1, h1 = got.intermediate[p]
        scale = tol * (1 + float((h0 - l0).abs().max()))
        assert (l1 - l0).abs().max() <= scale and (h1 - h0).abs().max() <= scale, p
    u = torch.rand(5_000, 1, 4, 10, 10, generator=g, dtype=torch.float64)
    samples = (lo + (hi - lo) * u).reshape(-1, 4, 10, 10)  # 5,000 per input, in turn
    vals = _node_values(exact, samples)
    for p, (l, h) in got.intermediate.items():
        v = vals[p].reshape(5_000, 2, *vals[p].shape[1:])
        assert (v >= l.double()).all() and (v <= h.double()).all(), p


def test_patch_bounds_keep_the_dense_round_off_allowance_in_float32(monkeypatch):
    """In float32 the round-off allowance (about ``gamma_n`` times the terms) is far larger than
    the summation-order differences of the two passes: equal to 1e-5 of the widths, so a patch
    pass that dropped a step's allowance would differ."""
    graph = build_graph(_net(2), (3, 16, 16), torch.float32)
    g = torch.Generator().manual_seed(9)
    x = torch.rand(2, 3, 16, 16, generator=g)
    got, ref, used = _both(graph, Box(x - 0.03, x + 0.03), torch.randn(2, 4, 5, generator=g), monkeypatch)
    assert sum(used) >= 4
    for p, (l0, h0) in ref.intermediate.items():
        l1, h1 = got.intermediate[p]
        tol = 1e-5 * float((h0 - l0).abs().max())
        assert (l1 - l0).abs().max() <= tol and (h1 - h0).abs().max() <= tol, p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patch_boxes_enclose_samples_and_corners(dtype, monkeypatch):
    gm = _net(1)
    graph, exact = build_graph(gm, (3, 16, 16), dtype), build_graph(gm, (3, 16, 16), torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    lo, hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    monkeypatch.setattr(patches, "MAX_PATCH_SHARE", math.inf)
    res = crown(graph, Box(lo.to(dtype), hi.to(dtype)), torch.eye(5, dtype=dtype).unsqueeze(0))
    u = torch.rand(10_000, 3, 16, 16, generator=g, dtype=torch.float64)
    corners = (torch.rand(64, 3, 16, 16, generator=g) < 0.5).double()
    vals = _node_values(exact, torch.cat([lo + (hi - lo) * u, lo + (hi - lo) * corners]))
    for p, (l, h) in res.intermediate.items():
        v = vals[p]
        assert (v >= l.double()).all() and (v <= h.double()).all(), p
    assert (vals[graph.output] >= res.spec_lower().double()).all()


def test_patch_plan_falls_back_where_it_does_not_apply():
    graph = build_graph(_net(0), (3, 16, 16), torch.float64)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    box = Box(x - 0.1, x + 0.1)
    add = next(n.name for n in graph.nodes if n.op.kind == "add")
    assert patches.patch_plan(graph, add, box) is not None
    assert patches.patch_plan(graph, add, LpBall(x, 0.5, 2.0, 0.0, 1.0)) is None  # l_2: the dense concretisation
    assert patches.patch_plan(graph, "fc", box) is None  # a flat node
    pooled = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)))
    pg = build_graph(pooled, (3, 16, 16), torch.float64)
    last = pg.nodes[-1].name
    assert patches.patch_plan(pg, last, box) is None  # max pooling: no patch rule
    rows = torch.fx.symbolic_trace(_Rows())
    rg = build_graph(rows, (3, 16, 16), torch.float64)
    assert rg.nodes[0].op.kind == "select"
    assert patches.patch_plan(rg, "c", box) is None  # selections that move rows move the windows: no rule


class _Rows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c(x[:, :, list(range(15, -1, -1))]))  # the same shape, rows reversed


def test_dense_rows_where_patches_reach_but_cost_more(monkeypatch):
    """A node the patch rules reach but whose patches are not below MAX_PATCH_SHARE keeps its dense
    rows: no search for a cut below it (that would bypass the share)."""
    graph = build_graph(_net(0), (3, 16, 16), torch.float64)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    box = Box(x - 0.03, x + 0.03)
    searched = []
    real = crown_mod._patch_cut
    monkeypatch.setattr(crown_mod, "_patch_cut", lambda g, node, s: searched.append(node) or real(g, node, s))
    monkeypatch.setattr(patches, "MAX_PATCH_SHARE", 1e-9)  # every plan too large
    crown(graph, box, torch.randn(1, 4, 5, dtype=torch.float64))
    assert all(patches.patch_plan(graph, n, box, max_share=math.inf) is None for n in searched)


class _ReluConvNet(nn.Module):
    """Convolutions, a residual add and ReLUs only: every pre-activation's rows can carry
    alpha-CROWN's slopes as patches."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        h = torch.relu(self.c1(h) + h)
        return self.fc(torch.relu(self.c2(h)).flatten(1))


def _slopes_pass(graph, S, C, seed):
    """One alpha-CROWN pass (intermediate rows and spec rows) with random slopes in [0, 1]: the
    spec bounds, the boxes and the gradient of their sum with respect to every slope."""
    from relax.bounds.alpha import _intermediate_rows, _slope_lookup, _start_slopes

    init = crown(graph, S, C)
    relus = [n.name for n in graph.activations() if n.op.optimisable]
    plan = _intermediate_rows(graph, S, dict(init.intermediate))
    alphas = _start_slopes(graph, init, relus, plan, C.shape[1], 2**25)
    g = torch.Generator().manual_seed(seed)
    params = [a for per in alphas.values() for a in per.values()]
    with torch.no_grad():
        for a in params:
            a.copy_(torch.rand(a.shape, generator=g, dtype=a.dtype))
    with torch.enable_grad():
        res = crown(graph, S, C, alpha_fn=_slope_lookup(alphas), rows=plan)
        total = res.spec_lower().sum() + sum((h - l).sum() for l, h in res.intermediate.values())
        grads = torch.autograd.grad(total, params, allow_unused=True)
    res.intermediate = {p: (l.detach(), h.detach()) for p, (l, h) in res.intermediate.items()}
    return res, [torch.zeros_like(a) if d is None else d for a, d in zip(params, grads)]


@pytest.mark.parametrize("net", ["relu", "sigmoid"])
def test_alpha_crown_rows_as_patches_keep_the_dense_bounds(net, monkeypatch):
    """alpha-CROWN's intermediate rows carry per-row slopes; with patches each row's slopes are
    gathered into its window. For the same slopes a pass gives the dense pass's bounds and the
    same gradients (float64); the sigmoid net's later rows (slopes the patch step cannot gather)
    stay dense. alpha-CROWN itself then keeps every sample inside its boxes."""
    from relax.bounds.alpha import alpha_crown

    torch.manual_seed(11)
    gm = torch.fx.symbolic_trace(_ReluConvNet()) if net == "relu" else _net(4)
    shape = (3, 10, 10) if net == "relu" else (3, 16, 16)
    graph, exact = build_graph(gm, shape, torch.float64), build_graph(gm, shape, torch.float64)
    g = torch.Generator().manual_seed(12)
    x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    lo, hi = x - 0.04, x + 0.04
    C = torch.randn(2, 3, 4 if net == "relu" else 5, generator=g, dtype=torch.float64)
    with_alpha = []
    real = patches._step
    monkeypatch.setattr(patches, "_step", lambda *a: (with_alpha.append(a[-1] is not None), real(*a))[1])
    monkeypatch.setattr(patches, "MAX_PATCH_SHARE", math.inf)
    got, got_grads = _slopes_pass(graph, Box(lo, hi), C, 13)
    assert any(with_alpha)  # rows with their own slopes went through the patch pass
    fitted = alpha_crown(graph, Box(lo, hi), C, iterations=2)  # each step a pass with per-row slopes in patches
    monkeypatch.setattr(crown_mod, "patch_plan", lambda *a, **k: None)
    ref, ref_grads = _slopes_pass(graph, Box(lo, hi), C, 13)
    assert torch.allclose(got.spec_lower(), ref.spec_lower(), rtol=0, atol=1e-12)
    for p, (l0, h0) in ref.intermediate.items():
        l1, h1 = got.intermediate[p]
        tol = 1e-12 * (1 + float((h0 - l0).abs().max()))
        assert (l1 - l0).abs().max() <= tol and (h1 - h0).abs().max() <= tol, p
    assert any(float(d.abs().max()) > 0 for d in ref_grads)
    for d1, d0 in zip(got_grads, ref_grads):
        assert float((d1 - d0).abs().max()) <= 1e-10 * (1 + float(d0.abs().max()))  # summation order only
    u = torch.rand(5_000, 1, *shape, generator=g, dtype=torch.float64)
    vals = _node_values(exact, (lo + (hi - lo) * u).reshape(-1, *shape))
    for p, (l, h) in fitted.intermediate.items():
        v = vals[p].reshape(5_000, 2, *vals[p].shape[1:])
        assert (v >= l).all() and (v <= h).all(), p
    spec = torch.einsum("sbk,bnk->sbn", vals[graph.output].reshape(5_000, 2, -1), C)
    assert (spec >= fitted.lower - 1e-12).all()


class _UpNet(nn.Module):
    """A UNet's up path: average pooling, a transposed convolution (the variants of ``up``:
    stride 2 with kernel 1 (holes), 2, 3 and 4, padding, output padding, groups), a spatial
    padding or crop back to the skip's size (constants 0 or not), a concatenation with the skip,
    and a convolution; ``nested``: two transposed convolutions in a row (4 x 4 phases);
    ``softmax``: a softmax over the last convolution's channels (its rows go to the pairwise
    differences as dense input forms, phase by phase)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.a, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        up = {"k2": dict(kernel_size=2, stride=2), "k3": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
              "k4": dict(kernel_size=4, stride=2, padding=1, groups=2), "k1": dict(kernel_size=1, stride=2),
              "crop": dict(kernel_size=3, stride=2), "nested": dict(kernel_size=2, stride=2),
              "softmax": dict(kernel_size=2, stride=2)}[variant]
        self.up = nn.ConvTranspose2d(6, 4, **up)
        self.up2 = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c = nn.Conv2d(8, 5, 3, padding=1)
        self.fc = nn.Linear(5 * (16 * 16 if variant == "nested" else 11 * 13), 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        d = torch.relu(self.b(self.pool(h)))
        if self.variant == "nested":
            u = self.up2(torch.relu(self.up(self.pool(d))))  # 16 -> 8 -> 4 -> 8 -> 16
        elif self.variant == "k1":
            u = F.pad(self.up(d), (1, 1, 1, 1), value=0.5)  # 9 x 11 -> 11 x 13
        elif self.variant == "crop":
            u = F.pad(self.up(d)[:, :, 1:, 1:], (0, 1, 1, 0), value=-0.25)  # 11 x 13 -> 10 x 12 -> 11 x 13
        else:
            u = F.pad(self.up(d), (0, 1, 1, 0))  # 10 x 12 -> 11 x 13
        z = self.c(torch.cat([h, u], 1))
        if self.variant == "softmax":  # the scores' rows as dense input forms for the pairwise differences
            return self.fc(torch.softmax(z.permute(0, 2, 3, 1), -1).flatten(1))
        return self.fc(torch.relu(z).flatten(1))


@pytest.mark.parametrize("variant", ["k2", "k3", "k4", "k1", "crop", "nested", "softmax"])
def test_transposed_convolutions_and_paddings_keep_the_dense_bounds(variant, monkeypatch):
    """The rows of the convolution after the up path go through the transposed convolution and
    the padding as patches, one pass per phase of their positions, and give the dense pass's
    bounds (float64); the samples of the box stay inside."""
    torch.manual_seed(21)
    shape = (3, 16, 16) if variant == "nested" else (3, 11, 13)
    gm = torch.fx.symbolic_trace(_UpNet(variant))
    graph = build_graph(gm, shape, torch.float64)
    g = torch.Generator().manual_seed(22)
    x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    S = Box(x - 0.02, x + 0.02)
    C = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    plans = []
    real = patches.patch_plan
    monkeypatch.setattr(patches, "patch_plan", lambda *a, **k: (lambda p: plans.append(p) or p)(real(*a, **k)))
    paired = []
    real_rows = crown_mod.patch_input_rows
    monkeypatch.setattr(crown_mod, "patch_input_rows", lambda g, plan, *a: paired.append(plan.phase) or real_rows(g, plan, *a))
    got, ref, _ = _both(graph, S, C, monkeypatch)
    assert ((2, 2) in paired) == (variant == "softmax")
    phased = [p for p in plans if p is not None and p.phase != (1, 1)]
    assert phased and {p.phase for p in phased} == ({(2, 2), (4, 4)} if variant == "nested" else {(2, 2)})
    assert any(graph.by_name[n].op.kind == "conv_transpose" for p in phased for n in p.order)
    for p, (l0, h0) in ref.intermediate.items():
        l1, h1 = got.intermediate[p]
        scale = 1e-12 * (1 + float((h0 - l0).abs().max()))
        assert (l1 - l0).abs().max() <= scale and (h1 - h0).abs().max() <= scale, p
    assert torch.allclose(got.spec_lower(), ref.spec_lower(), rtol=0, atol=1e-12)
    u = torch.rand(2_000, 2, *shape, generator=g, dtype=torch.float64)
    vals = _node_values(graph, (x - 0.02 + 0.04 * u).reshape(-1, *shape))
    for p, (l, h) in got.intermediate.items():
        v = vals[p].reshape(2_000, 2, *vals[p].shape[1:])
        assert (v >= l - 1e-12).all() and (v <= h + 1e-12).all(), p


@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 1), (2, 1, 3), (1, 2, 4), (3, 2, 2)])
def test_a_convolution_step_by_matrix_product_and_fold_is_the_transposed_convolution(stride, dilation, k):
    g = torch.Generator().manual_seed(stride * 10 + dilation)
    A = torch.randn(7, 5, k, k + 1, generator=g, dtype=torch.float64)
    W = torch.randn(5, 3, 3, 2, generator=g, dtype=torch.float64)
    got = patches._conv_back_by_fold(A, W, (stride, stride), (dilation, dilation))
    ref = F.conv_transpose2d(A, W, None, stride, 0, 0, 1, dilation)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-12)
