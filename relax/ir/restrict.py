"""The part of a bound graph that computes a few entries of one node: a small graph on the input
entries they depend on.

An entry of a convolutional network's layer depends on its receptive field only: a pixel of a
segmentation head on a 7 x 7 window of a 31 x 47 image, through 1,600 + 1,152 + 64 neurons
instead of the layers' 93,000 - 186,000. :func:`restrict` keeps, for every node, the entries the
chosen ones depend on (walking the ops' structure backward) and rewrites each op on those entries
alone, as a flat vector: a convolution or a linear layer becomes the dense matrix between the
kept entries (each entry of it one weight, placed by index arithmetic: no convolution is
evaluated), per-entry ops (activations, elementwise affine maps, sums, moves and selections) act
on the kept entries in the order of their outputs. The small graph computes exactly the chosen
entries from the kept input entries (the others cannot change them), so its bounds and searches
decide those entries on the whole input set: branch-and-bound then splits a few thousand ReLUs of
one receptive field (:mod:`relax.bab.entry_proofs`).

A convolution of few taps per entry (average pooling, depthwise) whose dense matrix would be large
becomes a sum of its taps: a selection and a weight per tap. Transposed convolutions take the
same index arithmetic, read backward. Ops without a rule here (max-pooling, normalisations,
products, reductions) make :func:`restrict` return None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relax.ir.graph import BNode, BoundGraph
from relax.ir.ops import Activation, Add, Conv, ConvTranspose, ElemAffine, Linear, Permute, Reshape, Select

__all__ = ["Restriction", "cast", "restrict", "needed_entries"]

#: the most nonzero weights a restricted affine op may hold (its dense matrix: kept outputs x kept inputs)
MAX_DENSE_ENTRIES = 2**24
#: the taps a restriction found per convolution: ``{id(op): (op, entries, (flat, weights, valid))}``
Taps = dict[int, tuple[Conv, Tensor, tuple[Tensor, Tensor, Tensor]]]

#: a convolution of at most this many taps per output entry (pooling, depthwise) whose dense
#: matrix would exceed this many entries is restricted as a sum of its taps (:func:`_tap_sum`)
TAP_SUM_MAX_TAPS, TAP_SUM_MIN_DENSE = 16, 2**20


@dataclass
class Restriction:
    """``graph`` maps the input entries ``input_index [n]`` (flat indices of the original input,
    ascending) to the chosen entries of the node (its output, in the order asked)."""

    graph: BoundGraph
    input_index: Tensor
    #: ``{original node: its kept entries (flat, ascending)}``: a restricted node of the same name
    #: holds exactly these entries of the original (in this order)
    entries: dict[str, Tensor]


def _broadcast_source(in_shape: tuple[int, ...], out_shape: tuple[int, ...], E: Tensor) -> Tensor:
    """Flat indices into ``in_shape`` of the output entries ``E`` of a broadcast to ``out_shape``."""
    src = torch.arange(math.prod(in_shape)).reshape(in_shape) if in_shape else torch.zeros((), dtype=torch.long)
    return src.broadcast_to(out_shape).reshape(-1)[E]


def _move_source(op, in_shape: tuple[int, ...], E: Tensor) -> Tensor:
    """Flat input index of each output entry ``E`` of a reshape or a permutation (the op applied
    to the indices themselves, exact in float64 up to 2^53 entries)."""
    idx = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape(1, *in_shape)
    return op.forward(idx).reshape(-1)[E].round().long()


def _out_positions(op: Conv, E: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Output channel ``[n]`` and spatial position per dim (``[n]`` each) of the flat output entries ``E``."""
    spatial_out = op.out_shape[1:]
    n_sp = math.prod(spatial_out)
    co, rest = E // n_sp, E % n_sp
    pos_out: list[Tensor] = []
    for s in reversed(spatial_out):
        pos_out.insert(0, rest % s)
        rest = rest // s
    return co, pos_out


def _tap_grid(cin_g: int, ksize: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """Every tap of a kernel as (channel in its group ``[T]``, offset per dim ``[T]`` each), channel first."""
    grids = torch.meshgrid(torch.arange(cin_g), *[torch.arange(k) for k in ksize], indexing="ij")
    return grids[0].reshape(-1), [g.reshape(-1) for g in grids[1:]]


def _conv_taps(op: Conv, E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For the output entries ``E [n]`` of a 1-d / 2-d convolution: ``(inputs [n, T], weights [n,
    T], valid [n, T])``, the flat input index and weight of each of the ``T`` taps of the entry's
    kernel (``Cin/groups`` channels x kernel positions) and whether the tap lies inside the input
    (a tap on the zero padding adds nothing)."""
    W = op.W
    co, pos_out = _out_positions(op, E)
    cin_g = W.shape[1]
    group = co // (op.out_shape[0] // op.groups)
    c_tap, k_taps = _tap_grid(cin_g, tuple(W.shape[2:]))
    valid = torch.ones(E.numel(), c_tap.numel(), dtype=torch.bool)
    flat = (group[:, None] * cin_g + c_tap[None, :])  # input channel [n, T]
    for i, s_in in enumerate(op.in_shape[1:]):
        p = pos_out[i][:, None] * op.stride[i] - op.padding[i] + k_taps[i][None, :] * op.dilation[i]
        valid &= (p >= 0) & (p < s_in)
        flat = flat * s_in + p.clamp(0, s_in - 1)
    weights = W.reshape(W.shape[0], -1).cpu()[co]  # W[co, c, k...] in the taps. order
    return flat, weights, valid


def _conv_transpose_taps(op: ConvTranspose, E: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_conv_taps` of a transposed convolution (``W [Cin, Cout/groups, *k]``): output
    position ``o`` meets input position ``i`` through kernel offset ``k`` where ``i stride = o +
    padding - k dilation`` (the transpose of a convolution's ``o stride - padding + k dilation``),
    a tap being valid where ``i`` is a whole position inside the input."""
    W = op.W
    co, pos_out = _out_positions(op, E)
    cout_g, cin_g = W.shape[1], W.shape[0] // op.groups
    group = co // cout_g
    c_tap, k_taps = _tap_grid(cin_g, tuple(W.shape[2:]))
    valid = torch.ones(E.numel(), c_tap.numel(), dtype=torch.bool)
    flat = group[:, None] * cin_g + c_tap[None, :]
    for i, s_in in enumerate(op.in_shape[1:]):
        num = pos_out[i][:, None] + op.padding[i] - k_taps[i][None, :] * op.dilation[i]
        p = torch.div(num, op.stride[i], rounding_mode="floor")
        valid &= (num % op.stride[i] == 0) & (p >= 0) & (p < s_in)
        flat = flat * s_in + p.clamp(0, s_in - 1)
    # W[g cin_g + c, j, k...] for output channel co = g cout_g + j, in the taps' (c, k...) order
    per_out = W.reshape(op.groups, cin_g, cout_g, -1).permute(0, 2, 1, 3).reshape(op.groups * cout_g, -1)
    return flat, per_out.cpu()[co], valid


def _taps_per_entry(op: Conv) -> int:
    """``T`` of :func:`_taps`: the input channels of an entry's group times the kernel's positions."""
    cin_g = op.W.shape[0] // op.groups if isinstance(op, ConvTranspose) else op.W.shape[1]
    return cin_g * math.prod(op.W.shape[2:])


def _taps(op: Conv, E: Tensor, known: Taps | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The taps of a convolution's output entries ``E``, plain or transposed; ``known``: the taps
    found before, by op (:func:`restrict` finds the entries a node needs, then builds the node on
    the same entries), used when their entries equal ``E``."""
    hit = None if known is None else known.get(id(op))
    if hit is not None and hit[0] is op and torch.equal(hit[1], E):
        return hit[2]
    got = _conv_transpose_taps(op, E) if isinstance(op, ConvTranspose) else _conv_taps(op, E)
    if known is not None:
        known[id(op)] = (op, E, got)
    return got


def _inputs_of(graph: BoundGraph, n: BNode, E: Tensor, taps: Taps | None = None) -> list[Tensor] | None:
    """The entries of each input of ``n`` that its output entries ``E`` depend on (flat, maybe
    repeated), or None when ``n`` has no rule here."""
    op = n.op
    shapes = [graph.shape(i) for i in n.inputs]
    if isinstance(op, (Reshape, Permute)):
        return [_move_source(op, shapes[0], E)]
    if isinstance(op, Select):
        g = op.index.cpu()[E][op.from_input.cpu()[E]]
        if g.numel() == 0:  # constants only (the border of a padding): one entry of the first input keeps the node an op
            g = torch.zeros(1, dtype=torch.long)
        offsets = [0]
        for s in op.sizes:
            offsets.append(offsets[-1] + s)
        return [g[(g >= offsets[k]) & (g < offsets[k + 1])] - offsets[k] for k in range(len(shapes))]
    if isinstance(op, ElemAffine):
        return [_broadcast_source(op.in_shape, n.shape, E)]
    if isinstance(op, Add):
        return [_broadcast_source(tuple(s), n.shape, E) for s in op.in_shapes]
    if isinstance(op, Conv) and op.nd in (1, 2):
        flat, _, valid = _taps(op, E, taps)
        return [flat[valid]]
    if isinstance(op, Linear) and op.W.dim() == 2 and len(shapes[0]) == 1 and len(n.shape) == 1:
        return [(op.W[E] != 0).any(0).nonzero().flatten().cpu()]
    if _per_entry_activation(graph, n):
        return [E]
    return None


def _per_entry_activation(graph: BoundGraph, n: BNode) -> bool:
    """An elementwise activation of one input of its own size without tensor constants (the
    same op then serves any subset of its entries, in any dtype)."""
    op = n.op
    if not isinstance(op, Activation) or not getattr(op, "elementwise", False) or len(n.inputs) != 1:
        return False
    if math.prod(graph.shape(n.inputs[0])) != n.numel:
        return False
    return not any(isinstance(v, Tensor) for v in vars(op).values())


def needed_entries(graph: BoundGraph, node: str, entries: Tensor, taps: Taps | None = None) -> dict[str, Tensor] | None:
    """``{name: ascending flat indices}``: the entries of every node (and of the input) that
    ``node``'s ``entries`` depend on; None when an op on the way has no rule here. ``taps``: filled
    with the convolutions' taps of those entries (:func:`_taps`)."""
    masks: dict[str, Tensor] = {}

    def mark(name: str, idx: Tensor) -> None:
        if idx.numel() == 0:  # no entry of it is needed (a selection's constants alone)
            return
        if name not in masks:
            masks[name] = torch.zeros(math.prod(graph.shape(name)), dtype=torch.bool)
        masks[name][idx] = True

    mark(node, entries.cpu().long())
    need: dict[str, Tensor] = {}
    for n in reversed(graph.nodes):
        if n.name not in masks:
            continue
        need[n.name] = E = masks.pop(n.name).nonzero().flatten()
        ins = _inputs_of(graph, n, E, taps)
        if ins is None:
            return None
        for name, idx in zip(n.inputs, ins):
            mark(name, idx)
    if graph.input_name not in masks:
        return None
    need[graph.input_name] = masks[graph.input_name].nonzero().flatten()
    return need


def _aligned(name: str, src: str, positions: Tensor, n_src: int, dtype: torch.dtype) -> BNode:
    """A selection node: entry ``k`` is entry ``positions[k]`` of ``src`` (``n_src`` entries)."""
    n = positions.numel()
    op = Select(positions, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=dtype), [(n_src,)], (n,))
    return BNode(name, op, [src], (n,))


def _position(need: dict[str, Tensor], name: str, flat: Tensor) -> Tensor:
    """Where the flat indices ``flat`` of node ``name`` lie in its kept entries."""
    return torch.searchsorted(need[name], flat)


def _conv_bias(op: Conv, E: Tensor) -> Tensor | None:
    """The bias of the output entries ``E`` (its output channel's), on the CPU."""
    return None if op.b is None else op.b.reshape(-1).cpu()[E // math.prod(op.out_shape[1:])]


def _dense_conv(op: Conv, E: Tensor, kept_in: Tensor, taps: Taps | None = None) -> tuple[Tensor, Tensor | None] | None:
    """The convolution between its output entries ``E`` and input entries ``kept_in`` as a matrix
    ``[len(E), len(kept_in)]`` and the bias of ``E`` (None past :data:`MAX_DENSE_ENTRIES`)."""
    if E.numel() * kept_in.numel() > MAX_DENSE_ENTRIES:
        return None
    flat, weights, valid = _taps(op, E, taps)
    M = torch.zeros(E.numel(), kept_in.numel(), dtype=op.W.dtype)
    rows = torch.arange(E.numel())[:, None].expand_as(flat)
    M[rows[valid], torch.searchsorted(kept_in, flat[valid])] = weights.cpu()[valid]
    return M, _conv_bias(op, E)


def _tap_sum(name: str, op: Conv, E: Tensor, src: str, kept_in: Tensor, dtype: torch.dtype,
             taps: Taps | None = None) -> list[BNode]:
    """A convolution of few taps per entry (pooling, depthwise) on its output entries ``E`` as the
    sum over its ``T`` taps of each tap's input entry (a selection, 0 on the padding) times its
    weight (an elementwise affine map, the bias on the first): ``T`` vectors of ``len(E)`` where
    the dense matrix would hold ``len(E) x len(kept_in)`` mostly zero entries."""
    flat, weights, valid = _taps(op, E, taps)
    bias, m, nodes = _conv_bias(op, E), E.numel(), []
    used = [t for t in range(flat.shape[1]) if bool(valid[:, t].any())] or [0]  # a tap on the padding alone adds nothing
    for k, t in enumerate(used):
        pos = torch.where(valid[:, t], torch.searchsorted(kept_in, flat[:, t].contiguous()), torch.zeros_like(flat[:, t]))
        sel = Select(pos, valid[:, t].clone(), torch.zeros(m, dtype=dtype), [(kept_in.numel(),)], (m,))
        nodes.append(BNode(f"{name}__tap{t}", sel, [src], (m,)))
        w = weights[:, t].to(dtype=dtype, device=op.W.device).clone()
        shift = None if bias is None or k > 0 else bias.to(dtype=dtype, device=op.W.device).clone()
        nodes.append(BNode(f"{name}__times{t}", ElemAffine(w, shift, (m,)), [nodes[-1].name], (m,)))
    terms = [n.name for n in nodes[1::2]]
    return nodes + [BNode(name, Add([1.0] * len(terms), [(m,)] * len(terms)), terms, (m,))]


def _build_node(graph: BoundGraph, n: BNode, need: dict[str, Tensor], taps: Taps | None = None
                ) -> list[BNode] | None:
    """``n`` on its kept entries (a flat vector in ascending flat order), with the selection
    nodes that line its inputs up; None when it does not fit (a matrix too large); ``taps``: as
    :func:`needed_entries` left them."""
    op, E = n.op, need[n.name]
    if not isinstance(op, Select) and any(i not in need for i in n.inputs):  # an input it reads nothing of
        return None
    size = lambda name: need[name].numel()  # noqa: E731
    dt = graph.dtype
    if isinstance(op, (Reshape, Permute)):
        src = _move_source(op, graph.shape(n.inputs[0]), E)
        return [_aligned(n.name, n.inputs[0], _position(need, n.inputs[0], src), size(n.inputs[0]), dt)]
    if isinstance(op, Select):
        offsets, pos_off, parts = 0, 0, torch.zeros(E.numel(), dtype=torch.long)
        g, take = op.index.cpu()[E], op.from_input.cpu()[E]
        kept_in = [name for name in n.inputs if name in need]  # an input none of whose entries is read is left out
        if not kept_in:
            return None
        for name, s in zip(n.inputs, op.sizes):
            if name in need:
                mine = take & (g >= offsets) & (g < offsets + s)
                parts[mine] = _position(need, name, g[mine] - offsets) + pos_off
                pos_off += size(name)
            offsets += s
        sel = Select(parts, take.clone(), op.const.cpu()[E].clone(), [(size(i),) for i in kept_in], (E.numel(),))
        return [BNode(n.name, sel, kept_in, (E.numel(),))]
    activation = _per_entry_activation(graph, n)
    if isinstance(op, (ElemAffine, Add)) or activation:
        shapes: list[tuple[int, ...]] = [tuple(t) for t in op.in_shapes] if isinstance(op, Add) else \
            [op.in_shape if isinstance(op, ElemAffine) else graph.shape(n.inputs[0])]
        nodes, lined = [], []
        for k, (name, shp) in enumerate(zip(n.inputs, shapes)):
            pos = _position(need, name, E if activation else _broadcast_source(shp, n.shape, E))
            if pos.numel() == size(name) and torch.equal(pos, torch.arange(pos.numel())):
                lined.append(name)
                continue
            nodes.append(_aligned(f"{n.name}__in{k}", name, pos, size(name), dt))
            lined.append(nodes[-1].name)
        m = E.numel()
        if isinstance(op, ElemAffine):
            pick = lambda t: None if t is None else t.broadcast_to(n.shape).reshape(-1)[E.to(t.device)].clone()  # noqa: E731
            new: object = ElemAffine(pick(op.scale), pick(op.shift), (m,))
        elif isinstance(op, Add):
            new = Add(list(op.signs), [(m,)] * len(lined))
        else:
            new = op
        return nodes + [BNode(n.name, new, lined, (m,))]
    if isinstance(op, Conv):
        read = need[n.inputs[0]]
        if _taps_per_entry(op) <= TAP_SUM_MAX_TAPS and E.numel() * read.numel() > TAP_SUM_MIN_DENSE:
            return _tap_sum(n.name, op, E, n.inputs[0], read, dt, taps)
        mb = _dense_conv(op, E, read, taps)
        return None if mb is None else [BNode(n.name, Linear(mb[0].to(op.W.device), None if mb[1] is None else mb[1].to(op.W.device)),
                                              list(n.inputs), (E.numel(),))]
    if isinstance(op, Linear):
        kept = need[n.inputs[0]].to(op.W.device)
        W = op.W[E.to(op.W.device)][:, kept]
        return [BNode(n.name, Linear(W.clone(), None if op.b is None else op.b[E.to(op.b.device)].clone()), list(n.inputs), (E.numel(),))]
    return None


def cast(graph: BoundGraph, dtype: torch.dtype) -> BoundGraph:
    """A restricted graph (:func:`restrict`: linear maps, selections, elementwise affine maps,
    sums and activations without tensor constants) with its constants in ``dtype``."""
    nodes = []
    for n in graph.nodes:
        op = n.op
        if isinstance(op, Linear):
            op = Linear(op.W.to(dtype), None if op.b is None else op.b.to(dtype))
        elif isinstance(op, Select):
            op = op.to(dtype)
        elif isinstance(op, ElemAffine):
            op = ElemAffine(None if op.scale is None else op.scale.to(dtype), None if op.shift is None else op.shift.to(dtype), op.in_shape)
        nodes.append(BNode(n.name, op, list(n.inputs), n.shape))
    return BoundGraph(graph.input_name, graph.input_shape, nodes, graph.output, dtype, graph.device)


def restrict(graph: BoundGraph, node: str, entries: Tensor) -> Restriction | None:
    """The graph of ``node``'s ``entries`` (flat indices) on the input entries they depend on
    (module docstring), or None when an op on the way has no rule here or a restricted matrix
    would exceed :data:`MAX_DENSE_ENTRIES`. The output lists the entries in the order given."""
    entries = entries.cpu().long()
    taps: Taps = {}  # each convolution's taps, found once
    need = needed_entries(graph, node, entries, taps)
    if need is None:
        return None
    nodes: list[BNode] = []
    for n in graph.nodes:
        if n.name not in need:
            continue
        built = _build_node(graph, n, need, taps)
        if built is None:
            return None
        nodes.extend(built)
        if n.name == node:
            break
    out = node
    order = torch.searchsorted(need[node], entries)
    if not torch.equal(order, torch.arange(need[node].numel())):
        nodes.append(_aligned(f"{node}__entries", node, order, need[node].numel(), graph.dtype))
        out = nodes[-1].name
    names = [n.name for n in nodes] + [graph.input_name]
    if len(set(names)) < len(names):  # a made-up name (``__tap0``, ``__in0``) that the network already uses
        return None
    sub = BoundGraph(graph.input_name, (need[graph.input_name].numel(),), nodes, out, graph.dtype, graph.device)
    return Restriction(sub, need[graph.input_name], need)
