"""What preparing a network for branch-and-bound costs, beside one CROWN pass (issue 18).

For the first instance of each VNN-COMP 2021 set in ``<shared>/benchmarks/vnncomp/2021``: load
the ONNX model, build its float64 bound graph (:func:`relax.bounds.prepare`, what ``bab`` does
before anything else; the float32 copy for the optimisation steps the same), then one CROWN pass
of the property rows over the instance's first box. Prints a markdown table of the three times
(median of ``--repeats`` runs, each in a fresh graph cache).

Usage::

    .venv/bin/python benchmarks/bab_prepare.py [--shared ../shared] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SETS = ["acasxu", "mnistfc", "eran", "verivital", "cifar10_resnet", "oval21"]


def first_instance(root: Path, name: str) -> tuple[Path, Path]:
    csv = next((root / name).glob("*instances.csv"))
    onnx, spec = csv.read_text().splitlines()[0].split(",")[:2]
    return root / name / onnx.strip(), root / name / spec.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parent.parent.parent / "shared"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from relax.bab import RowSpec
    from relax.bounds import prepare
    from relax.bounds.crown import crown
    from verify.model import load_model
    from verify.vnnlib import parse_vnnlib

    root = Path(args.shared) / "benchmarks" / "vnncomp" / "2021"
    print("| set | network | load (s) | bound graph, float64 (s) | one CROWN pass (s) |\n|---|---|---:|---:|---:|")
    for name in SETS:
        if not (root / name).is_dir():
            continue
        onnx, spec = first_instance(root, name)
        times: dict[str, list[float]] = {"load": [], "graph": [], "crown": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            model = load_model(onnx)
            times["load"].append(time.perf_counter() - t)
            prop = parse_vnnlib(spec)[0]
            box = prop.box(model.input_shape)
            t = time.perf_counter()
            graph, x_set = prepare(model, box, torch.float64)
            times["graph"].append(time.perf_counter() - t)
            lin = prop.spec.linear(1, prop.num_outputs, dtype=torch.float64)
            rs = RowSpec(lin.C[0], lin.d[0], lin.groups)
            C, _ = rs.batch(1)
            t = time.perf_counter()
            with torch.no_grad():
                crown(graph, x_set, C)
            times["crown"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {onnx.name} | {med['load']:.3f} | {med['graph']:.3f} | {med['crown']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
