"""ArgMax of a softmax taken on the softmax's input (the class scores) instead.

Softmax is strictly increasing in each entry of its group and keeps the order of the group's
entries: ``softmax(z)_i > softmax(z)_j`` exactly when ``z_i > z_j``, and equal entries stay equal.
So an ArgMax / ArgMin along the softmax's axis picks the same index from ``z`` as from
``softmax(z)`` (the same first / last rule for ties), and the same holds for log-softmax and for
any transposes and gathers between the two that leave that axis whole. A segmentation head
``argmax(softmax(logits))`` (carvana_unet_2022) then costs the bound engine the pairwise
differences of the logits, not linear bounds through the softmax's exponentials and reciprocals,
and its steps see the logits' differences directly (tighter: no relaxation in between).

The identity holds in exact arithmetic, as every bound of the engine does. (A float32 softmax can
round two scores less than an ulp apart to the same probability, where the plain forward pass
then takes the first; counterexamples are always confirmed on the model as it is.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch.fx as fx

if TYPE_CHECKING:  # the converter class lives in verify.onnx_import, which imports this module
    from .onnx_import import _Converter

__all__ = ["scores_before_softmax"]

#: ops that may stand between the softmax and the ArgMax (each must leave the softmax axis whole)
_MOVES = ("Transpose", "Gather", "Identity")


def _softmax_axis(cv: "_Converter", sm: onnx.NodeProto, rank: int) -> int | None:
    """The axis of ``sm``'s groups (rank ``rank``), or None when a group spans several axes
    (opset < 13 flattens the axes from ``axis`` on)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in sm.attribute}
    axis = int(attrs.get("axis", -1 if cv.opset >= 13 else 1)) % rank
    return axis if cv.opset >= 13 or axis == rank - 1 else None


def _moved_axis(cv: "_Converter", node: onnx.NodeProto, pos: int, rank: int) -> tuple[int, int] | None:
    """Where axis ``pos`` of ``node``'s input (rank ``rank``) lies in its output, and the output's
    rank; None when ``node`` cuts into that axis (a gather along it)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Identity":
        return pos, rank
    if node.op_type == "Transpose":
        perm = [int(p) for p in attrs.get("perm", list(range(rank))[::-1])]
        return perm.index(pos), rank
    idx = cv.env.get(node.input[1])
    if not isinstance(idx, np.ndarray):  # dynamic indices
        return None
    g = int(attrs.get("axis", 0)) % rank
    if g == pos:
        return None
    return (pos - 1 + idx.ndim if g < pos else pos), rank - 1 + idx.ndim


def scores_before_softmax(cv: "_Converter", node: onnx.NodeProto) -> fx.Node | None:
    """For an ArgMax / ArgMin ``node`` whose input is a (log-)softmax's output moved by
    :data:`_MOVES` that keep the softmax axis whole and end with it on ``node``'s axis: the same
    moves converted on the softmax's input (module docstring). None when the input is not such a
    chain (then ``node`` is converted on its input as it is)."""
    producer = {o: n for n in cv.model.graph.node for o in n.output}
    chain: list[onnx.NodeProto] = []
    name = node.input[0]
    while name in producer and producer[name].op_type in _MOVES:
        chain.insert(0, producer[name])
        name = producer[name].input[0]
    sm = producer.get(name)
    if sm is None or sm.op_type not in ("Softmax", "LogSoftmax") or not isinstance(cv.env.get(sm.input[0]), fx.Node):
        return None
    scores = cv.env[sm.input[0]]
    assert isinstance(scores, fx.Node)
    rank = len(cv.shape(scores))
    pos = _softmax_axis(cv, sm, rank)
    for n in chain:
        if pos is None:
            return None
        moved = _moved_axis(cv, n, pos, rank)
        pos, rank = moved if moved is not None else (None, rank)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if pos is None or int(attrs.get("axis", 0)) % rank != pos:
        return None
    src = sm.input[0]
    for n in chain:  # the same moves on the scores, under fresh value names
        out = f"{n.output[0]}__scores"
        while out in cv.env:
            out += "_"
        copy = onnx.helper.make_node(n.op_type, [src, *n.input[1:]], [out], name=f"{n.name}__scores")
        copy.attribute.extend(n.attribute)
        cv.uses.update(i for i in copy.input if i)
        cv._convert(copy)
        src = out
    out_value = cv.env[src]
    return out_value if isinstance(out_value, fx.Node) else None
