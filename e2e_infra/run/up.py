"""An environment kept up: a project's ports, database and servers held between runs of its suite.

``invoke e2e.up PROJECT`` (:func:`keep_up`) enters a :class:`~e2e_infra.run.session.
ProjectSession` exactly as a run does (ports, database, servers healthy, the guardian) but runs no
suite. It writes what the suite would get to ``<results>/up/<project>.env`` (``KEY=value``
lines, 0600: the password is in it, as handing it over is the point) and who keeps it up to
``<results>/up/<project>.json`` (:class:`UpState`: the process by pid and start time, ports,
database, servers; 0600), prints them with how to use them, and watches its servers until

* Ctrl-C, SIGTERM or SIGHUP (``invoke e2e.down PROJECT`` from any shell sends SIGTERM to the
  recorded pid once its start time proves it is that process, then waits for it, bounded), or
* its time is up (``--hours``, default 12: a forgotten environment does not hold ports and a
  database for ever),

then leaves the session as a run does (everything released) and removes both files. SIGKILLed,
its guardian reclaims what it held as for any run; the files stay until the next look at them
(``e2e.up``, ``e2e.down``, ``e2e.list``, ``e2e.env``) finds their process gone.

A server that dies is named at once (how it ended, where its log is); with ``--restart`` it is
started again, healthy, as it was (at most :data:`RESTARTS` times in :data:`RESTART_WINDOW`
seconds), and the files follow a port it had to move.

A database reset (``invoke e2e.reset``, ``e2e.run --attach``: :func:`reset_up`) happens in the
caller's process, on the lease the environment holds, under the project's *up lock*
(``<state>/up-<project>.lock``); the environment takes that lock too before it releases, so a
database is never dropped in the middle of a reset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import filelock

from ..clock import Clock, SystemClock, wait_until
from ..config import Config
from ..conninfo import ConnInfo
from ..errors import DatabaseNotFoundError, E2EInfraError, Interrupted, UsageError
from ..files import ensure_private_dir, folder_error
from ..processes.interrupts import signals_deferred
from ..resources.leases import process_state
from ..results.layout import UP
from .session import ProjectSession

if TYPE_CHECKING:
    from ..databases.reset import ResetReport
    from .servers import ServerProcess
    from .watch import ServerExit, Watcher
    from .workspace import Workspace

__all__ = [
    "DEFAULT_HOURS",
    "UpState",
    "export_lines",
    "keep_up",
    "live_up",
    "read_up",
    "reset_up",
    "take_down",
    "up_lock",
]

log = logging.getLogger("e2e_infra")

DEFAULT_HOURS = 12.0
RESTARTS = 3  # --restart: at most this many restarts of one server ...
RESTART_WINDOW = 60.0  # ... within this many seconds; then it stays down, named
LOCK_TIMEOUT = 60.0  # for a reset in progress to finish (they take milliseconds)
DOWN_GRACE = 30.0  # added to the servers' stop timeouts: how long `e2e.down` waits
_WAKE = 60.0  # the longest the watch sleeps between checks of its deadline (signals wake it)


@dataclass(frozen=True)
class UpState:
    """Who keeps a project up, and what the environment holds (``<results>/up/<project>.json``)."""

    project: str
    pid: int
    start_time: float  # of the process keeping it up: with the pid, proof it is that process
    host: str
    run_id: str  # the session's: its leases' run id
    started_at: float
    until: float  # when it goes down by itself
    ports: Mapping[str, int]
    database: str | None
    seed: str | None
    env: Mapping[str, str]  # what the suite would get: ports, URLs, DATABASE_URL, the project's
    servers: Mapping[str, Mapping[str, Any]]  # name -> pid, port, log, alive
    folder: str  # the servers' logs
    restart: bool = False

    def state(self) -> str:
        """``alive``, ``gone``, ``reused`` or ``unknown`` (see ``process_state``)."""
        return process_state(self.pid, self.start_time)

    def alive(self) -> bool:
        return self.state() in ("alive", "unknown")

    @property
    def database_url(self) -> ConnInfo | None:
        url = self.env.get("DATABASE_URL")
        return ConnInfo.parse(url) if url else None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "ports": dict(self.ports),
            "env": dict(self.env),
            "servers": {k: dict(v) for k, v in self.servers.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UpState:
        try:
            return cls(
                project=str(data["project"]),
                pid=int(data["pid"]),
                start_time=float(data["start_time"]),
                host=str(data["host"]),
                run_id=str(data["run_id"]),
                started_at=float(data["started_at"]),
                until=float(data["until"]),
                ports={str(k): int(v) for k, v in dict(data["ports"]).items()},
                database=str(data["database"]) if data.get("database") else None,
                seed=str(data["seed"]) if data.get("seed") else None,
                env={str(k): str(v) for k, v in dict(data["env"]).items()},
                servers={str(k): dict(v) for k, v in dict(data.get("servers") or {}).items()},
                folder=str(data.get("folder") or ""),
                restart=bool(data.get("restart", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an up state: {exc}") from None


# --- the files ------------------------------------------------------------------------------------


def read_up(config: Config, project: str) -> UpState | None:
    """The state of ``project`` kept up, as its file says (None: no file, or not a state)."""
    try:
        data = json.loads(config.layout.up_state(project).read_text(encoding="utf-8"))
        return UpState.from_json(data) if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def live_up(config: Config, project: str) -> UpState:
    """The state of ``project`` kept up by a live process; :class:`UsageError` naming the fix."""
    config.project(project)
    state = read_up(config, project)
    if state is None:
        raise UsageError(
            f"{project} is not up; start it in another shell with `invoke e2e.up {project}`"
        )
    if not state.alive():
        forget(config, project)
        raise UsageError(
            f"{project} is not up any more (its process {state.pid} is gone; its guardian "
            f"released what it held); start it again with `invoke e2e.up {project}`"
        )
    return state


def forget(config: Config, project: str) -> None:
    """Remove the files of ``project`` kept up (idempotent)."""
    layout = config.layout
    for path in (layout.up_env(project), layout.up_state(project)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically, 0600, never through a symbolic link."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(tmp, flags, 0o600), "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise folder_error(path, exc, what="write") from None


def export_lines(env: Mapping[str, str]) -> str:
    """``export KEY='value'`` lines for a POSIX shell's ``eval``."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))


def env_file_text(state: UpState) -> str:
    """The ``.env`` file: ``KEY=value`` lines that dotenv (Python's and Node's) and ``set -a;
    . file`` read alike, with a header saying what it is and until when it holds."""
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.until))
    lines = [
        f"# e2e-infra: the environment of {state.project}, kept up by pid {state.pid} until "
        f"{until} at the latest (`invoke e2e.down {state.project}` ends it)",
        *(f"{key}={_dotenv_value(value)}" for key, value in sorted(state.env.items())),
    ]
    return "\n".join(lines) + "\n"


def _dotenv_value(value: str) -> str:
    """Bare when plain (URLs, ports), else single-quoted (literal everywhere), else (a single
    quote inside) double-quoted with backslashes and double quotes escaped."""
    if re.fullmatch(r"[A-Za-z0-9_./:@%+=,~-]*", value):
        return value
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _publish(config: Config, state: UpState) -> None:
    layout = config.layout
    _write_private(layout.up_env(state.project), env_file_text(state))
    _write_private(layout.up_state(state.project), json.dumps(state.to_json(), indent=2) + "\n")


# --- the lock between resets and the release ------------------------------------------------------


@contextlib.contextmanager
def up_lock(config: Config, project: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``project``'s up lock (a reset, or the release of the environment), bounded."""
    ensure_private_dir(config.state_dir)
    path = config.state_dir / f"up-{project}.lock"
    lock = filelock.FileLock(str(path), timeout=timeout, mode=0o600, thread_local=False)
    try:
        lock.acquire(poll_interval=0.005)
    except filelock.Timeout:
        raise UsageError(
            f"another reset or release of {project} held {path} for more than {timeout:g}s; "
            "retry when it is done"
        ) from None
    try:
        yield
    finally:
        lock.release()


# --- keeping it up --------------------------------------------------------------------------------


class _UpSession(ProjectSession):
    """A session whose release waits for a reset in progress (the up lock)."""

    def _release(self) -> None:
        # A second Ctrl-C must not cut the release short, nor the wait for a reset before it.
        with signals_deferred(), contextlib.ExitStack() as held:
            try:
                held.enter_context(up_lock(self.config, self.project.name))
            except UsageError as exc:  # a reset stuck for a minute: release anyway
                log.warning("%s; releasing anyway", exc.one_line())
            template = self._template()
            super()._release()
            if template and self.config.database.spares == 0:
                self._drop_spares(template)

    def _template(self) -> str:
        """The template the database now comes from (a reset may have moved it on)."""
        database = self.database
        if database is None:
            return ""
        with contextlib.suppress(E2EInfraError), self.registry.transaction() as txn:
            for lease in txn.find("database", resource=database.name, run_id=self.run_id):
                return str(lease.data.get("template") or "")
        return str(database.lease.data.get("template") or "")

    def _drop_spares(self, template: str) -> None:
        """The spare kept for resets goes too: nobody asked for spares (``spares`` = 0)."""
        try:
            self.workspace.databases.drop_spares(template)
        except E2EInfraError as exc:
            log.warning("could not drop the warm spare of %s: %s", template, exc.one_line())
        finally:
            self.workspace.close()


def _exported(session: ProjectSession) -> dict[str, str]:
    """What a shell or a suite started by hand needs of the session's environment: the ports,
    URLs, ``DATABASE_URL``, the project's name and its own ``env`` table; not the tool's
    plumbing (the run id, the results folder, Playwright's report redirections), which would
    re-point the tool itself in that shell."""
    env = session.env.env if session.env is not None else {}
    ports = session.env.ports if session.env is not None else {}
    keys = {"DATABASE_URL", "E2E_PROJECT", *session.project.env}
    for name in ports:
        keys |= {f"{name.upper()}_PORT", f"{name.upper()}_URL"}
    return {key: env[key] for key in sorted(keys) if key in env}


def _state_of(session: ProjectSession, *, until: float, restart: bool, began: float) -> UpState:
    assert session.env is not None
    servers = {
        process.name: {
            "pid": process.record.pid if process.record is not None else None,
            "port": process.port,
            "log": str(process.log_path),
            "alive": process.returncode is None,
        }
        for process in session.servers
    }
    database = session.database
    return UpState(
        project=session.project.name,
        pid=session.owner.pid,
        start_time=session.owner.start_time,
        host=session.owner.host,
        run_id=session.run_id,
        started_at=began,
        until=until,
        ports=dict(session.env.ports),
        database=database.name if database is not None else None,
        seed=database.seed if database is not None else None,
        env=_exported(session),
        servers=servers,
        folder=str(session.results_dir),
        restart=restart,
    )


def _banner(state: UpState, config: Config) -> str:
    p = state.project
    rows = []
    for key, value in sorted(state.env.items()):
        shown = ConnInfo.parse(value).masked if key == "DATABASE_URL" else value
        rows.append(f"  {key:<14} {shown}")
    servers = ", ".join(f"{name} (pid {info['pid']})" for name, info in state.servers.items())
    until = time.strftime("%H:%M", time.localtime(state.until))
    lines = [
        f"{p} is up: {servers or 'no servers'}; kept until Ctrl-C, `invoke e2e.down {p}` or "
        f"{until}",
        *rows,
        f"  environment file {config.layout.up_env(p)} (0600, with the password)",
        f"  server logs      {state.folder}",
        "in another shell:",
        f'  eval "$(invoke e2e.env {p})"     then: npx playwright test --ui, pytest -k ..., '
        'psql "$DATABASE_URL"',
        f"  invoke e2e.reset {p}           a fresh database, the servers kept running",
        f"  invoke e2e.run {p} --attach    the suite against it (database reset first)",
        f"  invoke e2e.down {p}            release everything",
    ]
    return "\n".join(lines)


def _up_config(config: Config, project: str, seed: str | None) -> Config:
    """The config of an environment kept up: its logs in ``up/<project>/``, its seed."""
    chosen = config.project(project)
    if seed:
        from ..config import validate_name

        validate_name(seed, "seed profile")
        chosen = dataclasses.replace(chosen, seed=seed)
    projects = {**config.projects, project: chosen}
    return dataclasses.replace(config, run=UP, projects=projects)


@dataclass
class _Restarts:
    """When each server was restarted lately (``--restart``)."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def allowed(self, server: str, now: float) -> bool:
        recent = [t for t in self.times.get(server, []) if now - t < RESTART_WINDOW]
        self.times[server] = recent
        return len(recent) < RESTARTS

    def note(self, server: str, now: float) -> None:
        self.times.setdefault(server, []).append(now)


def keep_up(
    config: Config,
    project: str,
    *,
    seed: str | None = None,
    restart: bool = False,
    hours: float = DEFAULT_HOURS,
    out: IO[str] | None = None,
    clock: Clock | None = None,
) -> UpState | None:
    """Keep ``project``'s environment up until an interrupt or ``hours`` (see the module);
    return its last state (None if it never came up). Raises what a run's acquire raises."""
    out = out if out is not None else sys.stdout
    clock = clock or SystemClock()
    if hours <= 0:
        raise UsageError(f"--hours must be more than 0, got {hours:g}")
    existing = read_up(config, project)
    if existing is not None and existing.alive():
        raise UsageError(
            f"{project} is up already (pid {existing.pid}); use it (`invoke e2e.env {project}`) "
            f"or take it down first (`invoke e2e.down {project}`)"
        )
    forget(config, project)  # the files of one whose process died (its guardian reclaimed)

    def phase(name: str, step: str) -> None:
        print(f"e2e.up {name}: {step}...", file=sys.stderr, flush=True)

    session = _UpSession(
        _up_config(config, project, seed),
        project,
        write_record=False,
        record_duration=False,
        on_phase=phase,
    )
    began = time.time()
    session.__enter__()  # acquires exactly as a run does; released already if it raises
    error: BaseException | None = None
    state: UpState | None = None
    try:
        until = time.time() + hours * 3600
        state = _state_of(session, until=until, restart=restart, began=began)
        _publish(config, state)
        print(_banner(state, config), file=out, flush=True)
        _warm_spare(session)
        state = _watch(config, session, state, restart, clock.monotonic() + hours * 3600, clock)
        print(f"e2e.up {project}: up for {hours:g} h (--hours); releasing it", file=sys.stderr)
    except (Interrupted, KeyboardInterrupt):
        pass  # Ctrl-C or `e2e.down`: the normal end
    except BaseException as exc:
        error = exc
    finally:
        try:
            session.__exit__(type(error) if error else None, error, None)
        finally:
            forget(config, project)
    if error is not None:
        raise error
    print(f"{project} is down: released its servers, database and ports", file=out, flush=True)
    return state


def _warm_spare(session: ProjectSession) -> None:
    """Prepare a warm spare for the first reset, in the background (the session joins it)."""
    database = session.database
    if database is None:
        return
    template = str(database.lease.data.get("template") or "")
    if template:
        cap = max(1, session.config.database.spares)
        session.workspace.databases.spares.prepare_later([template], cap=cap)


def _watch(
    config: Config,
    session: ProjectSession,
    state: UpState,
    restart: bool,
    deadline: float,
    clock: Clock,
) -> UpState:
    """Name each server that dies (and restart it with ``restart``) until ``deadline``."""
    from .watch import Watcher

    events: queue.Queue[ServerExit] = queue.Queue()
    restarts = _Restarts()
    watcher: Watcher | None = None
    try:
        while (remaining := deadline - clock.monotonic()) > 0:
            if watcher is None:
                live = [p for p in session.servers if p.returncode is None]
                watcher = Watcher(live, on_exit=events.put, log_exits=False)
                watcher.start()
            try:  # a signal interrupts this wait: Interrupted is raised here
                ended = events.get(timeout=min(remaining, _WAKE))
            except queue.Empty:
                continue
            print(_describe(ended, session), file=sys.stderr, flush=True)
            if restart and restarts.allowed(ended.server, clock.monotonic()):
                restarts.note(ended.server, clock.monotonic())
                watcher.stop()
                watcher = None
                process = _restart(session, ended.server)
                if process is not None:
                    print(
                        f"e2e.up {session.project.name}: restarted {ended.server} "
                        f"(pid {process.record.pid if process.record else '?'}, port "
                        f"{process.port})",
                        file=sys.stderr,
                        flush=True,
                    )
            elif restart:
                print(
                    f"e2e.up {session.project.name}: {ended.server} died {RESTARTS + 1} times "
                    f"within {RESTART_WINDOW:g}s; not restarting it again",
                    file=sys.stderr,
                    flush=True,
                )
            state = _state_of(session, until=state.until, restart=restart, began=state.started_at)
            _publish(config, state)
        return state
    finally:
        if watcher is not None:
            watcher.stop()


def _restart(session: ProjectSession, server: str) -> ServerProcess | None:
    try:
        return session.restart_server(server)
    except Interrupted:
        raise
    except E2EInfraError as exc:
        print(
            f"e2e.up {session.project.name}: could not restart {server}: {exc.one_line()}",
            file=sys.stderr,
            flush=True,
        )
        return None


def _describe(ended: ServerExit, session: ProjectSession) -> str:
    how = (
        f"was killed by {ended.signal}"
        if ended.signal
        else f"exited with status {ended.returncode}"
    )
    stamp = time.strftime("%H:%M:%S", time.localtime(ended.at))
    where = next((str(p.log_path) for p in session.servers if p.name == ended.server), "")
    tail = "\n".join(f"    {line}" for line in ended.log_tail.splitlines()[-5:])
    lines = [
        f"e2e.up {session.project.name}: server {ended.server} {how} at {stamp}"
        f"{f'; its log: {where}' if where else ''}",
    ]
    if tail:
        lines.append(tail)
    return "\n".join(lines)


# --- taking it down -------------------------------------------------------------------------------


def take_down(config: Config, project: str, *, clock: Clock | None = None) -> str:
    """Stop the process keeping ``project`` up and wait until it released everything (bounded);
    one line saying what happened. Idempotent: a project not up is said so."""
    config.project(project)
    state = read_up(config, project)
    if state is None:
        return f"{project} is not up"
    if state.host != config.host_id:
        raise UsageError(
            f"{project} is kept up on host {state.host}, not this one; run `invoke e2e.down "
            f"{project}` there"
        )
    if not state.alive():
        from .reclaim import reclaim

        report = reclaim(config, run_id=state.run_id)  # what its guardian may not have yet
        forget(config, project)
        return (
            f"{project} was up, but its process {state.pid} is gone; reclaimed what it left "
            f"({len(report.servers)} server(s), {len(report.databases)} database(s), "
            f"{len(report.ports)} port(s))"
        )
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # gone meanwhile: the wait below sees it
    except PermissionError:
        raise UsageError(
            f"{project} is kept up by pid {state.pid}, which this user may not signal; end it "
            "as its user"
        ) from None
    servers = [config.servers[name] for name in state.servers if name in config.servers]
    timeout = sum(server.stop_timeout for server in servers) + DOWN_GRACE
    wait_until(
        lambda: not state.alive(),
        timeout=timeout,
        what=f"e2e.up {project} (pid {state.pid}) to release what it holds",
        hint=f"it may be stuck: `kill -9 {state.pid}` ends it and its guardian reclaims the rest",
        clock=clock,
        first=0.02,
        cap=0.2,
    )
    forget(config, project)  # it removes them itself; unless it was killed just then
    return f"{project} is down (pid {state.pid} released its servers, database and ports)"


# --- resets ---------------------------------------------------------------------------------------


def reset_up(config: Config, state: UpState, workspace: Workspace) -> ResetReport:
    """A fresh database for ``state``'s environment under the same name, its servers running
    (see :mod:`e2e_infra.databases.reset`). The caller closes ``workspace`` (which waits for
    the spare being prepared for the next reset)."""
    if state.database is None:
        raise UsageError(f"{state.project} has no database (database = false): nothing to reset")
    with up_lock(config, state.project):
        if not state.alive():
            raise UsageError(
                f"{state.project} is not up any more (its process {state.pid} is gone); start "
                f"it again with `invoke e2e.up {state.project}`"
            )
        with workspace.registry.transaction() as txn:
            leases = txn.find("database", project=state.project, run_id=state.run_id)
        if not leases:
            raise DatabaseNotFoundError(
                f"the environment of {state.project} holds no database lease any more; take it "
                f"down and up again (`invoke e2e.down {state.project}`, `invoke e2e.up "
                f"{state.project}`)",
                project=state.project,
            )
        return workspace.databases.reset(leases[0])
