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
from benchmarks.device_passes import _passes  # noqa: E402


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

    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.shared) / "benchmarks" / "vnncomp" / "2021"
    print("| set | pass | " + " | ".join(f"2**{s.bit_length() - 1}" for s in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for name in args.sets.split(","):
        if not (root / name).is_dir():
            continue
        onnx, spec = first_instance(root, name)
        size = [2**25]  # the domains pass's max_elements
        passes = _passes(onnx, spec, "cpu", args.boxes, args.domains, size)
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
