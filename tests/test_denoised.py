"""Denoised smoothing (Salman et al. 2020): the denoisers and their training, the registered
``smoothing-denoised`` method (Cohen et al.'s certificate for f(D(.))), its CLI round trip and its
errors."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from conftest import err_line
from smoothing.denoiser import (
    BUNDLED, ResidualDenoiser, denoiser_mse, load_denoiser, save_denoiser, stability_objective, train_denoiser,
)
from smoothing.stats import SmoothingConfigError
from smoothing_helpers import Projection
from verify import certify
from verify.cli import main
from verify.data import digits
from verify.digits_model import NOISE_SIGMA, load_digits_mlp
from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust, SpecError

FAST = dict(sigma=NOISE_SIGMA, n0=50, n=1000, alpha=0.001, seed=0)


# ----------------------------------------------------------------------------- the denoisers


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_denoisers_reduce_the_noisy_input_mse_on_held_out_digits(name):
    xt, _ = digits("test")
    den, meta = load_denoiser(name)
    assert meta["sigma"] == NOISE_SIGMA and meta["input_shape"] == (1, 8, 8)
    noisy = denoiser_mse(nn.Identity(), xt, NOISE_SIGMA, seed=3)
    assert noisy == pytest.approx(NOISE_SIGMA**2, rel=0.02)  # the identity's error is sigma^2 per coordinate
    # the MSE denoiser removes most of the noise; the stability one trades some MSE for f's accuracy
    assert denoiser_mse(den, xt, NOISE_SIGMA, seed=3) < (0.35 if name == "digits-mse" else 0.75) * noisy


def _small_training(objective: str, seed: int, classifier: nn.Module | None = None, init: nn.Module | None = None):
    x, _ = digits("train", limit=400)
    if init is None:
        torch.manual_seed(seed)
        den = ResidualDenoiser((1, 8, 8), hidden=32)
    else:
        den = init
    hist = train_denoiser(den, x, sigma=NOISE_SIGMA, objective=objective, classifier=classifier, epochs=15, seed=seed)
    return den, hist


def test_mse_training_is_seeded_and_learns_a_denoiser():
    a, hist = _small_training("mse", seed=4)
    b, _ = _small_training("mse", seed=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{ka} differs between two runs with the same seed"
    assert hist[-1] < 0.5 * hist[0]
    xt, _ = digits("test", limit=200)
    assert denoiser_mse(a, xt, NOISE_SIGMA) < 0.6 * denoiser_mse(nn.Identity(), xt, NOISE_SIGMA)


def test_stability_training_keeps_the_classifier_frozen_and_raises_its_noisy_accuracy():
    f = load_digits_mlp("plain")
    before = {k: v.clone() for k, v in f.state_dict().items()}
    den, _ = _small_training("mse", seed=1)
    xt, yt = digits("test", limit=300)
    noisy = xt + NOISE_SIGMA * torch.randn(xt.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        acc_mse = (f(den(noisy)).argmax(1) == yt).float().mean().item()
        loss_mse = float(stability_objective(den, f, xt, noisy))
    den, hist = _small_training("stability", seed=2, classifier=f, init=den)
    with torch.no_grad():
        acc_stab = (f(den(noisy)).argmax(1) == yt).float().mean().item()
        loss_stab = float(stability_objective(den, f, xt, noisy))
    assert all(torch.equal(v, before[k]) for k, v in f.state_dict().items()), "the classifier was trained"
    assert loss_stab < loss_mse and acc_stab > acc_mse, (loss_mse, loss_stab, acc_mse, acc_stab)


def test_training_refuses_bad_arguments():
    den = ResidualDenoiser((1, 8, 8), 8)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="needs the classifier"):
        train_denoiser(den, x, sigma=0.25, objective="stability")
    with pytest.raises(ValueError, match="unknown denoiser objective"):
        train_denoiser(den, x, sigma=0.25, objective="l1")
    with pytest.raises(ValueError, match="sigma must be positive"):
        train_denoiser(den, x, sigma=0.0)


# ----------------------------------------------------------------------------- the method


def test_registered_with_the_options_of_smoothing_gaussian_plus_the_denoiser():
    cls = list_methods()["smoothing-denoised"]
    gauss = list_methods()["smoothing-gaussian"].option_defaults()
    opts = cls.option_defaults()
    assert cls.guarantee == "probabilistic" and cls.certifies == "smoothed" and cls.norms == ("l2", "linf", "l1")
    assert opts.pop("denoiser") == "digits-stability" and opts == gauss


def _accuracy_under_noise(table) -> float:
    return float(np.mean([c.details["counts"].get(str(c.label), 0) / c.details["n"] for c in table]))


def test_denoised_smoothing_of_the_plain_classifier_beats_plain_smoothing():
    x, y = digits("test", limit=150)
    f = load_digits_mlp("plain")
    plain = certify(f, x, y, "smoothing-gaussian", eps=0.0, norm=2, method_options=FAST)
    base = _accuracy_under_noise(plain)
    for name in ("digits-mse", "digits-stability"):
        den = certify(f, x, y, "smoothing-denoised", eps=0.0, norm=2, method_options={**FAST, "denoiser": name})
        assert _accuracy_under_noise(den) > base + 0.05, (name, _accuracy_under_noise(den), base)
        assert den.certified_accuracy([0.25])[0] > plain.certified_accuracy([0.25])[0] + 0.1, name
        assert all(c.details["denoiser"]["name"] == name and c.method == "smoothing-denoised" for c in den)


@pytest.mark.parametrize("share", [True, False])
def test_identity_denoiser_gives_exactly_the_certificates_of_smoothing_gaussian(share):
    x, y = digits("test", limit=20)
    f = load_digits_mlp("plain")
    opts = {**FAST, "share_noise": share, "pb_bound": True}
    g = certify(f, x, y, "smoothing-gaussian", eps=0.3, norm=2, method_options=opts)
    d = certify(f, x, y, "smoothing-denoised", eps=0.3, norm=2, method_options={**opts, "denoiser": "identity"})
    keys = ("pA_lower", "pB_upper", "counts", "counts_selection")
    assert len({c.status for c in g}) > 1  # the comparison covers more than one status
    for a, b in zip(g, d):
        assert (a.status, a.prediction, a.radius) == (b.status, b.prediction, b.radius)
        assert all(a.details[k] == b.details[k] for k in keys)


def _linear_denoiser(d: int, seed: int) -> tuple[ResidualDenoiser, torch.Tensor]:
    """A ResidualDenoiser that is the linear map ``A = I - W2 W1`` (the hidden ReLUs never
    switch off: a bias of 50 keeps them positive), and ``A [d, d]``."""
    g = torch.Generator().manual_seed(seed)
    den = ResidualDenoiser((1, 4, 4), hidden=6, domain=None)
    w1, w2 = torch.randn(6, d, generator=g) / math.sqrt(d), torch.randn(d, 6, generator=g)
    with torch.no_grad():
        den.residual[0].weight.copy_(w1)
        den.residual[0].bias.fill_(50.0)
        den.residual[2].weight.copy_(w2)
        den.residual[2].bias.copy_(-50.0 * w2.sum(1))
    return den.eval(), torch.eye(d) - w2 @ w1


class _Sign(Projection):
    """Class 1 iff ``w . u > 0``."""

    def heads(self, s: torch.Tensor) -> list[torch.Tensor]:
        return [torch.zeros_like(s), s]


def test_certified_radius_of_f_after_d_exceeds_the_closed_form_in_at_most_alpha_of_trials(tmp_path):
    """f(D(z)) = [w . A z > 0] is linear: with a = A^T w, P(class 1 at x) = Phi(a.x / (sigma |a|))
    and g's decision boundary is at distance |a.x| / |a|, which Cohen's radius must not exceed
    except with probability alpha (independent noise per input: a binomial count)."""
    T, d, sigma, alpha = 1500, 16, 0.5, 0.05
    den, A = _linear_denoiser(d, seed=0)
    path = tmp_path / "linear.pt"
    save_denoiser(den, path, sigma=sigma)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, generator=g)
    a = A.T @ w
    u = a / a.norm()
    margin = sigma * torch.empty(T).uniform_(0.1, 3.7, generator=g) * torch.where(torch.rand(T, generator=g) < 0.5, -1.0, 1.0)
    base = torch.randn(T, d, generator=g)
    x = (base - (base @ u).unsqueeze(1) * u + margin.unsqueeze(1) * u).reshape(T, 1, 4, 4)
    true_cls, true_r = (margin > 0).long(), margin.abs().double().numpy()
    f = _Sign(w)
    opts = dict(sigma=sigma, n0=10, n=100, alpha=alpha, seed=0, batch_size=4000, share_noise=False)
    ball = LpBall(x, 0.0, 2)
    certs = get_method("smoothing-denoised", denoiser=str(path), **opts).certify(f, ball, Robust(true_cls))
    pred = np.array([c.prediction for c in certs])
    radius = np.array([c.radius for c in certs])
    answered = pred >= 0
    fails = int((answered & ((pred != true_cls.numpy()) | (radius > true_r))).sum())
    assert answered.sum() > T // 2
    assert binomtest(fails, T, alpha, alternative="greater").pvalue > 1e-3, f"{fails}/{T} failures"
    # the counts follow the closed form: mean of nA / n vs the exact P(class 1)
    p1 = norm.cdf((x.reshape(T, d) @ a).double().numpy() / (sigma * float(a.norm())))
    frac1 = np.array([c.details["counts"].get("1", 0) / 100 for c in certs])
    assert abs(float(np.mean(frac1 - p1))) < 4 * math.sqrt(0.25 / (100 * T))
    # the check has power: smoothing f without D, judged against f(D(.))'s boundary, fails it
    plain = get_method("smoothing-gaussian", **opts).certify(f, ball, Robust(true_cls))
    bad = sum(1 for c, r, t in zip(plain, true_r, true_cls.tolist()) if c.prediction >= 0 and (c.prediction != t or c.radius > r))
    assert binomtest(bad, T, alpha, alternative="greater").pvalue < 1e-6


def test_sigma_other_than_the_training_sigma_is_noted():
    x, y = digits("test", limit=3)
    t = certify(load_digits_mlp("plain"), x, y, "smoothing-denoised", eps=0.0, norm=2,
                method_options={**FAST, "sigma": 0.5})
    assert "trained at sigma 0.25" in t[0].details["denoiser_note"]
    t = certify(load_digits_mlp("plain"), x, y, "smoothing-denoised", eps=0.0, norm=2, method_options=FAST)
    assert "denoiser_note" not in t[0].details


# ----------------------------------------------------------------------------- CLI and errors


def test_cli_run_round_trip_matches_the_python_api(tmp_path, capsys):
    out = tmp_path / "r.csv"
    rc = main(["run", "--model", "digits-mlp", "--data", "digits", "--limit", "6", "--eps", "0.25", "--norm", "2",
               "--method", "smoothing-denoised", "--option", "denoiser=digits-mse", "--option", "n=1000",
               "--option", "n0=50", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    x, y = digits("test", limit=6)
    api = certify(load_digits_mlp("plain"), x, y, "smoothing-denoised", eps=0.25, norm=2,
                  method_options={"denoiser": "digits-mse", "n": 1000, "n0": 50})
    assert [r["method"] for r in rows] == ["smoothing-denoised"] * 6
    assert [(r["status"], float(r["radius"])) for r in rows] == [(c.status, pytest.approx(c.radius)) for c in api]
    assert json.loads(rows[0]["details"])["denoiser"]["name"] == "digits-mse"
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "smoothing-denoised" in listing and "denoiser='digits-stability'" in listing


def test_unknown_or_malformed_denoiser_is_one_line(tmp_path, capsys):
    with pytest.raises(SmoothingConfigError, match="option denoiser: denoiser 'nope' is neither identity"):
        get_method("smoothing-denoised", denoiser="nope")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(SmoothingConfigError, match="not one written by smoothing.denoiser.save_denoiser"):
        get_method("smoothing-denoised", denoiser=str(bad))
    bad.write_text("not a torch file")
    with pytest.raises(SmoothingConfigError, match=r"save_denoiser \(UnpicklingError while reading it\)$"):
        get_method("smoothing-denoised", denoiser=str(bad))
    rc = main(["run", "--model", "digits-mlp", "--data", "digits", "--limit", "2", "--eps", "0.1", "--norm", "2",
               "--method", "smoothing-denoised", "--option", "denoiser=nope"])
    assert rc == 2 and "denoiser 'nope' is neither identity" in err_line(capsys)


def test_input_shape_the_denoiser_does_not_take_is_one_line(capsys):
    m = get_method("smoothing-denoised", **FAST)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(SpecError, match=r"takes inputs of shape \(1, 8, 8\), got \(1, 6, 6\)") as e:
        m.certify(net, LpBall(x, 0.1, 2), Robust(torch.tensor([0, 1])))
    assert "\n" not in str(e.value)
    # the identity takes any shape
    certs = get_method("smoothing-denoised", **{**FAST, "denoiser": "identity"}).certify(net, LpBall(x, 0.1, 2), Robust(torch.tensor([0, 1])))
    assert len(certs) == 2


def test_demo_compares_the_four_variants(tmp_path, monkeypatch):
    import verify.demo as demo

    monkeypatch.setitem(demo.DEMO_OPTIONS, "smoothing-*", {**demo.DEMO_OPTIONS["smoothing-*"], "n": 500, "n0": 50})
    lines: list[str] = []
    res = demo.run_demo(out_dir=tmp_path, limit=40, methods=["smoothing-denoised"], norms=("l2",), progress=False,
                        print_fn=lines.append)
    rows = res["denoised"]
    assert [r["variant"] for r in rows] == [v[0] for v in demo.DENOISED_VARIANTS]
    assert [r["denoiser"] for r in rows] == ["-", "digits-mse", "digits-stability", "-"]
    acc = {r["variant"]: r["acc_under_noise"] for r in rows}
    assert acc["D_stab + plain f"] > acc["plain f smoothed"] + 0.05 and acc["D_mse + plain f"] > acc["plain f smoothed"] + 0.03
    assert all(0 <= r["cert@0.5"] <= r["cert@0.25"] <= r["cert@0"] <= 1 for r in rows)
    saved = list(csv.DictReader(open(tmp_path / "demo_denoised_results.csv")))
    assert [s["variant"] for s in saved] == list(acc) and float(saved[2]["cert@0.25"]) == pytest.approx(rows[2]["cert@0.25"])
    assert any("denoised smoothing (Salman et al. 2020) on 40 test digits" in s for s in lines)
