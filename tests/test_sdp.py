"""relax.exact.sdp: the Raghunathan et al. SDP bound is sound (checked against the exact MILP value and
for arbitrary multipliers), and compared with CROWN and the triangle LP on the same instances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relax.exact.lp import initial_bounds, lp_lower_bounds, regions_of, relu_net
from relax.exact.milp import milp_verify
from relax.exact.sdp import _dual_bound, build_sdp, sdp_lower_bounds
from verify.registry import get_method
from verify.spec import LpBall, Robust




def _net(seed: int, n_in: int = 3, hidden: int = 8, n_out: int = 3) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = (n_in,)
    return gm


def _instance(seed: int, eps: float = 0.2):
    gm = _net(seed)
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lab = gm(x).argmax(1)
    spec = Robust(lab).linear(2, 3, dtype=torch.float64)
    return gm, LpBall(x, eps, "inf", 0.0, 1.0), spec, lab


def test_sdp_is_sound_and_compared_with_crown_and_lp():
    rows = []
    for seed in range(3):
        gm, ball, spec, _ = _instance(seed)
        crown = get_method("crown").lower_bounds(gm, ball, spec).double().cpu()
        lp = lp_lower_bounds(gm, ball, spec).lower
        sdp = sdp_lower_bounds(gm, ball, spec, triangle=False).lower
        sdp_tri = sdp_lower_bounds(gm, ball, spec, triangle=True).lower
        exact = torch.tensor(np.stack([o.group_lower for o in milp_verify(gm, ball, spec, exact=True, attack=False)]))
        # soundness: never above the exact minimum
        assert (sdp <= exact + 1e-7).all()
        assert (sdp_tri <= exact + 1e-7).all()
        # with the triangle constraint the SDP feasible set lies inside the LP's: never looser
        # than the LP beyond the solver's inaccuracy (our bound is verified, hence slightly lower)
        assert (sdp_tri >= lp - 1e-3).all()
        rows.append(torch.stack([crown, lp, sdp, sdp_tri, exact], -1).reshape(-1, 5))
    table = torch.cat(rows)
    # on these nets the plain SDP is at least as tight as CROWN on average (Raghunathan et al.)
    print("\n   crown       lp      sdp  sdp+tri    exact")
    for r in table.tolist():
        print(" ".join(f"{v:8.4f}" for v in r))
    assert table[:, 2].mean() >= table[:, 0].mean() - 1e-3


def test_dual_bound_is_valid_for_any_multipliers():
    """The weak-duality bound holds for arbitrary (even nonsense) multipliers: it never exceeds
    the exact minimum -- soundness does not depend on the solver."""
    gm, ball, spec, _ = _instance(1)
    net = relu_net(gm, (3,))
    ib, _ = initial_bounds(gm, net, ball, "crown")
    reg = regions_of(ball.select([0]))[0]
    bnds = [(l[0].numpy(), u[0].numpy()) for l, u in ib]
    prob = build_sdp(net, reg.lo, reg.hi, bnds)
    exact = milp_verify(gm, ball.select([0]), spec.select([0]), exact=True, attack=False)[0].group_lower
    WL, bL = net.layers[-1].W.numpy(), net.layers[-1].b.numpy()
    rows = spec.C[0].numpy() @ WL
    const = spec.C[0].numpy() @ bL
    rng = np.random.default_rng(0)
    for i in range(rows.shape[0]):
        c0 = np.zeros(prob.n * prob.n)
        c0[: prob.n] = prob.last.T @ rows[i]
        for _ in range(20):
            nu = rng.normal(size=len(prob.e)) * rng.choice([0.01, 1, 10])
            lam = np.abs(rng.normal(size=len(prob.h))) * rng.choice([0.01, 1, 10])
            assert _dual_bound(prob, c0, nu, lam) + const[i] <= exact[i] + 1e-9


def test_sdp_method_and_solvers():
    gm, ball, spec, lab = _instance(2, eps=0.05)
    a = sdp_lower_bounds(gm, ball, spec, solver="clarabel").lower
    b = sdp_lower_bounds(gm, ball, spec, solver="scs").lower
    assert torch.allclose(a, b, atol=5e-3)
    certs = get_method("sdp").certify(gm, ball, Robust(lab))
    lp = get_method("lp").certify(gm, ball, Robust(lab))
    for s, l in zip(certs, lp):
        assert s.status in ("certified", "unknown")
        if l.status == "certified":  # lp_first keeps LP proofs
            assert s.status == "certified"
    with pytest.raises(ValueError):
        sdp_lower_bounds(gm, ball, spec, solver="mosek")
