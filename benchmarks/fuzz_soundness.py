"""Soundness fuzzing of every deterministic method against a witness ground truth.

Random small networks (families below; weight scales from 1e-2 to 1e3), centres at random
points, on corners and faces of the domain [0, 1] and near decision ties, l_inf / l_2 / l_1
balls with radii from 0 and 1e-9 up to just above the distance of the closest known
counterexample. A *witness* is a point of the domain that violates the property in a float64
forward pass (and in the model's own dtype): the exact MILP minimum distortion's point for
ReLU MLPs (also with a skip connection) and small average-pooling CNNs under l_inf / l_1
(:func:`relax.exact.milp.minimum_distortion`), else the closest point a
PGD radius search finds. With ``r`` the witness's distance, every ball of radius ``>= r``
contains it, so

* a **false certificate** is ``certified`` on a ball that contains the witness;
* a **false falsification** is ``falsified`` with a counterexample outside the ball or one
  that a single-input forward pass (own dtype and float64) does not confirm.

Radii: ``0, 1e-9, r/2, r (1 + 1e-3), r (1 + 1e-2), 1.5 r`` (the last four only with a witness).
Every (network, centre, norm, radius, method) is one case; a method that refuses a network
(e.g. ``lp`` on a CNN) is counted as "refused", not as a case.

Usage::

    python benchmarks/fuzz_soundness.py [--nets 12] [--seed 0] [--methods crown,lp] [--out FILE]

writes one JSON line per case to ``--out`` (incrementally) and prints the table per method
(cases, certified, falsified, false answers). The fast slice in ``tests/test_fuzz_soundness.py``
runs :func:`run` with a few networks.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import types
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before this folder: benchmarks/smoothing.py is not the package

from verify.registry import get_method, list_methods  # noqa: E402
from verify.spec import LpBall, Robust  # noqa: E402

FAMILIES = ("mlp", "bn", "cnn", "residual", "sigmoid", "tanh", "smooth", "attention", "shallow", "transformer", "convnet", "channels",
            "normalize", "bottleneck", "lookup", "binarised", "onnx", "cell", "unet")
SCALES = (1e-2, 1.0, 1e2, 1e3)
CENTRES = ("random", "corner", "face", "tie")
NORMS = (math.inf, 2.0, 1.0)

#: options that keep each method to a fraction of a second on these networks
FAST_OPTIONS: dict[str, dict] = {
    "alpha-crown": dict(iterations=10),
    "milp": dict(time_limit=20.0),
    "bab": dict(attack_restarts=2, random_samples=200),
    "lipschitz-sdp": dict(time_limit=20.0),
}
#: methods run on a subset of the balls (slow per call)
SLOW = {"sdp", "lipschitz-sdp", "milp", "bab"}


# ------------------------------------------------------------------------------------ networks


class _Residual(nn.Module):
    def __init__(self, n_in: int, width: int, n_out: int) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(n_in, width), nn.Linear(width, width), nn.Linear(width, n_out)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.mid(h)))


class _ConvNet(nn.Module):
    """Two convolutions in a row, BatchNorm, a residual add, average pooling and a padded
    convolution on 8 x 8 maps: the patch pass of :mod:`relax.bounds.patches` bounds its layers."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.pool, self.c4 = nn.BatchNorm2d(4), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Linear(4 * 4 * 4, n_out)

    def forward(self, x):
        h = torch.relu(self.bn(self.c2(self.c1(x))))
        h = self.pool(torch.relu(h + self.c3(h)))
        return self.out(torch.relu(self.c4(h)).flatten(1))


class _Channels(nn.Module):
    """Channel slices, a channel gather with a repeat and a concatenation along channels between
    convolutions, then a transpose to channels-last and a softmax over the channels (as in
    carvana's UNet): patches through selections, rows moved to their sources, dense rows to a cut."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(7, 2, 3, padding=1)
        self.out = nn.Linear(2 * 6 * 6, n_out)

    def forward(self, x):
        h = torch.relu(self.c1(x[:, :2]))
        g = torch.relu(self.c2(h))
        z = self.c3(torch.cat([g, h[:, [3, 0, 3]], x[:, 2:]], 1)).permute(0, 2, 3, 1)
        return self.out(torch.softmax(z, -1).flatten(1))


class _Cell(nn.Module):
    """3 x 3 convolutions (padding 1) with a residual add and a 1 x 1 head on 8 x 8 maps, of which
    the output reads one cell (as yolo_2023's properties read one cell of its grid): CROWN,
    alpha-CROWN and the search bound and split only the neurons in the spec rows' cone
    (:mod:`relax.bounds.cone`), the rest keep their interval boxes."""

    def __init__(self, n_out: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head, self.act = nn.Conv2d(4, n_out, 1), act()

    def forward(self, x):
        h = self.act(self.c1(x))
        h = self.act(h + self.c2(h))
        return self.head(self.act(self.c3(h)))[:, :, 5, 2]


class _UNet(nn.Module):
    """A UNet's down and up path on 16 x 16 maps, as carvana's ``unet_upsample_small`` has it: a
    convolution, average pooling, a convolution, a stride-2 transposed convolution (by net seed:
    kernel 2; kernel 3 with padding and output padding; kernel 3 then a crop and a padding with a
    nonzero constant back to the skip's size), a concatenation with the skip and a convolution;
    the output reads one cell of a 1 x 1 head. The rows after the concatenation go through the
    transposed convolution as patches, one pass per phase of their positions."""

    def __init__(self, n_out: int, variant: int) -> None:
        super().__init__()
        self.variant = variant
        self.c1, self.pool, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1)
        up = (dict(kernel_size=2), dict(kernel_size=3, padding=1, output_padding=1), dict(kernel_size=3))[variant]
        self.up = nn.ConvTranspose2d(4, 3, stride=2, **up)
        self.c3, self.head = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(4, n_out, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        u = self.up(torch.relu(self.c2(self.pool(h))))
        if self.variant == 2:  # 17 x 17 -> 15 x 15 -> 16 x 16
            u = F.pad(u[:, :, 1:-1, 1:-1], (1, 0, 0, 1), value=0.25)
        return self.head(torch.relu(self.c3(torch.cat([h, u], 1))))[:, :, 9, 6]


class _Table(nn.Module):
    """A random continuous piecewise-linear function of each entry written as a lookup table of
    ReLUs, ``relu(x[..., None] - t) @ w + c`` (kinks spread like the pre-activations, slope
    changes of both signs), as ml4acopf's ONNX networks write their sigmoids."""

    def __init__(self, g: torch.Generator, scale: float, kinks: int = 10) -> None:
        super().__init__()
        self.register_buffer("t", (torch.randn(kinks, generator=g) * 2 * scale).sort().values)
        self.register_buffer("w", torch.randn(kinks, 1, generator=g))
        self.c = float(torch.randn(1, generator=g))

    def forward(self, x):
        return (torch.relu(x.unsqueeze(-1) - self.t) @ self.w).reshape(x.shape) + self.c


class _Binarised(nn.Module):
    """Two binarised layers written as VNN-COMP 2023's traffic-sign nets write them,
    ``sign(sign(z) + 0.1)`` (0 maps to +1), between affine layers."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(n_in, 8), nn.Linear(8, 8), nn.Linear(8, n_out)

    def forward(self, x):
        h = torch.sign(torch.sign(self.inp(x)) + 0.1)
        h = torch.sign(torch.sign(self.mid(h)) + 0.1)
        return self.out(h)


class _Smooth(nn.Module):
    """sin, exp(-|h|), sign and squares on slices of one hidden layer."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(n_in, 8), nn.Linear(8, n_out)

    def forward(self, x):
        h = self.inp(x)
        z = torch.cat([torch.sin(h[:, :2]), torch.exp(-torch.abs(h[:, 2:4])), torch.sign(h[:, 4:6]), h[:, 6:8] ** 2], 1)
        return self.out(z)


class _Attention(nn.Module):
    """One self-attention head on two tokens: softmax(Q K^T) V, products of activations."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp, self.q, self.k, self.v = nn.Linear(n_in, 6), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.out = nn.Linear(6, n_out)

    def forward(self, x):
        t = self.inp(x).view(-1, 2, 3)
        att = torch.softmax(torch.matmul(self.q(t), self.k(t).transpose(1, 2)), dim=-1)
        return self.out(torch.matmul(att, self.v(t)).flatten(1))


class _Block(nn.Module):
    """A transformer block on four tokens of width 3: attention with a residual connection, then
    a ReLU MLP with one (the structure of vit_2023's blocks, normalisation left out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, 12)
        self.q, self.k, self.v = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.up, self.down = nn.Linear(3, 6), nn.Linear(6, 3)
        self.out = nn.Linear(12, n_out)

    def forward(self, x):
        t = self.inp(x).view(-1, 4, 3)
        t = t + torch.matmul(torch.softmax(torch.matmul(self.q(t), self.k(t).transpose(1, 2)), dim=-1), self.v(t))
        t = t + self.down(torch.relu(self.up(t)))
        return self.out(t.flatten(1))


class _Normalized(nn.Module):
    """Weighted averages: squares of ReLUs normalised by their own sum in two groups of four
    (``x / x.sum()``, bounded as a ratio by relax.ir.ops.Normalize), then a linear layer."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(n_in, 8), nn.Linear(8, n_out)

    def forward(self, x):
        p = (torch.relu(self.inp(x)) ** 2 + 1e-3).view(-1, 2, 4)
        return self.out((p / p.sum(2, keepdim=True)).flatten(1))


@functools.lru_cache(maxsize=1)
def load_onnx_nets() -> types.ModuleType:
    """``benchmarks/fuzz_onnx_nets.py`` (the ``onnx`` family's graphs) as a module, also when this
    file was loaded by path (tests/conftest.py) rather than run from its folder; loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_onnx_nets", Path(__file__).with_name("fuzz_onnx_nets.py"))
    assert spec is not None and spec.loader is not None
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    return nets


def make_net(family: str, scale: float, seed: int) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """A random float32 network of ``family`` with every weight and bias multiplied by
    ``scale`` (outputs then scale like ``scale ** depth``): ``(traced module, input shape)``.
    Redrawn (next seeds) until it predicts at least two classes on the domain [0, 1]."""
    for k in range(50):
        gm, shape = _draw_net(family, scale, seed + 100_003 * k)
        with torch.no_grad():
            pred = gm(torch.rand(512, *shape, generator=torch.Generator().manual_seed(seed))).argmax(1)
        if len(pred.unique()) >= 2:
            break
    return gm, shape


def _draw_net(family: str, scale: float, seed: int) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    if family == "onnx":  # built as an ONNX graph from the 2022-2024 sets' operators, through the importer
        from verify.model import load_model
        from verify.onnx_import import import_onnx

        gm = load_model(import_onnx(load_onnx_nets().make_onnx_net(scale, seed)))
        return gm, tuple(gm.input_shape)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if family == "cnn":
        shape: tuple[int, ...] = (1, 6, 6)
        pool = nn.MaxPool2d(2) if seed % 2 == 0 else nn.AvgPool2d(2)
        net: nn.Module = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    elif family == "residual":
        shape = (3,)
        net = _Residual(3, 6, 3)
    elif family == "convnet":
        shape = (2, 8, 8)
        net = _ConvNet(3)
        with torch.no_grad():
            net.bn.running_mean.copy_(torch.randn(4, generator=g) * scale)
            net.bn.running_var.copy_((torch.rand(4, generator=g) + 0.5) * scale**2)
    elif family == "channels":
        shape = (3, 6, 6)
        net = _Channels(3)
    elif family == "cell":
        shape = (2, 8, 8)
        net = _Cell(3, (nn.ReLU, nn.Sigmoid, nn.LeakyReLU)[seed % 3])
    elif family == "unet":
        shape = (2, 16, 16)
        net = _UNet(3, seed % 3)
    elif family == "shallow":  # one ReLU layer on 20 inputs: bab splits ReLUs and hands over to the exact MILP
        shape = (20,)
        net = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))
    elif family == "bottleneck":  # 20 inputs, ReLU layers of 12, a 4-neuron layer before a sigmoid: bab tightens narrow boxes
        shape = (20,)
        net = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4), nn.Sigmoid(), nn.Linear(4, 3))
    elif family == "lookup":  # ReLU lookup tables (ml4acopf's sigmoids): fused into one piecewise-linear node
        shape = (3,)
        net = nn.Sequential(nn.Linear(3, 8), _Table(g, scale), nn.Linear(8, 8), _Table(g, scale), nn.Linear(8, 3))
    elif family in ("smooth", "attention", "transformer", "normalize", "binarised"):
        shape = (3,)
        net = {"smooth": _Smooth, "attention": _Attention, "transformer": _Block, "normalize": _Normalized,
               "binarised": _Binarised}[family](3, 3)
    else:
        shape = (3,)
        act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}.get(family, nn.ReLU)
        layers: list[nn.Module] = []
        widths = [3, 8, 8]
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(nn.Linear(a, b))
            if family == "bn":
                bn = nn.BatchNorm1d(b)
                with torch.no_grad():
                    bn.running_mean.copy_(torch.randn(b, generator=g) * scale)
                    bn.running_var.copy_((torch.rand(b, generator=g) + 0.5) * scale**2)
                    bn.weight.copy_(torch.randn(b, generator=g))
                    bn.bias.copy_(torch.randn(b, generator=g) * 0.1)
                layers.append(bn)
            layers.append(act())
        layers.append(nn.Linear(widths[-1], 3))
        net = nn.Sequential(*layers)
    with torch.no_grad():
        first = True
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                W = torch.randn(m.weight.shape, generator=g) * scale / math.sqrt(m.weight[0].numel())
                b = torch.randn(m.bias.shape, generator=g) * scale * 0.3
                if first:  # centre the domain [0, 1] at the origin of the first layer: 4 (x - 0.5)
                    W = 4 * W
                    b = b - W.flatten(1).sum(1) * 0.5
                    first = False
                m.weight.copy_(W)
                m.bias.copy_(b)
    gm = torch.fx.symbolic_trace(net.eval())
    gm.input_shape = shape
    return gm, shape


def _predict64(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    with torch.no_grad():
        return copy.deepcopy(gm).double()(x.double())


def make_centre(kind: str, gm: nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 centre ``[1, *shape]`` in [0, 1]: random, a corner, a point on a face, or a
    point within float32 resolution of a decision boundary (bisection between two points the
    float64 network labels differently)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *shape, generator=g)
    if kind == "corner":
        return (x > 0.5).float()
    if kind == "face":
        m = torch.rand(1, *shape, generator=g) < 0.5
        return torch.where(m, (x > 0.5).float(), x)
    if kind == "tie":
        pts = torch.rand(64, *shape, generator=g)
        lab = _predict64(gm, pts).argmax(1)
        other = (lab != lab[0]).nonzero()
        if len(other) == 0:
            return x
        a, b = pts[0:1].double(), pts[int(other[0]) : int(other[0]) + 1].double()
        la = int(lab[0])
        for _ in range(60):
            mid = (a + b) / 2
            if int(_predict64(gm, mid).argmax(1)) == la:
                a = mid
            else:
                b = mid
        return a.float().clamp(0, 1)
    return x


# ------------------------------------------------------------------------------- ground truth


@dataclass
class Witness:
    """A violating point ``x [1, *shape]`` (float64) at distance ``dist`` from the centre, and
    the exact minimum distortion's lower bound when a MILP computed it (else 0)."""

    x: torch.Tensor | None
    dist: float
    exact_lower: float = 0.0
    source: str = ""


def _violates(gm: nn.Module, prop: Robust, x: torch.Tensor) -> bool:
    """float64 and own-dtype single-input forward passes both violate the property."""
    spec = prop.linear(1, 3, dtype=torch.float64)
    with torch.no_grad():
        y64 = _predict64(gm, x)
        y32 = gm(x.float()).double()
    return bool(spec.violation_margin(y64)[0] <= 0) and bool(spec.violation_margin(y32)[0] <= 0)


def _norm(d: torch.Tensor, p: float) -> float:
    d = d.double().flatten()
    return float(d.abs().max()) if math.isinf(p) else float(d.norm(p=p))


def find_witness(gm: nn.Module, family: str, x0: torch.Tensor, prop: Robust, p: float, milp_timeout: float = 20.0) -> Witness:
    """The closest violating point we can find (see the module docstring)."""
    if _violates(gm, prop, x0):
        return Witness(x0.double(), 0.0, 0.0, "clean")
    if family in ("mlp", "bn", "shallow", "residual", "cnn") and not p == 2.0:  # a max-pooling cnn falls back
        try:
            from relax.exact.milp import minimum_distortion

            vals, res = minimum_distortion(gm, x0, prop, p, (0.0, 1.0), timeout=milp_timeout, return_details=True)
            r = res[0]
            if r.counterexample is not None and _violates(gm, prop, r.counterexample.unsqueeze(0)):
                xw = r.counterexample.unsqueeze(0).double()
                lower = r.lower if r.status == "optimal" and math.isfinite(r.lower) else 0.0
                return Witness(xw, _norm(xw - x0, p), lower, "milp")
        except Exception:  # noqa: BLE001 - fall back to the attack search
            pass
    return _attack_witness(gm, x0, prop, p)


def _attack_witness(gm: nn.Module, x0: torch.Tensor, prop: Robust, p: float) -> Witness:
    from verify.attack import pgd_attack

    spec = prop.linear(1, 3)
    best: Witness = Witness(None, math.inf, 0.0, "none")
    hi = {math.inf: 1.0, 2.0: math.sqrt(x0.numel()), 1.0: float(x0.numel())}[p]
    radii = [hi * 2.0**-k for k in range(16, -1, -1)]
    R = len(radii)
    ball = LpBall(x0.expand(R, *x0.shape[1:]).clone(), torch.tensor(radii), p, 0.0, 1.0)
    res = pgd_attack(gm, ball, LinearSpec(spec.C.expand(R, -1, -1), spec.d.expand(R, -1), spec.groups), steps=60, restarts=3, seed=0)
    for i in range(R):
        if bool(res.found[i]):
            xw = res.x_adv[i : i + 1].double()
            if _violates(gm, prop, xw):
                d = _norm(xw - x0, p)
                if d < best.dist:
                    best = Witness(xw, d, 0.0, "pgd")
    return best


from verify.spec import LinearSpec  # noqa: E402  (used above; imported late for the docstring order)


# ------------------------------------------------------------------------------------ cases


def radii_for(w: Witness) -> list[float]:
    rs = [0.0, 1e-9]
    if w.x is not None and w.dist > 0:
        r = w.dist
        rs += [r / 2, r * (1 + 1e-3), r * (1 + 1e-2), r * 1.5]
    return rs


def judge(status: str, cex, ball: LpBall, gm: nn.Module, prop: Robust, w: Witness, eps: float) -> str:
    """``"ok"``, ``"false_certified"`` or ``"false_falsified"`` for one answer."""
    if status == "certified" and w.x is not None and w.dist <= eps:
        return "false_certified"
    if status == "falsified":
        if cex is None:
            return "false_falsified"
        x = torch.as_tensor(cex, dtype=torch.float64).reshape(1, *ball.shape)
        b64 = ball.to(dtype=torch.float64)
        if not bool(b64.contains(x, tol=1e-14)[0]) or not _violates(gm, prop, x):
            return "false_falsified"
    return "ok"


def cases(n_nets: int, seed: int, scales: tuple[float, ...] = SCALES,
          families: tuple[str, ...] = FAMILIES) -> Iterator[tuple[str, float, int, str, float]]:
    """``(family, scale, net seed, centre kind, norm)`` tuples, cycling through every family,
    scale, centre kind and norm."""
    k = 0
    for i in range(n_nets):
        fam = families[i % len(families)]
        scale = scales[(i // len(families) + i % len(families)) % len(scales)]  # every family meets every scale
        for c in CENTRES:
            p = NORMS[k % len(NORMS)]
            k += 1
            yield fam, scale, seed * 1000 + i, c, p


def run(n_nets: int, seed: int = 0, methods: list[str] | None = None, out=None, log=None, slow_every: int = 3,
        scales: tuple[float, ...] = SCALES, families: tuple[str, ...] = FAMILIES, timeout: float = 30.0) -> dict:
    """Run the fuzz (``timeout`` seconds per method call); return ``{method: Counter}`` of
    outcomes (``cases``, ``certified``, ``falsified``, ``false_certified``, ``false_falsified``,
    ``refused``) plus ``"_details"``: the list of false answers."""
    all_det = [n for n, c in list_methods().items() if c.guarantee == "deterministic"]
    methods = methods or all_det
    table: dict = defaultdict(Counter)
    false: list[dict] = []
    for idx, (fam, scale, nseed, ckind, p) in enumerate(cases(n_nets, seed, scales, families)):
        gm, shape = make_net(fam, scale, nseed)
        x0 = make_centre(ckind, gm, shape, nseed + 7)
        with torch.no_grad():
            label = gm(x0).argmax(1)
        prop = Robust(label)
        w = find_witness(gm, fam, x0, prop, p)
        for eps in radii_for(w):
            ball = LpBall(x0, eps, p, 0.0, 1.0)
            for name in methods:
                cls = list_methods()[name]
                norm = "linf" if math.isinf(p) else f"l{int(p)}"
                if norm not in cls.norms or (name in SLOW and idx % slow_every != 0):
                    continue
                opts = {k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in cls.option_names()}
                try:
                    cert = get_method(name, **opts).certify(gm, ball, prop, timeout=timeout)[0]
                except Exception as e:  # noqa: BLE001 - a refusal (unsupported net) is not an answer
                    table[name]["refused"] += 1
                    if log:
                        import traceback

                        where = traceback.extract_tb(e.__traceback__)[-1]  # a crash, not a refusal, names its line
                        print(f"{name} refused {fam} (net seed {nseed}, scale {scale}, {ckind} centre, l{p}, radius {eps:.3g}): "
                              f"{type(e).__name__}: {str(e)[:100]} [{Path(where.filename).name}:{where.lineno}]", file=log)
                    continue
                verdict = judge(cert.status, cert.counterexample, ball, gm, prop, w, eps)
                table[name]["cases"] += 1
                if w.x is not None and 0 < w.dist <= eps:
                    table[name]["witness_inside"] += 1
                table[name][cert.status] += 1
                row = dict(method=name, family=fam, scale=scale, seed=nseed, centre=ckind, norm=norm, eps=eps,
                           witness_dist=w.dist, witness=w.source, exact_lower=w.exact_lower, status=cert.status, stage=cert.details.get("stage"), verdict=verdict)
                if verdict != "ok":
                    table[name][verdict] += 1
                    false.append(row)
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    res = dict(table)
    res["_details"] = false
    return res


def markdown(res: dict) -> str:
    lines = ["| method | cases | certified | falsified | unknown | false certified | false falsified | refused |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    tot = Counter()
    for name in sorted(k for k in res if not k.startswith("_")):
        c = res[name]
        tot.update(c)
        lines.append(f"| {name} | {c['cases']} | {c['certified']} | {c['falsified']} | {c['unknown']} | {c['false_certified']} | {c['false_falsified']} | {c['refused']} |")
    lines.append(f"| **all** | {tot['cases']} | {tot['certified']} | {tot['falsified']} | {tot['unknown']} | {tot['false_certified']} | {tot['false_falsified']} | {tot['refused']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", type=int, default=48, help="networks (each with 4 centres)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="", help="comma-separated (default: every deterministic method)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated network families")
    ap.add_argument("--slow-every", type=int, default=3, help="run the slow methods on every k-th ball")
    ap.add_argument("--out", default="benchmarks/out/fuzz_soundness.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(a.out, "w") as f:
        res = run(a.nets, a.seed, [m for m in a.methods.split(",") if m] or None, out=f, log=sys.stderr, slow_every=a.slow_every,
                  families=tuple(x for x in a.families.split(",") if x))
    print(markdown(res))
    print(f"\n{a.nets} networks x {len(CENTRES)} centres, seed {a.seed}, {time.time() - t0:.0f} s")
    for row in res["_details"][:50]:
        print("FALSE:", json.dumps(row))


if __name__ == "__main__":
    main()
