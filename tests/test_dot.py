"""rowwise_dot / batch_first_dot (the concretisation's dot products) against einsum."""
import pytest
import torch

from relax.bounds import dot


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 4, 13), (30, 3, 5)])
def test_rowwise_dot_matches_einsum(monkeypatch, chunk, shape):
    monkeypatch.setattr(dot, "CHUNK_ELEMENTS", chunk)  # 1 and 7: one row per chunk, several rows per chunk
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(shape[1], shape[2], dtype=torch.float64, generator=g)
    got = dot.rowwise_dot(A, v)
    want = torch.einsum("sbn,bn->sb", A, v)
    assert got.shape == want.shape == shape[:2]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(shape[:2], dtype=torch.float64, generator=g)
    (ga,) = torch.autograd.grad((got * w).sum(), A)
    assert torch.allclose(ga, w.unsqueeze(-1) * v, rtol=1e-12, atol=1e-12)
    assert torch.allclose(dot.rowwise_dot(A, v[:1]), torch.einsum("sbn,n->sb", A, v[0]), rtol=1e-12, atol=1e-12)


def test_batch_first_dot_matches_einsum(monkeypatch):
    monkeypatch.setattr(dot, "CHUNK_ELEMENTS", 10)
    g = torch.Generator().manual_seed(1)
    C, v = torch.randn(5, 6, 7, dtype=torch.float64, generator=g), torch.randn(5, 7, dtype=torch.float64, generator=g)
    assert torch.allclose(dot.batch_first_dot(C, v), torch.einsum("bnk,bk->bn", C, v), rtol=1e-12, atol=1e-12)
