"""Our ONNX -> canonical ``torch.fx.GraphModule`` converter (the front is :mod:`verify.model`).

How it works. The ONNX nodes are visited in (topological) order. Every value is either

* a **constant** -- a numpy array: an initializer, a ``Constant`` node, or the output of a node
  whose inputs are all constants, folded here in numpy (so ``Shape -> Gather -> Unsqueeze ->
  Concat -> Reshape`` chains end as constant reshape targets), or
* **dynamic** -- an fx node that depends on the input. Each fx node is run once on a batch-1
  example as it is created, so the ONNX shape of every dynamic value is known while converting
  (``Shape`` of a dynamic value folds to a constant).

Batch dimension. An input of rank >= 2 whose leading dim is 1 or symbolic has a leading batch
dimension (``[1, 784, 1]``, ``['N', 8]``, ACAS Xu's ``[1, 1, 1, 5]``): ONNX axis ``a`` is torch
axis ``a``, and an op that would move, merge or contract axis 0 is refused. A rank-1 input
``[n]``, or one with a leading dim above 1 (``[12, 8]``), has none: we add one, so ONNX axis
``a`` is torch axis ``a + 1``. Reshape / Flatten get ``-1`` as their leading torch
dimension, so the graph runs for any batch size ``B``: ``[B, *input_shape] -> [B, K]``.

Only canonical nodes are emitted (``docs/ARCHITECTURE.md``): Gemm / MatMul -> ``nn.Linear``
(a constant bias ``Add`` right after a MatMul is folded into it), Conv -> ``nn.Conv1d/2d``,
BatchNormalization -> ``nn.BatchNorm1d/2d``, pools -> ``nn.AvgPool2d`` / ``nn.MaxPool2d``, a
zero ``Pad`` feeding a Conv / AveragePool -> its padding (feeding anything else -> ``F.pad``),
activations -> modules, Add / Sub / Mul / Div -> ``operator`` functions, shape ops ->
``torch.reshape`` / ``permute`` / ``squeeze`` / ``unsqueeze`` / ``transpose`` / ``nn.Flatten``;
Slice / Gather (constant indices) / Split -> tensor indexing, Concat -> ``torch.cat`` (constant
operands repeated along the batch), Expand -> ``Tensor.expand``, Resize / Upsample (nearest,
integer factors, a coordinate rule equal to ``i // factor``) -> ``F.interpolate``, ConvTranspose
-> ``nn.ConvTranspose2d``; Identity and Dropout vanish. Anything else:
:class:`~verify.model.UnsupportedOperatorError` naming the op and the node.
"""
from __future__ import annotations

import gzip
import math
import operator
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Literal, Sequence, Union, overload

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .deadline import Deadline
from .errors import IntegerInputsNeeded, ModelLoadTimeout
from .graph_functions import step
from .model import ModelLoadError, UnsupportedOperatorError, set_attributes
from .onnx_argmax import scores_before_softmax
from .onnx_composite import CONVERTERS as _COMPOSITE
from .onnx_composite import FOLDS as _COMPOSITE_FOLDS
from .onnx_composite import node_label as _label
from .onnx_composite import reduce_axes, resize_linear

__all__ = ["import_onnx", "read_onnx", "input_shape_of", "run_onnxruntime", "OnnxRuntimeModel"]

_F64 = torch.float64  # construction precision; load_model casts to the requested dtype


class _Pending:
    """The output of a zero-valued constant ``Pad``: folded into the Conv / AveragePool after it."""

    def __init__(self, x: fx.Node, pads: list[int], node: onnx.NodeProto):
        self.x, self.pads, self.node = x, pads, node  # pads: spatial begins + ends


Value = Union[fx.Node, np.ndarray, _Pending]


# ---------------------------------------------------------------------------------------------
# reading files


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse ``.onnx`` or ``.onnx.gz`` (decompressed in memory); ModelLoadError if it is not ONNX."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        if path.name.lower().endswith(".gz"):
            model = onnx.load_from_string(gzip.decompress(path.read_bytes()))
        else:
            model = onnx.load(str(path))
    except Exception as e:  # DecodeError, BadGzipFile, EOFError, ...
        raise ModelLoadError(f"{path.name} is not an ONNX protobuf ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise ModelLoadError(f"{path.name} is not an ONNX model (its graph has no nodes)")
    return model


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The one real graph input (initializers listed as inputs, as in opset-8 files, are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    if len(ins) != 1:
        raise ModelLoadError(f"the ONNX graph has {len(ins)} inputs {[i.name for i in ins]}; exactly one is supported")
    return ins[0]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    """Declared dims: ints, or a name (``dim_param``, possibly empty) for a symbolic dim."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def has_batch_dim(dims: list[int | str]) -> bool:
    """Whether the leading input dim is a batch: rank >= 2 and that dim symbolic or 1 (a leading
    dim of 12 -- nn4sys' pensieve ``[12, 8]`` -- is data)."""
    return len(dims) >= 2 and (not isinstance(dims[0], int) or dims[0] <= 1)


def input_shape_of(model: onnx.ModelProto) -> tuple[int, ...]:
    """Per-example input shape: without the leading batch dim when there is one
    (:func:`has_batch_dim`)."""
    vi = _graph_input(model)
    dims = _dims(vi)
    per = dims[1:] if has_batch_dim(dims) else dims
    if not dims or any(not isinstance(d, int) or d <= 0 for d in per):
        raise ModelLoadError(f"input '{vi.name}' has shape {dims}: need a fixed per-example shape")
    return tuple(d for d in per if isinstance(d, int))  # all of them (checked above)


class OnnxRuntimeModel:
    """The ONNX file run by onnxruntime on the CPU with one thread, one example at a time and in
    the file's own input dtype: the way the VNN-COMP organisers check a counterexample. The one
    place in the package that runs onnxruntime (model conversion checks, counterexample checks).

    Attributes:
        input_dtype: numpy dtype of the graph input (what every ``x`` is cast to).
        feed_shape: the shape one example is fed with (symbolic / zero dims become 1).
    """

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort

        from .vnnlib import resolve_maybe_gz

        model = read_onnx(resolve_maybe_gz(path))
        vi = _graph_input(model)
        dims = _dims(vi)
        self.name = vi.name
        self.feed_shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims] if len(dims) >= 2 else dims
        self.input_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # no warnings about initializers listed as inputs (opset 8 files)
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    @property
    def num_inputs(self) -> int | None:
        """Elements of one example (None if the file leaves a dim of a rank-1 input open)."""
        dims = [d for d in self.feed_shape if isinstance(d, int) and d > 0]
        return math.prod(dims) if len(dims) == len(self.feed_shape) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs for inputs ``x [n, *input_shape]`` (or ``[n, numel]``) -> float64 ``[n, K]``."""
        x = np.asarray(x)
        n = self.num_inputs
        if n is not None and x.size != x.shape[0] * n:
            raise ValueError(f"the ONNX input has {n} elements per example, got {x.size // max(1, x.shape[0])}")
        feed = self.feed_shape
        out = [self.session.run(None, {self.name: xi.reshape(feed).astype(self.input_dtype)})[0].reshape(-1) for xi in x]
        return np.stack(out).astype(np.float64)


def run_onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime outputs for inputs ``x [n, *input_shape]``, one example at a time -> ``[n, K]``
    (see :class:`OnnxRuntimeModel`)."""
    return OnnxRuntimeModel(path)(x)


def import_onnx(path: Path | onnx.ModelProto, integer_inputs: dict[int, int] | None = None,
                source: str | None = None, deadline: float | None = None) -> fx.GraphModule:
    """Convert an ONNX file (or a model read by :func:`read_onnx`); sets ``gm.input_shape`` and
    ``gm.source``.

    ``deadline``: a ``time.perf_counter()`` value (None: no limit); checked after reading the
    file, between initializers, between nodes and around building the graph module, so that a
    large model stops within about one node's work of it with :class:`~verify.errors.ModelLoadTimeout`.

    ``integer_inputs``: ``{flat input index: integer}``; a Cast to an integer type of exactly
    those inputs becomes that constant (the graph is then exact where each such input ``x_i``
    satisfies ``trunc(x_i) = integer``). Without it such a Cast whose value is needed as a
    constant raises :class:`~verify.errors.IntegerInputsNeeded` naming the inputs.
    """
    name = "onnx model" if isinstance(path, onnx.ModelProto) else Path(path).name
    clock = _Clock(Deadline.until(deadline), name)
    clock.tick("before reading the file")
    model = path if isinstance(path, onnx.ModelProto) else read_onnx(path)
    clock.tick("after reading the file")
    try:
        gm = _Converter(model, integer_inputs=integer_inputs, clock=clock).run()
    except UnsupportedOperatorError as e:
        # a graph that moves its leading size-1 dim (a Transpose of [1, n]) treats it as data:
        # convert it again with that dim as part of each example (exact either way)
        if "batch dimension" not in str(e) or not has_batch_dim(_dims(_graph_input(model))):
            raise
        try:
            gm = _Converter(model, leading_is_data=True, integer_inputs=integer_inputs, clock=clock).run()
        except UnsupportedOperatorError:
            raise e from None
    set_attributes(gm, input_shape_of(model), source or str(path if not isinstance(path, onnx.ModelProto) else "onnx"))
    return gm


# ---------------------------------------------------------------------------------------------
# the converter


def _ident(s: str) -> str:
    s = re.sub(r"\W", "_", s) or "v"
    return "n_" + s if s[0].isdigit() else s


_RESERVED = set(dir(fx.GraphModule)) | {"input_shape", "source"}


class _Clock:
    """The import's deadline: :meth:`tick` raises :class:`~verify.errors.ModelLoadTimeout` once it
    has passed, naming the model and how far the import got (``where``, a text or a function
    making it: only called when the deadline has passed, so a tick per node costs one clock read)."""

    def __init__(self, deadline: Deadline, name: str):
        self.deadline, self.name = deadline, name

    def tick(self, where: str | Callable[[], str]) -> None:
        """Raise :class:`~verify.errors.ModelLoadTimeout` if the deadline has passed."""
        if self.deadline.expired():
            text = where if isinstance(where, str) else where()
            raise ModelLoadTimeout(f"{self.name}: not converted by the deadline (stopped {text})")


class _Converter:
    """Walks the ONNX graph and builds the fx graph (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, leading_is_data: bool = False, integer_inputs: dict[int, int] | None = None,
                 clock: _Clock | None = None):
        self.model = model
        self.clock = clock or _Clock(Deadline(None), "onnx model")
        self.leading_is_data = leading_is_data
        self.integer_inputs = integer_inputs or {}
        # dynamic values that are exact copies of input entries: their flat input indices (ONNX shape)
        self.coords: dict[fx.Node, np.ndarray] = {}
        # dynamic values computed from the integer part of inputs: those inputs' flat indices
        self.int_deps: dict[fx.Node, frozenset[int]] = {}
        # input entries whose value (beyond its integer part) a dynamic value may depend on, as a
        # bit mask (bit i: flat input index i)
        self.float_deps: dict[fx.Node, int] = {}
        # names of constants computed from ``integer_inputs`` (their values change with them)
        self.from_integers: set[str] = set()
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.example: dict[fx.Node, Tensor] = {}
        self.integral: set[fx.Node] = set()  # dynamic values known to hold integers (ONNX int / bool types)
        self._types: dict[str, np.dtype] | None = None  # element types of named values (CastLike's targets)
        self.uses = Counter(i for n in model.graph.node for i in n.input if i)
        self.uses.update(o.name for o in model.graph.output)
        self.input_shape = input_shape_of(model)
        batched = has_batch_dim(_dims(_graph_input(model))) and not leading_is_data
        self.offset = 0 if batched else 1  # torch axis = ONNX axis + offset

    def element_type(self, name: str) -> np.dtype | None:
        """The ONNX element type of value ``name``: declared in the file, else from onnx's shape
        inference (run once, when first needed); None when neither knows it."""
        if self._types is None:
            model = self.model
            self.clock.tick(lambda: f"before inferring the type of '{name}'")
            try:
                model = onnx.shape_inference.infer_shapes(model)
            except Exception:  # noqa: BLE001 - inference is optional here (large or odd files): declared types only
                pass
            self.clock.tick(lambda: f"after inferring the type of '{name}'")
            self._types = {vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                           for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output)
                           if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
        return self._types.get(name)

    @property
    def batched(self) -> bool:
        """Does ONNX axis 0 hold the batch (so that no op may touch it)?"""
        return self.offset == 0

    def run(self) -> fx.GraphModule:
        tick = self.clock.tick
        for t in self.model.graph.initializer:
            tick(lambda: f"at initializer '{t.name}'")
            self.env[t.name] = _checked(numpy_helper.to_array(t), f"initializer '{t.name}'")
        x = self.graph.placeholder("x")
        self.example[x] = torch.zeros((1, *self.input_shape), dtype=_F64)
        if self.leading_is_data:  # the ONNX leading dim (of size 1) becomes torch dim 1
            x = self.fn(torch.unsqueeze, x, 1, hint="leading_dim")
        onnx_shape = (1, *self.input_shape) if has_batch_dim(_dims(_graph_input(self.model))) else self.input_shape
        self.coords[x] = np.arange(math.prod(self.input_shape)).reshape(onnx_shape)
        self.float_deps[x] = (1 << math.prod(self.input_shape)) - 1
        self.env[_graph_input(self.model).name] = x
        nodes = self.model.graph.node
        for i, node in enumerate(nodes):
            tick(lambda: f"at node {i} of {len(nodes)}, '{_label(node)}'")
            self._convert(node)
        out = self._add_output()
        tick("before building the graph module")
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraph")
        # the fixed inputs the output depends on only through their integer part
        setattr(gm, "integer_part_only", tuple(sorted(c for c in self.integer_inputs if not self.float_deps[out] >> c & 1)))
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        tick("after building the graph module")
        return gm

    def _convert(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise self.unsupported(node, f"domain '{node.domain}'")
        for name in node.input:
            if name and name not in self.env:
                raise ModelLoadError(f"node '{_label(node)}' uses '{name}', which is not defined before it")
        a = _attrs(node)
        outs: Value | list[Value]
        if all(isinstance(self.env[i], np.ndarray) for i in node.input if i) and node.op_type in _FOLD:
            outs = np.asarray(_FOLD[node.op_type](self, node, a, [self.env[i] if i else None for i in node.input]))
            if any(i in self.from_integers for i in node.input):
                self.from_integers.update(node.output)
        else:
            outs = self._convert_dynamic(node, a)
        outs = outs if isinstance(outs, list) else [outs]
        self._track_inputs(node, a, outs)
        if node.op_type in _KEEPS_INTEGERS and self._integer_operands(node):
            self.integral.update(o for o in outs if isinstance(o, fx.Node))
        for name in node.output[len(outs):]:
            if self.uses[name]:
                raise self.unsupported(node, f"its output '{name}' is used; only the first output is supported")
        for name, v in zip(node.output, outs):
            self.env[name] = v

    def _convert_dynamic(self, node: onnx.NodeProto, a: dict) -> Value | list:
        deps = frozenset().union(*(self.int_deps.get(v, frozenset()) for v in self._dynamic_inputs(node)))
        try:
            if node.op_type not in _CONVERTERS:
                raise self.unsupported(node, f"opset {self.opset}; not in the canonical graph")
            return _CONVERTERS[node.op_type](self, node, a)
        except UnsupportedOperatorError as e:
            if not deps or isinstance(e, IntegerInputsNeeded):
                raise
            raise IntegerInputsNeeded(f"{e}: it uses the integer part of inputs {sorted(deps)}", sorted(deps)) from None

    def _dynamic_inputs(self, node: onnx.NodeProto) -> list[fx.Node]:
        vals = [self.env[i] for i in node.input if i]
        return [v.x if isinstance(v, _Pending) else v for v in vals if isinstance(v, (fx.Node, _Pending))]

    def _track_inputs(self, node: onnx.NodeProto, a: dict, outs: list) -> None:
        """Carry the integer-input dependencies to the outputs, and the input indices of values
        that merely move input entries (folding the index arrays as the op folds constants)."""
        ins = self._dynamic_inputs(node)
        deps = frozenset().union(*(self.int_deps.get(v, frozenset()) for v in ins))
        fdeps = 0
        for v in ins:
            fdeps |= self.float_deps.get(v, 0)
        for o in outs:
            if not isinstance(o, fx.Node):
                continue
            if deps:
                self.int_deps[o] = self.int_deps.get(o, frozenset()) | deps
            if o not in self.float_deps:  # a new value (not an input passed through)
                self.float_deps[o] = fdeps
        if len(outs) != 1 or not isinstance(outs[0], fx.Node) or outs[0] in self.coords or node.op_type not in _MOVES_ENTRIES:
            return
        first = self.env[node.input[0]]
        if not isinstance(first, fx.Node) or first not in self.coords or any(isinstance(self.env[i], fx.Node) or i in self.from_integers for i in node.input[1:] if i):
            return
        if node.op_type in ("Cast", "Identity", "Dropout"):
            if node.op_type != "Cast" or np.issubdtype(helper.tensor_dtype_to_np_dtype(a["to"]), np.floating):
                self.coords[outs[0]] = self.coords[first]
            return
        ins_np = [self.coords[first]] + [self.env[i] if i else None for i in node.input[1:]]
        self.coords[outs[0]] = np.asarray(_FOLD[node.op_type](self, node, a, ins_np))
        self.float_deps[outs[0]] = _bit_mask(self.coords[outs[0]])

    def _integer_operands(self, node: onnx.NodeProto) -> bool:
        """Do the data operands of ``node`` hold integers (dynamic ones known integral, constants
        integer-valued)? Index / shape operands (Gather, Slice, Reshape, ...) are not data."""
        data = node.input if node.op_type in _INTEGER_ARITHMETIC else node.input[:1]
        for name in data:
            v = self.env.get(name) if name else None
            if isinstance(v, _Pending):
                v = v.x
            if isinstance(v, fx.Node) and v not in self.integral:
                return False
            if isinstance(v, np.ndarray) and not _integer_valued(v):
                return False
        return True

    def _add_output(self) -> fx.Node:
        outs = self.model.graph.output
        if len(outs) != 1:
            raise ModelLoadError(f"the ONNX graph has {len(outs)} outputs; exactly one is supported")
        v = self.env.get(outs[0].name)
        if v is None or isinstance(v, np.ndarray):
            raise ModelLoadError(f"the graph output '{outs[0].name}' does not depend on the input")
        if isinstance(v, _Pending):
            v = self.materialise(v)
        deps = self.float_deps.get(v, 0)
        rank = self.example[v].dim()
        if rank == 1:
            v = self.fn(torch.reshape, v, (-1, 1), hint="output")
        elif rank > 2:
            v = self.fn(torch.flatten, v, 1, hint="output")
        self.graph.output(v)
        self.float_deps[v] = deps
        return v

    # -- errors and inputs ------------------------------------------------------------------

    def unsupported(self, node: onnx.NodeProto, why: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(f"unsupported ONNX operator '{node.op_type}' at node '{_label(node)}' ({why})")

    def arg(self, node: onnx.NodeProto, i: int) -> fx.Node | np.ndarray | None:
        """Input ``i`` (None when absent); a pending Pad here is an unsupported explicit pad."""
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.env[node.input[i]]
        if isinstance(v, _Pending):  # not absorbed by a Conv / AveragePool: an explicit zero pad
            v = self.env[node.input[i]] = self.materialise(v)
        return v

    def materialise(self, p: _Pending) -> fx.Node:
        """A pending zero Pad as its own op (``F.pad``: last dim first)."""
        k = len(p.pads) // 2
        begins, ends = p.pads[:k], p.pads[k:]
        torch_pads: list[int] = []
        for b, e in zip(reversed(begins), reversed(ends)):
            torch_pads += [int(b), int(e)]
        return self.fn(F.pad, p.x, tuple(torch_pads), hint=_label(p.node))

    def dyn(self, node: onnx.NodeProto, i: int = 0) -> fx.Node:
        v = self.arg(node, i)
        if not isinstance(v, fx.Node):
            raise self.unsupported(node, f"input {i} must depend on the network input")
        return v

    @overload
    def const(self, node: onnx.NodeProto, i: int, optional: Literal[False] = False) -> np.ndarray: ...

    @overload
    def const(self, node: onnx.NodeProto, i: int, optional: bool) -> np.ndarray | None: ...

    def const(self, node: onnx.NodeProto, i: int, optional: bool = False) -> np.ndarray | None:
        v = self.arg(node, i)
        if v is None and optional:
            return None
        if not isinstance(v, np.ndarray):
            raise self.unsupported(node, f"input {i} must be a constant (an initializer or a Constant node)")
        return v

    def padded(self, node: onnx.NodeProto) -> tuple[fx.Node, list[int] | None]:
        """Input 0 and, if it comes from a zero Pad, that Pad's spatial pads (begins + ends)."""
        v = self.env[node.input[0]]
        if isinstance(v, _Pending):
            return v.x, v.pads
        return self.dyn(node, 0), None

    def shape(self, v: fx.Node) -> tuple[int, ...]:
        """The ONNX shape of a dynamic value (batch 1 where there is a batch dim)."""
        return tuple(self.example[v].shape[self.offset :])

    def axis(self, node: onnx.NodeProto, a: int, rank: int) -> int:
        """ONNX axis ``a`` of a rank-``rank`` value -> torch axis; refuses the batch axis."""
        if not -rank <= a < rank:
            raise self.unsupported(node, f"axis {a} out of range for rank {rank}")
        t = a % rank + self.offset
        if t == 0:
            raise self.unsupported(node, "it acts on the batch dimension")
        return t

    def require_batched(self, node: onnx.NodeProto, x: fx.Node, ranks: tuple[int, ...]) -> None:
        if not self.batched or len(self.shape(x)) not in ranks:
            raise self.unsupported(node, f"input shape {list(self.shape(x))}; expected rank {ranks} with a batch dim")

    # -- emitting fx nodes ------------------------------------------------------------------

    def emit(self, op: str, target, args: tuple, hint: str) -> fx.Node:
        """Create an fx node and run it on the examples of its inputs."""
        n = self.graph.create_node(op, target, args, {}, name=_ident(hint))
        fn: Callable
        if op == "call_module":
            fn = self.root.get_submodule(target)
        elif op == "call_method":
            def method(obj, *rest):
                return getattr(obj, target)(*rest)
            fn = method
        else:
            fn = target
        real = fx.node.map_arg(args, lambda a: self.example[a])  # nested (a list for torch.cat) too
        try:
            with torch.no_grad():
                self.example[n] = fn(*real)
        except RuntimeError as e:  # inconsistent shapes in the file (or a bug of ours)
            shapes = [list(t.shape) for t in real if isinstance(t, Tensor)]
            raise ModelLoadError(f"node '{hint}' does not run on inputs of shape {shapes}: {e}") from e
        self.clock.tick(lambda: f"after '{hint}'")  # one ONNX node may emit several expensive steps
        return n

    def module(self, mod: nn.Module, x: fx.Node, node: onnx.NodeProto | str) -> fx.Node:
        hint = node if isinstance(node, str) else _label(node)
        name = self._free_name(_ident(hint))
        self.root.add_module(name, mod.eval())
        return self.emit("call_module", name, (x,), hint)

    def fn(self, f: Callable, *args, hint: str) -> fx.Node:
        return self.emit("call_function", f, args, hint)

    def const_node(self, arr: np.ndarray, hint: str) -> fx.Node:
        name = self._free_name("c_" + _ident(hint))
        self.root.register_buffer(name, torch.as_tensor(np.array(arr, dtype=np.float64)))
        n = self.graph.get_attr(name)
        self.example[n] = getattr(self.root, name)
        return n

    def _free_name(self, name: str) -> str:
        base, k = name, 0
        while name in _RESERVED or hasattr(self.root, name):
            k += 1
            name = f"{base}_{k}"
        return name

    def operand(self, node: onnx.NodeProto, c: np.ndarray, rank: int) -> float | fx.Node:
        """A constant operand of a binary op on a rank-``rank`` (ONNX) dynamic value."""
        extra = c.ndim - rank
        if extra > 0:
            if any(d != 1 for d in c.shape[:extra]):
                raise self.unsupported(node, f"constant of shape {list(c.shape)} broadcasts beyond the input")
            c = c.reshape(c.shape[extra:])
        if self.batched and c.ndim == rank and rank > 0 and c.shape[0] != 1:
            raise self.unsupported(node, f"constant of shape {list(c.shape)} spans the batch dimension")
        if c.size == 1:
            return float(c.reshape(()))
        return self.const_node(c, _label(node))

    def align(self, x: fx.Node, y: fx.Node, hint: str) -> tuple[fx.Node, fx.Node]:
        """Two input-dependent operands of a broadcasting op, the one of lower ONNX rank given
        leading unit dims after the batch dim (torch would align it with the batch instead)."""
        rx, ry = len(self.shape(x)), len(self.shape(y))
        for _ in range(ry - rx):
            x = self.fn(torch.unsqueeze, x, 1, hint=hint)
        for _ in range(rx - ry):
            y = self.fn(torch.unsqueeze, y, 1, hint=hint)
        return x, y

    def reshape(self, node: onnx.NodeProto, x: fx.Node, o: tuple[int, ...]) -> fx.Node:
        """Batch-agnostic reshape of ``x`` to the ONNX shape ``o`` (leading torch dim -1)."""
        if self.batched and (not o or o[0] != 1):
            raise self.unsupported(node, f"reshape to {list(o)} merges or drops the batch dimension")
        target = (-1, *o[1 - self.offset :])
        if tuple(self.example[x].shape[1:]) == target[1:]:
            return x
        return self.fn(torch.reshape, x, target, hint=_label(node))


def _bit_mask(indices: np.ndarray) -> int:
    """The int whose bits ``indices`` are set."""
    if indices.size == 0:
        return 0
    bits = np.zeros(int(indices.max()) + 1, dtype=bool)
    bits[indices.ravel()] = True
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for at in node.attribute:
        v = helper.get_attribute_value(at)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[at.name] = v
    return out


def _checked(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ModelLoadError(f"{what} contains NaN")
    return arr


def _f64(arr: np.ndarray) -> Tensor:
    return torch.as_tensor(np.array(arr, dtype=np.float64))


def _params(mod: nn.Module, **arrays: np.ndarray | None) -> nn.Module:
    """Set parameters / buffers of ``mod`` (in float64) from numpy arrays."""
    mod = mod.to(_F64)
    for k, v in arrays.items():
        if k in ("weight", "bias"):
            setattr(mod, k, None if v is None else nn.Parameter(_f64(v)))
        else:
            assert v is not None, k  # only weight and bias are optional
            setattr(mod, k, _f64(v))
    return mod


# ---------------------------------------------------------------------------------------------
# converters for dynamic inputs: (converter, node, attributes) -> value or list of values


def _gemm(cv: _Converter, node, a) -> fx.Node:
    x, w, c = cv.dyn(node), cv.const(node, 1), cv.const(node, 2, optional=True)
    if a.get("transA", 0):
        raise cv.unsupported(node, "transA=1")
    if len(cv.shape(x)) != 2 or w.ndim != 2:
        raise cv.unsupported(node, f"input shape {list(cv.shape(x))}; Gemm needs rank 2")
    weight = a.get("alpha", 1.0) * (w if a.get("transB", 0) else w.T)  # [out, in]
    bias = None
    if c is not None:
        if c.ndim == 2 and c.shape[0] != 1:
            raise cv.unsupported(node, f"bias of shape {list(c.shape)} varies over rows")
        bias = a.get("beta", 1.0) * np.broadcast_to(c.reshape(-1) if c.ndim == 2 else c, weight.shape[:1])
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    return cv.module(_params(lin, weight=weight, bias=bias), x, node)


def _matmul(cv: _Converter, node, a) -> fx.Node:
    left, right = cv.arg(node, 0), cv.arg(node, 1)
    if isinstance(left, fx.Node) and isinstance(right, fx.Node):  # attention: a product (bilinear bounds)
        rl, rr = len(cv.shape(left)), len(cv.shape(right))
        if rl != rr or rl < 2:
            raise cv.unsupported(node, f"product of input-dependent tensors of ranks {rl} and {rr}")
        return cv.fn(torch.matmul, left, right, hint=_label(node))
    if isinstance(left, fx.Node):  # x @ W: contracts the last axis of x
        return _matmul_right(cv, node, left, cv.const(node, 1))
    return _matmul_left(cv, node, cv.const(node, 0), cv.dyn(node, 1))


def _matmul_right(cv: _Converter, node, x: fx.Node, w: np.ndarray) -> fx.Node:
    r = len(cv.shape(x))
    cv.axis(node, r - 1, r)
    if w.ndim == 2:
        return cv.module(_params(nn.Linear(w.shape[0], w.shape[1], bias=False), weight=w.T), x, node)
    if w.ndim == 1:  # x @ v drops the last axis
        y = cv.module(_params(nn.Linear(w.size, 1, bias=False), weight=w[None]), x, node)
        return cv.fn(torch.squeeze, y, -1, hint=_label(node))
    raise cv.unsupported(node, f"constant operand of rank {w.ndim}")


def _matmul_left(cv: _Converter, node, w: np.ndarray, x: fx.Node) -> fx.Node:
    """``W @ x``: a Linear over axis -2 of x (or over its only axis when x is a vector)."""
    r = len(cv.shape(x))
    if w.ndim != 2:
        raise cv.unsupported(node, f"constant left operand of rank {w.ndim}")
    cv.axis(node, r - 2 if r >= 2 else 0, r)
    lin = _params(nn.Linear(w.shape[1], w.shape[0], bias=False), weight=w)
    if r == 1:
        return cv.module(lin, x, node)
    xt = cv.fn(torch.transpose, x, -1, -2, hint=_label(node))
    y = cv.module(lin, xt, node)
    return cv.fn(torch.transpose, y, -1, -2, hint=_label(node))


_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


def _binary(cv: _Converter, node, a) -> fx.Node:
    x, y = cv.arg(node, 0), cv.arg(node, 1)
    op, f = node.op_type, _BINARY[node.op_type]
    if isinstance(x, fx.Node) and isinstance(y, fx.Node):  # Mul / Div: a product (bilinear bounds)
        return cv.fn(f, *cv.align(x, y, _label(node)), hint=_label(node))
    if isinstance(x, fx.Node):
        return _binary_const_right(cv, node, x, cv.const(node, 1), node.input[0])
    c, y = cv.const(node, 0), cv.dyn(node, 1)
    if op in ("Add", "Mul"):  # commutative: c op y == y op c
        return _binary_const_right(cv, node, y, c, node.input[1])
    if op == "Div":  # c / y = c * (1 / y)
        r = cv.fn(torch.reciprocal, y, hint=_label(node))
        return cv.fn(operator.mul, r, cv.operand(node, c, len(cv.shape(y))), hint=_label(node))
    return cv.fn(f, cv.operand(node, c, len(cv.shape(y))), y, hint=_label(node))


def _binary_const_right(cv: _Converter, node, x: fx.Node, c: np.ndarray, x_name: str) -> fx.Node:
    """``x op c``: neutral constants vanish, a bias after a MatMul joins its Linear."""
    s, op = cv.shape(x), node.op_type
    keeps_shape = c.ndim <= len(s) and np.broadcast_shapes(s, c.shape) == s
    if keeps_shape and np.all(c == (0 if op in ("Add", "Sub") else 1)):
        return x
    if op in ("Add", "Sub") and keeps_shape and _fuse_bias(cv, x, x_name, c if op == "Add" else -c):
        return x
    return cv.fn(_BINARY[op], x, cv.operand(node, c, len(s)), hint=_label(node))


def _fuse_bias(cv: _Converter, x: fx.Node, x_name: str, c: np.ndarray) -> bool:
    """Put ``c`` into the bias of the bias-free Linear producing ``x`` (if only one node uses ``x``)."""
    if x.op != "call_module" or cv.uses[x_name] != 1:
        return False
    lin = cv.root.get_submodule(str(x.target))
    if not isinstance(lin, nn.Linear) or lin.bias is not None:
        return False
    if c.size != lin.out_features or (c.ndim and c.shape[-1] != lin.out_features):
        return False
    lin.bias = nn.Parameter(_f64(c.reshape(-1)))
    cv.example[x] = cv.example[x] + lin.bias.detach()
    return True


def _neg(cv: _Converter, node, a) -> fx.Node:
    return cv.fn(operator.mul, cv.dyn(node), -1.0, hint=_label(node))


def _activation(cls: type[nn.Module]) -> Callable:
    def convert(cv: _Converter, node, a) -> fx.Node:
        return cv.module(cls(), cv.dyn(node), node)

    return convert


def _unary(f: Callable, integers: bool = False) -> Callable:
    """An elementwise function of one input-dependent tensor (relaxed in relax.ir.ops.elementwise);
    ``integers``: its values are integers (sign, floor)."""
    def convert(cv: _Converter, node, a) -> fx.Node:
        y = cv.fn(f, cv.dyn(node), hint=_label(node))
        if integers:
            cv.integral.add(y)
        return y

    return convert


def _pow(cv: _Converter, node, a) -> fx.Node:
    e = cv.const(node, 1)
    if e.size != 1:
        raise cv.unsupported(node, f"exponent of shape {list(e.shape)}")
    return cv.fn(torch.pow, cv.dyn(node), float(e.reshape(())), hint=_label(node))


def _clip(cv: _Converter, node, a) -> fx.Node:
    if cv.opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = cv.const(node, 1, optional=True), cv.const(node, 2, optional=True)
        lo = None if lo is None else float(np.ravel(lo)[0])
        hi = None if hi is None else float(np.ravel(hi)[0])
    return cv.fn(torch.clamp, cv.dyn(node), lo, hi, hint=_label(node))


def _leaky_relu(cv: _Converter, node, a) -> fx.Node:
    return cv.fn(F.leaky_relu, cv.dyn(node), float(a.get("alpha", 0.01)), hint=_label(node))


def _softmax(cv: _Converter, node, a) -> fx.Node:
    """Softmax / LogSoftmax over one axis (opset >= 13), or over the flattened axes from ``axis``
    on (before); LogSoftmax as ``torch.log_softmax`` (no underflow: ``log(softmax)`` of logits 180
    apart in float32 is ``-inf``)."""
    f = torch.log_softmax if node.op_type == "LogSoftmax" else torch.softmax
    x = cv.dyn(node)
    r = len(cv.shape(x))
    axis = a.get("axis", -1 if cv.opset >= 13 else 1) % r
    t = cv.axis(node, axis, r)
    if cv.opset >= 13 or axis == r - 1:
        return cv.fn(f, x, t, hint=_label(node))
    flat = cv.fn(torch.flatten, x, t, hint=_label(node))
    y = cv.fn(f, flat, -1, hint=_label(node))
    return cv.fn(torch.reshape, y, (-1, *cv.example[x].shape[1:]), hint=_label(node))


def _reduce(f: Callable) -> Callable:
    """ReduceSum / ReduceMean over constant axes (never the batch)."""
    def convert(cv: _Converter, node, a) -> fx.Node:
        x = cv.dyn(node)
        dims = reduce_axes(cv, node, a, x)
        if dims is None:
            return x
        return cv.fn(f, x, dims, bool(a.get("keepdims", 1)), hint=_label(node))

    return convert


def _max_min(f: Callable) -> Callable:
    """Max / Min of any number of tensors (constants among them folded into one)."""
    def convert(cv: _Converter, node, a) -> fx.Node:
        vals = [cv.arg(node, i) for i in range(len(node.input))]
        dyn = [v for v in vals if isinstance(v, fx.Node)]
        consts = [v for v in vals if isinstance(v, np.ndarray)]
        assert dyn  # not folded: an operand depends on the input
        x = dyn[0]
        for v in dyn[1:]:
            x = cv.fn(f, *cv.align(x, v, _label(node)), hint=_label(node))
        if not consts:
            return x
        y = consts[0]
        for c in consts[1:]:
            y = np.maximum(y, c) if f is torch.maximum else np.minimum(y, c)
        c_op = cv.operand(node, y, len(cv.shape(x)))
        if isinstance(c_op, float):  # max(x, c) = clamp(x, min=c)
            bounds = (c_op, None) if f is torch.maximum else (None, c_op)
            return cv.fn(torch.clamp, x, *bounds, hint=_label(node))
        return cv.fn(f, x, c_op, hint=_label(node))

    return convert


def _spatial_pads(cv: _Converter, node, a, sizes, kernel, strides, dil) -> list[int]:
    """ONNX pads (begins + ends) after resolving ``auto_pad``."""
    k = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * k))
    if mode == "VALID":
        return [0] * 2 * k
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise cv.unsupported(node, f"auto_pad={mode}")
    begins, ends = [], []
    for n, kk, s, d in zip(sizes, kernel, strides, dil):
        total = max((math.ceil(n / s) - 1) * s + (kk - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _symmetric(cv: _Converter, node, pads: list[int]) -> list[int]:
    k = len(pads) // 2
    if pads[:k] != pads[k:] or min(pads, default=0) < 0:
        raise cv.unsupported(node, f"asymmetric or negative pads {pads}")
    return pads[:k]


def _unit_leading(convert: Callable) -> Callable:
    """Run a converter of an op whose first ONNX axis is the batch (Conv, pools, BatchNorm, Pad,
    Resize, ConvTranspose) on a graph without a batch dim whose operand has a leading ONNX dim of
    1 (pensieve's [12, 8] input reshaped to [1, 1, 8]; carvana after its Gather of the batch):
    that dim is dropped, the op converted as if it were the batch, and the dim put back."""
    def convert_unit(cv: _Converter, node, a) -> Value:
        name = node.input[0]
        v = cv.env.get(name)
        base = v.x if isinstance(v, _Pending) else v
        if cv.batched or not isinstance(base, fx.Node) or cv.shape(base)[:1] != (1,):
            return convert(cv, node, a)
        assert v is not None  # base is a Node
        hint = _label(node)
        inner = cv.fn(torch.squeeze, cv.arg(node, 0), 1, hint=hint)
        cv.env[name], cv.offset = inner, cv.offset - 1
        try:
            y = convert(cv, node, a)
            if isinstance(y, _Pending):
                y = cv.materialise(y)
        finally:
            cv.env[name], cv.offset = v, cv.offset + 1
        return cv.fn(torch.unsqueeze, y, 1, hint=hint)

    return convert_unit


def _conv(cv: _Converter, node, a) -> fx.Node:
    x, pre = cv.padded(node)
    w, b = cv.const(node, 1), cv.const(node, 2, optional=True)
    k = w.ndim - 2
    if k not in (1, 2):
        raise cv.unsupported(node, f"{k}-D convolution")
    return _conv_on(cv, node, a, x, pre, w, b, k)


def _conv_on(cv: _Converter, node, a, x: fx.Node, pre, w: np.ndarray, b, k: int) -> fx.Node:
    cv.require_batched(node, x, (k + 2,))
    strides, dil = list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))
    pads = _spatial_pads(cv, node, a, cv.shape(x)[2:], w.shape[2:], strides, dil)
    if pre:
        pads = [p + q for p, q in zip(pads, pre)]
    group = a.get("group", 1)
    cls = nn.Conv2d if k == 2 else nn.Conv1d
    conv = cls(w.shape[1] * group, w.shape[0], tuple(w.shape[2:]), stride=tuple(strides),
               padding=tuple(_symmetric(cv, node, pads)),  # type: ignore[arg-type]  # a k-tuple for a k-D conv
               dilation=tuple(dil), groups=group, bias=b is not None)
    return cv.module(_params(conv, weight=w, bias=b), x, node)


def _batchnorm(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    scale, bias, mean, var = (cv.const(node, i) for i in range(1, 5))
    if a.get("training_mode", 0) or (cv.opset < 9 and a.get("spatial", 1) == 0):
        raise cv.unsupported(node, "training mode or spatial=0")
    cv.require_batched(node, x, (2, 3, 4))
    cls = nn.BatchNorm2d if len(cv.shape(x)) == 4 else nn.BatchNorm1d
    bn = cls(scale.size, eps=float(a.get("epsilon", 1e-5)))
    return cv.module(_params(bn, weight=scale, bias=bias, running_mean=mean, running_var=var), x, node)


def _pool(cv: _Converter, node, a) -> fx.Node:
    """AveragePool / MaxPool (2-D) and their Global forms."""
    x, pre = cv.padded(node) if node.op_type == "AveragePool" else (cv.dyn(node), None)
    cv.require_batched(node, x, (4,))
    sizes = cv.shape(x)[2:]
    kernel = list(sizes) if node.op_type.startswith("Global") else list(a["kernel_shape"])
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    pads = _spatial_pads(cv, node, a, sizes, kernel, strides, dil)
    ceil = bool(a.get("ceil_mode", 0))
    if node.op_type.endswith("MaxPool"):
        return _maxpool(cv, node, x, kernel, strides, _symmetric(cv, node, pads), dil, ceil)
    if dil != [1, 1]:
        raise cv.unsupported(node, f"dilations {dil}")
    include = bool(a.get("count_include_pad", 0))
    if pre:
        if any(pads) and not include:
            raise cv.unsupported(node, "explicit Pad before a pool with count_include_pad=0 and its own pads")
        pads, include = [p + q for p, q in zip(pads, pre)], True
    padding = _pool_padding(cv, node, pads, kernel)
    pool = nn.AvgPool2d(tuple(kernel), tuple(strides), padding,  # type: ignore[arg-type]  # 2-tuples (rank 4 checked)
                        ceil_mode=ceil, count_include_pad=include)
    return cv.module(pool, x, node)


def _maxpool(cv: _Converter, node, x, kernel, strides, padding, dil, ceil) -> fx.Node:
    _pool_padding(cv, node, padding + padding, kernel)
    pool = nn.MaxPool2d(tuple(kernel), tuple(strides), tuple(padding), tuple(dil), ceil_mode=ceil)
    return cv.module(pool, x, node)


def _pool_padding(cv: _Converter, node, pads: list[int], kernel: list[int]) -> tuple[int, ...]:
    padding = _symmetric(cv, node, pads)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise cv.unsupported(node, f"padding {padding} exceeds half the kernel {kernel}")
    return tuple(padding)


def _flatten(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    s = cv.shape(x)
    axis = a.get("axis", 1)
    axis = axis + len(s) if axis < 0 else axis
    o = (math.prod(s[:axis]), math.prod(s[axis:]))
    if cv.batched and o[0] == 1:
        return x if len(s) == 2 else cv.module(nn.Flatten(), x, node)
    return cv.reshape(node, x, o)


def _reshape(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    target = a["shape"] if cv.opset < 5 else cv.const(node, 1)
    o = _reshape_target(cv.shape(x), [int(t) for t in np.ravel(target)], a.get("allowzero", 0))
    if o is None:
        raise cv.unsupported(node, f"cannot reshape {list(cv.shape(x))} to {list(np.ravel(target))}")
    return cv.reshape(node, x, o)


def _reshape_target(s: tuple[int, ...], t: list[int], allowzero: int) -> tuple[int, ...] | None:
    """Resolve ONNX Reshape's 0 (copy) and -1 (infer) entries; None if impossible."""
    o = [s[i] if d == 0 and not allowzero and i < len(s) else d for i, d in enumerate(t)]
    n, known = math.prod(s), math.prod(d for d in o if d != -1)
    if o.count(-1) > 1 or any(d < -1 for d in o):
        return None
    if -1 in o:
        if known == 0:
            return None
        o[o.index(-1)] = n // known
    return tuple(o) if math.prod(o) == n else None


def _transpose(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    r = len(cv.shape(x))
    perm = list(a.get("perm", range(r - 1, -1, -1)))
    if perm == list(range(r)):
        return x
    full = perm if cv.batched else [0] + [p + 1 for p in perm]
    if full[0] != 0:
        raise cv.unsupported(node, f"perm {perm} moves the batch dimension")
    return cv.fn(torch.permute, x, tuple(full), hint=_label(node))


def _axes(cv: _Converter, node, a) -> list[int] | None:
    """Squeeze / Unsqueeze axes: an attribute before opset 13, an input from 13 on."""
    if cv.opset < 13:
        return a.get("axes")
    c = cv.const(node, 1, optional=True)
    return None if c is None else [int(v) for v in np.ravel(c)]


def _unsqueeze(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    axes = _axes(cv, node, a)
    if axes is None:
        raise cv.unsupported(node, "no axes")
    r = len(cv.shape(x)) + len(axes)
    for ax in sorted(ax % r for ax in axes):
        x = cv.fn(torch.unsqueeze, x, cv.axis(node, ax, r), hint=_label(node))
    return x


def _squeeze(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    s = cv.shape(x)
    axes = _axes(cv, node, a)
    if axes is None:
        axes = [i for i, d in enumerate(s) if d == 1 and (i > 0 or not cv.batched)]
    for ax in sorted((ax % len(s) for ax in axes), reverse=True):
        if s[ax] != 1:
            raise cv.unsupported(node, f"axis {ax} of shape {list(s)} is not 1")
        x = cv.fn(torch.squeeze, x, cv.axis(node, ax, len(s)), hint=_label(node))
    return x


def _passthrough(cv: _Converter, node, a) -> fx.Node:
    return cv.dyn(node)


# -- integer and boolean values --------------------------------------------------------------
# ONNX integer and bool tensors that depend on the input are carried as float tensors holding
# their values (a bool as 0 / 1); ``cv.integral`` remembers which dynamic values hold integers.
# Each op below is a composition of relaxed elementwise functions that is exact on every input:
#   [t > 0] = heaviside(t, 0),  [t >= 0] = heaviside(t, 1),  trunc(x) = floor(relu(x)) - floor(relu(-x)),
#   [a == b] = 1 - min(|a - b|, 1) for integers, 1 - |sign(a - b)| for any floats.


def _integer_valued(v: np.ndarray) -> bool:
    if v.dtype == np.bool_ or np.issubdtype(v.dtype, np.integer):
        return True
    return bool(np.issubdtype(v.dtype, np.floating) and np.all(np.isfinite(v)) and np.all(v == np.round(v)))


def _integral(cv: _Converter, x: fx.Node) -> fx.Node:
    cv.integral.add(x)
    return x


def _one_minus(cv: _Converter, x: fx.Node, hint: str) -> fx.Node:
    return cv.fn(operator.sub, 1.0, x, hint=hint)


def _step(cv: _Converter, t: fx.Node, strict: bool, hint: str) -> fx.Node:
    """``[t > 0]`` (strict) or ``[t >= 0]`` as 0 / 1: ``step(t, 0)`` / ``step(t, 1)`` (one relaxed
    Heaviside step, :class:`relax.ir.ops.Step`)."""
    at_zero = cv.const_node(np.array(0.0 if strict else 1.0), hint)
    return _integral(cv, cv.fn(step, t, at_zero, hint=hint))


def _nonzero(cv: _Converter, d: fx.Node, integers: bool, hint: str) -> fx.Node:
    """``[d != 0]`` as 0 / 1: ``min(|d|, 1)`` for integers (``|d|`` is 0 or >= 1), else ``|sign(d)|``."""
    if integers:
        return _integral(cv, cv.fn(torch.clamp, cv.fn(torch.abs, d, hint=hint), None, 1.0, hint=hint))
    return _integral(cv, cv.fn(torch.abs, cv.fn(torch.sign, d, hint=hint), hint=hint))


def _equal_values(cv: _Converter, x: fx.Node, y: fx.Node | float, integers: bool, hint: str) -> fx.Node:
    """``[x == y]`` as 0 / 1 (``y`` broadcast against ``x``); float subtraction is 0 only for
    equal operands (IEEE, gradual underflow)."""
    d = cv.fn(operator.sub, x, y, hint=hint)
    return _integral(cv, _one_minus(cv, _nonzero(cv, d, integers, hint), hint))


def _cast(cv: _Converter, node, a) -> fx.Node:
    """Cast: floats and integers keep their value; float -> integer truncates toward zero;
    anything -> bool is ``x != 0``."""
    x = cv.dyn(node)
    to = helper.tensor_dtype_to_np_dtype(a["to"])
    hint = _label(node)
    if to == np.bool_:
        return _nonzero(cv, x, x in cv.integral, hint)
    if np.issubdtype(to, np.floating) or x in cv.integral:
        return x
    if not np.issubdtype(to, np.integer):
        raise cv.unsupported(node, f"cast to {to}")
    coords = cv.coords.get(x)
    if coords is not None and all(int(c) in cv.integer_inputs for c in coords.ravel()):
        fixed = np.vectorize(lambda c: cv.integer_inputs[int(c)], otypes=[np.int64])(coords)
        cv.from_integers.add(node.output[0])
        return fixed.astype(to)
    up = cv.fn(torch.floor, cv.fn(torch.relu, x, hint=hint), hint=hint)
    down = cv.fn(torch.floor, cv.fn(torch.relu, cv.fn(operator.mul, x, -1.0, hint=hint), hint=hint), hint=hint)
    y = _integral(cv, cv.fn(operator.sub, up, down, hint=hint))
    if coords is not None:  # the integer part of inputs only
        cv.int_deps[y] = frozenset(int(c) for c in coords.ravel())
        cv.float_deps[y] = 0
    return y


def _equal(cv: _Converter, node, a) -> fx.Node:
    x, y = cv.arg(node, 0), cv.arg(node, 1)
    if not isinstance(x, fx.Node):
        x, y = y, x
    assert isinstance(x, fx.Node)  # not folded: an operand depends on the input
    other: fx.Node | float
    if isinstance(y, fx.Node):
        integers = x in cv.integral and y in cv.integral
        x, other = cv.align(x, y, _label(node))
    else:
        assert isinstance(y, np.ndarray)
        integers = x in cv.integral and _integer_valued(y)
        other = cv.operand(node, y, len(cv.shape(x)))
    return _equal_values(cv, x, other, integers, _label(node))


def _compare(greater: bool, strict: bool) -> Callable:
    """Greater / Less / GreaterOrEqual / LessOrEqual as a step of the difference."""
    def convert(cv: _Converter, node, a) -> fx.Node:
        x, y = cv.arg(node, 0), cv.arg(node, 1)
        hint = _label(node)
        if isinstance(x, fx.Node) and isinstance(y, fx.Node):
            d = cv.fn(operator.sub, *cv.align(x, y, hint), hint=hint)
        elif isinstance(x, fx.Node):
            d = cv.fn(operator.sub, x, cv.operand(node, cv.const(node, 1), len(cv.shape(x))), hint=hint)
        else:
            y = cv.dyn(node, 1)
            d = cv.fn(operator.sub, cv.operand(node, cv.const(node, 0), len(cv.shape(y))), y, hint=hint)
        if not greater:
            d = cv.fn(operator.mul, d, -1.0, hint=hint)
        return _step(cv, d, strict, hint)

    return convert


def _not(cv: _Converter, node, a) -> fx.Node:
    return _integral(cv, _one_minus(cv, cv.dyn(node), _label(node)))


def _logical(kind: str) -> Callable:
    """And / Or / Xor of 0 / 1 values (ONNX bools), exact on {0, 1}: with ``s = a + b`` and
    ``both = relu(s - 1)``, And = ``both``, Or = ``s - both``, Xor = ``s - 2 both``; against a
    constant ``c``: And = ``a c``, Or = ``a (1 - c) + c``, Xor = ``a (1 - 2 c) + c`` (linear)."""
    def convert(cv: _Converter, node, a) -> fx.Node:
        x, y = cv.arg(node, 0), cv.arg(node, 1)
        if not isinstance(x, fx.Node):
            x, y = y, x
        assert isinstance(x, fx.Node)  # not folded: an operand depends on the input
        hint = _label(node)
        for v in (x, y):
            if isinstance(v, fx.Node) and v not in cv.integral:
                raise cv.unsupported(node, "an operand that is not known to hold 0 / 1 (not a comparison's output)")
        if isinstance(y, fx.Node):
            s = cv.fn(operator.add, *cv.align(x, y, hint), hint=hint)
            both = cv.fn(torch.relu, cv.fn(operator.sub, s, 1.0, hint=hint), hint=hint)
            if kind == "And":
                return _integral(cv, both)
            return _integral(cv, cv.fn(operator.sub, s, both if kind == "Or" else cv.fn(operator.mul, both, 2.0, hint=hint), hint=hint))
        assert isinstance(y, np.ndarray)
        c = (y != 0).astype(np.float64)
        slope = {"And": c, "Or": 1.0 - c, "Xor": 1.0 - 2.0 * c}[kind]
        r = max(len(cv.shape(x)), c.ndim)
        while len(cv.shape(x)) < r:
            x = cv.fn(torch.unsqueeze, x, 1, hint=hint)
        out = cv.fn(operator.mul, x, cv.operand(node, slope, r), hint=hint)
        if kind != "And":
            out = cv.fn(operator.add, out, cv.operand(node, c, r), hint=hint)
        return _integral(cv, out)

    return convert


def _cast_like(cv: _Converter, node, a) -> Value:
    """CastLike (opset 15): Cast to the element type of input 1 (a constant's dtype; a computed
    value's declared or inferred type)."""
    target = cv.arg(node, 1)
    if isinstance(target, np.ndarray):
        to = target.dtype
    else:
        declared = cv.element_type(node.input[1])
        if declared is None:
            raise cv.unsupported(node, f"the element type of '{node.input[1]}' is neither declared nor inferred")
        to = declared
    src = cv.arg(node, 0)
    if isinstance(src, np.ndarray):
        return src.astype(to)
    return _cast(cv, node, {"to": helper.np_dtype_to_tensor_dtype(to)})


#: the most classes ArgMax compares pairwise (C (C - 1) steps)
ARGMAX_MAX_CLASSES = 64


def _argmax(cv: _Converter, node, a) -> fx.Node:
    """ArgMax along one axis: ``sum_k k [x_k wins]``, where ``x_k`` wins when it is at least every
    other entry and strictly above those of lower index (the first maximum; the last one with
    ``select_last_index``); "wins" is the AND ``relu(sum of bits - (C - 2))`` of its C - 1 steps.
    ArgMin is ArgMax of ``-x`` (the same first / last rule). Of a softmax's output: of its input
    (:func:`verify.onnx_argmax.scores_before_softmax`)."""
    scores = scores_before_softmax(cv, node)
    x = cv.dyn(node) if scores is None else scores
    if node.op_type == "ArgMin":
        x = cv.fn(operator.mul, x, -1.0, hint=_label(node))
    s = cv.shape(x)
    ax = int(a.get("axis", 0))
    t = cv.axis(node, ax, len(s))
    n = s[ax % len(s)]
    hint = _label(node)
    if n > ARGMAX_MAX_CLASSES:
        raise cv.unsupported(node, f"{n} classes (at most {ARGMAX_MAX_CLASSES})")
    last = bool(a.get("select_last_index", 0))
    entry = [cv.fn(operator.getitem, x, (slice(None),) * t + (slice(k, k + 1),), hint=hint) for k in range(n)]
    index = cv.fn(operator.mul, entry[0], 0.0, hint=hint)
    for k in range(1, n):
        bits = [_step(cv, cv.fn(operator.sub, entry[k], entry[j], hint=hint), (j > k) if last else (j < k), hint)
                for j in range(n) if j != k]
        wins = bits[0]
        for b in bits[1:]:
            wins = cv.fn(operator.add, wins, b, hint=hint)
        if len(bits) > 1:
            wins = cv.fn(torch.relu, cv.fn(operator.sub, wins, float(len(bits) - 1), hint=hint), hint=hint)
        index = cv.fn(operator.add, index, wins if k == 1 else cv.fn(operator.mul, wins, float(k), hint=hint), hint=hint)
    if not a.get("keepdims", 1):
        index = cv.fn(torch.squeeze, index, t, hint=hint)
    return _integral(cv, index)


def _onehot(cv: _Converter, node, a) -> fx.Node:
    """OneHot of integer indices: ``off + (on - off) [i == v]`` for v < depth (negative indices
    count from the end), stacked along ``axis``."""
    idx = cv.dyn(node)
    hint = _label(node)
    if idx not in cv.integral:
        raise cv.unsupported(node, "indices that are not known to hold integers")
    depth = int(np.ravel(cv.const(node, 1))[0])
    off, on = (float(v) for v in np.ravel(cv.const(node, 2))[:2])
    r = len(cv.shape(idx)) + 1
    t = cv.axis(node, int(a.get("axis", -1)), r)
    cols = []
    for v in range(depth):
        hit = cv.fn(operator.add, _equal_values(cv, idx, float(v), True, hint),
                    _equal_values(cv, idx, float(v - depth), True, hint), hint=hint)
        col = cv.fn(operator.add, cv.fn(operator.mul, hit, on - off, hint=hint), off, hint=hint)
        cols.append(cv.fn(torch.unsqueeze, col, t, hint=hint))
    y = cols[0] if depth == 1 else cv.fn(torch.cat, cols, t, hint=hint)
    return _integral(cv, y) if float(off).is_integer() and float(on).is_integer() else y


def _pad(cv: _Converter, node, a) -> Value:
    x = cv.dyn(node)
    r = len(cv.shape(x))
    if cv.opset < 11:
        pads, value = list(a.get("pads", a.get("paddings", []))), a.get("value", 0.0)
    else:
        pads, value = [int(p) for p in cv.const(node, 1)], cv.const(node, 2, optional=True)
        value = 0.0 if value is None else float(np.ravel(value)[0])
        if cv.arg(node, 3) is not None:
            raise cv.unsupported(node, "the axes input")
    if not any(pads):
        return x
    if a.get("mode", "constant") != "constant" or value != 0 or min(pads) < 0:
        raise cv.unsupported(node, f"mode={a.get('mode', 'constant')} value={value} pads={pads}")
    if not cv.batched or r < 3 or any(pads[:2]) or any(pads[r : r + 2]):
        raise cv.unsupported(node, f"pads {pads} outside the spatial dims")
    return _Pending(x, pads[2:r] + pads[r + 2 :], node)


def _shape(cv: _Converter, node, a) -> np.ndarray:
    s = np.array(cv.shape(cv.dyn(node)), dtype=np.int64)
    return s[a.get("start", 0) : a.get("end", len(s))]


def c_shape(p: np.ndarray, batched: bool) -> tuple[int, ...]:
    """Per-example shape of a constant operand (without its batch axis of 1 when batched)."""
    return tuple(p.shape[1:]) if batched else tuple(p.shape)


def _slice_key(cv: _Converter, node, x: fx.Node, axes, starts, ends, steps) -> tuple | None:
    """A torch index tuple for ONNX Slice (None when it selects everything)."""
    r = len(cv.shape(x))
    key: list = [slice(None)] * (r + cv.offset)
    changed = False
    for ax, st, en, sp in zip(axes, starts, ends, steps):
        ax, st, en, sp = int(ax), int(st), int(en), int(sp)
        if sp <= 0:
            raise cv.unsupported(node, f"step {sp} (only positive steps)")
        dim = cv.shape(x)[ax % r] if -r <= ax < r else None
        if dim is None:
            raise cv.unsupported(node, f"axis {ax} out of range for rank {r}")
        if slice(st, en, sp).indices(dim) == (0, dim, 1):
            continue
        key[cv.axis(node, ax, r)] = slice(st, en, sp)
        changed = True
    return tuple(key) if changed else None


def _slice(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    starts: Sequence[int] | np.ndarray
    ends: Sequence[int] | np.ndarray
    axes: Sequence[int] | np.ndarray
    steps: Sequence[int] | np.ndarray
    if cv.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = np.ravel(cv.const(node, 1)), np.ravel(cv.const(node, 2))
        axes_c = cv.const(node, 3, optional=True)
        steps_c = cv.const(node, 4, optional=True)
        axes = range(len(starts)) if axes_c is None else np.ravel(axes_c)
        steps = [1] * len(starts) if steps_c is None else np.ravel(steps_c)
    key = _slice_key(cv, node, x, axes, starts, ends, steps)
    return x if key is None else cv.fn(operator.getitem, x, key, hint=_label(node))


def _gather(cv: _Converter, node, a) -> fx.Node:
    x, idx = cv.dyn(node), cv.const(node, 1)
    s = cv.shape(x)
    ax = int(a.get("axis", 0))
    t = cv.axis(node, ax, len(s))
    dim = s[ax % len(s)]
    idx = np.asarray(idx, dtype=np.int64)
    if ((idx < -dim) | (idx >= dim)).any():
        raise cv.unsupported(node, f"indices out of range for axis {ax} of size {dim}")
    idx = idx % dim
    key = (slice(None),) * t + ((int(idx),) if idx.ndim == 0 else ([int(i) for i in idx.ravel()],))
    y = cv.fn(operator.getitem, x, key, hint=_label(node))
    if idx.ndim <= 1:
        return y
    k = ax % len(s)
    return cv.reshape(node, y, tuple(s[:k]) + tuple(idx.shape) + tuple(s[k + 1:]))


def _concat(cv: _Converter, node, a) -> fx.Node:
    parts = [cv.arg(node, i) for i in range(len(node.input))]
    dyn = [p for p in parts if isinstance(p, fx.Node)]
    r = len(cv.shape(dyn[0]))
    t = cv.axis(node, int(a["axis"]), r)
    nodes = []
    for i, p in enumerate(parts):
        if p is None:
            continue
        if isinstance(p, np.ndarray):
            if p.ndim != r or (cv.batched and p.shape[0] != 1):
                raise cv.unsupported(node, f"constant input {i} of shape {list(p.shape)}")
            if 0 in p.shape:
                continue
            c = cv.const_node(p if cv.batched else p[None], _label(node))  # [1, *shape], repeated along the batch
            size = cv.emit("call_method", "size", (dyn[0], 0), _label(node))
            p = cv.emit("call_method", "expand", (c, size, *c_shape(p, cv.batched)), _label(node))
        nodes.append(p)
    return nodes[0] if len(nodes) == 1 else cv.fn(torch.cat, nodes, t, hint=_label(node))


def _split(cv: _Converter, node, a) -> list:
    x = cv.dyn(node)
    s = cv.shape(x)
    ax = int(a.get("axis", 0))
    dim = s[ax % len(s)]
    sizes = a.get("split") if cv.opset < 13 else cv.const(node, 1, optional=True)
    n_out = len(node.output)
    if sizes is None:
        n = int(a.get("num_outputs", n_out))
        step = -(-dim // n)
        sizes = [min(step, dim - k * step) for k in range(n)]
    sizes = [int(v) for v in np.ravel(sizes)]
    if sum(sizes) != dim:
        raise cv.unsupported(node, f"split sizes {sizes} do not add up to {dim}")
    outs, start = [], 0
    for k, sz in enumerate(sizes):
        key = _slice_key(cv, node, x, [ax], [start], [start + sz], [1])
        outs.append(x if key is None else cv.fn(operator.getitem, x, key, hint=f"{_label(node)}_{k}"))
        start += sz
    return outs


def _expand(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    s = cv.shape(x)
    tgt = [int(v) for v in np.ravel(cv.const(node, 1))]
    try:
        o = tuple(np.broadcast_shapes(tuple(s), tuple(tgt)))
    except ValueError:
        raise cv.unsupported(node, f"cannot expand {list(s)} to {tgt}") from None
    if len(o) != len(s) or (cv.batched and o[0] != s[0]):
        raise cv.unsupported(node, f"expanding {list(s)} to {list(o)} changes the rank or the batch")
    if o == tuple(s):
        return x
    return cv.fn(torch.Tensor.expand, x, (-1, *o[1 - cv.offset:]), hint=_label(node))


def _nearest_factors(cv: _Converter, node, a, in_sizes, out_sizes) -> list[int]:
    """Integer upsampling factors of a nearest-neighbour Resize / Upsample, after checking that
    its coordinate rule maps output ``i`` to input ``i // factor`` on every axis."""
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":
        raise cv.unsupported(node, f"mode={mode} (only nearest is a selection of input entries)")
    ctm = a.get("coordinate_transformation_mode", b"half_pixel" if node.op_type == "Resize" else b"asymmetric")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    nm = a.get("nearest_mode", b"round_prefer_floor")
    nm = nm.decode() if isinstance(nm, bytes) else nm
    factors = []
    for n_in, n_out in zip(in_sizes, out_sizes):
        if n_out % n_in:
            raise cv.unsupported(node, f"non-integer scale {n_out}/{n_in}")
        f = n_out // n_in
        i = np.arange(n_out, dtype=np.float64)
        if ctm == "asymmetric":
            xo = i / f
        elif ctm in ("half_pixel", "pytorch_half_pixel"):
            xo = (i + 0.5) / f - 0.5
        elif ctm == "tf_half_pixel_for_nn":
            xo = (i + 0.5) / f
        elif ctm == "align_corners":
            xo = i * (n_in - 1) / max(n_out - 1, 1)
        else:
            raise cv.unsupported(node, f"coordinate_transformation_mode={ctm}")
        rounding: dict[str, Callable[[np.ndarray], np.ndarray]] = {"floor": np.floor, "ceil": np.ceil,
                    "round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5)}
        if nm not in rounding:
            raise cv.unsupported(node, f"nearest_mode={nm}")
        src = np.clip(rounding[nm](xo), 0, n_in - 1)
        if not np.array_equal(src, np.arange(n_out) // f):
            raise cv.unsupported(node, f"coordinate rule {ctm}/{nm} is not i // {f}")
        factors.append(f)
    return factors


def _resize(cv: _Converter, node, a) -> fx.Node:
    """Resize / Upsample of the spatial dims: nearest neighbour with integer factors (a selection),
    or linear (bilinear: :func:`verify.onnx_composite.resize_linear`)."""
    x = cv.dyn(node)
    s = cv.shape(x)
    if node.op_type == "Upsample":
        scales = a.get("scales") if cv.opset < 9 else cv.const(node, 1)
        sizes = None
    else:
        scales = cv.const(node, 2, optional=True) if len(node.input) > 2 else None
        sizes = cv.const(node, 3, optional=True) if len(node.input) > 3 else None
        if scales is not None and np.size(scales) == 0:
            scales = None
    if sizes is not None:
        out = [int(v) for v in np.ravel(sizes)]
    elif scales is not None:
        out = [int(math.floor(d * float(f))) for d, f in zip(s, np.ravel(scales))]
    else:
        raise cv.unsupported(node, "neither scales nor sizes")
    if len(out) != len(s) or not cv.batched or len(s) != 4 or out[:2] != list(s[:2]):
        raise cv.unsupported(node, f"resizing {list(s)} to {out} (only the spatial dims of an NCHW tensor)")
    if a.get("mode", "nearest") in ("linear", "bilinear"):
        return resize_linear(cv, node, a, x, out, None if scales is None else [float(v) for v in np.ravel(scales)])
    f = _nearest_factors(cv, node, a, s[2:], out[2:])
    return cv.fn(F.interpolate, x, None, tuple(float(v) for v in f), "nearest", hint=_label(node))


def _conv_transpose(cv: _Converter, node, a) -> fx.Node:
    x = cv.dyn(node)
    w, b = cv.const(node, 1), cv.const(node, 2, optional=True)
    k = w.ndim - 2
    if k != 2:
        raise cv.unsupported(node, f"{k}-D transposed convolution")
    cv.require_batched(node, x, (4,))
    strides, dil = list(a.get("strides", [1] * k)), list(a.get("dilations", [1] * k))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", ""):
        raise cv.unsupported(node, f"auto_pad={a['auto_pad']}")
    if "output_shape" in a:
        raise cv.unsupported(node, "the output_shape attribute")
    pads = _symmetric(cv, node, list(a.get("pads", [0] * 2 * k)))
    out_pad = list(a.get("output_padding", [0] * k))
    group = a.get("group", 1)
    conv = nn.ConvTranspose2d(w.shape[0], w.shape[1] * group, tuple(w.shape[2:]), stride=tuple(strides),
                              padding=tuple(pads),  # type: ignore[arg-type]  # a 2-tuple (k == 2 checked)
                              output_padding=tuple(out_pad), groups=group, bias=b is not None, dilation=tuple(dil))
    return cv.module(_params(conv, weight=w, bias=b), x, node)


_CONVERTERS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
    "Neg": _neg,
    "Relu": _activation(nn.ReLU),
    "Sigmoid": _activation(nn.Sigmoid),
    "Tanh": _activation(nn.Tanh),
    "Conv": _unit_leading(_conv),
    "BatchNormalization": _unit_leading(_batchnorm),
    "AveragePool": _unit_leading(_pool),
    "MaxPool": _unit_leading(_pool),
    "GlobalAveragePool": _unit_leading(_pool),
    "GlobalMaxPool": _unit_leading(_pool),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Identity": _passthrough,
    "Dropout": _passthrough,
    "Cast": _cast,
    "Pad": _unit_leading(_pad),
    "Shape": _shape,
    "Slice": _slice,
    "Gather": _gather,
    "Concat": _concat,
    "Split": _split,
    "Expand": _expand,
    "Resize": _unit_leading(_resize),
    "Upsample": _unit_leading(_resize),
    "ConvTranspose": _unit_leading(_conv_transpose),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign, integers=True),
    "Floor": _unary(torch.floor, integers=True),
    "Pow": _pow,
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "ReduceSum": _reduce(torch.sum),
    "ReduceMean": _reduce(torch.mean),
    "Max": _max_min(torch.maximum),
    "Min": _max_min(torch.minimum),
    "ArgMax": _argmax,
    "OneHot": _onehot,
    "Equal": _equal,
    "Greater": _compare(True, True),
    "GreaterOrEqual": _compare(True, False),
    "Less": _compare(False, True),
    "LessOrEqual": _compare(False, False),
    "Not": _not,
    "And": _logical("And"),
    "Or": _logical("Or"),
    "Xor": _logical("Xor"),
    "ArgMin": _argmax,
    "CastLike": _cast_like,
    "Atan": _unary(torch.atan),
}
_CONVERTERS.update(_COMPOSITE)  # operators written as compositions of the ones above (verify.onnx_composite)

#: ops that only move entries of their first operand (their folds apply to index arrays too)
_MOVES_ENTRIES = {"Gather", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity", "Dropout", "Cast"}

#: ops whose output holds integers when their data operands do (``_Converter._integer_operands``)
_KEEPS_INTEGERS = {"Transpose", "Gather", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
                   "Expand", "Identity", "Dropout", "Neg", "Abs", "Relu", "Max", "Min", "ReduceSum", "Add", "Sub",
                   "Mul", "Pad", "MaxPool"}
#: of those, the ops all of whose operands are data (the rest: only the first)
_INTEGER_ARITHMETIC = {"Concat", "Max", "Min", "Add", "Sub", "Mul"}


# ---------------------------------------------------------------------------------------------
# constant folding in numpy: (converter, node, attributes, input arrays) -> array


def _fold_constant(cv, node, a, ins) -> np.ndarray:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return _checked(np.array(a[key]), f"Constant node '{_label(node)}'")
    raise cv.unsupported(node, f"attributes {sorted(a)}")


def _fold_slice(cv, node, a, ins) -> np.ndarray:
    data = ins[0]
    if cv.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 else None
        steps = ins[4] if len(ins) > 4 else None
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        idx[int(ax)] = slice(int(s), int(e), int(st))
    return data[tuple(idx)]


def _fold_squeeze(cv, node, a, ins) -> np.ndarray:
    axes = a.get("axes") if cv.opset < 13 else (None if len(ins) < 2 or ins[1] is None else ins[1])
    return np.squeeze(ins[0], axis=None if axes is None else tuple(int(v) for v in np.ravel(axes)))


def _fold_unsqueeze(cv, node, a, ins) -> np.ndarray:
    axes = a["axes"] if cv.opset < 13 else ins[1]
    r = ins[0].ndim + len(np.ravel(axes))
    return np.expand_dims(ins[0], tuple(sorted(int(v) % r for v in np.ravel(axes))))


def _fold_reshape(cv, node, a, ins) -> np.ndarray:
    t = a["shape"] if cv.opset < 5 else ins[1]
    o = _reshape_target(ins[0].shape, [int(v) for v in np.ravel(t)], a.get("allowzero", 0))
    if o is None:
        raise cv.unsupported(node, f"cannot reshape {list(ins[0].shape)} to {list(np.ravel(t))}")
    return ins[0].reshape(o)


def _fold_div(cv, node, a, ins) -> np.ndarray:
    x, y = ins
    if np.issubdtype(x.dtype, np.integer):
        return np.trunc(x / y).astype(x.dtype)
    return x / y


def _fold_flatten(cv, node, a, ins) -> np.ndarray:
    axis = a.get("axis", 1) % max(ins[0].ndim, 1)
    return ins[0].reshape(math.prod(ins[0].shape[:axis]), -1)


def _fold_shape(cv, node, a, ins) -> np.ndarray:
    s = np.array(ins[0].shape, dtype=np.int64)
    return s[a.get("start", 0) : a.get("end", len(s))]


def _fold_constant_of_shape(cv, node, a, ins) -> np.ndarray:
    value = a.get("value", np.zeros(1, dtype=np.float32))
    return np.full(tuple(int(v) for v in ins[0]), np.ravel(value)[0], dtype=value.dtype)


def _fold_scatternd(cv, node, a, ins) -> np.ndarray:
    data, idx, upd = ins
    if a.get("reduction", b"none") not in (b"none", "none"):
        raise cv.unsupported(node, f"reduction {a['reduction']}")
    k = idx.shape[-1]
    out = np.array(data, copy=True)
    out[tuple(idx.reshape(-1, k).T)] = upd.reshape(-1, *data.shape[k:])
    return out


_FOLD: dict[str, Callable] = {
    "Constant": _fold_constant,
    "Identity": lambda cv, n, a, ins: ins[0],
    "Dropout": lambda cv, n, a, ins: ins[0],
    "Cast": lambda cv, n, a, ins: ins[0].astype(helper.tensor_dtype_to_np_dtype(a["to"])),
    "Add": lambda cv, n, a, ins: ins[0] + ins[1],
    "Sub": lambda cv, n, a, ins: ins[0] - ins[1],
    "Mul": lambda cv, n, a, ins: ins[0] * ins[1],
    "Div": _fold_div,
    "Neg": lambda cv, n, a, ins: -ins[0],
    "Sqrt": lambda cv, n, a, ins: np.sqrt(ins[0]),
    "Exp": lambda cv, n, a, ins: np.exp(ins[0]),
    "Log": lambda cv, n, a, ins: np.log(ins[0]),
    "Sin": lambda cv, n, a, ins: np.sin(ins[0]),
    "Cos": lambda cv, n, a, ins: np.cos(ins[0]),
    "Atan": lambda cv, n, a, ins: np.arctan(ins[0]),
    "CastLike": lambda cv, n, a, ins: ins[0].astype(ins[1].dtype),
    "And": lambda cv, n, a, ins: np.logical_and(ins[0], ins[1]),
    "Or": lambda cv, n, a, ins: np.logical_or(ins[0], ins[1]),
    "Xor": lambda cv, n, a, ins: np.logical_xor(ins[0], ins[1]),
    "Not": lambda cv, n, a, ins: np.logical_not(ins[0]),
    "Abs": lambda cv, n, a, ins: np.abs(ins[0]),
    "Sign": lambda cv, n, a, ins: np.sign(ins[0]),
    "Floor": lambda cv, n, a, ins: np.floor(ins[0]),
    "Reciprocal": lambda cv, n, a, ins: 1 / ins[0],
    "Pow": lambda cv, n, a, ins: np.power(ins[0], ins[1]),
    "Max": lambda cv, n, a, ins: np.maximum.reduce(ins),
    "Min": lambda cv, n, a, ins: np.minimum.reduce(ins),
    "Equal": lambda cv, n, a, ins: np.equal(ins[0], ins[1]),
    "Where": lambda cv, n, a, ins: np.where(ins[0], ins[1], ins[2]),
    "Range": lambda cv, n, a, ins: np.arange(ins[0], ins[1], ins[2]),
    "Expand": lambda cv, n, a, ins: np.broadcast_to(ins[0], np.broadcast_shapes(ins[0].shape, tuple(int(v) for v in ins[1]))),
    "Relu": lambda cv, n, a, ins: np.maximum(ins[0], 0),
    "MatMul": lambda cv, n, a, ins: ins[0] @ ins[1],
    "Concat": lambda cv, n, a, ins: np.concatenate(ins, axis=a["axis"]),
    "Gather": lambda cv, n, a, ins: np.take(ins[0], ins[1], axis=a.get("axis", 0)),
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Reshape": _fold_reshape,
    "Flatten": _fold_flatten,
    "Transpose": lambda cv, n, a, ins: np.transpose(ins[0], a.get("perm")),
    "Slice": _fold_slice,
    "Shape": _fold_shape,
    "ConstantOfShape": _fold_constant_of_shape,
    "ScatterND": _fold_scatternd,
}
_FOLD.update(_COMPOSITE_FOLDS)  # Sum, Mean, Tile, Ceil and reductions of constants (verify.onnx_composite)
