"""ONNX Slice, Gather, Concat (with constants), Split, Expand, Resize / Upsample (nearest), an
explicit Pad feeding a Concat, and ConvTranspose: converted graph == onnxruntime, and CROWN's
bounds on the converted graph contain 10,000 sampled outputs (the bound rules:
relax.ir.ops.Select, relax.ir.ops.ConvTranspose; their PGD checks are in test_bounds_soundness)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import assert_matches_ort, make_onnx, node, rand

from relax.bounds import bounds
from verify.model import UnsupportedOperatorError, load_model
from verify.spec import Box

I64 = np.int64


def _head():
    """x [1, 12] -> MatMul -> Relu -> reshape [1, 3, 2, 2] named ``t``."""
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Relu", ["m"], ["r"]), node("Reshape", ["r", "shp"], ["t"])]
    return nodes, {"W": rand(12, 12), "shp": np.array([1, 3, 2, 2], I64)}


CASES = {
    "slice": ([node("Slice", ["t", "st", "en", "ax", "sp"], ["y"])],
              {"st": np.array([1, 0], I64), "en": np.array([3, 100], I64), "ax": np.array([1, 3], I64), "sp": np.array([1, 2], I64)}),
    "gather-2d-indices": ([node("Gather", ["t", "gi"], ["y"], axis=2)], {"gi": np.array([[1, 0], [-1, 1]], I64)}),
    "gather-scalar": ([node("Gather", ["t", "gs"], ["y"], axis=1)], {"gs": np.array(2, I64)}),
    "concat-with-constant": ([node("Slice", ["t", "st", "en", "ax"], ["s1"]), node("Concat", ["t", "s1", "cc"], ["y"], axis=1)],
                             {"st": np.array([0], I64), "en": np.array([1], I64), "ax": np.array([1], I64), "cc": rand(1, 2, 2, 2)}),
    "split": ([node("Split", ["t", "sz"], ["y", "z"], axis=1)], {"sz": np.array([2, 1], I64)}),
    "expand": ([node("Slice", ["t", "st", "en", "ax"], ["s1"]), node("Expand", ["s1", "es"], ["y"])],
               {"st": np.array([0], I64), "en": np.array([1], I64), "ax": np.array([1], I64), "es": np.array([1, 4, 2, 2], I64)}),
    "resize-nearest": ([node("Resize", ["t", "", "sc"], ["y"], mode="nearest")], {"sc": np.array([1, 1, 2, 3], np.float32)}),
    "pad-into-concat": ([node("Pad", ["t", "pads"], ["p"]), node("Concat", ["p", "p"], ["y"], axis=2)],
                        {"pads": np.array([0, 0, 1, 0, 0, 0, 0, 2], I64)}),
    "pad-alone": ([node("Pad", ["t", "pads"], ["y"])], {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)}),
    "conv-transpose": ([node("ConvTranspose", ["t", "cw", "cb"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])],
                       {"cw": rand(3, 4, 3, 3), "cb": rand(4)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converts_and_bounds_soundly(tmp_path, case):
    head, inits = _head()
    nodes, extra = CASES[case]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, **extra})
    assert_crown_holds(assert_matches_ort(path), 0.1)


def assert_crown_holds(gm, radius: float) -> None:
    """CROWN's bounds of ``gm`` (float64, input ``[12]``) on boxes of ``radius`` around two
    random points are finite and contain 5,000 sampled outputs."""
    net = gm.double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 12, generator=g, dtype=torch.float64)
    lo, hi = bounds(net, Box(x - radius, x + radius), method="crown")
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
    pts = x.unsqueeze(0) + (torch.rand(5000, 2, 12, generator=g, dtype=torch.float64) - 0.5) * 2 * radius
    with torch.no_grad():
        ys = net(pts.reshape(-1, 12)).reshape(5000, 2, -1)
    assert (ys >= lo - 1e-9).all() and (ys <= hi + 1e-9).all()


def test_upsample_opset9(tmp_path):
    head, inits = _head()
    nodes = [node("Upsample", ["t", "sc"], ["y"], mode="nearest")]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, "sc": np.array([1, 1, 2, 2], np.float32)}, opset=9)
    assert_matches_ort(path)


@pytest.mark.parametrize("attrs, why", [(dict(mode="cubic"), "mode=cubic"),
                                        (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="ceil"), "is not i // 2")])
def test_resize_that_is_not_a_selection_is_refused(tmp_path, attrs, why):
    head, inits = _head()
    nodes = [node("Resize", ["t", "", "sc"], ["y"], **attrs)]
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, "sc": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(UnsupportedOperatorError, match=why):
        load_model(path)


def test_slice_with_negative_step_is_refused(tmp_path):
    head, inits = _head()
    nodes = [node("Slice", ["t", "st", "en", "ax", "sp"], ["y"])]
    extra = {"st": np.array([-1], I64), "en": np.array([-100], I64), "ax": np.array([3], I64), "sp": np.array([-1], I64)}
    path = make_onnx(tmp_path, head + nodes, [1, 12], {**inits, **extra})
    with pytest.raises(UnsupportedOperatorError, match="Slice.*step -1"):
        load_model(path)


def test_leading_dim_above_one_is_data_not_batch(tmp_path):
    """An input ``[3, 4]`` (nn4sys' pensieve has ``[12, 8]``) has no batch dim: the converted
    graph takes ``[B, 3, 4]`` and may act on ONNX axis 0."""
    nodes = [node("MatMul", ["x", "W"], ["m"]), node("Slice", ["m", "st", "en", "ax"], ["y"])]
    path = make_onnx(tmp_path, nodes, [3, 4], {"W": rand(4, 2), "st": np.array([1], I64), "en": np.array([3], I64),
                                               "ax": np.array([0], I64)})
    gm = assert_matches_ort(path)
    assert gm.input_shape == (3, 4)


def test_a_concat_of_a_domain_batch_and_the_input_box():
    """``bab`` bounds a batch of domains whose boxes beside the input set's own (a batch of one):
    a concatenation of both serves each domain the one input box (it indexed past the end)."""
    from relax.ir.graph import build_graph

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.relu(x[:, :2]), x[:, 2:]], 1)

    graph = build_graph(torch.fx.symbolic_trace(Net()), (3, 4, 4), torch.float64)
    cat = next(n for n in graph.nodes if len(n.inputs) == 2)
    g = torch.Generator().manual_seed(0)
    domains = (torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64),) * 2
    one = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    lo, hi = cat.op.interval(domains, (one, one + 1))
    want = torch.cat([domains[0], one.expand(5, 1, 4, 4)], 1)
    assert torch.equal(lo, want) and torch.equal(hi, torch.cat([domains[0], one.expand(5, 1, 4, 4) + 1], 1))
