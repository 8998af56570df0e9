"""ONNX integer and boolean operators whose operands depend on the input (carvana's pixel count:
ArgMax, OneHot, Equal, Cast; comparisons, Not): they become exact compositions of relaxed step
functions (``verify/onnx_import.py``), so the converted graph equals onnxruntime -- ties and
negative values included -- and CROWN's bounds on it contain 5,000 sampled outputs."""
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
INT32, INT64, BOOL, FLOAT = 6, 7, 9, 1  # ONNX TensorProto data types


def _head():
    """x [1, 12] -> MatMul -> ``m`` [1, 12] (values of both signs, |m| up to ~3) -> ``t`` [1, 3, 4]."""
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Reshape", ["m", "shp"], ["t"])]
    return nodes, {"W": rand(12, 12), "shp": np.array([1, 3, 4], I64)}


def _to_float(src: str) -> list:
    return [node("Cast", [src], ["y"], to=FLOAT)]


CASES = {
    "argmax": ([node("ArgMax", ["t"], ["a"], axis=2, keepdims=1)] + _to_float("a"), {}, 13),
    # relu makes ties at 0: the first index wins, or the last one with select_last_index
    "argmax-ties-first": ([node("Relu", ["t"], ["r"]), node("ArgMax", ["r"], ["a"], axis=1, keepdims=0)] + _to_float("a"), {}, 13),
    "argmax-ties-last": ([node("Relu", ["t"], ["r"]), node("ArgMax", ["r"], ["a"], axis=1, keepdims=0, select_last_index=1)]
                         + _to_float("a"), {}, 13),
    "onehot-of-argmax": ([node("ArgMax", ["t"], ["a"], axis=2, keepdims=0),
                          node("OneHot", ["a", "depth", "vals"], ["o"], axis=1)] + _to_float("o"),
                         {"depth": np.array(5, I64), "vals": np.array([-1, 2], I64)}, 13),
    # trunc toward zero of values of both signs; Equal of two integer tensors; count with ReduceSum
    "cast-equal-count": ([node("Mul", ["t", "three"], ["s"]), node("Cast", ["s"], ["i"], to=INT32),
                          node("Slice", ["i", "s0", "e0", "ax"], ["u"]), node("Slice", ["i", "s1", "e1", "ax"], ["v"]),
                          node("Equal", ["u", "v"], ["eq"]), node("Cast", ["eq"], ["ei"], to=INT64),
                          node("ReduceSum", ["ei"], ["n"], keepdims=1, axes=[1, 2]), node("Cast", ["i"], ["fi"], to=FLOAT),
                          node("Flatten", ["fi"], ["ff"]), node("Cast", ["n"], ["fn"], to=FLOAT), node("Flatten", ["fn"], ["nf"]),
                          node("Concat", ["ff", "nf"], ["y"], axis=1)],
                         {"three": np.array(3.0, F32), "s0": np.array([0], I64), "e0": np.array([1], I64),
                          "s1": np.array([1], I64), "e1": np.array([2], I64), "ax": np.array([1], I64)}, 11),
    "cast-bool-and-compare": ([node("Cast", ["m"], ["b"], to=BOOL), node("Cast", ["b"], ["bf"], to=FLOAT),
                               node("Greater", ["m", "c"], ["g"]), node("LessOrEqual", ["m", "c"], ["le"]),
                               node("Not", ["g"], ["ng"]), node("Equal", ["ng", "le"], ["same"]),
                               node("Cast", ["g"], ["gf"], to=FLOAT), node("Cast", ["same"], ["sf"], to=FLOAT),
                               node("Concat", ["bf", "gf", "sf"], ["y"], axis=1)],
                              {"c": np.array(0.2, F32)}, 13),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converts_and_bounds_soundly(tmp_path, case):
    head, inits = _head()
    nodes, extra, opset = CASES[case]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, **extra}, opset=opset)
    assert_crown_holds(assert_matches_ort(path), 0.05)


def test_a_fixed_count_is_exact():
    """On a box where every comparison is decided, CROWN's bounds on the count are the count."""
    torch.manual_seed(0)
    W = torch.randn(12, 12, dtype=torch.float64)

    class Count(torch.nn.Module):
        def forward(self, x):
            t = (x @ W).reshape(-1, 3, 4)
            d = t[:, :, 1:2] - t[:, :, 0:1]
            return torch.relu(torch.sign(d)).sum(dim=(1, 2)).reshape(-1, 1)

    x = torch.rand(1, 12, dtype=torch.float64)
    lo, hi = bounds(Count(), Box(x - 1e-6, x + 1e-6), method="crown")
    y = Count()(x).item()
    assert y - 1e-9 < lo.item() <= y <= hi.item() < y + 1e-9  # up to the round-off allowance


def test_onehot_of_non_integer_indices_is_refused(tmp_path):
    head, inits = _head()
    nodes = [node("OneHot", ["m", "depth", "vals"], ["o"]), node("Flatten", ["o"], ["y"])]
    path = make_onnx(tmp_path, head[:1] + nodes, [1, 12],
                     {"W": inits["W"], "depth": np.array(3, I64), "vals": np.array([0.0, 1.0], F32)})
    with pytest.raises(UnsupportedOperatorError, match="OneHot.*integers"):
        load_model(path)


def test_pool_and_batchnorm_after_the_batch_is_gathered(tmp_path):
    """carvana_unet: ``Gather(x, 0, axis=0)`` drops the batch dim; ops that want a batch dim
    (AveragePool, BatchNorm, Conv) then run on a re-added leading 1 that is part of the example."""
    nodes = [node("Gather", ["x", "zero"], ["g"], axis=0), node("Unsqueeze", ["g", "uax"], ["u"]),
             node("AveragePool", ["u"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("BatchNormalization", ["p", "sc", "bi", "mu", "var"], ["bn"]),
             node("Conv", ["bn", "cw", "cb"], ["c"]), node("ArgMax", ["c"], ["a"], axis=1, keepdims=0),
             node("ReduceSum", ["a"], ["s"], keepdims=0), node("Cast", ["s"], ["y"], to=FLOAT)]
    inits = {"zero": np.array(0, I64), "uax": np.array([0], I64), "sc": rand(2), "bi": rand(2), "mu": rand(2),
             "var": np.abs(rand(2)) + 0.5, "cw": rand(3, 2, 1, 1), "cb": rand(3)}
    path = make_onnx(tmp_path, nodes, [1, 2, 4, 4], inits, opset=13)
    gm = assert_matches_ort(path)
    x = torch.rand(2, *gm.input_shape, dtype=torch.float64)
    lo, hi = bounds(gm.double(), Box(x - 0.01, x + 0.01), method="crown")
    y = gm.double()(x)
    assert (lo <= y).all() and (y <= hi).all() and torch.isfinite(lo).all()


#: ArgMax of a softmax moved by transposes and gathers that keep the softmax axis (taken on the
#: scores: ``verify/onnx_argmax.py``), and heads where it must stay on the softmax's output
SOFTMAX_HEADS = {
    "transposed": ([node("Softmax", ["t"], ["p"], axis=2), node("Transpose", ["p"], ["q"], perm=[0, 2, 1]),
                    node("ArgMax", ["q"], ["a"], axis=1, keepdims=0)], {}, 13, True),
    "log-softmax-gathered": ([node("LogSoftmax", ["t"], ["p"], axis=-1), node("Gather", ["p", "rows"], ["q"], axis=1),
                              node("ArgMin", ["q"], ["a"], axis=2, keepdims=1, select_last_index=1)],
                             {"rows": np.array([2, 0], I64)}, 13, True),
    "opset-11-last-axis": ([node("Softmax", ["t"], ["p"], axis=2), node("ArgMax", ["p"], ["a"], axis=2, keepdims=0)], {}, 11, True),
    "other-axis": ([node("Softmax", ["t"], ["p"], axis=1), node("ArgMax", ["p"], ["a"], axis=2, keepdims=0)], {}, 13, False),
    "gather-cuts-the-axis": ([node("Softmax", ["t"], ["p"], axis=2), node("Gather", ["p", "cols"], ["q"], axis=2),
                              node("ArgMax", ["q"], ["a"], axis=2, keepdims=0)], {"cols": np.array([3, 1, 2], I64)}, 13, False),
    "opset-11-flattened": ([node("Softmax", ["t"], ["p"], axis=1), node("ArgMax", ["p"], ["a"], axis=2, keepdims=0)], {}, 11, False),
}


@pytest.mark.parametrize("case", list(SOFTMAX_HEADS))
def test_argmax_of_a_softmax_is_taken_on_its_scores(tmp_path, case):
    """The converted head equals onnxruntime and CROWN's bounds hold; the softmax is gone exactly
    where its groups lie along the ArgMax's axis (a gather of some of the group's entries, another
    axis, or opset 11's flattened groups keep it)."""
    head, inits = _head()
    nodes, extra, opset, peeled = SOFTMAX_HEADS[case]
    path = make_onnx(tmp_path, head + nodes + _to_float("a"), [1, 12], {**inits, **extra}, opset=opset)
    gm = assert_matches_ort(path)
    assert ("softmax" not in gm.code) == peeled
    assert_crown_holds(gm, 0.05)
