"""VNN-LIB 1.0 reader (as used in VNN-COMP) and the competition's counterexample format.

A VNN-LIB file describes the **violation** of a property: ``sat`` means some input in the
input set drives the network into the described output region (a counterexample exists).

Grammar accepted (SMT-LIB syntax, ``;`` starts a comment)::

    (declare-const X_<i> Real)            inputs  X_0 .. X_{n-1} (flattened row-major)
    (declare-const Y_<j> Real)            outputs Y_0 .. Y_{m-1}
    (assert <formula>)                    top-level asserts are conjoined
    <formula> := (<= t t) | (>= t t) | (and <formula>+) | (or <formula>+)
    <t>       := X_i | Y_j | <number> | (- <number>)

Atoms compare a ``Y`` with a constant or another ``Y`` (output constraints), or an ``X``
with a constant (input bounds). ``and``/``or`` may nest arbitrarily; the whole conjunction
is brought to disjunctive normal form (DNF). Input bounds may appear inside disjuncts
(ACAS Xu prop 6 has an OR over two input regions): the result is one
:class:`VnnlibProperty` per distinct input box, holding the disjuncts whose input part gives
that box. The SMT-LIB commands ``set-logic``, ``set-info``, ``set-option``, ``check-sat``,
``get-model`` and ``exit`` are accepted and ignored.

Files with many boxes (nn4sys: up to 60,000) are read into batches: the boxes whose specs have
the same rows per group share one :class:`VnnlibBoxes` (bounds ``[M, n_in]``, ``C [M, N, n_out]``,
``d [M, N]``), built in bulk. :func:`parse_vnnlib` returns them as :class:`VnnlibProperties`, a
sequence of per-box :class:`VnnlibProperty` made when asked for. An optional deadline stops the
reading (:class:`VnnlibTimeout`).

Translation to :class:`verify.spec.Linear` (see the conventions in ``verify/spec.py``):
each violation disjunct is one **group**, each output atom in it one **row** ``C_i y + d_i``
written so that "atom satisfied" <=> "row <= 0":

=================  =================  =====================
atom               row                C_i, d_i
=================  =================  =====================
``(<= Y_0 Y_1)``   ``Y_0 - Y_1``      ``e_0 - e_1``, 0
``(>= Y_0 3.5)``   ``3.5 - Y_0``      ``-e_0``, 3.5
``(<= Y_2 1)``     ``Y_2 - 1``        ``e_2``, -1
=================  =================  =====================

The property then holds iff every group has a row ``> 0``. Atoms are non-strict, so a
point with a row exactly 0 counts as a violation, and proving ``row > 0`` is what soundness
asks. A disjunct without output atoms means every point of its box violates: it becomes a
group with one row ``C = 0, d = 0``, which no method can prove (and any point of the box is
a counterexample).

Every ``X_i`` must end with a finite lower and upper bound in every box, and no box may be
empty; malformed input raises :class:`VnnlibError` with ``file:line:col`` of the offending
token. Parsing is regex-driven: the statements that make up nearly all of real files
(``(declare-const ...)`` and ``(assert (<= X_i c))``) are matched whole, only nested
formulas go through the general s-expression reader. A large ``(assert (or (and ATOM ...)
...))`` whose atoms all compare a variable with a number (nn4sys: 1.3 million atoms) is read
into arrays, and when it is the file's only disjunction its boxes and specs are built from
them in bulk (the same boxes, order and rows as the general path, which a file with an error
goes through for the error's position).
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from .spec import Box, Linear

__all__ = [
    "VnnlibError",
    "VnnlibTimeout",
    "VnnlibProperty",
    "VnnlibBoxes",
    "VnnlibProperties",
    "parse_vnnlib",
    "read_instances",
    "open_maybe_gz",
    "resolve_maybe_gz",
    "format_counterexample",
    "write_counterexample",
]

#: a DNF larger than this (after multiplying out nested and/or) is refused (nn4sys' lindex_60000
#: has 120,000 disjuncts)
MAX_DISJUNCTS = 1_000_000

_IGNORED_COMMANDS = frozenset({"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"})

_TOK = r"[^\s()]+"
_WS = re.compile(r"\s*")
_COMMENT = re.compile(r";[^\n]*")
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")
_IDENT_START = re.compile(r"[A-Za-z_]")
_TOKEN = re.compile(r"\s*(?:(\()|(\))|(" + _TOK + "))")
# whole statements matched in one go (the fast path; the same handlers as the general path)
_FAST_DECL = re.compile(r"\(\s*declare-const\s+(" + _TOK + r")\s+(" + _TOK + r")\s*\)")
_FAST_ATOM = re.compile(r"\(\s*assert\s*\(\s*(<=|>=)\s+(" + _TOK + r")\s+(" + _TOK + r")\s*\)\s*\)")
# (assert (or (and ATOM ...) ...)) with plain atoms: the clauses matched one by one, their atoms
# found in C (nn4sys: 1.3 million atoms in one assert)
_FAST_OR_HEAD = re.compile(r"\(\s*assert\s*\(\s*or\b")
_PLAIN_ATOM = r"\(\s*(?:<=|>=)\s+" + _TOK + r"\s+" + _TOK + r"\s*\)"
_FAST_CLAUSE = re.compile(r"\s*\(\s*and((?:\s*" + _PLAIN_ATOM + r")+)\s*\)")
_ATOM_PARTS = re.compile(r"\(\s*(<=|>=)\s+(" + _TOK + r")\s+(" + _TOK + r")\s*\)")
_CLOSE2 = re.compile(r"\s*\)\s*\)")
_NUM_START = frozenset("0123456789+-.")


def _skip_ws(text: str, pos: int) -> int:
    """The position after the whitespace at ``pos`` (``\\s*`` always matches)."""
    m = _WS.match(text, pos)
    assert m is not None
    return m.end()


class VnnlibError(ValueError):
    """Malformed or unsupported VNN-LIB; the message is ``"<file>:<line>:<col>: <what>"``."""


class VnnlibTimeout(TimeoutError):
    """The file was not read by the deadline given to :func:`parse_vnnlib`."""


@dataclass
class VnnlibProperty:
    """One input box and the output violation it is paired with.

    Attributes:
        input_lo, input_hi: ``[n_in]`` bounds of the flattened input ``X`` (finite,
            ``lo <= hi``).
        spec: :class:`verify.spec.Linear` with ``C [N, n_out]``, ``d [N]``, ``groups [N]``:
            the property holds iff every group has a row with ``C_i y + d_i > 0``.
    """

    input_lo: Tensor
    input_hi: Tensor
    spec: Linear

    @property
    def num_inputs(self) -> int:
        return self.input_lo.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.spec.C.shape[-1]

    def box(self, shape: Sequence[int] | None = None) -> Box:
        """The input set as a batch-of-one :class:`Box` ``[1, *shape]`` (``shape``
        defaults to ``[n_in]``; row-major, as VNN-LIB numbers the inputs)."""
        shape = tuple(shape) if shape is not None else (self.num_inputs,)
        return Box(self.input_lo.reshape(1, *shape), self.input_hi.reshape(1, *shape))


@dataclass
class VnnlibBoxes:
    """The boxes of one file whose specs have the same rows per group, held as one batch.

    Attributes:
        input_lo, input_hi: ``[M, n_in]`` bounds of the ``M`` boxes (finite, ``lo <= hi``).
        C: ``[M, N, n_out]`` and ``d``: ``[M, N]``, the rows of each box's spec.
        groups: ``[N]`` group of each row (the same for every box of the batch).
        index: ``[M]`` long, each box's number in the file (order of first appearance).

    Box ``m`` is :class:`VnnlibProperty` ``(input_lo[m], input_hi[m], Linear(C[m], d[m], groups))``.
    """

    input_lo: Tensor
    input_hi: Tensor
    C: Tensor
    d: Tensor
    groups: Tensor
    index: Tensor

    def __len__(self) -> int:
        return self.input_lo.shape[0]

    @property
    def num_inputs(self) -> int:
        return self.input_lo.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.C.shape[-1]

    def box(self, shape: Sequence[int] | None = None, rows: slice = slice(None)) -> Box:
        """Boxes ``rows`` of the batch as one :class:`Box` ``[m, *shape]`` (``shape`` defaults to
        ``[n_in]``)."""
        shape = tuple(shape) if shape is not None else (self.num_inputs,)
        lo, hi = self.input_lo[rows], self.input_hi[rows]
        return Box(lo.reshape(lo.shape[0], *shape), hi.reshape(hi.shape[0], *shape))

    def spec(self, rows: slice = slice(None)) -> Linear:
        """The specs of boxes ``rows`` as one batched :class:`Linear` (``C [m, N, n_out]``)."""
        return Linear(self.C[rows], self.d[rows], self.groups)

    def property(self, m: int) -> VnnlibProperty:
        """Box ``m`` of the batch (``0 <= m < M``) with its own :class:`Linear`."""
        return VnnlibProperty(self.input_lo[m], self.input_hi[m], Linear(self.C[m], self.d[m], self.groups))


class VnnlibProperties(Sequence[VnnlibProperty]):
    """All boxes of a file, read-only: a sequence of :class:`VnnlibProperty` in order of first
    appearance, built one at a time when asked for, over :attr:`batches` (one
    :class:`VnnlibBoxes` per row structure of the spec) that bulk users read directly."""

    def __init__(self, batches: Sequence[VnnlibBoxes]):
        self.batches = list(batches)
        n = sum(len(b) for b in self.batches)
        self._batch = np.zeros(n, dtype=np.int64)  # box number -> (batch, row in it)
        self._row = np.zeros(n, dtype=np.int64)
        for k, b in enumerate(self.batches):
            idx = b.index.numpy()
            self._batch[idx] = k
            self._row[idx] = np.arange(len(b))

    @classmethod
    def from_properties(cls, props: Sequence[VnnlibProperty]) -> VnnlibProperties:
        """Batch per-box properties (boxes with the same ``C`` shape and ``groups`` together)."""
        if isinstance(props, VnnlibProperties):
            return props
        rows = [_rows(p.spec) for p in props]
        same: dict[tuple, list[int]] = {}
        for i, (C, _, g) in enumerate(rows):
            same.setdefault((tuple(C.shape), tuple(g.tolist())), []).append(i)
        batches = []
        for idx in same.values():
            C, d, g = (torch.stack(t) for t in zip(*(rows[i] for i in idx)))
            batches.append(VnnlibBoxes(torch.stack([props[i].input_lo for i in idx]), torch.stack([props[i].input_hi for i in idx]),
                                       C, d, g[0], torch.tensor(idx, dtype=torch.long)))
        return cls(batches)

    def __len__(self) -> int:
        return len(self._batch)

    @overload
    def __getitem__(self, i: int) -> VnnlibProperty: ...

    @overload
    def __getitem__(self, i: slice) -> list[VnnlibProperty]: ...

    def __getitem__(self, i: int | slice) -> VnnlibProperty | list[VnnlibProperty]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = range(len(self))[i]  # IndexError, negative indices
        return self.batches[self._batch[k]].property(int(self._row[k]))

    def __iter__(self) -> Iterator[VnnlibProperty]:
        return (self[k] for k in range(len(self)))

    def __repr__(self) -> str:
        return f"VnnlibProperties({len(self)} boxes in {len(self.batches)} batches)"

    @property
    def num_inputs(self) -> int:
        return self.batches[0].num_inputs

    @property
    def num_outputs(self) -> int:
        return self.batches[0].num_outputs


def _rows(spec: Linear) -> tuple[Tensor, Tensor, Tensor]:
    """``C [N, n_out]``, ``d [N]``, ``groups [N]`` of a per-box spec."""
    assert spec.d is not None and spec.groups is not None  # set by Linear.__post_init__
    return spec.C, spec.d, spec.groups


# ----------------------------------------------------------------------------------------
# files


def resolve_maybe_gz(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else ``path + ".gz"`` if that exists, else ``path`` unchanged."""
    p = Path(path)
    if not p.exists():
        gz = p.with_name(p.name + ".gz")
        if gz.exists():
            return gz
    return p


@overload
def open_maybe_gz(path: str | os.PathLike, *, text: Literal[True] = True) -> str: ...


@overload
def open_maybe_gz(path: str | os.PathLike, *, text: Literal[False]) -> bytes: ...


def open_maybe_gz(path: str | os.PathLike, *, text: bool = True) -> str | bytes:
    """Contents of ``x`` or, when only it exists, ``x.gz`` (gzip detected by its magic bytes).

    Returns ``str`` (UTF-8) with ``text=True``, else ``bytes`` (e.g. for ``.onnx``).
    """
    p = resolve_maybe_gz(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (nor {Path(path).name}.gz)") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8-sig") if text else data


def read_instances(csv_path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """Rows ``(onnx_path, vnnlib_path, timeout_s)`` of a VNN-COMP ``instances.csv``.

    Relative paths are resolved against the csv's folder; where only ``x.gz`` exists, that
    path is returned. Blank lines, a missing trailing newline (the 2021 mnistfc list) and
    CRLF endings are handled.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    text = open_maybe_gz(csv_path)
    rows: list[tuple[str, str, float]] = []
    for lineno, rec in enumerate(csv.reader(io.StringIO(text)), start=1):
        rec = [f.strip() for f in rec]
        if not any(rec):
            continue
        if len(rec) != 3:
            raise VnnlibError(f"{csv_path}:{lineno}:1: expected 3 fields (onnx, vnnlib, timeout), got {len(rec)}")
        try:
            timeout = float(rec[2])
        except ValueError:
            raise VnnlibError(f"{csv_path}:{lineno}:1: timeout {rec[2]!r} is not a number") from None
        onnx, spec = (str(resolve_maybe_gz(os.path.normpath(base / f))) for f in rec[:2])
        rows.append((onnx, spec, timeout))
    return rows


# ----------------------------------------------------------------------------------------
# counterexamples


def format_counterexample(x: Sequence[float] | Tensor | np.ndarray, y: Sequence[float] | Tensor | np.ndarray) -> str:
    """VNN-COMP counterexample block ``((X_0 v)\\n (X_1 v)\\n ... (Y_0 v)\\n ...)`` + newline.

    ``x`` and ``y`` are flattened row-major; values are written with ``repr(float)``
    (shortest string that round-trips the float64 value).
    """
    xs = _flat_floats(x)
    ys = _flat_floats(y)
    items = [f"(X_{i} {v!r})" for i, v in enumerate(xs)] + [f"(Y_{j} {v!r})" for j, v in enumerate(ys)]
    return "(" + "\n ".join(items) + ")\n"


def write_counterexample(path: str | os.PathLike, x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> None:
    """Write a complete VNN-COMP result file: ``sat`` on line 1, then
    :func:`format_counterexample`."""
    Path(path).write_text("sat\n" + format_counterexample(x, y))


def _flat_floats(v) -> list[float]:
    if isinstance(v, Tensor):
        v = v.detach().cpu().double().numpy()
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError("counterexample contains a non-finite value")
    return [float(t) for t in a]


# ----------------------------------------------------------------------------------------
# parser


class _SList(list):
    """A parenthesised list of nodes; ``pos`` is the offset of its ``(``. Tokens are
    ``(str, offset)`` tuples."""

    __slots__ = ("pos",)

    def __init__(self, pos: int):
        super().__init__()
        self.pos = pos


# atoms: ("X", var_index, is_upper, value, pos) ; ("Y", ((j, coef), ...), d, pos)


@dataclass
class _Block:
    """The ``D`` clauses of a large ``(assert (or (and ATOM ...) ...))`` whose ``A`` atoms all
    compare a variable with a number, as arrays (:meth:`_Parser.fast_or`).

    Attributes:
        clause: ``[A]`` clause of each atom (non-decreasing: the atoms in file order).
        is_x, var, upper, val: ``[A]`` input atom?, the variable's index, ``<=``?, the number.
        pos: ``[D]`` offset of each clause's atoms (the position its atoms report).
    """

    clause: np.ndarray
    is_x: np.ndarray
    var: np.ndarray
    upper: np.ndarray
    val: np.ndarray
    pos: np.ndarray

    def __len__(self) -> int:
        return len(self.pos)

    def dnf(self) -> list[list[tuple]]:
        """The clauses as atom lists (the tuples :meth:`_Parser.atom` gives)."""
        where = self.pos[self.clause].tolist()
        atoms = [("X", i, u, v, w) if x else (("Y", ((i, 1.0),), -v, w) if u else ("Y", ((i, -1.0),), v, w))
                 for x, i, u, v, w in zip(self.is_x.tolist(), self.var.tolist(), self.upper.tolist(), self.val.tolist(), where)]
        ends = np.cumsum(np.bincount(self.clause, minlength=len(self))).tolist()
        return [atoms[a:b] for a, b in zip([0] + ends[:-1], ends)]


class _Parser:
    def __init__(self, text: str, name: str, fast: bool = True, deadline: float | None = None):
        self.text = text
        self.name = name
        self.deadline = deadline  # time.perf_counter() value; checked every few thousand steps
        self.fast = fast  # clause-by-clause matching of large (or (and ...)) asserts
        self.used_fast = False
        self.decl: dict[str, tuple[str, int]] = {}  # "X_3" -> ("X", 3)
        self.codes: dict[str, int] = {}  # "X_3" -> 3, "Y_2" -> -3 (the fast path's lookup)
        self.decl_pos: dict[tuple[str, int], int] = {}
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.lo_pos: list[int] = []
        self.hi_pos: list[int] = []
        self.top_rows: list[tuple] = []  # Y atoms asserted at top level (in every disjunct)
        # (DNF, pos) of the multi-disjunct asserts; large plain ones as a _Block
        self.complex: list[tuple[list[list[tuple]] | _Block, int]] = []

    # -- errors ---------------------------------------------------------------------------
    def line_col(self, pos: int) -> tuple[int, int]:
        """1-based line and column of the character at offset ``pos``."""
        t = self.text
        pos = max(0, min(pos, len(t)))
        return t.count("\n", 0, pos) + 1, pos - (t.rfind("\n", 0, pos) + 1) + 1

    def error(self, pos: int, what: str) -> VnnlibError:
        line, col = self.line_col(pos)
        return VnnlibError(f"{self.name}:{line}:{col}: {what}")

    def check_time(self) -> None:
        """Raise :class:`VnnlibTimeout` once the deadline has passed."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise VnnlibTimeout(f"{self.name}: not read by the deadline")

    # -- statements -----------------------------------------------------------------------
    def run(self) -> None:
        text, n = self.text, len(self.text)
        pos = _skip_ws(text, 0)
        fast_decl, fast_atom, ws = _FAST_DECL.match, _FAST_ATOM.match, _skip_ws
        count = 0
        while pos < n:
            count += 1
            if not count & 255:
                self.check_time()
            c = text[pos]
            if c != "(":
                if c == ")":
                    raise self.error(pos, "unbalanced ')'")
                tok_m = re.match(_TOK, text[pos:pos + 40])
                assert tok_m is not None  # text[pos] is neither whitespace nor a bracket
                raise self.error(pos, f"expected '(' to start a command, got {tok_m.group(0)!r}")
            end = self.fast_or(pos) if self.fast and text.startswith("(assert", pos) else None
            if end is not None:
                pos = ws(text, end)
                continue
            m = fast_atom(text, pos)
            if m is not None:
                atom = self.atom(m.group(1), (m.group(2), m.start(2)), (m.group(3), m.start(3)), m.start(1))
                self.add_top_atom(atom)
            else:
                m = fast_decl(text, pos)
                if m is not None:
                    self.declare((m.group(1), m.start(1)), (m.group(2), m.start(2)))
                else:
                    node, end = self.read_sexpr(pos)
                    self.command(node)
                    pos = ws(text, end)
                    continue
            pos = ws(text, m.end())

    def fast_or(self, pos: int) -> int | None:
        """``(assert (or (and ATOM ...) ...))`` whose atoms compare a declared variable with a
        finite number: the clauses matched one by one with regular expressions, their atoms read
        256 clauses at a time into a :class:`_Block`; returns the end offset, or None (anything
        else: the general path parses it and reports errors)."""
        text = self.text
        m = _FAST_OR_HEAD.match(text, pos)
        if m is None:
            return None
        starts: list[int] = []  # offset of each clause's atoms, and how many it has
        counts: list[int] = []
        parts: list[tuple[np.ndarray, ...]] = []  # the atoms of clauses 0 .. done - 1
        done = 0
        match, count = _FAST_CLAUSE.match, text.count
        p = m.end()
        while True:
            c = match(text, p)
            if c is None:
                break
            starts.append(c.start(1))
            counts.append(count("(", c.start(1), c.end(1)))  # one '(' per atom: tokens hold none
            p = c.end()
            if len(starts) > MAX_DISJUNCTS:
                return None
            if len(starts) - done == 256:
                if not self.read_atoms(parts, text, starts[done], p, sum(counts[done:])):
                    return None
                done = len(starts)
                self.check_time()
        close = _CLOSE2.match(text, p)
        if close is None or not starts:
            return None
        if done < len(starts) and not self.read_atoms(parts, text, starts[done], p, sum(counts[done:])):
            return None
        code, upper, val = (np.concatenate(a) for a in zip(*parts))
        clause = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        block = _Block(clause, code >= 0, np.where(code >= 0, code, -1 - code), upper, val, np.array(starts, dtype=np.int64))
        self.used_fast = True
        if len(block) == 1:
            for atom in block.dnf()[0]:
                self.add_top_atom(atom)
        else:
            self.complex.append((block, pos))
        return close.end()

    def read_atoms(self, parts: list[tuple[np.ndarray, ...]], text: str, start: int, end: int, n: int) -> bool:
        """Append the ``n`` atoms ``(op VAR NUM)`` of ``text[start:end]`` to ``parts`` as arrays
        ``[n]``: the variable (``X_i``: ``i``, ``Y_j``: ``-1 - j``), whether ``op`` is ``<=``, the
        number; False if there are not ``n`` or one is anything else."""
        found = _ATOM_PARTS.findall(text, start, end)
        if len(found) != n:
            return False
        if len(self.codes) != len(self.decl):
            self.codes = {k: i if kind == "X" else -1 - i for k, (kind, i) in self.decl.items()}
        get = self.codes.get
        code = [get(a) for _, a, _ in found]
        # what float() takes beyond SMT numbers: inf, nan, 1_0
        if None in code or not all(b[0] in _NUM_START and "_" not in b for _, _, b in found):
            return False
        try:
            val = np.array([float(b) for _, _, b in found], dtype=np.float64)
        except ValueError:
            return False
        if not np.isfinite(val).all():
            return False
        parts.append((np.array(code, dtype=np.int64), np.array([op == "<=" for op, _, _ in found], dtype=bool), val))
        return True

    def read_sexpr(self, pos: int) -> tuple[_SList, int]:
        """Read the s-expression whose ``(`` is at ``pos``; returns it and the end offset."""
        text = self.text
        tok = _TOKEN.match
        stack: list[_SList] = []
        count = 0
        while True:
            count += 1
            if not count & 4095:
                self.check_time()
            m = tok(text, pos)
            if m is None:  # only whitespace left
                raise self.error(stack[-1].pos, "unbalanced '(': not closed before the end of the file")
            pos = m.end()
            if m.group(1):
                lst = _SList(m.start(1))
                if stack:
                    stack[-1].append(lst)
                stack.append(lst)
            elif m.group(2):
                done = stack.pop()
                if not stack:
                    return done, pos
            else:
                stack[-1].append((m.group(3), m.start(3)))

    def command(self, node: _SList) -> None:
        if not node or not isinstance(node[0], tuple):
            raise self.error(node.pos, "expected a command such as (declare-const ...) or (assert ...)")
        head, hpos = node[0]
        if head == "declare-const":
            if len(node) != 3 or not all(isinstance(a, tuple) for a in node[1:]):
                raise self.error(hpos, "declare-const takes a name and a sort: (declare-const X_0 Real)")
            self.declare(node[1], node[2])
        elif head == "assert":
            if len(node) != 2:
                raise self.error(hpos, f"assert takes exactly one formula, got {len(node) - 1}")
            dnf = self.dnf(node[1])
            if len(dnf) == 1:
                for atom in dnf[0]:
                    self.add_top_atom(atom)
            else:
                self.complex.append((dnf, node.pos))
        elif head in _IGNORED_COMMANDS:
            pass
        else:
            raise self.error(hpos, f"unknown command {head!r}")

    def declare(self, name_tok: tuple[str, int], sort_tok: tuple[str, int]) -> None:
        name, npos = name_tok
        sort, spos = sort_tok
        m = _VAR.fullmatch(name)
        if m is None:
            raise self.error(npos, f"unsupported variable name {name!r}: VNN-LIB names inputs X_<i> and outputs Y_<j>")
        if sort != "Real":
            raise self.error(spos, f"unsupported sort {sort!r} for {name}: only Real")
        if name in self.decl:
            raise self.error(npos, f"{name} declared twice")
        kind, idx = m.group(1), int(m.group(2))
        self.decl[name] = (kind, idx)
        self.decl_pos[(kind, idx)] = npos
        if kind == "X" and idx >= len(self.lo):
            grow = idx + 1 - len(self.lo)
            self.lo += [-math.inf] * grow
            self.hi += [math.inf] * grow
            self.lo_pos += [-1] * grow
            self.hi_pos += [-1] * grow

    # -- formulas -------------------------------------------------------------------------
    def term(self, node) -> tuple:
        """A comparison operand: ("X", i) / ("Y", j) / ("c", value)."""
        if isinstance(node, tuple):
            s, pos = node
            v = self.decl.get(s)
            if v is not None:
                return v
            if _NUM.fullmatch(s):
                x = float(s)
                if not math.isfinite(x):
                    raise self.error(pos, f"number {s!r} is out of range")
                return ("c", x)
            if _IDENT_START.match(s):
                raise self.error(pos, f"undeclared variable {s!r}")
            raise self.error(pos, f"bad number {s!r}")
        if len(node) == 2 and isinstance(node[0], tuple) and node[0][0] == "-" and isinstance(node[1], tuple):
            k, val = self.term(node[1])
            if k == "c":  # SMT-LIB's negative literal (- 1.5)
                return ("c", -val)
        raise self.error(node.pos, "unsupported term: operands must be variables or numbers")

    def atom(self, op: str, a_node, b_node, op_pos: int) -> tuple:
        """The atom ``(op a b)`` normalised to ``p <= q``."""
        a, b = self.term(a_node), self.term(b_node)
        p, q = (a, b) if op == "<=" else (b, a)
        kinds = (p[0], q[0])
        if "X" in kinds:
            if kinds == ("X", "c"):
                return ("X", p[1], True, q[1], op_pos)  # X_i <= q
            if kinds == ("c", "X"):
                return ("X", q[1], False, p[1], op_pos)  # X_i >= p
            raise self.error(op_pos, "unsupported atom: an input X may only be compared with a constant (box input sets)")
        if kinds == ("c", "c"):
            raise self.error(op_pos, "atom compares two constants")
        coef: dict[int, float] = {}
        d = 0.0
        for (k, v), sign in ((p, 1.0), (q, -1.0)):
            if k == "Y":
                coef[v] = coef.get(v, 0.0) + sign
            else:
                d += sign * v
        return ("Y", tuple(coef.items()), d, op_pos)

    def dnf(self, node) -> list[list[tuple]]:
        """Disjunctive normal form of a formula: a list of conjunctions (lists of atoms)."""
        if isinstance(node, tuple):
            raise self.error(node[1], f"expected a formula '(...)', got {node[0]!r}")
        if not node:
            raise self.error(node.pos, "empty expression '()'")
        head = node[0]
        if not isinstance(head, tuple):
            raise self.error(node.pos, "expected an operator after '('")
        op, pos = head
        args = node[1:]
        if op in ("<=", ">="):
            if len(args) != 2:
                raise self.error(pos, f"'{op}' takes 2 operands, got {len(args)}")
            return [[self.atom(op, args[0], args[1], pos)]]
        if op == "and":
            if not args:
                raise self.error(pos, "'and' needs at least one operand")
            out: list[list[tuple]] = [[]]
            for a in args:
                da = self.dnf(a)
                if len(out) * len(da) > MAX_DISJUNCTS:
                    raise self.error(pos, f"more than {MAX_DISJUNCTS} disjuncts after expanding to DNF")
                out = [c + e for c in out for e in da] if len(da) > 1 else [c + da[0] for c in out]
            return out
        if op == "or":
            if not args:
                raise self.error(pos, "'or' needs at least one operand")
            out = []
            for k, a in enumerate(args, 1):
                if not k & 1023:
                    self.check_time()
                out += self.dnf(a)
                if len(out) > MAX_DISJUNCTS:
                    raise self.error(pos, f"more than {MAX_DISJUNCTS} disjuncts after expanding to DNF")
            return out
        raise self.error(pos, f"unknown operator {op!r} (VNN-LIB 1.0 formulas use <=, >=, and, or)")

    def add_top_atom(self, atom: tuple) -> None:
        if atom[0] == "X":
            _, i, upper, v, pos = atom
            if upper:
                if v < self.hi[i]:
                    self.hi[i], self.hi_pos[i] = v, pos
            elif v > self.lo[i]:
                self.lo[i], self.lo_pos[i] = v, pos
        else:
            self.top_rows.append(atom)

    # -- result ---------------------------------------------------------------------------
    def check_indices(self, kind: str, expect: int | None, what: str) -> int:
        idx = sorted(i for k, i in self.decl.values() if k == kind)
        n = len(idx)
        if n and idx[-1] != n - 1:
            missing = next(i for i, j in enumerate(idx) if i != j)
            raise self.error(self.decl_pos[(kind, idx[-1])], f"{kind}_{idx[-1]} declared but {kind}_{missing} is not (indices must be 0..n-1)")
        if expect is not None and n != expect:
            pos = self.decl_pos[(kind, idx[-1])] if n else 0
            raise self.error(pos, f"the file declares {n} {what} but the network has {expect}")
        return n

    def properties(self, num_inputs: int | None, num_outputs: int | None, dtype: torch.dtype) -> VnnlibProperties:
        n_in = self.check_indices("X", num_inputs, "inputs")
        n_out = self.check_indices("Y", num_outputs, "outputs")
        if n_in == 0:
            raise self.error(len(self.text), "no input variables X_i declared")
        del self.lo[n_in:], self.hi[n_in:]
        if len(self.complex) == 1 and isinstance(self.complex[0][0], _Block):
            done = self.block_properties(self.complex[0][0], n_out, dtype)
            if done is not None:
                return done
        boxes = self.group_boxes(self.disjuncts())
        lo_a, hi_a = self.check_boxes(boxes)
        lo_t, hi_t = _outward(lo_a, dtype, down=True), _outward(hi_a, dtype, down=False)
        same: dict[tuple[int, ...], list[int]] = {}  # rows per group -> boxes (first-appearance order)
        for i, (_, groups) in enumerate(boxes):
            same.setdefault(tuple(max(1, len(g)) for g in groups), []).append(i)
        batches = []
        for idx in same.values():
            C, d, gid = _linear_batch([boxes[i][1] for i in idx], n_out, dtype, self.check_time)
            ix = torch.tensor(idx, dtype=torch.long)
            lo, hi = (lo_t, hi_t) if len(idx) == len(boxes) else (lo_t[ix], hi_t[ix])
            batches.append(VnnlibBoxes(lo, hi, C, d, gid, ix))
        return VnnlibProperties(batches)

    def block_properties(self, block: _Block, n_out: int, dtype: torch.dtype) -> VnnlibProperties | None:
        """:meth:`properties` of a file whose one multi-disjunct assert is ``block``, in bulk: the
        same boxes, order, batches and rows. None where the general path is needed: a box
        with a missing bound or empty (its error names the atom), or more than
        :data:`_BLOCK_CELLS` clause bounds."""
        if len(block) * len(self.lo) > _BLOCK_CELLS:
            return None
        self.check_time()
        lo, hi = _clause_bounds(block, np.array(self.lo), np.array(self.hi))
        has_x = np.bincount(block.clause[block.is_x], minlength=len(block)) > 0
        box_of, first = _first_appearance(lo, hi, has_x)
        lo, hi = lo[first], hi[first]
        if (~np.isfinite(lo) | ~np.isfinite(hi) | (lo > hi)).any():
            return None
        self.check_time()
        lo_t, hi_t = _outward(lo, dtype, down=True), _outward(hi, dtype, down=False)
        specs = _block_specs(block, box_of, len(first), _top_matrix(self.top_rows, n_out), dtype, self.check_time)
        return VnnlibProperties([VnnlibBoxes(lo_t[ix], hi_t[ix], C, d, gid, ix) for C, d, gid, ix in specs])

    def disjuncts(self) -> list[list[tuple]]:
        """The file's disjuncts: the product over the multi-disjunct asserts (atom lists)."""
        out: list[list[tuple]] = [[]]
        for dnf, apos in self.complex:
            if len(out) * len(dnf) > MAX_DISJUNCTS:
                raise self.error(apos, f"more than {MAX_DISJUNCTS} disjuncts after expanding to DNF")
            self.check_time()
            out = [c + e for c in out for e in (dnf.dnf() if isinstance(dnf, _Block) else dnf)]
        return out

    def group_boxes(self, disjuncts: list[list[tuple]]) -> list[tuple[tuple, list[list[tuple]]]]:
        """Disjuncts grouped by their input box, in order of first appearance: ``[(box, groups)]``
        with ``box = (lo, hi, lo_pos, hi_pos, pos)`` (lists ``[n_in]``, from the box's first
        disjunct) and one list of output atoms (the top-level ones first) per disjunct."""
        boxes: dict[object, tuple[tuple, list[list[tuple]]]] = {}
        top = self.top_rows
        for n, conj in enumerate(disjuncts):
            if not n & 4095:
                self.check_time()
            xs = [a for a in conj if a[0] == "X"]
            ys = top + [a for a in conj if a[0] == "Y"]
            key = self.box_key(xs) if xs else None  # a disjunct without X atoms is its own box
            entry = boxes.get(key)
            if entry is None:
                entry = boxes[key] = (self.box_of(xs), [])
            entry[1].append(ys)
        return list(boxes.values())

    def box_key(self, xs: list[tuple]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The top-level bounds tightened by the input atoms ``xs``: ``(lo, hi)``."""
        lo, hi = list(self.lo), list(self.hi)
        for _, i, upper, v, _ in xs:
            if upper:
                hi[i] = min(hi[i], v)
            else:
                lo[i] = max(lo[i], v)
        return tuple(lo), tuple(hi)

    def box_of(self, xs: list[tuple]) -> tuple:
        """:meth:`box_key`'s bounds with the position of the atom behind each, and the first
        atom's position (None without ``xs``: the top-level bounds)."""
        if not xs:
            return self.lo, self.hi, self.lo_pos, self.hi_pos, None
        lo, hi = list(self.lo), list(self.hi)
        lp, hp = list(self.lo_pos), list(self.hi_pos)
        for _, i, upper, v, pos in xs:
            if upper and v < hi[i]:
                hi[i], hp[i] = v, pos
            elif not upper and v > lo[i]:
                lo[i], lp[i] = v, pos
        return lo, hi, lp, hp, xs[0][4]

    def check_boxes(self, boxes: list[tuple[tuple, list]]) -> tuple[np.ndarray, np.ndarray]:
        """Bounds ``[M, n_in]`` (float64) of the boxes; the first box with an infinite bound or
        an empty interval raises :meth:`check_box`'s error."""
        lo_a = np.array([b[0][0] for b in boxes], dtype=np.float64)
        hi_a = np.array([b[0][1] for b in boxes], dtype=np.float64)
        bad = ~np.isfinite(lo_a) | ~np.isfinite(hi_a) | (lo_a > hi_a)
        if bad.any():
            self.check_box(*boxes[int(np.argmax(bad.any(axis=1)))][0])
        return lo_a, hi_a

    def check_box(self, lo, hi, lp, hp, dpos) -> tuple[np.ndarray, np.ndarray]:
        lo_a = np.asarray(lo, dtype=np.float64)
        hi_a = np.asarray(hi, dtype=np.float64)
        bad = ~np.isfinite(lo_a) | ~np.isfinite(hi_a)
        empty = lo_a > hi_a
        if not (bad.any() or empty.any()):
            return lo_a, hi_a
        # the position of a disjunct is found only for an error (it scans the text)
        where = "" if dpos is None else " (in the disjunct whose input bounds start at line {}, col {})".format(*self.line_col(dpos))
        if bad.any():
            i = int(np.argmax(bad))
            side = "lower and upper bound" if not (np.isfinite(lo_a[i]) or np.isfinite(hi_a[i])) else ("lower bound" if not np.isfinite(lo_a[i]) else "upper bound")
            raise self.error(self.decl_pos[("X", i)], f"X_{i} has no {side}{where}: every input needs finite bounds")
        if empty.any():
            i = int(np.argmax(empty))
            raise self.error(max(lp[i], hp[i]), f"empty input box: X_{i} >= {float(lo_a[i])!r} and X_{i} <= {float(hi_a[i])!r}{where}")
        return lo_a, hi_a


#: the most clause bounds (clauses x inputs) a _Block is read with in bulk (more: the general path)
_BLOCK_CELLS = 1 << 22


def _clause_bounds(block: _Block, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each clause's box: the top-level bounds ``lo, hi [n_in]`` tightened by the clause's input
    atoms, ``[D, n_in]`` each."""
    x = block.is_x
    cl, var, val, up = block.clause[x], block.var[x], block.val[x], block.upper[x]
    return (_tightened(lo, len(block), cl[~up], var[~up], val[~up], np.maximum),
            _tightened(hi, len(block), cl[up], var[up], val[up], np.minimum))


def _tightened(top: np.ndarray, D: int, cl: np.ndarray, var: np.ndarray, val: np.ndarray, extreme: np.ufunc) -> np.ndarray:
    """``[D, n_in]``: row ``c`` is ``top`` with input ``i`` moved to the ``extreme`` of it and the
    atoms ``val`` with ``(cl, var) = (c, i)``. Of equal values the first is kept (top, then the
    atoms in order), as the scan ``if v > cur: cur = v`` keeps it (0.0 and -0.0 differ in sign)."""
    out = np.tile(top, (D, 1))
    if not len(val):
        return out
    flat = cl * len(top) + var
    best = out.copy()
    extreme.at(best, (cl, var), val)
    best = best.take(flat)
    hit = (val == best) & (out.take(flat) != best)
    where, first = np.unique(flat[hit], return_index=True)
    np.put(out, where, val[hit][first])
    return out


def _first_appearance(lo: np.ndarray, hi: np.ndarray, has_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clauses with equal boxes ``lo, hi [D, n_in]`` (as floats: -0.0 == 0.0) are one box; the
    clauses without input atoms are one box of their own. Returns ``box_of [D]`` (boxes
    numbered in order of first appearance) and each box's first clause ``[M]``."""
    key = np.concatenate([lo + 0.0, hi + 0.0, (~has_x)[:, None].astype(np.float64)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty(len(first), dtype=np.int64)
    rank[order] = np.arange(len(first))
    return rank[inverse.reshape(-1)], first[order]


def _top_matrix(top: list[tuple], n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-level output atoms as rows: ``C [T, n_out]``, ``d [T]``."""
    C, d = np.zeros((len(top), n_out)), np.zeros(len(top))
    for t, (_, coef, const, _) in enumerate(top):
        for j, c in coef:
            C[t, j] += c
        d[t] = const
    return C, d


def _block_specs(block: _Block, box_of: np.ndarray, M: int, top: tuple[np.ndarray, np.ndarray], dtype: torch.dtype,
                 tick: Callable[[], None]) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The specs of the ``M`` boxes of ``block`` (clause ``c`` in box ``box_of[c]``), one batch per
    row structure in order of first appearance: ``(C [m, N, n_out], d [m, N], groups [N],
    boxes [m])``. A clause is one group: the top-level rows ``top``, then its output atoms in
    order (one row ``C = 0, d = 0`` if both are none); :func:`_linear_batch` in bulk."""
    C_top, d_top = top
    T, D = len(d_top), len(block)
    y = ~block.is_x
    ycl = block.clause[y]
    y_count = np.bincount(ycl, minlength=D)
    rows = np.maximum(1, T + y_count)  # [D]
    corder = np.argsort(box_of, kind="stable")  # the clauses box by box, each box's in file order
    per_box = np.bincount(box_of, minlength=M)
    start = np.cumsum(per_box) - per_box  # [M] each box's first place in corder
    j_of = np.empty(D, dtype=np.int64)  # a clause's group number in its box
    j_of[corder] = np.arange(D) - start[box_of[corder]]
    structure = rows[corder].astype(np.int64).tobytes()
    same: dict[bytes, list[int]] = {}
    for b, (s, k) in enumerate(zip(start.tolist(), per_box.tolist())):
        same.setdefault(structure[8 * s: 8 * (s + k)], []).append(b)
    batch_of = np.empty(M, dtype=np.int64)
    for n, boxes in enumerate(same.values()):
        batch_of[boxes] = n
    ry = np.arange(len(ycl)) - (np.cumsum(y_count) - y_count)[ycl]  # an output atom's row in its clause (after T)
    ab = batch_of[box_of[ycl]]
    aorder = np.argsort(ab, kind="stable")
    cut = np.searchsorted(ab[aorder], np.arange(len(same) + 1))
    yvar, yup, yval = block.var[y], block.upper[y], block.val[y]
    local = np.empty(M, dtype=np.int64)
    out = []
    for n, (key, boxes) in enumerate(same.items()):
        tick()
        B = np.array(boxes, dtype=np.int64)
        R = np.frombuffer(key, dtype=np.int64)
        O = np.cumsum(R) - R  # first row of each group
        C = np.zeros((len(B), int(R.sum()), C_top.shape[1]))
        d = np.zeros(C.shape[:2])
        if T:
            at = (O[:, None] + np.arange(T)).reshape(-1)
            C[:, at] = np.tile(C_top, (len(R), 1))
            d[:, at] = np.tile(d_top, len(R))
        local[B] = np.arange(len(B))
        a = aorder[cut[n]:cut[n + 1]]
        bi, r = local[box_of[ycl[a]]], O[j_of[ycl[a]]] + T + ry[a]
        np.add.at(C, (bi, r, yvar[a]), np.where(yup[a], 1.0, -1.0))
        d[bi, r] = np.where(yup[a], -yval[a], yval[a])  # Y_j <= v: Y_j - v;  Y_j >= v: v - Y_j
        gid = np.repeat(np.arange(len(R), dtype=np.int64), R)
        out.append((torch.from_numpy(C).to(dtype), torch.from_numpy(d).to(dtype), torch.from_numpy(gid), torch.from_numpy(B)))
    return out


def _outward(a: np.ndarray, dtype: torch.dtype, down: bool) -> Tensor:
    """float64 bounds -> ``dtype``, rounded outward (lower bounds down, upper bounds up) so a
    lower-precision box still encloses the file's box."""
    t64 = torch.from_numpy(a)
    t = t64.to(dtype)
    if dtype == torch.float64:
        return t
    back = t.double()
    bad = back > t64 if down else back < t64
    if bad.any():
        toward = torch.full_like(t, -math.inf if down else math.inf)
        t = torch.where(bad, torch.nextafter(t, toward), t)
    return t


def _linear_batch(boxes: list[list[list[tuple]]], n_out: int, dtype: torch.dtype,
                  tick: Callable[[], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The specs of ``M`` boxes with the same rows per group, in bulk: ``C [M, N, n_out]``,
    ``d [M, N]`` (in ``dtype``), ``groups [N]``. ``boxes[m]`` holds one list of output atoms per
    group (violation disjunct), one row per atom; a group without output atoms is one row
    ``C = 0, d = 0``. ``tick`` is called every 4,096 boxes (the reader's deadline)."""
    counts = [max(1, len(g)) for g in boxes[0]]
    M, N = len(boxes), sum(counts)
    d: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for m, groups in enumerate(boxes):
        if tick is not None and not m & 4095:
            tick()
        for atoms in groups:
            if not atoms:
                d.append(0.0)
                continue
            for _, coef, const, _ in atoms:
                r = len(d)
                for j, c in coef:
                    rows.append(r)
                    cols.append(j)
                    vals.append(c)
                d.append(const)
    C = np.zeros((M * N, n_out))
    np.add.at(C, (np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)), np.asarray(vals, dtype=np.float64))
    gid = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    d_a = np.asarray(d, dtype=np.float64).reshape(M, N)
    return torch.from_numpy(C.reshape(M, N, n_out)).to(dtype), torch.from_numpy(d_a).to(dtype), torch.from_numpy(gid)


def parse_vnnlib(
    path_or_text: str | bytes | os.PathLike,
    *,
    num_inputs: int | None = None,
    num_outputs: int | None = None,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
    deadline: float | None = None,
) -> VnnlibProperties:
    """Parse a VNN-LIB file (``x.vnnlib``, ``x.vnnlib.gz``, or the text itself).

    Args:
        path_or_text: a path (``str``/``PathLike``; ``.gz`` read transparently, and ``x.gz``
            used when only it exists), or the file's text (a ``str`` containing ``(`` or a
            newline, or ``bytes``).
        num_inputs, num_outputs: if given, the declared ``X``/``Y`` counts must match.
        dtype: dtype of the returned tensors. Below float64 the box is rounded outward;
            ``C``/``d`` are rounded to nearest (the verifier's float-safety margin covers it).
        name: the file name used in error messages for text input (default ``<string>``).
        deadline: a ``time.perf_counter()`` value; reading stops with :class:`VnnlibTimeout`
            soon after it (checked every few thousand statements, clauses or boxes).

    Returns:
        :class:`VnnlibProperties`: one :class:`VnnlibProperty` per distinct input box (usually
        exactly one), in order of first appearance, each built when asked for; its ``batches``
        hold the same boxes as tensors ``[M, n_in]`` with their specs ``C [M, N, n_out]``. The
        file is violated (``sat``) iff some property is violated at some point of its box.

    Raises:
        VnnlibError: ``"<file>:<line>:<col>: <what>"``.
        VnnlibTimeout: the deadline passed before the file was read.
    """
    text, fname = _text_of(path_or_text, name)
    if deadline is not None and time.perf_counter() > deadline:
        raise VnnlibTimeout(f"{fname}: not read by the deadline")
    p = _Parser(text, fname, deadline=deadline)
    try:
        p.run()
        return p.properties(num_inputs, num_outputs, dtype)
    except VnnlibError:
        if not p.used_fast:
            raise
    # the fast path keeps a clause's position for its atoms: the general one names the atom
    p = _Parser(text, fname, fast=False, deadline=deadline)
    p.run()
    return p.properties(num_inputs, num_outputs, dtype)


def _text_of(path_or_text: str | bytes | os.PathLike, name: str | None) -> tuple[str, str]:
    """The text to parse (comments blanked out) and the file name for error messages."""
    if isinstance(path_or_text, bytes):
        text, fname = path_or_text.decode("utf-8-sig"), name or "<bytes>"
    elif isinstance(path_or_text, str) and ("(" in path_or_text or "\n" in path_or_text):
        text, fname = path_or_text, name or "<string>"
    else:
        text, fname = open_maybe_gz(path_or_text), name or str(path_or_text)
    if ";" in text:
        text = _COMMENT.sub("", text)  # keeps line breaks and the columns of every token
    return text, fname
