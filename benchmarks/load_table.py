"""Every ONNX network of the VNN-COMP sets under ``../shared``: does it load, match onnxruntime
inside its specification's box, and become a bound graph? One markdown row per network.

For each distinct network of each set's ``instances.csv``, the first instance's VNN-LIB file
gives the input box; ``n`` points drawn uniformly in it (plus its two corners) go through the
converted graph (float64) and through onnxruntime, and the largest absolute difference is
reported (a network that uses the integer part of inputs as indices is converted for the integer
case of the box's lower corner, and the points take that case's values there). Then the bound graph is built (:func:`relax.ir.graph.build_graph`) and one CROWN pass
run on the box with a deadline (``--crown-seconds``). Times are wall-clock seconds of each step.

Examples::

    python benchmarks/load_table.py                    # the 2022 and 2024 sets
    python benchmarks/load_table.py --sets 2024/vit_2023 2024/traffic_signs_recognition_2023
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relax.ir.graph import build_graph  # noqa: E402
from relax.bounds.crown import crown  # noqa: E402
from verify.deadline import Deadline  # noqa: E402
from verify.model import UnsupportedOperatorError, load_model  # noqa: E402
from verify.errors import IntegerInputsNeeded  # noqa: E402
from verify.integer_inputs import integer_inputs_of  # noqa: E402
from verify.onnx_import import import_onnx, read_onnx, run_onnxruntime  # noqa: E402
from verify.vnnlib import parse_vnnlib, read_instances, resolve_maybe_gz  # noqa: E402

SETS_NEW = ["2022/carvana_unet_2022", "2022/collins_rul_cnn", "2022/rl_benchmarks", "2024/cctsdb_yolo_2023", "2024/cgan_2023",
            "2024/ml4acopf_2024", "2024/nn4sys_2023", "2024/safenlp", "2024/traffic_signs_recognition_2023", "2024/vit_2023",
            "2024/yolo_2023"]


def shared_dir() -> Path:
    env = os.environ.get("CERTIFY_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _first_op(msg: str) -> str:
    m = re.search(r"operator '([\w.]+)'", msg) or re.search(r"unsupported operator: (\w+ [\w.]+)", msg)
    return m.group(1) if m else msg[:60]


def one_net(folder: Path, onnx_rel: str, vnnlib_rel: str, n: int, crown_seconds: float) -> dict:
    row = {"net": Path(onnx_rel).name.replace(".onnx.gz", "").replace(".onnx", "")}
    props = parse_vnnlib(folder / vnnlib_rel)
    lo, hi = props[0].input_lo.double().numpy(), props[0].input_hi.double().numpy()
    t = time.perf_counter()
    fixed: dict[int, int] = {}
    try:
        gm = load_model(folder / onnx_rel)
    except IntegerInputsNeeded:  # one graph per integer case: the case of the box's lower corner
        proto = read_onnx(resolve_maybe_gz(folder / onnx_rel))
        fixed = {c: int(np.trunc(np.float32(lo[c]))) for c in integer_inputs_of(proto, lo)}
        gm = load_model(import_onnx(proto, integer_inputs=fixed))
        row["case"] = f"inputs {sorted(fixed)} fixed at {sorted(set(fixed.values()))}"
    except UnsupportedOperatorError as e:
        row.update(load=f"no: {_first_op(str(e))}", load_s=time.perf_counter() - t)
        return row
    row["load_s"] = time.perf_counter() - t
    shape = tuple(gm.input_shape)
    rng = np.random.default_rng(0)
    x = lo + (hi - lo) * rng.random((n, lo.size))
    x = np.concatenate([x, lo[None], hi[None]])
    for c, k in fixed.items():  # the case's part of the box
        x[:, c] = min(max(float(k), lo[c]), hi[c])
    x = x.reshape(-1, *shape)
    ref = run_onnxruntime(folder / onnx_rel, x.astype(np.float32).astype(np.float64))
    with torch.no_grad():
        y = gm.double()(torch.from_numpy(x.astype(np.float32).astype(np.float64))).reshape(len(x), -1).numpy()
    row["load"] = "yes"
    row["max_diff"] = float(np.abs(y - ref).max()) if y.shape == ref.shape else float("inf")
    row["scale"] = float(np.abs(ref).max())
    t = time.perf_counter()
    try:
        g = build_graph(gm, shape, torch.float32)
    except UnsupportedOperatorError as e:
        row.update(graph=f"no: {_first_op(str(e))}", graph_s=time.perf_counter() - t)
        return row
    row.update(graph="yes", graph_s=time.perf_counter() - t)
    gm.float()
    box = props[0].box(shape)
    from verify.spec import Box

    box = Box(box.lo.float(), box.hi.float())
    C = torch.eye(min(g.by_name[g.output].numel, 4), g.by_name[g.output].numel).unsqueeze(0)
    t = time.perf_counter()
    res = crown(g, box, C, deadline=Deadline(crown_seconds))
    row["crown_s"] = time.perf_counter() - t
    row["crown_finite"] = bool(torch.isfinite(res.lower).all())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="*", default=SETS_NEW, help="folders under vnncomp/")
    ap.add_argument("--n", type=int, default=16, help="random points per box")
    ap.add_argument("--crown-seconds", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = shared_dir() / "benchmarks" / "vnncomp"
    print("| set | net | loads | max abs diff vs onnxruntime (max abs output) | load s | bound graph | graph s | one CROWN pass s (finite) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in args.sets:
        folder = base / s
        seen: dict[str, str] = {}
        for onnx_rel, vnnlib_rel, _ in read_instances(folder / "instances.csv"):
            seen.setdefault(onnx_rel, vnnlib_rel)
        for onnx_rel, vnnlib_rel in seen.items():
            try:
                r = one_net(folder, onnx_rel, vnnlib_rel, args.n, args.crown_seconds)
            except Exception as e:  # a table row, not a crash: report and go on
                r = {"net": Path(onnx_rel).name, "load": f"error: {type(e).__name__}: {str(e)[:80]}"}
            diff = r.get("max_diff")
            diff_cell = "" if diff is None else f"{diff:.1e} ({r['scale']:.2g})"
            crown_cell = f"{r['crown_s']:.2f} ({'yes' if r['crown_finite'] else 'no'})" if "crown_s" in r else ""
            load = r.get("load", "") + (f" ({r['case']})" if "case" in r else "")
            print(f"| {s.split('/')[-1]} | {r['net']} | {load} | {diff_cell} "
                  f"| {r.get('load_s', 0):.2f} | {r.get('graph', '')} | {r.get('graph_s', 0):.2f} | {crown_cell} |", flush=True)


if __name__ == "__main__":
    main()
