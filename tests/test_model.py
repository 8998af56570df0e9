"""verify.model / verify.onnx_import on small ONNX models built here, checked against onnxruntime."""
from __future__ import annotations

import gzip
import operator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from verify.model import (
    ModelLoadError,
    UnsupportedOperatorError,
    check_against_onnxruntime,
    check_canonical,
    load_model,
    onnx_input_shape,
)

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make_onnx(tmp_path, nodes, in_shape, inits=None, opset=13, name="m.onnx", inits_as_inputs=False):
    """Write a one-input, one-output (``x`` -> ``y``) ONNX model; returns its path."""
    inits = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    if inits_as_inputs:  # as old exporters (opset 8) did
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if opset <= 8 else 7
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def assert_matches_ort(path, atol=1e-5):
    """Converted graph == onnxruntime for batch sizes 1 and 7, to ``atol`` relative to
    ``max(1, max |output|)`` (onnxruntime rounds to float32: exp's outputs of ~20 differ by ~1e-5
    absolute); returns the graph module."""
    gm = load_model(path)
    check_canonical(gm)
    for n in (1, 7):
        assert check_against_onnxruntime(gm, path, n=n, seed=n, relative=True) <= atol
    x = torch.rand(7, *gm.input_shape)
    assert gm(x).dim() == 2 and gm(x).shape[0] == 7
    return gm


def node(op, ins, outs, name=None, **attrs):
    return helper.make_node(op, ins, outs, name=name or f"{op.lower()}_{outs[0]}", **attrs)


def module_types(gm) -> set[str]:
    return {type(m).__name__ for n, m in gm.named_modules() if n}


# ---------------------------------------------------------------------------------------------
# conversions that must match onnxruntime


def test_gemm_relu_mlp(tmp_path):
    nodes = [
        node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
        node("Relu", ["h"], ["r"]),
        node("Gemm", ["r", "W2", "b2"], ["y"], alpha=0.5, beta=2.0),  # transB=0: W2 is [in, out]
    ]
    path = make_onnx(tmp_path, nodes, [1, 6], {"W1": rand(8, 6), "b1": rand(8), "W2": rand(8, 3), "b2": rand(1, 3)})
    gm = assert_matches_ort(path)
    assert gm.input_shape == (6,) and module_types(gm) == {"Linear", "ReLU"}
    assert gm.source == str(path) and not gm.training


def test_conv_bn_relu_avgpool_flatten_gemm(tmp_path):
    nodes = [
        node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[2, 1], kernel_shape=[3, 3]),
        node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-3),
        node("Relu", ["n"], ["r"]),
        node("AveragePool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),  # count_include_pad=0
        node("Flatten", ["p"], ["f"]),
        node("Gemm", ["f", "W2", "b2"], ["y"], transB=1),
    ]
    inits = {"W": rand(4, 2, 3, 3), "B": rand(4), "s": rand(4), "bb": rand(4), "m": rand(4), "v": np.abs(rand(4)) + 0.5}
    inits |= {"W2": rand(5, 4 * 2 * 3), "b2": rand(5)}
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 2, 6, 5], inits))
    assert {"Conv2d", "BatchNorm2d", "AvgPool2d", "Flatten"} <= module_types(gm)
    assert gm.get_submodule("averagepool_p").count_include_pad is False


def test_maxpool_grouped_dilated_conv_and_4d_output(tmp_path):
    nodes = [
        node("Conv", ["x", "W"], ["c"], group=2, auto_pad="SAME_UPPER"),
        node("Conv", ["c", "W2"], ["d"], dilations=[2, 2], pads=[2, 2, 2, 2]),
        node("MaxPool", ["d"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 4, 7, 7], {"W": rand(6, 2, 3, 3), "W2": rand(6, 6, 3, 3)}))
    assert gm(torch.rand(3, 4, 7, 7)).shape == (3, 6 * 4 * 4)  # [B, C, H, W] output -> [B, K]


def test_sigmoid_tanh_and_normalisation_constants(tmp_path):
    mean = helper.make_tensor("mean", TensorProto.FLOAT, [], [0.1307])
    nodes = [
        helper.make_node("Constant", [], ["mu"], value=mean, name="const_mu"),
        helper.make_node("Constant", [], ["sd"], value_float=0.3081, name="const_sd"),
        node("Sub", ["x", "mu"], ["a"]),
        node("Div", ["a", "sd"], ["b"]),
        node("Mul", ["scale", "b"], ["c"]),  # per-channel constant on the left
        node("Flatten", ["c"], ["f"]),
        node("Gemm", ["f", "W", "B"], ["h"], transB=1),
        node("Sigmoid", ["h"], ["s"]),
        node("Sub", ["one", "s"], ["t"]),  # constant - tensor
        node("Tanh", ["t"], ["y"]),
    ]
    inits = {"scale": rand(1, 2, 1, 1), "W": rand(4, 2 * 3 * 3), "B": rand(4), "one": np.ones(1, np.float32)}
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 2, 3, 3], inits, opset=9))
    assert {"Sigmoid", "Tanh"} <= module_types(gm)


def test_reshape_from_shape_chain_is_batch_agnostic(tmp_path):
    nodes = [
        node("Relu", ["x"], ["r"]),
        node("Shape", ["r"], ["s"]),
        node("Gather", ["s", "zero"], ["n"], axis=0),
        node("Unsqueeze", ["n", "ax0"], ["n1"]),
        node("Concat", ["n1", "minus1"], ["t"], axis=0),
        node("Reshape", ["r", "t"], ["f"]),  # [1, 2, 3, 4] -> [1, 24] via Shape(x)[0]
        node("Reshape", ["f", "shape3"], ["g"]),  # -> [1, 4, 6]
        node("Transpose", ["g"], ["h"], perm=[0, 2, 1]),
        node("MatMul", ["h", "W"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    inits |= {"shape3": np.array([1, 4, 6], np.int64), "W": rand(4, 3)}
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 2, 3, 4], inits, opset=13))
    targets = [n.args[1] for n in gm.graph.nodes if n.target is torch.reshape]
    assert targets and all(t[0] == -1 for t in targets)


def test_matmul_add_folds_into_linear(tmp_path):
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Relu", ["a"], ["y"])]
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, ["N", 5], {"W": rand(5, 4), "b": rand(4)}))
    lin = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 1 and lin[0].bias is not None
    assert not any(n.target is operator.add for n in gm.graph.nodes)


def test_rank1_input_with_constant_on_the_left(tmp_path):
    """A vector input without batch dim (VNN-COMP test nets): W @ x + b."""
    nodes = [node("MatMul", ["W", "x"], ["m"]), node("Add", ["m", "b"], ["h"]), node("Relu", ["h"], ["y"])]
    path = make_onnx(tmp_path, nodes, [3], {"W": rand(2, 3), "b": rand(2)}, opset=14)
    gm = assert_matches_ort(path)
    assert gm.input_shape == (3,) and onnx_input_shape(path) == (3,)


@pytest.mark.parametrize(
    "nodes, in_shape, inits",
    [
        ([node("MatMul", ["x", "v"], ["y"])], [1, 5], {"v": rand(5)}),  # x @ vector -> [1]
        ([node("MatMul", ["W", "x"], ["y"])], [1, 3, 4], {"W": rand(2, 3)}),  # W @ x over axis -2
        ([node("MatMul", ["x", "W"], ["m"]), node("Add", ["b", "m"], ["y"])], [1, 2, 3], {"W": rand(3, 4), "b": rand(2, 4)}),
    ],
    ids=["vector-right", "matrix-left-rank3", "add-not-a-bias"],
)
def test_matmul_forms(tmp_path, nodes, in_shape, inits):
    assert_matches_ort(make_onnx(tmp_path, nodes, in_shape, inits))


def test_opset8_flatten_dropout_initializers_as_inputs(tmp_path):
    nodes = [
        node("Sub", ["x", "avg"], ["s"]),
        node("Flatten", ["s"], ["f"], axis=1),
        node("MatMul", ["f", "W"], ["m"]),
        node("Add", ["m", "b"], ["a"]),
        node("Dropout", ["a"], ["d"], ratio=0.5),
        node("Relu", ["d"], ["r"]),
        node("Unsqueeze", ["r"], ["u"], axes=[2]),  # axes attribute before opset 13
        node("Squeeze", ["u"], ["y"], axes=[2]),
    ]
    inits = {"avg": rand(1, 1, 1, 5), "W": rand(5, 4), "b": rand(4)}
    path = make_onnx(tmp_path, nodes, [1, 1, 1, 5], inits, opset=8, inits_as_inputs=True)
    gm = assert_matches_ort(path)
    assert gm.input_shape == (1, 1, 5)


def test_squeeze_unsqueeze_axes_as_inputs_opset13(tmp_path):
    nodes = [
        node("Unsqueeze", ["x", "axes"], ["u"]),  # [1, 3, 4] -> [1, 3, 1, 4, 1]
        node("Squeeze", ["u", "axes"], ["s"]),
        node("Transpose", ["s"], ["y"], perm=[0, 2, 1]),
    ]
    path = make_onnx(tmp_path, nodes, [1, 3, 4], {"axes": np.array([2, -1], np.int64)}, opset=13)
    assert_matches_ort(path)


@pytest.mark.parametrize("opset", [11, 13])
def test_unsqueeze_without_axes_is_unsupported_not_a_crash(tmp_path, opset):
    """Unsqueeze needs its axes (attribute before opset 13, input from 13 on); a file without
    them is refused by name (it used to raise TypeError: len(None))."""
    path = make_onnx(tmp_path, [node("Unsqueeze", ["x"], ["u"]), node("Flatten", ["u"], ["y"])], [1, 3, 4], opset=opset)
    with pytest.raises(UnsupportedOperatorError, match="'Unsqueeze'.*no axes"):
        load_model(path)


def test_zero_pad_folds_into_conv_and_avgpool(tmp_path):
    nodes = [
        node("Pad", ["x", "pads"], ["p"], mode="constant"),
        node("Conv", ["p", "W", "B"], ["c"]),
        node("Pad", ["c", "pads"], ["q"]),
        node("AveragePool", ["q"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "W": rand(3, 2, 3, 3), "B": rand(3)}
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 2, 6, 6], inits, opset=11))
    assert gm.get_submodule("conv_c").padding == (1, 1)


def test_conv1d_and_batchnorm1d(tmp_path):
    nodes = [
        node("Conv", ["x", "W", "B"], ["c"], pads=[2, 2], strides=[2]),
        node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"]),
    ]
    inits = {"W": rand(3, 2, 5), "B": rand(3), "s": rand(3), "bb": rand(3), "m": rand(3), "v": np.ones(3, np.float32)}
    gm = assert_matches_ort(make_onnx(tmp_path, nodes, [1, 2, 9], inits))
    assert {"Conv1d", "BatchNorm1d"} <= module_types(gm)


def test_onnx_gz_and_dtype_float64(tmp_path):
    path = make_onnx(tmp_path, [node("Gemm", ["x", "W"], ["y"], transB=1)], [1, 4], {"W": rand(2, 4)})
    gz = tmp_path / "m.onnx.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    gm = load_model(gz, dtype=torch.float64)
    assert next(gm.parameters()).dtype == torch.float64
    assert check_against_onnxruntime(gm, gz, n=3) <= 1e-6
    assert onnx_input_shape(gz) == (4,)
    assert load_model(gz, check=True).input_shape == (4,)


# ---------------------------------------------------------------------------------------------
# errors


def test_unsupported_operator_names_op_and_node(tmp_path):
    path = make_onnx(tmp_path, [node("Tan", ["x"], ["y"], name="the_tan")], [1, 4])
    with pytest.raises(UnsupportedOperatorError, match=r"'Tan' at node 'the_tan'") as e:
        load_model(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "nodes, inits, why",
    [
        ([node("Conv", ["x", "W"], ["y"], pads=[0, 0, 1, 1])], {"W": rand(2, 1, 2, 2)}, "asymmetric"),
        ([node("Gemm", ["x", "W"], ["y"], transA=1)], {"W": rand(4, 4)}, "transA"),
        ([node("Pad", ["x", "pads"], ["y"])], {"pads": np.array([1, 0, 0, 0, 0, 0, 0, 0], np.int64)}, "outside the spatial dims"),
    ],
    ids=["conv-asymmetric-pads", "gemm-transA", "pad-batch"],
)
def test_unsupported_attribute_combinations(tmp_path, nodes, inits, why):
    path = make_onnx(tmp_path, nodes, [1, 1, 4, 4], inits, opset=11)
    with pytest.raises(UnsupportedOperatorError, match=why):
        load_model(path)


def test_operands_that_do_not_broadcast_name_the_node(tmp_path):
    path = make_onnx(tmp_path, [node("Flatten", ["x"], ["f"]), node("Mul", ["x", "f"], ["y"], name="the_mul")], [1, 1, 4, 4])
    with pytest.raises(ModelLoadError, match="the_mul") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_transpose_of_the_leading_unit_dim_makes_it_data(tmp_path):
    """A graph that moves its leading dim of size 1 is converted with that dim inside each
    example (and still matches onnxruntime)."""
    path = make_onnx(tmp_path, [node("Transpose", ["x"], ["y"], perm=[1, 0, 2, 3])], [1, 1, 4, 4], opset=11)
    assert_matches_ort(path)


def test_malformed_missing_and_nan_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        load_model(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no nodes"):
        load_model(empty)
    badgz = tmp_path / "bad.onnx.gz"
    badgz.write_bytes(b"not gzip")
    with pytest.raises(ModelLoadError, match="not an ONNX protobuf"):
        load_model(badgz)
    w = rand(2, 4)
    w[0, 0] = np.nan
    path = make_onnx(tmp_path, [node("Gemm", ["x", "W"], ["y"], transB=1)], [1, 4], {"W": w})
    with pytest.raises(ModelLoadError, match="NaN"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="file type"):
        load_model(Path(__file__))


def test_two_graph_inputs_is_a_load_error(tmp_path):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in ("a", "b")]
    graph = helper.make_graph([node("Add", ["a", "b"], ["y"])], "g", inputs, [helper.make_tensor_value_info("y", 1, None)])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ModelLoadError, match="2 inputs"):
        load_model(path)


# ---------------------------------------------------------------------------------------------
# torch modules


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def test_torch_module_is_traced_in_eval_mode():
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 2)).train()
    gm = load_model(net)
    assert isinstance(gm, fx.GraphModule) and not gm.training and gm.source == "Sequential"
    x = torch.rand(7, 4)
    torch.testing.assert_close(gm(x), net.eval()(x))
    check_canonical(gm)
    assert load_model(gm) is gm  # a GraphModule comes back as is


def test_attributes_survive_deepcopy(tmp_path):
    import copy

    net = nn.Sequential(nn.Linear(3, 2))
    net.input_shape = (3,)
    gm = copy.deepcopy(load_model(net))
    assert gm.input_shape == (3,) and gm.source == "Sequential"
    path = make_onnx(tmp_path, [node("Relu", ["x"], ["y"])], ["B", 2, 2])
    assert copy.deepcopy(load_model(path)).input_shape == (2, 2)


def test_torch_module_dtype_change_leaves_the_callers_module_alone():
    net = small_net()
    gm = load_model(net, dtype=torch.float64)
    assert next(gm.parameters()).dtype == torch.float64 and next(net.parameters()).dtype == torch.float32


@pytest.mark.filterwarnings("ignore:.*torch.jit.script. is deprecated")
def test_pt_file_full_module_and_state_dict(tmp_path):
    net = small_net().eval()
    torch.save(net, tmp_path / "net.pt")
    gm = load_model(tmp_path / "net.pt")
    x = torch.rand(7, 1, 6, 6)
    torch.testing.assert_close(gm(x), net(x))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="state dict"):
        load_model(tmp_path / "sd.pt")
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(tmp_path / "ts.pt")


def test_untraceable_module_is_a_load_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ModelLoadError, match="cannot trace Branchy"):
        load_model(Branchy())


def test_check_canonical_names_the_first_offending_node():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x.view(x.size(0), -1))
            return torch.softmax(torch.asinh(h * h), dim=1)

    gm = load_model(Net())
    with pytest.raises(UnsupportedOperatorError, match="asinh"):
        check_canonical(gm)
    gm2 = load_model(nn.Sequential(nn.Linear(4, 3), nn.Softplus()))
    with pytest.raises(UnsupportedOperatorError, match="Softplus"):
        check_canonical(gm2)
