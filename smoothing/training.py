"""Training base classifiers for smoothing: noise augmentation and SmoothAdv.

* Gaussian (or Laplace / uniform) data augmentation (Cohen et al. 2019, Sec. 4 / Lecuyer et
  al. 2019): minimise ``CE(f(x + delta), y)`` with fresh ``delta`` per example and step.
* SmoothAdv (Salman et al. 2019, "Provably robust deep learning via adversarially trained
  smoothed classifiers", Alg. 1 / Eq. (S)): find ``x'`` in the l2 ball of radius ``adv_eps``
  around ``x`` maximising the loss of the *soft* smoothed classifier estimated with ``m``
  noise samples, ``-log( (1/m) sum_i softmax(f(x' + delta_i))_y )``, by ``adv_steps`` steps of
  l2 PGD (normalised gradient, step ``2 adv_eps / adv_steps``), then train on
  ``CE(f(x' + delta_i), y)`` with the same ``delta_i``.

``sigma`` is in the model's input space (normalisation belongs inside the model), as for
certification. Everything is seeded (data order, noise) by ``seed``.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import Noise, get_noise

__all__ = ["smoothadv_attack", "train_noise_augmented"]


def smoothadv_attack(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    eps: float,
    steps: int,
    domain: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """SmoothAdv PGD (Salman et al. 2019, Alg. 1) on the soft smoothed classifier.

    Args:
        x: ``[B, *shape]`` clean inputs; y: ``[B]`` labels.
        noise: ``[m, B, *shape]`` noise samples (kept fixed during the attack).
        eps: l2 radius; steps: PGD steps.
    Returns:
        ``x' [B, *shape]`` (detached), ``||x' - x||_2 <= eps``, inside ``domain``.
    """
    m = noise.shape[0]
    B = x.shape[0]
    step = 2.0 * eps / max(steps, 1)
    xa = x.clone().detach()
    for _ in range(steps):
        xa.requires_grad_(True)
        logits = model((xa.unsqueeze(0) + noise).reshape(m * B, *x.shape[1:]))
        p = F.softmax(logits, dim=1).reshape(m, B, -1).mean(0)
        loss = F.nll_loss(torch.log(p.clamp_min(1e-20)), y)
        (g,) = torch.autograd.grad(loss, xa)
        gn = g.reshape(B, -1).norm(dim=1).clamp_min(1e-12).view(B, *([1] * (x.dim() - 1)))
        xa = xa.detach() + step * g / gn
        d = (xa - x).reshape(B, -1)
        dn = d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = d * torch.clamp(eps / dn, max=1.0)
        xa = x + d.view_as(x)
        if domain is not None:
            xa = xa.clamp(*domain)
    return xa.detach()


def train_noise_augmented(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    sigma: float = 0.25,
    noise: str | Noise = "gaussian",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    adv_eps: float = 0.0,
    adv_steps: int = 1,
    adv_samples: int = 1,
    domain: tuple[float, float] | None = (0.0, 1.0),
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` in place on ``(x [N, *shape], y [N])`` with noise augmentation (Adam).

    Args:
        sigma / noise: the smoothing noise used in training (the certification noise).
        adv_eps > 0: SmoothAdv with ``adv_steps`` PGD steps and ``adv_samples`` noise samples
            per example (Salman et al. 2019); 0 = plain noise augmentation.
        domain: clamp for adversarial inputs (the clean domain, not the noisy inputs).
        log: called with one line per epoch.
    Returns:
        ``{"loss": [...], "noisy_accuracy": [...], "time_s": [...]}`` per epoch.
    """
    nz = get_noise(noise, sigma) if isinstance(noise, str) else noise
    dev = next(model.parameters()).device
    x, y = x.to(dev), y.to(dev).long()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    ngen = torch.Generator(device=dev).manual_seed(int(seed) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    hist: dict[str, list[float]] = {"loss": [], "noisy_accuracy": [], "time_s": []}
    N = x.shape[0]
    m = max(1, int(adv_samples)) if adv_eps > 0 else 1
    for ep in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(N, generator=gen).to(dev)
        tot, correct, seen = 0.0, 0, 0
        for s in range(0, N, batch_size):
            idx = perm[s : s + batch_size]
            xb, yb = x[idx], y[idx]
            B = xb.shape[0]
            delta = nz.sample((m, *xb.shape), device=dev, generator=ngen, dtype=xb.dtype)
            if adv_eps > 0:
                model.eval()
                xb = smoothadv_attack(model, xb, yb, delta, adv_eps, adv_steps, domain)
                model.train()
            logits = model((xb.unsqueeze(0) + delta).reshape(m * B, *xb.shape[1:]))
            yy = yb.repeat(m)
            loss = F.cross_entropy(logits, yy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * B
            correct += int((logits.argmax(1) == yy).sum()) // m
            seen += B
        model.eval()
        hist["loss"].append(tot / seen)
        hist["noisy_accuracy"].append(correct / seen)
        hist["time_s"].append(time.perf_counter() - t0)
        if log is not None:
            log(f"epoch {ep + 1}/{epochs} loss {tot / seen:.4f} noisy acc {correct / seen:.4f} ({hist['time_s'][-1]:.1f}s)")
    return hist
