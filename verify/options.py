"""Typed method options: each method declares its options once, as a frozen dataclass.

A method's ``Options`` class is the one place where an option's name, type, default, allowed
values and help text are written. The registry builds the method from it
(:class:`verify.registry.Method`), ``get_method`` and the CLI check and convert values with it,
and ``certify methods --help-options`` prints it. Families share options by inheritance::

    @dataclass(frozen=True, kw_only=True)
    class SamplingOptions(Options):
        n: int = option(100_000, "noise samples per input", positive=True)
        alpha: float = option(0.001, "failure probability; confidence = 1 - alpha", interval=(0, 1, "open"))

    @dataclass(frozen=True, kw_only=True)
    class GaussianOptions(SamplingOptions):
        sigma: float = option(0.25, "noise std in the model's input space", positive=True)

Checks every option gets from its declaration (:meth:`Options.check`): the value has the
declared type (``bool`` is not a number; an ``int`` is a valid ``float``; ``None`` only where
the type admits it), numbers are not NaN and are ``>= 0`` (``> 0`` with ``positive=True``, inside
``interval`` where given), strings are one of ``choices`` where given. A method adds checks that
involve several options in its ``setup`` hook.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from .errors import OptionError

__all__ = ["Options", "OptionInfo", "option"]

#: how an ``interval`` treats its ends: both included, both excluded, or one of each
_END_KINDS = {"closed": (False, False), "open": (True, True), "left-open": (True, False), "right-open": (False, True)}


def option(default: Any, help: str, *, positive: bool = False, interval: tuple[float, float, str] | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A field of an :class:`Options` dataclass.

    Args:
        default: the value when the option is not given.
        help: one line for ``certify methods`` (what the option does, its unit).
        positive: numbers must be ``> 0`` (otherwise ``>= 0``).
        interval: ``(low, high, ends)`` with ``ends`` one of ``"closed"``, ``"open"``,
            ``"left-open"``, ``"right-open"``.
        choices: the strings the option accepts.
    """
    if interval is not None and interval[2] not in _END_KINDS:
        raise ValueError(f"interval ends must be one of {', '.join(_END_KINDS)}, got {interval[2]!r}")
    meta = {"help": help, "positive": positive, "interval": interval, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """What a reader (``certify methods``, the CLI's text conversion) needs to know of one option."""

    name: str
    type: Any  # the resolved annotation, e.g. ``int``, ``float | None``, ``str``
    default: Any
    help: str
    positive: bool = False
    interval: tuple[float, float, str] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def type_text(self) -> str:
        """The type as a reader writes it: ``int``, ``float or none``, ``one of auto, input, relu``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        names = [getattr(t, "__name__", str(t)) for t in _members(self.type)]
        return " or ".join("none" if n == "NoneType" else n for n in names)

    @property
    def expected_text(self) -> str:
        """The type as an error message says it: ``an integer``, ``a number or none``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
        return " or ".join(words.get(t, getattr(t, "__name__", str(t))) for t in _members(self.type))

    @property
    def range_text(self) -> str:
        """``> 0``, ``in (0, 1)``, ``>= 0`` for numbers; empty for the rest."""
        if not any(t in (int, float) for t in _members(self.type)):
            return ""
        if self.interval is not None:
            lo, hi, ends = self.interval
            lo_open, hi_open = _END_KINDS[ends]
            return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return "> 0" if self.positive else ">= 0"

    @property
    def kinds(self) -> tuple[Any, ...]:
        """The types a value may have besides ``None`` (``float | None`` -> ``(float,)``)."""
        return tuple(t for t in _members(self.type) if t is not type(None))

    @property
    def admits_none(self) -> bool:
        return type(None) in _members(self.type)

    def check(self, owner: str, value: Any) -> None:
        """Raise :class:`OptionError` ("option KEY of OWNER: expected ..., got VALUE") unless
        ``value`` has this option's type and range."""

        def fail(expected: str) -> None:
            raise OptionError(f"option {self.name} of {owner}: expected {expected}, got {value!r}")

        if value is None:
            if not self.admits_none:
                fail(self.expected_text)
            return
        kinds = _members(self.type)
        if not any(_is_instance(value, t) for t in kinds):
            fail(self.expected_text)
        if self.choices is not None and isinstance(value, str) and value not in self.choices:
            fail(self.expected_text)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            v = float(value)
            if math.isnan(v):
                fail("a number, not NaN")
            if not self._in_range(v):
                fail("a value " + self.range_text)

    def _in_range(self, v: float) -> bool:
        if self.interval is not None:
            lo, hi, ends = self.interval
            lo_open, hi_open = _END_KINDS[ends]
            return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return v > 0 if self.positive else v >= 0


def _members(tp: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> ``(int, NoneType)``), else ``(tp,)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _is_instance(value: Any, tp: Any) -> bool:
    """``isinstance`` with the numeric tower the options use: ``bool`` only for ``bool``, an
    integer for ``int``, any real number for ``float``; ``Any`` accepts everything."""
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, numbers.Integral)
    if tp is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, tp) if isinstance(tp, type) else True


@dataclass(frozen=True, kw_only=True)
class Options:
    """The options of a method with none; every method's options derive from it.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` whose fields are made by
    :func:`option`.
    """

    _infos: ClassVar[dict[type, tuple[OptionInfo, ...]]] = {}

    @classmethod
    def infos(cls) -> tuple[OptionInfo, ...]:
        """One :class:`OptionInfo` per field, the most specific first: a class's own fields (and
        those it re-declares) before those it inherits, each class in declaration order."""
        if cls not in Options._infos:
            hints = typing.get_type_hints(cls)
            fields = {f.name: f for f in dataclasses.fields(cls)}
            order = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {}) if name in fields]
            Options._infos[cls] = tuple(
                OptionInfo(name=f.name, type=hints[f.name], default=f.default, help=f.metadata.get("help", ""),
                           positive=f.metadata.get("positive", False), interval=f.metadata.get("interval"),
                           choices=f.metadata.get("choices"))
                for f in (fields[name] for name in dict.fromkeys(order))
            )
        return Options._infos[cls]

    @classmethod
    def names(cls) -> list[str]:
        return [i.name for i in cls.infos()]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {i.name: i.default for i in cls.infos()}

    @classmethod
    def info(cls, name: str) -> OptionInfo:
        for i in cls.infos():
            if i.name == name:
                return i
        raise KeyError(name)

    def check(self, owner: str) -> None:
        """Every option's type and range (:meth:`OptionInfo.check`); ``owner`` names the method
        in the error."""
        for i in self.infos():
            i.check(owner, getattr(self, i.name))

    def as_dict(self) -> dict[str, Any]:
        """``{name: value}`` in declaration order."""
        return {i.name: getattr(self, i.name) for i in self.infos()}
