"""Deadlines: does every registered method answer within its ``timeout``?

Runs every registered method through :func:`verify.certify` with timeouts of 2, 5 and 30 s on

* ``small``: an own tiny ReLU MLP (8-32-32-4, seeded), an l_inf ball of radius 0.1;
* ``medium``: VNN-COMP 2021 mnistfc ``mnist-net_256x2.onnx``;
* ``large``: ``mnist-net_256x6.onnx``;
* on request (``--nets cnn cifar cifar-wide``): the convolutional nets ``cnn`` (VNN-COMP 2021
  verivital ``Convnet_maxpool.onnx``), ``cifar`` and ``cifar-wide`` (oval21 ``cifar_base_kw.onnx``,
  ``cifar_wide_kw.onnx``), each on the box of one of its properties;

(the mnistfc nets from ``<shared>/benchmarks/vnncomp/2021/mnistfc``, skipped when that folder is
absent; their input set is the l_inf ball of radius 0.03 in [0, 1] around the midpoint of the box
of ``prop_0_0.03.vnnlib``, the property robustness of the class predicted there) and tabulates
method x net x timeout -> wall time of the ``certify()`` call, overrun past the deadline (s and %),
answer. Target: at most 1 s or 5 % past the deadline, whichever is larger.

Each (method, net) runs in a child process, the timeouts one after the other; the child imports
every method family and loads the net first: that process start-up is measured separately (from
starting the child to its "ready" line) and is not part of the certify() times. A run that does
not answer within ``3 x timeout + 30`` s is killed and reported as such.

Usage::

    .venv/bin/python benchmarks/deadlines.py [--timeouts 2 5 30] [--nets small medium large]
        [--methods crown lp ...] [--shared ../shared] [--out benchmarks/out/deadlines.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the packages, not benchmarks/smoothing.py

from benchmarks.report_file import publish  # noqa: E402

NETS = ("small", "medium", "large", "cnn", "cifar", "cifar-wide")
ONNX = {"medium": "mnist-net_256x2.onnx", "large": "mnist-net_256x6.onnx"}
#: convolutional nets (not in the default run): the box of a VNN-COMP 2021 property as the input set
CNNS = {
    "cnn": ("verivital", "Convnet_maxpool.onnx", "specs/maxpool_specs/prop_0_0.004.vnnlib"),
    "cifar": ("oval21", "nets/cifar_base_kw.onnx", "vnnlib/cifar_base_kw-img4549-eps0.00392156862745098.vnnlib"),
    "cifar-wide": ("oval21", "nets/cifar_wide_kw.onnx", "vnnlib/cifar_wide_kw-img5619-eps0.03215686274509805.vnnlib"),
}


# ---------------------------------------------------------------------------------- child side


def _problem(net: str, shared: Path):
    """``(model, inputs, prop)`` of a benchmark net (model loaded, on the CPU, float32)."""
    import torch

    from verify.model import load_model
    from verify.spec import LpBall, Robust

    if net == "small":
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        gm = load_model(mlp)
        x = torch.rand(1, 8)
        eps = 0.1
    elif net in CNNS:
        from verify.spec import Box
        from verify.vnnlib import parse_vnnlib

        folder = shared / "benchmarks" / "vnncomp" / "2021" / CNNS[net][0]
        gm = load_model(folder / CNNS[net][1])
        lo, hi = parse_vnnlib(folder / CNNS[net][2], dtype=torch.float32)[0].box(tuple(gm.input_shape)).bounds()
        box = Box(lo.reshape(1, *gm.input_shape), hi.reshape(1, *gm.input_shape))
        with torch.no_grad():
            label = int(gm((lo + hi).reshape(1, *gm.input_shape) / 2).argmax(dim=1)[0])
        return gm, box, Robust(torch.tensor([label]))
    else:
        from verify.vnnlib import parse_vnnlib

        folder = shared / "benchmarks" / "vnncomp" / "2021" / "mnistfc"
        gm = load_model(folder / ONNX[net])
        box = parse_vnnlib(folder / "prop_0_0.03.vnnlib", dtype=torch.float32)[0].box(tuple(gm.input_shape))
        lo, hi = box.bounds()
        x = ((lo + hi) / 2).reshape(1, *gm.input_shape)
        eps = 0.03
    with torch.no_grad():
        label = int(gm(x).argmax(dim=1)[0])
    return gm, LpBall(x, eps, float("inf"), 0.0, 1.0), Robust(torch.tensor([label]))


def child(method: str, net: str, timeouts: list[float], shared: Path) -> None:
    """Print a "ready" JSON line after the set-up, then one JSON line per timeout."""
    import torch

    from verify.api import certify
    from verify.registry import list_methods

    torch.set_num_threads(1)
    list_methods()  # imports every method family (start-up, not part of the timed call)
    try:
        import cvxpy  # noqa: F401  (imported lazily by sdp / lipschitz-sdp: 2-5 s, start-up too)
    except ImportError:
        pass
    gm, inputs, prop = _problem(net, shared)
    print(json.dumps({"ready": True}), flush=True)
    for t in timeouts:
        t0 = time.perf_counter()
        try:
            table = certify(gm, inputs, prop, method, timeout=t)
            c = table[0]
            det = c.details or {}
            ans, note = c.status, det.get("reason", "")
            if det.get("deadline_expired"):
                note = ("deadline reached; " + str(note)).strip("; ")
            reported = c.time_s
        except Exception as e:  # a method that refuses this input: reported, not fatal
            ans, note, reported = "error", f"{type(e).__name__}: {e}", None
        wall = time.perf_counter() - t0
        print(json.dumps({"timeout": t, "wall": wall, "answer": ans, "reported": reported, "note": str(note)[:90]}), flush=True)


# --------------------------------------------------------------------------------- parent side


def _reader(stream, q: "queue.Queue[str | None]") -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def _next_json(q: "queue.Queue[str | None]", wait: float) -> dict | None:
    """The next JSON line of the child within ``wait`` seconds (``None``: none came)."""
    end = time.monotonic() + wait
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)


def run_pair(method: str, net: str, timeouts: list[float], shared: Path) -> tuple[float | None, list[dict]]:
    """Run one (method, net) child: its start-up seconds and one row per timeout."""
    cmd = [sys.executable, __file__, "--child", method, net, "--timeouts", *map(str, timeouts), "--shared", str(shared)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
    q: "queue.Queue[str | None]" = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    rows: list[dict] = []
    ready = _next_json(q, 300.0)
    startup = time.perf_counter() - t_start if ready else None
    for t in timeouts:
        t_run = time.perf_counter()
        got = _next_json(q, 3 * t + 30) if ready else None
        if got is None:
            rows.append({"timeout": t, "wall": time.perf_counter() - t_run, "answer": "killed", "note": "no answer; child killed"})
            break
        rows.append(got)
    proc.kill()
    proc.wait()
    return startup, rows


def overrun(wall: float, t: float) -> tuple[float, float, bool]:
    """Seconds and percent past the deadline, and whether within the target (1 s or 5 %)."""
    over = wall - t
    return over, 100.0 * over / t, over <= max(1.0, 0.05 * t)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(results: list[tuple[str, str, float | None, list[dict]]]) -> list[str]:
    """Markdown rows of the results."""
    lines = [
        "| method | net | start-up (s) | timeout (s) | certify() wall (s) | overrun (s) | overrun (%) | within target | answer | note |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for method, net, startup, rows in results:
        for r in rows:
            over, pct, ok = overrun(r["wall"], r["timeout"])
            ok_s = "no (killed)" if r["answer"] == "killed" else ("yes" if ok else "**no**")
            note = r.get("note", "").replace("|", "/")
            su = f"{startup:.1f}" if startup is not None else "-"
            lines.append(f"| {method} | {net} | {su} | {r['timeout']:g} | {r['wall']:.2f} | {over:+.2f} | {pct:+.0f} | {ok_s} | {r['answer']} | {note} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "NET"), help=argparse.SUPPRESS)
    ap.add_argument("--timeouts", type=float, nargs="+", default=[2.0, 5.0, 30.0])
    ap.add_argument("--nets", nargs="+", default=["small", "medium", "large"], choices=NETS)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared data directory")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "deadlines.md"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    if args.child:
        child(args.child[0], args.child[1], args.timeouts, shared)
        return 0

    from verify.registry import list_methods

    methods = args.methods or list(list_methods())
    nets = list(args.nets)
    if not (shared / "benchmarks" / "vnncomp" / "2021" / "mnistfc").is_dir():
        skipped = [n for n in nets if n != "small"]
        nets = [n for n in nets if n == "small"]
        if skipped:
            print(f"skipping {', '.join(skipped)}: no mnistfc benchmark under {shared}", file=sys.stderr)
    results = []
    for net in nets:
        for method in methods:
            startup, rows = run_pair(method, net, args.timeouts, shared)
            results.append((method, net, startup, rows))
            for line in table([results[-1]])[2:]:
                print(line, flush=True)
    all_rows = [(r["wall"], r["timeout"], r["answer"]) for _, _, _, rows in results for r in rows]
    bad = sum(1 for w, t, a in all_rows if a == "killed" or not overrun(w, t)[2])
    ups = [s for _, _, s, _ in results if s is not None]
    text = "\n".join([
        f"Command: `benchmarks/deadlines.py --timeouts {' '.join(f'{t:g}' for t in args.timeouts)} --nets {' '.join(nets)}`",
        f"Machine: {os.cpu_count()} cores ({_cpu()}), load average at the end {os.getloadavg()[0]:.1f}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch and solvers single-threaded",
        "",
        *table(results),
        "",
        f"- runs: {len(all_rows)}; past the target (1 s or 5 %) or killed: {bad}",
        f"- process start-up (python, imports of every method family, model load), not in the times above: "
        f"median {sorted(ups)[len(ups) // 2]:.1f} s, max {max(ups):.1f} s" if ups else "- no start-up measured",
    ]) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
