"""`certify compare` on the digits MLP with every registered method (issue: compare).

The files are written, every method runs on its inputs without error, and no method certifying
f reports a certified accuracy above the PGD accuracy of f on the same inputs at the same radius
(a sound certificate can't beat an attack); the per-input version of that check is run too.
"""
from __future__ import annotations

import csv
import json

import pytest

from verify.certificate import CertificateTable
from verify.cli import main
from verify.compare import attack_robust
from verify.data import digits
from verify.digits_model import load_digits_mlp
from verify.registry import list_methods
from verify.report import check_certified_per_input

RADII = [0.0, 0.025, 0.05, 0.1]
N = 12
# exact and complete methods on a few inputs; sdp is left out (a cvxpy solve costs minutes per
# input; tests/test_sdp.py checks it against attacks and MILP)
LIMITS = {"lp": 3, "milp": 2, "bab": 2, "lipschitz-sdp": 2, "sdp": 0}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    limits = ",".join(f"{m}={k}" for m, k in LIMITS.items() if m in list_methods())
    args = ["compare", "--model", "digits-mlp-noise", "--data", "digits", "--limit", str(N),
            "--radii", ",".join(map(str, RADII)), "--max-radius", "0.2", "--limits", limits,
            "--option", "n=400", "--option", "n0=40", "--option", "alpha=0.01", "--timeout", "60",
            "--out", str(out), "-q"]
    assert main(args) == 0
    return out


def test_files_and_every_method(compared):
    for name in ("compare_results.csv", "compare_results.json", "compare.png", "compare.md", "compare.html"):
        assert (compared / name).is_file() and (compared / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(compared / "compare_results.csv")))
    assert len(json.loads((compared / "compare_results.json").read_text())) == len(rows)
    expected = {m for m, c in list_methods().items() if "linf" in c.norms and LIMITS.get(m) != 0}
    per_method: dict[str, int] = {}
    for r in rows:
        per_method[r["method"]] = per_method.get(r["method"], 0) + 1
    assert set(per_method) == expected
    for m, n in per_method.items():
        assert n == min(N, LIMITS.get(m, N)), m
    errors = [(r["method"], r["details"]) for r in rows if r["status"] == "error"]
    assert not errors, errors[:2]
    md = (compared / "compare.md").read_text()
    assert "compare.png" in md and "UNSOUND" not in md


def test_certified_accuracy_below_attack_accuracy(compared):
    table = CertificateTable.from_csv(str(compared / "compare_results.csv"))
    x, y = digits("test", limit=N)
    robust = attack_robust(load_digits_mlp("noise"), x, y, RADII, float("inf"), steps=40)
    assert check_certified_per_input(table, robust) == []
    checked = 0
    for m in table.methods():
        sub = table.by_method(m)
        if sub[0].certifies != "base":  # smoothing certifies g; an attack on f does not bound it
            continue
        idx = [c.index for c in sub]
        for r, cert_acc in zip(RADII, sub.certified_accuracy(RADII)):
            attack_acc = float(robust[r][idx].float().mean())
            assert cert_acc <= attack_acc + 1e-9, f"{m}: certified {cert_acc} > attack {attack_acc} at r={r}"
            checked += 1
    assert checked >= 4 * len(RADII)


@pytest.mark.parametrize("limits, cause", [("milp", "expected METHOD=K"), ("milp=-1", "expected METHOD=K"),
                                           ("nosuch=2", "matches no registered method")])
def test_bad_limits_one_line(limits, cause, tmp_path, capsys):
    """A malformed cap or an unknown method name: one line naming the cause (a registered method
    that is simply not run, e.g. sdp here, is accepted)."""
    args = ["compare", "--model", "digits-mlp-noise", "--data", "digits", "--limit", "2", "--radii", "0",
            "--methods", "interval,milp", "--limits", limits, "--out", str(tmp_path), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and cause in err


def test_limits_for_a_method_not_run_are_ignored(tmp_path):
    args = ["compare", "--model", "digits-mlp-noise", "--data", "digits", "--limit", "2", "--radii", "0",
            "--methods", "interval", "--limits", "interval=1,sdp=0", "--out", str(tmp_path), "--no-attack", "-q"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "compare_results.csv")))
    assert [r["method"] for r in rows] == ["interval"]  # capped at 1 input


def test_usable_cores_respects_the_cap_and_the_machine():
    import os

    from verify.resources import usable_cores

    n = usable_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert usable_cores(1) == 1 and usable_cores(10**6) == n
