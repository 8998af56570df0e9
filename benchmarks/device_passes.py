"""Backward-pass times of the bound engine on the CPU and on a GPU, side by side.

For the first instance of each VNN-COMP 2021 set in ``<shared>/benchmarks/vnncomp/2021`` (float64
bound graph, the instance's first box) the passes that branch-and-bound repeats, each timed on
every device of ``--devices`` (devices alternated within each repeat; median of ``--repeats``,
after one untimed warm-up per device; CUDA timings synchronise before reading the clock):

* ``root``: one CROWN pass of the property rows (intermediate bounds included), no gradients;
* ``boxes`` (inputs of at most 16 numbers): CROWN over ``--boxes`` sub-boxes of the input box,
  no gradients: input splitting's pass;
* ``recompute``: the intermediate boxes of ``--domains`` domains from the root's boxes (ReLU
  splitting's recomputation below a split), no gradients;
* ``domains``: the spec rows of ``--domains`` domains with per-row slopes that record gradients,
  forward and backward: one alpha / beta step on a batch of domains.

The CPU runs ``--threads`` torch threads. Prints a markdown table (seconds; ``ratio`` = first
device / last device).

Usage::

    python benchmarks/device_passes.py --shared ../shared --devices cpu,cuda [--domains 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bab_prepare import SETS, first_instance  # noqa: E402


def _sub_boxes(lo: torch.Tensor, hi: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` boxes inside ``[lo, hi]`` (``[1, *shape]``): every coordinate halved 3 times, a random half each time."""
    lo, hi = lo.expand(n, *lo.shape[1:]).clone(), hi.expand(n, *hi.shape[1:]).clone()
    for _ in range(3):
        mid = (lo + hi) / 2
        upper = torch.rand(lo.shape, generator=gen, dtype=lo.dtype) < 0.5
        lo, hi = torch.where(upper, mid, lo), torch.where(upper, hi, mid)
    return lo, hi


def _passes(onnx: Path, spec: Path, device: str, n_boxes: int, D: int, max_elements: list[int] | None = None
            ) -> list[tuple[str, Callable[[], None]]]:
    """The timed passes of one instance on ``device`` (closures; the set-up is not timed).
    ``max_elements``: a one-element list read by the ``domains`` pass at each call (its chunk
    limit; default the engine's)."""
    from relax.bab import RowSpec
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from verify.model import load_model
    from verify.spec import Box
    from verify.vnnlib import parse_vnnlib

    model = load_model(onnx, device=device)
    prop = parse_vnnlib(spec)[0]
    graph, x_set = prepare(model, prop.box(model.input_shape).to(device=device), torch.float64)
    lin = prop.spec.linear(1, prop.num_outputs, dtype=torch.float64)
    rs = RowSpec(lin.C[0].to(device), lin.d[0].to(device), lin.groups.to(device))
    with torch.no_grad():
        boxes = crown(graph, x_set, None).intermediate
    gen = torch.Generator().manual_seed(0)
    lo, hi = x_set.bounds()
    sub = Box(*(t.to(device) for t in _sub_boxes(lo.cpu(), hi.cpu(), n_boxes, gen)))
    dom_boxes = {p: (l.expand(D, *l.shape[1:]), h.expand(D, *h.shape[1:])) for p, (l, h) in boxes.items()}
    acts = [n.name for n in graph.activations()]
    N = rs.C.shape[0]
    slopes0 = {a: torch.rand(N, D, *graph.shape(a), generator=gen, dtype=torch.float64).to(device) for a in acts}
    x_all = x_set.select(torch.zeros(D, dtype=torch.long, device=lo.device))

    def root_pass() -> None:
        with torch.no_grad():
            crown(graph, x_set, rs.batch(1)[0])

    def box_pass() -> None:
        with torch.no_grad():
            crown(graph, sub, rs.batch(n_boxes)[0])

    def recompute_pass() -> None:
        with torch.no_grad():
            crown(graph, x_all, None, bound_overrides=dom_boxes)

    def domain_pass() -> None:
        slopes = {a: v.clone().requires_grad_() for a, v in slopes0.items()}
        fn = lambda start, act, sl: None if start != "__out__" else slopes[act][sl]  # noqa: E731
        kw = {} if max_elements is None else {"max_elements": max_elements[0]}
        crown(graph, x_set, rs.batch(D)[0], intermediate=dom_boxes, alpha_fn=fn, **kw).spec_lower().sum().backward()

    out: list[tuple[str, Callable[[], None]]] = [("root", root_pass), ("recompute", recompute_pass), ("domains", domain_pass)]
    if lo.numel() <= 16:  # input splitting's inputs (``input_split_max_dim``)
        out.insert(1, ("boxes", box_pass))
    return out


def _timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parent.parent.parent / "shared"))
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=512)
    ap.add_argument("--domains", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the CPU passes")
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",")
    root = Path(args.shared) / "benchmarks" / "vnncomp" / "2021"
    print("| set | pass | " + " | ".join(devices) + " | ratio |")
    print("|---|---|" + "---:|" * (len(devices) + 1))
    for name in args.sets.split(","):
        if not (root / name).is_dir():
            continue
        onnx, spec = first_instance(root, name)
        per_dev = {d: _passes(onnx, spec, d, args.boxes, args.domains) for d in devices}
        for k, (label, _) in enumerate(per_dev[devices[0]]):
            times: dict[str, list[float]] = {d: [] for d in devices}
            for d in devices:  # warm-up (CUDA kernels, allocator)
                _timed(per_dev[d][k][1], d)
            for _ in range(args.repeats):
                for d in devices:
                    times[d].append(_timed(per_dev[d][k][1], d))
            med = [statistics.median(times[d]) for d in devices]
            print(f"| {name} | {label} | " + " | ".join(f"{m:.4f}" for m in med) + f" | {med[0] / med[-1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
