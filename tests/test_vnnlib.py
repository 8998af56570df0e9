"""VNN-LIB parser: inline texts, every error path, and a semantic cross-check of the
translation against a direct evaluation of the formulas."""
from __future__ import annotations

import gzip
import random
import re

import numpy as np
import pytest
import torch

from verify.spec import Linear
from verify.vnnlib import (
    VnnlibError,
    format_counterexample,
    open_maybe_gz,
    parse_vnnlib,
    read_instances,
    write_counterexample,
)



def decls(n_in: int, n_out: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(n_out)
    )


def box(n_in: int, lo=-1.0, hi=1.0) -> str:
    return "".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n" for i in range(n_in))


def spec_rows(p) -> list[tuple[list[float], float, int]]:
    return [(c, d, g) for c, d, g in zip(p.spec.C.tolist(), p.spec.d.tolist(), p.spec.groups.tolist())]


# ----------------------------------------------------------------------------------------
# accepted inputs


def test_robustness_spec_or_of_ands():
    text = decls(2, 3) + box(2, 0, 1) + """
; label 1: violated if some other class is at least as large
(assert (or
    (and (>= Y_0 Y_1))
    (and (>= Y_2 Y_1))
))"""
    (p,) = parse_vnnlib(text)
    assert p.input_lo.tolist() == [0, 0] and p.input_hi.tolist() == [1, 1]
    assert p.input_lo.dtype == torch.float64
    assert isinstance(p.spec, Linear)
    # (>= Y_0 Y_1) is satisfied iff Y_1 - Y_0 <= 0
    assert spec_rows(p) == [([-1, 1, 0], 0, 0), ([0, 1, -1], 0, 1)]


def test_y_vs_y_and_y_vs_const_rows():
    text = decls(1, 3) + box(1) + "(assert (<= Y_0 Y_1))\n(assert (>= Y_0 3.5))\n(assert (<= Y_2 1))\n(assert (<= 2 Y_1))"
    (p,) = parse_vnnlib(text)
    # top-level asserts are conjoined: one group of four rows
    assert spec_rows(p) == [([1, -1, 0], 0, 0), ([-1, 0, 0], 3.5, 0), ([0, 0, 1], -1, 0), ([0, -1, 0], 2, 0)]


def test_comments_whitespace_tabs_and_numbers():
    text = """; header ( with a paren in a comment
(declare-const X_0 Real) ; trailing comment
(declare-const   X_1\tReal)
(declare-const Y_0 Real)
(assert(>= X_0 -1.5e-3));no space
(assert (<=\tX_0 .5))
(assert (>= X_1 (- 2)))
(assert (<= X_1 +1E2))
(assert (or (and (<= Y_0 -.25)(>= Y_0 -7.))))
"""
    (p,) = parse_vnnlib(text)
    assert p.input_lo.tolist() == [-1.5e-3, -2.0] and p.input_hi.tolist() == [0.5, 100.0]
    assert spec_rows(p) == [([1], 0.25, 0), ([-1], -7.0, 0)]


def test_repeated_bounds_intersect():
    text = decls(1, 1) + "(assert (>= X_0 -1))(assert (>= X_0 -0.5))(assert (<= X_0 2))(assert (<= X_0 1))(assert (<= Y_0 0))"
    (p,) = parse_vnnlib(text)
    assert p.input_lo.tolist() == [-0.5] and p.input_hi.tolist() == [1.0]


def test_or_of_bare_atoms_and_and_of_or():
    text = decls(1, 2) + box(1) + "(assert (or (<= Y_0 0) (>= Y_1 5)))"
    (p,) = parse_vnnlib(text)
    assert spec_rows(p) == [([1, 0], 0, 0), ([0, -1], 5, 1)]
    text = decls(1, 3) + box(1) + "(assert (and (or (<= Y_0 0) (<= Y_1 0)) (<= Y_2 0)))"
    (p,) = parse_vnnlib(text)
    # (a | b) & c = (a & c) | (b & c)
    assert spec_rows(p) == [([1, 0, 0], 0, 0), ([0, 0, 1], 0, 0), ([0, 1, 0], 0, 1), ([0, 0, 1], 0, 1)]


def test_two_top_level_ors_multiply_out():
    text = decls(1, 4) + box(1) + "(assert (or (<= Y_0 0) (<= Y_1 0)))(assert (or (<= Y_2 0) (<= Y_3 0)))"
    (p,) = parse_vnnlib(text)
    assert int(p.spec.groups.max()) + 1 == 4
    assert p.spec.C.shape == (8, 4)


def test_input_disjunction_gives_one_property_per_box():
    # ACAS Xu prop 6 style: an OR over two input regions, the output part shared
    text = decls(2, 2) + """
(assert (or
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
    (and (>= X_0 -1) (<= X_0 0) (>= X_1 0) (<= X_1 1))
))
(assert (or (and (<= Y_1 Y_0))))"""
    ps = parse_vnnlib(text)
    assert len(ps) == 2
    assert ps[0].input_lo.tolist() == [0, 0] and ps[0].input_hi.tolist() == [1, 1]
    assert ps[1].input_lo.tolist() == [-1, 0] and ps[1].input_hi.tolist() == [0, 1]
    for p in ps:
        assert spec_rows(p) == [([-1, 1], 0, 0)]


def test_disjuncts_with_same_box_share_a_property():
    text = decls(1, 2) + """
(assert (or
    (and (>= X_0 0) (<= X_0 1) (<= Y_0 0))
    (and (>= X_0 0) (<= X_0 1) (<= Y_1 0))
    (and (>= X_0 2) (<= X_0 3) (<= Y_1 0))
))"""
    ps = parse_vnnlib(text)
    assert len(ps) == 2
    assert spec_rows(ps[0]) == [([1, 0], 0, 0), ([0, 1], 0, 1)]
    assert ps[1].input_lo.tolist() == [2.0] and spec_rows(ps[1]) == [([0, 1], 0, 0)]


def test_disjunct_without_output_atom_is_never_provable():
    text = decls(1, 2) + box(1)  # no output constraint at all: every input violates
    (p,) = parse_vnnlib(text)
    assert spec_rows(p) == [([0, 0], 0, 0)]
    lin = p.spec.linear(1, 2, dtype=torch.float64)
    assert not lin.holds(torch.randn(1, 2)).item()
    text = decls(1, 2) + "(assert (or (and (>= X_0 0) (<= X_0 1)) (and (>= X_0 0) (<= X_0 1) (<= Y_0 0))))"
    (p,) = parse_vnnlib(text)
    assert spec_rows(p) == [([0, 0], 0, 0), ([1, 0], 0, 1)]


def test_equal_bounds_and_counts():
    text = decls(3, 1) + "(assert (>= X_0 0.25))(assert (<= X_0 0.25))" + box(3)[len(box(1)):] + "(assert (<= Y_0 0))"
    (p,) = parse_vnnlib(text, num_inputs=3, num_outputs=1)
    assert p.input_lo[0] == p.input_hi[0] == 0.25
    assert p.num_inputs == 3 and p.num_outputs == 1
    b = p.box((3, 1))
    assert b.lo.shape == (1, 3, 1)


def test_ignored_smtlib_commands():
    text = "(set-logic QF_LRA)\n" + decls(1, 1) + box(1) + "(assert (<= Y_0 0))\n(check-sat)\n(get-model)\n(exit)\n"
    (p,) = parse_vnnlib(text)
    assert spec_rows(p) == [([1], 0, 0)]


def test_float32_box_rounds_outward():
    text = decls(2, 1) + "(assert (>= X_0 0.1))(assert (<= X_0 0.1))(assert (>= X_1 -0.3))(assert (<= X_1 0.7))(assert (<= Y_0 0))"
    (p,) = parse_vnnlib(text, dtype=torch.float32)
    assert p.input_lo.dtype == torch.float32
    assert (p.input_lo.double() <= torch.tensor([0.1, -0.3], dtype=torch.float64)).all()
    assert (p.input_hi.double() >= torch.tensor([0.1, 0.7], dtype=torch.float64)).all()


def test_files_gz_and_bytes(tmp_path):
    text = decls(1, 1) + box(1) + "(assert (<= Y_0 0))"
    f = tmp_path / "a.vnnlib"
    f.write_text(text)
    g = tmp_path / "b.vnnlib.gz"
    g.write_bytes(gzip.compress(text.encode()))
    for src in (f, str(f), g, tmp_path / "b.vnnlib", text.encode()):
        (p,) = parse_vnnlib(src)
        assert spec_rows(p) == [([1], 0, 0)]
    assert open_maybe_gz(tmp_path / "b.vnnlib") == text
    assert open_maybe_gz(g, text=False) == text.encode()
    with pytest.raises(FileNotFoundError):
        open_maybe_gz(tmp_path / "missing.vnnlib")
    # errors name the file
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 zz))\n")
    with pytest.raises(VnnlibError, match=re.escape(f"{bad}:2:17: undeclared variable 'zz'")):
        parse_vnnlib(bad)


def test_read_instances(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "vnnlib").mkdir()
    (tmp_path / "onnx" / "n.onnx.gz").write_bytes(gzip.compress(b"x"))
    (tmp_path / "vnnlib" / "p.vnnlib").write_text("x")
    (tmp_path / "instances.csv").write_text("onnx/n.onnx,vnnlib/p.vnnlib,30\r\n\n./onnx/n.onnx , ./vnnlib/q.vnnlib,116.5")
    rows = read_instances(tmp_path / "instances.csv")
    assert rows == [
        (str(tmp_path / "onnx" / "n.onnx.gz"), str(tmp_path / "vnnlib" / "p.vnnlib"), 30.0),
        (str(tmp_path / "onnx" / "n.onnx.gz"), str(tmp_path / "vnnlib" / "q.vnnlib"), 116.5),
    ]
    (tmp_path / "bad.csv").write_text("a,b,30\na,b\n")
    with pytest.raises(VnnlibError, match=r"bad.csv:2:1: expected 3 fields"):
        read_instances(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("a,b,soon\n")
    with pytest.raises(VnnlibError, match=r"bad2.csv:1:1: timeout 'soon'"):
        read_instances(tmp_path / "bad2.csv")


def test_format_counterexample(tmp_path):
    s = format_counterexample(torch.tensor([0.1, -2.5e-07], dtype=torch.float64), [3.0])
    assert s == "((X_0 0.1)\n (X_1 -2.5e-07)\n (Y_0 3.0))\n"
    x32 = torch.tensor([0.1], dtype=torch.float32)
    assert format_counterexample(x32, np.array([[1.0]])) == f"((X_0 {float(x32[0])!r})\n (Y_0 1.0))\n"
    write_counterexample(tmp_path / "r.txt", [1.0, 2.0], torch.tensor([[0.5]]))
    assert (tmp_path / "r.txt").read_text() == "sat\n((X_0 1.0)\n (X_1 2.0)\n (Y_0 0.5))\n"
    with pytest.raises(ValueError):
        format_counterexample([float("nan")], [0.0])


# ----------------------------------------------------------------------------------------
# errors: each message carries file:line:col of the offending token

D = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"  # lines 1-2
B = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"  # lines 3-4


@pytest.mark.parametrize(
    "text, where, what",
    [
        (D + B + "(assert (<= X_1 0))", "5:13", "undeclared variable 'X_1'"),
        (D + B + "(assert (<= Y_0 1 2))", "5:10", "'<=' takes 2 operands, got 3"),
        (D + B + "(assert (<= Y_0))", "5:10", "'<=' takes 2 operands, got 1"),
        (D + B + "(assert (< Y_0 1))", "5:10", "unknown operator '<'"),
        (D + B + "(assert (or (= Y_0 1) (<= Y_0 2)))", "5:14", "unknown operator '='"),
        (D + B + "(assert (not (<= Y_0 1)))", "5:10", "unknown operator 'not'"),
        (D + B + "(assert (<= Y_0 1.2.3))", "5:17", "bad number '1.2.3'"),
        (D + B + "(assert (<= Y_0 -))", "5:17", "bad number '-'"),
        (D + B + "(assert (<= Y_0 1e999))", "5:17", "number '1e999' is out of range"),
        (D + B + "(assert (<= Y_0 (+ 1 2)))", "5:17", "unsupported term"),
        (D + B + "(assert (<= Y_0 1)", "5:1", "unbalanced '('"),
        (D + B + "(assert (or\n  (and (<= Y_0 1))\n", "5:9", "unbalanced '('"),
        (D + B + "(assert (<= Y_0 1)))", "5:20", "unbalanced ')'"),
        (D + B + "assert", "5:1", "expected '(' to start a command, got 'assert'"),
        (D + B + "(assert 1)", "5:9", "expected a formula '(...)', got '1'"),
        (D + B + "(assert ())", "5:9", "empty expression"),
        (D + B + "(assert ((<= Y_0 1)))", "5:9", "expected an operator"),
        (D + B + "(assert (and))", "5:10", "'and' needs at least one operand"),
        (D + B + "(assert (or))", "5:10", "'or' needs at least one operand"),
        (D + B + "(assert)", "5:2", "assert takes exactly one formula"),
        (D + B + "(assert (<= X_0 Y_0))", "5:10", "an input X may only be compared with a constant"),
        (D + B + "(assert (<= 1 2))", "5:10", "atom compares two constants"),
        (D + B + "(declare-fun f () Real)", "5:2", "unknown command 'declare-fun'"),
        (D + B + "(foo)", "5:2", "unknown command 'foo'"),
        (D + B + "(() 1)", "5:1", "expected a command"),
        (D + B + "(declare-const Y_0 Real)", "5:16", "Y_0 declared twice"),
        (D + B + "(declare-const Y_1 Int)", "5:20", "unsupported sort 'Int'"),
        (D + B + "(declare-const Z Real)", "5:16", "unsupported variable name 'Z'"),
        (D + B + "(declare-const X_01 Real)", "5:16", "unsupported variable name 'X_01'"),
        (D + B + "(declare-const X_1)", "5:2", "declare-const takes a name and a sort"),
        (D + B + "(declare-const X_2 Real)\n(assert (>= X_2 0))(assert (<= X_2 0))", "5:16", "X_2 declared but X_1 is not"),
        (D + "(assert (>= X_0 0))", "1:16", "X_0 has no upper bound"),
        (D + "(assert (<= X_0 0))", "1:16", "X_0 has no lower bound"),
        (D, "1:16", "X_0 has no lower and upper bound"),
        (D + "(assert (>= X_0 1))\n(assert (<= X_0 0))", "4:10", "empty input box: X_0 >= 1.0 and X_0 <= 0.0"),
        ("(declare-const Y_0 Real)\n(assert (<= Y_0 0))", "2:20", "no input variables"),
        (D + "(assert (or (and (>= X_0 0) (<= X_0 1)) (and (>= X_0 2))))", "1:16", "X_0 has no upper bound (in the disjunct whose input bounds start at line 3, col 47)"),
        (D + B + "(assert (or (and (>= X_0 2) (<= Y_0 0)) (and (<= Y_0 1))))", "5:19", "empty input box: X_0 >= 2.0 and X_0 <= 1.0 (in the disjunct"),
    ],
)
def test_errors(text, where, what):
    with pytest.raises(VnnlibError) as info:
        parse_vnnlib(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"<string>:{where}: "), msg
    assert what in msg, msg


def test_count_mismatch_errors():
    text = decls(2, 3) + box(2) + "(assert (<= Y_0 0))"
    with pytest.raises(VnnlibError, match=r"<string>:2:16: the file declares 2 inputs but the network has 5"):
        parse_vnnlib(text, num_inputs=5)
    with pytest.raises(VnnlibError, match=r"<string>:5:16: the file declares 3 outputs but the network has 2"):
        parse_vnnlib(text, num_outputs=2)


def test_dnf_blowup_is_refused():
    n = 20  # 2**20 > 1,000,000 disjuncts
    text = decls(1, 2) + box(1) + "(assert (and " + " ".join("(or (<= Y_0 0) (<= Y_1 0))" for _ in range(n)) + "))"
    with pytest.raises(VnnlibError, match="more than 1000000 disjuncts"):
        parse_vnnlib(text)


def test_error_is_a_value_error():
    assert issubclass(VnnlibError, ValueError)


# ----------------------------------------------------------------------------------------
# semantics: the LinearSpec reading equals a direct evaluation of the formula


def _sexprs(text: str):
    """A tiny independent reader: text -> list of nested Python lists of strings."""
    toks = re.sub(r";[^\n]*", "", text).replace("(", " ( ").replace(")", " ) ").split()
    stack = [[]]
    for t in toks:
        if t == "(":
            stack.append([])
        elif t == ")":
            e = stack.pop()
            stack[-1].append(e)
        else:
            stack[-1].append(t)
    return stack[0]


def _eval(f, env) -> bool:
    op, *args = f
    if op == "and":
        return all(_eval(a, env) for a in args)
    if op == "or":
        return any(_eval(a, env) for a in args)
    a, b = (env[t] if t in env else float(t) for t in args)
    return a <= b if op == "<=" else a >= b


def _violates(text: str, x, y) -> bool:
    env = {f"X_{i}": v for i, v in enumerate(x)} | {f"Y_{j}": v for j, v in enumerate(y)}
    return all(_eval(e[1], env) for e in _sexprs(text) if e[0] == "assert")


def _random_formula(rng: random.Random, n_in: int, n_out: int, depth: int) -> str:
    vals = ["0", "0.5", "-0.5", "1"]
    if depth == 0 or rng.random() < 0.3:
        if rng.random() < 0.25:  # input atom that tightens the [-1, 1] box but never empties it
            i = rng.randrange(n_in)
            return rng.choice([f"(<= X_{i} {rng.choice(['0', '0.5'])})", f"(>= X_{i} {rng.choice(['0', '-0.5'])})", f"(<= -0.5 X_{i})"])
        a = f"Y_{rng.randrange(n_out)}"
        b = rng.choice([f"Y_{rng.randrange(n_out)}", rng.choice(vals)])
        a, b = (a, b) if rng.random() < 0.7 else (b, a)
        return f"({rng.choice(['<=', '>='])} {a} {b})"
    op = rng.choice(["and", "or"])
    return f"({op} " + " ".join(_random_formula(rng, n_in, n_out, depth - 1) for _ in range(rng.randint(1, 3))) + ")"


def test_semantics_random_formulas():
    rng = random.Random(0)
    grid = [-1.0, -0.5, 0.0, 0.5, 1.0]  # hits equalities often
    for trial in range(150):
        n_in, n_out = rng.randint(1, 3), rng.randint(1, 4)
        body = "".join(f"(assert {_random_formula(rng, n_in, n_out, 3)})\n" for _ in range(rng.randint(1, 3)))
        text = decls(n_in, n_out) + box(n_in) + body
        props = parse_vnnlib(text)
        specs = [p.spec.linear(1, n_out, dtype=torch.float64) for p in props]
        for _ in range(40):
            x = [rng.choice(grid) for _ in range(n_in)]
            y = [rng.choice(grid) for _ in range(n_out)]
            ref = _violates(text, x, y)
            xt, yt = torch.tensor(x), torch.tensor(y).unsqueeze(0)
            ours = any(
                bool(((xt >= p.input_lo) & (xt <= p.input_hi)).all()) and not bool(s.holds(yt).item()) for p, s in zip(props, specs)
            )
            assert ours == ref, (text, x, y)


def test_semantics_matches_violation_margin():
    text = decls(1, 3) + box(1) + "(assert (or (and (<= Y_0 Y_1) (>= Y_2 0.5)) (<= Y_1 -1)))"
    (p,) = parse_vnnlib(text)
    s = p.spec.linear(1, 3, dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.75]])  # first disjunct satisfied
    assert s.violation_margin(y).item() <= 0 and not s.holds(y).item()
    y = torch.tensor([[2.0, 1.0, 0.75]])
    assert s.violation_margin(y).item() > 0 and s.holds(y).item()


@pytest.mark.parametrize("odd_atom", ["", " (<= Y_0 Y_1)", " (>= X_0 -inf)", " (>= X_0 1e999)"])
def test_clause_by_clause_path_equals_the_general_parser(odd_atom):
    """Large ``(assert (or (and ...) ...))`` blocks (nn4sys: 1.3 million atoms) are matched clause
    by clause; the properties are those of the general parser, and a clause it does not take
    (a Y-Y atom, a non-finite number) sends the whole assert to the general parser."""
    import verify.vnnlib as vl

    rng = np.random.default_rng(5)
    clauses = []
    for k in range(40):
        lo = [float(v) for v in rng.uniform(-2, 2, 2).round(4)]
        atoms = f"(>= X_0 {lo[0]!r}) (<= X_0 {lo[0] + 0.5!r}) (>= X_1 {lo[1]:.3e}) (<= X_1 {lo[1] + 1!r}) "
        atoms += f"(<= Y_{k % 2} {float(rng.normal()):.6f})" if k % 3 else f"(>= Y_1 -{abs(float(rng.normal()))!r})"
        clauses.append(f"(and {atoms}{odd_atom if k == 7 else ''})")
    text = decls(2, 2) + "(assert (or\n  " + "\n  ".join(clauses) + "))\n"
    if "inf" in odd_atom or "999" in odd_atom:  # the general parser's error, at the atom
        with pytest.raises(VnnlibError, match=r"<string>:13:\d+: (bad number '-inf'|number '1e999' is out of range)"):
            parse_vnnlib(text)
        return
    fast, general = vl._Parser(text, "t"), vl._Parser(text, "t", fast=False)
    fast.run(), general.run()
    assert fast.used_fast == (odd_atom == "")
    a, b = fast.properties(None, None, torch.float64), general.properties(None, None, torch.float64)
    assert len(a) == len(b) == 40
    for p, q in zip(a, b):
        assert torch.equal(p.input_lo, q.input_lo) and torch.equal(p.input_hi, q.input_hi)
        assert torch.equal(p.spec.C, q.spec.C) and torch.equal(p.spec.d, q.spec.d) and torch.equal(p.spec.groups, q.spec.groups)
