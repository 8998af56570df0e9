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
from pathlib import Path
from typing import Any, Mapping, Sequence

from .certificate import CertificateTable

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
    "classifier_label",
]

AttackCurve = Mapping[float, float]


def classifier_label(certifies: str) -> str:
    """``"base" -> "f"``, ``"smoothed" -> "g, smoothed"`` (used in legends and tables)."""
    return "g, smoothed" if certifies == "smoothed" else "f"


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
            linestyle="--" if prob else "-",
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
    table: CertificateTable, robust: Mapping[float, Sequence[bool]], rtol: float = 1e-6
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
