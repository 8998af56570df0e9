"""Deadlines (issue 17): every method answers within ``timeout`` (plus a little), with a sound
anytime answer, and the time a certificate reports covers the whole ``certify()`` call.

Each problem below takes many times its deadline without one (measured on the 2-core test
machine: alpha-CROWN with 500 steps ~12 s, the LP radius search ~7 s, the MILP radius search
~3-18 s, the SDP radius search ~5-13 s, 1000 CROWN bisection steps ~30 s), so these tests fail on
code that does not stop at the deadline. The set-up tests slow the set-up down on purpose.
The smoothing test passes on the old code too (its sampling loop already had a deadline).
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from verify import certify
from verify.deadline import Deadline, DeadlineExpired
from verify.registry import get_method, list_methods
from verify.spec import LpBall, Robust


def _run_timed(run, limit: float):
    """``run()``'s result and seconds; run once more when it took over ``limit`` seconds. A path
    that ignores a deadline is late on every run; a stall of the shared CI machine is not (one
    run of 0.19 s over its 0.6 s budget, the other 1,400 tests on time)."""
    for _ in range(2):
        t0 = time.perf_counter()
        out = run()
        took = time.perf_counter() - t0
        if took <= limit:
            break
    return out, took


#: allowed time past the deadline (the issue's target: 1 s or 5 %)
SLACK = 1.0


@pytest.fixture(autouse=True, scope="module")
def _imported():
    """Import every method family (and cvxpy) first: process start-up, not part of the deadlines."""
    list_methods()
    import cvxpy  # noqa: F401


def _mlp(sizes: list[int], seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def _problem(sizes: list[int], seed: int = 1):
    net = _mlp(sizes)
    torch.manual_seed(seed)
    x = torch.rand(1, sizes[0])
    with torch.no_grad():
        label = net(x).argmax(dim=1)
    return net, x, label


def _no_violation_sampled(net, x: torch.Tensor, label: torch.Tensor, eps: float, n: int = 4000) -> bool:
    """No sampled point of the l_inf ball (in [0, 1]) changes the prediction."""
    if eps <= 0:
        return True
    torch.manual_seed(3)
    pts = (x + eps * (2 * torch.rand(n, x.shape[1]) - 1)).clamp(0, 1)
    corners = (x + eps * torch.sign(torch.randn(n, x.shape[1]))).clamp(0, 1)
    with torch.no_grad():
        return bool((net(torch.cat([pts, corners])).argmax(dim=1) == label).all())


def _timed(net, x, label, method: str, eps: float, timeout: float, **kw):
    """``certify()`` of one input: its certificate and wall time, within ``timeout + SLACK``."""
    t0 = time.perf_counter()
    table = certify(net, x, label, method, eps=eps, timeout=timeout, **kw)
    wall = time.perf_counter() - t0
    assert wall <= timeout + SLACK
    return table[0], wall


def _check_sound(cert, net, x, label) -> None:
    assert cert.status in ("certified", "unknown")
    if cert.status == "certified":
        assert _no_violation_sampled(net, x, label, cert.eps)
    assert _no_violation_sampled(net, x, label, cert.radius)


def test_deadline_object():
    d = Deadline(None)
    assert d.remaining() == math.inf and not d.expired() and d.limit() is None and d.at is None
    assert d.limit(3.0) == 3.0
    d = Deadline(0.2)
    assert 0.0 < d.remaining() <= 0.2 and not d.expired() and d.affords(0.01) and not d.affords(1.0)
    assert d.share(4).remaining() <= 0.05 + 1e-6
    assert abs(Deadline.until(d.at).remaining() - d.remaining()) < 0.01
    e = Deadline(0.0)
    assert e.expired() and e.remaining() == 0.0 and e.limit() == pytest.approx(1e-3)
    with pytest.raises(DeadlineExpired):
        e.check()


def test_alpha_crown_steps_stop_at_deadline():
    net, x, label = _problem([20, 100, 100, 100, 10])
    # 500 steps take ~12 s: only a deadline that cuts them fits _timed's 0.5 s + SLACK (the
    # steps stop when the next one would end past it, so the deadline need not have expired)
    cert, _ = _timed(net, x, label, "alpha-crown", 0.3, 0.5, iterations=500, early_stop=False)
    _check_sound(cert, net, x, label)
    assert cert.details["timeout"] <= 0.5


def test_bisection_stops_at_deadline_with_best_radius():
    net, x, label = _problem([20, 50, 50, 10])
    m = get_method("crown")
    m.bisection_steps = 1_000  # ~30 s without a deadline
    cert, _ = _timed(net, x, label, m, 0.0, 0.5, find_radius=True, max_radius=1.0)
    _check_sound(cert, net, x, label)
    assert cert.radius > 0  # the radius proved before the deadline is kept
    full = get_method("crown").certify(*_loaded(net, x, label, 0.0), find_radius=True, max_radius=1.0)[0]
    assert cert.radius <= full.radius * (1 + 1e-6) + 1e-3  # never more than the bisection proves


def _loaded(net, x, label, eps):
    from verify.model import load_model

    return load_model(net), LpBall(x, eps, math.inf, 0.0, 1.0), Robust(label)


@pytest.mark.parametrize("method, sizes, eps, timeout", [
    ("lp", [20, 100, 100, 100, 10], 0.05, 0.5),
    ("milp", [20, 100, 100, 100, 10], 0.05, 1.0),
    ("sdp", [10, 20, 20, 3], 0.01, 0.5),
])
def test_radius_search_stops_at_deadline(method, sizes, eps, timeout):
    net, x, label = _problem(sizes)
    cert, _ = _timed(net, x, label, method, eps, timeout, find_radius=True)
    _check_sound(cert, net, x, label)


def test_lp_rows_stop_at_deadline_keep_sound_bounds():
    """A deadline that passes during the row LPs: rows not solved stay -inf, never proved."""
    from relax.exact.lp import lp_lower_bounds

    gm, ball, prop = _loaded(*_problem([20, 100, 100, 100, 10]), 0.05)
    spec = prop.linear(1, 10)
    full = lp_lower_bounds(gm, ball, spec).lower
    cut = lp_lower_bounds(gm, ball, spec, deadline=Deadline(0.0)).lower
    assert torch.isinf(cut).all() and (cut <= full).all()
    assert "time_limit" in lp_lower_bounds(gm, ball, spec, deadline=Deadline(0.0)).details[0]["lp_status"]


def test_sdp_skipped_when_setup_exceeds_time_left():
    """An SDP whose set-up alone is estimated above the time left is not started."""
    from relax.exact.sdp import sdp_lower_bounds

    gm, ball, prop = _loaded(*_problem([10, 20, 20, 3]), 0.3)
    res = sdp_lower_bounds(gm, ball, prop.linear(1, 3), deadline=Deadline(1e-4))
    assert torch.isinf(res.lower).all()
    assert "not run" in res.details[0]["reason"]


def test_lipschitz_sdp_rows_stop_at_deadline():
    """LipSDP rows (Clarabel, ~25 s for this net without a deadline) stop at the deadline; the
    answer keeps the global Lipschitz bound where no row was solved (sound either way)."""
    net, x, label = _problem([8, 32, 32, 4], seed=0)
    cert, _ = _timed(net, x, label, "lipschitz-sdp", 0.01, 4.0, solver="clarabel")
    _check_sound(cert, net, x, label)


def test_smoothing_sampling_stops_at_deadline():
    net, x, label = _problem([20, 100, 100, 10])
    cert, _ = _timed(net, x, label, "smoothing-gaussian", 0.0, 0.5, n=10**8, batch_size=1000)
    assert cert.status in ("unknown", "abstain") and cert.radius == 0.0


def _slowed(monkeypatch, owner, name: str, seconds: float) -> None:
    """Make ``owner.name`` (a set-up step, a backward step) take ``seconds`` longer."""
    fn = getattr(owner, name)

    def slow(*a, **k):
        time.sleep(seconds)
        return fn(*a, **k)

    monkeypatch.setattr(owner, name, slow)


def test_bab_reports_its_setup_and_stays_within_deadline(monkeypatch):
    """The set-up (building the bound graph) is part of bab's budget and of its reported time."""
    from relax import bounds

    _slowed(monkeypatch, bounds, "prepare", 0.6)
    net, x, label = _problem([20, 100, 100, 100, 10])
    cert, wall = _timed(net, x, label, "bab", 0.3, 1.0)
    assert cert.status in ("unknown", "falsified", "certified")
    assert cert.time_s >= 0.9 * wall - 0.05  # the whole call, set-up included


def test_time_s_and_timeout_cover_the_whole_call(monkeypatch):
    """Loading the model inside certify() counts in ``time_s`` and in the timeout."""
    import verify.model

    _slowed(monkeypatch, verify.model, "load_model", 0.5)
    net, x, label = _problem([20, 100, 100, 100, 10])
    t0 = time.perf_counter()
    table = certify(net, x.repeat(3, 1), label.repeat(3), "alpha-crown", eps=0.3, timeout=0.8, iterations=500, early_stop=False)
    wall = time.perf_counter() - t0
    assert wall <= 0.8 + SLACK
    assert sum(c.time_s for c in table) >= 0.9 * wall - 0.02


def _pool_cnn(channels: int = 16, seed: int = 0) -> torch.nn.Sequential:
    """28x28 -> conv 3x3 (``channels x 26 x 26`` ReLUs) -> max-pool 4 -> 10 outputs."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, channels, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(channels * 36, 10)).eval()


@pytest.mark.parametrize("method", ["crown", "alpha-crown", "bab", "lp", "milp"])
def test_max_pooling_cnn_answers_on_time(method):
    """A ReLU output feeding a max-pooling: the old engine computed linear bounds for all 10,816
    ReLU outputs (crown and alpha-crown took 10-50 s here). bab, lp and milp are held to the same
    deadline (on the 23,328 ReLUs of VNN-COMP's verivital CNN they expanded a dense basis of
    4 GB first: 10-16 s)."""
    torch.manual_seed(1)
    x = torch.rand(1, 1, 28, 28)
    t0 = time.perf_counter()
    try:
        c = certify(_pool_cnn(), LpBall(x, 0.004, math.inf, 0.0, 1.0), Robust(torch.tensor([0])), method, timeout=2.0)[0]
        assert c.status in ("certified", "falsified", "unknown")
    except Exception as e:  # lp / milp have no max-pooling encoding: a clear error, on time
        assert "max-pooling" in str(e)
    assert time.perf_counter() - t0 < 2.0 + SLACK


def test_relu_output_bounds_come_from_the_interval_rule():
    """The interval box of a ReLU output is at least as tight as linear bounds through its
    relaxation: skipping them keeps every output bound at least as tight (and sound)."""
    from relax.bounds import crown as linear
    from relax.ir.graph import get_graph

    torch.manual_seed(3)
    net = _pool_cnn(channels=2, seed=3)
    gm = torch.fx.symbolic_trace(net)
    g = get_graph(gm, (1, 28, 28), torch.float64)
    inputs = LpBall(torch.rand(2, 1, 28, 28, dtype=torch.float64), 0.02, math.inf, 0.0, 1.0)
    C = torch.eye(10, dtype=torch.float64)[None].expand(2, 10, 10)
    fast = linear.crown(g, inputs, C).lower
    orig = linear._image_of_known
    try:
        linear._image_of_known = lambda *a: False
        slow = linear.crown(g, inputs, C).lower
    finally:
        linear._image_of_known = orig
    assert (fast >= slow - 1e-9).all()
    with torch.no_grad():  # sampled outputs inside the ball respect the bound
        xs = inputs.sample(200) if hasattr(inputs, "sample") else None
    if xs is None:
        lo, hi = inputs.bounds()
        xs = lo + (hi - lo) * torch.rand(200, *lo.shape, dtype=torch.float64)
    with torch.no_grad():
        ys = net.double()(xs.reshape(-1, 1, 28, 28)).reshape(200, 2, 10)
    assert (ys >= fast[None] - 1e-9).all()


def test_one_crown_pass_stops_tightening_at_its_deadline():
    """A single CROWN pass on a large network (the cGAN generators took minutes) stops computing
    linear bounds of intermediate neurons at the deadline: the rest keep their interval boxes,
    so the answer is on time, sound, and looser than the full pass."""
    from relax.bounds import prepare
    from relax.bounds.crown import crown

    torch.manual_seed(0)
    # large enough that the full pass (0.1-0.2 s here) dwarfs the cut pass's fixed costs (~10 ms)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4 * 6 * 6), torch.nn.ReLU(), torch.nn.Unflatten(1, (4, 6, 6)),
                              torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 12 * 12, 3)).double().eval()
    x = torch.rand(1, 8, dtype=torch.float64)
    graph, s = prepare(net, LpBall(x, 0.3, "inf"), torch.float64)
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    t = time.perf_counter()
    full = crown(graph, s, C)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    cut = crown(graph, s, C, deadline=Deadline(t_full / 20))
    t_cut = time.perf_counter() - t
    assert t_cut < t_full / 2, (t_cut, t_full)
    assert (cut.lower <= full.lower + 1e-9).all() and (cut.lower < full.lower - 1e-6).any()
    pts = s.sample(3000, generator=torch.Generator().manual_seed(1))  # [n, 1, 8]
    with torch.no_grad():
        ys = net(pts.reshape(-1, 8))
    assert (ys >= cut.lower - 1e-9).all()


def test_beta_ascent_starts_no_step_it_cannot_finish():
    """ReLU splitting's alpha / beta ascent predicts each step by the last one and keeps the
    caller's exact pass (``reserve_s``) before the deadline: with 0.12 s steps and 0.3 s left it
    stops after the steps that fit, never past the deadline (the old rule, no step started after
    the deadline, ran a third one to 0.36 s)."""
    from relax.bab.activation_split import _ascend

    class SlowLagrangian:
        N, D = 2, 3

        def lower(self, ps, alphas, betas, fixed, record):
            time.sleep(0.12)
            return alphas["r"].sum(-1).t() * 1.0  # [D, N], differentiable in the slopes

    alphas = {"r": torch.full((2, 3, 4), 0.5, requires_grad=True)}
    for reserve, most in ((0.0, 0.3), (0.1, 0.3), (None, 0.3)):
        (best, _, _), took = _run_timed(lambda: _ascend(SlowLagrangian(), None, alphas, {}, {}, {}, steps=50, lr_alpha=0.1, lr_beta=0.1,
                                                    deadline=time.perf_counter() + 0.3, keep_params=True, reserve_s=reserve),
                                    most + 0.04)
        assert best.shape == (3, 2)
        assert took <= most + 0.04, (reserve, took)


def test_bab_exact_milp_stage_counts_the_dense_view_in_its_deadline(monkeypatch):
    """One ReLU layer: the exact-MILP stage gets the time left after its dense view is built (a
    slow build must not push the MILP past the deadline)."""
    import relax.exact.lp as lp

    _slowed(monkeypatch, lp, "relu_net", 1.5)
    net, x, label = _problem([40, 600, 10])  # at eps 0.045 the MILP proves it in about 9 s
    cert, wall = _timed(net, x, label, "bab", 0.045, 3.0, method_options={"milp_after": 0.0})
    assert cert.details["stage"] == "graph-milp", cert.details["stage"]
    _check_sound(cert, net, x, label)


@pytest.mark.parametrize("method", ["lp", "sdp", "milp"])
def test_solver_methods_build_their_dense_view_within_the_deadline(monkeypatch, method):
    """Each layer of the dense view (here 0.4 s) is built only before the deadline: a build the
    deadline cuts answers unknown on time instead of after the whole view."""
    import relax.ir.dense as dense

    _slowed(monkeypatch, dense, "_dense_map", 0.4)
    net, x, label = _problem([6, 8, 8, 8, 8, 8, 3])  # six layers: 2.4 s of building
    cert, wall = _timed(net, x, label, method, 0.01, 0.6)
    assert cert.status == "unknown" and wall < 0.6 + 0.5, (cert.status, wall)


def test_bab_starts_no_smart_branching_trials_it_cannot_finish(monkeypatch):
    """A pass of smart-branching trials does not stop inside; one that would end past the
    deadline at the measured pace is skipped, and the first round needs room for two children
    at the root's pace (ml4acopf's 300-bus nets overran by 3 s of 12: a trial pass of six
    children started 1.4 s before the deadline). Every domain pass is slowed in proportion to its
    domains, as on a large network."""
    import relax.bab.activation_split as act

    real = act.bound_domains
    trials = []

    def slow(graph, inputs, rs, boxes, splits, *a, **k):
        domains = next(iter(splits.values())).shape[0]
        if k.get("rigorous") is False:
            trials.append(domains)
        time.sleep(0.3 * domains)
        return real(graph, inputs, rs, boxes, splits, *a, **k)

    monkeypatch.setattr(act, "bound_domains", slow)
    net, x, label = _problem([20, 100, 100, 10])  # at eps 0.1 about 3,700 domains (1.6 s) unslowed
    cert, wall = _timed(net, x, label, "bab", 0.1, 2.0, method_options={"split": "relu", "attack_restarts": 0, "random_samples": 0})
    assert cert.status in ("unknown", "certified"), cert.status
    assert cert.time_s <= 2.0 + 0.1, (cert.time_s, trials)


def test_bab_does_not_branch_again_after_refinement_without_room_for_a_round(monkeypatch):
    """After the root's MILP refinement, branching starts again (re-bounding the root, then a
    round of two children) only if three root passes of the plain branching still fit; else the
    answer is unknown with the refined bound, on time (ml4acopf 300-bus: 1.1-1.3 s late)."""
    import relax.bab.tighten as tighten
    from relax.bab import BabResult
    from relax.methods.bab import BabOptions, _ActivationSearch

    monkeypatch.setattr(tighten, "refine_graph_root", lambda *a, **k: None)
    calls = []

    class Search:
        graph = x_set = model = None
        rs = type("Rows", (), {"batch": staticmethod(lambda n: (torch.zeros(1, 1), torch.zeros(1)))})()
        opts = BabOptions()

        def branch(self, until, boxes, alphas):
            calls.append(until)
            return BabResult("unknown", None, -0.5, 9, reason="timeout")

    extra = {"plain_bab_first": {"domains": 7, "root_pass_s": 2.0}}
    now = time.perf_counter()
    res = _ActivationSearch.refine_then_branch(Search(), now + 5.0, {}, None, -1.0, 3, dict(extra))
    assert not calls and (res.status, res.reason, res.lower, res.domains) == ("unknown", "timeout", -1.0, 7)
    res = _ActivationSearch.refine_then_branch(Search(), now + 60.0, {}, None, -1.0, 3, dict(extra))
    assert len(calls) == 1 and res.domains == 9


def test_a_spec_row_pass_with_a_hard_deadline_stops_at_it():
    """``crown(stop_at=...)``: a pass that reaches a node after the hard deadline raises (branch-
    and-bound discards such bounds); one with time enough gives the same bounds as without."""
    from relax.bounds import prepare
    from relax.bounds.crown import crown

    net = _mlp([6, 20, 20, 3]).double()
    graph, s = prepare(net, LpBall(torch.rand(1, 6, dtype=torch.float64), 0.1, math.inf), torch.float64)
    C = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    boxes = crown(graph, s, None).intermediate
    with pytest.raises(DeadlineExpired, match="past its deadline"):
        crown(graph, s, C, intermediate=boxes, stop_at=time.perf_counter())
    free = crown(graph, s, C, intermediate=boxes).spec_lower()
    assert torch.equal(crown(graph, s, C, intermediate=boxes, stop_at=time.perf_counter() + 60).spec_lower(), free)


def test_relu_search_abandons_a_root_pass_that_runs_past_its_deadline(monkeypatch):
    """ReLU splitting re-bounds its root domain before it branches; on a large network that pass
    can take longer than the time left (ml4acopf's 300-bus nets: 1.6 s started 1.3 s before the
    deadline). Each backward step slowed to 40 ms (about 0.3 s a pass): with 0.15 s the search
    answers ``unknown`` at the deadline (the old code ran the whole pass and the branching choice
    after it), and with 5 s it runs as before."""
    import relax.bounds.crown as crown_mod
    from relax.bab import RowSpec
    from relax.bab.activation_split import graph_relu_bab
    from relax.bounds import prepare

    net = _mlp([6, 20, 20, 20, 3], seed=2).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs = prepare(net, LpBall(x0, 0.4, math.inf, 0.0, 1.0), torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 1]))
    root = crown_mod.crown(graph, xs, None).intermediate
    _slowed(monkeypatch, crown_mod, "_through", 0.04)
    res, took = _run_timed(lambda: graph_relu_bab(graph, xs, rs, root, timeout=0.15, margin=1e9, candidates=1), 0.15 + 0.06)
    assert (res.status, res.reason) == ("unknown", "timeout")
    assert took <= 0.15 + 0.06, took
    res = graph_relu_bab(graph, xs, rs, root, timeout=5.0, margin=1e9, candidates=1)
    assert res.domains > 1  # the root pass ran and the search branched


def test_a_search_stopped_in_its_first_pass_reports_the_roots_bound(monkeypatch):
    """A ReLU search abandoned in its root pass has no bound of its own (``-inf``): the answer's
    ``margin_lower`` is then the root alpha-CROWN's, a bound on the whole set."""
    import relax.methods.bab as bab_mod
    from relax.bab import BabResult, RowSpec
    from relax.bounds import prepare

    net = _mlp([6, 20, 20, 3], seed=2).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs = prepare(net, LpBall(x0, 0.4, math.inf, 0.0, 1.0), torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 1]))
    monkeypatch.setattr(bab_mod, "_search", lambda *a, **k: BabResult("unknown", None, -math.inf, 0, reason="timeout"))
    opts = bab_mod.BabOptions(split="relu")
    root = bab_mod._root_alpha_crown(graph, xs, rs.with_averages(), opts, 30.0)
    low = float(rs.with_averages().margin((root.lower + rs.with_averages().batch(1)[1])[0]))
    assert low < 0  # the root does not prove it: the search runs
    res = bab_mod._graph_bab(net, graph, xs, xs, rs.with_averages(), opts, 30.0)
    assert (res.status, res.reason) == ("unknown", "timeout")
    assert math.isfinite(res.lower) and abs(res.lower - low) < 1e-6 * (1 + abs(low)), (res.lower, low)


def test_root_alpha_crown_keeps_the_first_passs_boxes_when_passes_are_too_slow(monkeypatch):
    """When fewer than ``ROOT_PASSES_MIN`` passes of the pipeline's first CROWN pass fit the root
    alpha-CROWN's share, it keeps that pass's boxes (no intermediate row is bounded again: a
    large network's second pass would take the budget) and optimises the spec rows only, a
    bound that still holds for every sample; with a fast first pass the boxes are optimised."""
    import relax.bounds.crown as crown_mod
    import relax.methods.bab as bab_mod
    from relax.bab import RowSpec
    from relax.bounds import prepare

    net = _mlp([6, 20, 20, 3], seed=2).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs = prepare(net, LpBall(x0, 0.4, math.inf, 0.0, 1.0), torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 1])).with_averages()
    C, d = rs.batch(1)
    first = crown_mod.crown(graph, xs, C)
    calls = []
    real = crown_mod.bound_node
    monkeypatch.setattr(crown_mod, "bound_node", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    opts = bab_mod.BabOptions(split="relu")
    slow = bab_mod._root_alpha_crown(graph, xs, rs, opts, 30.0, bab_mod.FirstPass(first.intermediate, 30.0))
    assert not calls  # the first pass's boxes, as they were
    assert all(torch.equal(slow.intermediate[p][0], lo) and torch.equal(slow.intermediate[p][1], hi)
               for p, (lo, hi) in first.intermediate.items())
    assert (slow.lower >= first.spec_lower() - 1e-12).all()  # the spec rows' slopes start from CROWN's
    fast = bab_mod._root_alpha_crown(graph, xs, rs, opts, 30.0, bab_mod.FirstPass(first.intermediate, 1e-3))
    assert calls  # the intermediate rows optimised
    g = torch.Generator().manual_seed(0)
    x = (x0 + 0.4 * (2 * torch.rand(20_000, 6, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    rows = net(x) @ C[0].t() + d[0]
    assert (rows >= slow.lower[0]).all() and (rows >= fast.lower[0]).all()


def test_bab_first_crown_pass_may_take_most_of_the_budget(monkeypatch):
    """``bab``'s first CROWN pass tightens boxes until ``FIRST_PASS_SHARE`` (0.7) of the budget: a
    network whose pass takes half of it (here: 3 s of 6, slowed) is proved by that pass (stage
    ``crown``); stopped at a third, the last hidden layer kept its interval box, which does not
    prove it (CROWN's margin 0.012, with that interval box -0.12)."""
    import relax.bounds.crown as crown_mod
    import relax.methods.bab as bab_mod
    from verify.spec import LinearSpec

    net = _mlp([6, 40, 40, 3], seed=1).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    C = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]], dtype=torch.float64)  # label 0
    spec = LinearSpec(C, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0, 1]))
    real = crown_mod.bound_node
    first = []

    def slow(*a, **k):
        if not first:  # the first CROWN pass's one linear-bound node
            first.append(1)
            time.sleep(3.0)
        return real(*a, **k)

    monkeypatch.setattr(crown_mod, "bound_node", slow)
    res = bab_mod.run_bab(net, LpBall(x0, 0.1, math.inf, 0.0, 1.0), spec, bab_mod.BabOptions(), timeout=6.0)
    assert res.status == "certified" and res.details["stage"] == "crown", (res.status, res.details)


@pytest.mark.parametrize("split", ["auto", "relu"])  # input splitting (6 inputs) / the root's alpha-CROWN, then ReLU splits
def test_bab_spec_row_passes_stop_at_the_deadline(monkeypatch, split):
    """The pipeline's first CROWN pass stops tightening boxes at ``FIRST_PASS_SHARE`` of the
    budget, but its spec rows' backward pass used to run to its end after the deadline (vit_2023
    at a 2 s budget: a 0.25 s pass, answers up to 0.54 s late), and so did the root alpha-CROWN's
    and input splitting's. The spec rows' backward steps slowed to 30 ms (a pass of 0.15 s;
    the intermediate rows at full speed): the answer comes within about one step of the
    deadline, and with time enough the pipeline bounds the set as before."""
    import relax.bounds.crown as crown_mod
    import relax.methods.bab as bab_mod
    from verify.spec import LinearSpec

    net = _mlp([6, 20, 20, 20, 3], seed=3).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    C = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]], dtype=torch.float64)
    spec = LinearSpec(C, torch.full((1, 2), 1e3, dtype=torch.float64), torch.tensor([0, 1]))  # holds everywhere
    opts = bab_mod.BabOptions(margin=1e9, random_samples=0, attack_restarts=0, split=split)  # never proved: the budget decides
    real_backward, real_through = crown_mod.backward, crown_mod._through
    in_spec = []

    def spec_rows(*a, **k):
        in_spec.append(1)
        try:
            return real_backward(*a, **k)
        finally:
            in_spec.pop()

    def slow(*a, **k):
        if in_spec:
            time.sleep(0.03)
        return real_through(*a, **k)

    monkeypatch.setattr(crown_mod, "backward", spec_rows)
    monkeypatch.setattr(crown_mod, "_through", slow)
    box = LpBall(x0, 0.1, math.inf, 0.0, 1.0)
    for timeout in (0.05, 0.2, 0.35, 0.6):
        limit = timeout + 0.03 + 0.12  # a step + overhead (was +0.45)
        res, took = _run_timed(lambda: bab_mod.run_bab(net, box, spec, opts, timeout=timeout), limit)
        assert res.status == "unknown" and took <= limit, (timeout, took, res.details)
    res = bab_mod.run_bab(net, box, spec, opts, timeout=3.0)
    assert res.status == "unknown" and res.lower > 900  # the first pass's bound on the whole set (rows + 1e3)


def test_intermediate_rows_stop_at_the_hard_deadline(monkeypatch):
    """``crown(stop_at=...)`` also abandons an intermediate chunk of rows at its next backward
    step after the hard deadline (vit_2023: one chunk's first step took 0.5 s past it); the rows
    not bounded keep their interval boxes, which contain the full pass's and every sample."""
    import relax.bounds.crown as crown_mod
    from relax.bounds import prepare

    net = _mlp([6, 30, 30, 30, 30, 30, 3], seed=4).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, s = prepare(net, LpBall(x0, 0.3, math.inf, 0.0, 1.0), torch.float64)
    full = crown_mod.crown(graph, s, None).intermediate
    _slowed(monkeypatch, crown_mod, "_through", 0.03)
    cut, took = _run_timed(lambda: crown_mod.crown(graph, s, None, stop_at=time.perf_counter() + 0.05).intermediate, 0.05 + 0.03 + 0.12)
    assert took <= 0.05 + 0.03 + 0.12, took  # one step past the deadline, plus the pass's own work (without the stop: 0.6 s)
    looser = [p for p in full if not torch.equal(cut[p][0], full[p][0]) or not torch.equal(cut[p][1], full[p][1])]
    assert looser  # some rows were not bounded
    x = (x0 + 0.3 * (2 * torch.rand(5000, 6, dtype=torch.float64) - 1)).clamp(0, 1)
    acts = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: acts.__setitem__(k, o)) for k, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    net(x)
    for h in hooks:
        h.remove()
    for p in full:  # every box of the cut pass contains the full pass's box
        assert (cut[p][0] <= full[p][0] + 1e-12).all() and (cut[p][1] >= full[p][1] - 1e-12).all()
    z = [acts[k] for k in sorted(acts)][:len(full)]
    for (lo, hi), v in zip((cut[p] for p in graph.preactivations()), z):
        assert (v >= lo.reshape(1, -1) - 1e-12).all() and (v <= hi.reshape(1, -1) + 1e-12).all()


def test_intermediate_patch_rows_stop_at_the_hard_deadline(monkeypatch):
    """The same for rows bounded as patches (convolutional layers): a chunk still running at the
    hard deadline is abandoned at its next patch step; its rows keep boxes that contain the full
    pass's and every sample's values."""
    import relax.bounds.crown as crown_mod
    import relax.bounds.patches as patches_mod
    from relax.bounds import prepare

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(6 * 256, 3)).double().eval()
    x0 = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)  # large enough for patches to beat dense rows
    graph, s = prepare(torch.fx.symbolic_trace(net), LpBall(x0, 0.2, math.inf, 0.0, 1.0), torch.float64)
    full = crown_mod.crown(graph, s, None).intermediate
    calls = []
    real = patches_mod._input_patches
    monkeypatch.setattr(patches_mod, "_input_patches", lambda *a, **k: calls.append(1) or real(*a, **k))
    _slowed(monkeypatch, patches_mod, "_step", 0.15)
    cut, took = _run_timed(lambda: crown_mod.crown(graph, s, None, stop_at=time.perf_counter() + 0.05).intermediate, 0.05 + 0.15 + 0.15)
    assert calls, "the rows did not go through patches"
    assert took <= 0.05 + 0.15 + 0.15, took  # one step past the deadline, plus the pass's own work (running on: 6.6 s)
    assert any(not torch.equal(cut[p][0], full[p][0]) or not torch.equal(cut[p][1], full[p][1]) for p in full)
    for p in full:
        assert (cut[p][0] <= full[p][0] + 1e-12).all() and (cut[p][1] >= full[p][1] - 1e-12).all()
    x = (x0 + 0.2 * (2 * torch.rand(3000, 1, 16, 16, dtype=torch.float64) - 1)).clamp(0, 1)
    vals = {graph.input_name: x}
    with torch.no_grad():
        for n in graph.nodes:
            vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
    for p, (lo, hi) in cut.items():
        assert (vals[p] >= lo - 1e-12).all() and (vals[p] <= hi + 1e-12).all(), p


def test_relu_search_skips_box_recomputation_when_one_pass_is_too_slow(monkeypatch):
    """ReLU splitting recomputes its domains' boxes by CROWN while a round stays within
    ``RECOMPUTE_ROUND_SHARE`` of the time; before the first round it knows only the pipeline's
    first pass: when two such passes (the root's two children) exceed that share, the first
    round already keeps the parents' boxes (vit's IBP net: 65 s of 100 spent in one round's
    recomputation). Either way the search decides the same instance."""
    import relax.bab.activation_split as act
    from relax.bab import RowSpec
    from relax.bounds import prepare

    net = _mlp([6, 20, 20, 3], seed=2).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs = prepare(net, LpBall(x0, 0.1, math.inf, 0.0, 1.0), torch.float64)
    rs = RowSpec(torch.tensor([[-1.0, 1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 1]))  # label 1, proved after a round of splits
    root = act.crown(graph, xs, None).intermediate
    seen: list[bool] = []
    real = act._ReluSearch.round
    monkeypatch.setattr(act._ReluSearch, "round", lambda self, q, k, recompute, **kw: seen.append(recompute) or real(self, q, k, recompute, **kw))
    answers = {}
    for pass_s in (None, 1e-4, 1.0):  # 2 x 1.0 s > 0.05 x 10 s
        seen.clear()
        res = act.graph_relu_bab(graph, xs, rs, root, timeout=10.0, candidates=1, box_pass_s=pass_s)
        answers[pass_s] = res.status
        assert seen, res.reason  # the search ran rounds
        assert seen[0] is (pass_s != 1.0), (pass_s, seen)
    assert set(answers.values()) == {"certified"}, answers


def test_relu_search_fills_the_end_of_its_budget_with_smaller_rounds(monkeypatch):
    """A round starts only if one as long as the last still fits; when it does not, the search
    runs a smaller round at the last one's pace per domain (``LAST_ROUND_MARGIN`` of the time
    left) instead of stopping with up to a whole round's time unused (cifar10_resnet prop_43:
    `timeout` at 261 s of 300). Bounding slowed by 4 ms per child (rounds of 32 domains: 0.26 s):
    the search stops close to its deadline and not after it."""
    import relax.bab.activation_split as act
    from relax.bab import RowSpec
    from relax.bounds import prepare

    net = _mlp([6, 20, 20, 3], seed=2).double()
    x0 = torch.full((1, 6), 0.5, dtype=torch.float64)
    graph, xs = prepare(net, LpBall(x0, 0.1, math.inf, 0.0, 1.0), torch.float64)
    rs = RowSpec(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.tensor([0, 1]))  # label 0: open after seconds of splitting
    root = act.crown(graph, xs, None).intermediate
    ks: list[int] = []
    spans: list[float] = []
    ends: list[float] = []
    real_round, real_bound = act._ReluSearch.round, act.bound_domains

    searches: list = []

    def timed_round(self, q, k, *a, **kw):
        ks.append(k)
        searches.append(self)
        t = time.perf_counter()
        try:
            return real_round(self, q, k, *a, **kw)
        finally:
            ends.append(time.perf_counter())
            spans.append(ends[-1] - t)

    monkeypatch.setattr(act._ReluSearch, "round", timed_round)

    def slow(graph, inputs, rs, root, splits, *a, **kw):
        time.sleep(0.004 * next(iter(splits.values())).shape[0])
        return real_bound(graph, inputs, rs, root, splits, *a, **kw)

    monkeypatch.setattr(act, "bound_domains", slow)
    t0 = time.perf_counter()
    res = act.graph_relu_bab(graph, xs, rs, root, timeout=6.0, candidates=1, batch_size=32)
    took = time.perf_counter() - t0
    assert (res.status, res.reason) == ("unknown", "timeout"), (res.status, res.reason)
    assert took <= 6.0 + 0.3, took  # the slowing sleep (up to 0.26 s) is not cut by the deadline
    # the rounds stop by the search's end less twice the last round's tail (the part after its
    # bounding, which does not stop at the deadline) and the seconds of freeing the queue
    # (RELEASE_S_PER_GB; a few kB here), and only when not even one domain at the last round's
    # pace fits in LAST_ROUND_MARGIN of the time left before that
    s = searches[-1]
    assert 2 * s.tail_s <= s.end - s.deadline <= 2 * s.tail_s + 0.001, (s.end - s.deadline, s.tail_s)
    assert s.deadline - ends[-1] <= spans[-1] / (act.LAST_ROUND_MARGIN * ks[-1]) + 0.03, (spans[-1], ks, s.deadline - ends[-1])
    # the rule itself: a round as long as the last (0.4 s for 16 domains) with 0.33 s left -> 6 domains; 0.02 s -> none
    assert act.smaller_round(16, 0.33, 0.4, 16) == 6 and act.smaller_round(4, 0.33, 0.4, 16) == 4
    assert act.smaller_round(16, 0.02, 0.4, 16) == 0


def test_spec_pass_interval_bounds_and_roundoff_weights_stop_at_the_hard_deadline(monkeypatch):
    """The rigorous spec pass computes the interval bounds and round-off weights of the nodes
    not yet boxed before its backward pass; with a hard deadline that work stops at the first
    node after it (carvana's UNet: 0.05-0.25 s of interval rules ran past a 6-s budget), raising
    :class:`DeadlineExpired` like the backward steps do."""
    import relax.bounds.crown as crown_mod
    import relax.bounds.interval as interval_mod
    from relax.bounds import prepare

    torch.manual_seed(4)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(8, 8), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(8, 3)).double().eval()
    x0 = torch.zeros(1, 8, dtype=torch.float64)
    graph, _ = prepare(torch.fx.symbolic_trace(net), LpBall(x0, 0.1, math.inf), torch.float64)
    boxes = interval_mod.interval_bounds(graph, x0 - 0.1, x0 + 0.1)
    weights: dict = {}
    crown_mod.node_weights(graph, boxes, weights)  # no deadline: every node's weight
    assert set(weights) == {n.name for n in graph.nodes}
    _slowed(monkeypatch, interval_mod, "node_box", 0.1)
    _slowed(monkeypatch, crown_mod, "backward_weight", 0.1)
    for step in (lambda at: interval_mod.interval_bounds(graph, x0 - 0.1, x0 + 0.1, stop_at=at),
                 lambda at: crown_mod.node_weights(graph, boxes, {}, stop_at=at)):
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExpired):
            step(t0 + 0.05)
        assert time.perf_counter() - t0 < 0.05 + 0.1 + 0.15  # one node past the deadline (running on: 13 nodes, 1.3 s)
