"""Readiness probes behind one small protocol, and the one wait that polls them.

A :class:`HealthCheck` makes one short attempt per :meth:`~HealthCheck.probe` call and answers
``True`` or ``False``; it never raises for the expected failures (refused, reset, timed out, a 5xx).
:func:`wait_healthy` polls it with a growing interval (10 ms doubling up to 50 ms: a refused connect
costs ~0.1 ms, and a coarser cap made every server start wait up to 250 ms past its readiness; a
``cmd:`` check, which spawns a process per probe, is capped at 250 ms) under a monotonic deadline,
and stops early when the process it belongs to has exited: a foreign server answering on the same
port must not count as ours.

Where the tool bound the server's socket itself (``listen_socket = true``) an HTTP check does not
poll: the socket already listens, so a connect succeeds at once into its backlog and the request
waits there until the server accepts and answers. One such request (:meth:`HttpCheck.await_answer`)
notices readiness within a millisecond or two of the answer, instead of up to one poll interval
later; a refused or reset connection (the server closed the socket, or answered 5xx) falls back to
polling.

Specs, with placeholders already filled (see :func:`parse_health`)::

    http://127.0.0.1:3101/health    GET, healthy on 2xx/3xx, redirects are not followed
    https://127.0.0.1:3101/         the same over TLS; the certificate is not verified
    tcp://127.0.0.1:3101            a TCP connect
    cmd:./bin/ready --port 3101     a command, healthy on exit status 0 (no shell)
    ""                              a TCP connect to the server's own port
"""

from __future__ import annotations

import http.client
import select
import shlex
import socket
import ssl
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from ..clock import Clock, SystemClock, wait_until
from ..conninfo import mask_secrets
from ..errors import ConfigError, DeadlineExceeded, ServerExitedError
from ..processes import KILL, spawn

__all__ = [
    "CommandCheck",
    "HealthCheck",
    "HttpCheck",
    "TcpCheck",
    "parse_health",
    "wait_healthy",
]

POLL_CAP = 0.05  # seconds between probes at most (HTTP, TCP)
COMMAND_POLL_CAP = 0.25  # a cmd: probe spawns a process: probe less often
ALIVE_EVERY = 0.05  # while one request waits in a listening socket's backlog: is the server alive?
_HEADERS = {"User-Agent": "e2e-infra-health", "Connection": "close"}  # one request a connection

_SPEC_HELP = (
    "use http://HOST:PORT/PATH, https://..., tcp://HOST:PORT, cmd:COMMAND, "
    "or leave it empty for a TCP connect on the server's port"
)


class HealthCheck(Protocol):
    """One readiness probe."""

    @property
    def description(self) -> str:
        """What is probed, for messages, e.g. ``HTTP GET http://127.0.0.1:3101/health``.

        Never contains a credential.
        """
        ...

    def probe(self) -> bool:
        """One short attempt; False (never an exception) when the target is not ready."""
        ...


class HttpCheck:
    """``GET url``; healthy on a 2xx or 3xx answer. Redirects are not followed."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"health URL {mask_secrets(url)!r} is not an http(s)://HOST[:PORT]/PATH URL",
                key="health",
            )
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(
                f"health URL {mask_secrets(url)!r} has an invalid port", key="health"
            ) from None
        self.url = url
        self.host = parts.hostname
        self.https = parts.scheme == "https"
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self.last_error = ""
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self._description = f"HTTP GET {mask_secrets(shown)}"

    @property
    def description(self) -> str:
        return self._description

    def _connection(self) -> http.client.HTTPConnection:
        if self.https:
            # A readiness probe of a local test server: self-signed certificates are the norm.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def probe(self) -> bool:
        conn = self._connection()
        try:
            conn.request("GET", self.target, headers=_HEADERS)
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            self.last_error = str(exc) or type(exc).__name__
            return False
        finally:
            conn.close()
        return self._judge(status)

    def await_answer(
        self, timeout: float, alive: Callable[[], bool] | None = None, clock: Clock | None = None
    ) -> bool:
        """One request that waits up to ``timeout`` seconds for the answer; True on 2xx/3xx.

        For a socket that already listens (bound by the tool): the request sits in its backlog
        until the server accepts it. ``alive`` is asked every :data:`ALIVE_EVERY` seconds while
        waiting; a dead server ends the wait (False). Plain HTTP only: an https:// check answers
        False at once (its handshake would block without those checks), so the caller polls.
        """
        if self.https:
            return False
        clock = clock or SystemClock()
        deadline = clock.monotonic() + timeout
        conn = http.client.HTTPConnection(self.host, self.port, timeout=max(timeout, 0.001))
        try:
            conn.request("GET", self.target, headers=_HEADERS)
            sock = conn.sock
            while sock is not None:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    self.last_error = "no answer"
                    return False
                if select.select([sock], [], [], min(ALIVE_EVERY, remaining))[0]:
                    break
                if alive is not None and not alive():
                    self.last_error = "the server exited"
                    return False
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            self.last_error = str(exc) or type(exc).__name__
            return False
        finally:
            conn.close()
        return self._judge(status)

    def _judge(self, status: int) -> bool:
        """2xx and 3xx answer "healthy"; anything else is kept as the last error."""
        self.last_error = "" if 200 <= status < 400 else f"HTTP {status}"
        return 200 <= status < 400

    def __repr__(self) -> str:
        return f"HttpCheck({self._description!r}, timeout={self.timeout:g})"


class TcpCheck:
    """A TCP connect to ``host:port``."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        if not 0 < port < 65536:
            raise ConfigError(f"health check port {port} is out of range 1-65535", key="health")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.last_error = ""

    @property
    def description(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"TCP connect {host}:{self.port}"

    def probe(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                pass
        except OSError as exc:
            self.last_error = exc.strerror or type(exc).__name__
            return False
        self.last_error = ""
        return True

    def __repr__(self) -> str:
        return f"TcpCheck({self.host!r}, {self.port}, timeout={self.timeout:g})"


class CommandCheck:
    """Run ``argv`` (no shell); healthy on exit status 0 within ``timeout`` seconds.

    The command runs in its own process group, which is killed whole when it overruns. A command
    that cannot be started at all raises ConfigError: polling it until the deadline would only hide
    the typo.
    """

    poll_cap = COMMAND_POLL_CAP

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not argv:
            raise ConfigError(f"the health command is empty; {_SPEC_HELP}", key="health")
        self.argv = tuple(argv)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.timeout = timeout
        self.last_error = ""

    @property
    def description(self) -> str:
        return f"command {mask_secrets(shlex.join(self.argv))}"

    def probe(self) -> bool:
        try:
            child = spawn(self.argv, cwd=self.cwd, env=self.env, what=self.description)
        except OSError as exc:
            raise ConfigError(
                f"cannot run the health {self.description}"
                f"{f' in {self.cwd}' if self.cwd else ''}: {exc.strerror}; "
                'fix the server\'s health = "cmd:..."',
                key="health",
            ) from None
        try:
            returncode = child.popen.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            child.stop(KILL)  # a probe needs no grace: kill its whole group and reap
            self.last_error = f"timed out after {self.timeout:g}s"
            return False
        self.last_error = "" if returncode == 0 else f"exit status {returncode}"
        return returncode == 0

    def __repr__(self) -> str:
        return f"CommandCheck({self.description!r}, timeout={self.timeout:g})"


def parse_health(
    spec: str,
    *,
    port: int | None,
    host: str = "127.0.0.1",
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    key: str = "health",
) -> HealthCheck:
    """Build the check for ``spec`` (placeholders already filled).

    ``port`` is the server's own port, used by the empty spec and by ``tcp://HOST`` without a port;
    ``cwd``/``env`` are used by ``cmd:`` checks; ``key`` names the config key in errors.
    """
    text = spec.strip()
    shown = mask_secrets(text)
    if not text:
        if port is None:
            raise ConfigError(
                f"{key} is empty and the server has no port to connect to; "
                'set the server\'s port = "<port name>" or give a health check',
                key=key,
            )
        return TcpCheck(host, port)
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme in ("http", "https"):
        try:
            return HttpCheck(text)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}", key=key) from None
    if scheme == "tcp":
        parts = urlsplit(text)
        try:
            tcp_port = parts.port if parts.port is not None else port
        except ValueError:
            tcp_port = None
        if not parts.hostname or tcp_port is None or parts.path not in ("", "/"):
            raise ConfigError(f"{key} = {shown!r} is not tcp://HOST:PORT; {_SPEC_HELP}", key=key)
        return TcpCheck(parts.hostname, tcp_port)
    if scheme == "cmd":
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise ConfigError(f"{key} = {shown!r}: {exc} (check the quoting)", key=key) from None
        if not argv:
            raise ConfigError(f"{key} = {shown!r} has no command; {_SPEC_HELP}", key=key)
        return CommandCheck(argv, cwd=cwd, env=env)
    raise ConfigError(f"{key} = {shown!r} is not a known health check; {_SPEC_HELP}", key=key)


def wait_healthy(
    check: HealthCheck,
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    clock: Clock | None = None,
    what: str = "",
    listening: bool = False,
) -> float:
    """Poll ``check`` until it passes; return the seconds it took.

    ``listening``: the server's socket was bound and listens already (handed over by the tool), so
    an :class:`HttpCheck` first sends one request that waits for the answer (no polling latency)
    and polls only if that request fails.

    ``alive`` is asked before and after each probe: once it answers False the wait ends with
    :class:`ServerExitedError` (``returncode=None``; the caller knows the real one), so a foreign
    process answering on the port is never mistaken for ours. Raises :class:`DeadlineExceeded`
    after ``timeout`` seconds. ``what`` names the server in messages. A check may set
    ``poll_cap``, the longest pause between its probes (default :data:`POLL_CAP`).
    """
    clock = clock or SystemClock()
    name = what or "the server"
    started = clock.monotonic()

    def exited() -> ServerExitedError:
        return ServerExitedError(
            f"{name} exited before it became healthy ({check.description})",
            server=what,
            returncode=None,
        )

    def attempt() -> bool:
        if alive is not None and not alive():
            raise exited()
        healthy = check.probe()
        if healthy and alive is not None and not alive():
            raise exited()
        return healthy

    if listening and isinstance(check, HttpCheck):
        if check.await_answer(timeout, alive=alive, clock=clock):
            if alive is not None and not alive():
                raise exited()
            return clock.monotonic() - started
        if alive is not None and not alive():
            raise exited()
    try:
        wait_until(
            attempt,
            timeout=max(0.0, timeout - (clock.monotonic() - started)),
            what=f"{name} ({check.description})",
            clock=clock,
            cap=float(getattr(check, "poll_cap", POLL_CAP)),
        )
    except DeadlineExceeded as exc:
        last = getattr(check, "last_error", "")
        message = f"timed out after {timeout:g}s waiting for {exc.what}"  # the whole wait's
        if last:
            message += f"; last probe: {mask_secrets(str(last))}"
        raise DeadlineExceeded(message, what=exc.what, timeout=timeout) from None
    return clock.monotonic() - started
