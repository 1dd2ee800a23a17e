"""Server processes: spawn in their own process group, wait until healthy, stop by escalation.

One :class:`ServerProcess` is one start of one configured server for one project:

* :meth:`~ServerProcess.start` spawns it as a session and process-group leader (so the group id
  is its pid), stdin closed, stdout + stderr appended to the run's ``<server>.log``
  (``e2e-results/<run>/<project>/``), and returns the :class:`ProcessRecord` (pid, pgid, start
  time) that goes into the server lease;
* :meth:`~ServerProcess.wait_healthy` polls the health check and fails fast, with the masked last
  lines of the log, if the process exits first;
* :meth:`~ServerProcess.stop` sends SIGTERM to the whole group, waits, sends SIGKILL, reaps, and
  also ends stragglers a server left in its group; calling it twice is fine (the mechanism is
  :mod:`e2e_infra.processes`, and :attr:`~ServerProcess.stop_record` says how it ended);
* :meth:`~ServerProcess.port_conflict` tells, after an exit, whether a foreign process took the
  port, so the session can restart the server on a fresh one.

:func:`kill_group_if_ours` (re-exported from :mod:`e2e_infra.processes`) ends the group of a
record left behind by a crashed run, only on proof that the processes are still the ones that record
describes (pid + start time). Templates are filled by :func:`render` / :func:`render_command`.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

from ..clock import Clock, SystemClock
from ..config import Config
from ..conninfo import mask_secrets
from ..errors import (
    ConfigError,
    DeadlineExceeded,
    PortError,
    ServerError,
    ServerExitedError,
    ServerStartTimeoutError,
)
from ..processes import (
    Child,
    ProcessRecord,
    StopRecord,
    child_environ,
    escalation,
    group_members,
    kill_group_if_ours,
    kill_tree_if_ours,
    spawn,
)
from ..processes.logs import TAIL_LINES, log_tail, open_log, read_end
from ..resources.ports import port_is_free
from .health import POLL_CAP, HealthCheck, wait_healthy

__all__ = [
    "Placeholders",
    "ProcessRecord",
    "ServerProcess",
    "bind_listen_socket",
    "kill_group_if_ours",
    "kill_tree_if_ours",
    "log_tail",
    "process_env",
    "render",
    "render_command",
    "server_order",
]

log = logging.getLogger("e2e_infra")

_ADDR_IN_USE = re.compile(r"EADDRINUSE|address (?:already )?in use", re.IGNORECASE)


# --- templates ------------------------------------------------------------------------------------


class _Namespace:
    """A mapping seen through attributes, for ``{ports.frontend}``."""

    def __init__(self, prefix: str, values: Mapping[str, object]) -> None:
        self._prefix = prefix
        self._values = values

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return _wrap(f"{self._prefix}.{name}", self._values[name])
        except KeyError:
            raise AttributeError(name) from None

    def __format__(self, spec: str) -> str:
        raise ValueError(f"{{{self._prefix}}} needs a key, like {{{self._prefix}.<name>}}")


def _wrap(prefix: str, value: object) -> object:
    return _Namespace(prefix, value) if isinstance(value, Mapping) else value


def _known(values: Mapping[str, object], prefix: str = "") -> list[str]:
    names: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            names.extend(_known(value, f"{prefix}{key}."))
        elif isinstance(value, SimpleNamespace):
            names.extend(f"{prefix}{key}.{attr}" for attr in vars(value))
        else:
            names.append(f"{prefix}{key}")
    return sorted(names)


class _Formatter(string.Formatter):
    def __init__(self, values: Mapping[str, object], template: str, key: str | None) -> None:
        self.values = values
        self.template = template
        self.key = key

    def _error(self, problem: str) -> ConfigError:
        where = f"{self.key} = " if self.key else ""
        return ConfigError(f"{where}{mask_secrets(self.template)!r}: {problem}", key=self.key)

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        # Only ``{name}`` and ``{group.name}`` are looked up; nothing is evaluated, so
        # ``{python.__class__}`` or ``{ports.__dict__}`` is an unknown placeholder.
        try:
            first, *rest = field_name.split(".")
            if len(rest) > 1 or not all(p.isidentifier() and p[0] != "_" for p in (first, *rest)):
                raise KeyError(field_name)
            value = self.values[first]
            group = vars(value) if isinstance(value, SimpleNamespace) else value
            if not rest:
                return _wrap(first, group), first
            if not isinstance(group, Mapping):
                raise KeyError(field_name)
            return group[rest[0]], first
        except (KeyError, AttributeError, IndexError):
            known = ", ".join(f"{{{name}}}" for name in _known(self.values)) or "none"
            raise self._error(
                f"unknown placeholder {{{field_name}}} (known: {known}; "
                "write {{ and }} for literal braces)"
            ) from None

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            raise KeyError(key)
        return _wrap(key, self.values[key])


def render(template: str, values: Mapping[str, object], *, key: str | None = None) -> str:
    """Fill ``{name}`` and ``{group.name}`` placeholders of ``template`` from ``values``.

    A nested mapping (or a SimpleNamespace) serves dotted names: ``{"ports": {"frontend": 3101}}``
    fills ``{ports.frontend}``. An unknown placeholder raises ConfigError naming it and the known
    ones; ``key`` (e.g. ``servers.backend.command``) says where the template came from.
    """
    formatter = _Formatter(values, template, key)
    try:
        return formatter.vformat(template, (), {})
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        hint = (
            " (write {{ and }} for literal braces)"
            if "'{'" in str(exc) or "'}'" in str(exc)
            else ""
        )
        raise formatter._error(f"{exc}{hint}") from None


def render_command(
    command: str, values: Mapping[str, object], *, key: str | None = None
) -> list[str]:
    """Split ``command`` like a shell (no shell runs), then fill each word.

    Splitting first means a value with spaces or quotes (a URL, a path) stays one argument.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        where = f"{key} = " if key else "command "
        raise ConfigError(
            f"{where}{mask_secrets(command)!r}: {exc} (check the quoting)", key=key
        ) from None
    if not words:
        raise ConfigError(f"{key or 'the command'} is empty; give the command to run", key=key)
    return [render(word, values, key=key) for word in words]


# --- logs -----------------------------------------------------------------------------------------


# --- sockets and ports ----------------------------------------------------------------------------


def bind_listen_socket(port: int, host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` that a child can inherit (``pass_fds``).

    Handing over a bound socket is the only fully race-free way to give a server its port: nobody
    can take the port between the choice and the server's own bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise PortError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "another process holds it, choose another port"
        ) from None
    return sock


def _group_listens(record: ProcessRecord, port: int) -> bool | None:
    """Whether a process of the group listens on ``port``; None when that cannot be seen."""
    seen = False
    for proc in group_members(record.pgid, record.start_time):
        try:
            connections = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seen = True
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
        ):
            return True
    return False if seen else None


class _OwnedCheck:
    """A check that passes only when the server's own process group holds ``port``.

    Without it a foreign server already listening on the port would make ours look healthy in the
    moment before ours fails to bind.
    """

    def __init__(self, inner: HealthCheck, record: ProcessRecord, port: int) -> None:
        self.inner = inner
        self.record = record
        self.port = port
        self.last_error = ""

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def poll_cap(self) -> float:
        return float(getattr(self.inner, "poll_cap", POLL_CAP))

    def probe(self) -> bool:
        if not self.inner.probe():
            self.last_error = str(getattr(self.inner, "last_error", "") or "")
            return False
        if _group_listens(self.record, self.port) is False:
            self.last_error = (
                f"port {self.port} answers, but no process of the server listens on it "
                "(another process holds the port)"
            )
            return False
        self.last_error = ""
        return True


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ServerProcess:
    """One start of one server: spawn, wait healthy, stop. Not restartable: make a new one."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
        health: HealthCheck,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        pass_fds: Sequence[int] = (),
        clock: Clock | None = None,
        secrets: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        """``env`` is the child's whole environment (start from :func:`process_env`, if wanted).

        ``secrets`` are masked in every tail and error. ``port``, the port the server listens on,
        is optional but recommended: health then also requires that a process of the server's
        group listens on it (a foreign listener is not mistaken for ours), and
        :meth:`port_conflict` also probes whether the port is still taken after an exit.
        """
        if not argv:
            raise ConfigError(f"server {name} has an empty command", key=f"servers.{name}.command")
        self.name = name
        self.argv: tuple[str, ...] = tuple(argv)
        self.cwd = Path(cwd)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.health = health
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.pass_fds = tuple(pass_fds)
        self.clock: Clock = clock or SystemClock()
        self.secrets = tuple(s for s in secrets if s)
        self.port = port
        self._child: Child | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: ProcessRecord | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = "not started" if self._record is None else f"pid {self._record.pid}"
        return f"<ServerProcess {self.name} {state}>"

    @property
    def record(self) -> ProcessRecord | None:
        return self._record

    @property
    def running(self) -> bool:
        """True while the leader process runs (this reaps it once it has exited)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _mask(self, text: str) -> str:
        return mask_secrets(text, self.secrets)

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The masked last lines this start wrote to the log."""
        return log_tail(self.log_path, lines, self.secrets, since=self._log_offset)

    def start(self) -> ProcessRecord:
        """Spawn the server in a new session and process group; return its record."""
        if self._proc is not None:
            raise ServerError(
                f"server {self.name} was already started; create a new ServerProcess to restart",
                server=self.name,
            )
        shown = self._mask(shlex.join(self.argv))
        if not self.cwd.is_dir():
            raise ServerError(
                f"cannot start server {self.name}: its working directory {self.cwd} does not "
                f"exist; fix servers.{self.name}.cwd",
                server=self.name,
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open_log(self.log_path) as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"--- e2e-infra {stamp}: starting {self.name}: {shown}\n".encode())
            log_file.flush()
            self._log_offset = log_file.tell()
            try:
                child = spawn(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    log=log_file,
                    pass_fds=self.pass_fds,
                    what=f"server {self.name}",
                    clock=self.clock,
                )
            except OSError as exc:
                raise ServerError(
                    f"cannot start server {self.name}: {self._mask(self.argv[0])!r}: "
                    f"{exc.strerror or exc} (in {self.cwd}); fix servers.{self.name}.command",
                    server=self.name,
                ) from None
        self._child = child
        self._proc = proc = child.popen
        self._record = child.record
        log.debug("started server %s (pid %d): %s", self.name, proc.pid, shown)
        return self._record

    def wait_healthy(self) -> float:
        """Wait until the health check passes; return the seconds it took.

        Raises ServerExitedError as soon as the process exits, ServerStartTimeoutError after
        ``startup_timeout``; both carry the masked log tail. The process is left for :meth:`stop`.
        """
        if self._proc is None:
            raise ServerError(f"server {self.name} was not started", server=self.name)
        description = self._mask(self.health.description)
        check: HealthCheck = self.health
        # A socket we bound and handed over is ours by construction: no foreign listener to rule
        # out, and a request waits in its backlog for the answer instead of polling.
        listening = bool(self.pass_fds)
        if self.port is not None and self._record is not None and not listening:
            check = _OwnedCheck(self.health, self._record, self.port)
        try:
            return wait_healthy(
                check,
                timeout=self.startup_timeout,
                alive=lambda: self.running,
                clock=self.clock,
                what=f"server {self.name}",
                listening=listening,
            )
        except ServerExitedError:
            returncode = self._proc.poll()  # it has exited: this only reads (and reaps)
            tail = self.tail()
            conflict = self.port_conflict()
            cause = (
                "its port is taken by another process (address already in use); "
                "free the port or restart it on another port"
                if conflict
                else "fix the error in its log"
            )
            message = (
                f"server {self.name} {_describe_exit(returncode)} before it became healthy "
                f"({description}); {cause}; full log: {self.log_path}"
            )
            raise ServerExitedError(
                self._with_tail(message, tail),
                server=self.name,
                returncode=returncode,
                log_tail=tail,
            ) from None
        except DeadlineExceeded:
            tail = self.tail()
            last = self._mask(str(getattr(check, "last_error", "") or ""))
            message = (
                f"server {self.name} did not become healthy within {self.startup_timeout:g}s "
                f"({description}{f'; last probe: {last}' if last else ''}); check that it "
                f"listens where the health check looks, or raise servers.{self.name}."
                f"startup_timeout; full log: {self.log_path}"
            )
            raise ServerStartTimeoutError(
                self._with_tail(message, tail),
                server=self.name,
                timeout=self.startup_timeout,
                log_tail=tail,
            ) from None

    def _with_tail(self, message: str, tail: str) -> str:
        if not tail:
            return f"{message} (the log is empty)"
        count = len(tail.splitlines())
        return f"{message}\n--- last {count} log lines ---\n{tail}"

    def port_conflict(self) -> bool:
        """After an exit: did the server die because a foreign process holds its port?

        True when its log (this start's part) mentions EADDRINUSE / "address already in use", or
        when ``port`` was given (and no socket was handed over) and it is still not bindable.
        """
        if self._proc is None or self.running:
            return False
        if _ADDR_IN_USE.search(read_end(self.log_path, self._log_offset)):
            return True
        return (
            self.port is not None
            and not self.pass_fds
            and not port_is_free(self.port, ("127.0.0.1",))
        )

    def terminate(self) -> None:
        """Send SIGTERM to the group and return at once; :meth:`stop` then waits.

        Lets a caller stop several servers in parallel: terminate all, then stop each. The grace
        period of :meth:`stop` counts from the first SIGTERM.
        """
        if self._child is not None:
            self._child.begin(escalation(self.stop_timeout))

    @property
    def stop_record(self) -> StopRecord | None:
        """How :meth:`stop` ended the server (exited, after SIGTERM, after SIGKILL...)."""
        return None if self._child is None else self._child.stop_record

    def stop(self) -> int | None:
        """SIGTERM the group, wait ``stop_timeout``, SIGKILL the group, reap; idempotent.

        Returns the leader's return code (None if it was never started or could not be reaped).
        """
        if self._child is None:
            return None
        self._child.stop(escalation(self.stop_timeout))
        return self._child.popen.returncode


def server_order(config: Config, names: Sequence[str]) -> list[list[str]]:
    """The selected servers in start levels: each level only depends on earlier ones.

    A ``depends_on`` entry that the project does not run is ignored (it is not started).
    """
    selected = list(dict.fromkeys(names))
    remaining = {name: set(config.servers[name].depends_on) & set(selected) for name in selected}
    levels: list[list[str]] = []
    done: set[str] = set()
    while remaining:  # at least one server leaves per round: config rejects cycles
        level = [name for name, deps in remaining.items() if deps <= done]
        if not level:
            raise ConfigError(f"servers {sorted(remaining)} depend on each other in a cycle")
        levels.append(level)
        done.update(level)
        for name in level:
            del remaining[name]
    return levels


@dataclass(frozen=True)
class Placeholders:
    """The values of one project run's placeholders (``{python}``, ``{ports.backend}``...): the
    one place they are built. A server adds its own ``{port}`` and ``{fd}`` (:meth:`values`)."""

    project: str
    run_id: str
    root: Path
    results_dir: Path
    ports: Mapping[str, int]
    database_url: str = ""

    def with_port(self, name: str, port: int) -> Placeholders:
        """The same values, the named port ``name`` moved to ``port``."""
        return replace(self, ports={**self.ports, name: port})

    def values(self, **extra: object) -> dict[str, object]:
        """What :func:`render` fills templates from (``extra``: a server's ``port``, ``fd``)."""
        return {
            "python": sys.executable,
            "ports": types.SimpleNamespace(**self.ports),
            "database_url": self.database_url,
            "results_dir": str(self.results_dir),
            "project": self.project,
            "root": str(self.root),
            "run_id": self.run_id,
            **extra,
        }


def process_env(
    project: str, run_id: str, results_dir: Path, ports: Mapping[str, int], database_url: str
) -> dict[str, str]:
    """The environment of a project's servers and suite: ours without what is not theirs (see
    :func:`~e2e_infra.processes.child_environ`), plus its ports, database, run."""
    env = child_environ()
    for name, port in ports.items():
        env[f"{name.upper()}_PORT"] = str(port)
        env[f"{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
    if database_url:
        env["DATABASE_URL"] = database_url
    else:
        env.pop("DATABASE_URL", None)
    env["E2E_PROJECT"] = project
    env["E2E_RUN_ID"] = run_id
    env["E2E_RESULTS_DIR"] = str(results_dir)
    return env
