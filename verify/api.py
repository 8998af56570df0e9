"""``certify(model, inputs, prop, method=...)``: the one call that runs any method."""
from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .certificate import CertificateTable
from .errors import OptionError
from .registry import Method, get_method
from .spec import InputSet, Linear, LpBall, OutputProperty, SpecError, as_property, parse_norm

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
    dtype: torch.dtype | str = torch.float32,
    method_options: dict[str, Any] | None = None,
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
        device, dtype: where and in which precision the model runs (``dtype`` also as a name,
            ``"float64"``).
        method_options: the method's keyword options as a dict; the way to give an option
            that has the name of an argument of this function (``dtype`` of crown & co).
        **options: more method options (see ``certify methods``).

    Raises:
        SpecError, OptionError, ModelLoadError: bad input, one line naming the cause (empty
            inputs, a shape the model does not take, a label the model has no output for, an
            option value of the wrong type or range, a device that is not available, ...).

    Returns:
        A :class:`CertificateTable` with one Certificate per input, ``index`` = position.
    """
    from .precision import ieee_float32

    with ieee_float32():  # the engines' round-off allowances assume IEEE float32 on CUDA too
        return _certify(model, inputs, prop, method, eps=eps, norm=norm, domain=domain, find_radius=find_radius,
                        max_radius=max_radius, timeout=timeout, batch_size=batch_size, device=device, dtype=dtype,
                        method_options=method_options, options=options)


def _certify(model, inputs, prop, method, *, eps, norm, domain, find_radius, max_radius, timeout, batch_size, device, dtype,
             method_options, options) -> CertificateTable:
    """:func:`certify` with TF32 already off."""
    from .model import load_model  # local: keeps `import verify.api` light

    t_entry = time.perf_counter()  # set-up (method modules, model loading) is inside the budget
    dtype = _torch_dtype(dtype)
    _check_call_args(timeout, max_radius, batch_size)
    m = get_method(method, **_merge_options(method_options, options))
    net = load_model(model, device=device, dtype=dtype)
    user_set = inputs if isinstance(inputs, InputSet) else None
    inputs = _input_set(inputs, eps, norm, domain, device, dtype)
    user_set = inputs if user_set is None else user_set
    prop = as_property(prop)
    B = inputs.batch_size
    if B == 0:
        raise SpecError("the inputs hold no examples (batch size 0)")
    K = _num_outputs(net, inputs)
    _check_property(prop, B, K)
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
            if c.status == "falsified" and c.counterexample is not None:
                _confirm_in_user_set(net, user_set.select([i]), _select_prop(prop, [i], B), K, c)
        table.extend(certs)
    return table


def _confirm_in_user_set(net: torch.nn.Module, user_set: InputSet, prop: OutputProperty, K: int, cert) -> None:
    """A method works on the enclosure of the user's set in the model's dtype (rounded outward),
    so its counterexample may lie just outside the user's set. Project it into that set (float64)
    and confirm it there; otherwise the answer becomes "unknown" (a counterexample must lie in
    the set the user gave)."""
    from .attack import confirm_counterexample, project_into

    x = torch.as_tensor(cert.counterexample, dtype=torch.float64).reshape(1, *user_set.shape)
    xp = project_into(user_set, x.to(user_set.device))
    spec = prop.linear(1, K, dtype=torch.float64)
    if bool(confirm_counterexample(net, user_set, spec, xp)[0]):
        cert.counterexample = xp.reshape(user_set.shape).cpu().tolist()
        return
    cert.status = "unknown"
    cert.counterexample = None
    cert.details = {**(cert.details or {}), "rejected_counterexample": "not confirmed inside the given input set"}


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float64`` or its name (``"float64"``, ``"torch.float64"``, ``"double"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    t = getattr(torch, str(dtype).removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise OptionError(f"dtype must be a floating-point torch dtype such as float32 or float64, got {dtype!r}")
    return t


def _check_call_args(timeout: float | None, max_radius: float | None, batch_size: int | None) -> None:
    """``timeout`` and ``max_radius`` > 0, ``batch_size`` an integer >= 1 (each or None)."""
    for name, v in (("timeout", timeout), ("max_radius", max_radius)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0):
            raise OptionError(f"{name} must be a number > 0, got {v!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise OptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _merge_options(method_options: dict[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    both = set(method_options or {}) & set(options)
    if both:
        raise OptionError(f"method option {sorted(both)[0]!r} is given twice (in method_options and as a keyword)")
    return {**(method_options or {}), **options}


def _input_set(inputs: InputSet | Tensor, eps, norm, domain, device, dtype) -> InputSet:
    """The input set on the device and dtype (a tensor becomes an l_p ball)."""
    if isinstance(inputs, Tensor):
        lo, hi = (None, None) if domain is None else domain
        return LpBall(inputs.to(device=device, dtype=dtype), 0.0 if eps is None else eps, parse_norm(norm), lo, hi)
    if isinstance(inputs, InputSet):
        if eps is not None:
            raise SpecError("eps is given twice: as an argument and inside the input set")
        return inputs.to(device=device, dtype=dtype)
    raise SpecError(f"inputs must be a tensor or an InputSet, got {type(inputs).__name__}")


def _num_outputs(net: torch.nn.Module, inputs: InputSet) -> int:
    """Run the model on the first example; a clear error when it does not take the inputs'
    shape. Returns the number of outputs ``K``."""
    shape = tuple(inputs.shape)
    expected = getattr(net, "input_shape", None)
    want = f" (the model expects {tuple(expected)})" if expected is not None else ""
    if expected is not None and math.prod(expected) != math.prod(shape):
        raise SpecError(f"the inputs have shape {shape} per example but the model expects {tuple(expected)}")
    try:
        with torch.no_grad():
            y = net(inputs.midpoint()[:1])
    except Exception as e:  # any error of the forward pass: the shapes do not fit
        cause = " ".join(str(e).split()) or type(e).__name__
        raise SpecError(f"the model does not accept inputs of shape {shape} per example{want}: {cause}") from None
    return int(y.reshape(1, -1).shape[1])


def _check_property(prop: OutputProperty, B: int, K: int) -> None:
    """The property fits ``B`` inputs and a model with ``K`` outputs (labels in range, as many
    columns as outputs): deterministic and probabilistic methods refuse alike."""
    if isinstance(prop, Linear) and prop.C.shape[-1] != K:
        raise SpecError(f"the property refers to {prop.C.shape[-1]} outputs but the model has {K}")
    labels = prop.labels()
    if labels is not None and labels.numel() and ((labels < 0).any() or (labels >= K).any()):
        bad = labels[(labels < 0) | (labels >= K)]
        raise SpecError(f"label {int(bad[0])} is out of range for a model with {K} outputs (labels 0..{K - 1})")
    prop.linear(B, K, dtype=torch.float64)


#: per property field, the rank it has when it holds one entry per example
_BATCHED_RANK = {"C": 3, "d": 2, "label": 1, "lower": 2, "upper": 2}


def _select_prop(prop: OutputProperty, idx: list[int], B: int) -> OutputProperty:
    """The property restricted to a sub-batch: a field is indexed only when it has its batched
    rank and ``B`` entries (a shared ``Linear`` with ``B`` rows keeps all its rows)."""
    import dataclasses

    kw = {}
    for f in dataclasses.fields(prop):  # type: ignore[arg-type]
        v = getattr(prop, f.name)
        rank = _BATCHED_RANK.get(f.name)
        if isinstance(v, Tensor) and rank is not None and v.dim() == rank and v.shape[0] == B:
            v = v[idx]
        kw[f.name] = v
    return type(prop)(**kw)
