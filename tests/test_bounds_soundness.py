"""Soundness of interval / crown / deeppoly / alpha-crown bounds.

For random networks of every supported op and random boxes / l_inf / l_2 / l_1 balls, 10,000
sampled points (``InputSet.sample``) and PGD points (signed-gradient steps projected with
``InputSet.project``, minimising and maximising every row) must give ``C y + d`` inside
``[lower, upper]`` -- in float64 exactly (up to 1e-9), in float32 up to a small tolerance.

What is guaranteed (tested strictly) and what is not:

* alpha-CROWN >= CROWN (lower) and <= CROWN (upper): alpha-CROWN keeps the best bound per row
  and its iteration 0 *is* CROWN -> guaranteed exactly.
* CROWN / DeepPoly >= interval: guaranteed by construction (the final bound is intersected with
  the IBP bound computed from the CROWN-tightened intermediate boxes, and interval arithmetic
  is monotone under inclusion) -> tested up to round-off.
* CROWN strictly tighter than interval, or CROWN vs DeepPoly in either direction: **not**
  guaranteed; a statistical claim checked on this fixed seeded set only (CROWN's mean width
  is smaller than IBP's on every network here).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from relax.bounds import bounds, intermediate_bounds, prepare
from relax.ir.graph import UnsupportedOperatorError, build_graph
from verify.spec import Box, LpBall

METHODS = ("interval", "crown", "deeppoly", "alpha-crown")


# ---------------------------------------------------------------- network zoo
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = self.conv2(h) + self.skip(x)  # residual add of two branches
        h = torch.relu(h - 0.1) * 0.5
        h = h.permute(0, 2, 3, 1).transpose(1, 2)
        return self.fc(h.reshape(x.size(0), -1))


class Functional(nn.Module):
    """Functional ops, methods, constants, 1-D conv, tanh/sigmoid and a two-branch sub."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(12, 8) * 0.4)
        self.c1 = nn.Conv1d(1, 3, 3)
        self.lin = nn.Linear(8, 6)

    def forward(self, x):
        z = (x * 2.0 - 1.0) / 1.5
        z = torch.matmul(z, self.w)
        a = torch.tanh(z)
        b = torch.sigmoid(z.unsqueeze(1))
        b = self.c1(b).flatten(1)
        b = F.linear(b, torch.ones(8, 18) * 0.1)
        y = self.lin(a - b)
        return y.view(-1, 6)


class Moves(nn.Module):
    """Value-moving ops (slices, cat, expand, nearest upsampling, padding, index_select, flip)
    and a transposed convolution, as the 2022-2024 networks use them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 12)
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(2 * 4 * 4 + 3 * 4 * 4 + 4, 4)

    def forward(self, x):
        h = torch.relu(self.lin(x)).view(-1, 3, 2, 2)
        a = torch.cat([h[:, 1:], h[:, :1].expand(-1, 1, 2, 2) * 2.0], 1)  # [3, 2, 2]
        u = F.interpolate(a, scale_factor=2, mode="nearest")  # [3, 4, 4]
        t = torch.relu(self.up(h))  # [2, 4, 4]
        p = F.pad(h[:, :, :, ::2], (1, 0, 0, 0), value=0.5)  # [3, 2, 2]
        g = torch.index_select(p.flatten(1), 1, torch.tensor([0, 5, 5, 11])).flip(1)
        return self.fc(torch.cat([t.flatten(1), u.flatten(1), g], 1))


class Smooth(nn.Module):
    """The elementwise functions of relax.ir.ops.elementwise (exp, log, sqrt, reciprocal, powers,
    sin, cos, abs, leaky ReLU, clamp, sign, floor) and atan, each on a slice of one hidden layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 26)
        self.fc = nn.Linear(26, 4)

    def forward(self, x):
        h = self.lin(x) * 1.5
        parts = [
            torch.exp(h[:, 0:2]), torch.log(1.5 + h[:, 2:4].abs()), torch.sqrt(h[:, 4:6] ** 2 + 0.5),
            torch.reciprocal(2.0 + torch.sin(h[:, 6:8])), h[:, 8:10] ** 3, torch.cos(3 * h[:, 10:12]),
            F.leaky_relu(h[:, 12:14], 0.2), torch.clamp(h[:, 14:16], -0.3, 0.4), torch.sign(h[:, 16:18]),
            torch.floor(2 * h[:, 18:20]), torch.abs(h[:, 20:22]), (h[:, 22:24] - 0.2).pow(2), torch.atan(3 * h[:, 24:26]),
        ]
        return self.fc(torch.cat(parts, 1))


class Attention(nn.Module):
    """Products of two activations: one self-attention head (``softmax(Q K^T / sqrt(d)) V``), an
    elementwise product, a division by an activation, a mean and an elementwise max / min."""

    def __init__(self, tokens=3, dim=4):
        super().__init__()
        self.t, self.d = tokens, dim
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc = nn.Linear(dim * tokens + 2 * dim + tokens, 3)

    def forward(self, x):
        z = x.view(-1, self.t, self.d)
        att = torch.softmax(torch.matmul(self.q(z), self.k(z).transpose(1, 2)) / 2.0, dim=-1)
        o = torch.matmul(att, self.v(z))  # [t, d]
        g = torch.sigmoid(z[:, 0]) * torch.tanh(z[:, 1])
        r = z[:, 2] / (1.0 + torch.exp(z[:, 0]))
        m = torch.maximum(z[:, 0], z[:, 1]) - torch.minimum(z[:, 1], torch.relu(z[:, 2])) + torch.maximum(z[:, 2], torch.full((1, 4), -0.1))
        return self.fc(torch.cat([o.flatten(1), g + m, r, z.mean(dim=2)], 1))


class Normalizations(nn.Module):
    """``x / sum(x)`` and ``x / mean(x)`` (relax.ir.ops.Normalize): a weighted average of
    positive weights (cubes of ReLUs, as in the pensieve policies), weights of mixed sign whose
    sum stays positive, and groups along the middle dim of a 3-D tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 16)
        self.register_buffer("v", torch.linspace(1.0, 8.0, 6).view(6, 1))
        self.fc = nn.Linear(1 + 4 + 6, 3)

    def forward(self, x):
        h = self.lin(x)
        p = torch.relu(h[:, :6] + 1.0) ** 3 + 0.5
        avg = torch.matmul(p / p.sum(dim=1, keepdim=True), self.v)  # [1]
        q = h[:, 6:10] * 0.2 + 1.0  # entries may be negative, their sum stays > 0
        mixed = q / q.mean(dim=1, keepdim=True)
        g = (torch.exp(h[:, 10:16]) + 0.1).view(-1, 2, 3)
        grouped = (g / g.sum(dim=1, keepdim=True)).flatten(1)
        return self.fc(torch.cat([avg, mixed, grouped], 1))


def make_nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(4 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 5),
    )
    for m in cnn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    sig = nn.Sequential(nn.Linear(8, 20), nn.Sigmoid(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Sigmoid(), nn.Linear(20, 3))
    with torch.no_grad():  # wide pre-activations: mixed-sign sigmoid/tanh cases
        sig[0].weight.mul_(3.0)
        sig[2].weight.mul_(3.0)
    res = Residual()
    res.bn.running_var.uniform_(0.5, 2.0)
    fun = Functional()
    moves = Moves()
    nets = {
        "moves": (moves, (6,)),
        "mlp": (mlp, (10,)),
        "cnn": (cnn, (1, 8, 8)),
        "sigmoid_tanh": (sig, (8,)),
        "residual": (res, (2, 5, 5)),
        "functional": (fun, (12,)),
        "smooth": (Smooth(), (5,)),
        "attention": (Attention(), (12,)),
        "normalizations": (Normalizations(), (6,)),
    }
    return {k: (torch.fx.symbolic_trace(m.eval()), s) for k, (m, s) in nets.items()}


NETS = make_nets()


def input_sets(shape, dtype, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.rand((B, *shape), generator=g, dtype=dtype)
    return {
        "box": Box((x - 0.1).clamp(0, 1), (x + 0.05).clamp(0, 1)),
        "linf": LpBall(x, 0.08, "inf", 0.0, 1.0),
        "l2": LpBall(x, 0.5, 2, 0.0, 1.0),
        "l1": LpBall(x, 1.5, 1),
    }


def spec_rows(K, B, dtype):
    g = torch.Generator().manual_seed(3)
    C = torch.randn((B, 3, K), generator=g, dtype=dtype)
    d = torch.randn((B, 3), generator=g, dtype=dtype)
    return C, d


def values(net, C, d, x):
    """``C y + d`` at points ``x [n, B, *shape]`` -> ``[n, B, N]``."""
    n, B = x.shape[:2]
    y = net(x.reshape(n * B, *x.shape[2:])).reshape(n, B, -1)
    return torch.einsum("bnk,sbk->sbn", C, y) + d


def pgd_points(net, S, C, d, steps=12):
    """Points of ``S`` pushing each row down and up: ``[2N, B, *shape]``."""
    N = C.shape[1]
    g = torch.Generator().manual_seed(5)
    x = S.sample(2 * N, generator=g).detach()
    sign = torch.cat([torch.ones(N), -torch.ones(N)]).to(x.dtype)
    lo, hi = S.bounds()
    step = float((hi - lo).max()) / 6
    for _ in range(steps):
        x.requires_grad_(True)
        v = values(net, C, d, x)  # [2N, B, N]
        obj = sum(sign[i] * v[i, :, i % N].sum() for i in range(2 * N))
        (gr,) = torch.autograd.grad(obj, x)
        with torch.no_grad():
            if isinstance(S, LpBall) and S.p == 2.0:
                gn = gr.flatten(2).norm(dim=2).clamp_min(1e-12).view(*gr.shape[:2], *([1] * (gr.dim() - 2)))
                x = x - step * gr / gn
            else:
                x = x - step * gr.sign()
            x = torch.stack([S.project(xi) for xi in x])
    return x.detach()


def check_sound(net, S, C, d, lower, upper, tol):
    with torch.no_grad():
        pts = S.sample(10_000, generator=torch.Generator().manual_seed(4))
        v = values(net, C, d, pts)
    vp = values(net, C, d, pgd_points(net, S, C, d)).detach()
    v = torch.cat([v, vp], 0)
    slack_lo = (v.amin(0) - lower).min().item()
    slack_hi = (upper - v.amax(0)).min().item()
    scale = 1 + v.abs().max().item()
    assert slack_lo >= -tol * scale, f"lower bound violated by {-slack_lo}"
    assert slack_hi >= -tol * scale, f"upper bound violated by {-slack_hi}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("net_name", list(NETS))
def test_sampled_and_pgd_points_lie_within_bounds(net_name, dtype):
    net, shape = NETS[net_name]
    net = net.to(dtype)
    try:
        tol = 1e-5 if dtype == torch.float32 else 1e-9
        for set_name, S in input_sets(shape, dtype).items():
            K = net(S.midpoint()).shape[1]
            C, d = spec_rows(K, S.batch_size, dtype)
            res = {}
            for m in METHODS:
                lo, hi = bounds(net, S, C, d, method=m, iterations=4)
                assert lo.dtype == dtype and lo.shape == (S.batch_size, 3)
                assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
                assert (lo <= hi + 1e-6).all()
                check_sound(net, S, C, d, lo, hi, tol)
                res[m] = (lo, hi)
            # guarantees (see module docstring)
            assert (res["alpha-crown"][0] >= res["crown"][0]).all() and (res["alpha-crown"][1] <= res["crown"][1]).all()
            rt = 1e-4 if dtype == torch.float32 else 1e-9
            for m in ("crown", "deeppoly"):
                sc = 1 + res["interval"][0].abs()
                assert (res[m][0] >= res["interval"][0] - rt * sc).all(), (set_name, m)
                assert (res[m][1] <= res["interval"][1] + rt * (1 + res["interval"][1].abs())).all(), (set_name, m)
    finally:
        net.to(torch.float32)


def test_crown_usually_tighter_than_interval():
    """Statistical claim on this fixed seeded set (not a guarantee): CROWN's mean width is
    smaller than IBP's on every network and input set."""
    for net, shape in NETS.values():
        for S in input_sets(shape, torch.float32).values():
            li, ui = bounds(net, S, method="interval")
            lc, uc = bounds(net, S, method="crown")
            assert (uc - lc).mean() < (ui - li).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crown_below_brute_force_grid_minimum(seed):
    """2-D input ReLU nets: the CROWN / alpha-CROWN lower bound of each margin is <= the minimum
    over a dense grid (plus the box vertices) of the margin."""
    torch.manual_seed(seed)
    net = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()).double()
    lo = torch.tensor([[-0.3, 0.1]], dtype=torch.float64)
    hi = torch.tensor([[0.4, 0.5]], dtype=torch.float64)
    S = Box(lo, hi)
    C = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]], dtype=torch.float64)
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    gx, gy = torch.meshgrid(lo[0, 0] + t * (hi[0, 0] - lo[0, 0]), lo[0, 1] + t * (hi[0, 1] - lo[0, 1]), indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    corners = torch.tensor([[lo[0, 0], lo[0, 1]], [lo[0, 0], hi[0, 1]], [hi[0, 0], lo[0, 1]], [hi[0, 0], hi[0, 1]]], dtype=torch.float64)
    with torch.no_grad():
        m = torch.cat([net(pts), net(corners)]) @ C[0].t()
    gmin, gmax = m.amin(0), m.amax(0)
    for method in ("crown", "deeppoly", "alpha-crown"):
        l, u = bounds(net, S, C, method=method)
        assert (l[0] <= gmin + 1e-12).all() and (u[0] >= gmax - 1e-12).all(), method


def _node_values(graph, x):
    """Every node's values ``{name: [n, *shape]}`` on the points ``x`` (no autograd)."""
    vals = {graph.input_name: x}
    with torch.no_grad():
        for n in graph.nodes:
            vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
    return vals


@pytest.mark.parametrize("method", ["interval", "crown", "deeppoly"])
def test_intermediate_bounds_contain_preactivations(method):
    net, shape = NETS["cnn"]
    S = input_sets(shape, torch.float32)["linf"]
    inter = intermediate_bounds(net, S, method=method)
    graph, _ = prepare(net, S)
    assert list(inter) == graph.preactivations() and len(inter) == 4
    pts = S.sample(2000, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        vals = _node_values(graph, pts.reshape(-1, *shape))
    for k, (l, h) in inter.items():
        v = vals[k].reshape(2000, S.batch_size, *l.shape[1:])
        assert (v >= l - 1e-5).all() and (v <= h + 1e-5).all(), k


def test_bound_overrides_are_sound_on_the_split_domain():
    """BaB entry point: forcing a ReLU input >= 0 (``lo = 0``) gives bounds valid for the
    points where that neuron is indeed >= 0."""
    net, shape = NETS["mlp"]
    net = net.double()
    try:
        S = input_sets(shape, torch.float64)["linf"]
        graph, _ = prepare(net, S)
        inter = intermediate_bounds(net, S, method="crown")
        p = graph.preactivations()[1]
        l, h = inter[p]
        unstable = ((l < 0) & (h > 0))[0].nonzero().flatten()
        j = int(unstable[0])
        lo_o, hi_o = l.clone(), h.clone()
        lo_o[:, j] = 0.0  # split: neuron j active in every domain of the batch
        for method in ("interval", "crown", "alpha-crown"):
            low, up = bounds(net, S, method=method, bound_overrides={p: (lo_o, hi_o)})
            pts = S.sample(20000, generator=torch.Generator().manual_seed(8))
            with torch.no_grad():
                vals = _node_values(graph, pts.reshape(-1, *shape))
            z = vals[p].reshape(20000, S.batch_size, -1)[..., j]
            y = vals[graph.output].reshape(20000, S.batch_size, -1)
            keep = z >= 0
            for b in range(S.batch_size):
                yb = y[keep[:, b], b]
                if len(yb):
                    assert (yb >= low[b] - 1e-9).all() and (yb <= up[b] + 1e-9).all(), method
    finally:
        net.float()


def test_sigmoid_tanh_relaxation_sound_on_dense_grid():
    """The linear bounds of sigmoid / tanh hold on a dense grid of every interval, in the
    convex, concave and mixed-sign cases."""
    from relax.ir.ops import Sigmoid, Tanh

    torch.manual_seed(0)
    lo = torch.cat([torch.randn(300) * 4, torch.tensor([-30.0, -1e-4, 0.0, 2.0, -5.0])]).double()
    hi = lo + torch.cat([torch.rand(300) * 8, torch.tensor([60.0, 2e-4, 1e-9, 0.0, 4.0])]).double()
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).view(-1, 1)
    x = lo + t * (hi - lo)
    for op in (Sigmoid(), Tanh()):
        for mode in ("crown", "deeppoly"):
            r = op.relax(lo.view(1, -1), hi.view(1, -1), mode)
            fx = op.forward(x)
            assert (r.lw * x + r.lb <= fx + 1e-12).all(), (op.kind, mode)
            assert (r.uw * x + r.ub >= fx - 1e-12).all(), (op.kind, mode)


def test_unsupported_operator_names_op_and_node():
    class Asinh(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.asinh(x))

    with pytest.raises(UnsupportedOperatorError, match=r"asinh.*node 'asinh'"):
        build_graph(torch.fx.symbolic_trace(Asinh()), (3,))

    class Cumsum(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(UnsupportedOperatorError, match="cumsum"):
        bounds(Cumsum(), Box(torch.zeros(1, 3), torch.ones(1, 3)), method="crown")
    assert issubclass(UnsupportedOperatorError, ValueError)

    class Bilinear(nn.Module):  # averages entries: must not be mistaken for a selection
        def forward(self, x):
            return F.interpolate(x.view(-1, 1, 2, 4), scale_factor=2, mode="bilinear").flatten(1)

    with pytest.raises(UnsupportedOperatorError, match="interpolate.*not a selection"):
        bounds(Bilinear(), Box(torch.zeros(1, 8), torch.ones(1, 8)), method="crown")


def test_graph_forward_matches_module():
    for net, shape in NETS.values():
        x = torch.rand(4, *shape)
        g, _ = prepare(net, Box(x, x))
        with torch.no_grad():
            assert torch.allclose(g.forward(x), net(x).reshape(4, -1), atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_conv_backward_by_matrix_equals_transposed_conv(transpose):
    """The two backward paths of a convolution (its dense matrix, used only in float64 when it
    costs little more, and the adjoint convolution) and the one-hot rows agree, and each is the
    adjoint of the forward map: <A, W x> = <A W, x>."""
    from relax.ir.ops.affine import Conv, ConvTranspose

    torch.manual_seed(0)
    if transpose:
        W, in_shape, out_shape = torch.randn(3, 2, 3, 3, dtype=torch.float64), (3, 4, 4), (2, 8, 8)
        op = ConvTranspose(W, torch.randn(2, dtype=torch.float64), (2, 2), (1, 1), (1, 1), (1, 1), 1, in_shape, out_shape)
    else:
        W, in_shape, out_shape = torch.randn(4, 3, 3, 3, dtype=torch.float64), (3, 6, 6), (4, 3, 3)
        op = Conv(W, torch.randn(4, dtype=torch.float64), (2, 2), (1, 1), (1, 1), 1, in_shape, out_shape)
    x = torch.randn(1, *in_shape, dtype=torch.float64)
    assert op.forward(x).shape[1:] == out_shape
    A = torch.randn(5, 2, *out_shape, dtype=torch.float64)
    got = {}
    for dense in (True, False):
        op.use_dense = dense
        (A_in,), bias = op.backward(A)
        got[dense] = A_in
        lhs = (A * op.forward(x).unsqueeze(0)).flatten(2).sum(-1)
        assert torch.allclose(lhs, (A_in * x.unsqueeze(0)).flatten(2).sum(-1) + bias, atol=1e-10)
    assert torch.allclose(got[True], got[False], atol=1e-10)
    idx = torch.tensor([[0, 7], [5, 3]])
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)  # one sign per start row s
    (rows,), _ = op.backward_rows(idx, sign)
    onehot = torch.zeros(2, 2, math.prod(out_shape), dtype=torch.float64)
    onehot.scatter_(2, idx.unsqueeze(-1), sign.view(2, 1, 1).expand(2, 2, 1))
    (full,), _ = op.backward(onehot.view(2, 2, *out_shape))
    assert torch.allclose(rows, full, atol=1e-12)


@pytest.mark.parametrize("case", ["conv_down", "conv_same", "conv_groups_dilated", "conv1d", "transpose_up", "transpose_down"])
def test_conv_matrix_built_from_the_smaller_side_is_the_same(case):
    """``Conv.dense()`` builds the ``[out, in]`` matrix from unit outputs through the adjoint when
    the output is the smaller side (a patch embedding: 192 adjoint images instead of 3,072
    convolutions), else from unit inputs: both give exactly the matrix of the other way (each
    entry is one weight or zero), for plain, grouped / dilated, 1-D and transposed convolutions."""
    from relax.ir.ops.affine import Conv, ConvTranspose

    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ops = {
        "conv_down": lambda: Conv(rnd(6, 3, 4, 4), None, (4, 4), (0, 0), (1, 1), 1, (3, 16, 16), (6, 4, 4)),
        "conv_same": lambda: Conv(rnd(4, 4, 3, 3), None, (1, 1), (1, 1), (1, 1), 1, (4, 5, 5), (4, 5, 5)),
        "conv_groups_dilated": lambda: Conv(rnd(4, 2, 3, 3), None, (2, 2), (2, 2), (2, 2), 2, (4, 9, 9), (4, 5, 5)),
        "conv1d": lambda: Conv(rnd(2, 3, 5), None, (3,), (1,), (1,), 1, (3, 20), (2, 6)),
        "transpose_up": lambda: ConvTranspose(rnd(3, 2, 3, 3), None, (2, 2), (1, 1), (1, 1), (1, 1), 1, (3, 4, 4), (2, 8, 8)),
        "transpose_down": lambda: ConvTranspose(rnd(8, 1, 2, 2), None, (2, 2), (0, 0), (0, 0), (1, 1), 1, (8, 3, 3), (1, 6, 6)),
    }
    op = ops[case]()
    n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
    assert (n_out < n_in) == (case in ("conv_down", "conv_groups_dilated", "conv1d", "transpose_down"))
    cols = op.forward(torch.eye(n_in, dtype=torch.float64).view(n_in, *op.in_shape)).reshape(n_in, n_out).t()
    rows = op._adjoint(torch.eye(n_out, dtype=torch.float64).view(n_out, *op.out_shape)).reshape(n_out, n_in)
    assert torch.equal(cols, rows) and torch.equal(op.dense(), cols)
    x = rnd(2, *op.in_shape)
    assert torch.allclose(op.forward(x).reshape(2, -1), x.reshape(2, -1) @ op.dense().t(), atol=1e-12)


def test_conv_backward_uses_the_matrix_only_in_float64_and_when_it_is_cheap():
    from relax.ir.ops.affine import Conv

    def op(W, in_shape, out_shape, stride=1, pad=1):
        return Conv(W, None, (stride, stride), (pad, pad), (1, 1), 1, in_shape, out_shape)

    W = torch.randn(32, 32, 3, 3, dtype=torch.float64)
    assert op(W, (32, 4, 4), (32, 4, 4)).use_dense  # 512 inputs, 288 weights per output
    assert not op(W.float(), (32, 4, 4), (32, 4, 4)).use_dense  # float32: the transposed conv
    assert not op(W[:, :, :1, :1], (32, 4, 4), (32, 4, 4), pad=0).use_dense  # 1x1: 16x the work as a matrix
    assert op(W[:, :, :1, :1], (32, 4, 4), (32, 4, 4), pad=0).rows_dense  # its rows are still gathered


def test_chunking_gives_the_same_bounds():
    net, shape = NETS["cnn"]
    S = input_sets(shape, torch.float64)["linf"]
    net = net.double()
    try:
        a = bounds(net, S, method="crown")
        b = bounds(net, S, method="crown", max_elements=20000)
        assert torch.allclose(a[0], b[0], atol=1e-10) and torch.allclose(a[1], b[1], atol=1e-10)
    finally:
        net.float()


@pytest.mark.parametrize("net_name", ["mlp", "smooth"])
def test_alpha_crown_with_shared_slopes_under_a_memory_cap(net_name):
    """With ``max_elements`` too small for slopes per spec row, alpha-CROWN shares one set of
    slopes across the rows (and leaves intermediate rows at CROWN's slopes): its bounds stay
    between CROWN's and the sampled values."""
    from relax.bounds.alpha import alpha_crown
    from relax.bounds.crown import crown

    net, shape = NETS[net_name]
    net = net.double()
    try:
        S = input_sets(shape, torch.float64)["linf"]
        graph, xs = prepare(net, S)
        K = graph.by_name[graph.output].numel
        C, d = spec_rows(K, S.batch_size, torch.float64)
        base = crown(graph, xs, C).lower
        small = alpha_crown(graph, xs, C, iterations=8, max_elements=64)
        full = alpha_crown(graph, xs, C, iterations=8)
        assert (small.lower >= base - 1e-12).all() and (full.lower >= base - 1e-12).all()
        assert any(a.shape[0] == 1 for a in small.alphas["__out__"].values())  # what did not fit is shared
        assert all(a.shape[0] == C.shape[1] for a in full.alphas["__out__"].values())
        pts = S.sample(10_000, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            v = values(net, C, torch.zeros_like(d), pts)
        assert (small.lower <= v.amin(0) + 1e-9).all()
    finally:
        net.float()


def test_alpha_crown_keeps_its_best_bound_when_a_step_is_undefined():
    """The normalisation net at weight scale 10 on a box 1e-7 wide in float32: some alpha-CROWN
    step's bounds are NaN (0/0 in a relaxation of a near-point box); the best bound kept is still
    finite, at least CROWN's and sound on sampled points (before: NaN)."""
    torch.manual_seed(0)
    net = Normalizations()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10.0)
    net = torch.fx.symbolic_trace(net.eval())
    torch.manual_seed(1)
    x = torch.rand(2, 6)
    S = Box(x - 1e-7, x + 1e-7)
    C, d = spec_rows(3, 2, torch.float32)
    lo_c, hi_c = bounds(net, S, C, d, method="crown", dtype=torch.float32)
    lo, hi = bounds(net, S, C, d, method="alpha-crown", iterations=4, dtype=torch.float32)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    assert (lo >= lo_c).all() and (hi <= hi_c).all()
    check_sound(net, S, C, d, lo, hi, 0.0)
