"""Differentiable IBP and CROWN-IBP margin bounds for certified training of ReLU MLPs.

The suite's bound engine (:mod:`relax`) computes *sound* bounds of a fixed network: it copies
the weights out of the graph (``detach``), works in float64 and subtracts round-off. Training
needs the opposite: bounds that are functions of the weights, so that their loss can be
back-propagated. This module computes them for chains ``[Flatten] -> Linear -> ReLU -> ... ->
Linear`` in plain torch autograd, in the weights' dtype, with no round-off allowance (so they are
*training* bounds, not certificates: certify the trained network with ``interval`` / ``crown`` /
``alpha-crown``; ``tests/test_train.py`` pins these bounds to the suite's in float64 and checks
that they contain sampled outputs).

Specification: for label ``y`` the margins ``m_j = z_y - z_j`` (``C = e_y - e_j`` for every
class ``j``; the row ``j = y`` is zero), bounded from below through the last linear layer
elided into ``C`` (``C W_n``; Gowal et al. 2018, Sec. 3).

* :func:`ibp_margins` -- interval bound propagation (Gowal et al. 2018, "On the effectiveness of
  interval bound propagation for training verifiably robust models", Eq. (6)): with centre
  ``mu`` and radius ``r`` of a box, ``W x + b`` has centre ``W mu + b`` and radius ``|W| r``.
* :func:`crown_ibp_margins` -- CROWN-IBP (Zhang et al. 2020, "Towards stable and efficient
  training of verifiably robust neural networks", Sec. 3): the IBP boxes of the hidden
  pre-activations, then one CROWN backward pass (Zhang et al. 2018) from the margins: an unstable
  ReLU on ``[l, u]`` gets the upper line ``u (z - l) / (u - l)`` and the lower line ``a z`` with
  ``a = 1 if u > -l else 0``.

Input sets: an l_inf ball is intersected with the domain (a box); an l_2 ball is used as it is
(the domain is ignored: still a bound, looser). For the first layer of IBP and the concretisation
of CROWN-IBP, a row ``a`` over an l_2 ball ``||x - x0||_2 <= eps`` has range
``a x0 -/+ eps ||a||_2`` (the dual norm).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import CertifyError

__all__ = ["mlp_layers", "margin_rows", "hidden_boxes", "ibp_margins", "crown_ibp_margins", "NotAnMLPError"]


class NotAnMLPError(CertifyError):
    """The network is not a chain of Flatten / Linear / ReLU modules ending in a Linear."""


def mlp_layers(net: nn.Module) -> list[nn.Linear]:
    """The Linear layers of ``net``, an ``nn.Sequential`` ``[Flatten] Linear ReLU ... Linear``
    (a ReLU between every two Linear layers, none after the last one)."""
    mods = list(net) if isinstance(net, nn.Sequential) else [net]
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    linears = mods[0::2]
    relus = mods[1::2]
    if (not mods or len(mods) % 2 == 0 or not all(isinstance(m, nn.Linear) for m in linears)
            or not all(isinstance(m, nn.ReLU) for m in relus)):
        names = " -> ".join(type(m).__name__ for m in mods) or "(empty)"
        raise NotAnMLPError(f"certified training needs a chain [Flatten] Linear ReLU ... Linear, got {names}")
    return [m for m in linears if isinstance(m, nn.Linear)]  # all of them (checked above)


def margin_rows(y: Tensor, classes: int, dtype: torch.dtype | None = None) -> Tensor:
    """``C [B, K, K]`` with row ``j`` = ``e_y - e_j`` (row ``y`` is zero), for labels ``y [B]``."""
    eye = torch.eye(classes, dtype=dtype or torch.float32, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def _first_box(x: Tensor, eps: float, domain: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """Centre and radius ``[B, d]`` of the l_inf ball around ``x [B, d]`` clipped to the domain."""
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = lo.clamp(*domain), hi.clamp(*domain)
    return (hi + lo) / 2, (hi - lo) / 2


def _affine_box(W: Tensor, b: Tensor, mu: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Box of ``W x + b`` for ``x`` in the box (centre ``mu``, radius ``r``, ``[B, d]``):
    centre ``mu W^T + b``, radius ``r |W|^T`` (Gowal et al. 2018, Eq. (6)); ``[B, h]`` each."""
    return mu @ W.T + b, r @ W.abs().T


def _input_rows(A: Tensor, bias: Tensor, x: Tensor, eps: float, norm: float,
                domain: tuple[float, float] | None) -> Tensor:
    """Lower bound ``[B, S]`` of ``A x' + bias`` (``A [B, S, d]``, ``bias [B, S]``) over the input
    set around ``x [B, d]``: the clipped box for l_inf, the ball (dual norm) for l_2."""
    if math.isinf(norm):
        mu, r = _first_box(x, eps, domain)
        return torch.einsum("bsd,bd->bs", A, mu) - torch.einsum("bsd,bd->bs", A.abs(), r) + bias
    return torch.einsum("bsd,bd->bs", A, x) - eps * A.norm(dim=2) + bias


def _check_norm(norm: float) -> None:
    if not (math.isinf(norm) or norm == 2):
        raise CertifyError(f"training bounds support l_inf and l_2 balls, got norm {norm:g}")


def _bias(lin: nn.Linear) -> Tensor:
    """``lin.bias``, or zeros ``[out_features]`` for a layer without one."""
    return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)


def hidden_boxes(layers: list[nn.Linear], x: Tensor, eps: float, norm: float = math.inf,
                 domain: tuple[float, float] | None = (0.0, 1.0)) -> list[tuple[Tensor, Tensor]]:
    """IBP boxes ``(lo, hi)`` ``[B, h_i]`` of the pre-activations of every hidden layer
    (``layers[:-1]``), for inputs in the ball of radius ``eps`` around ``x [B, d]``."""
    _check_norm(norm)
    W, b = layers[0].weight, _bias(layers[0])
    if math.isinf(norm):
        c, r = _affine_box(W, b, *_first_box(x, eps, domain))
    else:
        c, r = x @ W.T + b, eps * W.norm(dim=1).expand(x.shape[0], -1)
    boxes = [(c - r, c + r)]
    for lin in layers[1:-1]:
        lo, hi = boxes[-1]
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        c, r = _affine_box(lin.weight, _bias(lin), (hi + lo) / 2, (hi - lo) / 2)
        boxes.append((c - r, c + r))
    return boxes


def ibp_margins(net: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float = math.inf,
                domain: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """IBP lower bounds ``[B, K]`` on the margins ``z_y - z_j`` over the ball of radius ``eps``
    (l_inf or l_2) around ``x [B, *shape]`` (labels ``y [B]``); entry ``y`` is 0. Differentiable
    in the weights (Gowal et al. 2018, Eq. (6), last layer elided into the margins)."""
    _check_norm(norm)
    layers = mlp_layers(net)
    x = x.flatten(1)
    last = layers[-1]
    C = margin_rows(y, last.out_features, x.dtype)
    W, b = C @ last.weight, C @ _bias(last)  # [B, K, h], [B, K]
    if len(layers) == 1:
        return _input_rows(W, b, x, eps, norm, domain)
    lo, hi = hidden_boxes(layers, x, eps, norm, domain)[-1]
    lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    mu, r = (hi + lo) / 2, (hi - lo) / 2
    return torch.einsum("bkh,bh->bk", W, mu) - torch.einsum("bkh,bh->bk", W.abs(), r) + b


def _relu_backward(A: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Lower-bound pass of ``A relu(z)`` (``A [B, S, h]``) for ``z`` in ``[lo, hi]`` ``[B, h]``
    (CROWN, Zhang et al. 2018, Sec. 3.2): returns ``A'`` with ``A relu(z) >= A' z + c`` and ``c [B, S]``."""
    unstable = (lo < 0) & (hi > 0)
    active = (lo >= 0).to(A.dtype)
    denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_w = torch.where(unstable, hi / denom, active)
    up_b = torch.where(unstable, -lo * up_w, torch.zeros_like(hi))
    low_w = torch.where(unstable, (hi > -lo).to(A.dtype), active)
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    return pos * low_w.unsqueeze(1) + neg * up_w.unsqueeze(1), torch.einsum("bsh,bh->bs", neg, up_b)


def crown_ibp_margins(net: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float = math.inf,
                      domain: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """CROWN-IBP lower bounds ``[B, K]`` on the margins ``z_y - z_j`` over the ball of radius
    ``eps`` around ``x [B, *shape]`` (Zhang et al. 2020, Sec. 3): IBP boxes for the hidden
    pre-activations (:func:`hidden_boxes`), one CROWN backward pass from the margins. Entry ``y``
    is 0; differentiable in the weights (also through the ReLU upper slopes ``u / (u - l)``)."""
    _check_norm(norm)
    layers = mlp_layers(net)
    x = x.flatten(1)
    C = margin_rows(y, layers[-1].out_features, x.dtype)
    A, bias = C @ layers[-1].weight, C @ _bias(layers[-1])  # [B, K, h], [B, K]
    boxes = hidden_boxes(layers, x, eps, norm, domain) if len(layers) > 1 else []
    for lin, (lo, hi) in zip(reversed(layers[:-1]), reversed(boxes)):
        A, c = _relu_backward(A, lo, hi)
        bias = bias + c + A @ _bias(lin)
        A = A @ lin.weight
    return _input_rows(A, bias, x, eps, norm, domain)
