"""Denoisers for denoised smoothing (Salman et al. 2020, "Denoised smoothing: a provable defense
for pretrained classifiers"): the architecture, the two training objectives, saving and loading.

Denoised smoothing certifies an off-the-shelf classifier ``f`` that never saw noise by smoothing
the composition ``f(D(.))``: ``g(x) = argmax_c P_delta(f(D(x + delta)) = c)``,
``delta ~ N(0, sigma^2 I)``. Cohen et al.'s theorem holds for any base classifier, so
``f(D(.))`` is just another base classifier and the radius ``sigma Phi^-1(pA_lower)`` is
certified whatever ``D`` is; ``D`` only decides how large ``pA`` is.

Architecture (:class:`ResidualDenoiser`): for inputs ``z [B, *input_shape]`` with
``d = prod(input_shape)`` coordinates, ``D(z) = clamp(z - r(z), lo, hi)`` where
``r = Linear(d, h) -> ReLU -> Linear(h, d)`` predicts the noise (a residual denoiser, as the
paper's DnCNN; an MLP because 8x8 digits have 64 coordinates and the smoothing runs it on every
one of ``n`` noisy copies) and the clamp keeps the output in the clean domain.

Objectives (Salman et al. 2020, Sec. 3), both with fresh ``delta ~ N(0, sigma^2 I)`` per example
and step:

* MSE: ``L_MSE = E ||D(x + delta) - x||_2^2`` (:func:`mse_objective`; we average over the
  coordinates, which only rescales it);
* stability: ``L_Stab = E CE(F(D(x + delta)), f(x))`` with ``F`` the classifier's logits and
  ``f(x) = argmax F(x)`` its own clean prediction (no labels needed); the classifier is frozen
  and only ``D`` is trained (:func:`stability_objective`).
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ResidualDenoiser",
    "mse_objective",
    "stability_objective",
    "train_denoiser",
    "save_denoiser",
    "load_denoiser",
    "denoiser_mse",
    "BUNDLED",
    "OBJECTIVES",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

#: denoisers shipped with the package (trained by ``python -m verify.digits_denoiser``), by name
BUNDLED: dict[str, Path] = {
    "digits-mse": DATA_DIR / "denoiser_digits_mse.pt",
    "digits-stability": DATA_DIR / "denoiser_digits_stability.pt",
}

OBJECTIVES = ("mse", "stability")


class ResidualDenoiser(nn.Module):
    """``D(z) = clamp(z - r(z), lo, hi)``, ``r`` a one-hidden-layer ReLU MLP on the flattened input.

    Args:
        input_shape: shape of one input (e.g. ``(1, 8, 8)``); ``D`` maps ``[B, *input_shape]``
            to ``[B, *input_shape]``.
        hidden: width ``h`` of the hidden layer.
        domain: ``(lo, hi)`` clamp of the output (the clean inputs' range), or ``None``.
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), hidden: int = 128,
                 domain: tuple[float, float] | None = (0.0, 1.0)) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.hidden = int(hidden)
        self.domain = None if domain is None else (float(domain[0]), float(domain[1]))
        d = math.prod(self.input_shape)
        self.residual = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, d))

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, *input_shape] -> D(z) [B, *input_shape]``."""
        out = z - self.residual(z.flatten(1)).view_as(z)
        return out if self.domain is None else out.clamp(*self.domain)

    def config(self) -> dict:
        """The constructor arguments (saved beside the weights)."""
        return {"input_shape": list(self.input_shape), "hidden": self.hidden,
                "domain": None if self.domain is None else list(self.domain)}


def mse_objective(denoiser: nn.Module, x: Tensor, noisy: Tensor) -> Tensor:
    """Salman et al. 2020's MSE objective on one batch: ``mean ||D(x + delta) - x||^2 / d``.

    Args:
        x: clean inputs ``[B, *shape]``; noisy: ``x + delta``, ``[B, *shape]``.
    """
    return F.mse_loss(denoiser(noisy), x)


def stability_objective(denoiser: nn.Module, classifier: nn.Module, x: Tensor, noisy: Tensor) -> Tensor:
    """Salman et al. 2020's stability objective on one batch: ``mean CE(F(D(x + delta)), f(x))``.

    Args:
        classifier: ``F``, ``[B, *shape] -> [B, K]`` logits, frozen (no parameter is updated;
            gradients flow through it to ``D``).
        x: clean inputs ``[B, *shape]``; noisy: ``x + delta``, ``[B, *shape]``.
    """
    with torch.no_grad():
        target = classifier(x).argmax(dim=1)
    return F.cross_entropy(classifier(denoiser(noisy)), target)


def _frozen(classifier: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(classifier).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def train_denoiser(
    denoiser: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    objective: str = "mse",
    classifier: nn.Module | None = None,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``denoiser`` in place on clean inputs ``x [N, *shape]`` with Adam.

    Args:
        sigma: std of the Gaussian noise ``delta`` (the smoothing sigma the denoiser is for).
        objective: ``"mse"`` (:func:`mse_objective`) or ``"stability"``
            (:func:`stability_objective`, needs ``classifier``; a frozen copy is used).
        seed: seeds the batch order and the noise; runs repeat exactly on one thread.
        log: called with one line per tenth of the epochs.
    Returns:
        The mean training loss of every epoch.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown denoiser objective {objective!r}; use {' or '.join(OBJECTIVES)}")
    if objective == "stability" and classifier is None:
        raise ValueError("the stability objective needs the classifier")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    frozen = _frozen(classifier) if classifier is not None else None
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    history: list[float] = []
    denoiser.train()
    for ep in range(epochs):
        t0 = time.perf_counter()
        history.append(_epoch(denoiser, frozen, x, sigma, objective, opt, gen, batch_size))
        if log is not None and (ep + 1) % max(1, epochs // 10) == 0:
            log(f"{objective} epoch {ep + 1}/{epochs}: loss {history[-1]:.5f} ({time.perf_counter() - t0:.2f} s)")
    denoiser.eval()
    return history


def _epoch(denoiser, classifier, x: Tensor, sigma: float, objective: str, opt, gen: torch.Generator, batch_size: int) -> float:
    """One pass over ``x`` in a seeded order with fresh noise; returns the mean loss."""
    perm = torch.randperm(x.shape[0], generator=gen)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[perm[i : i + batch_size]]
        noisy = xb + sigma * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
        if objective == "mse":
            loss = mse_objective(denoiser, xb, noisy)
        else:
            loss = stability_objective(denoiser, classifier, xb, noisy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * xb.shape[0]
    return total / x.shape[0]


@torch.no_grad()
def denoiser_mse(denoiser: nn.Module, x: Tensor, sigma: float, seed: int = 0, draws: int = 10) -> float:
    """``mean ||D(x + delta) - x||^2 / d`` over ``draws`` seeded noise draws per input of
    ``x [N, *shape]`` (``nn.Identity()`` gives the noisy input's error, about ``sigma^2``)."""
    gen = torch.Generator().manual_seed(int(seed))
    total = 0.0
    for _ in range(draws):
        noisy = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        total += float(F.mse_loss(denoiser(noisy), x))
    return total / draws


def save_denoiser(denoiser: ResidualDenoiser, path: str | Path, **meta: object) -> None:
    """Write ``denoiser`` as ``{"config", "state_dict", "meta"}`` (loadable with
    ``weights_only=True``); ``meta`` holds plain values such as the training sigma."""
    state = {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}
    torch.save({"config": denoiser.config(), "state_dict": state, "meta": dict(meta)}, Path(path))


def load_denoiser(spec: str | Path) -> tuple[nn.Module, dict]:
    """A denoiser and its metadata from a name or a file.

    Args:
        spec: ``"identity"`` (``D(z) = z``), a :data:`BUNDLED` name (``"digits-mse"``,
            ``"digits-stability"``), or the path of a file written by :func:`save_denoiser`.
    Returns:
        ``(denoiser in eval mode on the CPU, meta)``; ``meta["input_shape"]`` is the input shape
        it takes (``None`` for the identity: any shape).
    Raises:
        ValueError: an unknown name, a missing or malformed file (one line).
    """
    name = str(spec)
    if name == "identity":
        return nn.Identity(), {"name": "identity", "input_shape": None}
    path = BUNDLED.get(name, Path(name))
    if not path.is_file():
        raise ValueError(f"denoiser {name!r} is neither identity, {', '.join(BUNDLED)} nor an existing file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        cfg = obj["config"]
        net = ResidualDenoiser(tuple(cfg["input_shape"]), int(cfg["hidden"]), cfg["domain"])
        net.load_state_dict(obj["state_dict"])
    except Exception as e:  # torch / pickle / key errors of a foreign file (their messages run to many lines)
        raise ValueError(f"denoiser file {path} is not one written by smoothing.denoiser.save_denoiser "
                         f"({type(e).__name__} while reading it)") from None
    meta = {**obj.get("meta", {}), "name": name, "input_shape": tuple(net.input_shape)}
    return net.eval(), meta
