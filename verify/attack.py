"""Falsification: search for inputs in the set that violate the property.

Every attack minimises the violation margin of :class:`verify.spec.LinearSpec`,
``min over groups of max over rows of (C y + d)``, which is ``<= 0`` exactly at
counterexamples. A result is reported as found only after :func:`confirm_counterexample`
re-checks it: the point lies in the input set and a plain float64 forward pass violates the
property (ARCHITECTURE.md, "falsified only with a counterexample a forward pass confirms").

* :func:`pgd_attack` -- projected gradient descent (Madry et al. 2018) with random restarts
  and one targeted lane per output group, all inputs and lanes in one batch ``[L*B, ...]``.
* :func:`random_attack` -- uniform sampling inside the set (boundary-heavy for boxes).
* :func:`confirm_counterexample` -- the check of a candidate (float64 membership, float64 and
  own-dtype forward passes); :func:`repair_counterexample` -- a solver's point made one.
  (The user's check of an answer that leaves the suite, onnxruntime for ONNX files, is
  :func:`verify.confirm.confirm`.)

Randomness is drawn from a seeded ``torch.Generator`` and shared across the batch (every
input gets the same random numbers, mapped into its own set), and inputs stop once they are
falsified, so a seeded run gives input ``b`` the same answer whatever else is in the batch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .placement import model_device, model_float_dtype, model_tensors
from .precision import ieee_float32
from .spec import Box, InputSet, LinearSpec, LpBall, SpecError
from .surrogate import attack_surrogate

__all__ = [
    "AttackResult",
    "pgd_attack",
    "random_attack",
    "confirm_counterexample",
    "repair_counterexample",
    "project_into",
]

#: relative tolerance of the set-membership check of a counterexample, in float64: a few units
#: of round-off of the set's own arithmetic (a counterexample is a float64 point *in* the set;
#: candidates are projected into it first, :func:`project_into`)
CONTAINS_RTOL = 8 * 2.0**-52
#: l_1 PGD moves the top this fraction of coordinates (by |gradient|) per step
L1_TOP_FRACTION = 0.01


@dataclass
class AttackResult:
    """Outcome of an attack on a batch of ``B`` input sets.

    Attributes:
        found: ``[B]`` bool, a confirmed counterexample was found.
        x_adv: ``[B, *shape]`` float64, inside the set (candidates are projected into its
            exact bounds in float64, :func:`project_into`): the confirmed counterexample where
            ``found``, else the lowest-margin point checked.
        margin: ``[B]`` float64 :meth:`LinearSpec.violation_margin` at ``x_adv`` from a
            float64 forward pass; ``<= 0`` means violated (``found`` also needs the model's own
            dtype to agree, :func:`confirm_counterexample`).
    """

    found: Tensor
    x_adv: Tensor
    margin: Tensor


# ----------------------------------------------------------------------------------------
# checks


def _work_dtype(model: torch.nn.Module, inputs: InputSet) -> torch.dtype:
    """The attacks' working dtype: the model's floating dtype (the inputs' for a model without
    floating tensors)."""
    return model_float_dtype(model) or inputs.bounds()[0].dtype


def _working(model: torch.nn.Module, inputs: InputSet, spec: LinearSpec) -> tuple[torch.dtype, InputSet, LinearSpec]:
    """The working dtype (:func:`_work_dtype`) and the sets ``[B, *shape]`` and the spec rows
    ``C [B, N, K]`` in it."""
    wdtype = _work_dtype(model, inputs)
    return wdtype, inputs.to(dtype=wdtype), spec.to(dtype=wdtype)


def _float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself when all its floating tensors are float64, else a float64 deep copy
    (the caller's model is left untouched)."""
    if all(t.dtype == torch.float64 for t in model_tensors(model) if torch.is_floating_point(t)):
        return model
    return copy.deepcopy(model).double()


def _forward(model: torch.nn.Module, x: Tensor) -> Tensor:
    """``[n, *shape] -> [n, K]``."""
    y = model(x)
    return y.reshape(x.shape[0], -1)


def _contains_tol(inputs: InputSet) -> float:
    lo, hi = inputs.bounds()
    scale = max(float(lo.abs().max()), float(hi.abs().max()), 1.0) if lo.numel() else 1.0
    return CONTAINS_RTOL * scale


def project_into(inputs: InputSet, x: Tensor) -> Tensor:
    """``x [B, *shape]`` moved into the sets (float64): clamped into a box or an l_inf ball
    (``c -/+ eps`` computed in float64, then the domain), pulled towards the centre of an l_1 /
    l_2 ball that it leaves (then clamped into the domain, which holds the centre). Points
    inside stay where they are (up to the float64 conversion)."""
    x = x.detach().double().to(inputs.device)
    if isinstance(inputs, Box):
        return torch.minimum(torch.maximum(x, inputs.lo.double()), inputs.hi.double())
    assert isinstance(inputs, LpBall)
    c = inputs.center.double()
    eps = inputs.eps.double().view(-1, *([1] * (c.dim() - 1)))
    lo, hi = c - eps, c + eps
    if inputs.domain_lo is not None:
        lo = torch.maximum(lo, torch.as_tensor(inputs.domain_lo, dtype=torch.float64, device=c.device).expand_as(c))
    if inputs.domain_hi is not None:
        hi = torch.minimum(hi, torch.as_tensor(inputs.domain_hi, dtype=torch.float64, device=c.device).expand_as(c))
    if not math.isinf(inputs.p):
        d = (x - c).flatten(1)
        n = d.norm(p=inputs.p, dim=1).view_as(eps)
        shrink = torch.where(n > eps, eps / n.clamp_min(1e-300) * (1 - 4 * 2.0**-52), torch.ones_like(n))
        x = c + (x - c) * shrink
    return torch.minimum(torch.maximum(x, lo), hi)


def _check(model64: torch.nn.Module, inputs: InputSet, spec: LinearSpec, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(inside [B] bool, margin [B] float64)`` of points ``x [B, *shape]`` (membership in float64)."""
    inside = inputs.to(dtype=torch.float64).contains(x.detach().double().to(inputs.device), tol=_contains_tol(inputs))
    dev = model_device(model64, x.device)
    with torch.no_grad():
        y = _forward(model64, x.detach().double().to(dev))
    margin = spec.to(device=y.device, dtype=torch.float64).violation_margin(y)
    return inside, margin.to(inside.device)


def confirm_counterexample(model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, x: Tensor) -> Tensor:
    """Bool ``[B]``: ``x[b]`` lies in set ``b`` (in float64, within a few units of round-off:
    :data:`CONTAINS_RTOL`; project candidates first, :func:`project_into`) and the property is
    violated (margin ``<= 0``) both by a plain forward pass in float64 and
    by the model in its own dtype run on ``x[b]`` alone -- the check a user makes. (A batched
    float32 pass can round differently from a single-input one: on a near-tie the two disagree
    in sign.)

    A float32 model is re-run in float64 on a deep copy; ``model`` is not modified.
    """
    inside, margin = _check(_float64_model(model), inputs, spec, x)
    ok = inside & (margin <= 0)
    if bool(ok.any()):
        own = own_dtype_margins(model, spec, x, ok)
        ok = ok & (own.to(ok.device) <= 0)
    return ok


def own_dtype_margins(
    model: torch.nn.Module, spec: LinearSpec, x: Tensor, which: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Violation margins ``[B]`` (float64; ``<= 0``: violated) of ``x [B, *shape]`` by the model
    in its own dtype and device, one input per forward pass; entries not in ``which`` are
    ``+inf``. ``dtype``: the dtype of a model without floating tensors (default float32)."""
    dtype = model_float_dtype(model) or dtype or torch.float32
    dev = model_device(model, x.device)
    out = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    s64 = spec.to(dtype=torch.float64)
    idx = range(x.shape[0]) if which is None else which.nonzero().flatten().tolist()
    with torch.no_grad(), ieee_float32():
        for b in idx:
            y = _forward(model, x[b : b + 1].detach().to(device=dev, dtype=dtype)).double().cpu()
            out[b] = s64.select([b]).to(device="cpu").violation_margin(y)[0]
    return out


#: step sizes (fractions of the set's width) of :func:`repair_counterexample`
REPAIR_STEPS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def repair_counterexample(
    model: torch.nn.Module, inputs: InputSet | None, spec: LinearSpec, x: Tensor, group: int | None = None
) -> tuple[bool, Tensor, str]:
    """A solver's candidate ``x [1, *shape]`` turned into a confirmed counterexample if it can be.

    An LP / MILP solution violates the property only up to the solver's tolerances, and a
    decision-boundary optimum sits on a tie. Tried in order, each checked by
    :func:`confirm_counterexample`: ``x`` projected into the set (:func:`project_into`), then
    signed-gradient steps of :data:`REPAIR_STEPS` times the set's width from it, descending the
    float64 model's largest row of ``group`` (default: the violation margin). ``inputs=None``
    checks ``x`` itself (no set to move in).

    Returns:
        ``(confirmed, point [1, *shape] float64, note)``; the point is the last one tried when
        nothing was confirmed.
    """
    dev = model_device(model, x.device)
    x, spec = x.detach().to(device=dev, dtype=torch.float64), spec.to(device=dev)
    if inputs is None:
        ok = bool(confirm_counterexample(model, Box(x, x), spec, x)[0])
        return ok, x, "confirmed" if ok else "the point does not violate the property in a forward pass"
    sets = inputs.to(device=dev, dtype=torch.float64)
    xp = project_into(sets, x)
    if bool(confirm_counterexample(model, sets, spec, xp)[0]):
        return True, xp, "confirmed"
    lo, hi = sets.bounds()
    width = float((hi - lo).abs().max()) or 1.0
    model64, s64 = _float64_model(model), spec.to(dtype=torch.float64)
    xg = xp.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            gm = s64.group_max(s64.values(_forward(model64, xg)))
            objective = gm[0, group] if group is not None else gm[0].min()
            (g,) = torch.autograd.grad(objective, xg)
    except RuntimeError as e:  # an op without a derivative (torch.heaviside): no repair step
        if "derivative" not in str(e):
            raise
        return False, xp, f"not confirmed; no gradient for a repair step ({' '.join(str(e).split())[:80]})"
    for step in REPAIR_STEPS:
        xc = project_into(sets, xp - step * width * g.sign())
        if bool(confirm_counterexample(model, sets, spec, xc)[0]):
            return True, xc, f"confirmed after a signed-gradient step of {step:g} x width"
    return False, xp, "the solver's point does not violate the property in a float32/float64 forward pass"


# ----------------------------------------------------------------------------------------
# sampling shared across the batch


def _shared_points(inputs: InputSet, n: int, gen: torch.Generator, boundary: bool = False) -> Tensor:
    """``n`` points per input set, ``[n, B, *shape]``, inside the sets. The random numbers
    (``[n, 1, *shape]``) are the same for every input of the batch.

    Boxes and l_inf balls: uniform per coordinate; with ``boundary`` half the coordinates
    (at random) sit at a face, as in :meth:`LpBall.sample`. l_2: a uniform direction with
    radius ``eps * u**(1/4)``; l_1: a Laplace direction (sign times Exp(1), l_1-normalised),
    same radius law. Balls are then projected onto the domain.
    """
    lo, hi = inputs.bounds()
    shape = (n, 1, *lo.shape[1:])
    kw: dict[str, Any] = dict(generator=gen, device=lo.device, dtype=lo.dtype)
    if isinstance(inputs, Box) or (isinstance(inputs, LpBall) and math.isinf(inputs.p)):
        u = torch.rand(shape, **kw)
        if boundary:
            corner = torch.rand(shape, **kw) < 0.5
            u = torch.where(corner, (u > 0.5).to(u.dtype), u)
        if isinstance(inputs, Box):
            return lo + u * (hi - lo)
        e = inputs._eps_view()
        return inputs._clip(inputs.center + (2 * u - 1) * e)
    if not isinstance(inputs, LpBall):
        raise SpecError(f"attacks support Box and LpBall input sets, got {type(inputs).__name__}")
    g = torch.randn(shape, **kw).flatten(2)
    if inputs.p == 1.0:
        g = g.sign() * -torch.log(torch.rand(g.shape, **kw).clamp_min(1e-30))
        nrm = g.abs().sum(dim=2, keepdim=True)
    else:
        nrm = g.norm(dim=2, keepdim=True)
    r = torch.rand((n, 1, 1), **kw) ** 0.25
    d = (g / nrm.clamp_min(1e-30) * r).view(shape) * inputs._eps_view()
    pts = inputs.center + d
    return torch.stack([inputs.project(p) for p in pts])


# ----------------------------------------------------------------------------------------
# PGD


def _step_direction(inputs: InputSet, g: Tensor, x: Tensor) -> Tensor:
    """Descent direction per example from the gradient ``g [n, *shape]`` of the margin at
    ``x``, scaled so that a step of size ``alpha`` is ``x - alpha * direction``:

    * box / l_inf: ``radius * sign(g)`` (radius ``(hi - lo) / 2`` per coordinate for boxes);
    * l_2: ``eps * g / ||g||_2``;
    * l_1: sparse steepest descent (cf. SLIDE, Tramer & Boneh 2019): the top
      ``L1_TOP_FRACTION`` of coordinates by ``|g|`` (at least one), skipping coordinates
      that sit at the domain boundary and would be pushed out, each moved by ``eps / k``
      along ``sign(g)`` -- an l_1 step of length ``eps``.
    """
    if isinstance(inputs, Box):
        return (inputs.hi - inputs.lo) / 2 * g.sign()
    assert isinstance(inputs, LpBall)  # the other input set
    e = inputs._eps_view()
    if math.isinf(inputs.p):
        return e * g.sign()
    flat = g.flatten(1)
    if inputs.p == 2.0:
        return e * (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).view_as(g)
    # l_1
    score = flat.abs()
    xf = x.flatten(1)
    if inputs.domain_hi is not None:  # -g > 0 means the step increases x
        score = torch.where((flat < 0) & (xf >= inputs.domain_hi.expand_as(x).flatten(1)), 0.0, score)
    if inputs.domain_lo is not None:
        score = torch.where((flat > 0) & (xf <= inputs.domain_lo.expand_as(x).flatten(1)), 0.0, score)
    k = max(1, int(math.ceil(L1_TOP_FRACTION * flat.shape[1])))
    top = score.topk(k, dim=1).indices
    step = torch.zeros_like(flat)
    step.scatter_(1, top, flat.gather(1, top).sign() / k)
    return e * step.view_as(g)


def _tile(inputs: InputSet, L: int) -> InputSet:
    """The batch-``b`` set repeated ``L`` times, batch ``L*b`` (lane-major, matching
    ``x [L, b, *shape].reshape(L*b, *shape)``)."""

    def rep(t):
        return t.unsqueeze(0).expand(L, *t.shape).reshape(L * t.shape[0], *t.shape[1:])

    if isinstance(inputs, Box):
        return Box(rep(inputs.lo), rep(inputs.hi))
    assert isinstance(inputs, LpBall)  # the other input set
    b = inputs.batch_size

    def dom(v):
        if isinstance(v, Tensor) and v.dim() == inputs.center.dim() and v.shape[0] == b and b > 1:
            return rep(v)
        return v

    return LpBall(rep(inputs.center), rep(inputs.eps), inputs.p, dom(inputs.domain_lo), dom(inputs.domain_hi))


def pgd_attack(
    model: torch.nn.Module,
    inputs: InputSet,
    spec: LinearSpec,
    *,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    seed: int = 0,
    timeout: float | None = None,
    targeted: bool = True,
    starts: Tensor | None = None,
    start_groups: Sequence[int] | None = None,
    from_midpoint: bool = True,
) -> AttackResult:
    """Projected gradient descent on the violation margin, batched over inputs and restarts.

    The margin ``min_g max_{i in g} row_i`` is concave in the group values, so descending it
    directly can stall at a vertex that minimises the wrong group. With ``targeted`` (and
    more than one group), every restart therefore runs once per group ``g`` (a "lane"),
    descending ``max_{i in g} row_i`` only -- the per-class targeted attack of robustness
    papers; ``L = R * G`` lanes, batch ``[L*B, *shape]``. Without it, ``L = R`` lanes descend
    the margin itself. The best point of every lane is judged by the full margin.

    Lanes of restart 0 start at the set's midpoint (the clean input of a ball), the others
    at random points of the set (:func:`_shared_points`); without ``from_midpoint`` every
    restart starts at random points (for a caller that has already run restart 0). The steps, the confirmation of
    violating points and when the run stops: :class:`_PgdLanes`. The steps' gradients come
    from :func:`verify.surrogate.attack_surrogate` (the model itself unless it has ``sign`` /
    rounding nodes or a softmax output that the property compares pairwise); every candidate
    is confirmed on ``model``.

    Args:
        model: network ``[n, *shape] -> [n, K]``; the attack runs in its floating dtype on
            the inputs' device.
        inputs: :class:`Box` or :class:`LpBall` (p in 1, 2, inf), batch ``B``.
        spec: ``LinearSpec`` with ``C [B, N, K]``.
        steps: gradient steps per lane.
        restarts: ``R`` starting points per input (``>= 1``).
        step_size: ``alpha_0`` as a fraction of the radius (eps, or half the box width per
            coordinate); default ``5 / steps``, i.e. a mean step of ``2.5 * eps / steps``.
        seed: seeds a ``torch.Generator`` on the inputs' device.
        timeout: seconds; the best points so far are returned when it runs out.
        targeted: one lane per (restart, group) instead of one per restart.
        starts: ``[S, B, *shape]`` start points (e.g. optima of a relaxation, where violations
            often sit nearby), projected into the sets; they replace the midpoint and random
            restarts (``restarts`` and ``targeted`` are then ignored): ``L = S`` lanes.
        start_groups: with ``starts``, ``[S]`` group that lane ``s`` descends (its largest
            row); default: every lane descends the margin.
        from_midpoint: restart 0 starts at the midpoint (else at random points like the others).

    Returns:
        :class:`AttackResult`; ``found`` only with a point that passes
        :func:`confirm_counterexample`'s checks (``x_adv``, float64).
    """
    t0 = time.perf_counter()
    if restarts < 1 or steps < 0:
        raise ValueError(f"need restarts >= 1 and steps >= 0, got {restarts}, {steps}")
    wdtype, work, spec_w = _working(model, inputs, spec)
    x, target = _start_lanes(work, spec_w.num_groups, restarts, targeted, seed, starts, start_groups, from_midpoint)  # [L, B, *shape]
    steps_on = attack_surrogate(model, spec)  # gradients through sign / a saturated softmax (BPDA)
    lanes = _PgdLanes(steps_on, work, spec_w, x, target, wdtype, _BestPoints(model, inputs, spec))
    lanes.descend(steps, float(step_size) if step_size is not None else 5.0 / max(steps, 1), t0, timeout)
    return _settle(lanes.record, lanes.best_x, lanes.best_m)


class _PgdLanes:
    """PGD's lanes on the batch: points ``x [L, B, *shape]`` in the working dtype, the group each
    lane descends (``target [L]``; ``None``: the margin), each lane's best point ``best_x`` and
    margin ``best_m [L, B]`` so far, the inputs still ``active [B]``, and the ``record`` of
    checked points (:class:`_BestPoints`).

    Each step is ``x <- project(x - alpha_t * direction(grad))`` (:func:`_step_direction`) with
    a cosine schedule ``alpha_t = alpha_0 (1 + cos(pi t / steps)) / 2``. Whenever lanes reach a
    margin ``<= 0`` in the working dtype, their points are projected into the set in float64
    and confirmed (:class:`_BestPoints`); an input stops on its first confirmed counterexample
    (a float32 step can leave the exact set, a near-tie can flip sign: an unconfirmed hit stops
    nothing). The run ends when all inputs have stopped, after ``steps``, or at the timeout;
    then (:func:`_settle`) every lane's lowest-margin point of the inputs still open is checked
    the same way.
    """

    def __init__(self, model: torch.nn.Module, work: InputSet, spec: LinearSpec, x: Tensor, target: Tensor | None,
                 wdtype: torch.dtype, record: "_BestPoints") -> None:
        self.model, self.work, self.spec, self.x, self.target, self.record = model, work, spec, x, target, record
        self.dev = work.device
        L, B = x.shape[0], work.batch_size
        self.best_m = torch.full((L, B), math.inf, dtype=wdtype, device=self.dev)
        self.best_x = x.clone()
        self.active = torch.ones(B, dtype=torch.bool, device=self.dev)

    def descend(self, steps: int, alpha0: float, t0: float, timeout: float | None) -> None:
        """``steps`` steps of the active inputs' lanes (evaluated once more after the last)."""
        L, shape = self.x.shape[0], self.work.shape
        cached: tuple | None = None
        for t in range(steps + 1):
            idx = self.active.nonzero().squeeze(1)
            b = idx.numel()
            if cached is None or cached[0] != b:  # the active set shrank
                cached = (b, self.spec.select(idx), _tile(self.work.select(idx), L))
            _, sub_spec, tiled = cached
            xa = self.x[:, idx].requires_grad_(True)
            with torch.enable_grad():
                y = _forward(self.model, xa.reshape(L * b, *shape)).reshape(L, b, -1)
                gm = sub_spec.group_max(sub_spec.values(y))  # [L, b, G]
                m = gm.amin(dim=-1)  # [L, b]
                loss = m if self.target is None else gm.gather(-1, self.target.view(L, 1, 1).expand(L, b, 1)).squeeze(-1)
            self._keep(idx, xa.detach(), m.detach())
            if t == steps or not self.active.any() or (timeout is not None and time.perf_counter() - t0 > timeout):
                break
            if loss.requires_grad:
                (g,) = torch.autograd.grad(loss.sum(), xa)
            else:  # the margin does not depend on x (e.g. a row C = 0)
                g = torch.zeros_like(xa)
            alpha = alpha0 * 0.5 * (1.0 + math.cos(math.pi * t / steps))
            xf = xa.detach().reshape(L * b, *shape)
            xf = tiled.project(xf - alpha * _step_direction(tiled, g.reshape(L * b, *shape), xf))
            self.x[:, idx] = xf.view(L, b, *shape)

    def _keep(self, idx: Tensor, xd: Tensor, md: Tensor) -> None:
        """The lanes' points ``xd [L, b, *shape]`` of the inputs ``idx [b]`` with margins
        ``md [L, b]``: each lane's best so far, and the violating ones offered to the record
        (the inputs confirmed stop)."""
        L, b = md.shape
        better = md < self.best_m[:, idx]
        self.best_m[:, idx] = torch.where(better, md, self.best_m[:, idx])
        bview = better.view(L, b, *([1] * len(self.work.shape)))
        self.best_x[:, idx] = torch.where(bview, xd, self.best_x[:, idx])
        hit = md <= 0
        if bool(hit.any()):  # an input stops only on a confirmed point
            self.active[idx[self.record.offer(idx, xd, hit).to(self.dev)]] = False


def _start_lanes(work: InputSet, G: int, restarts: int, targeted: bool, seed: int, starts: Tensor | None,
                 start_groups: Sequence[int] | None, from_midpoint: bool = True) -> tuple[Tensor, Tensor | None]:
    """The lanes' start points ``[L, B, *shape]`` and the group each lane descends (``[L]``, or
    ``None``: the margin): given ``starts`` projected into the sets, else per restart one lane per
    group (``targeted``) or one lane, restart 0 at the midpoint (``from_midpoint``) and the
    others at random points."""
    dev, shape, B = work.device, work.shape, work.batch_size
    if starts is not None:
        L = starts.shape[0]
        target = None if start_groups is None else torch.as_tensor(list(start_groups), dtype=torch.long, device=dev)
        flat = starts.to(device=dev, dtype=work.bounds()[0].dtype).reshape(L * B, *shape)
        return _tile(work, L).project(flat).view(L, B, *shape).detach().clone(), target
    per = G if (targeted and G > 1) else 1  # lanes per restart
    L = restarts * per
    target = (torch.arange(L, device=dev) % G) if per > 1 else None
    gen = torch.Generator(device=dev).manual_seed(seed)
    if not from_midpoint:
        return _shared_points(work, L, gen).detach().clone(), target
    first = [work.midpoint().unsqueeze(0).expand(per, *work.midpoint().shape)]
    if restarts > 1:
        first.append(_shared_points(work, L - per, gen))
    return torch.cat(first).detach().clone(), target


#: spec-row numbers that one candidate check may copy (float64: 8 bytes each)
CHECK_ELEMENTS = 2**24


def _settle(record: _BestPoints, best_x: Tensor, best_m: Tensor) -> AttackResult:
    """For the inputs not yet done, offer the lanes' best points ``best_x [L, B, *shape]`` that
    violate in the working dtype (``best_m [L, B] <= 0``) and each input's lowest-margin lane
    (checking every lane copies the spec rows per lane: 27 GB on an ml4acopf spec)."""
    rest = (~record.found).nonzero().flatten()
    if rest.numel():
        r = rest.to(best_m.device)
        bm = best_m[:, r]
        mask = bm <= 0
        mask[bm.argmin(dim=0), torch.arange(r.numel(), device=bm.device)] = True
        record.offer(rest, best_x[:, r], mask)
    return record.result()


class _BestPoints:
    """The attacks' record per input set (batch ``B``): the best point checked so far, projected
    into the set in float64 (:func:`project_into`), and whether it is a confirmed counterexample.

    Candidates come from float arithmetic in the model's dtype on outward-rounded sets, so they
    can sit a rounding step outside the set; :meth:`offer` projects every one into the set's
    exact (float64) bounds and runs :func:`confirm_counterexample`'s checks on the projected
    point, which is what is kept and reported. A confirmed point is never replaced.

    Attributes:
        x: ``[B, *shape]`` float64, inside the sets.
        margin: ``[B]`` float64 violation margin at ``x`` (plain float64 forward pass); ``+inf``
            until a candidate with a finite margin was offered.
        found: ``[B]`` bool, ``x`` is a confirmed counterexample.
    """

    def __init__(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec) -> None:
        self.model, self.model64 = model, _float64_model(model)
        self.dtype = _work_dtype(model, inputs)
        self.inputs, self.spec = inputs, spec
        self.x = project_into(inputs, inputs.midpoint())
        B, dev = inputs.batch_size, self.x.device
        self.margin = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
        self.found = torch.zeros(B, dtype=torch.bool, device=dev)

    def offer(self, idx: Tensor, cand: Tensor, mask: Tensor | None = None) -> Tensor:
        """Check candidates ``cand [n, b, *shape]`` (any float dtype) for the inputs ``idx [b]``,
        only where ``mask [n, b]`` (default: all). Per input not yet done, the confirmed
        projected candidate of lowest float64 margin becomes its counterexample; failing that,
        the lowest-margin one replaces ``x`` if it beats ``margin``.

        Returns:
            ``found[idx]``, ``[b]`` bool.
        """
        n, b = cand.shape[:2]
        todo = ~self.found[idx].view(1, b).expand(n, b)
        mask = todo if mask is None else mask & todo
        lane, col = mask.nonzero(as_tuple=True)
        if lane.numel() == 0:
            return self.found[idx]
        xp, margin = self._project_and_check(idx[col], cand[lane, col])
        where = torch.full((n, b), -1, dtype=torch.long, device=lane.device)  # [n, b] row of xp
        where[lane, col] = torch.arange(lane.numel(), device=lane.device)
        score = torch.full((n, b), math.inf, dtype=torch.float64, device=lane.device)
        score[lane, col] = margin.to(lane.device)
        self._confirm_best(idx, xp, margin, where, score.clone())
        self._keep_lowest(idx, xp, margin, where, score)
        return self.found[idx]

    def _project_and_check(self, owner: Tensor, pts: Tensor) -> tuple[Tensor, Tensor]:
        """Points ``pts [k, *shape]`` of the sets ``owner [k]`` projected into them in float64,
        ``[k, *shape]``, and their float64 margins ``[k]`` (``+inf`` where not inside or NaN), in
        chunks whose copies of the spec rows hold at most :data:`CHECK_ELEMENTS` numbers (an
        ml4acopf spec has 3.4 million per input: 27 GB for all lanes at once)."""
        step = max(1, CHECK_ELEMENTS // max(1, self.spec.C[0].numel()))
        parts = [self._project_and_check_chunk(owner[s : s + step], pts[s : s + step]) for s in range(0, owner.numel(), step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _project_and_check_chunk(self, owner: Tensor, pts: Tensor) -> tuple[Tensor, Tensor]:
        sets = self.inputs.select(owner)
        xp = project_into(sets, pts)
        inside, margin = _check(self.model64, sets, self.spec.select(owner), xp)
        return xp, torch.where(inside & ~margin.isnan(), margin, math.inf)

    def _confirm_best(self, idx: Tensor, xp: Tensor, margin: Tensor, where: Tensor, score: Tensor) -> None:
        """Per input, try the violating candidates (``score [n, b] <= 0``) in order of margin
        with the model in its own dtype (:func:`own_dtype_margins`) until one is confirmed."""
        cols = torch.arange(score.shape[1], device=score.device)
        while True:
            low, lane = score.min(dim=0)  # [b]
            try_ = low <= 0
            if not bool(try_.any()):
                return
            c, pos = cols[try_], where[lane[try_], cols[try_]]
            own = own_dtype_margins(self.model, self.spec.select(idx[c]), xp[pos], dtype=self.dtype).to(score.device)
            ok = own <= 0
            self._set(idx[c[ok]], xp[pos[ok]], margin[pos[ok]], found=True)
            score[lane[c], c] = math.inf  # tried
            score[:, c[ok]] = math.inf  # done

    def _keep_lowest(self, idx: Tensor, xp: Tensor, margin: Tensor, where: Tensor, score: Tensor) -> None:
        """Per input not done, the candidate of lowest margin replaces ``x`` if it beats it."""
        low, lane = score.min(dim=0)  # [b]
        better = (low < self.margin[idx]) & ~self.found[idx]
        if bool(better.any()):
            c = better.nonzero().flatten()
            pos = where[lane[c], c]
            self._set(idx[c], xp[pos], margin[pos], found=False)

    def _set(self, which: Tensor, x: Tensor, margin: Tensor, found: bool) -> None:
        """Record ``x [k, *shape]`` (float64, in the sets) and ``margin [k]`` for inputs ``which [k]``."""
        self.x[which] = x.to(self.x.device)
        self.margin[which] = margin.to(self.margin.device)
        self.found[which] = found

    def result(self) -> AttackResult:
        """The record as an :class:`AttackResult` (copies)."""
        return AttackResult(found=self.found.clone(), x_adv=self.x.clone(), margin=self.margin.clone())


# ----------------------------------------------------------------------------------------
# random sampling


def random_attack(
    model: torch.nn.Module,
    inputs: InputSet,
    spec: LinearSpec,
    *,
    samples: int = 1000,
    seed: int = 0,
    chunk: int = 256,
    timeout: float | None = None,
) -> AttackResult:
    """Evaluate ``samples`` points per input: the midpoint, then random points of the set
    (:func:`_shared_points` with ``boundary=True``), ``chunk`` points per input per forward
    pass. Samples with a margin ``<= 0`` in the model's dtype are projected into the set in
    float64 and confirmed (:class:`_BestPoints`); an input stops at its first chunk with a
    confirmed counterexample. With ``timeout`` (seconds) no chunk starts after it; chunks then
    start at 8 points and grow while they stay short.

    Returns:
        :class:`AttackResult`: per input the confirmed counterexample, else the lowest-margin
        sample (projected into the set, margin from a float64 forward pass).
    """
    if samples < 1 or chunk < 1:
        raise ValueError(f"need samples >= 1 and chunk >= 1, got {samples}, {chunk}")
    wdtype, work, spec_w = _working(model, inputs, spec)
    dev = work.device
    B, shape = work.batch_size, work.shape
    gen = torch.Generator(device=dev).manual_seed(seed)
    best_m = torch.full((B,), math.inf, dtype=wdtype, device=dev)
    best_x = work.midpoint().clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)
    record = _BestPoints(model, inputs, spec)
    done_n = 0
    t0 = time.perf_counter()
    size = chunk if timeout is None else min(chunk, 8)
    with torch.no_grad():
        while done_n < samples and active.any():
            if timeout is not None and done_n and time.perf_counter() - t0 >= timeout:
                break
            n = min(size, samples - done_n)
            t_chunk = time.perf_counter()
            if done_n == 0:
                pts = torch.cat([work.midpoint().unsqueeze(0), _shared_points(work, n - 1, gen, boundary=True)]) if n > 1 else work.midpoint().unsqueeze(0)
            else:
                pts = _shared_points(work, n, gen, boundary=True)
            done_n += n
            idx = active.nonzero().squeeze(1)
            b = idx.numel()
            p = pts[:, idx]
            m = spec_w.select(idx).violation_margin(_forward(model, p.reshape(n * b, *shape)).reshape(n, b, -1))
            mi, arg = m.min(dim=0)
            better = mi < best_m[idx]
            best_m[idx] = torch.where(better, mi, best_m[idx])
            chosen = p[arg, torch.arange(b, device=dev)]
            best_x[idx] = torch.where(better.view(b, *([1] * len(shape))), chosen, best_x[idx])
            hit = m <= 0
            if bool(hit.any()):  # an input stops only on a confirmed point
                active[idx[record.offer(idx, p, hit).to(dev)]] = False
            if timeout is not None:  # the next chunk takes at most ~1/4 of what is left
                per_point = (time.perf_counter() - t_chunk) / n
                left = timeout - (time.perf_counter() - t0)
                size = int(max(1, min(chunk, 0.25 * left / max(per_point, 1e-9))))
    return _settle(record, best_x.unsqueeze(0), best_m.unsqueeze(0))
