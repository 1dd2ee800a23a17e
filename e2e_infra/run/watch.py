"""The watch over a running suite: servers that die, and what the project's processes cost.

One :class:`Watcher` thread per suite. It sleeps in one ``select`` on a pidfd per server leader
(readable the moment the leader ends) and on a pipe that :meth:`Watcher.stop` writes to, so it
wakes only when something happened or a sample is due: a wake-up costs CPU, and polling every
100 ms cost more than the watch's work. A server that exited without being asked to becomes a
:class:`ServerExit` (its name, exit status or signal, when, its masked log tail), and ``on_exit`` is
called for it (the session stops the suite when the server's ``on_exit`` is "stop"). Without
pidfds (an old kernel), or for a server whose pid is unknown, it polls every ``interval`` (100 ms).
Every ``sample_every`` (0.5 s) it sums the resident memory of the run's processes (servers,
suite, browsers: what carries the run's marker, see :mod:`e2e_infra.processes.containment`) and
keeps the peak. The loop ends when the suite does (:meth:`Watcher.stop`); the suite's own
timeout bounds it.

CPU is not sampled: the kernel adds a reaped child's CPU, and what that child reaped, to its
parent's ``children_user`` / ``children_system``. The suite and the servers are our children, and
the orphans they leave reparent to us (we are their subreaper), so :class:`CpuMeter` reads our
own counters before the suite and after the servers are stopped.

Why RSS, not PSS: ``/proc/<pid>/statm`` is one small read; PSS needs ``smaps_rollup``, measured
here at ~0.6 ms per process (~90 ms for 140 processes): too dear twice a second. RSS counts
pages shared between a browser's processes once per process, so for Chromium it overstates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from ..conninfo import mask_secrets
from ..processes.containment import MARKER, Containment, reap_orphans
from ..resources.leases import Owner, Registry
from ..results.record import Draft, Result

__all__ = ["MARKER", "CpuMeter", "RunWatch", "ServerExit", "Watcher"]

log = logging.getLogger("e2e_infra")

INTERVAL = 0.1
SAMPLE_EVERY = 0.5


class Watched(Protocol):
    """What the watcher needs of a server (:class:`~e2e_infra.run.servers.ServerProcess`)."""

    name: str

    @property
    def returncode(self) -> int | None: ...

    @property
    def stop_record(self) -> Any: ...

    @property
    def record(self) -> Any: ...  # its ProcessRecord (``pid``), None before it started

    def tail(self, lines: int = ...) -> str: ...


@dataclass(frozen=True)
class ServerExit:
    """A server that ended while the run still needed it."""

    server: str
    returncode: int | None
    at: float  # time.time() when it was seen gone
    during: str  # the phase: "suite", or "teardown" when only seen at release
    log_tail: str = ""

    @property
    def signal(self) -> str | None:
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        if self.signal is not None:
            how = f"was killed by {self.signal}"
        elif self.returncode is None:
            how = "exited"
        else:
            how = f"exited with status {self.returncode}"
        stamp = time.strftime("%H:%M:%S", time.localtime(self.at))
        when = "during the suite" if self.during == "suite" else "before the teardown"
        return f"server {self.server} {how} {when} (at {stamp})"

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "returncode": self.returncode,
            "signal": self.signal,
            "at": round(self.at, 3),
            "during": self.during,
            "log_tail": self.log_tail,
        }


def exit_of(server: Watched, during: str) -> ServerExit | None:
    """The exit of ``server`` if it ended on its own (not by our stop); None while it runs."""
    if server.stop_record is not None:
        return None
    returncode = server.returncode  # polls (and reaps) the leader
    if returncode is None:
        return None
    return ServerExit(server.name, returncode, time.time(), during, server.tail())


class CpuMeter:
    """CPU seconds of the children we reaped between :meth:`start` and :meth:`seconds`."""

    def __init__(self) -> None:
        self._start = self.reaped()

    @staticmethod
    def reaped() -> float:
        """CPU seconds of every child this process reaped so far (and what they reaped)."""
        times = os.times()
        return times.children_user + times.children_system

    def seconds(self) -> float:
        return max(self.reaped() - self._start, 0.0)


class Watcher(threading.Thread):
    """Polls the servers and samples the run's memory while the suite runs."""

    def __init__(
        self,
        servers: Sequence[Watched],
        *,
        on_exit: Callable[[ServerExit], None],
        members: Callable[[], Sequence[psutil.Process]] | None = None,
        interval: float = INTERVAL,
        sample_every: float = SAMPLE_EVERY,
        log_exits: bool = True,
    ) -> None:
        super().__init__(name="e2e-infra watch", daemon=True)
        self.log_exits = log_exits  # False: ``on_exit`` tells of it (an environment kept up)
        self.servers = list(servers)
        self.on_exit = on_exit
        self.members = members
        self.interval = interval
        self.sample_every = sample_every
        self.exits: list[ServerExit] = []
        self.peak_memory = 0
        self.samples = 0
        self.cpu_seconds = 0.0  # the watcher's own CPU: its cost
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() writes one byte: the loop wakes at once

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop and wait for it (an ``on_exit`` in progress may take its grace)."""
        self._done.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.is_alive():
            self.join(timeout)
        if not self.is_alive():
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def run(self) -> None:
        began = time.thread_time()
        next_sample = 0.0
        pidfds = self._pidfds()
        try:
            # Bounded by the suite: the session stops us as soon as the suite has ended.
            while not self._done.is_set():
                self._poll()
                for server in [s for s in pidfds if s not in self.servers or s.stop_record]:
                    os.close(pidfds.pop(server))  # reported, or stopped by us: no more to see
                now = time.monotonic()
                if self.members is not None and now >= next_sample:
                    self._sample()
                    next_sample = now + self.sample_every
                self._wait(pidfds, next_sample if self.members is not None else None)
        except Exception:  # a watch must never take the run down
            log.exception("the server watch stopped")
        finally:
            for fd in pidfds.values():
                os.close(fd)
            self.cpu_seconds = time.thread_time() - began

    def _pidfds(self) -> dict[Watched, int]:
        """A pidfd per server leader; one that has none is polled every ``interval``."""
        out: dict[Watched, int] = {}
        for server in self.servers:
            pid = getattr(getattr(server, "record", None), "pid", None)
            if pid is None:
                continue
            try:
                out[server] = os.pidfd_open(pid)
            except (AttributeError, OSError):
                continue
        return out

    def _wait(self, pidfds: dict[Watched, int], next_sample: float | None) -> None:
        """Sleep until a server ends, :meth:`stop` is called or the next sample is due."""
        timeout = None if next_sample is None else max(next_sample - time.monotonic(), 0.0)
        if len(pidfds) < len(self.servers):  # some server can only be polled
            timeout = self.interval if timeout is None else min(timeout, self.interval)
        select.select([self._wake_r, *pidfds.values()], [], [], timeout)

    def _poll(self) -> None:
        for server in list(self.servers):
            ended = exit_of(server, "suite")
            if ended is None:
                continue
            self.servers.remove(server)
            self.exits.append(ended)
            if self.log_exits:
                log.error("%s", ended.describe())
            self.on_exit(ended)

    def sample(self) -> int:
        """Resident bytes of the run's processes now (0 without a members function)."""
        total = 0
        for proc in self.members() if self.members is not None else ():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        total = self.sample()
        self.samples += 1
        self.peak_memory = max(self.peak_memory, total)


def suite_stopper(
    popen: Any, project: str, critical: set[str], grace: float = 5.0
) -> Callable[[ServerExit], None]:
    """The ``on_exit`` of a suite's watch: stop the suite when a server it needs dies.

    The suite shares our process group (it gets the run's Ctrl-C), so only its own tree is
    signalled; the session's wait for the suite then returns.
    """
    from ..processes import Child, escalation

    def on_exit(ended: ServerExit) -> None:
        if ended.server not in critical or popen.poll() is not None:
            return
        log.error("%s: stopping the suite: %s", project, ended.describe())
        Child(popen, own_group=False, what=f"the suite of {project}").stop(escalation(grace))

    return on_exit


def exits_error(exits: Sequence[ServerExit], critical: set[str], log_paths: dict[str, str]) -> str:
    """The run's error for servers that died: names each, and what to do next."""
    parts = [ended.describe() for ended in exits]
    first = exits[0].server
    where = f"; its log: {log_paths[first]}" if first in log_paths else ""
    if any(ended.server in critical and ended.during == "suite" for ended in exits):
        hint = (
            f'; the suite was stopped (set servers.{first}.on_exit = "continue" to let it '
            f"finish); find why it ended in its log{where}"
        )
    else:
        hint = f"; find why it ended in its log{where}"
    return "; ".join(parts) + hint


class RunWatch:
    """What one session keeps an eye on: its processes, its servers, what they cost.

    Writes its findings into the session's run record (``result``: ``leftovers``,
    ``server_stops``, ``server_exits``, ``resources``, and ``result``/``error``/``log_tail`` when a
    server died). Every method is a no-op before :meth:`open`, so a session that failed earlier
    releases without special cases.
    """

    def __init__(self, project: str, result: Draft, critical: set[str]) -> None:
        self.project = project
        self.result = result
        self.critical = critical  # servers whose death stops the suite (on_exit = "stop")
        self.contain: Containment | None = None
        self.watcher: Watcher | None = None
        self.cpu: CpuMeter | None = None
        self._began = (time.process_time(), CpuMeter.reaped())  # for tool_cpu_seconds

    def open(self, registry: Registry, owner: Owner) -> None:
        """Record the run's marker (intent first), then be the subreaper of what it starts."""
        self.contain = Containment.open(registry, owner, self.project)

    def tag(self, part: str) -> str:
        return self.contain.tag(part) if self.contain is not None else ""

    def sweep(self, part: str, what: str | None) -> None:
        """End what ``what`` (a marker part) left running; count it under ``part``."""
        if self.contain is None:
            return
        count = self.contain.end(what)
        if count:
            log.warning("%s: %s left %d process(es) running; ended them", self.project, part, count)
            self.result.leftovers[part] = self.result.leftovers.get(part, 0) + count

    def suite_started(self, popen: Any, servers: Sequence[Watched]) -> None:
        self.cpu = CpuMeter()
        members = self.contain.members if self.contain is not None else None
        stopper = suite_stopper(popen, self.project, self.critical)
        self.watcher = Watcher(servers, on_exit=stopper, members=members)
        self.watcher.start()

    def suite_ended(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.sweep("suite", "suite")

    def server_stopped(self, server: Watched) -> None:
        if server.stop_record is not None:
            self.result.server_stops[server.name] = server.stop_record.to_json()
        self.sweep(server.name, f"server:{server.name}")

    def exits(self, servers: Sequence[Watched]) -> list[ServerExit]:
        """The servers that died during the run: the watch's, and any found dead now."""
        exits = list(self.watcher.exits) if self.watcher is not None else []
        seen = {ended.server for ended in exits}
        for server in servers:
            if server.name not in seen and (ended := exit_of(server, "teardown")) is not None:
                exits.append(ended)
        return exits

    def close(self) -> None:
        """End whatever the run left, forget its marker; then record what its processes cost."""
        if self.contain is not None:
            contain, self.contain = self.contain, None
            count = contain.close()
            if count:
                self.result.leftovers["run"] = self.result.leftovers.get("run", 0) + count
        # What the servers' and suite's own processes left to us when they ended first (npm ->
        # sh -> node): reaped, so that their CPU is counted too (the whole tree).
        reap_orphans()
        if self.cpu is not None and self.watcher is not None:
            self.result.resources = {
                "peak_memory_bytes": self.watcher.peak_memory,
                "cpu_seconds": round(self.cpu.seconds(), 3),
                "samples": self.watcher.samples,
                "watch_cpu_seconds": round(self.watcher.cpu_seconds, 4),
            }

    def record_tool_cpu(self) -> None:
        """``resources.tool_cpu_seconds``: the tool's own CPU for this run, the kernel's count:
        what this process used since the session began (all its threads: one session per
        process on every path: a fork, a nox worker, sequential nox) and what it reaped besides
        the suite and servers (the guardian, a migrate command). The fork and exit of the
        session's process, and the run's fixed part (nox or invoke), are not in it."""
        if self.result.resources is None:
            return
        own = time.process_time() - self._began[0]
        others = CpuMeter.reaped() - self._began[1] - self.result.resources["cpu_seconds"]
        self.result.resources["tool_cpu_seconds"] = round(own + max(others, 0.0), 4)

    def fail_for(self, exits: Sequence[ServerExit], secrets: Sequence[str]) -> None:
        """A run whose server died is never ``passed``: name the server, its signal, its log."""
        if not exits:
            return
        result = self.result
        result.server_exits = [
            {**ended.to_json(), "log_tail": mask_secrets(ended.log_tail, tuple(secrets))}
            for ended in exits
        ]
        if result.result is Result.INTERRUPTED:
            return
        message = exits_error(exits, self.critical, result.logs)
        previous = result.error
        result.result = Result.ERROR
        result.error = mask_secrets(
            f"{message}{f'; {previous}' if previous else ''}", tuple(secrets)
        )
        if not result.log_tail and exits[0].log_tail:
            result.log_tail = mask_secrets(exits[0].log_tail, tuple(secrets))
