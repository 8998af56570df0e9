"""BoundMethod's decisions: float64 re-check of borderline proofs, radii that were proved."""

import pytest
import torch
from torch import nn

from verify.registry import BoundMethod, get_method, method_class
from verify.spec import LpBall, Robust


class _Fake(BoundMethod):
    """lower = 1e-4 in float32 (a borderline 'proof') but -1 in float64 (no proof)."""

    name = "fake-borderline"

    def lower_bounds(self, model, inputs, spec):
        value = 1e-4 if inputs.midpoint().dtype == torch.float32 else -1.0
        return torch.full(spec.d.shape, value, dtype=inputs.midpoint().dtype)


class _Radius(BoundMethod):
    """Proves exactly the balls with eps <= 0.0875 (compared in float64)."""

    name = "fake-radius"

    def setup(self):
        self.seen = []

    def lower_bounds(self, model, inputs, spec):
        self.seen.extend(inputs.eps.double().tolist())
        ok = inputs.eps.double() <= 0.0875
        return torch.where(ok, 1.0, -1.0).to(inputs.eps.dtype).unsqueeze(1).expand_as(spec.d)


def _net():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2)))


def test_borderline_float32_proof_is_rechecked_in_float64():
    x = torch.rand(3, 3)
    net = _net()
    labels = net(x).argmax(1)
    certs = _Fake().certify(net, LpBall(x, 0.01), Robust(labels))
    assert all(c.status == "unknown" for c in certs)


def test_bisection_reports_a_radius_that_was_proved():
    x = torch.rand(4, 3)
    net = _net()
    labels = net(x).argmax(1)
    m = _Radius()
    certs = m.certify(net, LpBall(x, 0.0), Robust(labels), find_radius=True, max_radius=0.2)
    proved = [e for e in m.seen if e <= 0.0875]
    for c in certs:
        assert c.radius <= 0.0875
        assert c.radius in proved  # exactly a radius that a proof covered
        assert c.radius > 0.08


def test_unknown_method_and_option_messages():
    with pytest.raises(KeyError, match="unknown method 'nope'; available"):
        method_class("nope")
    with pytest.raises(TypeError, match="has no option 'iters'"):
        get_method("crown", iters=3)


def test_a_missing_method_family_is_an_error(monkeypatch):
    """A family module listed in METHOD_MODULES that does not import is an error, never a method
    set that silently lacks it."""
    from verify import registry

    monkeypatch.setattr(registry, "METHOD_MODULES", registry.METHOD_MODULES + ("relax.methods.no_such_family",))
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(ModuleNotFoundError, match="no_such_family"):
        registry.list_methods()


def test_the_registered_method_names_are_pinned():
    from verify.registry import METHOD_MODULES, list_methods

    # tests may register their own methods; the families' own modules hold exactly these
    assert {n for n, c in list_methods().items() if c.__module__ in METHOD_MODULES} == {
        "interval", "crown", "deeppoly", "alpha-crown", "lipschitz-global", "lipschitz-local",
        "lipschitz-sdp", "lp", "milp", "sdp", "bab", "smoothing-gaussian", "smoothing-denoised",
        "smoothing-laplace", "smoothing-uniform", "smoothing-topk", "smoothing-rotation",
        "smoothing-translation", "smoothing-regression", "smoothing-invariance", "smoothing-zhang"}


def test_cost_and_completeness_are_class_metadata():
    """Demos and tests size their runs by ``cost``; ``certify methods`` shows it and completeness."""
    from verify.registry import METHOD_MODULES, list_methods

    ours = {n: c for n, c in list_methods().items() if c.__module__ in METHOD_MODULES}
    assert {c.cost for c in ours.values()} <= {"fast", "slow", "very slow"}
    assert {n for n, c in ours.items() if c.complete} == {"milp", "bab"}
    assert {n for n, c in ours.items() if c.cost == "very slow"} == {"sdp", "lipschitz-sdp"}
