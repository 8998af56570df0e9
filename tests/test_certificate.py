"""Certificate fields, JSON/CSV round trips and the table's metrics."""
import math

import pytest

from verify.certificate import Certificate, CertificateTable


def _c(**kw):
    base = dict(method="m", guarantee="deterministic", status="certified", label=1, prediction=1, radius=0.3, norm="linf")
    base.update(kw)
    return Certificate(**base)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(status="maybe"), "status"),
        (dict(guarantee="likely"), "guarantee"),
        (dict(radius=-1.0), "radius"),
        (dict(confidence=0.9), "deterministic"),
        (dict(guarantee="probabilistic", confidence=0.0), "confidence"),
        (dict(certifies="f"), "certifies"),
    ],
)
def test_field_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _c(**kw)


def test_json_round_trip_with_inf_and_lists():
    c = _c(lower=[0.1, -0.2], counterexample=[[0.0, 1.0]], details={"bound": math.inf, "n": 3})
    c2 = Certificate.from_json(c.to_json())
    assert c2.lower == [0.1, -0.2] and c2.counterexample == [[0.0, 1.0]]
    assert c2.details["bound"] == "inf"  # JSON has no infinity; it is kept as text


def test_csv_round_trip(tmp_path):
    t = CertificateTable([_c(), _c(status="unknown", radius=0.0, eps=0.1), _c(method="s", guarantee="probabilistic", certifies="smoothed", confidence=0.999)])
    p = tmp_path / "r.csv"
    t.to_csv(str(p))
    t2 = CertificateTable.from_csv(str(p))
    assert [c.to_dict() for c in t2] == [c.to_dict() for c in t]
    t.to_json(str(tmp_path / "r.json"))
    assert len(CertificateTable.from_json(str(tmp_path / "r.json"))) == 3


def test_certified_accuracy_counts_only_correct_certified():
    t = CertificateTable(
        [
            _c(radius=0.5),
            _c(radius=0.1),
            _c(prediction=0, radius=0.9),  # wrong class: never counts
            _c(status="unknown", radius=0.0),
        ]
    )
    assert t.certified_accuracy([0.0, 0.2, 0.6]) == [0.5, 0.25, 0.0]
    s = t.summary([0.2])[0]
    assert s["n"] == 4 and s["certified"] == 3 and s["unknown"] == 1 and s["cert_acc@0.2"] == 0.25
    assert s["clean_accuracy"] == 0.75
