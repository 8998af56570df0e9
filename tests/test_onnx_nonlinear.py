"""ONNX nonlinear operators of the 2022-2024 networks: Exp, Log, Sqrt, Reciprocal, Pow, Sin, Cos,
Abs, Sign, Floor, Clip, LeakyRelu, Max / Min, Softmax, ReduceSum / ReduceMean, Div by a ReduceSum of
the dividend (a normalisation), and Mul / Div /
MatMul of two input-dependent tensors (attention): converted graph == onnxruntime, and CROWN's
bounds on the converted graph contain 5,000 sampled outputs (the relaxations themselves:
tests/test_ops_nonlinear.py; with PGD: the smooth / attention nets of test_bounds_soundness)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import assert_matches_ort, make_onnx, node, rand
from test_onnx_moves import assert_crown_holds

from relax.bounds import bounds
from verify.model import UnsupportedOperatorError, load_model
from verify.spec import Box

I64 = np.int64
F32 = np.float32


def _head():
    """x [1, 12] -> MatMul -> ``m`` [1, 12] and a reshape ``t`` [1, 3, 4]."""
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Reshape", ["m", "shp"], ["t"])]
    return nodes, {"W": rand(12, 12), "shp": np.array([1, 3, 4], I64)}


def _unary(op, **attrs):
    return [node(op, ["m"], ["y"], **attrs)], {}


CASES = {
    "exp": _unary("Exp"),
    "sin": _unary("Sin"),
    "cos": _unary("Cos"),
    "abs": _unary("Abs"),
    "sign": _unary("Sign"),
    "floor": _unary("Floor"),
    "leaky-relu": _unary("LeakyRelu", alpha=0.2),
    "log-sqrt-reciprocal": ([node("Abs", ["m"], ["a"]), node("Add", ["a", "one"], ["p"]), node("Log", ["p"], ["l"]),
                             node("Sqrt", ["p"], ["s"]), node("Reciprocal", ["p"], ["r"]), node("Concat", ["l", "s", "r"], ["y"], axis=1)],
                            {"one": np.array(1.0, F32)}),
    "pow": ([node("Pow", ["m", "e"], ["y"])], {"e": np.array(2.0, F32)}),
    "clip": ([node("Clip", ["m", "cl", "ch"], ["y"])], {"cl": np.array(-0.2, F32), "ch": np.array(0.3, F32)}),
    "max-min": ([node("Slice", ["m", "s0", "e0", "ax"], ["u"]), node("Slice", ["m", "s1", "e1", "ax"], ["v"]),
                 node("Max", ["u", "v"], ["mx"]), node("Min", ["u", "c"], ["mn"]), node("Concat", ["mx", "mn"], ["y"], axis=1)],
                {"s0": np.array([0], I64), "e0": np.array([6], I64), "s1": np.array([6], I64), "e1": np.array([12], I64),
                 "ax": np.array([1], I64), "c": np.array(0.1, F32)}),
    "softmax": ([node("Softmax", ["t"], ["y"], axis=-1)], {}),
    "reduce": ([node("ReduceSum", ["t", "rax"], ["a"], keepdims=0), node("ReduceMean", ["t"], ["b"], axes=[2], keepdims=1),
                node("Flatten", ["b"], ["bf"]), node("Concat", ["a", "bf"], ["y"], axis=1)], {"rax": np.array([1], I64)}),
    "mul-div-two-tensors": ([node("Sigmoid", ["m"], ["s"]), node("Mul", ["m", "s"], ["a"]), node("Add", ["s", "one"], ["d"]),
                             node("Div", ["m", "d"], ["b"]), node("Concat", ["a", "b"], ["y"], axis=1)], {"one": np.array(1.0, F32)}),
    # operands of different ranks broadcast from the right, never against the batch
    "broadcast-ranks": ([node("ReduceSum", ["t", "rax"], ["r"], keepdims=0), node("Mul", ["t", "r"], ["a"]),
                         node("Add", ["r", "t"], ["b"]), node("Max", ["t", "r"], ["c"]), node("Concat", ["a", "b", "c"], ["y"], axis=1)],
                        {"rax": np.array([1], I64)}),
    # pensieve's parallel policies: Pow, then Div by its own ReduceSum (fused into one Normalize node)
    "normalize": ([node("Exp", ["t"], ["e"]), node("Pow", ["e", "three"], ["p"]), node("ReduceSum", ["p", "rax"], ["s"], keepdims=1),
                   node("Div", ["p", "s"], ["y"])], {"three": np.array(3.0, F32), "rax": np.array([2], I64)}),
    "attention": ([node("Transpose", ["t"], ["tt"], perm=[0, 2, 1]), node("MatMul", ["t", "tt"], ["qk"]),
                   node("Softmax", ["qk"], ["att"], axis=2), node("MatMul", ["att", "t"], ["y"])], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converts_and_bounds_soundly(tmp_path, case):
    head, inits = _head()
    nodes, extra = CASES[case]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, **extra}, opset=13)
    gm = assert_matches_ort(path)
    assert_crown_holds(gm, 0.05)
    if case == "normalize":
        from relax.ir.graph import build_graph
        from relax.ir.ops import Normalize

        assert any(isinstance(n.op, Normalize) for n in build_graph(gm, gm.input_shape).nodes)


def test_softmax_before_opset13_flattens_the_trailing_axes(tmp_path):
    head, inits = _head()
    path = make_onnx(tmp_path, head + [node("Softmax", ["t"], ["y"], axis=1)], [1, 12], inits, opset=11)
    assert_matches_ort(path)


def test_pow_with_a_fractional_exponent_is_refused(tmp_path):
    head, inits = _head()
    path = make_onnx(tmp_path, head + [node("Pow", ["m", "e"], ["y"])], [1, 12], {**inits, "e": np.array(1.5, F32)})
    with pytest.raises(UnsupportedOperatorError, match="exponent 1.5"):
        bounds(load_model(path), Box(torch.zeros(1, 12), torch.ones(1, 12)), method="crown")


def test_graph_that_moves_its_leading_unit_dim_treats_it_as_data(tmp_path):
    """ml4acopf's linear nets transpose ``[1, n]`` to ``[n, 1]``: the leading 1 is then data (the
    conversion is retried with it inside each example) and the result matches onnxruntime."""
    head, inits = _head()
    nodes = [node("Transpose", ["m"], ["tm"], perm=[1, 0]), node("MatMul", ["L", "tm"], ["p"]),
             node("Sin", ["p"], ["q"]), node("Transpose", ["q"], ["y"], perm=[1, 0])]
    path = make_onnx(tmp_path, head[:1] + nodes, [1, 12], {"W": inits["W"], "L": rand(5, 12)})
    gm = assert_matches_ort(path)
    assert gm.input_shape == (12,)
    x = torch.rand(2, 12, dtype=torch.float64)
    lo, hi = bounds(gm.double(), Box(x - 0.05, x + 0.05), method="crown")
    assert lo.shape == (2, 5) and torch.isfinite(lo).all()


def test_conv_on_a_unit_leading_dim_of_an_unbatched_graph(tmp_path):
    """nn4sys pensieve_big_parallel: input ``[12, 8]`` (no batch dim), a row reshaped to
    ``[1, 1, 8]`` and convolved: the leading 1 is part of the example."""
    nodes = [node("Slice", ["x", "st", "en", "ax"], ["r"]), node("Reshape", ["r", "shp"], ["t"]),
             node("Conv", ["t", "cw", "cb"], ["c"]), node("Relu", ["c"], ["y"])]
    inits = {"st": np.array([1], I64), "en": np.array([2], I64), "ax": np.array([0], I64),
             "shp": np.array([1, 1, 8], I64), "cw": rand(4, 1, 3), "cb": rand(4)}
    path = make_onnx(tmp_path, nodes, [2, 8], inits)
    gm = assert_matches_ort(path)
    assert gm.input_shape == (2, 8)
    x = torch.rand(2, 2, 8, dtype=torch.float64)
    lo, hi = bounds(gm.double(), Box(x - 0.05, x + 0.05), method="crown")
    assert lo.shape == (2, 24) and torch.isfinite(lo).all()
