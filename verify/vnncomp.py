"""VNN-COMP runner: one instance (the competition's ``run_instance.sh`` interface) or a whole
benchmark folder (``certify vnncomp``).

One instance = an ONNX network and a VNN-LIB file with a timeout, decided by
:func:`verify.instance.run_instance` (the driver ``certify run --spec`` uses too: one time
budget per instance, counterexamples projected into the box and confirmed by onnxruntime).
The result file holds the answer on its first line and, after ``sat``, the counterexample
``((X_0 v) ... (Y_0 v) ...)`` with X flattened row-major and Y the onnxruntime output on X.

A benchmark run appends one CSV row per instance as soon as it is decided (a killed run loses
nothing done; ``--resume`` skips the instances already in the CSV) and prints a summary:
counts of verified / falsified / unknown / errors, total and median time. After a ``sat``
the instance's result file (``sat`` + counterexample, VNN-COMP form) is written into the
folder ``<out stem>_counterexamples`` next to the CSV; the row's ``counterexample`` column
names it (relative to the CSV's folder). The command exits 1 when a row errored. With a
claims CSV (``--claims``, the format of ``vnncomp2021_instance_claims.csv``) every answer is compared
with the published majority; an ``unsat`` where the majority says ``sat`` (or the reverse) is
flagged as a possible wrong answer.

Usage::

    python -m verify.vnncomp instance NET.onnx PROP.vnnlib RESULT_FILE TIMEOUT
    certify vnncomp BENCHMARK_DIR_OR_INSTANCES_CSV [--timeout-scale S] [--limit N] [--out CSV] [--resume]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import traceback
from pathlib import Path

from .instance import InstanceResult, run_instance, write_result_file

__all__ = [
    "CSV_COLUMNS",
    "InstanceResult",
    "run_instance",
    "write_result_file",
    "find_instances_csv",
    "run_benchmark",
    "summarize_rows",
    "add_vnncomp_parser",
    "run_vnncomp_command",
    "main",
]

#: columns of the results CSV, in order
CSV_COLUMNS = ["benchmark", "onnx", "vnnlib", "result", "time_s", "timeout_s", "stage", "claim", "flag", "detail", "counterexample"]


# ----------------------------------------------------------------------------------------
# benchmark folders


def find_instances_csv(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else the folder's ``instances.csv`` (or the one
    ``*instances.csv``, as the 2021 folders name it)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder")
    for name in ("instances.csv", "instances.csv.gz"):
        if (p / name).is_file():
            return p / name
    cands = sorted(p.glob("*instances.csv"))
    if len(cands) != 1:
        raise FileNotFoundError(f"{p}: expected one instances.csv, found {[c.name for c in cands]}")
    return cands[0]


def _key(onnx: str, vnnlib: str) -> tuple[str, str]:
    strip = lambda s: Path(s).name.removesuffix(".gz")  # noqa: E731
    return strip(onnx), strip(vnnlib)


def load_claims(path: str | os.PathLike | None) -> dict[tuple[str, str], str]:
    """``{(onnx name, vnnlib name): majority}`` from a claims CSV (columns ``onnx``,
    ``vnnlib``, ``majority``); empty without a path."""
    if not path:
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[_key(row["onnx"], row["vnnlib"])] = row.get("majority", "")
    return out


def _done_keys(out_csv: Path) -> set[tuple[str, str]]:
    if not out_csv.is_file():
        return set()
    with open(out_csv, newline="") as f:
        return {_key(r["onnx"], r["vnnlib"]) for r in csv.DictReader(f) if r.get("result")}


def _header(out_csv: Path) -> list[str]:
    """The column names of an existing results CSV (an older file may lack some)."""
    with open(out_csv, newline="") as f:
        return next(csv.reader(f), None) or CSV_COLUMNS


def counterexample_dir(out_csv: str | os.PathLike) -> Path:
    """Where :func:`run_benchmark` writes the result files of ``sat`` instances."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + "_counterexamples")


def _save_counterexample(out_csv: Path, onnx: str, vnnlib: str, res: InstanceResult) -> str:
    """Write a ``sat`` instance's result file; its path relative to the CSV's folder, or ''."""
    if res.result != "sat":
        return ""
    strip = lambda s: Path(s).name.removesuffix(".gz").rsplit(".", 1)[0]  # noqa: E731
    path = counterexample_dir(out_csv) / f"{strip(onnx)}__{strip(vnnlib)}.counterexample"
    write_result_file(path, res)
    return str(path.relative_to(out_csv.parent))


def _flag(result: str, claim: str) -> str:
    if claim in ("sat", "unsat") and result in ("sat", "unsat") and result != claim:
        return f"DISAGREES with published majority {claim}"
    return ""


def run_benchmark(
    path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    timeout_scale: float = 1.0,
    limit: int | None = None,
    resume: bool = False,
    claims: str | os.PathLike | None = None,
    select: str | None = None,
    options: dict | None = None,
    progress: bool = True,
    threads: int = 1,
    device: str = "cpu",
) -> list[dict]:
    """Run every instance of a benchmark, appending a row to ``out`` after each one.

    Args:
        path: benchmark folder or its instances CSV.
        timeout_scale: multiplies each instance's timeout.
        limit: run at most this many instances (after ``select`` and ``resume``).
        resume: skip instances already in ``out``.
        claims: published per-instance claims CSV to compare with.
        select: keep only instances whose ``onnx,vnnlib`` names contain this substring.
        options: options of the ``bab`` method.
        device: where the bounds are computed (``cpu``, ``cuda``, ``cuda:1``).

    Returns:
        The rows written in this run (dicts keyed by :data:`CSV_COLUMNS`).
    """
    from tqdm import tqdm

    csv_path = find_instances_csv(path)
    bench = csv_path.parent.name
    out = Path(out)
    rows = _instances_to_run(csv_path, out, select=select, resume=resume, limit=limit)
    claim_of = load_claims(claims)
    new_file = not out.is_file() or out.stat().st_size == 0
    if not resume and not new_file:
        raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = CSV_COLUMNS if new_file else _header(out)
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        if new_file:
            w.writeheader()
            f.flush()
        bar = tqdm(rows, desc=bench, unit="inst", file=sys.stderr, disable=not progress)
        for onnx, vnnlib, to in bar:
            row, res = _run_row(bench, out, onnx, vnnlib, to * timeout_scale, claim_of.get(_key(onnx, vnnlib), ""), options, threads,
                               device)
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            written.append(row)
            bar.set_postfix_str(f"{row['vnnlib']}: {res.result} {res.time_s:.1f}s")
        bar.close()
    return written


def _instances_to_run(csv_path: Path, out: Path, *, select: str | None, resume: bool, limit: int | None) -> list:
    """The instances ``(onnx, vnnlib, timeout)`` of the list ``csv_path`` to run: those whose
    names contain ``select``, without those already in ``out`` (``resume``; a half-written last
    row is dropped first), at most ``limit``."""
    from .resume import drop_partial_last_row
    from .vnnlib import read_instances

    rows = read_instances(csv_path)
    if select:
        rows = [r for r in rows if select in f"{Path(r[0]).name},{Path(r[1]).name}"]
    if resume:
        drop_partial_last_row(out)  # a kill during a write: never append to half a row
    done = _done_keys(out) if resume else set()
    rows = [r for r in rows if _key(r[0], r[1]) not in done]
    if limit is not None:
        rows = rows[:limit]
    return rows


def _run_row(bench: str, out: Path, onnx: str, vnnlib: str, timeout: float, claim: str, options: dict | None,
             threads: int, device: str = "cpu") -> tuple[dict, InstanceResult]:
    """Run one instance (an exception becomes an ``error`` result): its CSV row (keyed by
    :data:`CSV_COLUMNS`) and result; a ``sat`` answer's result file is written next to ``out``."""
    try:
        res = run_instance(onnx, vnnlib, timeout, options=options, threads=threads, device=device)
    except Exception as e:  # never let one instance end the run
        res = InstanceResult("error", 0.0, detail=f"{type(e).__name__}: {e} | {traceback.format_exc(limit=2)[-200:]}")
    row = {
        "benchmark": bench,
        "onnx": Path(onnx).name,
        "vnnlib": Path(vnnlib).name,
        "result": res.result,
        "time_s": f"{res.time_s:.3f}",
        "timeout_s": f"{timeout:g}",
        "stage": res.stage,
        "claim": claim,
        "flag": _flag(res.result, claim),
        "detail": res.detail,
        "counterexample": _save_counterexample(out, onnx, vnnlib, res),
    }
    return row, res


def summarize_rows(rows: list[dict]) -> dict:
    """Counts and times of result rows: verified (unsat), falsified (sat), unknown (timeout
    or unknown), errors; total and median time (all rows and solved rows); flagged rows."""
    times = [float(r["time_s"]) for r in rows]
    solved = [float(r["time_s"]) for r in rows if r["result"] in ("sat", "unsat")]
    return {
        "instances": len(rows),
        "verified": sum(r["result"] == "unsat" for r in rows),
        "falsified": sum(r["result"] == "sat" for r in rows),
        "unknown": sum(r["result"] in ("timeout", "unknown") for r in rows),
        "errors": sum(r["result"] == "error" for r in rows),
        "total_time_s": round(sum(times), 1),
        "median_time_s": round(statistics.median(times), 2) if times else 0.0,
        "median_solved_time_s": round(statistics.median(solved), 2) if solved else 0.0,
        "flagged": [f"{r['onnx']},{r['vnnlib']}: {r['result']} {r['flag']}" for r in rows if r.get("flag")],
    }


def format_summary(s: dict) -> str:
    lines = [
        f"instances {s['instances']}: verified {s['verified']}, falsified {s['falsified']}, "
        f"unknown {s['unknown']}, errors {s['errors']}",
        f"time: total {s['total_time_s']} s, median {s['median_time_s']} s, median solved {s['median_solved_time_s']} s",
    ]
    lines += [f"FLAG {x}" for x in s["flagged"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# command line


def add_vnncomp_parser(subparsers, parents: tuple = ()) -> argparse.ArgumentParser:
    """Add the ``vnncomp`` sub-command to an argparse ``subparsers`` object (``parents``: the
    CLI's common options, ``--debug``, ``--quiet``, ``--threads``)."""
    p = subparsers.add_parser("vnncomp", parents=list(parents), help="run a VNN-COMP benchmark folder (instances.csv + onnx + vnnlib)",
                              description="Run every instance of a VNN-COMP benchmark with method 'bab', appending to a CSV.")
    p.add_argument("path", help="benchmark folder or its instances.csv")
    p.add_argument("--out", default="vnncomp_results.csv", help="results CSV (appended row by row)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every instance timeout by this")
    p.add_argument("--limit", type=int, default=None, help="run at most N instances")
    p.add_argument("--resume", action="store_true", help="skip instances already in --out")
    p.add_argument("--select", default=None, help="only instances whose 'onnx,vnnlib' names contain this text")
    p.add_argument("--claims", default=None, help="published per-instance claims CSV to compare with")
    p.add_argument("--device", default="cpu", help="where the bounds are computed: cpu (default), cuda, cuda:1, ...")
    if not parents:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        p.add_argument("--threads", type=int, default=1, help="torch threads per instance (default 1)")
    return p


def run_vnncomp_command(args: argparse.Namespace) -> int:
    """Run the ``vnncomp`` sub-command; prints the summary; returns the exit code: 1 when a
    row errored or an answer disagrees with the published majority, else 0."""
    if args.timeout_scale <= 0:
        print(f"certify: error: --timeout-scale must be > 0, got {args.timeout_scale:g}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"certify: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    from .errors import ModelLoadError
    from .model import check_device

    try:
        check_device(args.device)
    except ModelLoadError as e:
        print(f"certify: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = run_benchmark(args.path, out=args.out, timeout_scale=args.timeout_scale, limit=args.limit, resume=args.resume,
                             claims=args.claims, select=args.select, progress=not args.quiet, threads=args.threads,
                             device=args.device)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"certify: error: {e}", file=sys.stderr)
        return 2
    s = summarize_rows(rows)
    print(format_summary(s))
    print(f"results: {args.out}")
    if any(r.get("counterexample") for r in rows):
        print(f"counterexamples (VNN-COMP result files): {counterexample_dir(args.out)}")
    for r in rows:
        if r["result"] == "error":
            print(f"certify: error in {r['onnx']},{r['vnnlib']}: {r['detail']}", file=sys.stderr)
    return 1 if s["flagged"] or s["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m verify.vnncomp instance ONNX VNNLIB RESULT_FILE TIMEOUT`` (on ``$CERTIFY_DEVICE``,
    default ``cpu``) or
    ``python -m verify.vnncomp run PATH [options]`` (same as ``certify vnncomp``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "instance":
        if len(argv) != 5:
            print("usage: python -m verify.vnncomp instance ONNX VNNLIB RESULT_FILE TIMEOUT", file=sys.stderr)
            return 2
        onnx, vnnlib, result_file, timeout = argv[1:]
        try:  # the competition's scripts take fixed arguments: the device comes from the environment
            res = run_instance(onnx, vnnlib, float(timeout), device=os.environ.get("CERTIFY_DEVICE", "cpu"))
        except Exception as e:
            res = InstanceResult("error", 0.0, detail=f"{type(e).__name__}: {e}")
        write_result_file(result_file, res)
        print(f"{res.result} in {res.time_s:.2f} s {res.detail}".rstrip())
        return 0
    parser = argparse.ArgumentParser(prog="python -m verify.vnncomp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_vnncomp_parser(sub).set_defaults(func=run_vnncomp_command)
    # accept "run PATH" as an alias of "vnncomp PATH"
    if argv and argv[0] == "run":
        argv = ["vnncomp", *argv[1:]]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
