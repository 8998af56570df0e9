"""VNN-COMP runner: one instance (the competition's ``run_instance.sh`` interface) or a whole
benchmark folder (``certify vnncomp``).

One instance = an ONNX network and a VNN-LIB file with a timeout. The file may hold several
input boxes (disjuncts): the answer is ``sat`` as soon as one box has a counterexample that
onnxruntime confirms, ``unsat`` only when every box is proved, otherwise ``timeout`` (the time
ran out) or ``unknown``. The result file holds that word on its first line and, after
``sat``, the counterexample ``((X_0 v) ... (Y_0 v) ...)`` with X flattened row-major and Y
the onnxruntime output on that X.

A benchmark run appends one CSV row per instance as soon as it is decided (a killed run loses
nothing done; ``--resume`` skips the instances already in the CSV) and prints a summary:
counts of verified / falsified / unknown / errors, total and median time. With a claims CSV
(``--claims``, the format of ``vnncomp2021_instance_claims.csv``) every answer is compared
with the published majority; an ``unsat`` where the majority says ``sat`` (or the reverse) is
flagged as a possible wrong answer.

Usage::

    python -m verify.vnncomp instance NET.onnx PROP.vnnlib RESULT_FILE TIMEOUT
    certify vnncomp BENCHMARK_DIR_OR_INSTANCES_CSV [--timeout-scale S] [--limit N] [--out CSV] [--resume]
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
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
CSV_COLUMNS = ["benchmark", "onnx", "vnnlib", "result", "time_s", "timeout_s", "stage", "claim", "flag", "detail"]


@dataclass
class InstanceResult:
    """``result`` is ``sat`` / ``unsat`` / ``timeout`` / ``unknown`` / ``error``; ``x``, ``y``
    (lists of floats) hold the confirmed counterexample with ``sat``."""

    result: str
    time_s: float
    x: list[float] | None = None
    y: list[float] | None = None
    stage: str = ""
    detail: str = ""
    per_box: list[dict] = field(default_factory=list)


def _ort_session(onnx_path: str):
    import onnxruntime as ort

    from .vnnlib import open_maybe_gz

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(open_maybe_gz(onnx_path, text=False), opts, providers=["CPUExecutionProvider"])


def _ort_output(sess, x) -> "list[float] | None":
    """onnxruntime output (flattened float64 list) on the single input ``x``, cast to the
    graph's input dtype; None if the model takes another number of inputs."""
    import numpy as np

    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    np_dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(inp.type, np.float32)
    xa = np.asarray(x, dtype=np.float64).reshape(-1)
    if xa.size != math.prod(shape):
        return None
    y = sess.run(None, {inp.name: xa.astype(np_dtype).reshape(shape)})[0]
    return [float(v) for v in np.asarray(y, dtype=np.float64).reshape(-1)]


def _onnx_confirms(sess, x: list[float], lo, hi, spec_linear) -> tuple[bool, list[float] | None]:
    """Is ``x`` inside the box (1e-4 absolute, the competition tolerance is looser) and does
    onnxruntime's output violate the property (margin <= 0)? Returns (ok, y)."""
    import torch

    xt = torch.tensor(x, dtype=torch.float64)
    if bool(((xt < lo.double() - 1e-6) | (xt > hi.double() + 1e-6)).any()):
        return False, None
    y = _ort_output(sess, x)
    if y is None:
        return False, None
    ls = spec_linear.linear(1, len(y), dtype=torch.float64)
    margin = float(ls.violation_margin(torch.tensor([y], dtype=torch.float64))[0])
    return margin <= 0, y


def run_instance(onnx_path: str, vnnlib_path: str, timeout: float, *, options: dict | None = None, threads: int | None = 1) -> InstanceResult:
    """Decide one VNN-COMP instance within ``timeout`` seconds (loading included).

    Args:
        options: keyword options of the ``bab`` method (see ``certify methods``).
        threads: torch intra-op threads (None: leave as is). One is best here: the bounded
            tensors are small, and on a busy machine two threads were measured 15x slower.
    """
    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from .api import certify
    from .model import load_model
    from .vnnlib import parse_vnnlib

    t0 = time.perf_counter()
    deadline = t0 + timeout
    try:
        net = load_model(onnx_path)
        props = parse_vnnlib(vnnlib_path)
        sess = _ort_session(onnx_path)
    except Exception as e:  # a file we cannot read is an error, never a guess
        return InstanceResult("error", time.perf_counter() - t0, detail=f"{type(e).__name__}: {e}"[:300])
    shape = tuple(net.input_shape) if getattr(net, "input_shape", None) else (props[0].num_inputs,)
    answers, stages, per_box = [], [], []
    for i, p in enumerate(props):
        left = deadline - time.perf_counter()
        if left <= 0:
            answers.append("timeout")
            continue
        # later boxes get an even share of what is left (a box that finishes early donates)
        share = left / (len(props) - i)
        c = certify(net, p.box(shape), p.spec, "bab", timeout=share, method_options=options)[0]
        per_box.append({"status": c.status, "reason": c.details.get("reason"), "time_s": round(c.time_s, 3)})
        stages.append(str(c.details.get("stage", "")))
        if c.status == "falsified":
            x = np.asarray(c.counterexample, dtype=np.float64).reshape(-1)
            x32 = x.astype(np.float32).astype(np.float64)  # what the float32 checker will see
            for cand in (x32, x):
                ok, y = _onnx_confirms(sess, cand.tolist(), p.input_lo, p.input_hi, p.spec)
                if ok:
                    return InstanceResult("sat", time.perf_counter() - t0, cand.tolist(), y, stage=stages[-1], per_box=per_box)
            answers.append("unknown")  # our forward pass and onnxruntime disagree: no claim
            per_box[-1]["note"] = "counterexample not confirmed by onnxruntime"
        elif c.status == "certified":
            answers.append("unsat")
        else:
            answers.append("timeout" if c.details.get("reason") == "timeout" else "unknown")
    elapsed = time.perf_counter() - t0
    if answers and all(a == "unsat" for a in answers):
        return InstanceResult("unsat", elapsed, stage=",".join(sorted(set(stages))), per_box=per_box)
    res = "timeout" if "timeout" in answers else "unknown"
    return InstanceResult(res, elapsed, stage=",".join(sorted(set(stages))), per_box=per_box)


def write_result_file(path: str | os.PathLike, res: InstanceResult) -> None:
    """The competition result file: the answer word, then the counterexample after ``sat``."""
    from .vnnlib import format_counterexample

    text = res.result + "\n"
    if res.result == "sat":
        text += format_counterexample(res.x, res.y)
    Path(path).write_text(text)


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

    Returns:
        The rows written in this run (dicts keyed by :data:`CSV_COLUMNS`).
    """
    from tqdm import tqdm

    from .resume import drop_partial_last_row
    from .vnnlib import read_instances

    csv_path = find_instances_csv(path)
    bench = csv_path.parent.name
    rows = read_instances(csv_path)
    if select:
        rows = [r for r in rows if select in f"{Path(r[0]).name},{Path(r[1]).name}"]
    out = Path(out)
    if resume:
        drop_partial_last_row(out)  # a kill during a write: never append to half a row
    done = _done_keys(out) if resume else set()
    rows = [r for r in rows if _key(r[0], r[1]) not in done]
    if limit is not None:
        rows = rows[:limit]
    claim_of = load_claims(claims)
    new_file = not out.is_file() or out.stat().st_size == 0
    if not resume and not new_file:
        raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            w.writeheader()
            f.flush()
        bar = tqdm(rows, desc=bench, unit="inst", file=sys.stderr, disable=not progress)
        for onnx, vnnlib, to in bar:
            try:
                res = run_instance(onnx, vnnlib, to * timeout_scale, options=options)
            except Exception as e:  # never let one instance end the run
                res = InstanceResult("error", 0.0, detail=f"{type(e).__name__}: {e} | {traceback.format_exc(limit=2)[-200:]}")
            claim = claim_of.get(_key(onnx, vnnlib), "")
            row = {
                "benchmark": bench,
                "onnx": Path(onnx).name,
                "vnnlib": Path(vnnlib).name,
                "result": res.result,
                "time_s": f"{res.time_s:.3f}",
                "timeout_s": f"{to * timeout_scale:g}",
                "stage": res.stage,
                "claim": claim,
                "flag": _flag(res.result, claim),
                "detail": res.detail,
            }
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            written.append(row)
            bar.set_postfix_str(f"{row['vnnlib']}: {res.result} {res.time_s:.1f}s")
        bar.close()
    return written


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


def add_vnncomp_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``vnncomp`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("vnncomp", help="run a VNN-COMP benchmark folder (instances.csv + onnx + vnnlib)",
                              description="Run every instance of a VNN-COMP benchmark with method 'bab', appending to a CSV.")
    p.add_argument("path", help="benchmark folder or its instances.csv")
    p.add_argument("--out", default="vnncomp_results.csv", help="results CSV (appended row by row)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every instance timeout by this")
    p.add_argument("--limit", type=int, default=None, help="run at most N instances")
    p.add_argument("--resume", action="store_true", help="skip instances already in --out")
    p.add_argument("--select", default=None, help="only instances whose 'onnx,vnnlib' names contain this text")
    p.add_argument("--claims", default=None, help="published per-instance claims CSV to compare with")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_vnncomp_command(args: argparse.Namespace) -> int:
    """Run the ``vnncomp`` sub-command; prints the summary; returns the exit code (1 when an
    answer disagrees with the published majority)."""
    if args.timeout_scale <= 0:
        print(f"error: --timeout-scale must be > 0, got {args.timeout_scale:g}", file=sys.stderr)
        return 2
    try:
        rows = run_benchmark(args.path, out=args.out, timeout_scale=args.timeout_scale, limit=args.limit, resume=args.resume,
                             claims=args.claims, select=args.select, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summarize_rows(rows)
    print(format_summary(s))
    print(f"results: {args.out}")
    return 1 if s["flagged"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m verify.vnncomp instance ONNX VNNLIB RESULT_FILE TIMEOUT`` or
    ``python -m verify.vnncomp run PATH [options]`` (same as ``certify vnncomp``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "instance":
        if len(argv) != 5:
            print("usage: python -m verify.vnncomp instance ONNX VNNLIB RESULT_FILE TIMEOUT", file=sys.stderr)
            return 2
        onnx, vnnlib, result_file, timeout = argv[1:]
        try:
            res = run_instance(onnx, vnnlib, float(timeout))
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
