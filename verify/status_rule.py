"""The one status rule every method's answer passes (:meth:`verify.registry.Method.certify`).

A method decides; this module checks what it may claim, the same way for every method:

* ``"falsified"`` only with a counterexample that lies in the input set and violates the property
  in a plain forward pass (float64, and the model in its own dtype on that input alone:
  :func:`verify.attack.confirm_counterexample`). The reported point is first projected into the
  set in float64 (a no-op for a point inside); the confirmed, projected point is what the
  Certificate keeps. Without such a point the answer becomes ``"unknown"`` with the reason.
* ``"certified"`` about the network itself (``certifies="base"``) never when the centre of the set
  is a confirmed counterexample: that would be an unsound proof, so the answer becomes
  ``"error"`` naming the contradiction (a bug to report, never a result).

Certificates about the smoothed classifier or a probability (``certifies`` ``"smoothed"`` /
``"fraction"``) make no claim a forward pass of ``f`` can check; they pass unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .attack import confirm_counterexample, project_into
from .certificate import Certificate
from .spec import InputSet, LinearSpec, OutputProperty

__all__ = ["enforce_status_rule"]


def _spec_and_centres(model: torch.nn.Module, inputs: InputSet, prop: OutputProperty,
                      y0: torch.Tensor | None) -> tuple[LinearSpec, torch.Tensor, torch.Tensor]:
    """From the batched outputs at the sets' centres (``y0 [B, K]``; one forward pass when
    ``None``): the property's rows (``C [B, N, K]``, float64, on the inputs' device), the violation
    margins ``[B]`` and the scale ``[B]`` of the rows' summed terms (``max_i |C_i| |y| + |d_i|``:
    the size of a rounding difference between two forward passes)."""
    x0 = inputs.midpoint()
    if y0 is None:
        with torch.no_grad():
            y0 = model(x0)
    y = y0.reshape(y0.shape[0], -1).double()
    spec = prop.linear(inputs.batch_size, y.shape[1], device=x0.device, dtype=torch.float64)
    scale = ((spec.C.abs() @ y.abs().unsqueeze(-1)).squeeze(-1) + spec.d.abs()).amax(dim=1)
    return spec, spec.violation_margin(y), scale


def _downgrade(cert: Certificate, status: str, why: str) -> None:
    cert.status, cert.counterexample = status, None
    cert.details["status_rule"] = why


def _check_falsified(model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, certs: list[Certificate]) -> None:
    """Every one of ``certs`` keeps "falsified" only with a confirmed point (one batched check)."""
    for c in certs:
        if c.counterexample is None:
            _downgrade(c, "unknown", "falsified without a counterexample: the answer is unknown")
    certs = [c for c in certs if c.counterexample is not None]
    if not certs:
        return
    idx = [c.index for c in certs]
    sets, rows = inputs.select(idx), spec.select(idx)
    dev = spec.C.device
    x = torch.stack([torch.as_tensor(c.counterexample, dtype=torch.float64, device=dev).reshape(inputs.shape) for c in certs])
    xp = project_into(sets, x)
    ok = confirm_counterexample(model, sets, rows, xp)
    for k, c in enumerate(certs):
        if bool(ok[k]):
            c.counterexample = xp[k].cpu().tolist()
        else:
            _downgrade(c, "unknown", "the counterexample is not confirmed (inside the set, violating the property in a "
                                     "forward pass): the answer is unknown")


#: a batched forward pass rounds differently from the single-input one of the confirmation; a
#: centre whose batched margin is below this fraction of its rows' scale is checked exactly
SCREEN_RTOL = 1e-4


def _check_certified(model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, centre_margin: torch.Tensor,
                     scale: torch.Tensor, certs: list[Certificate]) -> None:
    """A proof about ``f`` is contradicted when the set's centre is a confirmed counterexample; the
    batched margins screen the centres (no float64 copy of the model unless one is near 0)."""
    near = [c for c in certs if float(centre_margin[c.index]) <= SCREEN_RTOL * (1.0 + float(scale[c.index]))]
    if not near:
        return
    idx = [c.index for c in near]
    sets, rows = inputs.select(idx), spec.select(idx)
    bad = confirm_counterexample(model, sets, rows, project_into(sets, sets.midpoint()))
    for c, contradicted in zip(near, bad.tolist()):
        if contradicted:
            _downgrade(c, "error", f"method {c.method!r} claimed certified while the centre of the input set is a "
                                   "confirmed counterexample: an unsound answer (please report it)")


def enforce_status_rule(
    model: torch.nn.Module, inputs: InputSet, prop: OutputProperty, certs: Sequence[Certificate],
    centre_outputs: torch.Tensor | None = None,
) -> list[Certificate]:
    """Check (and where needed downgrade, in place) the statuses of ``certs``, one per input of
    the batch ``inputs`` (``cert.index`` = its position), for ``prop``. Returns them as a list.
    ``centre_outputs [B, K]``: the model's batched outputs at the sets' centres when the caller
    has them (they are only screened: every verdict comes from the single-input confirmation)."""
    certs = list(certs)
    falsified = [c for c in certs if c.status == "falsified"]
    certified = [c for c in certs if c.status == "certified" and c.certifies == "base"]
    if not falsified and not certified:
        return certs
    spec, centre_margin, scale = _spec_and_centres(model, inputs, prop, centre_outputs)
    if falsified:
        _check_falsified(model, inputs, spec, falsified)
    if certified:
        _check_certified(model, inputs, spec, centre_margin, scale, certified)
    return certs
