"""How much of each VNN-COMP network the spec rows' cone of influence keeps (relax/bounds/cone.py).

For every distinct network of the given sets, with the first property that names it: the
outputs its property reads, and the pre-activation neurons in the cone of those outputs against
all of them (the neurons CROWN bounds by linear rows at most; the rest keep their interval
boxes), with the seconds the cone took. Networks with integer inputs (one graph per value) are
listed as not surveyed.

Usage (from the repository root)::

    python benchmarks/spec_cone.py 2024/yolo_2023 2024/ml4acopf_2024 ...
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data import shared_dir  # noqa: E402
from relax.bounds import prepare  # noqa: E402
from relax.bounds.cone import spec_cone  # noqa: E402
from verify.errors import IntegerInputsNeeded  # noqa: E402
from verify.model import load_model  # noqa: E402
from verify.spec import Box  # noqa: E402
from verify.vnnlib import open_maybe_gz, read_instances  # noqa: E402


def survey(folder: Path) -> list[str]:
    """One line per distinct network of the set in ``folder`` (its ``instances.csv``)."""
    lines, seen = [], set()
    for onnx, vnnlib, _ in read_instances(folder / "instances.csv"):
        if onnx in seen:
            continue
        seen.add(onnx)
        name = Path(onnx).name
        try:
            model = load_model(os.path.join(folder, onnx))
        except IntegerInputsNeeded:
            lines.append(f"| {folder.name} | {name} | integer inputs: not surveyed | | |")
            continue
        text = open_maybe_gz(os.path.join(folder, vnnlib))
        body = text.split("(assert", 1)[1] if "(assert" in text else text
        read = sorted({int(k) for k in re.findall(r"\bY_(\d+)\b", body)})
        x0 = torch.zeros(1, *model.input_shape, dtype=torch.float64)
        graph, _ = prepare(model, Box(x0 - 0.01, x0 + 0.01), torch.float64)
        K = graph.by_name[graph.output].numel
        C = torch.zeros(1, 1, K, dtype=torch.float64)
        C[0, 0, read] = 1.0
        t0 = time.perf_counter()
        cone = spec_cone(graph, C)
        took = time.perf_counter() - t0
        pre = [p for p in graph.preactivations() if p != graph.input_name]
        total = sum(graph.by_name[p].numel for p in pre)
        inside = sum(int(cone[p].sum()) if p in cone else graph.by_name[p].numel for p in pre)
        lines.append(f"| {folder.name} | {name} | {len(read)} of {K} | {inside:,} of {total:,} | {took:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", help="set folders under <shared>/benchmarks/vnncomp, e.g. 2024/yolo_2023")
    args = ap.parse_args()
    root = shared_dir() / "benchmarks" / "vnncomp"
    print("| set | network | outputs read | pre-activation neurons in the cone | cone s |")
    print("|---|---|---|---:|---:|")
    for s in args.sets:
        for line in survey(root / s):
            print(line, flush=True)


if __name__ == "__main__":
    main()
