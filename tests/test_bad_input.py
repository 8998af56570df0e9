"""Bad input gets one clear error (exit 2 on the command line), never a raw exception, a silent
empty result or a bogus answer (issue 17, "bad input"); ``certify()`` leaves the caller's model
as it was."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import verify
from conftest import err_line as _err_line
from verify.cli import main
from verify.digits_model import load_digits_mlp
from verify.errors import ModelLoadError, OptionError
from verify.registry import BoundMethod, register
from verify.spec import Box, Linear, LpBall, SpecError


class _BrokenMethod(BoundMethod):
    """Always raises: every row of a run errors (registered only inside the test that uses it:
    other test modules run every registered method)."""

    name = "test-broken"
    norms = ("linf", "l2", "box")

    def lower_bounds(self, model, inputs, spec):
        raise RuntimeError("broken on purpose")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture()
def net_x_lab():
    net = _net()
    x = torch.rand(3, 4)
    return net, x, net(x).argmax(1)




# --------------------------------------------------------------------- the dtype collision


def test_dtype_method_option_is_routed(net_x_lab):
    net, x, lab = net_x_lab
    t = verify.certify(net, x, lab, "crown", eps=1e-3, method_options={"dtype": "float64"})
    assert [c.status for c in t] == ["certified"] * 3 and t[0].details["options"]["dtype"] == "float64"
    t = verify.certify(net, x, lab, "crown", eps=1e-3, dtype="float64")  # certify's own dtype, by name
    assert [c.status for c in t] == ["certified"] * 3
    with pytest.raises(OptionError, match="dtype"):
        verify.certify(net, x, lab, "crown", dtype="int32")


def test_cli_dtype_option(model_pt, tmp_path, capsys):
    # used to reach certify()'s own dtype argument: exit 2 (run) or every row errored (compare)
    out = tmp_path / "r.csv"
    rc = main(["run", "--model", str(model_pt), "--data", "digits", "--limit", "3", "--eps", "0.001",
               "--method", "crown", "--option", "dtype=float64", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and not [r for r in rows if r["status"] == "error"]
    rc = main(["compare", "--model", str(model_pt), "--data", "digits", "--limit", "3", "--methods", "crown",
               "--radii", "0,0.01", "--option", "dtype=float64", "--out", str(tmp_path / "c"), "--no-attack", "-q"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "c" / "compare_results.csv")))
    assert len(rows) == 3 and not [r for r in rows if r["status"] == "error"]


# --------------------------------------------------------------------- inputs and shapes


def test_empty_inputs(net_x_lab):
    net, x, lab = net_x_lab
    with pytest.raises(SpecError, match="no examples"):
        verify.certify(net, x[:0], lab[:0], "interval", eps=0.01)


def test_wrong_input_shape(net_x_lab):
    net, x, lab = net_x_lab
    with pytest.raises(SpecError, match=r"shape \(5,\)"):
        verify.certify(net, torch.rand(3, 5), lab, "interval", eps=0.01)
    gm = verify.load_model(net)
    gm.input_shape = (4,)
    with pytest.raises(SpecError, match=r"\(2, 3\) per example but the model expects \(4,\)"):
        verify.certify(gm, torch.rand(3, 2, 3), lab, "interval", eps=0.01)


# --------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("alpha-crown", {"iterations": "abc"}, "option iterations of alpha-crown: expected an integer, got 'abc'"),
        ("alpha-crown", {"iterations": -5}, "option iterations of alpha-crown: expected a value >= 0, got -5"),
        ("alpha-crown", {"lr": 0.0}, "option lr of alpha-crown: expected a value > 0"),
        ("alpha-crown", {"early_stop": "yes"}, "option early_stop"),
        ("smoothing-gaussian", {"alpha": 1.5}, r"option alpha of smoothing-gaussian: expected a value in \(0, 1\)"),
        ("smoothing-gaussian", {"sigma": float("nan")}, "option sigma"),
        ("interval", {"timeout": -1}, "timeout must be a number > 0, got -1"),
        ("interval", {"max_radius": -1, "find_radius": True}, "max_radius must be a number > 0, got -1"),
        ("interval", {"batch_size": -2}, "batch_size must be an integer >= 1, got -2"),
    ],
)
def test_option_values_refused(net_x_lab, method, kwargs, match):
    net, x, lab = net_x_lab
    with pytest.raises(OptionError, match=match):
        verify.certify(net, x, lab, method, eps=0.01, **kwargs)


@pytest.mark.parametrize(
    "cmd, extra, cause",
    [
        ("run", ["--eps", "0.01", "--method", "alpha-crown", "--option", "iterations=-5"], "option iterations of alpha-crown"),
        ("run", ["--eps", "0.01", "--method", "interval", "--batch-size", "-2"], "--batch-size must be > 0"),
        ("run", ["--eps", "0.01", "--method", "interval", "--radius", "--max-radius", "-1"], "--max-radius must be > 0"),
        ("compare", ["--radii", "0,0.01", "--methods", "interval", "--timeout", "-1"], "--timeout must be > 0"),
        ("compare", ["--radii", "0,0.01", "--methods", "alpha-crown", "--option", "iterations=-5"], "option iterations"),
    ],
)
def test_cli_option_values_one_line(model_pt, tmp_path, capsys, cmd, extra, cause):
    out = ["--out", str(tmp_path / ("r.csv" if cmd == "run" else "c"))]
    assert main([cmd, "--model", str(model_pt), "--data", "digits", "--limit", "2", *extra, *out, "-q"]) == 2
    assert cause in _err_line(capsys)


# --------------------------------------------------------------------- properties


@pytest.mark.parametrize("label", [-1, 10])
def test_smoothing_refuses_label_out_of_range(label):
    net = load_digits_mlp()
    x = torch.rand(1, 64)
    for method in ("smoothing-gaussian", "interval"):  # refused the same way
        with pytest.raises(SpecError, match=f"label {label} is out of range for a model with 10 outputs"):
            verify.certify(net, x, torch.tensor([label]), method, eps=0.1, n=100, n0=10) if method != "interval" else \
                verify.certify(net, x, torch.tensor([label]), method, eps=0.1)


def test_linear_rows_equal_to_batch_size(net_x_lab):
    net, x, _ = net_x_lab
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]])  # 3 rows, batch of 3
    prop = Linear(C, torch.tensor([10.0, 10.0, 10.0]))
    whole = verify.certify(net, x, prop, "interval", eps=0.01)
    split = verify.certify(net, x, prop, "interval", eps=0.01, batch_size=1)  # crashed in _select_prop
    assert [c.status for c in split] == [c.status for c in whole]
    assert all(torch.allclose(torch.tensor(a.lower), torch.tensor(b.lower)) for a, b in zip(split, whole))


def test_property_output_count_mismatch(net_x_lab):
    net, x, _ = net_x_lab
    with pytest.raises(SpecError, match="the property refers to 5 outputs but the model has 3"):
        verify.certify(net, x, Linear(torch.ones(2, 5)), "interval", eps=0.01)


def test_cli_vnnlib_output_count_mismatch(model_pt, tmp_path, capsys):
    lines = [f"(declare-const X_{i} Real)" for i in range(64)] + [f"(declare-const Y_{j} Real)" for j in range(5)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.01))" for i in range(64)] + ["(assert (<= Y_0 Y_4))"]
    spec = tmp_path / "p.vnnlib"
    spec.write_text("\n".join(lines))
    assert main(["run", "--model", str(model_pt), "--spec", str(spec), "--method", "interval", "--out", ""]) == 2
    assert "the property refers to 5 outputs but the model has 10" in _err_line(capsys)


# --------------------------------------------------------------------- models and devices


def test_matmul_transpose_net_in_dense_methods():
    """``torch.matmul(x, W.t())`` with W of shape [n_in + 1, n_in]: the constant ``W.t()`` was
    taken for a value that changed the batch dimension of the basis batch."""
    from relax.ir.dense import to_feedforward

    class MatmulNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W1 = nn.Parameter(torch.randn(5, 4))
            self.W2 = nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            return torch.matmul(torch.relu(torch.matmul(x, self.W1.t())), self.W2.t())

    net = MatmulNet()
    ff = to_feedforward(net, (4,))
    x = torch.rand(4, 4, dtype=torch.float64)
    assert torch.allclose(ff.forward(x), net.double()(x))
    net = net.float()
    x = torch.rand(2, 4)
    lab = net(x).argmax(1)
    for method in ("lipschitz-global", "crown"):
        t = verify.certify(net, x, lab, method, eps=1e-4)
        assert [c.status for c in t] == ["certified"] * 2


def test_model_directory(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="is a directory"):
        verify.load_model(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--data", "digits", "--eps", "0.1", "--method", "interval"]) == 2
    assert "is a directory" in _err_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(net_x_lab):
    net, x, lab = net_x_lab
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        verify.certify(net, x, lab, "interval", eps=0.01, device="cuda")
    with pytest.raises(ModelLoadError, match="unknown device"):
        verify.certify(net, x, lab, "interval", eps=0.01, device="gpu7")


@pytest.fixture()
def broken_method():
    from verify import registry

    register(_BrokenMethod)
    yield _BrokenMethod.name
    registry._REGISTRY.pop(_BrokenMethod.name, None)


def test_compare_every_row_errored_exits_2(model_pt, tmp_path, capsys, broken_method):
    rc = main(["compare", "--model", str(model_pt), "--data", "digits", "--limit", "2", "--methods", "test-broken",
               "--radii", "0,0.01", "--out", str(tmp_path), "--no-attack", "-q"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("certify: error: every row errored") and "broken on purpose" in err[-1]


def test_certify_leaves_the_callers_model_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
    net(torch.rand(16, 4))  # BatchNorm statistics
    x = torch.rand(2, 4)
    gm = torch.fx.symbolic_trace(net)  # a GraphModule in training mode, float32
    for model in (net, gm):
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        verify.certify(model, x, torch.tensor([0, 1]), "interval", eps=0.01, dtype=torch.float64)
        assert model.training and all(m.training for m in model.modules())
        after = model.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    gm.eval()
    assert verify.load_model(gm) is gm  # nothing to change: no copy


# --------------------------------------------------------------------- issue item 6: the input set


def test_non_finite_centre_refused():
    with pytest.raises(SpecError, match="inf"):
        LpBall(torch.tensor([[0.5, math.inf]]), 0.1, math.inf, 0.0, 1.0)
    with pytest.raises(SpecError, match="NaN"):
        LpBall(torch.tensor([[0.5, math.nan]]), 0.1, math.inf, 0.0, 1.0)
    with pytest.raises(SpecError, match="inf"):
        Box(torch.tensor([[-math.inf, 0.0]]), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(SpecError, match="eps must be >= 0"):
        LpBall(torch.tensor([[0.5, 0.5]]), -0.1, math.inf, 0.0, 1.0)


def test_ball_outside_domain_refused():
    c = torch.tensor([[1.3, 1.3]])
    LpBall(c, 0.4, math.inf, 0.0, 1.0)  # meets the domain at the corner region
    with pytest.raises(SpecError, match="does not meet the input domain"):
        LpBall(c, 0.4, 2, 0.0, 1.0)  # l2 distance 0.42 > 0.4
    with pytest.raises(SpecError, match=r"example 1 \(radius 0.1\) does not meet the input domain \[0, 1\]"):
        LpBall(torch.tensor([[0.5, 0.5], [2.0, 0.5]]), 0.1, math.inf, 0.0, 1.0)
    LpBall(torch.tensor([[2.0, 0.5]]), 0.1, math.inf, None, None)  # no domain: nothing to meet


def test_certify_refuses_instead_of_bogus_falsified(net_x_lab):
    net, _, _ = net_x_lab
    for centre in (torch.full((1, 4), math.inf), torch.full((1, 4), 2.0)):
        with pytest.raises(SpecError):
            verify.certify(net, centre, 0, "interval", eps=0.01)
