"""Signals during a run: SIGINT/SIGTERM/SIGHUP become :class:`Interrupted`, except where a
section must finish (spawn + record, stop + forget) or while tearing down."""

from __future__ import annotations

import contextlib
import signal
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import Interrupted

__all__ = ["Interrupts", "handlers_installed", "in_main_thread", "signals_deferred"]

_Handler = Callable[[int, Any], Any] | int | signal.Handlers


class Interrupts:
    """SIGINT/SIGTERM/SIGHUP become :class:`Interrupted`, but never inside a critical section.

    A signal that arrives while the session spawns a process and records its lease (or stops one
    and forgets it) is held until the section ends and raised there, so no process can be
    started without a lease or lose its lease while it still runs.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    @staticmethod
    def error(signum: int) -> Interrupted:
        return Interrupted(
            f"interrupted by {signal.Signals(signum).name}; released what the run held",
            signum=signum,
        )

    def handler(self, signum: int, _frame: types.FrameType | None) -> None:
        if self.depth:
            self.pending = self.pending or signum
            return
        raise self.error(signum)

    def installed(self) -> contextlib.AbstractContextManager[None]:
        return handlers_installed(self.SIGNALS, self.handler)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise self.error(signum)


def signals_deferred() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot leave leftovers."""
    return handlers_installed(Interrupts.SIGNALS, signal.SIG_IGN)


@contextlib.contextmanager
def handlers_installed(signals: Iterable[int], handler: _Handler) -> Iterator[None]:
    """``handler`` for ``signals`` meanwhile, the previous ones restored after (only the main
    thread may set handlers: elsewhere, nothing changes)."""
    if sys.platform == "win32" or not in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
