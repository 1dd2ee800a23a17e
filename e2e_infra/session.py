"""The lifecycle of one project: acquire -> migrate/seed -> start -> test -> release.

:class:`ProjectSession` is a context manager. Entering it leases the project's ports, clones its
database from the fingerprinted template, starts its servers in dependency order and waits until
each is healthy; it yields a :class:`ProjectEnv` with the environment for the suite. Leaving it
stops the servers, drops (or keeps) the database and releases the ports, in reverse order, also on
an exception, SIGINT or SIGTERM, and writes ``<results>/<project>/run.json`` with the duration of
every phase.

A SIGKILL cannot be caught, so every session also starts a *guardian*: a small detached process
(:mod:`e2e_infra.guardian`) that waits for the session's process to end and, if it died holding
leases, reclaims them. The next run and ``invoke e2e.cleanup`` reclaim the same leftovers by proof
of death too (:func:`reclaim`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import playwright
from .clock import Clock, SystemClock
from .config import Config, ProjectConfig, ServerConfig
from .conninfo import mask_secrets
from .errors import (
    ConfigError,
    E2EInfraError,
    Interrupted,
    PortError,
    ServerExitedError,
    SuiteFailedError,
)
from .interrupts import Interrupts, signals_deferred
from .leases import Lease, Owner, Registry, ensure_private_dir, new_run_id, process_start_time
from .ports import port_is_free
from .processes import wait_exit
from .reclaim import SERVER_KIND, reclaim
from .report import point_latest
from .servers import placeholder_values, process_env
from .watch import MARKER, RunWatch
from .workspace import Workspace

__all__ = [
    "PHASES",
    "ProjectEnv",
    "ProjectSession",
    "RunResult",
    "run_project",
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


@dataclass
class RunResult:
    """The record of one run, as written to ``run.json``."""

    project: str
    run_id: str
    started_at: float
    result: str = "running"  # passed | failed | error | interrupted
    returncode: int | None = None
    duration: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    database: str | None = None
    seed: str | None = None
    logs: dict[str, str] = field(default_factory=dict)
    junit: str | None = None
    error: str | None = None
    log_tail: str | None = None
    kept_database: bool = False
    leftovers: dict[str, int] = field(default_factory=dict)  # processes ended after their part
    server_exits: list[dict[str, Any]] = field(default_factory=list)  # servers that died
    server_stops: dict[str, dict[str, Any]] = field(default_factory=dict)  # StopRecord.to_json
    resources: dict[str, Any] | None = None  # peak_memory_bytes, cpu_seconds

    @property
    def timed(self) -> bool:
        """Its duration says how long the suite takes (it passed or failed; not an error)."""
        return self.result in ("passed", "failed")

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    @property
    def slowest_phase(self) -> str | None:
        return max(self.phases, key=lambda k: self.phases[k]) if self.phases else None

    def note_error(self, exc: BaseException, secrets: tuple[str, ...] = ()) -> None:
        """Record how ``exc`` ended the run: interrupted, failed (the suite) or error (the rest)."""
        if isinstance(exc, Interrupted | KeyboardInterrupt):
            self.result = "interrupted"
            self.error = "interrupted"
        elif isinstance(exc, SuiteFailedError):
            self.result = "failed"
            self.error = mask_secrets(exc.one_line(), secrets)
            if self.returncode is None:
                self.returncode = exc.returncode
        else:
            self.result = "error"
            message = exc.one_line() if isinstance(exc, E2EInfraError) else repr(exc)
            self.error = mask_secrets(message, secrets)
            tail = getattr(exc, "log_tail", "")
            if tail:
                self.log_tail = mask_secrets(str(tail), secrets)

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "result": self.result,
            "returncode": self.returncode,
            "duration": round(self.duration, 4),
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
            "ports": self.ports,
            "database": self.database,
            "seed": self.seed,
            "logs": self.logs,
            "junit": self.junit,
            "error": self.error,
            "log_tail": self.log_tail,
            "kept_database": self.kept_database,
            "leftovers": self.leftovers,
            "server_exits": self.server_exits,
            "server_stops": self.server_stops,
            "resources": self.resources,
        }


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
        self.teardown_grace = teardown_grace
        self.owner = Owner.current(host=config.host_id, run_id=self.run_id)
        self.ports = self.workspace.ports
        self.result = RunResult(project=project, run_id=self.run_id, started_at=time.time())
        self.results_dir = config.project_dir(project)
        self.failed = False
        self._servers: list[tuple[Any, Lease]] = []  # (ServerProcess, lease), start order
        self._database: Any = None  # AllocatedDatabase
        self._allocator: Any = None  # DatabaseAllocator
        self._guardian: Any = None  # guardian.Guardian
        self._secrets: tuple[str, ...] = ()
        self._phase_start = 0.0
        self._started = self.clock.monotonic()
        self.env: ProjectEnv | None = None
        self._interrupts = Interrupts()
        critical = {n for n in self.project.servers if config.servers[n].on_exit == "stop"}
        self._watch = RunWatch(project, self.result, critical)  # containment + server watch

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

        try:  # before anything is acquired: a bad folder or cwd leaves nothing to release
            check_project(self.config, self.project)
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
        if self.result.result == "interrupted":
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
            self._choose_results_dir(others)
        database_url = ""
        if project.database:
            with self.phase("database"):
                self._allocator = self.workspace.databases
                self._database = self._allocator.allocate(
                    project.name, self.owner, seed=project.seed
                )
                database_url = self._database.url.url
                if self._database.url.password:
                    self._secrets = (self._database.url.password,)
                self.result.database = self._database.name
                self.result.seed = self._database.seed
                self._watch.sweep("database", "")  # what migrate/seed commands left
        values = self._values(ports, database_url)
        from .servers import server_order

        for level in server_order(self.config, project.servers):
            for name in level:
                self._start_server(self.config.servers[name], values, ports)
        env = self._suite_env(ports, database_url)
        return ProjectEnv(
            project=project.name,
            run_id=self.run_id,
            results_dir=self.results_dir,
            ports=dict(ports),
            database=self.result.database,
            env=env,
        )

    def _choose_results_dir(self, others: bool) -> None:
        """``<results>/<project>``, or ``.../runs/<id>`` when ``others`` (another run of the
        project) write there (a run folder of its own is free unless this run already made it)."""
        if others and self.config.run is not None:
            try:
                self.config.run_dir.mkdir(parents=True, exist_ok=True)
                self.results_dir.mkdir()
                others = False  # the other one writes into another run's folder
            except FileExistsError:
                pass
        if others:
            self.results_dir = self.results_dir / "runs" / self.run_id
        self.results_dir.mkdir(parents=True, exist_ok=True)
        for folder in {self.config.run_dir, self.results_dir}:  # logs and records: the user's
            with contextlib.suppress(OSError):
                folder.chmod(0o700)
        point_latest(self.config)
        if not others:
            for stale in ("run.json", "junit.xml", *(f"{s}.log" for s in self.config.servers)):
                with contextlib.suppress(FileNotFoundError):
                    (self.results_dir / stale).unlink()

    def _values(self, ports: Mapping[str, int], database_url: str) -> dict[str, object]:
        return placeholder_values(
            self.config, self.project.name, self.run_id, self.results_dir, ports, database_url
        )

    def _base_env(self, ports: Mapping[str, int], database_url: str) -> dict[str, str]:
        return process_env(self.project.name, self.run_id, self.results_dir, ports, database_url)

    def _suite_env(self, ports: Mapping[str, int], database_url: str) -> dict[str, str]:
        from .servers import render

        env = self._base_env(ports, database_url)
        values = self._values(ports, database_url)
        env.update(playwright.suite_env(self.project, self.results_dir))
        env.update({k: render(v, values) for k, v in self.project.env.items()})
        return env

    def _start_server(
        self, server: ServerConfig, values: dict[str, object], ports: dict[str, int]
    ) -> None:
        from .health import parse_health
        from .servers import ServerProcess, bind_listen_socket, render, render_command

        attempts = server.restarts + 1
        for attempt in range(1, attempts + 1):
            port = ports.get(server.port) if server.port else None
            listener = None
            if server.listen_socket and port is not None:
                # The race-free hand-over: we bind, the server inherits the listening socket.
                try:
                    listener = bind_listen_socket(port)
                except PortError:
                    if attempt == attempts or server.port is None:
                        raise
                    ports[server.port] = self._move_port(server, port, attempt, attempts)
                    values["ports"] = types.SimpleNamespace(**ports)
                    continue
            fd = listener.fileno() if listener is not None else ""
            server_values = {**values, "port": port if port is not None else "", "fd": fd}
            env = self._base_env(ports, str(values["database_url"]))
            if port is not None:
                env["PORT"] = str(port)
            if listener is not None:
                env["E2E_LISTEN_FD"] = str(fd)
            env.update({k: render(v, server_values) for k, v in server.env.items()})
            env[MARKER] = self._watch.tag(f"server:{server.name}")
            process = ServerProcess(
                server.name,
                render_command(server.command, server_values),
                cwd=server.cwd,
                env=env,
                log_path=self.results_dir / f"{server.name}.log",
                health=parse_health(
                    render(server.health, server_values), port=port, cwd=server.cwd, env=env
                ),
                startup_timeout=server.startup_timeout,
                stop_timeout=server.stop_timeout,
                clock=self.clock,
                secrets=self._secrets,
                port=port,
                pass_fds=(listener.fileno(),) if listener is not None else (),
            )
            self.result.logs[server.name] = str(process.log_path)
            with self.phase("servers"), self._interrupts.critical():
                try:
                    record = process.start()
                finally:
                    if listener is not None:
                        listener.close()  # the server holds its own copy now
                lease = self._lease_process(
                    server.name,
                    record.pid,
                    pgid=record.pgid,
                    start_time=record.start_time,
                    port=port,
                    log=str(process.log_path),
                )
                self._servers.append((process, lease))
            try:
                with self.phase("health"):
                    process.wait_healthy()
                return
            except ServerExitedError:
                taken = port is not None and (process.port_conflict() or not port_is_free(port))
                self._stop_server(process, lease)
                self._servers.remove((process, lease))
                if not taken or attempt == attempts or server.port is None:
                    raise
                new_port = self._move_port(server, port, attempt, attempts)
                ports[server.port] = new_port
                self.result.ports[server.port] = new_port
                values["ports"] = types.SimpleNamespace(**ports)

    def _move_port(
        self, server: ServerConfig, port: int | None, attempt: int, attempts: int
    ) -> int:
        assert server.port is not None
        new_port = self.ports.reallocate(self.project.name, server.port, self.owner)
        log.warning(
            "%s: server %s could not use port %s (taken by another process); "
            "restarting it on port %s (attempt %d of %d)",
            self.project.name,
            server.name,
            port,
            new_port,
            attempt + 1,
            attempts,
        )
        self.result.ports[server.port] = new_port
        return new_port

    # --- the suite --------------------------------------------------------------------------------

    def run_suite(self, posargs: Sequence[str] = ()) -> int:
        """Run the project's suite with the session's environment; return its exit code."""
        from .servers import render_command

        if self.env is None:
            raise RuntimeError("run_suite() needs an entered ProjectSession")
        values = self._values(self.env.ports, self.env.env.get("DATABASE_URL", ""))
        argv = render_command(self.project.command, values)
        argv = [*playwright.suite_argv(self.project, argv, self.results_dir), *posargs]
        junit = self.results_dir / "junit.xml"
        with self.phase("suite"):
            # Same process group as this process: nox's interrupt reaches the suite too.
            with self._interrupts.critical():
                try:
                    env = {**self.env.env, MARKER: self._watch.tag("suite")}
                    proc = subprocess.Popen(argv, cwd=self.project.cwd, env=env)
                except OSError as exc:
                    raise SuiteFailedError(
                        f"cannot start the suite of {self.project.name} ({argv[0]}: "
                        f"{exc.strerror}); check projects.{self.project.name}.command and cwd",
                        project=self.project.name,
                        returncode=127,
                    ) from None
                suite_lease = self._record_suite(proc)
            self._watch.suite_started(proc, [process for process, _lease in self._servers])
            try:
                returncode = wait_exit(proc, self.project.timeout)
            except subprocess.TimeoutExpired:
                with self._interrupts.critical():
                    _terminate(proc, grace=5.0)
                self.failed = True
                self.result.result = "failed"
                self.result.returncode = proc.returncode
                raise SuiteFailedError(
                    f"the suite of {self.project.name} ran longer than its timeout "
                    f"({self.project.timeout:g}s) and was stopped; raise "
                    f"projects.{self.project.name}.timeout if it needs more",
                    project=self.project.name,
                    returncode=proc.returncode if proc.returncode is not None else -1,
                ) from None
            except BaseException:
                with signals_deferred():
                    _terminate(proc, grace=2.0)
                raise
            finally:
                with signals_deferred():
                    self._watch.suite_ended()  # its leftovers (daemons too) are ended here
                if proc.returncode is not None:  # a suite that may still run keeps its lease
                    with signals_deferred(), self.registry.transaction() as txn:
                        txn.remove(suite_lease)
        if self._allocator is not None and self._allocator.holds.lost:
            self.failed, self.result.result = True, "error"
            self._allocator.check_holds()  # raises: its database's proof of life was lost
        self.result.returncode = returncode
        self.result.junit = str(junit) if junit.exists() else None
        if returncode == 0:
            self.result.result = "passed"
        else:
            self.failed = True
            self.result.result = "failed"
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

    def _stop_server(self, process: Any, lease: Lease) -> None:
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
            if self._database is not None and self._allocator is not None:
                keep = self.failed and self.keep_on_failure
                try:
                    self._allocator.release_lease(self._database.lease, keep=keep)
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
            try:
                self.ports.release(self.project.name, run_id=self.run_id)
            except Exception as exc:
                errors.append(f"ports: {exc}")
            self._stop_guardian()
        self.result.duration = self.clock.monotonic() - self._started
        if errors:
            left = mask_secrets("; ".join(errors), self._secrets)
            first = self.result.error if self.result.error != "interrupted" else None
            self.result.error = f"{first}; then {left}" if first else left
            if self.result.result in ("passed", "running"):
                self.result.result = "error"
        elif self.result.result == "running":
            self.result.result = "passed" if not self.failed else "error"
        self._watch.fail_for(exits, self._secrets)
        self._watch.record_tool_cpu()
        self._write_record()
        if self._allocator is not None:
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

    def _write_record(self) -> None:
        with contextlib.suppress(OSError):
            self.results_dir.mkdir(parents=True, exist_ok=True)
            path = self.results_dir / "run.json"
            tmp = path.with_suffix(".json.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
                out.write(json.dumps(self.result.to_json(), indent=2) + "\n")
            os.replace(tmp, path)
        if self.record_duration and self.result.timed:  # how long the suite takes, for CI plans
            from .matrix import record_duration

            record_duration(self.config, self.project.name, self.result.duration)

    # --- the guardian -----------------------------------------------------------------------------

    def _start_guardian(self) -> None:
        if not self.use_guardian:
            return
        from .guardian import start_guardian

        ensure_private_dir(self.config.state_dir)
        env = dict(os.environ)
        if self.config.source is not None:
            env["E2E_CONFIG"] = str(self.config.source)
        # A shell that waits on a pipe, not an interpreter nor a fork: see e2e_infra.guardian.
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


def _terminate(proc: subprocess.Popen[Any], *, grace: float, own_group: bool = False) -> None:
    """SIGTERM, wait ``grace``, SIGKILL, reap: its whole group when it leads one (the guardian),
    else only it and its descendants (the suite shares our group)."""
    from .processes import Child, escalation

    Child(proc, own_group=own_group).stop(escalation(grace))


def run_project(
    config: Config,
    project: str,
    posargs: Sequence[str] = (),
    *,
    on_phase: PhaseCallback | None = None,
    keep_on_failure: bool | None = None,
    record_duration: bool = True,
) -> RunResult:
    """Run one project end to end; return its result.

    A failing suite, or an error of the tool's own (PostgreSQL gone, a server that never became
    healthy), is recorded in the result (``result``, ``error``, ``log_tail``) rather than raised,
    so adapters print one clear line instead of a traceback. An interrupt still propagates.
    """
    session = ProjectSession(
        config,
        project,
        on_phase=on_phase,
        keep_on_failure=keep_on_failure,
        record_duration=record_duration,
    )
    try:
        with session:
            session.run_suite(posargs)
    except Interrupted:
        raise
    except E2EInfraError:
        pass  # recorded by the session (result "failed" or "error", masked message)
    return session.result
