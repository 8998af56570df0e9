"""Registered solver-based methods: ``lp`` (triangle LP), ``milp`` (exact, Tjeng et al. 2019) and
``sdp`` (Raghunathan et al. 2018). All three take the network in dense layered form
(:func:`relax.ir.dense.to_feedforward`: skip connections carried across the ReLU layers) and
support ReLU networks only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from verify.certificate import Certificate
from verify.deadline import DeadlineExpired
from verify.options import Options, option
from verify.registry import BoundMethod, Method, register
from verify.spec import InputSet, Linear, LinearSpec, LpBall

from relax.exact.lp import lp_lower_bounds, relu_net
from relax.exact.milp import milp_verify, minimum_distortion
from relax.exact.sdp import sdp_lower_bounds
from relax.solvers import SOLVERS, SolverError

__all__ = ["LpMethod", "MilpMethod", "SdpMethod", "LpOptions", "MilpOptions", "SdpOptions"]

_BOUNDS_HELP = "the bound method of the pre-activation bounds the relaxation starts from (crown, interval, alpha-crown, ...)"


@dataclass(frozen=True, kw_only=True)
class _RelaxationOptions(Options):
    """Options of the LP / MILP / SDP relaxations."""

    solver: str = option("auto", "LP / MILP solver: gurobi when licensed (auto), else highs", choices=SOLVERS)
    bounds_method: str = option("crown", _BOUNDS_HELP)
    refine: bool = option(False, "tighten the pre-activation bounds by LPs, layer by layer, first")


@dataclass(frozen=True, kw_only=True)
class LpOptions(_RelaxationOptions):
    time_limit: float | None = option(None, "seconds per LP (none: no limit beyond the timeout)", positive=True)


@dataclass(frozen=True, kw_only=True)
class MilpOptions(_RelaxationOptions):
    refine: bool = option(True, "tighten the pre-activation bounds by LPs, layer by layer, before the MILP")
    time_limit: float | None = option(120.0, "seconds per MILP (none: no limit beyond the timeout)", positive=True)
    attack: bool = option(True, "PGD from the centre and from LP optima before the MILP")
    margin: float = option(1e-4, "a property counts as proved when the MILP's dual bound exceeds this")
    threads: int = option(1, "solver threads", positive=True)


@dataclass(frozen=True, kw_only=True)
class SdpOptions(Options):
    solver: str = option("auto", "conic solver through cvxpy: clarabel (interior point), scs (first order), "
                         "auto (by size)", choices=("auto", "clarabel", "scs"))
    bounds_method: str = option("crown", _BOUNDS_HELP)
    refine: bool = option(False, "tighten the pre-activation bounds by LPs first")
    triangle: bool = option(True, "add the triangle (LP) constraints to the SDP")
    lp_first: bool = option(True, "rows the triangle LP proves keep its safe bound and skip the SDP")


def _net_for(method, model, shape, stop_at: float | None):
    """Dense form cached on the method instance for the last model (bisection calls again),
    built until the hard deadline ``stop_at`` (:class:`verify.deadline.DeadlineExpired` past it)."""
    key = (id(model), tuple(shape))
    cache = getattr(method, "_net_cache", None)
    if cache is not None and cache[0] == key and cache[1] is model:
        return cache[2]
    net = relu_net(model, shape, stop_at=stop_at)
    method._net_cache = (key, model, net)
    return net


@register
class LpMethod(BoundMethod):
    """Triangle LP relaxation (Planet / Wong & Kolter) solved by HiGHS or Gurobi.

    Soundness: each row's bound is the Neumaier-Shcherbina safe dual bound of the LP
    (:func:`relax.solvers.safe_dual_bound`), a float64 lower bound that does not rely on the
    solver's ~1e-7 feasibility tolerances (the simplex objective itself is never used); a row
    counts as proved when it exceeds the registry's float64 margin ``1e-10 (1 + |lower|)``.
    Intermediate bounds from float32 bound passes are widened by ``1e-6 (1 + |b|)``."""

    name = "lp"
    cost = "slow"
    summary = "triangle LP relaxation (Ehlers 2017; Wong & Kolter 2018), HiGHS/Gurobi, safe dual bounds"
    norms = ("linf", "l1", "box")
    bisection_steps = 10

    opts: LpOptions

    def lower_bounds(self, model, inputs, spec):
        try:
            net = _net_for(self, model, inputs.shape, self.deadline.at)
        except DeadlineExpired:  # no bound in time: unknown
            return torch.full(spec.C.shape[:2], -math.inf, dtype=torch.float64, device=spec.C.device)
        res = lp_lower_bounds(model, inputs, spec, bounds_method=self.opts.bounds_method, refine=self.opts.refine, solver=self.opts.solver,
                              time_limit=self.opts.time_limit, net=net, deadline=self.deadline)
        return res.lower.to(device=spec.C.device)


@register
class SdpMethod(BoundMethod):
    """SDP relaxation of Raghunathan, Steinhardt & Liang (2018) in cvxpy (Clarabel / SCS), with a
    verified dual bound (eigenvalue-corrected). Small networks only (``P`` is n x n with n = 1 +
    inputs + unstable neurons). With ``lp_first`` (default) rows the triangle LP already proves
    keep the LP's safe bound and skip the SDP."""

    name = "sdp"
    cost = "very slow"
    summary = "SDP relaxation (Raghunathan et al. 2018), cvxpy + Clarabel/SCS, eigenvalue-checked dual bound"
    norms = ("linf", "box")
    bisection_steps = 8

    opts: SdpOptions

    def lower_bounds(self, model, inputs, spec):
        try:
            net = _net_for(self, model, inputs.shape, self.deadline.at)
        except DeadlineExpired:  # no bound in time: unknown
            return torch.full(spec.C.shape[:2], -math.inf, dtype=torch.float64, device=spec.C.device)
        res = sdp_lower_bounds(model, inputs, spec, bounds_method=self.opts.bounds_method, refine=self.opts.refine, triangle=self.opts.triangle, solver=self.opts.solver, lp_first=self.opts.lp_first, net=net,
                               deadline=self.deadline)
        return res.lower.to(device=spec.C.device)


def _domain_of(inputs: InputSet) -> tuple[Tensor, Tensor] | None:
    if not isinstance(inputs, LpBall) or inputs.domain_lo is None or inputs.domain_hi is None:
        return None
    c = inputs.center
    return inputs.domain_lo.expand_as(c), inputs.domain_hi.expand_as(c)


@register
class MilpMethod(Method):
    """Exact verification by MILP (Tjeng, Xiao & Tedrake 2019): "certified", "falsified" with a
    counterexample confirmed by float32 and float64 forward passes, or "unknown" at the time limit
    with the best dual bound. With ``find_radius`` the exact minimum adversarial distortion is
    computed directly (no bisection): ``radius`` is a margin below the MILP dual bound, and
    ``details["exact_radius"]`` brackets the true minimum distortion (``lower``, ``upper`` = the
    distance of a confirmed adversarial example, ``status``).

    l_2 balls need a mixed-integer QP (Gurobi): the ball is decided through the minimum l_2
    distortion (certified iff the certified radius, a margin below the MIQP dual bound, reaches
    ``eps``; falsified iff a confirmed adversarial example lies in the ball). Without Gurobi, or
    when the model exceeds its licence, the answer is "unknown" with the reason in ``details``."""

    name = "milp"
    cost = "slow"
    complete = True
    guarantee = "deterministic"
    certifies = "base"
    summary = "exact MILP (Tjeng et al. 2019), HiGHS/Gurobi; find_radius = exact minimum distortion; l2 = MIQP (Gurobi)"
    norms = ("linf", "l2", "l1", "box")
    opts: MilpOptions

    def decide(self, model, inputs, prop, call):
        find_radius, max_radius, deadline = call.find_radius, call.max_radius, call.deadline
        t_all = deadline.start
        self.check_input_set(inputs, find_radius)
        B = inputs.batch_size
        x0, pred, clean_ok, spec = call.clean_verdict()
        clean_bad = ~clean_ok  # confirmed one input at a time (own dtype and float64)
        if bool(clean_bad.any()):
            from verify.attack import confirm_counterexample

            clean_bad = clean_bad & confirm_counterexample(model, inputs, spec, x0).to(clean_bad.device)
        is_ball = isinstance(inputs, LpBall)
        l2 = is_ball and inputs.p == 2.0
        try:
            net = _net_for(self, model, inputs.shape, deadline.at)
        except DeadlineExpired:
            net = None
        certs: list[Certificate] = []
        for b in range(B):
            t0 = time.perf_counter() if b else t_all  # the set-up counts towards the first example
            mine = deadline.share(B - b)  # this example's share of the time left
            tl = mine.limit(self.opts.time_limit)
            in_b = inputs.select([b])
            spec_b = spec.select([b])
            det: dict = {"options": self.options()}
            eps = call.eps(b)
            lower = None
            cex = None
            radius = 0.0
            if bool(clean_bad[b]):
                status, cex = "falsified", x0[b].detach().cpu()
                det["reason"] = "the clean input violates the property"
            elif net is None:
                status = "unknown"
                det["reason"] = "the deadline passed while the dense view was built"
            elif l2:
                status, cex, radius = self._l2(model, inputs, in_b, spec_b, b, eps, tl, find_radius, max_radius, det)
            else:
                try:
                    out = milp_verify(
                        model, in_b, spec_b, bounds_method=self.opts.bounds_method, refine=self.opts.refine, solver=self.opts.solver,
                        time_limit=tl, attack=self.opts.attack, margin=self.opts.margin, threads=self.opts.threads, net=net,
                    )[0]
                    status, cex, lower = out.status, out.counterexample, out.row_lower
                    det.update(out.details)
                    det["group_lower"] = out.group_lower.tolist()
                    det["group_upper"] = out.group_upper.tolist()
                except SolverError as e:
                    status = "unknown"
                    det["reason"] = f"solver: {e}"
                if is_ball and status == "certified":
                    radius = eps
                if find_radius and mine.expired():
                    det["exact_radius"] = {"error": "time limit before the radius search"}
                elif find_radius:
                    r = self._distortion(model, inputs, spec_b, b, mine.limit(self.opts.time_limit), max_radius, det)
                    if r is not None:
                        radius = max(radius, self._certified_radius(r, max_radius))
            certs.append(
                Certificate(
                    method=self.name,
                    guarantee="deterministic",
                    certifies="base",
                    status=status,
                    index=b,
                    label=call.label(b),
                    prediction=int(pred[b]),
                    norm=call.norm,
                    eps=eps,
                    radius=float(radius),
                    lower=None if lower is None else [float(v) for v in lower],
                    counterexample=None if cex is None else cex.reshape(inputs.shape),
                    time_s=time.perf_counter() - t0,
                    details=det,
                )
            )
        return certs

    def _l2(self, model, inputs: LpBall, in_b: LpBall, spec_b: LinearSpec, b: int, eps: float, tl: float, find_radius: bool, max_radius, det: dict):
        """Decide the l_2 ball of example ``b`` (and its radius) by the minimum l_2 distortion
        (MIQP). Without ``find_radius`` the search stops at a radius slightly above ``eps``.
        Returns ``(status, counterexample, radius)``."""
        emax = max_radius if find_radius else eps * (1 + 1e-4) + 1e-6
        if emax is not None:
            emax = max(float(emax), eps * (1 + 1e-4) + 1e-6)
        r = self._distortion(model, inputs, spec_b, b, tl, emax, det)
        if r is None:
            det["reason"] = f"exact l_2: {det['exact_radius']['error']}"
            return "unknown", None, 0.0
        cr = self._certified_radius(r, emax)
        if r.counterexample is not None and r.value <= eps:
            xc = r.counterexample.reshape(1, *inputs.shape)
            if bool(in_b.to(dtype=torch.float64).contains(xc.double(), tol=0.0)[0]):
                return "falsified", r.counterexample, 0.0
        if cr >= eps:
            return "certified", None, cr if find_radius else eps
        det["reason"] = (
            f"exact l_2: {r.details.get('reason', r.status)}" if r.status in ("error", "time_limit")
            else f"exact l_2: minimum distortion in [{r.lower:.6g}, {r.value:.6g}], not decided at eps {eps:g} within the margins"
        )
        return "unknown", None, cr if find_radius else 0.0

    def _distortion(self, model, inputs: LpBall, spec_b: LinearSpec, b: int, tl: float, eps_max, det: dict):
        """Exact minimum distortion of example ``b`` (``None`` on a solver error, which goes to
        ``det["exact_radius"]["error"]``)."""
        dom = _domain_of(inputs)
        prop = Linear(spec_b.C[0].detach().double().cpu(), spec_b.d[0].detach().double().cpu(), spec_b.groups.cpu())
        try:
            _, res = minimum_distortion(
                model, inputs.center[b : b + 1], prop, norm=inputs.p,
                domain=None if dom is None else (dom[0][b : b + 1], dom[1][b : b + 1]),
                timeout=tl, solver=self.opts.solver, bounds_method=self.opts.bounds_method, refine=self.opts.refine,
                eps_max=eps_max, threads=self.opts.threads, return_details=True,
            )
        except (SolverError, ValueError) as e:
            det["exact_radius"] = {"error": str(e)}
            return None
        r = res[0]
        det["exact_radius"] = {
            "lower": r.lower, "upper": r.value, "gap": r.gap, "status": r.status, "eps_max": r.eps_max,
            "time_s": r.details.get("time_s"), "solver": r.details.get("solver"),
        }
        if "reason" in r.details:
            det["exact_radius"]["reason"] = r.details["reason"]
        return r

    @staticmethod
    def _certified_radius(r, max_radius) -> float:
        cr = r.certified_radius
        if not math.isfinite(cr):
            cr = float(max_radius) if max_radius is not None else r.eps_max
        return cr
