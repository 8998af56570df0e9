"""The demo's exact-radius table: the exact minimum distortion (milp) beside every method's
certified radius on the digits MLP, and the soundness check that no deterministic radius exceeds
it (issue: certify small nets exactly)."""
from __future__ import annotations

import math

import pytest

import verify.demo as demo
from verify.certificate import Certificate, CertificateTable
from verify.report import check_certified_below_exact, exact_comparison, exact_radius_of

METHODS = ["interval", "crown", "lipschitz-global", "milp", "smoothing-gaussian"]


def _run(tmp_path, monkeypatch, gurobi=None):
    monkeypatch.setitem(demo.DEMO_OPTIONS, "smoothing-*", {**demo.DEMO_OPTIONS["smoothing-*"], "n": 500, "n0": 50})
    if gurobi is not None:
        monkeypatch.setattr(demo, "gurobi_status", lambda: gurobi)
    lines: list[str] = []
    res = demo.run_demo(out_dir=tmp_path, limit=2, methods=METHODS, progress=False, print_fn=lines.append)
    return res, "\n".join(lines)


def _check_exact_bounds_every_deterministic_radius(res, key):
    """Independent of the report code: every deterministic certified radius on the demo's
    inputs is <= the distance of milp's confirmed adversarial example (tiny tolerance)."""
    table = res[key].table
    ups = {}
    for c in table.by_method("milp"):
        er = c.details.get("exact_radius", {})
        if "upper" in er and er.get("status") == "optimal":
            ups[c.index] = float(er["upper"])
    assert ups, f"{key}: milp found no exact radius"
    n = 0
    for c in table:
        if c.certifies == "base" and c.certified and c.correct and c.index in ups:
            assert c.radius <= ups[c.index] * (1 + 1e-6) + 1e-6, (key, c.method, c.index, c.radius, ups[c.index])
            n += 1
    assert n >= 2 * (len(METHODS) - 2)  # every deterministic method, both digits
    return ups


def test_demo_prints_the_exact_radius_beside_every_method(tmp_path, monkeypatch):
    res, out = _run(tmp_path, monkeypatch)
    gurobi = demo.gurobi_status()[0]
    for key in ("linf", "l2"):
        assert key in res["exact"], out
        ex = res["exact"][key]
        assert ex.violations == [] and "UNSOUND" not in out
        heads = [h for _, h in ex.columns]
        assert heads[:3] == ["input", "label", "exact (milp)"]
        assert "smoothing-gaussian (g)" in heads and "crown" in heads
        assert len(ex.rows) == 3 and ex.rows[-1]["input"] == "mean certified/exact"
        md = (tmp_path / f"demo_{key}.md").read_text()
        assert "Exact radius beside every method's certified radius" in md and "exact (milp)" in md
        if key == "l2" and not gurobi:
            assert all(r["exact"] == "n/a: needs Gurobi (MIQP)" for r in ex.rows[:-1])
            continue
        ups = _check_exact_bounds_every_deterministic_radius(res, key)
        for r in ex.rows[:-1]:
            assert float(r["exact"]) == pytest.approx(ups[int(r["input"])], abs=1e-4)
        # the ratios are in (0, 1] for deterministic methods; milp's own is ~1
        assert 0 < ex.ratios["crown"] <= 1 + 1e-6 and ex.ratios["milp"] == pytest.approx(1.0, abs=1e-4)
    assert "exact minimum adversarial distortion (linf)" in out and "check: no deterministic certified radius exceeds" in out


def test_without_gurobi_the_l2_column_says_why(tmp_path, monkeypatch):
    res, out = _run(tmp_path, monkeypatch, gurobi=(False, "gurobipy is not installed (simulated)"))
    assert "milp" not in res["l2"].table.methods()
    ex = res["exact"]["l2"]
    assert [r["exact"] for r in ex.rows[:-1]] == ["n/a: needs Gurobi (MIQP)"] * 2
    assert ex.rows[-1]["exact"] == "n/a" and ex.ratios == {}
    assert "gurobipy is not installed (simulated)" in out
    assert "UNSOUND" not in out


def _cert(method, index, radius, certifies="base", status="certified", details=None, label=3, prediction=3):
    return Certificate(method=method, guarantee="deterministic" if certifies == "base" else "probabilistic",
                       certifies=certifies, confidence=1.0 if certifies == "base" else 0.999, status=status,
                       index=index, label=label, prediction=prediction, norm="linf", radius=radius, details=details or {})


def test_exact_comparison_flags_a_radius_above_the_exact_one():
    exact = {"lower": 0.0999999, "upper": 0.1, "status": "optimal", "gap": 1e-7}
    table = CertificateTable([
        _cert("milp", 0, 0.0999989, details={"exact_radius": exact}),
        _cert("milp", 1, 0.0, status="unknown", details={"exact_radius": {"lower": 0.05, "upper": 0.2, "status": "time_limit"}}),
        _cert("milp", 2, 0.0, status="unknown", details={"exact_radius": {"error": "minimum l_2 distortion is a mixed-integer QP; HiGHS has no MIQP"}}),
        _cert("milp", 3, 0.0, status="falsified", prediction=5),
        _cert("crown", 0, 0.08), _cert("crown", 1, 0.15), _cert("crown", 2, 0.3), _cert("crown", 3, 0.0, status="falsified", prediction=5),
        _cert("bad", 0, 0.1001), _cert("bad", 1, 0.25),
        _cert("smoothing-gaussian", 0, 0.2, certifies="smoothed"),  # g may exceed f's exact radius
    ])
    ex = exact_comparison(table, [0, 1, 2, 3])
    texts = [r["exact"] for r in ex.rows[:-1]]
    assert texts == ["0.1000", "[0.0500, 0.2000]", "n/a: needs Gurobi (MIQP)", "0 (wrong)"]
    assert len(ex.violations) == 2 and all(v.startswith("bad: input") for v in ex.violations)
    assert ex.ratios["crown"] == pytest.approx(0.8) and ex.ratios["smoothing-gaussian"] == pytest.approx(2.0)
    assert ex.rows[0]["smoothing-gaussian"] == "0.2000" and ex.rows[3]["crown"] == "wrong"
    assert "smoothing-gaussian (g)" in ex.markdown()
    # within the tolerance (float32 rounding) is not a violation
    ok = CertificateTable([_cert("milp", 0, 0.0999989, details={"exact_radius": exact}), _cert("crown", 0, 0.1 * (1 + 1e-7))])
    assert check_certified_below_exact(ok, {0: exact_radius_of(ok[0])}) == []
    assert math.isnan(exact_radius_of(None)["upper"])
