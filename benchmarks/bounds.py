"""Benchmark of the bound methods (interval / crown / alpha-crown) on VNN-COMP 2021 MNIST nets.

mnistfc (mnist-net_256x2/4/6, 15 images x eps 0.03 / 0.05) and eran (mnist_relu_9_200 eps
0.015, ffnnSIGMOID__Point_6x200 eps 0.012; the first 15 instances of each). Per method:

* ``B=1 ms``: wall time of one input alone (median of ``--runs`` runs per instance, then the
  median over the instances); ``cpu ms`` the same in process CPU time (robust to other jobs
  on a shared machine; with ``--threads 1`` it is the uncontended single-thread time);
* ``B=15 ms/input``: one call on all instances of the row as one batch (median of runs) / 15;
* ``verified``: instances proved alone (after the float-safety margin);
* ``mean lb``: mean over instances of the worst property row's lower bound (tightness).

Input box and property come from each instance's VNN-LIB file (``verify.vnnlib``); the network
from ``verify.model.load_model``. Writes a markdown table to stdout and ``benchmarks/out/bounds.md``.

Usage: ``python benchmarks/bounds.py [--runs 5] [--quick] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relax.methods.bounds import AlphaCrownMethod, CrownMethod, IntervalMethod  # noqa: E402
from verify.model import load_model  # noqa: E402
from verify.spec import Box, LinearSpec  # noqa: E402
from verify.vnnlib import parse_vnnlib, read_instances  # noqa: E402

# auto_LiRPA 0.7.1, one input, float32, median of 5, this 2-core CPU (from the issue)
TARGETS = {
    ("mnist-net_256x2", "crown"): 8.7, ("mnist-net_256x4", "crown"): 16.4, ("mnist-net_256x6", "crown"): 43.0,
    ("mnist-net_256x2", "alpha-crown"): 300.0, ("mnist-net_256x4", "alpha-crown"): 430.0, ("mnist-net_256x6", "alpha-crown"): 1060.0,
}


def find_shared() -> Path:
    for cand in (REPO.parent / "shared", Path.cwd().parent / "shared"):
        if (cand / "benchmarks").is_dir():
            return cand
    raise SystemExit("../shared not found beside the repository")


def load_rows(shared: Path, quick: bool):
    """[(row label, net path, [(box lo, box hi, C, d, groups)])]."""
    root = shared / "benchmarks" / "vnncomp" / "2021"
    rows = []
    mnist = read_instances(root / "mnistfc" / "mnistfc_instances.csv")
    eran = read_instances(root / "eran" / "eran_instances.csv")
    groups = {}
    for onnx, vnn, _ in mnist:
        eps = vnn.rsplit("_", 1)[1].removesuffix(".vnnlib")
        groups.setdefault((root / "mnistfc" / onnx, f"eps {eps}"), []).append(root / "mnistfc" / vnn)
    for onnx, vnn, _ in eran:
        eps = vnn.rsplit("_", 1)[1].removesuffix(".vnnlib")
        key = (root / "eran" / onnx, f"eps {float(eps):g}")
        if len(groups.setdefault(key, [])) < 15:
            groups[key].append(root / "eran" / vnn)
    for (net, label), files in groups.items():
        if quick and ("256x6" in net.name or "eps 0.05" in label):
            continue
        props = []
        for f in files:
            p = parse_vnnlib(f, dtype=torch.float32)[0]
            props.append(p)
        rows.append((net.stem, label, net, props))
    return rows


def make_inputs(props, shape):
    lo = torch.stack([p.input_lo for p in props]).reshape(len(props), *shape)
    hi = torch.stack([p.input_hi for p in props]).reshape(len(props), *shape)
    C = torch.stack([p.spec.C if p.spec.C.dim() == 2 else p.spec.C[0] for p in props])
    d = torch.stack([p.spec.d if p.spec.d.dim() == 1 else p.spec.d[0] for p in props])
    return Box(lo, hi), LinearSpec(C.float(), d.float(), props[0].spec.groups)


def timed(fn, runs):
    """(median wall s, median process-CPU s, last result)."""
    ts, cs, out = [], [], None
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ts), statistics.median(cs), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="skip 256x6 and eps 0.05")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = find_shared()
    methods = {
        "interval": IntervalMethod(),
        "crown": CrownMethod(),
        # auto_LiRPA 0.7's default CROWN-Optimized: output-layer alphas only, intermediate
        # bounds from CROWN (its bound_opts default enable_opt_interm_bounds=False)
        "alpha-crown": AlphaCrownMethod(early_stop=False, optimize_intermediate=False),
        # our method's default: intermediate bounds re-optimised with their own alphas too
        "alpha-crown+interm": AlphaCrownMethod(early_stop=False),
        "alpha-crown+interm (early stop)": AlphaCrownMethod(early_stop=True),
    }
    lines = [
        "| net | eps | method | B=1 ms | B=1 cpu ms | B=15 ms/input | B=15 cpu ms/input | verified | mean lb | auto_LiRPA B=1 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    per_net: dict[tuple[str, str], list] = {}
    for net_name, label, path, props in load_rows(shared, args.quick):
        model = load_model(path)
        shape = tuple(model.input_shape) if getattr(model, "input_shape", None) else (props[0].num_inputs,)
        box, spec = make_inputs(props, shape)
        n = len(props)
        for mname, m in methods.items():
            m.lower_bounds(model, box.select([0]), spec.select([0]))  # warm-up (graph build)
            singles, cpus, lbs, verified = [], [], [], 0
            for i in range(n):
                t, c, low = timed(lambda: m.lower_bounds(model, box.select([i]), spec.select([i])), args.runs)
                singles.append(t)
                cpus.append(c)
                verified += int(m.proves(low, spec.select([i]))[0])
                lbs.append(float(spec.select([i]).group_max(low).min()))
            tb, cb, _ = timed(lambda: m.lower_bounds(model, box, spec), args.runs)
            agg = per_net.setdefault((net_name, mname), [0.0, 0.0, 0, 0])
            agg[0] += tb
            agg[1] += cb
            agg[2] += n
            agg[3] += verified
            target = TARGETS.get((net_name, mname))
            line = (f"| {net_name} | {label.removeprefix('eps ')} | {mname} | {1000 * statistics.median(singles):.1f} | "
                    f"{1000 * statistics.median(cpus):.1f} | {1000 * tb / n:.1f} | {1000 * cb / n:.1f} | {verified}/{n} | "
                    f"{statistics.mean(lbs):.3f} | "
                    f"{'' if target is None else f'{target:g}'} |")
            lines.append(line)
            print(line, flush=True)
    summary = [
        "",
        "Per network (all its instances, each eps batch of 15 in one call): wall and CPU ms per input, "
        "instances verified, and the target (half of auto_LiRPA's B=1 time):",
        "",
        "| net | method | B=15 ms/input | B=15 cpu ms/input | verified | target ms | met? |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for (net_name, mname), (tb, cb, n, v) in per_net.items():
        target = TARGETS.get((net_name, mname))
        half = "" if target is None else f"{target / 2:g}"
        met = "" if not half else ("yes" if 1000 * tb / n <= target / 2 else "no")
        summary.append(f"| {net_name} | {mname} | {1000 * tb / n:.1f} | {1000 * cb / n:.1f} | {v}/{n} | {half} | {met} |")
    print("\n".join(summary), flush=True)
    lines += summary
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Bound methods on VNN-COMP 2021 MNIST nets\n\n{torch.get_num_threads()} threads, float32, "
              f"median of {args.runs} runs; alpha-CROWN: 20 iterations, lr 0.1; 'alpha-crown' optimises the output "
              f"layer's alphas (auto_LiRPA's default), '+interm' also the intermediate layers' (our default).\n\n")
    (out / "bounds.md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
