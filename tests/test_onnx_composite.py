"""ONNX operators converted as compositions (verify.onnx_composite) and the Erf bound rule: each
converted graph equals onnxruntime, and CROWN's bounds on it contain sampled outputs (and the
outputs at the boxes' corners); the Erf and Atan relaxations enclose their functions on dense grids of any interval."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_model import assert_matches_ort, make_onnx, node, rand

from relax.bounds import bounds
from relax.ir.ops import Atan, Erf
from verify.spec import Box

I64 = np.int64
D = torch.float64


def _head():
    """x [1, 12] -> MatMul -> Add (values of both signs, about 3 wide) -> reshape [1, 3, 2, 2] ``t``."""
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "b"], ["a"]), node("Reshape", ["a", "shp"], ["t"])]
    return nodes, {"W": rand(12, 12) * 2, "b": rand(12), "shp": np.array([1, 3, 2, 2], I64)}


CASES = {
    "prelu-per-channel": ([node("PRelu", ["t", "s"], ["y"])], {"s": np.array([0.1, -0.5, 1.7], np.float32).reshape(3, 1, 1)}, 17),
    "prelu-scalar": ([node("PRelu", ["t", "s"], ["y"])], {"s": np.array([0.25], np.float32)}, 17),
    "elu": ([node("Elu", ["t"], ["y"], alpha=0.7)], {}, 17),
    "selu": ([node("Selu", ["t"], ["y"])], {}, 17),
    "celu": ([node("Celu", ["t"], ["y"], alpha=2.0)], {}, 17),
    "softplus": ([node("Softplus", ["t"], ["y"])], {}, 17),
    "softsign": ([node("Softsign", ["t"], ["y"])], {}, 17),
    "hard-sigmoid": ([node("HardSigmoid", ["t"], ["y"], alpha=0.3, beta=0.4)], {}, 17),
    "hard-swish": ([node("HardSwish", ["t"], ["y"])], {}, 17),
    "thresholded-relu": ([node("ThresholdedRelu", ["t"], ["y"], alpha=0.5)], {}, 17),
    "erf": ([node("Erf", ["t"], ["y"])], {}, 17),
    "gelu": ([node("Gelu", ["t"], ["y"])], {}, 20),
    "gelu-tanh": ([node("Gelu", ["t"], ["y"], approximate="tanh")], {}, 20),
    "ceil": ([node("Ceil", ["t"], ["y"])], {}, 17),
    "layer-norm": ([node("LayerNormalization", ["t", "g", "bb"], ["y"], axis=-2, epsilon=1e-3)],
                   {"g": rand(2, 2), "bb": rand(2, 2)}, 17),
    "instance-norm": ([node("InstanceNormalization", ["t", "g", "bb"], ["y"], epsilon=1e-3)], {"g": rand(3), "bb": rand(3)}, 17),
    "reduce-max": ([node("ReduceMax", ["t"], ["y"], axes=[1, 3], keepdims=1)], {}, 17),
    "reduce-min-opset18": ([node("ReduceMin", ["t", "ax"], ["y"], keepdims=0)], {"ax": np.array([2], I64)}, 18),
    "reduce-l2": ([node("ReduceL2", ["t"], ["y"], axes=[1], keepdims=0)], {}, 17),
    "reduce-l1": ([node("ReduceL1", ["t"], ["y"], axes=[2, 3], keepdims=1)], {}, 17),
    "reduce-sum-square": ([node("ReduceSumSquare", ["t"], ["y"], axes=[1])], {}, 17),
    "sum-with-constant": ([node("Relu", ["t"], ["r"]), node("Sum", ["t", "r", "c"], ["y"])], {"c": rand(2, 2)}, 17),
    "mean": ([node("Relu", ["t"], ["r"]), node("Mean", ["t", "r"], ["y"])], {}, 17),
    "tile": ([node("Tile", ["t", "rep"], ["y"])], {"rep": np.array([1, 2, 1, 3], I64)}, 17),
    "where-constant-branch": ([node("Where", ["cond", "t", "c"], ["y"])],
                              {"cond": np.array([[True, False], [False, True]]), "c": rand(2, 2)}, 17),
    "where-two-branches": ([node("Relu", ["t"], ["r"]), node("Where", ["cond", "r", "t"], ["y"])],
                           {"cond": np.array([True, False, True]).reshape(3, 1, 1)}, 17),
    "where-comparison-abs": ([node("Greater", ["t", "z"], ["cond"]), node("Neg", ["t"], ["n"]),
                              node("Where", ["cond", "t", "n"], ["y"])], {"z": np.zeros((1,), np.float32)}, 17),
    "where-mask-minus-inf-then-softmax": ([node("Where", ["cond", "t", "ninf"], ["w"]), node("Softmax", ["w"], ["y"], axis=3)],
                                          {"cond": np.array([[True, False], [True, True]]), "ninf": np.array(-np.inf, np.float32)}, 17),
    "sum-of-constants-in-a-shape": ([node("Sum", ["c1", "c2"], ["s"]), node("Cast", ["s"], ["si"], to=7), node("Tile", ["t", "si"], ["y"])],
                                    {"c1": np.array([1, 1, 0, 1], np.float32), "c2": np.array([0, 0, 2, 1], np.float32)}, 17),
    "where-comparison-constants": ([node("Less", ["t", "c1"], ["cond"]), node("Where", ["cond", "c2", "c3"], ["w"]),
                                    node("Add", ["w", "t"], ["y"])], {"c1": rand(2, 2), "c2": rand(2), "c3": rand(1)}, 17),
    "where-comparison-one-branch": ([node("GreaterOrEqual", ["t", "z"], ["cond"]), node("Where", ["cond", "z", "t"], ["y"])],
                                    {"z": np.full((1,), 0.3, np.float32)}, 17),
    "max-of-three": ([node("Relu", ["t"], ["r"]), node("Max", ["t", "c", "r"], ["y"])], {"c": rand(2, 2)}, 17),
    "min-of-three": ([node("Relu", ["t"], ["r"]), node("Min", ["t", "r", "c", "c2"], ["y"])], {"c": rand(2), "c2": rand(1)}, 17),
    # logits 10x: softmax's small entries underflow in float32 (log(softmax) would be -inf); at 30x the
    # differences of some draws' box ends pass exp's overflow (709) and the lower bounds are -inf (sound, useless)
    "log-softmax": ([node("Mul", ["t", "k"], ["u"]), node("LogSoftmax", ["u"], ["y"], axis=1)],
                    {"k": np.array(10.0, np.float32)}, 17),
    "mish": ([node("Mish", ["t"], ["y"])], {}, 18),
    "depth-to-space-dcr": ([node("Reshape", ["t", "s4"], ["u"]), node("DepthToSpace", ["u"], ["y"], blocksize=2)],
                           {"s4": np.array([1, 4, 1, 3], I64)}, 17),  # three pixels: block offsets interleave with them
    "depth-to-space-crd": ([node("Reshape", ["t", "s4"], ["u"]), node("DepthToSpace", ["u"], ["y"], blocksize=2, mode="CRD")],
                           {"s4": np.array([1, 4, 1, 3], I64)}, 17),
    "space-to-depth": ([node("Reshape", ["t", "s1"], ["u"]), node("SpaceToDepth", ["u"], ["y"], blocksize=2)],
                       {"s1": np.array([1, 1, 2, 6], I64)}, 17),
    "atan": ([node("Mul", ["t", "k"], ["u"]), node("Atan", ["u"], ["y"])], {"k": np.array(3.0, np.float32)}, 17),
    "sinh": ([node("Sinh", ["t"], ["y"])], {}, 17),
    "cosh": ([node("Cosh", ["t"], ["y"])], {}, 17),
    "shrink": ([node("Shrink", ["t"], ["y"], lambd=0.6, bias=0.2)], {}, 17),
    "shrink-soft": ([node("Shrink", ["t"], ["y"], lambd=0.4, bias=0.4)], {}, 17),
    # opset 18: scale and bias per group (one group: repeated over the channels); onnxruntime computes its
    # variance as E[x^2] - E[x]^2 in float32, which loses digits on small groups
    "group-norm-opset18-per-group": ([node("GroupNormalization", ["t", "g", "bb"], ["y"], num_groups=1, epsilon=1e-3)],
                                     {"g": rand(1), "bb": rand(1)}, 18),
    "group-norm-opset21-per-channel": ([node("GroupNormalization", ["t", "g", "bb"], ["y"], num_groups=3)],
                                       {"g": rand(3), "bb": rand(3)}, 21),
    "and-or-xor": ([node("Greater", ["t", "z"], ["p"]), node("Less", ["t", "z2"], ["q"]), node("And", ["p", "q"], ["pq"]),
                    node("Or", ["p", "mask"], ["o"]), node("Xor", ["pq", "o"], ["x1"]), node("Xor", ["x1", "mask"], ["x2"]),
                    node("Cast", ["x2"], ["f"], to=1), node("Add", ["f", "t"], ["y"])],
                   {"z": np.full((1,), -0.3, np.float32), "z2": np.full((1,), 0.4, np.float32),
                    "mask": np.array([[True, False], [False, True]])}, 17),
    "argmin": ([node("ArgMin", ["t"], ["i"], axis=1, keepdims=1), node("Cast", ["i"], ["f"], to=1),
                node("Add", ["f", "t"], ["y"])], {}, 17),
    "cast-like": ([node("CastLike", ["k", "t"], ["kf"]), node("Mul", ["t", "kf"], ["u"]), node("CastLike", ["u", "f32"], ["y"])],
                  {"k": np.array(1.5, np.float32), "f32": np.zeros(1, np.float32)}, 21),
    "swish": ([node("Swish", ["t"], ["y"], alpha=1.5)], {}, 24),
}
for _ctm in ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"):
    CASES[f"resize-linear-{_ctm}"] = ([node("Resize", ["t", "", "sc"], ["y"], mode="linear",
                                            coordinate_transformation_mode=_ctm)], {"sc": np.array([1, 1, 2.5, 1.5], np.float32)}, 17)
CASES["resize-linear-sizes-down"] = ([node("Resize", ["t", "", "", "sz"], ["u"], mode="linear"),
                                      node("Resize", ["u", "", "", "sz2"], ["y"], mode="linear")],
                                     {"sz": np.array([1, 3, 7, 5], I64), "sz2": np.array([1, 3, 3, 2], I64)}, 17)
CASES["resize-linear-half_pixel_symmetric"] = ([node("Resize", ["t", "", "sc"], ["y"], mode="linear",
                                                     coordinate_transformation_mode="half_pixel_symmetric")],
                                               {"sc": np.array([1, 1, 2.5, 0.5], np.float32)}, 19)
CASES["upsample-bilinear-opset9"] = ([node("Upsample", ["t", "sc"], ["y"], mode="linear")],
                                     {"sc": np.array([1, 1, 2, 3], np.float32)}, 9)


def _model(tmp_path, case: str):
    head, inits = _head()
    nodes, extra, opset = CASES[case]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, **extra}, opset=opset)
    if opset >= 19:  # onnxruntime reads opset 20 from IR version 9 on, opset 21 from 10, opset 24 from 11
        m = onnx.load(str(path))
        m.ir_version = 9 if opset <= 20 else 10 if opset <= 22 else 11
        onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_composite_operator_matches_onnxruntime_and_bounds_soundly(tmp_path, case):
    gm = assert_matches_ort(_model(tmp_path, case))
    net = gm.double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 12, generator=g, dtype=D)
    r = 0.2
    lo, hi = bounds(net, Box(x - r, x + r), method="crown")
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    pts = x + (torch.rand(4000, 2, 12, generator=g, dtype=D) * 2 - 1) * r
    corners = x + r * torch.where(torch.rand(256, 2, 12, generator=g) < 0.5, -1.0, 1.0).to(D)  # r in float64: on the box
    with torch.no_grad():
        ys = net(torch.cat([pts, corners]).reshape(-1, 12)).reshape(-1, 2, lo.shape[1])
    tol = 1e-9 * (1 + ys.abs())
    assert (ys >= lo - tol).all() and (ys <= hi + tol).all(), (case, float((lo - ys).max()), float((ys - hi).max()))


@pytest.mark.parametrize("op", [Erf(), Atan()], ids=["erf", "atan"])
def test_s_shaped_lines_enclose_the_function_on_every_interval(op):
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(1, 2000, generator=g, dtype=D) * 3
    hi = lo + torch.rand(1, 2000, generator=g, dtype=D) * torch.tensor([1e-3, 1.0, 5.0, 40.0], dtype=D).repeat(500)
    x = lo + (hi - lo) * torch.linspace(0, 1, 401, dtype=D).view(-1, 1, 1)
    fx = op.f(x)
    r = op.relax(lo, hi)
    assert (r.lw * x + r.lb <= fx + 1e-12).all() and (r.uw * x + r.ub >= fx - 1e-12).all()
    assert float(((r.uw * x + r.ub) - (r.lw * x + r.lb)).median()) < 0.05  # tight, not the function's range
    for a in (0.0, 0.4, 1.0):  # alpha-CROWN's slopes: any fraction of [k_min, k_max] is sound
        k_lo, k_hi = r.extra[2], r.extra[3]
        k = k_lo + a * (k_hi - k_lo)
        low, high = op.intercept(k, lo, hi, lower=True), op.intercept(k, lo, hi, lower=False)
        assert (k * x + low <= fx + 1e-12).all() and (k * x + high >= fx - 1e-12).all()


class _ExportedBlock(torch.nn.Module):
    """The blocks of MobileNetV3 / ConvNeXt / ViT that torch's exporter writes with the operators
    above: HardSwish, a squeeze-excitation with SiLU and HardSigmoid, bilinear upsampling, channels-
    last LayerNorm and GELU (Erf)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1, self.se2, self.ln, self.fc = nn.Linear(8, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        F = torch.nn.functional
        h = F.hardswish(self.bn(self.conv(x)))
        h = h * F.hardsigmoid(self.se2(F.silu(self.se1(h.mean((2, 3))))))[:, :, None, None]
        h = F.avg_pool2d(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False), 2)
        return self.fc(F.gelu(self.ln(h.permute(0, 2, 3, 1))).flatten(1))


@pytest.mark.parametrize("opset", [13, 17])
def test_a_block_exported_by_torch_loads_matches_onnxruntime_and_bounds_soundly(tmp_path, opset):
    """torch's TorchScript exporter writes HardSwish as HardSigmoid and Mul (opset 13) or
    HardSwish, LayerNorm as ReduceMean / Pow / Sqrt / Div (13) or LayerNormalization (17), GELU as
    Erf, upsampling as Resize linear."""
    import warnings

    torch.manual_seed(0)
    block = _ExportedBlock().eval()
    path = tmp_path / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(block, (torch.rand(1, 3, 4, 4),), str(path), opset_version=opset, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Erf", "Resize", "HardSigmoid"} <= ops and ("LayerNormalization" in ops) == (opset == 17), ops
    net = assert_matches_ort(path).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=D)
    for method in ("crown", "alpha-crown"):
        lo, hi = bounds(net, Box(x - 0.05, x + 0.05), method=method)
        pts = x + (torch.rand(3000, *x.shape, generator=g, dtype=D) - 0.5) * 0.1
        with torch.no_grad():
            ys = net(pts.reshape(-1, 3, 4, 4)).reshape(3000, 2, -1)
        assert (ys >= lo - 1e-9).all() and (ys <= hi + 1e-9).all(), method


def test_shrink_with_a_negative_threshold_is_refused(tmp_path):
    """``lambd < 0``: onnxruntime's branches overlap (``x + bias`` wins), which the two-ReLU
    composition does not write; the importer names the node instead of converting it wrongly."""
    from test_model import load_model

    from verify.errors import UnsupportedOperatorError

    head, inits = _head()
    path = make_onnx(tmp_path, head + [node("Shrink", ["t"], ["y"], lambd=-1.0, bias=0.3)], [1, 12], inits, opset=17)
    with pytest.raises(UnsupportedOperatorError, match="Shrink.*lambd=-1 < 0"):
        load_model(path)
