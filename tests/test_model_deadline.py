"""Loading a model honours a deadline (verify/model.py, verify/onnx_import.py): a large ONNX graph
stops converting within about one node's work of it, and run_instance turns that into an on-time
``timeout`` answer, as it does for a VNN-LIB file not read in time. The graphs are made here with
onnx.helper: a chain of MatMul + Add + Relu layers."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verify.errors import ModelLoadTimeout
from verify.instance import run_instance
from verify.model import load_model
from verify.onnx_import import import_onnx

WIDTH = 8
#: the overshoot allowed past a deadline: one node's work plus a busy machine's scheduling
MARGIN_S = 0.25
#: tries of a timed call: on a shared machine one try can lose the CPU for longer than the
#: margin; a loader that ignores its deadline overshoots by ~4x the budget in every try
TRIES = 3


def _chain(layers: int, seed: int = 0) -> onnx.ModelProto:
    """``layers`` x (MatMul, Add, Relu) on a ``[1, WIDTH]`` input: ``3 * layers`` ONNX nodes."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / WIDTH).astype(np.float32)
        b = (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(ONNX path, its model converted without a deadline, seconds that conversion took)."""
    path = tmp_path_factory.mktemp("big") / "chain.onnx"
    onnx.save(_chain(600), str(path))
    t = time.perf_counter()
    gm = load_model(str(path))
    return path, gm, time.perf_counter() - t


def test_tiny_deadline_stops_the_conversion_between_nodes(big):
    path, _, full = big
    budget = full / 5  # inside the node loop
    late = []
    for _ in range(TRIES):
        t = time.perf_counter()
        with pytest.raises(ModelLoadTimeout, match=r"chain.onnx: not converted by the deadline \(stopped (at node|after)"):
            load_model(str(path), deadline=t + budget)
        if time.perf_counter() - t < budget + MARGIN_S:
            break
        late.append(round(time.perf_counter() - t - budget, 3))
    else:
        raise AssertionError(f"past the {budget:.3f} s budget by {late} s in every try")


def test_passed_deadline_stops_before_converting():
    model = _chain(5)
    with pytest.raises(ModelLoadTimeout, match="stopped before reading the file"):
        import_onnx(model, deadline=time.perf_counter() - 1.0)


def test_generous_deadline_gives_the_same_model(big):
    path, ref, _ = big
    gm = load_model(str(path), deadline=time.perf_counter() + 600.0)
    assert gm.code == ref.code and gm.input_shape == ref.input_shape == (WIDTH,)
    x = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gm(x), ref(x))
    for (k, a), (k2, b) in zip(gm.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def _spec(tmp_path) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(WIDTH)] + [f"(declare-const Y_{j} Real)" for j in range(WIDTH)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))" for i in range(WIDTH)]
    lines.append("(assert (>= Y_0 1000.0))")
    spec = tmp_path / "p.vnnlib"
    spec.write_text("\n".join(lines) + "\n")
    return str(spec)


@pytest.mark.parametrize("raise_errors", [False, True])
def test_run_instance_answers_timeout_on_time_while_loading(big, tmp_path, raise_errors):
    """The instance's budget runs out while the model is converted: ``timeout``, stage ``load``,
    within the budget plus a small margin (also where errors are raised, as for ``run --spec``)."""
    path, _, full = big
    budget = full / 5
    late = []
    for _ in range(TRIES):
        t = time.perf_counter()
        res = run_instance(str(path), _spec(tmp_path), budget, method="interval", raise_errors=raise_errors)
        elapsed = time.perf_counter() - t
        assert res.result == "timeout" and res.stage == "load" and "not converted by the deadline" in res.detail
        if res.time_s < budget + MARGIN_S and elapsed < budget + MARGIN_S:
            break
        late.append(round(elapsed - budget, 3))
    else:
        raise AssertionError(f"past the {budget:.3f} s budget by {late} s in every try")


def test_run_spec_prints_the_load_timeout(big, tmp_path, capsys):
    from verify.cli import main

    path, _, full = big
    assert main(["run", "-q", "--model", str(path), "--spec", _spec(tmp_path), "--method", "interval",
                 "--timeout", f"{full / 5:.3f}", "--out", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("result: timeout in ") and "(p.vnnlib; chain.onnx: not converted" in lines[0]
