"""Run VNN-COMP benchmarks from ``../shared`` with method ``bab`` and record the results.

Every instance is appended to ``benchmarks/results/vnncomp_<benchmark>.csv`` as soon as it
is decided (``--resume`` continues a killed run); the summary (verified / falsified / unknown
/ errors, total and median time) and any disagreement with the published 2021 majority are
printed at the end. Same engine as ``certify vnncomp``; this script only finds the data.

Examples::

    python benchmarks/vnncomp.py acasxu                              # all 186, 116 s each
    python benchmarks/vnncomp.py acasxu --select prop_1. --timeout-scale 0.25
    python benchmarks/vnncomp.py mnistfc --select 256x2 --timeout-scale 0.5
    python benchmarks/vnncomp.py mnistfc --select 256x6 --option refine_layers=0   # no MILP refinement
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verify.vnncomp import format_summary, run_benchmark, summarize_rows  # noqa: E402


def shared_dir() -> Path:
    env = os.environ.get("CERTIFY_SHARED")
    d = Path(env) if env else REPO.parent / "shared"
    if not (d / "benchmarks" / "vnncomp").is_dir():
        sys.exit(f"no VNN-COMP data under {d}; set CERTIFY_SHARED")
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark", help="folder under benchmarks/vnncomp/<year>/ (e.g. acasxu, mnistfc, test)")
    ap.add_argument("--year", default="2021")
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--select", default=None, help="only instances whose 'onnx,vnnlib' contain this text")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/vnncomp_<benchmark>.csv")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--option", action="append", default=[], metavar="K=V", help="an option of method bab (repeatable), e.g. refine_layers=0")
    ap.add_argument("--device", default="cpu", help="where the bounds are computed: cpu (default), cuda, ...")
    args = ap.parse_args()
    from verify.cli import parse_options
    from verify.heap import start_heap_trimmer

    start_heap_trimmer()

    options = parse_options(args.option, ["bab"])["bab"]
    sh = shared_dir()
    folder = sh / "benchmarks" / "vnncomp" / args.year / args.benchmark
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"vnncomp_{args.benchmark}.csv"
    claims = sh / "benchmarks" / "vnncomp2021_instance_claims.csv"
    rows = run_benchmark(folder, out=out, timeout_scale=args.timeout_scale, limit=args.limit, resume=args.resume,
                         claims=claims if args.year == "2021" and claims.is_file() else None, select=args.select,
                         options=options, device=args.device)
    s = summarize_rows(rows)
    print(format_summary(s))
    print(f"results: {out}")
    return 1 if s["flagged"] or s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
