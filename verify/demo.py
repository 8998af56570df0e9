"""``certify demo``: the shipped digits MLP, every registered method, certified accuracy vs radius.

For each norm (l_inf and l_2 by default) every registered method that supports it runs on the
same test digits with ``find_radius=True``, so that each input gets its largest certified
radius and the curves are comparable. Per norm the demo writes ``demo_<norm>_results.csv``
(and ``.json``), ``demo_<norm>.png`` and ``demo_<norm>.md`` (see :func:`verify.compare.compare`)
and prints the comparison table.

The network is ``digits-mlp-noise`` (:mod:`verify.digits_model`: trained with Gaussian noise
sigma = 0.25, test accuracy 0.972): one network f for every method, so deterministic methods
certify f and smoothing certifies g = f smoothed with the same sigma it was trained for.
Demo options keep the run short on 2 CPU cores (smoothing with n = 5,000 samples instead of
100,000, which caps its l2 radius near 0.75 at sigma 0.25); they are applied only to methods that
have the option. Slow exact methods run on the first few digits only or not at all
(``DEMO_LIMITS``); each table shows every method's ``n``.

After each norm's summary the demo prints (and appends to ``demo_<norm>.md``) a per-input table
for the digits ``milp`` ran on: the exact minimum adversarial distortion of f (``milp`` with
``find_radius``; l_2 is a mixed-integer QP and needs Gurobi, otherwise the column says so) beside
every method's certified radius on that digit, and each method's mean certified/exact ratio
(:func:`verify.report.exact_comparison`). A deterministic radius above the distance of a
confirmed adversarial example would be unsound: the demo prints such cases as ``UNSOUND``.

Last, the two tasks whose answer is not a radius (``DEMO_TASKS``, first ``TASK_DIGITS`` digits):
``smoothing-regression`` prints each digit's certified interval of the median-smoothed label logit
beside the largest upper bound of the other logits (l2 ball), ``smoothing-invariance`` the
estimated probability that f keeps the label at a uniform random point of an l_inf ball, with its
confidence interval; both are written to ``demo_tasks_results.csv``. (Both also run in the tables
above, where their radius is the largest checked radius certified.)

Then denoised smoothing (Salman et al. 2020; ``DENOISED_VARIANTS``, when ``smoothing-denoised`` is
run): at the demo's sigma and ``n``, in l2, the plain digits MLP smoothed, the bundled MSE and
stability denoisers in front of it, and the noise-trained MLP smoothed; certified accuracy at the
l2 table's radii, written to ``demo_denoised_results.csv``. (``smoothing-denoised`` also runs in
the tables above, where its default denoiser sits in front of the noise-trained f.)
"""
from __future__ import annotations

import csv
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
from .report import exact_comparison
from .spec import norm_name, parse_norm

__all__ = ["run_demo", "DEMO_NORMS", "DEMO_OPTIONS", "demo_options"]

#: per norm: the radii of the table (and the PGD curve), and the upper end of the radius search
DEMO_NORMS: dict[str, dict[str, Any]] = {
    "linf": {"radii": [0.0, 0.025, 0.05, 0.1, 0.15], "max_radius": 0.25, "radius_steps": 10},
    "l2": {"radii": [0.0, 0.25, 0.5, 0.75, 1.0], "max_radius": 2.0, "radius_steps": 8},
    "l1": {"radii": [0.0, 0.5, 1.0, 2.0, 3.0], "max_radius": 6.0, "radius_steps": 12},
}
# radius_steps: the checked radii of smoothing-regression / -invariance (max_radius * i / steps)
# then include the table's radii

#: demo options by method-name pattern; only options a method has are used (later patterns win)
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "smoothing-*": {"sigma": NOISE_SIGMA, "n0": 100, "n": 5_000, "alpha": 0.001, "seed": 0},
    "smoothing-invariance": {"n": 1_000, "min_probability": 0.95},
}

#: the output interval and the estimate beside the tables: ``method -> (norm, eps)``, on the
#: first ``TASK_DIGITS`` test digits
DEMO_TASKS: dict[str, tuple[str, float]] = {"smoothing-regression": ("l2", 0.25), "smoothing-invariance": ("linf", 0.4)}
TASK_DIGITS = 5

#: the denoised-smoothing comparison (Salman et al. 2020), all at the demo's sigma and smoothing
#: options: ``(variant, digits model kind, method, extra options)``
DENOISED_VARIANTS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("plain f smoothed", "plain", "smoothing-gaussian", {}),
    ("D_mse + plain f", "plain", "smoothing-denoised", {"denoiser": "digits-mse"}),
    ("D_stab + plain f", "plain", "smoothing-denoised", {"denoiser": "digits-stability"}),
    ("noise-trained f", "noise", "smoothing-gaussian", {}),
]

#: default caps on the inputs of the methods whose ``cost`` is "slow" (first k test digits).
#: Measured on 2 busy cores with the radius search: lp ~0.5 s/input, milp ~1-2 s/input with
#: Gurobi (l_inf MILP and l_2 MIQP; HiGHS: ~5-9 s/input in l_inf), bab ~3-8 s/input (radius on
#: the table's grid). Methods whose ``cost`` is "very slow" (the SDPs: minutes per input) are not
#: run unless named with --methods.
DEMO_LIMITS: dict[str, int] = {"lp": 20, "milp": 10, "bab*": 5}

#: caps that replace ``DEMO_LIMITS`` when Gurobi is not available (HiGHS is slower on the MILP)
DEMO_LIMITS_WITHOUT_GUROBI: dict[str, int] = {"milp": 5}

#: seconds per method and norm (the timeout a method gets for the whole batch)
DEMO_TIMEOUT = 45.0

#: at most this many digits (columns) in the exact-radius table
EXACT_TABLE_MAX = 20


def gurobi_status() -> tuple[bool, str]:
    """``(available, reason)`` of the Gurobi solver (:func:`relax.solvers.gurobi_available`)."""
    try:
        from relax.solvers import gurobi_available
    except ImportError as e:  # pragma: no cover - relax is part of the package
        return False, f"relax.solvers unavailable: {e}"
    return gurobi_available()


def demo_limit(method: str, limit: int) -> int:
    """The number of inputs ``method`` runs on in the demo: 0 for a "very slow" method,
    ``DEMO_LIMITS``, else ``limit``; also at most ``DEMO_LIMITS_WITHOUT_GUROBI`` when Gurobi is not
    available."""
    cls = list_methods().get(method)
    if cls is not None and cls.cost == "very slow":
        return 0
    k = limit
    for pattern, cap in DEMO_LIMITS.items():
        if fnmatch.fnmatch(method, pattern):
            k = min(cap, limit)
            break
    if not gurobi_status()[0]:
        for pattern, cap in DEMO_LIMITS_WITHOUT_GUROBI.items():
            if fnmatch.fnmatch(method, pattern):
                k = min(k, cap)
                break
    return k


def _exact_section(res, key: str, labels, names: Sequence[str], limits: dict[str, int], limit: int, gurobi: tuple[bool, str], print_fn) -> Any:
    """Print the per-input exact-radius table of one norm (the first ``EXACT_TABLE_MAX`` digits
    milp ran on), append it to ``demo_<norm>.md``, and return the
    :class:`verify.report.ExactComparison` (``None`` when milp was not asked for)."""
    if "milp" not in names:
        return None
    k = limits.get("milp", limit)
    missing = None
    if not any(c.method == "milp" for c in res.table):
        missing = "needs Gurobi (MIQP)" if key == "l2" and not gurobi[0] else "milp did not run"
    idx = list(range(min(k, limit, EXACT_TABLE_MAX)))
    ex = exact_comparison(res.table, idx, "milp", missing=missing, labels=[int(v) for v in labels[: len(idx)]])
    head = (f"exact minimum adversarial distortion ({key}) of f on the first {len(idx)} digits beside each method's certified radius"
            + (f" [exact l_2: {gurobi[1]}]" if key == "l2" and not gurobi[0] else ""))
    print_fn(f"\n-- {head}")
    print_fn(ex.text())
    print_fn("(g): smoothing radius of g = smoothed f, may exceed f's exact radius; (P): f keeps the label on a fraction "
             "of the ball only, may exceed it too; others certify f and must not.")
    if ex.violations:
        for v in ex.violations:
            msg = f"UNSOUND: {v}"
            print_fn(msg)
            print(msg, file=sys.stderr)
    else:
        n_ok = sum(1 for e in ex.exact.values() if math.isfinite(e["upper"]))
        if n_ok:
            print_fn(f"check: no deterministic certified radius exceeds the exact radius ({n_ok} digits with a confirmed adversarial example)")
    md = res.files.get("markdown")
    if md is not None and Path(md).is_file():
        body = [f"\n## Exact radius beside every method's certified radius ({key})", "", ex.note, "", ex.markdown(), ""]
        if ex.violations:
            body += ["**UNSOUND** (deterministic radius above the distance of a confirmed adversarial example):", ""]
            body += [f"- {v}" for v in ex.violations] + [""]
        elif any(math.isfinite(e["upper"]) for e in ex.exact.values()):
            body += ["No deterministic certified radius exceeds the exact radius (tolerance 1e-6 relative).", ""]
        with open(md, "a") as f:
            f.write("\n".join(body))
    return ex


def demo_options(method: str, norm: str | None = None) -> dict[str, Any]:
    """The demo's options for ``method``, filtered to the options it has (with ``norm``, its
    ``radius_steps`` from ``DEMO_NORMS`` as well)."""
    cls = list_methods()[method]
    have = cls.option_defaults()
    out: dict[str, Any] = {}
    for pattern, opts in DEMO_OPTIONS.items():
        if fnmatch.fnmatch(method, pattern):
            out.update({k: v for k, v in opts.items() if k in have})
    if norm is not None and "radius_steps" in have:
        out["radius_steps"] = DEMO_NORMS[norm]["radius_steps"]
    return out


def _tasks_section(net: Any, x: Any, y: Any, names: Sequence[str], out_dir: str | Path, print_fn) -> Any:
    """The output interval of ``smoothing-regression`` and the estimate of ``smoothing-invariance``
    (``DEMO_TASKS``) on the first ``TASK_DIGITS`` digits: printed, and written to
    ``demo_tasks_results.csv``. Returns the :class:`CertificateTable` (``None`` when neither
    method is run)."""
    from .api import certify
    from .certificate import CertificateTable
    from .report import TASK_COLUMNS, format_text, task_rows

    run = [m for m in DEMO_TASKS if m in names]
    if not run:
        return None
    k = min(TASK_DIGITS, len(y))
    table = CertificateTable()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    print_fn(f"\n== regression and the inverse task on the first {k} test digits, f = digits-mlp-noise")
    for m in run:
        norm, eps = DEMO_TASKS[m]
        opts = demo_options(m)
        t = certify(net, x[:k], y[:k], m, eps=eps, norm=norm, method_options=opts)
        print_fn(_task_heading(m, norm, eps, opts, t[0].confidence))
        print_fn(format_text(task_rows(t), TASK_COLUMNS))
        table.extend(t)
    path = Path(out_dir) / "demo_tasks_results.csv"
    table.to_csv(str(path))
    return table


def denoised_comparison(x: Any, y: Any, radii: Sequence[float], options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per ``DENOISED_VARIANTS`` entry on digits ``x [B, 1, 8, 8]``, labels ``y [B]``:
    certified accuracy at each l2 radius (``cert@r``), the base classifier's accuracy under noise
    (``acc_under_noise``: the mean fraction of the ``n`` estimation samples classified as the
    label) and the seconds. ``options``: smoothing options replacing the demo's
    (:func:`demo_options`), the same for every variant."""
    from .api import certify

    rows = []
    for variant, kind, method, extra in DENOISED_VARIANTS:
        opts = {**demo_options(method), **(options or {}), **extra}
        t0 = time.perf_counter()
        table = certify(load_digits_mlp(kind), x, y, method, eps=0.0, norm="l2", method_options=opts)
        row: dict[str, Any] = {"variant": variant, "model": f"digits-mlp{'-noise' if kind == 'noise' else ''}", "method": method,
                               "denoiser": extra.get("denoiser", "-"), "acc_under_noise": _accuracy_under_noise(table)}
        row.update({f"cert@{r:g}": a for r, a in zip(radii, table.certified_accuracy(radii))})
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def format_denoised(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`denoised_comparison` as an aligned text table."""
    from .report import format_text

    cells = [{k: (f"{v:.2f}" if k == "seconds" else f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return format_text(cells, [(k, k) for k in rows[0]])


def _denoised_section(x: Any, y: Any, names: Sequence[str], out_dir: str | Path, print_fn) -> list[dict[str, Any]] | None:
    """:func:`denoised_comparison` at the l2 table's radii with the demo's options: printed and
    written to ``demo_denoised_results.csv``; returns the rows (``None`` when
    ``smoothing-denoised`` is not run)."""
    if "smoothing-denoised" not in names:
        return None
    rows = denoised_comparison(x, y, DEMO_NORMS["l2"]["radii"])
    opts = demo_options("smoothing-gaussian")
    print_fn(f"\n== denoised smoothing (Salman et al. 2020) on {len(y)} test digits, l2, sigma {opts.get('sigma')}, "
             f"n {opts.get('n')}: certified accuracy of g = smoothed base classifier; acc_under_noise: the base classifier "
             f"on x + noise")
    print_fn(format_denoised(rows))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "demo_denoised_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _accuracy_under_noise(table: Any) -> float:
    """Mean over the rows of ``counts[label] / n``: the base classifier's accuracy on the
    estimation samples ``x + delta``."""
    fr = [c.details.get("counts", {}).get(str(c.label), 0) / c.details["n"] for c in table if "n" in c.details]
    return sum(fr) / len(fr) if fr else float("nan")


def _task_heading(method: str, norm: str, eps: float, opts: dict[str, Any], confidence: float) -> str:
    if method == "smoothing-regression":
        return (f"{method} ({norm} ball, eps {eps:g}; sigma {opts.get('sigma')}, n {opts.get('n')}): bounds on the median of "
                f"each logit under noise at every point of the ball, together with probability {confidence:g}; certified "
                f"when the label's lower bound beats every other logit's upper bound")
    return (f"{method} ({norm} ball, eps {eps:g}; n {opts.get('n')}): P(f keeps the label at a uniform random point of the "
            f"ball) with its {confidence:g} interval; certified when the interval's lower end >= {opts.get('min_probability')} "
            f"(a fraction of the ball, not every point)")


def run_demo(
    out_dir: str | Path = ".",
    limit: int = 100,
    methods: Sequence[str] | None = None,
    norms: Sequence[str] = ("linf", "l2"),
    progress: bool = True,
    print_fn=print,
) -> dict[str, Any]:
    """Run the demo; returns ``{norm: CompareResult}`` plus ``"exact"`` (``{norm:
    ExactComparison}``, the per-input exact-radius tables), ``"tasks"`` (the
    :class:`CertificateTable` of the regression / inverse-task section, when it ran) and
    ``"seconds"``.

    ``methods``: the methods to run (default: every registered one); methods named here run
    on all ``limit`` inputs, the default set applies ``DEMO_LIMITS``."""
    t_start = time.perf_counter()
    registered = list_methods()
    names = list(methods) if methods else list(registered)
    limits = {} if methods else {m: demo_limit(m, limit) for m in names}
    skipped = [m for m, k in limits.items() if k == 0]
    names = [m for m in names if m not in skipped]
    x, y = digits("test", limit=limit)
    net = load_digits_mlp("noise")
    results: dict[str, Any] = {"exact": {}}
    gurobi = gurobi_status()
    for n in norms:
        key = norm_name(parse_norm(n))
        cfg = DEMO_NORMS[key]
        ms = [m for m in names if key in registered[m].norms]
        if key == "l2" and not gurobi[0] and "milp" in ms:
            ms.remove("milp")  # the exact l_2 radius is an MIQP: the exact table says why it is missing
        if not ms:
            print_fn(f"\n{key}: no registered method supports it")
            continue
        t0 = time.perf_counter()
        fraction = any(registered[m].certifies == "fraction" for m in ms)
        title = (f"Digits MLP ({len(y)} test digits), {key}: certified accuracy vs radius\n"
                 f"solid: deterministic, certify f; dashed: probabilistic, certify g = smoothed f (sigma {NOISE_SIGMA:g})"
                 + ("; dash-dot: f keeps the label on a fraction of the ball" if fraction else ""))
        res = compare(
            net, x, y, ms, radii=cfg["radii"], norm=key, out_dir=out_dir, prefix=f"demo_{key}",
            options={m: demo_options(m, key) for m in ms}, limits=limits, executor="local", find_radius=True,
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
        ex = _exact_section(res, key, y, names, limits, len(y), gurobi, print_fn)
        if ex is not None:
            results["exact"][key] = ex
    tasks = _tasks_section(net, x, y, names, out_dir, print_fn)
    if tasks is not None:
        results["tasks"] = tasks
    denoised = _denoised_section(x, y, names, out_dir, print_fn)
    if denoised is not None:
        results["denoised"] = denoised
    if skipped:
        print_fn(f"\nnot run (too slow for the demo; name them with --methods): {', '.join(skipped)}")
    capped = {m: k for m, k in limits.items() if 0 < k < limit}
    if capped:
        print_fn("run on the first k digits only: " + ", ".join(f"{m} (k={k})" for m, k in capped.items()))
    secs = time.perf_counter() - t_start
    files = [str(f) for r in results.values() if hasattr(r, "files") for f in (r.files["csv"], r.files["png"], r.files["markdown"])]
    if tasks is not None:
        files.append(str(Path(out_dir) / "demo_tasks_results.csv"))
    if denoised is not None:
        files.append(str(Path(out_dir) / "demo_denoised_results.csv"))
    print_fn(f"\nwrote {', '.join(files)}\ndemo took {secs:.1f} s")
    results["seconds"] = secs
    return results
