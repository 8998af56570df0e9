"""Binaries a MILP does not need (relax.exact.lp.NetEncoding.binaries_to_relax): a ReLU of the last
encoded layer whose output every active row weighs with a coefficient >= 0 keeps its exact value
with a continuous ``delta``. Checked against the all-binary MILP (the same optima), and shown to
matter: relaxing every binary changes the optima. Also the backends' private problem copy and
``set_integer``."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import relax.exact.lp as lp_mod
from relax.exact.lp import InputRegion, NetEncoding, encode, relu_net, tighten_bounds
from relax.exact.milp import milp_verify, minimum_distortion
from relax.solvers import LinearProgram, make_backend
from verify.spec import Box, Linear, Robust


def _net(sizes: tuple[int, ...], seed: int, scale: float = 2.0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(scale)
    gm = torch.fx.symbolic_trace(net)
    gm.input_shape = (sizes[0],)
    return gm


def _no_relaxation(monkeypatch) -> None:
    monkeypatch.setattr(NetEncoding, "binaries_to_relax", lambda self, rows: np.zeros(0, dtype=np.int64))


def _relax_all(monkeypatch) -> None:
    monkeypatch.setattr(NetEncoding, "binaries_to_relax", lambda self, rows: self.binaries())


def _cases():
    """(model, box, spec): one- and two-hidden-layer nets, a robustness spec (one row per group)
    and a spec with a two-row group whose rows weigh the neurons with mixed signs."""
    out = []
    for seed, sizes in ((0, (4, 16, 3)), (1, (5, 12, 10, 3)), (2, (3, 20, 4))):
        gm = _net(sizes, seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(2, sizes[0], generator=g, dtype=torch.float64)
        box = Box(x - 0.25, x + 0.25)
        with torch.no_grad():
            lab = gm(x).argmax(1)
        out.append((gm, box, Robust(lab).linear(2, sizes[-1], dtype=torch.float64)))
        K = sizes[-1]
        C = torch.zeros(3, K, dtype=torch.float64)
        C[0, 0], C[0, 1], C[1, 0], C[1, 2], C[2, 1], C[2, 2] = 1, -1, 1, -1, 1, -1
        prop = Linear(C, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64), torch.tensor([0, 0, 1]))
        out.append((gm, box, prop.linear(2, K, dtype=torch.float64)))
    return out


def _optima(cases) -> list[np.ndarray]:
    return [np.stack([o.group_lower for o in milp_verify(gm, box, spec, exact=True, attack=False, refine=False, solver="highs")])
            for gm, box, spec in cases]


def test_relaxed_binaries_keep_every_group_optimum(monkeypatch):
    cases = _cases()
    outs = [milp_verify(gm, box, spec, exact=True, attack=False, refine=False, solver="highs") for gm, box, spec in cases]
    relaxed = [np.stack([o.group_lower for o in out]) for out in outs]
    kept = [g["binaries"] for out in outs for o in out for g in o.details["groups"].values()]
    unstable = [o.details["milp"]["unstable"] for out in outs for o in out]
    assert min(kept) < max(unstable)  # some binaries were relaxed
    with monkeypatch.context() as m:
        _no_relaxation(m)
        full = _optima(cases)
    for a, b in zip(relaxed, full):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7)
    with monkeypatch.context() as m:
        _relax_all(m)  # the LP relaxation: lower on some group (the check above can fail)
        lp = _optima(cases)
    assert any(np.any(a < b - 1e-3) for a, b in zip(lp, full))


def test_binaries_to_relax_are_those_every_row_weighs_upward():
    gm = _net((3, 8, 2), 4, scale=3.0)
    net = relu_net(gm, (3,))
    reg = InputRegion(np.full(3, -1.0), np.full(3, 1.0))
    W0, b0 = net.layers[0].W.numpy(), net.layers[0].b.numpy()
    r = np.abs(W0).sum(1)
    enc = encode(net, reg, [(b0 - r, b0 + r)], integer=True)
    act, dc = enc.act_cols[0], enc.delta_cols[0]
    unst = np.flatnonzero(dc >= 0)
    assert len(unst) == 8
    rows = np.zeros((2, enc.lp.num_cols))
    rows[0, act] = np.linspace(-1, 1, 8)
    rows[1, act] = np.tile([1.0, 1.0, -1.0, -1.0], 2)
    got = set(enc.binaries_to_relax(sp.csr_matrix(rows)).tolist())
    both = (rows[0, act] >= 0) & (rows[1, act] >= 0)
    assert got == set(dc[both].tolist()) and len(got) == 2
    assert set(enc.binaries_to_relax(sp.csr_matrix(rows[:1])).tolist()) == set(dc[rows[0, act] >= 0].tolist())
    assert len(enc.binaries_to_relax(sp.csr_matrix(-np.abs(rows)))) == 0


def test_refined_bounds_equal_the_all_binary_milp(monkeypatch):
    gm = _net((4, 10, 10, 10, 2), 5, scale=2.5)
    net = relu_net(gm, (4,))
    reg = InputRegion(np.full(4, -0.5), np.full(4, 0.5))
    bnds: list = []
    lo, hi = reg.lo, reg.hi
    for k in range(3):  # interval bounds
        W, b = net.layers[k].W.numpy(), net.layers[k].b.numpy()
        l = np.maximum(W, 0) @ lo + np.minimum(W, 0) @ hi + b
        u = np.maximum(W, 0) @ hi + np.minimum(W, 0) @ lo + b
        bnds.append((l, u))
        lo, hi = np.maximum(l, 0), np.maximum(u, 0)
    init = lp_mod._NeuronSolves.__init__

    def to_optimality(self, *a, **k):  # no early stop once a neuron is proved stable
        init(self, *a, **k)
        self.stop_stable = None

    monkeypatch.setattr(lp_mod._NeuronSolves, "__init__", to_optimality)
    new, st = tighten_bounds(net, reg, bnds, solver="highs", integer=True, rel_gap=0.0, abs_gap=0.0)
    assert st["lps"] > 0
    with monkeypatch.context() as m:
        _no_relaxation(m)
        ref, _ = tighten_bounds(net, reg, bnds, solver="highs", integer=True, rel_gap=0.0, abs_gap=0.0)
    for (l1, u1), (l0, u0) in zip(new, ref):
        np.testing.assert_allclose(l1, l0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(u1, u0, rtol=1e-6, atol=1e-6)


def test_minimum_distortion_unchanged_by_the_relaxation(monkeypatch):
    gm = _net((3, 14, 3), 6, scale=2.0)
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    d = minimum_distortion(gm, x, gm(x).argmax(1), "inf", domain=(-2.0, 2.0), solver="highs", timeout=30)
    with monkeypatch.context() as m:
        _no_relaxation(m)
        ref = minimum_distortion(gm, x, gm(x).argmax(1), "inf", domain=(-2.0, 2.0), solver="highs", timeout=30)
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("solver", ["highs", "gurobi"])
def test_backends_keep_a_private_problem_and_solve_an_all_continuous_one_as_an_lp(solver):
    from relax import solvers

    if solver == "gurobi" and not solvers.gurobi_available()[0]:
        pytest.skip("Gurobi unavailable: " + solvers.gurobi_available()[1])
    rng = np.random.default_rng(0)
    n, m = 6, 5
    A = sp.csr_matrix(rng.normal(size=(m, n)))
    lp = LinearProgram(A, np.full(m, -1.0), np.full(m, 1.0), np.zeros(n), np.ones(n), np.zeros(n), integer=np.r_[np.ones(3, bool), np.zeros(3, bool)])
    c = rng.normal(size=n)
    b1, b2 = make_backend(lp, solver), make_backend(lp, solver)
    b1.set_objective(c)
    b2.set_objective(-c)
    b1.set_integer(np.arange(3), np.zeros(3, bool))
    assert np.all(lp.c == 0) and lp.integer is not None and lp.integer[:3].all()  # the caller's problem is untouched
    assert np.array_equal(b2.lp.c, -c) and b2.lp.is_mip and not b1.lp.is_mip
    r_lp = b1.solve()
    r_mip = b2.solve(rel_gap=0.0, abs_gap=0.0)
    assert r_lp.status == "optimal" and "nodes" not in r_lp.extra  # solved as an LP, with its safe dual bound
    b2.set_objective(c)
    r_int = b2.solve(rel_gap=0.0, abs_gap=0.0)
    assert r_mip.status == r_int.status == "optimal"
    assert r_lp.bound <= r_int.objective + 1e-9
    b1.set_integer(np.arange(3), np.ones(3, bool))
    r_back = b1.solve(rel_gap=0.0, abs_gap=0.0)
    assert r_back.objective == pytest.approx(r_int.objective, abs=1e-7)


def test_highs_models_of_other_thread_counts_solve_in_one_process():
    """HiGHS sizes one thread scheduler per process at its first solve; a later model asking
    for more threads must still solve (it failed with status "Not Set" before)."""
    rng = np.random.default_rng(1)
    n, m = 6, 5
    lp = LinearProgram(sp.csr_matrix(rng.normal(size=(m, n))), np.full(m, -1.0), np.full(m, 1.0), np.zeros(n), np.ones(n),
                       rng.normal(size=n), integer=np.r_[np.ones(3, bool), np.zeros(3, bool)])
    objectives = []
    for threads in (1, 2, 1, 3):
        r = make_backend(lp, "highs", threads=threads).solve(rel_gap=0.0, abs_gap=0.0)
        assert r.status == "optimal", (threads, r.status, r.message)
        objectives.append(r.objective)
    assert max(objectives) - min(objectives) < 1e-9
