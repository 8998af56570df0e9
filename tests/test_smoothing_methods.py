"""Registered smoothing methods and the other smoothing tasks: statuses, repeatability, batch
invariance, top-k, rotation/translation, median smoothing, the invariance estimate, training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from smoothing.certify import certify
from smoothing.inverse import estimate_invariance
from smoothing.noise import FLOAT_NOTE, GaussianNoise, LaplaceNoise
from smoothing.regression import percentile_bounds
from smoothing.sampling import count_classes
from smoothing.semantic import Rotation, rotate, translate
from smoothing.training import smoothadv_attack, train_noise_augmented
from verify.registry import get_method, list_methods
from verify.spec import Box, Linear, LpBall, Robust, SpecError, TopK

NAMES = ["smoothing-gaussian", "smoothing-laplace", "smoothing-uniform", "smoothing-topk", "smoothing-rotation", "smoothing-translation"]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


def _images(B: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class _Const(nn.Module):
    """Always class ``c`` (of ``K``)."""

    def __init__(self, c: int, K: int = 3) -> None:
        super().__init__()
        self.c, self.K = c, K

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.K, dtype=x.dtype)
        out[:, self.c] = 1.0
        return out


class _Coin(nn.Module):
    """Class 1 iff the first coordinate is > 0: a fair coin under noise at x = 0."""

    def forward(self, x):
        s = x.reshape(x.shape[0], -1)[:, 0]
        return torch.stack([-s, s], 1)


def test_all_six_methods_registered_with_explicit_options():
    reg = list_methods()
    for name in NAMES:
        cls = reg[name]
        assert cls.guarantee == "probabilistic" and cls.certifies == "smoothed"
        opts = cls.option_defaults()
        assert {"sigma", "n0", "n", "alpha", "batch_size", "memory_mb", "seed"} <= set(opts)
        assert opts["n"] == 100_000 and opts["n0"] == 100 and opts["alpha"] == 0.001 and opts["seed"] == 0
    assert reg["smoothing-gaussian"].option_defaults()["sigma"] == 0.25
    with pytest.raises(TypeError, match="no option"):
        get_method("smoothing-gaussian", sigmaa=0.5)


def test_statuses_certified_unknown_abstain_and_details():
    m = get_method("smoothing-gaussian", sigma=0.5, n0=50, n=500, alpha=0.01)
    x = torch.zeros(2, 3)
    # constant class 2: pA_lower = 0.01 ** (1/500), radius = sigma Phi^-1(that)
    certs = m.certify(_Const(2), LpBall(x, 0.1, 2), Robust(torch.tensor([2, 1])))
    c0, c1 = certs
    assert c0.status == "certified" and c0.prediction == 2 and c0.radius > 1.0
    assert c0.confidence == pytest.approx(0.99) and c0.certifies == "smoothed" and c0.guarantee == "probabilistic"
    assert c0.norm == "l2" and c0.eps == pytest.approx(0.1)
    d = c0.details
    assert d["pA_lower"] == pytest.approx(0.01 ** (1 / 500)) and d["n"] == 500 and d["n0"] == 50
    assert d["counts"] == {"2": 500} and d["sigma"] == 0.5 and d["float_soundness"] == FLOAT_NOTE
    assert c1.status == "unknown" and "not the label" in c1.details["reason"] and c1.radius == c0.radius
    # asked radius above the certified one
    big = m.certify(_Const(2), LpBall(x[:1], 50.0, 2), Robust(2))[0]
    assert big.status == "unknown" and "< eps" in big.details["reason"] and big.radius > 0
    # a fair coin: CERTIFY abstains
    ab = m.certify(_Coin(), LpBall(torch.zeros(1, 3), 0.0, 2), Robust(1))[0]
    assert ab.status == "abstain" and ab.prediction == -1 and ab.radius == 0.0
    # eps = 0 and a correct non-abstained prediction is certified; the l_inf radius is R_2 / sqrt(d)
    linf = m.certify(_Const(2), LpBall(x[:1], 0.0, math.inf), Robust(2))[0]
    assert linf.status == "certified" and linf.norm == "linf"
    assert linf.radius == pytest.approx(c0.radius / math.sqrt(3), rel=1e-9)
    # max_radius caps the reported radius
    capped = m.certify(_Const(2), LpBall(x[:1], 0.0, 2), Robust(2), max_radius=0.3)[0]
    assert capped.radius == 0.3 and capped.details["radius_uncapped"] == pytest.approx(c0.radius)


def test_spec_errors_for_sets_and_properties_the_method_cannot_certify():
    x = _images(2)
    with pytest.raises(SpecError):
        get_method("smoothing-gaussian", n=100).certify(_cnn(), Box(x, x + 0.1), Robust(0))
    with pytest.raises(SpecError):
        get_method("smoothing-rotation", n=100).certify(_cnn(), Box(x, x + 0.1), Robust(0))
    with pytest.raises(SpecError):
        get_method("smoothing-topk", n=100).certify(_cnn(), LpBall(x, 0.0, 2), Linear(torch.eye(5)))


def test_timeout_gives_unknown():
    c = get_method("smoothing-gaussian", n=2000).certify(_cnn(), LpBall(_images(2), 0.0, 2), Robust(0), timeout=0.0)
    assert [x.status for x in c] == ["unknown", "unknown"] and c[0].details["reason"] == "timeout"


@pytest.mark.parametrize("share", [False, True])
def test_seeded_repeat_and_batch_of_one_equals_batch_of_n_exactly(share):
    net, x, nz = _cnn(), _images(5), GaussianNoise(sigma=0.5)
    kw = dict(n0=30, n=300, alpha=0.01, seed=3, batch_size=128, share_noise=share)
    full = certify(net, x, nz, **kw)
    again = certify(net, x, nz, **kw)
    assert torch.equal(full.counts, again.counts) and torch.equal(full.counts_selection, again.counts_selection)
    for i in (0, 3):
        one = certify(net, x[i : i + 1], nz, **kw)
        assert torch.equal(one.counts[0], full.counts[i]) and one.radius[0] == full.radius[i]
    # reversed batch: same per-input answers
    rev = certify(net, x.flip(0), nz, **kw)
    assert torch.equal(rev.counts.flip(0), full.counts)
    other = certify(net, x, nz, **{**kw, "seed": 4})
    assert not torch.equal(other.counts, full.counts)


def test_selection_and_estimation_streams_are_independent_and_memory_budget_chunks():
    net, x = _cnn(), _images(2)
    c = count_classes(net, x, GaussianNoise(sigma=1.0), [300, 300], seed=0, streams=["a", "b"], batch_size=128)
    assert c.shape == (2, 2, 5) and c.sum(-1).tolist() == [[300, 300], [300, 300]]
    assert not torch.equal(c[0], c[1])  # fresh noise per stream
    c2 = count_classes(net, x, GaussianNoise(sigma=1.0), [300, 300], seed=0, streams=["a", "b"], batch_size=128, memory_mb=0.01)
    assert c2.sum().item() == 1200  # 0.01 MiB -> a few rows per pass, same totals


def test_any_input_shape_vectors_and_embeddings():
    emb = nn.Sequential(nn.Flatten(), nn.Linear(7 * 16, 4)).eval()
    x = torch.randn(3, 7, 16)
    res = certify(emb, x, GaussianNoise(sigma=0.1), n0=20, n=200, alpha=0.01)
    assert res.counts.shape == (3, 4) and res.extra["dim"] == 112


def test_laplace_and_uniform_methods_report_their_norms():
    x = torch.zeros(1, 4)
    lap = get_method("smoothing-laplace", sigma=0.5, n0=20, n=400, alpha=0.01).certify(_Const(0), LpBall(x, 0.0, 1), Robust(0))[0]
    lam = 0.5 / math.sqrt(2)
    assert lap.norm == "l1" and lap.radius == pytest.approx(-lam * math.log(2 * (1 - 0.01 ** (1 / 400))), rel=1e-6)
    uni = get_method("smoothing-uniform", sigma=0.5, n0=20, n=400, alpha=0.01).certify(_Const(0), LpBall(x, 0.0, math.inf), Robust(0))[0]
    lamu = 0.5 * math.sqrt(3)
    pa = 0.01 ** (1 / 400)
    assert uni.norm == "linf" and uni.radius == pytest.approx(2 * lamu * (1 - (1.5 - pa) ** 0.25), rel=1e-6)


def test_topk_method_certifies_label_in_top2_not_top1():
    class TwoWay(nn.Module):  # class 0 or 1 by the sign of x0, class 2 never
        def forward(self, x):
            s = x.reshape(x.shape[0], -1)[:, 0]
            return torch.stack([-s, s, torch.full_like(s, -10.0)], 1)

    x = torch.full((1, 2), 0.05)
    m = get_method("smoothing-topk", sigma=0.5, n=2000, alpha=0.01)
    top1 = m.certify(TwoWay(), LpBall(x, 0.0, 2), TopK(0, 1))[0]
    top2 = m.certify(TwoWay(), LpBall(x, 0.5, 2), TopK(0, 2))[0]
    assert top1.status == "unknown"
    assert top2.status == "certified" and top2.radius > 0.5 and top2.details["k"] == 2


def test_rotate_and_translate_geometry():
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 0, 4] = 1.0  # top middle
    r = rotate(img, torch.tensor([90.0]), "nearest")
    assert r[0, 0, 4, 0] == 1.0 and r.sum() == 1.0  # counter-clockwise: top -> left
    assert torch.allclose(rotate(img, torch.tensor([0.0])), img, atol=1e-6)
    t = translate(img, torch.tensor([[2.0, 3.0]]), "nearest")
    assert t[0, 0, 3, 6] == 1.0 and t.sum() == 1.0
    assert torch.allclose(translate(img, torch.tensor([[1.0, 0.0]]), "bilinear")[0, 0, 0, 5], torch.tensor(1.0))
    assert rotate(img[:, 0], torch.tensor([90.0]), "nearest").shape == (1, 9, 9)


@pytest.mark.parametrize("name,unit", [("smoothing-rotation", "rotation-deg"), ("smoothing-translation", "translation-px")])
def test_semantic_methods_radius_in_parameter_units(name, unit):
    extra = {"sound": False}
    m = get_method(name, sigma=5.0, n0=20, n=300, alpha=0.01, interpolation="nearest", **extra)
    c = m.certify(_Const(1), LpBall(_images(2), 3.0, 2), Robust(1))
    assert [x.status for x in c] == ["certified", "certified"]
    assert c[0].norm == unit and c[0].radius == pytest.approx(5.0 * 2.3263478740408408 * 0 + 5.0 * float(
        __import__("scipy.stats", fromlist=["norm"]).norm.ppf(0.01 ** (1 / 300))), rel=1e-6)
    assert c[0].details["interpolation"] == "nearest" and "certifies_exactly" in c[0].details
    with pytest.raises(ValueError):
        get_method(name, interpolation="bicubic", **extra)


def test_rotation_smoothing_sees_rotations():
    """A classifier of "is the mass in the top half": rotating by 180 degrees flips it, so with
    a large sigma the vote is split and CERTIFY abstains or certifies a small angle only."""

    class TopHalf(nn.Module):
        def forward(self, x):
            top = x[:, :, :4].sum((1, 2, 3))
            bot = x[:, :, 4:].sum((1, 2, 3))
            return torch.stack([bot, top], 1)

    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 1, 2:6] = 1.0
    small = certify(TopHalf(), img, GaussianNoise(sigma=5.0), n0=20, n=400, alpha=0.01, perturb=Rotation().apply, param_shape=(1,), dim=1)
    wide = certify(TopHalf(), img, GaussianNoise(sigma=200.0), n0=20, n=400, alpha=0.01, perturb=Rotation().apply, param_shape=(1,), dim=1)
    assert int(small.prediction[0]) == 1 and small.radius[0] > 5.0
    assert int(wide.prediction[0]) == -1 or wide.radius[0] < 60.0


def test_median_smoothing_bounds_contain_the_true_percentile_shift():
    """Linear regressor y = w.x: h_p(x') = w.x' + sigma ||w|| Phi^-1(p) exactly, so over the l2
    ball of radius eps it ranges over w.x +- ||w|| eps (+ the percentile offset)."""
    torch.manual_seed(0)
    w = torch.randn(5)
    model = lambda z: (z.reshape(z.shape[0], -1) @ w).unsqueeze(1)  # noqa: E731
    x = torch.randn(4, 5)
    sigma, eps = 0.5, 0.3
    res = percentile_bounds(model, x, sigma, eps, n=4000, alpha=0.001, seed=0)
    f0 = (x @ w).double().numpy()
    nw = float(w.norm())
    assert np.all(res.lower[:, 0] <= f0 - nw * eps + 1e-6) and np.all(res.upper[:, 0] >= f0 + nw * eps - 1e-6)
    assert np.all(res.upper[:, 0] - res.lower[:, 0] < 2 * nw * eps + 0.5 * nw)  # not vacuous
    assert np.allclose(res.estimate[:, 0], f0, atol=0.1 * nw)
    hopeless = percentile_bounds(model, x[:1], sigma, 10.0, n=200, alpha=0.001)
    assert hopeless.lower[0, 0] == -np.inf and hopeless.upper[0, 0] == np.inf


def test_invariance_estimate_covers_the_exact_probability():
    """f = 1[x_0 > 0] on boxes where x_0 is uniform on [-1, 3]: P = 3/4; on an l2 ball centred at
    x_0 = 0 (no domain): P = 1/2 by symmetry."""
    model = _Coin()
    lo = torch.tensor([[-1.0, 0.0, 0.0]])
    hi = torch.tensor([[3.0, 1.0, 1.0]])
    est = estimate_invariance(model, Box(lo, hi), reference=torch.tensor([1]), n=4000, alpha=0.001)
    assert est.lower[0] <= 0.75 <= est.upper[0] and est.upper[0] - est.lower[0] < 0.08
    assert est.distribution == "uniform on the set"
    ball = LpBall(torch.zeros(2, 6), 1.0, 2)
    e2 = estimate_invariance(model, ball, reference=torch.tensor([1, 1]), n=4000, alpha=0.001)
    assert np.all(e2.lower <= 0.5) and np.all(e2.upper >= 0.5)
    l1 = LpBall(torch.zeros(1, 6), 1.0, 1, -0.2, 0.5)
    e1 = estimate_invariance(model, l1, reference=torch.tensor([1]), n=2000, alpha=0.001)
    assert "clipped" in e1.distribution and 0.2 < e1.estimate[0] < 0.8


def test_l2_and_l1_unit_samplers_stay_in_the_ball():
    from smoothing.inverse import UnitSampler

    g = torch.Generator().manual_seed(0)
    for kind, p in (("l2", 2), ("l1", 1)):
        s = UnitSampler(kind, 10)
        u = s.fill_(torch.empty(5000, s.param_dim), g)
        pts = s.points(u)
        nrm = pts.norm(p=p, dim=1)
        assert float(nrm.max()) <= 1 + 1e-5
        # uniform in the ball: P(||z|| <= 0.9) = 0.9^10
        assert float((nrm <= 0.9).float().mean()) == pytest.approx(0.9**10, abs=0.03)


def test_noise_training_and_smoothadv():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
    hist = train_noise_augmented(net, x, y, sigma=0.25, epochs=6, batch_size=64, lr=1e-2, seed=0)
    assert hist["loss"][-1] < hist["loss"][0] and hist["noisy_accuracy"][-1] > 0.7
    noise = GaussianNoise(sigma=0.25).sample((4, 8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    xa = smoothadv_attack(net, x[:8], y[:8], noise, eps=0.5, steps=3)
    assert float((xa - x[:8]).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    h2 = train_noise_augmented(net, x, y, sigma=0.25, epochs=1, batch_size=64, seed=0, adv_eps=0.25, adv_steps=2, adv_samples=2)
    assert math.isfinite(h2["loss"][0])
    h3 = train_noise_augmented(net, x, y, noise=LaplaceNoise(sigma=0.25), epochs=1, batch_size=64, seed=0)
    assert math.isfinite(h3["loss"][0])
