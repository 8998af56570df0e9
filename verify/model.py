"""``load_model``: a torch module or an ONNX file -> one canonical ``torch.fx.GraphModule``.

The returned graph module is in eval mode, on the requested device and dtype, and maps
``[B, *input_shape]`` to ``[B, K]`` for any batch size ``B``. It carries two attributes:

* ``gm.input_shape`` -- the per-example input shape (tuple, no batch dimension), or ``None``
  when it is not known (a plain torch module without an ``input_shape`` attribute);
* ``gm.source`` -- the file path or the class name the graph came from.

ONNX files are converted by our own importer (:mod:`verify.onnx_import`), which emits only the
node kinds of the canonical graph (``docs/ARCHITECTURE.md``). Torch modules are traced with
``torch.fx.symbolic_trace`` and left as they are: :func:`check_canonical` checks a graph for
callers that need the canonical node set (the bound engine does its own check).
"""
from __future__ import annotations

import copy
import operator
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import ModelLoadError, ModelLoadTimeout, UnsupportedOperatorError
from .graph_functions import step
from .placement import model_device, model_float_dtype, model_tensors

__all__ = [
    "load_model",
    "ModelLoadError",
    "ModelLoadTimeout",
    "UnsupportedOperatorError",
    "onnx_input_shape",
    "check_against_onnxruntime",
    "check_canonical",
    "check_device",
]

ONNX_SUFFIXES = (".onnx", ".onnx.gz")
TORCH_SUFFIXES = (".pt", ".pth")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def load_model(
    model: nn.Module | str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    check: bool = False,
    deadline: float | None = None,
) -> fx.GraphModule:
    """Load ``model`` as a canonical graph module mapping ``[B, *input_shape]`` to ``[B, K]``.

    Args:
        model: an ``nn.Module`` (traced with ``torch.fx.symbolic_trace``), a ``GraphModule``
            (returned as is), or a path to ``.onnx`` / ``.onnx.gz`` / ``.pt`` (a pickled module).
        device, dtype: where and in which floating precision the graph runs.
        check: also verify the result -- ONNX files against onnxruntime (max abs diff <= 1e-4 on
            random inputs), every graph with :func:`check_canonical`.
        deadline: a ``time.perf_counter()`` value by which the model must be loaded (None: no
            limit); ONNX files check it between nodes (:func:`verify.onnx_import.import_onnx`).

    Raises:
        ModelLoadTimeout: the deadline passed before the model was loaded.
        ModelLoadError: missing or malformed file, NaN weights, untraceable module, ...
        UnsupportedOperatorError: an ONNX operator outside the canonical graph.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    device = check_device(device)
    if isinstance(model, (str, os.PathLike)):
        gm = _load_path(Path(model), check, deadline)
    elif isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model) if _would_change(model, device, dtype) else model
    elif isinstance(model, nn.Module):
        gm = _trace(model, device, dtype)
    else:
        raise ModelLoadError(f"model must be an nn.Module or a path, got {type(model).__name__}")
    gm = gm.to(device=device, dtype=dtype).eval()
    _check_deadline(deadline, model)
    set_attributes(gm, getattr(gm, "input_shape", None), getattr(gm, "source", type(gm).__name__))
    if check:
        check_canonical(gm)
    return gm


def set_attributes(gm: fx.GraphModule, input_shape: tuple[int, ...] | None, source: str) -> None:
    """Attach ``gm.input_shape`` and ``gm.source`` so that they survive ``copy.deepcopy``."""
    attrs = {"input_shape": _tuple_or_none(input_shape), "source": str(source)}
    for k, v in attrs.items():
        setattr(gm, k, v)
    gm.meta.setdefault(_PRESERVED, {}).update(attrs)  # torch.fx re-sets these on deepcopy


_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def _check_deadline(deadline: float | None, model: object) -> None:
    """Raise :class:`ModelLoadTimeout` if the ``perf_counter`` value ``deadline`` has passed."""
    if deadline is not None and time.perf_counter() > deadline:
        name = Path(model).name if isinstance(model, (str, os.PathLike)) else type(model).__name__
        raise ModelLoadTimeout(f"{name}: not loaded by the deadline")


def _load_path(path: Path, check: bool, deadline: float | None = None) -> fx.GraphModule:
    """A file -> graph module (on cpu, float), by ``deadline`` (a ``perf_counter`` value)."""
    if path.is_dir():
        raise ModelLoadError(f"the model path is a directory, not a file: {path} (give a .onnx or .pt file)")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    name = path.name.lower()
    if name.endswith(ONNX_SUFFIXES):
        from .onnx_import import import_onnx

        gm = import_onnx(path, deadline=deadline)
        if check:
            diff = check_against_onnxruntime(gm, path, n=4)
            if not diff <= 1e-4:
                raise ModelLoadError(f"{path.name}: conversion differs from onnxruntime by {diff:.3g}")
        return gm
    if name.endswith(TORCH_SUFFIXES):
        return _load_torch_file(path)
    raise ModelLoadError(f"unknown model file type (expected .onnx, .onnx.gz, .pt or .pth): {path}")


def _load_torch_file(path: Path) -> fx.GraphModule:
    """A ``.pt`` file holding a full pickled ``nn.Module`` -> traced graph module."""
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused just below
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelLoadError(f"cannot read torch file {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelLoadError(f"{path} is a TorchScript module; save the full nn.Module instead")
    if not isinstance(obj, nn.Module):
        kind = "a state dict" if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(f"{path} holds {kind}, not a full nn.Module (save it with torch.save(model))")
    gm = obj if isinstance(obj, fx.GraphModule) else _trace(obj, "cpu", None)
    set_attributes(gm, getattr(gm, "input_shape", None), str(path))
    return gm


def _trace(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> fx.GraphModule:
    """``symbolic_trace`` in eval mode; the caller's module is copied first if ``.to`` or
    ``.eval()`` would change it (the traced graph shares its submodules)."""
    if dtype is not None and _would_change(model, torch.device(device), dtype):
        model = copy.deepcopy(model)
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... on dynamic control flow
        raise ModelLoadError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from e
    set_attributes(gm, getattr(model, "input_shape", None), type(model).__name__)
    return gm


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; a clear error when it is malformed or not available
    here (``cuda`` on a machine without CUDA, an index past the last GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {str(device)!r} requested but CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {str(device)!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {str(device)!r} requested but MPS is not available on this machine")
    return dev


def _would_change(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``model.to(device, dtype).eval()`` would modify ``model`` in place."""
    return model.training or any(m.training for m in model.modules()) or _needs_move(model, device, dtype)


def _needs_move(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    tensors = model_tensors(model)
    return any(t.device.type != device.type or (t.is_floating_point() and t.dtype != dtype) for t in tensors)


def _tuple_or_none(shape) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(s) for s in shape)


def onnx_input_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The per-example input shape of an ONNX file (leading batch dimension removed).

    ``[1, 1, 28, 28] -> (1, 28, 28)``, ``[1, 1, 1, 5] -> (1, 1, 5)`` (ACAS Xu),
    ``['N', 8] -> (8,)``; a rank-1 input ``[n]`` has no batch dimension: ``(n,)``.
    """
    from .onnx_import import input_shape_of, read_onnx

    return input_shape_of(read_onnx(Path(path)))


def check_against_onnxruntime(gm: fx.GraphModule, onnx_path: str | os.PathLike, n: int = 8, seed: int = 0,
                              relative: bool = False) -> float:
    """Max abs difference between ``gm`` and onnxruntime on ``n`` uniform [0, 1) inputs
    (``relative``: divided by ``max(1, max |onnxruntime output|)``, for nets whose outputs reach
    1e4, where onnxruntime's float32 rounding alone is 1e-3).

    ``gm`` runs the ``n`` inputs as one batch ``[n, *input_shape]`` (so this also checks that
    it is batch-agnostic); onnxruntime runs them one at a time with the file's own input shape.
    """
    from .onnx_import import run_onnxruntime

    shape = onnx_input_shape(onnx_path)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g, dtype=torch.float64)
    ref = run_onnxruntime(Path(onnx_path), x.numpy())  # [n, K]
    dev, dt = _device_dtype(gm)
    with torch.no_grad():
        y = gm(x.to(device=dev, dtype=dt))
    y = y.detach().to("cpu", torch.float64).reshape(n, -1)
    if y.shape != ref.shape:
        return float("inf")
    diff = float((y - torch.from_numpy(ref).to(torch.float64)).abs().max())
    return diff / max(1.0, float(abs(ref).max())) if relative else diff


def _device_dtype(gm: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first float parameter or buffer (cpu / float32 if none)."""
    return model_device(gm), model_float_dtype(gm) or torch.float32


# ---------------------------------------------------------------------------------------------
# the canonical node set (docs/ARCHITECTURE.md)

CANONICAL_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ConvTranspose2d, nn.Upsample,
    nn.LeakyReLU, nn.Hardtanh, nn.ReLU6, nn.Softmax, nn.LogSoftmax,
)
# tensor op tensor allowed: sums, and products / quotients (relax.ir.ops.Product, bilinear planes)
_LINEAR_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub, operator.mul, operator.truediv, torch.mul, torch.div,
                     torch.matmul, torch.maximum, torch.minimum}
_CONST_FUNCTIONS = {F.linear}
# elementwise functions with a relaxation (relax.ir.ops.elementwise), reductions, softmax
_NONLINEAR_FUNCTIONS = {
    torch.exp, torch.log, torch.sqrt, torch.reciprocal, torch.sin, torch.cos, torch.abs, torch.sign, torch.floor,
    torch.erf, torch.special.erf, torch.atan, torch.arctan, torch.heaviside, step, torch.pow, operator.pow, F.leaky_relu, torch.clamp, torch.clip,
    F.hardtanh, torch.sum, torch.mean, torch.softmax, F.softmax, torch.log_softmax, F.log_softmax,
}
_SHAPE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze,
    # value-moving ops (relax.ir.ops.Select): indexing, concatenation, repetition, padding, nearest upsampling
    operator.getitem, torch.cat, torch.concat, torch.index_select, torch.narrow, torch.flip, torch.tile,
    torch.Tensor.expand, F.pad, F.interpolate,
}
CANONICAL_METHODS = {"reshape", "view", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "size",
                     "expand", "narrow", "flip", "index_select", "repeat", "exp", "log", "sqrt", "reciprocal", "sin",
                     "cos", "abs", "sign", "floor", "pow", "clamp", "sum", "mean", "softmax", "log_softmax", "erf", "atan", "arctan", "heaviside"}


def check_canonical(gm: fx.GraphModule) -> None:
    """Raise :class:`UnsupportedOperatorError` naming the first node outside the canonical graph.

    Also checks that ``F.linear`` has one operand that depends on the input (weight and bias
    constant), and that there is exactly one input.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOperatorError(f"the graph has {len(placeholders)} inputs, the canonical graph has one")
    modules = dict(gm.named_modules())
    dynamic = set(placeholders)
    for node in gm.graph.nodes:
        deps = _operands(node, dynamic)
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if _is_shape_query(node):
            continue
        _check_node(node, modules, deps)
        if deps:
            dynamic.add(node)


def _operands(node: fx.Node, dynamic: set[fx.Node]) -> list[fx.Node]:
    """The operands of ``node`` that depend on the input, with repeats (``x * x`` gives two)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a in dynamic else None)
    return found


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(...)`` or ``x.shape``: resolved by shape propagation, not input-dependent."""
    if node.op == "call_method":
        return node.target == "size"
    return node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",)


def _check_node(node: fx.Node, modules: dict[str, nn.Module], deps: list[fx.Node]) -> None:
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if not isinstance(mod, CANONICAL_MODULES):
            _not_canonical(node, type(mod).__name__)
    elif node.op == "call_method":
        if node.target not in CANONICAL_METHODS:
            _not_canonical(node, f"method {node.target}")
    elif node.target in _CONST_FUNCTIONS:
        if len(deps) > 1:
            _not_canonical(node, f"{_fn_name(node.target)} of two input-dependent tensors")
    elif node.target not in _LINEAR_FUNCTIONS | _SHAPE_FUNCTIONS | _NONLINEAR_FUNCTIONS:
        _not_canonical(node, _fn_name(node.target))


def _fn_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _not_canonical(node: fx.Node, what: str) -> None:
    raise UnsupportedOperatorError(f"unsupported operator '{what}' at node '{node.name}' (not in the canonical graph)")
