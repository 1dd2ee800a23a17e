"""The suite's process: started with its output shown and kept, leased, waited for within its
timeout, stopped by escalation, its lease removed once it ended.

The suite shares the session's process group (a terminal's Ctrl-C under nox reaches it too), so
only its own process tree is ever stopped. Its spawn and lease are one critical section: a signal
that arrives meanwhile is held and raised when the section ends, and from that moment on the
suite is inside the ``try`` whose handlers stop it, reap it and remove its lease: an interrupt at
any point leaves neither a running suite nor its lease behind.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SuiteFailedError
from ..processes import wait_exit
from ..processes.interrupts import Interrupts, signals_deferred
from ..processes.logs import Tee
from ..resources.leases import Lease

__all__ = ["Suite", "with_colour"]


@dataclass(frozen=True)
class Suite:
    """One run of a project's suite (see the module)."""

    project: str
    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    log: Path  # where its console output is kept (suite.log)
    timeout: float  # seconds; projects.<name>.timeout
    interrupts: Interrupts
    lease: Callable[[subprocess.Popen[bytes]], Lease]  # record it, for a reclaim
    forget: Callable[[Lease], None]  # remove that record
    started: Callable[[subprocess.Popen[bytes]], None]  # the watch begins
    ended: Callable[[], None]  # the watch ends; what the suite left is swept

    def run(self) -> int:
        """Run it to its end; its exit code. Raises :class:`SuiteFailedError` when it cannot
        start or runs past its timeout, and any interrupt (after stopping it)."""
        tee = Tee(self.log)
        proc: subprocess.Popen[bytes] | None = None
        lease: Lease | None = None
        try:
            with self.interrupts.critical():
                proc = self._spawn(tee)
                tee.started()
                lease = self.lease(proc)
            self.started(proc)
            try:
                return wait_exit(proc, self.timeout)
            except subprocess.TimeoutExpired:
                with self.interrupts.critical():
                    _terminate(proc, grace=5.0)
                raise SuiteFailedError(
                    f"the suite of {self.project} ran longer than its timeout "
                    f"({self.timeout:g}s) and was stopped; raise "
                    f"projects.{self.project}.timeout if it needs more",
                    project=self.project,
                    returncode=proc.returncode if proc.returncode is not None else -1,
                ) from None
        except BaseException:
            if proc is not None and proc.returncode is None:
                with signals_deferred():
                    _terminate(proc, grace=2.0)
            raise
        finally:
            with signals_deferred():
                if proc is not None:
                    self.ended()  # its leftovers (daemons too) are ended here
                tee.join()
                if lease is not None and proc is not None and proc.returncode is not None:
                    self.forget(lease)  # a suite that may still run keeps its lease

    def _spawn(self, tee: Tee) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                list(self.argv),
                cwd=self.cwd,
                env=with_colour(dict(self.env)),
                stdout=tee.fd,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise SuiteFailedError(
                f"cannot start the suite of {self.project} ({self.argv[0]}: {exc.strerror}); "
                f"check projects.{self.project}.command and cwd",
                project=self.project,
                returncode=127,
            ) from None


def with_colour(env: dict[str, str]) -> dict[str, str]:
    """The suite writes to a pipe (:class:`~e2e_infra.processes.logs.Tee`): keep its colours
    where it was shown on a terminal (``FORCE_COLOR``, which Node, Playwright and pytest read),
    unless the environment says otherwise."""
    if sys.stdout.isatty() and "FORCE_COLOR" not in env and "NO_COLOR" not in env:
        return {**env, "FORCE_COLOR": "1"}
    return env


def _terminate(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """SIGTERM, wait ``grace``, SIGKILL, reap: only it and its descendants (it shares our
    process group)."""
    from ..processes import Child, escalation

    Child(proc, own_group=False).stop(escalation(grace))
