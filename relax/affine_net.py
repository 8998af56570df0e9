"""A feed-forward network as a list of dense affine layers and elementwise activations.

LP, MILP, SDP and Lipschitz methods want the network in the textbook form

    z_0 = x (flattened),   z_{k+1} = act_k(W_k z_k + b_k),   y = W_L z_L + b_L

This module extracts that form from any canonical ``torch.fx.GraphModule`` (see
docs/ARCHITECTURE.md) whose nonlinearities form a chain: every maximal run of affine nodes
between two activations (Linear, Conv, BatchNorm, AvgPool, Flatten/Reshape, Sub/Div by
constants, ...) is collapsed into one dense matrix by evaluating the run on the basis vectors
(``W e_i = g(e_i) - g(0)``), in float64. Residual additions *inside* an affine run are fine;
a skip connection around an activation is not a chain and raises :class:`NotFeedForwardError`.

The dense form is exact (no relaxation), so it is a faithful model for exact methods; it costs
``O(n_out * n_in)`` memory per layer, which suits the small and medium nets those methods target.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AffineLayer", "FeedForwardNet", "NotFeedForwardError", "to_feedforward"]


class NotFeedForwardError(ValueError):
    """The graph is not a chain of affine runs separated by elementwise activations."""


#: elementwise activations recognised between affine runs, by name
ACTIVATIONS = ("relu", "sigmoid", "tanh")


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
                z = _apply_activation(self.activations[k], z)
        return z

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "FeedForwardNet":
        layers = [AffineLayer(l.W.to(device=device, dtype=dtype), l.b.to(device=device, dtype=dtype), l.out_shape) for l in self.layers]
        return FeedForwardNet(self.input_shape, layers, list(self.activations))


def _apply_activation(name: str, z: Tensor) -> Tensor:
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


@torch.no_grad()  # a dense view of constants: no autograd graph over the basis evaluation
def to_feedforward(model: torch.fx.GraphModule | nn.Module, input_shape: tuple[int, ...] | None = None) -> FeedForwardNet:
    """Collapse a canonical graph into dense affine layers and activations (float64).

    Args:
        model: fx GraphModule (or a traceable module) mapping ``[B, *input_shape] -> [B, K]``.
        input_shape: per-example input shape; defaults to ``model.input_shape``.

    Raises:
        NotFeedForwardError: a skip connection around an activation, a max-pool, or an
            activation whose input is not the current chain value.
    """
    if not isinstance(model, torch.fx.GraphModule):
        model = torch.fx.symbolic_trace(model)
    if input_shape is None:
        input_shape = tuple(getattr(model, "input_shape", ()))
        if not input_shape:
            raise ValueError("to_feedforward: give input_shape (the model has no input_shape attribute)")
    gm = _float64_copy(model)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:  # refuse unsupported nodes before any basis is allocated
        _activation_of(node, modules)

    n_in = 1
    for s in input_shape:
        n_in *= s
    layers: list[AffineLayer] = []
    acts: list[str] = []
    # rows of the basis batch: row 0 is g(0), row i is g(e_i); the "chain value" is the node
    # whose value is currently expressed this way
    env: dict[str, object] = {}
    chain_node = None
    chain_dim = n_in
    chain_shape = tuple(input_shape)
    constants: set[str] = set()  # nodes computed from parameters/buffers only (e.g. ``W.t()``)

    def basis(shape: tuple[int, ...], n: int) -> Tensor:
        return torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)]).view(n + 1, *shape)

    def load(a, user=None):
        def get(n):
            if n.name not in env:
                raise NotFeedForwardError(
                    f"node {user!r} uses {n.name!r} from before an activation (a skip connection); not a chain"
                )
            return env[n.name]

        return torch.fx.graph.map_arg(a, get)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = basis(chain_shape, n_in)
            chain_node = node
            continue
        if node.op == "output":
            out = load(node.args[0], node.name)
            if isinstance(out, (tuple, list)):
                if len(out) != 1:
                    raise NotFeedForwardError("the model has more than one output")
                out = out[0]
            layers.append(_extract(out))
            break
        act = _activation_of(node, modules)
        if act is not None:
            src = node.args[0]
            if src.name not in env or not isinstance(env[src.name], Tensor) or env[src.name].shape[0] != chain_dim + 1:
                raise NotFeedForwardError(f"activation node {node.name!r} does not act on the chain value")
            val = env[src.name]
            layers.append(_extract(val))
            acts.append(act)
            shape = tuple(val.shape[1:])
            n = layers[-1].n_out
            # every other live value computed from the old basis is now stale
            env = {k: v for k, v in env.items() if not (isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == chain_dim + 1)}
            env[node.name] = basis(shape, n)
            chain_dim = n
            continue
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node.name] = obj
            constants.add(node.name)
            continue
        args, kwargs = load(node.args, node.name), load(node.kwargs, node.name)
        if node.op == "call_module":
            env[node.name] = modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            env[node.name] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            self_obj, *rest = args
            env[node.name] = getattr(self_obj, node.target)(*rest, **kwargs)
        else:  # pragma: no cover
            raise NotFeedForwardError(f"unexpected fx node kind {node.op!r} at {node.name!r}")
        v = env[node.name]
        if _input_dependent(node, constants):
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] != chain_dim + 1:
                raise NotFeedForwardError(f"node {node.name!r} changes the batch dimension; not a per-example affine map")
        else:
            constants.add(node.name)
    if not layers:
        raise NotFeedForwardError("the graph has no output")
    _check_affine_runs(gm, layers, acts, tuple(input_shape))
    return FeedForwardNet(tuple(input_shape), layers, acts)


def _input_dependent(node: torch.fx.Node, constants: set[str]) -> bool:
    """Whether ``node`` reads a value computed from the network input (a constant such as
    ``W.t()`` may have any leading dimension; only input-dependent values must keep the
    basis batch as their first dimension)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return any(n.name not in constants for n in found)


def _extract(val: Tensor) -> AffineLayer:
    """Dense ``(W, b)`` from a basis-batch value ``[n+1, *shape]``."""
    flat = val.reshape(val.shape[0], -1)
    b = flat[0].clone()
    W = (flat[1:] - b).T.contiguous()
    return AffineLayer(W, b, tuple(val.shape[1:]))


def _float64_copy(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    import copy

    gm = copy.deepcopy(model).to(torch.float64).eval()
    return gm


def _check_affine_runs(gm, layers, acts, input_shape) -> None:
    """Guard against a non-affine node hidden inside a run (e.g. an unsupported op that is
    neither recognised as activation nor affine): compare the dense form with the graph on
    random inputs; a mismatch means the extraction is not faithful."""
    x = torch.rand(4, *input_shape, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ref = gm(x).reshape(4, -1)
    net = FeedForwardNet(input_shape, layers, acts)
    got = net.forward(x)
    err = (ref - got).abs().max().item()
    scale = 1.0 + ref.abs().max().item()
    if not err <= 1e-9 * scale * max(1, len(layers)) * 100:
        raise NotFeedForwardError(f"the graph is not a chain of affine maps and activations (dense form differs by {err:.3g})")
