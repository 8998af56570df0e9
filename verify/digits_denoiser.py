"""The shipped digits denoisers for denoised smoothing (``smoothing-denoised``), trained here.

Two copies of :class:`smoothing.denoiser.ResidualDenoiser` (input ``[B, 1, 8, 8]``, hidden width
128, output clamped to ``[0, 1]``), trained on ``digits("train")`` with Gaussian noise at the
demo's sigma (:data:`verify.digits_model.NOISE_SIGMA` = 0.25), state_dicts with their config in
``smoothing/data/`` (about 70 KB each):

* ``denoiser_digits_mse.pt`` -- the MSE objective ``||D(x + delta) - x||^2`` (Salman et al. 2020,
  Sec. 3), ``MSE_EPOCHS`` epochs from a seeded initialisation; it does not depend on any classifier;
* ``denoiser_digits_stability.pt`` -- the stability objective ``CE(f(D(x + delta)), f(x))`` with
  ``f`` the frozen plain digits MLP (``digits-mlp``, never trained with noise),
  ``STABILITY_EPOCHS`` epochs starting from the MSE denoiser (fine-tuning; from a fresh
  initialisation it ends less accurate under noise on these digits).

They live beside :mod:`smoothing.denoiser` (which loads them by name) rather than in
``verify/data/``: the ``smoothing`` package imports nothing of ``verify`` beyond the spec,
certificate and registry types. Regenerate both with ``python -m verify.digits_denoiser``
(seeded, one thread, about 5 s).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from smoothing.denoiser import BUNDLED, ResidualDenoiser, denoiser_mse, save_denoiser, train_denoiser

from .data import digits
from .digits_model import NOISE_SIGMA, accuracy, load_digits_mlp

__all__ = ["train_digits_denoisers", "MSE_EPOCHS", "STABILITY_EPOCHS", "HIDDEN"]

HIDDEN = 128
MSE_EPOCHS = 100
STABILITY_EPOCHS = 50


def train_digits_denoisers(seed: int = 0, sigma: float = NOISE_SIGMA, mse_epochs: int = MSE_EPOCHS,
                           stability_epochs: int = STABILITY_EPOCHS) -> dict[str, ResidualDenoiser]:
    """``{"mse": D_mse, "stability": D_stab}`` trained on the digits train split (see the module
    docstring); seeded by ``seed`` (initialisation, batch order, noise), on one thread."""
    x, _ = digits("train")
    classifier = load_digits_mlp("plain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only add noise to the timing and the sums' order
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mse = ResidualDenoiser((1, 8, 8), HIDDEN)
        train_denoiser(mse, x, sigma=sigma, objective="mse", epochs=mse_epochs, seed=seed)
        stab = copy.deepcopy(mse)
        train_denoiser(stab, x, sigma=sigma, objective="stability", classifier=classifier, epochs=stability_epochs, seed=seed + 1)
    finally:
        torch.set_num_threads(threads)
    return {"mse": mse, "stability": stab}


def main() -> None:
    """Retrain both denoisers with seed 0, overwrite the shipped files, print test-split figures."""
    xt, yt = digits("test")
    f = load_digits_mlp("plain")
    sigma = NOISE_SIGMA
    print(f"identity: test MSE under noise {denoiser_mse(nn.Identity(), xt, sigma):.4f}, "
          f"digits-mlp accuracy under noise {accuracy(f, xt, yt, sigma):.4f}")
    nets = train_digits_denoisers(seed=0, sigma=sigma)
    for objective, net in nets.items():
        path = BUNDLED[f"digits-{objective}"]
        save_denoiser(net, path, sigma=sigma, objective=objective, seed=0, hidden=HIDDEN,
                      epochs=MSE_EPOCHS if objective == "mse" else STABILITY_EPOCHS,
                      classifier="digits-mlp" if objective == "stability" else "none",
                      init="mse denoiser" if objective == "stability" else "seeded")
        acc = accuracy(nn.Sequential(net, f), xt, yt, sigma)
        print(f"{path.name}: test MSE under noise {denoiser_mse(net, xt, sigma):.4f}, "
              f"digits-mlp accuracy on D(x + noise) {acc:.4f}")


if __name__ == "__main__":
    main()
