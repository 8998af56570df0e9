"""Registered bound methods: ``interval``, ``crown``, ``deeppoly``, ``alpha-crown``.

Each is a :class:`verify.registry.BoundMethod`: it returns lower bounds ``[B, N]`` of the
property rows ``C y + d``; status, clean-input check and radius bisection come from the base.

Float safety: every bound the engines return holds for the exact network on the exact input set
(their round-off is bounded and subtracted, :mod:`relax.bounds.roundoff`; the input box is rounded
outward). By default the bounds are computed in float64 (``dtype=None``): the network's float32
weights are then used exactly and the round-off allowance is negligible, at about the cost of
float32 on a CPU (mnistfc 256x6: 0.49 s vs 0.42 s for CROWN, 8 inputs). ``dtype="float32"``
is sound too but its worst-case allowance loosens deep networks' bounds noticeably (a fast
option for devices where float64 is slow). ``BoundMethod``'s float-safety margin applies on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from verify.errors import OptionError
from verify.options import Options, option
from verify.registry import BoundMethod, register
from verify.spec import InputSet, LinearSpec

from relax.bounds import lower_bounds, prepare

__all__ = ["IntervalMethod", "CrownMethod", "DeepPolyMethod", "AlphaCrownMethod", "BoundOptions", "CrownOptions", "AlphaCrownOptions"]


_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


def _dtype(v) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    return _DTYPES[str(v)]


@dataclass(frozen=True, kw_only=True)
class BoundOptions(Options):
    """Options of every bound-propagation method."""

    dtype: torch.dtype | str | None = option(
        None, "dtype of the bound computation: float64 (default when none: exact float32 weights, negligible "
        "round-off allowance) or float32 (sound too; looser on deep nets)")
    max_elements: int = option(2**25, "largest coefficient tensor (numbers) a backward pass may build; "
                               "larger passes are cut into chunks", positive=True)


@dataclass(frozen=True, kw_only=True)
class CrownOptions(BoundOptions):
    """Options of the backward linear-bound methods (CROWN, DeepPoly, alpha-CROWN)."""

    forward: bool = option(False, "for networks of at most 32 inputs with wide layers: intermediate boxes also from "
                           "forward linear bounds (n_0 + 1 columns per node), CROWN's own passes only for the neurons "
                           "they leave unstable (faster there; the ReLU slopes can differ from textbook CROWN's)")


@dataclass(frozen=True, kw_only=True)
class AlphaCrownOptions(CrownOptions):
    """alpha-CROWN's optimisation (Xu et al. 2021)."""

    iterations: int = option(20, "Adam steps on the ReLU lower slopes")
    lr: float = option(0.1, "Adam learning rate", positive=True)
    optimize_intermediate: bool = option(True, "also optimise the slopes used for the intermediate bounds "
                                         "(tighter, several times slower)")
    early_stop: bool = option(True, "stop optimising an input once its bounds prove the property")


class _Relax(BoundMethod):
    _method = ""
    opts: BoundOptions
    # options of every subclass

    def setup(self) -> None:
        if isinstance(self.opts.dtype, str) and self.opts.dtype not in _DTYPES:
            raise OptionError(f"option dtype of {self.name}: expected one of {', '.join(_DTYPES)} or a torch dtype, "
                              f"got {self.opts.dtype!r}")

    def _lower(self, model: torch.nn.Module, inputs: InputSet, spec: LinearSpec, **kw) -> Tensor:
        graph, inputs = prepare(model, inputs, _dtype(self.opts.dtype) or torch.float64)
        C = spec.C.to(graph.dtype)
        if isinstance(self.opts, CrownOptions):
            kw["forward"] = self.opts.forward
        low = lower_bounds(graph, inputs, C, self._method, max_elements=self.opts.max_elements, **kw)
        return low + spec.d.to(graph.dtype)

    def lower_bounds(self, model, inputs, spec):
        return self._lower(model, inputs, spec, deadline=self.deadline)


@register
class IntervalMethod(_Relax):
    """Interval bound propagation (Gowal et al. 2018)."""

    name = "interval"
    summary = "interval bound propagation (IBP): one forward pass with boxes; fastest, loosest"
    _method = "interval"


@register
class CrownMethod(_Relax):
    """CROWN (Zhang et al. 2018): backward linear bounds with the spec pushed in."""

    name = "crown"
    summary = "CROWN linear bound propagation (backward, adaptive ReLU slopes, spec matrix pushed in)"
    _method = "crown"
    opts: CrownOptions


@register
class DeepPolyMethod(_Relax):
    """DeepPoly (Singh et al. 2019) = the CROWN backward pass with DeepPoly's slope choices."""

    name = "deeppoly"
    summary = "DeepPoly back-substitution (CROWN pass with DeepPoly's ReLU/sigmoid/tanh slope rules)"
    _method = "deeppoly"
    opts: CrownOptions


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
    opts: AlphaCrownOptions

    def lower_bounds(self, model, inputs, spec):
        d = spec.d

        def stop_fn(low: Tensor) -> Tensor:  # the property is proved for this input
            return self.proves(low + d.to(low.dtype), spec)

        return self._lower(model, inputs, spec, iterations=self.opts.iterations, lr=self.opts.lr,
                           optimize_intermediate=self.opts.optimize_intermediate, early_stop=self.opts.early_stop,
                           stop_fn=stop_fn, deadline=self.deadline)
