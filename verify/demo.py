"""``certify demo``: the shipped digits MLP, every registered method, certified accuracy vs radius.

For each norm (l_inf and l_2 by default) every registered method that supports it runs on the
same test digits with ``find_radius=True``, so that each input gets its largest certified
radius and the curves are comparable. Per norm the demo writes ``demo_<norm>_results.csv``
(and ``.json``), ``demo_<norm>.png`` and ``demo_<norm>.md`` (see :func:`verify.compare.compare`)
and prints the comparison table.

The network is ``digits-mlp-noise`` (:mod:`verify.digits_model`: trained with Gaussian noise
sigma = 0.25, test accuracy 0.972): one network f for every method, so deterministic methods
certify f and smoothing certifies g = f smoothed with the same sigma it was trained for.
Demo options keep the run short on 2 CPU cores (e.g. smoothing with n = 2,000 samples); they
are applied only to methods that have the option.
"""
from __future__ import annotations

import fnmatch
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .compare import compare
from .data import digits
from .digits_model import NOISE_SIGMA, load_digits_mlp
from .registry import list_methods
from .spec import norm_name, parse_norm

__all__ = ["run_demo", "DEMO_NORMS", "DEMO_OPTIONS", "demo_options"]

#: per norm: the radii of the table (and the PGD curve), and the upper end of the radius search
DEMO_NORMS: dict[str, dict[str, Any]] = {
    "linf": {"radii": [0.0, 0.01, 0.02, 0.03, 0.05], "max_radius": 0.1},
    "l2": {"radii": [0.0, 0.1, 0.25, 0.5, 0.75], "max_radius": 2.0},
    "l1": {"radii": [0.0, 0.25, 0.5, 1.0, 2.0], "max_radius": 4.0},
}

#: demo options by method-name pattern; only options a method has are used
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "smoothing-*": {"sigma": NOISE_SIGMA, "n0": 100, "n": 2000, "alpha": 0.001, "seed": 0},
}

#: seconds per method and norm (the timeout a method gets for the whole batch)
DEMO_TIMEOUT = 30.0


def demo_options(method: str) -> dict[str, Any]:
    """The demo's options for ``method``, filtered to the options it has."""
    cls = list_methods()[method]
    have = cls.option_defaults()
    out: dict[str, Any] = {}
    for pattern, opts in DEMO_OPTIONS.items():
        if fnmatch.fnmatch(method, pattern):
            out.update({k: v for k, v in opts.items() if k in have})
    return out


def run_demo(
    out_dir: str | Path = ".",
    limit: int = 100,
    methods: Sequence[str] | None = None,
    norms: Sequence[str] = ("linf", "l2"),
    progress: bool = True,
    print_fn=print,
) -> dict[str, Any]:
    """Run the demo; returns ``{norm: CompareResult}`` (plus ``"seconds"``)."""
    t_start = time.perf_counter()
    registered = list_methods()
    names = list(methods) if methods else list(registered)
    x, y = digits("test", limit=limit)
    net = load_digits_mlp("noise")
    results: dict[str, Any] = {}
    for n in norms:
        key = norm_name(parse_norm(n))
        cfg = DEMO_NORMS[key]
        ms = [m for m in names if key in registered[m].norms]
        if not ms:
            print_fn(f"\n{key}: no registered method supports it")
            continue
        t0 = time.perf_counter()
        title = (f"Digits MLP ({len(y)} test digits), {key}: certified accuracy vs radius\n"
                 f"solid: deterministic, certify f; dashed: probabilistic, certify g = smoothed f (sigma {NOISE_SIGMA:g})")
        res = compare(
            net, x, y, ms, radii=cfg["radii"], norm=key, out_dir=out_dir, prefix=f"demo_{key}",
            options={m: demo_options(m) for m in ms}, executor="local", find_radius=True,
            max_radius=cfg["max_radius"], timeout=DEMO_TIMEOUT, attack=True,
            model_name="digits-mlp-noise", title=title, progress=progress,
        )
        smoothed = any(c.certifies == "smoothed" for c in res.table)
        print_fn(f"\n== {key}: certified accuracy on {len(y)} test digits, f = digits-mlp-noise"
                 + (f"; smoothing certifies g = smoothed f (sigma {NOISE_SIGMA:g}, confidence < 1)" if smoothed else "")
                 + f"  [{time.perf_counter() - t0:.1f} s]")
        print_fn(res.summary_text())
        if res.attack:
            print_fn("PGD accuracy of f (upper bound on its robust accuracy): "
                     + ", ".join(f"r={r:g}: {a:.2f}" for r, a in res.attack.items()))
        for note in res.notes:
            print(f"note: {note}", file=sys.stderr)
        results[key] = res
    secs = time.perf_counter() - t_start
    files = [str(f) for r in results.values() if hasattr(r, "files") for f in (r.files["csv"], r.files["png"], r.files["markdown"])]
    print_fn(f"\nwrote {', '.join(files)}\ndemo took {secs:.1f} s")
    results["seconds"] = secs
    return results
