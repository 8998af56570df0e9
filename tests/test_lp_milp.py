"""relax.exact.lp / relax.exact.milp / relax.solvers: soundness, tightness order, exactness against brute force,
minimum distortion, group semantics, solver failures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch
from torch import nn

from relax import solvers
from relax.exact.lp import lp_lower_bounds
from relax.exact.milp import milp_verify, minimum_distortion
from relax.solvers import LinearProgram, SolverError, make_backend, resolve_solver, safe_dual_bound
from verify.attack import AttackResult, confirm_counterexample, pgd_attack
from verify.registry import get_method, list_methods
from verify.spec import Box, Linear, LinearSpec, LpBall, Robust




def _net(n_in: int, hidden: int, n_out: int, seed: int, scale: float = 1.0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    with torch.no_grad():
        net[0].weight.mul_(scale)
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = (n_in,)
    return gm


def _spec(gm, x: torch.Tensor) -> tuple[LinearSpec, torch.Tensor]:
    with torch.no_grad():
        y = gm(x)
    lab = y.argmax(1)
    return Robust(lab).linear(x.shape[0], y.shape[1], dtype=torch.float64), lab


# ------------------------------------------------------------------------------------------
# solvers


def test_safe_dual_bound_is_below_and_close_to_the_lp_optimum():
    rng = np.random.default_rng(0)
    n, m = 12, 8
    A = sp.csr_matrix(rng.normal(size=(m, n)))
    lp = LinearProgram(A, np.full(m, -1.0), np.full(m, 1.0), -np.ones(n), np.ones(n), rng.normal(size=n))
    be = make_backend(lp, "highs")
    for _ in range(5):
        c = rng.normal(size=n)
        be.set_objective(c, 0.3)
        r = be.solve()
        ref = scipy.optimize.linprog(c, A_ub=np.r_[A.toarray(), -A.toarray()], b_ub=np.ones(2 * m), bounds=[(-1, 1)] * n, method="highs")
        assert r.status == "optimal"
        assert r.bound <= ref.fun + 0.3 + 1e-12
        assert r.bound == pytest.approx(ref.fun + 0.3, abs=1e-6)
    # any multipliers give a valid bound (weak duality), also nonsense ones
    for _ in range(5):
        y = rng.normal(size=m) * 3
        assert safe_dual_bound(lp, c, y, 0.3) <= ref.fun + 0.3 + 1e-12


def test_solver_option_resolution():
    assert resolve_solver("highs") == "highs"
    assert resolve_solver("auto") in ("highs", "gurobi")
    with pytest.raises(ValueError, match="unknown solver"):
        resolve_solver("cplex")
    if not solvers.gurobi_available()[0]:
        with pytest.raises(SolverError, match="gurobi"):
            resolve_solver("gurobi")
        assert resolve_solver("auto") == "highs"


# ------------------------------------------------------------------------------------------
# tightness order and soundness


@pytest.mark.parametrize("p", [math.inf, 1.0])
def test_crown_le_lp_le_milp_exact_and_sound(p):
    for seed in range(3):
        gm = _net(4, 12, 3, seed)
        x = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
        spec, _ = _spec(gm, x)
        ball = LpBall(x, 0.15 if math.isinf(p) else 0.3, p, 0.0, 1.0)
        crown = get_method("crown").lower_bounds(gm, ball, spec).double().cpu()
        interval = get_method("interval").lower_bounds(gm, ball, spec).double().cpu()
        lp = lp_lower_bounds(gm, ball, spec).lower
        lp_ref = lp_lower_bounds(gm, ball, spec, refine=True).lower
        ex = milp_verify(gm, ball, spec, exact=True, attack=False)
        exact = torch.tensor(np.stack([o.group_lower for o in ex]))
        achieved = torch.tensor(np.stack([o.group_upper for o in ex]))
        assert (interval <= lp + 1e-5).all()
        assert (crown <= lp + 1e-5).all(), (crown, lp)
        assert (lp <= lp_ref + 1e-9).all()
        assert (lp_ref <= exact + 1e-6).all()
        assert (exact <= achieved + 1e-6).all() and (achieved - exact).abs().max() < 1e-5
        # sampled values are never below the exact minimum
        s = ball.sample(4000, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            vals = spec.values(gm.double()(s.double().reshape(-1, 4)).reshape(4000, 3, -1))
        gm.float()
        assert (vals.amin(0) >= exact - 1e-7).all()


def _region_brute_force(W, b, box_lo, box_hi, c_rows, grid=150):
    """Exact min over a 2-D box of each row ``c_rows @ net(x)`` by an LP over every activation
    region a dense grid visits (scipy's linprog, independent of relax.exact.lp)."""
    g0 = np.linspace(box_lo[0], box_hi[0], grid)
    g1 = np.linspace(box_lo[1], box_hi[1], grid)
    X = np.stack(np.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
    pats = []
    h = X
    for Wk, bk in zip(W[:-1], b[:-1]):
        z = h @ Wk.T + bk
        pats.append(z > 0)
        h = np.maximum(z, 0)
    key = np.concatenate(pats, 1)
    uniq = np.unique(key, axis=0)
    best = np.full(c_rows.shape[0], np.inf)
    for pat in uniq:
        # affine map of the region: x -> A x + c, with region constraints
        A = np.eye(2)
        c = np.zeros(2)
        A_ub, b_ub = [], []
        off = 0
        for Wk, bk in zip(W[:-1], b[:-1]):
            n = Wk.shape[0]
            s = pat[off : off + n]
            off += n
            Z, zc = Wk @ A, Wk @ c + bk
            # active: z >= 0 -> -Z x <= zc ; inactive: z <= 0 -> Z x <= -zc
            A_ub.append(np.where(s[:, None], -Z, Z))
            b_ub.append(np.where(s, zc, -zc))
            A, c = Z * s[:, None], zc * s
        Y, yc = W[-1] @ A, W[-1] @ c + b[-1]
        for i, row in enumerate(c_rows):
            r = scipy.optimize.linprog(row @ Y, A_ub=np.concatenate(A_ub), b_ub=np.concatenate(b_ub), bounds=list(zip(box_lo, box_hi)), method="highs")
            if r.status == 0:
                best[i] = min(best[i], r.fun + row @ yc)
    return best


def test_milp_equals_brute_force_on_2d_inputs():
    for seed in range(3):
        gm = _net(2, 8, 3, seed + 10, scale=3.0)
        x = torch.rand(2, 2, generator=torch.Generator().manual_seed(seed))
        spec, _ = _spec(gm, x)
        ball = LpBall(x, 0.2, "inf", 0.0, 1.0)
        ex = milp_verify(gm, ball, spec, exact=True, attack=False)
        W = [m.weight.detach().double().numpy() for m in gm.modules() if isinstance(m, nn.Linear)]
        b = [m.bias.detach().double().numpy() for m in gm.modules() if isinstance(m, nn.Linear)]
        lo, hi = ball.bounds()
        for i in range(2):
            bf = _region_brute_force(W, b, lo[i].double().numpy(), hi[i].double().numpy(), spec.C[i].numpy())
            bf = bf + spec.d[i].numpy()
            np.testing.assert_allclose(ex[i].group_lower, bf, atol=1e-6)


def test_group_semantics_multi_row_group():
    """One group of two rows: violated iff both rows <= 0 somewhere; the MILP value is
    min_x max(row_0, row_1), checked on a dense grid."""
    gm = _net(2, 8, 3, 5, scale=3.0)
    box = Box(torch.zeros(1, 2), torch.ones(1, 2))
    # rows: y0 - y1 + a, y0 - y2 + a  in one group; plus a single-row group y1 - y2 + 5
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    g = torch.linspace(0, 1, 301)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        Y = gm.double()(X.double())
    gm.float()
    vals = Y @ C.T
    for shift in (-float(vals[:, :2].amax(1).min()) + 0.05, -float(vals[:, :2].amax(1).min()) - 0.05):
        d = torch.tensor([shift, shift, 5.0], dtype=torch.float64)
        prop = Linear(C, d, torch.tensor([0, 0, 1]))
        spec = prop.linear(1, 3, dtype=torch.float64)
        ex = milp_verify(gm, box, spec, exact=True, attack=False)[0]
        grid_min = float((vals[:, :2] + shift).amax(1).min())
        assert ex.group_lower[0] <= grid_min + 1e-7
        assert ex.group_lower[0] >= grid_min - 0.05  # grid spacing 1/300, slopes ~ 10
        out = milp_verify(gm, box, spec)[0]
        if shift > -float(vals[:, :2].amax(1).min()):
            assert out.status in ("certified", "unknown")
        else:
            assert out.status == "falsified"
            xc = out.counterexample.reshape(1, 2)
            with torch.no_grad():
                assert not bool(spec.holds(gm.double()(xc.double()))[0])
            gm.float()


def test_falsified_counterexample_is_confirmed_and_in_the_set():
    gm = _net(4, 12, 3, 3, scale=4.0)
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    spec, lab = _spec(gm, x)
    ball = LpBall(x, 0.3, "inf", 0.0, 1.0)
    out = milp_verify(gm, ball, spec, attack=False)  # the MILP itself must find them
    assert sum(o.status == "falsified" for o in out) >= 2
    for i, o in enumerate(out):
        if o.status == "falsified":
            xc = o.counterexample.reshape(1, 4)
            assert xc.dtype == torch.float64  # the point as confirmed, not rounded to the model's float32
            assert bool(ball.select([i]).contains(xc, tol=1e-7)[0])
            # violated by the float32 model run on the point in its own dtype, and in float64
            assert bool(confirm_counterexample(gm, ball.select([i]), spec.select([i]), xc)[0])


# ------------------------------------------------------------------------------------------
# minimum distortion


@pytest.mark.parametrize("norm", ["inf", 1])
def test_minimum_distortion_matches_a_dense_grid_on_2d(norm):
    gm = _net(2, 10, 3, 0, scale=4.0)  # three classes on the unit square (seed 3 has one)
    g = torch.linspace(0, 1, 401)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        pred = gm(X).argmax(1)
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lab = gm(x).argmax(1)
    vals, det = minimum_distortion(gm, x, lab, norm, return_details=True, timeout=60)
    checked = 0
    for b in range(3):
        other = pred != lab[b]
        dist = (X[other] - x[b]).abs()
        dist = dist.amax(1) if norm == "inf" else dist.sum(1)
        grid = float(dist.min()) if other.any() else math.inf
        if math.isinf(vals[b]):  # no adversarial input anywhere in the domain
            assert det[b].status == "no_adversarial" and not other.any()
            continue
        assert det[b].lower <= vals[b] + 1e-9
        assert vals[b] - det[b].lower <= 1e-4 * (1 + vals[b])
        if math.isfinite(grid):
            # the grid's nearest other-class point is an adversarial example: d* <= grid;
            # the grid misses the boundary by at most one spacing (l_1: two coordinates)
            assert det[b].lower <= grid + 1e-9
            assert vals[b] >= grid - (2 if norm == 1 else 1) * (1 / 400) - 1e-9
            # the returned example really is adversarial at that distance
            xc = det[b].counterexample.reshape(1, 2)
            assert xc.dtype == torch.float64  # the point as confirmed, not rounded to the model's float32
            # adversarial for the float32 model run on the point in its own dtype, and in float64
            ball = LpBall(x[b:b + 1].double(), float(vals[b]) * (1 + 1e-9) + 1e-12, math.inf if norm == "inf" else 1.0, 0.0, 1.0)
            assert bool(confirm_counterexample(gm, ball, Robust(lab[b:b + 1]).linear(1, 3), xc)[0])
            d = (xc[0].double() - x[b].double()).abs()
            assert float(d.max() if norm == "inf" else d.sum()) == pytest.approx(float(vals[b]), abs=1e-6)
            checked += 1
    assert checked >= 2


def test_l2_distortion_needs_an_miqp_solver():
    """HiGHS has no MIQP: the exact l_2 distortion raises, and the milp method on an l_2 ball
    says "unknown" with the reason (never certified)."""
    gm = _net(2, 6, 3, 0)
    with pytest.raises(SolverError, match="MIQP"):
        minimum_distortion(gm, torch.rand(1, 2), torch.tensor([0]), norm=2, solver="highs")
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))
    _, lab = _spec(gm, x)
    for find in (False, True):
        for c in get_method("milp", solver="highs").certify(gm, LpBall(x, 0.05, 2, 0.0, 1.0), Robust(lab), find_radius=find, max_radius=1.0):
            assert c.status == "unknown" and c.radius == 0.0
            assert "MIQP" in c.details["reason"]


def test_exact_radius_bounds_every_registered_certified_radius():
    """Certified radius of every deterministic method <= exact minimum distortion (MILP)."""
    gm = _net(4, 10, 3, 7, scale=2.0)
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        lab = gm(x).argmax(1)
    exact, det = minimum_distortion(gm, x, lab, "inf", return_details=True, timeout=60)
    slow = {"milp", "bab", "sdp", "bab-input"}
    fast = {"alpha-crown": {"iterations": 5}}
    names = [n for n, c in list_methods().items() if c.guarantee == "deterministic" and "linf" in c.norms and n not in slow]
    assert "lp" in names
    ball = LpBall(x, 0.0, "inf", 0.0, 1.0)
    for name in names:
        opts = {k: v for k, v in fast.get(name, {}).items() if k in list_methods()[name].option_names()}
        certs = get_method(name, **opts).certify(gm, ball, Robust(lab), find_radius=True, max_radius=1.0)
        for b, c in enumerate(certs):
            assert c.radius <= exact[b] + 1e-6, f"{name}: radius {c.radius} > exact minimum distortion {exact[b]}"
    # the milp method's own radius (from the dual bound) sits just below the exact value
    certs = get_method("milp").certify(gm, ball.select([0, 1]), Robust(lab[:2]), find_radius=True)
    for b, c in enumerate(certs):
        assert c.radius <= exact[b] + 1e-9
        assert c.radius >= det[b].lower - 1e-4
        assert c.details["exact_radius"]["upper"] == pytest.approx(float(exact[b]), abs=1e-5)


# ------------------------------------------------------------------------------------------
# methods and failure handling


def test_lp_and_milp_methods_agree_with_each_other():
    gm = _net(4, 12, 3, 1)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    _, lab = _spec(gm, x)
    for eps in (0.05, 0.2):
        ball = LpBall(x, eps, "inf", 0.0, 1.0)
        lp = get_method("lp").certify(gm, ball, Robust(lab))
        mi = get_method("milp").certify(gm, ball, Robust(lab))
        for a, m in zip(lp, mi):
            assert m.status in ("certified", "falsified")  # small nets are decided
            if a.status == "certified":
                assert m.status == "certified"
            if m.status == "falsified":
                assert a.status != "certified"
    # l_1 balls too
    ball = LpBall(x, 0.2, 1, 0.0, 1.0)
    lp = get_method("lp").certify(gm, ball, Robust(lab))
    mi = get_method("milp").certify(gm, ball, Robust(lab))
    assert all(not (a.status == "certified" and m.status != "certified") for a, m in zip(lp, mi))


def test_solver_trouble_is_unknown_never_certified(monkeypatch):
    gm = _net(4, 12, 3, 1)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    _, lab = _spec(gm, x)
    ball = LpBall(x, 0.2, "inf", 0.0, 1.0)

    def broken(self, *a, **k):
        return solvers.SolveResult("error", message="simulated numerical trouble")

    monkeypatch.setattr(solvers.HighsBackend, "solve", broken)
    lp = get_method("lp", solver="highs").certify(gm, ball, Robust(lab))
    mi = get_method("milp", solver="highs", attack=False).certify(gm, ball, Robust(lab))
    assert all(c.status != "certified" for c in lp + mi)
    assert all("error" in c.details.get("reason", "") or c.status == "falsified" for c in mi)


def test_time_limit_gives_unknown_with_bound():
    gm = _net(8, 24, 4, 4, scale=2.0)
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(0))
    spec, lab = _spec(gm, x)
    ball = LpBall(x, 0.3, "inf", 0.0, 1.0)
    out = milp_verify(gm, ball, spec, time_limit=0.0, attack=False, refine=False)[0]
    assert out.status in ("unknown", "certified")  # certified only if the LP alone proves it
    if out.status == "unknown":
        assert "time limit" in out.details["reason"]


def test_an_unconfirmed_milp_solution_never_reads_as_no_adversarial(monkeypatch):
    """If no forward pass confirms the MILP's adversarial point, the result must not claim "none
    within eps_max": the MILP bound stays the lower bound and the status says so."""
    import relax.exact.milp as milp_mod

    gm = _net(2, 10, 3, 0, scale=4.0)
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(4))
    _, lab = _spec(gm, x)
    exact = minimum_distortion(gm, x, lab, "inf", eps_max=1.0)
    monkeypatch.setattr(milp_mod, "repair_counterexample", lambda model, inputs, spec, xs, *a, **k: (False, xs, "simulated: not confirmed"))

    def attack_confirming_nothing(*a, **k):
        res = pgd_attack(*a, **k)
        return AttackResult(torch.zeros_like(res.found), res.x_adv, res.margin)

    monkeypatch.setattr(milp_mod, "pgd_attack", attack_confirming_nothing)
    vals, det = minimum_distortion(gm, x, lab, "inf", eps_max=1.0, return_details=True)
    for b in range(3):
        if math.isinf(exact[b]):
            continue
        assert det[b].status == "unconfirmed" and math.isinf(vals[b])
        assert det[b].lower <= exact[b] + 1e-9 and det[b].certified_radius <= exact[b]


class _SkipMLP(nn.Module):
    """Skips around ReLU layers: a ReLU output two layers on, and the signed input to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.o = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(h))
        return self.o(torch.relu(self.c(g) + h)) + 0.5 * x[:, :3]


class _TinyUNet(nn.Module):
    """A down path, a transposed convolution up, and the concatenation with the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.mid = nn.Conv2d(2, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.dec = nn.Conv2d(4, 2, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        s = torch.relu(self.enc(x))
        u = torch.relu(self.up(torch.relu(self.mid(nn.functional.avg_pool2d(s, 2)))))
        return self.head(torch.relu(self.dec(torch.cat([u, s], 1))).flatten(1))


@pytest.mark.parametrize("make,shape", [(_SkipMLP, (4,)), (_TinyUNet, (1, 4, 4))])
def test_lp_and_milp_on_skip_connections_are_sound_and_exact(make, shape):
    """Networks whose values skip over ReLU layers (a ResNet's shortcut, a UNet's concatenation)
    have a dense view that carries the values across (:func:`relax.ir.dense.to_feedforward`):
    CROWN <= LP <= MILP = the value at the MILP's own witness, the CROWN boxes of the carried
    values are used (not the interval fallback), and no sampled or PGD point goes below the
    exact minimum."""
    from relax.exact.lp import initial_bounds, relu_net

    for seed in range(2):
        torch.manual_seed(seed)
        gm = torch.fx.symbolic_trace(make().eval())
        gm.input_shape = shape
        x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
        spec, _ = _spec(gm, x)
        ball = LpBall(x, 0.2, math.inf, 0.0, 1.0)
        net = relu_net(gm, shape)
        assert any(b.carry for bl in net.blocks for b in bl)
        assert initial_bounds(gm, net, ball)[1] == "crown+interval"
        crown = get_method("crown").lower_bounds(gm, ball, spec).double().cpu()
        lp = lp_lower_bounds(gm, ball, spec).lower
        ex = milp_verify(gm, ball, spec, exact=True, attack=False)
        exact = torch.tensor(np.stack([o.group_lower for o in ex]))
        achieved = torch.tensor(np.stack([o.group_upper for o in ex]))
        assert (crown <= lp + 1e-5).all(), (crown, lp)
        assert (lp <= exact + 1e-6).all()
        assert (achieved - exact).abs().max() < 1e-5
        s = ball.sample(4000, generator=torch.Generator().manual_seed(1))
        adv = pgd_attack(gm.double(), ball, spec, steps=30, restarts=2)
        with torch.no_grad():
            vals = spec.values(gm(s.double().reshape(-1, *shape)).reshape(4000, 2, -1))
            at_adv = spec.values(gm(adv.x_adv.double()))
        gm.float()
        assert (vals.amin(0) >= exact - 1e-7).all()
        assert (at_adv >= exact - 1e-7).all()
