"""smoothing-zhang: the ||z||^-k exp(-||z||^2/2s^2) noise of Zhang et al. 2020 and its bound.

* the sampler's law (the radius is s chi_{d-k}, the direction uniform, the per-coordinate std sigma);
* the bound's pieces: cell masses, ``Y <= Lambda`` on every cell and radius interval;
* closed form: k = 0 is the Gaussian, the radius stays below Cohen's sigma Phi^-1(pA) and close to it;
* monotone in pA;
* soundness against the worst classifier: for a shift rho, the Neyman-Pearson set
  ``{Lambda_rho <= tau}`` with smoothed probability exactly 1/2 at ``x + rho e_1`` (computed by
  large sampling) has probability pA at x; the certified radius at pA must be below rho;
* soundness in l_inf: a half-space classifier, the corners of the certified l_inf ball first,
  then random points of the ball, keeps probability >= 1/2 (and the same check catches a radius 20%
  above the exact Gaussian one);
* coverage at alpha by simulation: CERTIFY on a half-space classifier, wrong radii in at most alpha
  of independent inputs;
* the registered method: listed, l_inf = l2 / sqrt(d), bad k refused.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from smoothing.zhang import ZhangGrid, ZhangNoise, _cells, _log_ratio_lower, interval_threshold
from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust, SpecError

FAST = ZhangGrid(radius_cells=60, t_cells=160, intervals=60)


def _draw(d: int, k: int, sigma: float, m: int, seed: int = 0) -> np.ndarray:
    nz = ZhangNoise(sigma=sigma, k=k)
    g = torch.Generator().manual_seed(seed)
    return nz.sample((m, d), generator=g, dtype=torch.float64).numpy()


def _radius_angle(d: int, k: int, s: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws of (||z||, cosine to e_1) under pi_0 (independent laws)."""
    rng = np.random.default_rng(seed)
    return s * np.sqrt(rng.chisquare(d - k, m)), 2 * rng.beta((d - 1) / 2, (d - 1) / 2, m) - 1


def _log_lr(r, t, rho, k, s):
    r2 = r * r - 2 * rho * r * t + rho * rho
    return 0.5 * k * (np.log(r * r) - np.log(r2)) - (r2 - r * r) / (2 * s * s)


# --- sampler


@pytest.mark.parametrize("d,k", [(16, 6), (64, 40), (5, 0)])
def test_norm_is_scaled_chi_with_d_minus_k_degrees(d, k):
    sigma = 0.7
    z = _draw(d, k, sigma, 20_000)
    s = ZhangNoise(sigma=sigma, k=k).scale_for(d)
    r = np.linalg.norm(z, axis=1) / s
    assert stats.kstest(r, stats.chi(d - k).cdf).pvalue > 1e-3
    # direction uniform: the cosine to e_1 has the Beta law, and it is independent of the norm
    t = z[:, 0] / np.linalg.norm(z, axis=1)
    assert stats.kstest((1 + t) / 2, stats.beta((d - 1) / 2, (d - 1) / 2).cdf).pvalue > 1e-3
    assert abs(stats.spearmanr(r, np.abs(t)).statistic) < 0.03
    # sigma is the per-coordinate std
    assert np.allclose(z.mean(0), 0, atol=5 * sigma / math.sqrt(20_000))
    assert abs(z.var() / sigma**2 - 1) < 0.03


def test_sampler_repeats_with_the_generator_and_honours_dim():
    a, b = _draw(12, 3, 0.5, 100, seed=7), _draw(12, 3, 0.5, 100, seed=7)
    assert np.array_equal(a, b)
    nz = ZhangNoise(sigma=0.5, k=3, dim=12)
    z = nz.sample((4, 5, 3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norms = z.reshape(-1, 12).norm(dim=1)
    assert z.shape == (4, 5, 3, 4) and torch.all(norms > 0)


def test_bad_k_is_refused():
    with pytest.raises(ValueError):
        ZhangNoise(sigma=0.5, k=-1)
    with pytest.raises(ValueError):
        ZhangNoise(sigma=0.5, k=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ZhangNoise(sigma=0.5, k=7).scale_for(8)


# --- pieces of the bound


@pytest.mark.parametrize("d,k", [(8, 0), (8, 5), (64, 50)])
def test_cells_cover_the_law_and_y_is_below_lambda(d, k):
    s = 0.6
    r_lo, r_hi, t_lo, mass = _cells(d, k, s, FAST)
    assert abs(mass.sum() - 1) < 1e-12 and np.all(mass >= 0)
    rng = np.random.default_rng(1)
    for rho0, rho1 in [(0.0, 0.05), (0.4, 0.47), (1.5, 1.6)]:
        logy = _log_ratio_lower(r_lo, r_hi, t_lo, rho0, rho1, k, s)
        t_hi = np.append(t_lo[1:], 1.0)
        for _ in range(20):  # random points of random cells, random rho in the interval
            i, j = rng.integers(1, len(r_lo) - 1), rng.integers(0, len(t_lo))
            r = rng.uniform(r_lo[i], r_hi[i])
            t = rng.uniform(t_lo[j], t_hi[j])
            rho = rng.uniform(rho0, rho1)
            assert logy[i, j] <= _log_lr(r, t, rho, k, s) + 1e-9


# --- closed form and monotonicity


@pytest.mark.parametrize("d", [8, 64])
def test_k0_is_gaussian_radius_below_and_close_to_cohen(d):
    sigma = 0.5
    pa = np.array([0.55, 0.7, 0.9, 0.99, 0.999])
    r = ZhangNoise(sigma=sigma, k=0).radius(pa, norm="l2", dim=d)
    cohen = sigma * stats.norm.ppf(pa)
    assert np.all(r <= cohen)
    assert np.all(r >= 0.93 * cohen - 0.02)


def test_radius_monotone_in_pa_and_zero_at_half():
    nz = ZhangNoise(sigma=0.3, k=20, grid=FAST)
    pa = np.linspace(0.4, 0.99999, 200)
    r = nz.radius(pa, norm="l2", dim=64)
    assert np.all(np.diff(r) >= 0)
    assert np.all(r[pa <= 0.5] == 0) and r[-1] > 0
    linf = nz.radius(pa, norm="linf", dim=64)
    assert np.allclose(linf, r / 8, rtol=1e-12)


# --- soundness


@pytest.mark.parametrize("d,k,rho", [(8, 4, 0.6), (16, 12, 0.9), (64, 0, 0.5), (64, 48, 0.8)])
def test_certified_radius_below_the_worst_classifier(d, k, rho):
    """The Neyman-Pearson worst classifier for the shift rho e_1 with probability 1/2 at x + rho e_1:
    its probability pA at x must not certify rho."""
    sigma = 0.5
    s = ZhangNoise(sigma=sigma, k=k).scale_for(d)
    r, t = _radius_angle(d, k, s, 2_000_000, seed=3)
    log_lr = _log_lr(r, t, rho, k, s)
    # P_delta(log_lr <= c) = P_0(log_lr(R, -t) >= -c) = P_0(log_lr >= -c): choose c with 1/2
    c = -np.quantile(log_lr, 0.5)
    pa = float(np.mean(log_lr <= c))
    pa_hi = pa + 4 * math.sqrt(pa * (1 - pa) / r.size)  # a pA above the worst one with high probability
    cert = float(ZhangNoise(sigma=sigma, k=k, grid=FAST).radius(pa_hi, norm="l2", dim=d))
    assert 0 < cert < rho


def _halfspace_prob(z: np.ndarray, w: np.ndarray, b: float, delta: np.ndarray) -> np.ndarray:
    """P(w . (delta + z) <= b) for each row of delta [P, d]; z [m, d] noise draws."""
    return np.mean((z @ w)[None, :] + (delta @ w)[:, None] <= b, axis=1)


@pytest.mark.parametrize("k", [0, 10])
def test_linf_corners_and_ball_keep_the_halfspace_class(k):
    d, sigma = 16, 0.5
    z = _draw(d, k, sigma, 400_000, seed=5)
    w = np.ones(d) / math.sqrt(d)  # the l_inf ball's corners are its worst points for this half-space
    b = 0.55
    pa = float(_halfspace_prob(z, w, b, np.zeros((1, d)))[0])
    pa_lo = pa - 4 * math.sqrt(pa * (1 - pa) / z.shape[0])
    r_inf = float(ZhangNoise(sigma=sigma, k=k, grid=FAST).radius(pa_lo, norm="linf", dim=d))
    assert r_inf > 0
    rng = np.random.default_rng(0)
    corners = r_inf * np.where(rng.random((64, d)) < 0.5, -1.0, 1.0)
    corners[0] = r_inf  # the worst corner
    inside = r_inf * rng.uniform(-1, 1, (64, d))
    slack = 4 * 0.5 / math.sqrt(z.shape[0])
    assert np.all(_halfspace_prob(z, w, b, np.vstack([corners, inside])) >= 0.5 - slack)
    if k == 0:  # the check has power: 20% above the exact Gaussian l_inf radius flips the class
        exact = sigma * stats.norm.ppf(pa) / math.sqrt(d)
        assert _halfspace_prob(z, w, b, np.full((1, d), 1.2 * exact))[0] < 0.5 - slack


def test_interval_threshold_is_at_least_the_exact_gaussian_one():
    """k = 0: the pA needed for an interval is at least the exact pA needed for its far end."""
    sigma, d = 0.5, 16
    for rho0, rho1 in [(0.0, 0.1), (0.5, 0.55), (1.0, 1.2)]:
        th = interval_threshold(d, 0, sigma, rho0, rho1, FAST)
        assert th >= stats.norm.cdf(rho1 / sigma) - 1e-9


def test_certify_coverage_at_alpha_by_simulation():
    """CERTIFY end to end on a half-space classifier (the smoothed classifier of a half-space under
    a symmetric noise is the same half-space, so the true l2 radius is the distance to it):
    certificates with a radius above that distance occur in at most alpha of independent inputs."""
    d, alpha, T = 8, 0.1, 240
    w = torch.zeros(d, dtype=torch.float64)
    w[0] = 1.0
    net = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1] = w  # class 1 iff x_0 > 0
    dist = torch.linspace(0.1, 1.2, T, dtype=torch.float64)
    x = torch.zeros(T, d, dtype=torch.float64)
    x[:, 0] = -dist  # class 0, at distance dist from the hyperplane
    x[:, 1] = torch.arange(T, dtype=torch.float64)  # distinct inputs -> independent noise streams
    m = get_method("smoothing-zhang", sigma=0.5, k=4, n0=30, n=300, alpha=alpha, share_noise=False,
                   grid_intervals=60, grid_cells=160)
    certs = m.certify(net, LpBall(x, 0.0, 2), Robust(0))
    radius = np.array([c.radius if c.prediction == 0 else 0.0 for c in certs])
    wrong = int(np.sum(radius > dist.numpy()))
    assert np.mean(radius > 0) > 0.5  # the check has something to check
    assert stats.binomtest(wrong, T, alpha, alternative="greater").pvalue > 1e-3


# --- the registered method


def test_method_is_registered_and_converts_linf():
    assert "smoothing-zhang" in list_methods()
    x = torch.full((2, 1, 4, 4), 0.5)

    class _Const(torch.nn.Module):
        def forward(self, v):
            out = torch.zeros(v.shape[0], 3)
            out[:, 1] = 1.0
            return out

    opts = dict(sigma=0.5, k=6, n0=20, n=400, alpha=0.01, grid_intervals=40, grid_cells=100)
    m = get_method("smoothing-zhang", **opts)
    l2 = m.certify(_Const(), LpBall(x, 0.0, 2), Robust(1))
    li = m.certify(_Const(), LpBall(x, 0.0, math.inf), Robust(1))
    assert l2[0].status == "certified" and l2[0].details["k"] == 6
    assert li[0].radius == pytest.approx(l2[0].radius / 4, rel=1e-12)
    with pytest.raises(SpecError):
        get_method("smoothing-zhang", **{**opts, "k": 15}).certify(_Const(), LpBall(x, 0.0, 2), Robust(1))
