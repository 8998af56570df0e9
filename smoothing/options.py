"""The options of the smoothing methods, declared once (:mod:`verify.options`).

Every smoothing method samples: :class:`SamplingOptions` holds what all of them share (samples,
confidence, batching, seeds). The classifier-smoothing methods add the noise scale and the
selection stage (:class:`ClassifierOptions`), the additive-noise ones the separate pB bound
(:class:`NoiseOptions`); each method's own options extend those. ``certify methods`` prints the
help texts below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from verify.options import Options, option

__all__ = [
    "SamplingOptions",
    "ClassifierOptions",
    "NoiseOptions",
    "ZhangOptions",
    "DenoisedOptions",
    "SemanticOptions",
    "RotationOptions",
    "TranslationOptions",
    "TaskOptions",
    "RegressionOptions",
    "InvarianceOptions",
]


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(Options):
    """Sampling shared by every smoothing method (:mod:`smoothing.sampling`)."""

    n: int = option(100_000, "noise samples per input for the estimate", positive=True)
    alpha: float = option(0.001, "failure probability: each certificate holds with confidence 1 - alpha",
                          interval=(0.0, 1.0, "open"))
    batch_size: int = option(1000, "noisy rows per forward pass", positive=True)
    memory_mb: float | None = option(None, "memory budget of a forward pass in MiB (caps batch_size; none: no cap)",
                                     positive=True)
    seed: int = option(0, "noise seed: runs repeat exactly, and an input's noise does not depend on the other inputs")
    share_noise: bool = option(True, "one noise stream for the whole batch (each certificate keeps 1 - alpha, failures "
                               "of different inputs are correlated); false: independent noise per input")


@dataclass(frozen=True, kw_only=True)
class ClassifierOptions(SamplingOptions):
    """Smoothing of a classifier (Cohen et al. 2019 CERTIFY): a selection stage, then the estimate."""

    sigma: float = option(0.25, "per-coordinate noise std in the model's input space", positive=True)
    n0: int = option(100, "selection samples per input (the class whose probability is then bounded)", positive=True)


@dataclass(frozen=True, kw_only=True)
class NoiseOptions(ClassifierOptions):
    """Additive noise with the option of bounding pB separately."""

    pb_bound: bool = option(False, "bound pB separately (Bonferroni alpha/2 each; larger radii when the probability "
                            "mass is spread over several classes)")


@dataclass(frozen=True, kw_only=True)
class DenoisedOptions(NoiseOptions):
    denoiser: str = option("digits-stability", "the denoiser before the classifier: digits-stability, digits-mse, "
                           "identity, or the path of a file written by smoothing.denoiser.save_denoiser")


@dataclass(frozen=True, kw_only=True)
class ZhangOptions(NoiseOptions):
    k: int = option(0, "exponent of ||z||^-k in the noise density (0: Gaussian); k < d - 1")
    grid_intervals: int = option(150, "l2 radius intervals of the bound's discretisation (finer: slower, slightly "
                                 "larger radii, never less sound)", positive=True)
    grid_cells: int = option(1000, "cells of the cosine in the bound's discretisation (grid_cells // 6 of the norm)",
                             interval=(8, math.inf, "right-open"))


@dataclass(frozen=True, kw_only=True)
class SemanticOptions(NoiseOptions):
    """Smoothing over a transformation's parameters (Fischer et al. 2020)."""

    sigma: float = option(1.0, "noise std of the transform's parameter (its unit)", positive=True)
    interpolation: str = option("bilinear", "image interpolation of the transform", choices=("bilinear", "nearest"))
    padding: str = option("zeros", "values outside the image", choices=("zeros", "border", "reflection"))
    sound: bool = option(True, "certify the real, interpolated attacked image for every parameter in the radius (the "
                         "interpolation error bounded); false: the clean image transformed once")
    sigma_l2: float = option(0.25, "sound mode: l2 noise std added after the random transform", positive=True)
    n_err: int = option(1000, "sound mode: sampled parameters over which the interpolation error is bounded",
                        positive=True)


@dataclass(frozen=True, kw_only=True)
class RotationOptions(SemanticOptions):
    sigma: float = option(10.0, "noise std of the rotation angle, in degrees", positive=True)
    err_tol: float = option(0.02, "sound mode: the error bound is refined until within this (l2) of the largest "
                            "error found", positive=True)
    max_angle: float | None = option(None, "sound mode: the error is bounded for angles up to max(eps, max_angle) "
                                     "degrees, the cap of the radius (none: eps)")


@dataclass(frozen=True, kw_only=True)
class TranslationOptions(SemanticOptions):
    sigma: float = option(2.0, "noise std of each shift coordinate, in pixels", positive=True)
    max_shift: float | None = option(None, "sound mode: the error is bounded for shifts up to max(eps, max_shift) "
                                     "pixels, the cap of the radius (none: eps)")


@dataclass(frozen=True, kw_only=True)
class TaskOptions(SamplingOptions):
    """The sampled tasks check a grid of radii with one sample set."""

    n: int = option(10_000, "samples per input (shared by every checked radius; alpha is split over them)",
                    positive=True)
    radius_steps: int = option(8, "grid radii checked by find_radius", positive=True)


@dataclass(frozen=True, kw_only=True)
class RegressionOptions(TaskOptions):
    sigma: float = option(0.25, "Gaussian noise std in the model's input space", positive=True)
    percentile: float = option(0.5, "p of the smoothed percentile h_p; 0.5 is median smoothing",
                               interval=(0.0, 1.0, "open"))


@dataclass(frozen=True, kw_only=True)
class InvarianceOptions(TaskOptions):
    min_probability: float = option(0.99, "the level the probability's lower confidence end must reach for certified",
                                    interval=(0.0, 1.0, "open"))
