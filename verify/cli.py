"""The ``certify`` command line: ``methods``, ``run``, ``demo``, ``compare``, ``vnncomp``, ``train``.

Every error (bad argument, missing file, unknown method or option, unsupported operator,
malformed spec ...) prints ONE line ``certify: error: <cause>`` on stderr and exits with
code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .options import OptionInfo

__all__ = ["main", "build_parser", "parse_options", "CLIError"]

BUILTIN_MODELS = {"digits-mlp": "plain", "digits-mlp-noise": "noise"}


class CLIError(Exception):
    """A usage error: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(message)


# ----------------------------------------------------------------------------- helpers


def _coerce(method: str, info: OptionInfo, text: str) -> Any:
    """Turn the text of ``--option key=text`` into a value of the option's declared type
    (``none`` / ``null`` where the type admits none); the type and range are checked when the
    method is built."""
    low = text.strip().lower()
    if low in ("none", "null") and info.admits_none:
        return None
    kinds = info.kinds
    for kind in (bool, int, float):
        if kind in kinds:
            try:
                return _parse_scalar(kind, low)
            except ValueError:
                if len(kinds) == 1:
                    raise CLIError(f"option {info.name} of {method}: expected {info.expected_text}, got {text!r}") from None
    return text


def _parse_scalar(kind: type, low: str) -> Any:
    if kind is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(low)
    return kind(low)


def parse_options(pairs: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["k=v", "crown.k2=v2"]`` -> ``{method: {option: value}}``.

    ``method.k=v`` sets an option of one method; ``k=v`` sets it for every listed method that
    has option ``k`` (an error if none has it). Values take the option's declared type.
    """
    from .registry import method_class

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--option expects key=value, got {pair!r}")
        key = key.strip()
        target, dot, name = key.rpartition(".")
        targets = [target] if dot and target in out else list(methods)
        name = name if dot and target in out else key
        hit = False
        for m in targets:
            options = method_class(m).Options
            if name in options.names():
                out[m][name] = _coerce(m, options.info(name), val)
                hit = True
        if not hit:
            opts = sorted({o for m in targets for o in method_class(m).option_names()})
            where = targets[0] if len(targets) == 1 else ", ".join(targets)
            raise CLIError(f"method {where!r} has no option {name!r}; its options are: {', '.join(opts) or '(none)'}")
    return out


def _check_methods(names: Sequence[str]) -> None:
    from .registry import method_class

    for m in names:
        method_class(m)  # UnknownMethodError lists the available ones


def _limits(text: str | None, methods: Sequence[str]) -> dict[str, int]:
    """``"milp=5,sdp=0"`` -> ``{"milp": 5, "sdp": 0}``; a glob (``bab*``) applies to every match.
    A registered method that is not run (e.g. it lacks the norm) is ignored; an unknown name is an
    error."""
    import fnmatch

    from .registry import list_methods

    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, k = item.partition("=")
        try:
            n = int(k)
        except ValueError:
            n = -1
        if not eq or n < 0:
            raise CLIError(f"--limits: expected METHOD=K with K >= 0, got {item.strip()!r}")
        hits = [m for m in methods if fnmatch.fnmatch(m, name.strip())]
        if not hits and not any(fnmatch.fnmatch(m, name.strip()) for m in list_methods()):
            raise CLIError(f"--limits: {name.strip()!r} matches no registered method (see: certify methods)")
        out.update({m: n for m in hits})
    return out


def _resolve_model(spec: str) -> Any:
    """A model path (must exist; ``X`` names ``X.gz`` when only that exists, as VNN-COMP lists
    do) or a built-in name (``digits-mlp``, ``digits-mlp-noise``)."""
    if spec in BUILTIN_MODELS:
        from .digits_model import load_digits_mlp

        return load_digits_mlp(BUILTIN_MODELS[spec])
    from .vnnlib import resolve_maybe_gz

    p = resolve_maybe_gz(spec)
    if p.is_dir():
        raise CLIError(f"the model path is a directory, not a file: {spec} (give a .onnx or .pt file)")
    if not p.is_file():
        raise CLIError(f"model file not found: {spec} (or use a built-in model: {', '.join(BUILTIN_MODELS)})")
    return str(p)


def _check_model_data(model: Any, x: Any, data: str, device: str) -> Any:
    """Load the model and run it on one input of the data set; a clear error if the shapes
    do not fit. Returns the loaded graph module."""
    import torch

    from .model import load_model

    net = load_model(model, device=device)
    try:
        with torch.no_grad():
            y = net(x[:1].to(device))
    except Exception as e:
        raise CLIError(f"the model does not accept inputs of shape {tuple(x.shape[1:])} from {data!r}: {_cause(e)}") from None
    if y.dim() != 2 or y.shape[0] != 1:
        raise CLIError(f"the model maps one input to shape {tuple(y.shape)}; expected [1, classes]")
    return net


def _norm(text: str) -> float:
    from .spec import parse_norm

    return parse_norm(text)


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CLIError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise CLIError(f"{what}: expected non-negative numbers, got {text!r}")
    return vals


def _check_eps(eps: float | None) -> None:
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        raise CLIError(f"--eps must be a finite number >= 0, got {eps:g}")


def _output_property(args: argparse.Namespace) -> Any:
    """``--output-lower`` / ``--output-upper`` as an :class:`~verify.spec.OutputBounds` property
    (one number for every output, or one per output), or ``None`` when neither is given."""
    if args.output_lower is None and args.output_upper is None:
        return None
    import torch

    from .spec import OutputBounds

    def values(text: str | None, flag: str) -> Any:
        if text is None:
            return None
        try:
            vals = [float(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise CLIError(f"{flag}: expected a number or comma-separated numbers, got {text!r}") from None
        if not vals or not all(math.isfinite(v) for v in vals):
            raise CLIError(f"{flag}: expected finite numbers, got {text!r}")
        return vals[0] if len(vals) == 1 else torch.tensor(vals, dtype=torch.float64)

    return OutputBounds(values(args.output_lower, "--output-lower"), values(args.output_upper, "--output-upper"))


def _print_task_rows(table: Any, limit: int = 10) -> None:
    """The output intervals / estimates of the first ``limit`` certificates that have them."""
    from .report import TASK_COLUMNS, format_text, task_rows

    rows = task_rows(table)
    if rows:
        print(f"per input ({min(limit, len(rows))} of {len(rows)}):")
        print(format_text(rows[:limit], TASK_COLUMNS))


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each of the numeric flags ``names`` (attribute names) is > 0 where given."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise CLIError(f"--{name.replace('_', '-')} must be > 0, got {v:g}")


# ----------------------------------------------------------------------------- commands


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods (those named, or all) with every option: its default, type,
    range and what it does."""
    from .registry import list_methods, method_class

    methods = {n: method_class(n) for n in args.names} if args.names else list_methods()
    if not methods:
        print("no methods registered")
        return 0
    w = max(len(n) for n in methods)
    for name, cls in methods.items():
        who = {"base": "f", "smoothed": "g (smoothed)", "fraction": "f (P on set)"}.get(cls.certifies, cls.certifies)
        cost = f"{cls.cost}, complete" if cls.complete else cls.cost
        print(f"{name:<{w}}  {cls.guarantee:<13}  certifies {who:<12}  norms {','.join(cls.norms) or '- (semantic)'}  ({cost})")
        if cls.summary:
            print(f"{'':<{w}}  {cls.summary}")
        infos = cls.Options.infos()
        print(f"{'':<{w}}  options:{'' if infos else ' (none)'}")
        width = max((len(f"{i.name}={i.default!r}") for i in infos), default=0)
        for i in infos:
            kind = ", ".join(t for t in (i.type_text, i.range_text) if t)
            print(f"{'':<{w}}    {f'{i.name}={i.default!r}':<{width}}  ({kind}) {i.help}")
    return 0


def _run_spec(args: argparse.Namespace, model: Any, opts: dict[str, Any]) -> int:
    """``run --spec``: the instance driver shared with ``certify vnncomp`` and run_instance.sh
    (:func:`verify.instance.run_instance`): one time budget for the whole file, counterexamples
    projected into the box and confirmed by onnxruntime (ONNX models) or a single-input forward
    pass. A VNN-LIB file is ONE property, however many input boxes it has: the answer is one line
    (``-q``: nothing else) and ``--out`` gets one record; ``--per-box`` also prints a line per box
    and writes one row per box instead (a CSV as the boxes are decided). ``--result-file`` gets the
    VNN-COMP result file (after ``sat`` the counterexample with X and Y)."""
    import contextlib

    from .instance import run_instance, summary_line, write_result_file

    if not Path(args.spec).is_file() and not Path(args.spec + ".gz").is_file():
        raise CLIError(f"spec file not found: {args.spec}")
    name = Path(args.spec).name
    out = Path(args.out) if args.out else None
    per_box = _PerBox(name, out if out is not None and out.suffix != ".json" else None) if args.per_box else None
    with per_box or contextlib.nullcontext():
        res = run_instance(model, args.spec, args.timeout, method=args.method, options=opts, threads=None,
                           device=args.device, raise_errors=True, on_box=per_box)
    print(summary_line(res, name))
    if res.result == "sat" and not args.quiet:
        print(f"counterexample: x = {_short_list(res.x)}, y = {_short_list(res.y)}")
    written = [args.result_file] if args.result_file else []
    if args.result_file:
        write_result_file(args.result_file, res)
    if out is not None:
        _write_spec_out(out, res, args, model)
        written.append(args.out)
    if written and not args.quiet:
        print("wrote " + ", ".join(written))
    return 0


class _PerBox:
    """``run --spec --per-box``: as each box is decided, print its line and append its
    certificate to the CSV ``out``. An interrupted run keeps the boxes done: the file is flushed
    at most :attr:`FLUSH_S` after a row (a flush per row cost 1 s on 60,000 boxes) and closed,
    so flushed, when the run ends or raises (Ctrl-C)."""

    #: seconds a written row may wait in the buffer
    FLUSH_S = 0.1

    def __init__(self, vnnlib: str, out: Path | None):
        self.vnnlib, self.out = vnnlib, out
        self.file: Any = None
        self.writer: Any = None
        self.flushed = time.perf_counter()

    def __enter__(self) -> "_PerBox":
        import csv

        from .certificate import CSV_COLUMNS

        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS)
            self.writer.writeheader()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()

    def __call__(self, c: Any) -> None:
        from .certificate import CertificateTable

        c.details["vnnlib"] = self.vnnlib
        print(f"property {c.index}: {c.details['vnncomp_result']} ({c.status}) in {c.time_s:.3f} s")
        if self.writer is not None:
            self.writer.writerow(CertificateTable.csv_row(c))
            if time.perf_counter() - self.flushed >= self.FLUSH_S:
                self.file.flush()
                self.flushed = time.perf_counter()


def _short_list(v: Sequence[float] | None, head: int = 8) -> str:
    """``[a, b, ... (n values)]``: the first ``head`` values of a counterexample vector."""
    v = list(v or [])
    text = ", ".join(f"{x:.6g}" for x in v[:head])
    return f"[{text}]" if len(v) <= head else f"[{text}, ... ({len(v)} values)]"


def _write_spec_out(out: Path, res: Any, args: argparse.Namespace, model: Any) -> None:
    """``--out`` of a ``--spec`` run: the instance record (.csv: one row, .json: one object), or
    with ``--per-box`` one object per box in a .json (a .csv of boxes is written by :class:`_PerBox`)."""
    import csv
    import json

    from .certificate import CertificateTable
    from .instance import INSTANCE_COLUMNS, instance_row

    out.parent.mkdir(parents=True, exist_ok=True)
    if args.per_box:
        if out.suffix == ".json":
            CertificateTable(res.certificates).to_json(str(out))
        return
    name = Path(model).name if isinstance(model, str) else args.model
    row = instance_row(res, model=name, vnnlib=Path(args.spec).name, method=args.method, timeout=args.timeout)
    if out.suffix == ".json":
        out.write_text(json.dumps(row, indent=1) + "\n")
        return
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=INSTANCE_COLUMNS)
        w.writeheader()
        w.writerow({k: "" if v is None else (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})


def cmd_run(args: argparse.Namespace) -> int:
    """One method on a data set (l_p balls) or on a VNN-LIB property."""
    import torch

    from .api import certify
    from .certificate import CertificateTable
    from .report import format_text, summarize, summary_columns

    _check_methods([args.method])
    opts = parse_options(args.option or [], [args.method])[args.method]
    if args.spec is None and args.eps is None:
        raise CLIError("give --spec FILE.vnnlib, or --eps E with --data D")
    if args.spec is not None and (args.eps is not None or args.data is not None):
        raise CLIError("--spec cannot be combined with --eps/--data")
    if args.eps is not None and args.data is None:
        raise CLIError("--eps needs --data (e.g. --data digits)")
    if args.result_file and args.spec is None:
        raise CLIError("--result-file is for --spec runs")
    if args.per_box and args.spec is None:
        raise CLIError("--per-box is for --spec runs")
    if args.spec is not None and args.radius:
        raise CLIError("--radius searches l_p radii around data points; it does not apply to --spec")
    if args.spec is not None and (args.output_lower is not None or args.output_upper is not None):
        raise CLIError("--output-lower/--output-upper state the property of --data runs; a VNN-LIB file states its own")
    out_prop = _output_property(args)
    _check_eps(args.eps)
    p = _norm(args.norm)
    _check_positive(args, "timeout", "max_radius", "batch_size")
    model = _resolve_model(args.model)
    if args.spec is not None:
        return _run_spec(args, model, opts)
    t0 = time.perf_counter()
    table = CertificateTable()
    from tqdm import tqdm

    from .data import load_data

    x, y = load_data(args.data, limit=args.limit)
    if len(y) == 0:
        raise CLIError(f"data {args.data!r} holds no inputs")
    model = _check_model_data(model, x, args.data, args.device)
    step = args.batch_size or len(y)
    bar = tqdm(total=len(y), desc=args.method, unit="input", file=sys.stderr, disable=args.quiet or None)
    for s in range(0, len(y), step):
        target = y[s : s + step] if out_prop is None else out_prop
        t = certify(model, x[s : s + step], target, args.method, eps=args.eps, norm=p,
                    find_radius=args.radius, max_radius=args.max_radius, timeout=args.timeout,
                    device=args.device, method_options=opts)
        for c in t:
            c.index += s
        table.extend(t)
        bar.update(len(t))
    bar.close()
    radii = sorted({0.0, float(torch.tensor(args.eps, dtype=torch.float32))})  # the ball's radius as the model sees it
    print(format_text(summarize(table, radii), summary_columns(radii)))
    _print_task_rows(table)
    counts = {s: sum(c.status == s for c in table) for s in ("certified", "falsified", "unknown", "abstain", "error")}
    print(", ".join(f"{k} {v}" for k, v in counts.items() if v) + f"; {len(table)} rows in {time.perf_counter() - t0:.2f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_json(str(out)) if out.suffix == ".json" else table.to_csv(str(out))
        print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The digits MLP, every registered method, certified accuracy vs radius."""
    from .demo import run_demo

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    if methods:
        _check_methods(methods)
    norms = [n for n in args.norms.split(",") if n]
    for n in norms:
        _norm(n)
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    run_demo(out_dir=args.out, limit=args.limit, methods=methods, norms=norms, progress=not args.quiet)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Several methods on the same inputs; CSV/JSON, PNG and Markdown report."""
    from .compare import compare
    from .data import load_data
    from .executor import EXECUTORS
    from .registry import list_methods, method_class
    from .spec import norm_name

    p = _norm(args.norm)
    radii = _floats(args.radii, "--radii")
    if args.methods in (None, "all"):
        methods = [m for m, c in list_methods().items() if norm_name(p) in c.norms]
    else:
        methods = [m for m in args.methods.split(",") if m]
        _check_methods(methods)
    if not methods:
        raise CLIError("no method to run")
    opts = parse_options(args.option or [], methods)
    limits = _limits(args.limits, methods)
    methods = [m for m in methods if limits.get(m) != 0]
    if args.executor not in EXECUTORS:
        raise CLIError(f"unknown executor {args.executor!r}; use {', '.join(EXECUTORS)}")
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise CLIError("executor 'ray' needs the ray package: pip install 'certify[ray]'") from None
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    _check_positive(args, "timeout", "max_radius", "chunk_size")
    _check_method_options(opts)
    model = _resolve_model(args.model)
    x, y = load_data(args.data, limit=args.limit)
    if len(y) == 0:
        raise CLIError(f"data {args.data!r} holds no inputs")
    _check_model_data(model, x, args.data, args.device)
    res = compare(
        model, x, y, methods, radii=radii, norm=p, out_dir=args.out, prefix=args.prefix, options=opts, limits=limits,
        executor=args.executor, workers=args.workers, chunk_size=args.chunk_size, resume=args.resume,
        find_radius=not args.no_radius, max_radius=args.max_radius, timeout=args.timeout, device=args.device,
        attack=not args.no_attack, model_name=Path(args.model).name, progress=not args.quiet,
    )
    kinds = {method_class(m).certifies for m in res.table.methods()}
    print(f"Certified accuracy ({norm_name(p)}, {len(y)} inputs of {args.data}); f = {Path(args.model).name}"
          + ("; smoothing methods certify g = smoothed f" if "smoothed" in kinds else "")
          + ("; P on set: f keeps the label on a fraction of the set" if "fraction" in kinds else ""))
    print(res.summary_text())
    if res.attack:
        print("PGD accuracy of f (upper bound): " + ", ".join(f"{r:g}: {a:.3f}" for r, a in res.attack.items()))
    for b in res.beyond:
        print(f"{b['method']}: attack success on g at {b['factor']}: {b['success']:.3f} of {b['attacked']} inputs")
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in res.files.values()))
    return _compare_exit_code(res.table)


def _check_method_options(opts: dict[str, dict[str, Any]]) -> None:
    """Every method's options have values of the right type and range (before any work)."""
    from .registry import get_method

    for m, o in opts.items():
        get_method(m, **o)


def _compare_exit_code(table: Any) -> int:
    """0 when no row errored, 1 when some did (the table and notes say which); every row
    errored: the one-line error of the first, exit 2."""
    errors = [c for c in table if c.status == "error"]
    if errors and len(errors) == len(table):
        raise CLIError(f"every row errored ({len(errors)} rows); first: {errors[0].method}: {errors[0].details.get('error', '')}")
    if errors:
        print(f"certify: {len(errors)} of {len(table)} rows errored (see the notes above)", file=sys.stderr)
    return 1 if errors else 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small models gain little from more, and on a busy machine more threads run many times slower)")

    ap = _Parser(prog="certify", description="Robustness certificates for neural networks.", parents=[common])
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    s: argparse.ArgumentParser = sub.add_parser("methods", parents=[common], help="list the registered methods and their options")
    s.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("run", parents=[common], help="certify a data set or a VNN-LIB property with one method")
    s.add_argument("--model", required=True, help="model file (.onnx, .pt holding a full nn.Module) or digits-mlp / digits-mlp-noise")
    s.add_argument("--spec", help="VNN-LIB property file (certified = unsat, falsified = sat)")
    s.add_argument("--eps", type=float, help="radius of the l_p balls around the data points")
    s.add_argument("--norm", default="inf", help="1, 2 or inf (default inf)")
    s.add_argument("--data", help="digits | mnist:<dir> | eran-mnist:<csv> | eran-cifar:<csv> | file.npz/.pt/.csv")
    s.add_argument("--limit", type=int, help="first N inputs only")
    s.add_argument("--method", required=True, help="a registered method (see: certify methods)")
    s.add_argument("--option", action="append", metavar="K=V", help="a method option (repeatable)")
    s.add_argument("--timeout", type=float, help="seconds per batch (with --spec: for the whole file, loading included)")
    s.add_argument("--result-file", help="with --spec: write the VNN-COMP result file (the answer; after sat the counterexample, X and Y)")
    s.add_argument("--per-box", action="store_true",
                   help="with --spec: also print a line per input box, and --out gets one row per box instead of one per instance")
    s.add_argument("--radius", action="store_true", help="also search the largest certified radius")
    s.add_argument("--max-radius", type=float, help="upper end of the radius search")
    s.add_argument("--batch-size", type=int, help="inputs per call (default: all at once)")
    s.add_argument("--output-lower", metavar="V[,V...]",
                   help="property: every output > V (one number, or one per output) instead of the data labels; e.g. for a regressor")
    s.add_argument("--output-upper", metavar="V[,V...]", help="property: every output < V (with or without --output-lower)")
    s.add_argument("--out", default="results.csv",
                   help="results file, .csv or .json (default results.csv; '' for none); with --spec one record for the instance")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", parents=[common], help="digits MLP, every registered method, certified accuracy vs radius")
    s.add_argument("--out", default=".", help="directory for the CSV, PNG and report (default: here)")
    s.add_argument("--limit", type=int, default=100, help="test digits (default 100)")
    s.add_argument("--methods", help="comma-separated methods (default: all registered)")
    s.add_argument("--norms", default="linf,l2", help="comma-separated norms (default linf,l2)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("compare", parents=[common], help="several methods on the same inputs, with report")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--methods", default="all", help="comma-separated methods (default: all that support --norm)")
    s.add_argument("--radii", required=True, help="comma-separated radii for the table and the attack curve")
    s.add_argument("--norm", default="inf")
    s.add_argument("--limit", type=int)
    s.add_argument("--limits", metavar="METHOD=K,...",
                   help="per-method caps: METHOD runs on the first K inputs only (0 = not run; globs like bab* allowed), e.g. milp=5,sdp=0")
    s.add_argument("--out", default=".", help="output directory")
    s.add_argument("--prefix", default="compare", help="file name prefix (default compare)")
    s.add_argument("--option", action="append", metavar="[METHOD.]K=V")
    s.add_argument("--executor", default="local", help="local | process | ray")
    s.add_argument("--workers", type=int)
    s.add_argument("--chunk-size", type=int)
    s.add_argument("--resume", action="store_true", help="skip (method, index) pairs already in the results CSV")
    s.add_argument("--timeout", type=float, help="seconds per chunk")
    s.add_argument("--max-radius", type=float)
    s.add_argument("--no-radius", action="store_true", help="certify at radius 0 only (no radius search)")
    s.add_argument("--no-attack", action="store_true", help="skip the PGD curve")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_compare)

    from .vnncomp import add_vnncomp_parser, run_vnncomp_command

    s = add_vnncomp_parser(sub, parents=(common,))
    s.set_defaults(func=run_vnncomp_command)

    from .train_cli import add_train_parser

    add_train_parser(sub, common)
    return ap


def _cause(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such file: {e.filename}"
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(msg.split())
    return msg or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certify`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise CLIError("choose a command: methods, run, demo, compare, vnncomp, train (certify -h for help)")
        if getattr(args, "limit", None) is not None and args.limit < 0:
            raise CLIError(f"--limit must be >= 0, got {args.limit}")
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        if args.command != "methods":
            import torch

            from .heap import start_heap_trimmer

            start_heap_trimmer()
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        print("certify: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"certify: error: {_cause(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
