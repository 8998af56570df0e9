"""The embedded default model: a small ReLU MLP trained here on the digits train split.

Architecture (input ``[B, 1, 8, 8]`` in ``[0, 1]``, see :func:`verify.data.digits`)::

    Flatten -> Linear(64, 32) -> ReLU -> Linear(32, 32) -> ReLU -> Linear(32, 10)

Two shipped copies (state_dicts in ``verify/data/``, a few KB each), both produced by this file:

* ``digits_mlp.pt`` -- plain training (``sigma=0``);
* ``digits_mlp_noise.pt`` -- Gaussian noise augmentation ``x + N(0, sigma^2 I)``, ``sigma=0.25``
  (the base classifier for randomized smoothing at that sigma).

Regenerate both with ``python -m verify.digits_model``. Training is seeded (Adam, mini-batches
drawn from a seeded generator) and takes a few seconds on one CPU core.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import digits
from .train import TrainConfig, build_mlp, train_model

__all__ = ["digits_mlp", "train_digits_mlp", "load_digits_mlp", "accuracy", "WEIGHTS", "NOISE_SIGMA"]

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = {"plain": DATA_DIR / "digits_mlp.pt", "noise": DATA_DIR / "digits_mlp_noise.pt"}
NOISE_SIGMA = 0.25


def digits_mlp() -> nn.Sequential:
    """The untrained 64-32-32-10 ReLU MLP (input ``[B, 1, 8, 8]``)."""
    return build_mlp((1, 8, 8), 10, (32, 32))


def train_digits_mlp(
    seed: int = 0,
    epochs: int = 60,
    sigma: float = 0.0,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
) -> nn.Sequential:
    """Train :func:`digits_mlp` on ``digits("train")`` with Adam and cross-entropy.

    The one training path of the suite (:func:`verify.train.train_model`, method ``standard``,
    or ``noise`` when ``sigma > 0``): ``certify train --data digits --arch mlp --method noise
    --sigma 0.25 --seed 0`` gives the same weights.

    Args:
        seed: seeds the initialisation, the batch order and the noise.
        epochs: passes over the 1,258 training images.
        sigma: std of Gaussian noise added to every training input (0 = plain training).
    Returns:
        The trained network in eval mode on the CPU.
    """
    x, y = digits("train")
    net = build_mlp((1, 8, 8), 10, (32, 32), seed=seed)
    cfg = TrainConfig(method="noise" if sigma > 0 else "standard", epochs=epochs, sigma=sigma, lr=lr,
                      batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-32-32-10 MLP gains nothing from threads; a busy machine loses a lot
    try:
        train_model(net, x, y, cfg)
    finally:
        torch.set_num_threads(threads)
    return net


def load_digits_mlp(kind: str = "plain") -> nn.Sequential:
    """The shipped trained MLP: ``kind="plain"`` or ``"noise"`` (sigma 0.25 augmentation)."""
    if kind not in WEIGHTS:
        raise ValueError(f"unknown digits model {kind!r}; use {' or '.join(WEIGHTS)}")
    net = digits_mlp()
    net.load_state_dict(torch.load(WEIGHTS[kind], map_location="cpu", weights_only=True))
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float = 0.0, seed: int = 0) -> float:
    """Fraction of ``x`` classified as ``y`` (under one draw of N(0, sigma^2) noise if sigma > 0)."""
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (net(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    """Retrain both copies with seed 0 and overwrite the shipped weights."""
    xt, yt = digits("test")
    for kind, sigma in (("plain", 0.0), ("noise", NOISE_SIGMA)):
        net = train_digits_mlp(seed=0, sigma=sigma)
        torch.save(net.state_dict(), WEIGHTS[kind])
        print(f"{WEIGHTS[kind].name}: test accuracy {accuracy(net, xt, yt):.4f}, under noise sigma=0.25 {accuracy(net, xt, yt, 0.25):.4f}")


if __name__ == "__main__":
    main()
