"""Time as a small protocol, and the one deadline-bound wait of the library.

Every wait in e2e-infra goes through :func:`wait_until`: it polls with a growing interval against a
monotonic deadline and raises :class:`~e2e_infra.errors.DeadlineExceeded` naming what it waited
for. Tests pass a :class:`~e2e_infra.testing.FakeClock` instead of sleeping.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from .errors import DeadlineExceeded

__all__ = ["Clock", "SystemClock", "backoff", "wait_until"]

T = TypeVar("T")


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def time(self) -> float:
        return time.time()


def backoff(first: float = 0.01, factor: float = 2.0, cap: float = 0.25) -> Iterator[float]:
    """Poll intervals: ``first``, then multiplied by ``factor`` up to ``cap``, forever."""
    delay = first
    for _ in itertools.count():  # unbounded on purpose: every consumer holds a deadline
        yield delay
        delay = min(delay * factor, cap)


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    clock: Clock | None = None,
    first: float = 0.01,
    cap: float = 0.25,
    hint: str = "",
) -> T:
    """Call ``check`` until it returns something other than ``None``/``False``; return that.

    Raises DeadlineExceeded after ``timeout`` seconds, naming ``what`` (and ``hint``, the fix).
    ``check`` may raise to abort the wait early (a process that exited, say).
    """
    clock = clock or SystemClock()
    deadline = clock.monotonic() + timeout
    for delay in backoff(first=first, cap=cap):
        result = check()
        if result is not None and result is not False:
            return result
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            break
        clock.sleep(min(delay, remaining))
    message = f"timed out after {timeout:g}s waiting for {what}"
    if hint:
        message += f"; {hint}"
    raise DeadlineExceeded(message, what=what, timeout=timeout)
