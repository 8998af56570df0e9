"""The spec rows' cone of influence (:mod:`relax.bounds.cone`): CROWN and alpha-CROWN bound only
the intermediate neurons that can reach an output the spec reads.

The cone of a local head (convolutions, one output cell read) is its receptive field, computed
here by hand; the spec rows' bounds equal those of a pass that bounds every neuron (the others
get coefficient 0 in every pass the rows need), in fewer rows; every box, inside the cone and
out, encloses sampled values; a dense head's cone is everything (no mask at all).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import relax.bounds.crown as crown_mod
from relax.bounds import prepare
from relax.bounds.alpha import alpha_crown
from relax.bounds.cone import spec_cone
from relax.bounds.crown import crown
from verify.spec import LpBall


def _conv_head(seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """3x3 (padding 1) -> act -> 3x3 (padding 1) -> act -> 1x1 -> flatten, on 2 x 9 x 9 maps."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), act(), nn.Conv2d(4, 4, 3, padding=1), act(), nn.Conv2d(4, 3, 1),
                         nn.Flatten()).double().eval()


def _rows_reading(cells: list[int], n_out: int = 3 * 81) -> torch.Tensor:
    C = torch.zeros(1, len(cells), n_out, dtype=torch.float64)
    for i, k in enumerate(cells):
        C[0, i, k] = 1.0 if i % 2 else -1.0
    return C


def _graph(net, seed: int = 0, eps: float = 0.3):
    torch.manual_seed(seed)
    x0 = torch.rand(1, 2, 9, 9, dtype=torch.float64)
    s = LpBall(x0, eps, math.inf, 0.0, 1.0)
    g, xs = prepare(torch.fx.symbolic_trace(net), s, torch.float64)
    return g, xs, x0


def test_cone_of_a_convolutional_head_is_its_receptive_field():
    g, _, _ = _graph(_conv_head(0))
    cell = 4 * 9 + 5  # channel 0, row 4, column 5
    cone = spec_cone(g, _rows_reading([cell, 81 + cell]))
    pre = [p for p in g.preactivations() if p != g.input_name]
    assert len(pre) == 2 and set(cone) == set(pre)
    last = cone[pre[1]].reshape(4, 9, 9)  # the 1x1 convolution reads one position
    assert last.sum() == 4 and last[:, 4, 5].all()
    first = cone[pre[0]].reshape(4, 9, 9)  # then a 3x3 one: the 3x3 neighbourhood
    assert first.sum() == 4 * 9 and first[:, 3:6, 4:7].all()
    assert spec_cone(g, torch.ones(1, 2, 3 * 81, dtype=torch.float64)) == {}  # every output read: no mask


def test_dense_head_has_no_mask():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    g, _ = prepare(torch.fx.symbolic_trace(net), LpBall(torch.zeros(1, 5, dtype=torch.float64), 0.5, math.inf), torch.float64)
    C = torch.zeros(1, 1, 4, dtype=torch.float64)
    C[0, 0, 2] = 1.0
    assert spec_cone(g, C) == {}


def _samples(x0: torch.Tensor, eps: float, n: int = 4000) -> torch.Tensor:
    """``n`` points of the l_inf ball of radius ``eps`` around ``x0``, clipped to [0, 1]."""
    return (x0 + eps * (2 * torch.rand(n, *x0.shape[1:], dtype=torch.float64) - 1)).clamp(0, 1)


def _values(g, x: torch.Tensor) -> dict[str, torch.Tensor]:
    vals = {g.input_name: x}
    with torch.no_grad():
        for n in g.nodes:
            vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
    return vals


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spec_bounds_equal_the_full_pass_in_fewer_rows_and_every_box_holds(monkeypatch, act, seed):
    net = _conv_head(seed, act)
    g, xs, x0 = _graph(net, seed)
    C = _rows_reading([5 * 9 + 3, 81 + 5 * 9 + 3, 2 * 81 + 8])  # two cells, one on the border
    rows = []
    real = crown_mod.bound_node

    def counting(*a, **k):
        got = k.get("rows")
        rows.append(None if got is None else int(got[0].numel()))
        return real(*a, **k)

    monkeypatch.setattr(crown_mod, "bound_node", counting)
    with torch.no_grad():
        cut = crown(g, xs, C)
        cut_rows = list(rows)
        rows.clear()
        monkeypatch.setattr(crown_mod, "spec_cone", lambda graph, C: {})
        full = crown(g, xs, C)
        full_rows = list(rows)
    torch.testing.assert_close(cut.spec_lower(), full.spec_lower(), rtol=0, atol=1e-12)
    assert all(r is not None for r in cut_rows) and all(r is None for r in full_rows)
    n_full = sum(int(((lo < 0) & (hi > 0)).sum()) if act is nn.ReLU else lo.numel()
                 for p, (lo, hi) in cut.intermediate.items() if p != g.input_name and p in _rows_planned(g, xs))
    assert 0 < sum(cut_rows) < n_full
    vals = _values(g, _samples(x0, 0.3))
    for p, (lo, hi) in cut.intermediate.items():
        assert (vals[p] >= lo - 1e-9).all() and (vals[p] <= hi + 1e-9).all(), p
    y = vals[g.output].reshape(vals[g.output].shape[0], -1)
    assert (y @ C[0].t() >= cut.spec_lower() - 1e-9).all()


def _rows_planned(g, xs) -> set[str]:
    from relax.bounds.crown import skips_linear_bounds
    return {p for p in g.preactivations() if p != g.input_name and not skips_linear_bounds(g, p, xs)}


def test_alpha_crown_optimises_only_rows_in_the_cone_and_stays_sound(monkeypatch):
    net = _conv_head(3)
    g, xs, x0 = _graph(net, 3)
    C = _rows_reading([4 * 9 + 4, 81 + 4 * 9 + 4])
    cone, outside = spec_cone(g, C), []
    real = crown_mod.bound_node

    def checked(graph, node, *a, **k):  # every pass of every step: rows only inside the cone
        rows = k.get("rows")
        if node in cone:
            outside.append(rows is None or not bool(cone[node][rows[0]].all()))
        return real(graph, node, *a, **k)

    monkeypatch.setattr(crown_mod, "bound_node", checked)
    cut = alpha_crown(g, xs, C, iterations=15, optimize_intermediate=True)
    with torch.no_grad():  # a node without planned rows (its unstable neurons all outside the cone) gets none either
        crown(g, xs, C, rows={})
    assert outside and not any(outside)
    monkeypatch.setattr(crown_mod, "bound_node", real)
    monkeypatch.setattr("relax.bounds.alpha.spec_cone", lambda graph, C: {})
    monkeypatch.setattr(crown_mod, "spec_cone", lambda graph, C: {})
    full = alpha_crown(g, xs, C, iterations=15, optimize_intermediate=True)
    assert sum(a.numel() for s, per in cut.alphas.items() if s != "__out__" for a in per.values()) \
        < sum(a.numel() for s, per in full.alphas.items() if s != "__out__" for a in per.values())
    torch.testing.assert_close(cut.lower, full.lower, rtol=0, atol=1e-6 * float(full.lower.abs().max()) + 1e-9)
    vals = _values(g, _samples(x0, 0.3))
    y = vals[g.output].reshape(vals[g.output].shape[0], -1)
    assert (y @ C[0].t() >= cut.lower - 1e-9).all()


def test_relu_search_splits_only_neurons_in_the_cone(monkeypatch):
    """A neuron outside the cone cannot move the rows: its (interval) box is never split, and a
    domain whose neurons in the cone are all fixed is a leaf (its rows are affine there)."""
    import relax.bab.activation_split as act
    from relax.bab import RowSpec

    net = _conv_head(4)
    g, xs, x0 = _graph(net, 4, eps=0.08)
    cell = 4 * 9 + 4
    C = _rows_reading([cell])
    with torch.no_grad():
        low = float(crown(g, xs, C).spec_lower()[0, 0])
        vals = _values(g, _samples(x0, 0.08))
    y = vals[g.output].reshape(vals[g.output].shape[0], -1) @ C[0].t()
    d = -(low + float(y.min())) / 2  # between the root's bound and the sampled minimum: branching needed
    assert low + d < 0
    rs = RowSpec(C[0], torch.tensor([d], dtype=torch.float64), torch.tensor([0]))
    cone = spec_cone(g, C)
    seen = []
    real = act.relu_scores

    def checked(graph, db, splits, rs_, weight=None):
        out = real(graph, db, splits, rs_, weight)
        for p, sc in out.items():
            outside = ~cone[p].to(sc.device)
            assert bool((sc[:, outside] == -1).all()), p
            seen.append(int((sc > -1).sum()))
        return out

    monkeypatch.setattr(act, "relu_scores", checked)
    outside, real_bound = [], crown_mod.bound_node

    def rows_checked(graph, node, *a, **k):  # the domains' box passes too: rows only inside the cone
        rows = k.get("rows")
        if node in cone:
            outside.append(rows is None or not bool(cone[node][rows[0]].all()))
        return real_bound(graph, node, *a, **k)

    monkeypatch.setattr(crown_mod, "bound_node", rows_checked)
    res = act.graph_relu_bab(g, xs, rs, crown(g, xs, C).intermediate, timeout=30.0, candidates=1)
    assert seen and max(seen) > 0
    assert outside and not any(outside)
    # the search ends (one without the cone kept splitting neurons outside it until its deadline:
    # 15,000 domains in 20 s against 379 here); exhausted: the open leaves' exact LP bounds, whose
    # smallest is the rows' minimum; shifted above it, the property holds and the search proves it
    assert res.status == "certified" or res.reason == "exhausted", (res.status, res.reason, res.domains)
    if res.status != "certified":
        rs = RowSpec(C[0], torch.tensor([d - res.lower + 1e-3], dtype=torch.float64), torch.tensor([0]))
        res = act.graph_relu_bab(g, xs, rs, crown(g, xs, C).intermediate, timeout=30.0, candidates=1)
        assert res.status == "certified", (res.status, res.reason, res.lower, res.domains)


def test_an_overflow_outside_the_cone_leaves_the_rows_bounded():
    """Boxes that overflow to +-inf far from the cell read (an input corner of +-1e306 through
    weights of 1e4): rows with coefficient 0 there add 0, not ``0 * inf`` = NaN (ReLU's chord
    on an unbounded box, a round-off weight of inf), with or without the cone; the bound holds
    on samples, corners included."""
    from verify.spec import Box

    net = _conv_head(0)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1e4)
    torch.manual_seed(0)
    x0 = torch.rand(1, 2, 9, 9, dtype=torch.float64)
    lo, hi = x0 - 0.05, x0 + 0.05
    lo[0, :, 0, 0], hi[0, :, 0, 0] = -1e306, 1e306
    g, xs = prepare(torch.fx.symbolic_trace(net), Box(lo, hi), torch.float64)
    C = _rows_reading([4 * 9 + 4, 81 + 4 * 9 + 4])
    with torch.no_grad():
        low = crown(g, xs, C).spec_lower()
        assert not all(bool(torch.isfinite(b).all()) for b in crown(g, xs, None).intermediate["_0"])  # it does overflow
        x = lo + (hi - lo) * torch.rand(3000, 2, 9, 9, dtype=torch.float64)
        x[:1000, :, 0, 0] = torch.where(torch.rand(1000, 2, dtype=torch.float64) < 0.5, lo[0, :, 0, 0], hi[0, :, 0, 0])
        y = net(x)
    assert bool(torch.isfinite(low).all()), low
    cells = [4 * 9 + 4, 81 + 4 * 9 + 4]  # the outputs at the overflowing corner are NaN: read the two cells alone
    rows = y[:, cells] * C[0][:, cells].diagonal()
    assert bool(torch.isfinite(rows).all()) and (rows >= low - 1e-6 * low.abs()).all()


def test_a_log_softmax_head_keeps_every_row_its_neurons(monkeypatch):
    """A per-position log-softmax over the channels (its backward splits each row by the row's
    own sum, so one random row does not show every input a row reaches): rows that read two
    channels of one cell (not summing to 0) get the same bound as the pass over every neuron."""
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*list(_conv_head(5))[:-1])  # without its flatten

        def forward(self, x):
            return torch.log_softmax(self.body(x), dim=1).flatten(1)

    net = Head().double().eval()
    g, xs, _ = _graph(net, 5, eps=0.1)
    cell = 4 * 9 + 4
    C = torch.zeros(1, 2, 3 * 81, dtype=torch.float64)
    C[0, 0, cell], C[0, 0, 81 + cell] = 1.0, 1.0  # y_0 + y_1 at the cell
    C[0, 1, 2 * 81 + cell] = 1.0  # y_2 alone
    with torch.no_grad():
        cut = crown(g, xs, C).spec_lower()
        monkeypatch.setattr(crown_mod, "spec_cone", lambda graph, C: {})
        full = crown(g, xs, C).spec_lower()
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-12)
