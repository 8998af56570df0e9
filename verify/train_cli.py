"""``certify train``: train a classifier for certification and save it as a ``.pt`` model.

    certify train --data digits --arch mlp --method crown-ibp --eps 0.1 --epochs 60 --out mlp_crown_ibp.pt
    certify train --data digits --method noise --sigma 0.25 --seed 0 --out noise.pt   # = digits-mlp-noise

The model is saved as a full pickled ``nn.Module`` (``torch.save(net)``), the form
``certify run --model`` / ``certify compare --model`` load (:func:`verify.model.load_model`).
``--data digits`` trains on the digits train split and reports the test split's accuracy.
The training itself is :func:`verify.train.train_model`; errors are one line (``CLIError``,
:class:`verify.train.TrainConfigError`).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

__all__ = ["add_train_parser", "cmd_train"]

ARCHS = ("mlp",)
#: the method that certifies what each training method targets (printed as a hint)
NATURAL_METHOD = {"standard": "crown", "noise": "smoothing-gaussian", "smoothadv": "smoothing-gaussian",
                  "pgd": "alpha-crown", "ibp": "interval", "crown-ibp": "crown"}


def add_train_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an argparse ``subparsers`` object."""
    from .train import TRAIN_METHODS, TrainConfig

    d = TrainConfig()
    s = sub.add_parser("train", parents=[common], help="train a model (standard, noise, smoothadv, pgd, ibp, crown-ibp)")
    s.add_argument("--data", default="digits", help="training data (default digits = the digits train split; see certify run --data)")
    s.add_argument("--test-data", help="data to report accuracy on (default for digits: the digits test split)")
    s.add_argument("--limit", type=int, help="first N training inputs only")
    s.add_argument("--arch", default="mlp", help="architecture: mlp (Flatten, Linear+ReLU per --hidden, Linear)")
    s.add_argument("--hidden", default="32,32", help="hidden layer widths of the mlp (default 32,32: the demo's model)")
    s.add_argument("--method", required=True, help=f"one of {', '.join(TRAIN_METHODS)}")
    s.add_argument("--eps", type=float, help="training radius (smoothadv: l_2 attack; pgd / ibp / crown-ibp: --norm ball)")
    s.add_argument("--sigma", type=float, help="Gaussian noise std (noise, smoothadv)")
    s.add_argument("--norm", help="inf or 2 for pgd / ibp / crown-ibp (default inf; smoothadv: 2)")
    s.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    s.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    s.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay:g}")
    s.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation, batch order, noise and attack starts")
    s.add_argument("--attack-steps", type=int, default=d.attack_steps, help=f"PGD steps of pgd / smoothadv (default {d.attack_steps})")
    s.add_argument("--noise-samples", type=int, default=d.noise_samples, help="smoothadv: noise draws per example (default 1)")
    s.add_argument("--warmup-epochs", type=int, help="epochs of clean training before the radius ramp (default 10%% of --epochs)")
    s.add_argument("--ramp-epochs", type=int, help="epochs over which eps grows 0 -> --eps (default 50%% of --epochs)")
    s.add_argument("--kappa-end", type=float, default=d.kappa_end, help="ibp / crown-ibp: final weight of the clean loss (default 0.5)")
    s.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:1, ... (the saved model is on the CPU)")
    s.add_argument("--out", default="model.pt", help="output model file, .pt or .pth (default model.pt)")
    s.set_defaults(func=cmd_train)
    return s


def _config(args: argparse.Namespace):
    """The :class:`verify.train.TrainConfig` of the command line (checked)."""
    from .cli import CLIError
    from .spec import parse_norm
    from .train import TrainConfig

    if args.arch not in ARCHS:
        raise CLIError(f"unknown --arch {args.arch!r}; use {', '.join(ARCHS)}")
    norm = parse_norm(args.norm) if args.norm is not None else None
    return TrainConfig(
        method=args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        seed=args.seed, sigma=args.sigma or 0.0, eps=args.eps or 0.0, norm=norm, attack_steps=args.attack_steps,
        noise_samples=args.noise_samples, warmup_epochs=args.warmup_epochs, ramp_epochs=args.ramp_epochs,
        kappa_end=args.kappa_end,
    ).check()


def _hidden(text: str) -> list[int]:
    from .cli import CLIError

    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--hidden: expected comma-separated widths >= 1, got {text!r}")
    return sizes


def _flag_values(args: argparse.Namespace) -> None:
    """Values given as ``--sigma 0`` / ``--eps -1`` are errors, not 'not given'."""
    from .cli import CLIError

    for name in ("eps", "sigma"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise CLIError(f"--{name} must be a finite number > 0, got {v:g}")
    out = Path(args.out)
    if out.suffix not in (".pt", ".pth"):
        raise CLIError(f"--out must end in .pt or .pth (certify run --model loads those), got {args.out!r}")
    if out.is_dir():
        raise CLIError(f"--out is a directory: {args.out}")


def _load(args: argparse.Namespace):
    """``(x, y, x_test, y_test)``; the test pair is ``None`` without test data."""
    from .cli import CLIError
    from .data import load_data

    data = "digits:train" if args.data == "digits" else args.data
    x, y = load_data(data, limit=args.limit)
    if len(y) == 0:
        raise CLIError(f"data {data!r} holds no inputs")
    test = args.test_data or ("digits:test" if data.startswith("digits") and data != "digits:test" else None)
    xt, yt = load_data(test) if test else (None, None)
    return data, x, y, test, xt, yt


def cmd_train(args: argparse.Namespace) -> int:
    """Train, report accuracy, save the model."""
    import torch

    from .train import build_mlp, train_model

    from .model import check_device

    _flag_values(args)
    cfg = _config(args)
    device = check_device(args.device)
    hidden = _hidden(args.hidden)
    data, x, y, test, xt, yt = _load(args)
    classes = max(int(y.max()) + 1, 2 if yt is None else int(yt.max()) + 1)
    net = build_mlp(tuple(x.shape[1:]), classes, hidden, seed=cfg.seed)
    t0 = time.perf_counter()
    hist = train_model(net, x, y, cfg, progress=not args.quiet, device=device)
    net.cpu()
    sizes = "-".join(str(s) for s in [math.prod(x.shape[1:]), *hidden, classes])
    print(f"trained {cfg.method} mlp {sizes} on {len(y)} inputs of {data}: {cfg.epochs} epochs in "
          f"{time.perf_counter() - t0:.1f} s, last epoch loss {hist['loss'][-1]:.4f}")
    with torch.no_grad():
        acc = [f"train {_accuracy(net, x, y):.4f}"]
        if yt is not None:
            acc.append(f"{test} {_accuracy(net, xt, yt):.4f}")
            if cfg.sigma > 0:
                g = torch.Generator().manual_seed(0)
                acc.append(f"{test} under N(0, {cfg.sigma:g}^2) noise {_accuracy(net, xt + cfg.sigma * torch.randn(xt.shape, generator=g), yt):.4f}")
    print("accuracy: " + ", ".join(acc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net, out)
    print(f"wrote {out}; certify it with e.g.: {_hint(cfg, out, data)}")
    return 0


def _hint(cfg, out: Path, data: str) -> str:
    """A ``certify run`` command for the trained model with the method its training targets."""
    method = NATURAL_METHOD[cfg.method]
    data = "digits" if data.startswith("digits") else data
    if cfg.sigma > 0:
        where = f"--norm 2 --eps {cfg.eps or cfg.sigma:g} --option sigma={cfg.sigma:g}"
    else:
        p = cfg.ball_norm()
        where = f"--norm {'inf' if math.isinf(p) else 2} --eps {cfg.eps or 0.01:g}"
    return f"certify run --model {out} --data {data} --method {method} {where} --radius"


def _accuracy(net, x, y) -> float:
    return float((net(x).argmax(1) == y).float().mean())
