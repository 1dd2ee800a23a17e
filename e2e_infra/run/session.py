"""The lifecycle of one project: acquire -> migrate/seed -> start -> test -> release.

:class:`ProjectSession` is a context manager. Entering it leases the project's ports, clones its
database from the fingerprinted template, starts its servers in dependency order and waits until
each is healthy; it yields a :class:`ProjectEnv` with the environment for the suite. Leaving it
stops the servers, drops (or keeps) the database and releases the ports, in reverse order, also on
an exception, SIGINT or SIGTERM, and writes ``<results>/<project>/run.json`` with the duration of
every phase.

A SIGKILL cannot be caught, so every session also starts a *guardian*: a small detached process
(:mod:`e2e_infra.run.guardian`) that waits for the session's process to end and, if it died holding
leases, reclaims them. The next run and ``invoke e2e.cleanup`` reclaim the same leftovers by proof
of death too (:func:`reclaim`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..clock import Clock, SystemClock
from ..config import Config, ProjectConfig, ServerConfig
from ..conninfo import mask_secrets
from ..errors import ConfigError, E2EInfraError, Interrupted
from ..files import ensure_private_dir
from ..processes.interrupts import Interrupts, signals_deferred
from ..resources.leases import Lease, Owner, Registry, new_run_id, process_start_time
from ..results.record import Draft, Result, RunRecord
from . import playwright
from .reclaim import SERVER_KIND, reclaim
from .servers import Placeholders, process_env
from .startup import ServerStart, StartHooks
from .suite import Suite
from .watch import MARKER, RunWatch
from .workspace import Workspace

if TYPE_CHECKING:
    import socket

    from ..databases.engine import Allocated, DatabaseEngine
    from .guardian import Guardian
    from .servers import ServerProcess

__all__ = [
    "PHASES",
    "ProjectEnv",
    "ProjectSession",
    "RunResult",
    "run_project",
    "run_session",
]

log = logging.getLogger("e2e_infra")

PHASES = ("ports", "database", "servers", "health", "suite", "teardown")
PhaseCallback = Callable[[str, str], None]  # (project, phase)


@dataclass(frozen=True)
class ProjectEnv:
    """What the suite gets: where things are, as values and as environment variables."""

    project: str
    run_id: str
    results_dir: Path
    ports: Mapping[str, int]
    database: str | None
    env: Mapping[str, str]


RunResult = RunRecord  # what run_project returned before the one run record (a public name)


class ProjectSession:
    """Acquire everything one project needs; release it all on exit."""

    def __init__(
        self,
        config: Config,
        project: str,
        *,
        run_id: str | None = None,
        registry: Registry | None = None,
        workspace: Workspace | None = None,
        clock: Clock | None = None,
        keep_on_failure: bool | None = None,
        on_phase: PhaseCallback | None = None,
        guardian: bool = True,
        teardown_grace: float | None = None,
        record_duration: bool = True,
        write_record: bool = True,
    ) -> None:
        self.config = config
        self.project: ProjectConfig = config.project(project)
        self.run_id = run_id or new_run_id()
        self.workspace = workspace or Workspace(config, registry=registry)
        self.registry = self.workspace.registry
        self.clock = clock or SystemClock()
        self.keep_on_failure = (
            config.keep_on_failure if keep_on_failure is None else keep_on_failure
        )
        self.on_phase = on_phase
        self.use_guardian = guardian
        self.record_duration = record_duration  # False: the caller records it (a batch, at once)
        self.write_record = write_record  # False: no run of the suite to record (`e2e.up`)
        self.teardown_grace = teardown_grace
        self.owner = Owner.current(host=config.host_id, run_id=self.run_id)
        self.ports = self.workspace.ports
        self.result = Draft(project=project, run_id=self.run_id, started_at=time.time())
        self.layout = config.layout
        self.results_dir = self.layout.project_dir(project)
        self.failed = False
        self._servers: list[tuple[ServerProcess, Lease]] = []  # start order
        self._database: Allocated | None = None
        self._engine: DatabaseEngine | None = None
        self._guardian: Guardian | None = None
        self._secrets: tuple[str, ...] = ()
        self._placeholders: Placeholders | None = None
        self._outputs: playwright.Outputs | None = None  # a Playwright config's own reports
        self._record: RunRecord | None = None
        self.record_error: E2EInfraError | None = None  # its run.json could not be written
        self._phase_start = 0.0
        self._started = self.clock.monotonic()
        self.env: ProjectEnv | None = None
        self._interrupts = Interrupts()
        critical = {n for n in self.project.servers if config.servers[n].on_exit == "stop"}
        self._watch = RunWatch(project, self.result, critical)  # containment + server watch

    @property
    def database(self) -> Allocated | None:
        """The database handed to this session, once acquired."""
        return self._database

    @property
    def servers(self) -> list[ServerProcess]:
        """The servers running for this session, in start order."""
        return [process for process, _lease in self._servers]

    @property
    def record(self) -> RunRecord:
        """The run's record as last written (as it stands now before the first write)."""
        return self._record if self._record is not None else self.result.freeze()

    # --- phases -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_phase:
            self.on_phase(self.project.name, name)
        start = self.clock.monotonic()
        try:
            yield
        finally:
            self.result.phases[name] = self.result.phases.get(name, 0.0) + (
                self.clock.monotonic() - start
            )

    def __enter__(self) -> ProjectEnv:
        from .preflight import check_project
        from .prepare import ensure_prepared

        try:  # before anything is acquired: a bad folder or cwd leaves nothing to release
            check_project(self.config, self.project)
            # The run's prepare steps: once per run, whichever runner (a config with no run chosen:
            # this session is the run).
            ensure_prepared(self.config if self.config.run else self.config.for_run(self.run_id))
        except E2EInfraError as exc:
            self.failed = True
            self._note_error(exc)
            self._write_record()
            raise
        self._signals = self._interrupts.installed()
        self._signals.__enter__()
        try:
            self.env = self._acquire()
        except BaseException as exc:
            self.failed = True
            self._note_error(exc)
            self._release()
            self._signals.__exit__(None, None, None)
            raise
        return self.env

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if exc is not None:
            self.failed = True
            self._note_error(exc)
        try:
            self._release()
        finally:
            self._signals.__exit__(None, None, None)

    def _note_error(self, exc: BaseException) -> None:
        self.result.note_error(exc, self._secrets)
        if self.result.result is Result.INTERRUPTED:
            # Recorded before the teardown: nox -j SIGKILLs its workers 2 s after an interrupt.
            self.result.duration = self.clock.monotonic() - self._started
            self._write_record()

    # --- acquire ----------------------------------------------------------------------------------

    def _acquire(self) -> ProjectEnv:
        project = self.project
        for name in project.servers:
            server = self.config.servers[name]
            if server.needs_database and not project.database:
                raise ConfigError(
                    f"project {project.name} runs server {name}, which needs a database; set "
                    f"database = true for the project or drop {name} from its servers",
                    key=f"projects.{project.name}.servers",
                )
        with self._interrupts.critical():  # each started and recorded, or neither: no leak
            self._start_guardian()
            self._watch.open(self.registry, self.owner)  # before the first spawn
        with self.phase("ports"):
            # What runs SIGKILLed with their guardian left (orphan servers and suites, ports): the
            # next run ends it on proof of death. A dead run's database goes when its name is
            # cloned again, or with `invoke e2e.cleanup`.
            reclaim(self.config, registry=self.registry, databases=False, ports=False)
            ports, others = self.ports.allocate_for_run(
                project.name, self.config.port_names, self.owner
            )
            self.result.ports = dict(ports)
            stale = [f"{server}.log" for server in self.config.servers]
            self.results_dir = self.layout.claim_project_dir(
                project.name, self.run_id, others=others, stale=stale
            )
        database_url = ""
        if project.database:
            with self.phase("database"):
                engine: DatabaseEngine = self.workspace.databases
                self._engine = engine
                self._database = engine.allocate(project.name, self.owner, seed=project.seed)
                database_url = self._database.url.url
                if self._database.url.password:
                    self._secrets = (self._database.url.password,)
                self.result.database = self._database.name
                self.result.seed = self._database.seed
                self.result.template = dict(self._database.provenance)
                self._watch.sweep("database", "")  # what migrate/seed commands left
        placeholders = Placeholders(
            project=project.name,
            run_id=self.run_id,
            root=self.config.root,
            results_dir=self.results_dir,
            ports=dict(ports),
            database_url=database_url,
        )
        from .servers import server_order

        hooks = self._start_hooks()
        for level in server_order(self.config, project.servers):
            for name in level:
                placeholders = ServerStart(self.config.servers[name], hooks).run(placeholders)
        self._placeholders = placeholders
        return ProjectEnv(
            project=project.name,
            run_id=self.run_id,
            results_dir=self.results_dir,
            ports=dict(placeholders.ports),
            database=self.result.database,
            env=self._suite_env(placeholders),
        )

    def _start_hooks(self) -> StartHooks:
        return StartHooks(
            project=self.project.name,
            spawn=self._spawn_server,
            stop=self._forget_server,
            move_port=self._move_port,
            phase=self.phase,
            healthy=self.result.server_startups.__setitem__,
        )

    def restart_server(self, name: str) -> ServerProcess:
        """Start server ``name`` again as it was started (it died; ``e2e.up --restart``), healthy
        before this returns; the session's environment follows a port it had to move."""
        if self.env is None or self._placeholders is None:
            raise RuntimeError("restart_server() needs an entered ProjectSession")
        for entry in [entry for entry in self._servers if entry[0].name == name]:
            self._stop_server(*entry)  # reaped, its lease forgotten
            self._servers.remove(entry)
        placeholders = ServerStart(self.config.servers[name], self._start_hooks()).run(
            self._placeholders
        )
        self._placeholders = placeholders
        self.env = replace(
            self.env, ports=dict(placeholders.ports), env=self._suite_env(placeholders)
        )
        return next(process for process, _lease in self._servers if process.name == name)

    def _base_env(self, placeholders: Placeholders) -> dict[str, str]:
        return process_env(
            self.project.name,
            self.run_id,
            self.results_dir,
            placeholders.ports,
            placeholders.database_url,
        )

    def _suite_env(self, placeholders: Placeholders) -> dict[str, str]:
        from .servers import render

        env = self._base_env(placeholders)
        values = placeholders.values()
        own = {k: render(v, values) for k, v in self.project.env.items()}
        if playwright.runs_playwright_test(self.project):
            with self.phase("suite"):  # Playwright reads its config (cached after the first run)
                self._outputs = playwright.outputs_of(self.config, self.project, {**env, **own})
        env.update(playwright.suite_env(self.project, self.results_dir, keep=self._outputs))
        env.update(own)
        return env

    def _spawn_server(
        self, server: ServerConfig, placeholders: Placeholders, listener: socket.socket | None
    ) -> ServerProcess:
        """Start ``server`` (not yet healthy) and record its lease, signals held meanwhile."""
        from .health import parse_health
        from .servers import ServerProcess, render, render_command

        port = placeholders.ports.get(server.port) if server.port else None
        fd = listener.fileno() if listener is not None else ""
        values = placeholders.values(port=port if port is not None else "", fd=fd)
        env = self._base_env(placeholders)
        if port is not None:
            env["PORT"] = str(port)
        if listener is not None:
            env["E2E_LISTEN_FD"] = str(fd)
        env.update({k: render(v, values) for k, v in server.env.items()})
        env[MARKER] = self._watch.tag(f"server:{server.name}")
        process = ServerProcess(
            server.name,
            render_command(server.command, values),
            cwd=server.cwd,
            env=env,
            log_path=self.layout.server_log(self.results_dir, server.name),
            health=parse_health(render(server.health, values), port=port, cwd=server.cwd, env=env),
            startup_timeout=server.startup_timeout,
            stop_timeout=server.stop_timeout,
            clock=self.clock,
            secrets=self._secrets,
            port=port,
            pass_fds=(listener.fileno(),) if listener is not None else (),
        )
        self.result.logs[server.name] = str(process.log_path)
        with self.phase("servers"), self._interrupts.critical():
            record = process.start()
            lease = self._lease_process(
                server.name,
                record.pid,
                pgid=record.pgid,
                start_time=record.start_time,
                port=port,
                log=str(process.log_path),
            )
            self._servers.append((process, lease))
        return process

    def _forget_server(self, process: ServerProcess) -> None:
        """Stop a server that failed to start, and forget it."""
        for entry in list(self._servers):
            if entry[0] is process:
                self._stop_server(*entry)
                self._servers.remove(entry)

    def _move_port(self, name: str) -> int:
        new_port = self.ports.reallocate(self.project.name, name, self.owner)
        self.result.ports[name] = new_port
        return new_port

    # --- the suite --------------------------------------------------------------------------------

    def run_suite(self, posargs: Sequence[str] = ()) -> int:
        """Run the project's suite with the session's environment; return its exit code."""
        from .servers import render_command

        if self.env is None or self._placeholders is None:
            raise RuntimeError("run_suite() needs an entered ProjectSession")
        argv = render_command(self.project.command, self._placeholders.values())
        argv = [*playwright.suite_argv(self.project, argv, self.results_dir), *posargs]
        started = time.time()
        self.result.suite_log = str(self.layout.suite_log(self.results_dir))
        suite = Suite(
            project=self.project.name,
            argv=argv,
            cwd=self.project.cwd,
            env={**self.env.env, MARKER: self._watch.tag("suite")},
            log=self.layout.suite_log(self.results_dir),
            timeout=self.project.timeout,
            interrupts=self._interrupts,
            lease=self._record_suite,
            forget=self._forget_lease,
            started=lambda proc: self._watch.suite_started(proc, self.servers),
            ended=self._watch.suite_ended,
        )
        with self.phase("suite"):
            # Same process group as this process: nox's interrupt reaches the suite too.
            returncode = suite.run()
        if self._engine is not None and self._engine.proof_lost():
            self.failed, self.result.result = True, Result.ERROR
            self._engine.check_holds()  # raises: its database's proof of life was lost
        self.result.returncode = returncode
        files = playwright.after_suite(
            self.project, self.results_dir, self._outputs, started=started, secrets=self._secrets
        )
        self.result.junit = files.junit
        self.result.playwright_report = files.html_report
        if returncode == 0:
            self.result.result = Result.PASSED
        else:
            self.failed = True
            self.result.result = Result.FAILED
        return returncode

    def _record_suite(self, proc: subprocess.Popen[bytes]) -> Lease:
        """Record the suite like a server, so that if this process is SIGKILLed the guardian, the
        next run or ``e2e.cleanup`` ends it too. It shares our process group, so only its own
        process tree may be ended (``scope: tree``), never the rest of the group."""
        start = process_start_time(proc.pid)
        return self._lease_process(
            "suite",
            proc.pid,
            pgid=os.getpgrp(),
            start_time=start if start is not None else 0.0,
            scope="tree",
        )

    def _forget_lease(self, lease: Lease) -> None:
        with self.registry.transaction() as txn:
            txn.remove(lease)

    def _lease_process(self, name: str, pid: int, **data: Any) -> Lease:
        """Record a process of this run (``pgid``, ``start_time``...) for a later reclaim."""
        lease = Lease(
            kind=SERVER_KIND,
            resource=f"{self.project.name}/{name}/{pid}",
            project=self.project.name,
            owner=self.owner,
            data={"name": name, "pid": pid, **data},
        )
        with self.registry.transaction() as txn:
            return txn.add(lease)

    # --- release ----------------------------------------------------------------------------------

    def _stop_server(self, process: ServerProcess, lease: Lease) -> None:
        if self.teardown_grace is not None:
            process.stop_timeout = min(process.stop_timeout, self.teardown_grace)
        process.stop()
        with self.registry.transaction() as txn:
            txn.remove(lease)
        self._watch.server_stopped(process)

    def _release(self) -> None:
        errors: list[str] = []
        with signals_deferred(), self.phase("teardown"):
            exits = self._watch.exits([process for process, _lease in self._servers])
            # Servers first, the dependents before what they depend on: SIGTERM all, then wait.
            if self.result.ports and not self.registry.path.is_file():
                lost = f"the lease registry {self.registry.path} disappeared during the run"
                log.warning("%s: %s; releasing what it holds from memory", self.project.name, lost)
            for process, _lease in reversed(self._servers):
                with contextlib.suppress(Exception):
                    process.terminate()
            for process, lease in reversed(self._servers):
                try:
                    self._stop_server(process, lease)
                except Exception as exc:  # keep releasing the rest
                    errors.append(f"server {process.name}: {exc}")
            self._servers.clear()
            try:
                self._watch.close()
            except Exception as exc:
                errors.append(f"leftover processes: {exc}")
            if self._database is not None and self._engine is not None:
                keep = self.failed and self.keep_on_failure
                try:
                    self._engine.release_lease(self._database.lease, keep=keep)
                    self.result.kept_database = keep
                    if keep:
                        log.warning(
                            "%s: kept database %s for debugging (get its URL with `invoke db.url "
                            "--project %s`; `invoke db.cleanup` drops it after it expires)",
                            self.project.name,
                            self._database.name,
                            self.project.name,
                        )
                except Exception as exc:
                    errors.append(f"database {self._database.name}: {exc}")
            elif self._engine is not None:
                # The allocation did not hand a database back (an interrupt in the middle, say):
                # whatever it leased for this session goes now, not when the process is gone.
                try:
                    self._engine.release_owned(self.owner)
                except Exception as exc:
                    errors.append(f"database of {self.project.name}: {exc}")
            try:
                self.ports.release(self.project.name, run_id=self.run_id)
            except Exception as exc:
                errors.append(f"ports: {exc}")
            self._stop_guardian()
        self.result.duration = self.clock.monotonic() - self._started
        if errors:
            self.result.add_error(mask_secrets("; ".join(errors), self._secrets))
        else:
            self.result.finish(self.failed)
        self._watch.fail_for(exits, self._secrets)
        self._watch.record_tool_cpu()
        self._write_record()
        if self._engine is not None:
            # Last, off the recorded run: join the warm spare being prepared (if any) and close
            # the connections whose locks proved the database alive on a shared server.
            with contextlib.suppress(Exception):
                self.workspace.close()
        if errors:
            log.error(
                "%s: could not release everything (%s); run `invoke e2e.cleanup`",
                self.project.name,
                self.result.error,
            )

    def _write_record(self) -> RunRecord:
        if not self.write_record:
            return self.result.freeze()
        try:
            record = self.result.freeze().write(self.layout.record(self.results_dir))
        except E2EInfraError as exc:  # a full results folder: the run fails, naming it
            self.record_error = exc
            return self.result.freeze()
        self._record = record
        if self.record_duration and record.timed:  # how long the suite takes, for CI plans
            from ..results.durations import record_duration

            record_duration(self.config, self.project.name, record.duration)
        return record

    # --- the guardian -----------------------------------------------------------------------------

    def _start_guardian(self) -> None:
        if not self.use_guardian:
            return
        from .guardian import start_guardian

        ensure_private_dir(self.config.state_dir)
        env = dict(os.environ)
        if self.config.source is not None:
            env["E2E_CONFIG"] = str(self.config.source)
        # A shell that waits on a pipe, not an interpreter nor a fork: see e2e_infra.run.guardian.
        self._guardian = start_guardian(
            owner_pid=self.owner.pid,
            owner_start_time=self.owner.start_time,
            run_id=self.run_id,
            project=self.project.name,
            timeout=self.project.timeout + 3600,
            log_path=self.config.state_dir / "guardian.log",
            cwd=self.config.root,
            env=env,
        )

    def _stop_guardian(self) -> None:
        if self._guardian is not None:
            self._guardian.stop()
            self._guardian = None


def run_project(
    config: Config,
    project: str,
    posargs: Sequence[str] = (),
    *,
    on_phase: PhaseCallback | None = None,
    keep_on_failure: bool | None = None,
    record_duration: bool = True,
) -> RunRecord:
    """Run one project end to end; return its record.

    A failing suite, or an error of the tool's own (PostgreSQL gone, a server that never became
    healthy), is recorded in the result (``result``, ``error``, ``log_tail``) rather than raised,
    so adapters print one clear line instead of a traceback. An interrupt still propagates. A
    project with ``retries`` runs again on fresh resources until it passes (then it is
    ``flaky``): see :mod:`.retries`.
    """
    from .retries import run_with_retries

    def attempt(last: bool) -> RunRecord:
        keep = keep_on_failure if last else False  # keep only what the last attempt left
        return _run_once(config, project, posargs, on_phase, keep, record_duration)

    return run_with_retries(project, config.project(project).retries, attempt)


def _run_once(
    config: Config,
    project: str,
    posargs: Sequence[str],
    on_phase: PhaseCallback | None,
    keep_on_failure: bool | None,
    record_duration: bool,
) -> RunRecord:
    session = ProjectSession(
        config,
        project,
        on_phase=on_phase,
        keep_on_failure=keep_on_failure,
        record_duration=record_duration,
    )
    return run_session(session, posargs)


def run_session(session: ProjectSession, posargs: Sequence[str] = ()) -> RunRecord:
    """Acquire, run the suite, release: the run's record. A failure or an error is in the
    record, not raised; an interrupt propagates; a record that could not be written raises
    (say where and why, never "passed")."""
    try:
        with session:
            session.run_suite(posargs)
    except Interrupted:
        raise
    except E2EInfraError:
        pass  # recorded by the session (result failed or error, masked message)
    if session.record_error is not None:
        raise session.record_error
    return session.record
