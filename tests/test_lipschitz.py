"""Soundness of the global and local Lipschitz bounds and of the margin certificates.

* every bound >= the largest gradient dual norm found by sampling and by gradient ascent;
* every certified radius <= the minimal distortion of tiny 2-D nets found by a fine ray search
  (and by ``relax.exact.milp.minimum_distortion`` when that module exists);
* conv bounds (Fourier blocks, Gram iteration) >= the exact operator norm of the dense matrix.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from relax import lipschitz as lip
from relax.exact.milp import minimum_distortion
from relax.ir.dense import to_feedforward
from verify.registry import get_method
from verify.spec import Box, Linear, LinearSpec, LpBall, Robust

NORMS = [1.0, 2.0, math.inf]



# ------------------------------------------------------------------------------------------
# helpers (also used by tests/test_lipschitz_sdp.py)


def random_mlp(sizes: list[int], act: str = "relu", seed: int = 0, scale: float = 1.0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    A = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[act]
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(sizes[i + 1], sizes[i], generator=g) * scale / math.sqrt(sizes[i]))
            lin.bias.copy_(torch.randn(sizes[i + 1], generator=g) * 0.3)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(A())
    return nn.Sequential(*layers).double().eval()


def dual_norm_t(g: torch.Tensor, p: float) -> torch.Tensor:
    q = lip.dual_norm(p)
    return g.abs().amax(-1) if math.isinf(q) else g.norm(p=q, dim=-1)


def max_grad_norm(net: nn.Module, c: torch.Tensor, p: float, lo: torch.Tensor, hi: torch.Tensor, n: int = 2000, steps: int = 60, seed: int = 0) -> float:
    """Largest ``||grad c^T f||_q`` over random points of the box ``[lo, hi]`` ([n_in]) and
    after sign-gradient ascent on that norm (a lower bound on the true Lipschitz constant)."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, lo.numel(), generator=g, dtype=torch.float64)
    best = 0.0
    step = (hi - lo) / 20
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        y = net(x) @ c
        (gr,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        val = dual_norm_t(gr, p)
        best = max(best, float(val.detach().max()))
        (gx,) = torch.autograd.grad(val.sum(), x, allow_unused=True)
        if gx is None:  # piecewise-constant gradient (ReLU): random restarts instead
            gx = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = torch.max(torch.min(x + step * gx.sign(), hi), lo)
    # finite differences between random nearby pairs (catches kinks that autograd hides)
    xa = lo + (hi - lo) * torch.rand(n, lo.numel(), generator=g, dtype=torch.float64)
    d = torch.randn(n, lo.numel(), generator=g, dtype=torch.float64) * 1e-3
    with torch.no_grad():
        fd = ((net(xa + d) - net(xa)) @ c).abs()
    dn = d.abs().amax(1) if math.isinf(p) else d.norm(p=p, dim=1)
    return max(best, float((fd / dn).max()))


def ray_min_distortion(net: nn.Module, x0: torch.Tensor, label: int, p: float, n_dir: int = 2000, r_max: float = 4.0, n_r: int = 800) -> float:
    """Smallest ``||delta||_p`` along ``n_dir`` unit directions in 2-D where the argmax leaves
    ``label``: first sign change on a grid of ``n_r`` radii, refined by bisection. An upper
    bound on the minimal distortion; for 2-D inputs and this many directions a tight one."""
    th = torch.linspace(0, 2 * math.pi, n_dir + 1, dtype=torch.float64)[:-1]
    d = torch.stack([th.cos(), th.sin()], 1)
    d = d / (d.abs().amax(1, keepdim=True) if math.isinf(p) else d.norm(p=p, dim=1, keepdim=True))

    def margin(r: torch.Tensor) -> torch.Tensor:  # r [n_dir, R] -> [n_dir, R]
        with torch.no_grad():
            y = net((x0.view(1, 1, 2) + r.unsqueeze(-1) * d.view(-1, 1, 2)).view(-1, 2)).view(*r.shape, -1)
        return y[..., label] - torch.cat([y[..., :label], y[..., label + 1:]], -1).amax(-1)

    r = torch.linspace(0, r_max, n_r + 1, dtype=torch.float64)[1:].expand(n_dir, n_r)
    bad = margin(r) <= 0
    has = bad.any(1)
    if not has.any():
        return r_max
    first = bad.float().argmax(1)
    hi = r_max * (first + 1).double() / n_r
    lo = r_max * first.double() / n_r
    for _ in range(30):
        mid = (lo + hi) / 2
        b = margin(mid.unsqueeze(1)).squeeze(1) <= 0
        hi, lo = torch.where(b, mid, hi), torch.where(b, lo, mid)
    return float(hi[has].min())


def fx(net: nn.Module):
    return torch.fx.symbolic_trace(net)


# ------------------------------------------------------------------------------------------
# operator norms


def test_operator_norm_exact():
    A = torch.randn(7, 5, dtype=torch.float64)
    assert lip.operator_norm(A, 2.0) >= np.linalg.norm(A.numpy(), 2)
    assert lip.operator_norm(A, 2.0) <= np.linalg.norm(A.numpy(), 2) * (1 + 1e-8)
    assert lip.operator_norm(A, math.inf) >= np.linalg.norm(A.numpy(), np.inf)
    assert lip.operator_norm(A, 1.0) >= np.linalg.norm(A.numpy(), 1)


@pytest.mark.parametrize("stride,pad,dil,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2)])
def test_conv_bounds_dominate_exact_dense_norm(stride, pad, dil, groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=pad, dilation=dil, groups=groups).double()
    W = to_feedforward(fx(nn.Sequential(conv)), (4, 9, 9)).layers[0].W.detach().numpy()
    for p in NORMS:
        exact = np.linalg.norm(W, {1.0: 1, 2.0: 2, math.inf: np.inf}[p])
        for method in ("fourier", "gram"):
            b = lip._module_norm(conv, (4, 9, 9), p, method)
            assert b >= exact * (1 - 1e-12), (p, method, b, exact)
    f = lip.conv_fourier_norm(conv.weight, (9, 9), (pad, pad), (dil, dil), groups, "fourier")
    g = lip.conv_fourier_norm(conv.weight, (9, 9), (pad, pad), (dil, dil), groups, "gram")
    assert g >= f * (1 - 1e-12)
    # torch's spectral_norm-style power iteration on the reshaped kernel is NOT a bound in general;
    # our value must dominate the exact norm regardless
    assert f >= np.linalg.norm(W, 2)


# ------------------------------------------------------------------------------------------
# global bound


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("p", NORMS)
def test_global_bound_dominates_gradients(act, p):
    net = random_mlp([4, 12, 10, 3], act, seed=3, scale=1.5)
    ff = to_feedforward(fx(net), (4,))
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    L = lip.global_lipschitz(ff, C, p)
    lo, hi = -3 * torch.ones(4, dtype=torch.float64), 3 * torch.ones(4, dtype=torch.float64)
    for i in range(3):
        emp = max_grad_norm(net, C[i], p, lo, hi, n=200, steps=20)
        assert float(L[i]) >= emp, (i, float(L[i]), emp)


def test_global_module_path_matches_dense_on_mlp_and_bounds_cnn():
    torch.manual_seed(2)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double().eval()
    C = torch.tensor([[1.0, -1.0, 0, 0], [0, 0, 1.0, -1.0]], dtype=torch.float64)
    ff = to_feedforward(fx(cnn), (1, 8, 8))
    for p in NORMS:
        dense = lip.global_lipschitz(ff, C, p, combine=False)
        mod = lip.module_global_lipschitz(fx(cnn), (1, 8, 8), C, p, "fourier")
        assert (mod >= dense * (1 - 1e-12)).all()
    mlp = random_mlp([5, 7, 3])
    Cm = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    ffm = to_feedforward(fx(mlp), (5,))
    for p in NORMS:
        a = lip.global_lipschitz(ffm, Cm, p, combine=False)
        b = lip.module_global_lipschitz(fx(mlp), (5,), Cm, p)
        assert torch.allclose(a, b, rtol=1e-8)


def test_cnn_global_method_bounds_gradients():
    torch.manual_seed(4)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3), nn.Sigmoid(),
                        nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double().eval()
    C = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    flat = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), cnn)
    g = fx(cnn)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    for p in NORMS:
        emp = max_grad_norm(flat, C[0], p, torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64), n=60, steps=6)
        for cb in ("exact-dense", "fourier", "gram"):
            spec = LinearSpec(C.unsqueeze(0), torch.zeros(1, 1, dtype=torch.float64), torch.arange(1))
            L, _ = get_method("lipschitz-global", conv_bound=cb).row_lipschitz(g, LpBall(x, 0.1, p), spec, p)
            assert float(L[0, 0]) >= emp, (p, cb, float(L[0, 0]), emp)


# ------------------------------------------------------------------------------------------
# certificates: radius <= minimal distortion on 2-D nets


def _tiny_nets():
    return [random_mlp([2, 16, 16, 3], "relu", seed=s, scale=2.0) for s in (0, 1)] + [random_mlp([2, 12, 3], "sigmoid", seed=5, scale=3.0)]


@pytest.mark.parametrize("p", NORMS)
def test_radius_below_min_distortion_2d(p):
    g = torch.Generator().manual_seed(7)
    methods = [get_method("lipschitz-global"), get_method("lipschitz-local"), get_method("lipschitz-local", bounds="interval")]
    for net in _tiny_nets():
        x = torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1
        with torch.no_grad():
            lab = net(x).argmax(1)
        dist = [ray_min_distortion(net, x[b], int(lab[b]), p) for b in range(3)]
        radii = []
        for m in methods:
            certs = m.certify(fx(net), LpBall(x, 0.0, p), Robust(lab), find_radius=True, max_radius=4.0)
            radii.append([c.radius for c in certs])
            for b, c in enumerate(certs):
                assert c.radius <= dist[b] * (1 + 1e-3) + 1e-9, (m.name, b, c.radius, dist[b])
        # local (with the global bound as floor) is never below global
        assert all(l >= g_ * (1 - 1e-9) for l, g_ in zip(radii[1], radii[0]))


def test_lower_bounds_hold_on_samples_and_box():
    net = random_mlp([3, 10, 10, 4], "tanh", seed=9)
    x = torch.rand(5, 3, dtype=torch.float64)
    with torch.no_grad():
        lab = net(x).argmax(1)
    for method in ("lipschitz-global", "lipschitz-local"):
        m = get_method(method)
        for p in NORMS:
            ball = LpBall(x, 0.3, p)
            certs = m.certify(fx(net), ball, Robust(lab))
            spec = Robust(lab).linear(5, 4, dtype=torch.float64)
            pts = ball.sample(400)
            with torch.no_grad():
                vals = spec.values(net(pts.view(-1, 3)).view(400, 5, 4))  # [S, B, N]
            lower = torch.tensor([c.lower for c in certs], dtype=torch.float64)
            assert (vals >= lower.unsqueeze(0) - 1e-12).all()
        box = Box(x - 0.1, x + 0.2)
        certs = m.certify(fx(net), box, Robust(lab))
        assert all(c.norm == "box" for c in certs)
        pts = box.sample(300)
        with torch.no_grad():
            vals = spec.values(net(pts.view(-1, 3)).view(300, 5, 4))
        lower = torch.tensor([c.lower for c in certs], dtype=torch.float64)
        assert (vals >= lower.unsqueeze(0) - 1e-12).all()


def test_lipschitz_radii_never_exceed_the_milp_minimum_distortion():
    md = minimum_distortion
    net = fx(_tiny_nets()[0].float())  # the MILP engine runs float32 models
    x = torch.rand(3, 2) * 2 - 1
    with torch.no_grad():
        lab = net(x).argmax(1)
    exact = torch.as_tensor(md(net, x, lab, norm="inf", domain=(-4.0, 4.0), timeout=60.0), dtype=torch.float64).flatten()
    for method in ("lipschitz-global", "lipschitz-local"):
        certs = get_method(method).certify(net, LpBall(x, 0.0, math.inf, -4.0, 4.0), Robust(lab), find_radius=True, max_radius=4.0)
        for c, e in zip(certs, exact):
            assert c.radius <= float(e) * (1 + 1e-6) + 1e-6, (method, c.radius, float(e))


def test_closed_form_radius_matches_eps_verdict_and_linear_rows():
    net = random_mlp([3, 8, 3], seed=11)
    x = torch.rand(4, 3, dtype=torch.float64)
    with torch.no_grad():
        lab = net(x).argmax(1)
    m = get_method("lipschitz-global")
    r = torch.tensor([c.radius for c in m.certify(fx(net), LpBall(x, 0.0, 2.0), Robust(lab))])
    inside = m.certify(fx(net), LpBall(x, r * 0.999, 2.0), Robust(lab))
    outside = m.certify(fx(net), LpBall(x, r * 1.001 + 1e-12, 2.0), Robust(lab))
    assert all(c.status == "certified" for c, rr in zip(inside, r) if rr > 0)
    assert all(c.status != "certified" for c in outside)
    # a general Linear property: row y0 - y1 + 5 > 0 only
    prop = Linear(torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([5.0]))
    c = m.certify(fx(net), LpBall(x, 0.01, 2.0), prop)
    assert all(cc.status in ("certified", "falsified", "unknown") for cc in c)


def test_batch_of_one_equals_batch():
    net = random_mlp([3, 8, 8, 3], seed=12)
    x = torch.rand(4, 3, dtype=torch.float64)
    with torch.no_grad():
        lab = net(x).argmax(1)
    for method in ("lipschitz-global", "lipschitz-local"):
        m = get_method(method)
        full = m.certify(fx(net), LpBall(x, 0.05, 2.0), Robust(lab), find_radius=True)
        for b in range(4):
            one = m.certify(fx(net), LpBall(x[b:b + 1], 0.05, 2.0), Robust(lab[b:b + 1]), find_radius=True)[0]
            assert one.status == full[b].status
            assert one.radius == pytest.approx(full[b].radius, rel=1e-9, abs=1e-12)
