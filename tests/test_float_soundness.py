"""Soundness under floating point: the cases of issue 17 that gave false answers.

Each test builds a network whose exact (real-arithmetic) behaviour is known in closed form and
checks that no method certifies a ball that holds a float64-confirmed counterexample, and that
"falsified" needs a counterexample that a single-input forward pass confirms.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from verify.registry import get_method
from verify.spec import LpBall, Robust

BOUND_METHODS = ["interval", "crown", "deeppoly", "alpha-crown", "lp", "milp", "sdp"]


def _linear_net(W, b) -> torch.fx.GraphModule:
    lin = nn.Linear(len(W[0]), len(W))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W, dtype=torch.float32))
        lin.bias.copy_(torch.tensor(b, dtype=torch.float32))
    gm = torch.fx.symbolic_trace(nn.Sequential(lin).eval())
    gm.input_shape = (len(W[0]),)
    return gm


def test_input_box_is_rounded_outward():
    """eps below half a float32 step of the centre: the box must not collapse onto it."""
    c = torch.tensor([[0.5, 0.3, 1e6]])
    ball = LpBall(c, 1e-8, math.inf)
    lo, hi = ball.bounds()
    exact_lo = c.double() - 1e-8
    exact_hi = c.double() + 1e-8
    assert (lo.double() <= exact_lo).all() and (hi.double() >= exact_hi).all()
    # zero radius stays the point itself
    lo0, hi0 = LpBall(c, 0.0, math.inf).bounds()
    assert torch.equal(lo0, c) and torch.equal(hi0, c)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_tiny_ball_around_a_steep_margin_is_not_certified(method):
    """``y0 = 1e6 (x0 - x1) + 0.01``, ``y1 = 0`` at (0.5, 0.5), l_inf eps 1e-8: the point
    (0.5 - 1e-8, 0.5 + 1e-8) has margin -0.01 (the old float32 box collapsed onto the centre
    and every bound method certified)."""
    gm = _linear_net([[1e6, -1e6], [0.0, 0.0]], [0.01, 0.0])
    ball = LpBall(torch.tensor([[0.5, 0.5]]), 1e-8, math.inf, 0.0, 1.0)
    x_bad = torch.tensor([[0.5 - 1e-8, 0.5 + 1e-8]], dtype=torch.float64)
    with torch.no_grad():
        y = torch.nn.functional.linear(x_bad, gm.get_submodule('0').weight.double(), gm.get_submodule('0').bias.double())
    assert float(y[0, 0] - y[0, 1]) < 0  # the witness: exact arithmetic on the float32 weights
    cert = get_method(method).certify(gm, ball, Robust(torch.tensor([0])))[0]
    assert cert.status != "certified"


def test_milp_radius_is_below_the_exact_one_on_a_steep_net():
    """Exact l_inf minimum distortion of ``1e6 (x0 - x1) + 0.01 > 0`` at (0.5, 0.5) is
    ``0.01 / 2e6 = 5e-9``; no certified radius may exceed it."""
    gm = _linear_net([[1e6, -1e6], [0.0, 0.0]], [0.01, 0.0])
    w = gm.get_submodule('0').weight.detach().double()
    exact = float(gm.get_submodule('0').bias.detach().double()[0]) / float(w[0].abs().sum())
    ball = LpBall(torch.tensor([[0.5, 0.5]]), 0.0, math.inf, 0.0, 1.0)
    for method in ("milp", "crown", "lp"):
        cert = get_method(method).certify(gm, ball, Robust(torch.tensor([0])), find_radius=True, max_radius=1e-3)[0]
        assert cert.radius <= exact * (1 + 1e-6), f"{method}: radius {cert.radius} > exact {exact}"


MEAN = 0.789  # a running mean whose float32 fold errs by +0.8 on the margin (fold - exact)


def _bn_net(bias: float) -> nn.Module:
    """x -> BN(x) on one feature; running variance tiny, so the folded scale is ~3.2e7: the
    fold ``shift = bias - mean * scale`` cancels terms of ~2.5e7, and a float32 fold moves the
    margin near the mean by +0.8."""
    lin = nn.Linear(1, 2)
    bn = nn.BatchNorm1d(2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [0.0]]))
        lin.bias.zero_()
        bn.running_mean.copy_(torch.tensor([MEAN, 0.0]))
        bn.running_var.copy_(torch.tensor([1e-10, 1.0]))
        bn.weight.copy_(torch.tensor([1e5, 0.0]))
        bn.bias.copy_(torch.tensor([bias, 0.0]))
    return nn.Sequential(lin, bn).eval()


def _bn_exact_margin(net: nn.Module, x: float) -> float:
    """``y0 - y1`` at ``x`` in exact arithmetic on the float32 parameters (float64 suffices:
    the error is ~1e-16 relative to terms of 3e7)."""
    bn = net[1]
    s = float(bn.weight[0].detach().double()) / math.sqrt(float(bn.running_var[0].double()) + bn.eps)
    return (x - float(bn.running_mean[0].double())) * s + float(bn.bias[0].detach().double())


def test_batchnorm_is_folded_in_the_graph_dtype():
    """``crown`` on a float32 model with BatchNorm, ``dtype="float64"`` and the default: folding
    in float32 (then casting) made the bound 0.8 too optimistic; the ball holds an exact
    counterexample."""
    centre = torch.tensor([[MEAN + 1e-7]], dtype=torch.float32)
    eps = 1e-9
    x_bad = float(centre.double()) - eps
    net0 = _bn_net(0.0)
    bias = torch.tensor(-_bn_exact_margin(net0, x_bad) - 0.01, dtype=torch.float32).item()
    net = _bn_net(bias)
    assert _bn_exact_margin(net, x_bad) < 0 < _bn_exact_margin(net, float(centre.double()))
    gm = torch.fx.symbolic_trace(net)
    gm.input_shape = (1,)
    ball = LpBall(centre, eps, math.inf)
    for dt in ("float64", None):
        cert = get_method("crown", dtype=dt).certify(gm, ball, Robust(torch.tensor([0])))[0]
        assert cert.status != "certified", f"crown dtype={dt} certified a ball with a counterexample"


def test_falsified_needs_a_confirmed_counterexample():
    """``y0 = 3 x``, ``y1 = 1`` at x = fl32(1/3): float32 gives y0 == y1 (margin 0, violated)
    but the exact margin is +3e-8 > 0: the clean input is not a counterexample."""
    gm = _linear_net([[3.0], [0.0]], [0.0, 1.0])
    x = torch.tensor([[1.0 / 3.0]], dtype=torch.float32)
    with torch.no_grad():
        y32 = gm(x)
    exact = 3 * float(x.double()) - 1
    assert exact > 0
    if float(y32[0, 0] - y32[0, 1]) > 0:
        pytest.skip("this platform's float32 matmul does not round 3 * fl32(1/3) to 1")
    for method in ("interval", "crown", "lp"):
        cert = get_method(method).certify(gm, LpBall(x, 0.0, math.inf), Robust(torch.tensor([0])))[0]
        assert cert.status != "falsified", f"{method} returned the clean input as a counterexample"


def _absorbing_net() -> torch.fx.GraphModule:
    """``y0 = relu(1e8 - x) - relu(1e8 - 8)``, ``y1 = 7.8``: in float32 ``1e8 - x`` rounds to
    ``1e8`` for ``0 <= x < 4`` (the float32 model computes margin +0.2 everywhere); the exact
    margin is ``0.2 - x``."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-1.0], [0.0]]))
        net[0].bias.copy_(torch.tensor([1e8, 1e8 - 8]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 7.8]))
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = (1,)
    return gm


@pytest.mark.parametrize("method", ["interval", "crown", "deeppoly", "alpha-crown", "lp", "milp"])
def test_round_off_of_large_terms_does_not_certify(method):
    """Round-off that scales with the terms (1e8), not with the bound (0.2): the ball
    [0, 0.35] around 0.1 holds x = 0.3 with exact margin -0.1 (float32 IBP gave [0.2, 0.2])."""
    gm = _absorbing_net()
    x_bad = 0.3
    exact = (1e8 - x_bad) - (1e8 - 8) - float(torch.tensor(7.8, dtype=torch.float32).double())
    assert exact < 0
    ball = LpBall(torch.tensor([[0.1]]), 0.25, math.inf, 0.0, 1.0)
    cert = get_method(method).certify(gm, ball, Robust(torch.tensor([0])))[0]
    assert cert.status != "certified"


def test_milp_radius_search_refuses_bounds_that_exclude_the_ball(monkeypatch):
    """Item 3: the minimum-distortion search must check that its encoding contains points of
    the ball (as status mode does). Pre-activation bounds that wrongly call every first-layer
    neuron dead encode another network; the old search certified a radius from it."""
    import relax.exact.milp as milp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    gm = torch.fx.symbolic_trace(net)
    gm.input_shape = (3,)
    x = torch.rand(1, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (net[0](x) > 0).any()  # some first-layer neuron is active at the centre
    real = milp.initial_bounds

    def wrong(model, ff, inputs, method="crown"):
        ib, used = real(model, ff, inputs, method)
        (l, u), rest = ib[0], ib[1:]
        return [(torch.minimum(l, torch.full_like(l, -2.0)), torch.full_like(u, -1.0)), *rest], used

    monkeypatch.setattr(milp, "initial_bounds", wrong)
    with torch.no_grad():
        label = gm(x).argmax(1)
    cert = get_method("milp", refine=False).certify(gm, LpBall(x, 0.0, math.inf, 0.0, 1.0), Robust(label),
                                                     find_radius=True, max_radius=1.0)[0]
    assert cert.radius == 0.0, f"radius {cert.radius} from an encoding that excludes the centre"


def test_narrowing_an_input_set_encloses_it():
    """A float64 box or ball (a VNN-LIB spec) converted for a float32 model must not shrink:
    round to nearest can move ``lo`` up or ``hi`` down by half a float32 step."""
    from verify.spec import Box

    lo = torch.tensor([[0.1, 0.3, 1 / 3, 0.7]], dtype=torch.float64)
    hi = lo + 1e-9
    b32 = Box(lo, hi).to(dtype=torch.float32)
    assert (b32.lo.double() <= lo).all() and (b32.hi.double() >= hi).all()
    for p in (math.inf, 2.0, 1.0):
        b = LpBall(lo, 1e-9, p, 0.0, 1.0).to(dtype=torch.float32)
        # the old ball lies in the new one iff eps_new >= eps_old + ||c_new - c_old||_p
        d = (b.center.double() - lo).flatten(1)
        shift = float(d.abs().amax() if math.isinf(p) else d.norm(p=p))
        assert shift > 0  # the centre did move: the case can fail
        assert float(b.eps.double()) >= 1e-9 + shift


# ------------------------------------------------------------------------------------------
# Lipschitz bounds: round-off that scales with the cancelling terms, not with the result


def _cancelling_net():
    """1 input -> 3 ReLUs -> 3 outputs. Hidden pre-activations ``x * w_h + b_h`` and the row
    ``c = (1, 1, 1)`` on the outputs both sum ``1e16 + 1 - 1e16``: exactly 1, computed in float64
    from left to right as 0."""
    from fractions import Fraction

    from relax.ir.dense import AffineLayer, FeedForwardNet

    W0 = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    b0 = torch.zeros(3, dtype=torch.float64)
    W1 = torch.tensor([[1e16, 0.0, 0.0], [1.0, 0.0, 0.0], [-1e16, 0.0, 0.0]], dtype=torch.float64)
    b1 = torch.zeros(3, dtype=torch.float64)
    net = FeedForwardNet((1,), [AffineLayer(W0, b0), AffineLayer(W1, b1)], ["relu"])
    C = torch.ones(1, 1, 3, dtype=torch.float64)
    # exact gradient of c^T f for x > 0 (every ReLU active): c^T W1 W0
    exact = sum(Fraction(float(C[0, 0, i])) * Fraction(float(W1[i, 0])) for i in range(3)) * Fraction(1)
    return net, C, float(exact)


def test_lipschitz_bounds_cover_cancelling_sums():
    from relax import lipschitz as lip

    net, C, exact = _cancelling_net()
    assert exact == 1.0
    assert float((C[0] @ net.layers[1].W)[0, 0]) != exact  # float64 gets it wrong: the case is real
    assert float(lip.global_lipschitz(net, C[0], 2.0)[0]) >= exact
    lo = torch.tensor([[0.5]], dtype=torch.float64)
    pre = lip.interval_bounds(net, lo, lo + 0.25)
    assert float(lip.local_lipschitz(net, C, 2.0, pre)[0, 0]) >= exact
    assert float(lip.local_lipschitz(net, C, math.inf, pre)[0, 0]) >= exact


def test_lipschitz_interval_pass_covers_cancelling_sums():
    """A hidden pre-activation ``1e16 x0 + x1 - 1e16 x2`` at (1, 1, 1): exactly 1, float64 gives 0."""
    from relax import lipschitz as lip
    from relax.ir.dense import AffineLayer, FeedForwardNet

    W0 = torch.tensor([[1e16, 1.0, -1e16]], dtype=torch.float64)
    net = FeedForwardNet((3,), [AffineLayer(W0, torch.zeros(1, dtype=torch.float64)),
                                AffineLayer(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))], ["relu"])
    x = torch.ones(1, 3, dtype=torch.float64)
    (l, u), = lip.interval_bounds(net, x, x)
    assert float(l[0, 0]) <= 1.0 <= float(u[0, 0])


def test_module_lipschitz_tail_covers_cancelling_sums():
    from relax import lipschitz as lip

    net, C, exact = _cancelling_net()
    l0, l1 = nn.Linear(1, 3), nn.Linear(3, 3)
    with torch.no_grad():
        l0.weight.copy_(net.layers[0].W.float())
        l0.bias.zero_()
        l1.weight.copy_(net.layers[1].W.float())
        l1.bias.zero_()
    gm = torch.fx.symbolic_trace(nn.Sequential(l0, nn.ReLU(), l1).double().eval())
    for p in (1.0, 2.0, math.inf):
        assert float(lip.module_global_lipschitz(gm, (1,), C[0], p)[0]) >= exact


def test_lipsdp_row_covers_cancelling_last_layer():
    pytest.importorskip("cvxpy")
    from relax.lipschitz.sdp import lipsdp_rows

    net, C, exact = _cancelling_net()
    L, _ = lipsdp_rows(net, C[0])
    assert math.isnan(float(L[0])) or float(L[0]) >= exact


@pytest.mark.parametrize("seed,scale", [(11006, 1000.0), (11018, 1.0)])
def test_falsified_only_with_a_point_inside_the_ball(seed, scale):
    """Near-tie centres with eps 1e-9 (found by the fuzz): the old membership tolerance (1e-7
    relative) let a point ~1e-7 away count as a counterexample of a ball of radius 1e-9."""
    from conftest import load_fuzz

    fz = load_fuzz()
    gm, shape = fz.make_net("mlp", scale, seed)
    x0 = fz.make_centre("tie", gm, shape, seed)
    with torch.no_grad():
        label = int(gm(x0).argmax())
    ball = LpBall(x0, 1e-9, math.inf, 0.0, 1.0)
    for method in ("bab", "milp"):
        c = get_method(method).certify(gm, ball, Robust(torch.tensor([label])), timeout=5)[0]
        if c.status == "falsified":
            x = torch.as_tensor(c.counterexample, dtype=torch.float64).reshape(1, *shape)
            assert bool(ball.to(dtype=torch.float64).contains(x, tol=1e-14)[0]), method


@pytest.mark.parametrize("method", ["bab", "milp", "crown"])
def test_counterexample_lies_in_the_float64_box_the_user_gave(method):
    """A float64 box whose lower end 0.3 is not a float32 number: the float32 model is bounded on
    the float32 enclosure (down to 0.29999998), but a counterexample must lie in the user's box.
    ``y0 = x, y1 = 0.3 + 1e-6``: every x in [0.3, 0.300001) violates "class 0"."""
    from verify import certify
    from verify.spec import Box

    gm = _linear_net([[1.0], [0.0]], [0.0, 0.3 + 1e-6])
    box = Box(torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64))
    c = certify(gm, box, Robust(torch.tensor([0])), method, timeout=20)[0]
    assert c.status != "certified"
    if c.status == "falsified":
        x = float(torch.as_tensor(c.counterexample, dtype=torch.float64).reshape(-1)[0])
        assert 0.3 <= x <= 0.5, x


def test_round_outward_keeps_bounds_on_the_right_side():
    """A float64 bound cast to float32 moves down (a lower bound) or up (an upper bound) where the
    cast went the wrong way, by at most one float32 step; exact values, infinities and casts to a
    wider type stay as they are."""
    import math

    from relax.bounds.roundoff import round_outward

    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.randn(10000, dtype=torch.float64, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g),
                   torch.tensor([0.0, 1.0, -0.5, math.inf, -math.inf], dtype=torch.float64)])
    lo, hi = round_outward(t, torch.float32, down=True), round_outward(t, torch.float32, down=False)
    assert lo.dtype == hi.dtype == torch.float32
    assert (lo.double() <= t).all() and (hi.double() >= t).all()
    f = t.isfinite()  # the largest float32 below / the smallest above: not one step further
    assert (torch.nextafter(lo, torch.tensor(math.inf)).double() > t)[f].all()
    assert (torch.nextafter(hi, torch.tensor(-math.inf)).double() < t)[f].all()
    exact = t[-5:]
    assert torch.equal(lo[-5:].double(), exact) and torch.equal(hi[-5:].double(), exact)
    assert torch.equal(round_outward(t, torch.float64, down=True), t)


def test_ranking_passes_drop_only_the_allowance_and_never_serve_a_bound():
    """``crown(rigorous=False)`` (filtered smart branching's trial bounds) is the rigorous bound
    plus its round-off allowance, on cancelling weights where the allowance is large; a cache
    filled by one kind of pass refuses the other."""
    from relax.bounds.crown import crown
    from relax.ir.graph import build_graph

    big = 1e6
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[big, -big, 1.0], [1.0, 2.0, -1.0], [-big, big, 0.5], [0.3, -0.2, 0.1]]))
        net[0].bias.zero_()
    g = build_graph(torch.fx.symbolic_trace(net.eval()), (3,), torch.float32)
    x = LpBall(torch.tensor([[0.2, 0.2, 0.1]]), 0.05, math.inf)
    C = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])
    boxes = crown(g, x, None).intermediate
    sound = crown(g, x, C, intermediate=boxes).spec_lower()
    rank = crown(g, x, C, intermediate=boxes, rigorous=False).spec_lower()
    assert (rank >= sound).all() and (rank > sound).any()
    fixed: dict = {}
    crown(g, x, C, intermediate=boxes, fixed=fixed, rigorous=False)
    with pytest.raises(ValueError, match="rigorous"):
        crown(g, x, C, intermediate=boxes, fixed=fixed)


def test_methods_run_with_tf32_off_and_the_settings_come_back():
    """On CUDA, float32 products and convolutions may run in TF32 (round-off 2^-11): every method
    runs inside ``ieee_float32``, which turns TF32 off and restores the user's settings, also
    after an exception. (The numbers on a GPU: tests/test_cuda.py.)"""
    import verify
    from verify.precision import ieee_float32

    mm, cv = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (mm.allow_tf32, cv.allow_tf32)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen.append((mm.allow_tf32, cv.allow_tf32))
            return self.lin(x)

    try:
        mm.allow_tf32, cv.allow_tf32 = True, True
        verify.certify(Spy(), torch.rand(2, 4), 0, "crown", eps=0.01)
        assert seen and all(s == (False, False) for s in seen)
        assert (mm.allow_tf32, cv.allow_tf32) == (True, True)
        with pytest.raises(RuntimeError):
            with ieee_float32():
                assert (mm.allow_tf32, cv.allow_tf32) == (False, False)
                raise RuntimeError("inside")
        assert (mm.allow_tf32, cv.allow_tf32) == (True, True)
    finally:
        mm.allow_tf32, cv.allow_tf32 = before


def test_the_bound_engine_itself_runs_with_tf32_off(monkeypatch):
    """Library users who call the engine directly (``relax.bounds.bounds`` / ``crown``) get IEEE
    float32 too: the guard sits on the engine's entry points, not only on ``certify``."""
    import relax.bounds.crown as crown_mod
    from relax.bounds import bounds

    mm, cv = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (mm.allow_tf32, cv.allow_tf32)
    seen = []
    inner = crown_mod.interval_bounds

    def spy(*a, **k):
        seen.append((mm.allow_tf32, cv.allow_tf32))
        return inner(*a, **k)

    monkeypatch.setattr(crown_mod, "interval_bounds", spy)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    try:
        mm.allow_tf32, cv.allow_tf32 = True, True
        bounds(net, LpBall(torch.rand(2, 4), 0.1, math.inf), method="crown")
        assert seen and all(s == (False, False) for s in seen)
        assert (mm.allow_tf32, cv.allow_tf32) == (True, True)
    finally:
        mm.allow_tf32, cv.allow_tf32 = before


@pytest.mark.parametrize("w_batch", [1, 3, None])
def test_step_error_is_the_weighted_sum_of_absolute_coefficients(w_batch):
    """The round-off bound of a backward step, ``sum(|A| * w)`` per row and batch entry, for a
    weight shared by the batch, one per entry, and a broadcast one (last dim only)."""
    from relax.bounds.roundoff import step_error

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, 4, 6, generator=g, dtype=torch.float64)
    w = torch.rand(*((w_batch, 4, 6) if w_batch else (6,)), generator=g, dtype=torch.float64)
    want = (A.abs() * w).sum(dim=(2, 3))
    got = step_error(A, w)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def _cancelling_hidden_net(seed: int, margin_at: float | None = None):
    """``x [2] -> relu(W0 x + 40) [4] -> a . h``: rows of ``W0`` in pairs equal to 1e-6 and ``a``
    in pairs ``(s, -s)`` with ``s ~ 1e8``, so the backward step's ``a W0`` cancels to ~1e2 and its
    float32 round-off (~1e1 per entry) moves the bound by ~1e2 on the box ``[-11, -10]^2`` (every
    ReLU active: CROWN is exact there in real arithmetic). Returns the traced net, the box, and
    the exact minimum of ``a . h`` (rational arithmetic on the float32 weights). With
    ``margin_at``, a second output is the constant ``margin_at`` (a robustness spec on class 0)."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(seed)
    W0 = 0.5 + torch.rand(4, 2, generator=g)
    W0[1] = W0[0] * (1 + 1e-6 * torch.rand(2, generator=g))
    W0[3] = W0[2] * (1 + 1e-6 * torch.rand(2, generator=g))
    s = 1e8 * (1 + torch.rand(2, generator=g))
    a = torch.stack([s[0], -s[0], s[1], -s[1]])
    n_out = 1 if margin_at is None else 2
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, n_out))
    with torch.no_grad():
        net[0].weight.copy_(W0)
        net[0].bias.fill_(40.0)
        net[2].weight.zero_()
        net[2].weight[0].copy_(a)
        net[2].bias.zero_()
        if margin_at is not None:
            net[2].bias[1] = margin_at
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = (2,)
    ball = LpBall(torch.full((1, 2), -10.5), 0.5, math.inf)
    Wq = [[Fraction(float(v)) for v in row] for row in net[0].weight.detach()]
    aq = [Fraction(float(v)) for v in net[2].weight.detach()[0]]
    Ax = [sum(aq[i] * Wq[i][j] for i in range(4)) for j in range(2)]
    corner = [Fraction(-11) if c > 0 else Fraction(-10) for c in Ax]
    exact = sum(aq) * 40 + sum(c * x for c, x in zip(Ax, corner))
    return gm, ball, float(exact)


def test_backward_steps_cover_the_round_off_of_cancelling_coefficients():
    """The coefficients ``a W0`` of a backward step cancel (terms ~1e8, result ~1e2): without
    the steps' round-off allowance (``rigorous=False``) float32 CROWN lies above the exact
    minimum on most seeds by up to ~2e2; the rigorous bound never does. (Zeroing
    ``step_error`` makes this fail: the concretisation's own allowance scales with the small
    result, not with the cancelled terms.)"""
    from relax.bounds.crown import crown
    from relax.ir.graph import build_graph

    above = 0
    for seed in range(10):
        gm, ball, exact = _cancelling_hidden_net(seed)
        g = build_graph(gm, (2,), torch.float32)
        C = torch.ones(1, 1, 1)
        boxes = crown(g, ball, None).intermediate
        sound = float(crown(g, ball, C, intermediate=boxes).spec_lower())
        loose = float(crown(g, ball, C, intermediate=boxes, rigorous=False).spec_lower())
        above += loose > exact
        assert sound <= exact, f"seed {seed}: bound {sound} above the exact minimum {exact}"
    assert above >= 3, "float32 round-off no longer moves the allowance-free bound: the case is not real"


@pytest.mark.parametrize("method", ["crown", "deeppoly", "alpha-crown", "bab"])
def test_cancelling_coefficients_do_not_certify(method):
    """End to end: class 1 is a constant between the exact minimum of class 0's logit and the
    allowance-free float32 CROWN bound, so the allowance-free margin bound is positive while a
    point of the box has a negative exact margin. (Two guards keep this from certifying: the
    steps' allowance, tested alone above, and the methods' forward-pass check of points found.)"""
    from relax.bounds.crown import crown
    from relax.ir.graph import build_graph

    seed = next(s for s in range(10) if _is_moved_up(s))
    gm, ball, exact = _cancelling_hidden_net(seed)
    loose = float(crown(build_graph(gm, (2,), torch.float32), ball, torch.ones(1, 1, 1), rigorous=False).spec_lower())
    gm, ball, exact = _cancelling_hidden_net(seed, margin_at=(exact + loose) / 2)
    rows = torch.tensor([[[1.0, -1.0]]])
    assert float(crown(build_graph(gm, (2,), torch.float32), ball, rows, rigorous=False).spec_lower()) > 0
    cert = get_method(method).certify(gm, ball, Robust(torch.tensor([0])))[0]
    assert cert.status != "certified"


def _is_moved_up(seed: int) -> bool:
    from relax.bounds.crown import crown
    from relax.ir.graph import build_graph

    gm, ball, exact = _cancelling_hidden_net(seed)
    loose = crown(build_graph(gm, (2,), torch.float32), ball, torch.ones(1, 1, 1), rigorous=False).spec_lower()
    return float(loose) > exact + 20


@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv", "conv_nobias", "conv_transpose"])
def test_affine_term_magnitude_is_the_interval_rule_on_the_symmetric_box(kind):
    """Linear and convolution ops give their round-off term magnitude ``|W| M + |b|`` in one product
    (their own ``term_magnitude``); it equals the generic rule, the interval rule on ``[-M, M]``,
    which the round-off bounds of every engine are built on, on boxes of mixed signs."""
    from relax.bounds.roundoff import max_abs, term_magnitude
    from relax.ir.ops.affine import Conv, ConvTranspose, Linear

    g = torch.Generator().manual_seed(7)
    D = torch.float64
    if kind.startswith("linear"):
        W, b = torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
        op, shape = Linear(W, b), ((3, 4) if kind == "linear3d" else (4,))
    elif kind == "conv_transpose":
        W, b = torch.randn(2, 3, 3, 3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
        op, shape = ConvTranspose(W, b, (2, 2), (1, 1), (1, 1), (1, 1), 1, (2, 4, 4), (3, 8, 8)), (2, 4, 4)
    else:
        W, b = torch.randn(4, 2, 3, 3, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)
        op, shape = Conv(W, None if kind == "conv_nobias" else b, (2, 2), (1, 1), (1, 1), 1, (2, 6, 6), (4, 3, 3)), (2, 6, 6)
    lo = torch.randn(3, *shape, generator=g, dtype=D) * 10
    hi = lo + torch.rand(3, *shape, generator=g, dtype=D) * 5
    assert hasattr(op, "term_magnitude")  # the op's own rule, not the generic one, is what is checked
    own = term_magnitude(op, [(lo, hi)])
    M = max_abs(lo, hi)
    generic = max_abs(*op.interval((-M, M)))
    assert own.shape == generic.shape == op.forward(lo).shape
    assert torch.allclose(own, generic, rtol=1e-12, atol=0.0)
