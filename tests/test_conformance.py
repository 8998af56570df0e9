"""The conformance suite every registered method must pass (scikit-learn's check_estimator idea).

For each method in the registry:
* one Certificate per input, with valid fields that agree with the method's class attributes;
* a batch of 1 gives the same answer as a batch of N (status and radius);
* seeded runs repeat exactly;
* deterministic methods are never "certified" where sampling inside the set or a PGD attack
  finds a violation, and every "falsified" carries a counterexample that a forward pass
  confirms;
* the method runs on the device it is given (CPU here; the same code path runs on CUDA).

Options that make a method fast enough for a test live in ``FAST_OPTIONS``; a new method gets
the suite for free by being registered.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from verify.certificate import GUARANTEES, STATUSES
from verify.attack import pgd_attack
from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust, norm_name

FAST_OPTIONS: dict[str, dict] = {
    "smoothing-gaussian": dict(n0=64, n=2000, alpha=0.01),
    "smoothing-denoised": dict(n0=64, n=2000, alpha=0.01, denoiser="identity"),  # the bundled ones take 8x8 inputs
    "smoothing-laplace": dict(n0=64, n=2000, alpha=0.01),
    "smoothing-uniform": dict(n0=64, n=2000, alpha=0.01),
    "smoothing-zhang": dict(n0=64, n=2000, alpha=0.01, k=8, grid_intervals=40, grid_cells=100),
    "smoothing-topk": dict(n0=64, n=2000, alpha=0.01),
    "smoothing-rotation": dict(n0=64, n=1000, alpha=0.01),
    "smoothing-translation": dict(n0=64, n=1000, alpha=0.01),
    "smoothing-regression": dict(n=1000, alpha=0.01),
    "smoothing-invariance": dict(n=1000, alpha=0.01),
    "alpha-crown": dict(iterations=5),
}
SLOW = {name for name, cls in list_methods().items() if cls.cost != "fast"}  # run on fewer inputs

INPUT_SHAPE = (1, 6, 6)


def _options(name: str) -> dict:
    cls = list_methods()[name]
    opts = {k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in cls.option_names()}
    if "seed" in cls.option_names():
        opts["seed"] = 0
    return opts


class _Centered(nn.Module):
    """A small ReLU MLP on inputs centred at 0.5 (diverse predictions, small margins)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        with torch.no_grad():
            self.net[1].weight.mul_(4.0)

    def forward(self, x):
        return self.net(x - 0.5)


def _model() -> torch.fx.GraphModule:
    torch.manual_seed(10)  # a seed whose predictions on the test inputs use two classes
    gm = torch.fx.symbolic_trace(_Centered().eval())
    gm.input_shape = INPUT_SHAPE
    return gm


def _norm_for(cls) -> float | None:
    for name, p in (("linf", math.inf), ("l2", 2.0), ("l1", 1.0)):
        if name in cls.norms:
            return p
    return None


def _setup(name: str, n: int, eps: float):
    cls = list_methods()[name]
    p = _norm_for(cls)
    if p is None:
        pytest.skip(f"{name} certifies no l_p ball (norms {cls.norms}); its own tests cover it")
    gm = _model()
    g = torch.Generator().manual_seed(11)
    x = torch.rand(n, *INPUT_SHAPE, generator=g)
    with torch.no_grad():
        labels = gm(x).argmax(1)
    if math.isinf(p):
        eps_p = eps
    else:  # comparable sets: scale the radius with the norm of the all-ones direction
        eps_p = eps * (36 ** (1 / p))
    return cls, gm, LpBall(x, eps_p, p, 0.0, 1.0), Robust(labels)


METHODS = sorted(list_methods())


def test_registry_is_not_empty():
    assert METHODS, "no method is registered"


@pytest.mark.parametrize("name", METHODS)
def test_fields_and_one_certificate_per_input(name):
    n = 2 if name in SLOW else 5
    cls, gm, ball, prop = _setup(name, n, 0.01)
    m = get_method(name, **_options(name))
    certs = m.certify(gm, ball, prop)
    assert len(certs) == n
    for i, c in enumerate(certs):
        assert c.method == name
        assert c.guarantee == cls.guarantee in GUARANTEES
        assert c.certifies == cls.certifies
        assert c.status in STATUSES
        assert c.index == i
        assert c.radius >= 0
        if c.guarantee == "deterministic":
            assert c.confidence == 1.0
        else:
            assert 0.5 < c.confidence < 1.0
        assert c.norm == norm_name(ball.p)
        c.to_json()  # serialisable


@pytest.mark.parametrize("name", METHODS)
def test_batch_of_one_equals_batch_of_n_and_seeded_repeat(name):
    n = 2 if name in SLOW else 4
    _, gm, ball, prop = _setup(name, n, 0.02)
    m = get_method(name, **_options(name))
    full = m.certify(gm, ball, prop, find_radius=name not in SLOW, max_radius=0.5)
    again = get_method(name, **_options(name)).certify(gm, ball, prop, find_radius=name not in SLOW, max_radius=0.5)
    assert [(c.status, c.radius) for c in full] == [(c.status, c.radius) for c in again]
    for i in range(n):
        one = m.certify(gm, ball.select([i]), Robust(prop.label[i : i + 1]), find_radius=name not in SLOW, max_radius=0.5)
        assert one[0].status == full[i].status, f"input {i}: batch of 1 says {one[0].status}, batch of {n} says {full[i].status}"
        assert one[0].radius == pytest.approx(full[i].radius, rel=1e-5, abs=1e-7)


def _violations(gm, ball: LpBall, prop: Robust) -> torch.Tensor:
    """Bool [B]: sampling or PGD finds a point of the ball violating the property."""
    spec = prop.linear(ball.batch_size, 3)
    with torch.no_grad():
        s = ball.sample(2000, generator=torch.Generator().manual_seed(5))
        ys = gm(s.flatten(0, 1)).view(2000, ball.batch_size, -1)
        found = (~spec.holds(ys)).any(dim=0)
    res = pgd_attack(gm, ball, spec, steps=40, restarts=3, seed=0)
    return found | res.found


@pytest.mark.parametrize("name", [m for m in METHODS if list_methods()[m].guarantee == "deterministic"])
def test_never_certified_where_an_attack_finds_a_violation(name):
    n = 3 if name in SLOW else 8
    cls, gm, ball, prop = _setup(name, n, 0.0)
    m = get_method(name, **_options(name))
    checked = 0
    for eps in (0.02, 0.08, 0.3):
        b = ball.with_eps(eps * (36 ** (1 / ball.p)) if not math.isinf(ball.p) else eps)
        viol = _violations(gm, b, prop)
        certs = m.certify(gm, b, prop)
        for i, c in enumerate(certs):
            if viol[i]:
                checked += 1
                assert c.status != "certified", f"{name} certified input {i} at eps={eps} but an attack violates it"
            if c.status == "falsified":
                x = torch.tensor(c.counterexample, dtype=torch.float32).unsqueeze(0)
                assert bool(b.select([i]).contains(x, tol=1e-6)[0])
                with torch.no_grad():
                    y = gm(x)
                assert not bool(Robust(prop.label[i : i + 1]).linear(1, 3).holds(y)[0]), "counterexample does not violate" 
    assert checked > 0, "the test set-up found no violation at all: it cannot catch an unsound method"


@pytest.mark.parametrize("name", METHODS)
def test_runs_on_given_device(name):
    """Model and inputs on the CPU device object (the CUDA path is the same code)."""
    _, gm, ball, prop = _setup(name, 2, 0.01)
    dev = torch.device("cpu")
    certs = get_method(name, **_options(name)).certify(gm.to(dev), ball.to(device=dev), prop)
    assert len(certs) == 2


@pytest.fixture(scope="module")
def large_weight_cases():
    """ReLU MLPs with weights of scale 1e3 (outputs ~1e9), centres near a decision tie and on a
    corner, each with a float64-confirmed counterexample (exact MILP minimum distortion)."""
    from conftest import load_fuzz

    fz = load_fuzz()
    out = []
    for kind, seed in (("tie", 5), ("random", 6)):
        gm, shape = fz.make_net("mlp", 1e3, seed)
        x0 = fz.make_centre(kind, gm, shape, seed + 7)
        with torch.no_grad():
            prop = Robust(gm(x0).argmax(1))
        w = fz.find_witness(gm, "mlp", x0, prop, math.inf)
        assert w.x is not None and w.dist > 0, "no counterexample found: the case cannot catch anything"
        out.append((fz, gm, x0, prop, w))
    return out


@pytest.mark.parametrize("name", [m for m in METHODS if list_methods()[m].guarantee == "deterministic"])
def test_sound_at_weight_scale_1e3_and_float32_resolution(name, large_weight_cases):
    """No method certifies a ball that holds the counterexample (radius 1.001x its distance),
    and radii near float32 resolution (1e-9) are answered without a false verdict."""
    cls = list_methods()[name]
    if "linf" not in cls.norms:
        pytest.skip(f"{name} certifies no l_inf ball")
    for fz, gm, x0, prop, w in large_weight_cases:
        for eps in (1e-9, w.dist * (1 + 1e-3)):
            ball = LpBall(x0, eps, math.inf, 0.0, 1.0)
            opts = {k: v for k, v in fz.FAST_OPTIONS.get(name, {}).items() if k in cls.option_names()}
            cert = get_method(name, **opts).certify(gm, ball, prop)[0]
            verdict = fz.judge(cert.status, cert.counterexample, ball, gm, prop, w, eps)
            assert verdict == "ok", f"{name}: {verdict} at eps {eps:g} (counterexample at distance {w.dist:g})"
