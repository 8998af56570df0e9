"""Error types shared by the packages (light: imports nothing heavy).

Every error message is one line naming the cause (the operator and node, the file and line).
"""
from __future__ import annotations

__all__ = ["CertifyError", "UnsupportedOperatorError", "IntegerInputsNeeded", "ModelLoadError", "ModelLoadTimeout", "OptionError"]


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class CertifyError(ValueError):
    """Base of the errors the CLI reports as one line without a traceback."""

    def __init__(self, message: object):
        super().__init__(one_line(message))


class UnsupportedOperatorError(CertifyError):
    """An operator (or attribute combination) that a loader or a bound method has no rule
    for; the message names the op and the node."""


class IntegerInputsNeeded(UnsupportedOperatorError):
    """The network uses the integer part of some inputs (ONNX ``Cast`` to an integer type) where
    a constant is needed (slice starts, scatter indices, ...): it is converted per integer value
    of those inputs (:mod:`verify.integer_inputs`). ``coords``: their flat input indices."""

    def __init__(self, message: str, coords: list[int]):
        super().__init__(message)
        self.coords = coords


class ModelLoadError(CertifyError):
    """A model cannot be loaded: missing or malformed file, several inputs, NaN weights, ..."""


class ModelLoadTimeout(TimeoutError):
    """The model was not loaded (read, converted, moved) by the deadline given to
    :func:`verify.model.load_model` / :func:`verify.onnx_import.import_onnx`."""

    def __init__(self, message: object):
        super().__init__(one_line(message))


class OptionError(CertifyError):
    """A method option or a ``certify()`` argument has a value of the wrong type or out of its
    range; the message names the option and the value."""
