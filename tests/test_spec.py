"""Input sets and output properties: validation, geometry and the LinearSpec reading."""
import math

import pytest
import torch

from verify.spec import Box, Linear, LinearSpec, LpBall, OutputBounds, Robust, SpecError, TopK, parse_norm


def test_parse_norm_names():
    assert parse_norm("inf") == math.inf and parse_norm("linf") == math.inf
    assert parse_norm(2) == 2.0 and parse_norm("l1") == 1.0
    with pytest.raises(SpecError, match="norm"):
        parse_norm("l3")
    with pytest.raises(SpecError, match="norm"):
        parse_norm("banana")


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: LpBall(torch.zeros(2, 3), -0.1), "eps must be >= 0"),
        (lambda: LpBall(torch.zeros(2, 3), float("nan")), "NaN"),
        (lambda: LpBall(torch.full((2, 3), float("nan")), 0.1), "NaN"),
        (lambda: LpBall(torch.zeros(2, 3), torch.zeros(3)), "eps must be a scalar or shape"),
        (lambda: LpBall(torch.zeros(3), 0.1), "batch dimension"),
        (lambda: Box(torch.zeros(2, 3), torch.zeros(2, 4)), "shape"),
        (lambda: Box(torch.ones(2, 3), torch.zeros(2, 3)), "empty"),
        (lambda: Robust(torch.tensor([0.5])), "integers"),
        (lambda: TopK(0, k=0), "k must be"),
        (lambda: Linear(torch.zeros(2, 3), torch.zeros(3)), "rows"),
        (lambda: OutputBounds(), "lower, upper"),
    ],
)
def test_validation_messages(make, msg):
    with pytest.raises(SpecError, match=msg):
        make()


def test_robust_label_out_of_range():
    with pytest.raises(SpecError, match="out of range"):
        Robust(torch.tensor([5])).linear(1, 3)
    with pytest.raises(SpecError, match="labels for a batch"):
        Robust(torch.tensor([0, 1])).linear(3, 3)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_ball_sample_project_contains(p):
    g = torch.Generator().manual_seed(1)
    ball = LpBall(torch.rand(4, 2, 3, generator=g), torch.tensor([0.0, 0.05, 0.2, 1.0]), p, 0.0, 1.0)
    s = ball.sample(200, generator=g)
    assert s.shape == (200, 4, 2, 3)
    assert all(bool(ball.contains(s[i], tol=1e-6).all()) for i in range(200))
    far = torch.rand(4, 2, 3, generator=g) * 4 - 2
    proj = ball.project(far)
    assert bool(ball.contains(proj, tol=1e-6).all())
    # points already inside are fixed points of the projection
    assert torch.allclose(ball.project(s[0]), s[0], atol=1e-6)
    lo, hi = ball.bounds()
    assert bool(((s >= lo - 1e-7) & (s <= hi + 1e-7)).all())


def test_l1_projection_is_the_euclidean_projection():
    """Compare with a brute-force projection on a small example (scipy minimise)."""
    from scipy.optimize import minimize

    c = torch.zeros(1, 3, dtype=torch.float64)
    ball = LpBall(c, 1.0, 1)
    z = torch.tensor([[2.0, -0.5, 0.3]], dtype=torch.float64)
    got = ball.project(z)[0].numpy()
    cons = {"type": "ineq", "fun": lambda v: 1.0 - abs(v).sum()}
    ref = minimize(lambda v: ((v - z[0].numpy()) ** 2).sum(), x0=[0, 0, 0], constraints=[cons], method="SLSQP").x
    assert abs(got - ref).max() < 1e-4


def test_box_sample_inside_and_select():
    box = Box(torch.zeros(3, 5), torch.ones(3, 5) * torch.tensor([[1.0], [2.0], [3.0]]))
    s = box.sample(50)
    assert bool(box.contains(s[7]).all())
    sub = box.select([2])
    assert sub.batch_size == 1 and float(sub.hi.max()) == 3.0


def test_robust_rows_and_holds():
    spec = Robust(torch.tensor([2, 0])).linear(2, 4)
    y = torch.tensor([[0.0, 1.0, 3.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    # input 0: label 2 wins strictly; input 1: label 0 ties with class 1 -> not strictly robust
    assert spec.holds(y).tolist() == [True, False]
    assert spec.violation_margin(y).tolist() == [1.0, 0.0]


def test_topk_groups_semantics():
    K, k = 5, 2
    spec = TopK(torch.tensor([3]), k).linear(1, K)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        y = torch.randn(1, K, generator=g)
        in_topk = int((y[0] > y[0, 3]).sum()) < k
        assert bool(spec.holds(y)[0]) == in_topk


def test_linear_groups_dnf():
    # violation: (y0 <= y1 and y2 >= 1) or (y0 <= -5)
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    d = torch.tensor([0.0, 1.0, 5.0])
    spec = Linear(C, d, groups=[0, 0, 1]).linear(1, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        y = torch.randn(1, 3, generator=g) * 3
        viol = (y[0, 0] <= y[0, 1] and y[0, 2] >= 1) or (y[0, 0] <= -5)
        assert bool(spec.holds(y)[0]) == (not viol)


def test_output_bounds():
    spec = OutputBounds(lower=torch.tensor([0.0, -1.0]), upper=1.0).linear(1, 2)
    assert spec.holds(torch.tensor([[0.5, 0.0]])).item()
    assert not spec.holds(torch.tensor([[0.5, 1.5]])).item()
    assert not spec.holds(torch.tensor([[-0.1, 0.0]])).item()


def test_certified_by_requires_every_group():
    spec = LinearSpec(torch.zeros(1, 3, 2), torch.zeros(1, 3), torch.tensor([0, 0, 1]))
    assert spec.certified_by(torch.tensor([[-1.0, 0.5, 0.1]])).item()
    assert not spec.certified_by(torch.tensor([[-1.0, 0.5, -0.1]])).item()


def test_float32_radius_is_rounded_up_so_the_asked_ball_is_inside():
    ball = LpBall(torch.zeros(1, 2), 0.01)
    assert ball.eps.dtype == torch.float32
    assert float(ball.eps[0]) >= 0.01  # float32(0.01) would be 0.0099999998
    assert float(ball.eps[0]) - 0.01 < 1e-8


def test_ball_box_follows_changes_of_the_ball():
    """``LpBall.bounds`` keeps its last box for repeated calls, but never a stale one: an
    in-place change of the centre or radius, a new centre, or a write into the returned box
    gives a fresh box."""
    ball = LpBall(torch.zeros(1, 3), 0.5, math.inf)
    lo, hi = ball.bounds()
    assert ball.bounds()[0] is lo
    ball.center.add_(1.0)
    assert torch.all(ball.bounds()[0] > 0.4)
    ball.eps.mul_(2.0)
    assert torch.all(ball.bounds()[1] > 1.9)
    ball.center = torch.full((1, 3), -5.0)
    assert torch.all(ball.bounds()[1] < -3.9)
    lo, _ = ball.bounds()
    lo.fill_(7.0)
    assert torch.all(ball.bounds()[0] < -5.9)
