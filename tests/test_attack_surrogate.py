"""Attacks on networks whose gradient is zero (sign, floor) or underflows (a saturated softmax
output): the surrogate keeps the model's values, and PGD finds counterexamples there that it
cannot find on the model's own gradient."""
from __future__ import annotations

import time

import pytest
import torch
import torch.fx as fx

from verify import attack, surrogate
from verify.attack import confirm_counterexample, pgd_attack
from verify.spec import Box, LinearSpec, LpBall

D = 40  # inputs; a counterexample needs nearly all of them above THRESHOLD
THRESHOLD = 0.9


class StepVotes(torch.nn.Module):
    """``[n, D] -> [n, 2]``: logit 0 is the sum of ``sign(x_i - THRESHOLD)``, logit 1 the constant
    ``D - 3.5``; both times ``scale``, then a softmax (probabilities 0 / 1 at
    ``scale = 1000``). Class 0 wins only when at least ``D - 1`` inputs exceed THRESHOLD: a
    uniform point of ``[-1, 1]^D`` does so with probability below ``1e-45``."""

    def __init__(self, scale: float = 1000.0) -> None:
        super().__init__()
        self.head = torch.nn.Linear(D, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([torch.ones(D), torch.zeros(D)]) * scale)
            self.head.bias.copy_(torch.tensor([0.0, D - 2.0 - 1.5]) * scale)

    def forward(self, x):
        return torch.softmax(self.head(torch.sign(x - THRESHOLD)), 1)


def _property(B: int = 1) -> LinearSpec:
    """Violated when class 0 reaches class 1: row ``y_1 - y_0 <= 0``."""
    C = torch.tensor([[-1.0, 1.0]]).expand(B, 1, 2).clone()
    return LinearSpec(C, torch.zeros(B, 1), torch.zeros(1, dtype=torch.long))


def _box(B: int = 1) -> Box:
    return Box(-torch.ones(B, D), torch.ones(B, D))


def test_the_surrogate_keeps_the_models_values():
    net = fx.symbolic_trace(StepVotes(scale=1.0))
    x = torch.rand(16, D) * 2 - 1
    sur = surrogate.attack_surrogate(net, _property())
    assert sur is not net
    logits = sur(x)
    assert torch.equal(torch.softmax(logits, 1), net(x))  # softmax left out, nothing else changed
    assert not any(n.target is torch.sign for n in sur.graph.nodes if n.op == "call_function")
    # a property with an offset is not order-preserving under softmax: the softmax stays
    offset = LinearSpec(_property().C, torch.full((1, 1), 0.1), torch.zeros(1, dtype=torch.long))
    assert torch.equal(surrogate.attack_surrogate(net, offset)(x), net(x))


def test_the_sign_surrogate_has_a_gradient_where_sign_has_none():
    x = torch.tensor([[-3.0, -0.5, 0.2, 4.0]], requires_grad=True)
    y = surrogate.sign_surrogate(x)
    assert torch.equal(y, torch.sign(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert bool((g > 0).all())
    assert g[0, 2] > g[0, 3] and g[0, 1] > g[0, 0]  # largest near 0, where the sign flips
    for empty in (torch.zeros(0, 3), torch.zeros(2, 0), torch.zeros(0)):  # no median to take
        e = empty.requires_grad_(True)
        (ge,) = torch.autograd.grad(surrogate.sign_surrogate(e).sum(), e)
        assert ge.shape == e.shape
    # the rounding functions pass the gradient straight through
    z = torch.tensor([0.3, 1.7], requires_grad=True)
    for fn, sur in [(torch.floor, surrogate.floor_surrogate), (torch.round, surrogate.round_surrogate),
                    (torch.ceil, surrogate.ceil_surrogate)]:
        out = sur(z)
        assert torch.equal(out, fn(z.detach()))
        (gz,) = torch.autograd.grad(out.sum(), z)
        assert torch.equal(gz, torch.ones(2))


class Rounded(torch.nn.Module):
    def forward(self, x):
        return torch.stack([torch.floor(x[:, 0] * 3), torch.round(x[:, 1]) + torch.ceil(x[:, 2]), torch.sign(x[:, 0])], 1)


def test_graphs_with_rounding_nodes_get_a_working_surrogate():
    net = fx.symbolic_trace(Rounded())
    sur = surrogate.attack_surrogate(net, _property())
    assert sur is not net
    x = (torch.rand(8, 3) * 4 - 2).requires_grad_(True)
    assert torch.equal(sur(x), net(x))
    (g,) = torch.autograd.grad(sur(x).sum(), x)
    assert bool((g != 0).all())


@pytest.mark.parametrize("C, d, expected", [
    ([[1.0, -1.0, 0.0]], [0.0], True),
    ([[0.0, 2.5, -2.5]], [0.0], True),
    ([[1.0, -2.0, 0.0]], [0.0], False),  # unequal weights: the order of two entries is not enough
    ([[1.0, -1.0, 0.0]], [0.5], False),  # an offset compares against a probability level
    ([[1.0, 0.0, 0.0]], [-0.5], False),
    ([[1.0, -1.0, 1.0]], [0.0], False),
])
def test_pairwise_rows(C, d, expected):
    spec = LinearSpec(torch.tensor([C]), torch.tensor([d]), torch.zeros(len(C), dtype=torch.long))
    assert surrogate.pairwise_rows(spec) is expected


def test_a_softmax_of_another_shape_is_kept():
    z = torch.randn(2, 3, 4)
    assert torch.equal(surrogate.logits_output(z, 2), torch.softmax(z, 2))
    assert torch.equal(surrogate.logits_output(z[:, 0], 0), torch.softmax(z[:, 0], 0))
    assert torch.equal(surrogate.logits_output(z[:, 0], 1), z[:, 0])


def test_models_without_such_nodes_are_attacked_as_they_are():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert surrogate.attack_surrogate(lin, _property()) is lin  # not an fx graph
    traced = fx.symbolic_trace(lin)
    assert surrogate.attack_surrogate(traced, _property()) is traced


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_pgd_finds_what_only_a_surrogate_gradient_reaches(monkeypatch, scale):
    net = fx.symbolic_trace(StepVotes(scale))
    spec, box = _property(), _box()
    r = pgd_attack(net, box, spec, steps=30, restarts=2, seed=0)
    assert bool(r.found[0])
    x = r.x_adv[0]
    assert bool(box.contains(x.unsqueeze(0))[0])
    with torch.no_grad():
        y = net(x.unsqueeze(0).float())
    assert float(y[0, 0]) >= float(y[0, 1])  # the plain forward pass confirms it
    assert bool(confirm_counterexample(net, box, spec, x.unsqueeze(0))[0])
    # on the model's own gradient (zero through sign) the same attack finds nothing
    monkeypatch.setattr(attack, "attack_surrogate", lambda model, spec: model)
    assert not bool(pgd_attack(net, box, spec, steps=30, restarts=2, seed=0).found[0])


def test_the_surrogate_never_makes_a_safe_set_falsified():
    """Inputs capped below THRESHOLD: no point of the ball violates; the surrogate's steps find
    none either (every candidate is confirmed on the model)."""
    net = fx.symbolic_trace(StepVotes(1000.0))
    ball = LpBall(torch.zeros(3, D), torch.tensor([0.5, 0.8, 0.89]), float("inf"))
    r = pgd_attack(net, ball, _property(3), steps=30, restarts=3, seed=0)
    assert not bool(r.found.any())


def test_bab_falsifies_a_binarised_network_by_its_attack():
    from verify.api import certify  # the front door, as a user calls it

    net = fx.symbolic_trace(StepVotes(1000.0))
    [c] = certify(net, Box(-torch.ones(1, D), torch.ones(1, D)), torch.tensor([1]), "bab", timeout=30)
    assert c.status == "falsified" and c.details["stage"] == "attack"
    x = torch.as_tensor(c.counterexample).reshape(1, D).float()
    assert float(x.abs().max()) <= 1.0
    assert int(net(x).argmax()) == 0


def test_a_model_moved_to_another_dtype_gets_its_own_surrogate():
    net = fx.symbolic_trace(StepVotes(1.0))
    sur32 = surrogate.attack_surrogate(net, _property())
    assert surrogate.attack_surrogate(net, _property()) is sur32  # built once
    net.double()
    sur64 = surrogate.attack_surrogate(net, _property())
    assert sur64 is not sur32
    x = torch.rand(4, D, dtype=torch.float64)
    assert sur64(x).dtype == torch.float64
    assert torch.equal(torch.softmax(sur64(x), 1), net(x))


class DoubleSign(torch.nn.Module):
    """A binarised layer as the traffic-sign nets write it: ``sign(sign(z) + 0.1)`` maps ``z = 0``
    to +1; here ``z = x - THRESHOLD``, then :class:`StepVotes`' head."""

    def __init__(self) -> None:
        super().__init__()
        self.votes = StepVotes(1000.0)

    def forward(self, x):
        return torch.softmax(self.votes.head(torch.sign(torch.sign(x - THRESHOLD) + 0.1)), 1)


def test_a_sign_of_a_sign_passes_the_gradient_straight_through():
    net = fx.symbolic_trace(DoubleSign())
    sur = surrogate.attack_surrogate(net, _property())
    targets = [n.target for n in sur.graph.nodes if n.op == "call_function"]
    assert targets.count(surrogate.sign_surrogate) == 1 and targets.count(surrogate.resign_surrogate) == 1
    x = (torch.rand(4, D) * 2 - 1).requires_grad_(True)
    assert torch.equal(torch.softmax(sur(x), 1), net(x))
    # the outer sign adds nothing to the gradient: that of the inner surrogate alone
    (g,) = torch.autograd.grad(sur(x)[:, 0].sum(), x)
    (g_inner,) = torch.autograd.grad((surrogate.sign_surrogate(x - THRESHOLD) @ net.votes.head.weight[0]).sum(), x)
    torch.testing.assert_close(g, g_inner)
    # a sign of a value that is not a sign keeps the kernel (a shift by a graph tensor included)
    plain = fx.symbolic_trace(lambda x: torch.sign(torch.sign(x) + x))
    assert surrogate.resign_surrogate not in [n.target for n in surrogate.attack_surrogate(plain, _property()).graph.nodes]


def test_the_sign_kernel_puts_its_weight_on_units_near_their_threshold():
    """At a tenth of the layer's median ``|x|`` the gradient is several times that at the median
    (a kernel of the median's width alone gives them about the same weight)."""
    x = torch.tensor([[0.1, 1.0, 1.0, 1.0, 5.0]], requires_grad=True)  # median |x| = 1
    (g,) = torch.autograd.grad(surrogate.sign_surrogate(x).sum(), x)
    assert g[0, 0] > 4 * g[0, 1] and g[0, 1] > g[0, 4] > 0


def test_pgd_falsifies_a_traffic_sign_net_that_needs_the_narrow_kernel(shared_dir):
    """VNN-COMP 2023 traffic_signs_recognition, the 48x48 net at eps 1 on image 7377: claimed sat by
    alpha-beta-CROWN (its counterexample in the 2024 results); with the median-width kernel
    alone PGD stalled (best logit margin 38 of a needed <= 0, 50 steps x 5 restarts)."""
    from verify.model import load_model
    from verify.vnnlib import parse_vnnlib

    base = shared_dir / "benchmarks" / "vnncomp" / "2024" / "traffic_signs_recognition_2023"
    net = "3_48_48_QConv_32_5_MP_2_BN_QConv_64_5_MP_2_BN_QConv_64_3_BN_Dense_256_BN_Dense_43_ep_30.onnx.gz"
    model = load_model(base / "onnx" / net)
    prop = parse_vnnlib(base / "vnnlib" / "model_48_idx_7377_eps_1.00000.vnnlib.gz")[0]
    box = prop.box((48, 48, 3))
    spec = LinearSpec(prop.spec.C[None].float(), prop.spec.d[None].float(), prop.spec.groups)
    r = pgd_attack(model, box, spec, steps=50, restarts=2, seed=0)
    assert bool(r.found[0])
    assert bool(box.contains(r.x_adv)[0])
    with torch.no_grad():
        y = model(r.x_adv.float())
    assert bool(((spec.C[0] @ y[0] + spec.d[0]) <= 0).any())  # some class reaches class 5


@pytest.mark.parametrize("reason", ["exhausted", "memory"])
def test_a_search_that_ends_exhausted_leaves_its_time_to_attacks(monkeypatch, reason):
    """The pipeline's attacks before the search are switched off and the search stubbed to end at
    once: "exhausted" (every open domain fully split) hands the time left to PGD restarts, which
    falsify; any other early stop ("memory") keeps its unknown answer and returns at once."""
    import relax.methods.bab as bab
    from relax.bab import BabResult

    def stub(*args, **kwargs):
        return BabResult("unknown", None, -1.0, 1, reason=reason)

    monkeypatch.setattr(bab, "EARLY_PGD_SHARE", 0.0)
    monkeypatch.setattr(bab, "_graph_bab", stub)
    net = fx.symbolic_trace(StepVotes(1000.0))
    opts = bab.BabOptions(attack_restarts=1, random_samples=0)  # no restart after the CROWN pass either
    t0 = time.perf_counter()
    res = bab.run_bab(net, _box(), _property(), opts, timeout=30)
    if reason == "memory":
        assert res.status == "unknown" and time.perf_counter() - t0 < 15
        return
    assert res.status == "falsified" and res.details["stage"] == "attack"
    x = res.counterexample.reshape(1, D).float()
    assert float(x.abs().max()) <= 1.0 and int(net(x).argmax()) == 0  # the plain forward pass confirms it


def test_the_late_attack_stops_before_its_deadline():
    import relax.methods.bab as bab

    net = fx.symbolic_trace(StepVotes(1000.0))
    details: dict = {}
    never = lambda x: False  # noqa: E731  (no candidate confirmed: the attack runs to its deadline)
    t0 = time.perf_counter()
    out = bab.attack_until(net, _box(), _property(), bab.BabOptions(), t0 + 3.0, never, details)
    assert out is None and time.perf_counter() - t0 <= 3.0
    assert 0.5 < details["attack_after_search_s"] <= 3.0
    assert bab.attack_until(net, _box(), _property(), bab.BabOptions(), time.perf_counter(), never, {}) is None


class HeavisideVotes(torch.nn.Module):
    """StepVotes with ``[x_i > THRESHOLD]`` (the importer's comparisons) instead of the sign."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = StepVotes()
        self.register_buffer("zero", torch.tensor(0.0))

    def forward(self, x):
        return torch.softmax(self.inner.head(torch.heaviside(x - THRESHOLD, self.zero)), 1)


def test_the_heaviside_surrogate_moves_units_below_the_step_and_pgd_finds_the_point():
    """Every input below the threshold: ``relu(sign(.))`` (the importer's step before) has no
    gradient there at all; the heaviside surrogate has one on every input, with the model's
    values, and PGD reaches the corner where class 0 wins."""
    net = fx.symbolic_trace(HeavisideVotes())
    sur = surrogate.attack_surrogate(net, _property())
    x = (torch.rand(4, D) * 0.5 - 0.5).requires_grad_(True)
    assert torch.equal(torch.softmax(sur(x), 1), net(x))
    (g,) = torch.autograd.grad(sur(x)[:, 0].sum(), x)
    assert (g > 0).all()
    res = pgd_attack(net, _box(), _property(), steps=60, restarts=2, seed=0)
    assert bool(res.found[0]) and bool(confirm_counterexample(net, _box(), _property(), res.x_adv)[0])
