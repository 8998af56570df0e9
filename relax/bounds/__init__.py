"""Public entry points: :func:`bounds` (bounds on ``C y + d``) and :func:`intermediate_bounds`
(boxes of every pre-activation, for LP/MILP and branch-and-bound).

Methods: ``"interval"`` (IBP), ``"crown"`` (CROWN backward pass, adaptive ReLU slopes),
``"deeppoly"`` (the same pass with DeepPoly's slope choices, see
:mod:`relax.ir.ops.activation`), ``"alpha-crown"`` (optimised ReLU lower slopes,
:mod:`relax.bounds.alpha`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verify.deadline import Deadline
from verify.precision import ieee_float32
from verify.spec import InputSet

from relax.ir.graph import BoundGraph, get_graph
from relax.bounds.interval import interval_bounds

__all__ = ["bounds", "lower_bounds", "intermediate_bounds", "METHODS", "prepare"]

METHODS = ("interval", "crown", "deeppoly", "alpha-crown")


def prepare(model: torch.nn.Module, input_set: InputSet, dtype: torch.dtype | None = None) -> tuple[BoundGraph, InputSet]:
    """The (cached) bound graph of ``model`` and the input set, both in ``dtype`` (default:
    the input set's dtype)."""
    lo, _ = input_set.bounds()
    dtype = dtype or lo.dtype
    if lo.dtype != dtype:
        input_set = input_set.to(dtype=dtype)
    return get_graph(model, tuple(input_set.shape), dtype), input_set


def bounds(
    model: torch.nn.Module,
    input_set: InputSet,
    C: Tensor | None = None,
    d: Tensor | None = None,
    method: str = "crown",
    *,
    dtype: torch.dtype | None = None,
    max_elements: int = 2**25,
    iterations: int = 20,
    lr: float = 0.1,
    optimize_intermediate: bool = True,
    bound_overrides: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sound bounds on ``C y + d`` for every ``y = model(x)``, ``x`` in ``input_set``.

    Args:
        model: torch module / fx GraphModule mapping ``[B, *input_shape] -> [B, K]``.
        input_set: a batched :class:`~verify.spec.InputSet`.
        C: ``[B, N, K]`` (or ``[N, K]``) spec rows; ``None`` = identity (bounds on ``y``).
        d: ``[B, N]`` offsets (default 0).
        method: one of :data:`METHODS`.
        dtype: compute dtype (e.g. ``torch.float64``); default the input set's.
        max_elements: chunk the backward pass so that no coefficient tensor exceeds this
            many elements (large nets get slower, not out of memory).
        iterations, lr, optimize_intermediate: alpha-CROWN options (:func:`relax.bounds.alpha.alpha_crown`).
        bound_overrides: ``{pre-activation node: (lo, hi)}`` per batch element, intersected
            with the computed intermediate bounds (branch-and-bound splits; see
            :func:`relax.bounds.crown.crown`).

    Returns:
        ``(lower, upper)``, each ``[B, N]`` (``[B, K]`` when ``C`` is None), in ``dtype``.
    """
    graph, input_set = prepare(model, input_set, dtype)
    C, d = _spec(graph, input_set, C, d)
    N = C.shape[1]
    low = lower_bounds(graph, input_set, torch.cat([C, -C], dim=1), method, max_elements=max_elements,
                       iterations=iterations, lr=lr, optimize_intermediate=optimize_intermediate,
                       bound_overrides=bound_overrides)
    return low[:, :N] + d, -low[:, N:] + d


def _spec(graph: BoundGraph, input_set: InputSet, C: Tensor | None, d: Tensor | None) -> tuple[Tensor, Tensor]:
    dt = graph.dtype
    B = input_set.batch_size
    K = graph.by_name[graph.output].shape[0]
    dev = input_set.device
    if C is None:
        C = torch.eye(K, dtype=dt, device=dev).expand(B, K, K)
    C = C.to(dtype=dt, device=dev)
    if C.dim() == 2:
        C = C.expand(B, *C.shape)
    if C.shape[0] != B or C.shape[2] != K:
        raise ValueError(f"C must be [B={B}, N, K={K}], got {tuple(C.shape)}")
    d = torch.zeros(C.shape[:2], dtype=dt, device=dev) if d is None else d.to(dtype=dt, device=dev).expand(C.shape[:2])
    return C, d


@ieee_float32()  # the round-off allowances assume IEEE arithmetic (no TF32 on a GPU)
def lower_bounds(
    graph: BoundGraph,
    input_set: InputSet,
    C: Tensor,
    method: str = "crown",
    *,
    max_elements: int = 2**25,
    iterations: int = 20,
    lr: float = 0.1,
    optimize_intermediate: bool = True,
    early_stop: bool = False,
    stop_fn=None,
    bound_overrides: dict[str, tuple[Tensor, Tensor]] | None = None,
    deadline: Deadline | None = None,
    forward: bool = False,
) -> Tensor:
    """Lower bounds ``[B, N]`` of ``C y`` (``C [B, N, K]``) on a prepared graph (see
    :func:`prepare`); the other arguments as in :func:`bounds`. ``early_stop`` (alpha-CROWN):
    stop optimising an input once ``stop_fn(lower [B, N]) -> Bool [B]`` (default: every row
    positive). ``deadline``: no alpha-CROWN step starts after it (the bounds are then the best
    of the steps done, at least CROWN's), and a CROWN pass stops tightening intermediate boxes
    there (the rest keep their interval boxes). ``forward``: CROWN within the forward linear
    bounds' boxes (:func:`relax.bounds.crown.crown`'s ``forward``: networks of few inputs)."""
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; use one of {', '.join(METHODS)}")
    if method == "interval":
        with torch.no_grad():
            lo, hi = input_set.bounds()
            boxes = interval_bounds(graph, lo, hi, known=bound_overrides)
            from relax.bounds.crown import box_row_bounds

            return box_row_bounds(C, *boxes[graph.output])
    from relax.bounds.alpha import alpha_crown, all_rows_positive
    from relax.bounds.crown import crown

    if _one_at_a_time(graph, input_set):  # each input's own dead ReLUs pruned (relax.bounds.crown.crown's prune)
        B, N = C.shape[:2]
        parts = []
        for b in range(B):
            def stop_b(low: Tensor, b: int = b) -> Tensor:  # stop_fn sees the whole batch's [B, N] bounds
                full = torch.full((B, N), -math.inf, dtype=low.dtype, device=low.device)
                full[b] = low[0]
                return (stop_fn or all_rows_positive)(full)[b:b + 1]

            ov = None if bound_overrides is None else {k: (l[b:b + 1], h[b:b + 1]) for k, (l, h) in bound_overrides.items()}
            parts.append(lower_bounds(graph, input_set.select([b]), C[b:b + 1], method, max_elements=max_elements,
                                      iterations=iterations, lr=lr, optimize_intermediate=optimize_intermediate,
                                      early_stop=early_stop, stop_fn=stop_b, bound_overrides=ov, deadline=deadline,
                                      forward=forward))
        return torch.cat(parts)
    if method in ("crown", "deeppoly"):  # DeepPoly's ReLU slopes are CROWN's
        with torch.no_grad():
            return crown(graph, input_set, C, mode=method, max_elements=max_elements, bound_overrides=bound_overrides, prune=True,
                         deadline=deadline, forward=forward).spec_lower()
    return alpha_crown(graph, input_set, C, iterations=iterations, lr=lr, optimize_intermediate=optimize_intermediate,
                       max_elements=max_elements, early_stop=early_stop, stop_fn=stop_fn, bound_overrides=bound_overrides,
                       deadline=deadline, prune=True, forward=forward).lower.detach()


#: graphs with at least this many weights in dense layers are bounded one input at a time on
#: the CPU (each input's own dead ReLUs pruned); smaller ones, and any graph on a GPU, as one batch
PER_INPUT_MIN_WEIGHTS = 100_000


def _one_at_a_time(graph: BoundGraph, input_set: InputSet) -> bool:
    from relax.ir.prune import prunable_relus
    from relax.ir.ops import Linear

    if input_set.batch_size <= 1 or input_set.device.type != "cpu" or not prunable_relus(graph):
        return False
    return sum(n.op.W.numel() for n in graph.nodes if isinstance(n.op, Linear)) >= PER_INPUT_MIN_WEIGHTS


def intermediate_bounds(
    model: torch.nn.Module,
    input_set: InputSet,
    method: str = "crown",
    *,
    dtype: torch.dtype | None = None,
    max_elements: int = 2**25,
    bound_overrides: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Boxes ``{node name: (lo, hi)}`` (each ``[B, *shape]``) of every pre-activation: the
    input of each ReLU / Sigmoid / Tanh / MaxPool node, in topological order. Node names are
    those of the fx graph (``BoundGraph.preactivations()``).

    ``method``: ``"interval"`` or ``"crown"`` / ``"deeppoly"`` (CROWN bounds intersected with
    IBP, computed layer by layer). ``bound_overrides`` as in :func:`bounds`.
    """
    graph, input_set = prepare(model, input_set, dtype)
    names = graph.preactivations()
    with torch.no_grad():
        if method == "interval":
            lo, hi = input_set.bounds()
            boxes = interval_bounds(graph, lo, hi, known=bound_overrides)
            return {k: boxes[k] for k in names}
        if method in ("crown", "deeppoly"):
            from relax.bounds.crown import crown

            res = crown(graph, input_set, None, mode=method, max_elements=max_elements, bound_overrides=bound_overrides)
            return {k: res.intermediate[k] for k in names}
    raise ValueError(f"intermediate_bounds: method must be interval, crown or deeppoly, got {method!r}")
