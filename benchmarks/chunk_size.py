"""How the chunk size of a backward pass changes its time on the CPU (``relax.bounds.crown``'s
``CACHE_ELEMENTS`` / ``CACHE_ELEMENTS_GRAD``).

For the first instance of each VNN-COMP 2021 set in ``<shared>/benchmarks/vnncomp/2021`` (float64
bound graph, the instance's first box) three passes, each timed with every chunk limit of
``--sizes`` (the limits interleaved within each repeat, so that all meet the same load; median of
``--repeats``):

* ``root``: one CROWN pass of the property rows (intermediate bounds included), no gradients;
* ``boxes`` (inputs of at most 16 numbers): CROWN over ``--boxes`` sub-boxes of the input box
  (each coordinate's interval halved at random, 3 times), no gradients: input splitting's pass;
* ``recompute``: the intermediate boxes of ``--domains`` domains from the root's boxes, each
  domain its own batch element (ReLU splitting's recomputation below a split, and filtered smart
  branching's trial passes: a virtual batch of (neuron, domain) rows), no gradients;
* ``domains``: the spec rows of ``--domains`` copies of the root's boxes with per-row slopes
  that record gradients, forward and backward: a beta-CROWN step on a batch of domains. The
  engine cuts such passes by ``max_elements`` alone; here ``max_elements`` is set to each size,
  to show what cache-sized chunks would cost them.

``2**25`` is the memory cap alone (no cache chunking). Prints a markdown table (seconds).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chunk_size.py [--shared ../shared] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parent.parent.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="65536,262144,1048576,33554432")
    ap.add_argument("--boxes", type=int, default=512)
    ap.add_argument("--domains", type=int, default=256)
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import relax.bounds.crown as crown_mod
    from relax.bab import RowSpec
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from verify.model import load_model
    from verify.spec import Box
    from verify.vnnlib import parse_vnnlib

    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.shared) / "benchmarks" / "vnncomp" / "2021"
    print("| set | pass | " + " | ".join(f"2**{s.bit_length() - 1}" for s in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for name in args.sets.split(","):
        if not (root / name).is_dir():
            continue
        onnx, spec = first_instance(root, name)
        model = load_model(onnx)
        prop = parse_vnnlib(spec)[0]
        graph, x_set = prepare(model, prop.box(model.input_shape), torch.float64)
        lin = prop.spec.linear(1, prop.num_outputs, dtype=torch.float64)
        rs = RowSpec(lin.C[0], lin.d[0], lin.groups)
        with torch.no_grad():
            boxes = crown(graph, x_set, None).intermediate
        gen = torch.Generator().manual_seed(0)
        lo, hi = x_set.bounds()
        sub = Box(*_sub_boxes(lo, hi, args.boxes, gen))
        D = args.domains
        dom_boxes = {p: (l.expand(D, *l.shape[1:]), h.expand(D, *h.shape[1:])) for p, (l, h) in boxes.items()}
        acts = [n.name for n in graph.activations()]
        N = rs.C.shape[0]
        slopes0 = {a: torch.rand(N, D, *graph.shape(a), generator=gen, dtype=torch.float64) for a in acts}

        size = [2**25]  # the domains pass's max_elements

        def root_pass() -> None:
            with torch.no_grad():
                crown(graph, x_set, rs.batch(1)[0])

        def box_pass() -> None:
            with torch.no_grad():
                crown(graph, sub, rs.batch(args.boxes)[0])

        x_all = x_set.select(torch.zeros(D, dtype=torch.long))

        def recompute_pass() -> None:
            with torch.no_grad():
                crown(graph, x_all, None, bound_overrides=dom_boxes)

        def domain_pass() -> None:
            slopes = {a: v.clone().requires_grad_() for a, v in slopes0.items()}
            fn = lambda start, act, sl: None if start != "__out__" else slopes[act][sl]  # noqa: E731
            crown(graph, x_set, rs.batch(D)[0], intermediate=dom_boxes, alpha_fn=fn, max_elements=size[0]).spec_lower().sum().backward()

        passes = [("root", root_pass), ("recompute", recompute_pass), ("domains", domain_pass)]
        if lo.numel() <= 16:  # input splitting's inputs (``input_split_max_dim``)
            passes.insert(1, ("boxes", box_pass))
        for label, fn in passes:
            times: dict[int, list[float]] = {s: [] for s in sizes}
            for _ in range(args.repeats):
                for s in sizes:
                    crown_mod.CACHE_ELEMENTS = size[0] = s
                    t = time.perf_counter()
                    fn()
                    times[s].append(time.perf_counter() - t)
            print(f"| {name} | {label} | " + " | ".join(f"{statistics.median(times[s]):.3f}" for s in sizes) + " |", flush=True)


if __name__ == "__main__":
    main()
