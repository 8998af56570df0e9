"""The dense feed-forward form equals the graph it came from."""
import pytest
import torch
from torch import nn

from relax.ir.dense import NotFeedForwardError, to_feedforward


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + x  # skip around the activation


def _nets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 3, stride=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4, 2),
    )
    bn = cnn[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return [(mlp, (3, 4)), (cnn.eval(), (1, 6, 6))]


@pytest.mark.parametrize("i", [0, 1])
def test_dense_form_matches_graph(i):
    net, shape = _nets()[i]
    ff = to_feedforward(torch.fx.symbolic_trace(net), shape)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        ref = net.double()(x.double())
    assert torch.allclose(ff.forward(x.double()), ref, atol=1e-10)
    assert len(ff.activations) == len(ff.layers) - 1


class _DeepSkip(nn.Module):
    """Skips around the second and third activations and from the input to the output."""

    def __init__(self, act=torch.relu):
        super().__init__()
        self.act = act
        self.a, self.b, self.c, self.o = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.a(x))
        g = self.act(self.b(h))
        return self.o(self.act(self.c(g) + h)) + x[:, :2]


@pytest.mark.parametrize("make", [Residual, _DeepSkip])
def test_skip_connections_around_relus_pass_through_exactly(make):
    """A value used after a later ReLU layer is carried across it (a nonnegative ReLU output as
    itself, the input as ``relu(x) - relu(-x)``): the dense form equals the network, its blocks
    tile every hidden layer and name the nodes they hold."""
    torch.manual_seed(1)
    net = make().double()
    ff = to_feedforward(torch.fx.symbolic_trace(net), (6,))
    x = torch.randn(64, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        assert torch.allclose(ff.forward(x), net(x), atol=1e-12)
    assert len(ff.blocks) == len(ff.activations) == len(ff.layers) - 1
    for layer, blocks in zip(ff.layers, ff.blocks):
        assert sorted((b.start, b.start + b.size) for b in blocks)[0][0] == 0
        assert sum(b.size for b in blocks) == layer.n_out
    carried = [b for bl in ff.blocks for b in bl if b.carry]
    assert any(b.sign < 0 for b in carried), "the signed input passes as a pair"
    if make is _DeepSkip:
        assert any(b.carry and b.act == "relu" and b.sign > 0 and not b.rectified for b in ff.blocks[1]), "h passes as itself"


def test_skip_connection_around_a_sigmoid_is_refused_before_any_map_is_built(monkeypatch):
    """Only a ReLU passes a value through exactly: a skip around a sigmoid or tanh is refused
    from the graph's structure alone, before any layer is evaluated on basis vectors (1.2 s on
    cifar10_resnet's resnet_4b)."""
    import relax.ir.dense as dense

    def evaluated(*a, **k):
        raise AssertionError("a layer was evaluated before the skip connection was found")

    monkeypatch.setattr(dense, "_dense_map", evaluated)
    for act in (torch.sigmoid, torch.tanh):
        with pytest.raises(NotFeedForwardError, match="skip connection around it"):
            to_feedforward(torch.fx.symbolic_trace(_DeepSkip(act)), (6,))


def test_maxpool_is_rejected_with_node_name():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(NotFeedForwardError, match="max-pool.*'"):
        to_feedforward(torch.fx.symbolic_trace(net), (1, 6, 6))


def test_a_view_over_the_size_limit_is_refused_before_any_layer_is_built(monkeypatch):
    """A layer over ``max_numbers`` (TinyYOLO's view would take 6.1 G numbers) is refused with the
    size, from the shapes alone."""
    import relax.ir.dense as dense

    monkeypatch.setattr(dense, "_dense_map", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a layer was built")))
    with pytest.raises(NotFeedForwardError, match=r"needs [0-9,]+ numbers .*limit 1,000"):
        to_feedforward(torch.fx.symbolic_trace(_nets()[1][0]), (1, 6, 6), max_numbers=1000)
