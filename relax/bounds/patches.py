"""CROWN's intermediate bounds of convolutional layers with patch-shaped coefficients.

A backward pass started at one neuron of a convolutional layer only ever reaches that neuron's
receptive field: after ``L`` 3x3 convolutions its coefficients on a ``[C, H, W]`` node are
nonzero in a ``C x (2L + 1) x (2L + 1)`` window. :func:`crown`'s dense rows ``[S, B, C, H, W]``
carry (and transpose-convolve) the zeros of the whole map; here each row keeps only its window,
a *patch* ``[R, C, kh, kw]``, and the window's place follows from the row's position (the
"patches" mode of auto_LiRPA: Xu et al. 2020, "Automatic perturbation analysis for scalable
certified robustness and beyond", Appendix on convolutional layers). The bounds are the dense
pass's (same relaxations, same terms, same round-off allowance): only the zeros are skipped.

Geometry: row ``r`` starts at position ``(y_r, x_r)`` of the start node; on a node reached with
stride ``s`` and offset ``p`` (per spatial dim) its patch entry ``(i, j)`` is the coefficient of
position ``(y_r s - p + i, x_r s - p + j)``. A convolution ``(stride t, padding q, dilation d,
kernel K)`` maps ``(s, p, k)`` to ``(s t, p t + q, (k - 1) t + d (K - 1) + 1)`` (its transposed
convolution of the patch, no padding); entries that fall on the zero padding are masked when the
pass reaches a node. Per-position tensors (relaxation lines, round-off weights, scales, the
input box) are gathered into the rows' windows by index.

Transposed convolutions (stride ``t``) map a row's window back to a ``t`` times coarser grid, where
a row's corner would fall between grid points: the rows are split into the ``P x P`` *phases*
of their start position (``P``: the product of the pass's transposed strides), and each phase
has its own plan in the coarse position ``y' = y // P`` (corner ``y' s - p``, ``s`` a multiple
of every ``t`` met), so the geometry stays integer (:func:`_phase_groups`).

Ops: 2-D convolutions and transposed convolutions (any stride, padding, dilation, groups),
spatial paddings and crops of whole maps (a selection that shifts every channel: the window
shifts, padding constants add to the bias), elementwise affine maps,
additions of same-shaped nodes, elementwise activations, reshapes that only add or drop leading
1s, and selections of whole channels (slices, gathers and concatenations along the channel axis:
the coefficients go back to their channels, the window stays), on ``[C, H, W]`` nodes (or
``[1, ..., 1, C, H, W]``) from a ``[C, H, W]`` input box (boxes and l_inf balls). Anything
else: :func:`patch_plan` is None and :func:`crown` keeps its dense rows. alpha-CROWN's per-row
slopes (``[R, *shape]``) are gathered into each row's window where an activation's slope only
replaces its lower line (:func:`slopes_gatherable`: ReLU).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from relax.bounds.roundoff import SAFETY, gamma, max_abs
from relax.ir.graph import BoundGraph
from relax.ir.ops import Relaxation
from relax.ir.ops.base import Activation
from verify.deadline import stop_past
from verify.spec import InputSet, LpBall

__all__ = ["patch_plan", "PatchPlan", "PaddedMaps", "patch_lower_bounds", "patch_input_rows", "dense_to_patches", "patch_rows_lower_bounds", "chw_shape",
           "slopes_gatherable"]

#: patches are used when their numbers, summed over the nodes of the pass, are below this share
#: of the dense rows': each step also gathers the relaxation lines (and round-off weights) into
#: the windows, so near the maps' size patches cost more than dense rows (time per row measured
#: at 16-64 rows, float64, one thread: TinyYOLO share 0.18: 7.1 vs 20.7 ms dense, share 0.50:
#: 33.7 vs 24.0 ms; cifar10_resnet resnet_2b share 0.34: 0.2 vs 1.6 ms, share 0.57: 0.4 vs 0.4 ms)
MAX_PATCH_SHARE = 0.4

#: a convolution's step on patches of at most ``FOLD_MAX_WINDOW`` positions (``kh kw``) is one
#: matrix product and a fold (:func:`_conv_back_by_fold`) when the product's inner dimension (the
#: output channels) is at least ``FOLD_MIN_CHANNELS`` or its column buffer (``R kh kw C_in K K``)
#: at most ``FOLD_SMALL_COLUMNS`` numbers; float64, one thread (``benchmarks/RESULTS.md``): 64-256
#: channels 1.1-9x faster than ``conv_transpose2d`` at 64-1,024 rows, windows of 5 x 5 and more
#: slower; 16-32 channels faster only while the buffer is small (at 1,024-4,096 rows up to 5x slower)
FOLD_MAX_WINDOW = 16
FOLD_MIN_CHANNELS = 64
FOLD_SMALL_COLUMNS = 2**18

#: :class:`PaddedMaps` keeps at most this many numbers (128 MB in float64)
PADDED_BUDGET = 2**24

#: at most this many phases (``P_h P_w``, :class:`PatchPlan`): each runs its own pass on its rows
MAX_PHASES = 16

#: per spatial dim: (stride s, offset p, patch size k)
Geometry = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass
class PatchPlan:
    """The nodes a pass from ``start`` visits (reverse topological order, ``start`` first) and
    each one's patch geometry per phase ``(a, b)`` of the rows' start positions (``phase``:
    ``(P_h, P_w)``, ``(1, 1)`` without transposed convolutions; a row at ``(y, x)`` is in phase
    ``(y % P_h, x % P_w)`` at coarse position ``(y // P_h, x // P_w)``); ``width``: the largest
    patch ``C kh kw`` (numbers per row); ``channels``: for each channel selection, the input
    channel (counted over its inputs in order) of each of its output channels."""

    start: str
    order: list[str]
    geometries: dict[tuple[int, int], dict[str, Geometry]]
    width: int
    channels: dict[str, Tensor]
    phase: tuple[int, int] = (1, 1)


def chw_shape(shape) -> tuple[int, ...]:
    """``shape`` without its leading 1s beyond three dims (a ``[1, C, H, W]`` node is a map)."""
    s = tuple(shape)
    while len(s) > 3 and s[0] == 1:
        s = s[1:]
    return s


def _channel_map(op, out_shape: tuple[int, ...]) -> Tensor | None:
    """A selection that copies whole ``H x W`` channels of its (concatenated) inputs: the input
    channel ``[C_out]`` of each output channel; None for any other selection."""
    chw = chw_shape(out_shape)
    if op.const_pos.numel() or len(chw) != 3 or any(chw_shape(s)[1:] != chw[1:] or len(chw_shape(s)) != 3 for s in op.in_shapes):
        return None
    hw = chw[1] * chw[2]
    blocks = op.index.reshape(chw[0], hw)
    base = blocks[:, :1]
    if (base % hw).any() or not torch.equal(blocks, base + torch.arange(hw, device=blocks.device)):
        return None
    return (base[:, 0] // hw).long()


def _spatial_shift(op) -> tuple[int, int] | None:
    """A selection of one ``[C, H_in, W_in]`` input that pads or crops every channel alike
    (``y[c, i, j] = x[c, i - top, j - left]`` inside ``x``, a constant elsewhere): ``(top,
    left)``; None for any other selection. Cached on the op, with its padding constants
    (:func:`_padding_constants`)."""
    cached = op.__dict__.get("_patch_shift", False)
    if cached is not False:
        return cached
    op._patch_shift = None
    chw = chw_shape(op.out_shape)
    cin = chw_shape(op.in_shapes[0]) if len(op.in_shapes) == 1 else ()
    if len(chw) != 3 or len(cin) != 3 or cin[0] != chw[0] or not op.var_pos.numel():
        return None
    C, H, W = chw
    Hi, Wi = cin[1:]
    f, i = int(op.var_pos[0]), int(op.index[op.var_pos[0]])
    top, left = (f % (H * W)) // W - (i % (Hi * Wi)) // Wi, f % W - i % Wi
    c, y, x = torch.meshgrid(torch.arange(C), torch.arange(H) - top, torch.arange(W) - left, indexing="ij")
    inside = ((y >= 0) & (y < Hi) & (x >= 0) & (x < Wi)).reshape(-1)
    expected = (c * Hi * Wi + y * Wi + x).reshape(-1)
    if torch.equal(inside, op.from_input.reshape(-1).cpu()) and torch.equal(op.index.reshape(-1).cpu()[inside], expected[inside]):
        op._patch_shift = (int(top), int(left))
        const = torch.where(op.from_input, 0.0, op.const.to(torch.float64)).reshape(op.out_shape)
        op._patch_constants = const if bool(const.any()) else None
    return op._patch_shift


def _padding_constants(op) -> Tensor | None:
    """A padding's constants as a map of its output shape (0 where it copies its input), None
    when they are all 0 (:func:`_spatial_shift` found the op a padding)."""
    _spatial_shift(op)  # finds and caches them
    return op.__dict__.get("_patch_constants")


def _conv_ok(op) -> bool:
    return (op.kind in ("conv", "conv_transpose") and getattr(op, "nd", 0) == 2
            and all(isinstance(v, int) for v in (*op.stride, *op.padding, *op.dilation)))


def _node_ok(graph: BoundGraph, name: str) -> bool:
    n = graph.by_name[name]
    op = n.op
    if len(chw_shape(n.shape)) != 3:
        return False
    if op.nonlinear:
        return bool(getattr(op, "elementwise", False)) and len(n.inputs) == 1
    if op.kind == "add":
        return all(tuple(s) == tuple(n.shape) for s in op.in_shapes)
    if op.kind == "elementwise affine":
        return tuple(op.in_shape) == tuple(n.shape) and all(v is None or v.dim() <= len(n.shape) for v in (op.scale, op.shift))
    if op.kind == "reshape":
        return chw_shape(op.in_shape) == chw_shape(op.out_shape)
    if op.kind == "select":
        return _channel_map(op, n.shape) is not None or _spatial_shift(op) is not None
    return _conv_ok(op)


def _through(op, g: Geometry) -> Geometry | None:
    """The geometry of the rows' coefficients on ``op``'s input(s), from that on its output;
    None where a transposed convolution's stride does not divide the rows' stride."""
    if op.nonlinear:
        return g
    if op.kind == "select":
        shift = _spatial_shift(op)
        return g if shift is None else tuple((s, p + o, k) for (s, p, k), o in zip(g, shift))  # type: ignore[return-value]
    if op.kind == "conv_transpose":
        out = []
        for (s, p, k), t, q, d, K in zip(g, op.stride, op.padding, op.dilation, op.W.shape[2:]):
            if s % t:
                return None
            first = -((p - q + d * (K - 1)) // t)  # ceil((q - p - d (K - 1)) / t): the first input reached
            out.append((s // t, -first, (k - 1 + q - p) // t - first + 1))
        return tuple(out)  # type: ignore[return-value]
    if op.kind != "conv":
        return g
    return tuple((s * t, p * t + q, (k - 1) * t + d * (K - 1) + 1)  # type: ignore[return-value]
                 for (s, p, k), t, q, d, K in zip(g, op.stride, op.padding, op.dilation, op.W.shape[2:]))


def _transposed_back(op, A: Tensor, g: Geometry, g_in: Geometry) -> Tensor:
    """Patches ``A [R, C_out, kh, kw]`` (geometry ``g``) of a transposed convolution's output
    onto its input (geometry ``g_in``: :func:`_through`): input entry ``i`` of a window meets
    output entries ``i t + kk d + delta`` (``delta = p - q - p_in t``), the convolution of the
    shifted patch with the weights (the transposed convolution's adjoint)."""
    pads, ks = [], []
    for (s, p, k), (_, p_in, k_in), t, q, d, K in zip(g, g_in, op.stride, op.padding, op.dilation, op.W.shape[2:]):
        delta = p - q - p_in * t
        need = (k_in - 1) * t + d * (K - 1) + 1  # the input length the k_in outputs read
        pads.append((-delta, need - (k - delta)))
        ks.append(k_in)
    (t0, b0), (l0, r0) = pads
    Ap = F.pad(A, (l0, r0, t0, b0))
    return F.conv2d(Ap, op.W.to(A.dtype), None, op.stride, 0, op.dilation, op.groups)[:, :, :ks[0], :ks[1]]


def _union(a: Geometry, b: Geometry) -> Geometry | None:
    out = []
    for (s1, p1, k1), (s2, p2, k2) in zip(a, b):
        if s1 != s2:
            return None
        p = max(p1, p2)
        out.append((s1, p, p + max(k1 - p1, k2 - p2)))
    return tuple(out)  # type: ignore[return-value]


def patch_plan(graph: BoundGraph, start: str, input_set: InputSet, window: tuple[int, int] = (1, 1),
               max_share: float | None = None) -> PatchPlan | None:
    """The plan of a patch pass from ``start`` (rows whose coefficients there fill a ``window``
    whose corner is the row's position), or None when some node on the way is not one of the
    supported ops, the input set is not a box, or the patches would not be smaller than
    ``max_share`` (default :data:`MAX_PATCH_SHARE`; ``inf``: any size) of the dense rows (summed
    over the nodes)."""
    if len(chw_shape(graph.input_shape)) != 3 or (isinstance(input_set, LpBall) and not math.isinf(input_set.p)):
        return None
    anc = {start}
    order = []
    for n in reversed(graph.nodes):
        if n.name in anc:
            order.append(n.name)
            anc.update(n.inputs)
    if not all(_node_ok(graph, name) for name in order):
        return None
    phase = tuple(math.prod(graph.by_name[k].op.stride[d] for k in order if graph.by_name[k].op.kind == "conv_transpose")
                  for d in range(2))
    if phase[0] * phase[1] > MAX_PHASES:
        return None
    geometries = {}
    for a in range(phase[0]):
        for b in range(phase[1]):
            geometry = _phase_geometry(graph, order, ((phase[0], -a, window[0]), (phase[1], -b, window[1])))
            if geometry is None:
                return None
            geometries[(a, b)] = geometry
    shapes = {k: chw_shape(graph.shape(k)) for k in geometries[(0, 0)]}
    sizes = [{k: shapes[k][0] * g[0][2] * g[1][2] for k, g in geo.items()} for geo in geometries.values()]
    width = max(max(z.values()) for z in sizes)
    patch = max(sum(z.values()) for z in sizes)
    dense = sum(math.prod(shapes[k]) for k in shapes)
    if patch >= (MAX_PATCH_SHARE if max_share is None else max_share) * dense:
        return None
    channels = {k: _channel_map(graph.by_name[k].op, graph.shape(k)) for k in order if graph.by_name[k].op.kind == "select"}
    return PatchPlan(start, order, geometries, width, channels, phase)  # type: ignore[arg-type]


def _phase_geometry(graph: BoundGraph, order: list[str], first: Geometry) -> dict[str, Geometry] | None:
    """Each node's geometry for rows whose window on ``order[0]`` is ``first``; None where a
    transposed convolution does not fit (:func:`_through`) or paths meet at different strides."""
    geometry: dict[str, Geometry] = {order[0]: first}
    for name in order:
        n = graph.by_name[name]
        g = _through(n.op, geometry[name])
        if g is None:
            return None
        for i in n.inputs:
            u = _union(geometry[i], g) if i in geometry else g
            if u is None:
                return None
            geometry[i] = u
    return geometry


def _phase_groups(graph: BoundGraph, plan: PatchPlan, pos: Tensor):
    """The rows of each phase of ``plan``: ``(geometry, coarse (H0, W0), rows [r] or None for all,
    coarse positions [r])`` for every phase that has rows (``pos [R]``: flat positions on the
    start node)."""
    C0, H0, W0 = chw_shape(graph.shape(plan.start))
    Ph, Pw = plan.phase
    if plan.phase == (1, 1):
        yield plan.geometries[(0, 0)], (H0, W0), None, pos
        return
    y, x = pos // W0, pos % W0
    Hc, Wc = -(-H0 // Ph), -(-W0 // Pw)
    key = (y % Ph) * Pw + x % Pw
    for (a, b), geometry in plan.geometries.items():
        rows = (key == a * Pw + b).nonzero().flatten()
        if rows.numel():
            yield geometry, (Hc, Wc), rows, (y[rows] // Ph) * Wc + x[rows] // Pw


def _in_row_order(parts: list[Tensor], rows: list[Tensor | None]) -> Tensor:
    """The phases' results ``parts`` (rows ``rows``) back in the rows' order."""
    if rows == [None]:
        return parts[0]
    return torch.cat(parts)[torch.argsort(torch.cat(rows))]  # type: ignore[arg-type]


def _windows(g: Geometry, out_hw: tuple[int, int], hw: tuple[int, int], pos: Tensor) -> tuple[tuple[int, int, int, int], Tensor]:
    """The padding ``(left, right, top, bottom)`` that holds every window of a ``hw`` map, and
    each row's window entries as flat indices ``[R, kh, kw]`` into the padded map (``out_hw``:
    the start node's ``(H0, W0)``; ``pos [R]``: each row's flat start position)."""
    pads, base, corner = _window_base(g, out_hw, hw, pos.device)
    (s1, s2), W0, Wp = corner
    return pads, ((pos // W0) * (s1 * Wp) + (pos % W0) * s2).view(-1, 1, 1) + base


@functools.lru_cache(maxsize=4096)
def _window_base(g: Geometry, out_hw: tuple[int, int], hw: tuple[int, int], device: torch.device
                 ) -> tuple[tuple[int, int, int, int], Tensor, tuple[tuple[int, int], int, int]]:
    """:func:`_windows`' parts that do not depend on the rows: the padding, the flat offsets of a
    window's entries from its corner ``[1, kh, kw]``, and ``((s1, s2), W0, Wp)`` for the corners
    (built once per geometry: a pass makes them at every node of every chunk)."""
    (s1, p1, k1), (s2, p2, k2) = g
    (H0, W0), (H, W) = out_hw, hw
    r1, r2 = max(0, (H0 - 1) * s1 + k1 - p1 - H), max(0, (W0 - 1) * s2 + k2 - p2 - W)
    t1, t2 = max(0, p1), max(0, p2)  # a negative offset (a phase's first rows) needs no padding: the corners move in
    Wp = W + t2 + r2
    ii = torch.arange(k1, device=device).view(1, k1, 1) + (t1 - p1)
    jj = torch.arange(k2, device=device).view(1, 1, k2) + (t2 - p2)
    return (t2, r2, t1, r1), ii * Wp + jj, ((s1, s2), W0, Wp)


def _padded_cols(t: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    """``t [B, C, H, W]`` zero-padded by ``pads``, as ``[B, Hp Wp, C]`` (each window entry's channels
    read together; window corners at ``(y s1, x s2)`` of the padded map)."""
    B, C = t.shape[:2]
    return F.pad(t, pads).reshape(B, C, -1).transpose(1, 2)


def _gather_cols(cols: Tensor, flat: Tensor, bidx: Tensor) -> Tensor:
    """The windows ``flat [R, kh, kw]`` of :func:`_padded_cols`' map, ``[R, C, kh, kw]``."""
    R, C = flat.shape[0], cols.shape[2]
    if cols.shape[0] == 1:  # one map for every row: a plain index_select of its entries
        got = cols[0].index_select(0, flat.reshape(-1)).view(R, -1, C)
    else:
        got = cols[bidx.view(-1, 1), flat.reshape(R, -1)]
    return got.transpose(1, 2).reshape(R, C, *flat.shape[1:])


class PaddedMaps:
    """The per-position maps that one node's rows gather into their windows (relaxation lines,
    round-off weights, constants, the input box), padded once and kept across the chunks and
    phases of the rows (a chunk of a few rows otherwise pads each whole map again; carvana's
    upsample net: 9 % of its widest node's rows, ``benchmarks/RESULTS.md``). Keyed by ``(node,
    what, padding)``: valid while those maps do not change, i.e. for the rows of one node's box
    (:func:`relax.bounds.crown.bound_node`). Holds at most ``budget`` numbers; past it, maps are
    padded at each use."""

    def __init__(self, budget: int = PADDED_BUDGET) -> None:
        self.maps: dict[tuple, Tensor] = {}
        self.left = budget

    def cols(self, key: tuple, t: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
        """:func:`_padded_cols` of ``t`` (the map named ``key``), from the store or padded now."""
        got = self.maps.get((key, pads))
        if got is None:
            got = _padded_cols(t, pads)
            if got.numel() <= self.left:
                got = self.maps[(key, pads)] = got.contiguous()  # (each entry's channels next to each other: a faster gather)
                self.left -= got.numel()
        return got


def _scatter(A: Tensor, g: Geometry, out_hw: tuple[int, int], pos: Tensor, chw: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`_window_gather` for coefficients: patches ``A [R, C, kh, kw]`` placed in
    zero maps ``[R, C, H, W]`` (entries on the padding must be zero already)."""
    R, C = A.shape[:2]
    (left, right, top, bottom), flat = _windows(g, out_hw, chw[1:], pos)  # type: ignore[arg-type]
    Hp, Wp = chw[1] + top + bottom, chw[2] + left + right
    out = A.new_zeros(R, C, Hp * Wp).scatter_(2, flat.view(R, 1, -1).expand(R, C, -1), A.reshape(R, C, -1))
    return out.view(R, C, Hp, Wp)[:, :, top:top + chw[1], left:left + chw[2]]


def _aligned(A: Tensor, g: Geometry, to: Geometry) -> Tensor:
    """Patches ``A`` of geometry ``g`` padded to the (larger) window of ``to``."""
    (_, p1, k1), (_, p2, k2) = g
    (_, q1, m1), (_, q2, m2) = to
    return F.pad(A, (q2 - p2, m2 - k2 - (q2 - p2), q1 - p1, m1 - k1 - (q1 - p1)))


def slopes_gatherable(graph: BoundGraph, acts: list[str]) -> bool:
    """Whether alpha-CROWN's per-row slopes of the activations ``acts`` can be gathered into
    patches: each optimisable one replaces its lower slope only (:meth:`Activation.alpha_slope`,
    e.g. ReLU), so its lines stay the relaxation's, gathered by position (ops that rebuild their
    lines from the slopes, sigmoid and tanh, keep dense rows)."""
    return all(not graph.by_name[a].op.optimisable or type(graph.by_name[a].op).alpha_slope is not Activation.alpha_slope
               for a in acts)


def _step(graph: BoundGraph, name: str, A: Tensor, relax: dict[str, Relaxation], at: Callable[..., Tensor],
          channels: Tensor | None, geometry: tuple[Geometry, Geometry], alpha: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
    """Node ``name``'s coefficients ``A [R, C, kh, kw]`` onto each of its inputs and the bias
    ``[R]`` the step adds; ``at(t, what)`` gathers a per-position tensor ``[B, *shape]`` of this node
    (named ``what`` among its maps) into the rows' windows; ``channels``: a channel selection's map (:func:`_channel_map`);
    ``geometry``: the rows' geometry on the node and on its input (:func:`_through`);
    ``alpha``: alpha-CROWN's lower slopes of each row, already in its window ``[R, C, kh, kw]``
    (:func:`slopes_gatherable` ops only)."""
    n = graph.by_name[name]
    op, shape = n.op, n.shape
    if op.nonlinear:
        r = relax[name]
        lw, lb, uw, ub = (at(_full(v.to(A.dtype), shape), k) for v, k in zip((r.lw, r.lb, r.uw, r.ub), ("lw", "lb", "uw", "ub")))
        if alpha is not None:  # the op's own rule (ReLU: the slope where the neuron is unstable), per window entry
            extra = at(_full(r.extra.to(A.dtype), shape), "extra")
            extra = extra > 0.5 if r.extra.dtype == torch.bool else extra
            lw = op.alpha_slope(alpha, Relaxation(lw, lb, uw, ub, extra=extra))
        pos = A > 0
        zero = torch.zeros((), dtype=A.dtype, device=A.device)
        b = torch.where(pos, lb, torch.where(A < 0, ub, zero))
        return [A * torch.where(pos, lw, uw)], (A * b).sum((1, 2, 3))
    if op.kind == "add":
        return [A * s for s in op.signs], None
    if op.kind == "reshape":
        return [A], None
    if op.kind == "select" and channels is None:  # a padding or crop (:func:`_spatial_shift`): the window moved
        const = _padding_constants(op)
        return [A], None if const is None else (A * at(_full(const.to(device=A.device, dtype=A.dtype), shape), "constant")).sum((1, 2, 3))
    if op.kind == "select":
        counts = [chw_shape(s)[0] for s in op.in_shapes]
        full = A.new_zeros(A.shape[0], sum(counts), *A.shape[2:]).index_add_(1, channels, A)  # type: ignore[arg-type]
        return list(full.split(counts, 1)), None
    if op.kind == "elementwise affine":
        A_in = A if op.scale is None else A * at(_full(op.scale.to(A.dtype), shape), "scale")
        return [A_in], None if op.shift is None else (A * at(_full(op.shift.to(A.dtype), shape), "shift")).sum((1, 2, 3))
    bias = None if op.b is None else (A.sum((2, 3)) * op.b.to(A.dtype)).sum(1)
    if op.kind == "conv_transpose":
        return [_transposed_back(op, A, *geometry)], bias
    if op.groups == 1 and A.shape[2] * A.shape[3] <= FOLD_MAX_WINDOW and \
            (A.shape[1] >= FOLD_MIN_CHANNELS or A.shape[0] * A.shape[2] * A.shape[3] * op.W[0].numel() <= FOLD_SMALL_COLUMNS):
        return [_conv_back_by_fold(A, op.W.to(A.dtype), op.stride, op.dilation)], bias
    return [F.conv_transpose2d(A, op.W.to(A.dtype), None, op.stride, 0, 0, op.groups, op.dilation)], bias


def _conv_back_by_fold(A: Tensor, W: Tensor, stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``F.conv_transpose2d(A, W, stride, dilation)`` of patches ``A [R, C_out, kh, kw]`` as one
    matrix product ``[R kh kw, C_out] x [C_out, C_in K K]`` and a fold that sums each window
    entry's kernel-sized block into place (the transposed convolution's own kernel multiplies
    each row's small window separately)."""
    R, C_out, kh, kw = A.shape
    C_in, K1, K2 = W.shape[1:]
    cols = (A.permute(0, 2, 3, 1).reshape(R * kh * kw, C_out) @ W.reshape(C_out, -1)).view(R, kh * kw, -1).transpose(1, 2)
    out = ((kh - 1) * stride[0] + dilation[0] * (K1 - 1) + 1, (kw - 1) * stride[1] + dilation[1] * (K2 - 1) + 1)
    return F.fold(cols, out, (K1, K2), dilation=dilation, stride=stride)


def _window_gather(g: Geometry, chw: tuple[int, ...], out_hw: tuple[int, int], bidx: Tensor, pos: Tensor,
                   maps: PaddedMaps | None = None, node: str = "") -> Callable[..., Tensor]:
    """``at(t, what=None)``: ``t [B or 1, *shape]`` (or ``[B or 1, 1, H, W]``) of a node whose map is
    ``chw`` -> ``[R, C, kh, kw]``, ``t`` in each row's window (zero outside the map; ``bidx [R]``:
    each row's batch element; the rest as in :func:`_windows`; only the windows are read, an index
    per window entry); with ``maps`` and a name ``what``
    for ``t`` among the node's maps, its padded map is kept in ``maps`` (:class:`PaddedMaps`)."""
    pads, flat = _windows(g, out_hw, chw[1:], pos)  # type: ignore[arg-type]  # once for every tensor of the node

    def at(t: Tensor, what: str | None = None) -> Tensor:
        t = t.reshape(t.shape[0], -1, *chw[1:])
        cols = _padded_cols(t, pads) if maps is None or what is None else maps.cols((node, what), t, pads)
        return _gather_cols(cols, flat, bidx)
    return at


def _full(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A per-position tensor broadcast to ``[B or 1, *shape]``."""
    return v.expand(v.shape[0], *shape) if v.dim() == len(shape) + 1 else v.expand(shape).unsqueeze(0)


def patch_lower_bounds(graph: BoundGraph, plan: PatchPlan, idx: Tensor, bidx: Tensor, sign: Tensor,
                       relax: dict[str, Relaxation], weights: dict[str, Tensor | None] | None, input_set: InputSet,
                       alphas: dict[str, Tensor] | None = None, stop_at: float | None = None,
                       maps: PaddedMaps | None = None) -> Tensor:
    """Lower bounds ``[R]`` of ``sign_r * z[bidx_r, idx_r]`` (``z``: the plan's start node, ``idx``
    flat indices into its ``[C, H, W]``) over the input set: the CROWN pass of
    :func:`relax.bounds.crown.backward` with the relaxations ``relax`` (``[B or 1, *shape]``)
    and, with ``weights``, its round-off allowance (then a bound of the exact network);
    ``alphas``: alpha-CROWN's lower slopes of each row, ``{activation: [R, *shape]}``
    (:func:`slopes_gatherable` ops); ``stop_at``: a hard deadline (``perf_counter`` value), past
    which the pass raises :class:`verify.deadline.DeadlineExpired` at its next step; ``maps``: the
    padded maps kept across the chunks of one node's rows (:class:`PaddedMaps`)."""
    A0, pos = _unit_rows(graph, plan, idx, sign)
    return patch_rows_lower_bounds(graph, plan, A0, pos, bidx, relax, weights, input_set, alphas=alphas, stop_at=stop_at, maps=maps)


def patch_rows_lower_bounds(graph: BoundGraph, plan: PatchPlan, A0: Tensor, pos: Tensor, bidx: Tensor, relax: dict[str, Relaxation],
                            weights: dict[str, Tensor | None] | None, input_set: InputSet,
                            bias0: Tensor | None = None, err0: Tensor | None = None, alphas: dict[str, Tensor] | None = None,
                            stop_at: float | None = None, maps: PaddedMaps | None = None) -> Tensor:
    """:func:`patch_lower_bounds` of rows given as patches ``A0 [R, C, kh, kw]`` of the plan's
    start node (the plan's window; ``pos [R]``: each window's corner, flat), plus a bias and a
    round-off ``[R]`` carried from the part of the pass before the start node."""
    lo, hi = (t.to(A0.dtype) for t in input_set.bounds())
    parts, order = [], []
    for rows, sel, (A, bias, err, at_in), _ in _phase_passes(graph, plan, A0, pos, bidx, relax, weights, alphas, stop_at, maps):
        bias = bias if bias0 is None else bias + sel(bias0)
        err = err if err is None or err0 is None else err + sel(err0)
        low = (A * at_in((hi + lo) / 2, "centre")).sum((1, 2, 3)) - (A.abs() * at_in((hi - lo) / 2, "radius")).sum((1, 2, 3)) + bias
        if err is not None:
            err = err + gamma(math.prod(graph.input_shape), A.dtype) * (A.abs() * at_in(max_abs(lo, hi), "magnitude")).sum((1, 2, 3))
            low = low - SAFETY * err - torch.finfo(A.dtype).tiny
        parts.append(low)
        order.append(rows)
    return _in_row_order(parts, order)


def _phase_passes(graph: BoundGraph, plan: PatchPlan, A0: Tensor, pos: Tensor, bidx: Tensor, relax: dict[str, Relaxation],
                  weights: dict[str, Tensor | None] | None, alphas: dict[str, Tensor] | None, stop_at: float | None,
                  maps: PaddedMaps | None = None):
    """:func:`_input_patches` of each phase's rows (:func:`_phase_groups`): ``(rows, the selection
    of those rows from any ``[R, ...]`` tensor, the pass's result, (geometry, coarse grid, coarse
    positions))``."""
    for geometry, out_hw, rows, cpos in _phase_groups(graph, plan, pos):
        sel: Callable[[Tensor], Tensor] = (lambda v: v) if rows is None else (lambda v, r=rows: v[r])  # type: ignore[misc]
        got = _input_patches(graph, plan, geometry, out_hw, sel(A0), cpos, sel(bidx), relax, weights,
                             None if alphas is None else {k: sel(v) for k, v in alphas.items()}, stop_at, maps)
        yield rows, sel, got, (geometry, out_hw, cpos)


def patch_input_rows(graph: BoundGraph, plan: PatchPlan, idx: Tensor, bidx: Tensor, sign: Tensor,
                     relax: dict[str, Relaxation], weights: dict[str, Tensor | None] | None,
                     alphas: dict[str, Tensor] | None = None, stop_at: float | None = None,
                     maps: PaddedMaps | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows of :func:`patch_lower_bounds` before their concretisation, as dense linear bounds on
    the input: ``A [R, *input_shape]``, ``bias [R]`` and the steps' round-off ``err [R]`` (None
    without ``weights``), the terms of :func:`relax.bounds.crown.backward_form`'s rows."""
    A0, pos = _unit_rows(graph, plan, idx, sign)
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    order = []
    for rows, _, (A, bias, err, _), (geometry, out_hw, cpos) in _phase_passes(graph, plan, A0, pos, bidx, relax, weights, alphas, stop_at,
                                                                              maps):
        dense = _scatter(A, geometry[graph.input_name], out_hw, cpos, chw_shape(graph.input_shape))
        for part, v in zip(parts, (dense.reshape(A.shape[0], *graph.input_shape), bias, err)):
            if v is not None:
                part.append(v)
        order.append(rows)
    return _in_row_order(parts[0], order), _in_row_order(parts[1], order), _in_row_order(parts[2], order) if parts[2] else None


def _unit_rows(graph: BoundGraph, plan: PatchPlan, idx: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``sign_r e_{idx_r}`` of the start node as 1x1 patches ``[R, C, 1, 1]`` and positions."""
    C0, H0, W0 = chw_shape(graph.shape(plan.start))
    R = idx.shape[0]
    A = torch.zeros(R, C0, 1, 1, dtype=graph.dtype, device=idx.device)
    A[torch.arange(R, device=idx.device), idx // (H0 * W0), 0, 0] = sign.to(graph.dtype)
    return A, idx % (H0 * W0)


def dense_to_patches(A: Tensor, chw: tuple[int, ...], max_share: float = MAX_PATCH_SHARE) -> tuple[Tensor, Tensor, tuple[int, int]] | None:
    """Rows ``A [R, *shape]`` of a ``chw`` map as patches: ``[R, C, kh, kw]`` over the smallest
    window that holds every row's nonzero entries, each row's corner ``pos [R]`` (flat) and the
    window; None when the window is not below ``max_share`` of the map."""
    R, (C, H, W) = A.shape[0], chw
    A = A.reshape(R, C, H, W)
    support = (A != 0).any(1)  # [R, H, W]
    rows_on, cols_on = support.any(2), support.any(1)
    hh, ww = torch.arange(H, device=A.device), torch.arange(W, device=A.device)
    y0 = torch.where(rows_on, hh, H).amin(1).clamp(max=H - 1)
    x0 = torch.where(cols_on, ww, W).amin(1).clamp(max=W - 1)
    kh = max(1, int((torch.where(rows_on, hh, -1).amax(1) - y0).max()) + 1)
    kw = max(1, int((torch.where(cols_on, ww, -1).amax(1) - x0).max()) + 1)
    if kh * kw >= max_share * H * W:
        return None
    pos = y0 * W + x0
    g: Geometry = ((1, 0, kh), (1, 0, kw))
    return _window_gather(g, (C, H, W), (H, W), torch.arange(R, device=A.device), pos)(A), pos, (kh, kw)


def _input_patches(graph: BoundGraph, plan: PatchPlan, geometry: dict[str, Geometry], out_hw: tuple[int, int], A0: Tensor, pos: Tensor,
                   bidx: Tensor, relax: dict[str, Relaxation], weights: dict[str, Tensor | None] | None,
                   alphas: dict[str, Tensor] | None = None, stop_at: float | None = None, maps: PaddedMaps | None = None
                   ) -> tuple[Tensor, Tensor, Tensor | None, Callable[..., Tensor]]:
    """The backward pass of :func:`patch_lower_bounds` from the start patches ``A0 [R, C, kh, kw]``
    (corners ``pos [R]`` on the ``out_hw`` grid of one phase, whose ``geometry`` the rows have)
    down to the input: the input patches (zero on the padding), the bias
    ``[R]``, the steps' round-off ``[R]`` (None without ``weights``) and the gather of
    input-shaped tensors into the rows' windows. ``alphas``: per-row slopes ``{activation:
    [R, *shape]}``, gathered into the windows row by row. ``stop_at``, ``maps``: as in :func:`patch_lower_bounds`."""
    dt, dev, R = graph.dtype, A0.device, A0.shape[0]
    own_rows = torch.arange(R, device=dev)
    As = {plan.start: A0}
    bias = torch.zeros(R, dtype=dt, device=dev)
    err = torch.zeros(R, dtype=dt, device=dev)
    for name in plan.order:
        stop_past(stop_at, f"patch pass stopped at node {name!r}")
        g, shape, node = geometry[name], graph.shape(name), graph.by_name[name]
        at = _window_gather(g, chw_shape(shape), out_hw, bidx, pos, maps, name)
        A = As.pop(name) * at(torch.ones(1, 1, *chw_shape(shape)[1:], dtype=dt, device=dev), "on the map")  # nothing on the zero padding
        w = None if weights is None else weights.get(name)
        if w is not None:
            err = err + (A.abs() * at(_full(w.to(dt), shape), "round-off")).sum((1, 2, 3))
        alpha = None if alphas is None or name not in alphas else \
            _window_gather(g, chw_shape(shape), out_hw, own_rows, pos)(alphas[name].to(dt))
        own = _through(node.op, g)
        assert own is not None  # the plan checked every node
        A_ins, b = _step(graph, name, A, relax, at, plan.channels.get(name), (g, own), alpha)
        if b is not None:
            bias = bias + b
        for i, A_in in zip(node.inputs, A_ins):
            Ai = _aligned(A_in, own, geometry[i])
            As[i] = Ai if i not in As else As[i] + Ai
    chw = chw_shape(graph.input_shape)
    at_in = _window_gather(geometry[graph.input_name], chw, out_hw, bidx, pos, maps, graph.input_name)
    A = As.pop(graph.input_name) * at_in(torch.ones(1, 1, *chw[1:], dtype=dt, device=dev), "on the map")
    return A, bias, err if weights is not None else None, at_in
