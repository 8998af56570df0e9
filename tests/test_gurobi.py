"""The Gurobi path of relax.exact.lp / relax.exact.milp / relax.solvers, checked against HiGHS and brute force.

Runs only where gurobipy imports and its licence starts (the pip licence is enough: every model
here is small); otherwise every test skips with the reason. The licence-size tests need the
size-limited pip licence (they build a model just above its limits) and skip under a full one.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from relax import solvers
from relax.exact.lp import encode, lp_lower_bounds, regions_of, relu_net
from relax.exact.milp import _add_spec_rows, milp_verify, minimum_distortion
from relax.solvers import LinearProgram, make_backend, safe_dual_bound
from verify.attack import pgd_attack
from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust

_OK, _WHY = solvers.gurobi_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"Gurobi unavailable: {_WHY}")



def _net(n_in: int, hidden: int, n_out: int, seed: int, scale: float = 1.0, layers: int = 2) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, n_out))
    net = nn.Sequential(*mods)
    with torch.no_grad():
        net[0].weight.mul_(scale)
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = (n_in,)
    return gm


def _labels(gm, x):
    with torch.no_grad():
        return gm(x).argmax(1)


# ------------------------------------------------------------------------------------------
# the backend itself


def test_lp_and_qp_bounds_match_highs_and_are_safe():
    rng = np.random.default_rng(0)
    n, m = 12, 8
    A = sp.csr_matrix(rng.normal(size=(m, n)))
    lp = LinearProgram(A, np.full(m, -1.0), np.full(m, 1.0), -np.ones(n), np.ones(n), np.zeros(n))
    bh, bg = make_backend(copy.deepcopy(lp), "highs"), make_backend(copy.deepcopy(lp), "gurobi")
    assert bg.name == "gurobi" and bg.num_vars == n  # one variable per column, no slacks
    for k in range(4):
        c = rng.normal(size=n)
        bh.set_objective(c, 0.3)
        bg.set_objective(c, 0.3)
        if k == 2:  # row bounds change: an equality, a one-sided row, a freed row
            for be in (bh, bg):
                be.set_row_bounds([0, 1, 2], [0.2, -np.inf, -np.inf], [0.2, 0.5, np.inf])
        rh, rg = bh.solve(), bg.solve()
        assert rh.status == rg.status == "optimal"
        assert rg.bound <= rg.objective + 1e-12
        assert rg.bound == pytest.approx(rh.bound, abs=1e-7)
    # convex diagonal QP: the safe bound with the quadratic term is below the optimum and tight
    w = rng.uniform(0.5, 2.0, size=n)
    bg.set_objective(c, 0.1, qdiag=(np.arange(n), w))
    r = bg.solve()
    assert r.status == "optimal"
    assert r.bound <= r.objective + 1e-12 and r.objective - r.bound < 1e-5
    # any multipliers give a valid bound (weak duality), with or without the quadratic term
    for _ in range(5):
        y = rng.normal(size=m) * 3
        assert safe_dual_bound(bg.lp, c, y, 0.1, qdiag=(np.arange(n), w)) <= r.objective + 1e-9


def test_column_elimination_gives_the_same_milp():
    """The Gurobi MILP with the defined columns substituted (default for MIPs) has the optimum of
    the full model, and of HiGHS; so has the bound-focused model (no cuts, MIPFocus=3), whose
    dual bound is the optimum too."""
    gm = _net(4, 12, 3, 1, scale=2.0)
    net = relu_net(gm, (4,))
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))
    ball = LpBall(x, 0.2, "inf", 0.0, 1.0)
    from relax.exact.lp import initial_bounds

    ib, _ = initial_bounds(gm, net, ball, "interval")
    bnds = [(l[0].numpy(), u[0].numpy()) for l, u in ib]
    enc = encode(net, regions_of(ball)[0], bnds, integer=True)
    C = np.array([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])
    lp, rows, t_col, _, const = _add_spec_rows(enc, net, C, np.zeros(2), with_t=True)
    cost = np.zeros(lp.num_cols)
    cost[t_col] = 1.0
    vals = []
    for solver, elim, focus in (("highs", None, False), ("gurobi", False, False), ("gurobi", True, False), ("gurobi", True, True)):
        be = make_backend(copy.deepcopy(lp), solver, eliminate=elim, bound_focus=focus)
        if elim:
            assert be.num_vars < lp.num_cols
        be.set_objective(cost)
        be.set_row_bounds(rows, np.full(2, -np.inf), -const)
        be.set_col_bounds([t_col], [-100.0], [np.inf])
        r = be.solve(rel_gap=0.0, abs_gap=1e-9)
        assert r.status == "optimal"
        # the returned point is a full assignment of the original columns
        assert r.x.shape == (lp.num_cols,)
        Ax = lp.A @ r.x
        assert np.all(Ax >= lp.row_lo - 1e-6) and np.all(Ax[: enc.lp.num_rows] <= lp.row_hi[: enc.lp.num_rows] + 1e-6)
        assert r.bound == pytest.approx(r.objective, abs=1e-6)
        vals.append(r.objective)
    assert all(v == pytest.approx(vals[0], abs=1e-6) for v in vals[1:])


# ------------------------------------------------------------------------------------------
# lp and milp: Gurobi agrees with HiGHS


@pytest.mark.parametrize("p", [math.inf, 1.0])
def test_lp_and_milp_agree_with_highs_on_random_nets(p):
    for seed in range(3):
        gm = _net(4, 10, 3, seed, scale=2.0)
        x = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
        lab = _labels(gm, x)
        spec = Robust(lab).linear(3, 3, dtype=torch.float64)
        ball = LpBall(x, 0.15 if math.isinf(p) else 0.3, p, 0.0, 1.0)
        lg = lp_lower_bounds(gm, ball, spec, solver="gurobi")
        lh = lp_lower_bounds(gm, ball, spec, solver="highs")
        assert all(d["solver"] == "gurobi" for d in lg.details)
        torch.testing.assert_close(lg.lower, lh.lower, atol=1e-6, rtol=0)
        mg = milp_verify(gm, ball, spec, exact=True, attack=False, solver="gurobi")
        mh = milp_verify(gm, ball, spec, exact=True, attack=False, solver="highs")
        for a, b in zip(mg, mh):
            assert a.details["solver"] == "gurobi" and b.details["solver"] == "highs"
            np.testing.assert_allclose(a.group_lower, b.group_lower, atol=1e-5)
        # the methods: same status per input and radius, Gurobi vs HiGHS
        for name in ("lp", "milp"):
            cg = get_method(name, solver="gurobi").certify(gm, ball, Robust(lab))
            ch = get_method(name, solver="highs").certify(gm, ball, Robust(lab))
            assert [c.status for c in cg] == [c.status for c in ch], name
            if name == "milp":
                assert all(c.status in ("certified", "falsified") for c in cg)


def test_exact_linf_distortion_gurobi_equals_highs():
    gm = _net(4, 10, 3, 7, scale=2.0)
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(8))
    lab = _labels(gm, x)
    vg, dg = minimum_distortion(gm, x, lab, "inf", solver="gurobi", return_details=True, timeout=60)
    vh, dh = minimum_distortion(gm, x, lab, "inf", solver="highs", return_details=True, timeout=60)
    for a, b in zip(dg, dh):
        assert a.status == b.status
        assert a.details["solver"] == "gurobi" and b.details["solver"] == "highs"
    torch.testing.assert_close(vg, vh, atol=1e-5, rtol=0)
    for a, b in zip(dg, dh):
        assert a.lower == pytest.approx(b.lower, abs=1e-5)


# ------------------------------------------------------------------------------------------
# exact l_2 minimum distortion (MIQP)


def test_exact_l2_distortion_bounds_every_deterministic_radius_and_the_attack():
    gm = _net(6, 10, 3, 2, scale=4.0)  # three classes share the unit cube
    x = torch.rand(6, 6, generator=torch.Generator().manual_seed(3))
    lab = _labels(gm, x)
    exact, det = minimum_distortion(gm, x, lab, 2, solver="gurobi", return_details=True, timeout=60)
    assert all(d.status == "optimal" for d in det), [d.status for d in det]
    for d in det:
        assert d.lower <= d.value + 1e-9 and d.value - d.lower <= 1e-4 * (1 + d.value)
        assert d.details["milp"]["solver_variables"] <= 200  # fits the pip licence's MIQP limit
    # every deterministic method's certified l_2 radius is below the exact one
    # (bab decides one ball, it does not search radii: checked below at fixed radii)
    names = [n for n, c in list_methods().items() if c.guarantee == "deterministic" and "l2" in c.norms and n not in ("milp", "bab")]
    assert "crown" in names
    ball = LpBall(x, 0.0, 2, 0.0, 1.0)
    for name in names:
        opts = {"iterations": 5} if name == "alpha-crown" else {}
        certs = get_method(name, **opts).certify(gm, ball, Robust(lab), find_radius=True, max_radius=3.0)
        for b, c in enumerate(certs):
            assert c.radius <= exact[b] + 1e-6, f"{name}: radius {c.radius} > exact l2 minimum distortion {exact[b]}"
    # the milp method's l_2 radius sits just below the exact value
    certs = get_method("milp", solver="gurobi").certify(gm, ball, Robust(lab), find_radius=True, max_radius=3.0)
    for b, c in enumerate(certs):
        assert c.status == "certified"
        assert c.radius <= exact[b] + 1e-9 and c.radius >= det[b].lower - 1e-4
    # bab decides l_2 balls completely: certified at 0.9 d*, never at 1.1 d*
    for f in (0.9, 1.1):
        certs = get_method("bab").certify(gm, LpBall(x, exact.double() * f, 2, 0.0, 1.0), Robust(lab), timeout=60)
        for b, c in enumerate(certs):
            if f < 1:
                assert c.status == "certified", (b, c.status, c.details.get("reason"))
            else:
                assert c.status != "certified", (b, float(exact[b]))
    # an independent l_2 PGD attack never finds an adversarial example closer than the exact radius
    spec = Robust(lab).linear(6, 3)
    for r in (0.25, 0.5, 1.0, 2.0):
        res = pgd_attack(gm, LpBall(x, r, 2, 0.0, 1.0), spec, steps=50, restarts=3)
        for b in range(6):
            if bool(res.found[b]):
                dist = float((res.x_adv[b].double() - x[b].double()).norm())
                assert exact[b] <= dist + 1e-6, (b, float(exact[b]), dist)


def test_exact_l2_distortion_matches_a_dense_grid_on_2d():
    gm = _net(2, 10, 3, 0, scale=4.0)  # three classes on the unit square
    g = torch.linspace(0, 1, 401)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        pred = gm(X).argmax(1)
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(4))
    lab = _labels(gm, x)
    vals, det = minimum_distortion(gm, x, lab, 2, solver="gurobi", return_details=True, timeout=60)
    checked = 0
    for b in range(4):
        other = pred != lab[b]
        if not other.any():
            assert det[b].status == "no_adversarial"
            continue
        grid = float((X[other] - x[b]).norm(dim=1).min())
        # the grid's nearest other-class point is adversarial: d* <= grid; the grid misses
        # the boundary by at most half a cell diagonal
        assert det[b].lower <= grid + 1e-9
        assert vals[b] >= grid - math.sqrt(2) / 400 - 1e-9
        xc = det[b].counterexample.reshape(1, 2)
        with torch.no_grad():
            y = gm(xc.double().float())
        assert int(y.argmax(1)) != int(lab[b]) or float(y[0, lab[b]] - y[0].topk(2).values[1]) <= 0
        assert float((xc[0].double() - x[b].double()).norm()) == pytest.approx(float(vals[b]), abs=1e-6)
        checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------------------
# licence size limits


def _needs_size_limit():
    if solvers.gurobi_size_limits() is None:
        pytest.skip("the Gurobi licence here is not size-limited")


def test_licence_size_error_is_unknown_with_the_reason():
    _needs_size_limit()
    # MILP: 2100 inputs, more variables than the pip licence allows
    gm = _net(2100, 6, 3, 0, scale=0.2, layers=1)
    x = torch.rand(1, 2100, generator=torch.Generator().manual_seed(0))
    lab = _labels(gm, x)
    ball = LpBall(x, 0.01, "inf", 0.0, 1.0)
    c = get_method("milp", solver="gurobi", attack=False).certify(gm, ball, Robust(lab))[0]
    assert c.status == "unknown", c.details  # the LP screen and the MILP both hit the licence
    assert "size-limited license" in c.details["reason"]
    # "auto" uses HiGHS for models that do not fit, and decides the property
    a = get_method("milp", solver="auto", attack=False).certify(gm, ball, Robust(lab))[0]
    assert a.status in ("certified", "falsified")
    assert a.details["solver"] == "highs" or a.details.get("lp_proved_groups") == 2
    # l_2 MIQP: more than 200 variables with a quadratic objective
    gm2 = _net(150, 40, 3, 1, scale=3.0, layers=1)
    x2 = torch.rand(2, 150, generator=torch.Generator().manual_seed(1))
    lab2 = _labels(gm2, x2)
    certs = get_method("milp", solver="gurobi").certify(gm2, LpBall(x2, 0.5, 2, 0.0, 1.0), Robust(lab2), find_radius=True, max_radius=3.0)
    too_big = [c for c in certs if c.details["exact_radius"]["status"] == "error"]
    assert too_big, [c.details["exact_radius"] for c in certs]
    for c in too_big:
        assert c.status == "unknown" and c.radius == 0.0, (c.status, c.details)
        assert "size-limited license" in c.details["reason"]
    for c in certs:  # the others fit (few unstable neurons) and are decided
        assert c.status in ("unknown", "falsified", "certified")
