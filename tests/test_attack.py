"""Attacks: closed-form checks on linear models, set membership, batch invariance,
confirmation of counterexamples (forward pass, float64 re-run, onnxruntime)."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from torch import nn

from verify.attack import (
    AttackResult,
    confirm_counterexample,
    pgd_attack,
    random_attack,
    repair_counterexample,
)
from verify.confirm import confirm, onnx_runner
from verify.spec import Box, Linear, LinearSpec, LpBall

N_IN, K, G = 10, 4, 3



def linear_model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(N_IN, K).double()


def make_set(kind: str, B: int, gen: torch.Generator, scale: float = 1.0):
    c = torch.rand(B, N_IN, generator=gen, dtype=torch.float64) * 2 - 1
    if kind == "box":
        w = torch.rand(B, N_IN, generator=gen, dtype=torch.float64) * 0.5 * scale
        return Box(c - w, c + w)
    p = {"linf": math.inf, "l2": 2.0, "l1": 1.0}[kind]
    return LpBall(c, (torch.rand(B, generator=gen, dtype=torch.float64) * 0.5 + 0.1) * scale, p)


def min_over_set(a: torch.Tensor, s) -> torch.Tensor:
    """Exact min of ``a[b] . x`` over set ``b``; ``a [B, n]`` -> ``[B]``."""
    if isinstance(s, Box):
        return torch.minimum(a * s.lo, a * s.hi).sum(dim=1)
    dual = {math.inf: 1.0, 2.0: 2.0, 1.0: math.inf}[s.p]
    return (a * s.center).sum(dim=1) - s.eps * a.norm(p=dual, dim=1)


def closed_form_spec(model: nn.Linear, s, targets: torch.Tensor, gen: torch.Generator) -> LinearSpec:
    """G one-row groups ``c_g . y + d_g`` whose exact minimum over the set is ``targets [B]``
    (group 0 attains it, the others sit higher)."""
    B = targets.shape[0]
    Cm = torch.randn(B, G, K, generator=gen, dtype=torch.float64)
    W, bias = model.weight.detach(), model.bias.detach()
    a = Cm @ W  # [B, G, n]: row g = a_g . x + c_g . bias + d_g
    mins = torch.stack([min_over_set(a[:, g], s) for g in range(G)], dim=1) + Cm @ bias
    offsets = torch.rand(B, G, generator=gen, dtype=torch.float64) * 0.5
    offsets[:, 0] = 0
    d = targets.unsqueeze(1) + offsets - mins
    return LinearSpec(Cm, d, torch.arange(G))


@pytest.mark.parametrize("kind", ["box", "linf", "l2", "l1"])
def test_pgd_matches_closed_form_minimum(kind):
    gen = torch.Generator().manual_seed(1)
    model = linear_model()
    B = 8
    s = make_set(kind, B, gen)
    targets = torch.tensor([-0.05, 0.05, -0.2, 0.2, -0.01, 0.01, -1.0, 1e-6], dtype=torch.float64)
    spec = closed_form_spec(model, s, targets, gen)
    res = pgd_attack(model, s, spec, steps=50, restarts=3)
    assert isinstance(res, AttackResult)
    assert res.found.tolist() == (targets < 0).tolist()
    # the point is in the set, so it can never beat the exact minimum
    assert (res.margin >= targets - 1e-9).all()
    assert (res.margin[res.found] <= 0).all()
    assert s.contains(res.x_adv, tol=1e-12).all()
    assert confirm_counterexample(model, s, spec, res.x_adv).tolist() == res.found.tolist()
    # without early exit PGD reaches the exact minimum of a linear function (to 1e-6)
    safe = targets > 0
    assert torch.allclose(res.margin[safe], targets[safe], atol=1e-6, rtol=0)


def test_pgd_never_reports_when_safe():
    gen = torch.Generator().manual_seed(2)
    model = linear_model(1)
    for kind in ("box", "linf", "l2", "l1"):
        s = make_set(kind, 6, gen)
        targets = torch.rand(6, generator=gen, dtype=torch.float64) * 1e-3 + 1e-9
        spec = closed_form_spec(model, s, targets, gen)
        res = pgd_attack(model, s, spec, steps=30, restarts=4, seed=3)
        assert not res.found.any()
        assert (res.margin > 0).all()
        ra = random_attack(model, s, spec, samples=300, chunk=64)
        assert not ra.found.any() and (ra.margin >= targets - 1e-9).all()


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """A small ReLU net whose decision changes within the unit cube (N(0, 1) weights)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(N_IN, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, K)).to(dtype)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.normal_()
                m.bias.normal_()
    return net


def robust_spec(model: nn.Module, x: torch.Tensor) -> LinearSpec:
    with torch.no_grad():
        lab = model(x).argmax(dim=1)
    B = x.shape[0]
    eye = torch.eye(K, dtype=torch.float64)
    rows = [[j for j in range(K) if j != int(lab[b])] for b in range(B)]
    C = torch.stack([eye[int(lab[b])] - eye[rows[b]] for b in range(B)])
    return LinearSpec(C, torch.zeros(B, K - 1, dtype=torch.float64), torch.arange(K - 1))


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_balls_with_domain_stay_inside(p):
    gen = torch.Generator().manual_seed(4)
    model = mlp()
    B = 6
    center = torch.rand(B, N_IN, generator=gen, dtype=torch.float64)
    center[:, :3] = torch.tensor([0.0, 1.0, 0.99])  # at / near the domain boundary
    s = LpBall(center, 0.3, p, domain_lo=0.0, domain_hi=1.0)
    spec = robust_spec(model, center)
    pgd = pgd_attack(model, s, spec, steps=25, restarts=3)
    rnd = random_attack(model, s, spec, samples=200)
    for res in (pgd, rnd):
        assert s.contains(res.x_adv, tol=1e-12).all()
        assert (res.x_adv >= 0).all() and (res.x_adv <= 1).all()
        assert confirm_counterexample(model, s, spec, res.x_adv).tolist() == res.found.tolist()
    assert pgd.found.sum() >= max(rnd.found.sum(), 1)


@pytest.mark.parametrize("kind", ["box", "l2", "l1"])
def test_batch_of_one_equals_batch_of_n(kind):
    gen = torch.Generator().manual_seed(5)
    model = mlp(1)
    B = 5
    s = make_set(kind, B, gen, scale=0.4)
    spec = robust_spec(model, s.midpoint())
    for attack in (lambda m, i, sp: pgd_attack(m, i, sp, steps=20, restarts=3, seed=7), lambda m, i, sp: random_attack(m, i, sp, samples=100, chunk=30, seed=7)):
        full = attack(model, s, spec)
        assert full.found.any() and not full.found.all()  # a mix makes the check meaningful
        for b in range(B):
            one = attack(model, s.select([b]), spec.select([b]))
            assert one.found.item() == full.found[b].item()
            torch.testing.assert_close(one.x_adv[0], full.x_adv[b], atol=1e-12, rtol=0)
            torch.testing.assert_close(one.margin[0], full.margin[b], atol=1e-12, rtol=0)


def test_seeded_runs_repeat():
    gen = torch.Generator().manual_seed(6)
    model = mlp(2)
    s = make_set("linf", 4, gen)
    spec = robust_spec(model, s.midpoint())
    a = pgd_attack(model, s, spec, steps=10, restarts=4, seed=11)
    b = pgd_attack(model, s, spec, steps=10, restarts=4, seed=11)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.found, b.found)
    a = pgd_attack(model, s, spec, steps=10, restarts=2, seed=11, targeted=False)
    assert confirm_counterexample(model, s, spec, a.x_adv).tolist() == a.found.tolist()
    a = random_attack(model, s, spec, samples=50, seed=11)
    b = random_attack(model, s, spec, samples=50, seed=11)
    assert torch.equal(a.x_adv, b.x_adv)


def test_float32_model_with_float64_set():
    gen = torch.Generator().manual_seed(7)
    model = mlp(3, torch.float32)
    s = make_set("box", 4, gen)
    spec = robust_spec(model, s.midpoint().float())
    res = pgd_attack(model, s, spec, steps=20)
    assert res.x_adv.dtype == torch.float64 and res.margin.dtype == torch.float64
    assert s.contains(res.x_adv).all()
    assert confirm_counterexample(model, s, spec, res.x_adv).tolist() == res.found.tolist()
    assert next(model.parameters()).dtype == torch.float32  # the float64 re-run used a copy


class DtypeLiar(nn.Module):
    """Violates the property in float32 but not in float64: PGD (run in float32) sees a
    counterexample that the float64 confirmation must reject."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, x):
        s = (x * self.w).sum(dim=1, keepdim=True)
        return s - 10.0 if x.dtype == torch.float32 else s + 10.0


def test_never_found_unless_confirmed():
    s = Box(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    spec = Linear(torch.tensor([[1.0]])).linear(2, 1, dtype=torch.float64)  # violated iff y <= 0
    for res in (pgd_attack(DtypeLiar(), s, spec, steps=5), random_attack(DtypeLiar(), s, spec, samples=20)):
        assert not res.found.any()
        assert (res.margin > 0).all()


def test_confirm_counterexample_membership_and_tolerance():
    model = linear_model()
    lo = torch.full((1, N_IN), 100.0, dtype=torch.float64)
    s = Box(lo, lo + 1)
    spec = LinearSpec(torch.zeros(1, 1, K, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0]))
    x = s.midpoint()
    assert confirm_counterexample(model, s, spec, x).item()  # C = 0, d = 0: every point violates
    assert confirm_counterexample(model, s, spec, s.hi + 101 * 2.0**-52).item()  # a unit of round-off out: tolerated
    assert not confirm_counterexample(model, s, spec, s.hi + 101 * 1e-9).item()  # outside: not a counterexample
    assert not confirm_counterexample(model, s, spec, s.hi + 1e-3).item()
    assert not confirm_counterexample(model, s, spec, torch.full_like(x, float("nan"))).item()
    spec_safe = LinearSpec(spec.C, torch.ones(1, 1, dtype=torch.float64), spec.groups)
    assert not confirm_counterexample(model, s, spec_safe, x).item()
    res = pgd_attack(model, s, spec, steps=3)
    assert res.found.item() and res.margin.item() == 0


def test_timeout_returns_points_in_the_set():
    gen = torch.Generator().manual_seed(8)
    model = mlp()
    s = make_set("l2", 3, gen)
    spec = robust_spec(model, s.midpoint())
    res = pgd_attack(model, s, spec, steps=1000, timeout=0.0)
    assert s.contains(res.x_adv, tol=1e-12).all()
    with pytest.raises(ValueError):
        pgd_attack(model, s, spec, restarts=0)


def _onnx_linear(path, W: np.ndarray, b: np.ndarray) -> None:
    from onnx import TensorProto, helper, numpy_helper

    n, k = W.shape[1], W.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)],
        "lin",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", k])],
        [numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = model.SerializeToString()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)


def test_the_users_check_runs_onnxruntime_on_the_file(tmp_path):
    """verify.confirm with onnxruntime: the point projected into the box in the file's input dtype,
    the output violating the property exactly; .onnx and .onnx.gz alike; an attack's counterexample
    on the torch twin passes it."""
    W = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = np.array([0.0, 0.5])
    _onnx_linear(tmp_path / "m.onnx", W, b)
    _onnx_linear(tmp_path / "z.onnx.gz", W, b)
    # violated iff y0 >= y1, i.e. row y1 - y0 <= 0 (VNN-LIB (>= Y_0 Y_1))
    spec = Linear(torch.tensor([[-1.0, 1.0]]))
    lo, hi = np.zeros(3), np.ones(3)
    for path in (tmp_path / "m.onnx", tmp_path / "z.onnx.gz"):
        runner = onnx_runner(path)
        assert runner.kind == "onnxruntime"
        assert confirm(runner, [1.0, 0.0, 0.0], lo, hi, spec).ok  # y = (1, 0.5)
        assert not confirm(runner, [0.0, 0.0, 0.0], lo, hi, spec).ok  # y = (0, 0.5)
    runner = onnx_runner(tmp_path / "m.onnx")
    # outside the box [0, 0.4]^3: projected to (0.4, 0, 0), y = (0.4, 0.5), not a violation
    c = confirm(runner, [1.0, 0.0, 0.0], lo, np.full(3, 0.4), spec)
    assert not c.ok and 0.39 < c.x[0] <= 0.4 and "does not violate" in c.why  # rounded into the box
    twin = nn.Linear(3, 2).double()
    with torch.no_grad():
        twin.weight.copy_(torch.from_numpy(W))
        twin.bias.copy_(torch.from_numpy(b))
    s = Box(torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    res = pgd_attack(twin, s, spec.linear(1, 2, dtype=torch.float64), steps=10)
    assert res.found.item()
    assert confirm(runner, res.x_adv[0].numpy(), lo, hi, spec).ok


@pytest.mark.parametrize("kind", ["box", "l1", "l2"])
def test_image_shaped_inputs_and_fx_graph(kind):
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, K)).double()
    model = torch.fx.symbolic_trace(net).eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    s = Box((x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1)) if kind == "box" else LpBall(x, 1.0, 1.0 if kind == "l1" else 2.0, 0.0, 1.0)
    spec = robust_spec(model, x)
    res = pgd_attack(model, s, spec, steps=10, restarts=2)
    assert res.x_adv.shape == x.shape
    assert s.contains(res.x_adv, tol=1e-12).all()
    assert confirm_counterexample(model, s, spec, res.x_adv).tolist() == res.found.tolist()


def test_random_attack_stops_at_its_timeout():
    """Each forward pass of this model takes 50 ms: 100,000 samples in chunks of 256 would take
    minutes, a 0.3 s timeout stops it after a few small chunks (carvana's UNet: 47 s of a 10 s
    budget before)."""
    import time

    gen = torch.Generator().manual_seed(3)
    inner = mlp(2)

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return inner(x)

    s = make_set("linf", 2, gen)
    spec = robust_spec(inner, s.midpoint())
    t = time.perf_counter()
    r = random_attack(Slow(), s, spec, samples=100_000, chunk=256, timeout=0.3)
    assert time.perf_counter() - t < 1.5
    assert r.x_adv.shape[-1] == s.midpoint().shape[-1]


# ----------------------------------------------------------------------------------------
# float32 sets: candidates are projected into the exact set in float64, never lost


def _corner_outside_ball(n: int, eps: float, seed: int) -> LpBall:
    """A float32 l_inf ball whose float32 lower corner ``fl32(c - eps)`` lies outside the exact
    ball ``c -/+ eps`` (in float64) in at least one coordinate; batch of one, ``[1, n]``."""
    gen = torch.Generator().manual_seed(seed)
    c = 0.5 + 0.5 * torch.rand(1, n, generator=gen, dtype=torch.float32)
    ball = LpBall(c, eps, math.inf)
    corner32 = ball.center - ball.eps.view(-1, 1)  # float32 arithmetic, rounded to nearest
    assert not ball.to(dtype=torch.float64).contains(corner32.double())[0]  # the premise of the test
    return ball


def test_float32_ball_counterexample_at_the_rounded_corner_is_found():
    """``y = sum(x)`` (float32), violated iff ``y <= thr``: only a sliver at the lower corner of the
    exact ball violates (margin -1e-4 there); PGD and corner samples of the random attack end
    one float32 step beyond that corner. The point projected into the exact ball (float64) is a
    counterexample; it must be reported, inside the set and confirmed (the float32 projection
    lost it)."""
    n = 2
    ball = _corner_outside_ball(n, 0.05, seed=0)
    model = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    exact_min = float((ball.center.double() - ball.eps.double()).sum())
    spec = LinearSpec(torch.ones(1, 1, 1, dtype=torch.float64), torch.tensor([[-(exact_min + 1e-4)]], dtype=torch.float64), torch.tensor([0]))
    attacks = {"pgd, 1 restart": lambda: pgd_attack(model, ball, spec, steps=10, restarts=1),
               "pgd, 3 restarts": lambda: pgd_attack(model, ball, spec, steps=10, restarts=3),
               "random": lambda: random_attack(model, ball, spec, samples=200, chunk=50)}
    for name, attack in attacks.items():
        res = attack()
        assert res.found.item(), name
        assert ball.to(dtype=torch.float64).contains(res.x_adv.double())[0]
        assert confirm_counterexample(model, ball, spec, res.x_adv).item()
        assert res.margin.item() == pytest.approx(-1e-4, abs=1e-6)


def _digits_setup(limit: int):
    """The shipped digits MLP (float32) and its correctly classified test digits among the first
    ``limit``: ``(net, x [n, 1, 8, 8] float32, labels [n], indices into the test split [n])``."""
    from verify.data import digits
    from verify.digits_model import load_digits_mlp

    x, y = digits("test", limit=limit)
    net = load_digits_mlp("noise")
    with torch.no_grad():
        ok = net(x).argmax(dim=1) == y
    return net, x[ok], y[ok], ok.nonzero().flatten()


def test_digit_21_keeps_its_counterexample_with_restarts():
    """Test digit 21 at l_inf 0.05: with 3 restarts one lane reached a float64 margin of -0.027,
    but the input stopped on its float32 margin and the returned point lay one float32 step
    outside the ball, so nothing was reported."""
    from verify.spec import Robust

    net, x, y, idx = _digits_setup(22)
    assert 21 in idx.tolist()
    x, y = x[idx == 21], y[idx == 21]
    ball = LpBall(x, 0.05, math.inf, 0.0, 1.0)
    spec = Robust(y).linear(1, 10, dtype=x.dtype)
    for restarts in (1, 3, 5):
        res = pgd_attack(net, ball, spec, steps=100, restarts=restarts, seed=0)
        assert res.found.item(), restarts
        assert ball.to(dtype=torch.float64).contains(res.x_adv.double())[0]
        assert confirm_counterexample(net, ball, spec, res.x_adv).item()


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_more_restarts_never_find_fewer(eps):
    """Restart 0 of a 5-restart run follows the same lanes as a 1-restart run, and an input stops
    only on a confirmed counterexample, so everything 1 restart finds, 5 find too (first 60 test
    digits; before the fix 5 restarts lost 1 of 3 at eps 0.05 and 7 of 11 at 0.1)."""
    from verify.spec import Robust

    net, x, y, _ = _digits_setup(60)
    ball = LpBall(x, eps, math.inf, 0.0, 1.0)
    spec = Robust(y).linear(len(y), 10, dtype=x.dtype)
    one = pgd_attack(net, ball, spec, steps=40, restarts=1, seed=0)
    five = pgd_attack(net, ball, spec, steps=40, restarts=5, seed=0)
    assert one.found.any()
    assert (five.found | ~one.found).all(), (one.found & ~five.found).nonzero().flatten().tolist()
    for res in (one, five):
        assert confirm_counterexample(net, ball, spec, res.x_adv).tolist() == res.found.tolist()


def test_candidate_checks_in_small_chunks_give_the_same_answer(monkeypatch):
    """Candidates are checked in chunks bounded by the spec's size (a 300-bus ml4acopf spec asked
    for 27 GB at once); one candidate per chunk gives the same points and margins."""
    import verify.attack as va

    gen = torch.Generator().manual_seed(4)
    model = mlp(1)
    s = make_set("linf", 3, gen, scale=0.3)
    spec = robust_spec(model, s.midpoint())
    a = pgd_attack(model, s, spec, steps=10, restarts=3, seed=2)
    monkeypatch.setattr(va, "CHECK_ELEMENTS", 1)
    b = pgd_attack(model, s, spec, steps=10, restarts=3, seed=2)
    assert torch.equal(a.found, b.found)
    assert torch.allclose(a.x_adv, b.x_adv, atol=1e-12) and torch.allclose(a.margin, b.margin, atol=1e-9)


def test_a_solver_point_on_the_boundary_is_repaired_into_a_counterexample():
    """A point exactly on the decision boundary (margin 0 up to round-off, as an LP / MILP optimum
    sits) is moved by a tiny signed-gradient step to a confirmed counterexample inside the set; a
    point far from any violation is never called one."""
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    spec = LinearSpec(torch.tensor([[[1.0, -1.0]]], dtype=torch.float64), torch.tensor([[1e-9]], dtype=torch.float64),
                      torch.tensor([0]))  # y0 - y1 + 1e-9: violated iff y1 >= y0 + 1e-9
    box = Box(torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    on_boundary = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert not bool(confirm_counterexample(model, box, spec, on_boundary)[0])
    ok, x, note = repair_counterexample(model, box, spec, on_boundary, group=0)
    assert ok and "step" in note
    assert bool(confirm_counterexample(model, box, spec, x)[0]) and bool(box.contains(x).all())
    ok, _, _ = repair_counterexample(model, box, spec, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert not ok
    # no set: the point itself, unmoved
    ok, x, _ = repair_counterexample(model, None, spec, on_boundary)
    assert not ok and torch.equal(x, on_boundary)


def test_pgd_from_given_starts_projects_them_and_descends_the_chosen_group():
    """``starts`` replace the midpoint and random restarts (projected into the set first); a
    start outside the set still yields a point inside it, and lanes targeting the violable group
    find the closed-form counterexample from a start next to it."""
    gen = torch.Generator().manual_seed(5)
    model = linear_model(2)
    s = make_set("linf", 1, gen)
    spec = closed_form_spec(model, s, torch.tensor([-0.05], dtype=torch.float64), gen)
    far = s.center + 10.0  # outside the ball
    res = pgd_attack(model, s, spec, steps=30, starts=far.unsqueeze(0), start_groups=[0])
    assert bool(res.found[0]) and bool(s.contains(res.x_adv, tol=1e-12).all())
    assert float(res.margin[0]) <= 0
    res_other = pgd_attack(model, s, spec, steps=0, starts=s.center.unsqueeze(0), start_groups=[1])
    assert float(res_other.margin[0]) >= float(res.margin[0])


def test_restarts_without_the_midpoint_start_at_random_points():
    """``from_midpoint=False`` (bab's second PGD, after restart 0 ran alone): no lane starts at the
    midpoint; the default starts one lane per group there; both keep the lane count and targets."""
    from verify.attack import _start_lanes

    gen = torch.Generator().manual_seed(8)
    s = make_set("linf", 3, gen)
    mid = s.midpoint()
    with_mid, t1 = _start_lanes(s, 4, 3, True, 0, None, None)
    without, t2 = _start_lanes(s, 4, 3, True, 0, None, None, from_midpoint=False)
    assert with_mid.shape == without.shape == (12, *mid.shape) and torch.equal(t1, t2)
    assert all(torch.equal(with_mid[i], mid) for i in range(4))
    assert not any(torch.equal(without[i, b], mid[b]) for i in range(12) for b in range(mid.shape[0]))
    lo, hi = s.bounds()
    assert ((without >= lo) & (without <= hi)).all()
    model = mlp(2)
    spec = robust_spec(model, s.midpoint())
    res = pgd_attack(model, s, spec, steps=10, restarts=2, seed=3, from_midpoint=False)
    assert confirm_counterexample(model, s, spec, res.x_adv).tolist() == res.found.tolist()
