"""Networks that use the integer part of an input as an index (cctsdb_yolo's patch position):
converted per integer value (``import_onnx(integer_inputs=...)``) and decided case by case
(``verify/integer_inputs.py``). The answers are checked against onnxruntime on every integer
position and on dense samples of the float positions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import verify.integer_inputs as ii
from verify.errors import IntegerInputsNeeded, UnsupportedOperatorError
from verify.instance import run_instance
from verify.onnx_import import OnnxRuntimeModel, import_onnx

IMAGE = np.array([0.5, -1.0, 2.0, 0.25, 3.0, -0.5, 1.0, 1.5], dtype=np.float32)
N = IMAGE.size  # input: IMAGE, then the position p at index N


def _model(tmp_path, float_leak: float = 0.0):
    """``y = sum(image * onehot(trunc(p))) + float_leak * p``: the image entry at ``trunc(p)``,
    the one-hot made by ScatterND at the cast position (plus ``p`` itself when ``float_leak``)."""
    nd = helper.make_node
    nodes = [
        nd("Slice", ["x", "s0", "e0", "ax"], ["img"]),
        nd("Gather", ["x", "pidx"], ["p"], axis=0),
        nd("Cast", ["p"], ["pi"], to=TensorProto.INT64),
        nd("Reshape", ["pi", "shp11"], ["idx"]),
        nd("ScatterND", ["zeros", "idx", "one"], ["mask"]),
        nd("Mul", ["img", "mask"], ["sel"]),
        nd("ReduceSum", ["sel"], ["s" if float_leak else "y"], keepdims=1),
    ]
    if float_leak:
        nodes += [nd("Mul", ["p", "leak"], ["pl"]), nd("Reshape", ["pl", "shp1"], ["pl1"]), nd("Add", ["s", "pl1"], ["y"])]
    inits = {"s0": np.array([0], np.int64), "e0": np.array([N], np.int64), "ax": np.array([0], np.int64),
             "pidx": np.array(N, np.int64), "shp11": np.array([1, 1], np.int64), "zeros": np.zeros(N, np.float32),
             "one": np.ones(1, np.float32), "leak": np.array(float_leak, np.float32), "shp1": np.array([1], np.int64)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N + 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    path = tmp_path / f"pos_{float_leak}.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def _vnnlib(tmp_path, p_lo: float, p_hi: float, unsafe_above: float):
    txt = "".join(f"(declare-const X_{i} Real)\n" for i in range(N + 1)) + "(declare-const Y_0 Real)\n"
    for i, v in enumerate(IMAGE):
        txt += f"(assert (>= X_{i} {float(v)!r}))\n(assert (<= X_{i} {float(v)!r}))\n"
    txt += f"(assert (>= X_{N} {p_lo!r}))\n(assert (<= X_{N} {p_hi!r}))\n(assert (>= Y_0 {unsafe_above!r}))\n"
    path = tmp_path / f"spec_{p_lo}_{p_hi}_{unsafe_above}.vnnlib"
    path.write_text(txt)
    return path


def _ort_max(path, p_values) -> float:
    ort = OnnxRuntimeModel(path)
    xs = np.concatenate([np.tile(IMAGE, (len(p_values), 1)), np.asarray(p_values, np.float32)[:, None]], axis=1)
    return float(ort(xs).max())


def test_conversion_needs_the_integer_inputs_and_matches_onnxruntime_per_case(tmp_path):
    path = _model(tmp_path)
    with pytest.raises(IntegerInputsNeeded, match="integer part of inputs \\[8\\]") as e:
        import_onnx(path)
    assert e.value.coords == [N]
    ort = OnnxRuntimeModel(path)
    for k in range(N):
        gm = import_onnx(path, integer_inputs={N: k}).double()
        assert gm.integer_part_only == (N,)
        for p in (k, k + 0.3, k + 0.999):
            x = np.concatenate([IMAGE, [p]]).astype(np.float32)
            assert gm(torch.from_numpy(x.astype(np.float64))[None]).item() == pytest.approx(float(ort(x[None])[0, 0]), abs=1e-6)


def test_a_float_use_of_the_position_is_seen():
    """The output depends on ``p`` itself: not constant per case (no point enumeration)."""
    import tempfile
    from pathlib import Path

    gm = import_onnx(_model(Path(tempfile.mkdtemp()), float_leak=0.01), integer_inputs={N: 2})
    assert gm.integer_part_only == ()


@pytest.mark.parametrize("leak", [0.0, 0.01])
@pytest.mark.parametrize("p_box, unsafe_above", [((0.0, 7.9), 2.5), ((0.0, 7.9), 3.5), ((0.5, 3.7), 2.0), ((0.5, 3.7), 2.1)])
def test_answers_agree_with_onnxruntime_on_every_position(tmp_path, leak, p_box, unsafe_above):
    """sat iff some position in the box reaches ``unsafe_above`` (onnxruntime on every integer
    position and 2,000 float positions of the box); a sat answer's point is such a position."""
    path = _model(tmp_path, leak)
    spec = _vnnlib(tmp_path, *p_box, unsafe_above)
    grid = np.concatenate([np.linspace(*p_box, 2000), np.arange(np.ceil(p_box[0]), np.floor(p_box[1]) + 1)])
    worst = _ort_max(path, grid)
    res = run_instance(path, spec, 60, raise_errors=True)
    assert res.stage == "integer-cases"
    if worst >= unsafe_above:
        assert res.result == "sat"
        assert p_box[0] <= res.x[N] <= p_box[1] and res.y[0] >= unsafe_above
    else:
        assert res.result in ("unsat", "unknown", "timeout")
        if leak == 0.0:  # one network run per case decides it exactly
            assert res.result == "unsat"
            assert res.certificates[0].details["cases"] == len(ii.case_values(np.r_[IMAGE, p_box[0]], np.r_[IMAGE, p_box[1]], [N])[0])


def test_case_bounds_hold_exactly_the_float32_values_of_the_case():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lo, hi = np.sort(rng.uniform(-6, 6, 2))
        for k in ii.case_values(np.array([lo]), np.array([hi]), [0])[0]:
            a, b = ii.case_bounds(k, lo, hi)
            assert lo <= a <= b <= hi
            assert int(np.trunc(np.float32(a))) == k and int(np.trunc(np.float32(b))) == k
            # the float32 neighbours just outside the part belong to other cases (or leave the box)
            for v, d in ((a, -np.inf), (b, np.inf)):
                w = np.nextafter(np.float32(v), np.float32(d))
                assert not lo <= float(w) <= hi or int(np.trunc(w)) != k


def test_too_many_cases_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ii, "MAX_CASES", 3)
    res = run_instance(_model(tmp_path), _vnnlib(tmp_path, 0.0, 7.9, 2.5), 60)
    assert res.result == "error" and "8 integer cases (at most 3)" in res.detail
    with pytest.raises(UnsupportedOperatorError, match="8 integer cases"):
        run_instance(_model(tmp_path), _vnnlib(tmp_path, 0.0, 7.9, 2.5), 60, raise_errors=True)


@pytest.mark.parametrize("leak", [0.0, 0.01])
def test_each_conversion_is_done_once(tmp_path, monkeypatch, leak):
    """One instance converts the network once without fixed inputs (at loading) and once per
    case it needs: point cases need only the first case's graph (to see that the output
    depends on the position's integer part only), graph cases every case's."""
    import verify.onnx_import as oi

    real, calls = oi.import_onnx, []

    def counting(*args, integer_inputs=None, **kw):
        calls.append(tuple(sorted((integer_inputs or {}).items())))
        return real(*args, integer_inputs=integer_inputs, **kw)

    monkeypatch.setattr(oi, "import_onnx", counting)
    res = run_instance(_model(tmp_path, leak), _vnnlib(tmp_path, 0.0, 7.9, 100.0), 60, raise_errors=True)
    assert res.result == "unsat" if leak == 0.0 else res.result in ("unsat", "unknown", "timeout")
    cases = [((N, k),) for k in range(8)]
    assert calls == [()] + (cases[:1] if leak == 0.0 else cases)
