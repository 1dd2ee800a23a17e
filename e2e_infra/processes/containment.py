"""Containment: every process a run starts, and everything those start, is found and ended.

A process group is not enough: a suite's ``sleep 30 &`` stays in its group but outlives the
suite's own stop when the suite shares our group, a ``setsid`` double-forked daemon leaves every
group and reparents to pid 1, and a SIGKILL of the run between a spawn and its lease record leaves a
process nobody knows of. Two Linux mechanisms close those gaps without privileges:

* **A child subreaper.** The session process calls ``prctl(PR_SET_CHILD_SUBREAPER)``: orphaned
  descendants (daemons included) reparent to it rather than to pid 1, so they stay in its process
  tree, where :func:`descendants` finds them by walking ``/proc/<pid>/task/*/children``.
* **An environment marker, recorded first.** Every child inherits ``E2E_INFRA_RUN=<token>``
  (``<token>:suite``, ``<token>:server:<name>`` for the suite and servers; migrate and seed
  commands inherit the bare token from our environment). The token is written to the lease
  registry (kind ``contained``) *before* anything is spawned. So after a SIGKILL of the run, even in
  the window between a spawn and its own lease, the guardian, the next run and ``e2e.cleanup``
  find the run's processes by their environment (:func:`sweep_dead`): only once the lease's
  owner is provably dead, and only processes started after the run's process did.

Cgroups would contain as well, but creating one needs root or a delegated systemd scope (on this
CI image, as root, the v1 hierarchies are writable; an ordinary user's are not) and leaves state
outside the checkout; the marker and the subreaper work for any user. A process that clears its
own environment *and* escapes our tree (a second subreaper that dies first) is the one way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

from ..resources.leases import Lease, Owner, Registry
from . import Marked, escalation

__all__ = [
    "CONTAINED_KIND",
    "MARKER",
    "Containment",
    "descendants",
    "marked_descendants",
    "marker_of",
    "reap_orphans",
    "set_subreaper",
    "sweep_dead",
]

log = logging.getLogger("e2e_infra")

MARKER = "E2E_INFRA_RUN"
CONTAINED_KIND = "contained"
LEFTOVER_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for what a phase left behind
_START_TOLERANCE = 0.05  # psutil start times have clock-tick precision
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


# --- the mechanisms ------------------------------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def set_subreaper(on: bool) -> bool | None:
    """Make this process a child subreaper (or not); return the previous state.

    None when the kernel does not offer it (not Linux, or before 3.4): callers then scan every
    process for the marker instead of only our tree.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    previous = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
        return None
    if prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        return None
    return bool(previous.value)


def descendants(pid: int, descend: Callable[[int], bool] | None = None) -> list[int]:
    """Every descendant of ``pid`` (children of all its threads), read from ``/proc``.

    Cheaper than psutil's ``children(recursive=True)``, which reads every process on the machine:
    this reads only the tree's own files. ``descend(child)`` False: ``child`` is listed, but what
    it started is not walked.
    """
    found: list[int] = []
    stack = [pid]
    seen = {pid}
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as handle:
                    children = handle.read().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in seen:
                    seen.add(child)
                    found.append(child)
                    if descend is None or descend(child):
                        stack.append(child)
    return found


_MARKER_ENTRY = MARKER.encode() + b"="


def _environ_marker(pid: int) -> str | None:
    """The marker in ``pid``'s environment, "" when it has none, None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    for entry in data.split(b"\0"):
        if entry.startswith(_MARKER_ENTRY):
            return entry[len(_MARKER_ENTRY) :].decode("utf-8", "replace")
    return ""


def marked_descendants(pid: int) -> list[tuple[int, str]]:
    """The descendants of ``pid`` that carry a marker (any run's), each with its value.

    Reads ``/proc/<pid>/environ`` itself (psutil's ``environ()`` also reads the start time and the
    boot time). The walk does not enter a process whose environment it read without a marker:
    the embedded cluster's postmaster and its backends (one per connection, new pids all the
    time), a guardian. A marker is inherited, so what such a process starts carries none unless
    it sets one back on purpose. A process whose environment cannot be read is entered.
    """
    markers: dict[int, str | None] = {}

    def descend(child: int) -> bool:
        markers[child] = value = _environ_marker(child)
        return value != ""

    return [(child, value) for child in descendants(pid, descend) if (value := markers.get(child))]


def marker_of(proc: psutil.Process) -> str | None:
    """The marker in ``proc``'s environment; None if it has none or cannot be read."""
    try:
        return proc.environ().get(MARKER)
    except (psutil.Error, OSError):
        return None


def _matches(value: str | None, token: str, what: str | None) -> bool:
    if value is None:
        return False
    if what is None:
        return value == token or value.startswith(token + ":")
    return value == (f"{token}:{what}" if what else token)


def _find(
    candidates: Iterable[int], token: str, what: str | None, since: float, exclude: set[int]
) -> list[psutil.Process]:
    found = []
    for pid in candidates:
        if pid in exclude:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.create_time() < since - _START_TOLERANCE:
                continue
        except psutil.Error:
            continue
        if _matches(marker_of(proc), token, what):
            found.append(proc)
    return found


def _started_since(pids: Iterable[int], since: float) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() >= since - _START_TOLERANCE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap_orphans() -> int:
    """Reap every child of ours that has ended and nobody waited for; how many.

    As the run's subreaper we adopt what a server's or suite's own process leaves when it ends
    first: ``npm run dev`` -> ``sh`` -> ``node``, where npm exits on SIGTERM without waiting for
    its child. Those end as zombies of ours, and only a reaped child's CPU (and what it reaped)
    reaches our ``children_user``/``children_system`` (:class:`~e2e_infra.run.watch.CpuMeter`):
    unreaped, a server's grandchildren's CPU went uncounted. Only zombies are reaped, so a child
    a ``Popen`` still waits for (the guardian, alive) is never taken from it; the session calls
    this after its suite and servers were waited for."""
    count = 0
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                state = handle.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                count += 1
    return count


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{pid}/task/{task}/children", "rb") as handle,
        ):
            out += [int(child) for child in handle.read().split()]
    return out


def _reap(pids: Iterable[int]) -> None:
    """Reap the ended orphans that reparented to us (the subreaper is their parent now)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


# --- one session ---------------------------------------------------------------------------------


@dataclass
class Containment:
    """The containment of one session: its token, its lease, its sweeps.

    Made by :meth:`open` before the session spawns anything; :meth:`close` ends what is left and
    forgets the lease. Sweeps run after the part's own leader was reaped, so what they reap is
    never a child a ``Popen`` still waits for.
    """

    registry: Registry
    token: str
    since: float
    lease: Lease
    subreaper: bool | None  # our state before open(); None: the kernel has no subreaper
    _env_before: str | None = None
    _marked: dict[int, bool] = field(default_factory=dict)  # pid -> carries our marker
    _procs: dict[int, psutil.Process] = field(default_factory=dict)  # members, by pid

    @classmethod
    def open(cls, registry: Registry, owner: Owner, project: str) -> Containment:
        token = uuid.uuid4().hex[:16]
        # psutil's start times are boot time + clock ticks, not time.time() (here they differed by
        # ~0.7 s): compare with the owner's own start, on the same clock. Whatever carries the
        # token started after the owner did.
        since = owner.start_time
        lease = Lease(
            kind=CONTAINED_KIND,
            resource=f"{project}/{token}",
            project=project,
            owner=owner,
            data={"marker": token, "since": since},
        )
        with registry.transaction() as txn:  # intent first: before any spawn
            txn.add(lease)
        previous = set_subreaper(True)
        self = cls(registry, token, since, lease, previous)
        # Inherited by every child, also those started by the layers below (migrate and seed
        # commands build their environment from ours).
        self._env_before = os.environ.get(MARKER)
        os.environ[MARKER] = token
        return self

    def tag(self, what: str) -> str:
        """The marker value of one part of the run: ``suite``, ``server:backend``."""
        return f"{self.token}:{what}"

    def _candidates(self) -> Iterable[int]:
        if self.subreaper is not None:
            return descendants(os.getpid())
        return psutil.pids()  # no subreaper: orphans are pid 1's, so look everywhere

    def _in_tree(self, what: str | None) -> list[int] | None:
        """Our descendants carrying this run's marker (``what`` as in :meth:`find`); None
        without a subreaper (then every process must be looked at)."""
        if self.subreaper is None:
            return None
        marked = marked_descendants(os.getpid())
        return [pid for pid, value in marked if _matches(value, self.token, what)]

    def find(self, what: str | None = None) -> list[psutil.Process]:
        """Live processes carrying this run's marker (``what``: one part; "": the bare token)."""
        pids = self._in_tree(what)
        if pids is None:
            procs = _find(psutil.pids(), self.token, what, self.since, {os.getpid()})
        else:  # their markers are read already: only the start time is left to check
            procs = _started_since(pids, self.since)
        return [p for p in procs if _alive(p)]

    def end(self, what: str | None = None, grace: float = LEFTOVER_GRACE) -> int:
        """End what one part of the run left (all of it, when ``what`` is None); how many."""
        procs = self.find(what)
        if not procs:
            return 0
        label = "the run" if what is None else (what or "migrate/seed commands")
        log.info(
            "ending %d leftover process(es) of %s: %s",
            len(procs),
            label,
            ", ".join(f"{p.pid}" for p in procs),
        )
        pids = {p.pid for p in procs}

        def refind() -> list[psutil.Process]:
            more = self.find(what)  # what forks while being stopped is caught too
            pids.update(p.pid for p in more)
            return more

        Marked(procs, refind, f"leftovers of {label}").stop(escalation(grace))
        _reap(pids)
        return len(pids)

    def members(self) -> list[psutil.Process]:
        """The run's live processes for a resource sample."""
        pids = self._in_tree(None)
        if pids is not None:
            out = []
            for pid in pids:  # one psutil.Process per pid: making one reads its start time
                proc = self._procs.get(pid)
                if proc is None:
                    try:
                        proc = self._procs[pid] = psutil.Process(pid)
                    except psutil.Error:
                        continue
                out.append(proc)
            return out
        out = []  # no subreaper: every process on the machine, each pid's environment read once
        for pid in self._candidates():
            marked = self._marked.get(pid)
            if marked is None:
                try:
                    proc = psutil.Process(pid)
                except psutil.Error:
                    continue
                marked = self._marked[pid] = _matches(marker_of(proc), self.token, None)
            if marked:
                with contextlib.suppress(psutil.Error):
                    out.append(psutil.Process(pid))
        return out

    def close(self) -> int:
        """End everything still marked as this run's, forget the lease, restore our state."""
        try:
            count = self.end(None)
        finally:
            if self._env_before is None:
                os.environ.pop(MARKER, None)
            else:
                os.environ[MARKER] = self._env_before
            if self.subreaper is not None:
                set_subreaper(self.subreaper)
        with self.registry.transaction() as txn:
            txn.remove(self.lease)
        return count


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- what a dead run left ------------------------------------------------------------------------


def sweep_dead(lease: Lease, *, grace: float = LEFTOVER_GRACE) -> int:
    """End every process carrying the marker of ``lease``, a provably dead run's; how many.

    The caller has proved the owner dead (pid + start time). Only processes that started after the
    owner did are touched; the token is random, so nothing else carries it.
    """
    token = str(lease.data["marker"])
    since = float(lease.data["since"])
    procs = [p for p in _find(psutil.pids(), token, None, since, {os.getpid()}) if _alive(p)]
    if not procs:
        return 0

    def refind() -> list[psutil.Process]:
        found = _find(psutil.pids(), token, None, since, {os.getpid()})
        return [p for p in found if _alive(p)]

    log.info(
        "ending %d process(es) of dead run %s (%s): %s",
        len(procs),
        lease.owner.run_id,
        lease.project,
        ", ".join(str(p.pid) for p in procs),
    )
    Marked(procs, refind, f"processes of dead run {lease.owner.run_id}").stop(escalation(grace))
    return len(procs)
