"""A few entries of a node on the input entries they depend on (``relax/ir/restrict.py``): the
restricted graph computes exactly those entries (convolutions of every stride / padding /
dilation / grouping, 1-d and 2-d, at the border and inside; residual sums, per-channel affine maps,
transposes, selections and steps on the way), its CROWN bounds on the projected box contain the
full network's values, and ops without a rule give None."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from relax.bounds import bounds
from relax.ir.graph import BoundGraphModule, build_graph
from relax.ir.restrict import cast, restrict
from verify.spec import Box

D = torch.float64


class SegHead(nn.Module):
    """``[B, 2, 7, 9]`` -> per-pixel logit margins ``[B, 63]`` through strided, dilated, grouped
    and padded convolutions, a residual sum, a per-channel affine map, a transpose and a step."""

    def __init__(self, stride: int, dilation: int, groups: int):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=dilation, dilation=dilation)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(4, 2, 1, stride=stride)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("at_zero", torch.tensor(0.0))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + h) * self.scale + 0.1
        z = self.c3(h).permute(0, 2, 3, 1)  # [B, H, W, 2]
        m = z[..., 1] - z[..., 0]
        return (m + torch.heaviside(m, self.at_zero)).flatten(1)


class Signal(nn.Module):
    """1-d: ``[B, 3, 12]`` -> ``[B, 2 * 6]`` (stride 2, no padding on one side after a Linear-free chain)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, padding=1)
        self.c2 = nn.Conv1d(5, 2, 2, stride=2)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x))).flatten(1)


def _check(net: nn.Module, in_shape: tuple[int, ...], entries: list[int]) -> None:
    torch.manual_seed(1)
    g = build_graph(torch.fx.symbolic_trace(net), in_shape, D)
    x = torch.rand(64, *in_shape, dtype=D)
    full = g.forward(x)
    sizes = []
    for j in entries:
        r = restrict(g, g.output, torch.tensor([j]))
        assert r is not None
        y = r.graph.forward(x.reshape(64, -1)[:, r.input_index])
        assert torch.allclose(y.reshape(-1), full[:, j], rtol=0, atol=1e-12), j
        y32 = cast(r.graph, torch.float32).forward(x.reshape(64, -1)[:, r.input_index].float())
        assert y32.dtype == torch.float32 and torch.allclose(y32.double().reshape(-1), full[:, j], rtol=0, atol=1e-4)
        sizes.append(r.input_index.numel())
        # CROWN on the projection of a box contains the full network's values there
        lo = torch.rand(1, *in_shape, dtype=D)
        hi = lo + 0.2
        sub_lo, sub_hi = bounds(BoundGraphModule({D: r.graph}), Box(lo.reshape(1, -1)[:, r.input_index], hi.reshape(1, -1)[:, r.input_index]), method="crown")
        pts = lo + (hi - lo) * torch.rand(2000, *in_shape, dtype=D)
        vals = g.forward(pts)[:, j]
        assert (vals >= sub_lo.reshape(-1) - 1e-9).all() and (vals <= sub_hi.reshape(-1) + 1e-9).all()
    assert min(sizes) < x[0].numel()  # a corner entry depends on part of the input


@pytest.mark.parametrize("stride,dilation,groups,tap_sums", [(1, 1, 1, False), (2, 2, 2, False), (1, 2, 4, False), (1, 2, 4, True)])
def test_restricted_conv_head_computes_the_entry(monkeypatch, stride, dilation, groups, tap_sums):
    import relax.ir.restrict as restrict_module

    if tap_sums:  # the depthwise convolution (9 taps, 5 of them on the padding at a corner) as a sum of its taps
        monkeypatch.setattr(restrict_module, "TAP_SUM_MIN_DENSE", 0)
    torch.manual_seed(0)
    net = SegHead(stride, dilation, groups).double()
    n_out = net(torch.rand(1, 2, 7, 9, dtype=D)).shape[1]
    _check(net, (2, 7, 9), [0, 1, n_out // 2, n_out - 1])


def test_restricted_1d_conv_and_several_entries_in_the_order_asked():
    torch.manual_seed(0)
    net = Signal().double()
    _check(net, (3, 12), [0, 5, 11])
    g = build_graph(torch.fx.symbolic_trace(net), (3, 12), D)
    r = restrict(g, g.output, torch.tensor([7, 2, 9]))
    x = torch.rand(5, 3, 12, dtype=D)
    assert torch.allclose(r.graph.forward(x.reshape(5, -1)[:, r.input_index]), g.forward(x)[:, [7, 2, 9]], atol=1e-12, rtol=0)


class PadBranch(nn.Module):
    """``[B, 1, 6, 6]``: an unpadded convolution padded back to 6 x 6 (its border constants), a 1 x 1
    convolution, beside a padded convolution of the input; a corner reads only constants in the
    first branch."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 2, 1), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return (self.c(nn.functional.pad(torch.relu(self.a(x)), (1, 1, 1, 1))) + self.b(x)).flatten(1)


def test_restricted_padding_border_and_interior():
    torch.manual_seed(0)
    _check(PadBranch().double(), (1, 6, 6), [0, 7, 14, 71])


def test_an_op_without_a_rule_gives_none():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()).double()
    g = build_graph(torch.fx.symbolic_trace(net), (1, 8, 8), D)
    assert restrict(g, g.output, torch.tensor([0])) is None


class MiniUNet(nn.Module):
    """``[B, 2, 8, 10]`` -> per-pixel margins ``[B, 80]``: a convolution, 2 x 2 average pooling, a
    convolution, a transposed convolution back to 8 x 10 (``kernel, stride, padding,
    output_padding, dilation, groups``), its concatenation with the first layer, a 3 x 3 head."""

    def __init__(self, k: int, s: int, p: int, op: int, d: int, groups: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, k, stride=s, padding=p, output_padding=op, dilation=d, groups=groups)
        self.head = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        u = self.up(torch.relu(self.c2(nn.functional.avg_pool2d(h, 2))))
        z = self.head(torch.relu(torch.cat([h, u], 1)))
        return (z[:, 1] - z[:, 0]).flatten(1)


@pytest.mark.parametrize("tap_sums", [False, True])
@pytest.mark.parametrize("k,s,p,op,d,groups", [(2, 2, 0, 0, 1, 1), (3, 2, 1, 1, 1, 2), (2, 2, 1, 1, 2, 2)])
def test_restricted_transposed_convolution_and_pooling_as_tap_sums(monkeypatch, tap_sums, k, s, p, op, d, groups):
    import relax.ir.restrict as restrict_module

    if tap_sums:  # the pooling (4 taps) as a sum of its taps instead of a dense matrix
        monkeypatch.setattr(restrict_module, "TAP_SUM_MIN_DENSE", 0)
    torch.manual_seed(0)
    net = MiniUNet(k, s, p, op, d, groups).double()
    _check(net, (2, 8, 10), [0, 9, 34, 45, 79])
    g = build_graph(torch.fx.symbolic_trace(net), (2, 8, 10), D)
    r = restrict(g, g.output, torch.tensor([45]))
    assert any("__tap" in n.name for n in r.graph.nodes) == tap_sums


def test_the_dense_view_of_a_restricted_model_is_refused_not_raised(monkeypatch):
    """``bab``'s MILP refinement of deep ReLU nets asks for a dense view of the model; a restricted
    graph's model (selections whose batch sizes fx cannot trace) has none: None, not an error
    (carvana's upsampling UNet, four ReLU layers per pixel, ended its instance with a TraceError)."""
    import relax.ir.restrict as restrict_module
    from relax.bab.activation_split import relu_inputs
    from relax.bab.tighten import _dense_view

    monkeypatch.setattr(restrict_module, "TAP_SUM_MIN_DENSE", 0)
    torch.manual_seed(0)
    g = build_graph(torch.fx.symbolic_trace(MiniUNet(2, 2, 0, 0, 1, 1).double()), (2, 8, 10), D)
    r = restrict(g, g.output, torch.tensor([45]))
    assert any(type(n.op).__name__ == "Select" for n in r.graph.nodes)
    assert _dense_view(r.graph, BoundGraphModule({D: r.graph}), relu_inputs(r.graph), 10**8) is None


class Collide(nn.Module):
    """A pooling beside a convolution named as the pooling's first tap would be (``pool__tap0``)."""

    def __init__(self):
        super().__init__()
        self.pool, self.pool__tap0 = nn.AvgPool2d(2), nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return (torch.relu(self.pool(x)) + torch.relu(self.pool__tap0(x)[:, :, :3, :3])).flatten(1)


def test_a_made_up_name_the_network_already_uses_gives_none(monkeypatch):
    import relax.ir.restrict as restrict_module

    monkeypatch.setattr(restrict_module, "TAP_SUM_MIN_DENSE", 0)
    g = build_graph(torch.fx.symbolic_trace(Collide().double()), (1, 6, 6), D)
    assert "pool__tap0" in g.by_name
    assert restrict(g, g.output, torch.tensor([4])) is None
    monkeypatch.setattr(restrict_module, "TAP_SUM_MIN_DENSE", 2**20)  # as a dense matrix: no made-up name
    assert restrict(g, g.output, torch.tensor([4])) is not None


@pytest.mark.parametrize("k,s,p,op,d,groups", [(3, 3, 0, 0, 1, 1), (3, 2, 0, 1, 1, 3), (2, 3, 1, 2, 2, 1), (3, 2, 2, 1, 2, 3)])
def test_restricted_transposed_convolution_alone(k, s, p, op, d, groups):
    """Strides 2 and 3, padding, output padding, dilation and groups of one transposed convolution."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(3, 6, k, stride=s, padding=p, output_padding=op, dilation=d, groups=groups), nn.Flatten()).double()
    with torch.no_grad():
        y = net(torch.rand(2, 3, 3, 4, dtype=D))
    varying = (y[0] != y[1]).nonzero().flatten().tolist()  # an entry no tap reaches is its bias alone
    _check(net, (3, 3, 4), [varying[0], varying[1], varying[len(varying) // 3], varying[len(varying) // 2], varying[-1]])
    g = build_graph(torch.fx.symbolic_trace(net), (3, 3, 4), D)
    for j in sorted(set(range(y.shape[1])) - set(varying))[:3]:
        assert restrict(g, g.output, torch.tensor([j])) is None  # depends on no input entry
