"""Input splitting across many boxes at once (:mod:`relax.bab.many_boxes`) and the forward bounds
over a box's free inputs that it bounds its pieces with (:func:`relax.bounds.forward.free_columns`).

Soundness: a box is proved only where the property holds on 4,000 samples of it plus its PGD
points; a box whose property is violated at a sampled point is never proved, and every candidate
counterexample lies in its box and violates the property. Boxes fix all but one to three inputs,
as VNN-COMP's nn4sys files do, on a network with an elementwise product by a fixed input (mscn's
masked mean).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from relax.bab.many_boxes import _halve, split_many_boxes
from relax.bounds.forward import forward_bounds, free_columns, free_count
from relax.ir.graph import build_graph
from verify.attack import pgd_attack
from verify.spec import Box, LinearSpec


class MaskedMean(nn.Module):
    """mscn's pattern: per-row MLP features times a 0/1 mask column, summed over rows and divided
    by the mask's sum, then an MLP to one output; input ``[rows, 5]`` (4 features, the mask)."""

    def __init__(self, rows: int = 4, width: int = 24, scale: float = 1.0):
        super().__init__()
        self.rows = rows
        self.f = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, x):
        feats, mask = x[..., :4], x[..., 4:]
        pooled = (self.f(feats) * mask).sum(1) / mask.sum(1)
        return self.out(pooled)


def _graph(scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    net = MaskedMean(scale=scale).double().eval()
    return net, build_graph(torch.fx.symbolic_trace(net), (4, 5), torch.float64)


def _boxes(M: int, seed: int, width: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` boxes ``[M, 20]``: features fixed at random values, masks fixed (first row always 1),
    and 1-3 features of the first row free over ``width``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(M, 4, 5, generator=g, dtype=torch.float64)
    x[..., 4] = (torch.rand(M, 4, generator=g) < 0.6).double()
    x[:, 0, 4] = 1.0
    lo, hi = x.clone(), x.clone()
    for m in range(M):
        k = 1 + m % 3
        cols = torch.randperm(4, generator=g)[:k]
        hi[m, 0, cols] = lo[m, 0, cols] + width
    return lo.reshape(M, -1), hi.reshape(M, -1)


def _samples(lo: torch.Tensor, hi: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, *lo.shape, generator=g, dtype=lo.dtype)


def test_free_columns_rebuild_every_point_of_the_box():
    lo, hi = _boxes(6, 1)
    ident, zlo, zhi = free_columns(lo, hi)
    k = free_count(lo, hi)
    assert k == 3 and ident.shape == (6, k + 1, 20) and zlo.shape == (6, k)
    for x in _samples(lo, hi, 50, 2):
        z = torch.stack([x[b][ident[b, :k].argmax(1)] * ident[b, :k].amax(1) for b in range(6)])  # the free values
        assert ((z >= zlo) & (z <= zhi)).all()
        rebuilt = torch.einsum("bk,bkn->bn", z, ident[:, :k]) + ident[:, k]
        assert torch.equal(rebuilt, x)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_forward_boxes_over_free_inputs_enclose_the_values_and_beat_intervals(scale):
    """Forward boxes over the free inputs contain every node's value at 4,000 samples; at the
    output they are tighter than interval boxes (the fixed mask's product keeps the correlation)."""
    from relax.bounds.interval import interval_bounds
    from test_bounds_soundness import _node_values

    _, graph = _graph(scale)
    lo, hi = _boxes(8, 3)
    shape = (-1, 4, 5)
    boxes = forward_bounds(graph, lo.reshape(shape), hi.reshape(shape))
    for b in range(8):
        vals = _node_values(graph, _samples(lo[b], hi[b], 4_000, 4 + b).reshape(shape))
        for name, v in vals.items():
            low, up = boxes[name][0][b], boxes[name][1][b]
            assert (v >= low).all() and (v <= up).all(), (b, name)
    ib = interval_bounds(graph, lo.reshape(shape), hi.reshape(shape))[graph.output]
    fb = boxes[graph.output]
    assert ((fb[1] - fb[0]) < (ib[1] - ib[0])).all()


class _Flat(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z.reshape(-1, 4, 5))


def _thresholds(net, lo, hi, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box, the least output over 4,000 samples and the box's PGD minimum: ``(sampled min
    [M], points at the min [M, 20])``."""
    mins, pts = [], []
    for b in range(lo.shape[0]):
        xs = _samples(lo[b], hi[b], 4_000, seed + b)
        with torch.no_grad():
            y = net(xs.reshape(-1, 4, 5)).squeeze(1)
        i = int(y.argmin())
        mins.append(y[i])
        pts.append(xs[i])
    return torch.stack(mins), torch.stack(pts)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_split_boxes_prove_only_what_holds_and_find_real_violations(scale):
    """Properties ``y > t``: half the boxes with ``t`` 20 % of the output's spread below the
    sampled minimum (true; proved by splitting), half with ``t`` just above a sampled value
    (false). No false box is proved; every candidate lies in its box and violates; every proved
    box holds at its samples and its PGD point."""
    net, graph = _graph(scale)
    M = 24
    lo, hi = _boxes(M, 5)
    ymin, _ = _thresholds(net, lo, hi, 100)
    spread = float(ymin.max() - ymin.min()) + 1e-3 * scale
    truth = torch.arange(M) % 2 == 0
    t = torch.where(truth, ymin - 0.2 * spread, ymin + 1e-9 * max(1.0, scale))
    C = torch.ones(M, 1, 1, dtype=torch.float64)
    d = -t.unsqueeze(1)
    r = split_many_boxes(graph, lo, hi, C, d, torch.zeros(1, dtype=torch.long), stop_at=time.perf_counter() + 60)
    assert not (r.proved & ~truth).any(), "a false property was proved"
    assert int(r.proved.sum()) >= M // 4, f"only {int(r.proved.sum())} of {M // 2} true boxes proved"
    for m, x in r.candidates.items():
        assert not truth[m] and (x >= lo[m]).all() and (x <= hi[m]).all()
        with torch.no_grad():
            assert float(net(x.reshape(1, 4, 5))) <= float(t[m])
    spec = LinearSpec(C, d, torch.zeros(1, dtype=torch.long))
    for m in r.proved.nonzero().flatten().tolist():
        xs = _samples(lo[m], hi[m], 4_000, 500 + m)
        with torch.no_grad():
            assert (net(xs.reshape(-1, 4, 5)).squeeze(1) > t[m]).all()
        one = LinearSpec(C[m:m + 1], d[m:m + 1], spec.groups)
        adv = pgd_attack(_Flat(net), Box(lo[m:m + 1], hi[m:m + 1]), one, steps=40, restarts=4)
        assert not bool(adv.found[0]) and float(adv.margin[0]) > 0


def test_halves_cover_their_piece_and_unhalvable_boxes_are_reported():
    lo = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 1.0, 2.5], [0.0, 0.0, 5.0]], dtype=torch.float64)
    hi[1, 2] = torch.nextafter(lo[1, 2], torch.tensor(9.0, dtype=torch.float64))  # one ulp wide
    a, b, own, stuck = _halve(lo, hi, torch.tensor([0, 1]), hi - lo)
    assert own.tolist() == [0, 1, 0, 1] and stuck.tolist() == [1]
    assert torch.equal(a[0], lo[0]) and torch.equal(b[2], hi[0])
    assert b[0, 0] == a[2, 0] == 0.5  # the halves meet: no gap


def test_a_past_deadline_proves_nothing_and_returns_at_once():
    _, graph = _graph()
    lo, hi = _boxes(16, 7)
    t0 = time.perf_counter()
    r = split_many_boxes(graph, lo, hi, torch.ones(16, 1, 1, dtype=torch.float64), torch.full((16, 1), 1e9, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.long), stop_at=t0)
    assert time.perf_counter() - t0 < 0.5 and not r.proved.any() and r.pieces == 0


def test_boxes_at_float_resolution_are_never_proved_wrongly():
    """Boxes whose free inputs are a few ulps wide (float64), with ``t`` just above the output at
    the box's centre: the property is false at the centre, so the box must never be proved; the
    centre (or a piece's) is a candidate, or the box is given up when its pieces cannot be halved."""
    net, graph = _graph(1e3)
    lo, _ = _boxes(12, 9)
    hi = lo.clone()
    for m in range(12):
        j = 3 + m % 2  # a free feature of the first row
        hi[m, j] = lo[m, j]
        for _ in range(4):
            hi[m, j] = torch.nextafter(hi[m, j], torch.tensor(10.0, dtype=torch.float64))
    with torch.no_grad():
        y = net(((lo + hi) / 2).reshape(-1, 4, 5)).squeeze(1)
    t = y + torch.finfo(torch.float64).eps * y.abs().clamp(min=1.0) * 4
    r = split_many_boxes(graph, lo, hi, torch.ones(12, 1, 1, dtype=torch.float64), -t.unsqueeze(1),
                         torch.zeros(1, dtype=torch.long), stop_at=time.perf_counter() + 30)
    assert not r.proved.any()
    assert (r.given_up | torch.tensor([m in r.candidates for m in range(12)])).all()


def test_chunks_keep_the_forward_forms_within_the_element_cap(monkeypatch):
    """Large networks get small chunks: with the cap lowered to 2,000 numbers every batch of
    pieces has at most ``cap / ((free + 1) * widest node)`` pieces (at least one), and the boxes
    proved are those of the uncapped run."""
    import relax.bab.many_boxes as mb

    net, graph = _graph()
    M = 12
    lo, hi = _boxes(M, 11)
    ymin, _ = _thresholds(net, lo, hi, 300)
    C, d = torch.ones(M, 1, 1, dtype=torch.float64), -(ymin - 0.05).unsqueeze(1)
    groups = torch.zeros(1, dtype=torch.long)
    free_run = split_many_boxes(graph, lo, hi, C, d, groups, stop_at=time.perf_counter() + 60)
    sizes = []
    real = mb.bound_pieces
    monkeypatch.setattr(mb, "bound_pieces", lambda g, l, h, *a, **k: sizes.append((l.shape[0], free_count(l, h))) or real(g, l, h, *a, **k))
    monkeypatch.setattr(mb, "CHUNK_ELEMENTS", 2_000)
    capped = split_many_boxes(graph, lo, hi, C, d, groups, stop_at=time.perf_counter() + 60)
    widest = max(n.numel for n in graph.nodes)
    assert sizes and all(p == 1 or p * (k + 1) * widest <= 2_000 for p, k in sizes)
    assert torch.equal(capped.proved, free_run.proved) and int(capped.proved.sum()) > 0
