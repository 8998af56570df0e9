"""ReLU-split branch-and-bound on the bound graph (networks without a dense ReLU form).

Ground truth: the exact l_inf minimum distortion ``d*`` by MILP. For residual networks it is
computed on an equivalent chain (``h + relu(B h + b)`` with ``h >= 0`` equals
``[I I] relu([h; B h + b])``), so the graph search on the residual network must certify the
ball of radius ``0.9 d*`` (completeness) and never certify the one of radius ``1.1 d*``
(soundness).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from verify import certify
from verify.spec import LpBall, Robust

pytest.importorskip("highspy")


class _Residual(nn.Module):
    def __init__(self, n: int, w: int, k: int) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(n, w), nn.Linear(w, w), nn.Linear(w, k)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        return self.o(h)


def _as_chain(r: _Residual) -> nn.Sequential:
    """The same function as a chain of Linear/ReLU layers."""
    w = r.a.out_features
    l2 = nn.Linear(w, 2 * w)
    out = nn.Linear(2 * w, r.o.out_features)
    with torch.no_grad():
        l2.weight.copy_(torch.cat([torch.eye(w), r.b.weight]))
        l2.bias.copy_(torch.cat([torch.zeros(w), r.b.bias]))
        out.weight.copy_(torch.cat([r.o.weight, r.o.weight], dim=1))
        out.bias.copy_(r.o.bias)
    return nn.Sequential(r.a, nn.ReLU(), l2, nn.ReLU(), out).eval()


def _exact_distance(net: nn.Module, x0: torch.Tensor, label: int, p: float = math.inf) -> float | None:
    """``d*`` in l_p, p = inf or 1 (None when the whole domain [0, 1]^n keeps the label)."""
    from relax.exact.milp import minimum_distortion

    vals, res = minimum_distortion(net, x0, Robust(torch.tensor([label])), p, (0.0, 1.0), timeout=60, return_details=True)
    r = res[0]
    if r.status == "no_adversarial":
        return None
    assert r.status == "optimal"
    return float(r.lower)


def _spread(first: nn.Linear, factor: float = 8.0) -> None:
    """Scale the first layer so that the domain [0, 1]^n maps to a wide range (several classes)."""
    with torch.no_grad():
        first.weight.mul_(factor)
        first.bias.sub_(first.weight.sum(1) * 0.5)


def _two_rows():
    """``y_0 - y_1`` and ``y_0 - y_2`` as two groups (both must be positive)."""
    from relax.bab import RowSpec

    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    return C, RowSpec(C, torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1]))


def _root(net, x0: torch.Tensor, eps: float):
    """Bound graph, input set, the two rows of :func:`_two_rows` and the root's CROWN boxes for
    the l_inf ball of radius ``eps`` around ``x0`` inside ``[0, 1]`` (float64)."""
    from relax.bounds import prepare
    from relax.bounds.crown import crown

    graph, xs = prepare(net, LpBall(x0, eps, math.inf, 0.0, 1.0), torch.float64)
    C, rs = _two_rows()
    return graph, xs, C, rs, crown(graph, xs, None).intermediate


def _obeys(splits: dict, pres: dict, dom: int, n: int) -> torch.Tensor:
    """``[n]``: which samples have the ReLU signs of domain ``dom`` (``pres``: node -> ``[n, m]``
    pre-activations)."""
    inside = torch.ones(n, dtype=torch.bool)
    for p, s in splits.items():
        z, s = pres[p].reshape(n, -1), s[dom]
        inside &= ((s == 0) | ((s > 0) & (z >= 0)) | ((s < 0) & (z <= 0))).all(1)
    return inside


def _check(net: nn.Module, chain: nn.Module, n_in: int, seed: int, options: dict, p: float = math.inf) -> list:
    torch.manual_seed(100 + seed)
    d = None
    for _ in range(20):  # a centre with an adversarial example in the domain
        x0 = torch.rand(1, n_in)
        with torch.no_grad():
            label = int(net(x0).argmax())
            assert torch.allclose(net(x0), chain(x0), atol=1e-5)
        d = _exact_distance(chain, x0, label, p)
        if d is not None:
            break
    assert d is not None, "no centre with an adversarial example: the test nets are too flat"
    statuses = []
    for f in (0.9, 1.1):
        c = certify(net, LpBall(x0, d * f, p, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                    method_options=options)[0]
        if f > 1:
            assert c.status != "certified", f"certified a ball of radius 1.1 d* (seed {seed})"
        else:
            assert c.status == "certified", f"radius 0.9 d*: {c.status} ({c.details.get('reason')}, seed {seed})"
            assert c.details["stage"].startswith("graph"), c.details["stage"]
        statuses.append(c)
    return statuses


@pytest.mark.parametrize("seed", range(4))
def test_residual_net_decided_against_exact_milp(seed):
    torch.manual_seed(seed)
    r = _Residual(6, 10, 3).eval()
    _spread(r.a)
    _check(r, _as_chain(r), 6, seed, {})


@pytest.mark.parametrize("seed", range(3))
def test_l1_balls_decided_against_exact_milp(seed):
    """l_1 balls (dual-norm concretisation, l_1 constraint in the leaves' LPs) on a residual net."""
    torch.manual_seed(seed)
    r = _Residual(6, 10, 3).eval()
    _spread(r.a)
    _check(r, _as_chain(r), 6, seed, {}, p=1.0)


@pytest.mark.parametrize("seed", range(3))
def test_mlp_through_the_graph_decided_against_exact_milp(seed):
    """The graph search decides MLPs (ReLU splitting forced: the inputs are low-dimensional)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    _spread(net[0], 16.0)
    _check(net, net, 6, seed, {"split": "relu"})


def test_domain_boxes_recomputation_stops_at_the_deadline():
    """bound_domains' CROWN pass over the domains' boxes honours the deadline (a resnet_4b
    instance ran 85 s of a 30 s budget there): past it, no pre-activation after the first is
    tightened by linear bounds: the second ReLU input keeps its interval box."""
    import time

    from relax.bab.activation_split import bound_domains, relu_inputs

    torch.manual_seed(7)
    r = _Residual(4, 8, 3).eval().double()
    graph, xs, C, rs, root = _root(r, torch.full((1, 4), 0.5, dtype=torch.float64), 0.3)
    (_, p1), (_, p2) = relu_inputs(graph)
    g = torch.Generator().manual_seed(0)
    splits = {p1: torch.randint(-1, 2, (6, math.prod(graph.shape(p1))), generator=g).to(torch.int8)}
    on_time = bound_domains(graph, xs, rs, root, splits, steps=0)
    late = bound_domains(graph, xs, rs, root, splits, steps=0, deadline=time.perf_counter())
    (lo_t, hi_t), (lo_l, hi_l) = on_time.boxes[p2], late.boxes[p2]
    assert (lo_l <= lo_t).all() and (hi_l >= hi_t).all()
    assert bool((lo_l < lo_t).any() or (hi_l > hi_t).any())  # in time, linear bounds tighten it


def test_domains_start_from_slopes_shared_by_the_rows():
    """Root slopes that alpha-CROWN shared across the spec rows (``[D, 1, n]``, its memory cap)
    start every row (an ml4acopf instance failed on the reshape): with no steps the bounds equal
    those from CROWN's slopes given per row."""
    from relax.bab.activation_split import bound_domains, relu_inputs

    torch.manual_seed(7)
    r = _Residual(4, 8, 3).eval().double()
    graph, xs, C, rs, root = _root(r, torch.full((1, 4), 0.5, dtype=torch.float64), 0.3)
    g = torch.Generator().manual_seed(0)
    splits = {p: torch.randint(-1, 2, (3, math.prod(graph.shape(p))), generator=g).to(torch.int8) for _, p in relu_inputs(graph)}
    first = bound_domains(graph, xs, rs, root, splits, steps=0)
    shared = {a: t[:, :1].clone() for a, t in first.alphas.items()}  # [D, 1, n]
    again = bound_domains(graph, xs, rs, root, splits, alphas0=shared, steps=0)
    assert torch.allclose(first.rows, again.rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fast", [False, True])
def test_split_domains_bound_below_every_sample(fast):
    """Each domain's bound holds for sampled inputs whose ReLU signs match the domain's splits
    (``fast``: slopes and multipliers optimised on the float32 graph, bound in float64)."""
    from relax.ir.graph import get_graph
    from relax.bab.activation_split import bound_domains, relu_inputs

    torch.manual_seed(7)
    r = _Residual(4, 8, 3).eval().double()
    x0 = torch.full((1, 4), 0.5, dtype=torch.float64)
    graph, xs, C, rs, root = _root(r, x0, 0.3)
    relus = relu_inputs(graph)
    D = 6
    g = torch.Generator().manual_seed(0)
    splits = {p: torch.randint(-1, 2, (D, math.prod(graph.shape(p))), generator=g).to(torch.int8) for _, p in relus}
    db = bound_domains(graph, xs, rs, root, splits, steps=5, fast=get_graph(r, (4,), torch.float32) if fast else None)
    low, infeasible = db.rows, db.infeasible
    # samples, with the pre-activations of every ReLU
    x = 0.2 + 0.6 * torch.rand(20000, 4, dtype=torch.float64)
    pre_a = r.a(x)
    pre_b = r.b(torch.relu(pre_a))
    y = r(x)
    pres = dict(zip([p for _, p in relus], [pre_a, pre_b]))
    vals = y @ C.T
    for dom in range(D):
        inside = _obeys(splits, pres, dom, x.shape[0])
        if bool(infeasible[dom]):
            assert not bool(inside.any())
            continue
        if bool(inside.any()):
            assert (vals[inside] >= low[dom] - 1e-9).all()


def _small(act: type, n_in: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3)).eval()
    with torch.no_grad():  # larger weights after the first layer: saturating units still vary
        net[2].weight.mul_(4.0)
        net[4].weight.mul_(4.0)
    _spread(net[0], 4.0)
    with torch.no_grad():  # centred logits over the domain: every class wins somewhere
        net[4].bias.sub_(net(torch.rand(4096, n_in)).mean(0))
    return net


def _witness(net: nn.Module, x0: torch.Tensor, label: int, p: float = math.inf) -> float | None:
    """The l_p distance of the closest violating point on a fine grid of [0, 1]^2 (an
    upper bound on d*)."""
    g = torch.linspace(0, 1, 401)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        y = net(X)
    bad = y.argmax(1) != label
    if not bool(bad.any()):
        return None
    return float((X[bad] - x0).norm(p=p, dim=1).min())


def _decided_against_the_grid(act: type, p: float, seed0: int) -> int:
    """Three 2-input nets (inputs drawn with seeds ``seed0 + i``): ``bab`` never certifies the l_p
    ball just past the closest violating grid point (capped at the unit square's l_p diameter,
    beyond which a ball covers no more of the domain) and decides the ball of half that radius,
    a falsified one with a counterexample inside it. Returns how many nets were decided."""
    decided = 0
    for seed in range(3):
        net = _small(act, seed=seed)
        torch.manual_seed(seed0 + seed)
        x0 = torch.rand(1, 2)
        with torch.no_grad():
            label = int(net(x0).argmax())
        w = _witness(net, x0, label, p)
        if w is None:
            continue
        prop = Robust(torch.tensor([label]))
        far = certify(net, LpBall(x0, min(w * 1.01, 2 ** (1 / p)), p, 0.0, 1.0), prop, "bab", timeout=30)[0]
        assert far.status != "certified"
        near = certify(net, LpBall(x0, w / 2, p, 0.0, 1.0), prop, "bab", timeout=30)[0]
        # the grid's witness bounds d* from above only: a closer violation the grid missed
        # makes "falsified" right; "unknown" is what the split must avoid
        assert near.status in ("certified", "falsified"), (act, seed, near.details.get("reason"))
        if near.status == "falsified":
            with torch.no_grad():
                xc = torch.as_tensor(near.counterexample, dtype=torch.float32).reshape(1, 2)
                assert int(net(xc).argmax()) != label and float((xc - x0).norm(p=p)) <= w / 2 + 1e-6
        decided += 1
    return decided


class _Atan(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU, _Atan])
def test_low_dimensional_nets_are_split_on_the_input(act):
    """2 inputs: the graph input split decides sigmoid / tanh / ReLU / atan nets: it never certifies a
    ball that holds a violating grid point, and decides the ball of half that radius."""
    assert _decided_against_the_grid(act, math.inf, 50) >= 2


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_l2_balls_on_2d_nets_against_a_grid(act):
    """l_2 balls: never certified beyond a violating grid point, decided at half its distance."""
    assert _decided_against_the_grid(act, 2.0, 70) >= 2


def test_interval_split_domains_bound_below_every_sample():
    """Domains that halve sigmoid and max-pooling inputs: each bound holds for the samples
    whose pre-activations lie in the domain's intervals."""
    from relax.bab.activation_split import bound_domains, interval_inputs

    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).eval().double()
    x0 = torch.full((1, 1, 6, 6), 0.5, dtype=torch.float64)
    graph, xs, C, rs, root = _root(net, x0, 0.4)
    D = 4
    ivals = {}
    for _, p in interval_inputs(graph):
        l, h = (b.reshape(1, -1).expand(D, -1) for b in root[p])
        cut = l + (h - l) * torch.rand(D, l.shape[1], dtype=torch.float64)
        upper = torch.rand(D, l.shape[1]) < 0.5
        ivals[p] = (torch.where(upper, cut, torch.full_like(cut, -math.inf)), torch.where(upper, torch.full_like(cut, math.inf), cut))
    db = bound_domains(graph, xs, rs, root, {}, steps=0, ivals=ivals)
    x = (0.1 + 0.8 * torch.rand(30000, 1, 6, 6, dtype=torch.float64))
    with torch.no_grad():
        pre_conv = net[0](x)
        pre_pool = net[1](pre_conv)
        vals = net(x) @ C.T
    pres = dict(zip([p for _, p in interval_inputs(graph)], [pre_conv, pre_pool]))
    for dom in range(D):
        inside = torch.ones(x.shape[0], dtype=torch.bool)
        for p, (il, ih) in ivals.items():
            z = pres[p].reshape(x.shape[0], -1)
            inside &= ((z >= il[dom]) & (z <= ih[dom])).all(1)
        if bool(db.infeasible[dom]):
            assert not bool(inside.any())
        elif bool(inside.any()):
            assert (vals[inside] >= db.rows[dom] - 1e-9).all()


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_ball_clipped_by_the_domain_is_concretised_exactly(p):
    """The dual bound of a linear function over an l_p ball clipped by a box lies below the exact
    minimum (LP / SOCP) and within 1e-6 of it."""
    cp = pytest.importorskip("cvxpy")

    from relax.bounds.concretize import ball_box_dual

    g = torch.Generator().manual_seed(int(p))
    n, S, B = 12, 5, 3
    A = torch.randn(S, B, n, dtype=torch.float64, generator=g)
    c = torch.rand(B, n, dtype=torch.float64, generator=g)
    lo, hi = torch.zeros(B, n, dtype=torch.float64), torch.ones(B, n, dtype=torch.float64)
    eps = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    got = ball_box_dual(A, c, eps.view(1, B, 1), lo, hi, p)
    for s in range(S):
        for b in range(B):
            x = cp.Variable(n)
            prob = cp.Problem(cp.Minimize(A[s, b].numpy() @ x), [x >= 0, x <= 1, cp.norm(x - c[b].numpy(), p) <= float(eps[b])])
            prob.solve(solver=cp.CLARABEL)
            exact = float(prob.value)
            assert float(got[s, b]) <= exact + 1e-7
            assert float(got[s, b]) >= exact - 1e-5 * (1 + abs(exact))


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_zero_radius_clipped_ball_is_finite(p):
    """A ball of radius 0 (the start of a radius search) is a point: CROWN's bound must be finite
    and below the value there (the clipped-ball dual was NaN: inf * 0 at eps = 0)."""
    from relax.bounds import prepare
    from relax.bounds.crown import crown

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        net[0].bias.fill_(1.0)  # active ReLUs: the rows reach the input
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ball = LpBall(x, torch.zeros(2, dtype=torch.float64), p, 0.0, 1.0)
    graph, s = prepare(net, ball, torch.float64)
    C = 1e4 * torch.eye(3, dtype=torch.float64).expand(2, 3, 3)  # large rows: ||A|| / eps overflows
    low = crown(graph, s, C).lower
    assert torch.isfinite(low).all()
    with torch.no_grad():
        y = 1e4 * net(x)
    assert (low <= y + 1e-6).all() and (low >= y - 1e-2).all()


def test_domain_store_keeps_every_entry():
    """Entries taken come out with their own values; the rest stay, through buffer growth."""
    from relax.bab.activation_split import _DomainStore

    g = torch.Generator().manual_seed(3)
    ref = {i: float(i) for i in range(5)}
    q = _DomainStore({"id": torch.arange(5), "v": torch.arange(5, dtype=torch.float64).unsqueeze(1).repeat(1, 3)})
    nxt = 5
    for _ in range(200):
        n_take = int(torch.randint(0, q.n + 1, (1,), generator=g))
        idx = torch.randperm(q.n, generator=g)[:n_take]
        got = q.take(idx)
        for i, v in zip(got["id"].tolist(), got["v"][:, 0].tolist()):
            assert ref.pop(i) == v
        m = int(torch.randint(0, 40, (1,), generator=g))
        ids = torch.arange(nxt, nxt + m)
        q.add({"id": ids, "v": ids.double().unsqueeze(1).repeat(1, 3)})
        ref.update({i: float(i) for i in ids.tolist()})
        nxt += m
        assert sorted(q.get("id").tolist()) == sorted(ref)
        assert torch.equal(q.get("v")[:, 0], q.get("id").double())


def test_demoted_domains_come_back_with_their_light_fields_and_the_templates_others():
    """A store holding at most 6 whole entries demotes the ones with the largest ``low``: taken
    back, they carry their own light fields (their slopes within half a uint8 step, their interval
    ends widened to float32), the first entry's other fields and ``restored``; whole entries come
    back exactly."""
    from relax.bab.activation_split import _DomainStore

    g = torch.Generator().manual_seed(5)

    def entries(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        m = ids.numel()
        ends = ids.double().unsqueeze(1) / 3 + torch.tensor([-math.inf, 0.1, 1e-30])
        return {"low": ids.double(), "s:x": (ids % 100).to(torch.int8).unsqueeze(1).repeat(1, 4),
                "a:r": torch.rand(m, 2, 4, generator=g), "b:x": ids.float().view(m, 1, 1).repeat(1, 2, 4) + 0.5,
                "l:y": ends, "h:y": ends + 1e-9}

    first = entries(torch.arange(1))
    q = _DomainStore(first, light=["low", "s:x", "a:r", "l:y", "h:y"], full_max=6, light_ratio=0.2, fractions=["a:r"],
                     lower_ends=["l:y"], upper_ends=["h:y"])
    slopes = {0: first["a:r"][0]}
    nxt, restored = 1, 0
    for _ in range(60):
        if q.n and int(torch.randint(0, 2, (1,), generator=g)):
            got = q.take(torch.randperm(q.n, generator=g)[: int(torch.randint(1, q.n + 1, (1,), generator=g))])
            for j, i in enumerate(got["low"].long().tolist()):
                assert (got["s:x"][j] == i % 100).all()
                a = slopes.pop(i)
                want = entries(torch.tensor([i]))
                if got["restored"][j]:  # interval ends widened to float32, never narrowed
                    restored += 1
                    assert got["l:y"].dtype == torch.float64 and (got["l:y"][j] <= want["l:y"][0]).all()
                    fin = torch.isfinite(want["h:y"][0])
                    assert (got["h:y"][j] >= want["h:y"][0]).all() and (got["h:y"][j] - want["h:y"][0])[fin].max() <= 1e-6 * (1 + i)
                    assert (got["a:r"][j] - a).abs().max() <= 0.5 / 255 + 1e-7
                    assert torch.equal(got["b:x"][j], first["b:x"][0])
                else:
                    assert torch.equal(got["a:r"][j], a) and float(got["b:x"][j, 0, 0]) == i + 0.5
                    assert torch.equal(got["l:y"][j], want["l:y"][0]) and torch.equal(got["h:y"][j], want["h:y"][0])
        m = int(torch.randint(1, 5, (1,), generator=g))
        new = entries(torch.arange(nxt, nxt + m))
        slopes.update({i: new["a:r"][j] for j, i in enumerate(range(nxt, nxt + m))})
        q.add(new)
        nxt += m
        assert q.full.n <= 6 and q.n == len(slopes)
        assert abs(q.load - (q.full.n + 0.2 * (q.n - q.full.n))) < 1e-9
        assert sorted(q.get("low").long().tolist()) == sorted(slopes)
    assert q.demotions > 0 and restored > 0


def _node_values(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict:
    """Every fx node's value on ``x`` (the bound graph's nodes carry the fx names)."""
    vals = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            vals[n.name] = super().run_node(n)
            return vals[n.name]

    with torch.no_grad():
        _Recorder(gm).run(x)
    return vals


@pytest.mark.parametrize("kind", ["mlp", "residual"])
def test_graph_root_refinement_contains_every_sample(kind):
    """MILP refinement of the root boxes on the graph (dense view for the MILPs, alpha-CROWN on
    the graph in between), on an MLP and on a ResNet-style MLP whose dense view carries skip values
    beside the ReLU inputs: the refined boxes of every ReLU input lie inside the old ones, contain
    the pre-activations of sampled inputs, and are tighter somewhere."""
    from relax.bab import RowSpec
    from relax.bab.activation_split import relu_inputs
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from relax.bab.tighten import refine_graph_root
    import time

    torch.manual_seed(5 if kind == "mlp" else 3)
    net = (nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)) if kind == "mlp" else _DeepResidual()).eval().double()
    n_in = 5 if kind == "mlp" else 6
    gm = torch.fx.symbolic_trace(net)
    ball = LpBall(torch.full((1, n_in), 0.5, dtype=torch.float64), 0.4, math.inf, 0.0, 1.0)
    graph, xs = prepare(gm, ball, torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 0]))
    root = crown(graph, xs, None).intermediate
    far = time.perf_counter() + 60
    got = refine_graph_root(graph, gm, xs, rs, root, None, layers=3, deadline=far, alpha_deadline=far, margin=1e9)
    assert got is not None
    boxes, _, _, stats = got
    assert stats["lps"] > 0
    vals = _node_values(gm, 0.1 + 0.8 * torch.rand(20000, n_in, dtype=torch.float64))
    tighter = False
    for _, p in relu_inputs(graph):
        (l0, h0), (l1, h1) = root[p], boxes[p]
        z = vals[p]
        assert (l1 >= l0).all() and (h1 <= h0).all()
        assert (z >= l1 - 1e-9).all() and (z <= h1 + 1e-9).all()
        tighter |= bool((l1 > l0 + 1e-6).any() or (h1 < h0 - 1e-6).any())
    assert tighter


@pytest.mark.parametrize("seed", [0, 3])
def test_deep_mlp_with_graph_refinement_decided_against_exact_milp(seed):
    """The graph search with MILP-refined root boxes (at once: ``refine_after=0``) decides deep
    MLPs as the exact MILP says."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    _spread(net[0], 16.0)
    certs = _check(net, net, 5, seed, {"split": "relu", "refine_layers": 2, "refine_after": 0.0})
    assert certs[0].details["stage"] == "graph-alpha-crown" or "refine" in certs[0].details  # proved at the root, or refined


def test_pruned_graph_is_the_same_function_on_the_root_box():
    """Dead ReLUs removed (rows before, columns after): same outputs on the box, same CROWN
    bounds, fewer neurons."""
    from relax.bounds import prepare
    from relax.ir.prune import dead_relus, prune_boxes, prune_graph
    from relax.bounds.crown import crown

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval().double()
    with torch.no_grad():
        net[0].bias.sub_(0.6)  # many neurons dead on the box
    ball = LpBall(torch.full((1, 4), 0.5, dtype=torch.float64), 0.1, math.inf, 0.0, 1.0)
    graph, xs = prepare(torch.fx.symbolic_trace(net), ball, torch.float64)
    boxes = crown(graph, xs, None).intermediate
    keep = dead_relus(graph, boxes)
    assert keep and sum(int((~k).sum()) for k in keep.values()) > 0
    small = prune_graph(graph, keep)
    x = 0.4 + 0.2 * torch.rand(5000, 4, dtype=torch.float64)
    assert torch.allclose(small.forward(x), graph.forward(x), atol=1e-12)
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    full = crown(graph, xs, C, intermediate=boxes).lower
    pruned = crown(small, xs, C, intermediate=prune_boxes(graph, keep, boxes)).lower
    assert torch.allclose(full, pruned, atol=1e-9)


def test_cnn_split_domains_bound_below_samples_and_pgd_points():
    """A small convolutional ReLU net, ReLU-sign splits on random unstable neurons of every
    layer, slopes and multipliers optimised on the float32 graph: every domain's float64 bound
    lies below the rows at 10,000 sampled inputs and at PGD minimisers of the rows that obey the
    domain's splits."""
    from relax.bab.activation_split import bound_domains, relu_inputs
    from relax.ir.graph import get_graph

    torch.manual_seed(13)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval().double()
    x0 = torch.full((1, 1, 7, 7), 0.5, dtype=torch.float64)
    gm = torch.fx.symbolic_trace(net)
    graph, xs, C, rs, root = _root(gm, x0, 0.1)  # small radius: tight bounds, so a wrong one shows
    relus = relu_inputs(graph)
    D = 6
    g = torch.Generator().manual_seed(1)
    splits = {}
    for _, p in relus:
        l, h = (b.reshape(-1) for b in root[p])
        unstable = ((l < 0) & (h > 0)).nonzero().flatten()
        s = torch.zeros(D, l.numel(), dtype=torch.int8)
        for dom in range(D):
            pick = unstable[torch.randperm(unstable.numel(), generator=g)[:1]]
            s[dom, pick] = (torch.randint(0, 2, (pick.numel(),), generator=g) * 2 - 1).to(torch.int8)
        splits[p] = s
    db = bound_domains(graph, xs, rs, root, splits, steps=40, fast=get_graph(gm, (1, 7, 7), torch.float32))
    # points: uniform samples, then PGD on each row from random starts
    x = 0.4 + 0.2 * torch.rand(10000, 1, 7, 7, dtype=torch.float64)
    pgd = (0.4 + 0.2 * torch.rand(400, 1, 7, 7, dtype=torch.float64)).requires_grad_(True)
    for _ in range(30):
        (grad,) = torch.autograd.grad((net(pgd) @ C.T).sum(), pgd)
        with torch.no_grad():
            pgd = (pgd - 0.007 * grad.sign()).clamp(0.4, 0.6).requires_grad_(True)
    x = torch.cat([x, pgd.detach()])
    pre, h = [], x
    with torch.no_grad():
        for layer in net:
            h = layer(h)
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer is not net[-1]:
                pre.append(h.reshape(x.shape[0], -1))
        vals = h @ C.T
    checked = 0
    pres = {p: z for (_, p), z in zip(relus, pre)}
    for dom in range(D):
        inside = _obeys(splits, pres, dom, x.shape[0])
        if bool(db.infeasible[dom]):
            assert not bool(inside.any())
        elif bool(inside.any()):
            assert (vals[inside] >= db.rows[dom] - 1e-9).all()
            checked += 1
    assert checked >= 3


def test_filtered_smart_branching_takes_the_candidate_with_the_best_worse_child():
    """The FSB choice's worse child bounds at least as high as the BaBSR choice's (both
    children bounded the same way, independently of the function under test)."""
    from relax.bab.activation_split import _branch, _filtered_smart_branch, bound_domains, relu_inputs

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval().double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs, C, rs, root = _root(net, x0, 0.2)
    splits = {p: torch.zeros(1, math.prod(graph.shape(p)), dtype=torch.int8) for _, p in relu_inputs(graph)}
    db = bound_domains(graph, xs, rs, root, splits, steps=0, recompute=False)
    plain = _branch(graph, db, splits, rs)
    fsb = _filtered_smart_branch(graph, xs, rs, db, splits, plain, torch.zeros(1, dtype=torch.long), 6, math.inf)
    assert fsb[0][0] is not None

    def worse_child(node: str, i: int) -> float:
        kids = {p: s.repeat(2, 1) for p, s in splits.items()}
        kids[node][0, i], kids[node][1, i] = 1, -1
        b = bound_domains(graph, xs, rs, db.boxes, kids, alphas0={r: a.repeat(2, 1, 1) for r, a in db.alphas.items()},
                          betas0={p: v.repeat(2, 1, 1) for p, v in db.betas.items()}, steps=0, recompute=False)
        m = torch.where(b.infeasible, torch.full((2,), math.inf, dtype=torch.float64), rs.margin(b.rows).double())
        return float(m.min())

    assert worse_child(fsb[0][0], int(fsb[1][0])) >= worse_child(plain[0][0], int(plain[1][0])) - 1e-9


@pytest.mark.parametrize("seed", range(2))
def test_mlp_decided_against_exact_milp_with_babsr_alone(seed):
    """``branch_candidates=1`` (no filtered smart branching) decides the same balls."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    _spread(net[0], 16.0)
    _check(net, net, 6, seed, {"split": "relu", "branch_candidates": 1})


class _TanhBeside(nn.Module):
    """A ReLU and a tanh read the same pre-activation; a sigmoid reads a node no ReLU reads."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l2b, self.l3 = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l1(x)
        z = self.l2(torch.relu(h)) + self.l2b(torch.tanh(h))
        return self.l3(torch.sigmoid(z))


@pytest.mark.parametrize("rigorous", [False, True])
def test_children_bounded_with_their_parents_relaxations_bit_for_bit(rigorous):
    """Smart branching's trials bound ``2 k`` children of a domain: the relaxations of nodes the
    splits leave alone, built once per parent and repeated, give the very bounds of relaxing each
    child; a node that reads a split pre-activation (the tanh beside the ReLU) is relaxed per
    child (sharing it as well changes the bounds: the test sees the difference)."""
    from relax.bab.activation_split import ParentBoxes, bound_domains, relu_inputs, shared_relaxations

    torch.manual_seed(5)
    net = _TanhBeside().eval().double()
    graph, xs, C, rs, root = _root(net, torch.full((1, 6), 0.5, dtype=torch.float64), 0.3)
    (_, h), = relu_inputs(graph)
    parents = {h: torch.zeros(2, math.prod(graph.shape(h)), dtype=torch.int8)}
    l, u = (b.reshape(-1) for b in root[h])
    unstable = ((l < 0) & (u > 0)).nonzero().flatten().tolist()
    assert len(unstable) >= 4
    parents[h][1, unstable.pop(0)] = -1
    db = bound_domains(graph, xs, rs, root, parents, steps=0)  # boxes recomputed within the splits: the parents' differ
    (z_lo, _), = [db.boxes[n.inputs[0]] for n in graph.nodes if type(n.op).__name__ == "Sigmoid"]
    assert not torch.equal(z_lo[0], z_lo[1])
    rep = torch.tensor([0, 0, 1, 1, 0, 1])
    kids = {h: parents[h][rep].clone()}
    for c, i in enumerate([unstable[0], unstable[0], unstable[1], unstable[1], unstable[2], unstable[2]]):
        kids[h][c, i] = 1 if c % 2 == 0 else -1
    boxes = {p: (lo[rep], hi[rep]) for p, (lo, hi) in db.boxes.items()}
    start = dict(alphas0={r: a[rep] for r, a in db.alphas.items()}, betas0={p: b[rep] for p, b in db.betas.items()})

    def rows(parents):
        return bound_domains(graph, xs, rs, boxes, kids, steps=0, recompute=False, rigorous=rigorous, parents=parents, **start).rows

    shared = shared_relaxations(graph, db.boxes, rep, kids)
    kinds = {type(graph.by_name[n].op).__name__ for n in shared}
    assert kinds == {"Sigmoid"}, kinds
    assert torch.equal(rows(ParentBoxes(db.boxes, rep, frozenset(kids))), rows(None))
    wrong = shared_relaxations(graph, db.boxes, rep, ())
    assert {type(graph.by_name[n].op).__name__ for n in wrong} >= {"Tanh", "ReLU"}
    assert not torch.equal(rows(ParentBoxes(db.boxes, rep, frozenset())), rows(None))


def test_search_rounds_on_the_root_boxes_share_relaxations_bit_for_bit(monkeypatch):
    """Rounds that keep the parents' boxes (large networks: no recomputation after the first round) bound their children
    with the parents' relaxations of the nodes no split touches: every such round's bounds (after
    the slopes' and multipliers' ascent on float32 and the last float64 pass) equal relaxing each
    child, and so do the smart-branching trials'."""
    import time

    import relax.bab.activation_split as act

    torch.manual_seed(5)
    net = _TanhBeside().eval().double()
    graph, xs, C, rs, root = _root(net, torch.full((1, 6), 0.5, dtype=torch.float64), 0.3)
    real = act.bound_domains
    checked = {"round": 0, "trial": 0}

    def both(*args, parents=None, **kw):
        early = kw["deadline"] - time.perf_counter() > 2.0  # no step of either is cut by the deadline
        got = real(*args, parents=parents, **kw)
        if parents is not None and early:
            assert torch.equal(got.rows, real(*args, **kw).rows)
            checked["trial" if kw.get("rigorous") is False else "round"] += 1
        return got

    monkeypatch.setattr(act, "bound_domains", both)
    monkeypatch.setattr(act, "RECOMPUTE_ROUND_SHARE", 1e-9)  # the first round recomputes the boxes (the domains' differ), no later one
    res = act.graph_relu_bab(graph, xs, rs, root, timeout=6.0, margin=1e9, candidates=2)
    assert res.status == "unknown"
    assert checked["round"] >= 3 and checked["trial"] >= 3, checked


def test_filtered_smart_branching_in_chunks_chooses_as_in_one_pass(monkeypatch):
    import relax.bab.activation_split as bg

    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval().double()
    graph, xs, C, rs, root = _root(net, torch.full((1, 6), 0.5, dtype=torch.float64), 0.2)
    first = bg.relu_inputs(graph)[0][1]
    D = 4
    splits = {p: torch.zeros(D, math.prod(graph.shape(p)), dtype=torch.int8) for _, p in bg.relu_inputs(graph)}
    splits[first][:, 0] = torch.tensor([1, -1, 1, -1], dtype=torch.int8)
    splits[first][:, 1] = torch.tensor([1, 1, -1, -1], dtype=torch.int8)
    db = bg.bound_domains(graph, xs, rs, root, splits, steps=0, recompute=False)
    plain = bg._branch(graph, db, splits, rs)
    whole = bg._filtered_smart_branch(graph, xs, rs, db, splits, plain, torch.arange(D), 3, math.inf)
    monkeypatch.setattr(bg, "FSB_CHILDREN_PER_PASS", 6)  # one domain a pass
    chunked = bg._filtered_smart_branch(graph, xs, rs, db, splits, plain, torch.arange(D), 3, math.inf)
    assert whole[0] == chunked[0] and torch.equal(whole[1], chunked[1])


def _queue_case() -> tuple[nn.Module, torch.Tensor, int, float]:
    """A 6-24-24-3 ReLU net spread over several classes, a centre and its exact MILP distance
    ``d*`` (l_inf): a search of about 900 domains at 0.95 d*, for the queue's memory tests."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    _spread(net[0], 16.0)
    torch.manual_seed(100)
    for _ in range(20):
        x0 = torch.rand(1, 6)
        label = int(net(x0).argmax())
        d = _exact_distance(net, x0, label)
        if d is not None:
            return net, x0, label, d
    raise AssertionError("no centre with a counterexample in [0, 1]^6")


def test_queue_near_its_memory_cap_goes_depth_first(monkeypatch):
    """With the domain queue capped far below what best-first search holds, the search splits
    the domains closest to proved first and still decides (0.95 d* certified, 1.05 d* not, d*
    the exact MILP distance), holding fewer domains than best-first; without the fallback the
    same cap ends the search as unknown ("memory")."""
    import relax.bab.activation_split as search

    net, x0, label, d = _queue_case()

    def run(f: float, mb: float):
        return certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                       method_options={"split": "relu", "queue_memory_mb": mb, "branch_candidates": 1})[0]

    free = run(0.95, 1500.0)
    assert free.status == "certified" and free.details["domains"] > 100, free.details
    capped = run(0.95, 0.05)
    assert capped.status == "certified", capped.details
    assert capped.details["queue_peak"] < free.details["queue_peak"]
    assert run(1.05, 0.05).status != "certified"
    monkeypatch.setattr(search, "FULL_QUEUE", math.inf)  # best-first to the cap
    monkeypatch.setattr(search, "FULL_ENTRY_SHARE", 1.0)  # every domain with all its fields
    stuck = run(0.95, 0.05)
    assert stuck.status == "unknown" and stuck.details["reason"] == "memory"


def test_queue_past_its_full_share_keeps_splits_only_and_still_decides(monkeypatch):
    """Best-first to a memory cap that domains with their slopes, multipliers and boxes outgrow:
    with every domain kept whole the search stops ("memory"); with the domains closest to proved
    demoted to their splits, uint8 slopes and bounds, the same cap holds the queue, and the search
    decides alike against the exact MILP distance d* (0.95 d* certified, 1.05 d* not)."""
    import relax.bab.activation_split as search

    net, x0, label, d = _queue_case()

    def run(f: float):
        return certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                       method_options={"split": "relu", "queue_memory_mb": 0.1, "branch_candidates": 1})[0]

    monkeypatch.setattr(search, "FULL_QUEUE", math.inf)  # no depth-first fallback
    monkeypatch.setattr(search, "FULL_ENTRY_SHARE", 1.0)
    whole = run(0.95)
    assert whole.status == "unknown" and whole.details["reason"] == "memory", whole.details
    monkeypatch.setattr(search, "FULL_ENTRY_SHARE", 0.5)
    tiered = run(0.95)
    assert tiered.status == "certified" and tiered.details["demoted"] > 0, tiered.details
    assert tiered.details["queue_peak"] > whole.details["queue_peak"]
    assert run(1.05).status != "certified"


def test_boxes_kept_per_domain_contain_every_sample_of_the_domain(monkeypatch):
    """The search hands each domain's pre-activation boxes (float32, rounded outwards) to its
    children and recomputes only after the newest split: every box a round starts from and every
    box it ends with contains the pre-activations of the sampled inputs that obey the domain's
    splits (residual net, float64 graph, a margin no domain reaches so that the search keeps
    splitting)."""
    import relax.bab.activation_split as search

    torch.manual_seed(7)
    r = _Residual(4, 8, 3).eval().double()
    x0 = torch.full((1, 4), 0.5, dtype=torch.float64)
    graph, xs, C, rs, root = _root(r, x0, 0.3)
    seen = []
    bound = search.bound_domains

    def spy(graph, inputs, rs, start, splits, **kw):
        db = bound(graph, inputs, rs, start, splits, **kw)
        seen.append(({p: s.clone() for p, s in splits.items()}, dict(start), db.boxes))
        return db

    monkeypatch.setattr(search, "bound_domains", spy)
    res = search.graph_relu_bab(graph, xs, rs, root, timeout=5.0, margin=1e9, candidates=1)
    assert res.status == "unknown" and res.domains > 20 and len(seen) > 5
    x = 0.2 + 0.6 * torch.rand(20000, 4, dtype=torch.float64)
    pre_a = r.a(x)
    pre_b = r.b(torch.relu(pre_a))
    relus = [p for _, p in search.relu_inputs(graph)]
    pres = dict(zip(relus, [pre_a, pre_b]))
    checked = 0
    for splits, start, boxes in seen:
        D = next(iter(splits.values())).shape[0]
        for dom in range(D):
            inside = _obeys(splits, pres, dom, x.shape[0])
            for p in relus:
                z = pres[p][inside]
                for lo, hi in (start[p], boxes[p]):
                    lo, hi = lo[min(dom, lo.shape[0] - 1)].reshape(-1), hi[min(dom, hi.shape[0] - 1)].reshape(-1)
                    assert (z >= lo - 1e-12).all() and (z <= hi + 1e-12).all()
            checked += int(inside.sum())
    assert checked > 1000


def test_input_split_queue_near_its_memory_cap_goes_depth_first(monkeypatch):
    """Input splitting on a 2-input net: with the queue capped below what best-first search
    holds, the boxes closest to proved go first and ``y_0 - y_1 >= m`` is still proved (``m``
    just below the minimum on a fine grid), while the same cap ends best-first search as
    unknown ("memory"); ``m`` above that minimum is never proved."""
    from verify.spec import Box, Linear
    import relax.bab.input_split as search

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                        nn.Linear(48, 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(4.0)
        g = torch.linspace(-1, 1, 801)
        v = net(torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)) @ torch.tensor([1.0, -1.0])
    box, C = Box(-torch.ones(1, 2), torch.ones(1, 2)), torch.tensor([[1.0, -1.0]])

    def run(shift: float, mb: float):
        d = torch.tensor([-float(v.min()) + shift * float(v.max() - v.min())])
        return certify(net, box, Linear(C, d), "bab", timeout=30, method_options={"queue_memory_mb": mb})[0]

    free = run(0.002, 1500.0)
    capped = run(0.002, 0.05)
    assert free.status == capped.status == "certified", (free.details, capped.details)
    assert capped.details["stage"] == "graph-bab-input" and capped.details["queue_peak"] < free.details["queue_peak"]
    assert run(-0.002, 0.05).status == "falsified"
    monkeypatch.setattr(search, "FULL_QUEUE", math.inf)  # best-first to the cap
    stuck = run(0.002, 0.05)
    assert stuck.status == "unknown" and stuck.details["reason"] == "memory"


def _far_class_net(seed: int) -> tuple[nn.Module, torch.Tensor, int]:
    """A 6-12-12-3 ReLU MLP whose class 1 is 1e3 below the others (the root proves that row),
    a clean input and its label."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    _spread(net[0], 16.0)
    with torch.no_grad():
        net[4].bias[1] -= 1e3
    x0 = torch.rand(1, 6)
    return net, x0, int(net(x0).argmax())


def _searched_rows(monkeypatch) -> list[int]:
    """The number of rows each activation search (:func:`graph_relu_bab`) is handed, as it runs."""
    import relax.bab.activation_split as act

    seen: list[int] = []
    real = act.graph_relu_bab

    def spy(graph, inputs, rs, *a, **k):
        seen.append(rs.C.shape[0])
        return real(graph, inputs, rs, *a, **k)

    monkeypatch.setattr(act, "graph_relu_bab", spy)
    return seen


def test_groups_proved_at_the_root_leave_the_search(monkeypatch):
    """A class that never wins (bias -1e3): its row is proved at the root and the ReLU-split search
    bounds only the other row; the answers still match the exact MILP distance (0.97 / 1.03 d*)."""
    seen = _searched_rows(monkeypatch)
    for seed in range(4):
        net, x0, label = _far_class_net(seed)
        d = _exact_distance(net, x0, label)
        assert d is not None and label != 1
        for f in (0.97, 1.03):
            c = certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                        method_options={"split": "relu"})[0]
            assert c.status == ("certified" if f < 1 else "falsified"), (seed, f, c.status, c.details.get("reason"))
            if c.status == "certified":
                assert 0 < c.details["margin_lower"] < 1e2  # the margin includes the proved row's floor (about 1e3) as a min
    assert seen and set(seen) == {1}, seen  # the row against class 1 never reached the search


def test_root_slopes_shared_by_all_rows_survive_dropping_proved_groups(monkeypatch):
    """alpha-CROWN's memory cap gives the spec rows one shared set of slopes (``[1, ...]``); when
    the root proves a group that is not the last, the search keeps the shared set as it is
    (it crashed indexing it by the kept rows: ml4acopf 300-bus prop4)."""
    import relax.bounds.alpha as alpha_mod

    real = alpha_mod.alpha_crown

    def capped(*a, **k):
        k["max_elements"] = 1  # every start's slopes over the cap: one shared set
        return real(*a, **k)

    monkeypatch.setattr(alpha_mod, "alpha_crown", capped)
    hit = 0
    for seed in range(6):
        net, x0, label = _far_class_net(seed)
        if label != 0:  # the proved row (against class 1) must come before an open one
            continue
        hit += 1
        d = _exact_distance(net, x0, label)
        for f in (0.97, 1.03):
            c = certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                        method_options={"split": "relu"})[0]
            assert c.status == ("certified" if f < 1 else "falsified"), (seed, f, c.status, c.details.get("reason"))
    assert hit > 0


def test_one_relu_layer_is_recognised():
    from relax.bounds import prepare
    from relax.methods.bab import _one_relu_layer

    x = LpBall(torch.zeros(1, 1, 6, 6), 0.1, math.inf, -1.0, 1.0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)).eval()
    two = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    sig = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Sigmoid(), nn.Linear(8, 3)).eval()
    both = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    got = [_one_relu_layer(prepare(m, x, torch.float64)[0]) for m in (conv, two, sig, both)]
    assert got == [True, False, False, False]


def _one_layer_case(seed: int):
    """A spread 6-24-3 ReLU net, a centre, its label and the exact l_inf distance d* to another class."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    _spread(net[0], 16.0)
    x0 = torch.rand(1, 6)
    label = int(net(x0).argmax())
    d = _exact_distance(net, x0, label)
    assert d is not None
    return net, x0, label, d


@pytest.mark.parametrize("seed", range(3))
def test_one_layer_nets_decided_by_the_exact_milp_stage(seed):
    """One ReLU layer: after ``milp_after`` of the search the exact MILP takes over; against the
    exact MILP distance d*: certified at 0.97 d*, and at 1.03 d*, with no attack before the search,
    falsified by the MILP's own counterexample (confirmed by a forward pass)."""
    net, x0, label, d = _one_layer_case(seed)
    opts = {"split": "relu", "milp_after": 0.0, "random_samples": 0, "attack_restarts": 0}  # no attack at all
    for f in (0.97, 1.03):
        c = certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                    method_options=opts)[0]
        assert c.status == ("certified" if f < 1 else "falsified"), (seed, f, c.status, c.details)
        if c.status == "falsified":
            x = torch.as_tensor(c.counterexample).reshape(1, 6).float()
            assert (x - x0).abs().max() <= d * f + 1e-6 and int(net(x).argmax()) != label
        assert c.details["stage"] == "graph-milp", c.details["stage"]  # 0.97 d* is beyond alpha-CROWN on these spread nets


def test_exact_milp_stage_skipped_above_its_dense_limit(monkeypatch):
    """A dense view over ``MILP_DENSE_LIMIT`` numbers is not built: branching goes on alone, in
    one search for the whole time (none started and dropped for a MILP that cannot run)."""
    import relax.methods.bab as bab

    calls = []
    real = bab._ActivationSearch.branch
    monkeypatch.setattr(bab._ActivationSearch, "branch", lambda self, *a: calls.append(a[0]) or real(self, *a))
    monkeypatch.setattr(bab, "MILP_DENSE_LIMIT", 24 * 6 - 1)  # the net's first matrix is 24 x 6
    net, x0, label, d = _one_layer_case(0)
    c = certify(net, LpBall(x0, d * 0.97, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                method_options={"split": "relu", "milp_after": 0.5})[0]
    assert c.status == "certified" and c.details["stage"] == "graph-bab", (c.status, c.details["stage"])
    assert c.details["milp"].startswith("not run: a dense matrix of 144 numbers"), c.details["milp"]
    assert len(calls) == 1, calls


def test_inputs_pinned_by_the_box_do_not_count_towards_input_splitting():
    """A box on 40 inputs that leaves 3 free (the others pinned, each rounded outward by a few
    ulps as a VNN-LIB file's would be): ``split=auto`` splits the 3 free inputs, and proves a
    margin just below the minimum on a grid as the ReLU search does; with 20 free it splits ReLUs."""
    from relax.methods.bab import free_inputs
    from verify.spec import Box, Linear

    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 2)).eval()
    x0 = torch.rand(1, 40)
    lo, hi = x0.clone(), x0.clone()
    lo[0, :3] -= 0.5
    hi[0, :3] += 0.5
    lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
    assert free_inputs(Box(lo, hi)) == 3
    t = torch.linspace(0, 1, 41)
    grid = x0.repeat(41**3, 1)
    grid[:, :3] = lo[0, :3] + torch.cartesian_prod(t, t, t) * (hi[0, :3] - lo[0, :3])
    with torch.no_grad():
        y0 = net(x0)[0]
        k = int(y0.argmax())
        gap = net(grid) @ torch.tensor([1.0, -1.0] if k == 0 else [-1.0, 1.0])
    C = torch.zeros(1, 2)
    C[0, k], C[0, 1 - k] = 1.0, -1.0
    spec = Linear(C, torch.tensor([-float(gap.min()) + 0.02 * float(gap.max() - gap.min())]))  # holds just below the grid's minimum
    by_input = certify(net, Box(lo, hi), spec, "bab", timeout=30)[0]
    by_relu = certify(net, Box(lo, hi), spec, "bab", timeout=30, method_options={"split": "relu"})[0]
    assert by_input.details["stage"] == "graph-bab-input" and by_relu.details["stage"] != "graph-bab-input"
    assert by_input.status == by_relu.status == "certified"
    wide_lo, wide_hi = lo.clone(), hi.clone()
    wide_lo[0, :20], wide_hi[0, :20] = x0[0, :20] - 0.01, x0[0, :20] + 0.01
    assert free_inputs(Box(wide_lo, wide_hi)) == 20
    assert certify(net, Box(wide_lo, wide_hi), spec, "bab", timeout=30)[0].details["stage"] != "graph-bab-input"


def _many_class_case(seed: int, classes: int = 6):
    """A 6-16-16-``classes`` ReLU MLP spread over several classes, a centre with an adversarial
    example in [0, 1]^6, its label and the exact l_inf distance ``d*`` (MILP)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes)).eval()
    _spread(net[0], 16.0)
    for _ in range(20):
        x0 = torch.rand(1, 6)
        label = int(net(x0).argmax())
        d = _exact_distance(net, x0, label)
        if d is not None:
            return net, x0, label, d
    raise AssertionError("no centre with an adversarial example")


@pytest.mark.parametrize("seed", range(3))
def test_each_group_and_joint_search_decide_alike_against_exact_milp(seed):
    """A classifier's robustness is an OR of one group per other class: one search per open group
    (``groups="each"``, the default) and one joint search both certify 0.95 d* and never 1.05 d*."""
    net, x0, label, d = _many_class_case(seed)
    for groups in ("each", "joint"):
        for f in (0.95, 1.05):
            c = certify(net, LpBall(x0, d * f, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=60,
                        method_options={"split": "relu", "groups": groups})[0]
            if f > 1:
                assert c.status != "certified", (seed, groups)
            else:
                assert c.status == "certified", (seed, groups, c.status, c.details.get("reason"))


def _two_blocks(seed: int) -> nn.Sequential:
    """A 6-24-24-3 ReLU MLP made of two independent nets on the two halves of the input
    (block-diagonal weights): ``y = (0, f(x[:3]), g(x[3:]))``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        for layer, (r, c) in ((net[0], (12, 3)), (net[2], (12, 12))):
            layer.weight[:r, c:] = 0.0
            layer.weight[r:, :c] = 0.0
            layer.weight[r:, c:] = layer.weight[:r, :c]  # g = f: both groups as hard at a symmetric centre
            layer.bias[r:] = layer.bias[:r]
        _spread(net[0], 8.0)
        net[4].weight[0] = 0.0
        net[4].bias[0] = 0.0
        net[4].weight[1, 12:] = 0.0
        net[4].weight[2, :12] = net[4].weight[1, :12]
        net[4].weight[2, 12:] = 0.0
        net[4].weight[2] = net[4].weight[2].roll(12)
        net[4].weight.mul_(20.0)
    return net


def test_groups_needing_different_splits_take_fewer_domains_each_on_its_own():
    """Class 0 against two classes computed by disjoint ReLUs (at a symmetric centre, as close to
    the boundary): a joint domain is proved only when both rows are, so the splits each row
    needs multiply; searching each group on its own adds them. Both searches certify 0.98 d*
    (d* the exact MILP distance), the groupwise one with fewer domains."""
    from relax.exact.milp import minimum_distortion

    for seed in (0, 3, 9, 10):  # nets whose joint search branches (10 to 400 domains)
        net = _two_blocks(seed)
        torch.manual_seed(seed)
        x0 = torch.rand(1, 3).repeat(1, 2)
        with torch.no_grad():  # class 0 wins at x0 by 0.2 against each block
            net[4].bias[1:] -= net(x0)[0, 1:] + 0.2
        vals, res = minimum_distortion(net, x0, Robust(torch.tensor([0])), math.inf, (0.0, 1.0), timeout=60, return_details=True)
        assert res[0].status == "optimal"
        ball = LpBall(x0, 0.98 * float(res[0].lower), math.inf, 0.0, 1.0)
        runs = {g: certify(net, ball, Robust(torch.tensor([0])), "bab", timeout=60,
                           method_options={"split": "relu", "groups": g, "branch_candidates": 1})[0] for g in ("each", "joint")}
        assert all(c.status == "certified" for c in runs.values()), {g: c.status for g, c in runs.items()}
        assert runs["joint"].details["domains"] >= 10, (seed, runs["joint"].details)
        assert runs["each"].details["domains"] < runs["joint"].details["domains"], (seed, runs["each"].details, runs["joint"].details)


def test_groups_not_reached_leave_no_bound_behind(monkeypatch):
    """A group search that stops at its root (no time for a first round) reports its own bound
    only when no group is left unsearched: the others' bounds are not known there, so the
    property's bound is -inf (the caller keeps the root's)."""
    import relax.bab.group_split as gs
    from relax.bab import BabResult

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    graph, xs, C, rs, boxes = _root(net, torch.rand(1, 4), 0.3)
    monkeypatch.setattr(gs.SearchRun, "begin", lambda self, alphas: BabResult("unknown", None, 5.0, 1, reason="timeout"))
    both = gs.groupwise_relu_bab(graph, xs, rs, boxes, timeout=10)
    assert both.status == "unknown" and both.lower == -math.inf
    one, _ = rs.select_groups(torch.tensor([False, True]))
    last = gs.groupwise_relu_bab(graph, xs, one, boxes, timeout=10)
    assert last.status == "unknown" and last.lower == 5.0


class _SizeKeepingPool(nn.Module):
    """A max-pooling of stride 1 and padding 1 keeps its input's size (48 -> 48 entries)."""

    def __init__(self):
        super().__init__()
        self.inp, self.conv, self.out = nn.Linear(6, 48), nn.Conv2d(3, 3, 3, padding=1), nn.Linear(48, 3)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x):
        h = torch.relu(self.inp(x)).view(-1, 3, 4, 4)
        return self.out(self.pool(self.conv(h)).flatten(1))


def test_size_keeping_max_pooling_is_branched_on_as_a_pooling():
    """The branching scores took a nonlinear op whose input and output have as many entries for an
    elementwise one and relaxed the max-pooling's flattened box (a crash, found by the ONNX fuzz
    family). On an l_2 ball the search now splits and proves; 20,000 samples of the ball agree."""
    torch.manual_seed(5)
    net = _SizeKeepingPool().eval()
    x0 = torch.rand(1, 6)
    label = net(x0).argmax(1)
    cert = certify(net, LpBall(x0, 0.4, 2.0), Robust(label), method="bab", timeout=20)[0]
    assert cert.status == "certified" and cert.details["domains"] > 1, cert.details
    d = torch.randn(20_000, 6)
    pts = x0 + 0.4 * d / d.norm(dim=1, keepdim=True) * torch.rand(20_000, 1) ** (1 / 6)
    with torch.no_grad():
        assert (net(pts).argmax(1) == label).all()


@pytest.mark.parametrize("undefined", [-math.inf, math.nan])
def test_open_leaves_with_no_bound_are_never_certified(monkeypatch, undefined):
    """A fully split domain left open whose margin is -inf or NaN (an unbounded or undefined
    bound) keeps the search from "certified": the old end test took a non-finite worst leaf
    for "no leaf left open" (NaN was even dropped by ``min``). Every margin here is forced to
    ``undefined`` and every leaf left open, on a property that is false."""
    import relax.bab.activation_split as act
    from relax.bab import RowSpec
    from relax.bounds import prepare
    from relax.bounds.crown import crown

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double().eval()
    g, xs = prepare(net, LpBall(torch.zeros(1, 2, dtype=torch.float64), 1.0, math.inf), torch.float64)
    rs = RowSpec(torch.ones(1, 1, dtype=torch.float64), torch.tensor([-1e6], dtype=torch.float64), torch.tensor([0]))
    monkeypatch.setattr(RowSpec, "margin", lambda self, rows: torch.full(rows.shape[:-1], undefined, dtype=rows.dtype, device=rows.device))
    monkeypatch.setattr(act._ReluSearch, "settle_leaf",
                        lambda self, sp, dbs, j: ("open", None))
    res = act.graph_relu_bab(g, xs, rs, crown(g, xs, None).intermediate, timeout=10.0, candidates=1)
    assert res.status != "certified", (res.status, res.reason, res.domains)


def _any_output_above(seed: int, f: float):
    """A 6-16-16-4 ReLU MLP, a box of half-width 0.08 in [0, 1]^6 and the property "some output
    exceeds t" (one group of four rows), with ``t`` a share ``f`` away from the least largest
    output of 20,000 samples (``f < 0``: below it, often true)."""
    from verify.spec import Box, Linear

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    _spread(net[0])
    x0 = torch.rand(1, 6)
    lo, hi = (x0 - 0.08).clamp(0, 1), (x0 + 0.08).clamp(0, 1)
    with torch.no_grad():
        m = float(net(lo + (hi - lo) * torch.rand(20000, 6)).max(1).values.min())
    t = m + f * abs(m)
    spec = Linear(torch.eye(4, dtype=torch.float64), torch.full((4,), -t, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    return net, Box(lo, hi), spec


def test_search_on_each_groups_best_rows_agrees_with_exact_milp(monkeypatch):
    """``search_rows`` (rows per group the activation search bounds, the highest at the root):
    with 1 or 2 of a group's 11 rows (four outputs and their averages) the search never
    contradicts the exact MILP, the search is handed only those rows, and with 2 it still proves
    the true cases that need a second row (where a single row leaves domains it cannot prove)."""
    seen = _searched_rows(monkeypatch)
    proved, searched = {1: 0, 2: 0}, 0
    for seed, f in ((0, -0.3), (2, -0.3), (3, -0.05), (3, 0.0)):
        net, box, spec = _any_output_above(seed, f)
        exact = certify(net, box, spec, "milp", timeout=60)[0]
        assert exact.status in ("certified", "falsified")
        for k in (1, 2):
            seen.clear()
            # attacks off: a false property has to be falsified (or left open) by the search on the kept rows
            c = certify(net, box, spec, "bab", timeout=20 if k == 2 else 4,
                        method_options={"split": "relu", "search_rows": k, "random_samples": 0, "attack_restarts": 0})[0]
            assert c.status in (exact.status, "unknown"), (seed, f, k, c.status, exact.status)
            assert set(seen) <= {k}, seen
            if seen:  # the answer says how many of the open rows the search bounded (four outputs, six pairs, one whole)
                assert c.details.get("search_rows") == f"{k} of 11", c.details
            searched += bool(seen)
            proved[k] += c.status == "certified"
            if k == 2 and exact.status == "certified":
                assert c.status == "certified", (seed, f, c.details.get("reason"))
    assert proved[2] == 3 and proved[1] < 3 and searched >= 4


class _DeepResidual(nn.Module):
    """Four ReLU layers with skip connections: deep enough for the root's MILP refinement, whose dense
    view carries the skips across the ReLU layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.o = (nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12),
                                                  nn.Linear(12, 3))

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        h = h + torch.relu(self.c(h))
        return self.o(h + torch.relu(self.d(h)))


@pytest.mark.parametrize("net_kind,refine_layers,view", [("mlp", None, True), ("residual", None, False), ("residual", 3, True),
                                                         ("mlp", None, False)])
def test_one_search_when_the_root_cannot_be_refined(monkeypatch, net_kind, refine_layers, view):
    """A network deep enough for the root's MILP refinement but without a dense ReLU view it may
    refine (a matrix over ``dense_limit``; for "auto" refinement also a ResNet, whose skips the
    view carries but whose MILPs cost more than they gain on cifar10_resnet) gets one search for
    its whole time: no plain branching first whose domains the refinement would throw away. With
    one -- an MLP, or a ResNet with ``refine_layers`` given -- it branches, refines, branches."""
    from relax.methods.bab import _ActivationSearch

    calls = []
    real = _ActivationSearch.branch

    def counted(self, until, boxes, alphas):
        calls.append(until)
        return real(self, until, boxes, alphas)

    monkeypatch.setattr(_ActivationSearch, "branch", counted)
    torch.manual_seed(5)
    net = _DeepResidual() if net_kind == "residual" else nn.Sequential(*[m for w in (6, 12, 12, 12) for m in (nn.Linear(w, 12), nn.ReLU())],
                                                                      nn.Linear(12, 3))
    net = net.eval()
    x0 = torch.rand(1, 6)
    with torch.no_grad():
        label = int(net(x0).argmax())
    # a margin no domain reaches: the search runs to its deadline (the attacks off: nothing to find)
    c = certify(net, LpBall(x0, 0.3, math.inf, 0.0, 1.0), Robust(torch.tensor([label])), "bab", timeout=3,
                method_options={"split": "relu", "margin": 1e6, "random_samples": 0, "attack_restarts": 0, "refine_after": 0.2,
                                "refine_layers": refine_layers, "dense_limit": 2**24 if view or net_kind == "residual" else 100})[0]
    assert c.status == "unknown"
    if not view:
        assert len(calls) == 1 and "plain_bab_first" not in c.details, (calls, c.details)
        assert c.details["refine"] == "not run: no dense ReLU view of the network"
    else:
        assert len(calls) == 2 and "plain_bab_first" in c.details, (calls, c.details)
        assert isinstance(c.details["refine"], dict) and c.details["refine"]["lps"] > 0, c.details["refine"]
