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


def test_skip_connection_around_activation_is_rejected():
    with pytest.raises(NotFeedForwardError):
        to_feedforward(torch.fx.symbolic_trace(Residual()), (6,))


def test_maxpool_is_rejected_with_node_name():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(NotFeedForwardError, match="max-pool.*'"):
        to_feedforward(torch.fx.symbolic_trace(net), (1, 6, 6))


def test_skip_connection_is_refused_before_any_run_is_evaluated(monkeypatch):
    """The chain check reads the graph's structure alone: a ResNet is refused before its affine
    runs are evaluated on basis vectors (1.2 s on cifar10_resnet's resnet_4b), also when the skip
    connection lies deep in the network."""
    import relax.ir.dense as dense

    def evaluated(*a, **k):
        raise AssertionError("a run was evaluated before the skip connection was found")

    monkeypatch.setattr(dense, "_dense_run", evaluated)

    class DeepSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            g = torch.relu(self.b(h))
            return self.o(torch.relu(self.c(g) + h))  # the skip around the second activation

    for net, shape in ((Residual(), (6,)), (DeepSkip(), (6,))):
        with pytest.raises(NotFeedForwardError, match="skip connection|before the last activation"):
            to_feedforward(torch.fx.symbolic_trace(net), shape)
