"""LipSDP: verified bounds are sound (>= exact constants, >= sampled gradients, radii <= minimal
distortion), never looser than the global bound, and the verification step repairs a
first-order solver's slightly infeasible answer."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from relax import lipschitz as lip
from relax.lipschitz import sdp as lipsdp
from relax.ir.dense import to_feedforward
from test_lipschitz import NORMS, fx, max_grad_norm, random_mlp, ray_min_distortion
from verify.registry import get_method
from verify.spec import LpBall, Robust



def _dense(net, shape):
    with torch.no_grad():
        return to_feedforward(fx(net), shape)


def exact_one_hidden(ff, c: np.ndarray) -> float:
    """Exact l2 Lipschitz constant of ``c^T f`` for a one-hidden-layer ReLU net whose first
    layer has full row rank (every activation pattern is realised): max over patterns D of
    ``||W_0^T D w||``."""
    W0 = ff.layers[0].W.numpy()
    w = ff.layers[1].W.numpy().T @ c
    return max(np.linalg.norm(W0.T @ (np.array(D) * w)) for D in itertools.product([0.0, 1.0], repeat=W0.shape[0]))


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_lipsdp_above_exact_and_below_global_one_hidden_layer(solver):
    net = random_mlp([7, 6, 3], "relu", seed=1, scale=2.0)
    ff = _dense(net, (7,))
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    L, res = lipsdp.lipsdp_rows(ff, C, solver=solver)
    G = lip.global_lipschitz(ff, C, 2.0, combine=False)
    for i in range(3):
        ex = exact_one_hidden(ff, C[i].numpy())
        assert float(L[i]) >= ex * (1 - 1e-12)
        assert float(L[i]) <= float(G[i]) * (1 + 1e-6)
    assert all(r.rho is not None for r in res)


def test_verification_repairs_scs_undershoot():
    """SCS at a loose tolerance stops below the optimum (its raw sqrt(rho) < Clarabel's); the
    verified value is >= Clarabel's optimum, as is any verified value."""
    net = random_mlp([2, 10, 30, 20, 2], "relu", seed=1, scale=2.0)
    ff = _dense(net, (2,))
    w = ff.layers[-1].W.numpy().T @ np.array([1.0, -1.0])
    ref = lipsdp.LipSDP(ff, "clarabel", eps=1e-8).solve_row(w)
    scs = lipsdp.LipSDP(ff, "scs", eps=1e-4, max_iters=3000).solve_row(w)
    raw_ref = math.sqrt(ref.rho_solver)
    raw_scs = math.sqrt(scs.rho_solver)
    assert raw_scs < raw_ref  # the under-shoot this test is about
    assert ref.L >= raw_ref * (1 - 1e-7)
    assert scs.L is not None and scs.L >= raw_ref * (1 - 1e-7)
    # and the verified values bound the sampled gradients
    emp = max_grad_norm(net, torch.tensor([1.0, -1.0], dtype=torch.float64), 2.0, -3 * torch.ones(2, dtype=torch.float64), 3 * torch.ones(2, dtype=torch.float64), n=300, steps=10)
    assert min(ref.L, scs.L) >= emp


def test_verify_rho_from_garbage_falls_back_to_feasible_point():
    net = random_mlp([5, 8, 6, 3], "relu", seed=2)
    ff = _dense(net, (5,))
    w = ff.layers[-1].W.numpy().T @ np.array([1.0, 0.0, -1.0])
    Ws = lipsdp._weights(ff)
    sizes = [W.shape[0] for W in Ws]
    for us in ([np.zeros(n) for n in sizes], [np.full(n, 1e6) for n in sizes], [np.full(n, np.nan) for n in sizes]):
        rho, info = lipsdp.verify_rho(ff, w, us)
        assert rho is not None and info["theta"] > 0
        M = lipsdp.lipsdp_matrix_u(ff, w, [(1 - info["theta"]) * np.nan_to_num(u) + info["theta"] * f for u, f in zip(us, lipsdp.feasible_point(Ws, lipsdp._betas(ff), w))], rho)
        d = lipsdp._jacobi(M)  # the blocks differ by orders of magnitude: check D M D (same sign)
        assert np.linalg.eigvalsh(d[:, None] * M * d[None, :])[-1] < 0
    # the feasible point alone reproduces (a multiple of) the naive bound, never less than exact
    emp = max_grad_norm(net, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 2.0, -3 * torch.ones(5, dtype=torch.float64), 3 * torch.ones(5, dtype=torch.float64), n=300, steps=10)
    assert math.sqrt(rho) >= emp


def test_congruent_matrix_matches_t_form():
    net = random_mlp([4, 5, 3, 2], "sigmoid", seed=3)
    ff = _dense(net, (4,))
    w = ff.layers[-1].W.numpy().T @ np.array([1.0, -1.0])
    g = np.random.default_rng(0)
    us = [g.uniform(0.5, 2.0, 5), g.uniform(0.5, 2.0, 3)]
    M_t = lipsdp.lipsdp_matrix(ff, w, [1 / u for u in us], 3.0)
    S = np.diag(np.concatenate([np.ones(4), *us]))
    assert np.allclose(S @ M_t @ S, lipsdp.lipsdp_matrix_u(ff, w, us, 3.0), atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_sdp_method_bounds_gradients_all_norms(act):
    net = random_mlp([3, 8, 6, 3], act, seed=4, scale=1.5)
    x = torch.rand(2, 3, dtype=torch.float64)
    with torch.no_grad():
        lab = net(x).argmax(1)
    m = get_method("lipschitz-sdp", lazy=False)
    spec = Robust(lab).linear(2, 3, dtype=torch.float64)
    for p in NORMS:
        L, _ = m.row_lipschitz(fx(net), LpBall(x, 0.1, p), spec, p)
        Lg, _ = get_method("lipschitz-global").row_lipschitz(fx(net), LpBall(x, 0.1, p), spec, p)
        assert (L <= Lg).all()
        for j in range(2):
            emp = max_grad_norm(net, spec.C[0, j], p, -2 * torch.ones(3, dtype=torch.float64), 2 * torch.ones(3, dtype=torch.float64), n=200, steps=10)
            assert float(L[0, j]) >= emp


@pytest.mark.parametrize("p", NORMS)
def test_sdp_radius_below_min_distortion_and_above_global(p):
    g = torch.Generator().manual_seed(8)
    net = random_mlp([2, 12, 10, 3], "relu", seed=6, scale=2.0)
    x = torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        lab = net(x).argmax(1)
    sdp = get_method("lipschitz-sdp").certify(fx(net), LpBall(x, 0.0, p), Robust(lab), find_radius=True)
    glob = get_method("lipschitz-global").certify(fx(net), LpBall(x, 0.0, p), Robust(lab), find_radius=True)
    for b in range(3):
        d = ray_min_distortion(net, x[b], int(lab[b]), p)
        assert sdp[b].radius <= d * (1 + 1e-3) + 1e-9
        assert sdp[b].radius >= glob[b].radius * (1 - 1e-12)


def test_lazy_rows_give_the_same_radii():
    net = random_mlp([3, 8, 6, 4], "relu", seed=9)
    x = torch.rand(4, 3, dtype=torch.float64)
    with torch.no_grad():
        lab = net(x).argmax(1)
    lazy = get_method("lipschitz-sdp", lazy=True).certify(fx(net), LpBall(x, 0.0, 2.0), Robust(lab), find_radius=True)
    full = get_method("lipschitz-sdp", lazy=False).certify(fx(net), LpBall(x, 0.0, 2.0), Robust(lab), find_radius=True)
    for a, b in zip(lazy, full):
        assert a.radius == pytest.approx(b.radius, rel=1e-9)
