"""PREDICT and CERTIFY (Cohen et al. 2019, Sec. 3.2, Alg. "PREDICT" / "CERTIFY") for a batch.

The smoothed classifier is ``g(x) = argmax_c P_delta(f(x + delta) = c)``, ``delta`` from a
:class:`~smoothing.noise.Noise`. Both procedures run on a whole batch ``x [B, *shape]`` at once
(see :mod:`smoothing.sampling`); only the per-input statistics (a few scipy calls) loop over
the batch.

CERTIFY, for each input:

1. ``n0`` selection samples -> guess ``cA = argmax counts0``;
2. ``n`` fresh estimation samples -> ``nA = counts[cA]``;
3. ``pA_lower = ClopperPearsonLower(nA, n, alpha)`` (one-sided), ``pB_upper = 1 - pA_lower``;
   or, with ``pb_bound=True``, ``pA_lower`` at level ``alpha/2`` and
   ``pB_upper = max_{c != cA} ClopperPearsonUpper(n_c, n, alpha / (2 (K-1)))`` (Bonferroni:
   the events "pA below its bound" and "some other class above its bound" have total
   probability ``<= alpha``; bounding only the runner-up class would not cover the others);
4. abstain (``-1``) if ``pA_lower <= pB_upper`` (one-sided: ``pA_lower <= 1/2``), else return
   ``cA`` and the noise's radius (e.g. ``sigma Phi^-1(pA_lower)``).

With probability at least ``1 - alpha`` over the sampling, a non-abstained answer ``cA`` is
``g(x)`` and ``g`` is constant on the ball of the returned radius (Cohen et al. 2019,
Prop. 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Unpack

import numpy as np
import torch
from torch import Tensor

from .noise import Noise
from .sampling import Perturb, SamplingOptions, count_classes
from .stats import check_n_alpha, cp_lower, cp_upper, label_counts, predict_pvalue

__all__ = ["CertifyOptions", "CertifyResult", "PredictResult", "certify", "predict", "probability_bounds"]


class CertifyOptions(SamplingOptions, total=False):
    """The keyword options of :func:`certify` that an entry point built on it passes on
    unchanged (``**options``; :func:`smoothing.semantic.certify_semantic`): the sampling ones
    (:class:`~smoothing.sampling.SamplingOptions`) and ``n0``, ``n``, ``alpha``, ``norm``,
    ``pb_bound``; one not given takes :func:`certify`'s default."""

    n0: int
    n: int
    alpha: float
    norm: str
    pb_bound: bool


@dataclass
class CertifyResult:
    """Output of :func:`certify` for a batch of ``B`` inputs.

    Attributes:
        prediction: ``[B]`` long, the class ``cA`` or ``-1`` (abstain).
        pa_lower: ``[B]`` float64 lower bounds on ``P(f(x+delta) = cA)``.
        pb_upper: ``[B]`` float64 upper bounds on every other class's probability.
        radius: ``[B]`` float64 certified radius in ``norm`` (0 on abstain).
        counts_selection: ``[B, K]`` counts of the ``n0`` selection samples.
        counts: ``[B, K]`` counts of the ``n`` estimation samples.
    """

    prediction: Tensor
    pa_lower: np.ndarray
    pb_upper: np.ndarray
    radius: np.ndarray
    counts_selection: Tensor
    counts: Tensor
    norm: str
    n0: int
    n: int
    alpha: float
    pb_bound: bool
    extra: dict = field(default_factory=dict)


@dataclass
class PredictResult:
    """Output of :func:`predict`: ``prediction [B]`` (``-1`` = abstain), ``pvalue [B]``,
    ``counts [B, K]``."""

    prediction: Tensor
    pvalue: np.ndarray
    counts: Tensor


def probability_bounds(counts: Tensor | np.ndarray, top: Tensor | np.ndarray, n: int, alpha: float, pb_bound: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(pA_lower [B], pB_upper [B])`` from estimation counts ``[B, K]`` and the selected
    classes ``top [B]`` (see the module docstring for the levels)."""
    n_a, others = label_counts(counts, top)
    if not pb_bound:
        pa = cp_lower(n_a, n, alpha)
        return pa, 1.0 - pa
    pa = cp_lower(n_a, n, alpha / 2)
    B, K = others.shape[0], others.shape[1] + 1
    # cp_upper is increasing in the count, so the max over classes is at the largest count
    pb = cp_upper(others.max(axis=1), n, alpha / (2 * (K - 1))) if K > 1 else np.zeros(B)
    return pa, np.minimum(pb, 1.0 - pa)


def certify(
    model: torch.nn.Module,
    x: Tensor,
    noise: Noise,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    norm: str = "l2",
    pb_bound: bool = False,
    perturb: Perturb | None = None,
    param_shape: tuple[int, ...] | None = None,
    dim: int | None = None,
    **sampling: Unpack[SamplingOptions],
) -> CertifyResult:
    """CERTIFY for a batch ``x [B, *shape]`` (Cohen et al. 2019, Alg. CERTIFY).

    Args:
        model: base classifier ``f``, ``[S, *shape] -> [S, K]`` logits (argmax taken).
        x: clean inputs on the model's device; ``noise.sigma`` is in this space.
        noise: the smoothing distribution.
        n0, n: selection / estimation sample sizes.
        alpha: failure probability (the certificate holds with prob. ``1 - alpha``).
        norm: the norm of the returned radius (``"l1"``, ``"l2"``, ``"linf"``).
        pb_bound: bound ``pB`` separately (Bonferroni ``alpha/2`` each), a larger radius
            when the probability mass is not all on two classes.
        perturb, param_shape: a non-additive perturbation (semantic smoothing).
        dim: dimension for the radius conversions (default ``prod(param_shape)``).
        sampling: ``seed``, ``batch_size``, ``memory_mb``, ``share_noise``, ``deadline``
            (:class:`~smoothing.sampling.SamplingOptions`).

    Raises:
        SmoothingConfigError: an ``(n, alpha)`` pair that can never certify.
    """
    if n0 < 1:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    check_n_alpha(n, alpha, pb_bound=pb_bound)
    counts = count_classes(
        model, x, noise, [n0, n], streams=["select", "estimate"], perturb=perturb, param_shape=param_shape, **sampling,
    )
    c0, c = counts[0], counts[1]
    K = c.shape[1]
    if pb_bound:
        check_n_alpha(n, alpha, pb_bound=True, num_classes=K)
    top = c0.argmax(dim=1)
    pa, pb = probability_bounds(c, top, n, alpha, pb_bound)
    d = dim if dim is not None else math.prod(param_shape if param_shape is not None else x.shape[1:])
    ok = pa > pb
    radius = np.where(ok, noise.radius(pa, pb if pb_bound else None, norm=norm, dim=d), 0.0)
    pred = torch.where(torch.as_tensor(ok, device=top.device), top, torch.full_like(top, -1))
    return CertifyResult(pred, pa, pb, radius, c0, c, norm, int(n0), int(n), float(alpha), bool(pb_bound), {"dim": d})


def predict(
    model: torch.nn.Module,
    x: Tensor,
    noise: Noise,
    *,
    n: int = 100_000,
    alpha: float = 0.001,
    perturb: Perturb | None = None,
    param_shape: tuple[int, ...] | None = None,
    **sampling: Unpack[SamplingOptions],
) -> PredictResult:
    """PREDICT for a batch (Cohen et al. 2019, Alg. PREDICT): the top class ``cA`` when the
    two-sided binomial test of ``nA`` vs ``nA + nB`` (top two counts) at ``1/2`` has
    p-value ``<= alpha``, else ``-1``. Returns a wrong class with probability ``<= alpha``
    (Cohen et al. 2019, Prop. 1). Arguments as :func:`certify`'s."""
    counts = count_classes(
        model, x, noise, [n], streams=["predict"], perturb=perturb, param_shape=param_shape, **sampling,
    )[0]
    K = counts.shape[1]
    k = min(2, K)
    top2 = counts.topk(k, dim=1)
    vals = top2.values.cpu().numpy()
    idx = top2.indices.cpu()
    pv = np.array([predict_pvalue(int(v[0]), int(v[1]) if k > 1 else 0) for v in vals])
    pred = torch.where(torch.as_tensor(pv <= alpha), idx[:, 0], torch.full_like(idx[:, 0], -1))
    return PredictResult(pred.to(counts.device), pv, counts)
