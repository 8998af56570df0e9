"""Registered bound methods: ``interval``, ``crown``, ``deeppoly``, ``alpha-crown``.

Each is a :class:`verify.registry.BoundMethod`: it returns lower bounds ``[B, N]`` of the
property rows ``C y + d``; status, clean-input check and radius bisection come from the base.

Float safety: by default the bounds are computed in the input's dtype (float32) and the
decision relies on ``BoundMethod``'s float-safety margin (``lower > 1e-5 (1 + |lower|)``);
``dtype=torch.float64`` (or ``"float64"``) computes every bound in float64 (the network's
weights are then used exactly), where the margin is ``1e-10 (1 + |lower|)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from verify.registry import BoundMethod, register
from verify.spec import InputSet, LinearSpec

from .bounds import lower_bounds, prepare

__all__ = ["IntervalMethod", "CrownMethod", "DeepPolyMethod", "AlphaCrownMethod"]


def _dtype(v) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    return {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}[str(v)]


class _Relax(BoundMethod):
    _method = ""

    def _lower(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, **kw) -> Tensor:
        graph, inputs = prepare(model, inputs, _dtype(self.dtype))
        C = spec.C.to(graph.dtype)
        low = lower_bounds(graph, inputs, C, self._method, max_elements=self.max_elements, **kw)
        return low + spec.d.to(graph.dtype)

    def lower_bounds(self, model, inputs, spec):
        return self._lower(model, inputs, spec)


@register
class IntervalMethod(_Relax):
    """Interval bound propagation (Gowal et al. 2018)."""

    name = "interval"
    summary = "interval bound propagation (IBP): one forward pass with boxes; fastest, loosest"
    _method = "interval"

    def __init__(self, dtype: torch.dtype | str | None = None, max_elements: int = 2**25):
        self.dtype = dtype
        self.max_elements = max_elements


@register
class CrownMethod(_Relax):
    """CROWN (Zhang et al. 2018): backward linear bounds with the spec pushed in."""

    name = "crown"
    summary = "CROWN linear bound propagation (backward, adaptive ReLU slopes, spec matrix pushed in)"
    _method = "crown"

    def __init__(self, dtype: torch.dtype | str | None = None, max_elements: int = 2**25):
        self.dtype = dtype
        self.max_elements = max_elements


@register
class DeepPolyMethod(_Relax):
    """DeepPoly (Singh et al. 2019) = the CROWN backward pass with DeepPoly's slope choices."""

    name = "deeppoly"
    summary = "DeepPoly back-substitution (CROWN pass with DeepPoly's ReLU/sigmoid/tanh slope rules)"
    _method = "deeppoly"

    def __init__(self, dtype: torch.dtype | str | None = None, max_elements: int = 2**25):
        self.dtype = dtype
        self.max_elements = max_elements


@register
class AlphaCrownMethod(_Relax):
    """alpha-CROWN (Xu et al. 2021): CROWN with ReLU lower slopes optimised by Adam.

    Options: ``iterations`` Adam steps with learning rate ``lr``; ``optimize_intermediate``
    also optimises the slopes used for the intermediate bounds (tighter, several times slower;
    auto_LiRPA's default is ``False``: output-layer slopes only, CROWN intermediate bounds);
    ``early_stop`` stops optimising an input once its bounds prove the property (after the
    float-safety margin); its bounds are then frozen, so batch of 1 == batch of N.
    Never looser than CROWN (the best bound per row is kept).
    """

    name = "alpha-crown"
    summary = "alpha-CROWN: CROWN with ReLU lower slopes optimised by gradient ascent (never looser than CROWN)"
    _method = "alpha-crown"

    def __init__(
        self,
        dtype: torch.dtype | str | None = None,
        max_elements: int = 2**25,
        iterations: int = 20,
        lr: float = 0.1,
        optimize_intermediate: bool = True,
        early_stop: bool = True,
    ):
        self._store_options(locals())

    def lower_bounds(self, model, inputs, spec):
        d = spec.d

        def stop_fn(low: Tensor) -> Tensor:  # the property is proved for this input
            return self.proves(low + d.to(low.dtype), spec)

        return self._lower(model, inputs, spec, iterations=self.iterations, lr=self.lr,
                           optimize_intermediate=self.optimize_intermediate, early_stop=self.early_stop,
                           stop_fn=stop_fn, deadline=self.deadline)
