"""verify.report on a hand-made CertificateTable (no method, no model needed)."""
from __future__ import annotations

import math

import pytest

from verify.certificate import Certificate, CertificateTable
from verify.report import (
    check_certified_below_attack,
    check_certified_per_input,
    format_markdown,
    format_text,
    html_report,
    markdown_report,
    plot_certified_accuracy,
    summarize,
)

RADII = [0.0, 0.25, 0.5]


@pytest.fixture()
def table() -> CertificateTable:
    """4 inputs x 2 methods: crown (f) and smoothing (g)."""
    t = CertificateTable()
    det = [("certified", 0.3), ("certified", 0.1), ("unknown", 0.0), ("falsified", 0.0)]
    smo = [("certified", 0.6), ("abstain", 0.0), ("certified", 0.2), ("certified", 0.4)]
    for i, ((s1, r1), (s2, r2)) in enumerate(zip(det, smo)):
        t.append(Certificate("crown", "deterministic", s1, index=i, label=i, prediction=i, norm="l2", radius=r1, time_s=0.01 * (i + 1)))
        pred = -1 if s2 == "abstain" else (i if i != 3 else 0)  # input 3: g certifies a wrong class
        t.append(Certificate("smoothing-gaussian", "probabilistic", s2, certifies="smoothed", confidence=0.999,
                             index=i, label=i, prediction=pred, norm="l2", radius=r2, time_s=0.5))
    return t


def test_summary_values(table):
    rows = {r["method"]: r for r in summarize(table, RADII)}
    crown, smo = rows["crown"], rows["smoothing-gaussian"]
    assert crown["classifier"] == "f" and smo["classifier"] == "g, smoothed"
    assert crown["cert_acc@0"] == 0.5 and crown["cert_acc@0.25"] == 0.25 and crown["cert_acc@0.5"] == 0.0
    assert smo["cert_acc@0"] == 0.5 and smo["cert_acc@0.5"] == 0.25  # input 3 is certified but wrong
    assert crown["mean_time_s"] == pytest.approx(0.025)
    assert smo["confidence"] == 0.999 and crown["confidence"] == 1.0


def test_text_and_markdown(table):
    text = format_text(summarize(table, RADII))
    lines = text.splitlines()
    assert len(lines) == 4 and "cert@0.25" in lines[0] and "certifies" in lines[0]
    assert "g, smoothed" in text and "deterministic" in text
    assert len({len(l) for l in lines[:2]}) == 1  # header and rule are aligned
    md = format_markdown(summarize(table, RADII))
    assert md.splitlines()[1].startswith("|---|") and md.count("\n") == 3


def test_plot_png(table, tmp_path):
    p = plot_certified_accuracy(table, RADII, tmp_path / "sub" / "curve.png", attack_curve={0.0: 0.75, 0.25: 0.5, 0.5: 0.25})
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_and_html_report(table, tmp_path):
    png = plot_certified_accuracy(table, RADII, tmp_path / "c.png")
    md = markdown_report(table, RADII, png, attack_curve={0.0: 0.75, 0.5: 0.25}, model_name="digits MLP",
                         sections=[("Beyond the certified radius", "nothing")])
    assert "smoothed classifier g" in md and "f (digits MLP)" in md
    assert "![certified accuracy vs radius](c.png)" in md and "## Beyond the certified radius" in md
    assert "PGD accuracy at every radius: yes." in md
    page = html_report(table, RADII, png)
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page


def test_certified_below_attack(table):
    assert check_certified_below_attack(table, {0.0: 0.5, 0.25: 0.25}) == []
    bad = check_certified_below_attack(table, {0.0: 0.5, 0.25: 0.2})
    assert len(bad) == 1 and bad[0].startswith("crown") and "0.25" in bad[0]
    # smoothing certifies g: an attack on f does not bound it, so it is never flagged
    assert all(not b.startswith("smoothing") for b in check_certified_below_attack(table, {0.0: 0.0}))


def test_empty_method_nan():
    t = CertificateTable([Certificate("interval", "deterministic", "unknown", label=None, prediction=1, time_s=0.0)])
    rows = summarize(t, [0.0])
    assert math.isnan(rows[0]["clean_accuracy"]) and "-" in format_text(rows)


def test_certified_per_input(table):
    # crown certifies input 0 with radius 0.3 and input 1 with 0.1
    assert check_certified_per_input(table, {0.25: [True, False, False, False]}) == []
    bad = check_certified_per_input(table, {0.25: [False, True, True, True], 0.09: [True, False, True, True]})
    assert [b.split(":")[0] for b in bad] == ["crown", "crown"]
    assert "input 0" in bad[0] and "input 1" in bad[1]
