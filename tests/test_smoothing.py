"""Randomized smoothing core: statistics, radius formulas and statistical validity.

The validity tests are real hypothesis tests: certified radii of classifiers whose smoothed
version and true radius are known in closed form must exceed the true radius in at most an
``alpha`` fraction of many seeded trials (a one-sided binomial test at level 1e-3 that a broken
bound, e.g. the point estimate of pA, fails by a wide margin).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from smoothing.certify import certify, predict
from smoothing.noise import FLOAT_MARGIN, GaussianNoise, LaplaceNoise, UniformNoise, convert_radius
from smoothing.stats import SmoothingConfigError, check_n_alpha, cp_interval, cp_lower, cp_upper, min_samples
from smoothing.topk import topk_radius


# --------------------------------------------------------------------------- statistics
def test_cp_lower_matches_statsmodels_and_beta():
    for k, n in [(0, 10), (3, 10), (10, 10), (517, 1000), (99_990, 100_000)]:
        lo2, hi2 = proportion_confint(k, n, alpha=0.02, method="beta")
        assert cp_lower(k, n, 0.01) == pytest.approx(0.0 if k == 0 else lo2, abs=1e-12)
        assert cp_upper(k, n, 0.01) == pytest.approx(1.0 if k == n else hi2, abs=1e-12)
    assert cp_lower(10, 10, 0.001) == pytest.approx(0.001 ** 0.1)


@pytest.mark.parametrize("n", [15, 60])
def test_clopper_pearson_coverage_by_simulation(n):
    """One-sided lower bound and two-sided interval cover p in >= 1 - alpha of simulated draws
    (binomial test on the misses), and the exact coverage (sum over the pmf) is >= 1 - alpha."""
    rng = np.random.default_rng(1)
    alpha, T = 0.05, 20_000
    for p in (0.1, 0.5, 0.83, 0.97):
        k = rng.binomial(n, p, size=T)
        miss_lo = int((cp_lower(k, n, alpha) > p).sum())
        lo, hi = cp_interval(k, n, alpha)
        miss_2 = int(((lo > p) | (hi < p)).sum())
        for miss in (miss_lo, miss_2):
            assert binomtest(miss, T, alpha, alternative="greater").pvalue > 1e-3, (p, miss)
        ks = np.arange(n + 1)
        exact = binom.pmf(ks, n, p)[cp_lower(ks, n, alpha) <= p].sum()
        assert exact >= 1 - alpha - 1e-12


def test_n_alpha_pairs_that_can_never_certify_are_rejected():
    # exact condition: alpha ** (1/n) > 1/2  <=>  n > log2(1/alpha)
    assert min_samples(0.001) == 10
    assert 0.001 ** (1 / 10) > 0.5 >= 0.001 ** (1 / 9)
    assert min_samples(0.05) == 5 and min_samples(0.5) == 2
    with pytest.raises(SmoothingConfigError, match=r"n >= 10"):
        check_n_alpha(9, 0.001)
    check_n_alpha(10, 0.001)
    with pytest.raises(SmoothingConfigError, match="separate pB"):
        check_n_alpha(10, 0.001, pb_bound=True)
    check_n_alpha(11, 0.001, pb_bound=True)
    from verify.registry import get_method

    with pytest.raises(SmoothingConfigError, match="can never certify"):
        get_method("smoothing-gaussian", n=9, alpha=0.001)
    with pytest.raises(SmoothingConfigError):
        certify(torch.nn.Linear(2, 2), torch.zeros(1, 2), GaussianNoise(sigma=0.1), n0=5, n=9, alpha=0.001)


# --------------------------------------------------------------------------- radius formulas
def test_gaussian_radius_cohen_forms_and_dimension_factor():
    g = GaussianNoise(sigma=0.5)
    pa = np.array([0.6, 0.9, 0.999])
    r = g.radius(pa, norm="l2")
    assert np.allclose(r, 0.5 * norm.ppf(pa), rtol=1e-8)
    assert np.allclose(g.radius(pa, 1 - pa, norm="l2"), r, rtol=1e-8)  # two-sided with pB = 1 - pA
    pb = np.array([0.1, 0.05, 0.0005])
    assert np.allclose(g.radius(pa, pb), 0.25 * (norm.ppf(pa) - norm.ppf(pb)), rtol=1e-8)
    assert np.all(g.radius(pa, pb) >= r)  # a separate pB bound can only help
    d = 784
    assert np.allclose(g.radius(pa, norm="linf", dim=d), r / math.sqrt(d))
    assert np.allclose(g.radius(pa, norm="l1", dim=d), r)
    assert np.allclose(convert_radius(r, "l2", "linf", 16), r / 4)
    assert g.radius(np.array([0.5, 0.3]), norm="l2").tolist() == [0.0, 0.0]
    assert np.all(r <= 0.5 * norm.ppf(pa))  # the float margin shrinks, never grows


def test_laplace_l1_radius_closed_form_1d():
    """f(z) = 1[z > 0], x > 0, Laplace(lambda): pA = 1 - exp(-x/lambda)/2 and g's true l1
    radius is x; Teng et al.'s one-sided radius is tight here."""
    lap = LaplaceNoise(scale=0.7)
    assert lap.sigma == pytest.approx(0.7 * math.sqrt(2))
    x = np.array([0.05, 0.3, 1.0, 2.5])
    pa = 1 - 0.5 * np.exp(-x / 0.7)
    assert np.allclose(lap.radius(pa, norm="l1"), x, rtol=1e-7)
    # two-sided: max(lambda/2 log(pA/pB), -lambda log(1 - pA + pB)); with pB = 1 - pA the second
    assert np.allclose(lap.radius(pa, 1 - pa, norm="l1"), x, rtol=1e-7)
    pb = np.full_like(pa, 0.01)
    expect = np.maximum(0.35 * np.log(pa / pb), -0.7 * np.log(1 - pa + pb))
    assert np.allclose(lap.radius(pa, pb, norm="l1"), expect, rtol=1e-7)
    assert np.allclose(lap.radius(pa, norm="linf", dim=10), x / 10, rtol=1e-7)


def test_uniform_radii_closed_form_1d():
    """f(z) = 1[z > 0], 0 < x < lambda, U[-lambda, lambda]: pA = 1/2 + x/(2 lambda); the l1 and
    l_inf radii (Yang et al. 2020) both equal the true radius x in 1-D."""
    lam = 0.8
    u = UniformNoise(scale=lam)
    assert u.sigma == pytest.approx(lam / math.sqrt(3))
    x = np.array([0.01, 0.2, 0.5, 0.79])
    pa = 0.5 + x / (2 * lam)
    assert np.allclose(u.radius(pa, norm="l1", dim=1), x, rtol=1e-7)
    assert np.allclose(u.radius(pa, norm="linf", dim=1), x, rtol=1e-7)
    # d dimensions: l1 = 2 lambda (pA - 1/2); linf = 2 lambda (1 - (3/2 - pA)^(1/d))
    d = 50
    assert np.allclose(u.radius(pa, norm="l1", dim=d), 2 * lam * (pa - 0.5), rtol=1e-7)
    assert np.allclose(u.radius(pa, norm="linf", dim=d), 2 * lam * (1 - (1.5 - pa) ** (1 / d)), rtol=1e-7)
    # with pB = 1 - pA the two-sided forms reduce to the one-sided ones
    assert np.allclose(u.radius(pa, 1 - pa, norm="linf", dim=d), u.radius(pa, norm="linf", dim=d))


def test_samplers_match_their_moments_and_stay_finite():
    g = torch.Generator().manual_seed(0)
    for nz in (GaussianNoise(sigma=0.3), LaplaceNoise(sigma=0.3), UniformNoise(sigma=0.3)):
        z = nz.sample((400_000,), generator=g)
        assert torch.isfinite(z).all()
        assert float(z.std()) == pytest.approx(0.3, rel=0.02)
        assert abs(float(z.mean())) < 0.005
    u = UniformNoise(scale=0.5).sample((100_000,), generator=g)
    assert float(u.min()) >= -0.5 and float(u.max()) <= 0.5
    # the Laplace inverse CDF at u = -1/2 (which uniform_ may return) is kept finite
    t = torch.full((4,), -0.5)
    lap = LaplaceNoise(scale=1.0)
    sign = t.sign()
    tiny = torch.finfo(t.dtype).eps / 2
    assert torch.isfinite(t.abs().mul(-2.0).clamp(min=-1.0 + tiny).log1p().mul(sign).mul(-lap.scale)).all()


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("noise", [GaussianNoise(sigma=0.3), LaplaceNoise(sigma=0.3), UniformNoise(sigma=0.3)], ids=lambda n: n.name)
def test_noisy_inputs_of_every_pass_are_fresh_iid_draws(noise, share):
    """``monte_carlo`` fills one reused input buffer in place (noise drawn into it, the input
    added in place). Record every noisy row the model sees (3 inputs, 2 streams, passes of 128
    rows, so blocks straddle passes) and check: right mean and variance per (input, stream),
    the noise's own distribution (KS), no row ever repeated, no correlation between neighbouring
    samples, between the same row of consecutive passes, between streams, or (independent mode)
    between inputs."""
    from scipy.stats import kstest, laplace, uniform

    from smoothing.sampling import monte_carlo

    B, d, nums = 3, 40, [300, 1000]
    x = torch.linspace(-1, 1, B * d).reshape(B, d)
    rows = {s: torch.full((B, n, d), float("nan")) for s, n in enumerate(nums)}
    passes = []

    def consume(slot, pos, out):
        passes.append(int(slot.numel()))
        for sl in slot.unique().tolist():
            m = slot == sl
            rows[sl // B][sl % B, pos[m]] = out[m].clone()  # out is a view of the reused buffer

    with torch.inference_mode():
        monte_carlo(torch.nn.Identity(), x, noise, nums, consume, seed=5, batch_size=128, share_noise=share)
    assert max(passes) <= 128 and sum(passes) == B * sum(nums)
    dist = {"gaussian": norm(0, noise.scale), "laplace": laplace(0, noise.scale),
            "uniform": uniform(-noise.scale, 2 * noise.scale)}[noise.name]
    zs = {}
    for s, n in enumerate(nums):
        assert not torch.isnan(rows[s]).any()  # every (input, stream, position) filled once
        z = (rows[s] - x[:, None, :]).double()  # [B, n, d] noise
        zs[s] = z
        for b in range(B):
            zb = z[b].reshape(-1).numpy()
            assert abs(zb.mean()) < 5 * noise.sigma / math.sqrt(zb.size)
            assert zb.std() == pytest.approx(noise.sigma, rel=6 * math.sqrt(2 / zb.size) + 0.02)
            assert kstest(zb, dist.cdf).pvalue > 1e-4
            # fresh: no sample vector repeated, neighbours and pass-to-pass uncorrelated
            assert torch.unique(z[b], dim=0).shape[0] == n
            for lag in (1, 128):
                if n > lag:
                    c = np.corrcoef(z[b, :-lag].reshape(-1), z[b, lag:].reshape(-1))[0, 1]
                    assert abs(c) < 5 / math.sqrt((n - lag) * d)
        if not share:
            c = np.corrcoef(z[0].reshape(-1), z[1].reshape(-1))[0, 1]
            assert abs(c) < 5 / math.sqrt(n * d)
        else:  # one noise stream shared by the inputs of the batch (rounding of the add aside)
            assert torch.allclose(z[0], z[1], atol=1e-6)
    m = min(nums)
    c = np.corrcoef(zs[0][:, :m].reshape(-1), zs[1][:, :m].reshape(-1))[0, 1]  # selection vs estimation
    assert abs(c) < 5 / math.sqrt(B * m * d)


def test_topk_reduces_to_cohen_for_k1_and_grows_with_k():
    rng = np.random.default_rng(0)
    B, K = 200, 10
    pl = rng.uniform(0.3, 0.99, size=B)
    pu = rng.dirichlet(np.ones(K - 1), size=B) * (1 - pl)[:, None] * rng.uniform(0.5, 1.0, size=(B, 1))
    sigma = 0.5
    r1 = topk_radius(pl, pu, 1, sigma)
    pb = np.minimum(pu.max(axis=1), 1 - pl)
    cohen = np.where(pl > pb, sigma / 2 * (norm.ppf(pl) - norm.ppf(pb)), 0.0)
    assert np.allclose(r1, cohen, rtol=1e-7, atol=1e-9)
    assert np.allclose(r1, GaussianNoise(sigma=sigma).radius(pl, pb), rtol=1e-7, atol=1e-9)
    r3 = topk_radius(pl, pu, 3, sigma)
    assert np.all(r3 >= r1 - 1e-12)
    assert (r3 > r1 + 1e-6).mean() > 0.5


# --------------------------------------------------------------------------- validity
class _Linear2(torch.nn.Module):
    """Binary linear classifier: logits ``[0, w.x + b]``; under any symmetric noise its
    smoothed classifier equals it, and the true l2 radius is ``|w.x + b| / ||w||``."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.reshape(x.shape[0], -1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _trials(T: int, d: int, sigma: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w = w / w.norm()
    # margins spread so that pA runs from ~0.55 to ~0.9999
    m = sigma * torch.empty(T).uniform_(0.1, 3.7, generator=g) * torch.where(torch.rand(T, generator=g) < 0.5, -1.0, 1.0)
    base = torch.randn(T, d, generator=g)
    base = base - (base @ w).unsqueeze(1) * w  # orthogonal to w
    x = base + m.unsqueeze(1) * w
    return _Linear2(w, 0.0), x, m.abs().double().numpy(), (m > 0).long().numpy()


def _failures(res, true_r, true_cls):
    pred = res.prediction.numpy()
    answered = pred >= 0
    wrong = answered & (pred != true_cls)
    too_big = answered & (pred == true_cls) & (res.radius > true_r)
    return int((wrong | too_big).sum()), int(answered.sum())


@pytest.mark.parametrize("pb_bound", [False, True])
def test_gaussian_certified_radius_exceeds_true_radius_in_at_most_alpha_of_trials(pb_bound):
    T, alpha, sigma = 1500, 0.05, 0.5
    model, x, true_r, true_cls = _trials(T, 8, sigma, seed=5)
    # independent noise per input: the T trials are independent, so the failure count is binomial
    res = certify(model, x, GaussianNoise(sigma=sigma), n0=10, n=100, alpha=alpha, pb_bound=pb_bound, seed=0, batch_size=4000,
                  share_noise=False)
    fails, answered = _failures(res, true_r, true_cls)
    assert answered > T // 2
    assert binomtest(fails, T, alpha, alternative="greater").pvalue > 1e-3, f"{fails}/{T} failures"
    # the test has power: the point estimate of pA instead of its lower bound fails it
    n_a = res.counts.numpy()[np.arange(T), res.counts_selection.argmax(1).numpy()]
    naive = sigma * norm.ppf(np.clip(n_a / 100, 1e-9, 1 - 1e-9))
    bad = int(((res.prediction.numpy() == true_cls) & (naive > true_r)).sum())
    assert binomtest(bad, T, alpha, alternative="greater").pvalue < 1e-6


def test_shared_noise_default_keeps_each_certificate_valid():
    """Default (noise shared by the inputs of a batch): each input position's certificate must
    fail in at most alpha of independent runs (a fresh seed per run), as with independent noise;
    within a run the positions share noise, so each position is tested on its own (Bonferroni)."""
    R, P, alpha, sigma = 300, 5, 0.05, 0.5
    model, x, true_r, true_cls = _trials(R * P, 8, sigma, seed=11)
    fails = np.zeros(P, dtype=int)
    pooled = 0
    for r in range(R):
        sl = slice(r * P, (r + 1) * P)
        res = certify(model, x[sl], GaussianNoise(sigma=sigma), n0=10, n=100, alpha=alpha, seed=1000 + r, batch_size=4000)
        pred = res.prediction.numpy()
        ok_cls = true_cls[sl]
        bad = (pred >= 0) & ((pred != ok_cls) | (res.radius > true_r[sl]))
        fails += bad
        naive_n = res.counts.numpy()[np.arange(P), res.counts_selection.argmax(1).numpy()]
        pooled += int(((pred == ok_cls) & (sigma * norm.ppf(np.clip(naive_n / 100, 1e-9, 1 - 1e-9)) > true_r[sl])).sum())
    for p_ in range(P):
        assert binomtest(int(fails[p_]), R, alpha, alternative="greater").pvalue > 1e-3 / P, f"position {p_}: {fails[p_]}/{R}"
    assert pooled > 3 * alpha * R * P  # power: the point estimate of pA instead of its lower bound fails far more often


@pytest.mark.parametrize("noise,norm_", [(LaplaceNoise(scale=0.5), "l1"), (UniformNoise(scale=0.5), "l1"), (UniformNoise(scale=0.5), "linf")])
def test_laplace_and_uniform_radii_valid_in_1d(noise, norm_):
    """1-D threshold classifier f(z) = 1[z > 0]: g = f and the true radius is |x|."""
    T, alpha = 1500, 0.05
    g = torch.Generator().manual_seed(7)
    x = torch.empty(T, 1).uniform_(0.02, 0.45, generator=g) * torch.where(torch.rand(T, 1, generator=g) < 0.5, -1.0, 1.0)
    model = _Linear2(torch.ones(1), 0.0)
    res = certify(model, x, noise, n0=10, n=100, alpha=alpha, norm=norm_, seed=1, batch_size=4000, share_noise=False)
    fails, answered = _failures(res, x.abs().squeeze(1).double().numpy(), (x.squeeze(1) > 0).long().numpy())
    assert answered > T // 3
    assert binomtest(fails, T, alpha, alternative="greater").pvalue > 1e-3, f"{fails}/{T} failures"


def test_predict_abstains_on_a_coin_and_answers_a_clear_case():
    model = _Linear2(torch.ones(4) / 2, 0.0)
    x = torch.stack([torch.zeros(4), torch.full((4,), 2.0)])  # pA = 1/2 exactly, and ~1
    out = predict(model, x, GaussianNoise(sigma=0.5), n=2000, alpha=0.001, seed=0)
    assert out.prediction.tolist()[1] == 1
    assert out.prediction.tolist()[0] in (-1, 0, 1) and out.pvalue[1] < 1e-6
    res = certify(model, x[:1], GaussianNoise(sigma=0.5), n0=100, n=2000, alpha=0.001)
    assert int(res.prediction[0]) == -1 and res.radius[0] == 0.0


def test_float_margin_is_small_and_relative():
    r = GaussianNoise(sigma=1.0).radius(np.array([0.99]))
    assert r[0] == pytest.approx(norm.ppf(0.99) * (1 - FLOAT_MARGIN), rel=1e-12)
