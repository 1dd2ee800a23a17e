"""Live status of a parallel run: one line per project, its phase and elapsed time.

Under ``nox -j`` every project runs in its own process, so the projects tell the watcher through
files: :class:`StatusWriter` (an ``on_phase`` callback for :class:`~e2e_infra.run.session.
ProjectSession`) writes ``<results>/<project>/status.json`` atomically at each phase change, and
:func:`follow_run` polls those files (and the ``run.json`` a finished project leaves) until the run
ends, rendering them with ``rich.live`` on a terminal or as one plain line per change otherwise
(a pipe, or ``CI`` set).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..clock import wait_until
from ..config import Config
from ..errors import DeadlineExceeded
from ..resources.leases import process_start_time, process_state
from ..results.layout import Layout
from ..results.record import Result, RunRecord

__all__ = [
    "PlainProgress",
    "ProjectStatus",
    "StatusWriter",
    "follow_run",
    "read_status",
    "read_statuses",
    "use_live_display",
    "vanished",
]

# A status or run record older than the run's start (minus clock slack) is from an earlier run.
_SLACK = 1.0


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):  # a status line is never worth failing a run for
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(document) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class StatusWriter:
    """``on_phase(project, phase)``: record the current phase in ``<project>/status.json``, with
    the pid and start time of the process running it (for :func:`vanished`)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._started: dict[str, float] = {}
        self._pid = os.getpid()
        self._pid_start = process_start_time(self._pid)

    def path(self, project: str) -> Path:
        return self.config.layout.status(project)

    def __call__(self, project: str, phase: str) -> None:
        now = self.clock()
        started = self._started.setdefault(project, now)
        _write_json(
            self.path(project),
            {
                "project": project,
                "phase": phase,
                "started_at": started,
                "phase_started_at": now,
                "pid": self._pid,
                "pid_start": self._pid_start,
                "done": False,
            },
        )

    def finish(self, project: str, result: Result) -> None:
        now = self.clock()
        started = self._started.get(project, now)
        _write_json(
            self.path(project),
            {
                "project": project,
                "phase": result.value,
                "started_at": started,
                "phase_started_at": now,
                "finished_at": now,
                "pid": self._pid,
                "pid_start": self._pid_start,
                "done": True,
            },
        )


@dataclass(frozen=True)
class ProjectStatus:
    project: str
    phase: str  # "waiting" before its first phase; the result once done
    elapsed: float  # seconds since the project started; its duration once done
    done: bool = False
    result: Result | None = None

    @property
    def style(self) -> str:
        if self.result is not None:
            return self.result.style
        return "dim" if self.phase == "waiting" else "cyan"

    def line(self) -> str:
        if self.done:
            return f"{self.project}: {self.result} in {self.elapsed:.1f}s"
        if self.phase == "waiting":
            return f"{self.project}: waiting"
        return f"{self.project}: {self.phase} ({self.elapsed:.1f}s)"


def read_status(path: Path) -> dict[str, Any] | None:
    """A ``status.json`` as a mapping; None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_statuses(
    config: Config, projects: Iterable[str], since: float, *, now: float | None = None
) -> list[ProjectStatus]:
    """Where each project of a run that began at ``since`` stands, from the files it wrote."""
    now = time.time() if now is None else now
    out = []
    layout: Layout = config.layout
    for project in projects:
        run = RunRecord.load(layout.record(layout.project_dir(project)))
        if run is not None and run.started_at >= since - _SLACK:
            out.append(ProjectStatus(project, run.result.label, run.duration, True, run.result))
            continue
        status = read_status(layout.status(project))
        try:
            started = float(status["started_at"]) if status else 0.0
        except (KeyError, TypeError, ValueError):
            started = 0.0
        if status is None or started < since - _SLACK:
            out.append(ProjectStatus(project, "waiting", 0.0))
            continue
        phase = str(status.get("phase", "?"))
        if status.get("done"):
            finished = float(status.get("finished_at") or now)
            result = Result.parse(phase)
            out.append(ProjectStatus(project, phase, max(0.0, finished - started), True, result))
        else:
            out.append(ProjectStatus(project, phase, max(0.0, now - started)))
    return out


def vanished(config: Config, projects: Iterable[str]) -> dict[str, RunRecord]:
    """Projects of this run whose process died without a word: started (``status.json``), not
    finished, no record of this run, and the process that ran it proven gone (pid and start
    time). Each gets an ``error`` record naming the process, written where its own would be:
    the summary and ``report.html`` show it, and the run names it."""
    from ..results.record import Draft

    layout = config.layout
    found: dict[str, RunRecord] = {}
    for project in projects:
        status = read_status(layout.status(project))
        if status is None or status.get("done"):
            continue
        try:
            started = float(status["started_at"])
            pid = int(status["pid"])
            pid_start = float(status["pid_start"])
        except (KeyError, TypeError, ValueError):
            continue
        if any(run.started_at >= started - _SLACK for run in layout.records(project)):
            continue
        if process_state(pid, pid_start) not in ("gone", "reused"):
            continue  # alive (or not ours to inspect): no proof
        phase = str(status.get("phase", "?"))
        draft = Draft(
            project=project,
            run_id=layout.run or "",
            started_at=started,
            result=Result.ERROR,
            duration=max(time.time() - started, 0.0),
            error=(
                f"the process that ran {project} (pid {pid}) ended during its {phase} phase "
                "without recording a result: killed (SIGKILL, out of memory?); its guardian "
                "released what it held, `invoke e2e.cleanup` reclaims anything left"
            ),
        )
        found[project] = draft.freeze().write(layout.record(layout.project_dir(project)))
        now = time.time()
        done = {**status, "phase": Result.ERROR.value, "finished_at": now, "done": True}
        _write_json(layout.status(project), done)
    return found


def use_live_display(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """A live display on a terminal; plain lines in a pipe or when ``CI`` is set."""
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not environ.get("CI")


class PlainProgress:
    """One line per phase change, e.g. ``[   3.2s] auth_tests: suite (1.1s)``."""

    def __init__(self, file: IO[str], started: float) -> None:
        self.file = file
        self.started = started
        self._seen: dict[str, tuple[str, bool]] = {}

    def update(self, statuses: Sequence[ProjectStatus], now: float) -> None:
        for status in statuses:
            key = (status.phase, status.done)
            if self._seen.get(status.project) == key or status.phase == "waiting":
                continue
            self._seen[status.project] = key
            print(f"[{now - self.started:7.1f}s] {status.line()}", file=self.file, flush=True)

    def close(self) -> None:
        pass


class _LiveProgress:
    """A rich table redrawn in place: project, phase, elapsed."""

    def __init__(self, file: IO[str], started: float) -> None:
        from rich.console import Console
        from rich.live import Live

        self.started = started
        self.live = Live(console=Console(file=file), auto_refresh=False, transient=False)
        self.live.start()

    def update(self, statuses: Sequence[ProjectStatus], now: float) -> None:
        from rich.table import Table

        done = sum(s.done for s in statuses)
        table = Table(
            title=f"e2e run: {done}/{len(statuses)} done, {now - self.started:.0f}s",
            title_justify="left",
        )
        for column in ("project", "phase", "elapsed"):
            table.add_column(column)
        for s in statuses:
            style = s.style
            elapsed = f"{s.elapsed:.1f}s" if s.phase != "waiting" else "-"
            table.add_row(s.project, f"[{style}]{s.phase}[/]", elapsed)
        self.live.update(table, refresh=True)

    def close(self) -> None:
        self.live.stop()


def follow_run(
    config: Config,
    projects: Sequence[str],
    since: float,
    finished: Callable[[], bool],
    *,
    live: bool,
    file: IO[str],
    interval: float = 0.25,
) -> list[ProjectStatus]:
    """Show the projects' status until ``finished()`` is true; return the last statuses.

    The run itself is bounded (each project has its timeout, nox its own handling of signals), so
    this loop ends with it; it never waits on its own.
    """
    display: PlainProgress | _LiveProgress = (
        _LiveProgress(file, since) if live else PlainProgress(file, since)
    )
    # Bounded even if ``finished`` never turns true: every project run in turn, plus a margin.
    deadline = sum(config.projects[p].timeout for p in projects if p in config.projects) + 600.0
    last: list[ProjectStatus] = []
    done: dict[str, ProjectStatus] = {}  # a finished project's files are not read again

    def refresh() -> bool:
        nonlocal last
        over = finished()
        now = time.time()
        running = [p for p in projects if p not in done]
        fresh = {s.project: s for s in read_statuses(config, running, since, now=now)}
        done.update((name, status) for name, status in fresh.items() if status.done)
        last = [done.get(p) or fresh[p] for p in projects]
        display.update(last, now)
        return over

    try:
        wait_until(
            refresh, timeout=deadline, what="the run to finish", first=interval, cap=interval
        )
        return last
    except DeadlineExceeded:
        return last
    finally:
        display.close()
