"""How far per-pixel bounds are from proving a carvana_unet_2022 property (issue 19).

carvana's property: the number of pixels whose predicted class (argmax of the UNet's two logits)
equals the fixed mask (the fourth input channel) stays above a threshold for every image in an
l_inf box. A pixel is certified when a lower bound of its logit margin (mask class minus the other)
is positive; the property is proved when the certified pixels alone reach the threshold. This
script bounds the margins of ``unet_simp_small`` (a chain of 3x3 convolutions with ReLUs, then a
1x1 convolution) directly, without the softmax / argmax / one-hot tail, and reports:

* how many pixels CROWN certifies (float64, :func:`relax.bounds.bounds`) against the threshold;
* how many of the others a PGD attack on each pixel alone flips (an upper bound on what any
  per-pixel method can certify: those pixels are not robust);
* with ``--crop-method``: the same margins on each uncertified interior pixel's receptive field
  (the input window the pixel depends on, convolutions without padding: the same function there),
  bounded by that method (e.g. ``alpha-crown``: slopes of every layer optimised for that pixel).

The chain is checked against the full ONNX model: the count computed from the chain's logits and
the mask equals the model's output at random points of the box.

Usage::

    .venv/bin/python benchmarks/carvana_pixels.py --vnnlib <shared>/benchmarks/vnncomp/2022/carvana_unet_2022/vnnlib/X.vnnlib \\
        [--crop-method alpha-crown]
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def conv_chain(onnx_path: Path, dtype: torch.dtype, pad: bool = True) -> nn.Sequential:
    """The Conv / ReLU nodes from the first Conv to the last, as a module ``[B, 3, H, W] -> [B, 2, H, W]``
    (``pad=False``: the convolutions without padding, for receptive-field crops)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(gzip.decompress(onnx_path.read_bytes()) if onnx_path.suffix == ".gz" else onnx_path.read_bytes())
    weights = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in model.graph.initializer}
    layers: list[nn.Module] = []
    last = None
    for node in model.graph.node:
        if node.op_type == "Conv":
            if last is not None and node.input[0] != last:
                raise ValueError(f"{node.name}: not a chain of convolutions and ReLUs")
            w, b = weights[node.input[1]], weights[node.input[2]]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2 if pad else 0)
            conv.weight.data, conv.bias.data = w, b
            layers.append(conv)
            last = node.output[0]
        elif node.op_type == "Relu" and last is not None and node.input[0] == last:
            layers.append(nn.ReLU())
            last = node.output[0]
        elif last is not None and node.op_type in ("Conv", "Relu"):
            raise ValueError(f"{node.name}: not a chain of convolutions and ReLUs")
    return nn.Sequential(*layers).to(dtype).eval()


def pixel_margins_rows(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``C [P, 2 P]`` on the flattened logits ``[2, H, W]``: mask class minus the other, per pixel."""
    P = mask.numel()
    sign = torch.where(mask.flatten() == 0, 1.0, -1.0).to(dtype)
    C = torch.zeros(P, 2 * P, dtype=dtype)
    idx = torch.arange(P)
    C[idx, idx], C[idx, idx + P] = sign, -sign
    return C


def pgd_flips(chain: nn.Module, lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor, pixels: list[int], steps: int) -> int:
    """How many of ``pixels`` a PGD attack on that pixel's margin alone drives below 0."""
    flipped = 0
    for s in range(0, len(pixels), 64):
        ps = torch.tensor(pixels[s:s + 64])
        n = len(ps)
        x = (lo + (hi - lo) * torch.rand(n, *lo.shape, dtype=lo.dtype)).requires_grad_(True)
        best = torch.full((n,), float("inf"), dtype=lo.dtype)
        for _ in range(steps):
            m = (chain(x).reshape(n, -1) * rows[ps]).sum(1)
            best = torch.minimum(best, m.detach())
            (g,) = torch.autograd.grad(m.sum(), x)
            with torch.no_grad():
                x = torch.maximum(torch.minimum(x - (hi - lo).max() / 4 * g.sign(), hi), lo).requires_grad_(True)
        flipped += int((best < 0).sum())
    return flipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vnnlib", required=True)
    ap.add_argument("--onnx", default=None, help="default: onnx/unet_simp_small.onnx(.gz) beside the vnnlib folder")
    ap.add_argument("--crop-method", default=None, help="bound the uncertified interior pixels on their receptive fields")
    ap.add_argument("--pgd-steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from relax.bounds import bounds
    from verify.model import load_model
    from verify.spec import Box
    from verify.vnnlib import parse_vnnlib

    spec_path = Path(args.vnnlib)
    onnx_path = Path(args.onnx) if args.onnx else next((spec_path.parent.parent / "onnx").glob("unet_simp_small.onnx*"))
    dt = torch.float64
    full = load_model(onnx_path)
    prop = parse_vnnlib(spec_path)[0]
    box = prop.box(tuple(full.input_shape))
    lo_all, hi_all = (b[0].to(dt) for b in box.bounds())
    mask = lo_all[3]
    if not torch.equal(mask, hi_all[3]) or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("the fourth input channel is not a fixed 0/1 mask")
    lo, hi = lo_all[:3], hi_all[:3]
    threshold = float(-prop.spec.d.flatten()[0]) if float(prop.spec.C.flatten()[0]) > 0 else None
    chain = conv_chain(onnx_path, dt)
    rows = pixel_margins_rows(mask, dt)
    for _ in range(3):  # the chain's count is the model's
        x = lo_all + (hi_all - lo_all) * torch.rand_like(lo_all)
        m = rows @ chain(x[None, :3]).reshape(-1)  # a tie goes to class 0 (ArgMax takes the first maximum)
        count = int((m > 0).sum() + (m == 0)[mask.flatten() == 0].sum())
        assert count == int(full(x[None].float()).flatten()[0]), "the conv chain does not reproduce the model's count"
    t = time.perf_counter()
    low = bounds(chain, Box(lo[None], hi[None]), rows[None], method="crown")[0][0]
    crown_s = time.perf_counter() - t
    open_ = (low <= 0).nonzero().flatten().tolist()
    print(f"{spec_path.name}: {rows.shape[0]} pixels, count must exceed {threshold}; CROWN certifies {rows.shape[0] - len(open_)} "
          f"in {crown_s:.1f} s; margins of the others: min {float(low.min()):.3f}, median {float(low[open_].median()):.3f}")
    print(f"  PGD flips {pgd_flips(chain, lo, hi, rows, open_, args.pgd_steps)} of those {len(open_)} pixels one at a time")
    if args.crop_method:
        crop_bounds(onnx_path, lo, hi, rows, mask, open_, args.crop_method)


def crop_bounds(onnx_path: Path, lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, pixels: list[int],
                method: str) -> None:
    """Bound the margins of the interior ``pixels`` on their receptive fields with ``method``."""
    from relax.bounds import bounds
    from verify.spec import Box

    dt = lo.dtype
    crop = conv_chain(onnx_path, dt, pad=False)
    r = sum(m.kernel_size[0] // 2 for m in crop if isinstance(m, nn.Conv2d))
    H, W = mask.shape
    inner = [p for p in pixels if r <= p // W < H - r and r <= p % W < W - r]
    window = lambda t, p: t[:, p // W - r:p // W + r + 1, p % W - r:p % W + r + 1]  # noqa: E731
    L, U = torch.stack([window(lo, p) for p in inner]), torch.stack([window(hi, p) for p in inner])
    sign = torch.where(mask.flatten()[inner] == 0, 1.0, -1.0).to(dt)
    C = torch.stack([sign, -sign], 1).unsqueeze(1)  # [P, 1, 2]
    t = time.perf_counter()
    low = bounds(crop, Box(L, U), C, method=method)[0][:, 0]
    print(f"  {method} on the receptive fields ({2 * r + 1}x{2 * r + 1}) of {len(inner)} interior ones: {int((low > 0).sum())} "
          f"more certified in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
