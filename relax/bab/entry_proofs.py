"""Deciding the undecided inputs of a network's step functions one entry at a time, each on the
input entries it depends on.

A segmentation property counts pixels: carvana_unet_2022's ``#{pixels whose argmax equals the
mask} > T`` is a sum of steps of the pixels' logit margins (``verify/onnx_argmax.py`` takes the
argmax on the logits). CROWN on the whole image decides most margins and the property then hangs
on the others: one linear relaxation of a 31 x 47 image is too loose for them, but each margin on
its own receptive field (:func:`relax.ir.restrict.restrict`: 147 inputs, a few thousand ReLUs) is
a small problem that alpha-CROWN or branch-and-bound decides in about a second.

The stage (:func:`prove_entries`) takes the undecided entries of every step's input (box
``lo <= 0 <= hi``), proves each on the side it has at the centre of the input set, the nearest to
proved first, and bounds the property again with the proved entries' boxes (a step whose input
lies on one side of 0 is exact; the ops after it take the images of those boxes) after as many
proofs as the last bounds suggest are still needed, until the property is proved or the stage's
time is up. It starts only when the property would be proved were every undecided entry on its
centre's side (one CROWN pass with those boxes): otherwise no set of these proofs can prove it.

Sound: an entry's box is narrowed only by a completed proof of ``decide`` on the restricted graph
(exactly the entry's function of the input entries it depends on, on the projection of the input
set onto them), and the property's bound is CROWN's with boxes that enclose every entry's values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from verify.spec import Box, InputSet, LinearSpec

from relax.bab import BabResult, RowSpec
from relax.ir.graph import BoundGraph, BoundGraphModule
from relax.ir.ops.elementwise import Step
from relax.ir.restrict import Restriction, cast, restrict

__all__ = ["EntryProblem", "property_bound", "prove_entries", "undecided_steps"]

#: how far past 0 the optimistic bound puts each undecided entry (a step's input strictly on its side)
SIDE_GAP = 1e-12
#: proofs before the property is first bounded again
FIRST_CHECK = 16
#: entries that cannot be restricted before the first proof that end the stage
UNRESTRICTED_STOP = 4
#: one entry's seconds: this share of the stage, at most this many median proofs, at least this
CAP_SHARE, CAP_MEDIANS, CAP_MIN_S = 0.05, 3.0, 2.0


@dataclass
class EntryProblem:
    """One undecided entry: ``node``'s flat entry ``index``, the ``side`` (+1 / -1) to prove, and
    its current box's distance from that side (``gap >= 0``)."""

    node: str
    index: int
    side: float
    gap: float


def undecided_steps(graph: BoundGraph, boxes: dict[str, tuple[Tensor, Tensor]], x_mid: Tensor) -> list[EntryProblem]:
    """The entries of the steps' inputs whose boxes ``[1, *shape]`` hold 0 (and more), each with
    the side it has at the input set's centre ``x_mid [1, *input]`` (entries exactly 0 there are
    left out), nearest to proved first."""
    nodes = sorted({n.inputs[0] for n in graph.nodes if isinstance(n.op, Step) and n.inputs[0] in boxes})
    if not nodes:
        return []
    values = graph.values(x_mid.to(graph.dtype), set().union(*(graph.ancestors(p) for p in nodes)))
    out = []
    for p in nodes:
        lo, hi = (t.reshape(-1).cpu() for t in boxes[p])
        v = values[p].reshape(-1).cpu()
        open_ = ((lo <= 0) & (hi >= 0) & (lo < hi) & (v != 0)).nonzero().flatten().tolist()
        for j in open_:
            side = 1.0 if v[j] > 0 else -1.0
            out.append(EntryProblem(p, j, side, float(-lo[j] if side > 0 else hi[j])))
    out.sort(key=lambda e: e.gap)
    return out


def _with_sides(boxes: dict[str, tuple[Tensor, Tensor]], sides: list[tuple[EntryProblem, float]]) -> dict[str, tuple[Tensor, Tensor]]:
    """``boxes`` with each entry moved to its side: ``lo >= bound`` (side +1) or ``hi <= -bound``
    (``bound > 0``: the step's input strictly on that side)."""
    out = dict(boxes)
    by_node: dict[str, list[tuple[EntryProblem, float]]] = {}
    for e, b in sides:
        by_node.setdefault(e.node, []).append((e, b))
    for p, items in by_node.items():
        lo, hi = (t.clone(memory_format=torch.contiguous_format) for t in out[p])  # (an image of a transpose is strided)
        lf, hf = lo.view(-1), hi.view(-1)
        for e, b in items:
            if e.side > 0:
                lf[e.index] = max(float(lf[e.index]), b)
            else:
                hf[e.index] = min(float(hf[e.index]), -b)
        out[p] = (lo, hi)
    return out


def _after(graph: BoundGraph, names: set[str]) -> set[str]:
    """The nodes that depend on any of ``names`` (not ``names`` themselves)."""
    seen: set[str] = set()
    todo = [c for n in names for c in graph.consumers[n]]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo.extend(graph.consumers[k])
    return seen - names


@dataclass
class _Stage:
    """The state of one :func:`prove_entries` run."""

    graph: BoundGraph
    x_set: InputSet
    rs: RowSpec
    boxes: dict[str, tuple[Tensor, Tensor]]
    bound: Callable[[dict[str, tuple[Tensor, Tensor]]], float]
    proved: list[tuple[EntryProblem, float]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds of each proof
    falsified: int = 0
    unrestricted: int = 0
    checks: int = 0
    bound_s: float = 0.0  # the longest bound of the property so far

    def check(self, proved: list[tuple[EntryProblem, float]]) -> float:
        """The property's bound with the ``proved`` entries' boxes (timed)."""
        t = time.perf_counter()
        low = self.bound(_with_sides(self.boxes, proved))
        self.bound_s, self.checks = max(self.bound_s, time.perf_counter() - t), self.checks + 1
        return low

    def cap(self, stage_s: float) -> float:
        """Seconds one entry may take: :data:`CAP_SHARE` of the stage, or :data:`CAP_MEDIANS` times
        the median proof once there are a few (an entry far harder than the others waits), at
        least :data:`CAP_MIN_S`."""
        c = CAP_SHARE * stage_s
        if len(self.times) >= 4:
            c = min(c, CAP_MEDIANS * sorted(self.times)[len(self.times) // 2])
        return max(CAP_MIN_S, c)

    def restricted(self, e: EntryProblem) -> tuple[BoundGraphModule, Box, LinearSpec, dict[str, tuple[Tensor, Tensor]]] | None:
        """Entry ``e`` as its own problem: the model of its restricted graph (float64, and float32
        for the searches' optimisation steps), the projection of the input box onto the entries it
        depends on, the row ``side * entry > 0``, and the boxes of the restricted graph's
        pre-activations that the whole network's pass gave (the same neurons on the same set)."""
        r: Restriction | None = restrict(self.graph, e.node, torch.tensor([e.index]))
        if r is None:
            return None
        graphs = {torch.float64: r.graph, torch.float32: cast(r.graph, torch.float32)}
        known: dict[str, tuple[Tensor, Tensor]] = {}
        for p in r.graph.preactivations():
            if p in self.boxes and p in r.entries and p != r.graph.input_name:
                sel = r.entries[p].to(self.boxes[p][0].device)
                lo_p, hi_p = self.boxes[p]
                known[p] = (lo_p.reshape(1, -1)[:, sel].double(), hi_p.reshape(1, -1)[:, sel].double())
        lo, hi = self.x_set.bounds()
        sel = r.input_index.to(lo.device)
        box = Box(lo.reshape(1, -1)[:, sel], hi.reshape(1, -1)[:, sel])
        spec = LinearSpec(torch.tensor([[[e.side]]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long))
        return BoundGraphModule(graphs, torch.float64), box, spec, known


def property_bound(graph: BoundGraph, x_set: InputSet, rs: RowSpec, nodes: set[str], deadline: float
                   ) -> Callable[[dict[str, tuple[Tensor, Tensor]]], float]:
    """``bound(boxes)``: the margin lower bound of ``rs`` by CROWN with the pre-activation
    ``boxes`` as given, except those after ``nodes`` (bounded again from the given ones: a step's
    consumers take the images of its decided entries); ``-inf`` past ``deadline``."""
    from relax.bounds.crown import crown
    from verify.deadline import DeadlineExpired

    after = _after(graph, nodes)
    C, d = rs.batch(1)

    def bound(boxes: dict[str, tuple[Tensor, Tensor]]) -> float:
        given = {k: v for k, v in boxes.items() if k not in after}
        try:
            with torch.no_grad():
                low = crown(graph, x_set, C.to(graph.dtype), intermediate=given, stop_at=deadline).spec_lower()
        except DeadlineExpired:
            return -math.inf
        return float(rs.margin(low + d.to(low.dtype))[0])

    return bound


def prove_entries(graph: BoundGraph, x_set: InputSet, rs: RowSpec, boxes: dict[str, tuple[Tensor, Tensor]],
                  decide: Callable[[torch.nn.Module, Box, LinearSpec, float, dict], BabResult], deadline: float,
                  margin: float) -> BabResult | None:
    """The stage of the module docstring on the property ``rs`` over ``x_set`` (a box), from the
    first CROWN pass's pre-activation ``boxes`` (``[1, *shape]``); ``decide(model, box, spec,
    seconds, boxes)``: a complete search of one entry's problem (branch-and-bound) from the
    restricted graph's known pre-activation boxes. Returns the certified result, an unknown one
    with the best bound when the stage ran out of time, or None when it does not apply (no
    undecided step, an entry whose graph cannot be restricted, or a property that the centre's
    sides would not prove)."""
    if not isinstance(x_set, Box) and not math.isinf(getattr(x_set, "p", math.inf)):
        return None
    lo, hi = x_set.bounds()
    todo = undecided_steps(graph, boxes, (lo + hi) / 2)
    if not todo or time.perf_counter() >= deadline:
        return None
    bound = property_bound(graph, x_set, rs, {e.node for e in todo}, deadline)
    st = _Stage(graph, x_set, rs, boxes, bound)
    t0 = time.perf_counter()
    if bound(_with_sides(boxes, [(e, SIDE_GAP) for e in todo])) <= margin:
        return None
    low = st.check([])
    next_check, since = FIRST_CHECK, 0
    left = lambda: deadline - time.perf_counter() - 2 * st.bound_s  # noqa: E731  (the last bound must fit)
    for e in todo:
        if left() <= 0:
            break
        problem = st.restricted(e)
        if problem is None:  # an op without a restriction rule (the stage stops when the first few all have one)
            st.unrestricted += 1
            if not st.proved and st.unrestricted >= UNRESTRICTED_STOP:
                return None
            continue
        model, box, spec, known = problem
        t_e, budget = time.perf_counter(), min(st.cap(deadline - t0), left())  # after the restriction's own time
        if budget <= 0:
            break
        res = decide(model, box, spec, budget, known)
        if res.status == "certified" and float(res.lower) > 0:  # side * entry >= lower > 0 on the whole set
            st.proved.append((e, float(res.lower)))
            st.times.append(time.perf_counter() - t_e)
            since += 1
        elif res.status == "falsified":
            st.falsified += 1
        if since >= next_check:
            new = st.check(st.proved)
            if new > margin:
                return _result(st, "certified", new, t0)
            gained = (new - low) / since if new > low else 0.0
            next_check = max(1, int(0.9 * (margin - new) / gained)) if gained > 0 else FIRST_CHECK
            low, since = new, 0
    if since and time.perf_counter() < deadline:
        low = max(low, st.check(st.proved))
        if low > margin:
            return _result(st, "certified", low, t0)
    return _result(st, "unknown", low, t0)


def _result(st: _Stage, status: str, low: float, t0: float) -> BabResult:
    details = {"entries": {"proved": len(st.proved), "falsified": st.falsified, "unrestricted": st.unrestricted,
                           "bounds": st.checks, "seconds": round(time.perf_counter() - t0, 3)}}
    return BabResult(status, None, low, len(st.proved), reason="proved" if status == "certified" else "timeout", details=details)
