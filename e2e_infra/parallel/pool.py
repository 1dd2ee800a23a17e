"""Many projects at once on a standard pool: ``invoke e2e.all`` without an interpreter per project.

:class:`ProjectPool` runs projects in a :class:`concurrent.futures.ProcessPoolExecutor` over
:mod:`multiprocessing`'s ``forkserver`` context, the modules every session imports preloaded
(:data:`WARM_MODULES`, :func:`multiprocessing.set_forkserver_preload`). ``jobs`` workers are
forked once from the warm server and each takes one project after another (as pytest-xdist keeps
its workers): a project costs its own work, not a fresh interpreter importing psycopg and the
tool (~0.3 s of CPU per project on a 2-core runner).

:func:`run_one` is the one body of a project's run on every path: a worker of this pool, a nox
session (in nox's own worker under ``nox -j``, or in the nox process), ``invoke e2e.run``.

Signals. Each worker leads its own process group, so a terminal's Ctrl-C reaches only this
process, which passes one SIGINT to every worker: the running projects release what they hold
(the session turns it into :class:`~e2e_infra.errors.Interrupted`), a worker between projects
remembers it, and no project starts after it (a shared stop event, checked under the same signal
handlers that interrupt a session). SIGTERM or SIGHUP to this process are treated the same. A
worker that dies (SIGKILL, the OOM killer) breaks the pool, which SIGTERMs the others: they
release and exit; its project is recorded as an error naming the process, the others' runs
(interrupted) and the ones that had not started run again on a new pool, once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import Interrupted
from ..results.record import Result, RunRecord

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

__all__ = ["INTERRUPT_GRACE", "WARM_MODULES", "Outcome", "ProjectPool", "run_one"]

log = logging.getLogger("e2e_infra")

# What a session imports on first use (psycopg above all): imported once, in the fork server.
WARM_MODULES = (
    "psycopg",
    "psutil",
    "e2e_infra.run.session",
    "e2e_infra.databases",
    "e2e_infra.run.servers",
    "e2e_infra.run.health",
    "e2e_infra.run.watch",
    "e2e_infra.run.reclaim",
    "e2e_infra.report.summary",
    "e2e_infra.report.junit",
    "e2e_infra.plan.matrix",
    "e2e_infra.run.playwright",
    "e2e_infra.run.guardian",
    "e2e_infra.report.progress",
    "e2e_infra.run.preflight",
    "e2e_infra.postgres",  # the local cluster: its check runs in every session
    "encodings.idna",  # http.client's first connection to "localhost" imports it (~15 ms)
)
INTERRUPT_GRACE = 60.0  # for the running projects to release what they hold after a Ctrl-C


@dataclass(frozen=True)
class Outcome:
    """One project's run as its runner reports it: its record, one error line (None: it
    passed), the lines to log, and where its console output went (if apart)."""

    project: str
    record: RunRecord | None
    error: str | None
    logs: tuple[str, ...] = ()
    output: Path | None = None

    @property
    def passed(self) -> bool:
        return self.error is None

    @property
    def result(self) -> Result:
        if self.record is not None:
            return self.record.result
        return Result.PASSED if self.error is None else Result.ERROR


def run_one(
    config: Config,
    project: str,
    posargs: Sequence[str] = (),
    *,
    record_duration: bool = True,
    attach: bool = False,
    reset: bool = True,
) -> Outcome:
    """Run one project to its end and say how it went (never raises but for an interrupt that
    came before anything was acquired). ``record_duration=False``: the caller records it.
    ``attach``: against its environment kept up by ``e2e.up`` (``reset``: its database first)."""
    from ..conninfo import mask_secrets
    from ..errors import E2EInfraError
    from ..report.progress import StatusWriter
    from ..run.session import run_project

    status = StatusWriter(config)  # status.json at each phase: the live table reads it
    try:
        if attach:
            from ..run.attach import run_attached

            record = run_attached(config, project, posargs, reset=reset)
        else:
            record = run_project(
                config, project, posargs, on_phase=status, record_duration=record_duration
            )
    except Interrupted as exc:  # released already; one line
        status.finish(project, Result.INTERRUPTED)
        return Outcome(project, None, f"{project}: {exc.one_line()}")
    except E2EInfraError as exc:  # its record could not be written (a full results folder)
        status.finish(project, Result.ERROR)
        return Outcome(project, None, f"{project}: {exc.one_line()}")
    except Exception as exc:  # a defect of ours: still one masked line, never a traceback
        status.finish(project, Result.ERROR)
        message = mask_secrets(" ".join(f"{type(exc).__name__}: {exc}".split()))
        return Outcome(
            project,
            None,
            f"{project}: unexpected {message[:500]} (a bug in e2e-infra: please report it; run "
            "`invoke e2e.cleanup` if anything was left behind)",
        )
    status.finish(project, record.result)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in record.phases.items())
    logs = [f"{project}: {record.result} in {record.duration:.2f}s ({phases})"]
    if record.log_tail:
        logs.append(f"last lines of the server log:\n{record.log_tail}")
    error = None
    if not record.passed:
        error = f"{project} {record.result}" + (f": {record.error}" if record.error else "")
    return Outcome(project, record, error, tuple(logs))


# --- the worker side ------------------------------------------------------------------------------


@dataclass
class _Worker:
    """This worker process's share of the pool (one per process: set by the initializer)."""

    stop: Event
    interrupted: int | None = None  # a SIGINT that came between projects


_worker: list[_Worker] = []  # the initializer's; a list so the module holds no rebinding global


def _init_worker(stop: Event, pids: Any, log_level: int) -> None:
    """In each worker, once: its own process group (the terminal's Ctrl-C reaches the pool's
    owner, which passes it on once), a SIGINT between projects remembered, logging, its pid."""
    os.setpgid(0, 0)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    worker = _Worker(stop)
    _worker.append(worker)

    def remember(signum: int, _frame: object) -> None:
        worker.interrupted = signum

    signal.signal(signal.SIGINT, remember)
    signal.signal(signal.SIGHUP, remember)
    logger = logging.getLogger("e2e_infra")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level)
        logger.propagate = False
    pids.put(os.getpid())


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (and so its children's) into ``path`` meanwhile."""
    from ..processes.logs import open_log

    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open_log(path, fresh=True) as out:  # a run id used again starts a new output
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _work(config: Config, project: str, posargs: Sequence[str], output: Path) -> Outcome:
    """In a worker: one project, its output into ``output``; not started after a stop."""
    from ..errors import E2EInfraError
    from ..files import RESULTS_SETTING, folder_error
    from ..processes.interrupts import Interrupts

    worker = _worker[0]
    interrupts = Interrupts()
    try:
        with interrupts.installed(), _output_to(output):
            if worker.interrupted is not None or worker.stop.is_set():
                raise Interrupted("interrupted before it started", signum=signal.SIGINT)
            outcome = run_one(config, project, posargs, record_duration=False)
    except Interrupted:
        return Outcome(project, None, f"{project}: interrupted before it started", (), output)
    except E2EInfraError as exc:  # its output file: a link, a full or read-only folder
        return Outcome(project, None, f"{project}: {exc.one_line()}", (), None)
    except OSError as exc:
        error = folder_error(output, exc, setting=RESULTS_SETTING, what="write")
        return Outcome(project, None, f"{project}: {error.one_line()}", (), None)
    interrupted = outcome.record is not None and outcome.record.result is Result.INTERRUPTED
    if interrupted and not worker.stop.is_set() and worker.interrupted is None:
        # Not our stop: the pool broke and SIGTERMed its workers. Leave, or the pool's shutdown
        # would wait for this worker forever.
        os._exit(128 + signal.SIGTERM)
    return Outcome(project, outcome.record, outcome.error, outcome.logs, output)


# --- the owner's side -----------------------------------------------------------------------------


@dataclass
class _Run:
    projects: list[str]
    finished: dict[str, Outcome] = field(default_factory=dict)
    retried: set[str] = field(default_factory=set)


class ProjectPool:
    """``jobs`` warm workers running projects one after another; see the module."""

    def __init__(
        self,
        config: Config,
        jobs: int,
        *,
        on_finished: Callable[[Outcome], None] | None = None,
        grace: float = INTERRUPT_GRACE,
    ) -> None:
        self.config = config
        self.jobs = max(jobs, 1)
        self.on_finished = on_finished
        self.grace = grace
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(WARM_MODULES))
        self._stop = self._context.Event()
        self._pids = self._context.SimpleQueue()
        self._known: set[int] = set()
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._running: dict[str, Future[Outcome]] = {}

    def run(self, projects: Sequence[str]) -> list[Outcome]:
        """Run ``projects``; return their outcomes in the order given. A Ctrl-C (or SIGTERM,
        SIGHUP) stops the run: the running projects release what they hold (waited for up to
        ``grace``), the others never start, and it is raised again."""
        from ..processes.interrupts import Interrupts

        state = _Run(list(dict.fromkeys(projects)))
        self.config.layout.make_run_dir()
        durations: dict[str, float] = {}
        try:
            with Interrupts().installed():
                remaining = state.projects
                while remaining:
                    remaining = self._round(state, remaining)
        except (KeyboardInterrupt, Interrupted):
            self.interrupt()
            raise
        finally:
            for outcome in state.finished.values():
                if outcome.record is not None and outcome.record.timed:
                    durations[outcome.project] = outcome.record.duration
            from ..results.durations import record_durations

            record_durations(self.config, durations)
        return [state.finished[p] for p in state.projects if p in state.finished]

    def _round(self, state: _Run, projects: list[str]) -> list[str]:
        """One pool over ``projects``; the projects to run again on a new pool (if it broke)."""
        executor = ProcessPoolExecutor(
            max_workers=min(self.jobs, len(projects)),
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(self._stop, self._pids, log.getEffectiveLevel()),
        )
        self._executor = executor
        broken: list[str] = []
        try:
            futures = {}
            for project in projects:
                output = self.config.layout.output_log(project)
                future = executor.submit(_work, self.config, project, [], output)
                futures[project] = future
                with self._lock:
                    self._running[project] = future
            for project, future in futures.items():
                try:
                    outcome = self._wait(project, future)
                except BrokenProcessPool:
                    broken.append(project)
                    continue
                except CancelledError:  # stopped before it started
                    outcome = Outcome(project, None, f"{project}: interrupted before it started")
                finally:
                    with self._lock:
                        self._running.pop(project, None)
                self._finish(state, outcome)
        finally:
            executor.shutdown(wait=not broken, cancel_futures=True)
        return self._after_break(state, broken) if broken else []

    def _wait(self, project: str, future: Future[Outcome]) -> Outcome:
        # Short waits, so that a signal to this process is handled at once (one long wait would
        # hold it until the project ends). Bounded: the project's own timeout, then its teardown.
        timeout = self.config.projects[project].timeout if project in self.config.projects else 0
        deadline = time.monotonic() + timeout + self.grace + 600.0
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                return future.result(timeout=0.5)
        return Outcome(project, None, f"{project}: its worker never answered (over {timeout:g}s)")

    def _finish(self, state: _Run, outcome: Outcome) -> None:
        state.finished[outcome.project] = outcome
        if self.on_finished is not None:
            self.on_finished(outcome)

    def _after_break(self, state: _Run, broken: list[str]) -> list[str]:
        """A worker died and the pool with it: the project it ran is recorded as an error naming
        it; the others (interrupted by the pool, or not started) run again on a new pool, once."""
        from ..report.progress import vanished

        dead = vanished(self.config, broken)
        again = []
        for project in broken:
            record = dead.get(project)
            if record is None and project in state.retried:
                runs = self.config.layout.records(project)
                record = runs[-1] if runs else None
            if record is not None or project in state.retried:
                why = record.error if record is not None and record.error else "no record"
                output = self.config.layout.output_log(project)
                self._finish(state, Outcome(project, record, f"{project}: {why}", (), output))
            else:
                state.retried.add(project)
                again.append(project)
        if again:
            log.warning(
                "a worker of the pool died; running again on a new pool: %s", ", ".join(again)
            )
        return again

    def interrupt(self) -> None:
        """Stop: no project starts any more; one SIGINT to each worker; wait for the running
        ones to release (up to the grace). Idempotent; callable from any thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            running = list(self._running.values())
        for future in running:
            future.cancel()
        while not self._pids.empty():
            self._known.add(self._pids.get())
        for pid in self._known:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + self.grace
        for future in running:
            with contextlib.suppress(Exception):
                future.result(timeout=max(deadline - time.monotonic(), 0.0))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
