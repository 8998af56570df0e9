"""How a user checks a counterexample, the one check of every driver: the model as the user runs it
(:func:`onnx_runner`: onnxruntime on the ONNX file, as the VNN-COMP checker does; :func:`torch_runner`
otherwise), fed one input in its own dtype, the input projected into the box **in that dtype**
(:func:`project_into_box`), and the output violating the property exactly (:func:`confirm`).

The attacks' check of their own candidates (float64 set membership, float64 and own-dtype forward
passes of the torch model) is :func:`verify.attack.confirm_counterexample`; an answer that leaves
the suite (a VNN-COMP result file, ``certify run --spec``) is confirmed here as well.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .placement import model_device, model_float_dtype
from .precision import ieee_float32

__all__ = ["VNNCOMP_ATOL", "VNNCOMP_RTOL", "Runner", "onnx_runner", "torch_runner", "Confirmation", "project_into_box", "confirm"]

#: VNN-COMP checker: absolute tolerance on the input box and on the violated property
#: (``COUNTEREXAMPLE_ATOL``, vnncomp2023_results/SCORING/counterexamples.py)
VNNCOMP_ATOL = 1e-4
#: VNN-COMP checker: relative l_inf tolerance between the written Y and onnxruntime's output
#: (``COUNTEREXAMPLE_RTOL``); we write onnxruntime's output itself
VNNCOMP_RTOL = 1e-3


def _inward(b: np.ndarray, dtype: np.dtype, up: bool) -> np.ndarray:
    """float64 bounds ``b`` as ``dtype`` values rounded into the box: a lower bound (``up``)
    to the smallest ``dtype`` value ``>= b``, an upper bound to the largest ``<= b``."""
    bd = b.astype(dtype)
    out = bd.astype(np.float64) < b if up else bd.astype(np.float64) > b
    if out.any():
        bd = np.where(out, np.nextafter(bd, np.array(np.inf if up else -np.inf, dtype=dtype)), bd)
    return bd


def project_into_box(x: Any, lo: Any, hi: Any, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``x`` (flattened) cast to ``dtype`` and clamped into ``[lo, hi]`` **in** ``dtype``.

    Clamping in float64 and casting afterwards is not enough: the cast rounds to nearest and
    may leave the box by one ulp. Here the box's bounds are first rounded inward to ``dtype``
    values, so the result lies in ``[lo, hi]`` exactly. Where the box is thinner than one
    ``dtype`` step (no such value inside), the coordinate becomes ``lo`` rounded to nearest.

    Returns:
        ``[n]`` array of ``dtype``.
    """
    dtype = np.dtype(dtype)
    lo64 = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi64 = np.asarray(hi, dtype=np.float64).reshape(-1)
    xd = np.asarray(x, dtype=np.float64).reshape(-1).astype(dtype)
    lo_d, hi_d = _inward(lo64, dtype, up=True), _inward(hi64, dtype, up=False)
    thin = lo_d > hi_d
    out = np.minimum(np.maximum(xd, lo_d), hi_d)
    return np.where(thin, lo64.astype(dtype), out)


@dataclass
class Runner:
    """The model as the user checks it, on one input: ``fn(x [1, n] float64) -> y [1, K]``
    float64, fed in ``input_dtype``; ``kind`` is ``onnxruntime`` or ``torch``."""

    fn: Callable[[np.ndarray], np.ndarray]
    input_dtype: np.dtype
    kind: str


def onnx_runner(onnx_path: str | os.PathLike) -> Runner:
    """onnxruntime on the ONNX file, as the VNN-COMP checker runs it."""
    from .onnx_import import OnnxRuntimeModel

    m = OnnxRuntimeModel(onnx_path)
    return Runner(m, m.input_dtype, "onnxruntime")


def torch_runner(net: torch.nn.Module, input_shape: tuple[int, ...]) -> Runner:
    """A torch model, one input at a time in the dtype of its parameters (no ONNX file)."""
    dt = model_float_dtype(net) or torch.float32
    dev = model_device(net)

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad(), ieee_float32():
            y = net(torch.from_numpy(np.asarray(x)).to(device=dev, dtype=dt).reshape(1, *input_shape))
        return y.detach().to("cpu", torch.float64).reshape(1, -1).numpy()

    return Runner(fn, np.dtype(str(dt).removeprefix("torch.")), "torch")


@dataclass
class Confirmation:
    """Outcome of :func:`confirm`: ``ok`` iff ``x`` is in the box (within :data:`VNNCOMP_ATOL`,
    exactly when ``dtype`` allows) and ``margin <= 0`` on the runner's output ``y``."""

    ok: bool
    x: np.ndarray
    y: np.ndarray | None
    margin: float
    why: str = ""


def confirm(runner: Runner, x: Any, lo: Any, hi: Any, spec) -> Confirmation:
    """Project ``x`` into the box ``[lo, hi]`` in the runner's input dtype, run the model and
    check that the output violates ``spec`` (a :class:`~verify.spec.Linear`) exactly."""
    xp = project_into_box(x, lo, hi, runner.input_dtype).astype(np.float64)
    lo64 = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi64 = np.asarray(hi, dtype=np.float64).reshape(-1)
    if not np.isfinite(xp).all() or ((xp < lo64 - VNNCOMP_ATOL) | (xp > hi64 + VNNCOMP_ATOL)).any():
        return Confirmation(False, xp, None, math.inf, "outside the input box")
    y = np.asarray(runner.fn(xp.reshape(1, -1)), dtype=np.float64).reshape(-1)
    if not np.isfinite(y).all():
        return Confirmation(False, xp, y, math.inf, "non-finite output")
    ls = spec.linear(1, y.size, dtype=torch.float64)
    margin = float(ls.violation_margin(torch.from_numpy(y).reshape(1, -1))[0])
    why = "" if margin <= 0 else f"{runner.kind} output does not violate the property (margin {margin:.3g})"
    return Confirmation(margin <= 0, xp, y, margin, why)
