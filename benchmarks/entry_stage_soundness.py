"""Soundness of `bab`'s entry stage on small UNet heads (pooling, a transposed convolution).

Each instance is a two-class segmentation head on a ``2 x 6 x 6`` image: a 3 x 3 convolution, 2 x 2
average pooling, a 3 x 3 convolution, a stride-2 transposed convolution (kernel 2, or kernel 3 with
padding and output padding, by seed) and a 3 x 3 head, whose per-pixel margin is offset so that
about half of the pixels can change class in the box. The property counts the pixels whose class
equals a fixed mask channel (carvana_unet_2022's form; the entry stage restricts each pixel to its
receptive field through the pooling and the transposed convolution). Three settings per seed:
weights as initialised at eps 0.05-0.4, the first layer times 1e3 at eps 5e-5-4e-4, and the same at
eps 2e-7 (near float32 resolution of the scaled layer).

Each pixel's robustness comes from the exact MILP of its margin alone (`milp`, margin 1e-9). Two
thresholds per instance: the count of the robust pixels (true: must not be falsified) where every
pixel's MILP decided, and one more than the least count a sampled point reaches (false: must not be
certified). No skip connection: the MILP's dense view needs a chain.

Usage (from the repository root)::

    python benchmarks/entry_stage_soundness.py --seeds 40 --seed 2
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verify.api import certify  # noqa: E402
from verify.spec import Box, Linear  # noqa: E402

D = torch.float64
H = W = 6
#: (first-layer weight scale, radii; one per seed in turn)
SETTINGS = ((1.0, (0.05, 0.1, 0.2, 0.4)), (1e3, (5e-5, 1e-4, 2e-4, 4e-4)), (1e3, (2e-7,)))
#: (kernel, stride, padding, output padding) of the transposed convolution, by seed parity
UPSAMPLING = ((2, 2, 0, 0), (3, 2, 1, 1))


class Margins(nn.Module):
    """``[B, 2, H, W]`` -> per-pixel margins ``[B, H W]`` (class 1 minus class 0, less ``offset``)."""

    def __init__(self, seed: int, scale: float, up: tuple[int, int, int, int]):
        super().__init__()
        torch.manual_seed(seed)
        k, s, p, op = up
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, k, stride=s, padding=p, output_padding=op)
        self.head = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.c1.weight.mul_(scale)
            self.c1.bias.mul_(scale)
        self.register_buffer("offset", torch.zeros(1, H * W))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        u = self.up(torch.relu(self.c2(nn.functional.avg_pool2d(h, 2))))
        z = self.head(torch.relu(u))
        return (z[:, 1] - z[:, 0]).flatten(1) - self.offset


class Count(nn.Module):
    """``[B, 3, H, W]`` (image and a 0/1 mask channel) -> ``[B, 1]``: pixels whose class (1 where
    the margin is positive) equals the mask; ``margins`` as in :class:`Margins`."""

    def __init__(self, margins: nn.Module):
        super().__init__()
        self.margins = margins
        self.register_buffer("at_zero", torch.tensor(0.0))

    def forward(self, x):
        cls = torch.heaviside(self.margins(x[:, :2]), self.at_zero)
        return (1.0 - torch.abs(cls - x[:, 2].flatten(1))).sum(1, keepdim=True)


class Pixel(nn.Module):
    """Pixel ``j``'s margin ``[B, 1]``."""

    def __init__(self, margins: nn.Module, j: int):
        super().__init__()
        self.margins, self.j = margins, j

    def forward(self, x):
        return self.margins(x)[:, self.j:self.j + 1]


def at_least(count: int) -> Linear:
    return Linear(torch.tensor([[1.0]], dtype=D), torch.tensor([-(count - 0.5)], dtype=D))


def instance(seed: int, scale: float, eps: float) -> tuple[Margins, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head (margins offset: each pixel's centre value a uniform fraction in [-2, 2] of its
    sampled range from 0), its centre margins ``[H W]`` and the box ``[1, 3, H, W]``."""
    margins = Margins(seed, scale, UPSAMPLING[seed % 2]).double()
    torch.manual_seed(seed + 1000)
    img = torch.rand(1, 2, H, W, dtype=D)
    with torch.no_grad():
        m0 = margins(img)[0]
        values = margins(img + eps * (2 * torch.rand(4000, 2, H, W, dtype=D) - 1))
        spread = values.max(0).values - values.min(0).values
        margins.offset.copy_((m0 - torch.empty_like(m0).uniform_(-1, 1) * 2 * spread).reshape(1, -1))
        m0 = margins(img)[0]
    mask = (m0 > 0).to(D).reshape(1, 1, H, W)
    return margins, m0, torch.cat([img - eps, mask], 1), torch.cat([img + eps, mask], 1)


def exact_robust(margins: nn.Module, m0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> int | None:
    """Pixels whose class cannot change in the box (each pixel's exact MILP), None if one stayed open;
    ``margins``: image ``[B, 2, H, W]`` -> per-pixel margins ``[B, H W]``, ``m0 [H W]`` its centre's."""
    robust = 0
    for j in range(m0.numel()):
        side = 1.0 if m0[j] > 0 else -1.0
        c = certify(Pixel(margins, j), Box(lo[:, :2], hi[:, :2]), Linear(torch.tensor([[side]], dtype=D)), "milp",
                    dtype=D, timeout=30, method_options={"margin": 1e-9})[0]
        if c.status not in ("certified", "falsified"):
            return None
        robust += c.status == "certified"
    return robust


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=2, help="first seed")
    ap.add_argument("--timeout", type=float, default=20.0, help="bab's seconds per case")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stats: Counter = Counter()
    t0 = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        for scale, radii in SETTINGS:
            eps = radii[seed % len(radii)]
            margins, m0, lo, hi = instance(seed, scale, eps)
            robust = exact_robust(margins, m0, lo, hi)
            stats["no exact count"] += robust is None
            net = Count(margins).double()
            with torch.no_grad():
                reached = int(net(lo + (hi - lo) * torch.rand(20000, *lo.shape[1:], dtype=D)).min())
            for count, true in ((robust, True), (reached + 1, False)):
                if count is None or not 0 < count <= H * W:
                    continue
                c = certify(net, Box(lo, hi), at_least(count), "bab", timeout=args.timeout)[0]
                stats["cases"] += 1
                wrong = c.status == ("falsified" if true else "certified")
                stats["false"] += wrong
                stats["true certified"] += true and c.status == "certified"
                stats["by the entry stage"] += c.status == "certified" and c.details.get("stage") == "entries"
                if wrong:
                    print(f"FALSE {c.status}: seed {seed}, scale {scale}, eps {eps}, count {count}", c.details, flush=True)
        print(seed, dict(stats), f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if stats["false"] else 0


if __name__ == "__main__":
    sys.exit(main())
