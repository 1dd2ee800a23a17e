"""Projects run from one warm process: each in a fork of a :class:`~.forkserver.ForkServer`.

Two callers. Under ``nox -j`` the main nox process starts the server and each nox worker asks it
to run its session (:mod:`e2e_infra.cli.sessions`). ``invoke e2e.all`` / ``e2e.affected`` go one
step further with :class:`Batch`: no nox workers at all, so a project costs a ``fork`` and its own
work, not a fresh interpreter importing nox (~0.3 s of CPU per project on a 2-core runner).

:func:`project_outcome` is the one body of a project's run on every path (nox session in a
worker, fork of the server, batch): JSON-able in and out, the logs to print and one error line.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .forkserver import Call, ForkServer, start

__all__ = ["Batch", "Finished", "preload", "project_outcome"]

# What a session imports on first use (psycopg above all): imported once, in the server.
WARM_MODULES = (
    "psycopg",
    "psutil",
    "e2e_infra.session",
    "e2e_infra.databases",
    "e2e_infra.servers",
    "e2e_infra.health",
    "e2e_infra.watch",
    "e2e_infra.reclaim",
    "e2e_infra.report",
    "e2e_infra.junit",
    "e2e_infra.matrix",
    "e2e_infra.playwright",
    "e2e_infra.guardian",
    "e2e_infra.progress",
    "e2e_infra.preflight",
    "e2e_infra.postgres",  # the local cluster: its check runs in every session
    "encodings.idna",  # http.client's first connection to "localhost" imports it (~15 ms)
)
INTERRUPT_GRACE = 60.0  # for the running projects to release what they hold after a Ctrl-C


def preload() -> None:
    """In the fork server, once: what every session imports, so that no child imports it."""
    for module in WARM_MODULES:
        importlib.import_module(module)


def project_outcome(
    config: Config, project: str, posargs: Sequence[str], *, record_duration: bool = True
) -> dict[str, Any]:
    """Run one project: ``{"logs": [...], "error": one line or None, "duration": seconds or
    None}`` (never raises). ``record_duration=False``: the caller records ``duration``."""
    from .conninfo import mask_secrets
    from .errors import E2EInfraError
    from .progress import StatusWriter
    from .session import run_project

    # status.json at each phase: `invoke e2e.all` shows it live.
    status = StatusWriter(config)
    try:
        result = run_project(
            config, project, posargs, on_phase=status, record_duration=record_duration
        )
    except E2EInfraError as exc:  # an interrupt: released already; one line
        status.finish(project, "interrupted")
        return {"logs": [], "error": f"{project}: {exc.one_line()}"}
    except Exception as exc:  # a defect of ours: still one masked line, never a traceback
        status.finish(project, "error")
        message = mask_secrets(" ".join(f"{type(exc).__name__}: {exc}".split()))
        return {
            "logs": [],
            "error": f"{project}: unexpected {message[:500]} (a bug in e2e-infra: please report "
            "it; run `invoke e2e.cleanup` if anything was left behind)",
        }
    status.finish(project, result.result)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in result.phases.items())
    logs = [f"{project}: {result.result} in {result.duration:.2f}s ({phases})"]
    if result.log_tail:
        logs.append(f"last lines of the server log:\n{result.log_tail}")
    error = None
    if not result.passed:
        error = f"{project} {result.result}" + (f": {result.error}" if result.error else "")
    return {"logs": logs, "error": error, "duration": result.duration if result.timed else None}


@dataclass(frozen=True)
class Finished:
    """One project of a batch: its log lines, its error line (None: passed), its output file."""

    project: str
    logs: tuple[str, ...]
    error: str | None
    output: Path

    @property
    def passed(self) -> bool:
        return self.error is None


class Batch:
    """Projects running ``jobs`` at a time, each in a fork of one warm server.

    A thread per running project holds its request; the child writes what the session prints to
    ``<run dir>/<project>.output.log``. A pool thread's child takes the thread's next project too
    (:meth:`~.forkserver.Call.again`): ``jobs`` children for the whole batch, not a fork and an
    exit per project (~20 ms of CPU each: the fork, the pages a child copies, its exit).
    :meth:`interrupt` passes a Ctrl-C on to every running project (they release what they hold)
    and drops the ones not started. The projects' durations are recorded together by
    :meth:`close` (each update reads and rewrites the whole durations file under its lock: per
    project, that grew with the number of projects).
    """

    def __init__(
        self,
        config: Config,
        server: ForkServer,
        projects: Sequence[str],
        jobs: int,
        on_finished: Callable[[Finished], None] | None,
    ) -> None:
        self.config = config
        self.server = server
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self._calls: dict[str, Call] = {}
        self._idle: dict[int, Call] = {}  # per pool thread: its child, waiting for a project
        self._durations: dict[str, float] = {}  # recorded together by close()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="e2e-infra batch")
        self._futures: list[Future[Finished]] = [
            self._pool.submit(self._run, project) for project in projects
        ]

    @classmethod
    def start(
        cls,
        config: Config,
        projects: Sequence[str],
        jobs: int,
        on_finished: Callable[[Finished], None] | None = None,
    ) -> Batch | None:
        """Start the server and the first ``jobs`` projects; ``None`` if no server can run here.

        Call it before any other thread starts (a live display): the server is a fork of this
        process.
        """

        def handler(payload: Mapping[str, Any]) -> dict[str, Any]:
            project, posargs = str(payload["project"]), list(payload["posargs"])
            return project_outcome(config, project, posargs, record_duration=False)

        server = ForkServer.start(handler, preload)
        if server is None:
            return None
        config.run_dir.mkdir(parents=True, exist_ok=True)
        return cls(config, server, projects, max(jobs, 1), on_finished)

    def _run(self, project: str) -> Finished:
        from .logs import open_log

        output = self.config.run_dir / f"{project}.output.log"
        call = None
        if not self._stopping:
            with self._lock:
                kept = self._idle.pop(threading.get_ident(), None)
            payload = {"project": project, "posargs": []}
            with open_log(output) as out, open(os.devnull, "rb") as devnull:
                stdio = (devnull.fileno(), out.fileno(), out.fileno())
                # This thread's child from its last project, else a new fork of the server.
                if kept is not None and kept.again(payload, stdio):
                    call = kept
                else:
                    call = start(payload, self.server.address, stdio)
        if call is None:
            reason = "interrupted before it started" if self._stopping else "no fork server"
            answer: dict[str, Any] = {"error": f"{project}: {reason}"}
        else:
            with self._lock:
                self._calls[project] = call
                stopping = self._stopping
            if stopping:  # a Ctrl-C came while it was being started
                call.signal(signal.SIGINT)
            answer = call.result(keep=True)
            with self._lock:
                self._calls.pop(project, None)
                if self._stopping:
                    call.close()
                else:
                    self._idle[threading.get_ident()] = call
                if isinstance(answer.get("duration"), (int, float)):
                    self._durations[project] = float(answer["duration"])
        finished = Finished(project, tuple(answer.get("logs", ())), answer.get("error"), output)
        if self.on_finished is not None:
            self.on_finished(finished)
        return finished

    def done(self) -> bool:
        return all(future.done() for future in self._futures)

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Pass ``signum`` on to the running projects; the queued ones do not start."""
        with self._lock:
            self._stopping = True
            calls = list(self._calls.values())
        for future in self._futures:
            future.cancel()
        for call in calls:
            call.signal(signum)

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """The finished projects, in the order given; waits at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for future in self._futures:
            if future.cancelled():
                continue
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                results.append(future.result(timeout=left))
        return results

    def close(self) -> None:
        """Stop the pool and the server (the running children, if any, finish on their own);
        record the finished projects' durations in one update of the durations file."""
        from .matrix import record_durations

        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle, self._idle = list(self._idle.values()), {}
            durations, self._durations = self._durations, {}
        for call in idle:
            call.close()
        self.server.close()  # its children, idle now, exit with it
        record_durations(self.config, durations)
