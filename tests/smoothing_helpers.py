"""Shared pieces of the smoothing tests: models of one linear projection, and the checks of the
sound semantic certificates (``tests/test_rotation_sound.py``, ``tests/test_translation_sound.py``)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from verify.data import load_data
from verify.registry import get_method
from verify.spec import LpBall, Robust

#: ``move(images [S, C, H, W], params [S, P]) -> [S, C, H, W]`` (a rotation or a translation)
Move = Callable[[Tensor, Tensor], Tensor]


class Projection(nn.Module):
    """``[S, *shape] -> [S, k]``: the outputs :meth:`heads` makes of ``s = x.flatten(1) @ w [S]``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = w

    def heads(self, s: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        s = x.reshape(x.shape[0], -1) @ self.w
        return torch.stack(self.heads(s), 1)


class Energy(nn.Module):
    """Class 1 iff ``||z||_2^2 > t``: interpolation blur (and mass leaving the frame) lowers the
    energy, so the attacked image is genuinely harder than the clean one transformed once."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, z: Tensor) -> Tensor:
        e = z.flatten(1).pow(2).sum(1)
        return torch.stack([self.t - e, e - self.t], 1)


def p_class(model: nn.Module, z: Tensor, c: int, move: Move, P: int, sigma: float, sigma_l2: float, n: int,
            seed: int) -> float:
    """Monte-Carlo ``P(f(move(z, beta) + delta) = c)``, ``beta ~ N(0, sigma^2 I_P)``,
    ``delta ~ N(0, sigma_l2^2 I)``, from ``n`` samples; ``z [C, H, W]``."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(n, P, generator=g) * sigma
    zs = move(z.unsqueeze(0).expand(n, *z.shape), beta) + sigma_l2 * torch.randn(n, *z.shape, generator=g)
    return float((model(zs).argmax(1) == c).double().mean())


def violations(f: nn.Module, xi: Tensor, c: int, gammas: Tensor, move: Move, sigma: float, sl2: float, seed: int) -> int:
    """Attacks ``gammas [G, P]`` where the smoothed classifier of the real attacked image
    ``move(x, gamma)`` (20k samples, 0.01 slack) does not give ``c``."""
    P = gammas.shape[1]
    bad = 0
    for gam in gammas:
        z = move(xi.unsqueeze(0), gam.reshape(1, P))[0]
        bad += p_class(f, z, c, move, P, sigma, sl2, 20000, seed) < 0.5 - 0.01
    return bad


def assert_certificates_hold(certify_sound: Callable, images: Tensor, max_range: float, move: Move,
                             attacks: Callable[[float], Tensor], margin: float, thin_margin: float, claim: Tensor,
                             sigma: float, sl2: float) -> None:
    """Where the sound certificate of ``Energy(||x||^2 + d sl2^2 - margin)`` says ``cA`` up to
    radius ``r`` (range ``max_range``), the smoothed classifier of the attacked image gives ``cA``
    at every attack ``attacks(r) [G, P]``; the same check flags a ``thin_margin`` model at the
    over-claimed attacks ``claim [G', P]``. ``images [N, C, H, W]``; at least 2 certified and 2
    caught."""
    wrong, certified, caught = 0, 0, 0
    for i, xi in enumerate(images):
        base = float(xi.pow(2).sum()) + xi.numel() * sl2 ** 2
        f = Energy(base - margin)
        res = certify_sound(f, xi.unsqueeze(0), sigma, sl2, np.array([max_range]), n0=50, n=2000, alpha=0.01, n_err=200)
        r, c = float(res.radius[0]), int(res.prediction[0])
        if r > 0:
            certified += 1
            wrong += violations(f, xi, c, attacks(r), move, sigma, sl2, 1 + i)
        caught += violations(Energy(base - thin_margin), xi, 1, claim, move, sigma, sl2, 1 + i) > 0
    assert certified >= 2
    assert wrong == 0
    assert caught >= 2


def check_method_details(name: str, eps: float, attacked: str) -> list:
    """The sound method ``name`` on 2 digits at radius ``eps``: its details state the attacked
    image ``attacked`` it certifies, the error bound and the alpha split; radii capped at
    ``eps``; ``sound=False`` says it is not that classifier; only the sound mode refuses
    nearest interpolation. Returns the sound certificates."""
    x, y = load_data("digits", limit=2)
    from verify.digits_model import load_digits_mlp

    m = load_digits_mlp("noise").eval()
    snd = get_method(name, n=500, n0=50, alpha=0.01, n_err=50).certify(m, LpBall(x, eps, 2), Robust(y))
    old = get_method(name, n=500, n0=50, alpha=0.01, sound=False).certify(m, LpBall(x, eps, 2), Robust(y))
    d = snd[0].details
    assert d["sound"] and attacked in d["certifies_exactly"] and d["E"] >= d["E_lower"] > 0
    assert d["alpha_pA"] + d["alpha_error"] == pytest.approx(0.01) and snd[0].confidence == pytest.approx(0.99)
    assert all(c.radius <= eps for c in snd)  # capped at the bounded range
    assert "NOT the smoothed" in old[0].details["certifies_exactly"] and "E" not in old[0].details
    with pytest.raises(ValueError):
        get_method(name, interpolation="nearest")
    get_method(name, interpolation="nearest", sound=False)
    return snd
