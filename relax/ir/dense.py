"""A feed-forward network as a list of dense affine layers and elementwise activations.

LP, MILP, SDP and Lipschitz methods want the network in the textbook form

    z_0 = x (flattened),   z_{k+1} = act_k(W_k z_k + b_k),   y = W_L z_L + b_L

This module extracts that form from the engine's bound graph (:mod:`relax.ir.graph`, the one view
of a network the bound methods use): every activation gets a depth (:func:`dense_plan`), hidden
layer ``k`` holds the pre-activations of the depth-``k`` activations, and the affine ops between
layers (Linear, Conv, BatchNorm, AvgPool, reshapes, concatenations, residual additions, ...) are
collapsed into one dense matrix per layer by evaluating their rules on the basis vectors
(``W e_i = g(e_i) - g(0)``), in float64. A value used after a later activation (the skip of a
ResNet block or of a UNet) passes through the ReLUs between: as itself when it is nonnegative,
else as ``v = relu(v) - relu(-v)``; around a sigmoid or tanh it cannot, and raises
:class:`NotFeedForwardError`. Each hidden layer's :class:`Block` list names the graph node its
rows hold, so the bound engine's boxes map onto the layers (:func:`layer_boxes`).
(:func:`_activation_of` names the activations of an fx graph for the Lipschitz bounds' own walk.)

The dense form is exact (no relaxation), so it is a faithful model for exact methods; it costs
``O(n_out * n_in)`` memory per layer, which suits the small and medium nets those methods target.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verify.deadline import stop_past
from verify.placement import model_tensors

__all__ = ["AffineLayer", "Block", "DensePlan", "FeedForwardNet", "NotFeedForwardError", "dense_plan", "dense_size", "layer_boxes", "to_feedforward"]


class NotFeedForwardError(ValueError):
    """The graph has no dense layered form (:func:`dense_plan`: an op other than an affine one or
    a ReLU / sigmoid / tanh, a skip around a sigmoid or tanh, a layer over the size limit)."""


#: elementwise activations recognised between affine runs, by name
ACTIVATIONS = ("relu", "sigmoid", "tanh")
#: those whose outputs are nonnegative: carried across a ReLU layer as themselves (one row each)
NONNEGATIVE = ("relu", "sigmoid")
#: the most numbers :func:`to_feedforward` allocates for one layer by default (1 GiB of float64;
#: cifar10_resnet's resnet_4b needs 25 M and 7 s, TinyYOLO 6.1 G)
DENSE_MAX = 2**27


@dataclass
class AffineLayer:
    """``z -> W z + b``; ``W``: ``[n_out, n_in]``, ``b``: ``[n_out]`` (float64)."""

    W: Tensor
    b: Tensor
    out_shape: tuple[int, ...] = ()  # per-example shape of the output before flattening

    @property
    def n_in(self) -> int:
        return self.W.shape[1]

    @property
    def n_out(self) -> int:
        return self.W.shape[0]


@dataclass
class FeedForwardNet:
    """``layers[k]`` is followed by ``activations[k]``; the last layer has none.

    ``len(activations) == len(layers) - 1``.
    """

    input_shape: tuple[int, ...]
    layers: list[AffineLayer]
    activations: list[str] = field(default_factory=list)
    #: per hidden layer, the graph nodes its rows hold (:func:`to_feedforward`; empty for a net
    #: built by hand, which then gets no engine boxes, :func:`layer_boxes`)
    blocks: list[list["Block"]] = field(default_factory=list)

    @property
    def n_in(self) -> int:
        return self.layers[0].n_in

    @property
    def n_out(self) -> int:
        return self.layers[-1].n_out

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate on ``x [B, *input_shape]`` (or ``[B, n_in]``) -> ``[B, n_out]``."""
        z = x.reshape(x.shape[0], -1).to(self.layers[0].W.dtype)
        for k, layer in enumerate(self.layers):
            z = z @ layer.W.T + layer.b
            if k < len(self.activations):
                z = apply_activation(self.activations[k], z)
        return z

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "FeedForwardNet":
        layers = [AffineLayer(l.W.to(device=device, dtype=dtype), l.b.to(device=device, dtype=dtype), l.out_shape) for l in self.layers]
        return FeedForwardNet(self.input_shape, layers, list(self.activations), list(self.blocks))


def apply_activation(name: str, z: Tensor) -> Tensor:
    return {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[name](z)


def _activation_of(node, modules: dict[str, nn.Module]) -> str | None:
    """The activation name of an fx node, or None if it is not an elementwise activation."""
    if node.op == "call_module":
        m = modules[node.target]
        for cls, name in ((nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh")):
            if isinstance(m, cls):
                return name
        if isinstance(m, nn.MaxPool2d):
            raise NotFeedForwardError(f"max-pooling node {node.name!r} is not affine nor elementwise; not supported in the dense form")
        return None
    if node.op in ("call_function", "call_method"):
        t = node.target
        if t in (torch.relu, F.relu, "relu"):
            return "relu"
        if t in (torch.sigmoid, F.sigmoid, "sigmoid"):
            return "sigmoid"
        if t in (torch.tanh, F.tanh, "tanh"):
            return "tanh"
        if t in (F.max_pool2d, "max_pool2d"):
            raise NotFeedForwardError(f"max-pooling node {node.name!r} is not supported in the dense form")
    return None


def _activation_name(op, node: str) -> str | None:
    """``"relu"`` / ``"sigmoid"`` / ``"tanh"`` for those ops of the bound graph, None for affine
    ops; any other nonlinear op is refused."""
    from relax.ir.ops import ReLU, Sigmoid, Tanh
    from relax.ir.ops.pool import MaxPool2d

    for cls, name in ((ReLU, "relu"), (Sigmoid, "sigmoid"), (Tanh, "tanh")):
        if isinstance(op, cls):
            return name
    if isinstance(op, MaxPool2d):
        raise NotFeedForwardError(f"max-pooling node {node!r} is not affine nor elementwise; not supported in the dense form")
    if op.nonlinear:
        raise NotFeedForwardError(f"{type(op).__name__} node {node!r} is not affine nor a ReLU / sigmoid / tanh; "
                                  "not supported in the dense form")
    return None


@dataclass(frozen=True)
class Block:
    """Rows ``[start, start + size)`` of a hidden layer of a :class:`FeedForwardNet` built from a
    bound graph: what they hold, so that the bound engine's boxes map onto them
    (:func:`layer_boxes`).

    ``carry=False``: the value of graph node ``node``, the input of an activation node (a
    pre-activation). ``carry=True``: ``sign * v`` (``rectified``: ``relu(sign * v)``) for the graph
    value ``v = node`` -- the network input or an activation's output -- carried across the
    layer's ReLUs unchanged for a later use (a skip connection); ``pre`` and ``act`` give ``v``'s
    box: ``act(box of pre)``, or the input box when ``pre`` is None.
    """

    node: str
    start: int
    size: int
    carry: bool = False
    sign: int = 1
    rectified: bool = False
    pre: str | None = None
    act: str | None = None


@dataclass
class _Entry:
    """A graph value in a layer's input vector ``z``: ``z[pos:pos+n] - z[neg:neg+n]`` (no second
    part when ``neg`` is None), of per-example ``shape``."""

    name: str
    shape: tuple[int, ...]
    pos: int
    neg: int | None = None


@dataclass
class DensePlan:
    """How a bound graph becomes a :class:`FeedForwardNet` (:func:`dense_plan`).

    Every activation node gets a depth, ``1 +`` the largest depth of the graph values its
    pre-activation is computed from through affine ops (the input has depth 0); hidden layer
    ``k`` holds the pre-activations of the depth-``k`` activations (one activation kind per
    layer), and the values still needed later (``carried[k]``: an input or activation output a
    deeper node uses, i.e. a skip connection) pass through its ReLUs: a nonnegative value (a ReLU
    or sigmoid output) as itself, any other as the pair ``v, -v`` (``v = relu(v) - relu(-v)``).
    A chain has no carries and one activation per layer: the textbook form.

    Attributes:
        names: each node's activation name (None: affine).
        layers: per depth ``1..D``, the activation nodes of that depth, in topological order.
        carried: per depth ``1..D``, the values carried across that layer.
        acts: per depth, the activation of that layer.
    """

    names: dict[str, str | None]
    layers: list[list[str]]
    carried: list[list[str]]
    acts: list[str]


def dense_plan(graph) -> DensePlan:
    """The :class:`DensePlan` of a bound graph, from its structure alone (no matrix built).

    Raises:
        NotFeedForwardError: another nonlinear op than ReLU / sigmoid / tanh, two activation
            kinds at one depth, or a value carried across sigmoid / tanh activations (a skip
            connection around them: only a ReLU passes a value through exactly).
    """
    names = {n.name: _activation_name(n.op, n.name) for n in graph.nodes}
    state = {graph.input_name} | {k for k, a in names.items() if a is not None}
    sources: dict[str, frozenset[str]] = {}

    def src(v: str) -> frozenset[str]:
        return frozenset((v,)) if v in state else sources[v]

    depth = {graph.input_name: 0}
    last_use: dict[str, int] = {}
    for n in graph.nodes:
        if names[n.name] is None:
            sources[n.name] = frozenset().union(*(src(i) for i in n.inputs))
            continue
        used = src(n.inputs[0])
        depth[n.name] = 1 + max((depth[s] for s in used), default=0)
        for s in used:
            last_use[s] = max(last_use.get(s, 0), depth[n.name])
    D = max(depth.values())
    for s in src(graph.output):
        last_use[s] = D + 1
    layers: list[list[str]] = [[] for _ in range(D)]
    for n in graph.nodes:
        if names[n.name] is not None:
            layers[depth[n.name] - 1].append(n.name)
    carried = [[s for s in [graph.input_name] + [n.name for n in graph.nodes if names[n.name] is not None]
                if depth[s] < k < last_use.get(s, 0)] for k in range(1, D + 1)]
    acts = []
    for k, L in enumerate(layers):
        first: dict[str, str] = {}  # one node per activation kind
        for a in L:
            first.setdefault(str(names[a]), a)
        kinds = sorted(first)
        if len(kinds) > 1:
            raise NotFeedForwardError(f"the {kinds[0]} node {first[kinds[0]]!r} and the {kinds[1]} node {first[kinds[1]]!r} are at one "
                                      "depth; not supported in the dense form")
        if kinds[0] != "relu" and carried[k]:
            raise NotFeedForwardError(f"{carried[k][0]!r} is used after the {kinds[0]} node {L[0]!r} (a skip connection around it); "
                                      "only ReLUs pass a value through in the dense form")
        acts.append(kinds[0])
    return DensePlan(names, layers, carried, acts)


def dense_size(graph, plan: DensePlan | None = None) -> int:
    """The most numbers :func:`to_feedforward` allocates for one layer of this bound graph: its
    matrix ``n_in * n_out``, or the basis batch its affine ops are evaluated on (``min(n_in,
    n_out)`` rows of each op's output), from the shapes alone (``plan``: the graph's
    :func:`dense_plan`, else made here, with its :class:`NotFeedForwardError`)."""
    plan = dense_plan(graph) if plan is None else plan
    names = plan.names
    pre_of = {n.name: n.inputs[0] for n in graph.nodes if names[n.name] is not None}

    def numel(v: str) -> int:
        return math.prod(graph.shape(v))

    def width(k: int) -> int:  # of the vector after depth k's activations
        if k == 0:
            return numel(graph.input_name)
        carried = sum(numel(v) * (1 if names.get(v) in NONNEGATIVE else 2) for v in plan.carried[k - 1])
        return sum(numel(pre_of[a]) for a in plan.layers[k - 1]) + carried

    def widest_op(values: list[str]) -> int:  # the widest affine op between them and the state values
        seen, todo, widest = set(), list(values), 0
        while todo:
            v = todo.pop()
            if v in seen or v == graph.input_name or names[v] is not None:
                continue
            seen.add(v)
            widest = max(widest, numel(v))
            todo += graph.by_name[v].inputs
        return widest

    worst = 0
    for k in range(len(plan.layers) + 1):  # the map from depth k's values to depth k + 1's rows
        last = k == len(plan.layers)
        n_in, n_out = width(k), numel(graph.output) if last else width(k + 1)
        ops = widest_op([graph.output] if last else [pre_of[a] for a in plan.layers[k]])
        worst = max(worst, n_in * n_out, min(n_in, n_out) * ops)
    return worst


@torch.no_grad()  # a dense view of constants: no autograd graph over the basis evaluation
def to_feedforward(model: torch.fx.GraphModule | nn.Module, input_shape: tuple[int, ...] | None = None, *,
                   max_numbers: int = DENSE_MAX, stop_at: float | None = None) -> FeedForwardNet:
    """The network as dense affine layers and activations (float64), by the layering of
    :func:`dense_plan`: layer ``k``'s matrix maps the values after layer ``k - 1`` (activation
    outputs and carried values) to layer ``k``'s pre-activations and carries, evaluated on basis
    vectors, ``W e_i = g(e_i) - g(0)``, by the ops' own ``forward`` (:func:`_dense_map`). Each
    hidden layer's :class:`Block` list says which graph node its rows hold.

    Args:
        model: a canonical module mapping ``[B, *input_shape] -> [B, K]``.
        input_shape: per-example input shape; defaults to ``model.input_shape``.
        max_numbers: the most numbers one layer may allocate (:func:`dense_size`).
        stop_at: a hard deadline (``perf_counter`` value) checked before each layer.

    Raises:
        NotFeedForwardError: a max-pool, another nonlinear op than ReLU / sigmoid / tanh, a
            skip connection around a sigmoid / tanh (:func:`dense_plan`), or a layer over
            ``max_numbers``; all before any layer is built.
        verify.deadline.DeadlineExpired: past ``stop_at`` before the last layer.
    """
    from relax.ir.graph import get_graph

    if input_shape is None:
        input_shape = tuple(getattr(model, "input_shape", ()))
        if not input_shape:
            raise ValueError("to_feedforward: give input_shape (the model has no input_shape attribute)")
    graph = get_graph(model, tuple(input_shape), torch.float64)
    plan = dense_plan(graph)  # refuse before any work
    size = dense_size(graph, plan)
    if size > max_numbers:
        raise NotFeedForwardError(f"the dense view needs {size:,} numbers for one layer (limit {max_numbers:,})")
    layers: list[AffineLayer] = []
    blocks: list[list[Block]] = []
    state = [_Entry(graph.input_name, tuple(input_shape), 0)]
    for k in range(len(plan.layers)):
        stop_past(stop_at, "the dense view")
        targets, layer_blocks, next_state = _layer_targets(graph, plan, k, state)
        layers.append(_dense_map(graph, state, targets))
        blocks.append(layer_blocks)
        state = next_state
    layers.append(_dense_map(graph, state, [("value", graph.output, 1)]))
    layers = [AffineLayer(L.W.cpu(), L.b.cpu(), L.out_shape) for L in layers]  # a view for the CPU solvers
    _check_affine_runs(graph, model, layers, plan.acts, tuple(input_shape))
    return FeedForwardNet(tuple(input_shape), layers, plan.acts, blocks)


def layer_boxes(net: FeedForwardNet, boxes: Mapping[str, tuple[Tensor, Tensor]], lo: Tensor, hi: Tensor
                ) -> list[tuple[Tensor, Tensor]] | None:
    """Bounds ``[(l_k [B, n_k], u_k)]`` (float64, CPU) of every hidden layer's rows from the bound
    engine's boxes ``{pre-activation node: (lo, hi) [B, *shape]}`` and the input box ``lo, hi``
    (``[B, *input_shape]``). A carried value's box is its activation's image of its
    pre-activation's box (ReLU, sigmoid and tanh are monotone), negated and rectified as its
    :class:`Block` says. None when a box is missing or its width does not match its rows, or the
    net has no blocks (one built by hand)."""
    B = lo.shape[0]

    def flat(t: Tensor) -> Tensor:
        return t.detach().double().cpu().reshape(B, -1)

    if len(net.blocks) != len(net.layers) - 1:
        return None
    out = []
    for layer, blocks in zip(net.layers, net.blocks):
        l_k = torch.empty(B, layer.n_out, dtype=torch.float64)
        u_k = torch.empty_like(l_k)
        for b in blocks:
            src = b.pre if b.carry else b.node  # None: the network input
            if src is not None and src not in boxes:
                return None
            l, u = (flat(lo), flat(hi)) if src is None else (flat(boxes[src][0]), flat(boxes[src][1]))
            if l.shape[1] != b.size:
                return None
            if b.carry and b.act is not None:  # the activation's output
                l, u = apply_activation(b.act, l), apply_activation(b.act, u)
            if b.sign < 0:
                l, u = -u, -l
            if b.rectified:
                l, u = l.clamp_min(0), u.clamp_min(0)
            l_k[:, b.start:b.start + b.size], u_k[:, b.start:b.start + b.size] = l, u
        out.append((l_k, u_k))
    return out


#: a row group of a layer's output: ``("value", node, sign)``, the graph value ``sign * node``;
#: ``("copy", offset, size)``, entries of the layer's input vector
_Target = tuple


def _layer_targets(graph, plan: DensePlan, k: int, state: list[_Entry]) -> tuple[list[_Target], list[Block], list[_Entry]]:
    """Hidden layer ``k``'s row groups (pre-activations, then carries), their blocks, and the
    entries of the vector after its activations."""
    pre_of = {n.name: n.inputs[0] for n in graph.nodes if plan.names[n.name] is not None}
    where = {e.name: e for e in state}
    targets: list[_Target] = []
    blocks: list[Block] = []
    nxt: list[_Entry] = []
    at = 0
    for a in plan.layers[k]:
        size = math.prod(graph.shape(pre_of[a]))
        targets.append(("value", pre_of[a], 1))
        blocks.append(Block(pre_of[a], at, size, act=plan.names[a]))
        nxt.append(_Entry(a, graph.shape(a), at))
        at += size
    for v in plan.carried[k]:
        e, shape = where[v], graph.shape(v)
        size = math.prod(shape)
        pre, act = pre_of.get(v), plan.names.get(v)
        if e.neg is not None:  # already split into relu(v), relu(-v): both parts are nonnegative
            targets += [("copy", e.pos, size), ("copy", e.neg, size)]
            blocks += [Block(v, at, size, True, 1, True, pre, act), Block(v, at + size, size, True, -1, True, pre, act)]
            nxt.append(_Entry(v, shape, at, at + size))
            at += 2 * size
        elif act in NONNEGATIVE:  # relu(v) = v
            targets.append(("value", v, 1))
            blocks.append(Block(v, at, size, True, 1, False, pre, act))
            nxt.append(_Entry(v, shape, at))
            at += size
        else:  # v = relu(v) - relu(-v)
            targets += [("value", v, 1), ("value", v, -1)]
            blocks += [Block(v, at, size, True, 1, False, pre, act), Block(v, at + size, size, True, -1, False, pre, act)]
            nxt.append(_Entry(v, shape, at, at + size))
            at += 2 * size
    return targets, blocks, nxt


def _dense_map(graph, state: list[_Entry], targets: list[_Target]) -> AffineLayer:
    """The affine map from a layer's input vector (``state``'s entries) to the concatenated row
    groups ``targets``, through the graph's affine nodes: on the input basis
    (``W e_i = g(e_i) - g(0)``) when it is at most as wide as the output, else by batched
    vector-Jacobian products of the output basis (the rows of ``W``); on the graph's device."""
    n_in = sum(math.prod(e.shape) * (1 if e.neg is None else 2) for e in state)  # the entries tile the vector
    known = {e.name for e in state}
    needed: set[str] = set()
    todo = [t[1] for t in targets if t[0] == "value"]
    while todo:  # the values the targets are computed from, back to the layer's input entries
        v = todo.pop()
        if v not in needed and v not in known:
            needed.add(v)
            todo += graph.by_name[v].inputs
    run = [n for n in graph.nodes if n.name in needed and n.name not in known]

    def g(z: Tensor) -> Tensor:
        B = z.shape[0]
        env = {}
        for e in state:
            n = math.prod(e.shape)
            v = z[:, e.pos:e.pos + n] if e.neg is None else z[:, e.pos:e.pos + n] - z[:, e.neg:e.neg + n]
            env[e.name] = v.reshape(B, *e.shape)
        for n in run:
            missing = [i for i in n.inputs if i not in env]
            if missing:  # the plan puts every value a layer needs into its input vector
                raise NotFeedForwardError(f"node {n.name!r} uses {missing[0]!r}, which is not in its layer's input (the layering missed it)")
            env[n.name] = n.op.forward(*[env[i] for i in n.inputs])
        parts = [z[:, t[1]:t[1] + t[2]] if t[0] == "copy" else env[t[1]].reshape(B, -1) if t[2] > 0 else -env[t[1]].reshape(B, -1)
                 for t in targets]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    one = len(targets) == 1 and targets[0][0] == "value" and targets[0][2] == 1
    out_shape = graph.shape(targets[0][1]) if one else None
    if one and len(state) == 1 and state[0].neg is None and len(run) == 1 and run[0].name == targets[0][1] \
            and _is_dense(run[0].op) and len(state[0].shape) == 1:  # W itself
        W = run[0].op.W.to(torch.float64)
        b = run[0].op.b
        return AffineLayer(W.clone(), torch.zeros(W.shape[0], dtype=torch.float64, device=W.device) if b is None
                           else b.to(torch.float64).clone(), tuple(run[0].shape))
    n_out = sum(math.prod(graph.shape(t[1])) if t[0] == "value" else t[2] for t in targets)
    device = graph.device
    if n_out >= n_in:
        L = _extract(g(_basis((n_in,)).to(device)))
    else:
        with torch.enable_grad():
            z = torch.zeros(1, n_in, dtype=torch.float64, device=device, requires_grad=True)
            y = g(z)
            rows = torch.eye(n_out, dtype=torch.float64, device=device).reshape(n_out, 1, n_out)
            (Wt,) = torch.autograd.grad(y, z, grad_outputs=rows, is_grads_batched=True)
        L = AffineLayer(Wt.reshape(n_out, -1).contiguous(), y.detach().reshape(-1).clone())
    L.out_shape = tuple(out_shape) if out_shape is not None else (n_out,)
    return L


def _is_dense(op) -> bool:
    from relax.ir.ops import Linear

    return isinstance(op, Linear) and op.W.dim() == 2


def _basis(shape: tuple[int, ...]) -> Tensor:
    """``[n + 1, *shape]``: zero, then the unit vectors (float64)."""
    n = math.prod(shape)
    b = torch.zeros(n + 1, n, dtype=torch.float64)
    b[1:].fill_diagonal_(1.0)
    return b.view(n + 1, *shape)


def _extract(val: Tensor) -> AffineLayer:
    """Dense ``(W, b)`` from a basis-batch value ``[n+1, *shape]``."""
    flat = val.reshape(val.shape[0], -1)
    b = flat[0].clone()
    W = (flat[1:] - b).T.contiguous()
    return AffineLayer(W, b, tuple(val.shape[1:]))


def _check_affine_runs(graph, model: nn.Module, layers, acts, input_shape) -> None:
    """Guard against a wrong split into runs (and, for a float64 module, a rule whose
    ``forward`` is not the module's op): compare the dense form with the bound graph's own
    evaluation and the module on random inputs, to 1e-9 relative. (A float32 module's own
    round-off can exceed any tolerance relative to its output.)"""
    x = torch.rand(4, *input_shape, dtype=torch.float64) * 2 - 1
    net = FeedForwardNet(input_shape, layers, acts)
    got = net.forward(x)
    p = next(iter(model_tensors(model)), None)
    dev = torch.device("cpu") if p is None else p.device
    with torch.no_grad():
        checks = [graph.forward(x.to(dev)).reshape(4, -1).cpu()]
        if p is not None and p.dtype == torch.float64:
            checks.append(model(x.to(dev)).reshape(4, -1).cpu())
    for ref in checks:
        rel = 1e-9
        err = (ref - got).abs().max().item()
        scale = 1.0 + ref.abs().max().item()
        if not err <= rel * scale * max(1, len(layers)) * 100:
            raise NotFeedForwardError(f"the dense form differs from the network by {err:.3g}: not affine layers and activations")
