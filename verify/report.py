"""Reports on a :class:`~verify.certificate.CertificateTable`: summary tables (aligned text and
Markdown), the certified-accuracy-vs-radius plot, and Markdown / HTML reports embedding it.

Every table and plot states which classifier is certified: deterministic methods certify the
network ``f`` (``certifies="base"``), randomized smoothing certifies the smoothed classifier
``g`` (``certifies="smoothed"``) with probability ``confidence``. An empirical attack curve (PGD
accuracy on ``f``) is an *upper* bound on the robust accuracy of ``f``: a sound deterministic
certificate can never exceed it (:func:`check_certified_below_attack`).
"""
from __future__ import annotations

import base64
import html
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .certificate import CertificateTable

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "summarize",
    "summary_columns",
    "format_text",
    "format_markdown",
    "plot_certified_accuracy",
    "markdown_report",
    "html_report",
    "check_certified_below_attack",
    "check_certified_per_input",
    "check_certified_below_exact",
    "exact_radius_of",
    "ExactComparison",
    "exact_comparison",
    "classifier_label",
    "task_rows",
    "TASK_COLUMNS",
]

AttackCurve = Mapping[float, float]


def classifier_label(certifies: str) -> str:
    """``"base" -> "f"``, ``"smoothed" -> "g, smoothed"``, ``"fraction" -> "f, P on set"`` (used in
    legends and tables)."""
    return {"smoothed": "g, smoothed", "fraction": "f, P on set"}.get(certifies, "f")


def summarize(table: CertificateTable, radii: Sequence[float] = ()) -> list[dict[str, Any]]:
    """One dict per method: :meth:`CertificateTable.summary` plus ``mean_time_s`` and
    ``classifier`` (``"f"`` or ``"g, smoothed"``)."""
    rows = table.summary(radii)
    for s in rows:
        times = [c.time_s for c in table.by_method(s["method"])]
        s["mean_time_s"] = statistics.fmean(times) if times else float("nan")
        s["classifier"] = classifier_label(s["certifies"])
    return rows


def summary_columns(radii: Sequence[float] = (), errors: bool = False) -> list[tuple[str, str]]:
    """The default ``(key, heading)`` columns of a summary table (``errors``: add the count of
    ``status="error"`` rows)."""
    return [
        ("method", "method"),
        ("guarantee", "guarantee"),
        ("classifier", "certifies"),
        ("confidence", "confidence"),
        ("n", "n"),
        ("clean_accuracy", "clean acc"),
        *[(f"cert_acc@{r:g}", f"cert@{r:g}") for r in radii],
        ("average_radius", "avg radius"),
        ("mean_time_s", "mean s/input"),
        ("median_time_s", "median s/input"),
        *([("error", "errors")] if errors else []),
    ]


#: the columns of :func:`task_rows`
TASK_COLUMNS = [("method", "method"), ("input", "input"), ("label", "label"), ("eps", "eps"),
                ("result", "bounds / estimate"), ("status", "status")]


def task_rows(table: CertificateTable, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per certificate that carries output bounds or an estimate (``smoothing-regression``,
    ``smoothing-invariance``), at most ``limit``: the interval or the estimate with its confidence
    interval in one readable cell (columns :data:`TASK_COLUMNS`)."""
    rows = []
    for c in table:
        if c.output_lower is None and c.estimate is None:
            continue
        rows.append({"method": c.method, "input": str(c.index), "label": "" if c.label is None else str(c.label),
                     "eps": "" if c.eps is None else f"{c.eps:.4g}", "result": _task_cell(c), "status": c.status})
    return rows if limit is None else rows[:limit]


def _task_cell(c: Any) -> str:
    """``P = e in [lo, hi]`` for an estimate; for output bounds the label's output and the largest
    upper bound of the others (a classifier's logits), else the first outputs' intervals."""
    if c.estimate is not None:
        return f"P = {c.estimate:.4f} in [{c.estimate_lower:.4f}, {c.estimate_upper:.4f}]"
    lo, hi = c.output_lower, c.output_upper
    if c.label is not None and 1 < len(lo) and 0 <= c.label < len(lo):
        others = max(v for k, v in enumerate(hi) if k != c.label)
        return f"y{c.label} in [{lo[c.label]:.4g}, {hi[c.label]:.4g}], others <= {others:.4g}"
    cells = [f"y{k} in [{lo[k]:.4g}, {hi[k]:.4g}]" for k in range(min(len(lo), 4))]
    return ", ".join(cells) + (", ..." if len(lo) > 4 else "")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4f}"
        return f"{v:.2e}"
    return str(v)


def _grid(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None) -> tuple[list[str], list[list[str]]]:
    if columns is None:
        radii = [float(k.split("@", 1)[1]) for k in (rows[0] if rows else {}) if str(k).startswith("cert_acc@")]
        columns = summary_columns(radii)
    heads = [h for _, h in columns]
    body = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    return heads, body


def format_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """An aligned plain-text table (text left-aligned, numbers right-aligned)."""
    heads, body = _grid(rows, columns)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    numeric = [all(_is_num(b[i]) for b in body) and bool(body) for i in range(len(heads))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


def _is_num(s: str) -> bool:
    if s in ("", "-"):
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


def format_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""
    heads, body = _grid(rows, columns)
    numeric = [all(_is_num(b[i]) for b in body) and bool(body) for i in range(len(heads))]
    out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
    return "\n".join(out)


def _norm_of(table: CertificateTable) -> str | None:
    norms = {c.norm for c in table if c.norm}
    return norms.pop() if len(norms) == 1 else None


def plot_certified_accuracy(
    table: CertificateTable,
    radii: Sequence[float],
    path: str | os.PathLike,
    attack_curve: AttackCurve | None = None,
    title: str | None = None,
    model_name: str = "f",
) -> Path:
    """Certified accuracy vs radius, one line per method, written as a PNG.

    Deterministic methods (certify ``f``) are solid lines, probabilistic ones (certify the
    smoothed ``g``) dashed; legends say ``(f)`` or ``(g, smoothed)``. ``attack_curve`` maps a
    radius to the PGD accuracy of ``f`` (an empirical upper bound on its robust accuracy); it is
    drawn as a dotted black line with markers. Curves are evaluated on a dense grid from 0 to
    ``max(radii)`` (they are step functions of the per-input radii).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    r_max = max([float(r) for r in radii] + [1e-9])
    grid = [r_max * i / 200 for i in range(201)]
    methods = table.methods()
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=110)
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    n_max = max((len(table.by_method(m)) for m in methods), default=0)
    kinds = set()
    for i, m in enumerate(methods):
        sub = table.by_method(m)
        first = sub[0]
        n_note = f", n={len(sub)}" if len(sub) < n_max else ""
        kinds.add(first.certifies)
        acc = sub.certified_accuracy(grid)
        prob = first.guarantee == "probabilistic"
        conf = f", {first.confidence:g}" if prob else ""
        ax.plot(
            grid,
            acc,
            linestyle="-." if first.certifies == "fraction" else ("--" if prob else "-"),
            color=cmap(i % cmap.N),
            linewidth=1.8,
            label=f"{m} ({classifier_label(first.certifies)}{conf}{n_note})",
        )
    if attack_curve:
        rs = sorted(float(r) for r in attack_curve)
        ax.plot(rs, [attack_curve[r] for r in rs], "k:", marker="o", markersize=4, label="PGD accuracy (f, empirical upper bound)")
    norm = _norm_of(table)
    ax.set_xlabel(f"radius ({norm})" if norm else "radius")
    ax.set_ylabel("certified accuracy" + (" / PGD accuracy" if attack_curve else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, r_max)
    ax.grid(alpha=0.3)
    if title is None:
        parts = []
        f_name = "f" if model_name == "f" else f"f = {model_name}"
        if "base" in kinds or not kinds:
            parts.append(f"solid: deterministic, certifies {f_name}")
        if "smoothed" in kinds:
            parts.append("dashed: probabilistic, certifies g = smoothed f")
        if "fraction" in kinds:
            parts.append("dash-dot: P(f keeps the label on the set) >= a level, not every point")
        title = "Certified accuracy vs radius\n" + "\n".join(parts)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def check_certified_below_attack(
    table: CertificateTable, attack_curve: AttackCurve, tol: float = 1e-6
) -> list[str]:
    """Soundness check: for every method certifying ``f`` and every radius of the attack curve,
    certified accuracy must not exceed the attack (PGD) accuracy on the same inputs. Returns a
    list of violations (empty when consistent). Methods certifying the smoothed ``g`` are
    skipped: an attack on ``f`` says nothing about ``g``."""
    bad = []
    for m in table.methods():
        sub = table.by_method(m)
        if sub[0].certifies != "base":
            continue
        rs = sorted(float(r) for r in attack_curve)
        for r, ca in zip(rs, sub.certified_accuracy(rs)):
            if ca > attack_curve[r] + tol:
                bad.append(f"{m}: certified accuracy {ca:.4f} > attack accuracy {attack_curve[r]:.4f} at radius {r:g}")
    return bad


def check_certified_per_input(
    table: CertificateTable, robust: Mapping[float, Sequence[bool] | Tensor], rtol: float = 1e-6
) -> list[str]:
    """Per-input soundness check against an attack on ``f``: ``robust[r][i]`` is False when the
    attack broke input ``i`` (data-set index) at radius ``r`` (or f misclassifies it). No method
    certifying ``f`` may certify input ``i`` correctly with a radius ``>= r`` then. Returns the
    violations (empty when consistent); works when methods ran on different subsets."""
    bad = []
    for c in table:
        if c.certifies != "base" or not (c.certified and (c.label is None or c.correct)):
            continue
        for r, ok in robust.items():
            if c.index < len(ok) and not bool(ok[c.index]) and float(r) <= c.radius * (1 - rtol):
                bad.append(f"{c.method}: input {c.index} certified with radius {c.radius:.6g} but the attack breaks it at {float(r):g}")
                break
    return bad


def _classifier_note(table: CertificateTable, model_name: str) -> str:
    kinds = {c.certifies for c in table}
    net = "f" if model_name == "f" else f"f ({model_name})"
    notes = []
    if "base" in kinds:
        notes.append(f"Deterministic methods certify the network itself, {net}: every point of the ball is classified correctly.")
    if "smoothed" in kinds:
        conf = min(c.confidence for c in table if c.certifies == "smoothed")
        notes.append(
            f"Probabilistic methods certify the smoothed classifier g (a majority vote of f under noise), not f, "
            f"with probability at least {conf:g} over the sampling; their radii say nothing about f."
        )
    if "fraction" in kinds:
        conf = min(c.confidence for c in table if c.certifies == "fraction")
        notes.append(
            f"The inverse task (P on set) certifies, with probability at least {conf:g}, that f keeps the label on at least "
            f"a given fraction of the set (its min_probability), not on every point: an attack may break such inputs."
        )
    return " ".join(notes)


def markdown_report(
    table: CertificateTable,
    radii: Sequence[float],
    png: str | os.PathLike | None = None,
    attack_curve: AttackCurve | None = None,
    title: str = "Certification report",
    model_name: str = "f",
    sections: Sequence[tuple[str, str]] = (),
    violations: Sequence[str] | None = None,
) -> str:
    """A Markdown report: the classifier statement, the summary table, the attack curve (when
    given) with the soundness check, extra ``(heading, markdown)`` sections, and the PNG
    (linked by its file name, so keep the report beside it). ``violations``: the result of
    :func:`check_certified_per_input` (default: the aggregate :func:`check_certified_below_attack`)."""
    out = [f"# {title}", "", _classifier_note(table, model_name), ""]
    errors = any(c.status == "error" for c in table)
    out += ["## Summary", "", format_markdown(summarize(table, radii), summary_columns(radii, errors)), ""]
    if attack_curve:
        rs = sorted(float(r) for r in attack_curve)
        out += ["## Empirical upper bound (PGD on f)", ""]
        out += [format_markdown([{"radius": f"{r:g}", "acc": attack_curve[r]} for r in rs], [("radius", "radius"), ("acc", "PGD accuracy")]), ""]
        if violations is None:
            bad = check_certified_below_attack(table, attack_curve)
            out += ["Certified accuracy of f <= PGD accuracy at every radius: " + ("yes." if not bad else "**NO**: " + "; ".join(bad)), ""]
        else:
            out += ["No input certified for f is broken by PGD within its certified radius: "
                    + ("yes." if not violations else "**NO**: " + "; ".join(violations)), ""]
    for head, body in sections:
        out += [f"## {head}", "", body, ""]
    if png is not None:
        out += ["## Certified accuracy vs radius", "", f"![certified accuracy vs radius]({Path(png).name})", ""]
    return "\n".join(out)


def html_report(
    table: CertificateTable,
    radii: Sequence[float],
    png: str | os.PathLike | None = None,
    title: str = "Certification report",
    model_name: str = "f",
) -> str:
    """A self-contained HTML page: classifier statement, summary table and the PNG inlined."""
    rows = summarize(table, radii)
    cols = summary_columns(radii)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    img = ""
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode()
        img = f'<img alt="certified accuracy vs radius" src="data:image/png;base64,{data}">'
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(_classifier_note(table, model_name))}</p>"
        f"<table border='1' cellspacing='0' cellpadding='3'><tr>{head}</tr>{body}</table>{img}</body></html>"
    )


# ------------------------------------------------------------------------------------------
# exact radius beside every method's certified radius


#: relative tolerance of :func:`check_certified_below_exact` (radii are float32-rounded)
EXACT_RTOL = 1e-6


def _num(v: Any) -> float:
    """A float from a details value (CSV round trips store inf / nan as strings)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _short_reason(msg: str) -> str:
    m = msg.lower()
    if "miqp" in m or "mixed-integer qp" in m or "gurobipy is not installed" in m or "gurobipy licence:" in m:
        return "needs Gurobi (MIQP)"
    if "too large" in m or "size-limited" in m:
        return "exceeds the Gurobi licence size"
    return msg if len(msg) <= 40 else msg[:37] + "..."


def exact_radius_of(c: Any) -> dict[str, Any]:
    """The exact minimum adversarial distortion recorded by an exact method's Certificate
    (``details["exact_radius"]`` of ``milp`` with ``find_radius``), as
    ``{"lower", "upper", "status", "text", "exact"}``: ``upper`` is the distance of a confirmed
    adversarial example (an upper bound on the true minimum ``d*``), ``lower`` the solver's dual
    bound; ``exact`` is ``upper`` when the two agree (status optimal), else ``nan``; ``text``
    is the cell of the table (a value, an interval, ``"> r"`` when no adversarial example
    exists within the search radius, or why it is missing)."""
    if c is None:
        return {"lower": math.nan, "upper": math.nan, "status": "missing", "text": "", "exact": math.nan}
    if c.label is not None and not c.correct:
        return {"lower": 0.0, "upper": 0.0, "status": "misclassified", "text": "0 (wrong)", "exact": 0.0}
    er = c.details.get("exact_radius")
    if not isinstance(er, dict):
        why = c.details.get("reason", "no exact radius recorded")
        return {"lower": math.nan, "upper": math.nan, "status": "error", "text": "n/a: " + _short_reason(str(why)), "exact": math.nan}
    if "error" in er:
        return {"lower": math.nan, "upper": math.nan, "status": "error", "text": "n/a: " + _short_reason(str(er["error"])), "exact": math.nan}
    lo, up, st = _num(er.get("lower")), _num(er.get("upper")), str(er.get("status"))
    out = {"lower": lo, "upper": up, "status": st, "exact": math.nan}
    if st == "optimal" and math.isfinite(up) and up - lo <= 1e-4 * (1 + up):
        out["exact"] = up
        out["text"] = f"{up:.4f}"
    elif st == "no_adversarial":
        out["text"] = f"> {lo:.4g}" if math.isfinite(lo) else "none"
    elif st == "error":
        out["text"] = "n/a: " + _short_reason(str(er.get("reason", "solver error")))
    elif math.isfinite(up):
        out["text"] = f"[{lo:.4f}, {up:.4f}]"
    else:
        out["text"] = f">= {lo:.4f}" if math.isfinite(lo) else "n/a"
    return out


def check_certified_below_exact(table: CertificateTable, exact: Mapping[int, Mapping[str, Any]], rtol: float = EXACT_RTOL) -> list[str]:
    """Soundness check against the exact minimum distortion: no method certifying ``f`` may
    certify input ``i`` with a radius above ``exact[i]["upper"]``, the distance of a confirmed
    adversarial example (``rtol`` covers float32 rounding). Smoothing (certifies ``g``) is
    skipped: its radius is about the smoothed classifier and may exceed f's. Returns the
    violations (empty when consistent)."""
    bad = []
    for c in table:
        if c.certifies != "base" or c.index not in exact or not (c.certified and (c.label is None or c.correct)):
            continue
        up = exact[c.index]["upper"]
        if math.isfinite(up) and c.radius > up * (1 + rtol) + rtol:
            bad.append(f"{c.method}: input {c.index} certified with radius {c.radius:.6g} > {up:.6g}, "
                       "the distance of a confirmed adversarial example (exact minimum distortion)")
    return bad


@dataclass
class ExactComparison:
    """Per-input table: the exact minimum distortion beside every method's certified radius,
    a last row with each method's mean ``certified / exact`` ratio, and the soundness check.

    ``rows`` / ``columns``: one row per input (and the ratio row). :meth:`text` and
    :meth:`markdown` print it transposed -- one line per method, one column per input, the ratio
    last -- which stays narrow with many methods."""

    rows: list[dict[str, Any]]
    columns: list[tuple[str, str]]
    violations: list[str]
    exact: dict[int, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def transposed(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        inputs, summary = self.rows[:-1], self.rows[-1]
        cols = [("what", "radius on input")] + [(f"i{k}", r["input"]) for k, r in enumerate(inputs)] + [("ratio", "mean certified/exact")]
        out = []
        for key, head in self.columns[1:]:
            row = {"what": head, "ratio": "" if key == "label" else summary.get(key, "")}
            row.update({f"i{k}": r.get(key, "") for k, r in enumerate(inputs)})
            out.append(row)
        return out, cols

    def text(self) -> str:
        return format_text(*self.transposed())

    def markdown(self) -> str:
        return format_markdown(*self.transposed())


def _radius_cell(c: Any) -> str:
    if c is None:
        return ""
    if c.status == "abstain":
        return "abstain"
    if c.label is not None and not c.correct:
        return "wrong"
    if c.status == "error":
        return "error"
    r = c.radius if c.certified else 0.0
    return f"{r:.4f}"


def exact_comparison(
    table: CertificateTable,
    indices: Sequence[int],
    exact_method: str = "milp",
    missing: str | None = None,
    labels: Sequence[int] | None = None,
) -> ExactComparison:
    """The exact radius (from ``exact_method``'s certificates, see :func:`exact_radius_of`) beside
    every method's certified radius on the inputs ``indices``.

    ``missing``: why there is no exact method in ``table`` (the exact column then says so, e.g.
    ``"needs Gurobi (MIQP)"``; never a made-up value). ``labels``: the true labels of
    ``indices`` (else taken from the certificates). Smoothing columns are marked ``(g)``: they
    certify the smoothed classifier and may exceed the exact radius of f."""
    by = {(c.method, c.index): c for c in table}
    methods = table.methods()
    kind = {m: table.by_method(m)[0].certifies for m in methods}
    exact: dict[int, dict[str, Any]] = {}
    for i in indices:
        if missing is not None and exact_method not in methods:
            exact[i] = {"lower": math.nan, "upper": math.nan, "status": "missing", "text": f"n/a: {missing}", "exact": math.nan}
        else:
            exact[i] = exact_radius_of(by.get((exact_method, i)))
    head = {m: f"{m} (g)" if kind[m] == "smoothed" else (f"{m} (P)" if kind[m] == "fraction" else m) for m in methods}
    columns = [("input", "input"), ("label", "label"), ("exact", "exact (milp)")] + [(m, head[m]) for m in methods]
    rows = []
    ratio_sum = {m: 0.0 for m in methods}
    ratio_n = {m: 0 for m in methods}
    for k, i in enumerate(indices):
        lab = labels[k] if labels is not None else next((by[(m, i)].label for m in methods if (m, i) in by), None)
        row: dict[str, Any] = {"input": str(i), "label": "" if lab is None else str(lab), "exact": exact[i]["text"]}
        e = exact[i]["exact"]
        for m in methods:
            c = by.get((m, i))
            row[m] = _radius_cell(c)
            if c is not None and math.isfinite(e) and e > 0 and c.correct:
                ratio_sum[m] += (c.radius if c.certified else 0.0) / e
                ratio_n[m] += 1
        rows.append(row)
    ratios = {m: ratio_sum[m] / ratio_n[m] for m in methods if ratio_n[m]}
    n_exact = sum(1 for i in indices if math.isfinite(exact[i]["exact"]) and exact[i]["exact"] > 0)
    summary: dict[str, Any] = {"input": "mean certified/exact", "label": "", "exact": f"(n={n_exact} inputs)" if n_exact else "n/a"}
    for m in methods:
        summary[m] = f"{ratios[m]:.3f}" if m in ratios else "-"
    rows.append(summary)
    bad = check_certified_below_exact(table, exact)
    note = ("exact (milp): the minimum adversarial distortion of f (value = distance of a confirmed adversarial example, "
            "the MILP/MIQP dual bound agrees within 1e-5; [a, b]: bracket at the time limit; > r: none within the search radius r). "
            "One row per method: its certified radius on each input (0: not certified; wrong: the classifier misclassifies it) "
            "and its mean certified/exact ratio over the inputs with an exact value. "
            "Deterministic radii certify f and can never exceed the exact radius; (g) rows are smoothing radii for "
            "g = smoothed f, which may exceed it without contradiction; (P) rows claim that f keeps the label on a "
            "fraction of the ball only, and may exceed it too.")
    return ExactComparison(rows, columns, bad, exact, ratios, note)
