"""Branch-and-bound: soundness of the beta-CROWN bounds, ground truth on 2-D nets (a grid
plus a Lipschitz bound decides each property), the registered ``bab`` method, anytime
behaviour, and a few real VNN-COMP instances from ../shared."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from relax.bab import BabResult, RowSpec
from relax.bab_input import input_bab
from relax.beta import ReluNet, backward_bound, forward_bounds, intermediate_bounds, optimize_bound, refined_bounds
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


def _dense(model: nn.Module, n_in: int) -> ReluNet:
    gm = torch.fx.symbolic_trace(model)
    gm.input_shape = (n_in,)
    return ReluNet.from_model(gm)


def _sample_split_points(net: ReluNet, lo, hi, splits, n=4000, seed=0):
    """Points of the box whose pre-activations obey the split signs (rejection sampling)."""
    g = torch.Generator().manual_seed(seed)
    x = lo + torch.rand(n, lo.shape[-1], generator=g, dtype=lo.dtype) * (hi - lo)
    ok = torch.ones(n, dtype=torch.bool)
    z = x
    for k, (W, b) in enumerate(zip(net.Ws[:-1], net.bs[:-1])):
        z = z @ W.T + b
        s = splits[k][0]
        ok &= ((s == 0) | ((s > 0) & (z >= 0)) | ((s < 0) & (z <= 0))).all(1)
        z = torch.relu(z)
    return x[ok]


def test_bounds_sound_with_random_alphas_betas_and_splits():
    """Any alpha in [0,1] and beta >= 0 gives a sound bound on the split sub-domain."""
    net = _dense(_mlp(1, (3, 12, 12, 4)), 3)
    lo = torch.tensor([[-1.0, -0.5, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 0.5, 1.0]], dtype=torch.float64)
    pre0 = intermediate_bounds(net, lo, hi)
    g = torch.Generator().manual_seed(3)
    C = torch.randn(1, 5, 4, generator=g, dtype=torch.float64)
    d = torch.randn(1, 5, generator=g, dtype=torch.float64)
    checked = 0
    for trial in range(10):
        splits = []
        for l, u in pre0:
            s = torch.zeros_like(l, dtype=torch.int8)
            unst = ((l < 0) & (u > 0)).nonzero()
            for idx in unst[torch.randperm(len(unst), generator=g)[:1]]:
                s[0, idx[1]] = 1 if torch.rand(1, generator=g) < 0.5 else -1
            splits.append(s)
        pre = intermediate_bounds(net, lo, hi, prior=pre0, splits=splits)
        alphas = [torch.rand(1, 5, n, generator=g, dtype=torch.float64) for n in net.sizes]
        betas = [torch.rand(1, 5, n, generator=g, dtype=torch.float64) * 2 for n in net.sizes]
        lower, _ = backward_bound(net, C, d, lo, hi, pre, None, alphas, betas, splits)
        opt, _, _ = optimize_bound(net, C, d, lo, hi, pre, splits=splits, steps=10)
        x = _sample_split_points(net, lo, hi, splits, seed=trial)
        if len(x) == 0:
            continue
        vals = net.forward(x) @ C[0].T + d[0]
        assert (vals >= lower - 1e-9).all()
        assert (vals >= opt - 1e-9).all()
        checked += 1
    assert checked >= 3


def test_refined_bounds_match_crown_and_forward_is_sound():
    net = _dense(_mlp(2, (5, 20, 20, 20, 3)), 5)
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(16, 5, generator=g, dtype=torch.float64) - 1
    hi = lo + 0.3 * torch.rand(16, 5, generator=g, dtype=torch.float64)
    crown = intermediate_bounds(net, lo, hi)
    ref = refined_bounds(net, lo, hi)
    fwd = forward_bounds(net, lo, hi)
    x = lo + torch.rand(500, 16, 5, generator=g, dtype=torch.float64) * (hi - lo)
    z = x.reshape(-1, 5)
    for k in range(len(crown)):
        z = z @ net.Ws[k].T + net.bs[k]
        zz = z.reshape(500, 16, -1)
        for l, u in (crown[k], ref[k], fwd[k]):
            assert (zz >= l - 1e-9).all() and (zz <= u + 1e-9).all()
        unst = (crown[k][0] < 0) & (crown[k][1] > 0)
        # where it matters (unstable neurons) refined is at least as tight as CROWN
        assert (ref[k][0][unst] >= crown[k][0][unst] - 1e-9).all()
        assert (ref[k][1][unst] <= crown[k][1][unst] + 1e-9).all()
        z = torch.relu(z)



def test_forward_and_refined_bounds_sound_with_prior_and_splits():
    """The packed forward pass and the refined pass with a parent's bounds as prior and split
    signs: every sampled point of the box that obeys the splits lies within the bounds, and
    a precomputed relaxation gives the same backward bound as recomputing it."""
    from relax.beta import _relax

    net = _dense(_mlp(3, (5, 16, 16, 16, 4)), 5)
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(8, 5, generator=g, dtype=torch.float64) - 1
    hi = lo + 0.5 * torch.rand(8, 5, generator=g, dtype=torch.float64)
    parent = refined_bounds(net, lo - 0.1, hi + 0.1)
    splits = [torch.where(((l < 0) & (u > 0)) & (torch.rand(l.shape, generator=g) < 0.05),
                          torch.where(torch.rand(l.shape, generator=g) < 0.5, 1, -1), 0).to(torch.int8) for l, u in parent]
    checked = 0
    for pre in (forward_bounds(net, lo, hi, parent), refined_bounds(net, lo, hi, parent, splits)):
        for b in range(8):
            x = _sample_split_points(net, lo[b : b + 1], hi[b : b + 1], [s[b : b + 1] for s in splits], n=3000, seed=b)
            checked += len(x)
            z = x
            for k, (l, u) in enumerate(pre):
                z = z @ net.Ws[k].T + net.bs[k]
                assert (z >= l[b] - 1e-9).all() and (z <= u[b] + 1e-9).all()
                z = torch.relu(z)
    assert checked > 20000
    pre = refined_bounds(net, lo, hi)
    C = torch.randn(8, 3, 4, generator=g, dtype=torch.float64)
    a, _ = backward_bound(net, C, None, lo, hi, pre)
    b, _ = backward_bound(net, C, None, lo, hi, pre, relaxed=[_relax(l, u) for l, u in pre])
    assert torch.equal(a, b)


def _grid_truth(net: ReluNet, C, d, groups, lo, hi, n=161):
    """(grid minimum of the margin, a Lipschitz bound of the margin) on a 2-D box."""
    xs = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    pts = torch.cartesian_prod(xs, ys)
    rs = RowSpec(C, d, groups)
    m = rs.margin(rs.values(net.forward(pts)))
    lip = 1.0
    for W in net.Ws[:-1]:
        lip *= float(torch.linalg.matrix_norm(W, ord=2))
    lip *= float(torch.linalg.matrix_norm(C @ net.Ws[-1], ord=2))
    h = max(float(hi[0] - lo[0]), float(hi[1] - lo[1])) / (n - 1)
    return m, pts, lip * h / math.sqrt(2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bab", ["input", "input-square", "input-graph", "relu"])
def test_bab_agrees_with_ground_truth_on_2d_nets(seed, bab):
    """``input`` / ``input-square``: input splitting on the dense form (the latter held to
    near-square boxes, see below); ``input-graph``: the same search on the bound graph;
    ``relu``: the ``bab`` method with ReLU splitting (on the graph)."""
    model = _mlp(10 + seed)
    net = _dense(model, 2)
    lo = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # property "y_0 > y_1 + t and y_0 > y_2 + t"? -> two groups of one row each
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    groups = torch.tensor([0, 1])
    m0, pts, slack = _grid_truth(net, C, torch.zeros(2, dtype=torch.float64), groups, lo, hi)
    gmin = float(m0.min())
    for truth, d0 in (("unsat", -gmin + slack + 0.02), ("sat", -gmin - 0.02)):
        d = torch.full((2,), d0, dtype=torch.float64)
        rs = RowSpec(C, d, groups)
        if bab == "relu":
            c = certify(model.double(), Box(lo[None], hi[None]), Linear(C, d), "bab", split="relu", timeout=20, dtype=torch.float64)[0]
            x = None if c.counterexample is None else torch.as_tensor(c.counterexample, dtype=torch.float64).reshape(-1)
            res = BabResult(c.status, x, reason=c.details.get("reason", ""))
        elif bab == "input-graph":
            from relax.bab_input import GraphBoxes
            from relax.bounds import prepare

            graph, _ = prepare(model.double(), Box(lo[None], hi[None]), torch.float64)
            res = input_bab(GraphBoxes(graph), rs, lo, hi, timeout=20.0)
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
    from relax.bab_input import _branch_dim

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
    from relax.bab_input import _alpha_nearest, bound_boxes

    net = _dense(_mlp(7, (3, 20, 20, 4)), 3)
    C = torch.tensor([[1.0, -1.0, 0, 0], [1.0, 0, -1.0, 0], [0, 1.0, 0, -1.0], [0, 0, 1.0, -1.0]], dtype=torch.float64)
    rs = RowSpec(C, torch.zeros(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1])).with_averages()
    g = torch.Generator().manual_seed(2)
    lo = torch.rand(32, 3, generator=g, dtype=torch.float64) * 2 - 1
    hi = lo + 0.4 * torch.rand(32, 3, generator=g, dtype=torch.float64)
    lower, _, pre = bound_boxes(net, rs, lo, hi)
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


def test_without_dead_is_the_same_function_on_the_box():
    """Pruning the ReLUs dead on the root box keeps the network's values on every point of it."""
    from relax.beta import ReluNet, intermediate_bounds

    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 30, generator=g, dtype=torch.float64) / 4,
          torch.randn(3, 30, generator=g, dtype=torch.float64)]
    bs = [torch.randn(30, generator=g, dtype=torch.float64) - 1.0, torch.randn(30, generator=g, dtype=torch.float64) - 1.0,
          torch.zeros(3, dtype=torch.float64)]
    net = ReluNet(Ws, bs, (8,))
    lo = torch.rand(1, 8, generator=g, dtype=torch.float64)
    hi = lo + 0.1
    pre = intermediate_bounds(net, lo, hi)
    small, pre2 = net.without_dead(pre)
    assert sum(small.sizes) < sum(net.sizes)  # something was dead
    assert all(l.shape[1] == n for (l, _), n in zip(pre2, small.sizes))
    x = lo + torch.rand(2000, 8, generator=g, dtype=torch.float64) * (hi - lo)
    assert torch.allclose(small.forward(x), net.forward(x), atol=1e-12)


