"""Throughput of ReLU-split branch-and-bound: domains bounded per CPU second.

    OMP_NUM_THREADS=1 python benchmarks/bab_rate.py mnistfc mnist-net_256x4.onnx prop_9_0.03.vnnlib --timeout 60

Runs one VNN-COMP instance through the `bab` pipeline (as `certify vnncomp` does) and reports,
for the ReLU-split BaB stage alone, the domains it bounded, its CPU time
(`time.process_time`, so the number means something on a shared machine) and their ratio. Run
it in two checkouts, alternated, to compare versions. Needs ../shared (or CERTIFY_SHARED).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import relax.bab_relu as bab_relu  # noqa: E402
from verify.vnncomp import run_instance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark", help="folder under benchmarks/vnncomp/<year>/, e.g. mnistfc")
    ap.add_argument("onnx")
    ap.add_argument("vnnlib")
    ap.add_argument("--year", default="2021")
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    shared = Path(os.environ.get("CERTIFY_SHARED", REPO.parent / "shared"))
    folder = shared / "benchmarks" / "vnncomp" / a.year / a.benchmark
    if not folder.is_dir():
        sys.exit(f"no VNN-COMP data under {folder}; set CERTIFY_SHARED")
    torch.set_num_threads(1)
    stats: dict = {}
    original = bab_relu.relu_bab

    def timed(*args, **kwargs):
        c = time.process_time()
        res = original(*args, **kwargs)
        stats.update(cpu=time.process_time() - c, domains=res.domains, status=res.status)
        return res

    bab_relu.relu_bab = timed
    r = run_instance(str(folder / a.onnx), str(folder / a.vnnlib), a.timeout)
    if not stats:
        print(f"{r.result}: decided before the ReLU-split BaB stage")
        return 0
    print(f"{r.result}: BaB {stats['domains']} domains in {stats['cpu']:.1f} s CPU = "
          f"{stats['domains'] / max(stats['cpu'], 1e-9):.0f} domains per CPU second (load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
