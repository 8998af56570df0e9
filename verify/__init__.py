"""certify: deterministic and probabilistic robustness certificates under one interface.

The public API (pinned by ``tests/test_public_api.py``)::

    from verify import certify, load_model, LpBall, Box, Robust, TopK, Linear, OutputBounds
    table = certify(model, x, labels, method="crown", eps=0.01, norm="inf")
"""
from .api import certify
from .certificate import Certificate, CertificateTable
from .registry import BoundMethod, Method, get_method, list_methods, register
from .spec import Box, Linear, LinearSpec, LpBall, OutputBounds, Robust, SpecError, TopK


def load_model(*args, **kwargs):
    """See :func:`verify.model.load_model` (imported lazily: ONNX support is heavy)."""
    from .model import load_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "certify",
    "load_model",
    "Certificate",
    "CertificateTable",
    "Method",
    "BoundMethod",
    "register",
    "get_method",
    "list_methods",
    "Box",
    "LpBall",
    "Robust",
    "TopK",
    "Linear",
    "OutputBounds",
    "LinearSpec",
    "SpecError",
]
