"""The registered bound methods (interval, crown, deeppoly, alpha-crown) through the
``BoundMethod`` interface: trivial certification, unknown on a big eps, the bisected radius is
certified, batch of 1 == batch of N."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust

METHODS = [m for m in ("interval", "crown", "deeppoly", "alpha-crown") if m in list_methods()]
OPTIONS = {"alpha-crown": {"iterations": 5}}  # keeps the bisection tests short


def method(name):
    return get_method(name, **OPTIONS.get(name, {}))


def _net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)).eval()
    return torch.fx.symbolic_trace(net)


@pytest.fixture(scope="module")
def setup():
    net = _net()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(7, 6, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


@pytest.mark.parametrize("name", METHODS)
def test_trivially_robust_is_certified(setup, name):
    net, x, y = setup
    certs = method(name).certify(net, LpBall(x, 1e-5, "inf", 0.0, 1.0), Robust(y))
    assert [c.status for c in certs] == ["certified"] * len(x)


@pytest.mark.parametrize("name", METHODS)
def test_big_eps_is_unknown(setup, name):
    net, x, y = setup
    certs = method(name).certify(net, LpBall(x, 10.0, "inf"), Robust(y))
    assert all(c.status == "unknown" for c in certs)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("p", ["inf", 2])
def test_radius_is_certified(setup, name, p):
    net, x, y = setup
    m = method(name)
    certs = m.certify(net, LpBall(x, 0.0, p, 0.0, 1.0), Robust(y), find_radius=True, max_radius=1.0)
    r = torch.tensor([c.radius for c in certs])
    assert (r > 0).all()
    # the same eps the bisection proved (bound methods are deterministic; alpha-CROWN is not
    # monotone in eps, so a smaller eps is not guaranteed to be proved as well)
    again = m.certify(net, LpBall(x, r.float(), p, 0.0, 1.0), Robust(y))
    assert all(c.status == "certified" for c in again)


@pytest.mark.parametrize("name", METHODS)
def test_batch_of_one_equals_batch(setup, name):
    net, x, y = setup
    m = method(name)
    ball = LpBall(x, 0.05, "inf", 0.0, 1.0)
    full = torch.stack([torch.as_tensor(c.lower) for c in m.certify(net, ball, Robust(y))])
    single = torch.stack([torch.as_tensor(m.certify(net, ball.select([i]), Robust(y[i : i + 1]))[0].lower) for i in range(len(x))])
    assert torch.allclose(full, single, atol=1e-5, rtol=1e-5)
