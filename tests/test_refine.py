"""MILP refinement of intermediate bounds (relax/bab/tighten.py): refined bounds lie inside the old
ones, contain every reachable pre-activation (sampled points and the exact per-neuron extrema
of an exact MILP), use the solver's dual bound and never its incumbent, and branch-and-bound
with refinement agrees with a ground truth."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import relax.exact.lp as lp_mod
from relax.bab import RowSpec
from relax.ir.dense import AffineLayer, FeedForwardNet
from relax.exact.lp import InputRegion, encode
from relax.bab.tighten import refine_bounds
from relax.solvers import HighsBackend, SolveResult


class DenseNet:
    """A test net: dense layers ``Ws[k] [n_{k+1}, n_k]``, ``bs[k]`` with ReLUs between."""

    def __init__(self, Ws: list[torch.Tensor], bs: list[torch.Tensor], input_shape: tuple[int, ...]) -> None:
        self.Ws, self.bs, self.input_shape = Ws, bs, input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(x.shape[0], -1)
        for k, (W, b) in enumerate(zip(self.Ws, self.bs)):
            z = z @ W.T + b
            if k < len(self.Ws) - 1:
                z = torch.relu(z)
        return z


def _feedforward(net: DenseNet) -> FeedForwardNet:
    return FeedForwardNet(net.input_shape, [AffineLayer(W, b) for W, b in zip(net.Ws, net.bs)], ["relu"] * (len(net.Ws) - 1))


def intermediate_bounds(net: DenseNet, lo: torch.Tensor, hi: torch.Tensor, overrides: dict | None = None) -> list:
    """CROWN boxes ``[(l [1, n_k], u [1, n_k])]`` of the hidden layers, on the bound graph
    (``overrides``: ``{hidden layer: (l, u)}`` intersected first)."""
    from relax.bounds import intermediate_bounds as graph_boxes
    from verify import Box

    model = torch.fx.symbolic_trace(_module(net))
    names = [n.name for n in model.graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), torch.nn.Linear)][:-1]
    ov = None if overrides is None else {names[k]: (l, u) for k, (l, u) in overrides.items()}
    boxes = graph_boxes(model, Box(lo.reshape(1, -1), hi.reshape(1, -1)), "crown", dtype=torch.float64, bound_overrides=ov)
    return [(boxes[n][0].reshape(1, -1), boxes[n][1].reshape(1, -1)) for n in names]


def _net(seed: int, sizes=(6, 12, 12, 12, 12, 3)) -> DenseNet:
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(sizes[i + 1], sizes[i], generator=g, dtype=torch.float64) / math.sqrt(sizes[i]) * 1.5 for i in range(len(sizes) - 1)]
    bs = [torch.randn(sizes[i + 1], generator=g, dtype=torch.float64) * 0.3 for i in range(len(sizes) - 1)]
    return DenseNet(Ws, bs, (sizes[0],))


def _box(n: int, seed: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    c = torch.rand(1, n, generator=g, dtype=torch.float64) - 0.5
    return c - radius, c + radius


def _unstable(pre) -> list[int]:
    return [int(((l < 0) & (u > 0)).sum()) for l, u in pre]


def _samples(net: DenseNet, lo, hi, n=20000, seed=0) -> list[torch.Tensor]:
    """Pre-activations ``[n, n_k]`` of every hidden layer at random points and corners of the box."""
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(n, lo.shape[-1], generator=g, dtype=lo.dtype) * (hi - lo)
    x[: n // 4] = torch.where(torch.rand(n // 4, lo.shape[-1], generator=g) < 0.5, lo, hi)
    return _samples_at(net, x)


def _exact_extrema(net: DenseNet, lo, hi, pre) -> dict[tuple[int, int], tuple[float, float]]:
    """Exact ``(min z_j, max z_j)`` over the box of every neuron unstable in ``pre`` (layers >= 1),
    each as the pre-activation of the input of an optimal MILP solution (a reachable value),
    with the MILP's own optimum checked against it."""
    ff = _feedforward(net)
    reg = InputRegion(lo.reshape(-1).numpy(), hi.reshape(-1).numpy())
    b = [(l.reshape(-1).numpy(), u.reshape(-1).numpy()) for l, u in pre]
    out = {}
    for k in range(1, len(pre)):
        enc = encode(ff, reg, b, n_hidden=k, integer=True)
        M, const = enc.expr(k, net.Ws[k].numpy(), net.bs[k].numpy())
        be = HighsBackend(enc.lp)
        for j in np.flatnonzero((b[k][0] < 0) & (b[k][1] > 0)):
            row = M.getrow(j).toarray().ravel()
            vals = []
            for sign in (1.0, -1.0):
                be.set_objective(sign * row, sign * const[j])
                r = be.solve(rel_gap=0.0, abs_gap=0.0)
                assert r.status == "optimal"
                x = torch.from_numpy(r.x[enc.x_cols]).reshape(1, -1)
                z = _samples_at(net, x)[k][0, j].item()
                assert abs(z - sign * r.objective) < 1e-6
                vals.append(z)
            out[(k, int(j))] = (vals[0], vals[1])
    return out


def _samples_at(net: DenseNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-activations ``[n, n_k]`` of every hidden layer at the points ``x [n, n_0]``."""
    out, a = [], x
    for W, b in zip(net.Ws[:-1], net.bs[:-1]):
        z = a @ W.T + b
        out.append(z)
        a = torch.relu(z)
    return out


def _check_contains(new, zs, extrema, tol=1e-9) -> None:
    for k, ((l, u), z) in enumerate(zip(new, zs)):
        assert (z >= l - tol).all() and (z <= u + tol).all(), f"layer {k}: a sampled pre-activation lies outside the refined bounds"
    for (k, j), (zmin, zmax) in extrema.items():
        l, u = new[k][0][0, j].item(), new[k][1][0, j].item()
        assert l <= zmin + tol and zmax <= u + tol, (k, j, l, u, zmin, zmax)


@pytest.fixture(scope="module", params=[(9, 0.2)], ids=["net9-r0.2"])
def case(request):
    """A net with 4 hidden layers of 12 on a box in 6-D, its CROWN bounds (40-50 unstable
    ReLUs), sampled pre-activations and the exact per-neuron extrema."""
    seed, radius = request.param
    net = _net(seed)
    lo, hi = _box(6, 7, radius)
    pre = intermediate_bounds(net, lo, hi)  # CROWN
    assert sum(_unstable(pre)[1:]) > 10  # something to refine
    return net, lo, hi, pre, _samples(net, lo, hi), _exact_extrema(net, lo, hi, pre)


def test_refined_bounds_are_inside_the_old_and_contain_the_exact_range(case):
    net, lo, hi, pre, zs, extrema = case
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver="highs", rel_gap=0.0)
    assert st["lps"] > 0 and not st["stopped_at_deadline"]
    for (l0, u0), (l1, u1) in zip(pre, new):
        assert l1.shape == l0.shape and l1.dtype == l0.dtype
        assert (l1 >= l0).all() and (u1 <= u0).all() and (l1 <= u1).all()
    assert torch.equal(new[0][0], pre[0][0]) and torch.equal(new[0][1], pre[0][1])  # layer 0 untouched
    _check_contains(new, zs, extrema)
    # solved to optimality, the refinement of layer 1 is the exact range (up to the safety
    # slack; later layers' MILPs use refined, not exact, bounds of the layers before: exact too)
    for (k, j), (zmin, zmax) in extrema.items():
        l, u = new[k][0][0, j].item(), new[k][1][0, j].item()
        if zmax > 0:
            assert u <= zmax + 1e-3 * (1 + abs(zmax)), (k, j, u, zmax)
        if zmin < 0 < u:
            assert l >= zmin - 1e-3 * (1 + abs(zmin)), (k, j, l, zmin)
    assert _unstable(new) != _unstable(pre)  # strictly tighter than CROWN: neurons stabilised


def test_recomputation_between_layers_keeps_bounds_valid(case):
    """With ``recompute`` the layers after each refined one are recomputed (CROWN on the graph
    within the refined boxes): still inside the old bounds, still containing every reachable
    pre-activation, and tighter than refining without the recomputation."""
    net, lo, hi, pre, zs, extrema = case

    def recompute(b, k):
        got = intermediate_bounds(net, lo, hi, {j: b[j] for j in range(k + 1)})
        return [(torch.maximum(l0, l1), torch.minimum(u0, u1)) for (l0, u0), (l1, u1) in zip(b, got)]

    plain, _ = refine_bounds(_feedforward(net), lo, hi, pre, layers=2, solver="highs")
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=2, solver="highs", recompute=recompute)
    for (l0, u0), (l1, u1) in zip(pre, new):
        assert (l1 >= l0).all() and (u1 <= u0).all()
    _check_contains(new, zs, extrema)
    assert st["unstable_per_layer_after"] == _unstable(new)
    assert sum(_unstable(new)[3:]) < sum(_unstable(plain)[3:])  # layer 3 (not refined) tightened


def _no_early_stop(monkeypatch) -> None:
    """Every refinement MILP runs to optimality: no stop once its neuron is proved stable."""
    original = lp_mod.make_backend

    def no_early_stop(lp, solver="auto", **kw):
        be = original(lp, solver, **kw)
        solve = be.solve
        be.solve = lambda **k: solve(**{**k, "stop_bound_above": None})
        return be

    monkeypatch.setattr(lp_mod, "make_backend", no_early_stop)


@pytest.mark.parametrize("solver", ["highs", "auto"])
def test_early_stop_once_stable_keeps_the_verdicts(case, solver, monkeypatch):
    """A MILP stops once its dual bound proves the neuron stable: the same neurons end up
    stable as when every solve runs to optimality, and the bounds stay valid."""
    net, lo, hi, pre, zs, extrema = case
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, rel_gap=0.0)
    assert st["stopped_stable"] > 0
    _check_contains(new, zs, extrema)
    _no_early_stop(monkeypatch)
    full, st_full = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, rel_gap=0.0)
    assert st_full["stopped_stable"] == 0
    for (l, u), (lf, uf) in zip(new, full):
        assert torch.equal(l > 0, lf > 0) and torch.equal(u <= 0, uf <= 0)


@pytest.mark.parametrize("solver", ["highs", "auto"])
def test_parallel_workers_give_the_serial_bounds(case, solver, monkeypatch):
    """Two solver threads share a layer's neurons: every neuron's MILP is the same as in the
    serial run (each thread has its own copy of the layer's model), so are the bounds, up to
    the gap at which a solve may stop; with a deadline both stop and the bounds stay valid.
    The comparison runs every solve to optimality: a solve stopped once its neuron is proved
    stable ends wherever the solver's callback first saw the bound, which depends on timing
    (the early stop is checked in the test above)."""
    net, lo, hi, pre, zs, extrema = case
    with monkeypatch.context() as m:
        _no_early_stop(m)
        serial, st1 = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, rel_gap=0.0)
        par, st2 = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, rel_gap=0.0, workers=2)
    assert st2["lps"] == st1["lps"] > 0 and not st2["stopped_at_deadline"]
    for (l1, u1), (l2, u2) in zip(serial, par):  # up to the MILP's absolute gap (1e-4)
        torch.testing.assert_close(l2, l1, rtol=0, atol=2e-4)
        torch.testing.assert_close(u2, u1, rtol=0, atol=2e-4)
    cut, st3 = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, workers=2, solve_time_limit=3e-3,
                             deadline=time.perf_counter() + 0.05)
    _check_contains(cut, zs, extrema)


@pytest.mark.parametrize("solver", ["highs", "auto"])
def test_tiny_time_limit_keeps_bounds_valid(case, solver):
    """MILPs stopped after 3 ms (most of them before optimality) must still give valid bounds."""
    net, lo, hi, pre, zs, extrema = case
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver=solver, solve_time_limit=3e-3)
    _check_contains(new, zs, extrema)
    # a deadline already past: nothing is solved, nothing changes
    same, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, deadline=0.0)
    assert st["lps"] == 0 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(pre, same))


def test_stop_if_ends_refinement_after_the_layer_that_satisfies_it(case):
    """``stop_if`` sees the bounds after each refined layer but the last; once it returns
    True no later layer is solved, and the bounds so far stay valid."""
    net, lo, hi, pre, zs, extrema = case
    seen = []

    def stop_after_first(p):
        seen.append(_unstable(p))
        return True

    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver="highs", stop_if=stop_after_first)
    one, st1 = refine_bounds(_feedforward(net), lo, hi, pre, layers=1, solver="highs")
    assert st["stopped_by_check"] and len(seen) == 1 and st["lps"] == st1["lps"] > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(new, one))
    _check_contains(new, zs, extrema)
    calls = []
    _, st3 = refine_bounds(_feedforward(net), lo, hi, pre, layers=3, solver="highs", stop_if=lambda p: calls.append(1) is not None)
    assert not st3["stopped_by_check"] and len(calls) == 2 and st3["lps"] > st1["lps"]  # never after the last layer


def test_priority_sets_the_order_of_the_solves_and_keeps_bounds_valid(case, monkeypatch):
    """With ``priority`` the unstable neurons of a layer are solved in decreasing priority
    (so a deadline cuts the least important ones); the bounds are as valid as without."""
    net, lo, hi, pre, zs, extrema = case
    g = torch.Generator().manual_seed(3)
    prio = [torch.rand(l.shape, generator=g, dtype=l.dtype) for l, _ in pre]
    seen: list[np.ndarray] = []
    original = lp_mod.make_backend

    def recording(lp, solver="auto", **kw):
        be = original(lp, solver, **kw)
        set_objective = be.set_objective
        be.set_objective = lambda c, offset=0.0, **k: (seen.append(np.asarray(c).copy()), set_objective(c, offset, **k))[1]
        return be

    monkeypatch.setattr(lp_mod, "make_backend", recording)
    calls = []
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=1, solver="highs", priority=lambda p: calls.append(1) or prio)
    assert len(calls) == 1 and st["lps"] > 0
    _check_contains(new, zs, extrema)
    # which neuron each "max z_j" solve was for: its objective is minus row j of layer 1's expression
    ff = _feedforward(net)
    b = [(l.reshape(-1).numpy(), u.reshape(-1).numpy()) for l, u in pre]
    enc = encode(ff, InputRegion(lo.reshape(-1).numpy(), hi.reshape(-1).numpy()), b, n_hidden=1, integer=True)
    M, _ = enc.expr(1, net.Ws[1].numpy(), net.bs[1].numpy())
    rows = M.toarray()
    maxed = [j for c in seen for j in range(rows.shape[0]) if np.allclose(c, -rows[j])]
    l1, u1 = b[1]
    unstable = np.flatnonzero((l1 < 0) & (u1 > 0))
    assert sorted(maxed) == sorted(unstable.tolist())
    p1 = prio[1].reshape(-1).numpy()
    assert maxed == sorted(maxed, key=lambda j: -p1[j])


class _StoppedEarly(HighsBackend):
    """Solves to optimality, then reports a solve stopped at its time limit: an incumbent worse
    than the optimum by 0.5 (not a bound) and a valid dual bound 0.25 below the optimum."""

    def solve(self, **kw) -> SolveResult:
        r = super().solve(rel_gap=0.0, abs_gap=0.0)
        assert r.status == "optimal"
        return SolveResult("time_limit", objective=r.objective + 0.5, bound=r.objective - 0.25, x=r.x)


def test_uses_the_dual_bound_not_the_incumbent_of_a_stopped_milp(case, monkeypatch):
    net, lo, hi, pre, zs, extrema = case
    monkeypatch.setattr(lp_mod, "make_backend", lambda lp, solver="auto", **kw: _StoppedEarly(lp))
    new, st = refine_bounds(_feedforward(net), lo, hi, pre, layers=1)
    assert st["time_limited"] == st["lps"] > 0
    _check_contains(new, zs, extrema)
    # the bound used is the dual bound: 0.25 (plus slack) beyond the exact extremum, unless the
    # old bound was tighter; using the incumbent would put it 0.5 inside
    for (k, j), (zmin, zmax) in extrema.items():
        if k == 1:  # later layers' MILPs use these loosened bounds: their optimum moves
            u0 = pre[k][1][0, j].item()
            u = new[k][1][0, j].item()
            assert u == pytest.approx(min(u0, zmax + 0.25), abs=1e-4)


def _grid_margin_min(net: DenseNet, C: torch.Tensor, groups: torch.Tensor, n: int = 161) -> tuple[float, float]:
    """``(grid minimum of the spec margin over [-1, 1]^2, Lipschitz slack)``: the true minimum
    over the square lies in ``[gmin - slack, gmin]`` (slack = Lipschitz bound of the rows times
    half the grid cell's diagonal)."""
    pts = torch.cartesian_prod(torch.linspace(-1, 1, n, dtype=torch.float64), torch.linspace(-1, 1, n, dtype=torch.float64))
    rs0 = RowSpec(C, torch.zeros(C.shape[0], dtype=torch.float64), groups)
    gmin = float(rs0.margin(rs0.values(net.forward(pts))).min())
    lip = math.prod(float(torch.linalg.matrix_norm(W, ord=2)) for W in net.Ws[:-1]) * float(torch.linalg.matrix_norm(C @ net.Ws[-1], ord=2))
    return gmin, lip * (2.0 / (n - 1)) / math.sqrt(2)


def _module(net: DenseNet):
    """The dense net as a float64 ``nn.Sequential`` (the model ``bab`` works on)."""
    from torch import nn

    layers: list[nn.Module] = []
    for W, b in zip(net.Ws, net.bs):
        lin = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize("seed", [4, 5])
def test_bab_with_refinement_agrees_with_ground_truth(seed):
    """A 2-D net with three hidden layers of 16: the grid minimum of the margin (with a
    Lipschitz slack) gives a property that holds and one that fails; BaB with MILP refinement
    of layers 1-2 (reached in both: the root neither proves nor falsifies them; 50 ms per MILP,
    so many stop at the limit) must certify the first and falsify the second."""
    net = _net(20 + seed, sizes=(2, 16, 16, 16, 3))
    lo = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 1.0], dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    groups = torch.tensor([0, 1])
    gmin, slack = _grid_margin_min(net, C, groups)
    from verify import Box, Linear, certify

    model = _module(net)
    for truth, d0 in (("unsat", -gmin + slack + 0.02), ("sat", -gmin - 0.02)):
        rs = RowSpec(C, torch.full((2,), d0, dtype=torch.float64), groups)
        c = certify(model, Box(lo[None], hi[None]), Linear(C, rs.d), "bab", split="relu", refine_layers=2, refine_after=0.0,
                    refine_solve_time=0.05, timeout=20, dtype=torch.float64)[0]
        if c.status == "falsified":
            x = torch.as_tensor(c.counterexample, dtype=torch.float64).reshape(-1)
            assert ((x >= lo) & (x <= hi)).all()
            assert float(rs.margin(rs.values(net.forward(x[None])))[0]) <= 0
        else:  # decided by the search: the root was refined first
            assert c.details["stage"] == "graph-alpha-crown" or c.details["refine"]["lps"] > 0, c.details
        assert c.status == ("certified" if truth == "unsat" else "falsified"), (truth, c.status, c.details)


def test_graph_refinement_stops_once_the_root_is_proved():
    """After each refined layer (but the last) the root bound, recomputed within the refined
    boxes, is checked: with a margin every bound exceeds, refinement stops after the first
    layer and solves fewer MILPs than with one no bound reaches."""
    from relax.bab.activation_split import relu_inputs
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from relax.bab.tighten import refine_graph_root
    from verify import Box

    net = _net(24, sizes=(2, 16, 16, 16, 3))
    model = torch.fx.symbolic_trace(_module(net))
    graph, xs = prepare(model, Box(-torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)), torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    root = crown(graph, xs, None).intermediate
    far = time.perf_counter() + 60
    runs = {}
    for margin in (-1e9, 1e9):
        boxes, _, low, st = refine_graph_root(graph, model, xs, rs, root, None, layers=3, deadline=far, alpha_deadline=far, margin=margin,
                                              solve_time_limit=5.0)
        runs[margin] = st
        for _, p in relu_inputs(graph):  # never looser than the boxes it started from
            assert (boxes[p][0] >= root[p][0]).all() and (boxes[p][1] <= root[p][1]).all()
    assert runs[-1e9]["stopped_by_check"] and not runs[1e9]["stopped_by_check"]
    assert 0 < runs[-1e9]["lps"] < runs[1e9]["lps"]


@pytest.mark.parametrize("refine_after", [1e-6, 0.1])
def test_bab_method_with_refinement_decides_correctly(refine_after):
    """The ``bab`` method's path with refinement (a short plain BaB first, then BaB with MILP
    refinement on the rest of the budget) on a 2-D net with three hidden layers."""
    from verify import Box, Linear, certify

    net = _net(24, sizes=(2, 16, 16, 16, 3))
    model = _module(net)
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    gmin, slack = _grid_margin_min(net, C, torch.tensor([0]))  # the model computes net.forward
    for truth, d0 in (("unsat", -gmin + slack + 0.02), ("sat", -gmin - 0.02)):
        c = certify(model, Box(lo, hi), Linear(C, torch.tensor([d0], dtype=torch.float64)), "bab", split="relu", refine_layers=2,
                    refine_after=refine_after, refine_solve_time=0.05, timeout=20, dtype=torch.float64)[0]
        assert c.status == ("certified" if truth == "unsat" else "falsified"), (truth, c.status, c.details)
        if truth == "unsat" and refine_after < 1e-3:
            # the plain phase ends at once; the refined phase starts from the same root
            assert c.details["plain_bab_first"]["reason"] == "timeout" and c.details["refine"]["lps"] > 0, c.details
