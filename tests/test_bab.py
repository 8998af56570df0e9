"""Branch-and-bound: soundness of the beta-CROWN bounds, ground truth on 2-D nets (a grid
plus a Lipschitz bound decides each property), the registered ``bab`` method, anytime
behaviour, and a few real VNN-COMP instances from ../shared."""
from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from relax.bab import BabResult, RowSpec
from relax.bab.input_split import input_bab
from relax.bab.input_split import GraphBoxes
from verify import Box, Linear, certify



def _mlp(seed: int, sizes=(2, 16, 16, 3)) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(sizes[i + 1], sizes[i], generator=g) / math.sqrt(sizes[i]) * 1.5)
            lin.bias.copy_(torch.randn(sizes[i + 1], generator=g) * 0.3)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _dense(model: nn.Module, n_in: int) -> GraphBoxes:
    """The model's float64 bound graph as the input-split search sees it."""
    from relax.bounds import prepare

    box = Box(-torch.ones(1, n_in, dtype=torch.float64), torch.ones(1, n_in, dtype=torch.float64))
    return GraphBoxes(prepare(torch.fx.symbolic_trace(copy.deepcopy(model).double()), box, torch.float64)[0])


def _lipschitz(model: nn.Module, C: torch.Tensor) -> float:
    """A Lipschitz bound (l_2) of ``C model(x)``: the product of the layers' spectral norms."""
    Ws = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    lip = math.prod(float(torch.linalg.matrix_norm(W, ord=2)) for W in Ws[:-1])
    return lip * float(torch.linalg.matrix_norm(C @ Ws[-1], ord=2))


def _grid_truth(net: GraphBoxes, model: nn.Module, C, d, groups, lo, hi, n=161):
    """(grid minimum of the margin, a Lipschitz bound of the margin) on a 2-D box."""
    xs = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    pts = torch.cartesian_prod(xs, ys)
    rs = RowSpec(C, d, groups)
    m = rs.margin(rs.values(net.forward(pts)))
    h = max(float(hi[0] - lo[0]), float(hi[1] - lo[1])) / (n - 1)
    return m, pts, _lipschitz(model, C) * h / math.sqrt(2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bab", ["input", "input-square", "relu"])
def test_bab_agrees_with_ground_truth_on_2d_nets(seed, bab):
    """``input`` / ``input-square``: input splitting (the latter held to near-square boxes,
    see below); ``relu``: the ``bab`` method with ReLU splitting."""
    model = _mlp(10 + seed)
    net = _dense(model, 2)
    lo = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # property "y_0 > y_1 + t and y_0 > y_2 + t"? -> two groups of one row each
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    groups = torch.tensor([0, 1])
    m0, pts, slack = _grid_truth(net, model, C, torch.zeros(2, dtype=torch.float64), groups, lo, hi)
    gmin = float(m0.min())
    for truth, d0 in (("unsat", -gmin + slack + 0.02), ("sat", -gmin - 0.02)):
        d = torch.full((2,), d0, dtype=torch.float64)
        rs = RowSpec(C, d, groups)
        if bab == "relu":
            c = certify(model.double(), Box(lo[None], hi[None]), Linear(C, d), "bab", split="relu", timeout=20, dtype=torch.float64)[0]
            x = None if c.counterexample is None else torch.as_tensor(c.counterexample, dtype=torch.float64).reshape(-1)
            res = BabResult(c.status, x, reason=c.details.get("reason", ""))
        else:  # "input-square": smear branching held to near-square boxes by the aspect cap
            opts = {"branching": "smear", "max_aspect": 2.0} if bab == "input-square" else {}
            res = input_bab(net, rs, lo, hi, timeout=20.0, **opts)
        assert res.status != ("certified" if truth == "sat" else "falsified"), (truth, res)
        if res.status == "falsified":
            x = res.counterexample
            assert ((x >= lo) & (x <= hi)).all()
            assert float(rs.margin(rs.values(net.forward(x[None])))[0]) <= 0
        assert res.status == ("certified" if truth == "unsat" else "falsified"), (truth, res.status, res.reason)



def test_branch_dim_splits_a_dimension_the_bound_ignores_once_the_box_is_too_flat():
    """A dimension with zero input coefficient (its effect only through unstable ReLUs) is
    still split once its relative width exceeds ``max_aspect`` times another's."""
    from relax.bab.input_split import _branch_dim

    rs = RowSpec(torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    root_w = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    lo = torch.zeros(2, 3, dtype=torch.float64)
    hi = torch.tensor([[2.0**-3, 2.0**-3, 2.0**-2], [2.0**-9, 2.0**-3, 2.0**-8]], dtype=torch.float64)
    A = torch.tensor([[[1.0, 0.0, 1.0]], [[1.0, 0.0, 1.0]]], dtype=torch.float64)  # dim 1 unseen
    lower = torch.full((2, 1), -1.0, dtype=torch.float64)
    dims = _branch_dim(rs, lower, A, lo, hi, root_w, max_aspect=16.0)
    assert dims[0] != 1  # aspect 1: the smear decides
    assert dims[1] == 1  # dim 1 is 2^6 times wider (relatively) than dim 0: it is split


def test_alpha_on_open_boxes_only_raises_bounds_and_stays_sound():
    """The alpha-CROWN pass on the open children keeps every row bound at least CROWN's and
    below the rows' values at sampled points of each box."""
    from relax.bab.input_split import _alpha_nearest

    net = _dense(_mlp(7, (3, 20, 20, 4)), 3)
    C = torch.tensor([[1.0, -1.0, 0, 0], [1.0, 0, -1.0, 0], [0, 1.0, 0, -1.0], [0, 0, 1.0, -1.0]], dtype=torch.float64)
    rs = RowSpec(C, torch.zeros(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1])).with_averages()
    g = torch.Generator().manual_seed(2)
    lo = torch.rand(32, 3, generator=g, dtype=torch.float64) * 2 - 1
    hi = lo + 0.4 * torch.rand(32, 3, generator=g, dtype=torch.float64)
    lower, _, pre, _ = net.bound(rs, lo, hi, None)
    cm = rs.margin(lower)
    new, ncm = _alpha_nearest(net, rs, lo, hi, pre, lower, cm, 0.0, 1.0, 10)
    assert (new >= lower).all() and (ncm >= cm).all()
    assert bool((new > lower + 1e-6).any())  # it does something on this net
    x = lo + torch.rand(2000, 32, 3, generator=g, dtype=torch.float64) * (hi - lo)
    vals = rs.values(net.forward(x.reshape(-1, 3))).reshape(2000, 32, -1)
    assert (vals >= new - 1e-9).all()

def test_bab_method_never_certifies_a_falsifiable_property():
    model = _mlp(21, (4, 24, 24, 3))
    lo, hi = -torch.ones(8, 4), torch.ones(8, 4)
    # offsets that make some of the 8 inputs sat (by construction: the margin at 0 is shifted)
    with torch.no_grad():
        y0 = model(torch.zeros(1, 4))[0]
    C = torch.tensor([[1.0, -1.0, 0.0]])
    base = float(y0[0] - y0[1])
    offsets = torch.linspace(-base - 2.0, -base + 6.0, 8).unsqueeze(1)
    for b in range(8):
        prop = Linear(C, offsets[b])
        c = certify(model, Box(lo[b : b + 1], hi[b : b + 1]), prop, "bab", timeout=20, dtype=torch.float64)[0]
        with torch.no_grad():
            ys = model(lo[b] + torch.rand(20000, 4) * (hi[b] - lo[b]))
        sampled_sat = bool(((ys @ C.T)[:, 0] + offsets[b] <= 0).any())
        if sampled_sat:
            assert c.status != "certified"
        if c.status == "falsified":
            x = torch.tensor(c.counterexample, dtype=torch.float64)
            with torch.no_grad():
                y = model.double()(x[None])
            model.float()
            assert float(y[0, 0] - y[0, 1] + offsets[b].double()) <= 0
            assert ((x >= -1) & (x <= 1)).all()
        assert c.status in ("certified", "falsified")


class _Capped(nn.Module):
    """``min(body(x), cap)`` written as ``cap - relu(cap - body(x))``: the output sits exactly at
    ``cap`` wherever the body exceeds it (as ml4acopf's clamped generator outputs do)."""

    def __init__(self, body: nn.Module, cap: float) -> None:
        super().__init__()
        self.body, self.cap = body, cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cap - torch.relu(self.cap - self.body(x))


@pytest.mark.parametrize("split", ["auto", "relu"])
def test_bab_decides_a_property_at_its_own_tolerance(split):
    """VNN-COMP specs state tolerances of 1e-6 (ml4acopf: ``Y >= 0.300001`` is the violation of
    an output clamped at 0.3): the true margin is the tolerance itself, so ``bab`` proves such a
    property with the float64 safety margin (1e-10) of every bound method, as ``crown`` does (a
    1e-6 threshold left ml4acopf's instances open), and still falsifies the property one 1e-9
    below the cap, with a counterexample at the cap."""
    body = _mlp(3, (2, 16, 16, 1)).double()
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    with torch.no_grad():
        hs = body(lo + torch.rand(20000, 2, dtype=torch.float64) * (hi - lo))
    cap = float(hs.min() + hs.max()) / 2  # reached on part of the box
    net = _Capped(body, cap).eval()
    C = torch.tensor([[-1.0]], dtype=torch.float64)  # property: cap + gap - y > 0
    for gap in (1e-6, 1e-8):
        c = certify(net, Box(lo, hi), Linear(C, torch.tensor([cap + gap], dtype=torch.float64)), "bab", split=split,
                    timeout=20, dtype=torch.float64)[0]
        assert c.status == "certified", (gap, c.details)
    c = certify(net, Box(lo, hi), Linear(C, torch.tensor([cap - 1e-9], dtype=torch.float64)), "bab", split=split,
                timeout=20, dtype=torch.float64)[0]
    assert c.status == "falsified"
    x = torch.tensor(c.counterexample, dtype=torch.float64).reshape(1, 2)
    with torch.no_grad():
        assert float(net(x)[0, 0]) >= cap - 1e-9 and bool(((x >= lo) & (x <= hi)).all())


def test_input_split_pgd_is_the_falsifier():
    """Input splitting's PGD is verify.attack.pgd_attack on a batch of boxes (each its own set):
    it finds a violation of a property whose grid minimum is negative and whose box centres are
    not violated, returns a float64 point inside its box, and a seeded search repeats it."""
    from relax.bab.input_split import _InputSearch

    model = _mlp(1)
    net = _dense(model, 2)
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    lo, hi = -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    boxes_lo = torch.stack([lo, torch.tensor([0.0, -1.0], dtype=torch.float64)])
    boxes_hi = torch.stack([torch.tensor([0.0, 1.0], dtype=torch.float64), hi])
    rs0 = RowSpec(C, torch.zeros(2, dtype=torch.float64), torch.tensor([0, 0]))
    centres = rs0.margin(rs0.values(net.forward((boxes_lo + boxes_hi) / 2)))
    # the rows shifted so that both centres hold by 0.05 and a part of the grid violates
    d = torch.full((2,), 0.05 - float(centres.min()), dtype=torch.float64)
    rs = RowSpec(C, d, torch.tensor([0, 0]))
    m, _, _ = _grid_truth(net, model, C, d, torch.tensor([0, 0]), lo, hi)
    assert float(m.min()) < 0 < float(rs.margin(rs.values(net.forward((boxes_lo + boxes_hi) / 2))).min())
    found = []
    for _ in range(2):
        cex = _InputSearch(net, rs, None, seed=3).pgd(boxes_lo, boxes_hi, steps=20, restarts=2)
        assert cex is not None and cex.dtype == torch.float64
        assert any(bool(((cex >= l) & (cex <= h)).all()) for l, h in zip(boxes_lo, boxes_hi))
        assert float(rs.margin(rs.values(net.forward(cex[None])))[0]) <= 0
        found.append(cex)
    assert torch.equal(found[0], found[1])


def test_timeout_gives_unknown_with_best_bound():
    model = _mlp(5, (10, 64, 64, 2))
    net = _dense(model, 10)
    lo, hi = -torch.ones(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    C = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    # tight: the true minimum of y0 - y1 (approximately, by sampling) plus a hair
    with torch.no_grad():
        ys = net.forward(lo + torch.rand(50000, 10, dtype=torch.float64) * (hi - lo))
    d = torch.tensor([-float((ys @ C.T).min()) + 1e-3], dtype=torch.float64)
    rs = RowSpec(C, d, torch.tensor([0]))
    res = input_bab(net, rs, lo, hi, timeout=0.5)
    assert res.status in ("unknown", "falsified")
    if res.status == "unknown":
        assert res.reason in ("timeout", "memory")
        assert math.isfinite(res.lower) and res.lower <= 0
        assert res.time_s < 10
    for split in ("auto", "relu"):
        t = time.perf_counter()
        c = certify(model, Box(lo[None].float(), hi[None].float()), Linear(C, d), "bab", timeout=0.5, split=split)[0]
        assert c.status in ("unknown", "falsified")
        assert "margin_lower" in c.details and time.perf_counter() - t < 10


# ----------------------------------------------------------------------------------------
# real instances


def _instance(shared_dir, folder: str, onnx: str, vnnlib: str):
    from verify.model import load_model
    from verify.vnnlib import parse_vnnlib

    base = shared_dir / "benchmarks" / "vnncomp" / "2021" / folder
    net = load_model(base / onnx)
    return net, parse_vnnlib(base / vnnlib)


@pytest.mark.shared
@pytest.mark.parametrize(
    "folder,onnx,vnnlib,expect",
    [
        ("test", "test_sat.onnx", "test_prop.vnnlib", "falsified"),
        ("test", "test_unsat.onnx", "test_prop.vnnlib", "certified"),
        ("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", "certified"),
        ("acasxu", "ACASXU_run2a_1_9_batch_2000.onnx", "prop_7.vnnlib", "falsified"),
        ("mnistfc", "mnist-net_256x2.onnx", "prop_10_0.05.vnnlib", "certified"),
    ],
)
def test_real_instances(shared_dir, folder, onnx, vnnlib, expect):
    net, props = _instance(shared_dir, folder, onnx, vnnlib)
    statuses = []
    for p in props:
        c = certify(net, p.box(net.input_shape), p.spec, "bab", timeout=60)[0]
        statuses.append(c.status)
        if c.status == "falsified":
            x = torch.tensor(c.counterexample, dtype=torch.float64).reshape(1, *net.input_shape)
            from verify.attack import confirm_counterexample

            spec = p.spec.linear(1, p.spec.C.shape[-1], dtype=torch.float64)
            assert bool(confirm_counterexample(net, p.box(net.input_shape).to(dtype=torch.float64), spec, x)[0])
    overall = "falsified" if "falsified" in statuses else ("certified" if all(s == "certified" for s in statuses) else "unknown")
    assert overall == expect


def test_group_averages_keep_the_margin():
    g = torch.Generator().manual_seed(4)
    C = torch.randn(7, 5, generator=g, dtype=torch.float64)
    d = torch.randn(7, generator=g, dtype=torch.float64)
    rs = RowSpec(C, d, torch.tensor([0, 0, 0, 1, 2, 2, 2]))
    ra = rs.with_averages()
    assert ra.C.shape[0] > rs.C.shape[0] and ra.num_groups == rs.num_groups
    y = torch.randn(1000, 5, generator=g, dtype=torch.float64)
    m, ma = rs.margin(rs.values(y)), ra.margin(ra.values(y))
    assert ((m > 0) == (ma > 0)).all()
    assert torch.allclose(m.clamp(max=0), ma.clamp(max=0))




def test_open_part_drops_only_the_proved_groups():
    """Groups whose root bound is positive leave the search; the rest keep their rows (with the
    group averages), renumbered, and the property's margin is the smaller of the open spec's and
    the dropped groups' floor wherever the dropped rows obey their bounds."""
    g = torch.Generator().manual_seed(5)
    C = torch.randn(7, 5, generator=g, dtype=torch.float64)
    d = torch.randn(7, generator=g, dtype=torch.float64)
    rs = RowSpec(C, d, torch.tensor([0, 0, 0, 1, 2, 2, 2])).with_averages()
    root = torch.full((rs.C.shape[0],), -1.0, dtype=torch.float64)
    root[(rs.groups == 1).nonzero().squeeze(1)] = 0.25  # group 1 proved
    root[0] = 1e-7  # ... and one row of group 0 positive but below the margin: open
    op, rows, floor = rs.open_part(root, 1e-6)
    assert floor == 0.25 and op.num_groups == 2
    assert torch.equal(rows, (rs.groups != 1).nonzero().squeeze(1))
    assert torch.equal(op.groups, torch.where(rs.groups[rows] == 2, 1, 0))
    assert torch.equal(op.C, rs.C[rows]) and torch.equal(op.d, rs.d[rows])
    y = torch.randn(2000, 5, generator=g, dtype=torch.float64)
    vals = rs.values(y)
    ok = (vals[:, rs.groups == 1] >= 0.25).all(1)  # points where the dropped group obeys its bound
    both = torch.minimum(op.margin(vals[:, rows]), torch.tensor(floor, dtype=torch.float64))
    assert bool(ok.any())
    assert torch.equal(rs.margin(vals)[ok] > 0, both[ok] > 0)
    nothing, rows0, floor0 = rs.open_part(torch.full_like(root, -1.0), 1e-6)
    assert math.isinf(floor0) and torch.equal(rows0, torch.arange(rs.C.shape[0])) and torch.equal(nothing.groups, rs.groups)


def _three_input_net_and_unprovable_rows() -> tuple[GraphBoxes, RowSpec]:
    """A 3-input MLP as :class:`GraphBoxes` and two rows with a margin its root cannot prove."""
    net = _dense(_mlp(3, (3, 16, 16, 3)), 3)
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    return net, RowSpec(C, torch.full((2,), 5.0, dtype=torch.float64), torch.tensor([0, 1]))


def test_input_split_drops_strong_branching_when_root_passes_are_slow(monkeypatch):
    """Strong branching bounds ``2 n_0`` children per box: with a root pass slowed to 0.1 s and a
    2 s budget, 6 such passes exceed 5 % of it, so every round branches by smear; when they fit
    (the unslowed pass against a 50 % share) the first round branches strongly."""
    import relax.bab.input_split as isp

    net, rs = _three_input_net_and_unprovable_rows()
    seen: list[str] = []
    real_children = isp._children

    def spy(net_, spec, par, branching, *a):
        seen.append(branching)
        return real_children(net_, spec, par, branching, *a)

    monkeypatch.setattr(isp, "_children", spy)
    lo, hi = -torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    monkeypatch.setattr(isp, "STRONG_BRANCHING_SHARE", 0.5)  # the unslowed root pass (a few ms) fits
    isp.input_bab(net, rs, lo, hi, timeout=2.0, branching="mixed", check_point=lambda x: False)
    assert seen and seen[0] == "mixed"
    monkeypatch.setattr(isp, "STRONG_BRANCHING_SHARE", 0.05)
    real_bound = GraphBoxes.bound

    def slow(self, *a, **k):
        if a[3] is None:  # the root (no prior boxes)
            time.sleep(0.1)
        return real_bound(self, *a, **k)

    monkeypatch.setattr(GraphBoxes, "bound", slow)
    seen.clear()
    isp.input_bab(net, rs, lo, hi, timeout=2.0, branching="mixed", check_point=lambda x: False)
    assert seen and set(seen) == {"smear"}


def test_strong_branching_bounds_only_the_free_inputs_children(monkeypatch):
    """A box that fixes one of three inputs: strong branching bounds the children of the two free
    inputs only (4 per box, not 6), and no child is split along the fixed input."""
    import relax.bab.input_split as isp

    net, rs = _three_input_net_and_unprovable_rows()
    sizes: list[int] = []
    real_bound = GraphBoxes.bound

    def spy(self, spec, lo, hi, prior):
        if prior is not None:
            sizes.append(lo.shape[0])
            assert torch.equal(lo[:, 1], hi[:, 1])  # the fixed input stays fixed
        return real_bound(self, spec, lo, hi, prior)

    monkeypatch.setattr(GraphBoxes, "bound", spy)
    lo = torch.tensor([-1.0, 0.25, -1.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.25, 1.0], dtype=torch.float64)
    isp.input_bab(net, rs, lo, hi, timeout=1.0, branching="strong", batch_size=1, check_point=lambda x: False)
    assert sizes and set(sizes) == {4}


@pytest.mark.parametrize("seed", [0, 4, 5])  # nets where some boxes fail, some hold and some are clipped
def test_clipped_boxes_keep_every_violating_point(seed):
    """Input-domain clipping (:func:`relax.bab.input_split.clip_to_violations`) from the CROWN
    bounds of 64 sub-boxes of a 4-input net: every one of 20,000 points per box whose property
    fails (two groups, one of two rows) lies in its clipped box, and a box called proved has none."""
    from relax.bab.input_split import clip_to_violations

    model = _mlp(30 + seed, (4, 24, 24, 3))
    net = _dense(model, 4)
    g = torch.Generator().manual_seed(seed)
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    rs = RowSpec(C, torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64), torch.tensor([0, 0, 1]))
    lo = torch.rand((64, 4), generator=g, dtype=torch.float64) * 1.6 - 1
    hi = lo + torch.rand((64, 4), generator=g, dtype=torch.float64) * 0.4
    with torch.no_grad():
        low, A, _, lin = net.bound(rs, lo, hi, None)
    clo, chi, proved = clip_to_violations(rs, lo, hi, low, A, lin, 0.0)
    assert (clo >= lo).all() and (chi <= hi).all() and (clo <= chi).all()
    x = lo + (hi - lo) * torch.rand((20_000, 64, 4), generator=g, dtype=torch.float64)
    with torch.no_grad():
        fails = rs.margin(rs.values(net.forward(x.reshape(-1, 4)))).reshape(20_000, 64) <= 0
    inside = ((x >= clo) & (x <= chi)).all(2)
    assert not (fails & ~inside).any()
    assert not fails[:, proved].any()
    shrunk = ((chi - clo) < (hi - lo) - 1e-9).any(1) | proved
    assert int(shrunk.sum()) >= 5, int(shrunk.sum())  # the test exercises clipping (measured: 7 to 16 boxes)


def test_clipping_proves_a_disjunction_no_row_proves():
    """``x >= 0.5 or x <= 0.6`` on ``[0, 1]`` (exact linear rows): neither row's minimum is
    positive, but the group fails only where both half-spaces meet, which is empty; with 0.7 in
    place of 0.5 it fails on ``[0.6, 0.7]``, which the clipped box keeps (and little more)."""
    from relax.bab.input_split import clip_to_violations

    C, groups = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([0, 0])
    lo, hi = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    A = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    low = torch.tensor([[-0.5, -0.4]], dtype=torch.float64)
    _, _, proved = clip_to_violations(RowSpec(C, torch.tensor([-0.5, 0.6], dtype=torch.float64), groups), lo, hi, low, A, low, 0.0)
    assert bool(proved[0])
    low = torch.tensor([[-0.7, -0.4]], dtype=torch.float64)
    clo, chi, proved2 = clip_to_violations(RowSpec(C, torch.tensor([-0.7, 0.6], dtype=torch.float64), groups), lo, hi, low, A, low, 0.0)
    assert not bool(proved2[0]) and float(clo) <= 0.6 and float(chi) >= 0.7 and float(chi - clo) < 0.11


def test_clipping_takes_the_linear_bound_not_a_higher_interval_bound():
    """``r(x) = x^2 - 0.01`` on ``[-1, 1]`` fails on ``[-0.1, 0.1]``. Its linear bound ``x - 1.01``
    (minimum -2.01) and its interval bound -0.01 are both sound, but only the linear one goes with
    the coefficient: a constant recovered from the interval bound (``x + 0.99 <= 0``) would cut
    the box to ``[-1, -0.99]`` and lose every failing point."""
    from relax.bab.input_split import clip_to_violations

    rs = RowSpec(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    lo, hi = -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    A = torch.ones(1, 1, 1, dtype=torch.float64)
    clo, chi, proved = clip_to_violations(rs, lo, hi, torch.tensor([[-0.01]], dtype=torch.float64), A,
                                          torch.tensor([[-2.01]], dtype=torch.float64), 0.0)
    assert not bool(proved[0]) and float(clo) <= -0.1 and float(chi) >= 0.1


def test_clipping_skips_an_undefined_bound():
    """A row whose linear bound is undefined (NaN, e.g. ``inf - inf`` somewhere in the pass)
    clips nothing: the box stays whole and unproved, never NaN."""
    from relax.bab.input_split import clip_to_violations

    rs = RowSpec(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    nan = torch.full((1, 1), math.nan, dtype=torch.float64)
    clo, chi, proved = clip_to_violations(rs, lo, hi, nan, torch.ones(1, 1, 2, dtype=torch.float64), nan, 0.0)
    assert torch.equal(clo, lo) and torch.equal(chi, hi) and not bool(proved[0])


def test_best_rows_keeps_each_groups_highest_rows():
    """``best_rows`` keeps the ``k`` rows of each group with the highest bounds (an undefined bound
    last), in their order; any kept row's bound still proves its group."""
    C = torch.eye(6, dtype=torch.float64)
    rs = RowSpec(C, torch.zeros(6, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 2]))
    low = torch.tensor([1.0, 3.0, 2.0, float("nan"), 0.0, -5.0], dtype=torch.float64)
    two, kept2 = rs.best_rows(low, 2)
    assert kept2.tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(two.C, C[kept2]) and torch.equal(two.groups, rs.groups[kept2])
    one, kept1 = rs.best_rows(low, 1)
    assert kept1.tolist() == [1, 4, 5] and one.groups.tolist() == [0, 1, 2]
    # each group's best row stays: the margin of the bounds that chose the rows is unchanged
    low = low.nan_to_num(nan=-math.inf)
    for k in (1, 2, 3):
        sub, kept = rs.best_rows(low, k)
        assert float(sub.margin(low[kept])) == float(rs.margin(low)) == -5.0
