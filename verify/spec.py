"""Specifications: the input set a perturbation may reach and the output property to prove.

Input sets (batched: the leading dimension is the batch ``B``):

* :class:`Box` -- ``lo <= x <= hi`` elementwise, tensors ``[B, *input_shape]``.
* :class:`LpBall` -- ``||x - center||_p <= eps`` intersected with the valid input domain
  ``[domain_lo, domain_hi]``, for ``p`` in {1, 2, inf}; ``eps`` is a float or a tensor ``[B]``.

Output properties (sugar over one linear form):

* :class:`Robust` -- ``y[label] > y[j]`` for every ``j != label``.
* :class:`TopK` -- ``label`` is among the ``k`` largest outputs.
* :class:`Linear` -- a general property given as matrices (VNN-LIB properties land here).
* :class:`OutputBounds` -- ``lower <= y <= upper`` (regression).

Every property turns into a :class:`LinearSpec`: rows ``C y + d`` with a group index per row.
The property **holds** at an output ``y`` iff every group has at least one row with
``C_i y + d_i > 0``. It is **violated** iff some group has all its rows ``<= 0``. This is
exactly the VNN-LIB reading (a file describes the violation as an OR of ANDs: one AND per
group), and a robustness property is the special case of one row per group.

A deterministic method proves a property on an input set by lower-bounding every row over the
set and checking ``max over rows in group of lower > 0`` for every group.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

__all__ = [
    "SpecError",
    "InputSet",
    "Box",
    "LpBall",
    "OutputProperty",
    "LinearSpec",
    "Robust",
    "TopK",
    "Linear",
    "OutputBounds",
    "norm_name",
    "parse_norm",
]


class SpecError(ValueError):
    """A specification is malformed (negative eps, NaN, shape mismatch, ...)."""


def parse_norm(p: float | int | str) -> float:
    """Normalise a norm name (``"inf"``, ``"linf"``, ``2``, ``"l1"`` ...) to 1.0, 2.0 or inf."""
    if isinstance(p, str):
        s = p.lower().strip().removeprefix("l").removeprefix("_")
        if s in ("inf", "infty", "infinity"):
            return math.inf
        try:
            p = float(s)
        except ValueError:
            raise SpecError(f"unknown norm {p!r}: use 1, 2 or inf") from None
    p = float(p)
    if p not in (1.0, 2.0, math.inf):
        raise SpecError(f"unsupported norm p={p}: use 1, 2 or inf")
    return p


def norm_name(p: float) -> str:
    """``inf -> "linf"``, ``2.0 -> "l2"``, ``1.0 -> "l1"``."""
    return "linf" if math.isinf(p) else f"l{int(p)}"


def dual_norm(p: float) -> float:
    """Hoelder dual exponent q with 1/p + 1/q = 1 (for p in {1, 2, inf})."""
    return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[float(p)]


def _check_finite(name: str, t: Tensor, allow_inf: bool = True) -> None:
    """A float tensor without NaN (and, with ``allow_inf=False``, without +-inf)."""
    if not torch.is_floating_point(t):
        raise SpecError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if torch.isnan(t).any():
        raise SpecError(f"{name} contains NaN")
    if not allow_inf and torch.isinf(t).any():
        raise SpecError(f"{name} contains inf in {int(torch.isinf(t).sum())} entries; inputs must be finite")


def _check_meets_domain(ball: "LpBall") -> None:
    """Refuse a ball that does not meet its domain (an empty input set: every answer about
    it, a counterexample above all, would be meaningless). The l_p distance from the centre
    to the domain box is computed in float64 and compared with the radius."""
    if ball.domain_lo is None and ball.domain_hi is None:
        return
    c = ball.center.double()
    gap = torch.zeros_like(c)
    if ball.domain_lo is not None:
        gap = gap + (ball.domain_lo.double() - c).clamp_min(0)
    if ball.domain_hi is not None:
        gap = gap + (c - ball.domain_hi.double()).clamp_min(0)
    dist = gap.flatten(1).norm(p=ball.p, dim=1)
    bad = (dist > ball.eps.double()).nonzero().flatten()
    if bad.numel():
        b = int(bad[0])
        raise SpecError(
            f"LpBall: the ball of example {b} (radius {float(ball.eps[b]):g}) does not meet the input domain "
            f"[{_describe(ball.domain_lo)}, {_describe(ball.domain_hi)}]: its centre is {float(dist[b]):g} away "
            f"in {norm_name(ball.p)} ({bad.numel()} of {c.shape[0]} examples)"
        )


def _describe(v: Tensor | None) -> str:
    """A domain end for a message: the value if it is one number, else its range."""
    if v is None:
        return "unbounded"
    lo, hi = float(v.min()), float(v.max())
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"


class InputSet:
    """Base class of batched input sets. Subclasses implement the methods below (``batch_size``
    and ``shape`` come from :meth:`_batched`)."""

    def _batched(self) -> Tensor:
        """A ``[B, *shape]`` tensor of the set (a box's ``lo``, a ball's ``center``)."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self._batched().shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-example input shape."""
        return tuple(self._batched().shape[1:])

    @property
    def device(self) -> torch.device:
        """Where the set's tensors live."""
        return self._batched().device

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Elementwise box enclosure ``(lo, hi)``, each ``[B, *shape]``."""
        raise NotImplementedError

    def midpoint(self) -> Tensor:
        """A point inside the set per example, ``[B, *shape]`` (the clean input for balls)."""
        lo, hi = self.bounds()
        return (lo + hi) / 2

    def project(self, x: Tensor) -> Tensor:
        """Project ``x [B, *shape]`` onto the set (exactly for boxes and l_inf balls)."""
        raise NotImplementedError

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        """Bool ``[B]``: whether ``x[b]`` lies in set ``b`` (within ``tol``)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points per example drawn inside the set, ``[n, B, *shape]``."""
        raise NotImplementedError

    def select(self, index: Tensor | list[int] | slice) -> "InputSet":
        """The sub-batch at ``index``."""
        raise NotImplementedError

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "InputSet":
        raise NotImplementedError


@dataclass
class Box(InputSet):
    """Axis-aligned box ``lo <= x <= hi``; ``lo``, ``hi``: ``[B, *shape]``."""

    lo: Tensor
    hi: Tensor

    def __post_init__(self) -> None:
        self.lo = torch.as_tensor(self.lo)
        self.hi = torch.as_tensor(self.hi)
        if not torch.is_floating_point(self.lo):
            self.lo = self.lo.float()
        if not torch.is_floating_point(self.hi):
            self.hi = self.hi.to(self.lo.dtype)
        _check_finite("Box.lo", self.lo, allow_inf=False)
        _check_finite("Box.hi", self.hi, allow_inf=False)
        if self.lo.shape != self.hi.shape:
            raise SpecError(f"Box: lo has shape {tuple(self.lo.shape)} but hi has {tuple(self.hi.shape)}")
        if self.lo.dim() < 2:
            raise SpecError("Box: lo/hi need a batch dimension, shape [B, *input_shape]")
        if (self.lo > self.hi).any():
            n = int((self.lo > self.hi).sum())
            raise SpecError(f"Box: lo > hi in {n} coordinates (empty box)")

    def _batched(self) -> Tensor:
        return self.lo

    def bounds(self) -> tuple[Tensor, Tensor]:
        return self.lo, self.hi

    def project(self, x: Tensor) -> Tensor:
        return torch.max(torch.min(x, self.hi), self.lo)

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        ok = (x >= self.lo - tol) & (x <= self.hi + tol)
        return ok.flatten(1).all(dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand((n, *self.lo.shape), generator=generator, device=self.lo.device, dtype=self.lo.dtype)
        return self.lo + u * (self.hi - self.lo)

    def select(self, index) -> "Box":
        return Box(self.lo[index], self.hi[index])

    def to(self, device=None, dtype=None) -> "Box":
        """The box on ``device`` in ``dtype``; a conversion to a coarser dtype rounds ``lo``
        down and ``hi`` up, so the new box encloses the old one (a float64 VNN-LIB box for a
        float32 model)."""
        return Box(_convert_outward(self.lo, device, dtype, down=True), _convert_outward(self.hi, device, dtype, down=False))


@dataclass
class LpBall(InputSet):
    """``{x : ||x - center||_p <= eps, domain_lo <= x <= domain_hi}``.

    Args:
        center: ``[B, *shape]`` clean inputs.
        eps: radius, float or ``[B]`` tensor, ``>= 0``.
        p: 1, 2 or inf (strings like ``"linf"`` accepted).
        domain_lo, domain_hi: valid input range (floats or tensors broadcastable to
            ``center``); ``None`` means unbounded. Images in [0, 1] use ``(0.0, 1.0)``.
    """

    # the types after __post_init__; the constructor also takes the forms of the docstring
    center: Tensor
    eps: Tensor
    p: float = math.inf
    domain_lo: Tensor | None = None
    domain_hi: Tensor | None = None

    if TYPE_CHECKING:
        def __init__(self, center: Tensor, eps: Tensor | float, p: float | str = math.inf,
                     domain_lo: Tensor | float | None = None, domain_hi: Tensor | float | None = None) -> None: ...

    def __post_init__(self) -> None:
        self.center = torch.as_tensor(self.center)
        if not torch.is_floating_point(self.center):
            self.center = self.center.float()
        _check_finite("LpBall.center", self.center, allow_inf=False)
        if self.center.dim() < 2:
            raise SpecError("LpBall: center needs a batch dimension, shape [B, *input_shape]")
        self.p = parse_norm(self.p)
        eps = _round_up(self.eps, self.center.dtype, self.center.device)
        if eps.dim() == 0:
            eps = eps.expand(self.center.shape[0]).clone()
        if eps.shape != (self.center.shape[0],):
            raise SpecError(f"LpBall: eps must be a scalar or shape [{self.center.shape[0]}], got {tuple(eps.shape)}")
        if torch.isnan(eps).any():
            raise SpecError("LpBall: eps is NaN")
        if (eps < 0).any():
            raise SpecError(f"LpBall: eps must be >= 0, got {float(eps.min())}")
        self.eps = eps
        for name in ("domain_lo", "domain_hi"):
            v = getattr(self, name)
            if v is not None:
                v = torch.as_tensor(v, dtype=self.center.dtype, device=self.center.device)
                _check_finite(f"LpBall.{name}", v)
                setattr(self, name, v)
        if self.domain_lo is not None and self.domain_hi is not None and (self.domain_lo > self.domain_hi).any():
            raise SpecError("LpBall: domain_lo > domain_hi")
        _check_meets_domain(self)

    def _batched(self) -> Tensor:
        return self.center

    def _eps_view(self) -> Tensor:
        return self.eps.view(-1, *([1] * (self.center.dim() - 1)))

    def _clip(self, x: Tensor) -> Tensor:
        if self.domain_lo is not None:
            x = torch.max(x, self.domain_lo.expand_as(x))
        if self.domain_hi is not None:
            x = torch.min(x, self.domain_hi.expand_as(x))
        return x

    def bounds(self) -> tuple[Tensor, Tensor]:
        """The enclosing box, rounded outward: every l_p ball with p >= 1 lies inside the l_inf
        ball of the same radius, and ``center -/+ eps`` rounded to nearest can lie inside the
        exact ``center -/+ eps`` (for ``eps`` below half a float step of the centre the box
        would collapse onto the centre); one step outward encloses the exact value."""
        parts = (self.center, self.eps, self.domain_lo, self.domain_hi)
        versions = tuple(t._version if isinstance(t, Tensor) else t for t in parts)
        memo = self.__dict__.get("_bounds_memo")  # the engines ask once per pass: keep the last box
        if (memo is not None and all(a is b for a, b in zip(memo[0], parts)) and memo[1] == versions
                and memo[3] == (memo[2][0]._version, memo[2][1]._version)):  # nobody wrote into it
            return memo[2]
        e = self._eps_view()
        lo, hi = self.center - e, self.center + e
        moved = e > 0
        lo = torch.where(moved, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
        hi = torch.where(moved, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
        box = (self._clip(lo), self._clip(hi))
        if not (box[0].requires_grad or box[1].requires_grad):
            self.__dict__["_bounds_memo"] = (parts, versions, box, (box[0]._version, box[1]._version))
        return box

    def midpoint(self) -> Tensor:
        return self.center

    def project(self, x: Tensor) -> Tensor:
        """Projection onto the ball, then the domain. Exact for l_inf; for l_1/l_2 the
        result is inside the ball and the domain (alternating once, ball first then clip,
        then a final rescale keeps both constraints)."""
        c = self.center
        d = (x - c).flatten(1)
        eps = self.eps.view(-1, 1)
        if math.isinf(self.p):
            d = torch.max(torch.min(d, eps), -eps)
        elif self.p == 2.0:
            n = d.norm(dim=1, keepdim=True).clamp_min(1e-30)
            d = d * torch.clamp(eps / n, max=1.0)
        else:
            d = _project_l1(d, eps.squeeze(1))
        x = self._clip(c + d.view_as(x))
        return x

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        c = self.center
        d = (x - c).flatten(1)
        n = d.abs().amax(dim=1) if math.isinf(self.p) else d.norm(p=self.p, dim=1)
        ok = n <= self.eps + tol
        if self.domain_lo is not None:
            ok &= (x >= self.domain_lo - tol).flatten(1).all(dim=1)
        if self.domain_hi is not None:
            ok &= (x <= self.domain_hi + tol).flatten(1).all(dim=1)
        return ok

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform-direction samples in the ball (boundary-heavy for l_inf: half the
        coordinates at a corner), clipped to the domain. Not uniform in volume; meant for
        soundness checks, which want points near the boundary."""
        c = self.center
        shape = (n, *c.shape)
        kw: dict[str, Any] = dict(generator=generator, device=c.device, dtype=c.dtype)
        e = self.eps.view(1, -1, *([1] * (c.dim() - 1)))
        if math.isinf(self.p):
            u = torch.rand(shape, **kw) * 2 - 1
            corner = torch.rand(shape, **kw) < 0.5
            u = torch.where(corner, u.sign(), u)
            d = u * e
        else:
            g = torch.randn(shape, **kw).flatten(2)
            if self.p == 1.0:
                expo = -torch.log(torch.rand(g.shape, **kw).clamp_min(1e-30))  # Exp(1), seeded
                g = g.sign() * expo
                nrm = g.abs().sum(dim=2, keepdim=True)
            else:
                nrm = g.norm(dim=2, keepdim=True)
            r = torch.rand((n, c.shape[0], 1), **kw) ** 0.25  # radius skewed to the boundary
            d = (g / nrm.clamp_min(1e-30) * r).view(shape) * e
        return self._clip(c.unsqueeze(0) + d)

    def select(self, index) -> "LpBall":
        def sel(v):
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size and v.dim() == self.center.dim():
                return v[index]
            return v
        return LpBall(self.center[index], self.eps[index], self.p, sel(self.domain_lo), sel(self.domain_hi))

    def with_eps(self, eps: Tensor | float) -> "LpBall":
        """The same balls with another radius (float or ``[B]``)."""
        return LpBall(self.center, eps, self.p, self.domain_lo, self.domain_hi)

    def to(self, device=None, dtype=None) -> "LpBall":
        """The ball on ``device`` in ``dtype``. A conversion to a coarser dtype moves the centre
        by its rounding ``delta``; the radius then grows by ``||delta||_p`` (rounded up) and
        the domain bounds round outward, so the new set encloses the old one."""
        def mv(v, down: bool):
            return _convert_outward(v, device, dtype, down) if isinstance(v, Tensor) else v

        center = self.center.to(device=device, dtype=dtype)
        eps = self.eps
        if center.dtype != self.center.dtype:
            delta = (center.to(self.center.dtype) - self.center.to(center.device)).flatten(1)
            shift = delta.abs().amax(dim=1) if math.isinf(self.p) else delta.norm(p=self.p, dim=1)
            if bool((shift > 0).any()):
                eps = eps.to(center.device) + shift
                eps = torch.where(shift > 0, torch.nextafter(eps, torch.full_like(eps, math.inf)), eps)
        return LpBall(center, _round_up(eps, center.dtype, center.device), self.p, mv(self.domain_lo, True), mv(self.domain_hi, False))


def _convert_outward(t: Tensor, device, dtype: torch.dtype | None, down: bool) -> Tensor:
    """``t`` on ``device`` in ``dtype``, rounded down (``down``) or up where the conversion
    lost precision (to nearest, it may move either way)."""
    new = t.to(device=device, dtype=dtype)
    if new.dtype == t.dtype:
        return new
    back = new.to(t.dtype)
    ref = t.to(back.device)
    moved = back > ref if down else back < ref
    if bool(moved.any()):
        new = torch.where(moved, torch.nextafter(new, torch.full_like(new, -math.inf if down else math.inf)), new)
    return new


def _round_up(value: Tensor | float, dtype: torch.dtype, device) -> Tensor:
    """``value`` in ``dtype``, rounded up where the conversion lost precision, so that a ball
    proved at the stored radius contains the ball asked for (0.01 in float32 is 0.0099999998;
    we store 0.0100000007)."""
    exact = torch.as_tensor(value, dtype=torch.float64, device=device) if not torch.is_tensor(value) or not value.dtype == dtype else value
    if exact.dtype == dtype:
        return exact.to(device)
    low = exact.to(dtype)
    up = torch.nextafter(low, torch.full_like(low, math.inf))
    return torch.where(low.to(exact.dtype) < exact, up, low)


def _project_l1(d: Tensor, eps: Tensor) -> Tensor:
    """Euclidean projection of rows of ``d [B, n]`` onto l1 balls of radius ``eps [B]``
    (Duchi et al. 2008, sort-based)."""
    a = d.abs()
    inside = a.sum(dim=1) <= eps
    s, _ = torch.sort(a, dim=1, descending=True)
    cs = s.cumsum(dim=1)
    k = torch.arange(1, d.shape[1] + 1, device=d.device, dtype=d.dtype)
    cond = s - (cs - eps.unsqueeze(1)) / k > 0
    rho = cond.to(d.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True index
    rho = torch.where(cond.any(dim=1, keepdim=True), (cond * torch.arange(d.shape[1], device=d.device)).amax(dim=1, keepdim=True), rho)
    theta = (cs.gather(1, rho) - eps.unsqueeze(1)) / (rho + 1).to(d.dtype)
    proj = d.sign() * torch.clamp(a - theta, min=0)
    return torch.where(inside.unsqueeze(1), d, proj)


# ----------------------------------------------------------------------------------------
# output properties


@dataclass
class LinearSpec:
    """Batched linear output property: rows ``C y + d`` grouped by ``groups``.

    Attributes:
        C: ``[B, N, K]`` row matrices on the ``K`` network outputs.
        d: ``[B, N]`` offsets.
        groups: ``[N]`` long tensor, the group of each row (``0..G-1``).

    Holds at ``y`` iff for every group some row has ``C_i y + d_i > 0``.
    """

    C: Tensor
    d: Tensor
    groups: Tensor

    def __post_init__(self) -> None:
        if self.C.dim() != 3:
            raise SpecError(f"LinearSpec.C must be [B, N, K], got shape {tuple(self.C.shape)}")
        if self.d.shape != self.C.shape[:2]:
            raise SpecError(f"LinearSpec.d must be [B, N] = {tuple(self.C.shape[:2])}, got {tuple(self.d.shape)}")
        self.groups = torch.as_tensor(self.groups, dtype=torch.long, device=self.C.device)
        if self.groups.shape != (self.C.shape[1],):
            raise SpecError(f"LinearSpec.groups must have shape [{self.C.shape[1]}], got {tuple(self.groups.shape)}")
        _check_finite("LinearSpec.C", self.C)
        _check_finite("LinearSpec.d", self.d)

    @property
    def num_groups(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.numel() else 0

    def values(self, y: Tensor) -> Tensor:
        """Row values ``C y + d`` for outputs ``y [B, K]`` (or ``[S, B, K]``) -> ``[B, N]`` (``[S, B, N]``)."""
        return torch.einsum("bnk,...bk->...bn", self.C.to(y), y) + self.d.to(y)

    def group_max(self, rows: Tensor) -> Tensor:
        """Max over the rows of each group: ``[..., N] -> [..., G]``."""
        G = self.num_groups
        out = torch.full((*rows.shape[:-1], G), -math.inf, dtype=rows.dtype, device=rows.device)
        idx = self.groups.to(rows.device).expand_as(rows)
        return out.scatter_reduce(-1, idx, rows, reduce="amax")

    def holds(self, y: Tensor) -> Tensor:
        """Bool ``[..., B]``: whether the property holds at outputs ``y``."""
        return (self.group_max(self.values(y)) > 0).all(dim=-1)

    def violation_margin(self, y: Tensor) -> Tensor:
        """``min over groups of max over rows``: > 0 iff the property holds; an attack
        minimises it. ``[..., B]``."""
        return self.group_max(self.values(y)).amin(dim=-1)

    def certified_by(self, lower: Tensor, margin: float = 0.0) -> Tensor:
        """Bool ``[B]``: lower bounds ``[B, N]`` of the rows prove the property."""
        return (self.group_max(lower) > margin).all(dim=-1)

    def select(self, index) -> "LinearSpec":
        return LinearSpec(self.C[index], self.d[index], self.groups)

    def to(self, device=None, dtype=None) -> "LinearSpec":
        return LinearSpec(self.C.to(device=device, dtype=dtype), self.d.to(device=device, dtype=dtype), self.groups.to(device))


class OutputProperty:
    """Base of output properties; ``linear(batch, num_outputs)`` gives the common form."""

    def linear(self, batch_size: int, num_outputs: int, device=None, dtype=torch.float32) -> LinearSpec:
        raise NotImplementedError

    def labels(self) -> Tensor | None:
        """Class labels ``[B]`` for classification properties, else ``None``."""
        return None


def _labels_tensor(label, name: str) -> Tensor:
    t = torch.as_tensor(label)
    if t.dim() == 0:
        t = t.view(1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise SpecError(f"{name}: labels must be integers, got {t.dtype}")
    return t.long()


@dataclass
class Robust(OutputProperty):
    """``argmax y == label`` strictly: ``y[label] - y[j] > 0`` for all ``j != label``.

    ``label``: int or ``[B]`` long tensor.
    """

    label: Tensor  # after __post_init__; the constructor also takes an int

    if TYPE_CHECKING:
        def __init__(self, label: Tensor | int) -> None: ...

    def __post_init__(self) -> None:
        self.label = _labels_tensor(self.label, "Robust")

    def labels(self) -> Tensor:
        return self.label

    def linear(self, batch_size: int, num_outputs: int, device=None, dtype=torch.float32) -> LinearSpec:
        lab = self.label.to(device)
        if lab.numel() == 1 and batch_size > 1:
            lab = lab.expand(batch_size)
        if lab.shape != (batch_size,):
            raise SpecError(f"Robust: {lab.numel()} labels for a batch of {batch_size}")
        if (lab < 0).any() or (lab >= num_outputs).any():
            raise SpecError(f"Robust: label out of range for {num_outputs} outputs")
        K = num_outputs
        eye = torch.eye(K, device=device, dtype=dtype)
        # others[b] = the K-1 classes other than lab[b], in increasing order
        ar = torch.arange(K, device=device).expand(batch_size, K)
        others = ar[ar != lab.unsqueeze(1)].view(batch_size, K - 1)
        C = eye[lab].unsqueeze(1) - eye[others]
        d = torch.zeros(batch_size, K - 1, device=device, dtype=dtype)
        return LinearSpec(C, d, torch.arange(K - 1, device=device))


@dataclass
class TopK(OutputProperty):
    """``label`` is among the ``k`` largest outputs: for every set S of ``k`` other classes,
    some ``j`` in S has ``y[label] > y[j]`` (one group per S; fine for small K and k)."""

    label: Tensor  # after __post_init__; the constructor also takes an int
    k: int = 1

    if TYPE_CHECKING:
        def __init__(self, label: Tensor | int, k: int = 1) -> None: ...

    def __post_init__(self) -> None:
        self.label = _labels_tensor(self.label, "TopK")
        if int(self.k) < 1:
            raise SpecError(f"TopK: k must be >= 1, got {self.k}")
        self.k = int(self.k)

    def labels(self) -> Tensor:
        return self.label

    def linear(self, batch_size: int, num_outputs: int, device=None, dtype=torch.float32) -> LinearSpec:
        base = Robust(self.label).linear(batch_size, num_outputs, device, dtype)
        K1 = num_outputs - 1
        if self.k > K1:
            raise SpecError(f"TopK: k={self.k} but only {num_outputs} outputs")
        combos = list(itertools.combinations(range(K1), self.k))
        if len(combos) * self.k > 100_000:
            raise SpecError(f"TopK: {len(combos)} groups, too many for k={self.k}, K={num_outputs}")
        rows = torch.tensor([i for c in combos for i in c], device=device)
        groups = torch.arange(len(combos), device=device).repeat_interleave(self.k)
        return LinearSpec(base.C[:, rows], base.d[:, rows], groups)


@dataclass
class Linear(OutputProperty):
    """A general linear property in the :class:`LinearSpec` convention.

    ``C``: ``[N, K]`` or ``[B, N, K]``; ``d``: ``[N]`` or ``[B, N]``; ``groups``: ``[N]``
    (default: every row its own group, i.e. all rows must be positive).
    """

    C: Tensor
    d: Tensor | None = None
    groups: Tensor | None = None

    def __post_init__(self) -> None:
        self.C = torch.as_tensor(self.C, dtype=torch.float64 if not torch.is_tensor(self.C) else None)
        if not torch.is_floating_point(self.C):
            self.C = self.C.double()
        if self.C.dim() not in (2, 3):
            raise SpecError(f"Linear: C must be [N, K] or [B, N, K], got {tuple(self.C.shape)}")
        N = self.C.shape[-2]
        self.d = torch.zeros(self.C.shape[:-1], dtype=self.C.dtype) if self.d is None else torch.as_tensor(self.d).to(self.C.dtype)
        if self.d.shape[-1] != N:
            raise SpecError(f"Linear: d has {self.d.shape[-1]} rows but C has {N}")
        self.groups = torch.arange(N) if self.groups is None else torch.as_tensor(self.groups, dtype=torch.long)
        if self.groups.shape != (N,):
            raise SpecError(f"Linear: groups must have shape [{N}]")
        _check_finite("Linear.C", self.C)
        _check_finite("Linear.d", self.d)

    def linear(self, batch_size: int, num_outputs: int, device=None, dtype=torch.float32) -> LinearSpec:
        C, d, groups = self.C, self.d, self.groups
        assert d is not None and groups is not None  # set by __post_init__
        if C.shape[-1] != num_outputs:
            raise SpecError(f"Linear: C has {C.shape[-1]} columns but the network has {num_outputs} outputs")
        if C.dim() == 2:
            C = C.expand(batch_size, *C.shape)
        if d.dim() == 1:
            d = d.expand(batch_size, *d.shape)
        if C.shape[0] != batch_size or d.shape[0] != batch_size:
            raise SpecError(f"Linear: batch of C/d is {C.shape[0]}/{d.shape[0]}, inputs {batch_size}")
        return LinearSpec(C.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype), groups.to(device))


@dataclass
class OutputBounds(OutputProperty):
    """Regression property ``lower <= y <= upper`` (each a float, ``[K]`` or ``[B, K]``;
    ``None`` for no bound on that side). Strict inequalities are what is proved."""

    lower: Tensor | None = None  # after __post_init__; the constructor also takes floats
    upper: Tensor | None = None

    if TYPE_CHECKING:
        def __init__(self, lower: Tensor | float | None = None, upper: Tensor | float | None = None) -> None: ...

    def __post_init__(self) -> None:
        if self.lower is None and self.upper is None:
            raise SpecError("OutputBounds: give lower, upper or both")
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if v is not None:
                v = torch.as_tensor(v, dtype=torch.float64)
                _check_finite(f"OutputBounds.{name}", v)
                setattr(self, name, v)

    def linear(self, batch_size: int, num_outputs: int, device=None, dtype=torch.float32) -> LinearSpec:
        eye = torch.eye(num_outputs, device=device, dtype=dtype)
        Cs, ds = [], []
        for v, sign in ((self.lower, 1.0), (self.upper, -1.0)):
            if v is None:
                continue
            fits = v.dim() == 0 or (v.dim() == 1 and v.shape[0] == num_outputs)
            v = v.to(device=device, dtype=dtype).expand(batch_size, num_outputs) if fits else v.to(device=device, dtype=dtype)
            if v.shape != (batch_size, num_outputs):
                raise SpecError(f"OutputBounds: bound shape {tuple(v.shape)} does not match [{batch_size}, {num_outputs}]")
            Cs.append(sign * eye.expand(batch_size, num_outputs, num_outputs))
            ds.append(-sign * v)
        C, d = torch.cat(Cs, dim=1), torch.cat(ds, dim=1)
        return LinearSpec(C, d, torch.arange(C.shape[1], device=device))


def as_property(prop: OutputProperty | Tensor | int) -> OutputProperty:
    """Labels (int / ``[B]`` tensor) mean :class:`Robust`."""
    if isinstance(prop, OutputProperty):
        return prop
    return Robust(prop)
