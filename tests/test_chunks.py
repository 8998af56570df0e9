"""A CROWN pass cut into chunks (rows of intermediate bounds; spec rows and batch elements) gives
the bounds of the pass in one piece: chunking only reorders the same per-row computations.

On the CPU the engine cuts every pass that records no gradients into chunks of at most
``CACHE_ELEMENTS`` coefficients (``max_elements`` alone cuts the others); here the limits are set
tiny so that every chunking path runs (several row chunks, several batch slices of one row, relaxations / round-off weights / input sets / slopes / Lagrangian terms
sliced along the batch), and the results are compared with the unchunked pass: bounds,
intermediate boxes, recorded coefficients and gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import relax.bounds.crown as crown_mod
from relax.bounds import prepare
from relax.bounds.crown import crown
from verify.spec import Box, LpBall

DT = torch.float64


def _cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 4)).double().eval()


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Flatten(), nn.Linear(49, 12), nn.ReLU(), nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 4)).double().eval()


def _pass(model, x_set, C, monkeypatch, cache: int, **kw):
    monkeypatch.setattr(crown_mod, "CACHE_ELEMENTS", cache)
    graph, x_set = prepare(model, x_set)
    return crown(graph, x_set, C, **kw)


@pytest.mark.parametrize("make", [_cnn, _mlp])
@pytest.mark.parametrize("ball", [False, True])
@pytest.mark.parametrize("cache", [40, 900])
def test_chunked_pass_equals_whole(make, ball, cache, monkeypatch):
    model = make()
    B = 5
    x = torch.rand(B, 1, 7, 7, dtype=DT)
    x_set = LpBall(x, 0.3, 2, 0.0, 1.0) if ball else Box(x - 0.1, x + 0.1)
    C = torch.randn(B, 3, 4, dtype=DT)
    whole = _pass(model, x_set, C, monkeypatch, 2**40)
    cut = _pass(model, x_set, C, monkeypatch, cache)  # one row / element per chunk, or a few
    torch.testing.assert_close(cut.spec_lower(), whole.spec_lower(), rtol=1e-12, atol=1e-12)
    assert whole.intermediate.keys() == cut.intermediate.keys()
    for k, (l, h) in whole.intermediate.items():
        torch.testing.assert_close(cut.intermediate[k][0], l, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cut.intermediate[k][1], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cache", [30, 900])  # one row and one batch element per chunk; all rows of 2 elements
def test_chunked_spec_rows_with_slopes_terms_and_record(cache, monkeypatch):
    """The spec rows' pass as beta-CROWN runs it (boxes fixed, per-row slopes, Lagrangian terms,
    recorded coefficients): the same values and the same gradients when sliced along the batch."""
    model = _cnn()
    B, N = 6, 3
    x = torch.rand(B, 1, 7, 7, dtype=DT)
    x_set = Box(x - 0.05, x + 0.05)
    C = torch.randn(B, N, 4, dtype=DT)
    graph, x_set = prepare(model, x_set)
    boxes = crown(graph, x_set, None).intermediate
    acts = [n.name for n in graph.activations()]
    relu_in = {a: graph.by_name[a].inputs[0] for a in acts}
    g = torch.Generator().manual_seed(0)
    alpha0 = {a: torch.rand(N, B, *graph.shape(a), generator=g, dtype=DT) for a in acts}
    extra0 = {relu_in[a]: torch.randn(N, B, *graph.shape(relu_in[a]), generator=g, dtype=DT) * 0.1 for a in acts}

    def run(cache: int):  # a pass that records gradients is cut by max_elements alone
        alphas = {a: v.clone().requires_grad_() for a, v in alpha0.items()}
        extra = {k: v.clone().requires_grad_() for k, v in extra0.items()}
        afn = lambda start, act, sl: None if start != "__out__" else alphas[act][sl]  # noqa: E731
        rec: dict = {graph.input_name: None, relu_in[acts[0]]: None}
        low = crown(graph, x_set, C, intermediate=boxes, alpha_fn=afn, out_extra=extra, out_record=rec,
                    max_elements=cache).spec_lower()
        low.sum().backward()
        return low.detach(), rec, {a: v.grad for a, v in alphas.items()}, {k: v.grad for k, v in extra.items()}

    low_w, rec_w, ga_w, ge_w = run(2**40)
    low_c, rec_c, ga_c, ge_c = run(cache)
    torch.testing.assert_close(low_c, low_w, rtol=1e-12, atol=1e-12)
    for k in rec_w:
        assert rec_w[k] is not None and rec_c[k] is not None
        torch.testing.assert_close(rec_c[k], rec_w[k], rtol=1e-12, atol=1e-12)
    for a in ga_w:
        torch.testing.assert_close(ga_c[a], ga_w[a], rtol=1e-12, atol=1e-12)
    for k in ge_w:
        torch.testing.assert_close(ge_c[k], ge_w[k], rtol=1e-12, atol=1e-12)
