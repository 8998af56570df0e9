"""Interval bound propagation (IBP; Gowal et al. 2018, Eq. (6)): each node's box from its
inputs' boxes with the op's interval rule, batched over the inputs. Every box is widened by the
round-off bound of its rule (:func:`relax.bounds.roundoff.forward_error`), so it encloses the node's
exact values."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from relax.ir.dense import FeedForwardNet, apply_activation
from relax.ir.graph import BoundGraph
from relax.bounds.roundoff import SAFETY, forward_error, gamma, sum_length
from verify.deadline import stop_past

__all__ = ["dense_interval_bounds", "interval_bounds", "node_box"]


def interval_bounds(
    graph: BoundGraph,
    lo: Tensor,
    hi: Tensor,
    known: dict[str, tuple[Tensor, Tensor]] | None = None,
    upto: str | None = None,
    done: dict[str, tuple[Tensor, Tensor]] | None = None,
    stop_at: float | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Boxes of every node.

    Args:
        graph: the bound graph.
        lo, hi: input box ``[B, *input_shape]``.
        known: optional tighter boxes ``{node: (lo, hi)}`` (``[B, *shape]``), intersected with
            the propagated ones (sound: both enclose the node's values).
        upto: stop after this node.
        done: boxes of nodes computed before (an earlier call's result), taken as they are.
        stop_at: a hard deadline (``perf_counter`` value): :class:`verify.deadline.DeadlineExpired`
            before the first node computed after it.

    Returns:
        ``{node: (lo, hi)}`` for the input and every node, each ``[B, *shape]``.
    """
    out = {graph.input_name: (lo, hi)}
    for n in graph.nodes:
        if done is not None and n.name in done:
            out[n.name] = done[n.name]
            if n.name == upto:
                break
            continue
        stop_past(stop_at, f"interval bounds stopped at node {n.name!r}")
        l, h = node_box(n, [out[i] for i in n.inputs])
        if known is not None and n.name in known:
            kl, kh = known[n.name]
            l, h = l.maximum(kl), h.minimum(kh)
        out[n.name] = (l, h)
        if n.name == upto:
            break
    return out


def node_box(n, ins: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Node ``n``'s box ``[B, *shape]`` from its inputs' boxes ``ins``: its interval rule, widened
    by the rule's round-off (:func:`relax.bounds.roundoff.forward_error`)."""
    l, h = n.op.interval(*ins)
    err = forward_error(n.op, ins, (l, h), sum_length([b[0].shape[1:] for b in ins], n.shape, n.op))
    if err is not None:
        l, h = l - err, h + err
    if n.op.nonlinear or not getattr(n.op, "exact_forward", False):  # inf - inf (unbounded inputs) is unbounded
        l = torch.nan_to_num(l, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        h = torch.nan_to_num(h, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return l, h


def dense_interval_bounds(net: FeedForwardNet, lo: Tensor, hi: Tensor, first: tuple[Tensor, Tensor] | None = None
                          ) -> list[tuple[Tensor, Tensor]]:
    """Interval (IBP) bounds on the pre-activations ``W_k z_k + b_k`` of every hidden layer of a
    network's dense view (:mod:`relax.ir.dense`): its one interval routine (LP, MILP, SDP and the
    Lipschitz methods), with the round-off policy of :func:`interval_bounds`.

    Args:
        lo, hi: ``[B, n_0]`` (or ``[B, *input_shape]``) input box, float64.
        first: ``[B, n_1]`` bounds the first layer's box is intersected with before it is
            propagated (e.g. an l_1 ball's, :func:`relax.exact.lp.interval_bounds`).
    Returns:
        ``[(l_k, u_k)]`` for ``k < L``, each ``[B, n_{k+1}]``, float64. Directed rounding is not
        used; each layer's box is widened by ``SAFETY gamma_{n+2} (|W| max(|l|, |u|) + |b|)``, a
        bound on the round-off of its sums that scales with the summed terms
        (:mod:`relax.bounds.roundoff`), plus ``1e-300``.
    """
    l = lo.reshape(lo.shape[0], -1).double()
    u = hi.reshape(hi.shape[0], -1).double()
    out = []
    for k, act in enumerate(net.activations):
        W, b = net.layers[k].W.to(l), net.layers[k].b.to(l)
        mid, rad = (u + l) / 2, (u - l) / 2
        absW = W.abs()
        c = mid @ W.T + b
        r = rad @ absW.T
        terms = torch.maximum(l.abs(), u.abs()) @ absW.T + b.abs()
        slack = SAFETY * gamma(W.shape[1] + 2, l.dtype) * terms + 1e-300
        pl, pu = c - r - slack, c + r + slack
        if k == 0 and first is not None:
            pl, pu = torch.maximum(pl, first[0].to(pl)), torch.minimum(pu, first[1].to(pu))
        out.append((pl, pu))
        l, u = apply_activation(act, pl), apply_activation(act, pu)  # all three activations are monotone
    return out
