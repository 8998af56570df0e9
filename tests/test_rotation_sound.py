"""Sound rotation certificates (Fischer et al. 2020, Sec. 4-5): the interpolation-error bound,
the tail statement over sampled angles, and the combined certificate of ``smoothing-rotation``."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from smoothing.rotation_error import _box_bounds, composition_error, exceed_probability, rotation_error_bound, rotation_error_search
from smoothing.semantic import certify_rotation_sound, rotate, sound_rotation_radius
from smoothing_helpers import Energy, assert_certificates_hold, check_method_details
from verify.data import load_data
from verify.deadline import Deadline
from verify.registry import get_method
from verify.spec import LpBall, Robust


def _digits(k: int) -> torch.Tensor:
    return load_data("digits", limit=k)[0]


def _measured_max(x: torch.Tensor, betas: torch.Tensor, G: float, steps: int) -> float:
    """Largest ||R_b(R_g x) - R_{b+g} x||_2 over a dense gamma grid, with the suite's real
    (float32 grid_sample) rotation. ``x [C, H, W]``, ``betas [m]``."""
    gam = torch.linspace(-G, G, steps)
    worst = 0.0
    for b in betas.tolist():
        xs = x.unsqueeze(0).expand(steps, *x.shape)
        twice = rotate(rotate(xs, gam), torch.full((steps,), b))
        once = rotate(xs, gam + b)
        worst = max(worst, float((twice - once).flatten(1).norm(dim=1).max()))
    return worst


@pytest.mark.parametrize("idx", [0, 1, 2, 3])
def test_error_bound_covers_dense_grid_and_half_of_it_does_not(idx):
    x = _digits(4)[idx]
    betas = torch.randn(12, generator=torch.Generator().manual_seed(idx)) * 10.0
    E, lower = rotation_error_bound(x, betas, 6.0)
    meas = _measured_max(x, betas, 6.0, 1201)
    assert lower <= meas + 1e-4 and meas <= E
    assert E / 2 < meas  # a halved bound would be caught by the dense grid
    assert E <= meas + 0.05  # and the bound is reasonably tight (tol 0.02 + slack)


def test_box_bounds_contain_points_inside_the_box():
    x = _digits(1)[0].double()
    g0, g1 = torch.tensor([0.01, -0.05]), torch.tensor([0.03, -0.02])
    beta = torch.tensor([0.2, -0.4])
    ub = _box_bounds(x, beta, g0, g1)
    for k in range(2):
        gs = torch.linspace(float(g0[k]), float(g1[k]), 101) * 180 / math.pi
        pts = composition_error(x, torch.full((101,), float(beta[k]) * 180 / math.pi), gs)
        assert float(pts.max()) <= float(ub[k]) + 1e-12


def test_composition_error_matches_rotate():
    x = _digits(1)[0]
    b, g = torch.tensor([7.3, -12.0, 0.0]), torch.tensor([4.1, 9.0, 5.0])
    xs = x.unsqueeze(0).expand(3, *x.shape)
    ref = (rotate(rotate(xs, g), b) - rotate(xs, b + g)).flatten(1).norm(dim=1)
    assert torch.allclose(composition_error(x, b, g).float(), ref, atol=1e-5)
    assert float(composition_error(x, b, g)[2]) < 1e-6  # beta = 0 composes exactly


def test_exceed_probability_is_a_valid_tail_bound():
    """Uniform errors: P(U > max of m) = 1 - max; it exceeds q in about alpha of the trials."""
    m, alpha, trials = 50, 0.1, 20000
    q = exceed_probability(m, alpha)
    mx = np.random.default_rng(0).random((trials, m)).max(1)
    freq = float(((1 - mx) > q).mean())
    assert abs(freq - alpha) < 0.015
    assert float(((1 - mx) > q / 2).mean()) > alpha + 0.05  # a smaller q would not hold


def test_sound_radius_formula():
    pa = np.array([0.99, 0.9, 0.6])
    r = sound_rotation_radius(pa, 0.0, np.array([0.1, 0.1, 1.0]), 10.0, 0.5)
    from scipy.stats import norm
    assert r[0] == pytest.approx(10 * math.sqrt(norm.ppf(0.99) ** 2 - 0.04))
    assert r[2] == 0.0
    assert sound_rotation_radius(pa, 0.05, np.array([0.1] * 3), 10.0, 0.5)[0] < r[0]


def _arc(r: float) -> torch.Tensor:
    """Angles ``[5, 1]`` on a grid of ``[-r, r]``."""
    return torch.tensor(np.linspace(-r, r, 5), dtype=torch.float32).reshape(-1, 1)


def test_certificate_holds_on_the_real_attacked_image():
    """Where the certificate says cA up to radius r, the smoothed classifier of R_gamma(x)
    gives cA for gamma on a grid of [-r, r]; the same check flags an over-claimed radius
    (a thin margin and a claimed 25 degrees)."""
    assert_certificates_hold(certify_rotation_sound, _digits(6), 4.0, rotate, _arc, margin=8.5, thin_margin=4.0,
                             claim=_arc(25.0), sigma=5.0, sl2=0.3)


def test_method_details_and_old_behaviour():
    check_method_details("smoothing-rotation", 1.0, "R_gamma(x)")


# --- the deadline covers the error search (issue 20, item 3)


def test_error_search_deadline_is_sound_and_anytime():
    """No time: incomplete, E = inf. Cut during refinement: a complete bound, never below the
    untimed one. Generous: identical to the untimed search."""
    x = _digits(2)[1]
    betas = torch.randn(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    full = rotation_error_search(x, betas, 5.0)
    assert full.complete and full.refined and (full.E, full.lower) == rotation_error_bound(x, betas, 5.0)
    none = rotation_error_search(x, betas, 5.0, deadline=0.0)
    assert not none.complete and none.E == math.inf
    roomy = rotation_error_search(x, betas, 5.0, deadline=600.0)
    assert (roomy.E, roomy.lower, roomy.rounds) == (full.E, full.lower, full.rounds)
    t0 = time.perf_counter()
    cut = rotation_error_search(x, betas, 5.0, deadline=Deadline(0.6 * _elapsed(lambda: rotation_error_search(x, betas, 5.0))))
    wall = time.perf_counter() - t0
    assert cut.E >= full.E and (cut.complete or cut.E == math.inf)
    assert wall < 2.0


def _elapsed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_certify(method, model, x, y, timeout):
    t0 = time.perf_counter()
    certs = method.certify(model, LpBall(x, 2.0, 2), Robust(y), timeout=timeout)
    return certs, time.perf_counter() - t0


@pytest.mark.parametrize("name", ["smoothing-rotation", "smoothing-translation"])
def test_sound_mode_answers_within_its_timeout(name):
    """A search of ~10 s per input (n_err large) cut by timeouts of 0.05-0.5 s: the answer comes
    within the timeout plus 0.3 s (a chunk of the search, measured ~0.05 s), every input
    unknown with reason timeout; a generous timeout gives the untimed answer."""
    from verify.digits_model import load_digits_mlp

    x, y = load_data("digits", limit=3)
    model = load_digits_mlp("noise").eval()
    fast = dict(n=500, n0=50, alpha=0.01)
    slow = get_method(name, n_err=200_000, **fast)
    const = Energy(-1.0)  # always class 1: pA is high, only the error search can stop a certificate
    ones = torch.ones(3, dtype=torch.long)
    _timed_certify(slow, const, x[:1], ones[:1], 0.01)  # lazy imports out of the measurement
    for timeout in (0.05, 0.2, 0.5):
        certs, wall = _timed_certify(slow, const, x, ones, timeout)
        assert wall <= timeout + 0.3, (timeout, wall)
        for c in certs:  # (a loaded machine may cut the sampling already: prediction None)
            assert c.status == "unknown" and c.radius == 0.0 and c.prediction in (1, None)
            assert c.details["reason"].startswith("timeout") and c.details["error_bound_complete"] is False
        if timeout == 0.5:  # the search, not the sampling, was cut
            assert all(c.prediction == 1 and c.details["E"] == math.inf for c in certs)
    m = get_method(name, n_err=50, **fast)
    untimed = m.certify(model, LpBall(x, 2.0, 2), Robust(y))
    roomy = m.certify(model, LpBall(x, 2.0, 2), Robust(y), timeout=600.0)
    assert [(c.status, c.radius, c.details["E"]) for c in roomy] == [(c.status, c.radius, c.details["E"]) for c in untimed]
    assert all(c.details["error_bound_complete"] for c in untimed)
