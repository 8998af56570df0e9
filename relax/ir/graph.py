"""From a ``torch.fx.GraphModule`` to a small DAG of bound nodes.

:func:`build_graph` runs the module once on a batch-2 example (recording every node's value
and shape, like ``torch.fx.passes.shape_prop.ShapeProp``), folds every node that does not
depend on the input into a constant (``get_attr``, parameters, ``size`` queries, arithmetic on
constants), and turns every remaining node into one rule object from :mod:`relax.ir.ops` (looked
up in ``relax.ir.ops.RULES`` by module class / function / method name). A batch of 2 (not 1)
lets us check that no op mixes the batch dimension (``squeeze()`` would drop a batch of 1).

Shapes in a :class:`BoundGraph` are per example (no batch dimension). The network output is
flattened to ``[K]``. Unknown ops raise :class:`UnsupportedOperatorError` naming op and node.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor

__all__ = ["UnsupportedOperatorError", "BNode", "BoundGraph", "BoundGraphModule", "build_graph", "get_graph"]


# the project's shared error type (a ValueError), re-exported here: the graph contains an op
# that :mod:`relax` has no bound rule for; the message names the op and the node
from verify.errors import UnsupportedOperatorError  # noqa: E402
from verify.placement import model_float_dtype, model_tensors  # noqa: E402


@dataclass
class BNode:
    """One variable node: ``name``, its rule ``op``, the names of its variable inputs, and
    per-example output shape ``shape``."""

    name: str
    op: Any  # relax.ir.ops.Op
    inputs: list[str]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class BoundGraph:
    """A DAG of bound nodes in topological order.

    Attributes:
        input_name: name of the (single) input node.
        input_shape: per-example input shape.
        nodes: variable nodes in topological order (the input is not among them).
        output: name of the output node (its shape is ``[K]``).
        dtype: dtype of the folded constants.
        device: where the constants live (the model's device); passes run there.
    """

    input_name: str
    input_shape: tuple[int, ...]
    nodes: list[BNode]
    output: str
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    by_name: dict[str, BNode] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self.consumers = {self.input_name: []}
        for n in self.nodes:
            self.consumers.setdefault(n.name, [])
            for i in n.inputs:
                self.consumers[i].append(n.name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.input_shape if name == self.input_name else self.by_name[name].shape

    def activations(self) -> list[BNode]:
        """Nonlinear nodes (ReLU, Sigmoid, Tanh, MaxPool), in topological order."""
        return [n for n in self.nodes if n.op.nonlinear]

    def preactivations(self) -> list[str]:
        """Names of the inputs of the nonlinear nodes (and of ops whose box comes from their
        input's, ``box_from_input``), in topological order, without repeats."""
        pre = {i for n in self.nodes if n.op.nonlinear or getattr(n.op, "box_from_input", False) for i in n.inputs}
        order = [self.input_name] + [n.name for n in self.nodes]
        return [k for k in order if k in pre]

    def ancestors(self, name: str) -> set[str]:
        """Names of all nodes ``name`` depends on (itself included, input included)."""
        seen, todo = {name}, [name]
        while todo:
            k = todo.pop()
            if k == self.input_name:
                continue
            for i in self.by_name[k].inputs:
                if i not in seen:
                    seen.add(i)
                    todo.append(i)
        return seen

    def prefix(self, name: str) -> "BoundGraph":
        """The graph of node ``name``'s ancestors whose output is ``name``'s value, flattened
        (``[N, *input_shape] -> [N, numel]``; the same ops, so the same values and bounds)."""
        from relax.ir.ops.shape import Reshape

        keep = self.ancestors(name)
        shape = self.shape(name)
        numel = math.prod(shape)
        flat = BNode(f"{name}__flat", Reshape(shape, (numel,)), [name], (numel,))
        return BoundGraph(self.input_name, self.input_shape, [n for n in self.nodes if n.name in keep] + [flat], flat.name,
                          self.dtype, self.device)

    def values(self, x: Tensor, names: set[str] | None = None) -> dict[str, Tensor]:
        """Every node's value at the inputs ``x [N, *input_shape]`` (``names``: only these nodes,
        a set closed under :meth:`ancestors`), the input's included."""
        vals = {self.input_name: x}
        for n in self.nodes:
            if names is None or n.name in names:
                vals[n.name] = n.op.forward(*[vals[i] for i in n.inputs])
        return vals

    def forward(self, x: Tensor) -> Tensor:
        """Concrete evaluation of the bound graph, ``[N, *input_shape] -> [N, K]`` (a check
        that the graph means the same as the module)."""
        return self.values(x)[self.output]


class _Recorder(torch.fx.Interpreter):
    """Runs the module and keeps every node's value (tensors detached)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        v = super().run_node(n)
        self.values[n.name] = v.detach() if isinstance(v, Tensor) else v
        return v


def _node_desc(n: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return f"module {type(mod).__module__}.{type(mod).__name__} (node {n.name!r}, target {n.target!r})"
    if n.op == "call_function":
        fname = getattr(n.target, "__qualname__", None) or getattr(n.target, "__name__", str(n.target))
        where = getattr(n.target, "__module__", None) or ""
        return f"function {where + '.' if where else ''}{fname} (node {n.name!r})"
    return f"{n.op} {n.target!r} (node {n.name!r})"


def build_graph(gm: torch.nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> BoundGraph:
    """Turn a traced module into a :class:`BoundGraph`.

    Args:
        gm: a ``torch.fx.GraphModule`` (a plain ``nn.Module`` is traced with
            ``torch.fx.symbolic_trace``), in eval mode.
        input_shape: per-example input shape (no batch dimension).
        dtype: dtype of the folded constants (default: the module's parameter dtype).

    Raises:
        UnsupportedOperatorError: an op without a rule, naming op and node.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    params = model_tensors(gm)
    if dtype is None:
        dtype = model_float_dtype(gm) or torch.float32
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOperatorError(f"the graph must have exactly one input, found {len(placeholders)}")
    device = params[0].device if params else torch.device("cpu")
    values = _example_values(gm, input_shape, params, device)
    variable: set[str] = set()
    nodes: list[BNode] = []
    input_name = placeholders[0].name
    output_name = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            variable.add(n.name)
        elif n.op == "output":
            output_name = _output_name(n, variable)
        elif not _is_constant(n, variable):
            variable.add(n.name)
            nodes.extend(_bound_nodes(n, gm, values, variable, dtype, device))
    if output_name is None:
        raise UnsupportedOperatorError("the graph has no output")
    if output_name == input_name:
        raise UnsupportedOperatorError("the graph output is its input")
    nodes, output_name = _flat_output(nodes, output_name)
    if device.type != "cpu":  # rules may create constants on the CPU: every op's on the model's device
        nodes = [BNode(n.name, n.op.to_device(device), n.inputs, n.shape) for n in nodes]
    g = BoundGraph(input_name, tuple(input_shape), _prune(_fuse_lookup_tables(_fuse_normalizations(nodes)), output_name), output_name, dtype, device)
    return g


def _example_values(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], params: list[Tensor],
                    device: torch.device) -> dict[str, Any]:
    """Every node's value on a random example batch of two (``[2, *input_shape]``, on ``device``,
    in the parameters' floating dtype)."""
    example = torch.rand((2, *input_shape), device=device, dtype=next((p.dtype for p in params if p.is_floating_point()), torch.float32))
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(example)
    return rec.values


def _output_name(n: torch.fx.Node, variable: set[str]) -> str:
    """The name of the node the output node ``n`` returns (one, depending on the input)."""
    out = n.args[0]
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise UnsupportedOperatorError(f"the graph must have one output, found {len(out)}")
        out = out[0]
    if not isinstance(out, torch.fx.Node) or out.name not in variable:
        raise UnsupportedOperatorError("the graph output does not depend on the input")
    return out.name


def _is_constant(n: torch.fx.Node, variable: set[str]) -> bool:
    """Whether ``n`` does not depend on the input (or is a shape query): its recorded value is
    used where needed."""
    deps = [a for a in n.all_input_nodes if a.name in variable]
    return not deps or (n.op == "call_method" and n.target == "size") or (
        n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape"
    )


def _bound_nodes(n: torch.fx.Node, gm: torch.fx.GraphModule, values: dict[str, Any], variable: set[str],
                 dtype: torch.dtype, device: torch.device) -> list[BNode]:
    """The bound node(s) of the input-dependent node ``n`` by its op's rule (``variable``: the
    input-dependent nodes so far, ``n`` included; ``device``: the model's)."""
    from relax.ir import ops as _ops

    val = values[n.name]
    if not isinstance(val, Tensor):
        raise UnsupportedOperatorError(f"{_node_desc(n, gm)} returns a non-tensor that depends on the input")
    if val.dim() == 0 or val.shape[0] != 2:
        raise UnsupportedOperatorError(f"{_node_desc(n, gm)} changes the batch dimension")
    rule = _ops.lookup_rule(n, gm)
    if rule is None:
        raise UnsupportedOperatorError(f"unsupported operator: {_node_desc(n, gm)}")
    deps = [a for a in n.all_input_nodes if a.name in variable]
    ctx = _ops.BuildContext(
        node=n,
        gm=gm,
        values=values,
        variable=variable,
        out_shape=tuple(val.shape[1:]),
        in_shapes={a.name: tuple(values[a.name].shape[1:]) for a in deps},
        dtype=dtype,
        desc=_node_desc(n, gm),
        device=device,
    )
    built = rule(ctx)
    if isinstance(built, _ops.Expansion):
        return _expand(n.name, built)
    op, inputs = built
    return [BNode(n.name, op, inputs, tuple(val.shape[1:]))]


def _flat_output(nodes: list[BNode], output_name: str) -> tuple[list[BNode], str]:
    """``nodes`` and the output's name, with a reshape to ``[K]`` appended when the output is
    not flat."""
    from relax.ir import ops as _ops

    last = nodes[-1] if nodes and nodes[-1].name == output_name else next(m for m in nodes if m.name == output_name)
    if len(last.shape) != 1:
        flat = BNode(output_name + "__flat", _ops.Reshape(last.shape, (last.numel,)), [output_name], (last.numel,))
        return nodes + [flat], flat.name
    return nodes, output_name


def _expand(name: str, e: "Any") -> list[BNode]:
    """The bound nodes of an :class:`relax.ir.ops.Expansion` of node ``name``."""
    out = []
    for i, (suffix, op, inputs, shape) in enumerate(e.steps):
        own = name if i == len(e.steps) - 1 else f"{name}__{suffix}"
        ins = [f"{name}{k}" if k.startswith("__") else k for k in inputs]
        out.append(BNode(own, op, ins, tuple(shape)))
    return out


def _fuse_normalizations(nodes: list[BNode]) -> list[BNode]:
    """``x * (1 / (s * sum(x)))`` (the bound nodes of ``x / ReduceSum(x)``, either operand order)
    as one :class:`relax.ir.ops.Normalize` node on ``x`` and the sum, whose relaxation keeps the
    ratio (the reciprocal node stays only if something else reads it; :func:`_prune` drops it)."""
    from relax.ir.ops import Normalize, Product, Reciprocal, Reduce

    by = {n.name: n for n in nodes}
    out = []
    for n in nodes:
        if isinstance(n.op, Product) and not n.op.matmul and len(n.inputs) == 2:
            for x, r in (n.inputs, n.inputs[::-1]):
                rn = by.get(r)
                sn = by.get(rn.inputs[0]) if rn is not None and isinstance(rn.op, Reciprocal) else None
                if sn is not None and isinstance(sn.op, Reduce) and sn.inputs == [x] and sn.op.in_shape == n.shape:
                    n = BNode(n.name, Normalize(sn.op.dims, sn.op.keepdim, sn.op.scale, n.shape), [x, sn.name], n.shape)
                    break
        out.append(n)
    return out


def _fuse_lookup_tables(nodes: list[BNode]) -> list[BNode]:
    """``reshape(relu(reshape(x)[..., None] - t) @ w + c)`` (the bound nodes of a lookup table: ``K``
    ReLUs on shifted copies of each entry of ``x``, summed with weights ``w [K]``; ml4acopf's
    sigmoids) as one :class:`relax.ir.ops.PiecewiseLinear` node on ``x`` (the inner nodes stay only
    if something else reads them; :func:`_prune` drops them)."""
    from relax.ir.ops import ElemAffine, Linear, PiecewiseLinear, ReLU, Reshape

    by = {n.name: n for n in nodes}

    def only(n: BNode | None, kind: type) -> BNode | None:  # ``n``'s single input, if it has rule ``kind``
        p = by.get(n.inputs[0]) if n is not None and len(n.inputs) == 1 else None
        return p if p is not None and isinstance(p.op, kind) else None

    out = []
    for n in nodes:
        lin = only(n, Linear) if isinstance(n.op, Reshape) else None
        relu = only(lin, ReLU)
        shift = only(relu, ElemAffine)
        split = only(shift, Reshape)
        if split is not None and lin is not None and shift is not None and shift.op.scale is None and shift.op.shift is not None:
            K = shift.shape[-1]
            W, b = lin.op.W, lin.op.b
            table = (*n.shape, K)
            if (tuple(W.shape) == (1, K) and shift.op.shift.numel() == K and shift.op.shift.shape[-1:] == (K,) and shift.shape == table
                    and split.shape == (*n.shape, 1) and split.op.in_shape == n.shape and lin.shape == (*n.shape, 1)):
                c = 0.0 if b is None else float(b.reshape(-1)[0])
                n = BNode(n.name, PiecewiseLinear(-shift.op.shift.reshape(-1), W.reshape(-1), c), [split.inputs[0]], n.shape)
        out.append(n)
    return out


def _prune(nodes: list[BNode], output: str) -> list[BNode]:
    """Drop variable nodes the output does not depend on."""
    by = {n.name: n for n in nodes}
    need, todo = {output}, [output]
    while todo:
        k = todo.pop()
        if k in by:
            for i in by[k].inputs:
                if i not in need:
                    need.add(i)
                    todo.append(i)
    return [n for n in nodes if n.name in need]


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _version(model: torch.nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in model_tensors(model))


class BoundGraphModule(torch.nn.Module):
    """Bound graphs as a module ``[B, *input_shape] -> [B, K]`` (for attacks, and for a restricted
    graph as its own problem): the forward pass runs the graph of ``dtype`` (default: the first
    given) in its dtype; :func:`get_graph` takes the graphs ``bound_graphs`` (by dtype) as they are,
    so a graph built here is never traced from a module again."""

    def __init__(self, graphs: dict[torch.dtype, "BoundGraph"], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bound_graphs = graphs
        self.forward_dtype = next(iter(graphs)) if dtype is None else dtype
        g = graphs[self.forward_dtype]
        self.input_shape = g.input_shape
        self.register_buffer("_dtype_tag", torch.zeros((), dtype=g.dtype, device=g.device))  # the module's dtype, for the attacks

    def forward(self, x: Tensor) -> Tensor:
        g = self.bound_graphs[self.forward_dtype]
        return g.forward(x.to(g.dtype)).reshape(x.shape[0], -1)


def get_graph(model: torch.nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> BoundGraph:
    """:func:`build_graph`, cached per (model, input shape, dtype, device); rebuilt when a parameter
    or buffer of the model was modified in place (tensor version counters) or replaced."""
    prebuilt = getattr(model, "bound_graphs", None)  # a module that carries its graphs (BoundGraphModule)
    if isinstance(prebuilt, dict) and dtype in prebuilt:
        return prebuilt[dtype]
    per = _CACHE.setdefault(model, {})
    first = next(iter(model_tensors(model)), None)
    key = (tuple(input_shape), dtype, None if first is None else first.device)  # model.to(device) keeps the parameters' ids
    ver = _version(model)
    hit = per.get(key)
    if hit is not None and hit[0] == ver and hit[2] == model.training:
        return hit[1]
    g = build_graph(model, tuple(input_shape), dtype)
    per[key] = (ver, g, model.training)
    return g
