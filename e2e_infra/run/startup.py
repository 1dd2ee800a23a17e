"""Start one server of a project run, restarting it on a fresh port when its port was taken.

A server gets its named port from the session's lease. Two things can take that port from it
between the lease and the server's own ``bind``: a foreign process (not ours, not leased), or
nothing at all when the server inherits a socket the tool bound (``listen_socket``). So a server
is started up to ``restarts`` + 1 times: when binding the socket fails, or when the server exits
before it was healthy and its port turns out to be taken, the port is leased anew and the server
started again on it; any other failure is the answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ServerConfig
from ..errors import PortError, ServerExitedError
from ..resources.ports import port_is_free
from .servers import Placeholders

if TYPE_CHECKING:
    import socket

    from .servers import ServerProcess

__all__ = ["ServerStart", "StartHooks"]

log = logging.getLogger("e2e_infra")


@dataclass(frozen=True)
class StartHooks:
    """What starting a server needs from the session that runs it."""

    project: str
    # (server, placeholders, listener or None) -> a started ServerProcess, leased by the session
    spawn: Callable[[ServerConfig, Placeholders, socket.socket | None], ServerProcess]
    # stop a started server and forget its lease
    stop: Callable[[ServerProcess], None]
    # lease a fresh port for the named port (the old one is released)
    move_port: Callable[[str], int]
    # a phase of the run ("health"), timed
    phase: Callable[[str], contextlib.AbstractContextManager[None]]
    # (server, seconds from its spawn to healthy): what its start-up costs the run
    healthy: Callable[[str, float], None] = lambda _name, _seconds: None


class ServerStart:
    """Start ``server`` healthy, moving its port when another process took it."""

    def __init__(self, server: ServerConfig, hooks: StartHooks) -> None:
        self.server = server
        self.hooks = hooks

    def run(self, placeholders: Placeholders) -> Placeholders:
        """Start the server and wait until it is healthy; return the placeholders as they are
        now (its port may have moved). Raises what the last attempt raised."""
        server = self.server
        attempts = server.restarts + 1
        for attempt in range(1, attempts + 1):
            port = placeholders.ports.get(server.port) if server.port else None
            began = time.monotonic()
            try:
                with self._listener(port) as listener:
                    process = self.hooks.spawn(server, placeholders, listener)
            except PortError:
                if attempt == attempts or server.port is None:
                    raise
                placeholders = self._moved(placeholders, port, attempt, attempts)
                continue
            try:
                with self.hooks.phase("health"):
                    process.wait_healthy()
                self.hooks.healthy(server.name, time.monotonic() - began)
                return placeholders
            except ServerExitedError:
                taken = port is not None and (process.port_conflict() or not port_is_free(port))
                self.hooks.stop(process)
                if not taken or attempt == attempts or server.port is None:
                    raise
                placeholders = self._moved(placeholders, port, attempt, attempts)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextlib.contextmanager
    def _listener(self, port: int | None) -> Iterator[socket.socket | None]:
        """The race-free hand-over: we bind, the server inherits the listening socket; ours is
        closed once the server holds its own copy."""
        if not (self.server.listen_socket and port is not None):
            yield None
            return
        from .servers import bind_listen_socket

        listener = bind_listen_socket(port)  # PortError: taken
        try:
            yield listener
        finally:
            listener.close()

    def _moved(
        self, placeholders: Placeholders, port: int | None, attempt: int, attempts: int
    ) -> Placeholders:
        name = self.server.port
        assert name is not None
        new_port = self.hooks.move_port(name)
        log.warning(
            "%s: server %s could not use port %s (taken by another process); "
            "restarting it on port %s (attempt %d of %d)",
            self.hooks.project,
            self.server.name,
            port,
            new_port,
            attempt + 1,
            attempts,
        )
        return placeholders.with_port(name, new_port)
