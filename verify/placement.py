"""Where a module's tensors live: its device and floating dtype, read off its parameters and
buffers (the attacks, their gradient surrogate and the counterexample runner all need them)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["model_tensors", "model_device", "model_float_dtype"]


def model_tensors(model: torch.nn.Module) -> list[Tensor]:
    """Parameters, then buffers."""
    return list(model.parameters()) + list(model.buffers())


def model_device(model: torch.nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter / buffer (``default`` when it has none)."""
    return next((t.device for t in model_tensors(model)), torch.device(default))


def model_float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating parameter / buffer (``None`` when it has none)."""
    return next((t.dtype for t in model_tensors(model) if torch.is_floating_point(t)), None)
