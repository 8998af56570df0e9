"""One result form for every method: :class:`Certificate` and :class:`CertificateTable`.

A Certificate answers one (input, property) question. Deterministic methods certify the
network ``f`` itself (``certifies="base"``); randomized smoothing certifies the smoothed
classifier ``g`` (``certifies="smoothed"``) with probability ``confidence = 1 - alpha``; the
inverse task certifies that f keeps the property on a fraction of the set
(``certifies="fraction"``). Tables and plots never branch on the method: they read these fields.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Iterator, Sequence

__all__ = ["Certificate", "CertificateTable", "STATUSES", "GUARANTEES", "CERTIFIES"]

STATUSES = ("certified", "falsified", "unknown", "abstain", "error")
GUARANTEES = ("deterministic", "probabilistic")
CERTIFIES = ("base", "smoothed", "fraction")
#: list-valued fields (JSON-encoded in their CSV cell); ``details`` is a JSON object
LIST_FIELDS = ("lower", "upper", "counterexample", "output_lower", "output_upper")


def _jsonable(v: Any) -> Any:
    """Tensors / numpy values -> plain Python for JSON."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _unjson_float(v: Any) -> Any:
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return v


@dataclass
class Certificate:
    """The answer of one method for one input and one property.

    Attributes:
        method: registry name of the method (``"crown"``, ``"smoothing-gaussian"``, ...).
        guarantee: ``"deterministic"`` (holds for every point of the set) or
            ``"probabilistic"`` (holds with probability ``confidence`` over the sampling).
        certifies: ``"base"`` (the network f), ``"smoothed"`` (the smoothed classifier g, or the
            smoothed regressor of ``smoothing-regression``) or ``"fraction"`` (the probability that
            f keeps the property at a random point of the set: the inverse task, not a claim about
            every point).
        status: ``"certified"`` (proved), ``"falsified"`` (a counterexample that a forward
            pass confirms), ``"unknown"``, ``"abstain"`` (smoothing could not decide the
            class) or ``"error"``.
        confidence: 1.0 for deterministic results, ``1 - alpha`` for probabilistic ones.
        index: position of the input in the batch / data set.
        label: the true or asked-for label (``None`` for non-classification properties).
        prediction: the class predicted at the clean input (by f or g); -1 on abstain.
        norm: ``"linf"``, ``"l2"``, ``"l1"``, ``"box"`` or a semantic unit (``"rotation-deg"``).
        eps: the radius asked about (``None`` when only the largest radius was sought).
        radius: the largest radius certified (0.0 if none).
        lower, upper: bounds on the property rows ``C y + d`` (lists), when a method has them.
        counterexample: an input (nested list) violating the property, with ``status="falsified"``.
        time_s: wall time spent on this input (a batch's time is split evenly).
        details: method-specific, JSON-serialisable facts (options, solver status, ...).
        output_lower, output_upper: bounds on each output of what is certified, for every point
            of the set (lists of length K; ``smoothing-regression``: the smoothed regressor's
            outputs), when a method has them; ``lower``/``upper`` stay the property rows' bounds.
        estimate, estimate_lower, estimate_upper: an estimated probability and its two-sided
            confidence interval at level ``confidence`` (``smoothing-invariance``: the
            probability that the property holds at a random point of the set).
    """

    method: str
    guarantee: str
    status: str
    certifies: str = "base"
    confidence: float = 1.0
    index: int = 0
    label: int | None = None
    prediction: int | None = None
    norm: str | None = None
    eps: float | None = None
    radius: float = 0.0
    lower: list[float] | None = None
    upper: list[float] | None = None
    counterexample: list | None = None
    time_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    output_lower: list[float] | None = None
    output_upper: list[float] | None = None
    estimate: float | None = None
    estimate_lower: float | None = None
    estimate_upper: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Certificate.status must be one of {STATUSES}, got {self.status!r}")
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"Certificate.guarantee must be one of {GUARANTEES}, got {self.guarantee!r}")
        if self.certifies not in CERTIFIES:
            raise ValueError(f"Certificate.certifies must be one of {CERTIFIES}, got {self.certifies!r}")
        if not (0.0 < self.confidence <= 1.0):
            raise ValueError(f"Certificate.confidence must be in (0, 1], got {self.confidence}")
        if self.radius is None or self.radius < 0 or math.isnan(self.radius):
            raise ValueError(f"Certificate.radius must be >= 0, got {self.radius}")
        if self.guarantee == "deterministic" and self.confidence != 1.0:
            raise ValueError("a deterministic certificate has confidence 1.0")
        for name in LIST_FIELDS:
            v = getattr(self, name)
            if v is not None and hasattr(v, "tolist"):
                setattr(self, name, v.tolist())
        for name in ("lower", "upper"):  # "inf" / "-inf" strings of a JSON or CSV round trip
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, [_unjson_float(x) for x in v])
        self.details = _jsonable(self.details)
        self._check_output_bounds()
        self._check_estimate()

    def _check_output_bounds(self) -> None:
        """``output_lower <= output_upper`` elementwise, as float lists (``"inf"`` strings from a
        JSON or CSV round trip become floats again)."""
        lo, hi = self.output_lower, self.output_upper
        if lo is None and hi is None:
            return
        if lo is None or hi is None or len(lo) != len(hi):
            raise ValueError("Certificate.output_lower and output_upper must be given together, with one entry per output")
        self.output_lower, self.output_upper = [float(v) for v in lo], [float(v) for v in hi]
        if any(not (a <= b) for a, b in zip(self.output_lower, self.output_upper)):
            raise ValueError("Certificate.output_lower must be <= output_upper (and not NaN) for every output")

    def _check_estimate(self) -> None:
        """``0 <= estimate_lower <= estimate <= estimate_upper <= 1`` where given."""
        vals = [self.estimate_lower, self.estimate, self.estimate_upper]
        given = [float(v) for v in vals if v is not None]
        if not given:
            return
        if len(given) != 3:
            raise ValueError("Certificate.estimate, estimate_lower and estimate_upper must be given together")
        if not (0.0 <= given[0] <= given[1] <= given[2] <= 1.0):
            raise ValueError(f"Certificate estimate: need 0 <= lower <= estimate <= upper <= 1, got {given}")
        self.estimate_lower, self.estimate, self.estimate_upper = given

    @property
    def certified(self) -> bool:
        return self.status == "certified"

    @property
    def correct(self) -> bool:
        """The clean prediction equals the label (False when either is missing)."""
        return self.label is not None and self.prediction is not None and self.prediction == self.label

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Certificate":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Certificate: unknown fields {sorted(unknown)}")
        kw = {k: _unjson_float(v) for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "Certificate":
        return cls.from_dict(json.loads(s))


# columns written to CSV, in order; list-valued fields are JSON-encoded in their cell
CSV_COLUMNS = [f.name for f in fields(Certificate)]


class CertificateTable(Sequence[Certificate]):
    """A list of Certificates with the summaries every report needs."""

    def __init__(self, certificates: Iterable[Certificate] = ()) -> None:
        self._rows: list[Certificate] = list(certificates)

    # --- list-like
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CertificateTable(self._rows[i])
        return self._rows[i]

    def __iter__(self) -> Iterator[Certificate]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return f"CertificateTable({len(self)} certificates, methods={self.methods()})"

    def append(self, c: Certificate) -> None:
        self._rows.append(c)

    def extend(self, cs: Iterable[Certificate]) -> None:
        self._rows.extend(cs)

    def __add__(self, other: "CertificateTable") -> "CertificateTable":
        return CertificateTable([*self._rows, *other])

    def methods(self) -> list[str]:
        seen: dict[str, None] = {}
        for c in self._rows:
            seen.setdefault(c.method, None)
        return list(seen)

    def by_method(self, method: str) -> "CertificateTable":
        return CertificateTable(c for c in self._rows if c.method == method)

    # --- serialisation
    def to_json(self, path: str | None = None) -> str:
        s = json.dumps([c.to_dict() for c in self._rows], indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(s)
        return s

    @classmethod
    def from_json(cls, s_or_path: str) -> "CertificateTable":
        s = s_or_path
        if not s.lstrip().startswith("["):
            with open(s_or_path) as f:
                s = f.read()
        return cls(Certificate.from_dict(d) for d in json.loads(s))

    @staticmethod
    def csv_row(c: Certificate) -> dict[str, str]:
        row = {}
        for k, v in c.to_dict().items():
            row[k] = "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        return row

    def to_csv(self, path: str | None = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for c in self._rows:
            w.writerow(self.csv_row(c))
        s = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(s)
        return s

    @classmethod
    def from_csv(cls, path: str) -> "CertificateTable":
        types = {f.name: f.type for f in fields(Certificate)}
        rows = []
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                d: dict[str, Any] = {}
                for k, v in r.items():
                    if v == "":
                        d[k] = None if k not in ("details",) else {}
                        continue
                    t = str(types[k])
                    if k in LIST_FIELDS or k == "details":
                        d[k] = json.loads(v)
                    elif "float" in t:
                        d[k] = float(v)
                    elif "int" in t:
                        d[k] = int(v)
                    else:
                        d[k] = v
                if d.get("radius") is None:
                    d["radius"] = 0.0
                rows.append(Certificate.from_dict(d))
        return cls(rows)

    # --- metrics
    def certified_accuracy(self, radii: Sequence[float], method: str | None = None) -> list[float]:
        """Fraction of rows (of ``method``, or all) that are certified, correct and have
        ``radius >= r``, for each ``r`` in ``radii``. Rows without a label count as correct
        when certified (VNN-LIB properties)."""
        rows = [c for c in self._rows if method is None or c.method == method]
        if not rows:
            return [float("nan")] * len(radii)
        out = []
        for r in radii:
            ok = sum(
                1
                for c in rows
                if c.status == "certified" and (c.label is None or c.correct) and c.radius >= r - 1e-12
            )
            out.append(ok / len(rows))
        return out

    def clean_accuracy(self, method: str | None = None) -> float:
        rows = [c for c in self._rows if (method is None or c.method == method) and c.label is not None]
        return sum(c.correct for c in rows) / len(rows) if rows else float("nan")

    def summary(self, radii: Sequence[float] = ()) -> list[dict[str, Any]]:
        """One dict per method: counts per status, clean accuracy, certified accuracy at each
        radius, average certified radius (over correct inputs, 0 where not certified), median
        and total time."""
        out = []
        for m in self.methods():
            rows = [c for c in self._rows if c.method == m]
            times = [c.time_s for c in rows]
            radii_cert = [c.radius if (c.certified and (c.label is None or c.correct)) else 0.0 for c in rows]
            s: dict[str, Any] = {
                "method": m,
                "guarantee": rows[0].guarantee,
                "certifies": rows[0].certifies,
                "confidence": min(c.confidence for c in rows),
                "n": len(rows),
                **{st: sum(c.status == st for c in rows) for st in STATUSES},
                "clean_accuracy": self.clean_accuracy(m),
                "average_radius": sum(radii_cert) / len(rows),
                "median_time_s": statistics.median(times),
                "total_time_s": sum(times),
            }
            for r, a in zip(radii, self.certified_accuracy(radii, m)):
                s[f"cert_acc@{r:g}"] = a
            out.append(s)
        return out
