"""A feed-forward network as a list of dense affine layers and elementwise activations.

LP, MILP, SDP and Lipschitz methods want the network in the textbook form

    z_0 = x (flattened),   z_{k+1} = act_k(W_k z_k + b_k),   y = W_L z_L + b_L

This module extracts that form from the engine's bound graph (:mod:`relax.ir.graph`, the one view
of a network the bound methods use) when its nonlinearities form a chain: every maximal run of
affine ops between two activations (Linear, Conv, BatchNorm, AvgPool, reshapes, elementwise
affine maps, ...) is collapsed into one dense matrix by evaluating the run's rules on the basis
vectors (``W e_i = g(e_i) - g(0)``), in float64. Residual additions *inside* an affine run are
fine; a skip connection around an activation is not a chain and raises :class:`NotFeedForwardError`.
(:func:`_activation_of` names the activations of an fx graph for the Lipschitz bounds' own walk.)

The dense form is exact (no relaxation), so it is a faithful model for exact methods; it costs
``O(n_out * n_in)`` memory per layer, which suits the small and medium nets those methods target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verify.placement import model_tensors

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


@torch.no_grad()  # a dense view of constants: no autograd graph over the basis evaluation
def to_feedforward(model: torch.fx.GraphModule | nn.Module, input_shape: tuple[int, ...] | None = None) -> FeedForwardNet:
    """Collapse a network into dense affine layers and activations (float64): the affine runs of
    the bound graph (:func:`relax.ir.graph.get_graph`, the engine's one view of the network) are
    evaluated on basis vectors, ``W e_i = g(e_i) - g(0)``, by the ops' own ``forward``.

    Args:
        model: a canonical module mapping ``[B, *input_shape] -> [B, K]``.
        input_shape: per-example input shape; defaults to ``model.input_shape``.

    Raises:
        NotFeedForwardError: a skip connection around an activation, a max-pool or another
            nonlinear op than ReLU / sigmoid / tanh.
    """
    from relax.ir.graph import get_graph

    if input_shape is None:
        input_shape = tuple(getattr(model, "input_shape", ()))
        if not input_shape:
            raise ValueError("to_feedforward: give input_shape (the model has no input_shape attribute)")
    graph = get_graph(model, tuple(input_shape), torch.float64)
    device = graph.device  # the graph's constants live there
    names = check_feedforward(graph)  # refuse before any work
    layers: list[AffineLayer] = []
    acts: list[str] = []
    src, shape, run = graph.input_name, tuple(input_shape), []  # the chain value and the run after it
    for n in graph.nodes:
        act = names[n.name]
        if act is None:
            run.append(n)
            continue
        layers.append(_dense_run(run, src, shape, n.inputs[0], device))
        acts.append(act)
        src, shape, run = n.name, n.shape, []
    layers.append(_dense_run(run, src, shape, graph.output, device))
    layers = [AffineLayer(L.W.cpu(), L.b.cpu(), L.out_shape) for L in layers]  # a view for the CPU solvers
    _check_affine_runs(graph, model, layers, acts, tuple(input_shape))
    return FeedForwardNet(tuple(input_shape), layers, acts)


def check_feedforward(graph) -> dict[str, str | None]:
    """Each node's activation name (None: affine) when the bound graph has a dense feed-forward
    form; else :class:`NotFeedForwardError`: another nonlinear op than ReLU / sigmoid / tanh, or a
    node that uses a value from before the last activation (a skip connection, as in a ResNet).
    From the graph's structure alone: :func:`_dense_run` would find a skip connection only after
    evaluating the runs before it (1.2 s on cifar10_resnet's resnet_4b)."""
    names = {n.name: _activation_name(n.op, n.name) for n in graph.nodes}
    live = {graph.input_name}  # the chain value and the run computed from it
    for n in graph.nodes:
        missing = [i for i in n.inputs if i not in live]
        if missing:
            raise NotFeedForwardError(f"node {n.name!r} uses {missing[0]!r} from before an activation (a skip connection); "
                                      "not a chain")
        live = {n.name} if names[n.name] is not None else live | {n.name}
    if graph.output not in live:
        raise NotFeedForwardError(f"{graph.output!r} is computed from before the last activation; not a chain")
    return names


def _dense_run(run: list, src: str, shape: tuple[int, ...], out: str, device: torch.device) -> AffineLayer:
    """The affine map from ``src`` (``shape``) to ``out`` computed by the ops of ``run``: on the
    input basis (``W e_i = g(e_i) - g(0)``) when it is at most as wide as the output, else by
    batched vector-Jacobian products of the output basis (the rows of ``W``); on ``device``."""

    def g(z: Tensor) -> Tensor:
        env = {src: z}
        for n in run:
            missing = [i for i in n.inputs if i not in env]
            if missing:
                raise NotFeedForwardError(f"node {n.name!r} uses {missing[0]!r} from before an activation (a skip connection); "
                                          "not a chain")
            env[n.name] = n.op.forward(*[env[i] for i in n.inputs])
        if out not in env:
            raise NotFeedForwardError(f"{out!r} is computed from before the last activation; not a chain")
        return env[out]

    if len(run) == 1 and run[0].name == out and _is_dense(run[0].op) and len(shape) == 1:  # W itself
        W = run[0].op.W.to(torch.float64)
        b = run[0].op.b
        return AffineLayer(W.clone(), torch.zeros(W.shape[0], dtype=torch.float64, device=W.device) if b is None
                           else b.to(torch.float64).clone(),
                           tuple(run[0].shape))
    n_out = math.prod(next((n.shape for n in run if n.name == out), shape))
    if n_out >= math.prod(shape):
        return _extract(g(_basis(shape).to(device)))
    with torch.enable_grad():
        z = torch.zeros(1, *shape, dtype=torch.float64, device=device, requires_grad=True)
        y = g(z)
        rows = torch.eye(n_out, dtype=torch.float64, device=device).reshape(n_out, 1, *y.shape[1:])
        (Wt,) = torch.autograd.grad(y, z, grad_outputs=rows, is_grads_batched=True)
    return AffineLayer(Wt.reshape(n_out, -1).contiguous(), y.detach().reshape(-1).clone(), tuple(y.shape[1:]))


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
            raise NotFeedForwardError(f"the dense form differs from the network by {err:.3g}: not a chain of affine maps and activations")
