"""A final log-softmax under rows it cannot change (relax.ir.heads): the graph keeps its scores
as output exactly when every row sums to 0 over each softmax group, and ``bab`` on a ReLU net with
such a head answers as on the same net without it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from relax.ir.graph import build_graph
from relax.ir.heads import without_log_softmax
from relax.ir.ops import LogSoftmaxRows
from verify import certify
from verify.data import digits
from verify.digits_model import load_digits_mlp

D = torch.float64


class _Head(nn.Module):
    """``log_softmax`` over ``dim`` of the ``[B, 5, 2]``-shaped output of ``net``, flattened."""

    def __init__(self, net: nn.Module, dim: int) -> None:
        super().__init__()
        self.net, self.dim = net, dim

    def forward(self, x):
        return torch.log_softmax(self.net(x).view(-1, 5, 2), dim=self.dim).flatten(1)


def _graph(dim: int):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10))
    return build_graph(torch.fx.symbolic_trace(_Head(body, dim).double()), (6,), D)


def _row(entries: dict[int, float]) -> torch.Tensor:
    c = torch.zeros(1, 1, 10, dtype=D)
    for k, v in entries.items():
        c[0, 0, k] = v
    return c


@pytest.mark.parametrize("dim", [1, 2])
def test_head_dropped_only_for_rows_that_sum_to_zero_in_every_group(dim):
    g = _graph(dim)
    assert any(isinstance(n.op, LogSoftmaxRows) for n in g.nodes)
    # flat entry 2 k + j is (k, j) of [5, 2]: dim 2 groups {2k, 2k + 1}, dim 1 groups {j, j + 2, ..}
    same_group = {0: 1.0, 1: -1.0} if dim == 2 else {0: 1.0, 2: -1.0}
    across = {0: 1.0, 3: -1.0} if dim == 2 else {0: 1.0, 1: -1.0}  # sums to 0, but not in each group
    kept = without_log_softmax(g, _row(same_group))
    assert not any(isinstance(n.op, LogSoftmaxRows) for n in kept.nodes) and len(kept.nodes) < len(g.nodes)
    x = torch.rand(7, 6, dtype=D)
    c = _row(same_group)[0, 0]
    assert torch.allclose(kept.forward(x) @ c, g.forward(x) @ c, rtol=0, atol=1e-12)
    for entries in (across, {4: 1.0}, {0: 1.0, 1: -0.5}):
        assert without_log_softmax(g, _row(entries)) is g
    if dim == 1:  # 2^60 + 1 - 2^60 rounds to 0 in a float sum; its exact sum is 1
        assert without_log_softmax(g, _row({0: 2.0**60, 2: 1.0, 4: -(2.0**60)})) is g


def test_head_kept_when_entries_are_selected_after_it():
    """A slice after the head (entries dropped, padding possible in general): no trimming."""
    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return torch.log_softmax(self.lin(x), dim=1)[:, 1:4]

    g = build_graph(torch.fx.symbolic_trace(Sliced().double()), (6,), D)
    c = torch.zeros(1, 1, 3, dtype=D)
    c[0, 0, 0], c[0, 0, 1] = 1.0, -1.0
    assert without_log_softmax(g, c) is g


def test_bab_answers_on_a_log_softmax_head_as_on_the_logits():
    x, y = digits("test", limit=12)
    plain = load_digits_mlp().eval()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = plain

        def forward(self, z):
            return torch.log_softmax(self.net(z), dim=1)

    for eps in (0.04, 0.06):
        a = certify(plain, x, y, "bab", eps=eps, timeout=30)
        b = certify(Head().eval(), x, y, "bab", eps=eps, timeout=30)
        assert [c.status for c in a] == [c.status for c in b]
        assert {c.status for c in a} >= {"certified", "falsified"} or eps == 0.04
        for c in b:
            if c.status == "falsified":  # a plain forward pass of the head net confirms it
                xc = torch.as_tensor(c.counterexample, dtype=torch.float32).reshape(1, 1, 8, 8)
                assert int(Head()(xc).argmax()) != int(y[c.index])
