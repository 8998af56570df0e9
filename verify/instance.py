"""One VNN-LIB instance, decided the same way by every front door: ``certify run --spec``,
``certify vnncomp`` and the competition script ``benchmarks/vnncomp/run_instance.sh``.

An instance is a model (ONNX file, or a torch model for ``run --spec``), a VNN-LIB file and a
time budget. The file holds one or more input boxes (disjuncts); the answer is

* ``sat`` as soon as one box has a counterexample that survives :func:`confirm`: the point
  is projected into the box in the dtype the model takes, run as the competition runs it
  (onnxruntime for ONNX files), and its output violates the property;
* ``unsat`` when every box is proved;
* otherwise ``error`` (a box errored), ``timeout`` (the budget ran out) or ``unknown``.

There is ONE budget per instance, loading included: each box gets an even share of the time
left when it starts (a box that finishes early leaves its time to the later ones), never the
whole timeout again.

The competition's counterexample check (the organisers' ``SCORING/counterexamples.py`` of
vnncomp2023_results, ``COUNTEREXAMPLE_ATOL = 1e-4``, ``COUNTEREXAMPLE_RTOL = 1e-3``): the
written X must lie in the box up to ``1e-4`` absolute per coordinate, the written Y must
match onnxruntime's output on X up to ``1e-3`` relative (l_inf), and Y must meet one
disjunct's output atoms up to ``1e-4``. We are stricter where it costs nothing: X is
projected exactly into the box whenever the model's dtype has a value in it (the ``1e-4``
only covers boxes thinner than one float step), Y is onnxruntime's own output, and the
violation must hold with no tolerance (margin ``<= 0``), so a ``sat`` is a real
counterexample of the model as onnxruntime runs it, not only one the checker accepts.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .confirm import Confirmation, Runner, confirm, onnx_runner, torch_runner
from .errors import IntegerInputsNeeded, ModelLoadTimeout
from .precision import ieee_float32
from .vnnlib import VnnlibTimeout

__all__ = [
    "InstanceResult",
    "decide",
    "run_instance",
    "format_result",
    "write_result_file",
    "INSTANCE_COLUMNS",
    "box_answers",
    "instance_row",
    "summary_line",
]

@dataclass
class InstanceResult:
    """``result`` is ``sat`` / ``unsat`` / ``timeout`` / ``unknown`` / ``error``; ``x``, ``y``
    (flat lists of floats) hold the confirmed counterexample with ``sat``: X exactly as the
    model is fed (projected into the box, in the model's dtype), Y the model's output on it.

    ``certificates`` holds one :class:`~verify.certificate.Certificate` per box that was
    started (``index`` = box number); ``per_box`` a short summary of each; ``boxes`` the number
    of boxes in the file (0 when it was not read)."""

    result: str
    time_s: float
    x: list[float] | None = None
    y: list[float] | None = None
    stage: str = ""
    detail: str = ""
    per_box: list[dict] = field(default_factory=list)
    certificates: list = field(default_factory=list)
    boxes: int = 0


# ----------------------------------------------------------------------------------------
# the driver


def _box_answer(status: str, reason: Any) -> str:
    if status == "certified":
        return "unsat"
    if status == "error":
        return "error"
    return "timeout" if reason == "timeout" else "unknown"


def _overall(answers: list[str]) -> str:
    """Combine the per-box answers of an instance without a confirmed counterexample."""
    if answers and all(a == "unsat" for a in answers):
        return "unsat"
    for word in ("error", "timeout"):
        if word in answers:
            return word
    return "unknown"


def _not_started(method: str, index: int) -> Any:
    from .certificate import Certificate

    return Certificate(method=method, guarantee="deterministic", status="unknown", index=index, norm="box",
                       details={"reason": "timeout", "note": "not started: the instance's time budget was spent"})


def decide(
    net: torch.nn.Module,
    props: Sequence[Any],
    runner: Runner,
    *,
    method: str = "bab",
    options: dict | None = None,
    deadline: float | None = None,
    device: str = "cpu",
    t0: float | None = None,
    on_box: Callable[[Any], None] | None = None,
) -> InstanceResult:
    """Decide the boxes ``props`` (:class:`~verify.vnnlib.VnnlibProperties`, or a list of
    :class:`~verify.vnnlib.VnnlibProperty`) of one instance.

    Args:
        net: the loaded model (``net.input_shape`` gives the box's shape).
        runner: how a counterexample is confirmed (:func:`onnx_runner` / :func:`torch_runner`).
        deadline: ``time.perf_counter()`` value by which the instance must be decided
            (None: no budget). Box ``i`` of ``n`` gets ``(deadline - now) / (n - i)``.
        t0: start time of the instance (loading included) for ``time_s``.
        on_box: called with each box's certificate as soon as it is final (box order), e.g.
            to write it out as the run goes.
    """
    t0 = time.perf_counter() if t0 is None else t0
    shape = tuple(getattr(net, "input_shape", None) or (props[0].num_inputs,))
    answers: list[str] = []
    stages: list[str] = []
    res = InstanceResult("unknown", 0.0, boxes=len(props))
    proved: dict[int, Any] = {}
    candidates: dict[int, torch.Tensor] = {}
    if method == "bab" and len(props) >= BATCHED_MIN_BOXES:
        few, many = _by_free_inputs(props)
        proved, candidates = _split_boxes(net, few, shape, device, deadline, options)
        proved.update(_batched_crown(net, many, shape, device, deadline))
    for i in range(len(props)):
        if i in proved:
            _record(res, proved[i], on_box)
            res.per_box.append({"status": "certified", "reason": None, "time_s": round(proved[i].time_s, 3)})
            stages.append(str(proved[i].details["stage"]))
            answers.append("unsat")
            continue
        if i in candidates:
            c, ok = _confirmed_candidate(props[i], candidates[i], runner, method, i, shape)
            if ok is not None:
                assert ok.y is not None
                _record(res, c, on_box)
                res.per_box.append({"status": c.status, "reason": None, "time_s": 0.0})
                res.result, res.x, res.y, res.stage = "sat", ok.x.tolist(), ok.y.tolist(), SPLIT_STAGE
                break
        share = None
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                answers.append("timeout")
                _record(res, _not_started(method, i), on_box)
                continue
            share = left / (len(props) - i)
        c, ok = _run_box(net, props[i], shape, runner, method, share, device, options)
        c.index = i
        _record(res, c, on_box)
        res.per_box.append({"status": c.status, "reason": c.details.get("reason"), "time_s": round(c.time_s, 3)})
        stages.append(str(c.details.get("stage", "")))
        if ok is not None:
            assert ok.y is not None  # a confirmed counterexample has its output
            res.result, res.x, res.y, res.stage = "sat", ok.x.tolist(), ok.y.tolist(), stages[-1]
            break
        if "unconfirmed_counterexample" in c.details:
            res.per_box[-1]["note"] = c.details["note"]
        answers.append(_box_answer(c.status, c.details.get("reason")))
    else:
        res.result, res.stage = _overall(answers), ",".join(sorted(set(stages)))
        if res.result in ("unknown", "timeout") and not res.detail:
            res.detail = _open_reasons(res.per_box, len(props))
    res.time_s = time.perf_counter() - t0
    return res


def _open_reasons(per_box: list[dict], n_boxes: int) -> str:
    """Why an instance stayed open, for the results' ``detail``: the reasons of its boxes not
    proved (a method's ``details["reason"]``: ``timeout``, ``memory``, ``exhausted``, ...) and
    the boxes never started, e.g. ``"open: memory"`` or ``"open: timeout, not started x3"``."""
    counts = Counter(str(b.get("reason") or b["status"]) for b in per_box if b["status"] != "certified")
    if n_boxes > len(per_box):
        counts["not started"] = n_boxes - len(per_box)
    return "open: " + ", ".join(r if k == 1 else f"{r} x{k}" for r, k in counts.items())


def _record(res: InstanceResult, c: Any, on_box: Callable[[Any], None] | None) -> None:
    """Add a box's final certificate to ``res`` with its answer (``details["vnncomp_result"]``)
    and hand it to ``on_box``."""
    c.details["vnncomp_result"] = "sat" if c.status == "falsified" else _box_answer(c.status, c.details.get("reason"))
    res.certificates.append(c)
    if on_box is not None:
        on_box(c)


#: an instance with at least this many boxes first bounds them all together (split or by CROWN)
BATCHED_MIN_BOXES = 8
#: the most boxes per batched CROWN call
BATCHED_CHUNK = 4096
#: the share of the time left that the batched stages may take (the rest: the per-box searches)
BATCHED_SHARE = 0.8
#: the most pieces a box is split into by the batched input splitting (:mod:`relax.bab.many_boxes`)
SPLIT_MAX_PIECES = 64
#: ... which serves boxes of at most this many free inputs: log2 of the pieces, so that each free
#: input can be halved at least once; boxes with more go to the batched CROWN pass
SPLIT_MAX_FREE = int(math.log2(SPLIT_MAX_PIECES))
SPLIT_STAGE = "batched-split"


def _by_free_inputs(props: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The batches of boxes (:class:`~verify.vnnlib.VnnlibBoxes`) with at most
    :data:`SPLIT_MAX_FREE` free inputs (``lo < hi``) and the others."""
    from relax.bounds.forward import free_count
    from .vnnlib import VnnlibProperties

    few: list[Any] = []
    many: list[Any] = []
    for b in VnnlibProperties.from_properties(props).batches:
        (few if free_count(b.input_lo, b.input_hi) <= SPLIT_MAX_FREE else many).append(b)
    return few, many


def _split_boxes(net: torch.nn.Module, batches: Sequence[Any], shape: tuple[int, ...], device: str, deadline: float | None,
                 options: dict | None) -> tuple[dict[int, Any], dict[int, torch.Tensor]]:
    """Input splitting of all boxes of ``batches`` together (:func:`relax.bab.many_boxes.split_many_boxes`,
    float64, with ``bab``'s ``margin`` option) within :data:`BATCHED_SHARE` of the time left:
    ``{box index: certified Certificate}`` and ``{box index: candidate counterexample [n_in]}``
    (unconfirmed)."""
    from relax.bab.many_boxes import split_many_boxes
    from relax.ir.graph import get_graph
    from relax.methods.bab import BabOptions
    from .certificate import Certificate

    margin = float((options or {}).get("margin", BabOptions.defaults()["margin"]))

    t0 = time.perf_counter()
    stop_at = math.inf if deadline is None else t0 + BATCHED_SHARE * (deadline - t0)
    proved: dict[int, Any] = {}
    cands: dict[int, torch.Tensor] = {}
    if not batches:
        return proved, cands
    graph = get_graph(net, shape, torch.float64)
    for batch in batches:
        if time.perf_counter() >= stop_at:
            break
        t_b = time.perf_counter()
        r = split_many_boxes(graph, batch.input_lo.to(device), batch.input_hi.to(device), batch.C.to(device),
                             batch.d.to(device), batch.groups, stop_at=stop_at, margin=margin, max_pieces=SPLIT_MAX_PIECES)
        each = (time.perf_counter() - t_b) / max(1, len(batch))
        for m in r.proved.nonzero().flatten().tolist():
            i = int(batch.index[m])
            proved[i] = Certificate(method="bab", guarantee="deterministic", status="certified", index=i, norm="box",
                                    time_s=each, details={"stage": SPLIT_STAGE, "reason": "proved"})
        cands.update({int(batch.index[m]): x.cpu() for m, x in r.candidates.items()})
    return proved, cands


def _confirmed_candidate(p: Any, x: torch.Tensor, runner: Runner, method: str, i: int, shape: tuple[int, ...]
                         ) -> tuple[Any, Confirmation | None]:
    """A box's candidate counterexample from :func:`_split_boxes`, confirmed by ``runner``: the
    falsified certificate and the confirmation, or ``(None, None)``."""
    from .certificate import Certificate

    ok = confirm(runner, x, p.input_lo, p.input_hi, p.spec)
    if not ok.ok:
        return None, None
    c = Certificate(method=method, guarantee="deterministic", status="falsified", index=i, norm="box",
                    counterexample=ok.x.reshape(shape).tolist(), details={"stage": SPLIT_STAGE, "confirmed_by": runner.kind})
    return c, ok


def _batched_crown(net: torch.nn.Module, batches: Sequence[Any], shape: tuple[int, ...], device: str,
                   deadline: float | None) -> dict[int, Any]:
    """CROWN on all boxes of ``batches`` at once (chunks of a batch of boxes with the same spec
    rows, :class:`~verify.vnnlib.VnnlibBoxes`), within :data:`BATCHED_SHARE` of the time left:
    ``{box index: certified Certificate}``. The boxes it proves need no per-box search (nn4sys:
    10,000-60,000 boxes a file, each a few milliseconds alone)."""
    from .api import certify

    t0 = time.perf_counter()
    budget = None if deadline is None else BATCHED_SHARE * (deadline - t0)
    out: dict[int, Any] = {}
    size = 16  # chunks start small and grow while they take at most a fifth of what is left
    for batch in batches:
        s = 0
        while s < len(batch):
            left = None if budget is None else budget - (time.perf_counter() - t0)
            if left is not None and left <= 0:
                return out
            rows = slice(s, min(s + size, len(batch)))
            s = rows.stop
            t_chunk = time.perf_counter()
            certs = certify(net, batch.box(shape, rows), batch.spec(rows), "crown", timeout=left, device=device)
            for i, c in zip(batch.index[rows].tolist(), certs):
                if c.status == "certified":
                    c.index = i
                    c.details["stage"] = "batched-crown"
                    out[i] = c
            per_box = (time.perf_counter() - t_chunk) / (rows.stop - rows.start)
            room = BATCHED_CHUNK if left is None else 0.2 * left / max(per_box, 1e-9)
            size = int(max(1, min(BATCHED_CHUNK, room)))
    return out


def _run_box(net: torch.nn.Module, p: Any, shape: tuple[int, ...], runner: Runner, method: str, timeout: float | None,
             device: str, options: dict | None) -> tuple[Any, Confirmation | None]:
    """Run the method on one box; a counterexample it reports is projected and confirmed.
    Returns the certificate and, for a confirmed counterexample, the :class:`Confirmation`."""
    from .api import certify

    c = certify(net, p.box(shape), p.spec, method, timeout=timeout, device=device, method_options=options or {})[0]
    if c.status != "falsified":
        return c, None
    if c.counterexample is None:
        _unconfirmed(c, "the method gave no point")
        return c, None
    ok = confirm(runner, c.counterexample, p.input_lo, p.input_hi, p.spec)
    if not ok.ok:
        _unconfirmed(c, ok.why)
        return c, None
    c.counterexample = ok.x.reshape(shape).tolist()
    c.details["confirmed_by"] = runner.kind
    return c, ok


def _unconfirmed(c: Any, why: str) -> None:
    """A method's counterexample that the runner does not confirm: no claim (``unknown``)."""
    c.status = "unknown"
    c.details["note"] = f"counterexample not confirmed: {why}"
    c.details["unconfirmed_counterexample"] = c.counterexample
    c.counterexample = None


def _is_onnx(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith((".onnx", ".onnx.gz"))


def _prepare(model: Any, vnnlib: Any, device: str, deadline: float | None) -> tuple[torch.nn.Module, Any, Runner]:
    """Load the model (:class:`~verify.errors.ModelLoadTimeout` past ``deadline``) and the spec
    (:class:`~verify.vnnlib.VnnlibProperties`, :class:`~verify.vnnlib.VnnlibTimeout` past it);
    check that their input counts agree; build the runner."""
    from .model import load_model
    from .vnnlib import parse_vnnlib, resolve_maybe_gz

    if _is_onnx(model):
        model = str(resolve_maybe_gz(model))
    net = load_model(model, device=device, deadline=deadline)
    props = parse_vnnlib(vnnlib, deadline=deadline)
    n = props.num_inputs
    shape = getattr(net, "input_shape", None)
    if shape is not None and math.prod(shape) != n:
        raise ValueError(f"the VNN-LIB file has {n} inputs but the model's input shape {tuple(shape)} has {math.prod(shape)}")
    runner = onnx_runner(model) if _is_onnx(model) else torch_runner(net, tuple(shape or (n,)))
    if deadline is not None and time.perf_counter() > deadline:
        raise ModelLoadTimeout(f"{Path(str(model)).name}: onnxruntime session not ready by the deadline")
    return net, props, runner


def run_instance(
    model: Any,
    vnnlib: Any,
    timeout: float | None,
    *,
    method: str = "bab",
    options: dict | None = None,
    threads: int | None = 1,
    device: str = "cpu",
    raise_errors: bool = False,
    on_box: Callable[[Any], None] | None = None,
) -> InstanceResult:
    """Decide one instance within ``timeout`` seconds (loading included; None: no limit).

    Args:
        model: an ONNX path (counterexamples confirmed by onnxruntime), another model path or
            a torch module (confirmed by a single-input forward pass in the model's dtype).
        vnnlib: path to the VNN-LIB file (``.gz`` read transparently) or its text.
        method: the registered method run on each box (``bab`` for the competition).
        options: keyword options of the method.
        threads: torch intra-op threads (None: leave as is). One is best for the competition:
            the bounded tensors are small, and on a busy machine two threads were measured 15x
            slower.
        raise_errors: let a load / parse / method error propagate (the CLI reports it) instead
            of returning ``error``.
        on_box: called with each box's certificate once it is final (see :func:`decide`).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    deadline = None if timeout is None else t0 + timeout
    try:
        with ieee_float32():  # see verify.precision: every bound and forward pass in IEEE float32 on CUDA
            return _run_instance(model, vnnlib, method, options, device, deadline, t0, on_box)
    except VnnlibTimeout:  # the file was not read in time
        return InstanceResult("timeout", time.perf_counter() - t0, stage="read",
                              detail="the VNN-LIB file was not read within the time budget")
    except ModelLoadTimeout as e:  # the model was not loaded in time
        return InstanceResult("timeout", time.perf_counter() - t0, stage="load", detail=str(e))
    except Exception as e:  # an instance we cannot run is an error, never a guess
        if raise_errors:
            raise
        return InstanceResult("error", time.perf_counter() - t0, detail=" ".join(f"{type(e).__name__}: {e}".split())[:300])


def _run_instance(model: Any, vnnlib: Any, method: str, options: dict | None, device: str, deadline: float | None, t0: float,
                  on_box: Callable[[Any], None] | None) -> InstanceResult:
    """:func:`run_instance` past its set-up: load, then decide (the caller maps errors to answers)."""
    try:
        net, props, runner = _prepare(model, vnnlib, device, deadline)
    except IntegerInputsNeeded as e:  # not one static graph: one per integer value of some inputs
        if not _is_onnx(model):
            raise
        from .integer_inputs import decide_by_cases

        return decide_by_cases(model, vnnlib, method=method, options=options, deadline=deadline, device=device, t0=t0,
                               needed=e, on_box=on_box)
    return decide(net, props, runner, method=method, options=options, deadline=deadline, device=device, t0=t0,
                  on_box=on_box)


# ----------------------------------------------------------------------------------------
# result files


def format_result(res: InstanceResult) -> str:
    """The competition result file's text: the answer word, then after ``sat`` the
    counterexample ``((X_0 v)\\n (X_1 v)\\n ... (Y_0 v)\\n ...)``."""
    from .vnnlib import format_counterexample

    text = res.result + "\n"
    if res.result == "sat":
        assert res.x is not None and res.y is not None  # sat comes with the counterexample
        text += format_counterexample(res.x, res.y)
    return text


def write_result_file(path: str | os.PathLike, res: InstanceResult) -> None:
    """Write :func:`format_result` to ``path`` (folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(format_result(res))


# ----------------------------------------------------------------------------------------
# one answer per instance (``certify run --spec``)

#: the columns of an instance row (:func:`instance_row`), in order
INSTANCE_COLUMNS = ["model", "vnnlib", "method", "result", "time_s", "timeout_s", "boxes", "box_answers", "stage",
                    "detail", "x", "y"]


def box_answers(res: InstanceResult) -> dict[str, int]:
    """How many boxes got each answer (``unsat``, ``sat``, ``unknown``, ``timeout``, ``error``),
    from the certificates' ``vnncomp_result``; boxes never reached (after a ``sat``) are absent."""
    out: dict[str, int] = {}
    for c in res.certificates:
        word = str(c.details.get("vnncomp_result", "unknown"))
        out[word] = out.get(word, 0) + 1
    return out


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {word}" for word, n in counts.items())


def summary_line(res: InstanceResult, name: str) -> str:
    """The instance's answer on one line: ``result: unsat in 9.870 s (p.vnnlib, 60000 boxes:
    60000 unsat)``; after ``sat`` the box that gave the counterexample."""
    counts = _counts_text(box_answers(res))
    where = name
    if res.boxes:  # 0: the file was not read (the model was not loaded in time, ...)
        where += f", {res.boxes} box{'es' if res.boxes != 1 else ''}" + (f": {counts}" if counts else "")
    if res.result == "sat" and res.certificates:
        where += f"; counterexample in box {res.certificates[-1].index}"
    elif res.detail:
        where += f"; {res.detail}"
    return f"result: {res.result} in {res.time_s:.3f} s ({where})"


def instance_row(res: InstanceResult, *, model: str, vnnlib: str, method: str, timeout: float | None) -> dict[str, Any]:
    """One record per instance (:data:`INSTANCE_COLUMNS`): the answer, its time, the box counts
    and, after ``sat``, the counterexample ``x`` (as fed to the model) and ``y`` (lists)."""
    return {
        "model": model,
        "vnnlib": vnnlib,
        "method": method,
        "result": res.result,
        "time_s": round(res.time_s, 3),
        "timeout_s": timeout,
        "boxes": res.boxes,
        "box_answers": _counts_text(box_answers(res)),
        "stage": res.stage,
        "detail": res.detail,
        "x": res.x,
        "y": res.y,
    }
