"""Training classifiers for certification: one loop, six losses (``certify train``).

Methods (``TrainConfig.method``), all with Adam on mini-batches:

* ``standard`` -- cross-entropy ``CE(f(x), y)``.
* ``noise`` -- Gaussian data augmentation ``CE(f(x + delta), y)``, ``delta ~ N(0, sigma^2 I)``
  fresh per example and step (Cohen et al. 2019, Sec. 4): the base classifier of randomized
  smoothing at that ``sigma``.
* ``smoothadv`` -- SmoothAdv (Salman et al. 2019, Alg. 1): ``m`` noise draws ``delta_i``, an
  l_2 PGD point ``x'`` (radius ``eps``) of the soft smoothed classifier
  (:func:`smoothing.training.smoothadv_attack`), then ``CE(f(x' + delta_i), y)``.
* ``pgd`` -- adversarial training (Madry et al. 2018, Eq. (2.1)): ``CE(f(x'), y)`` at the point
  ``x'`` of the l_inf / l_2 ball of radius ``eps`` found by :func:`pgd_train_attack`.
* ``ibp`` -- certified training (Gowal et al. 2018, Eq. (7)):
  ``kappa CE(f(x), y) + (1 - kappa) CE(-m_IBP, y)`` with ``m_IBP [B, K]`` the interval lower
  bounds of the margins ``z_y - z_j`` (:func:`verify.train_bounds.ibp_margins`).
* ``crown-ibp`` -- (Zhang et al. 2020, Eq. (9)): the same with
  ``m = (1 - beta) m_IBP + beta m_CROWN-IBP`` (:func:`verify.train_bounds.crown_ibp_margins`).

Schedules (Gowal et al. 2018, Sec. 4; Zhang et al. 2020, Sec. 4): for ``warmup_epochs`` the
radius is 0 (clean training), then over ``ramp_epochs`` it grows linearly from 0 to ``eps`` per
step while ``kappa`` falls from 1 to ``kappa_end`` and ``beta`` from 1 to 0; after that they stay.
The radius schedule applies to ``smoothadv``, ``pgd``, ``ibp`` and ``crown-ibp``.

Determinism: the caller seeds the initialisation (:func:`build_mlp`); the batch order, the noise
and the PGD starts are drawn from one ``torch.Generator`` seeded with ``seed`` (the scheme of the
demo's models, :mod:`verify.digits_model`), so a run repeats exactly on the same machine and
thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CertifyError
from .train_bounds import crown_ibp_margins, ibp_margins, mlp_layers

__all__ = ["TRAIN_METHODS", "TrainConfig", "TrainConfigError", "build_mlp", "train_model", "pgd_train_attack",
           "schedule"]

TRAIN_METHODS = ("standard", "noise", "smoothadv", "pgd", "ibp", "crown-ibp")
_NOISE = ("noise", "smoothadv")
_EPS = ("smoothadv", "pgd", "ibp", "crown-ibp")
_CERTIFIED = ("ibp", "crown-ibp")


class TrainConfigError(CertifyError):
    """A training option is missing, out of range, or does not apply to the method."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`train_model`; the defaults are the demo's settings (:mod:`verify.digits_model`).

    Attributes:
        method: one of :data:`TRAIN_METHODS`.
        epochs, lr, batch_size, weight_decay, seed: Adam on mini-batches, seeded.
        sigma: noise std in the model's input space (``noise``, ``smoothadv``).
        eps: radius of the training balls (``smoothadv``: l_2; ``pgd``, ``ibp``, ``crown-ibp``: ``norm``).
        norm: ``math.inf`` or 2 for ``pgd``, ``ibp``, ``crown-ibp``; ``smoothadv`` is l_2;
            ``None`` = inf (2 for ``smoothadv``); :meth:`ball_norm` resolves it.
        attack_steps: PGD steps (``pgd``, ``smoothadv``).
        noise_samples: noise draws per example (``smoothadv``'s ``m``).
        warmup_epochs, ramp_epochs: the radius schedule; ``None`` = 10 % / 50 % of ``epochs``.
        kappa_end: final weight of the clean loss (``ibp``, ``crown-ibp``; Gowal et al. use 0.5).
        domain: the inputs' range; adversarial points and l_inf boxes are clipped to it.
    """

    method: str = "standard"
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    sigma: float = 0.0
    eps: float = 0.0
    norm: float | None = None
    attack_steps: int = 10
    noise_samples: int = 1
    warmup_epochs: int | None = None
    ramp_epochs: int | None = None
    kappa_end: float = 0.5
    domain: tuple[float, float] | None = (0.0, 1.0)

    def check(self) -> "TrainConfig":
        """Raise :class:`TrainConfigError` (one line) for a bad or inapplicable value; returns self."""
        m = self.method
        if m not in TRAIN_METHODS:
            raise TrainConfigError(f"unknown training method {m!r}; use {', '.join(TRAIN_METHODS)}")
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("attack_steps", self.attack_steps, 1)
        _at_least("noise_samples", self.noise_samples, 1)
        for name in ("warmup_epochs", "ramp_epochs"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 0)
        _finite("lr", self.lr, positive=True)
        _finite("weight_decay", self.weight_decay)
        _finite("sigma", self.sigma)
        _finite("eps", self.eps)
        if not 0.0 <= self.kappa_end <= 1.0:
            raise TrainConfigError(f"kappa_end must be in [0, 1], got {self.kappa_end:g}")
        if (m in _NOISE) != (self.sigma > 0):
            raise TrainConfigError(f"method {m} needs sigma > 0" if m in _NOISE else f"sigma does not apply to method {m}")
        if (m in _EPS) != (self.eps > 0):
            raise TrainConfigError(f"method {m} needs eps > 0" if m in _EPS else f"eps does not apply to method {m}")
        p = self.ball_norm()
        if m in ("pgd", "ibp", "crown-ibp") and not (math.isinf(p) or p == 2):
            raise TrainConfigError(f"method {m} trains on l_inf or l_2 balls, got norm {p:g}")
        if m == "smoothadv" and p != 2:
            raise TrainConfigError(f"smoothadv attacks in l_2 (norm 2), got norm {p:g}")
        return self

    def ball_norm(self) -> float:
        """The norm of the training balls: ``norm``, or its default (inf; 2 for ``smoothadv``)."""
        if self.norm is None:
            return 2.0 if self.method == "smoothadv" else math.inf
        return float(self.norm)

    def ramp(self) -> tuple[float, float]:
        """``(warmup, ramp)`` in epochs, defaults filled in."""
        w = round(0.1 * self.epochs) if self.warmup_epochs is None else self.warmup_epochs
        r = round(0.5 * self.epochs) if self.ramp_epochs is None else self.ramp_epochs
        return float(w), float(r)


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise TrainConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _finite(name: str, value: float, positive: bool = False) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise TrainConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def build_mlp(input_shape: Sequence[int], classes: int, hidden: Sequence[int] = (32, 32), seed: int | None = None) -> nn.Sequential:
    """``Flatten -> Linear -> ReLU -> ... -> Linear`` from ``[B, *input_shape]`` to ``[B, classes]``.

    With ``seed`` the initialisation is drawn under ``torch.manual_seed(seed)`` without changing
    the global random state (the demo models' scheme)."""
    if not hidden or any(int(h) < 1 for h in hidden) or classes < 2:
        raise TrainConfigError(f"an MLP needs hidden sizes >= 1 and >= 2 classes, got hidden {list(hidden)}, {classes} classes")
    sizes = [math.prod(input_shape), *[int(h) for h in hidden], int(classes)]

    def make() -> nn.Sequential:
        mods: list[nn.Module] = [nn.Flatten()]
        for i in range(len(sizes) - 1):
            mods += [nn.Linear(sizes[i], sizes[i + 1])] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*mods)

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def schedule(cfg: TrainConfig, epoch_progress: float) -> tuple[float, float, float]:
    """``(eps_t, kappa_t, beta_t)`` after ``epoch_progress`` epochs (a float; see the module
    docstring): linear ramp after the warm-up (Gowal et al. 2018, Sec. 4; Zhang et al. 2020, Sec. 4)."""
    warm, ramp = cfg.ramp()
    if ramp > 0:
        frac = min(max((epoch_progress - warm) / ramp, 0.0), 1.0)
    else:
        frac = 1.0 if epoch_progress >= warm else 0.0
    return cfg.eps * frac, 1.0 - (1.0 - cfg.kappa_end) * frac, 1.0 - frac


def pgd_train_attack(net: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float, steps: int,
                     gen: torch.Generator, domain: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """PGD on the cross-entropy (Madry et al. 2018, Sec. 2): a uniform random start in the l_inf
    box (l_2: a random point of the ball), ``steps`` steps of size ``2.5 eps / steps`` (signed
    gradient for l_inf, normalised gradient for l_2), projected on the ball and the domain.

    The training attack (one lane, no counterexample check); :func:`verify.attack.pgd_attack` is
    the verification attack. ``x [B, *shape]``, ``y [B]`` -> ``x' [B, *shape]`` (detached)."""
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    if math.isinf(norm):
        start = ((2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * eps).to(x.device)
    else:
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        u = (torch.rand(B, generator=gen, dtype=x.dtype) ** (1.0 / x[0].numel())).to(x.device)
        start = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(view) * (eps * u).view(view)
    xa = _project(x, x + start, eps, norm, domain)
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xa), y), xa)
        if math.isinf(norm):
            step = g.sign()
        else:
            step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
        xa = _project(x, xa.detach() + alpha * step, eps, norm, domain)
    return xa.detach()


def _project(x: Tensor, xa: Tensor, eps: float, norm: float, domain: tuple[float, float] | None) -> Tensor:
    """``xa`` moved into the ball of radius ``eps`` around ``x`` (l_inf / l_2), then the domain."""
    if math.isinf(norm):
        xa = torch.maximum(torch.minimum(xa, x + eps), x - eps)
    else:
        d = (xa - x).flatten(1)
        n = d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xa = x + (d * torch.clamp(eps / n, max=1.0)).view_as(x)
    return xa if domain is None else xa.clamp(*domain)


def _batch_loss(net: nn.Module, cfg: TrainConfig, xb: Tensor, yb: Tensor, gen: torch.Generator,
                progress: float) -> tuple[Tensor, Tensor]:
    """The method's loss on one batch and the logits ``[B', K]`` whose accuracy is reported
    (``B' = m B`` for ``smoothadv``). ``progress``: epochs done (a float, for the schedule)."""
    m = cfg.method
    eps_t, kappa, beta = schedule(cfg, progress)
    if m == "noise":
        xb = xb + cfg.sigma * torch.randn(xb.shape, generator=gen).to(xb)
    elif m == "smoothadv":
        return _smoothadv_loss(net, cfg, xb, yb, gen, eps_t)
    elif m == "pgd" and eps_t > 0:
        net.eval()
        xb = pgd_train_attack(net, xb, yb, eps_t, cfg.ball_norm(), cfg.attack_steps, gen, cfg.domain)
        net.train()
    logits = net(xb)
    loss = F.cross_entropy(logits, yb)
    if m in _CERTIFIED and eps_t > 0:
        if m == "ibp" or beta < 1:
            margins = ibp_margins(net, xb, yb, eps_t, cfg.ball_norm(), cfg.domain)
        if m == "crown-ibp" and beta > 0:
            crown = crown_ibp_margins(net, xb, yb, eps_t, cfg.ball_norm(), cfg.domain)
            margins = crown if beta == 1 else (1 - beta) * margins + beta * crown
        loss = kappa * loss + (1 - kappa) * F.cross_entropy(-margins, yb)
    return loss, logits


def _smoothadv_loss(net: nn.Module, cfg: TrainConfig, xb: Tensor, yb: Tensor, gen: torch.Generator,
                    eps_t: float) -> tuple[Tensor, Tensor]:
    """SmoothAdv (Salman et al. 2019, Alg. 1): ``m`` noise draws ``[m, B, *shape]``, the attack
    on the soft smoothed classifier, cross-entropy on every noisy copy."""
    from smoothing.training import smoothadv_attack

    k, B = cfg.noise_samples, xb.shape[0]
    delta = cfg.sigma * torch.randn((k, *xb.shape), generator=gen).to(xb)
    if eps_t > 0:
        net.eval()
        xb = smoothadv_attack(net, xb, yb, delta, eps_t, cfg.attack_steps, cfg.domain)
        net.train()
    logits = net((xb.unsqueeze(0) + delta).reshape(k * B, *xb.shape[1:]))
    return F.cross_entropy(logits, yb.repeat(k)), logits


def train_model(net: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, *, progress: bool = False,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Train ``net`` in place on ``(x [N, *shape], y [N])`` with ``cfg.method`` (module docstring).

    Runs on ``device`` (``net`` is moved there; the batch order, noise and attack starts come
    from a seeded CPU generator, so that a run repeats on any device up to the device's sums).
    Certified methods need an MLP chain (:func:`verify.train_bounds.mlp_layers`). ``progress``:
    a tqdm bar over the steps on stderr. Returns ``{"loss", "accuracy", "time_s"}`` per epoch
    (mean batch loss, accuracy of the logits trained on); ``net`` is left in eval mode.
    """
    cfg.check()
    if cfg.method in _CERTIFIED:
        mlp_layers(net)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(y) / cfg.batch_size)
    hist: dict[str, list[float]] = {"loss": [], "accuracy": [], "time_s": []}
    bar = _bar(cfg, steps, progress)
    net.train()
    try:
        for epoch in range(cfg.epochs):
            t0, tot, correct, seen = time.perf_counter(), 0.0, 0.0, 0
            perm = torch.randperm(len(y), generator=gen)
            for s, i in enumerate(range(0, len(y), cfg.batch_size)):
                idx = perm[i : i + cfg.batch_size]
                loss, logits = _batch_loss(net, cfg, x[idx], y[idx], gen, epoch + s / steps)
                opt.zero_grad()
                loss.backward()
                opt.step()
                reps = len(logits) // len(idx)  # smoothadv: m noisy copies per example
                tot += float(loss.detach()) * len(idx)
                correct += float((logits.detach().argmax(1) == y[idx].repeat(reps)).sum()) / reps
                seen += len(idx)
                bar.update(1)
            hist["loss"].append(tot / seen)
            hist["accuracy"].append(correct / seen)
            hist["time_s"].append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{tot / seen:.3f}", acc=f"{correct / seen:.3f}")
    finally:
        bar.close()
    net.eval()
    return hist


def _bar(cfg: TrainConfig, steps: int, progress: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=cfg.epochs * steps, desc=f"train {cfg.method}", unit="batch", file=sys.stderr,
                disable=not progress, leave=False)

