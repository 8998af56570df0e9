"""Every method on a GPU: the same answers as on the CPU, bounds that contain samples.

Skipped where CUDA is absent (CI). ``CERTIFY_TEST_DEVICE`` names another device to test (the
default is ``cuda``; ``cpu`` runs these comparisons CPU against CPU, which checks the tests
themselves). On a GPU machine: ``python -m pytest tests/test_cuda.py``.

What is compared with the CPU run of the same call:

* deterministic methods on the digits MLP (l_inf, and l_2 where the method takes it): the same
  status per input, and bounds equal up to the round-off of a different summation order;
* the bound engine on every network of the soundness zoo (convolutions, BatchNorm, residual
  adds, sigmoid / tanh, attention products, shape moves): equal bounds (alpha-CROWN: its
  optimisation may take another path; never looser than CROWN), and 10,000 samples + PGD
  points inside the device's bounds;
* branch-and-bound on a CNN, a residual net and a sigmoid net (graph ReLU / interval splitting)
  and on a low-dimensional net (input splitting): the same decisions; a falsified input's
  counterexample confirmed by a CPU forward pass;
* smoothing (every probabilistic method): the same predictions and statuses on most inputs and
  valid radii (the noise samples differ by device);
* float32 convolutions inside :func:`verify.precision.ieee_float32` round as IEEE float32, not TF32.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from verify import certify
from verify.spec import LpBall, Robust

DEVICE = os.environ.get("CERTIFY_TEST_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("no CUDA device on this machine (set CERTIFY_TEST_DEVICE to test another device)", allow_module_level=True)


@pytest.fixture(scope="module")
def digits():
    from verify.data import digits as load
    from verify.digits_model import load_digits_mlp

    x, y = load("test", limit=12)
    return load_digits_mlp(), x, y


def _both(method: str, net, x, y, **kw):
    """The certificates of the same call on the CPU and on :data:`DEVICE`."""
    return [certify(net, x, y, method, device=dev, **kw) for dev in ("cpu", DEVICE)]


DETERMINISTIC = [
    ("interval", {}), ("crown", {}), ("deeppoly", {}), ("alpha-crown", {"iterations": 5}),
    ("lipschitz-global", {}), ("lipschitz-local", {}), ("lp", {}), ("milp", {}), ("bab", {}),
    ("sdp", {}), ("lipschitz-sdp", {}),
]
#: inputs per method (the conic programs are slow)
_LIMIT = {"sdp": 2, "lipschitz-sdp": 2, "milp": 6, "lp": 6}


@pytest.mark.parametrize("method,opts", DETERMINISTIC, ids=[m for m, _ in DETERMINISTIC])
@pytest.mark.parametrize("norm,eps", [("inf", 0.03), (2, 0.4)], ids=["linf", "l2"])
def test_deterministic_methods_agree_with_the_cpu(digits, method, opts, norm, eps):
    from verify.registry import get_method

    if norm == 2 and "l2" not in get_method(method).norms:
        pytest.skip(f"{method} does not take l_2 balls")
    net, x, y = digits
    k = _LIMIT.get(method, len(x))
    cpu, dev = _both(method, net, x[:k], y[:k], eps=eps, norm=norm, timeout=120, **opts)
    for a, b in zip(cpu, dev):
        assert b.status == a.status, (method, a.index, a.status, b.status)
        la, lb = list(a.lower or []), list(b.lower or [])
        assert len(la) == len(lb)
        for u, v in zip(la, lb):
            if method not in ("lp", "milp", "bab", "sdp", "lipschitz-sdp"):  # solvers / searches: status only
                assert math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-6), (method, a.index, u, v)
        if b.status == "falsified":
            xc = torch.tensor(b.counterexample).reshape(1, *x.shape[1:])
            assert int(net(xc).argmax()) != int(y[b.index])


# ---------------------------------------------------------------- the bound engine on the zoo


@pytest.mark.parametrize("method", ["interval", "crown", "deeppoly", "alpha-crown"])
def test_engine_bounds_on_device_equal_cpu_and_contain_samples(method):
    from relax.bounds import bounds
    from test_bounds_soundness import NETS, check_sound, input_sets, spec_rows

    for name, (net, shape) in NETS.items():
        net = net.to(torch.float64)
        for set_name, S in input_sets(shape, torch.float64).items():
            K = net(S.midpoint()).shape[1]
            C, d = spec_rows(K, S.batch_size, torch.float64)
            lo, hi = bounds(net, S, C, d, method=method, iterations=4)
            dnet = net.to(DEVICE)
            try:
                dlo, dhi = bounds(dnet, S.to(device=DEVICE), C.to(DEVICE), d.to(DEVICE), method=method, iterations=4)
                g = torch.Generator(device=DEVICE).manual_seed(0)
                pts = S.to(device=DEVICE).sample(1000, generator=g)  # sampling on the device
                assert pts.device.type == torch.device(DEVICE).type
            finally:
                net = dnet.to("cpu")
            assert dlo.device.type == torch.device(DEVICE).type
            dlo, dhi = dlo.cpu(), dhi.cpu()
            scale = 1 + lo.abs().max().item() + hi.abs().max().item()
            if method == "alpha-crown":  # its gradient steps take another path when sums round differently:
                c_lo, c_hi = bounds(net, S, C, d, method="crown")  # never looser than CROWN, on either device
                assert (dlo >= c_lo - 1e-9 * scale).all() and (dhi <= c_hi + 1e-9 * scale).all(), (name, set_name)
            else:
                assert torch.allclose(dlo, lo, rtol=1e-7, atol=1e-9 * scale), (name, set_name, (dlo - lo).abs().max())
                assert torch.allclose(dhi, hi, rtol=1e-7, atol=1e-9 * scale), (name, set_name, (dhi - hi).abs().max())
            check_sound(net, S, C, d, dlo, dhi, 1e-9)
        net.to(torch.float32)


# ---------------------------------------------------------------- branch and bound on graphs


def _graph_nets():
    torch.manual_seed(3)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    cnn[1].running_var.uniform_(0.5, 2.0)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.o = nn.Linear(64, 24), nn.Linear(24, 24), nn.Linear(24, 4)

        def forward(self, x):
            h = torch.relu(self.a(x.flatten(1)))
            return self.o(h + torch.relu(self.b(h)))

    sig = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        sig[1].weight.mul_(3.0)
    return {"cnn": cnn, "residual": Res().eval(), "sigmoid": sig}


@pytest.mark.parametrize("name", ["cnn", "residual", "sigmoid"])
def test_graph_bab_decides_as_on_the_cpu(name):
    net = _graph_nets()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.rand((6, 1, 8, 8), generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    for eps in (0.01, 0.05):
        cpu, dev = _both("bab", net, x, y, eps=eps, timeout=60)
        for a, b in zip(cpu, dev):
            # both decided: the same decision (a search may decide on one side only: time)
            if a.status != "unknown" and b.status != "unknown":
                assert a.status == b.status, (name, eps, a.index, a.status, b.status)
            if b.status == "falsified":
                xc = torch.tensor(b.counterexample).reshape(1, 1, 8, 8)
                assert (xc - x[b.index]).abs().max() <= eps + 1e-6
                assert int(net(xc).argmax()) != int(y[b.index])
        assert sum(c.status != "unknown" for c in dev) >= sum(c.status != "unknown" for c in cpu) - 1


def test_input_split_bab_on_device():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.rand((8, 3))
    with torch.no_grad():
        y = net(x).argmax(1)
    S = LpBall(x, 0.08, math.inf, 0.0, 1.0)
    cpu, dev = (certify(net, S, Robust(y), "bab", device=d, timeout=60, split="input") for d in ("cpu", DEVICE))
    assert [c.status for c in dev] == [c.status for c in cpu]
    assert all(c.status != "unknown" for c in dev)


# ---------------------------------------------------------------- smoothing


SMOOTHING = ["smoothing-gaussian", "smoothing-laplace", "smoothing-uniform", "smoothing-topk", "smoothing-zhang",
             "smoothing-denoised", "smoothing-regression", "smoothing-invariance", "smoothing-rotation", "smoothing-translation"]


@pytest.mark.parametrize("method", SMOOTHING)
def test_smoothing_runs_on_device_like_on_the_cpu(digits, method):
    from verify.digits_model import load_digits_mlp
    from verify.registry import get_method

    _, x, y = digits
    net = load_digits_mlp("plain" if method == "smoothing-denoised" else "noise")
    m = get_method(method)
    want = {"sigma": 0.25, "n0": 64, "n": 2000, "seed": 0}
    opts = {k: v for k, v in want.items() if k in m.option_names()}
    kw = {"eps": 0.3, "norm": 2} if method == "smoothing-regression" else {"eps": 0.05} if method == "smoothing-invariance" \
        else {"find_radius": True}
    cpu, dev = _both(method, net, x, y, **kw, **opts)
    same = sum(a.prediction == b.prediction and a.status == b.status for a, b in zip(cpu, dev))
    assert same >= len(x) - 3, (method, [(a.prediction, a.status, b.prediction, b.status) for a, b in zip(cpu, dev)])
    for c in dev:
        assert c.confidence < 1 and c.radius >= 0 and math.isfinite(c.radius)


# ---------------------------------------------------------------- IEEE float32 on the device


def test_float32_convolutions_round_as_ieee_inside_the_guard():
    from relax.bounds.roundoff import gamma
    from verify.precision import ieee_float32

    torch.manual_seed(0)
    x = torch.rand(8, 64, 32, 32, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64)
    exact = nn.functional.conv2d(x, w, padding=1)
    bound = gamma(64 * 9, torch.float32) * nn.functional.conv2d(x.abs(), w.abs(), padding=1)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # torch's default on CUDA
    try:
        with ieee_float32():
            y = nn.functional.conv2d(x.float().to(DEVICE), w.float().to(DEVICE), padding=1).double().cpu()
        assert torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    # inputs rounded to float32 add at most u |w| |x| per term: within twice the sum bound
    assert ((y - exact).abs() <= 2 * bound + 1e-12).all(), float(((y - exact).abs() / bound.clamp_min(1e-30)).max())


def test_vnncomp_instance_on_device(shared_dir):
    from verify.instance import run_instance
    from verify.vnncomp import find_instances_csv
    from verify.vnnlib import read_instances

    folder = shared_dir / "benchmarks" / "vnncomp" / "2021" / "test"
    for onnx, vnnlib, timeout in read_instances(find_instances_csv(folder)):
        a = run_instance(onnx, vnnlib, timeout, device="cpu")
        b = run_instance(onnx, vnnlib, timeout, device=DEVICE)
        assert b.result == a.result, (onnx, vnnlib, a.result, b.result, b.detail)


@pytest.mark.parametrize("method", ["noise", "pgd", "ibp", "crown-ibp", "smoothadv"])
def test_training_on_device_follows_the_cpu_run(method):
    """The same seeded run on both devices: the batch order and noise come from one CPU
    generator, so the losses agree up to the devices' sums."""
    from verify.data import digits as load
    from verify.train import TrainConfig, build_mlp, train_model

    x, y = load("train", limit=256)
    cfg = TrainConfig(method=method, epochs=2, batch_size=64, eps=0.05 if method != "noise" else 0.0, sigma=0.25 if method in ("noise", "smoothadv") else 0.0,
                      attack_steps=3, warmup_epochs=0, ramp_epochs=1)
    hists = []
    for dev in ("cpu", DEVICE):
        net = build_mlp((64,), 10, (32, 32), seed=0)
        hists.append(train_model(net, x, y, cfg, device=dev))
        assert next(net.parameters()).device.type == torch.device(dev).type
    for a, b in zip(hists[0]["loss"], hists[1]["loss"]):
        assert math.isclose(a, b, rel_tol=1e-3), (method, hists[0]["loss"], hists[1]["loss"])


def test_cli_train_on_device(tmp_path, capsys):
    from verify.cli import main

    out = tmp_path / "m.pt"
    assert main(["train", "--method", "noise", "--sigma", "0.25", "--epochs", "1", "--limit", "200", "--device", DEVICE,
                 "--out", str(out), "-q"]) == 0
    net = torch.load(out, weights_only=False)
    assert next(net.parameters()).device.type == "cpu"
