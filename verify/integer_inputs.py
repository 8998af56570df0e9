"""Instances whose network uses the integer part of some inputs where a constant is needed.

cctsdb_yolo's detectors take the position of an adversarial patch as two inputs, cast them to
integers and paste the patch there (Slice, Range, ScatterND on the cast values): not one static
graph. For each combination ``k`` of integer values of those inputs (a *case*), the graph
converted with them fixed (:func:`verify.onnx_import.import_onnx` with ``integer_inputs=k``) is
exact on the part of the box where ``trunc(x_i) = k_i`` for the float32 values the network is fed.
The instance is decided case by case:

* **point cases**: when the conversion shows that the output depends on those inputs only through
  their integer part (``gm.integer_part_only``) and the box fixes every other input, the network
  is constant on each case, so one run of the network itself (onnxruntime) per case decides it
  exactly: a violation is a counterexample (confirmed like any other), no violation in any case
  proves the box;
* otherwise each case's part of the box is decided by ``method`` on that case's graph.

Both stop at the deadline (``timeout`` with the cases not reached) and refuse boxes with more
than :data:`MAX_CASES` cases.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from .errors import IntegerInputsNeeded, UnsupportedOperatorError

__all__ = ["MAX_CASES", "Conversions", "integer_inputs_of", "case_values", "case_bounds", "decide_by_cases"]

#: the most cases one box may need
MAX_CASES = 100_000

F32 = np.float32


class Conversions:
    """The conversions of one ONNX model with some inputs fixed to integers
    (:func:`verify.onnx_import.import_onnx` with ``integer_inputs``), each done once: the last
    :data:`KEEP` graphs are kept, and every :class:`~verify.errors.IntegerInputsNeeded` a
    conversion raised (raised again, the conversion is not redone). ``deadline`` (a
    ``perf_counter`` value, None: none): a conversion still running then stops with
    :class:`~verify.errors.ModelLoadTimeout`."""

    #: graphs kept (the box's first case is asked for by the search for the integer inputs, by
    #: the check for point cases and by the first case's search)
    KEEP = 2

    def __init__(self, proto: Any, needed: IntegerInputsNeeded | None = None, deadline: float | None = None):
        self.proto = proto
        self.deadline = deadline
        self.needed: dict[tuple[tuple[int, int], ...], IntegerInputsNeeded] = {} if needed is None else {(): needed}
        self.graphs: dict[tuple[tuple[int, int], ...], Any] = {}

    def __call__(self, fixed: dict[int, int]) -> Any:
        """The graph module with inputs ``fixed`` (``{flat index: integer}``); raises the
        conversion's :class:`~verify.errors.IntegerInputsNeeded` (again)."""
        from .onnx_import import import_onnx

        key = tuple(sorted(fixed.items()))
        if key in self.needed:
            raise self.needed[key]
        if key not in self.graphs:
            try:
                gm = import_onnx(self.proto, integer_inputs=dict(key), deadline=self.deadline)
            except IntegerInputsNeeded as e:
                self.needed[key] = e
                raise
            self.graphs[key] = gm
            while len(self.graphs) > self.KEEP:
                del self.graphs[next(iter(self.graphs))]
        return self.graphs[key]


def integer_inputs_of(proto: Any, lo: np.ndarray, conversions: Conversions | None = None) -> list[int]:
    """Flat indices of the inputs whose integer part the network needs as constants (found by
    converting with the ones found so far fixed at their value at ``lo`` ``[n_in]``); the
    conversions go through ``conversions`` when given (each done once per instance)."""
    convert = conversions or Conversions(proto)
    found: list[int] = []
    while True:
        try:
            convert({c: _trunc32(lo[c]) for c in found})
            return found
        except IntegerInputsNeeded as e:
            new = [c for c in e.coords if c not in found]
            if not new:
                raise
            found += new


def _trunc32(v: float) -> int:
    """The integer an ONNX Cast gives for ``v`` fed as float32 (truncation toward zero)."""
    return int(np.trunc(np.float32(v)))


def case_values(lo: np.ndarray, hi: np.ndarray, coords: list[int]) -> list[range]:
    """For each input in ``coords``, the integers its float32 values in ``[lo, hi]`` truncate to
    (rounding to float32 is monotone, so they run from the ends' integers)."""
    return [range(_trunc32(lo[c]), _trunc32(hi[c]) + 1) for c in coords]


def case_bounds(k: int, lo: float, hi: float) -> tuple[float, float]:
    """The part of ``[lo, hi]`` whose float32 values truncate to ``k``: ``[k, k + 1)`` for
    ``k > 0``, ``(-1, 1)`` for 0, ``(k - 1, k]`` below, with open ends moved one float32 step in."""
    below = np.nextafter(F32(k + 1), F32(-np.inf))
    above = np.nextafter(F32(k - 1), F32(np.inf))
    a, b = (F32(k), below) if k > 0 else ((above, below) if k == 0 else (above, F32(k)))
    return max(lo, float(a)), min(hi, float(b))


def decide_by_cases(model: Any, vnnlib: Any, *, method: str, options: dict | None, deadline: float | None,
                    device: str, t0: float, needed: IntegerInputsNeeded | None = None,
                    on_box: Callable[[Any], None] | None = None) -> Any:
    """Decide an instance (ONNX ``model``, VNN-LIB ``vnnlib``) case by case (module docstring);
    returns an :class:`~verify.instance.InstanceResult`. ``needed``: what converting the model
    without fixed inputs raised, if that was tried already (it is not tried again). ``on_box``
    gets each box's certificate at the end (a box's answer word needs the instance's)."""
    from .confirm import onnx_runner
    from .instance import InstanceResult, _overall
    from .onnx_import import read_onnx
    from .vnnlib import parse_vnnlib, resolve_maybe_gz

    path = resolve_maybe_gz(model)
    proto = read_onnx(path)
    props = parse_vnnlib(vnnlib, deadline=deadline)
    runner = onnx_runner(path)
    convert = Conversions(proto, needed, deadline)
    res = InstanceResult("unknown", 0.0, stage="integer-cases", boxes=len(props))
    answers = []
    for i, p in enumerate(props):
        share = None if deadline is None else (deadline - time.perf_counter()) / (len(props) - i)
        answer, conf, cert = _decide_box(convert, p, runner, method, options, share, device, i)
        res.certificates.append(cert)
        res.per_box.append({"status": cert.status, "reason": cert.details.get("reason"), "time_s": round(cert.time_s, 3)})
        if conf is not None:
            res.result, res.x, res.y = "sat", conf.x.tolist(), conf.y.tolist()
            break
        answers.append(answer)
    else:
        res.result = _overall(answers)
    res.time_s = time.perf_counter() - t0
    for c in res.certificates:
        c.details["vnncomp_result"] = "sat" if c.status == "falsified" else ("unsat" if c.status == "certified" else res.result)
        if on_box is not None:
            on_box(c)
    return res


def _decide_box(convert: Conversions, p: Any, runner: Any, method: str, options: dict | None, budget: float | None,
                device: str, index: int) -> tuple[str, Any, Any]:
    """One box: ``(answer, confirmation of a counterexample or None, Certificate)``."""
    from .certificate import Certificate

    t0 = time.perf_counter()
    until = None if budget is None else t0 + budget
    lo, hi = p.input_lo.double().numpy(), p.input_hi.double().numpy()
    coords = integer_inputs_of(convert.proto, lo, convert)
    values = case_values(lo, hi, coords)
    n_cases = math.prod(len(v) for v in values)
    if n_cases > MAX_CASES:
        raise UnsupportedOperatorError(f"the network uses the integer part of inputs {coords} as indices; this box has "
                                       f"{n_cases} integer cases (at most {MAX_CASES})")
    first = convert({c: v[0] for c, v in zip(coords, values)})
    others = np.ones(lo.size, dtype=bool)
    others[coords] = False
    points = set(coords) <= set(first.integer_part_only) and bool((lo[others] == hi[others]).all())
    decide = _point_case if points else _graph_case
    answers, done, conf = [], 0, None
    for k in itertools.product(*values):
        if until is not None and time.perf_counter() >= until:
            answers.append("timeout")
            break
        left = None if until is None else (until - time.perf_counter()) / (n_cases - done)
        answer, conf = decide(convert, p, runner, coords, k, lo, hi, method, options, left, device)
        done += 1
        if conf is not None:
            break
        answers.append(answer)
    status = "falsified" if conf is not None else ("certified" if done == n_cases and all(a == "unsat" for a in answers) else "unknown")
    details: dict[str, Any] = {"stage": "integer-cases", "integer_inputs": coords, "cases": n_cases, "cases_decided": done,
               "case_kind": "point (network run per case)" if points else f"graph ({method} per case)"}
    if status == "unknown":
        details["reason"] = "timeout" if "timeout" in answers else "unknown"
    cert = Certificate(method=method, guarantee="deterministic", status=status, index=index, norm="box",
                       counterexample=None if conf is None else conf.x.tolist(), time_s=time.perf_counter() - t0,
                       details=details)
    answer = "unsat" if status == "certified" else details.get("reason", "sat")
    return answer, conf, cert


def _point_case(convert, p, runner, coords, k, lo, hi, method, options, left, device) -> tuple[str, Any]:
    """The network is constant on the case: run it once, at the case's integers clamped into the box."""
    from .confirm import confirm

    x = lo.copy()
    for c, v in zip(coords, k):
        x[c] = min(max(float(v), lo[c]), hi[c])
    ok = confirm(runner, x, lo, hi, p.spec)
    return ("sat", ok) if ok.ok else ("unsat", None)


def _graph_case(convert, p, runner, coords, k, lo, hi, method, options, left, device) -> tuple[str, Any]:
    """The case's part of the box, decided by ``method`` on the case's graph."""
    from .instance import _box_answer, _run_box
    from .model import load_model

    gm = load_model(convert(dict(zip(coords, k))), device=device)
    clo, chi = p.input_lo.clone().double(), p.input_hi.clone().double()
    for c, v in zip(coords, k):
        a, b = case_bounds(v, lo[c], hi[c])
        clo[c], chi[c] = a, b
    pk = replace(p, input_lo=clo.to(p.input_lo.dtype), input_hi=chi.to(p.input_hi.dtype))
    c, ok = _run_box(gm, pk, tuple(getattr(gm, "input_shape")), runner, method, left, device, options)
    return _box_answer(c.status, c.details.get("reason")), ok
