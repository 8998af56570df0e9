"""``certify train`` and :mod:`verify.train`: the training bounds are sound and agree with the
suite's engine, every method improves what it targets over standard training on a few digits,
runs repeat exactly, the demo's models come out of the same path, the CLI round trip works and
bad options give one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from relax.bounds import bounds, prepare
from relax.bounds.interval import interval_bounds
from relax.bounds.crown import crown
from verify import certify
from verify.attack import pgd_attack
from verify.cli import main
from verify.data import digits
from verify.digits_model import digits_mlp, load_digits_mlp, train_digits_mlp
from verify.spec import LpBall, Robust
from verify.train import TrainConfig, TrainConfigError, build_mlp, pgd_train_attack, schedule, train_model
from verify.train_bounds import NotAnMLPError, crown_ibp_margins, hidden_boxes, ibp_margins, margin_rows, mlp_layers

# ----------------------------------------------------------------------------- training bounds


def _random_case(seed: int, hidden=(16, 12), batch: int = 6):
    net = build_mlp((1, 8, 8), 10, hidden, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 1, 8, 8), generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)
    return net, x, y


def _samples(x: torch.Tensor, eps: float, norm: float, n: int, seed: int) -> torch.Tensor:
    """``[n, B, *shape]`` points of the ball around ``x`` inside [0, 1] (l_inf: corners and uniform)."""
    g = torch.Generator().manual_seed(seed)
    if math.isinf(norm):
        u = torch.rand((n, *x.shape), generator=g, dtype=x.dtype) * 2 - 1
        u[: n // 2] = u[: n // 2].sign()
        d = eps * u
    else:
        d = torch.randn((n, *x.shape), generator=g, dtype=x.dtype)
        d = d / d.flatten(2).norm(dim=2).view(n, -1, 1, 1, 1) * eps
    return (x + d).clamp(0, 1)  # clipping moves every coordinate towards x: still in the ball


@pytest.mark.parametrize("norm,eps", [(math.inf, 0.02), (math.inf, 0.1), (2.0, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_bounds_contain_sampled_margins(norm, eps, seed):
    net, x, y = _random_case(seed)
    pts = _samples(x, eps, norm, 400, seed)
    with torch.no_grad():
        z = net(pts.flatten(0, 1)).view(400, x.shape[0], 10)
        margins = z.gather(2, y.view(1, -1, 1).expand(400, -1, 1)) - z  # [n, B, K]
        for fn in (ibp_margins, crown_ibp_margins):
            low = fn(net, x, y, eps, norm)
            assert low.shape == (x.shape[0], 10)
            assert torch.all(low.gather(1, y.view(-1, 1)) == 0)
            assert torch.all(margins.min(0).values >= low - 1e-12), fn.__name__
        z0 = net(x)
        clean = z0.gather(1, y.view(-1, 1)) - z0
        for fn in (ibp_margins, crown_ibp_margins):  # eps 0: the exact margins
            assert (fn(net, x, y, 0.0, norm) - clean).abs().max() < 1e-12


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),  # no hidden layer: both bounds are exact
    nn.Sequential(nn.Flatten(), nn.Linear(64, 8, bias=False), nn.ReLU(), nn.Linear(8, 10, bias=False)),
])
def test_training_bounds_of_other_chains(net):
    torch.manual_seed(0)
    net = net.double()
    _, x, y = _random_case(0)
    pts = _samples(x, 0.05, math.inf, 400, 0)
    with torch.no_grad():
        z = net(pts.flatten(0, 1)).view(400, x.shape[0], 10)
        margins = (z.gather(2, y.view(1, -1, 1).expand(400, -1, 1)) - z).min(0).values
        for fn in (ibp_margins, crown_ibp_margins):
            assert torch.all(margins >= fn(net, x, y, 0.05) - 1e-12)
    if len(net) == 2:  # a linear net: the corner minimising each margin is in the box
        assert torch.allclose(ibp_margins(net, x, y, 0.05), crown_ibp_margins(net, x, y, 0.05), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ibp_equals_the_suites_interval_bounds(seed):
    """In float64 the training IBP boxes of the pre-activations are the suite's sound IBP boxes
    up to its round-off allowance; the margins (last layer elided into them) are at least as
    tight as the suite's interval bound of ``C y``."""
    net, x, y = _random_case(seed, hidden=(20, 16, 12))
    ball = LpBall(x, 0.05, math.inf, 0.0, 1.0)
    graph, ball = prepare(net, ball, torch.float64)
    boxes = interval_bounds(graph, *ball.bounds())
    suite = [boxes[p] for p in graph.preactivations() if p != graph.input_name]
    mine = hidden_boxes(mlp_layers(net), x.flatten(1), 0.05)
    assert len(mine) == len(suite) == 3
    for (ml, mh), (sl, sh) in zip(mine, suite):
        assert torch.all(sl <= ml + 1e-12) and torch.all(mh <= sh + 1e-12)
        assert max((ml - sl).abs().max(), (mh - sh).abs().max()) < 1e-9
    C = margin_rows(y, 10, torch.float64)
    suite_margins, _ = bounds(net, LpBall(x, 0.05, math.inf, 0.0, 1.0), C, method="interval", dtype=torch.float64)
    assert torch.all(suite_margins <= ibp_margins(net, x, y, 0.05) + 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crown_ibp_equals_the_suites_crown_on_ibp_boxes(seed):
    """CROWN-IBP = the suite's CROWN pass given the IBP boxes of the pre-activations
    (``relax.bounds.crown.crown(intermediate=...)``), which returns max(linear bound, IBP bound)."""
    net, x, y = _random_case(seed, hidden=(20, 16, 12))
    ball = LpBall(x, 0.03, math.inf, 0.0, 1.0)
    graph, ball = prepare(net, ball, torch.float64)
    lo, hi = ball.bounds()
    boxes = interval_bounds(graph, lo, hi)
    inter = {p: boxes[p] for p in graph.preactivations() if p != graph.input_name}
    assert len(inter) == 3
    suite = crown(graph, ball, margin_rows(y, 10, torch.float64), intermediate=inter).lower
    mine = torch.maximum(crown_ibp_margins(net, x, y, 0.03), ibp_margins(net, x, y, 0.03)).detach()
    assert torch.all(suite <= mine + 1e-12)
    assert (mine - suite).abs().max() < 1e-9
    assert (crown_ibp_margins(net, x, y, 0.03) > ibp_margins(net, x, y, 0.03) + 1e-6).any()  # not just IBP


def test_bounds_are_differentiable_in_the_weights():
    net, x, y = _random_case(0)
    for fn in (ibp_margins, crown_ibp_margins):
        net.zero_grad()
        nn.functional.cross_entropy(-fn(net, x, y, 0.1), y).backward()
        for p in net.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_certified_training_needs_an_mlp_chain():
    assert len(mlp_layers(digits_mlp())) == 3
    for bad in (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU()),
                nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10)),
                nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))):
        with pytest.raises(NotAnMLPError, match="chain"):
            mlp_layers(bad)


# ----------------------------------------------------------------------------- schedule, attack, config


def test_schedule_warmup_then_linear_ramp():
    cfg = TrainConfig(method="crown-ibp", eps=0.2, epochs=10, warmup_epochs=2, ramp_epochs=4, kappa_end=0.5)
    assert schedule(cfg, 1.0) == (0.0, 1.0, 1.0)
    e, k, b = schedule(cfg, 4.0)
    assert e == pytest.approx(0.1) and k == pytest.approx(0.75) and b == pytest.approx(0.5)
    assert schedule(cfg, 6.0) == pytest.approx((0.2, 0.5, 0.0)) == schedule(cfg, 9.5)
    assert TrainConfig(method="pgd", eps=0.1, epochs=20).ramp() == (2.0, 10.0)


@pytest.mark.parametrize("norm", [math.inf, 2.0])
def test_pgd_train_attack_stays_in_the_ball_and_raises_the_loss(norm):
    net = build_mlp((1, 8, 8), 10, (32, 32), seed=0)
    x, y = digits("train", limit=256)
    train_model(net, x, y, TrainConfig(epochs=20, lr=1e-2))
    eps = 0.1 if math.isinf(norm) else 0.5
    xa = pgd_train_attack(net, x, y, eps, norm, 10, torch.Generator().manual_seed(0))
    dist = (xa - x).flatten(1).norm(p=norm, dim=1)
    assert torch.all(dist <= eps * (1 + 1e-5)) and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert nn.functional.cross_entropy(net(xa), y) > nn.functional.cross_entropy(net(x), y) + 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="sgd"), "unknown training method"),
    (dict(method="noise"), "needs sigma > 0"),
    (dict(method="pgd", eps=0.1, sigma=0.2), "sigma does not apply"),
    (dict(method="ibp"), "needs eps > 0"),
    (dict(method="standard", eps=0.1), "eps does not apply"),
    (dict(method="ibp", eps=0.1, norm=1.0), "l_inf or l_2"),
    (dict(method="smoothadv", sigma=0.25, eps=0.5, norm=math.inf), "l_2"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(method="crown-ibp", eps=0.1, kappa_end=1.5), "kappa_end"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs).check()


# ----------------------------------------------------------------------------- each method improves its target


@pytest.fixture(scope="module")
def data():
    return digits("train", limit=400), digits("test", limit=100)


def _trained(data, method: str, seed: int = 0, **kw) -> nn.Sequential:
    (x, y), _ = data
    net = build_mlp((1, 8, 8), 10, (32, 32), seed=seed)
    train_model(net, x, y, TrainConfig(method=method, epochs=15, lr=1e-2, seed=seed, **kw))
    return net


@pytest.fixture(scope="module")
def standard(data):
    return _trained(data, "standard")


def _certified(net, data, method: str, eps: float, norm: float = math.inf) -> float:
    _, (xt, yt) = data
    return certify(net, xt, yt, method=method, eps=eps, norm=norm).certified_accuracy([eps])[0]


def test_ibp_training_raises_interval_certified_accuracy(data, standard):
    ibp = _trained(data, "ibp", eps=0.05)
    assert _certified(ibp, data, "interval", 0.05) > _certified(standard, data, "interval", 0.05) + 0.1


@pytest.mark.parametrize("norm,eps", [(math.inf, 0.1), (2.0, 0.5)])
def test_crown_ibp_training_raises_crown_certified_accuracy(data, standard, norm, eps):
    net = _trained(data, "crown-ibp", eps=eps, norm=norm)
    assert _certified(net, data, "crown", eps, norm) > _certified(standard, data, "crown", eps, norm) + 0.15


def _pgd_accuracy(net, data, eps: float) -> float:
    _, (xt, yt) = data
    spec = Robust(yt).linear(len(yt), 10)
    res = pgd_attack(net, LpBall(xt, eps, math.inf, 0.0, 1.0), spec, steps=20, restarts=1, seed=0)
    return 1.0 - res.found.float().mean().item()


def test_pgd_training_raises_pgd_accuracy(data, standard):
    net = _trained(data, "pgd", eps=0.1)
    assert _pgd_accuracy(net, data, 0.1) > _pgd_accuracy(standard, data, 0.1) + 0.2


def _noisy_accuracy(net, x, y, sigma: float, draws: int = 8) -> float:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        noisy = x.unsqueeze(0) + sigma * torch.randn((draws, *x.shape), generator=g)
        return (net(noisy.flatten(0, 1)).argmax(1) == y.repeat(draws)).float().mean().item()


def test_noise_training_raises_accuracy_under_noise(data, standard):
    _, (xt, yt) = data
    net = _trained(data, "noise", sigma=0.5)
    assert _noisy_accuracy(net, xt, yt, 0.5) > _noisy_accuracy(standard, xt, yt, 0.5) + 0.05


def test_smoothadv_raises_accuracy_under_smoothadv_attack(data, standard):
    """SmoothAdv targets the smoothed classifier under attack: the noisy votes at SmoothAdv
    points (l_2 radius 0.5) are right more often than for standard or plain noise training."""
    from smoothing.training import smoothadv_attack

    _, (xt, yt) = data
    noise = _trained(data, "noise", sigma=0.5)
    sadv = _trained(data, "smoothadv", sigma=0.5, eps=0.5, attack_steps=2, noise_samples=2)

    def attacked(net):
        delta = 0.5 * torch.randn((8, *xt.shape), generator=torch.Generator().manual_seed(7))
        return _noisy_accuracy(net, smoothadv_attack(net, xt, yt, delta, 0.5, 5), yt, 0.5, draws=32)

    a = attacked(sadv)
    assert a > attacked(standard) + 0.1
    assert a > attacked(noise)


# ----------------------------------------------------------------------------- determinism, the demo's models


def test_training_is_deterministic_given_the_seed(data):
    a = _trained(data, "crown-ibp", seed=3, eps=0.05)
    b = _trained(data, "crown-ibp", seed=3, eps=0.05)
    c = _trained(data, "crown-ibp", seed=4, eps=0.05)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_digits_trainer_is_the_cli_trainer(tmp_path):
    """``verify.digits_model`` trains through :func:`verify.train.train_model`: the CLI with the
    same settings gives bit-identical weights."""
    out = tmp_path / "m.pt"
    assert main(["train", "--method", "noise", "--sigma", "0.25", "--seed", "3", "--epochs", "3", "--out", str(out), "-q"]) == 0
    cli = torch.load(out, weights_only=False)
    ref = train_digits_mlp(seed=3, epochs=3, sigma=0.25)
    for k, v in ref.state_dict().items():
        assert torch.equal(cli.state_dict()[k], v), k


@pytest.mark.parametrize("kind,args", [("plain", ["--method", "standard"]), ("noise", ["--method", "noise", "--sigma", "0.25"])])
def test_cli_reproduces_the_shipped_models(tmp_path, kind, args):
    """``certify train`` with the demo's settings gives the shipped ``digits-mlp`` /
    ``digits-mlp-noise``: the same predictions on all 1,797 digits, weights equal up to the
    round-off of another torch build / BLAS (the shipped files differ by ~1e-5 when retrained
    on the development machine)."""
    out = tmp_path / f"{kind}.pt"
    assert main(["train", "--data", "digits", "--arch", "mlp", *args, "--seed", "0", "--out", str(out), "-q"]) == 0
    cli, ref = torch.load(out, weights_only=False), load_digits_mlp(kind)
    for k, v in ref.state_dict().items():
        assert (cli.state_dict()[k] - v).abs().max() < 1e-3, k
    x, _ = digits("all")
    with torch.no_grad():
        assert torch.equal(cli(x).argmax(1), ref(x).argmax(1))


# ----------------------------------------------------------------------------- CLI


def test_cli_train_run_compare_round_trip(tmp_path, capsys):
    out = tmp_path / "sub" / "ibp.pt"
    assert main(["train", "--method", "ibp", "--eps", "0.05", "--epochs", "3", "--limit", "300", "--lr", "0.01",
                 "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "trained ibp mlp 64-32-32-10 on 300 inputs of digits:train" in text and f"wrote {out}" in text
    assert main(["run", "--model", str(out), "--data", "digits", "--eps", "0.05", "--method", "interval", "--limit", "5",
                 "--out", str(tmp_path / "r.csv"), "-q"]) == 0
    assert "interval" in capsys.readouterr().out
    assert main(["compare", "--model", str(out), "--data", "digits", "--methods", "interval,crown", "--radii", "0,0.05",
                 "--limit", "4", "--out", str(tmp_path / "cmp"), "--no-attack", "-q"]) in (0, 1)
    assert (tmp_path / "cmp" / "compare_results.csv").is_file()


@pytest.mark.parametrize("argv,match", [
    (["--method", "adam"], "unknown training method 'adam'"),
    (["--method", "noise"], "needs sigma > 0"),
    (["--method", "noise", "--sigma", "-1"], "--sigma must be a finite number > 0"),
    (["--method", "pgd", "--eps", "0.1", "--sigma", "0.3"], "sigma does not apply to method pgd"),
    (["--method", "ibp", "--eps", "0.1", "--norm", "1"], "l_inf or l_2"),
    (["--method", "ibp", "--eps", "0.1", "--norm", "7"], "norm"),
    (["--method", "standard", "--epochs", "0"], "epochs must be an integer >= 1"),
    (["--method", "standard", "--arch", "resnet"], "unknown --arch 'resnet'"),
    (["--method", "standard", "--hidden", "32,x"], "--hidden"),
    (["--method", "standard", "--out", "model.onnx"], "--out must end in .pt"),
    (["--method", "standard", "--data", "nowhere.npz"], "no such file"),
    (["--method", "standard", "--epochs", "two"], "invalid int value"),
])
def test_cli_train_errors_are_one_line(argv, match, capsys, tmp_path):
    assert main(["train", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "m.pt")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("certify: error:") and "\n" not in err and match in err
    assert not (tmp_path / "m.pt").exists()
