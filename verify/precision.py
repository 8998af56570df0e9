"""IEEE float32 arithmetic on CUDA: TensorFloat-32 off while a method runs.

On NVIDIA GPUs since Ampere, torch may run float32 matrix products and cuDNN convolutions in
TensorFloat-32 (10 mantissa bits, unit round-off 2^-11 instead of 2^-24); cuDNN convolutions do so
by default (``torch.backends.cudnn.allow_tf32 = True``). The round-off allowances of the bound
engines (:mod:`relax.bounds.roundoff`) assume IEEE arithmetic of the computation's dtype, and a
counterexample must be confirmed by the float32 forward pass a user runs, so every method runs
inside :func:`ieee_float32`. float64 computations never use TF32; the CPU is unaffected.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ieee_float32"]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Inside the block, CUDA matrix products and cuDNN convolutions in float32 round as IEEE
    float32 (TF32 off); the previous settings are restored on exit, also after an exception."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, conv.allow_tf32)
    matmul.allow_tf32 = False
    conv.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, conv.allow_tf32 = before
