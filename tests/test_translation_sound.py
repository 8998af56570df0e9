"""Sound translation certificates (Fischer et al. 2020, Sec. 4-5): sub-pixel shifts do not
compose, the exact error maximum over the range, and ``smoothing-translation`` sound=True."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothing.semantic import certify_translation_sound, sound_rotation_radius, translate
from smoothing.translation_error import translation_composition_error, translation_corners, translation_error_search
from smoothing_helpers import Energy, assert_certificates_hold, check_method_details
from verify.data import load_data
from verify.registry import get_method
from verify.spec import LpBall, Robust


def _digits(k: int) -> torch.Tensor:
    return load_data("digits", limit=k)[0]


def _blob(n: int = 12, w: float = 2.0) -> torch.Tensor:
    """A smooth ``[1, n, n]`` Gaussian bump, slightly off centre (small interpolation error)."""
    c = torch.arange(n, dtype=torch.float32) + 0.5 - n / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / (2 * w * w)).unsqueeze(0)


def _real_error(x: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``||T_beta(T_gamma x) - T_{beta+gamma} x||_2`` with the suite's float32 ``translate``.
    ``x [C, H, W]``, ``beta``, ``gamma`` ``[N, 2]``: ``[N]``."""
    xs = x.unsqueeze(0).expand(len(gamma), *x.shape)
    return (translate(translate(xs, gamma), beta) - translate(xs, beta + gamma)).flatten(1).norm(dim=1)


def test_sub_pixel_shifts_do_not_compose_whole_pixels_do():
    """0.3 px then 0.4 px is not 0.7 px (about 17 % of the digit's norm); whole pixels compose
    exactly on a digit whose border stays empty."""
    x = _digits(1)
    twice = translate(translate(x, torch.tensor([[0.3, 0.0]])), torch.tensor([[0.4, 0.0]]))
    once = translate(x, torch.tensor([[0.7, 0.0]]))
    assert float((twice - once).norm()) > 0.1 * float(once.norm())
    whole = translate(translate(x, torch.tensor([[1.0, 0.0]])), torch.tensor([[-1.0, 0.0]]))
    assert torch.equal(whole, translate(x, torch.tensor([[0.0, 0.0]]))) or float((whole - x).abs().max()) < 1e-6


def test_composition_error_matches_translate():
    x = _digits(1)[0]
    g = torch.Generator().manual_seed(0)
    b, gam = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) * 2
    assert torch.allclose(translation_composition_error(x, b, gam).float(), _real_error(x, b, gam), atol=1e-5)
    assert float(translation_composition_error(x, torch.zeros(1, 2), gam[:1])[0]) < 1e-9  # beta = 0 composes


@pytest.mark.parametrize("idx,G", [(0, 0.5), (1, 1.0), (2, 2.0), (3, 1.3)])
def test_bound_covers_random_shifts_and_is_attained(idx, G):
    """The real (float32) error at 4000 random shifts of the square, per sampled beta, never
    exceeds E; E is attained at a corner up to the float allowance (the maximum, not a bound
    that could be halved)."""
    x = _digits(4)[idx]
    g = torch.Generator().manual_seed(idx)
    betas = torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.7
    res = translation_error_search(x, betas, G)
    assert res.complete and res.E >= res.lower > 0
    worst = 0.0
    for b in betas:
        gam = (torch.rand(4000, 2, generator=g) * 2 - 1) * G
        worst = max(worst, float(_real_error(x, b.float().expand(4000, 2), gam).max()))
        exact = translation_composition_error(x, b.expand(4000, 2), gam.double())
        assert float(exact.max()) <= res.lower + 1e-12  # the piecewise-bilinear maximum principle
    assert worst <= res.E
    corners = translation_corners(betas, G)
    at = max(float(_real_error(x, b.float().expand(len(c), 2), c.float()).max()) for b, c in zip(betas, corners))
    assert at == pytest.approx(res.lower, abs=1e-4) and res.E - res.lower < 1e-2


def test_deadline_leaves_the_search_incomplete():
    x = _digits(1)[0]
    betas = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cut = translation_error_search(x, betas, 2.0, deadline=0.0)
    assert not cut.complete and cut.E == math.inf
    few = betas[:40]
    assert translation_error_search(x, few, 2.0, deadline=600.0) == translation_error_search(x, few, 2.0)


def test_sound_radius_is_never_larger_than_the_plain_one():
    """Same pA: the sound radius (alpha/2, q, E > 0) is below sigma Phi^-1(pA); and on a
    constant classifier (pA_lower known in closed form) the method's sound radius is below its
    sound=False radius, for l2 and linf."""
    pa = np.linspace(0.5, 0.9999, 200)
    for E, q in ((0.0, 0.0), (0.1, 0.001), (1.0, 0.05)):
        assert np.all(sound_rotation_radius(pa, q, np.full(200, E), 2.0, 0.5) <= 2.0 * norm.ppf(pa) + 1e-12)
    x = _digits(2)
    const = Energy(-1.0)
    for p in (2, math.inf):
        ball = LpBall(x, 0.0, p)
        kw = dict(sigma=0.5, n=500, n0=50, alpha=0.01)
        plain = get_method("smoothing-translation", sound=False, **kw).certify(const, ball, Robust(torch.ones(2, dtype=torch.long)))
        snd = get_method("smoothing-translation", n_err=50, max_shift=3.0, **kw).certify(const, ball, Robust(torch.ones(2, dtype=torch.long)))
        for a, b in zip(snd, plain):
            assert a.radius <= b.radius and a.norm == b.norm


def _disk(r: float, k: int = 8) -> torch.Tensor:
    """Shifts ``[k + 1, 2]`` of l2 length <= r: the centre and ``k`` directions at ``r``."""
    return torch.tensor([(0.0, 0.0)] + [(r * math.cos(a), r * math.sin(a)) for a in np.arange(k) * 2 * math.pi / k],
                        dtype=torch.float32)


def test_certificate_holds_on_the_real_attacked_image():
    """On smooth bumps (E about 0.3 over a 2 px range): where the certificate says cA up to r pixels, the
    smoothed classifier of T_gamma(x) gives cA on a grid of the disk; the same check flags a
    thin margin claimed out to 4 px (the bump leaves the frame). Certified radii 1.2-1.3 px,
    inside the 2 px range."""
    blobs = torch.stack([_blob(w=w) for w in (1.6, 1.8, 2.0)])
    assert_certificates_hold(certify_translation_sound, blobs, 2.0, translate, _disk, margin=5.0, thin_margin=1.0,
                             claim=_disk(4.0, k=4), sigma=1.0, sl2=0.3)


def test_method_details_and_old_behaviour():
    snd = check_method_details("smoothing-translation", 0.5, "T_gamma(x)")
    d = snd[0].details
    assert d["error_bound_complete"] and d["error_range_px"] == 0.5 and snd[0].norm == "translation-px"
    x, y = load_data("digits", limit=2)
    from verify.digits_model import load_digits_mlp

    m = load_digits_mlp("noise").eval()
    with pytest.raises(Exception, match="l2 or linf"):
        get_method("smoothing-translation", n=500, n0=50, alpha=0.01, n_err=5).certify(m, LpBall(x, 0.5, 1), Robust(y))
