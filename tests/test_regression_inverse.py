"""The two sampling tasks as registered methods (issue 20, item 5): ``smoothing-regression``
(median smoothing, Chiang et al. 2020) and ``smoothing-invariance`` (the inverse task).

Validity as for the other smoothing methods: closed forms (a linear regressor's median under
Gaussian noise is its value at the centre; a threshold classifier's probability on a box is a
length ratio), coverage at ``alpha`` by simulation over many independent trials (one-sided
binomial tests at level 1e-3, and the miss rate of each side against its exact binomial value,
which catches an index off by one), the status rules, the CLI round trip and one-line errors.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest
from scipy.stats import norm as normal
from torch import nn

from conftest import cli_error
from smoothing.methods_tasks import checked_radii, largest_certified_radius, row_bounds
from smoothing.regression import order_statistic_indices, percentile_bounds
from smoothing.stats import cp_interval
from smoothing_helpers import Projection
from verify import certify
from verify.certificate import Certificate, CertificateTable
from verify.cli import main
from verify.errors import OptionError
from verify.registry import get_method, list_methods
from verify.spec import Box, Linear, LpBall, OutputBounds, Robust, SpecError, TopK


class _Affine(Projection):
    """``y = [w.x + 1, -2 w.x]``: two outputs whose medians under noise are their values."""

    def heads(self, s: torch.Tensor) -> list[torch.Tensor]:
        return [s + 1.0, -2.0 * s]


class _Threshold(nn.Module):
    """Class 1 iff ``x_0 > t``."""

    def __init__(self, t: float = 0.0) -> None:
        super().__init__()
        self.t = t

    def forward(self, x):
        s = x.reshape(x.shape[0], -1)[:, 0] - self.t
        return torch.stack([-s, s], 1)


def _w(d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_registered_probabilistic_with_explicit_options():
    reg = list_methods()
    reg_cls, inv_cls = reg["smoothing-regression"], reg["smoothing-invariance"]
    assert reg_cls.guarantee == inv_cls.guarantee == "probabilistic"
    assert reg_cls.certifies == "smoothed" and inv_cls.certifies == "fraction"
    assert reg_cls.norms == ("l2",) and set(inv_cls.norms) == {"linf", "l2", "l1", "box"}
    o = reg_cls.option_defaults()
    assert o["sigma"] == 0.25 and o["percentile"] == 0.5 and o["alpha"] == 0.001 and o["radius_steps"] == 8
    assert inv_cls.option_defaults()["min_probability"] == 0.99


def test_checked_radii_and_prefix_rule():
    assert checked_radii(0.3, False, None, 4) == [0.3]
    assert checked_radii(0.25, True, 1.0, 4) == [0.25, 0.5, 0.75, 1.0]  # eps on the grid: not twice
    assert checked_radii(0.1, True, None, 2) == [0.1, 0.5, 1.0]  # default top max(4 eps, 1)
    assert largest_certified_radius([0.1, 0.2, 0.3], [True, False, True]) == 0.1  # no gap jumped
    assert largest_certified_radius([0.1, 0.2], [False, True]) == 0.0


def test_row_bounds_interval_arithmetic_with_infinite_ends():
    spec = Linear(torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([0.5, -1.0])).linear(1, 2, dtype=torch.float64)
    lo = torch.tensor([[1.0, -math.inf]], dtype=torch.float64)
    hi = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    low, high = row_bounds(spec, lo, hi)
    assert low.tolist() == [[1.0 - 3.0 + 0.5, -math.inf]] and high.tolist() == [[math.inf, 5.0]]


def test_regression_closed_form_linear_model_bounds_contain_the_true_range():
    """Median smoothing of ``w.x + b`` is itself (Gaussian noise is symmetric), so over the l2 ball
    of radius eps output 0 ranges over ``w.x + 1 +- ||w|| eps`` and output 1 over
    ``-2 w.x +- 2 ||w|| eps``; the certified box must contain both ranges, and not be vacuous."""
    w, eps, sigma = _w(), 0.3, 0.5
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    t = certify(_Affine(w), x, OutputBounds(-100.0, 100.0), "smoothing-regression", eps=eps, norm=2, domain=None,
                sigma=sigma, n=4000, alpha=0.001)
    s, nw = (x @ w).double(), float(w.norm())
    for c, sb in zip(t, s.tolist()):
        lo, hi = c.output_lower, c.output_upper
        assert lo[0] <= sb + 1 - nw * eps + 1e-6 and hi[0] >= sb + 1 + nw * eps - 1e-6
        assert lo[1] <= -2 * sb - 2 * nw * eps + 1e-6 and hi[1] >= -2 * sb + 2 * nw * eps - 1e-6
        assert hi[0] - lo[0] < 2 * nw * eps + 0.5 * nw * sigma  # not vacuous
        assert c.status == "certified" and c.radius == pytest.approx(eps, rel=1e-6) and c.prediction is None
        assert c.guarantee == "probabilistic" and c.certifies == "smoothed" and c.confidence == pytest.approx(0.999)
        # the property rows (y - (-100), 100 - y) are bounded from the output box
        assert c.lower[0] == pytest.approx(lo[0] + 100) and c.lower[2] == pytest.approx(100 - hi[0])
        assert c.details["percentile_at_x"][0] == pytest.approx(sb + 1, abs=0.1 * nw * sigma)


def test_regression_status_follows_the_bounds_not_the_estimate():
    """An interval the true range of the median leaves is never certified (its bounds contain
    that range); one the bounds fit in is; a hopeless eps leaves infinite bounds and says why."""
    w = _w()
    x = torch.zeros(1, 5)
    nw = float(w.norm())
    m = get_method("smoothing-regression", sigma=0.5, n=2000, alpha=0.001)
    tight = m.certify(_Affine(w), LpBall(x, 0.5, 2), OutputBounds(torch.tensor([1 - 0.4 * nw, -100.0]), torch.tensor([100.0, 100.0])))[0]
    assert tight.status == "unknown" and tight.details["reason"] == "the output bounds do not imply the property"
    loose = m.certify(_Affine(w), LpBall(x, 0.5, 2), OutputBounds(torch.tensor([1 - 3 * nw, -100.0]), 100.0))[0]
    assert loose.status == "certified"
    hopeless = m.certify(_Affine(w), LpBall(x, 20.0, 2), OutputBounds(-1e6, 1e6))[0]
    assert hopeless.status == "unknown" and "too few" in hopeless.details["reason"]
    assert hopeless.output_lower == [-math.inf, -math.inf] and hopeless.output_upper == [math.inf, math.inf]
    back = Certificate.from_json(hopeless.to_json())  # infinite ends survive JSON
    assert back.output_lower == [-math.inf, -math.inf] and back.lower[0] == -math.inf


def test_regression_robust_property_on_logits():
    """For a classifier, Robust(label) holds for the median-smoothed logits when the label's
    lower bound beats every other upper bound; the prediction is the argmax of the medians."""
    w = _w()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2)) * 3
    model = _Affine(w)
    labels = model(x).argmax(1)
    certs = get_method("smoothing-regression", sigma=0.25, n=2000, alpha=0.01).certify(model, LpBall(x, 0.1, 2), Robust(labels))
    for c, lab in zip(certs, labels.tolist()):
        other = 1 - lab
        implied = c.output_lower[lab] > c.output_upper[other]
        assert (c.status == "certified") == implied and c.prediction == lab and c.label == lab
        assert c.lower == [pytest.approx(c.output_lower[lab] - c.output_upper[other])]
    assert any(c.status == "certified" for c in certs)


def test_regression_coverage_by_simulation_matches_the_exact_miss_rates():
    """Independent trials (share_noise=False, distinct inputs), one output, small n: the lower
    bound misses ``min h`` over the ball with probability exactly ``P(Bin(n, p_low) <= k_low - 1)``
    and the upper misses ``max h`` with ``P(Bin(n, p_up) >= k_up)`` (continuous outputs), each at
    most ``alpha / 2``. A one-sided test against alpha, and a two-sided test of each side's rate
    against its exact value (an order statistic off by one fails it)."""
    T, n, alpha, sigma, eps = 2000, 40, 0.2, 0.5, 0.2
    w = _w(3, seed=4)
    model = lambda z: (z.reshape(z.shape[0], -1) @ w).unsqueeze(1)  # noqa: E731
    x = torch.randn(T, 3, generator=torch.Generator().manual_seed(5))
    certs = get_method("smoothing-regression", sigma=sigma, n=n, alpha=alpha, share_noise=False, seed=7).certify(
        model, LpBall(x, eps, 2), OutputBounds(-1e9, 1e9))
    truth, nw = (x @ w).double().numpy(), float(w.norm())
    lo = np.array([c.output_lower[0] for c in certs])
    hi = np.array([c.output_upper[0] for c in certs])
    assert np.isfinite(lo).all() and np.isfinite(hi).all()
    miss_lo, miss_hi = lo > truth - nw * eps, hi < truth + nw * eps
    assert binomtest(int((miss_lo | miss_hi).sum()), T, alpha, alternative="greater").pvalue > 1e-3
    k_low, k_up = certs[0].details["k_low"], certs[0].details["k_up"]
    p_low, p_up = normal.cdf(-eps / sigma), normal.cdf(eps / sigma)
    exact_lo, exact_hi = binom.cdf(k_low - 1, n, p_low), binom.sf(k_up - 1, n, p_up)
    assert exact_lo <= alpha / 2 and exact_hi <= alpha / 2
    for miss, exact in ((miss_lo, exact_lo), (miss_hi, exact_hi)):
        assert binomtest(int(miss.sum()), T, exact).pvalue > 1e-3, (int(miss.sum()), T * exact)


def test_regression_certified_radius_exceeds_the_true_radius_in_at_most_alpha_of_trials():
    """With find_radius the statements at every checked radius hold together (alpha split over
    them): the property ``w.x' < U`` holds on the ball of radius ``(U - w.x) / ||w||`` exactly,
    so a radius above it is a failure; at most alpha of independent trials fail, and most
    trials certify something (power)."""
    T, alpha = 800, 0.1
    w = _w(3, seed=8)
    model = lambda z: (z.reshape(z.shape[0], -1) @ w).unsqueeze(1)  # noqa: E731
    x = torch.randn(T, 3, generator=torch.Generator().manual_seed(9)) * 0.1
    m = get_method("smoothing-regression", sigma=0.5, n=300, alpha=alpha, share_noise=False, radius_steps=20)
    certs = m.certify(model, LpBall(x, 0.0, 2), OutputBounds(None, 1.0), find_radius=True, max_radius=2.0)
    true_r = (1.0 - (x @ w).double().numpy()) / float(w.norm())
    radius = np.array([c.radius for c in certs])
    assert binomtest(int((radius > true_r).sum()), T, alpha, alternative="greater").pvalue > 1e-3
    assert (radius > 0).mean() > 0.9 and certs[0].details["alpha_per_radius"] == pytest.approx(alpha / 21)
    # the bounds at eps = 0 use the split alpha: order statistics for alpha / 21 over 2 sides, 1 output
    assert (certs[0].details["k_low"], certs[0].details["k_up"]) == order_statistic_indices(300, 0.5, 0.5, alpha / 21 / 2)
    assert all(r in c.details["radii_checked"] or r == 0.0 for r, c in zip(radius, certs))


def test_percentile_bounds_unchanged_by_the_split_into_sampling_and_bounds():
    """The library function is the composition of the two parts the method uses."""
    from smoothing.regression import bounds_from_samples, sample_outputs

    w = _w()
    model = lambda z: (z.reshape(z.shape[0], -1) @ w).unsqueeze(1)  # noqa: E731
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    whole = percentile_bounds(model, x, 0.5, 0.2, n=500, alpha=0.01, seed=2)
    parts = bounds_from_samples(sample_outputs(model, x, 0.5, 500, seed=2), 0.5, 0.2, 0.5, 0.01)
    assert np.array_equal(whole.lower, parts.lower) and np.array_equal(whole.upper, parts.upper)
    assert (whole.k_low, whole.k_up) == (parts.k_low, parts.k_up)


def _boxes(T: int, q: float, seed: int = 0) -> Box:
    """``T`` distinct boxes in ``R^3`` in which ``x_0`` is uniform on ``[-(1 - q), q]``, so that
    ``P(x_0 > 0) = q``; the other coordinates differ between boxes (independent noise per box)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.zeros(T, 3)
    lo[:, 0] = -(1 - q)
    lo[:, 1:] = torch.rand(T, 2, generator=g)  # distinct boxes: independent draws per box
    hi = lo.clone()
    hi[:, 0] = q
    hi[:, 1:] += 0.5
    return Box(lo, hi)


def test_invariance_interval_covers_the_exact_probability_by_simulation():
    """f = 1[x_0 > 0] on boxes where x_0 is uniform on [-(1 - q), q]: P(class 1) = q exactly.
    The two-sided Clopper-Pearson interval misses q in at most alpha of independent trials, and
    in the exact proportion (the sum of the binomial pmf over the counts whose interval misses)."""
    T, n, alpha, q = 2000, 30, 0.2, 0.7
    certs = get_method("smoothing-invariance", n=n, alpha=alpha, min_probability=0.5, share_noise=False).certify(
        _Threshold(), _boxes(T, q), Robust(1))
    lo = np.array([c.estimate_lower for c in certs])
    hi = np.array([c.estimate_upper for c in certs])
    miss = int(((lo > q) | (hi < q)).sum())
    assert binomtest(miss, T, alpha, alternative="greater").pvalue > 1e-3
    ks = np.arange(n + 1)
    klo, khi = cp_interval(ks, n, alpha)
    exact = float(binom.pmf(ks, n, q)[(klo > q) | (khi < q)].sum())
    assert binomtest(miss, T, exact).pvalue > 1e-3, (miss, T * exact)
    est = np.array([c.estimate for c in certs])
    assert abs(est.mean() - q) < 0.01 and certs[0].norm == "box" and certs[0].radius == 0.0
    assert certs[0].details["distribution"] == "uniform on the set"


def test_invariance_status_is_certified_only_by_the_lower_end():
    """True probability 0.84 below min_probability 0.85: a status that read the estimate would
    certify about a third of the trials; the lower end of the interval certifies at most
    alpha / 2 of them. Status and interval agree on every certificate."""
    T, alpha = 600, 0.1
    m = get_method("smoothing-invariance", n=200, alpha=alpha, min_probability=0.85, share_noise=False)
    certs = m.certify(_Threshold(), _boxes(T, 0.84, seed=1), Robust(1))
    wrong = sum(c.status == "certified" for c in certs)
    assert binomtest(wrong, T, alpha / 2, alternative="greater").pvalue > 1e-3
    assert sum(c.estimate >= 0.85 for c in certs) > 0.2 * T  # what a rule on the estimate would certify
    for c in certs:
        assert (c.status == "certified") == (c.estimate_lower >= 0.85)
        assert c.estimate_lower <= c.estimate <= c.estimate_upper and c.prediction == 1 and c.label == 1
    ok = m.certify(_Threshold(), _boxes(4, 0.999, seed=2), Robust(1))
    assert [c.status for c in ok] == ["certified"] * 4


def test_invariance_radius_search_on_linf_balls_is_valid():
    """f = 1[x_0 > 0] around x_0 = t, l_inf ball of radius r (no domain): the probability is 1
    for r <= t and (r + t) / (2 r) beyond, so min_probability 0.9 holds up to r* = t / 0.8;
    a certified radius above r* fails, in at most alpha of independent trials."""
    T, alpha, t = 300, 0.1, 0.1
    x = torch.rand(T, 3, generator=torch.Generator().manual_seed(3))
    model = _Threshold(0.0)
    # centres x_0 = t (the threshold 0 is t below), the other coordinates make the inputs distinct
    x[:, 0] = t
    m = get_method("smoothing-invariance", n=2000, alpha=alpha, min_probability=0.9, share_noise=False, radius_steps=10)
    certs = m.certify(model, LpBall(x, 0.0, math.inf), Robust(1), find_radius=True, max_radius=0.2)
    r_star = t / 0.8
    radius = np.array([c.radius for c in certs])
    assert binomtest(int((radius > r_star * (1 + 1e-6)).sum()), T, alpha, alternative="greater").pvalue > 1e-3
    assert (radius >= 0.1).mean() > 0.9  # power: r <= t is certified almost always
    c = certs[0]
    assert len(c.details["radii_checked"]) == 11 and c.details["alpha_per_radius"] == pytest.approx(alpha / 11)
    lo, hi = cp_interval(np.array([c.details["agree"]]), 2000, alpha / 11)  # the interval at eps uses the split alpha
    assert (c.estimate_lower, c.estimate_upper) == (pytest.approx(float(lo[0])), pytest.approx(float(hi[0])))
    assert all(e["lower"] <= e["estimate"] <= e["upper"] for e in c.details["per_radius"])


def test_bad_inputs_are_refused_with_one_cause():
    x = torch.zeros(1, 4)
    with pytest.raises(SpecError, match="does not support linf"):
        get_method("smoothing-regression", n=100).certify(_Affine(_w(4)), LpBall(x, 0.1, math.inf), OutputBounds(0.0, 1.0))
    with pytest.raises(SpecError, match="does not support box"):
        get_method("smoothing-regression", n=100).certify(_Affine(_w(4)), Box(x, x + 0.1), OutputBounds(0.0, 1.0))
    with pytest.raises(SpecError, match="eps must be >= 0"):
        LpBall(x, -0.1, 2)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        percentile_bounds(_Affine(_w(4)), x, 0.5, -0.1, n=10)
    with pytest.raises(SpecError, match="needs a Robust"):
        get_method("smoothing-invariance", n=100).certify(_Threshold(), LpBall(x, 0.1, 2), TopK(1, 1))
    with pytest.raises(SpecError, match="find_radius needs an l_p ball"):
        get_method("smoothing-invariance", n=100).certify(_Threshold(), Box(x, x + 0.1), Robust(1), find_radius=True)
    for name, opts, cause in (("smoothing-regression", {"percentile": 1.0}, "percentile"),
                              ("smoothing-regression", {"sigma": 0.0}, "sigma"),
                              ("smoothing-invariance", {"min_probability": 1.0}, "min_probability"),
                              ("smoothing-invariance", {"radius_steps": 0}, "radius_steps")):
        with pytest.raises(ValueError, match=cause):
            get_method(name, **opts)
    with pytest.raises(OptionError, match="option n of smoothing-invariance: expected a value > 0, got 0"):
        list_methods()["smoothing-invariance"](n=0)


# ------------------------------------------------------------------------------------- CLI


def test_cli_run_regression_round_trip(tmp_path, capsys):
    out = tmp_path / "r.csv"
    args = ["run", "--model", "digits-mlp-noise", "--data", "digits", "--limit", "4", "--eps", "0.25", "--norm", "2",
            "--method", "smoothing-regression", "--option", "n=500", "--option", "alpha=0.01", "--out", str(out), "-q"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per input (4 of 4)" in text and "others <=" in text
    table = CertificateTable.from_csv(str(out))
    from verify.data import digits
    from verify.digits_model import load_digits_mlp

    x, y = digits("test", limit=4)
    api = certify(load_digits_mlp("noise"), x, y, "smoothing-regression", eps=0.25, norm=2, n=500, alpha=0.01)
    for a, b in zip(table, api):
        assert a.output_lower == pytest.approx(b.output_lower) and a.output_upper == pytest.approx(b.output_upper)
        assert a.status == b.status and len(a.output_lower) == 10 and a.estimate is None
    header = next(csv.reader(open(out)))
    assert header[-5:] == ["output_lower", "output_upper", "estimate", "estimate_lower", "estimate_upper"]


def test_cli_run_invariance_round_trip(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["run", "--model", "digits-mlp-noise", "--data", "digits", "--limit", "3", "--eps", "0.4", "--norm", "inf",
            "--method", "smoothing-invariance", "--option", "n=400", "--option", "min_probability=0.5", "--out", str(out), "-q"]
    assert main(args) == 0
    assert "P = " in capsys.readouterr().out
    rows = json.loads(out.read_text())
    table = CertificateTable.from_json(str(out))
    for r, c in zip(rows, table):
        assert r["certifies"] == "fraction" and 0 <= r["estimate_lower"] <= r["estimate"] <= r["estimate_upper"] <= 1
        assert c.estimate == r["estimate"] and c.status == ("certified" if c.estimate_lower >= 0.5 else "unknown")


def test_cli_regressor_with_an_output_interval(tmp_path, capsys):
    """A regressor (mean pixel, one output) from a .pt file with --output-lower/--output-upper:
    its median over the l2 ball of radius eps is mean(x) +- eps / 8 (||w|| = 1/8 in 64 pixels)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with torch.no_grad():
        model[1].weight.fill_(1 / 64)
        model[1].bias.zero_()
    pt = tmp_path / "mean.pt"
    torch.save(model, pt)
    out = tmp_path / "r.csv"
    base = ["run", "--model", str(pt), "--data", "digits", "--limit", "5", "--eps", "0.4", "--norm", "2",
            "--method", "smoothing-regression", "--option", "n=2000", "-q"]
    assert main([*base, "--output-lower", "0", "--output-upper", "1", "--out", str(out)]) == 0
    from verify.data import digits

    x, _ = digits("test", limit=5)
    mean = x.flatten(1).mean(1).double()
    for c, mu in zip(CertificateTable.from_csv(str(out)), mean.tolist()):
        assert c.label is None and c.status == "certified"
        assert c.output_lower[0] <= mu - 0.4 / 8 + 1e-6 and c.output_upper[0] >= mu + 0.4 / 8 - 1e-6
    capsys.readouterr()
    assert main([*base, "--output-lower", "0.3", "--out", ""]) == 0  # some digits' mean is below 0.3 + eps / 8
    assert "unknown" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, cause",
    [
        (["--method", "smoothing-regression", "--eps", "-0.1", "--norm", "2"], "--eps must be"),
        (["--method", "smoothing-regression", "--eps", "0.1", "--norm", "inf"], "does not support linf"),
        (["--method", "smoothing-invariance", "--eps", "0.1", "--norm", "l3"], "norm"),
        (["--method", "smoothing-regression", "--eps", "0.1", "--norm", "2", "--option", "percentile=1.5"], "percentile"),
        (["--method", "smoothing-invariance", "--eps", "0.1", "--option", "min_probability=0"], "min_probability"),
        (["--method", "smoothing-invariance", "--eps", "0.1", "--option", "radius_steps=0"], "radius_steps"),
        (["--method", "smoothing-regression", "--eps", "0.1", "--norm", "2", "--output-lower", "abc"], "--output-lower"),
        (["--method", "smoothing-regression", "--eps", "0.1", "--norm", "2", "--output-upper", "1,2"], "OutputBounds"),
    ],
)
def test_cli_bad_inputs_one_line(capsys, extra, cause):
    argv = ["run", "--model", "digits-mlp-noise", "--data", "digits", "--limit", "2", "--out", "", *extra]
    assert cause in cli_error(capsys, argv)


def test_cli_invariance_refuses_a_vnnlib_property(tmp_path, capsys):
    """A VNN-LIB answer (sat / unsat) is never given by sampling: the property is not a Robust."""
    lines = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (>= X_{i} 0.0))" for i in range(64)] + [f"(assert (<= X_{i} 0.1))" for i in range(64)]
    lines.append("(assert (<= Y_0 Y_1))")
    spec = tmp_path / "p.vnnlib"
    spec.write_text("\n".join(lines))
    argv = ["run", "--model", "digits-mlp-noise", "--spec", str(spec), "--method", "smoothing-invariance", "--out", ""]
    assert "needs a Robust" in cli_error(capsys, argv)


# ------------------------------------------------------------------------ certificate fields


def test_certificate_new_fields_validate_and_round_trip(tmp_path):
    c = Certificate(method="m", guarantee="probabilistic", status="unknown", confidence=0.9, certifies="fraction",
                    estimate=0.5, estimate_lower=0.4, estimate_upper=0.6, output_lower=[-math.inf, 0.0], output_upper=[1.0, math.inf])
    path = tmp_path / "c.csv"
    CertificateTable([c]).to_csv(str(path))
    assert CertificateTable.from_csv(str(path))[0] == c and Certificate.from_json(c.to_json()) == c
    for bad in (dict(estimate=1.2, estimate_lower=0.4, estimate_upper=1.0), dict(estimate=0.5),
                dict(estimate=0.3, estimate_lower=0.4, estimate_upper=0.6),
                dict(output_lower=[1.0], output_upper=[0.0]), dict(output_lower=[0.0])):
        with pytest.raises(ValueError):
            Certificate(method="m", guarantee="probabilistic", status="unknown", confidence=0.9, **bad)
    with pytest.raises(ValueError, match="certifies"):
        Certificate(method="m", guarantee="deterministic", status="unknown", certifies="other")


def test_compare_resumes_a_results_csv_written_before_the_new_columns(tmp_path):
    """A results CSV without the newer columns is rewritten with them on --resume; its rows stay."""
    from verify.compare import compare
    from verify.data import digits
    from verify.digits_model import load_digits_mlp

    x, y = digits("test", limit=6)
    kw = dict(radii=[0.0, 0.01], norm="inf", max_radius=0.05, attack=False, progress=False, out_dir=tmp_path)
    compare(load_digits_mlp(), x[:4], y[:4], ["interval"], **kw)
    path = tmp_path / "compare_results.csv"
    rows = list(csv.DictReader(open(path)))
    old_cols = [k for k in rows[0] if k not in ("output_lower", "output_upper", "estimate", "estimate_lower", "estimate_upper")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    res = compare(load_digits_mlp(), x, y, ["interval"], resume=True, **kw)
    assert [c.index for c in res.table] == list(range(6)) and any("resumed: 4" in n for n in res.notes)
    new_rows = list(csv.DictReader(open(path)))
    assert len(new_rows) == 6 and "estimate" in new_rows[0]
