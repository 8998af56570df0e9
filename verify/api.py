"""``certify(model, inputs, prop, method=...)``: the one call that runs any method."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .certificate import CertificateTable
from .registry import Method, get_method
from .spec import InputSet, LpBall, OutputProperty, SpecError, as_property, parse_norm

__all__ = ["certify"]


def certify(
    model: torch.nn.Module | str | Path,
    inputs: InputSet | Tensor,
    prop: OutputProperty | Tensor | int,
    method: str | Method = "interval",
    *,
    eps: float | Tensor | None = None,
    norm: float | str = math.inf,
    domain: tuple[float, float] | None = (0.0, 1.0),
    find_radius: bool = False,
    max_radius: float | None = None,
    timeout: float | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> CertificateTable:
    """Certify a batch of inputs with one registered method.

    Args:
        model: a torch module, a ``torch.fx.GraphModule`` or a path to ``.onnx`` / ``.pt``.
        inputs: an :class:`~verify.spec.InputSet`, or clean inputs ``[B, *shape]`` that
            become ``LpBall(inputs, eps, norm, *domain)``.
        prop: an output property, or labels (int / ``[B]``) meaning :class:`Robust`.
        method: a registry name (``certify methods`` lists them) or a Method instance.
        eps: radius of the l_p ball when ``inputs`` is a tensor (default 0).
        find_radius: also search the largest certified radius.
        timeout: seconds per chunk (the first chunk's include the set-up of this call: loading
            the method and the model); past it a method answers "unknown" with its best bounds.
        batch_size: split the inputs into chunks of this size (default: one batch).
        device, dtype: where and in which precision the model runs.
        **options: the method's keyword options (see ``certify methods``).

    Returns:
        A :class:`CertificateTable` with one Certificate per input, ``index`` = position.
    """
    from .model import load_model  # local: keeps `import verify.api` light

    t_entry = time.perf_counter()  # set-up (method modules, model loading) is inside the budget
    m = get_method(method, **options)
    net = load_model(model, device=device, dtype=dtype)
    if isinstance(inputs, Tensor):
        lo, hi = (None, None) if domain is None else domain
        inputs = LpBall(inputs.to(device=device, dtype=dtype), 0.0 if eps is None else eps, parse_norm(norm), lo, hi)
    elif isinstance(inputs, InputSet):
        if eps is not None:
            raise SpecError("eps is given twice: as an argument and inside the input set")
        inputs = inputs.to(device=device, dtype=dtype)
    else:
        raise SpecError(f"inputs must be a tensor or an InputSet, got {type(inputs).__name__}")
    prop = as_property(prop)
    B = inputs.batch_size
    step = batch_size or B
    table = CertificateTable()
    for start in range(0, B, step):
        idx = list(range(start, min(B, start + step)))
        sub_in = inputs.select(idx) if step < B else inputs
        sub_prop = _select_prop(prop, idx, B) if step < B else prop
        setup_s = time.perf_counter() - t_entry if start == 0 else 0.0
        left = None if timeout is None else max(timeout - setup_s, 0.0)
        certs = m.certify(net, sub_in, sub_prop, find_radius=find_radius, max_radius=max_radius, timeout=left)
        for c, i in zip(certs, idx):
            c.index = i
            if setup_s:  # the set-up of the call, shared by the first chunk's certificates
                c.time_s = (c.time_s or 0.0) + setup_s / len(certs)
        table.extend(certs)
    return table


def _select_prop(prop: OutputProperty, idx: list[int], B: int) -> OutputProperty:
    """The property restricted to a sub-batch (per-example tensors are indexed)."""
    import dataclasses

    kw = {}
    for f in dataclasses.fields(prop):  # type: ignore[arg-type]
        v = getattr(prop, f.name)
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B and not (f.name in ("C",) and v.dim() == 2) and f.name != "groups":
            v = v[idx]
        kw[f.name] = v
    return type(prop)(**kw)
