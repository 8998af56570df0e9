"""Narrow layers' root boxes tightened by input splitting (:mod:`relax.bab.narrow_boxes`).

Ground truth: 10,000 points of the input box and PGD points pushed towards each neuron's least
and greatest value; every refined box must contain all of them, whichever way its searches
ended (proved, stopped with a bound, or past a counterexample)."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from relax.bab import narrow_boxes
from relax.bab.narrow_boxes import refine_narrow_boxes
from relax.bounds import prepare
from relax.bounds.crown import crown
from verify import certify
from verify.spec import LpBall, OutputBounds


class _Bottleneck(nn.Module):
    """Two wide ReLU layers, a 4-neuron layer ``z``, then a sigmoid head: ``z``'s CROWN box
    comes after many unstable ReLUs and the head's relaxation inherits its width."""

    def __init__(self, seed: int, outputs: int = 3, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.z, self.o = nn.Linear(6, 48), nn.Linear(48, 48), nn.Linear(48, 4), nn.Linear(4, outputs)
        with torch.no_grad():  # gain > 1: more unstable ReLUs, a looser CROWN bound
            self.b.weight.mul_(gain)
            self.z.weight.mul_(gain)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.o(torch.sigmoid(self.z(h)))


def _root(net: nn.Module, x0: torch.Tensor, eps: float):
    graph, s = prepare(torch.fx.symbolic_trace(net), LpBall(x0, eps, math.inf), torch.float64)
    lo, hi = (b.reshape(-1) for b in s.bounds())
    return graph, lo, hi, crown(graph, s, None).intermediate


def _extremes(net: nn.Module, lo: torch.Tensor, hi: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """Values of ``z`` at 10,000 random points and at PGD points that push each neuron down and up."""
    x = lo + (hi - lo) * torch.rand(10_000, lo.numel(), dtype=torch.float64)
    vals = [net.z(torch.relu(net.b(torch.relu(net.a(x)))))]
    k = net.z.out_features
    p = (lo + (hi - lo) * torch.rand(2 * k, 32, lo.numel(), dtype=torch.float64)).requires_grad_(True)
    sign = torch.cat([torch.ones(k), -torch.ones(k)]).double().view(-1, 1)
    pick = torch.cat([torch.arange(k), torch.arange(k)])
    for _ in range(steps):
        z = net.z(torch.relu(net.b(torch.relu(net.a(p)))))
        (g,) = torch.autograd.grad((z[torch.arange(2 * k), :, pick] * sign).sum(), p)
        with torch.no_grad():
            p -= 0.05 * (hi - lo) * g.sign()
            p.copy_(torch.maximum(torch.minimum(p, hi), lo))
    with torch.no_grad():
        vals.append(net.z(torch.relu(net.b(torch.relu(net.a(p))))).reshape(-1, k))
    return torch.cat(vals).detach()


def test_prefix_graph_gives_the_node_values():
    net = _Bottleneck(0).double()
    graph, lo, hi, _ = _root(net, torch.rand(1, 6, dtype=torch.float64), 0.2)
    z_node = [p for p in graph.preactivations() if graph.shape(p) == (4,)][0]
    x = lo + (hi - lo) * torch.rand(50, lo.numel(), dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(graph.prefix(z_node).forward(x), net.z(torch.relu(net.b(torch.relu(net.a(x))))), atol=1e-12)


@pytest.mark.parametrize("case", ["searched", "few_samples", "little_time", "scale_1e3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_refined_boxes_contain_samples_and_pgd_points(monkeypatch, case, seed):
    """Proofs (``searched``), targets past a counterexample (``few_samples``: 2 samples set the
    first targets, so the searches start below the true extremes) and searches stopped by the
    time share (``little_time``: their best bounds) all give boxes around every point."""
    net = _Bottleneck(seed).double()
    if case == "scale_1e3":  # weights and biases 1000x: the bounds and their round-off grow with them
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(1e3)
                    m.bias.mul_(1e3)
    torch.manual_seed(seed + 10)
    graph, lo, hi, boxes = _root(net, torch.rand(1, 6, dtype=torch.float64), 0.25)
    if case == "few_samples":
        monkeypatch.setattr(narrow_boxes, "SAMPLES", 2)
    if case in ("few_samples", "little_time"):  # every bound searched (no giving up), whatever its searches' end
        monkeypatch.setattr(narrow_boxes, "GIVE_UP_AFTER", 10**6)
    caps = [None]
    if case == "little_time":  # each search stopped after 0.05 s: its best bound, not a proof, is used
        import relax.bab.input_split as input_split

        real = input_split.input_bab
        caps = [0.05, 0.1, 0.2, 0.4]  # longer only where a loaded machine stopped every search before its root
        cap = {"s": caps[0]}
        monkeypatch.setattr(input_split, "input_bab", lambda *a, timeout, **k: real(*a, timeout=min(timeout, cap["s"]), **k))
    for s in caps:
        if s is not None:
            cap["s"] = s
        found = refine_narrow_boxes(graph, lo, hi, boxes, time.perf_counter() + 20.0, seed=seed)
        if case != "little_time" or found.stats["bounded"] > 0:
            break
    if case == "little_time":
        assert found.stats["bounded"] > 0, found.stats
    assert len(found.boxes) == 1, found.stats  # z only: the sigmoid's output is no pre-activation after it
    (name, (blo, bhi)), = found.boxes.items()
    vals = _extremes(net, lo, hi)
    assert (vals >= blo.reshape(1, -1)).all() and (vals <= bhi.reshape(1, -1)).all(), (vals.amin(0), blo, vals.amax(0), bhi)
    clo, chi = boxes[name]
    assert (blo >= clo).all() and (bhi <= chi).all()
    if case == "few_samples":  # the first targets were past the extremes: counterexamples moved them
        assert found.stats["retargeted"] > 0, found.stats
    if case in ("searched", "scale_1e3"):  # much tighter than CROWN's: within a few per cent of the points' range
        assert found.stats["proved"] >= 6, found.stats
        assert float((bhi - blo).sum()) < 0.6 * float((chi - clo).sum()), ((bhi - blo), (chi - clo))


def test_stage_gives_its_time_back_when_the_first_searches_prove_nothing(monkeypatch):
    """Searches that never prove (an input too wide for splitting): after ``GIVE_UP_AFTER`` of
    them the stage stops, long before its deadline, and returns no box."""
    import relax.bab.input_split as input_split
    from relax.bab import BabResult

    net = _Bottleneck(0).double()
    graph, lo, hi, boxes = _root(net, torch.rand(1, 6, dtype=torch.float64), 0.25)
    calls = []

    def stuck(net_, spec, lo_, hi_, *, timeout, **kw):
        calls.append(timeout)
        time.sleep(0.05)
        return BabResult("unknown", None, -math.inf, 7, reason="timeout")

    monkeypatch.setattr(input_split, "input_bab", stuck)
    t0 = time.perf_counter()
    found = refine_narrow_boxes(graph, lo, hi, boxes, t0 + 30.0)
    assert time.perf_counter() - t0 < 3.0 and len(calls) == narrow_boxes.GIVE_UP_AFTER
    assert found.stats["given_up"] and not found.boxes, found.stats


def _min_by_pgd(net: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> float:
    """The least output seen at 10,000 random points and 64 PGD runs of 60 steps."""
    x = lo + (hi - lo) * torch.rand(10_000, lo.numel(), dtype=torch.float64)
    p = (lo + (hi - lo) * torch.rand(64, lo.numel(), dtype=torch.float64)).requires_grad_(True)
    for _ in range(60):
        (g,) = torch.autograd.grad(net(p).sum(), p)
        with torch.no_grad():
            p -= 0.05 * (hi - lo) * g.sign()
            p.copy_(torch.maximum(torch.minimum(p, hi), lo))
    with torch.no_grad():
        return float(torch.cat([net(x), net(p)]).min())


def test_bab_with_narrow_boxes_certifies_only_what_holds(monkeypatch):
    """End to end: ``bab`` (ReLU splitting, the narrow stage first) on bottleneck nets with one
    output and the property ``y > t``, ``t`` halfway between CROWN's bound and the least value
    seen: certified, the narrow stage raising the root's bound on the way; ``t`` above a value
    seen: never certified."""
    import relax.methods.bab as bab_mod

    raised = []
    real = bab_mod._narrowed_root

    def spy(graph, x_set, rs, opts, root, root_rows, low, deadline):
        out = real(graph, x_set, rs, opts, root, root_rows, low, deadline)
        raised.append(out[2] > low + 1e-6)
        return out

    monkeypatch.setattr(bab_mod, "_narrowed_root", spy)
    for seed in range(3):
        net = _Bottleneck(seed, outputs=1, gain=3.0).double().eval()
        torch.manual_seed(100 + seed)
        x0 = torch.rand(1, 6, dtype=torch.float64)
        graph, lo, hi, _ = _root(net, x0, 0.25)
        low = float(crown(graph, LpBall(x0, 0.25, math.inf), torch.ones(1, 1, 1, dtype=torch.float64)).spec_lower())
        seen = _min_by_pgd(net, lo, hi)
        assert low < seen - 1e-3, (low, seen)
        for f, holds in ((0.5, True), (1.02, False)):
            t = low + f * (seen - low)
            c = certify(net, LpBall(x0, 0.25, math.inf), OutputBounds(lower=t), method="bab", timeout=30, split="relu")[0]
            assert (c.status == "certified") == holds, (seed, f, c.status, c.details)
    assert sum(raised) >= 3, raised
