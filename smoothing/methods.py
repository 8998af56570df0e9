"""Registered smoothing methods: ``smoothing-gaussian``, ``-denoised``, ``-laplace``, ``-uniform``,
``-zhang``, ``-topk``, ``-rotation``, ``-translation``.

Every method certifies the **smoothed** classifier ``g`` (``certifies="smoothed"``), with
probability ``confidence = 1 - alpha`` over its own sampling (``guarantee="probabilistic"``).

``certify(model, inputs, prop, find_radius=..., max_radius=..., timeout=...)``:

* ``inputs``: an :class:`~verify.spec.LpBall` whose centre is the clean input and whose ``eps``
  is the radius asked about (may be 0). Norms the noise cannot certify raise ``SpecError``.
  The ball's domain is ignored: the certificate covers the whole ball, a superset.
  For rotation / translation, ``eps`` is an angle in degrees / a shift in pixels.
* ``prop``: :class:`~verify.spec.Robust` (``TopK`` for ``smoothing-topk``).
* status: ``"abstain"`` when CERTIFY abstains (prediction -1); ``"certified"`` when the
  prediction equals the label, the radius is ``>= eps`` and ``> 0``; else ``"unknown"`` with
  ``details["reason"]`` (wrong class, radius < eps, timeout).
* ``radius``: the certified radius of g's prediction at x (0 on abstain), whatever the label;
  it is always computed in closed form, so ``find_radius`` changes nothing, and
  ``max_radius`` caps it (the uncapped value stays in the details).
"""
from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
import torch

from verify.certificate import Certificate
from verify.registry import Method, register
from verify.spec import InputSet, LpBall, OutputProperty, Robust, SpecError, TopK, norm_name

from .certify import certify as _certify
from .denoiser import load_denoiser
from .options import (
    ClassifierOptions, DenoisedOptions, NoiseOptions, RotationOptions, SemanticOptions, TranslationOptions, ZhangOptions,
)
from .noise import FLOAT_NOTE, GaussianNoise, LaplaceNoise, Noise, UniformNoise
from .sampling import SamplingTimeout
from .semantic import Rotation, SemanticTransform, Translation
from .stats import SmoothingConfigError, check_n_alpha
from .topk import certify_topk
from .zhang import ZhangGrid, ZhangNoise

__all__ = [
    "SmoothingGaussian",
    "SmoothingDenoised",
    "SmoothingLaplace",
    "SmoothingUniform",
    "SmoothingZhang",
    "SmoothingTopK",
    "SmoothingRotation",
    "SmoothingTranslation",
]


def _sparse_counts(row: torch.Tensor) -> dict[str, int]:
    r = row.cpu()
    nz = torch.nonzero(r).flatten().tolist()
    return {str(c): int(r[c]) for c in nz}


class _Smoothing(Method):
    """Shared option handling and Certificate assembly."""

    guarantee = "probabilistic"
    certifies = "smoothed"
    noise_cls: ClassVar[type[Noise] | None] = None
    opts: ClassifierOptions

    def setup(self) -> None:
        """Refuse a sigma of inf and ``(n, alpha)`` pairs that can never certify
        (:func:`smoothing.stats.check_n_alpha`); types and ranges are the Options' checks."""
        if not math.isfinite(self.opts.sigma):
            raise SmoothingConfigError(f"{self.name}: sigma must be a positive number, got {self.opts.sigma!r}")
        check_n_alpha(int(self.opts.n), float(self.opts.alpha), pb_bound=bool(getattr(self.opts, "pb_bound", False)))

    # --- helpers
    def _ball(self, inputs: InputSet) -> LpBall:
        self.check_input_set(inputs)
        if not isinstance(inputs, LpBall):
            raise SpecError(f"method {self.name!r} needs an LpBall input set (centre = clean input, eps = radius asked)")
        return inputs

    @staticmethod
    def _labels(prop: OutputProperty, B: int) -> torch.Tensor:
        lab = prop.labels()
        if lab is None:
            raise SpecError("smoothing methods need a classification property (Robust or TopK)")
        lab = lab.reshape(-1)
        if lab.numel() == 1:
            lab = lab.expand(B)
        if lab.numel() != B:
            raise SpecError(f"{lab.numel()} labels for a batch of {B}")
        return lab.cpu()

    def _sampling(self, *, selection: bool = True) -> dict[str, Any]:
        """The sampling options as keywords of the smoothing functions (``n0`` with
        ``selection``)."""
        kw: dict[str, Any] = {"n": int(self.opts.n), "alpha": float(self.opts.alpha), "seed": int(self.opts.seed),
                              "batch_size": int(self.opts.batch_size), "memory_mb": self.opts.memory_mb,
                              "share_noise": bool(self.opts.share_noise)}
        return {"n0": int(self.opts.n0), **kw} if selection else kw

    def _base_details(self) -> dict[str, Any]:
        return {
            "options": self.options(),
            "sigma_space": "model input space",
            "float_soundness": FLOAT_NOTE,
            "noise_streams": ("shared by the inputs of the batch: each certificate holds with probability 1 - alpha, "
                              "failures of different inputs are correlated") if self.opts.share_noise else "independent per input",
        }

    def _timeout_certs(self, B, labels, eps, norm, elapsed, extra) -> list[Certificate]:
        return [
            Certificate(
                method=self.name, guarantee="probabilistic", certifies="smoothed", confidence=1 - float(self.opts.alpha),
                status="unknown", index=b, label=int(labels[b]), prediction=None, norm=norm, eps=float(eps[b]),
                radius=0.0, time_s=elapsed / B, details={**self._base_details(), **extra, "reason": "timeout"},
            )
            for b in range(B)
        ]

    def _assemble(self, res, labels, eps, norm, max_radius, elapsed, extra) -> list[Certificate]:
        B = len(labels)
        certs = []
        for b in range(B):
            pred = int(res.prediction[b])
            r_unc = float(res.radius[b])
            r = min(r_unc, float(max_radius)) if max_radius is not None else r_unc
            e = float(eps[b])
            lab = int(labels[b])
            if pred < 0:
                status, reason, r = "abstain", "CERTIFY abstained: pA_lower <= pB_upper", 0.0
            elif pred != lab:
                status, reason = "unknown", f"smoothed classifier predicts {pred}, not the label {lab}"
            elif not (r > 0 and r >= e):
                status, reason = "unknown", f"certified radius {r:.6g} < eps {e:.6g}"
            else:
                status, reason = "certified", ""
            det = {
                **self._base_details(),
                **extra,
                "pA_lower": float(res.pa_lower[b]),
                "pB_upper": float(res.pb_upper[b]),
                "counts": _sparse_counts(res.counts[b]),
                "counts_selection": _sparse_counts(res.counts_selection[b]),
                "n": res.n,
                "n0": res.n0,
                "alpha": res.alpha,
                "pb_bound": res.pb_bound,
                "radius_uncapped": r_unc,
            }
            if reason:
                det["reason"] = reason
            certs.append(
                Certificate(
                    method=self.name, guarantee="probabilistic", certifies="smoothed", confidence=1 - float(self.opts.alpha),
                    status=status, index=b, label=lab, prediction=pred, norm=norm, eps=e, radius=r,
                    time_s=elapsed / B, details=det,
                )
            )
        return certs


class _NoiseSmoothing(_Smoothing):
    """Additive-noise smoothing (Cohen et al. 2019 CERTIFY) with the noise of ``noise_cls``.

    Options: :class:`smoothing.options.NoiseOptions` (``certify methods smoothing-gaussian`` explains
    each); :mod:`smoothing.sampling` explains the two kinds of noise streams (``share_noise``).
    """

    opts: NoiseOptions

    def noise(self) -> Noise:
        assert self.noise_cls is not None
        return self.noise_cls(sigma=float(self.opts.sigma))

    def base_classifier(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The base classifier that is smoothed, ``[S, *shape] -> [S, K]``, and the details it
        adds to every certificate: ``model`` itself here (:class:`SmoothingDenoised` puts a
        denoiser in front)."""
        return model, {}

    def decide(self, model, inputs, prop, call):
        t0, max_radius = call.deadline.start, call.max_radius
        ball = self._ball(inputs)
        norm = norm_name(ball.p)
        x = ball.center
        B = x.shape[0]
        labels = self._labels(prop, B)
        eps = ball.eps.detach().double().cpu().numpy()
        nz = self.noise()
        model, base_details = self.base_classifier(model, x)
        extra = {**nz.describe(), **base_details,
                 "radius_from": norm if norm in nz.direct_norms else f"{'/'.join(nz.direct_norms)} via dimension factor"}
        try:
            res = _certify(
                model, x, nz, norm=norm, pb_bound=bool(self.opts.pb_bound), **self._sampling(),
                deadline=call.deadline.at,
            )
        except SamplingTimeout:
            return self._timeout_certs(B, labels, eps, norm, time.perf_counter() - t0, extra)
        return self._assemble(res, labels, eps, norm, max_radius, time.perf_counter() - t0, extra)


@register
class SmoothingGaussian(_NoiseSmoothing):
    """Gaussian smoothing (Cohen et al. 2019): l2 radius ``sigma Phi^-1(pA_lower)``; l_inf by
    ``R_2 / sqrt(d)``; l1 by ``R_1 = R_2``."""

    name = "smoothing-gaussian"
    summary = "randomized smoothing, Gaussian noise (Cohen et al. 2019); l2 (l1, linf by conversion)"
    norms = ("l2", "linf", "l1")
    noise_cls = GaussianNoise


@register
class SmoothingDenoised(_NoiseSmoothing):
    """Denoised smoothing (Salman et al. 2020, "Denoised smoothing: a provable defense for
    pretrained classifiers"): Gaussian smoothing of ``f(D(.))``, a denoiser ``D`` put in front of
    an off-the-shelf classifier ``f`` that was never trained with noise.

    The certificate is Cohen et al.'s (l2 radius ``sigma Phi^-1(pA_lower)``, l_inf / l1 by the
    same conversions as ``smoothing-gaussian``) for the smoothed composition
    ``g(x) = argmax_c P(f(D(x + delta)) = c)``, ``delta ~ N(0, sigma^2 I)``: the theorem holds for
    any base classifier, and ``D`` is part of it (``certifies="smoothed"``; statuses, options and
    seeds as ``smoothing-gaussian``; with ``denoiser="identity"`` the two give the same
    certificates). See :mod:`smoothing.denoiser` for the denoisers and their training.

    A method of its own rather than a ``denoiser=`` option of ``smoothing-gaussian``: tables,
    ``compare`` and ``--resume`` key rows and per-method options by the method name, so plain and
    denoised smoothing of the same ``f`` must have different names to sit side by side, and
    ``smoothing-gaussian``'s options (and the digests of resumed runs) stay as they were.

    Option ``denoiser``: ``"digits-stability"`` (default: trained with the stability objective
    for the shipped plain digits MLP ``digits-mlp`` at sigma 0.25), ``"digits-mse"`` (the MSE
    objective, classifier-agnostic, same sigma), ``"identity"``, or the path of a file written
    by :func:`smoothing.denoiser.save_denoiser`. The bundled ones take ``[B, 1, 8, 8]`` inputs;
    another input shape is refused with one line. A sigma other than the denoiser's training
    sigma is allowed (the certificate holds for any ``D``) and noted in the details.
    """

    name = "smoothing-denoised"
    summary = "denoised smoothing (Salman et al. 2020): Gaussian smoothing of f(D(.)), a denoiser before f; l2 (l1, linf by conversion)"
    norms = ("l2", "linf", "l1")
    noise_cls = GaussianNoise

    opts: DenoisedOptions

    def setup(self) -> None:
        super().setup()
        try:
            self._denoiser, self._denoiser_meta = load_denoiser(self.opts.denoiser)
        except ValueError as e:
            raise SmoothingConfigError(f"{self.name}: option denoiser: {e}") from None

    def base_classifier(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
        """``f(D(.))`` on ``x``'s device and dtype, and the denoiser's details; ``SpecError``
        when ``x [B, *shape]`` has a shape the denoiser does not take."""
        meta = self._denoiser_meta
        shape = meta.get("input_shape")
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise SpecError(f"{self.name}: denoiser {self.opts.denoiser!r} takes inputs of shape {tuple(shape)}, got "
                            f"{tuple(x.shape[1:])}; give denoiser=identity or a denoiser file made for this shape")
        den = self._denoiser.to(device=x.device, dtype=x.dtype)
        details: dict[str, Any] = {"base_classifier": "f(D(x + delta)): the model after the denoiser D",
                                   "denoiser": {k: v for k, v in meta.items() if k != "input_shape"}}
        trained = meta.get("sigma")
        if trained is not None and not math.isclose(float(trained), float(self.opts.sigma)):
            details["denoiser_note"] = (f"D was trained at sigma {trained:g}, smoothing uses sigma {self.opts.sigma:g}: "
                                        "the certificate holds for any D, the accuracy may suffer")
        return torch.nn.Sequential(den, model), details


@register
class SmoothingLaplace(_NoiseSmoothing):
    """Laplace smoothing (Teng et al. 2020): l1 radius ``-lambda log(2 (1 - pA_lower))``;
    ``sigma`` is the per-coordinate std (``lambda = sigma / sqrt(2)``)."""

    name = "smoothing-laplace"
    summary = "randomized smoothing, Laplace noise (Teng et al. 2020); l1 (l2, linf by conversion)"
    norms = ("l1", "l2", "linf")
    noise_cls = LaplaceNoise


@register
class SmoothingUniform(_NoiseSmoothing):
    """Uniform smoothing (Yang et al. 2020): l1 radius ``2 lambda (pA_lower - 1/2)``, l_inf
    ``2 lambda (1 - (3/2 - pA_lower)^(1/d))``; ``sigma`` is the std (``lambda = sqrt(3) sigma``)."""

    name = "smoothing-uniform"
    summary = "randomized smoothing, uniform noise (Yang et al. 2020); l1, linf (l2 by conversion)"
    norms = ("l1", "linf", "l2")
    noise_cls = UniformNoise


@register
class SmoothingZhang(_NoiseSmoothing):
    """Smoothing with the non-Gaussian noise ``pi_0(z) ~ ||z||_2^-k exp(-||z||_2^2 / 2s^2)`` of Zhang
    et al. 2020 ("Black-box certification with randomized smoothing: a functional optimization
    based framework"), certified by the paper's functional-optimisation (Lagrangian /
    Neyman-Pearson) bound, computed conservatively without sampling (:mod:`smoothing.zhang`).

    ``sigma`` is the per-coordinate std (as for every noise here); ``k`` the integer exponent,
    ``0 <= k < d - 1`` (``k = 0``: Gaussian, up to the discretisation of the bound). l2 radius
    direct, l_inf ``R_2 / sqrt(d)`` (the l_inf ball lies in that l_2 ball; its corners are on the
    sphere), l1 ``R_2``. ``grid_intervals`` (l2 radius intervals) / ``grid_cells`` (cells
    of the cosine; ``grid_cells // 6`` of the norm) set the discretisation (finer: slower, slightly
    larger radii; never less sound); the thresholds are computed once per ``(d, k, sigma)``
    (about 10 s at the defaults, cached). The paper's mixed
    ``||.||_inf`` / ``||.||_2`` family for l_inf is not implemented (see :mod:`smoothing.zhang`).
    """

    name = "smoothing-zhang"
    summary = "randomized smoothing, ||z||^-k exp(-||z||^2/2s^2) noise (Zhang et al. 2020), functional-optimisation bound; l2 (linf, l1 by conversion)"
    norms = ("l2", "linf", "l1")
    noise_cls = ZhangNoise

    opts: ZhangOptions

    def noise(self) -> Noise:
        grid = ZhangGrid(radius_cells=max(8, int(self.opts.grid_cells) // 6), t_cells=int(self.opts.grid_cells),
                         intervals=int(self.opts.grid_intervals))
        return ZhangNoise(sigma=float(self.opts.sigma), k=int(self.opts.k), grid=grid)

    def decide(self, model, inputs, prop, call):
        d = math.prod(self._ball(inputs).center.shape[1:])
        if not d - int(self.opts.k) > 1:
            raise SpecError(f"{self.name}: k={self.opts.k} needs inputs of more than k + 1 coordinates, got {d}")
        return super().decide(model, inputs, prop, call)


@register
class SmoothingTopK(_Smoothing):
    """Certified top-k under Gaussian smoothing (Jia et al. 2020). ``prop`` is
    ``TopK(label, k)`` (``Robust(label)`` means k = 1). No selection stage (the label is
    given): ``n0`` is unused but kept for a uniform option set. ``prediction`` is the label
    when it is certified in the top-k, else the top-1 class of the counts."""

    name = "smoothing-topk"
    summary = "certified top-k under Gaussian smoothing (Jia et al. 2020); l2 (l1, linf by conversion)"
    norms = ("l2", "linf", "l1")


    def decide(self, model, inputs, prop, call):
        from .noise import convert_radius

        t0, max_radius = call.deadline.start, call.max_radius
        ball = self._ball(inputs)
        norm = norm_name(ball.p)
        x = ball.center
        B = x.shape[0]
        if isinstance(prop, TopK):
            k = prop.k
        elif isinstance(prop, Robust):
            k = 1
        else:
            raise SpecError(f"{self.name} needs a TopK (or Robust) property, got {type(prop).__name__}")
        labels = self._labels(prop, B)
        eps = ball.eps.detach().double().cpu().numpy()
        d = math.prod(x.shape[1:])
        extra = {"noise": "gaussian", "sigma": float(self.opts.sigma), "k": k}
        try:
            out = certify_topk(
                model, x, labels.to(x.device), k, float(self.opts.sigma), **self._sampling(selection=False),
                deadline=call.deadline.at,
            )
        except SamplingTimeout:
            return self._timeout_certs(B, labels, eps, norm, time.perf_counter() - t0, extra)
        radius = convert_radius(out["radius"], "l2", norm, d)
        elapsed = time.perf_counter() - t0
        certs = []
        for b in range(B):
            r_unc = float(radius[b])
            r = min(r_unc, float(max_radius)) if max_radius is not None else r_unc
            e, lab = float(eps[b]), int(labels[b])
            ok = r > 0 and r >= e
            det = {
                **self._base_details(), **extra,
                "pl_lower": float(out["pl_lower"][b]),
                "p_upper_max": float(np.max(out["p_upper"][b])),
                "counts": _sparse_counts(out["counts"][b]),
                "top1": int(out["top1"][b]),
                "n": int(self.opts.n), "alpha": float(self.opts.alpha), "radius_uncapped": r_unc,
            }
            if not ok:
                det["reason"] = f"label {lab} certified in the top-{k} only up to radius {r:.6g} < eps {e:.6g}" if r > 0 else f"label {lab} not certified in the top-{k}"
            certs.append(
                Certificate(
                    method=self.name, guarantee="probabilistic", certifies="smoothed", confidence=1 - float(self.opts.alpha),
                    status="certified" if ok else "unknown", index=b, label=lab,
                    prediction=lab if ok else int(out["top1"][b]), norm=norm, eps=e, radius=r, time_s=elapsed / B, details=det,
                )
            )
        return certs


class _SemanticSmoothing(_Smoothing):
    """Smoothing in a transformation's parameter space (Fischer et al. 2020); see
    :mod:`smoothing.semantic` for exactly what is certified."""

    transform_cls: ClassVar[type[SemanticTransform]]
    #: no l_p ball of the *input* is certified: ``eps`` and the radius live in the transform's
    #: parameter space (the ball's ``p`` is the norm of the parameter vector)
    norms = ()

    def _ball(self, inputs: InputSet) -> LpBall:
        if not isinstance(inputs, LpBall):
            raise SpecError(f"method {self.name!r} needs an LpBall whose centre is the image and whose eps is the "
                            f"{self.transform_cls.name} asked about ({self.transform_cls.unit})")
        return inputs

    opts: SemanticOptions

    def decide(self, model, inputs, prop, call):
        from .semantic import certify_semantic

        t0, max_radius = call.deadline.start, call.max_radius
        ball = self._ball(inputs)
        tr = self.transform_cls(self.opts.interpolation, self.opts.padding)
        pnorm = norm_name(ball.p)
        norm = f"{tr.name}-{tr.unit}" + ("" if tr.params == 1 or pnorm == "l2" else f"-{pnorm}")
        x = ball.center
        if x.dim() not in (3, 4):
            raise SpecError(f"{self.name} needs images [B, C, H, W] or [B, H, W], got shape {tuple(x.shape)}")
        B = x.shape[0]
        labels = self._labels(prop, B)
        eps = ball.eps.detach().double().cpu().numpy()
        extra = {"noise": "gaussian", "sigma": float(self.opts.sigma), "sigma_unit": tr.unit, **tr.describe(),
                 "certifies_exactly": "argmax_c P_gamma(f(T_{theta+gamma}(x)) = c) is constant for |theta| < radius: the clean "
                 "image transformed once by theta+gamma with this interpolation, then classified; NOT the smoothed "
                 "classifier of an already-transformed image (no interpolation-error bound; sound=True has "
                 "one, Fischer et al. 2020 Sec. 4-5)"}
        try:
            res = certify_semantic(
                model, x, tr, float(self.opts.sigma), norm=pnorm, pb_bound=bool(self.opts.pb_bound), **self._sampling(),
                deadline=call.deadline.at,
            )
        except SamplingTimeout:
            return self._timeout_certs(B, labels, eps, norm, time.perf_counter() - t0, extra)
        certs = self._assemble(res, labels, eps, norm, max_radius, time.perf_counter() - t0, extra)
        for c in certs:
            c.details["sigma_space"] = f"transform parameter ({tr.unit})"
        return certs


class _SoundSemantic(_SemanticSmoothing):
    """The sound mode shared by ``smoothing-rotation`` and ``-translation`` (Fischer et al. 2020,
    Sec. 4-5): l2 noise ``sigma_l2`` after the random transform, the composition error bounded
    over ``n_err`` sampled parameters, ``alpha`` split in halves between the ``pA`` bound and the
    error statement, the radius capped at the range the error was bounded on, ``max(eps,
    <range option>)``. The timeout covers sampling and the error search: a search cut by it leaves
    the input ``unknown`` (radius 0, ``E = inf``, reason "timeout"), never certified on part of a
    bound. Bilinear, zero padding only."""

    #: the option naming the attacker's range the error is bounded on
    range_option: ClassVar[str]

    def setup(self) -> None:
        super().setup()
        if self.opts.sound:
            self._check_sound()

    def _check_sound(self) -> None:
        if self.opts.interpolation != "bilinear" or self.opts.padding != "zeros":
            raise ValueError(f"{self.name} sound=True bounds the error of bilinear {self.transform_cls.name} with zero padding "
                             f"only (got {self.opts.interpolation!r}, {self.opts.padding!r}); use sound=False for the single-transform "
                             "certificate")
        if not (isinstance(self.opts.sigma_l2, (int, float)) and self.opts.sigma_l2 > 0 and math.isfinite(self.opts.sigma_l2)):
            raise SmoothingConfigError(f"{self.name}: sigma_l2 must be a positive number, got {self.opts.sigma_l2!r}")
        if int(self.opts.n_err) < 1 or not getattr(self.opts, "err_tol", 1.0) > 0:
            raise SmoothingConfigError(f"{self.name}: n_err must be >= 1 and err_tol > 0")
        if self.opts.pb_bound:
            raise SmoothingConfigError(f"{self.name}: sound=True uses the one-sided pA bound (pb_bound=False)")
        check_n_alpha(int(self.opts.n), float(self.opts.alpha) / 2)

    def decide(self, model, inputs, prop, call):
        if not self.opts.sound:
            return super().decide(model, inputs, prop, call)
        return self._certify_sound(model, inputs, prop, call)

    #: the ``noise`` and ``certifies_exactly`` entries of every sound-mode certificate
    sound_noise: ClassVar[str]
    sound_statement: ClassVar[str]

    def _sound_extra(self) -> dict[str, Any]:
        """Details every certificate of the sound mode carries."""
        return {"noise": self.sound_noise, "certifies_exactly": self.sound_statement}

    def _sound_keywords(self, pnorm: str) -> dict[str, Any]:
        """The transform's own keywords of its sound certificate function."""
        raise NotImplementedError

    @staticmethod
    def _sound_function() -> Any:
        """The sound certificate function of :mod:`smoothing.semantic` (imported when used)."""
        raise NotImplementedError

    def _run_sound(self, model, x: torch.Tensor, rng: np.ndarray, pnorm: str, deadline: float | None):
        """The certificate computation: a CertifyResult whose ``extra`` has ``searches``."""
        return self._sound_function()(model, x, float(self.opts.sigma), float(self.opts.sigma_l2), rng, n_err=int(self.opts.n_err),
                                      **self._sound_keywords(pnorm), **self._sampling(), deadline=deadline)

    def _certify_sound(self, model, inputs, prop, call) -> list[Certificate]:
        t0, max_radius = call.deadline.start, call.max_radius
        ball = self._ball(inputs)
        x = ball.center
        if x.dim() not in (3, 4):
            raise SpecError(f"{self.name} needs images [B, C, H, W] or [B, H, W], got shape {tuple(x.shape)}")
        tr = self.transform_cls(self.opts.interpolation, self.opts.padding)
        pnorm = norm_name(ball.p)
        if tr.params > 1 and pnorm not in ("l2", "linf"):
            raise SpecError(f"{self.name} sound=True states the radius in l2 or linf of the shift, got {pnorm}")
        norm = f"{tr.name}-{tr.unit}" + ("" if tr.params == 1 or pnorm == "l2" else f"-{pnorm}")
        B = x.shape[0]
        labels = self._labels(prop, B)
        eps = ball.eps.detach().double().cpu().numpy() * np.ones(B)
        rng = np.maximum(eps, float(getattr(self.opts, self.range_option) or 0.0))
        extra = {"sigma": float(self.opts.sigma), "sigma_unit": tr.unit, "sigma_l2": float(self.opts.sigma_l2), "sound": True,
                 **tr.describe(), **self._sound_extra()}
        try:
            res = self._run_sound(model, x, rng, pnorm, call.deadline.at)
        except SamplingTimeout:
            cut = {**extra, "error_search": "not started", "error_bound_complete": False}
            return self._timeout_certs(B, labels, eps, norm, time.perf_counter() - t0, cut)
        certs = self._assemble(res, labels, eps, norm, max_radius, time.perf_counter() - t0, extra)
        for b, c in enumerate(certs):
            srch = res.extra["searches"][b]
            c.details.update({"sigma_space": f"transform parameter ({tr.unit}) and model input space (l2)",
                              "alpha": float(self.opts.alpha), "alpha_pA": float(self.opts.alpha) / 2, "alpha_error": float(self.opts.alpha) / 2,
                              "E": float(srch.E), "E_lower": float(srch.lower), "q": float(res.extra["q"]),
                              f"error_range_{tr.unit}": float(rng[b]), "error_bound_complete": bool(srch.complete),
                              "error_search": srch.progress})
            if not srch.complete and c.status != "abstain":
                c.status, c.radius = "unknown", 0.0
                c.details["reason"] = "timeout: interpolation-error bound incomplete (no certificate on a partial bound)"
        return certs


@register
class SmoothingRotation(_SoundSemantic):
    """Rotation smoothing: Gaussian over the angle (``sigma`` in degrees); radius in degrees.

    ``sound=True`` (default): the certificate covers the real, interpolated attacked image
    ``R_gamma(x)`` for every ``|gamma| <= radius`` (Fischer et al. 2020, Sec. 4-5): the smoothed
    classifier adds l2 noise ``sigma_l2`` after the random rotation, and the interpolation error
    of composed rotations is bounded soundly over ``n_err`` sampled angles
    (:func:`smoothing.semantic.certify_rotation_sound`); ``alpha`` is split in halves between the
    ``pA`` bound and the error statement. The radius is capped at the range the error was bounded
    on: ``max(eps, max_angle)`` (``max_angle`` defaults to eps). Bilinear, zero padding only.
    The timeout bounds the error search too: refinement cut by it keeps the last complete round's
    (looser, still sound) bound; a first round cut by it leaves the input ``unknown``.
    ``sound=False``: the former certificate for the clean image rotated once by ``theta + beta``
    (no l2 noise, no interpolation-error bound), kept for comparison. Being sound by default means
    the default never claims more than it proves; the old statement is opt-in.
    """

    name = "smoothing-rotation"
    summary = "smoothing over the rotation angle (Fischer et al. 2020) with the interpolation-error bound; radius in degrees"
    transform_cls = Rotation
    range_option = "max_angle"

    opts: RotationOptions

    sound_noise = "gaussian angle + gaussian l2"
    sound_statement = (
        "g(z) = argmax_c P(f(R_beta(z) + delta) = c), beta ~ N(0, sigma^2) deg, delta ~ N(0, sigma_l2^2 I), is cA at every "
        "z = R_gamma(x), |gamma| <= radius: x rotated once by the attacker with this interpolation; interpolation error of "
        "R_beta(R_gamma x) vs R_{beta+gamma} x bounded by E (interval branch and bound) for n_err sampled beta, tail "
        "probability q (Fischer et al. 2020, Sec. 4-5); confidence 1 - alpha with alpha/2 for pA and alpha/2 for the error "
        "statement; radius capped at the bounded range")

    def _sound_keywords(self, pnorm: str) -> dict[str, Any]:
        return {"err_tol": float(self.opts.err_tol)}

    @staticmethod
    def _sound_function() -> Any:
        from .semantic import certify_rotation_sound

        return certify_rotation_sound


@register
class SmoothingTranslation(_SoundSemantic):
    """Translation smoothing: Gaussian over ``(dx, dy)`` (``sigma`` in pixels); radius = l2
    (or linf) length of the shift in pixels.

    ``sound=True`` (default): the certificate covers the real, interpolated attacked image
    ``T_gamma(x)`` for every shift ``||gamma|| <= radius`` (Fischer et al. 2020, Sec. 4-5, as for
    rotations): l2 noise ``sigma_l2`` after the random shift; the composition error of two
    bilinear shifts is maximised exactly over the square ``||gamma||_inf <= max(eps, max_shift)``
    for ``n_err`` sampled shifts (:mod:`smoothing.translation_error`); same confidence split and
    cap as ``smoothing-rotation``. Bilinear, zero padding only. ``sound=False``: the
    single-translation certificate (the clean image shifted once by ``theta + beta``).
    """

    name = "smoothing-translation"
    summary = "smoothing over the translation (Fischer et al. 2020) with the interpolation-error bound; radius in pixels"
    transform_cls = Translation
    range_option = "max_shift"

    opts: TranslationOptions

    sound_noise = "gaussian shift + gaussian l2"
    sound_statement = (
        "g(z) = argmax_c P(f(T_beta(z) + delta) = c), beta ~ N(0, sigma^2 I_2) px, delta ~ N(0, sigma_l2^2 I), is cA at "
        "every z = T_gamma(x), ||gamma|| <= radius: x shifted once by the attacker with this interpolation; the error of "
        "T_beta(T_gamma x) vs T_{beta+gamma} x (sub-pixel shifts do not compose) is maximised exactly (piece corners) over "
        "||gamma||_inf <= the bounded range for n_err sampled beta, tail probability q (Fischer et al. 2020, Sec. 4-5); "
        "confidence 1 - alpha with alpha/2 for pA and alpha/2 for the error statement; radius capped at the bounded range")

    def _sound_keywords(self, pnorm: str) -> dict[str, Any]:
        return {"norm": pnorm}

    @staticmethod
    def _sound_function() -> Any:
        from .semantic import certify_translation_sound

        return certify_translation_sound
