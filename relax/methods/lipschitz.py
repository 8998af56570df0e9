"""Registered Lipschitz-margin methods: ``lipschitz-global``, ``lipschitz-sdp``, ``lipschitz-local``.

All three certify the network ``f`` (``certifies="base"``, deterministic) by the margin
argument of :func:`relax.lipschitz.certified_radius`: a property row ``r(x) = c^T f(x) + d``
with clean margin ``m = r(x_0)`` (float64 forward pass) and a Lipschitz bound ``L_c`` of
``c^T f`` w.r.t. ``||.||_p`` satisfies ``r(x) >= m - L_c ||x - x_0||_p``, so the lower bound on
the ball of radius ``eps`` is ``m - L_c eps`` (these are the ``lower`` fields of the
certificates) and the largest certified radius is ``min_groups max_rows m / L_c``.

* ``lipschitz-global`` and ``lipschitz-sdp``: ``L_c`` does not depend on ``eps``; the radius is
  reported in closed form whether or not ``find_radius`` is asked (capped at ``max_radius``).
* ``lipschitz-local``: ``L_c(eps)`` is valid only on the ball of radius ``eps``; a radius ``r``
  counts only if ``m - L_c(r) r`` proves the property, found by a batched bisection that starts
  from the global radius (always certified, since ``L_c(r) <= L_c^global``).

Box input sets are treated as the l_inf ball around their midpoint with radius the largest
half-width (a superset, so sound). Every method works on the dense float64 form
(:func:`relax.ir.dense.to_feedforward`); ``lipschitz-global`` also has a module-level path for
networks whose dense layers would exceed ``dense_limit`` entries.
"""
from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from verify.certificate import Certificate
from verify.deadline import Deadline
from verify.errors import UnsupportedOperatorError
from verify.options import Options, option
from verify.registry import BoundMethod, CertifyCall, register
from verify.spec import InputSet, LinearSpec, LpBall, norm_name

from relax import lipschitz as lip
from relax.ir.dense import FeedForwardNet, layer_boxes, to_feedforward
from relax.exact.sdp import cvxpy_import_estimate

__all__ = ["LipschitzGlobal", "LipschitzSDP", "LipschitzLocal"]

_FF_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple((id(t), t.data_ptr(), t._version) for t in list(model.parameters()) + list(model.buffers()))


def _cached(model: torch.nn.Module, key: tuple, build):
    try:
        slot = _FF_CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        return build()
    fp = _fingerprint(model)
    hit = slot.get(key)
    if hit is not None and hit[0] == fp:
        return hit[1]
    val = build()
    slot[key] = (fp, val)
    return val


def _input_shape(model: torch.nn.Module, inputs: InputSet) -> tuple[int, ...]:
    return tuple(inputs.shape)


def _ball_view(inputs: InputSet) -> tuple[Tensor, Tensor, float]:
    """``(x0 [B, *shape], eps [B] float64, p)``: the l_p ball enclosing the input set."""
    if isinstance(inputs, LpBall):
        return inputs.center, inputs.eps.double().cpu(), float(inputs.p)
    lo, hi = inputs.bounds()
    x0 = (lo + hi) / 2
    eps = ((hi.double() - lo.double()) / 2).flatten(1).amax(dim=1).cpu() * (1 + 1e-12)
    return x0, eps, math.inf


@dataclass(frozen=True, kw_only=True)
class LipschitzGlobalOptions(Options):
    conv_bound: str = option("auto", "norms of convolutions: exact-dense (dense matrices), fourier (exact SVD of the "
                             "kernel's Fourier blocks), gram (Gram iteration bound), auto (dense up to dense_limit)",
                             choices=("auto", "exact-dense", "fourier", "gram"))
    dense_limit: int = option(20_000_000, "largest n_out * n_in of a dense layer for conv_bound=auto", positive=True)
    combine_norms: bool = option(True, "also use the other norms' chains via the l_1 / l_2 / l_inf inequalities")


@dataclass(frozen=True, kw_only=True)
class LipschitzLocalOptions(Options):
    bounds: str = option("crown", "pre-activation bounds that fix the stable neurons' slopes", choices=("crown", "interval"))
    bisection_steps: int = option(16, "halvings of the radius interval with find_radius")


@dataclass(frozen=True, kw_only=True)
class LipschitzSdpOptions(Options):
    solver: str = option("auto", "clarabel (interior point), scs (first-order conic), first-order (no conic solver), "
                         "auto (by LMI size)", choices=("auto", "clarabel", "scs", "first-order"))
    eps: float | None = option(None, "solver tolerance (none: 1e-8 clarabel, 1e-4 scs); the verification step makes "
                               "any answer sound")
    max_iters: int = option(20_000, "solver iteration cap", positive=True)
    polish_iters: int | None = option(None, "gradient steps on the multipliers after the solver (none: 20, or 100 "
                                      "for first-order); 0 disables")
    lazy: bool = option(True, "solve only the rows that decide the radius")
    max_lmi_size: int = option(2000, "larger reduced LMIs are not attempted (global bound)", positive=True)
    time_limit: float | None = option(None, "seconds of SDP solving per certify call; rows left use the global bound",
                                      positive=True)


class _LipschitzMethod(BoundMethod):
    """Shared machinery: dense form, float64 margins, certificates from ``(m, L)``."""

    #: Lipschitz constants independent of eps (closed-form radius)
    eps_independent = True

    # -- to be provided by subclasses ------------------------------------------------------
    def row_lipschitz(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, p: float,
                      margins: Tensor | None = None) -> tuple[Tensor, dict]:
        """Lipschitz bounds ``[B, N]`` (float64, CPU) of the rows ``spec.C [B, N, K]`` w.r.t.
        ``||.||_p`` valid on ``inputs`` (globally for eps-independent methods), and JSON details.
        ``margins [B, N]`` (clean row values) let a method skip rows that cannot change the
        radius."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def dense(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> FeedForwardNet:
        def build() -> FeedForwardNet:
            with torch.no_grad():
                net = to_feedforward(model, input_shape)
            return net.to(dtype=torch.float64, device="cpu")

        return _cached(model, ("ff", input_shape), build)

    def margins(self, model: torch.nn.Module, x0: Tensor, spec: LinearSpec) -> Tensor:
        """Lower bounds ``[B, N]`` (float64, CPU) of the exact row values ``C f(x_0) + d``: the
        interval pass on the point ``x_0`` whose boxes are widened by their round-off
        (:mod:`relax.bounds.roundoff`) -- a float64 forward pass alone errs by ``gamma_n`` times the
        sum of the absolute values of its terms, which large weights make larger than the
        margin. A network without a bound graph falls back to that forward pass."""
        try:
            from relax.bounds import bounds

            point = LpBall(x0.detach().to(torch.float64), 0.0, math.inf)
            low, _ = bounds(model, point, spec.C.to(dtype=torch.float64), spec.d.to(dtype=torch.float64),
                            method="interval", dtype=torch.float64)
            return low.cpu()
        except UnsupportedOperatorError:
            pass
        m64 = _cached(model, ("f64",), lambda: copy.deepcopy(model).double().eval())
        dev = next(iter(m64.parameters()), torch.zeros(())).device
        with torch.no_grad():
            y = m64(x0.to(device=dev, dtype=torch.float64)).reshape(x0.shape[0], -1)
        return spec.to(device="cpu", dtype=torch.float64).values(y.cpu())

    def lower_bounds(self, model, inputs, spec):
        x0, eps, p = _ball_view(inputs)
        spec64 = spec.to(device="cpu", dtype=torch.float64)
        m = self.margins(model, x0, spec)
        L, _ = self.row_lipschitz(model, inputs, spec64, p, m)
        return m - L * eps.unsqueeze(1)

    # -- the certificate -------------------------------------------------------------------
    def decide(self, model, inputs, prop, call):
        self._deadline = call.deadline  # read by row_lipschitz (LipSDP rows) via self.deadline
        try:
            return self._certify_lipschitz(call)
        finally:
            self._deadline = None

    def _certify_lipschitz(self, call: CertifyCall) -> list[Certificate]:
        model, inputs, find_radius = call.model, call.inputs, call.find_radius
        t0, timeout, max_radius = call.deadline.start, call.timeout, call.max_radius
        self.check_input_set(inputs, find_radius)
        B = inputs.batch_size
        x0, eps, p = _ball_view(inputs)
        _, y_nat = call.clean()  # at the same centres: _ball_view's x0 is inputs.midpoint()
        spec = call.spec()
        spec64 = spec.to(device="cpu", dtype=torch.float64)
        clean_ok = spec.holds(y_nat).cpu()
        m = self.margins(model, x0, spec64)
        pred = y_nat.argmax(dim=1).cpu()

        # the clean input as the counterexample; the status rule (verify.status_rule) keeps
        # "falsified" only where single-input passes confirm it
        falsified = ~clean_ok
        L, details = self.row_lipschitz(model, inputs, spec64, p, m)
        lower = m - L * eps.unsqueeze(1)
        proved = self.proves(lower, spec64).cpu() & clean_ok
        if self.eps_independent:
            radius = lip.certified_radius(m, L, spec64.groups, self.safety_margin(m))
            # the closed form is exact for these bounds; keep it consistent with the eps verdict
            radius = torch.where(proved, torch.maximum(radius, eps), radius)
        else:
            radius = torch.where(proved, eps, torch.zeros_like(eps))
            if find_radius:
                radius, L_r = self.search_radius(model, inputs, spec64, m, clean_ok, radius, max_radius, timeout, t0)
                details = {**details, "lipschitz_at_radius": L_r.tolist()}
        radius = torch.where(clean_ok, radius, torch.zeros_like(radius))
        if max_radius is not None:
            radius = radius.clamp(max=float(max_radius))
        radius = torch.nan_to_num(radius, posinf=torch.finfo(torch.float64).max)

        elapsed = time.perf_counter() - t0
        certs = []
        for b in range(B):
            status = "certified" if proved[b] else ("falsified" if falsified[b] else "unknown")
            det = {"options": self.options(), "lipschitz": L[b].tolist(), "margin": m[b].tolist(),
                   "lipschitz_norm": norm_name(p)}
            det.update({k: (v[b] if isinstance(v, list) and len(v) == B else v) for k, v in details.items()})
            certs.append(self.make_certificate(
                status, b, label=call.label(b), prediction=int(pred[b]), norm=call.norm, eps=call.eps(b),
                radius=float(radius[b]), lower=lower[b].tolist(),
                counterexample=x0[b].detach().cpu().tolist() if status == "falsified" else None,
                time_s=elapsed / B, details=det))
        return certs

    def search_radius(self, model, inputs, spec64, m, clean_ok, known, max_radius, timeout, t0):  # pragma: no cover
        raise NotImplementedError


@register
class LipschitzGlobal(_LipschitzMethod):
    """Margin / global Lipschitz bound (product of exact layer operator norms).

    Options:
        conv_bound: ``"auto"`` (dense exact norms when every dense layer has at most
            ``dense_limit`` entries, else the module-level bound with ``"fourier"``),
            ``"exact-dense"`` (always the dense form), ``"fourier"`` (module level, exact SVD of
            the kernel's Fourier blocks, Sedghi et al. 2019) or ``"gram"`` (module level, Gram
            iteration bound of each Fourier block, Delattre et al. 2023).
        dense_limit: largest ``n_out * n_in`` of a dense layer for ``"auto"``.
        combine_norms: also use the other norms' chains via the l_1/l_2/l_inf inequalities.
    """

    name = "lipschitz-global"
    summary = "margin / product of exact layer norms (difference row in the last layer)"
    norms = ("linf", "l2", "l1", "box")

    opts: LipschitzGlobalOptions

    def use_dense(self, model, input_shape) -> bool:
        if self.opts.conv_bound == "exact-dense":
            return True
        if self.opts.conv_bound in ("fourier", "gram"):
            return False
        size = _cached(model, ("size", input_shape), lambda: lip.dense_size(model, input_shape))
        return size <= self.opts.dense_limit

    def row_lipschitz(self, model, inputs, spec, p, margins=None):
        C = spec.C
        shape = _input_shape(model, inputs)
        if self.use_dense(model, shape):
            net = self.dense(model, shape)
            L = lip.global_lipschitz(net, C, p, combine=self.opts.combine_norms)
            return L.cpu(), {"bound": "global-dense"}
        cb = "fourier" if self.opts.conv_bound == "auto" else self.opts.conv_bound
        if self.opts.combine_norms:
            chains = {r: lip.module_global_lipschitz(model, shape, C, r, cb) for r in (1.0, 2.0, math.inf)}
            n_in = int(math.prod(shape))
            L = lip.combine_norms(chains, n_in)[float(p)]
        else:
            L = lip.module_global_lipschitz(model, shape, C, p, cb)
        return L.cpu(), {"bound": f"global-modules-{cb}"}


@register
class LipschitzLocal(_LipschitzMethod):
    """Margin / local Lipschitz bound from the activation pattern on the input set.

    Pre-activation bounds on the set (``bounds="crown"``: :func:`relax.bounds.intermediate_bounds`
    in float64, intersected with interval bounds on the dense form; ``"interval"``: interval
    bounds only) fix the slopes of stable neurons (ReLU: exactly 0 or 1) and bound the others;
    :func:`relax.lipschitz.local_lipschitz` then bounds every gradient on the set by interval
    arithmetic over the backward graph, and the smaller of that and the global bound is used.

    Because ``L(eps)`` holds only on the ball of radius ``eps``, a radius ``r`` is certified
    only when ``m - L(r) r`` proves the property; ``find_radius`` bisects ``r`` (all inputs at
    once) between the global radius (always certified, ``L(r) <= L_global``) and the radius of
    the point-wise bound ``L(0)`` (no larger radius can pass, as ``L(r) >= L(0)`` for these
    inclusion-monotone bounds).

    Options:
        bounds: ``"crown"`` or ``"interval"``.
        bisection_steps: halvings of the radius interval with ``find_radius``.
    """

    name = "lipschitz-local"
    summary = "margin / local Lipschitz bound (interval Jacobian over the CROWN activation pattern)"
    norms = ("linf", "l2", "l1", "box")
    eps_independent = False

    opts: LipschitzLocalOptions

    def pre_bounds(self, model, net: FeedForwardNet, inputs: InputSet) -> list[tuple[Tensor, Tensor]]:
        """Pre-activation boxes ``[B, n_{k+1}]`` (float64, CPU) valid on the convex hull of the
        input set and its centre (so that the segment from ``x_0`` to any point is covered)."""
        if isinstance(inputs, LpBall):
            x0 = inputs.center
            if not bool(inputs.contains(x0, tol=0.0).all()):  # centre outside the domain
                inputs = LpBall(x0, inputs.eps, inputs.p)
        lo, hi = inputs.bounds()
        x0 = inputs.midpoint()
        lo, hi = torch.minimum(lo, x0).double().cpu(), torch.maximum(hi, x0).double().cpu()
        pre = lip.interval_bounds(net, lo, hi)
        if self.opts.bounds == "crown":
            try:
                from relax.bounds import intermediate_bounds

                ib = intermediate_bounds(model, inputs, "crown", dtype=torch.float64)
            except (ImportError, NotImplementedError, ValueError):
                ib = None
            mapped = None if ib is None else layer_boxes(net, ib, lo, hi)
            if mapped is not None:
                pre = [(torch.maximum(l, cl), torch.minimum(u, cu)) for (l, u), (cl, cu) in zip(pre, mapped)]
        return pre

    def row_lipschitz(self, model, inputs, spec, p, margins=None):
        C = spec.C
        shape = _input_shape(model, inputs)
        net = self.dense(model, shape)
        Lg = lip.global_lipschitz(net, C, p)
        pre = self.pre_bounds(model, net, inputs)
        Ll = lip.local_lipschitz(net, C, p, pre) * (1 + lip.ROUND_UP)
        return torch.minimum(Ll, Lg).cpu(), {"bound": f"local-{self.opts.bounds}"}

    def search_radius(self, model, inputs, spec64, m, clean_ok, known, max_radius, timeout, t0):
        shape = _input_shape(model, inputs)
        net = self.dense(model, shape)
        groups = spec64.groups
        safety = self.safety_margin(m)
        Lg = lip.global_lipschitz(net, spec64.C, inputs.p).cpu()
        lo = torch.maximum(known, lip.certified_radius(m, Lg, groups, safety))
        L0, _ = self.row_lipschitz(model, inputs.with_eps(torch.zeros_like(inputs.eps)), spec64, inputs.p)
        hi = torch.maximum(lip.certified_radius(m, L0, groups, safety), lo)
        if max_radius is not None:
            hi = hi.clamp(max=float(max_radius))
            lo = torch.minimum(lo, hi)
        active = clean_ok.clone() & (hi > lo)
        lo = torch.where(clean_ok, lo, torch.zeros_like(lo))
        L_at = Lg.clone()
        for _ in range(self.opts.bisection_steps):
            if not active.any() or (timeout is not None and time.perf_counter() - t0 > timeout):
                break
            mid = torch.where(active, (lo + hi) / 2, lo)
            idx = active.nonzero().flatten()
            # float64 radii are rounded *up* by LpBall, so L is valid on a ball containing the
            # one of radius r_used, and r_used (not the unrounded midpoint) is what is claimed
            sub = inputs.select(idx).with_eps(mid[idx].to(device=inputs.eps.device))
            r_used = sub.eps.double().cpu()
            mid = mid.clone()
            mid[idx] = torch.maximum(mid[idx], r_used.to(mid.dtype))
            L, _ = self.row_lipschitz(model, sub, spec64.select(idx), inputs.p)
            lower = m[idx] - L * mid[idx].unsqueeze(1)
            ok = self.proves(lower, spec64.select(idx)).cpu()
            ok_full = torch.zeros_like(active)
            ok_full[idx] = ok
            lo = torch.where(ok_full, mid, lo)
            hi = torch.where(active & ~ok_full, mid, hi)
            L_at[idx[ok]] = L[ok]
            active = active & (hi - lo > 1e-9 * hi)
        return lo, L_at


@register
class LipschitzSDP(_LipschitzMethod):
    """Margin / LipSDP-Neuron bound (Fazlyab et al. 2019) of each property row, verified in
    float64 (:mod:`relax.lipschitz.sdp`), combined with the global bounds.

    LipSDP bounds the l2 constant ``L_2`` of ``c^T f``; the l_inf / l_1 constants use
    ``L_inf <= sqrt(n) L_2`` and ``L_1 <= L_2``, and every norm keeps the smaller of that and
    the global product bound (so the radius is never below ``lipschitz-global``'s). A row whose
    SDP cannot be verified (solver failure, size limit, time limit) keeps the global bound.

    Options:
        solver: ``"auto"``, ``"clarabel"`` (interior point), ``"scs"`` (first-order conic) or
            ``"first-order"`` (no conic solver: the closed-form strictly feasible multipliers of
            :func:`relax.lipschitz.sdp.feasible_point`, improved by :func:`relax.lipschitz.sdp.polish`).
            ``"auto"`` picks by the reduced LMI size ``n = sum of hidden widths + 1``: Clarabel
            for ``n <= 60`` (its cost grows like ``(n^2/2)^3``: 4.6 s per row at n = 51 here),
            SCS for ``n <= 300``, first-order above.
        eps: solver tolerance (default ``1e-8`` Clarabel, ``1e-4`` SCS; the verification step
            makes any answer sound, the tolerance only sets how tight).
        max_iters: solver iteration cap.
        polish_iters: gradient steps on the multipliers after the solver (default 20; 100 for
            ``"first-order"``); 0 disables.
        lazy: solve only the rows that decide the radius: repeatedly take, per input, the group
            with the smallest radius under the current bounds and solve its unsolved rows,
            until every deciding group is solved. The radii equal those of solving every row;
            ``lower`` of rows never solved use the global bound.
        max_lmi_size: larger reduced LMIs are not attempted (global bound).
        time_limit: seconds of SDP solving per ``certify`` call; rows left use the global bound.
    """

    name = "lipschitz-sdp"
    cost = "very slow"
    summary = "margin / LipSDP-Neuron per property row (verified), min with the global bound"
    norms = ("linf", "l2", "l1", "box")

    opts: LipschitzSdpOptions

    def _row_solver(self, model, net: FeedForwardNet, shape):
        from relax.lipschitz.sdp import RowSolver

        size = sum(l.n_out for l in net.layers[:-1]) + 1
        solver = self.opts.solver
        if solver == "auto":
            solver = "clarabel" if size <= 60 else ("scs" if size <= 300 else "first-order")
        key = ("sdp", shape, solver, self.opts.eps, self.opts.max_iters, self.opts.polish_iters)
        build = lambda: RowSolver(net, solver=solver, eps=self.opts.eps, max_iters=self.opts.max_iters, polish_iters=self.opts.polish_iters)  # noqa: E731
        return _cached(model, key, build), size, solver

    def row_lipschitz(self, model, inputs, spec, p, margins=None):
        t0 = time.perf_counter()
        shape = _input_shape(model, inputs)
        net = self.dense(model, shape)
        C = spec.C
        B, N, K = C.shape
        chains = {r: lip.global_lipschitz(net, C, r, combine=False).cpu() for r in (1.0, 2.0, math.inf)}
        n_in = net.n_in

        def combined(sdp2: Tensor | None) -> Tensor:
            c2 = chains[2.0] if sdp2 is None else torch.where(torch.isnan(sdp2), chains[2.0], torch.minimum(chains[2.0], sdp2))
            return lip.combine_norms({1.0: chains[1.0], 2.0: c2, math.inf: chains[math.inf]}, n_in)[float(p)]

        if not net.activations:  # affine network: the global bound is exact
            return combined(None), {"bound": "global (affine network)"}
        bad = [a for a in net.activations if a not in lip.ACT_LIPSCHITZ]
        rs, size, solver = self._row_solver(model, net, shape)
        if bad or size > self.opts.max_lmi_size:
            return combined(None), {"bound": f"global (LMI size {size} > max_lmi_size {self.opts.max_lmi_size})"}
        if solver != "first-order" and rs._prob is None and not self.deadline.affords(cvxpy_import_estimate()):
            return combined(None), {"bound": "global (no time left to import cvxpy for LipSDP)"}
        flat = C.reshape(B * N, K)

        def current() -> Tensor:
            return combined(torch.from_numpy(rs.known(flat)).view(B, N))

        # the certify() deadline and the time_limit option, whichever comes first
        dl = self.deadline
        if self.opts.time_limit is not None:
            dl = Deadline.until(min(t0 + self.opts.time_limit, dl.at if dl.at is not None else math.inf))
        if not self.opts.lazy or margins is None:
            todo = torch.ones(B * N, dtype=torch.bool)
            if margins is not None:
                todo = (margins.reshape(-1) > 0)
            rs.solve(flat[todo], deadline=dl) if todo.any() else None
        else:
            while not dl.expired():
                need = _deciding_rows(margins, current(), spec.groups, torch.from_numpy(rs.is_solved(flat)).view(B, N))
                if not need.any():
                    break
                before = int(rs.is_solved(flat).sum())
                rs.solve(flat[need.reshape(-1)], deadline=dl)
                if int(rs.is_solved(flat).sum()) == before:  # no row fitted in the time left
                    break
        solved = torch.from_numpy(rs.is_solved(flat)).view(B, N)
        L = current()
        return L, {"bound": f"lipsdp-{solver}", "lmi_size": size, "rows_solved": solved.sum(dim=1).tolist()}


def _deciding_rows(m: Tensor, L: Tensor, groups: Tensor, solved: Tensor) -> Tensor:
    """Bool ``[B, N]``: unsolved rows with positive margin in the group that currently decides
    each input's radius (the group with the smallest ``max_row m / L``)."""
    r = torch.where(m > 0, m / L.clamp_min(1e-300), torch.zeros_like(m))
    G = int(groups.max()) + 1
    groups = groups.to(r.device)
    gval = torch.full((m.shape[0], G), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(1, groups.expand_as(r), r, reduce="amax")
    g_star = gval.argmin(dim=1)  # [B]
    in_g = groups.unsqueeze(0) == g_star.unsqueeze(1)  # [B, N]
    decided = gval.gather(1, g_star.unsqueeze(1)).squeeze(1) <= 0  # no positive row: radius 0 anyway
    return in_g & ~solved & (m > 0) & ~decided.unsqueeze(1)
