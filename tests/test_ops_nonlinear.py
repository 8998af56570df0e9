"""Relaxations of the elementwise functions (relax.ir.ops.elementwise) and of the product of two
activations (relax.ir.ops.product), checked on dense grids and samples in float64: every line of any
slope, the interval rule, the alpha-optimised lines and the McCormick planes must enclose the
function on the whole interval; poles and domains give unbounded, never NaN, lines."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from relax.bounds import bounds
from relax.ir.graph import build_graph
from relax.ir.ops import Abs, Clip, Cos, Exp, Floor, LeakyReLU, Log, PiecewiseLinear, Power, Product, Reciprocal, Sign, Sin, Sqrt
from relax.ir.ops.elementwise import Elementwise
from verify.spec import Box

D = torch.float64


def _intervals(positive: bool = False, n: int = 400):
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(n, generator=g, dtype=D) * 3
    w = torch.rand(n, generator=g, dtype=D) * torch.tensor([0.01, 1.0, 8.0, 30.0], dtype=D).repeat(n // 4)
    special_lo = torch.tensor([-2.0, 0.0, -1e-3, 1.0, -7.0, 0.5], dtype=D)
    special_w = torch.tensor([4.0, 1.0, 2e-3, 0.0, 14.0, 1e-9], dtype=D)
    lo, w = torch.cat([lo, special_lo]), torch.cat([w, special_w])
    if positive:
        lo = lo.abs() + 1e-3
    return lo, lo + w


def _sigmoid_table(kinks: int = 54, lo: float = -6.0, hi: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The kinks, slope changes and value at ``-inf`` of the piecewise-linear interpolation of the
    sigmoid at ``kinks`` points (ml4acopf's lookup tables), flat outside them."""
    t = torch.linspace(lo, hi, kinks, dtype=D)
    slopes = torch.diff(torch.sigmoid(t)) / torch.diff(t)
    w = torch.cat([slopes[:1], torch.diff(slopes), -slopes[-1:]])
    return t, w, float(torch.sigmoid(t[0]))


OPS = {
    "exp": (Exp(), False), "log": (Log(), True), "sqrt": (Sqrt(), True), "reciprocal+": (Reciprocal(), True),
    "pow2": (Power(2), False), "pow3": (Power(3), False), "pow4": (Power(4), False), "sin": (Sin(), False),
    "cos": (Cos(), False), "abs": (Abs(), False), "leaky": (LeakyReLU(0.1), False), "clip": (Clip(-0.5, 1.0), False),
    "sign": (Sign(), False), "floor": (Floor(), False), "table": (PiecewiseLinear(*_sigmoid_table()), False),
}


def _grid(lo, hi, n=3001):
    t = torch.linspace(0, 1, n, dtype=D).view(-1, 1)
    return torch.cat([lo + t * (hi - lo), lo.view(1, -1), hi.view(1, -1)])


def _check_lines(op, lo, hi, k, gmin, gmax, x=None):
    x = _grid(lo, hi) if x is None else x
    fx = op.forward(x)
    ok = torch.isfinite(fx)
    assert not torch.isnan(gmin).any() and not torch.isnan(gmax).any()
    below = (k * x + gmin <= fx + 1e-12) | ~ok
    above = (k * x + gmax >= fx - 1e-12) | ~ok
    assert below.all(), f"{op}: lower line above f at {x[~below][:3]}"
    assert above.all(), f"{op}: upper line below f at {x[~above][:3]}"


@pytest.mark.parametrize("name", list(OPS))
def test_any_slope_gives_enclosing_lines(name):
    op, positive = OPS[name]
    lo, hi = _intervals(positive)
    g = torch.Generator().manual_seed(1)
    for scale in (0.0, 0.5, 3.0):
        k = torch.randn(lo.shape, generator=g, dtype=D) * scale
        gmin, gmax = op.extremes(k, lo, hi)
        _check_lines(op, lo, hi, k, gmin, gmax)
    r = op.relax(lo.view(1, -1), hi.view(1, -1))
    x = _grid(lo, hi)
    fx = op.forward(x)
    assert (r.lw * x + r.lb <= fx + 1e-12).all() and (r.uw * x + r.ub >= fx - 1e-12).all()
    il, ih = op.interval((lo, hi))
    assert (il <= fx.amin(0) + 1e-12).all() and (ih >= fx.amax(0) - 1e-12).all()


@pytest.mark.parametrize("name", [n for n, (op, _) in OPS.items() if op.optimisable])
def test_optimised_slopes_give_enclosing_lines(name):
    """alpha-CROWN's lines (any alpha in [0, 1]) through backward_relaxed: A = +1 gives the
    lower line, A = -1 the upper line."""
    op, positive = OPS[name]
    lo, hi = _intervals(positive)
    r = op.relax(lo.view(1, -1), hi.view(1, -1))
    x = _grid(lo, hi)
    fx = op.forward(x)
    for a in (0.0, 0.3, 1.0):
        n = lo.numel()
        alpha = torch.full((n, 1, n), a, dtype=D)  # [S, B, n]
        for s in range(2):
            A = (1.0 if s == 0 else -1.0) * torch.eye(n, dtype=D).unsqueeze(1)  # row j picks neuron j: [S, B, n]
            A_in, bias = op.backward_relaxed(A, r, alpha)
            w, b = A_in.diagonal(dim1=0, dim2=2).squeeze(0), bias.squeeze(1)  # line slope, intercept per neuron
            if s == 0:
                assert (w * x + b <= fx + 1e-10).all(), (name, a)
            else:
                assert (-(w * x + b) >= fx - 1e-10).all(), (name, a)


def test_poles_and_domains_are_unbounded_not_nan():
    lo = torch.tensor([-1.0, -2.0, 0.0, -1.0], dtype=D)
    hi = torch.tensor([1.0, -0.0, 2.0, 3.0], dtype=D)
    l, h = Reciprocal().interval((lo, hi))
    assert torch.isinf(l[:3]).all() and torch.isinf(h[:3]).all() and not torch.isnan(l).any()
    r = Reciprocal().relax(lo.view(1, -1), hi.view(1, -1))
    assert (r.lb[0, :3] == -math.inf).all() and (r.ub[0, :3] == math.inf).all()
    l, h = Log().interval((lo, hi))
    assert l[0] == -math.inf and l[2] == -math.inf and not torch.isnan(l).any() and not torch.isnan(h).any()
    # an unbounded intercept times a zero coefficient adds nothing (no 0 * inf)
    A = torch.zeros(1, 1, 4, dtype=D)
    A[0, 0, 3] = 1.0
    r = Reciprocal().relax(torch.tensor([[0.5, -1.0, 1.0, 2.0]], dtype=D), torch.tensor([[1.0, 1.0, 2.0, 3.0]], dtype=D))
    _, bias = Reciprocal().backward_relaxed(A, r)
    assert torch.isfinite(bias).all()


@pytest.mark.parametrize("matmul", [False, True], ids=["mul", "matmul"])
def test_product_planes_and_interval_enclose_samples(matmul):
    g = torch.Generator().manual_seed(2)
    shape_x, shape_y = ((2, 3, 4), (2, 4, 5)) if matmul else ((2, 3, 4), (2, 1, 4))
    B, S, n = 3, 6, 4000
    lx = torch.randn(B, *shape_x, generator=g, dtype=D)
    ux = lx + torch.rand(B, *shape_x, generator=g, dtype=D)
    ly = torch.randn(B, *shape_y, generator=g, dtype=D)
    uy = ly + torch.rand(B, *shape_y, generator=g, dtype=D) * 2
    op = Product(matmul, shape_x, shape_y)
    xs = lx + (ux - lx) * torch.rand(n, B, *shape_x, generator=g, dtype=D)
    ys = ly + (uy - ly) * torch.rand(n, B, *shape_y, generator=g, dtype=D)
    corners = [(a, b) for a in (lx, ux) for b in (ly, uy)]
    xs = torch.cat([xs] + [a.unsqueeze(0) for a, _ in corners])
    ys = torch.cat([ys] + [b.unsqueeze(0) for _, b in corners])
    z = op.forward(xs, ys)  # [n, B, *out]
    il, ih = op.interval((lx, ux), (ly, uy))
    assert (il <= z.amin(0) + 1e-12).all() and (ih >= z.amax(0) - 1e-12).all()
    r = op.relax_inputs([(lx, ux), (ly, uy)])
    A = torch.randn(S, B, *z.shape[2:], generator=g, dtype=D)
    low = torch.einsum("sb...,nb...->nsb", A, z)
    ones = op.alpha_init(r).expand(S, *z.shape[1:])
    mixes = {"fixed": None, "first planes": ones, "second planes": 0 * ones,
             "random": torch.rand(S, *z.shape[1:], generator=g, dtype=D)}
    got = {}
    for name, alpha in mixes.items():  # alpha-CROWN's weights of the two McCormick planes
        (Ax, Ay), bias = op.backward_relaxed(A, r, alpha)
        lin = torch.einsum("sb...,nb...->nsb", Ax, xs) + torch.einsum("sb...,nb...->nsb", Ay, ys) + bias
        assert (lin <= low + 1e-10).all(), name
        got[name] = lin
    assert torch.allclose(got["fixed"], got["first planes"], atol=1e-12)
    assert not torch.allclose(got["fixed"], got["second planes"])
    # each plane pair is exact on its own corners: the first at (lx, ly), the second at (ux, uy)
    k = xs.shape[0]
    assert torch.allclose(got["first planes"][k - 4], low[k - 4]) and torch.allclose(got["second planes"][k - 1], low[k - 1])


def test_softmax_bounds_enclose_samples_and_stay_in_unit_interval():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Softmax(dim=1)).double()
    x = torch.rand(2, 4, dtype=D)
    S = Box(x - 0.2, x + 0.2)
    lo, hi = bounds(net, S, method="crown")
    pts = S.sample(20000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(pts.reshape(-1, 4)).reshape(20000, 2, 6)
    assert (lo <= y.amin(0) + 1e-12).all() and (hi >= y.amax(0) - 1e-12).all()
    assert (lo >= -1e-9).all() and (hi <= 1 + 1e-9).all()
    g = build_graph(torch.fx.symbolic_trace(net), (4,), D)
    assert torch.allclose(g.forward(x), net(x), rtol=0, atol=1e-15)


class _LogSoftmaxHead(nn.Module):
    """A ReLU MLP with a log-softmax head over dim ``dim`` of a ``[B, 5, 2]`` output (or none)."""

    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.a, self.b, self.dim = nn.Linear(6, 16), nn.Linear(16, 10), dim

    def forward(self, x):
        z = self.b(torch.relu(self.a(x))).view(-1, 5, 2)
        return (z if self.dim is None else torch.log_softmax(z, dim=self.dim)).flatten(1)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_log_softmax_differences_are_bounded_as_the_logits_and_rows_enclose_samples(dim, method):
    """``log_softmax(z)_i - log_softmax(z)_j = z_i - z_j``: rows whose coefficients sum to 0 in
    each softmax group get the bounds of the same rows on the logits (to round-off), and any row
    (differences, single entries, random mixes) bounds 20,000 samples and PGD-free corners."""
    torch.manual_seed(3)
    net = _LogSoftmaxHead(dim).double().eval()
    logits = _LogSoftmaxHead(None).double().eval()
    logits.load_state_dict(net.state_dict())
    x = torch.rand(3, 6, dtype=D)
    S = Box(x - 0.15, x + 0.15)
    groups = torch.arange(10).view(5, 2) if dim == 2 else torch.arange(10).view(5, 2).t()  # entries of one softmax
    diff = torch.zeros(4, 10, dtype=D)
    for r, (i, j) in enumerate([(0, 1), (1, 2), (2, 0), (1, 0)] if dim == 1 else [(0, 1), (1, 0), (0, 1), (1, 0)]):
        g = groups[r % len(groups)]
        diff[r, g[i]], diff[r, g[j]] = 1.0, -1.0
    lo_ls, hi_ls = bounds(net, S, diff.expand(3, 4, 10), method=method)
    lo_lg, hi_lg = bounds(logits, S, diff.expand(3, 4, 10), method=method)
    assert torch.allclose(lo_ls, lo_lg, rtol=0, atol=1e-9) and torch.allclose(hi_ls, hi_lg, rtol=0, atol=1e-9)
    rows = torch.cat([diff, torch.eye(10, dtype=D)[:3], torch.randn(5, 10, generator=torch.Generator().manual_seed(4), dtype=D)])
    lo, hi = bounds(net, S, rows.expand(3, -1, -1), method=method)
    pts = torch.cat([S.sample(20000, generator=torch.Generator().manual_seed(5)),
                     x + 0.15 * torch.where(torch.rand(512, 3, 6) < 0.5, -1.0, 1.0).to(D)])
    with torch.no_grad():
        v = net(pts.reshape(-1, 6)).reshape(pts.shape[0], 3, 10) @ rows.t()
    assert (v >= lo - 1e-9).all() and (v <= hi + 1e-9).all()
    assert bool((lo <= hi).all()) and bool(torch.isfinite(lo).all())


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_log_softmax_differences_stay_the_logits_where_exp_overflows(method):
    """Logits 1000x: the entries' forms overflow (an exp of a difference past 709 at a box end),
    yet a difference of two outputs is bounded as on the logits (linear and interval parts), each
    entry gets finite bounds (``x_i - LSE(x)`` on the scores' box), and both contain the samples."""
    torch.manual_seed(0)
    net = _LogSoftmaxHead(2).double().eval()
    with torch.no_grad():
        net.b.weight.mul_(1000.0)
        net.b.bias.mul_(1000.0)
    logits = _LogSoftmaxHead(None).double().eval()
    logits.load_state_dict(net.state_dict())
    x = torch.rand(2, 6, dtype=D)
    S = Box(x - 0.5, x + 0.5)
    C = torch.zeros(2, 3, 10, dtype=D)
    for r, (i, j) in enumerate([(0, 1), (3, 2), (8, 9)]):
        C[:, r, i], C[:, r, j] = 1.0, -1.0
    lo_ls, _ = bounds(net, S, C, method=method)
    lo_lg, _ = bounds(logits, S, C, method=method)
    assert torch.isfinite(lo_ls).all()
    assert torch.allclose(lo_ls, lo_lg, rtol=1e-9, atol=1e-9), (lo_ls, lo_lg)
    with torch.no_grad():
        y = net(S.sample(5000, generator=torch.Generator().manual_seed(6)).reshape(-1, 6)).reshape(5000, 2, 10)
    v = torch.einsum("nbk,bjk->nbj", y, C)
    assert (v >= lo_ls - 1e-6).all()
    lo, hi = bounds(net, S, method=method)  # single entries: finite from the scores' box (x_i - LSE(x))
    assert torch.isfinite(lo).all() and (hi <= 1e-9).all()  # log-probabilities (0 plus the round-off allowance)
    assert (y >= lo - 1e-6).all() and (y <= hi + 1e-6).all()


def test_a_tensor_times_itself_is_bounded_as_its_square():
    """``x * x`` (ml4acopf's power-flow nets write ``p^2 + q^2`` so) is the square: its graph node
    is ``Power(2)``, its interval is ``[0, max(l^2, u^2)]`` across 0 (the product rule of two
    independent factors gives ``l u < 0``), and CROWN's bounds of ``x * x - 2 x`` still enclose
    10,000 samples while beating the independent-factor product's."""
    class Square(nn.Module):
        def __init__(self, same: bool):
            super().__init__()
            self.same = same

        def forward(self, x):
            h = torch.tanh(x) * 3 - 1  # a variable node, not the input itself
            return h * (h if self.same else h + 0.0) - 2 * h

    lo, hi = torch.tensor([[-1.0, -0.2, 0.3]], dtype=D), torch.tensor([[1.0, 0.4, 0.9]], dtype=D)
    g = build_graph(torch.fx.symbolic_trace(Square(True)), (3,), D)
    assert any(isinstance(n.op, Power) and n.op.n == 2 for n in g.nodes)
    x = lo + (hi - lo) * torch.rand(10_000, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    y = Square(True)(x)
    assert torch.allclose(g.forward(x), y, rtol=0, atol=1e-14)
    for method in ("interval", "crown"):
        l_sq, h_sq = bounds(Square(True), Box(lo, hi), method=method, dtype=D)
        l_pr, h_pr = bounds(Square(False), Box(lo, hi), method=method, dtype=D)
        assert (l_sq[0] <= y.amin(0) + 1e-12).all() and (h_sq[0] >= y.amax(0) - 1e-12).all()
        assert (l_sq >= l_pr - 1e-12).all() and (h_sq <= h_pr + 1e-12).all() and bool((l_sq > l_pr + 0.1).any())


def test_python_scalar_constants_keep_float64_digits():
    """``x * 0.3`` in a float64 graph multiplies by the float64 0.3, not float32's (which
    differs by 1e-8 relative; dividing by a constant multiplies by its reciprocal: one ulp)."""
    class Scale(nn.Module):
        def forward(self, x):
            return torch.exp(x * 0.3 - 0.7) + torch.clamp(x, 0.1, 0.9) / 0.7

    x = torch.rand(3, 5, dtype=D)
    g = build_graph(torch.fx.symbolic_trace(Scale()), (5,), D)
    assert torch.allclose(g.forward(x), Scale()(x), rtol=1e-15, atol=0)


def test_elementwise_op_of_a_known_box_takes_its_exact_image(monkeypatch):
    """A chain tanh -> exp -> 1/x -> ReLU on an l_2 ball: only the first pre-activation gets
    linear bounds; the others are exact images of their input's box (``exact_image``), which
    no line through the op can beat. The boxes are the images and hold 20,000 samples."""
    import relax.bounds.crown as crown_mod
    from verify.spec import LpBall

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(torch.reciprocal(torch.exp(torch.tanh(self.fc1(x))))))

    torch.manual_seed(0)
    net = Chain().double()
    g = build_graph(torch.fx.symbolic_trace(net), (3,), D)
    ball = LpBall(torch.rand(1, 3, dtype=D), 0.3, 2.0, -math.inf, math.inf)
    started = []
    real = crown_mod.bound_node
    monkeypatch.setattr(crown_mod, "bound_node", lambda graph, node, *a, **k: started.append(node) or real(graph, node, *a, **k))
    res = crown_mod.crown(g, ball, None)
    assert len(started) == 1 and len(res.intermediate) == 4
    pts = ball.sample(20000, generator=torch.Generator().manual_seed(1)).reshape(-1, 3)
    with torch.no_grad():
        values = [torch.tanh(net.fc1(pts))]
        values += [torch.exp(values[0]), torch.exp(-values[0])]
    for (lo, hi), v in zip(list(res.intermediate.values())[1:], values):
        assert (lo <= v.amin(0) + 1e-12).all() and (hi >= v.amax(0) - 1e-12).all()



def test_affine_maps_moves_and_constant_offsets_of_known_boxes_take_their_image(monkeypatch):
    """``2 tanh(z) - 1 + m`` with ``m`` input entries the box fixes (a mask), then ``|.|`` and
    ``relu(. - 1/2)``: only ``z`` (a mixing layer) gets linear bounds; the sum with single-point
    boxes, the affine maps and the absolute value are per-entry images of ``z``'s box (as an
    imported OneHot / Equal tail). The boxes equal those with linear bounds everywhere (no line is
    tighter than the image) and hold 10,000 samples; alpha-CROWN plans no rows for them either."""
    import relax.bounds.crown as crown_mod
    from relax.bounds.alpha import _intermediate_rows

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            v = torch.tanh(self.fc1(x[:, :3])) * 2.0 - 1.0 + x[:, 3:7]
            return self.fc2(torch.relu(torch.abs(v) - 0.5))

    torch.manual_seed(0)
    net = Tail().double()
    g = build_graph(torch.fx.symbolic_trace(net), (7,), D)
    lo = torch.cat([torch.rand(1, 3, dtype=D) - 0.5, torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=D)], 1)
    hi = lo.clone()
    hi[:, :3] += 0.4
    box = Box(lo, hi)
    started = []
    real = crown_mod.bound_node
    monkeypatch.setattr(crown_mod, "bound_node", lambda graph, node, *a, **k: started.append(node) or real(graph, node, *a, **k))
    res = crown_mod.crown(g, box, None)
    first = g.preactivations()[0]  # fc1's output (the input feeds the selections only)
    assert started == [first] and len(res.intermediate) == 3
    assert _intermediate_rows(g, box, res.intermediate).keys() <= {first}
    started.clear()
    monkeypatch.setattr(crown_mod, "_per_entry", lambda *a: None)  # linear bounds for every pre-activation
    rows = crown_mod.crown(g, box, None)
    assert len(started) == 3
    for name, (l, h) in res.intermediate.items():
        assert torch.equal(l, rows.intermediate[name][0]) and torch.equal(h, rows.intermediate[name][1]), name
    pts = lo + (hi - lo) * torch.rand(10000, 7, dtype=D)
    with torch.no_grad():
        v = torch.tanh(net.fc1(pts[:, :3])) * 2.0 - 1.0 + pts[:, 3:7]
    for (l, h), val in zip(list(res.intermediate.values())[1:], (v, v.abs() - 0.5)):
        assert (l <= val.amin(0) + 1e-12).all() and (h >= val.amax(0) - 1e-12).all()

def _special_intervals() -> tuple[torch.Tensor, torch.Tensor]:
    """Ends that make some candidate value special: infinite ends (``0 * inf`` at slope 0),
    overflow of ``exp`` / ``x ** n``, poles and points outside a domain, besides ordinary ones."""
    inf = math.inf
    lo = torch.tensor([-inf, -inf, 0.0, -1.0, 700.0, -2.0, 1e200, -1e-300, 0.0, 3.0, -5.0, 1e-3], dtype=D)
    hi = torch.tensor([inf, 0.0, inf, 1.0, 800.0, -1.0, 1e300, 1e-300, 0.0, 4.0, 5.0, 2e-3], dtype=D)
    return lo, hi


@pytest.mark.parametrize("name", [n for n, (op, _) in OPS.items() if not isinstance(op, (Sign, Floor))])
def test_fast_extremes_equal_the_careful_rule_point_by_point(name):
    """``extremes`` takes the widened values at the candidate points in one pass and leaves only
    the entries where some value is NaN to the careful rule; it, ``lowest`` and ``highest`` must
    equal that rule everywhere (ordinary, infinite, overflowing and undefined cases; slope 0 too)."""
    op, positive = OPS[name]
    lo, hi = _intervals(positive)
    slo, shi = _special_intervals()
    lo, hi = torch.cat([lo, slo]), torch.cat([hi, shi])
    g = torch.Generator().manual_seed(5)
    for scale in (0.0, 0.5, 3.0, 1e300):
        k = torch.randn(lo.shape, generator=g, dtype=D) * scale
        want = op._careful_extremes(k, lo, hi)
        if isinstance(op, Reciprocal):  # its poles are unbounded on top of the careful rule
            pole = (lo <= 0) & (hi >= 0)
            want = (torch.where(pole, -math.inf, want[0]), torch.where(pole, math.inf, want[1]))
        got = Elementwise.extremes(op, k, lo, hi)  # sin / cos add the crude bound |f| <= 1 on top of it
        for side, (w, x) in enumerate(zip(want, got)):
            assert torch.equal(w, x), (name, scale, side, lo[w != x], hi[w != x], w[w != x], x[w != x])
        if isinstance(op, (Sin, Cos)):
            continue
        low, high = op.lowest(k, lo, hi), op.highest(k, lo, hi)
        # a convex (concave) function's g = f - k x is largest (least) at an end: that side skips the candidates
        assert torch.equal(low, got[0]) if op.end_side != "min" else bool((low >= got[0]).all())
        assert torch.equal(high, got[1]) if op.end_side != "max" else bool((high <= got[1]).all())
        ordinary = torch.isfinite(lo) & torch.isfinite(hi) & (hi - lo < 1e3)
        _check_lines(op, lo[ordinary], hi[ordinary], k[ordinary], low[ordinary], high[ordinary])


def test_alpha_crown_runs_when_no_entry_has_an_optimisable_side():
    """1 / x on boxes that all contain 0 has no convex or concave entry: alpha-CROWN's slopes
    then change no line, and its steps must still run (the slopes stay in the autograd graph)."""
    net = nn.Sequential(nn.Linear(2, 3), _Recip(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.zero_()
    box = Box(torch.full((1, 2), -1.0, dtype=D), torch.full((1, 2), 1.0, dtype=D))
    lo, hi = bounds(net, box, method="alpha-crown", iterations=3)
    assert not torch.isnan(lo).any() and not torch.isnan(hi).any()
    assert torch.isinf(lo).all() and torch.isinf(hi).all()  # a pole inside every box: vacuous, not wrong


class _Recip(nn.Module):
    def forward(self, x):
        return torch.reciprocal(x)


class _LookupNet(nn.Module):
    """``o(table(a(x)) + 0.01)`` with the sigmoid table written as ml4acopf's ONNX does: the entries
    unsqueezed, shifted by every kink, ReLU, a MatMul with the slope changes, reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
        with torch.no_grad():
            self.a.weight.mul_(4.0)
        t, w, c = _sigmoid_table(20, -4.0, 4.0)
        self.register_buffer("t", t)
        self.register_buffer("w", w.reshape(-1, 1))
        self.c = c

    def forward(self, x):
        h = self.a(x)
        y = torch.relu(h.unsqueeze(-1) - self.t) @ self.w
        return self.o(y.reshape(h.shape) + self.c)


def test_lookup_table_of_relus_is_one_piecewise_linear_node(monkeypatch):
    """The ReLU lookup table becomes one :class:`PiecewiseLinear` node (the same function to
    1e-13); interval and CROWN bounds of the net contain 10,000 samples and beat the bounds of
    the table bounded ReLU by ReLU (fusion off) everywhere, strictly somewhere."""
    import relax.ir.graph as graph_mod

    net = _LookupNet().eval()
    g = build_graph(torch.fx.symbolic_trace(net), (4,), D)
    assert [type(n.op).__name__ for n in g.nodes].count("PiecewiseLinear") == 1
    assert not any(type(n.op).__name__ == "ReLU" for n in g.nodes)
    lo, hi = torch.full((1, 4), -0.5, dtype=D), torch.full((1, 4), 0.5, dtype=D)
    x = lo + (hi - lo) * torch.rand(10_000, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    y = net(x)
    assert torch.allclose(g.forward(x), y, rtol=0, atol=1e-13)
    fused = {m: bounds(net, Box(lo, hi), method=m, dtype=D) for m in ("interval", "crown")}
    monkeypatch.setattr(graph_mod, "_fuse_lookup_tables", lambda nodes: nodes)
    split = {m: bounds(_LookupNet().eval(), Box(lo, hi), method=m, dtype=D) for m in ("interval", "crown")}
    for m in ("interval", "crown"):
        (l, h), (l0, h0) = fused[m], split[m]
        assert (l[0] <= y.amin(0)).all() and (h[0] >= y.amax(0)).all(), m
        assert (l >= l0 - 1e-12).all() and (h <= h0 + 1e-12).all(), m
    assert bool((fused["crown"][0] > split["crown"][0] + 1e-3).any() or (fused["crown"][1] < split["crown"][1] - 1e-3).any())


@pytest.mark.parametrize("name", ["table", "exp", "pow3", "log"])
def test_slopes_with_gradients_fold_to_the_same_values(name):
    """alpha-CROWN differentiates the intercepts in the slopes: the fold with gradients gives the
    values of the fold without them bit for bit, and the gradient of ``g = f - k x`` at each
    entry's extreme point (the plain fold kept every candidate point's graph: 15 GB on ml4acopf's
    300-bus nets)."""
    op, positive = OPS[name]
    lo, hi = _intervals(positive)
    k = (torch.randn(3, lo.numel(), generator=torch.Generator().manual_seed(4), dtype=D) * 2).requires_grad_(True)
    for upper in (False, True):
        want = (op.highest if upper else op.lowest)(k.detach(), lo, hi)
        got = (op.highest if upper else op.lowest)(k, lo, hi)
        assert torch.equal(got.detach(), want)
        (grad,) = torch.autograd.grad(got.sum(), k)
        pts = torch.stack(torch.broadcast_tensors(*[x for x, _, _ in op._points(k.detach(), lo, hi)], k.detach())[:-1])  # [P, 3, n]
        g = op.forward(pts) - k.detach() * pts
        at = pts.gather(0, (g.argmax(0) if upper else g.argmin(0)).unsqueeze(0))[0]
        ok = torch.isfinite(want)
        assert torch.allclose(grad[ok], -at[ok], rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lookup_table_kink_values_match_evaluating_f_there(dtype):
    """A lookup table's extremes take ``f`` at its kinks from values computed once
    (``PiecewiseLinear.candidate_values``): the same extremes as evaluating ``f`` at every kink of
    every entry, to the last bits of a sum's order."""
    class Evaluated(PiecewiseLinear):
        def candidate_values(self, k, lo, hi):
            return Elementwise.candidate_values(self, k, lo, hi)

    table = _sigmoid_table()
    fast, plain = PiecewiseLinear(*table), Evaluated(*table)
    lo, hi = (v.to(dtype) for v in _intervals(False))
    k = torch.randn(3, lo.numel(), generator=torch.Generator().manual_seed(6), dtype=dtype)
    for a, b in zip(fast.extremes(k, lo, hi), plain.extremes(k, lo, hi)):
        scale = 1 + b.abs()
        assert bool(((a - b).abs() <= 64 * torch.finfo(dtype).eps * scale).all())


def test_sigmoid_and_tanh_lines_on_unbounded_boxes_are_finite_and_enclose():
    """A box with an infinite end (a pre-activation behind an overflowed exp) gives lines without
    NaN (``0 * inf`` is 0 for a slope-0 line) that still enclose the function; an unbounded box is
    the interval ``[f(-inf), f(inf)]``."""
    from relax.ir.ops.activation import Atan, Erf, Sigmoid, Tanh

    inf = math.inf
    lo = torch.tensor([[-inf, -3.0, -inf, -5.0, 2.0]], dtype=D)
    hi = torch.tensor([[inf, inf, 4.0, 1e300, 3.0]], dtype=D)
    x = torch.cat([torch.linspace(-50, 50, 2001, dtype=D), torch.tensor([-1e300, 1e300], dtype=D)]).view(-1, 1)
    for op in (Sigmoid(), Tanh(), Erf(), Atan()):
        r = op.relax(lo, hi)
        for t in (r.lw, r.lb, r.uw, r.ub):
            assert not torch.isnan(t).any(), (op, t)
        assert r.lb[0, 0] <= op.f(torch.tensor(-inf, dtype=D)) and r.ub[0, 0] >= op.f(torch.tensor(inf, dtype=D))
        assert r.lb[0, 0] > -1.6 and r.ub[0, 0] < 1.6  # the interval, not unbounded
        inside = (x >= lo) & (x <= hi)
        fx = op.f(x)
        assert ((r.lw * x + r.lb <= fx + 1e-12) | ~inside | torch.isnan(r.lw * x)).all(), op
        assert ((r.uw * x + r.ub >= fx - 1e-12) | ~inside | torch.isnan(r.uw * x)).all(), op


def test_a_sum_of_overflowed_terms_keeps_finite_sound_ends():
    """ReduceSum of terms whose lower ends are the largest float (an exp that overflowed): the
    lower end of the sum stays a finite lower bound (was ``inf - inf`` -> unbounded), and a
    softmax over scores 1e6 apart keeps its outputs in [0, 1] (was [-inf, inf])."""
    from relax.bounds.interval import interval_bounds
    from relax.ir.ops.affine import Reduce

    big = torch.finfo(D).max
    lo = torch.tensor([[big, big, 0.0]], dtype=D)
    hi = torch.tensor([[math.inf, math.inf, 1.0]], dtype=D)
    l, h = Reduce((0,), False, 1.0, (3,)).interval((lo, hi))
    assert torch.isfinite(l).all() and l.item() > 1e300 and h.item() == math.inf

    class Soft(nn.Module):
        def forward(self, x):
            return torch.softmax(x * 1e6, dim=1)

    g = build_graph(Soft(), (3,), D)
    x = torch.tensor([[0.0, 1.0, 2.0]], dtype=D)
    boxes = interval_bounds(g, x - 1.0, x + 1.0)
    l, h = boxes[g.output]
    assert (l >= -1e-12).all() and (h <= 1 + 1e-12).all(), (l, h)
    lo, hi = bounds(Soft().double(), Box(x - 1.0, x + 1.0), method="crown")
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo >= -1e-12).all() and (hi <= 1 + 1e-12).all()


@pytest.mark.parametrize("at_zero", [0.0, 1.0, 0.5])
def test_step_lines_of_any_slope_fraction_enclose_the_step(at_zero):
    """The Heaviside step's CROWN lines and alpha-CROWN's lines (slope fractions inside and
    outside [0, 1]) enclose it on grids holding 0 itself, with ends at 0 and at -inf; the
    interval rule contains every value."""
    from relax.ir.ops import Step

    g = torch.Generator().manual_seed(0)
    lo = torch.randn(1, 3000, generator=g, dtype=D) * 2
    hi = lo + torch.rand(1, 3000, generator=g, dtype=D) * 4
    lo[0, :5] = torch.tensor([0.0, -1.0, -2.0, 0.0, -math.inf], dtype=D)
    hi[0, :5] = torch.tensor([1.0, 0.0, 3.0, 0.0, 2.0], dtype=D)
    x = lo.clamp_min(-50) + (hi - lo.clamp_min(-50)) * torch.linspace(0, 1, 401, dtype=D).view(-1, 1, 1)
    x = torch.cat([x, torch.zeros(1, 1, 3000, dtype=D)])
    inside = (x >= lo) & (x <= hi)
    op = Step(at_zero)
    fx = op.f(x)
    r = op.relax(lo, hi)
    lines = [(r.lw, r.lb, r.uw, r.ub)]
    for a in (-0.5, 0.0, 0.3, 1.0, 1.7):  # any slope gives a sound line (the intercepts are exact)
        kl, ku = a * r.extra[2], a * r.extra[3]
        lines.append((kl, op.lowest(kl, lo, hi), ku, op.highest(ku, lo, hi)))
    for lw, lb, uw, ub in lines:
        assert not torch.isnan(lb).any() and not torch.isnan(ub).any()
        low, up = lw * x + lb, uw * x + ub  # NaN only as 0 * inf outside the box
        assert ((low <= fx + 1e-12) | ~inside).all() and ((up >= fx - 1e-12) | ~inside).all()
    il, ih = op.interval((lo, hi))
    assert ((fx >= il) | ~inside).all() and ((fx <= ih) | ~inside).all()


def test_a_count_of_steps_is_bounded_tighter_than_by_relu_of_sign():
    """``sum_i [z_i > 0]`` over a box: the Step rule's lines through the step's corners give a
    higher lower bound than the composition ``relu(sign(z))`` the importer used before (which
    loses up to 1/2 per unstable step); both contain 20,000 samples."""

    class Count(nn.Module):
        def __init__(self, step):
            super().__init__()
            self.lin, self.step = nn.Linear(3, 40), step
            self.register_buffer("zero", torch.tensor(0.0))

        def forward(self, x):
            z = self.lin(x)
            s = torch.heaviside(z, self.zero) if self.step else torch.relu(torch.sign(z))
            return s.sum(1, keepdim=True)

    torch.manual_seed(3)
    new, old = Count(True).double(), Count(False).double()
    old.load_state_dict(new.state_dict())
    x = torch.rand(1, 3, dtype=D)
    box = Box(x - 0.6, x + 0.6)
    pts = x + (torch.rand(20_000, 3, dtype=D) - 0.5) * 1.2
    with torch.no_grad():
        counts = new(pts)
        assert torch.equal(counts, old(pts))
    low = {}
    for method in ("crown", "alpha-crown"):
        low[method] = float(bounds(new, box, method=method)[0]), float(bounds(old, box, method=method)[0])
        assert float(counts.min()) >= max(low[method]) - 1e-9, (method, low[method])
    assert low["crown"][0] > low["crown"][1] + 0.5 and low["alpha-crown"][0] > low["alpha-crown"][1] + 2.0, low
