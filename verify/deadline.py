"""A wall-clock deadline handed from ``Method.certify(..., timeout=...)`` down to the long loops.

Every method must answer within its ``timeout`` (an *anytime* answer: ``unknown`` with the best
sound bound found so far). A :class:`Deadline` is created once at the entry of ``certify`` and
passed down; loops call :meth:`Deadline.expired` between steps, solvers get
:meth:`Deadline.limit` seconds, and a step whose expected cost exceeds the time left is not
started (:meth:`Deadline.affords`). ``Deadline(None)`` never expires, so code paths need no
``if timeout is None`` branches.
"""
from __future__ import annotations

import math
import time

__all__ = ["Deadline", "DeadlineExpired"]


class DeadlineExpired(RuntimeError):
    """Raised by :meth:`Deadline.check` once the deadline has passed."""


def stop_past(stop_at: float | None, where: str) -> None:
    """Raise :class:`DeadlineExpired` once the hard deadline ``stop_at`` (a ``perf_counter``
    value; None: none) has passed: the step check of the backward passes (``where`` names the step)."""
    if stop_at is not None and time.perf_counter() >= stop_at:
        raise DeadlineExpired(f"{where}: past its deadline")


class Deadline:
    """Seconds from now (``None``: no deadline), measured with ``time.perf_counter``.

    Args:
        seconds: the time budget; ``None`` or ``inf`` = unlimited. Negative values count as 0.
        start: the ``perf_counter`` value the budget counts from (default: now), so that work
            already done (e.g. loading the model) is inside the budget.
    """

    def __init__(self, seconds: float | None = None, start: float | None = None):
        self.start = time.perf_counter() if start is None else float(start)
        self.seconds = None if seconds is None or math.isinf(seconds) else max(float(seconds), 0.0)

    @classmethod
    def of(cls, value: "Deadline | float | None") -> "Deadline":
        """``value`` itself if it is a Deadline, else ``Deadline(value)`` (seconds from now)."""
        return value if isinstance(value, Deadline) else cls(value)

    @classmethod
    def until(cls, at: float | None) -> "Deadline":
        """The deadline at ``perf_counter`` value ``at`` (``None``: unlimited)."""
        now = time.perf_counter()
        return cls(None if at is None else at - now, start=now)

    @property
    def at(self) -> float | None:
        """The ``perf_counter`` value of the deadline (``None``: unlimited)."""
        return None if self.seconds is None else self.start + self.seconds

    def elapsed(self) -> float:
        """Seconds since :attr:`start`."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left (``inf`` when unlimited, never below 0)."""
        if self.seconds is None:
            return math.inf
        return max(self.seconds - self.elapsed(), 0.0)

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def check(self) -> None:
        """Raise :class:`DeadlineExpired` if the deadline has passed."""
        if self.expired():
            raise DeadlineExpired(f"deadline of {self.seconds:g} s passed")

    def affords(self, cost: float) -> bool:
        """Whether a step expected to take ``cost`` seconds still ends before the deadline."""
        return self.remaining() > cost

    def limit(self, cap: float | None = None, floor: float = 1e-3) -> float | None:
        """A solver time limit: the time left, at most ``cap`` (``None``: no limit at all).
        Never below ``floor`` (solvers reject 0); callers stop before solving once expired."""
        left = self.remaining()
        if cap is not None:
            left = min(left, float(cap))
        return None if math.isinf(left) else max(left, floor)

    def share(self, parts: int) -> "Deadline":
        """A deadline for the next of ``parts`` equal shares of the time left."""
        if self.seconds is None:
            return Deadline(None)
        return Deadline(self.remaining() / max(int(parts), 1))

    def __repr__(self) -> str:
        return f"Deadline(seconds={self.seconds}, remaining={self.remaining():.3f})"
