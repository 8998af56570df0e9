"""VNN-LIB files with many boxes read into batches (``VnnlibBoxes``): every box equals, bit for
bit, what a per-box reading gives (the reference below: one box, one outward rounding and one
``Linear`` at a time, as the reader did before), on synthetic files and on the nn4sys files of
../shared; the sequence view over the batches; the reader's deadline."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch

import verify.vnnlib as vl
from verify.spec import Linear
from verify.vnnlib import (
    VnnlibBoxes,
    VnnlibProperties,
    VnnlibProperty,
    VnnlibTimeout,
    parse_vnnlib,
)

# ---------------------------------------------------------------------------------------- reference


def _outward_ref(v: float, dtype: torch.dtype, down: bool) -> float:
    """``v`` as a ``dtype`` value, rounded down (lower bounds) or up (upper bounds)."""
    if dtype == torch.float64:
        return v
    w = np.float32(v)
    if (float(w) > v) if down else (float(w) < v):
        w = np.nextafter(w, np.float32(-np.inf if down else np.inf))
    return float(w)


def per_box_reference(text: str, dtype: torch.dtype) -> list[VnnlibProperty]:
    """The boxes of ``text`` read one at a time: the atoms by the general parser (s-expressions;
    nothing in bulk), disjuncts grouped by their input box (first appearance), each box rounded
    outward and its ``Linear`` built row by row."""
    p = vl._Parser(text, "t", fast=False)
    p.run()
    n_out = p.check_indices("Y", None, "outputs")
    disjuncts: list[list[tuple]] = [[]]
    for dnf, _ in p.complex:
        disjuncts = [c + e for c in disjuncts for e in dnf]
    boxes: dict = {}
    for conj in disjuncts:
        xs = [a for a in conj if a[0] == "X"]
        lo, hi = list(p.lo), list(p.hi)
        for _, i, upper, v, _ in xs:
            if upper and v < hi[i]:
                hi[i] = v
            elif not upper and v > lo[i]:
                lo[i] = v
        key = (tuple(lo), tuple(hi)) if xs else None
        boxes.setdefault(key, ((lo, hi), []))[1].append(p.top_rows + [a for a in conj if a[0] == "Y"])
    out = []
    for (lo, hi), groups in boxes.values():
        rows, d, gid = [], [], []
        for g, atoms in enumerate(groups):
            for atom in atoms or [("Y", (), 0.0, 0)]:
                row = [0.0] * n_out
                for j, c in atom[1]:
                    row[j] += c
                rows.append(row)
                d.append(atom[2])
                gid.append(g)
        lo_t = torch.tensor([_outward_ref(v, dtype, True) for v in lo], dtype=torch.float64).to(dtype)
        hi_t = torch.tensor([_outward_ref(v, dtype, False) for v in hi], dtype=torch.float64).to(dtype)
        spec = Linear(torch.tensor(rows, dtype=torch.float64).reshape(-1, n_out).to(dtype),
                      torch.tensor(d, dtype=torch.float64).to(dtype), torch.tensor(gid))
        out.append(VnnlibProperty(lo_t, hi_t, spec))
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def assert_same_boxes(props: VnnlibProperties, ref: list[VnnlibProperty]) -> None:
    """``props`` holds the boxes of ``ref`` in the same order, bit for bit, in its sequence view
    and in its batches."""
    assert len(props) == len(ref) == sum(len(b) for b in props.batches)
    for p, q in zip(props, ref):
        for a, b in ((p.input_lo, q.input_lo), (p.input_hi, q.input_hi), (p.spec.C, q.spec.C), (p.spec.d, q.spec.d)):
            assert a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)
        assert torch.equal(p.spec.groups, q.spec.groups)
    seen = []
    for b in props.batches:
        assert b.input_lo.shape == b.input_hi.shape == (len(b), props.num_inputs)
        assert b.C.shape[:2] == b.d.shape and b.C.shape[0] == len(b) and b.groups.shape == (b.C.shape[1],)
        for m, i in enumerate(b.index.tolist()):
            q = ref[i]
            assert _bits(b.input_lo[m]) == _bits(q.input_lo) and _bits(b.input_hi[m]) == _bits(q.input_hi)
            assert _bits(b.C[m]) == _bits(q.spec.C) and _bits(b.d[m]) == _bits(q.spec.d)
            assert torch.equal(b.groups, q.spec.groups)
        seen += b.index.tolist()
    assert sorted(seen) == list(range(len(ref)))


# ---------------------------------------------------------------------------------------- synthetic files


def _decls(n_in: int, n_out: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))


def lindex_like(rng: random.Random, n_boxes: int) -> str:
    """nn4sys lindex style: one input, each box twice (``Y_0 <= a`` or ``Y_0 >= b``); some boxes
    come back later with a third disjunct (another row structure: a second batch)."""
    clauses, seen = [], []
    for _ in range(n_boxes):
        lo = rng.uniform(0, 1)
        box = f"(>= X_0 {lo!r}) (<= X_0 {lo + rng.uniform(0, 1e-3)!r})"
        seen.append(box)
        a = rng.uniform(0, 1)
        clauses += [f"(and {box} (<= Y_0 {a:.16f}))", f"(and {box} (>= Y_0 {a + 0.01:.16f}))"]
        if rng.random() < 0.05:
            clauses.append(f"(and {rng.choice(seen)} (>= Y_0 {rng.uniform(2, 3)!r}))")
    return _decls(1, 1) + "(assert (or\n  " + "\n  ".join(clauses) + "\n))\n"


def mixed(rng: random.Random, n_clauses: int, y_pairs: bool) -> str:
    """Three inputs (X_2 bounded at the top level only), three outputs, a top-level output
    row; clauses with 0-3 input atoms (-0.0 and 0.1-like numbers among them) and 0-3 output
    atoms, Y-Y atoms with ``y_pairs`` (read by the general parser)."""
    lows = ["-0.1", "-0.0", "0.0", "-0.30000000000000004"]  # every low <= every high (-0.0 == 0.0)
    highs = ["0.1", "1e-8", "0.5", "0.30000000000000004", "0.0", "-0.0"]
    clauses = []
    for _ in range(n_clauses):
        atoms = []
        for i in rng.sample(range(2), rng.randint(0, 2)):
            atoms.append(f"(>= X_{i} {rng.choice(lows)})" if rng.random() < 0.5 else f"(<= X_{i} {rng.choice(highs)})")
        if rng.random() < 0.2:
            atoms.append(f"(<= X_0 {rng.choice(highs)})")  # a second, maybe tighter bound
        for _ in range(rng.randint(0, 3)):
            other = f"Y_{rng.randrange(3)}" if y_pairs and rng.random() < 0.5 else f"{rng.uniform(-1, 1)!r}"
            atoms.append(f"({rng.choice(['<=', '>='])} Y_{rng.randrange(3)} {other})")
        clauses.append("(and " + " ".join(atoms or ["(<= Y_0 5)"]) + ")")
    top = "(assert (>= X_0 -1))(assert (<= X_0 1))(assert (>= X_1 -1))(assert (<= X_1 1))"
    top += "(assert (>= X_2 0.1))(assert (<= X_2 0.2))(assert (<= Y_2 7.5))\n"
    return _decls(3, 3) + top + "(assert (or\n  " + "\n  ".join(clauses) + "\n))\n"


def points_like(rng: random.Random, n_boxes: int, n_in: int) -> str:
    """nn4sys cardinality style: each box a point (lower = upper bound) with one output bound."""
    clauses = []
    for _ in range(n_boxes):
        xs = " ".join(f"(>= X_{i} {v}) (<= X_{i} {v})" for i, v in enumerate(rng.choice(["0.0", "1.0", "0.1"]) for _ in range(n_in)))
        clauses.append(f"(and {xs} ({rng.choice(['<=', '>='])} Y_0 {rng.uniform(-1, 1)!r}))")
    return _decls(n_in, 1) + "(assert (or\n  " + "\n  ".join(clauses) + "\n))\n"


def two_blocks(rng: random.Random, n: int) -> str:
    """Two large disjunctions (input boxes, output atoms): their product is the DNF."""
    boxes = " ".join(f"(and (>= X_0 {k}) (<= X_0 {k + rng.random()!r}) (>= X_1 -1) (<= X_1 {rng.choice(['0', '-0.0', '1'])}))"
                     for k in range(n))
    outs = " ".join(f"(and ({rng.choice(['<=', '>='])} Y_{k % 2} {rng.uniform(-1, 1)!r}))" for k in range(5))
    return _decls(2, 2) + f"(assert (or {boxes}))\n(assert (or {outs}))\n"


CASES = {
    "lindex": lambda rng: lindex_like(rng, 3000),
    "two-blocks": lambda rng: two_blocks(rng, 200),
    "mixed-fast": lambda rng: mixed(rng, 400, y_pairs=False),
    "mixed-general": lambda rng: mixed(rng, 400, y_pairs=True),
    "points": lambda rng: points_like(rng, 500, 12),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_equal_the_per_box_reading(case, dtype):
    text = CASES[case](random.Random(f"{case}"))
    props = parse_vnnlib(text, dtype=dtype)
    assert isinstance(props, VnnlibProperties)
    assert_same_boxes(props, per_box_reference(text, dtype))
    if case == "lindex":  # boxes with more disjuncts form further batches, interleaved with the first
        assert [b.C.shape[1] for b in props.batches][:2] == [2, 3]
        assert len(props.batches[0]) > len(props.batches[1]) > 0


@pytest.mark.parametrize("case", ["lindex", "mixed-fast", "points"])
def test_blocks_too_large_for_bulk_give_the_same_boxes(monkeypatch, case):
    """A disjunction with more clause bounds than ``_BLOCK_CELLS`` is read disjunct by disjunct."""
    text = CASES[case](random.Random(f"{case}"))
    monkeypatch.setattr(vl, "_BLOCK_CELLS", 0)
    assert_same_boxes(parse_vnnlib(text), per_box_reference(text, torch.float64))


def test_float32_batches_enclose_the_file_box():
    text = lindex_like(random.Random(1), 500)
    p64, p32 = parse_vnnlib(text), parse_vnnlib(text, dtype=torch.float32)
    for b64, b32 in zip(p64.batches, p32.batches):
        assert b32.input_lo.dtype == torch.float32
        assert (b32.input_lo.double() <= b64.input_lo).all() and (b32.input_hi.double() >= b64.input_hi).all()


# ---------------------------------------------------------------------------------------- the sequence view


def test_sequence_view():
    text = lindex_like(random.Random(2), 50)
    props = parse_vnnlib(text)
    n = len(props)
    assert n >= 50 and props and repr(props).startswith(f"VnnlibProperties({n} boxes")
    assert props.num_inputs == 1 and props.num_outputs == 1
    assert _bits(props[-1].input_lo) == _bits(props[n - 1].input_lo)
    assert [_bits(p.input_hi) for p in props[3:7]] == [_bits(props[i].input_hi) for i in range(3, 7)]
    with pytest.raises(IndexError):
        props[n]
    first, *_ = props
    assert isinstance(first, VnnlibProperty) and isinstance(first.spec, Linear)
    # a list of per-box properties batched again: the same batches
    again = VnnlibProperties.from_properties(list(props))
    assert VnnlibProperties.from_properties(props) is props
    assert_same_boxes(again, list(props))
    b = props.batches[0]
    assert isinstance(b, VnnlibBoxes)
    box, spec = b.box((1, 1), slice(2, 5)), b.spec(slice(2, 5))
    assert box.lo.shape == (3, 1, 1) and spec.C.shape == (3, 2, 1) and torch.equal(box.hi.reshape(3, 1), b.input_hi[2:5])


# ---------------------------------------------------------------------------------------- deadline


class _Clock:
    """A ``time`` stand-in whose ``perf_counter`` counts its calls (1, 2, ...)."""

    def __init__(self):
        self.calls = 0

    def perf_counter(self) -> float:
        self.calls += 1
        return float(self.calls)


@pytest.mark.parametrize("kind", ["statements", "fast-or", "general-or"])
def test_the_reader_looks_at_the_clock_often(monkeypatch, kind):
    """Every 256 statements or clauses, every 4,096 tokens (deterministic: a fake clock)."""
    n = 3000
    if kind == "statements":
        text = _decls(n, 1) + "".join(f"(assert (>= X_{i} 0))(assert (<= X_{i} 1))" for i in range(n)) + "(assert (<= Y_0 0))"
        steps = 2 * n
    else:
        other = "Y_0" if kind == "general-or" else "0.5"
        text = _decls(1, 2) + "(assert (or " + " ".join(f"(and (>= X_0 {k}) (<= X_0 {k + 1}) (<= Y_1 {other}))" for k in range(n)) + "))"
        steps = n
    expected = parse_vnnlib(text)
    clock = _Clock()
    monkeypatch.setattr(vl, "time", clock)
    got = parse_vnnlib(text, deadline=math.inf)
    assert clock.calls >= steps // 4096 + (steps // 256 if kind != "general-or" else 0)
    assert_same_boxes(got, list(expected))
    for stop in (1.5, clock.calls / 2, clock.calls - 0.5):  # the deadline passes before, during, at the end
        monkeypatch.setattr(vl, "time", _Clock())
        with pytest.raises(VnnlibTimeout, match="not read by the deadline"):
            parse_vnnlib(text, deadline=stop)


def test_a_past_deadline_stops_the_reading():
    text = lindex_like(random.Random(3), 10)
    with pytest.raises(VnnlibTimeout):
        parse_vnnlib(text, deadline=time.perf_counter() - 1)
    assert len(parse_vnnlib(text, deadline=time.perf_counter() + 600)) == len(parse_vnnlib(text))
    assert not issubclass(VnnlibTimeout, vl.VnnlibError)  # a timeout is no malformed file


# ---------------------------------------------------------------------------------------- shared data

NN4SYS = ["lindex_10000", "cardinality_0_500_128", "cardinality_0_1_128", "pensieve_parallel_0", "lindex_1"]


@pytest.mark.shared
@pytest.mark.parametrize("name", NN4SYS)
def test_nn4sys_batches_equal_the_per_box_reading(shared_dir, name):
    path = shared_dir / "benchmarks" / "vnncomp" / "2024" / "nn4sys_2023" / "vnnlib" / f"{name}.vnnlib.gz"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    text, _ = vl._text_of(path, None)  # comments blanked out
    props = parse_vnnlib(path)
    assert_same_boxes(props, per_box_reference(text, torch.float64))
    if name == "lindex_10000":
        assert len(props) == 10000 and len(props.batches) == 1 and props.batches[0].C.shape == (10000, 2, 1)


@pytest.mark.shared
def test_acasxu_prop_6_batches(shared_dir):
    path = shared_dir / "benchmarks" / "vnncomp" / "2021" / "acasxu" / "prop_6.vnnlib"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    props = parse_vnnlib(path, dtype=torch.float32)
    assert_same_boxes(props, per_box_reference(vl._text_of(path, None)[0], torch.float32))
    assert len(props) == 2 and len(props.batches) == 1
