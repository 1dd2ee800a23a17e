"""Signals during a run: SIGINT/SIGTERM/SIGHUP become :class:`Interrupted`, except where a
section must finish (spawn + record, stop + forget) or while tearing down."""

from __future__ import annotations

import contextlib
import signal
import sys
import types
from collections.abc import Iterator

from .errors import Interrupted

__all__ = ["Interrupts", "in_main_thread", "signals_deferred"]


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

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if sys.platform == "win32" or not in_main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot leave leftovers."""
    if sys.platform == "win32" or not in_main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
