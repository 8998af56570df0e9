"""Registered methods for the two other sampling tasks: ``smoothing-regression`` (median smoothing
of the model's outputs) and ``smoothing-invariance`` (the inverse task).

Both are probabilistic (``guarantee="probabilistic"``, ``confidence = 1 - alpha`` over their own
sampling) and state their results at a finite set of radii: the asked ``eps`` and, with
``find_radius``, the grid ``max_radius * i / radius_steps`` (``i = 1..radius_steps``; ``max_radius``
defaults to ``max(4 eps, 1)``). ``alpha`` is split evenly over those radii (Bonferroni), so every
statement of one certificate holds together with probability ``>= 1 - alpha``. ``radius`` is the
largest checked radius ``r`` such that the property is certified at every checked radius ``<= r``
(0.0 if none); without ``find_radius`` it is ``eps`` when certified.

``smoothing-regression`` (``certifies="smoothed"``): for the percentile-smoothed regressor
``h_p(x')_k = p-percentile of f(x' + N(0, sigma^2 I))_k`` (per output ``k``; ``p = 1/2``: median
smoothing), ``output_lower <= h_p(x') <= output_upper`` for every ``||x' - x||_2 <= eps``
(Chiang et al. 2020, "Detection as regression: certified object detection by median smoothing",
Thm. 1, with the order-statistic bounds of :mod:`smoothing.regression`; Bonferroni over the
``2 K`` one-sided bounds). The property rows ``C y + d`` are then bounded by interval arithmetic
over that box (``lower``/``upper``); status ``"certified"`` when every group has a row whose
lower bound is ``> 0`` (e.g. ``OutputBounds(lo, hi)``: the outputs stay strictly inside;
``Robust(label)``: the label's smoothed logit stays above every other one), else ``"unknown"``.
l2 balls only (the theorem's norm).

``smoothing-invariance`` (``certifies="fraction"``): ``estimate`` of
``q = P_{x' ~ D(S)}(argmax f(x') = label)`` for ``D(S)`` uniform on the set (boxes, l_inf balls;
l2 / l1 balls: uniform on the ball, then clipped to the domain; see :mod:`smoothing.inverse`),
with its two-sided Clopper-Pearson interval ``[estimate_lower, estimate_upper]``; status
``"certified"`` when ``estimate_lower >= min_probability``, else ``"unknown"``. A statistical
statement about f on the set, not a proof for every point of it: an attack may find points
that change the class while the certificate holds. Give the prediction as the label
(``Robust(f(x).argmax(1))``) for "the prediction is unchanged".
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verify.certificate import Certificate
from verify.registry import Method, float_safety_margin, register
from verify.spec import InputSet, LinearSpec, LpBall, OutputProperty, Robust, SpecError, norm_name

from .inverse import estimate_invariance
from .options import InvarianceOptions, RegressionOptions, TaskOptions
from .regression import bounds_from_samples, sample_outputs
from .sampling import SamplingTimeout
from .stats import SmoothingConfigError, cp_interval

__all__ = ["SmoothingRegression", "SmoothingInvariance", "checked_radii", "largest_certified_radius", "row_bounds"]

#: stated in the details of both methods' certificates (Voracek & Hein 2023, "Sound randomized
#: smoothing in floating-point arithmetics")
SAMPLING_NOTE = (
    "NOT covered: the draws come from torch's pseudo-random sampler, the perturbed inputs are rounded to the model "
    "dtype and the model is evaluated in that dtype, so the sampled distribution is a discretised, rounded version of "
    "the ideal one; the guarantee assumes exact real-valued draws"
)

#: inputs sampled together by smoothing-regression: at most this many stored outputs (B * n * K)
REGRESSION_MAX_STORED = 2**24


def checked_radii(eps: float, find_radius: bool, max_radius: float | None, steps: int) -> list[float]:
    """The radii a certificate makes statements at, ascending: ``eps`` and, with
    ``find_radius``, ``max_radius * i / steps`` for ``i = 1..steps`` (``max_radius`` defaults
    to ``max(4 eps, 1)``)."""
    radii = {float(eps)}
    if find_radius:
        top = float(max_radius) if max_radius is not None else max(4.0 * float(eps), 1.0)
        radii |= {top * i / steps for i in range(1, steps + 1)}
    return sorted(radii)


def largest_certified_radius(radii: list[float], certified: list[bool]) -> float:
    """The largest ``radii[j]`` such that ``certified[i]`` holds for every ``i <= j`` (``radii``
    ascending); 0.0 if the first is not certified."""
    best = 0.0
    for r, ok in zip(radii, certified):
        if not ok:
            break
        best = r
    return best


def row_bounds(spec: LinearSpec, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds ``[B, N]`` of the rows ``C y + d`` over the box ``lo <= y <= hi`` (``[B, K]``,
    float64, entries may be infinite): interval arithmetic, a zero coefficient contributes 0."""
    C, d = spec.C.double(), spec.d.double()
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    zero = torch.zeros((), dtype=C.dtype)
    low = torch.where(C > 0, C * lo, zero) + torch.where(C < 0, C * hi, zero)
    high = torch.where(C > 0, C * hi, zero) + torch.where(C < 0, C * lo, zero)
    return low.sum(-1) + d, high.sum(-1) + d


def _labels_or_none(prop: OutputProperty, B: int) -> list[int | None]:
    lab = prop.labels()
    if lab is None:
        return [None] * B
    lab = lab.reshape(-1)
    if lab.numel() == 1:
        lab = lab.expand(B)
    if lab.numel() != B:
        raise SpecError(f"{lab.numel()} labels for a batch of {B}")
    return [int(v) for v in lab.tolist()]


class _SampledTask(Method):
    """Options and Certificate assembly shared by the two methods."""

    guarantee = "probabilistic"
    opts: TaskOptions

    def _base_details(self, radii_count: int) -> dict[str, Any]:
        return {
            "options": self.options(),
            "float_soundness": SAMPLING_NOTE,
            "alpha": float(self.opts.alpha),
            "alpha_per_radius": float(self.opts.alpha) / radii_count,
            "noise_streams": ("shared by the inputs of the batch: each certificate holds with probability 1 - alpha, "
                              "failures of different inputs are correlated") if self.opts.share_noise else "independent per input",
        }

    def _timeout_certs(self, B: int, labels: list[int | None], eps: list[float | None], norm: str, elapsed: float) -> list[Certificate]:
        return [
            self.make_certificate("unknown", b, confidence=1 - float(self.opts.alpha), label=labels[b], norm=norm, eps=eps[b],
                                  time_s=elapsed / B, details={"options": self.options(), "reason": "timeout"})
            for b in range(B)
        ]



@register
class SmoothingRegression(_SampledTask):
    """Median (percentile) smoothing of the model's outputs (Chiang et al. 2020): certified
    bounds on every output of the smoothed regressor over an l2 ball, and the property they
    imply. See the module docstring for the exact statement.
    Options: :class:`smoothing.options.RegressionOptions` (``certify methods smoothing-regression``).
    """

    name = "smoothing-regression"
    certifies = "smoothed"
    summary = "median smoothing of the outputs (Chiang et al. 2020): output bounds over an l2 ball; certified when they imply the property"
    norms = ("l2",)

    opts: RegressionOptions

    def setup(self) -> None:
        if not math.isfinite(self.opts.sigma):
            raise SmoothingConfigError(f"{self.name}: sigma must be a positive number, got {self.opts.sigma!r}")

    def decide(self, model, inputs, prop, call):
        """See :meth:`verify.registry.Method.certify`; ``inputs`` is an l2 :class:`LpBall`."""
        t0, find_radius, max_radius = call.deadline.start, call.find_radius, call.max_radius
        ball = _l2_ball(self, inputs)
        B = ball.batch_size
        labels = _labels_or_none(prop, B)
        eps = [float(e) for e in ball.eps.double().cpu()]
        try:
            y = self._samples(model, ball.center, call.deadline.at)
        except SamplingTimeout:
            return self._timeout_certs(B, labels, eps, "l2", time.perf_counter() - t0)
        spec = prop.linear(B, y.shape[2], dtype=torch.float64)
        groups: dict[tuple[float, ...], list[int]] = {}  # inputs that check the same radii
        for b in range(B):
            groups.setdefault(tuple(checked_radii(eps[b], find_radius, max_radius, int(self.opts.radius_steps))), []).append(b)
        per_radius: dict[int, tuple[list[float], list[dict[str, Any]]]] = {}
        for radii, idx in groups.items():
            res = [self._at(y[idx], spec.select(idx), r, float(self.opts.alpha) / len(radii)) for r in radii]
            per_radius.update({b: (list(radii), [_row(p, j) for p in res]) for j, b in enumerate(idx)})
        elapsed = time.perf_counter() - t0
        return [self._certificate(b, labels[b], eps[b], *per_radius[b], find_radius, elapsed / B) for b in range(B)]

    def _samples(self, model: torch.nn.Module, x: Tensor, deadline: float | None) -> np.ndarray:
        """Sorted outputs ``[B, n, K]`` (sampled in sub-batches that keep the store bounded)."""
        with torch.inference_mode():
            K = int(model(x[:1]).reshape(1, -1).shape[1])
        step = max(1, REGRESSION_MAX_STORED // (int(self.opts.n) * K))
        parts = [
            sample_outputs(model, x[s : s + step], float(self.opts.sigma), int(self.opts.n), seed=int(self.opts.seed),
                           batch_size=int(self.opts.batch_size), memory_mb=self.opts.memory_mb, share_noise=bool(self.opts.share_noise),
                           deadline=deadline)
            for s in range(0, x.shape[0], step)
        ]
        return np.concatenate(parts, axis=0)

    def _at(self, y: np.ndarray, spec: LinearSpec, r: float, a: float) -> dict[str, Any]:
        """Output bounds ``[G, K]``, row bounds ``[G, N]`` and certified ``[G]`` at radius ``r``
        (failure probability ``a`` per input) from the sorted samples ``y [G, n, K]``."""
        bnd = bounds_from_samples(y, float(self.opts.sigma), r, float(self.opts.percentile), a)
        rows_lo, rows_hi = row_bounds(spec, torch.from_numpy(bnd.lower), torch.from_numpy(bnd.upper))
        # a row counts when its float64 bound clears the float-safety margin (round-off of the sums)
        signs = torch.where(rows_lo > float_safety_margin(rows_lo), 1.0, -1.0).to(rows_lo.dtype)
        return {"bounds": bnd, "rows_lo": rows_lo, "rows_hi": rows_hi, "certified": spec.certified_by(signs, 0.0).tolist()}

    def _certificate(self, b: int, label: int | None, eps: float, radii: list[float], res: list[dict[str, Any]],
                     find_radius: bool, time_s: float) -> Certificate:
        """One input's certificate from its results at every checked radius (``res`` by radius)."""
        at = res[radii.index(eps)]
        ok = [p["certified"] for p in res]
        if find_radius:
            radius = largest_certified_radius(radii, ok)
        else:
            radius = eps if at["certified"] else 0.0
        det = {**self._base_details(len(radii)), **self._describe(at, radii, ok)}
        return self.make_certificate(
            "certified" if at["certified"] else "unknown", b, confidence=1 - float(self.opts.alpha), label=label,
            prediction=int(np.argmax(at["estimate"])) if label is not None else None, norm="l2", eps=eps, radius=radius,
            lower=at["rows_lo"], upper=at["rows_hi"], output_lower=at["lower"], output_upper=at["upper"], time_s=time_s,
            details=det,
        )

    def _describe(self, at: dict[str, Any], radii: list[float], ok: list[bool]) -> dict[str, Any]:
        det: dict[str, Any] = {
            "noise": "gaussian", "sigma": float(self.opts.sigma), "sigma_space": "model input space", "percentile": float(self.opts.percentile),
            "n": int(self.opts.n), "k_low": at["k_low"], "k_up": at["k_up"], "percentile_at_x": at["estimate"].tolist(),
            "radii_checked": radii, "certified_at": ok,
            "certifies_exactly": "h_p(x')_k = the p-percentile of f(x' + N(0, sigma^2 I))_k per output k; for every "
            "||x' - x||_2 <= eps, output_lower <= h_p(x') <= output_upper (Chiang et al. 2020, Thm. 1), all outputs and checked "
            "radii together with probability >= 1 - alpha",
        }
        if not at["certified"]:
            det["reason"] = self._reason(at)
        return det

    def _reason(self, at: dict[str, Any]) -> str:
        if at["k_low"] is None or at["k_up"] is None:
            return (f"n = {self.opts.n} samples are too few for eps {at['eps']:.6g} at sigma {self.opts.sigma:g}: no order statistic "
                    f"bounds the percentile on one side (its output bounds are infinite)")
        return "the output bounds do not imply the property"


def _row(res: dict[str, Any], j: int) -> dict[str, Any]:
    """Input ``j``'s part of one radius' batched results (see :meth:`SmoothingRegression._at`)."""
    bnd = res["bounds"]
    return {"eps": bnd.eps, "lower": bnd.lower[j], "upper": bnd.upper[j], "estimate": bnd.estimate[j], "k_low": bnd.k_low,
            "k_up": bnd.k_up, "rows_lo": res["rows_lo"][j], "rows_hi": res["rows_hi"][j], "certified": bool(res["certified"][j])}


def _l2_ball(method: Method, inputs: InputSet) -> LpBall:
    method.check_input_set(inputs)
    if not isinstance(inputs, LpBall):
        raise SpecError(f"method {method.name!r} needs an l2 LpBall (centre = clean input, eps = radius asked)")
    return inputs


@register
class SmoothingInvariance(_SampledTask):
    """The inverse task: the probability that f keeps the label at a random point of the set,
    estimated by sampling with a Clopper-Pearson interval (:func:`smoothing.inverse.estimate_invariance`).
    See the module docstring for the exact statement.
    Options: :class:`smoothing.options.InvarianceOptions` (``certify methods smoothing-invariance``).
    """

    name = "smoothing-invariance"
    certifies = "fraction"
    summary = "the inverse task: P(f keeps the label at a uniform random point of the set) with a Clopper-Pearson interval"
    norms = ("linf", "l2", "l1", "box")


    opts: InvarianceOptions

    def decide(self, model, inputs, prop, call):
        """See :meth:`verify.registry.Method.certify`; ``prop`` is :class:`~verify.spec.Robust`."""
        t0, find_radius, max_radius = call.deadline.start, call.find_radius, call.max_radius
        self.check_input_set(inputs, find_radius)
        if not isinstance(prop, Robust):
            raise SpecError(f"{self.name} needs a Robust(label) property (the class whose probability is estimated), "
                            f"got {type(prop).__name__}")
        B = inputs.batch_size
        labels = _labels_or_none(prop, B)
        is_ball = isinstance(inputs, LpBall)
        norm = norm_name(inputs.p) if is_ball else "box"
        eps = [float(e) for e in inputs.eps.double().cpu()] if is_ball else [None] * B
        radii = [checked_radii(e, find_radius, max_radius, int(self.opts.radius_steps)) if is_ball else [None] for e in eps]
        try:
            results = self._estimates(model, inputs, labels, radii, call.deadline.at)
        except SamplingTimeout:
            return self._timeout_certs(B, labels, eps, norm, time.perf_counter() - t0)
        with torch.inference_mode():
            pred = model(inputs.midpoint()).reshape(B, -1).argmax(dim=1).tolist()
        elapsed = time.perf_counter() - t0
        return [self._certificate(b, labels[b], pred[b], norm, eps[b], radii[b], results[b], find_radius, elapsed / B)
                for b in range(B)]

    def _estimates(self, model: torch.nn.Module, inputs: InputSet, labels: list[int | None], radii: list[list],
                   deadline: float | None) -> list[dict]:
        """Per input, ``{radius: {"eps", "estimate", "lower", "upper", "lower_one_sided", "agree",
        "distribution"}}`` (radius ``None`` for a box; ``eps`` the radius of the ball sampled, in
        the model dtype rounded up): one sampling pass per distinct (radius, number of radii) over
        the inputs that check it, at ``alpha / number of radii``."""
        groups: dict[tuple, list[int]] = {}
        for b, rs in enumerate(radii):
            for r in rs:
                groups.setdefault((r, len(rs)), []).append(b)
        out: list[dict] = [{} for _ in radii]
        for (r, count), idx in groups.items():
            sub = inputs.select(idx)
            ball = sub.with_eps(r) if r is not None and isinstance(sub, LpBall) else None  # radii belong to balls
            sets = sub if ball is None else ball
            est = estimate_invariance(
                model, sets, reference=torch.tensor([labels[b] for b in idx]), n=int(self.opts.n), alpha=float(self.opts.alpha) / count,
                seed=int(self.opts.seed), batch_size=int(self.opts.batch_size), memory_mb=self.opts.memory_mb,
                share_noise=bool(self.opts.share_noise), deadline=deadline,
            )
            used = [float(e) for e in ball.eps.double().cpu()] if ball is not None else [None] * len(idx)
            for j, b in enumerate(idx):
                out[b][r] = {"eps": used[j], "estimate": float(est.estimate[j]), "lower": float(est.lower[j]),
                             "upper": float(est.upper[j]), "lower_one_sided": float(est.lower_one_sided[j]),
                             "agree": int(est.agree[j]), "distribution": est.distribution}
        return out

    def _certificate(self, b: int, label: int | None, pred: int, norm: str, eps: float | None, radii: list,
                     res: dict, find_radius: bool, time_s: float) -> Certificate:
        """One input's certificate from its results at every checked radius (``res`` by radius)."""
        at = res[radii[0] if eps is None else eps]
        mp = float(self.opts.min_probability)
        ok = [res[r]["lower"] >= mp for r in radii]
        certified = at["lower"] >= mp
        used = [res[r]["eps"] for r in radii]
        if eps is None:
            radius = 0.0
        elif find_radius:
            radius = largest_certified_radius(used, ok)
        else:
            radius = at["eps"] if certified else 0.0
        det = {**self._base_details(len(radii)), **self._describe(at, radii, res, ok, certified)}
        return self.make_certificate(
            "certified" if certified else "unknown", b, confidence=1 - float(self.opts.alpha), label=label, prediction=pred,
            norm=norm, eps=at["eps"], radius=radius, estimate=at["estimate"], estimate_lower=at["lower"],
            estimate_upper=at["upper"], time_s=time_s, details=det,
        )

    def _describe(self, at: dict, radii: list, res: dict, ok: list[bool], certified: bool) -> dict[str, Any]:
        det: dict[str, Any] = {
            "min_probability": float(self.opts.min_probability), "n": int(self.opts.n), "agree": at["agree"],
            "lower_one_sided": at["lower_one_sided"], "distribution": at["distribution"],
            "radii_checked": [res[r]["eps"] for r in radii], "certified_at": ok,
            "per_radius": [{k: res[r][k] for k in ("eps", "estimate", "lower", "upper")} for r in radii],
            "certifies_exactly": "P_{x' ~ D(S)}(argmax f(x') = label) lies in [estimate_lower, estimate_upper] at every "
            "checked radius, together with probability >= 1 - alpha; a statistical statement about f on the set, not a "
            "proof for every point",
        }
        if not certified:
            det["reason"] = self._reason(at["lower"], len(radii))
        return det

    def _reason(self, lower: float, count: int) -> str:
        n, mp = int(self.opts.n), float(self.opts.min_probability)
        best = float(cp_interval(np.array([n]), n, float(self.opts.alpha) / count)[0][0])
        if best < mp:
            return (f"n = {n} samples are too few: even {n} of {n} agreeing gives a lower confidence bound "
                    f"{best:.6g} < min_probability {mp:g}")
        return f"lower confidence bound {lower:.6g} < min_probability {mp:g}"
