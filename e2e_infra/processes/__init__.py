"""Child processes: one way to spawn them, one way to stop them by escalation.

* :func:`spawn` starts a command (no shell) as the leader of a new session and process group, or,
  for a suite that must get the run's own Ctrl-C, inside ours; stdin closed, stdout + stderr to a
  log file, ``pass_fds`` inherited. It returns a :class:`Child`.
* :class:`Stoppable` holds the policy of every stop: a ladder of :class:`Step` (a signal, then a
  bounded wait for the end), each wait under a monotonic deadline; idempotent; it ends with a frozen
  :class:`StopRecord` saying how the processes ended. Its subclasses only say how to signal their
  processes and how to tell they are gone: :class:`Child` (one we spawned: its whole group, or only
  its own tree when it shares ours) and :class:`Processes` (found by psutil: a postmaster, the
  leftovers of a crashed run). The usual ladder is :func:`escalation`: SIGTERM, a grace, SIGKILL.
* :func:`kill_group_if_ours` / :func:`kill_tree_if_ours` end what a crashed run recorded, only on
  proof (pid + start time) that the processes are still the ones it recorded.
* :func:`child_environ` is the one place that says what of the tool's environment a child that
  runs the user's code may see (servers, suites, health commands, migrate and seed commands,
  Playwright's report merge): never the admin's credentials nor the tool's own plumbing
  (:data:`NOT_FOR_CHILDREN`).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from ..clock import Clock, SystemClock, wait_until
from ..config import ENVIRONMENT_VARIABLES
from ..errors import DeadlineExceeded
from .logs import open_log

__all__ = [
    "KILL",
    "NOT_FOR_CHILDREN",
    "Child",
    "Ending",
    "Marked",
    "ProcessRecord",
    "Processes",
    "Step",
    "StopRecord",
    "Stoppable",
    "child_environ",
    "escalation",
    "group_members",
    "kill_group_if_ours",
    "kill_tree_if_ours",
    "spawn",
    "start_time",
    "wait_exit",
]

log = logging.getLogger("e2e_infra")

# What a child never inherits from the tool (see child_environ):
# * every setting the tool reads (ENVIRONMENT_VARIABLES): E2E_ADMIN_DATABASE_URL is a superuser's
#   URL, and the others are the tool's configuration, none of a server's or suite's business;
# * the tool's own plumbing: the run id the main nox process hands its workers (E2E_NOX_RUN_ID,
#   one of those settings);
# * libpq's variables that choose a server, an account or a credential: libpq completes the admin
#   URL from them (a URL without a password takes PGPASSWORD), and a child's bare `psql` would
#   log in with them. A child's database is DATABASE_URL (or PG* set from it in `env`).
# Kept: E2E_RUN_ID (documented for suites), and the containment marker E2E_INFRA_RUN.
NOT_FOR_CHILDREN = frozenset(
    (ENVIRONMENT_VARIABLES - {"E2E_RUN_ID"})
    | {
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLROOTCERT",
        "PGSSLCRL",
        "PGSSLCRLDIR",
        "PGREQUIREPEER",
        "PGKRBSRVNAME",
        "PGGSSLIB",
        "PGTARGETSESSIONATTRS",
    }
)

KILL_WAIT = 5.0  # after SIGKILL: only a process stuck in the kernel takes longer
_START_TIME_TOLERANCE = 0.05  # seconds; as in leases.py (psutil's start times have tick precision)
# While a leader lives, checking for the end is one waitpid: poll finely. A coarser backoff (up to
# 250 ms) added ~80 ms to every server's teardown on average.
_POLL_FIRST, _POLL_CAP = 0.005, 0.02


# --- the record of a stop -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One rung of a stop: send ``signal``, then wait up to ``wait`` seconds for the end."""

    signal: signal.Signals
    wait: float


Ladder = tuple[Step, ...]

#: For what needs no grace (a probe that overran, an interrupted command): SIGKILL and reap.
KILL: Ladder = (Step(signal.SIGKILL, KILL_WAIT),)


def escalation(grace: float, first: signal.Signals = signal.SIGTERM) -> Ladder:
    """``first`` (SIGTERM), up to ``grace`` seconds to exit, then SIGKILL and up to 5 s more."""
    return (Step(first, max(grace, 0.0)), Step(signal.SIGKILL, KILL_WAIT))


class Ending(enum.Enum):
    """How the processes of a stop ended."""

    EXITED = "exited"  # on their own, before any signal was sent
    TERMINATED = "terminated"  # after a signal that asks (SIGTERM, SIGINT, SIGQUIT...)
    KILLED = "killed"  # after SIGKILL
    SURVIVED = "survived"  # still there after the last rung (stuck in the kernel)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class StopRecord:
    """How a stop ended.

    ``signal`` is the last signal sent (None: nothing was sent); ``returncode`` the leader's, when
    it is our child (negative: the signal that ended it); ``seconds`` from the first signal to the
    end.
    """

    ending: Ending
    signal: signal.Signals | None = None
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def ended(self) -> bool:
        return self.ending is not Ending.SURVIVED

    def describe(self) -> str:
        """One phrase for logs and reports: ``exited with status 0``, ``killed by SIGKILL ...``."""
        if self.ending is Ending.EXITED:
            if self.returncode is None:
                return "exited"
            if self.returncode < 0:
                return f"was killed by {_signal_name(-self.returncode)}"
            return f"exited with status {self.returncode}"
        assert self.signal is not None
        if self.ending is Ending.SURVIVED:
            return f"survived {self.signal.name}"
        verb = "killed" if self.ending is Ending.KILLED else "stopped"
        return f"{verb} by {self.signal.name} after {self.seconds:.2f}s"

    def to_json(self) -> dict[str, Any]:
        return {
            "ending": self.ending.value,
            "signal": self.signal.name if self.signal is not None else None,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 3),
        }


# --- the policy -----------------------------------------------------------------------------------


class Stoppable(abc.ABC):
    """Stop some processes by a ladder of signals; the policy, whatever the processes are.

    Subclasses give the mechanism: :meth:`_send` a signal to every process they cover and
    :meth:`_gone` (all of them ended; our own child reaped); :meth:`_returncode` if one is ours.
    """

    def __init__(self, what: str, *, clock: Clock | None = None) -> None:
        self.what = what
        self.clock: Clock = clock or SystemClock()
        self._began: float | None = None  # monotonic time of the first signal
        self._first: signal.Signals | None = None
        self._record: StopRecord | None = None

    @abc.abstractmethod
    def _send(self, signum: signal.Signals) -> None:
        """Signal every process; one that is already gone is no error."""

    @abc.abstractmethod
    def _gone(self) -> bool:
        """Whether every process has ended (zombies count as ended; our own child is reaped)."""

    def _returncode(self) -> int | None:
        return None

    @property
    def stop_record(self) -> StopRecord | None:
        """How the stop ended; None until :meth:`stop` returned."""
        return self._record

    def _finish(self, ending: Ending, signum: signal.Signals | None) -> StopRecord:
        seconds = 0.0 if self._began is None else self.clock.monotonic() - self._began
        self._record = StopRecord(ending, signum, self._returncode(), seconds)
        return self._record

    def begin(self, ladder: Ladder) -> None:
        """Send the ladder's first signal and return at once; :meth:`stop` then waits.

        Lets a caller stop several things in parallel: begin all, then stop each. The first rung's
        wait counts from here.
        """
        if self._record is not None or self._began is not None:
            return
        if self._gone():
            self._finish(Ending.EXITED, None)
            return
        self._began = self.clock.monotonic()
        self._first = ladder[0].signal
        self._send(ladder[0].signal)

    def stop(self, ladder: Ladder) -> StopRecord:
        """Climb ``ladder`` until the processes are gone; the same record on every later call."""
        if self._record is not None:
            return self._record
        if self._began is None:
            if self._gone():
                return self._finish(Ending.EXITED, None)
            self._began = self.clock.monotonic()
        for index, step in enumerate(ladder):
            wait = step.wait
            if index == 0 and self._first is step.signal:  # begin() sent it already
                wait -= self.clock.monotonic() - self._began
            else:
                self._send(step.signal)
            try:
                wait_until(
                    self._gone,
                    timeout=max(wait, 0.0),
                    what=f"{self.what} to exit after {step.signal.name}",
                    clock=self.clock,
                    first=_POLL_FIRST,
                    cap=_POLL_CAP,
                )
            except DeadlineExceeded:
                if index + 1 < len(ladder):
                    log.info(
                        "%s did not stop within %gs of %s; sending %s",
                        self.what,
                        step.wait,
                        step.signal.name,
                        ladder[index + 1].signal.name,
                    )
                continue
            ending = Ending.KILLED if step.signal is signal.SIGKILL else Ending.TERMINATED
            return self._finish(ending, step.signal)
        log.warning("%s survived %s", self.what, ladder[-1].signal.name)
        return self._finish(Ending.SURVIVED, ladder[-1].signal)


# --- finding processes ----------------------------------------------------------------------------


def start_time(pid: int) -> float | None:
    """psutil's start time of ``pid``, zombies included (None when there is no such process)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def group_members(pgid: int, since: float) -> list[psutil.Process]:
    """Live (non-zombie) processes in group ``pgid`` started at or after ``since``; never us."""
    members = []
    me = os.getpid()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.create_time() < since - _START_TIME_TOLERANCE:
                continue
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        members.append(proc)
    return members


def _signal_all(procs: Sequence[psutil.Process], signum: int) -> None:
    for proc in procs:
        # psutil re-checks the start time before sending: a reused pid is left alone.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signum)


def _all_gone(procs: Sequence[psutil.Process]) -> bool:
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return True


# --- the mechanisms -------------------------------------------------------------------------------


class Processes(Stoppable):
    """Processes found by psutil (not our children): each is signalled only while it is itself."""

    def __init__(
        self, procs: Sequence[psutil.Process], what: str, *, clock: Clock | None = None
    ) -> None:
        super().__init__(what, clock=clock)
        self.procs = tuple(procs)

    def _send(self, signum: signal.Signals) -> None:
        _signal_all(self.procs, signum)

    def _gone(self) -> bool:
        return _all_gone(self.procs)


class Marked(Processes):
    """Processes found by a marker (:mod:`e2e_infra.processes.containment`), found again at
    every signal.

    ``refind`` returns the marked processes alive now: a process that forks while being stopped
    gets the next signal too, and the stop ends only when nothing marked is left.
    """

    def __init__(
        self,
        procs: Sequence[psutil.Process],
        refind: Callable[[], Sequence[psutil.Process]],
        what: str,
        *,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(procs, what, clock=clock)
        self.refind = refind

    def _send(self, signum: signal.Signals) -> None:
        known = {proc.pid for proc in self.procs}
        self.procs += tuple(proc for proc in self.refind() if proc.pid not in known)
        _signal_all(self.procs, signum)


@dataclass(frozen=True)
class ProcessRecord:
    """What identifies a started process for a later cleanup: goes into its lease data."""

    pid: int
    pgid: int
    start_time: float

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "pgid": self.pgid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        pid, pgid, start = data["pid"], data["pgid"], data["start_time"]
        for name, value in (("pid", pid), ("pgid", pgid)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 1:
                raise ValueError(f"bad process record {name} {value!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise ValueError(f"bad process record start_time {start!r}")
        return cls(pid=pid, pgid=pgid, start_time=float(start))


class Child(Stoppable):
    """A process we spawned.

    ``own_group``: it leads its own process group, and a stop signals the whole group (stragglers
    that outlive the leader too). Otherwise it shares our group (a suite that must get the run's
    Ctrl-C): a stop signals only it and its descendants, never the rest of the group.
    """

    def __init__(
        self,
        popen: subprocess.Popen[Any],
        *,
        own_group: bool = True,
        what: str = "",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(what or f"process {popen.pid}", clock=clock)
        self.popen = popen
        self.own_group = own_group
        # Not reaped yet (the caller has just made it), so the pid and its start time are its own.
        started = start_time(popen.pid) if popen.returncode is None else None
        self.record = ProcessRecord(
            pid=popen.pid,
            pgid=popen.pid if own_group else os.getpgrp(),
            start_time=started if started is not None else time.time(),
        )
        self._tree: dict[int, psutil.Process] = {}

    def __repr__(self) -> str:
        return f"<Child {self.what} pid {self.popen.pid}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _returncode(self) -> int | None:
        return self.popen.returncode

    def _descendants(self) -> list[psutil.Process]:
        if self.popen.poll() is None:  # not reaped: the pid is still our child's
            with contextlib.suppress(psutil.Error):
                for proc in psutil.Process(self.popen.pid).children(recursive=True):
                    self._tree.setdefault(proc.pid, proc)
        return list(self._tree.values())

    def _send(self, signum: signal.Signals) -> None:
        if not self.own_group:
            descendants = self._descendants()
            if self.popen.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signum)
            _signal_all(descendants, signum)
        elif self.popen.returncode is None:
            # The leader is not reaped, so the group id is still ours: signal the whole group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.record.pgid, signum)
        else:
            _signal_all(group_members(self.record.pgid, self.record.start_time), signum)

    def _gone(self) -> bool:
        if self.popen.poll() is None:
            return False
        if self.own_group:
            return not group_members(self.record.pgid, self.record.start_time)
        return _all_gone(list(self._tree.values()))


def wait_exit(popen: subprocess.Popen[Any], timeout: float) -> int:
    """``popen.wait(timeout)`` without its polling: block on a pidfd until the child ends.

    ``Popen.wait`` with a timeout wakes up to every 50 ms to call ``waitpid``; each wake-up costs
    CPU (~0.1 ms here), ~60 per 3 s suite. A pidfd becomes readable when the process ends: one
    wake-up. Raises :class:`subprocess.TimeoutExpired` like ``Popen.wait``; a signal handler's
    exception (an interrupt) propagates from the wait.
    """
    if popen.returncode is not None:
        return popen.returncode
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel), or reaped already
        return popen.wait(timeout=timeout)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        raise subprocess.TimeoutExpired(popen.args, timeout)
    return popen.wait()  # it has ended: this reaps it at once


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) without :data:`NOT_FOR_CHILDREN`: the base of the
    environment of every child that runs the user's code. The caller adds what the child is given
    (DATABASE_URL with the project's own role, its ports, ...)."""
    source = os.environ if environ is None else environ
    return {key: value for key, value in source.items() if key not in NOT_FOR_CHILDREN}


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | IO[bytes] | int | None = subprocess.DEVNULL,
    stdin: int | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    own_group: bool = True,
    what: str = "",
    clock: Clock | None = None,
) -> Child:
    """Start ``argv`` (no shell); the one way e2e-infra starts a child process.

    ``log``: a path (appended to), an open binary file or ``subprocess.DEVNULL`` receives stdout
    and stderr; None inherits ours. ``own_group`` makes it the leader of a new session and process
    group, so a stop reaches everything it starts that stays in the group. ``env`` is the child's
    whole environment (None: ours). Raises OSError when it cannot be started: the caller names the
    fix.
    """
    if isinstance(log, Path):
        with open_log(log) as handle:
            return spawn(
                argv,
                cwd=cwd,
                env=env,
                log=handle,
                stdin=stdin,
                pass_fds=pass_fds,
                own_group=own_group,
                what=what,
                clock=clock,
            )
    popen = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=stdin,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=own_group,
        close_fds=True,
        pass_fds=tuple(pass_fds),
    )
    return Child(popen, own_group=own_group, what=what, clock=clock)


# --- what a crashed run left ----------------------------------------------------------------------


def kill_group_if_ours(
    record: ProcessRecord, *, grace: float = 5.0, clock: Clock | None = None
) -> bool:
    """End the process group of ``record`` if, and only if, its processes are provably ours.

    Ours means: the leader (``record.pid``) runs with the recorded start time, or, when the leader
    is gone, processes in group ``record.pgid`` that started at or after the leader (a forked
    worker that outlived it). A pid reused by an unrelated process is never touched. SIGTERM,
    ``grace`` seconds, then SIGKILL. Returns True if something was signalled.
    """
    leader_start = start_time(record.pid)
    if leader_start is not None and abs(leader_start - record.start_time) > _START_TIME_TOLERANCE:
        # The pid belongs to another process now. Linux does not reuse a pid while it is a live
        # group's id, so the recorded group is empty; whatever shares the number is not ours.
        return False
    members = group_members(record.pgid, record.start_time)
    if not members:
        return False
    log.info(
        "ending leftover server process group %d (%s)",
        record.pgid,
        ", ".join(str(proc.pid) for proc in members),
    )
    Processes(members, f"process group {record.pgid}", clock=clock).stop(escalation(grace))
    return True


def kill_tree_if_ours(
    record: ProcessRecord, *, grace: float = 5.0, clock: Clock | None = None
) -> bool:
    """End ``record.pid`` and its descendants if its start time proves it is still ours.

    For a process that shares its group with others (a suite runs in the group of the run that
    started it): the rest of the group is never touched. Returns True if something was signalled.
    """
    started = start_time(record.pid)
    if started is None or abs(started - record.start_time) > _START_TIME_TOLERANCE:
        return False
    try:
        root = psutil.Process(record.pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    log.info("ending leftover process %d and its %d descendants", record.pid, len(members) - 1)
    Processes(members, f"process {record.pid}", clock=clock).stop(escalation(grace))
    return True
