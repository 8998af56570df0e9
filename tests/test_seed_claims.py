"""``benchmarks/seed_claims.py``: the quick run's six claims hold, its section and figures are
written, and every check raises on numbers that contradict its claim (each check is fed the
quick run's own results with one number changed)."""
from __future__ import annotations

import copy
import math

import pytest

from conftest import load_benchmark

sc = load_benchmark("seed_claims")


@pytest.fixture(scope="module")
def quick():
    """``(results, failures, seconds)`` of the quick run (about 10 s on one core)."""
    return sc.run_all(sc.Settings.make(quick=True), log=lambda _: None)


def _raises(claim: int, check, res) -> str:
    with pytest.raises(sc.ClaimError) as e:
        check(res)
    assert e.value.claim == claim and f"claim {claim} contradicted" in str(e.value)
    return str(e.value)


def test_quick_run_every_claim_holds(quick):
    results, failures, _ = quick
    assert failures == {}
    for c in sc.CLAIMS:  # the checks pass on the numbers they were given (and raise below on changed ones)
        c.check(results[c.key])
    assert len(results["linear"]["rows"]) == 8 * 3 and len(results["rmax"]["rows"]) == 4
    assert any(math.isfinite(r["upper"]) for r in results["lipschitz"]["rows"])


def test_section_and_figures_written(quick, tmp_path):
    results, failures, secs = quick
    md = tmp_path / "RESULTS.md"
    md.write_text("# Measured results\n\n## 13. Before\n\ntext\n")
    figs = sc.figures(results, tmp_path / "results")
    text = sc.section(results, failures, secs, "Command: test", figs, tmp_path)
    sc.write_section(md, text)
    sc.write_section(md, text)  # a rerun replaces the section, it does not add a second one
    out = md.read_text()
    assert out.startswith("# Measured results\n\n## 13. Before\n\ntext\n\n" + sc.SECTION_TITLE)
    assert out.count(sc.SECTION_TITLE) == 1 and out.count("**holds**") == 6
    assert all(f"### Claim {i}:" in out for i in range(1, 7))
    if sc.have_matplotlib():
        assert len(figs) == 7 and all(p.stat().st_size > 1000 for p in figs.values())
        assert "](results/seed_claim1_linear.png)" in out


def test_write_section_keeps_later_sections(tmp_path):
    md = tmp_path / "R.md"
    md.write_text(f"intro\n\n{sc.SECTION_TITLE}\n\nold\n\n## 15. Later\n\nkept\n")
    sc.write_section(md, f"{sc.SECTION_TITLE}\n\nnew\n")
    assert md.read_text() == f"intro\n\n{sc.SECTION_TITLE}\n\nnew\n\n## 15. Later\n\nkept\n"


def test_main_exits_nonzero_when_a_claim_fails(quick, monkeypatch, tmp_path, capsys):
    results, _, secs = quick
    monkeypatch.setattr(sc, "run_all", lambda s: (results, {}, secs))
    args = ["--quick", "--results", str(tmp_path / "R.md"), "--figures", str(tmp_path / "f")]
    assert sc.main(args) == 0
    monkeypatch.setattr(sc, "run_all", lambda s: (results, {3: "claim 3 contradicted: slope -0.7"}, secs))
    assert sc.main(args) == 1
    assert "CLAIM 3 FAILED: claim 3 contradicted: slope -0.7" in capsys.readouterr().err
    assert "**FAILED**: claim 3 contradicted" in (tmp_path / "R.md").read_text()


def test_linear_check_raises_on_contradictions(quick):
    res = quick[0]["linear"]
    above = copy.deepcopy(res)
    r = above["rows"][-1]
    r["radius"] = r["distance"] * 1.01
    r["pa_lower"] = float(sc.normal.cdf(r["radius"] / res["sigma"]))  # consistent, but above the exact distance
    assert "> exact distance" in _raises(1, sc.check_linear, above)
    flipped = copy.deepcopy(res)
    flipped["rows"][0]["prediction"] = 1 - flipped["rows"][0]["f"]
    assert "g predicts" in _raises(1, sc.check_linear, flipped)
    formula = copy.deepcopy(res)
    formula["rows"][3]["radius"] *= 0.9
    assert "sigma Phi^-1(pA_lower)" in _raises(1, sc.check_linear, formula)
    # the largest n given the smallest n's (consistent) rows: the mean ratio no longer grows
    shrunk = copy.deepcopy(res)
    ns = sorted({r["n"] for r in res["rows"]})
    small = [r for r in shrunk["rows"] if r["n"] == ns[0]]
    for r, s in zip([r for r in shrunk["rows"] if r["n"] == ns[-1]], small):
        r["radius"], r["pa_lower"], r["prediction"] = s["radius"], s["pa_lower"], s["prediction"]
    assert "does not grow with n" in _raises(1, sc.check_linear, shrunk)


def test_rmax_check_raises_on_contradictions(quick):
    res = quick[0]["rmax"]
    for field, change in (("radius", lambda v: v * 1.001), ("pa_lower", lambda v: v - 1e-4), ("count", lambda v: v - 1)):
        bad = copy.deepcopy(res)
        bad["rows"][-1][field] = change(bad["rows"][-1][field])
        _raises(2, sc.check_rmax, bad)
    # the closed form itself: Phi^-1(alpha^(1/n)) for n = 100, alpha = 0.001
    assert math.isclose(sc.rmax_closed_form(100, 0.001, 1.0)[1], sc.normal.ppf(0.001 ** 0.01), rel_tol=1e-12)


def test_dimension_check_raises_on_contradictions(quick):
    res = quick[0]["dimension"]
    bad = copy.deepcopy(res)
    bad["rows"][1]["rinf"] *= 1.01
    assert "!= R_2" in _raises(3, sc.check_dimension, bad)
    # R_inf = R_2 / sqrt(d) on every row, but R_2 shrinking with d: the slope is no longer -1/2
    slope = copy.deepcopy(res)
    for r in slope["rows"]:
        r["r2"] = r["distance"] * 0.9 * (4 / r["d"]) ** 0.2
        r["rinf"] = r["r2"] / math.sqrt(r["d"])
    assert "slope" in _raises(3, sc.check_dimension, slope)
    above = copy.deepcopy(res)
    above["rows"][0]["r2"] = above["rows"][0]["distance"] * 1.1
    above["rows"][0]["rinf"] = above["rows"][0]["r2"] / math.sqrt(above["rows"][0]["d"])
    assert "above the exact" in _raises(3, sc.check_dimension, above)


def test_topk_check_raises_on_contradictions(quick):
    res = quick[0]["topk"]
    acc = copy.deepcopy(res)
    i = max(range(len(acc["radii"])), key=lambda j: acc["top1"][j])
    acc["topk"][2][i] = acc["top1"][i] - 0.01
    assert "< top-1 accuracy" in _raises(4, sc.check_topk, acc)
    rad = copy.deepcopy(res)
    rad["radius_k"][1][0] = rad["radius_k"][2][0] + 0.1
    assert "top-2 radius" in _raises(4, sc.check_topk, rad)


def test_lipschitz_check_raises_on_contradictions(quick):
    res = quick[0]["lipschitz"]
    row = next(i for i, r in enumerate(res["rows"]) if math.isfinite(r["upper"]))
    above = copy.deepcopy(res)
    above["rows"][row]["radius"]["lipschitz-local"] = above["rows"][row]["upper"] * 1.01
    assert "lipschitz-local radius" in _raises(5, sc.check_lipschitz_exact, above)
    pair = copy.deepcopy(res)
    pair["rows"][row]["pair_radius"] = pair["rows"][row]["radius"]["lipschitz-global"] * 0.99
    assert "margin_j / L_j" in _raises(5, sc.check_lipschitz_exact, pair)
    none = copy.deepcopy(res)
    for r in none["rows"]:
        r["upper"] = math.nan
    assert "nothing was compared" in _raises(5, sc.check_lipschitz_exact, none)


def test_curves_check_raises_on_contradictions(quick):
    res = quick[0]["curves"]
    acc = copy.deepcopy(res)
    acc["linf"]["methods"]["crown"]["acc"][2] = acc["linf"]["pgd"][2] + 0.05
    assert "crown certified accuracy" in _raises(6, sc.check_curves, acc)
    per_input = copy.deepcopy(res)
    cur = per_input["l2"]
    i, rad = max(enumerate(cur["methods"]["crown"]["radius"]), key=lambda t: t[1])
    r = max(r for r in cur["robust"] if 0 < r < rad)
    cur["robust"][r][i] = False  # PGD "breaks" an input inside its certified radius
    assert f"certifies input {i}" in _raises(6, sc.check_curves, per_input)
    # smoothing certifies g: a curve above f's PGD accuracy is not a contradiction
    g_only = copy.deepcopy(res)
    g_only["linf"]["methods"]["smoothing-gaussian"]["acc"] = [1.0] * len(g_only["linf"]["radii"])
    sc.check_curves(g_only)


def test_nested_robust_breaks_every_larger_radius():
    import torch

    raw = {0.2: torch.tensor([False, True, True]), 0.1: torch.tensor([True, False, True])}
    assert sc.nested_robust(raw) == {0.1: [True, False, True], 0.2: [False, False, True]}
