"""Random small ONNX networks built from the operators of the VNN-COMP 2022-2024 networks, for the
soundness fuzzer (:mod:`benchmarks.fuzz_soundness`, family ``onnx``).

The other fuzz families are torch modules traced by ``torch.fx``; these go through the ONNX
importer (:func:`verify.onnx_import.import_onnx`), so that the importer's compositions (explicit
pads, nearest resizing, channel selections, comparisons written as steps) and the bound rules of
the operators they produce are checked together, at every weight scale of the fuzzer.

Every network maps ``x [1, 12]`` (the domain [0, 1]) through ``MatMul -> Add -> Relu -> Reshape``
to a map ``t [1, 3, 4, 4]``, then two *blocks* that each map ``[1, 3, 4, 4]`` to ``[1, 3, 4, 4]``
(chosen by the seed from :data:`BLOCKS`), then ``Flatten -> MatMul -> Add`` to three outputs.
Weights are drawn like the other families' (``scale / sqrt(fan-in)``, the first layer centred on
the domain); constant thresholds (Clip, Greater) are drawn at the size of the values they meet
(``scale`` to the power of the affine layers before them).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: the blocks, by name (each a function of the builder, the input name and the depth so far)
BLOCKS = ("conv_transpose", "resize", "pad", "select", "maxmin", "product", "softmax", "step", "reduce", "layernorm", "softplus",
          "trig", "floor_sign", "reciprocal", "attention", "argmax", "split_pow", "maxpool", "gemm", "gelu", "activations", "exported",
          "logic_atan")

C, H, W = 3, 4, 4


class _Builder:
    """Nodes and initializers of one graph, with fresh names."""

    def __init__(self, rng: np.random.Generator, scale: float) -> None:
        self.rng, self.scale = rng, scale
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        n = self.name(stem)
        self.inits[n] = value
        return n

    def weight(self, *shape: int, fan_in: int) -> str:
        w = self.rng.standard_normal(shape) * self.scale / math.sqrt(fan_in)
        return self.const(w.astype(np.float32), "w")

    def bias(self, n: int) -> str:
        return self.const((self.rng.standard_normal(n) * self.scale * 0.3).astype(np.float32), "b")

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, k: int, c_in: int = C, c_out: int = C, **attrs) -> str:
        return self.op("Conv", [x, self.weight(c_out, c_in, k, k, fan_in=c_in * k * k), self.bias(c_out)],
                       kernel_shape=[k, k], **attrs)

    def level(self, depth: int) -> float:
        """The size of values after ``depth`` affine layers (every weight carries ``scale``)."""
        return self.scale ** depth


def _block(b: _Builder, kind: str, t: str, depth: int) -> tuple[str, int]:
    """Append block ``kind`` to ``t [1, 3, 4, 4]``: ``(output name, affine layers so far)``."""
    rng = b.rng
    if kind == "conv_transpose":  # ConvTranspose x2, BatchNormalization, LeakyReLU, AveragePool /2
        w = b.weight(C, C, 3, 3, fan_in=C * 9)
        u = b.op("ConvTranspose", [t, w, b.bias(C)], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
        lv = b.level(depth + 1)
        bn = [b.const(v.astype(np.float32)) for v in (rng.standard_normal(C), rng.standard_normal(C) * 0.1 * lv,
                                                     rng.standard_normal(C) * lv, (rng.random(C) + 0.5) * lv**2)]
        u = b.op("LeakyRelu", [b.op("BatchNormalization", [u, *bn])], alpha=0.1)
        return b.op("AveragePool", [u], kernel_shape=[2, 2], strides=[2, 2]), depth + 1
    if kind == "resize":  # nearest upsampling x2, a strided convolution, Clip
        scales = b.const(np.array([1, 1, 2, 2], np.float32))
        u = b.conv(b.op("Resize", [t, "", scales], mode="nearest"), 3, strides=[2, 2], pads=[1, 1, 1, 1])
        lv = b.level(depth + 1)
        lo, hi = sorted(float(v) for v in rng.standard_normal(2) * lv)
        return b.op("Clip", [u, b.const(np.array(lo, np.float32)), b.const(np.array(hi, np.float32))]), depth + 1
    if kind == "pad":  # an explicit Pad, a convolution without padding, Abs, Sub of a constant
        p = b.op("Pad", [t, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
        u = b.op("Abs", [b.conv(p, 3)])
        return b.op("Sub", [u, b.const((rng.random((1, C, 1, 1)) * b.level(depth + 1)).astype(np.float32))]), depth + 1
    if kind == "select":  # channel Slice + Gather + Concat (a permutation), Sigmoid or Tanh
        start_end_axis = [b.const(np.array([v], np.int64)) for v in (0, 2, 1)]
        s = b.op("Slice", [t, *start_end_axis])
        g = b.op("Gather", [t, b.const(np.array([2], np.int64))], axis=1)
        u = b.conv(b.op("Concat", [g, s], axis=1), 1)
        return b.op("Tanh" if rng.random() < 0.5 else "Sigmoid", [u]), depth + 1
    if kind == "maxmin":  # Max and Min of two convolutions
        a1, a2 = b.conv(t, 1), b.conv(t, 3, pads=[1, 1, 1, 1])
        return b.op("Max" if rng.random() < 0.5 else "Min", [a1, a2]), depth + 1
    if kind == "product":  # the product of a sigmoid and a ReLU (bilinear bounds)
        return b.op("Mul", [b.op("Sigmoid", [b.conv(t, 1)]), b.op("Relu", [b.conv(t, 3, pads=[1, 1, 1, 1])])]), depth + 1
    if kind == "softmax":  # a softmax over channels between transposes (carvana's tail)
        u = b.op("Transpose", [b.conv(t, 3, pads=[1, 1, 1, 1])], perm=[0, 2, 3, 1])
        u = b.op("Transpose", [b.op("Softmax", [u], axis=-1)], perm=[0, 3, 1, 2])
        return b.op("Mul", [u, b.const(np.array(b.level(depth + 1), np.float32))]), depth + 1
    if kind == "step":  # Greater than a threshold, Cast, weighted and added to a convolution
        thr = b.const((rng.standard_normal((1, C, 1, 1)) * 0.3 * b.level(depth)).astype(np.float32))
        s = b.op("Cast", [b.op("Greater", [t, thr])], to=TensorProto.FLOAT)
        s = b.op("Mul", [s, b.const((rng.standard_normal((1, C, 1, 1)) * b.level(depth + 1)).astype(np.float32))])
        return b.op("Add", [s, b.conv(t, 1)]), depth + 1
    if kind == "reduce":  # subtract the spatial mean (ReduceMean), then ReLU
        u = b.conv(t, 3, pads=[1, 1, 1, 1])
        m = b.op("ReduceMean", [u], axes=[2, 3], keepdims=1)
        return b.op("Relu", [b.op("Sub", [u, m])]), depth + 1
    return _block_more(b, kind, t, depth)


def _scalar(b: _Builder, v: float) -> str:
    return b.const(np.array(v, np.float32))


def _block_more(b: _Builder, kind: str, t: str, depth: int) -> tuple[str, int]:
    """The blocks of nonlinear functions, normalisations and index ops (see :func:`_block`)."""
    lv = b.level(depth + 1)
    if kind == "layernorm":  # over channels: (u - mean) / sqrt(var + eps) (Div of two activations)
        u = b.conv(t, 1)
        d = b.op("Sub", [u, b.op("ReduceMean", [u], axes=[1], keepdims=1)])
        var = b.op("ReduceMean", [b.op("Mul", [d, d])], axes=[1], keepdims=1)
        y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, _scalar(b, 1e-3 * lv**2)])])])
        beta = b.const((b.rng.standard_normal((1, C, 1, 1)) * 0.3).astype(np.float32))
        return b.op("Add", [b.op("Mul", [y, b.weight(1, C, 1, 1, fan_in=1)]), beta]), depth + 1
    if kind == "softplus":  # relu(u) + log(1 + exp(-|u|)) with Exp, Log, Abs, Neg
        u = b.conv(t, 3, pads=[1, 1, 1, 1])
        e = b.op("Exp", [b.op("Neg", [b.op("Abs", [u])])])
        return b.op("Add", [b.op("Relu", [u]), b.op("Log", [b.op("Add", [e, _scalar(b, 1.0)])])]), depth + 1
    if kind == "trig":  # sin(u) cos(v) (a product of two periodic functions; arguments of size 1: float32's
        u, v = (b.op("Div", [b.conv(t, 1), _scalar(b, lv)]) for _ in range(2))  # sin(1e6) is round-off alone)
        return b.op("Mul", [b.op("Sin", [u]), b.op("Cos", [v])]), depth + 1
    if kind == "floor_sign":  # floor(u / level) + sign(v)
        u, v = b.conv(t, 1), b.conv(t, 3, pads=[1, 1, 1, 1])
        return b.op("Add", [b.op("Floor", [b.op("Div", [u, _scalar(b, lv)])]), b.op("Sign", [v])]), depth + 1
    if kind == "reciprocal":  # level / (relu(u) + level)
        u = b.op("Add", [b.op("Relu", [b.conv(t, 1)]), _scalar(b, lv)])
        return b.op("Mul", [b.op("Reciprocal", [u]), _scalar(b, lv)]), depth + 1
    if kind == "attention":  # softmax(T T^T / level) T on the 3 channels as tokens of width 16
        tok = b.op("Reshape", [t, b.const(np.array([1, C, H * W], np.int64))])
        q = b.op("MatMul", [tok, b.weight(H * W, H * W, fan_in=H * W)])
        s_ = b.op("Div", [b.op("MatMul", [q, b.op("Transpose", [tok], perm=[0, 2, 1])]), _scalar(b, b.level(depth) * lv)])
        y = b.op("MatMul", [b.op("Softmax", [s_], axis=-1), tok])
        return b.op("Reshape", [y, b.const(np.array([1, C, H, W], np.int64))]), depth + 1
    if kind == "argmax":  # t where the argmax over channels of u is channel 1, plus a convolution
        idx = b.op("ArgMax", [b.conv(t, 1)], axis=1, keepdims=1)
        hit = b.op("Cast", [b.op("Equal", [idx, b.const(np.array(1, np.int64))])], to=TensorProto.FLOAT)
        return b.op("Add", [b.op("Mul", [t, hit]), b.conv(t, 1)]), depth + 1
    if kind == "split_pow":  # Split channels, Concat in the other order, plus u^2 / level
        a1, a2 = b.name("split"), b.name("split")
        b.nodes.append(helper.make_node("Split", [t, b.const(np.array([1, 2], np.int64))], [a1, a2], name=a1, axis=1))
        sq = b.op("Div", [b.op("Pow", [b.conv(t, 1), _scalar(b, 2.0)]), _scalar(b, lv)])
        return b.op("Add", [b.op("Concat", [a2, a1], axis=1), sq]), depth + 1
    if kind == "maxpool":  # a convolution, then max pooling 3x3 with stride 1 and padding 1
        u = b.conv(t, 3, pads=[1, 1, 1, 1])
        return b.op("MaxPool", [u], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), depth + 1
    if kind == "gemm":  # Flatten, Gemm with a transposed weight, ReLU, Reshape back
        f = b.op("Flatten", [t], axis=1)
        g = b.op("Gemm", [f, b.weight(C * H * W, C * H * W, fan_in=C * H * W), b.bias(C * H * W)], transB=1)
        return b.op("Reshape", [b.op("Relu", [g]), b.const(np.array([1, C, H, W], np.int64))]), depth + 1
    if kind == "gelu":  # x (1 + erf(x / sqrt 2)) / 2 written out, as exporters do
        u = b.conv(t, 3, pads=[1, 1, 1, 1])
        e = b.op("Erf", [b.op("Div", [u, _scalar(b, math.sqrt(2.0))])])
        return b.op("Mul", [u, b.op("Add", [b.op("Mul", [e, _scalar(b, 0.5)]), _scalar(b, 0.5)])]), depth + 1
    if kind == "activations":  # PRelu (per channel), Elu, Softplus, HardSwish and Selu, summed
        slope = b.const((b.rng.standard_normal((C, 1, 1)) * 0.5).astype(np.float32))
        p = b.op("PRelu", [b.conv(t, 1), slope])
        e = b.op("Elu", [b.op("Div", [b.conv(t, 1), _scalar(b, lv)])], alpha=0.7)
        sp = b.op("Softplus", [b.op("Div", [b.conv(t, 1), _scalar(b, lv)])])
        hs = b.op("HardSwish", [b.op("Div", [b.conv(t, 1), _scalar(b, lv)])])
        se = b.op("Selu", [b.op("Div", [b.conv(t, 1), _scalar(b, lv)])])
        small = b.op("Mul", [b.op("Sum", [e, sp, hs, se]), _scalar(b, lv)])
        return b.op("Add", [p, small]), depth + 1
    if kind == "exported":  # operators torch's exporter writes: bilinear Resize, LayerNormalization, Softsign,
        u = b.op("Resize", [b.conv(t, 1), "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")  # Where, ReduceMax
        u = b.op("AveragePool", [u], kernel_shape=[2, 2], strides=[2, 2])
        ln = b.op("LayerNormalization", [u, b.const(b.rng.standard_normal((C, H, W)).astype(np.float32)),
                                         b.const((b.rng.standard_normal((C, H, W)) * 0.3).astype(np.float32))], axis=1)
        m = b.op("Softsign", [ln])
        z = b.const(np.zeros((1,), np.float32))
        w = b.op("Where", [b.op("Greater", [u, z]), u, b.op("Mul", [u, _scalar(b, 0.1)])])
        top = b.op("ReduceMax", [w], axes=[1], keepdims=1)
        return b.op("Add", [b.op("Mul", [m, _scalar(b, lv)]), b.op("ThresholdedRelu", [b.op("Sub", [w, top])], alpha=-lv)]), depth + 1
    if kind == "logic_atan":  # Atan, Shrink, And / Or / Xor of comparisons, ArgMin, Sinh
        u = b.conv(t, 1)
        a = b.op("Mul", [b.op("Atan", [b.op("Div", [u, _scalar(b, lv)])]), _scalar(b, lv)])
        lam = abs(float(b.rng.standard_normal())) * 0.5 * lv
        s = b.op("Shrink", [b.conv(t, 3, pads=[1, 1, 1, 1])], lambd=lam, bias=lam * float(b.rng.random()))
        z = b.const(np.zeros((1,), np.float32))
        p, q = b.op("Greater", [u, z]), b.op("Less", [s, z])
        logic = b.op("Cast", [b.op("Xor", [b.op("And", [p, q]), b.op("Or", [p, q])])], to=TensorProto.FLOAT)
        idx = b.op("Cast", [b.op("ArgMin", [u], axis=1, keepdims=1)], to=TensorProto.FLOAT)
        sh = b.op("Sinh", [b.op("Atan", [b.op("Div", [b.conv(t, 1), _scalar(b, lv)])])])  # atan first: no overflow
        small = b.op("Mul", [b.op("Add", [b.op("Sum", [logic, sh]), idx]), _scalar(b, lv)])
        return b.op("Add", [b.op("Add", [a, s]), small]), depth + 1
    raise ValueError(f"unknown block {kind!r}")


def make_onnx_net(scale: float, seed: int, blocks: tuple[str, str] | None = None) -> onnx.ModelProto:
    """A random network ``x [1, 12] -> y [1, 3]`` of two blocks (by default chosen by ``seed``)."""
    rng = np.random.default_rng(seed)
    if blocks is None:
        i = seed % (len(BLOCKS) ** 2)
        blocks = (BLOCKS[i % len(BLOCKS)], BLOCKS[i // len(BLOCKS)])
    b = _Builder(rng, scale)
    n = C * H * W
    w0 = 4 * rng.standard_normal((12, n)) * scale / math.sqrt(12)  # the domain [0, 1] centred: 4 (x - 0.5)
    b0 = rng.standard_normal(n) * scale * 0.3 - 0.5 * w0.sum(0)
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", ["x", b.const(w0.astype(np.float32))]), b.const(b0.astype(np.float32))])])
    t = b.op("Reshape", [h, b.const(np.array([1, C, H, W], np.int64))])
    depth = 1
    for kind in blocks:
        t, depth = _block(b, kind, t, depth)
    f = b.op("Flatten", [t], axis=1)
    y = b.op("Add", [b.op("MatMul", [f, b.weight(n, 3, fan_in=n)]), b.bias(3)])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in b.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # LayerNormalization: 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
