"""Randomized smoothing: probabilistic certificates of the smoothed classifier ``g``.

Modules: :mod:`~smoothing.noise` (distributions and radius formulas), :mod:`~smoothing.stats`
(Clopper-Pearson, sample sizes), :mod:`~smoothing.sampling` (batched Monte Carlo on the
device), :mod:`~smoothing.certify` (PREDICT / CERTIFY), :mod:`~smoothing.topk`,
:mod:`~smoothing.zhang` (the non-Gaussian noise of Zhang et al. 2020 and its bound),
:mod:`~smoothing.semantic` (rotation / translation), :mod:`~smoothing.regression` (median
smoothing), :mod:`~smoothing.inverse` (invariance probability over a set),
:mod:`~smoothing.training` (noise augmentation, SmoothAdv) and :mod:`~smoothing.methods` (the
registered ``smoothing-*`` methods, imported lazily by the registry).
"""
from .certify import CertifyResult, PredictResult, certify, predict
from .noise import FLOAT_NOTE, GaussianNoise, LaplaceNoise, Noise, UniformNoise, get_noise
from .stats import SmoothingConfigError, check_n_alpha, cp_interval, cp_lower, cp_upper, min_samples
from .zhang import ZhangNoise

__all__ = [
    "CertifyResult",
    "PredictResult",
    "certify",
    "predict",
    "Noise",
    "GaussianNoise",
    "LaplaceNoise",
    "UniformNoise",
    "ZhangNoise",
    "get_noise",
    "FLOAT_NOTE",
    "SmoothingConfigError",
    "check_n_alpha",
    "cp_lower",
    "cp_upper",
    "cp_interval",
    "min_samples",
]
